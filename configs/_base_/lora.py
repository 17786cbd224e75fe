# Every key train_scripts/train_lora.py reads for LoRA fine-tuning on extracted features (task "features"), with
# its default; a config may set only these keys. The virtual-staining adapters are the same trainer with task
# "virtual_staining" and the keys of configs/virtual_staining/_base_/lora.py (paired H&E / IHC images).
task = "features"

# ---- model: the base transformer (also --load-from): hub id, diffusers folder, original .pth, training work dir.
# Its size fixes the stage: PixCell-256 trains on 256 px crops (1 UNI token), PixCell-1024 on 1024 px (16).
load_from = None
load_ema = True  # a training work dir / checkpoint as base: its EMA weights (the release weights)
lora = dict(
    rank=16,
    alpha=16.0,
    targets=["self_attn", "cross_attn"],  # module names, or the groups self_attn, cross_attn, ff
    dropout=0.0,
)

# ---- data: pre-extracted features in the published layout (the root comes from --data-root, never a config)
data = dict(
    root=None,  # patches root (holds metadata/patch_names_all.hdf5)
    index_file=None,  # default: <root>/metadata/patch_names_all.hdf5
    dataset_keys=None,  # e.g. ["TCGA_1024"]; None = all keys in the index
    parent_size=1024,  # size of the stored patches the training crops come from
    feature_format="npy",  # "npy" (published per-patch files) or "packed"
    features_root=None,
    num_workers=8,
    max_failure_rate=0.01,
)
# model latent = (z - shift) * scale. None (both): what tools.extract_features recorded beside the features, else
# SD3.5's (diffusion/geometry.py); values set here must agree with the features' record.
vae_shift = None
vae_scale = None

# ---- diffusion
loss = "hybrid"  # "hybrid": eps MSE + learned-variance VB term (PixCell's own objective); "mse": eps only
class_dropout_prob = 0.1

# ---- optimisation: the adapter's parameters only
train_batch_size = 16  # per process
gradient_accumulation_steps = 1
num_epochs = 1
max_steps = None
optimizer = dict(type="AdamW", lr=1e-4, weight_decay=0.0)
lr_schedule = dict(type="constant", warmup_steps=0)
gradient_clip = 1.0
ema_rate = None  # e.g. 0.999 over the adapter
mixed_precision = "bf16"
gradient_checkpointing = True
seed = 0
max_nonfinite_steps = 10

# ---- checkpoints, logging, validation
save_every_steps = 500
keep_last = 3
log_every_steps = 20
report_to = "tensorboard"
validation = dict(
    every_steps=500,  # 0 = off: [real crop | sample from its held-out condition] rows
    num_images=4,
    guidance_scale=None,  # None: the published default for the token count (2.0 at 256 px, 1.2 at 1024)
    num_inference_steps=20,
    vae="stabilityai/stable-diffusion-3.5-large",  # decodes the samples: hub id or local folder
)
