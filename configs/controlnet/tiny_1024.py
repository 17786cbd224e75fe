# Tests only: the ControlNet trainer at 1024 px on a tiny base (patch size 8, so 16 x 16 tokens), 16 UNI tokens of
# the tiny 96-d UNI stand-in; models and data are passed on the command line as in configs/controlnet/tiny.py.
_base_ = ["./tiny.py"]

resolution = 1024
model_overrides = dict(
    caption_channels=96, patch_size=8, sample_size=128, interpolation_scale=2.0, caption_num_tokens=16
)
controlnet = dict(n_blocks=1)
train_batch_size = 1
max_steps = 2
