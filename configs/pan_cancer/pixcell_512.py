# Stage 2: 512 px crops (2x2 UNI tokens + token position embedding), initialised from stage 1.
_base_ = ["../_base_/default.py"]

model = "PixCell-XL/2-512"  # interpolation_scale 1.0, 4 tokens
resolution = 512
train_batch_size = 64
load_from = None  # set to the stage-1 work dir: --load-from work_dirs/pixcell_256
validation = dict(every_steps=2000, num_images=4, guidance_scale=1.5, num_inference_steps=20)
