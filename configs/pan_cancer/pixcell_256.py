# Stage 1: PixCell-256 from scratch on 256 px crops of the 1024 px pan-cancer patches (1 UNI token).
_base_ = ["../_base_/default.py"]

model = "PixCell-XL/2-256"  # interpolation_scale 0.5, 1 token
resolution = 256
train_batch_size = 128
mixed_precision = "fp16"
seed = 24
