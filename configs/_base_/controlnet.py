# Every key train_scripts/train_controlnet.py reads, with its default: the published recipe of the PixCell-256
# cell-mask ControlNet (PixCell paper; original controlnet/train.py): base PixCell-256 frozen, a copy of its first
# 27 blocks trained with AdamW lr 1e-5, cosine after 500 warm-up steps, grad clip 1.0, 25k iterations at batch 4,
# epsilon MSE on the 16 noise channels. Unknown keys in a config are an error.

# ---- models
model = "PixCell-XL/2-256"  # preset of the base transformer (checked against base_model's config)
model_overrides = {}  # config fields changed on the preset (e.g. caption_channels for a stand-in UNI)
resolution = 256  # image and mask size in px
base_model = "StonyBrook-CVLab/PixCell-256"  # frozen base: hub id / diffusers folder / original checkpoint;
# None builds a random `model` (tests and demos only)
controlnet = dict(
    n_blocks=27,  # leading base blocks copied into the ControlNet (published: 27 of 28)
    conditioning_scale=1.0,  # residual scale during training and validation
    load_from=None,  # start from these ControlNet weights (folder or hub id) instead of a copy of the base
    freeze_patch_embed=True,  # the copied input patch embedding stays frozen (published)
)
vae = "stabilityai/stable-diffusion-3.5-large"  # encodes images and masks on the fly; decodes validation samples

# ---- data: folders of (image, mask) pairs (paths from --images/--masks or here); see diffusion/data/mask_pairs.py
pairs = dict(
    image_dir=None,  # H&E patches, `resolution` px
    mask_dir=None,  # binary or instance PNG masks, same relative names
    features_dir=None,  # <name>_uni.npy UNI2-h features (default: beside the images)
    uni=None,  # UNI2-h source (hub id / folder / file): writes missing <name>_uni.npy first; None: must exist
    num_workers=4,
    max_failure_rate=0.01,  # refuse to start when more than this fraction of pairs is bad
)
class_dropout_prob = (
    0.0  # published: none; > 0 also trains the ControlNet under the null condition (guidance)
)

# ---- optimisation
train_batch_size = 4  # per process
gradient_accumulation_steps = 1
num_epochs = 10
max_steps = 25000  # optimizer steps (overrides num_epochs when set)
optimizer = dict(
    type="AdamW", lr=1e-5, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8
)  # torch AdamW defaults
lr_schedule = dict(type="cosine", warmup_steps=500)
gradient_clip = 1.0
ema_rate = None  # None: no EMA (published); e.g. 0.999 keeps an fp32 EMA, used for validation and exported
mixed_precision = "fp16"  # "no", "fp16", "bf16" (published: fp16)
gradient_checkpointing = False
seed = 0
max_nonfinite_steps = 10  # stop after this many consecutive skipped non-finite steps

# ---- checkpoints, logging, validation
save_every_steps = 2500
keep_last = 3
log_every_steps = 20
report_to = "tensorboard"  # "tensorboard", "wandb" or "none"
validation = dict(
    every_steps=2500,  # 0 = off; rows of [mask | reference | samples] for held-out pairs, fixed noise
    num_images=4,  # held-out pairs (the last ones, never trained on while validation is on)
    samples_per_mask=2,
    guidance_scale=1.0,  # 1.0: the conditional prediction (the ControlNet never saw the null condition)
    num_inference_steps=20,
)
