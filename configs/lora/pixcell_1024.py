# LoRA on PixCell-1024 (16 UNI tokens per 1024 px patch); the published guidance optimum there is 1.2.
_base_ = ["../_base_/lora.py"]

load_from = "StonyBrook-CVLab/PixCell-1024"
train_batch_size = 4
