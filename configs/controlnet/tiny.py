# A tiny ControlNet run for CPU tests and the README figure: tiny base (random or briefly trained), tiny VAE and
# UNI stand-ins passed as paths on the command line (--base-model, --vae, --uni).
_base_ = ["../_base_/controlnet.py"]

model = "PixCell-tiny-256"
model_overrides = dict(caption_channels=96)
base_model = None
controlnet = dict(n_blocks=2)
pairs = dict(num_workers=0)
train_batch_size = 2
max_steps = 4
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
lr_schedule = dict(type="cosine", warmup_steps=1)
mixed_precision = "no"
save_every_steps = 2
log_every_steps = 1
report_to = "none"
validation = dict(every_steps=0, num_images=1, samples_per_mask=2, num_inference_steps=4)
