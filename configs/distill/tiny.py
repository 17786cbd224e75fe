# A tiny distillation run for CPU tests: the tiny teacher and the tiny VAE stand-in come from the command line.
_base_ = ["../_base_/distill.py"]

model = "PixCell-tiny-256"
model_overrides = dict(caption_channels=96)
data = dict(parent_size=512, num_workers=0)
train_batch_size = 2
max_steps = 4
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
lr_schedule = dict(type="constant", warmup_steps=0)
mixed_precision = "no"
gradient_checkpointing = False
save_every_steps = 2
log_every_steps = 1
report_to = "tensorboard"
validation = dict(every_steps=2, num_images=1, teacher_steps=2, student_steps=2)
