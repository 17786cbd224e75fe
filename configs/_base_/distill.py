# Every key train_scripts/train_distill.py reads, with its default: latent consistency distillation of a PixCell
# teacher into a few-step student with the guidance scale as an input (Luo et al. 2023, LCD; PixArt-alpha's LCM:
# AdamW, EMA target rate 0.95, pseudo-Huber c = 0.001, 50 DDIM skipping steps). Unknown keys are an error.

# ---- models
model = "PixCell-XL/2-256"  # preset the teacher must match (resolution, token count); checked, never built
model_overrides = {}  # config fields changed on the preset (e.g. caption_channels for a stand-in UNI)
resolution = 256  # training crop size in px (multiple of 256)
teacher = "StonyBrook-CVLab/PixCell-256"  # --teacher: hub id / diffusers folder / original .pth / work dir
student = dict(
    kind="full",  # "full": every weight trained; "lora": adapters on the attention projections (LCM-LoRA)
    lora_rank=64,  # with kind="lora"
    lora_alpha=64,
)

# ---- data (the pre-extracted features the teacher was trained on; root from --data-root / $PIXCELL_DATA_ROOT)
data = dict(
    root=None,
    index_file=None,
    dataset_keys=None,
    parent_size=1024,
    feature_format="npy",  # "npy" or "packed"
    features_root=None,
    num_workers=8,
    max_failure_rate=0.01,
)
vae_shift = None  # model latent = (z - shift) * scale; None: as recorded beside the features, else SD3.5's
vae_scale = None

# ---- distillation
distill = dict(
    guidance_range=(
        1.0,
        3.0,
    ),  # w ~ U[low, high] in training (eps_u + w (eps_c - eps_u), the teacher's guidance)
    huber_c=0.001,  # pseudo-Huber constant; None: squared L2
    sample_steps=4,  # recorded in sampling.json: the student's default steps (LCMScheduler)
    sample_guidance=2.0,  # recorded in sampling.json: the student's default w (published 2.0 @256, 1.2 @1024)
)

# ---- optimisation
train_batch_size = 32  # per process
gradient_accumulation_steps = 1
num_epochs = 1
max_steps = 5000  # optimizer steps (overrides num_epochs when set)
optimizer = dict(type="AdamW", lr=2e-5, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
lr_schedule = dict(type="constant", warmup_steps=100)
gradient_clip = 1.0
ema_rate = 0.95  # the target network theta^- = EMA of the student (LCM)
mixed_precision = "bf16"  # "no", "fp16", "bf16"
fp32_attention = False  # attention in fp32 under fp16 autocast
gradient_checkpointing = True
seed = 0
max_nonfinite_steps = 10

# ---- checkpoints, logging, validation
save_every_steps = 500
keep_last = 3
log_every_steps = 20
report_to = "tensorboard"  # "tensorboard", "wandb" or "none"
validation = dict(
    every_steps=500,  # 0 = off; rows of [real | teacher | student] for held-out conditions, same noise
    num_images=4,  # held-out samples (the last ones of the dataset, never trained on while validation is on)
    guidance_scale=2.0,
    teacher_steps=20,  # DPM-Solver++ steps of the teacher's column
    student_steps=4,  # LCM steps of the student's column
    vae="stabilityai/stable-diffusion-3.5-large",
)
