# PixCell-1024 IHC LoRA on MIST (stain: --stain or stain=...; data: --data-root).
_base_ = ["./_base_/lora.py"]

dataset = "MIST"
stain = "HER2"
