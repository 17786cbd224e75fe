# Every key virtual_staining/train_flow_mlp.py reads, with its default (a config may set only these keys).
# Defaults: the published virtual-staining flow MLP (`../shared/formats/flow_mlp_keys.json`) and its training
# recipe (AdamW at lr 1e-4, 4 images = 64 token pairs per step, rectified flow per token).

# ---- data: paired H&E / IHC images (the root comes from --data-root, never a config)
dataset = (
    "MIST"  # "MIST" (<root>/<stain>/TrainValAB/{trainA,trainB,valA,valB}) or "HER2Match" (HE_20x/, IHC_20x/)
)
stain = "HER2"  # MIST: HER2, ER, PR, Ki67; HER2Match: HER2
data = dict(
    root=None,
    train_split="train",
    val_split="val",  # None: no validation
    image_size=1024,  # px; 16 UNI tokens per image (4 x 4 tiles of 256 px)
    on_unpaired="error",  # "error" or "skip" images without a partner of the same file name
    embeddings_dir=None,  # where the UNI token caches go (default: <work_dir>/embeddings)
    num_workers=4,  # image decoding workers while computing the cache
    max_failure_rate=0.01,  # unreadable pairs tolerated while computing the cache
)
uni = "hf-hub:MahmoodLab/UNI2-h"  # encoder of the cache: hub id, local folder or weights file
uni_dtype = "bf16"  # "fp32", "bf16", "fp16" (on CPU, bf16 is slower than fp32 unless AMX is present)
uni_batch_size = 8  # image pairs per UNI forward pass

# ---- model (published sizes)
flow = dict(
    in_channels=1536,
    time_embed_dim=1024,
    model_channels=1024,
    bottleneck_channels=1024,
    out_channels=1536,
    num_res_blocks=6,
    dropout=0.0,
)

# ---- optimisation
train_batch_size = 4  # images per process; each gives 16 token pairs
num_epochs = 100
max_steps = None  # overrides num_epochs when set
optimizer = dict(type="AdamW", lr=1e-4, weight_decay=0.0)
lr_schedule = dict(type="constant", warmup_steps=0)
gradient_clip = None  # max global grad norm, None = off
ema_rate = None  # e.g. 0.999; None = no EMA (the published flow had none)
seed = 0

# ---- checkpoints, logging, validation
save_every_steps = 2000
keep_last = 3
log_every_steps = 50
report_to = "tensorboard"  # "tensorboard", "wandb" or "none"
validation = dict(
    every_steps=2000,  # 0 = off: error of the integrated flow on the validation pairs vs the identity
    flow_steps=100,  # Euler steps (the published sampling setting)
)
