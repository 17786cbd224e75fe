"""Virtual staining H&E -> IHC with PixCell-1024 (see docs/virtual_staining.md).

data.py            MIST / HER2Match paired folders (pairing by file name), image reading
embeddings.py      UNI2-h token cache of a paired split (both trainers read it)
flow_mlp.py        the flow-matching MLP (published layout), its loss, Euler integration, I/O
lora.py            the project's LoRA (diffusion/model/lora.py), re-exported: adapter files, published .pth
published.py       where the published weights live on the Hub
export_published.py  our trained weights -> the published ckpts/lora, ckpts/mlp layout
stainer.py         VirtualStainer: embed -> translate -> generate, tiling and seeds
stain.py           the command-line tool
train_flow_mlp.py, training.py   the flow trainer and what the two trainers share
train_lora.py      the IHC data of the LoRA trainer (train_scripts/train_lora.py), and its shortcut entry point
tiny.py            tiny random stand-ins (tests, offline notebook)
virtual_staining.ipynb                           the walk-through
"""
