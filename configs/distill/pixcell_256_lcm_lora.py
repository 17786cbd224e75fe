# Distil PixCell-256 into a LoRA student (rank 64 on the attention projections: an adapter of a few MB).
_base_ = ["../_base_/distill.py"]

teacher = "StonyBrook-CVLab/PixCell-256"
student = dict(kind="lora", lora_rank=64, lora_alpha=64)
optimizer = dict(type="AdamW", lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
