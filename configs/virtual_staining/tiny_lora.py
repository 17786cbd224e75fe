# Tests / CPU smoke runs only: LoRA on a tiny PixCell-tiny-128-T16 (pass its folder as model=...), tiny VAE.
_base_ = ["./_base_/lora.py"]

uni_dtype = "fp32"
uni_batch_size = 4
data = dict(num_workers=0, resize_to_model=True)  # 1024 px images (16 UNI tokens) -> 128 px for the VAE
train_batch_size = 2
num_epochs = 2
mixed_precision = "no"
gradient_checkpointing = False
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0)
save_every_steps = 2
log_every_steps = 1
report_to = "none"
validation = dict(every_steps=2, num_images=1, num_inference_steps=2)
