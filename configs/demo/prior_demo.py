# The CPU demo's UNI prior (`make demo`): one token per 256 px training tile of the slide, in the 96-d stand-in UNI
# space; a small residual MLP trained in seconds. Same training script as the full-scale priors (configs/prior/).
_base_ = ["../prior/_base_/prior.py"]

data = dict(parent_size=256, index_keys=["cmu_train_256"], num_workers=0, in_memory=True)
resolution = 256
stats_samples = 1024
prior = dict(width=128, depth=3)
train_batch_size = 26  # all 26 training tiles: one batch an epoch
num_epochs = 10000
max_steps = 1200
optimizer = dict(type="AdamW", lr=3e-3, weight_decay=0.0)
lr_schedule = dict(type="cosine", warmup_steps=20)
ema_rate = 0.99
save_every_steps = 1200
keep_last = 1
log_every_steps = 100
report_to = "tensorboard"
