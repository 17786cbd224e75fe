# Every key of a virtual-staining LoRA run of train_scripts/train_lora.py (also started as
# virtual_staining/train_lora.py), with its default (a config may set only these keys).
# Defaults: the published virtual-staining adapters (rank-4, alpha-4 LoRA on the cross-attention of
# PixCell-1024, trained on IHC images conditioned on their own UNI2-h embeddings, eps-MSE loss).
task = (
    "virtual_staining"  # the LoRA trainer's data: paired H&E / IHC images (configs/_base_/lora.py: features)
)

# ---- data: the IHC side of paired H&E / IHC images (the root comes from --data-root, never a config)
dataset = "MIST"  # "MIST" or "HER2Match"
stain = "HER2"  # MIST: HER2, ER, PR, Ki67; HER2Match: HER2
data = dict(
    root=None,
    train_split="train",
    val_split="val",  # validation images come from here (None: the last training images, never trained on)
    image_size=1024,  # px of the stored images
    resize_to_model=False,  # resize images to the model's resolution before the VAE (tiny test models only)
    on_unpaired="error",
    embeddings_dir=None,  # UNI token caches (default: <work_dir>/embeddings), shared with the flow trainer
    num_workers=4,
    max_failure_rate=0.01,
)
uni = "hf-hub:MahmoodLab/UNI2-h"
uni_dtype = "bf16"
uni_batch_size = 8
vae = "stabilityai/stable-diffusion-3.5-large"  # hub id (subfolder vae) or local folder

# ---- model
model = (
    "StonyBrook-CVLab/PixCell-1024"  # base transformer (--load-from overrides): hub id, folder, original .pth
)
lora = dict(
    rank=4,
    alpha=4.0,
    targets=["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
    dropout=0.0,
)

# ---- diffusion
loss = "mse"  # "mse": eps MSE on the 16 noise channels (published); "hybrid": + learned-variance VB term
class_dropout_prob = 0.1  # condition replaced by the null embedding (classifier-free guidance)

# ---- optimisation
train_batch_size = 2  # per process
gradient_accumulation_steps = 1
num_epochs = 10
max_steps = None
optimizer = dict(type="AdamW", lr=1e-4, weight_decay=0.0)
lr_schedule = dict(type="constant", warmup_steps=0)
gradient_clip = 1.0
ema_rate = None  # e.g. 0.999 over the LoRA weights; None = no EMA (published)
mixed_precision = "bf16"  # "no", "fp16", "bf16"
gradient_checkpointing = True
seed = 0
max_nonfinite_steps = 10

# ---- checkpoints, logging, validation
save_every_steps = 1000
keep_last = 3
log_every_steps = 20
report_to = "tensorboard"
validation = dict(
    every_steps=1000,  # 0 = off: [real IHC | sample from its own embedding] rows
    num_images=4,
    guidance_scale=1.2,  # PixCell-1024's published optimum
    num_inference_steps=20,
)
