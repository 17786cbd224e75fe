# A tiny PixCell for CPU tests: 2 blocks of width 72 at 256 px, fed by the tiny UNI stand-in (96-d).
_base_ = ["../_base_/default.py"]

model = "PixCell-tiny-256"
model_overrides = dict(caption_channels=96)
resolution = 256
data = dict(parent_size=512, num_workers=0)
train_batch_size = 2
num_epochs = 1
max_steps = 4
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
lr_schedule = dict(type="constant", warmup_steps=0)
gradient_clip = 1.0
ema_rate = 0.9
mixed_precision = "no"
fp32_attention = False
gradient_checkpointing = False
save_every_steps = 2
log_every_steps = 1
report_to = "tensorboard"
validation = dict(every_steps=0, num_images=2, guidance_scale=2.0, num_inference_steps=4)
