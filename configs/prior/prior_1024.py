# The UNI prior for PixCell-1024: the 4x4 grid of 1536-d tokens of each 1024 px patch, generated jointly by a
# small transformer over the 16 tiles (2-D positions), so neighbouring tiles agree.
_base_ = ["./_base_/prior.py"]

resolution = 1024
prior = dict(width=768, depth=8, num_heads=12)
train_batch_size = 256
