# Tests / CPU smoke runs only: a LoRA on a tiny PixCell (pass it with --load-from), tiny features.
_base_ = ["../_base_/lora.py"]

lora = dict(rank=2, alpha=4.0, targets=["self_attn", "cross_attn", "ff"])
data = dict(parent_size=512, num_workers=0)
train_batch_size = 2
max_steps = 3
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0)
mixed_precision = "no"
gradient_checkpointing = False
save_every_steps = 2
log_every_steps = 1
report_to = "none"
validation = dict(every_steps=0, num_images=1, num_inference_steps=2)
