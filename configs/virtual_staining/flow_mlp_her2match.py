# Flow MLP H&E -> IHC UNI2-h tokens on HER2Match (stain: --stain or stain=...; data: --data-root).
_base_ = ["./_base_/flow_mlp.py"]

dataset = "HER2Match"
stain = "HER2"
