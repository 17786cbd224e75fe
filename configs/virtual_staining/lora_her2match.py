# PixCell-1024 IHC LoRA on HER2Match (stain: --stain or stain=...; data: --data-root).
_base_ = ["./_base_/lora.py"]

dataset = "HER2Match"
stain = "HER2"
