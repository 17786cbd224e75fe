# Distil PixCell-1024 (16 UNI tokens) into a 4-step student; the published guidance optimum is 1.2 at 1024 px.
_base_ = ["../_base_/distill.py"]

model = "PixCell-XL/2-1024"
resolution = 1024
teacher = "StonyBrook-CVLab/PixCell-1024"
distill = dict(guidance_range=(1.0, 2.0), sample_guidance=1.2)
train_batch_size = 4
validation = dict(guidance_scale=1.2)
