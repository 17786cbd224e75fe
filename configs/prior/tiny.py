# Tests / CPU smoke runs only: a tiny prior over the tiny UNI stand-in's tokens.
_base_ = ["./_base_/prior.py"]

data = dict(parent_size=256, num_workers=0)
stats_samples = 256
prior = dict(width=64, depth=2, num_heads=4)
train_batch_size = 8
num_epochs = 2
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0)
lr_schedule = dict(type="constant", warmup_steps=0)
ema_rate = 0.9
save_every_steps = 4
log_every_steps = 2
report_to = "none"
