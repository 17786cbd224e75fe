# Flow MLP H&E -> IHC UNI2-h tokens on MIST (stain: --stain or stain=...; data: --data-root).
_base_ = ["./_base_/flow_mlp.py"]

dataset = "MIST"
stain = "HER2"
