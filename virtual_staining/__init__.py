"""Virtual staining H&E -> IHC with PixCell-1024 (see docs/virtual_staining.md).

data.py            MIST / HER2Match paired folders (pairing by file name), image reading
embeddings.py      UNI2-h token cache of a paired split (both trainers read it)
flow_mlp.py        the flow-matching MLP (published layout), its loss, Euler integration, I/O
lora.py            LoRA on PixCell's cross-attention via peft; adapter-only save, published-weights load
published.py       where the published weights live on the Hub
stainer.py         VirtualStainer: embed -> translate -> generate, tiling and seeds
stain.py           the command-line tool
train_flow_mlp.py, train_lora.py, training.py   the two trainers and what they share
tiny.py            tiny random stand-ins (tests, offline notebook)
virtual_staining.ipynb                           the walk-through
"""
