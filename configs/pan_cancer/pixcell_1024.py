# Stage 3: full 1024 px patches (4x4 UNI tokens), initialised from stage 2.
_base_ = ["../_base_/default.py"]

model = "PixCell-XL/2-1024"  # interpolation_scale 2.0, 16 tokens
resolution = 1024
train_batch_size = 12
load_from = None  # set to the stage-2 work dir: --load-from work_dirs/pixcell_512
validation = dict(every_steps=2000, num_images=2, guidance_scale=1.2, num_inference_steps=20)
