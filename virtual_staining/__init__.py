"""Virtual staining H&E -> IHC with PixCell-1024 (see docs/virtual_staining.md): a client of the library.

stainer.py           VirtualStainer: embed -> translate -> generate, tiling and seeds
stain.py             the command-line tool
embeddings.py        the command that caches the UNI2-h tokens of a paired split ahead of training
published.py         where the published weights live on the Hub
export_published.py  our trained weights -> the published ckpts/lora, ckpts/mlp layout
tiny.py              tiny random stand-ins (tests, offline notebook)
virtual_staining.ipynb  the walk-through

What it builds on lives in the library: the paired datasets and their token caches (diffusion/data/ihc_pairs.py,
ihc_tokens.py), the flow MLP (diffusion/model/flow_mlp.py), the LoRA (diffusion/model/lora.py); the two trainers
are train_scripts/train_flow_mlp.py and train_scripts/train_lora.py with a virtual-staining config. Nothing in
the library or the trainers imports this package.
"""
