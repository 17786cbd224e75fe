# Every key the training code reads, with its default. A config may set only these keys (unknown keys are an
# error); nested dicts are checked key by key. Values here are the published PixCell recipe where one exists.

# ---- model
model = "PixCell-XL/2-256"  # preset in diffusion/model/pixcell_transformer.py:PIXCELL_MODELS
model_overrides = {}  # transformer config fields changed on the preset (e.g. caption_channels for a stand-in UNI)
resolution = 256  # training image size in px (multiple of 256: one UNI token per 256 px tile)
load_from = (
    None  # initialise from: a work dir / training checkpoint / published weights (diffusers or original)
)
load_ema = (
    False  # with load_from: take the source's EMA weights (the original trainer took the model weights)
)

# ---- data (pre-extracted features; the root comes from --data-root or $PIXCELL_DATA_ROOT, never a config)
data = dict(
    root=None,  # patches root (holds metadata/patch_names_all.hdf5)
    index_file=None,  # default: <root>/metadata/patch_names_all.hdf5
    dataset_keys=None,  # e.g. ["TCGA_1024"]; None = all keys in the index
    parent_size=1024,  # size of the stored patches the training crops come from
    feature_format="npy",  # "npy" (published per-patch files), "packed" (HDF5) or "shards" (streaming parquet)
    features_root=None,  # packed / shards folder (default <root>/features_packed, <root>/features_shards)
    num_workers=8,
    max_failure_rate=0.01,  # stop when more than this fraction of samples fails to load
)
# model latent = (z - shift) * scale. None (both): what tools.extract_features recorded beside the features (the
# VAE's own values), else SD3.5's (diffusion/geometry.py); values set here must agree with the features' record.
vae_shift = None
vae_scale = None

# ---- diffusion
class_dropout_prob = 0.1  # condition replaced by the null embedding (classifier-free guidance)

# ---- optimisation
train_batch_size = 128  # per process
gradient_accumulation_steps = 1
num_epochs = 10
max_steps = None  # stop after this many optimizer steps (overrides num_epochs when set)
optimizer = dict(type="CAME", lr=2e-5, weight_decay=0.0, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
lr_schedule = dict(type="constant", warmup_steps=1000)  # "constant" or "cosine" after linear warm-up
gradient_clip = 0.01
ema_rate = 0.9999
mixed_precision = "fp16"  # "no", "fp16", "bf16"
fp32_attention = True  # attention in fp32 under fp16 autocast (the original recipe)
gradient_checkpointing = True
# torch.compile each transformer block (regional compilation; for long GPU runs); the other keys go to torch.compile
compile = dict(enabled=False, backend="inductor", mode=None, dynamic=None, fullgraph=False)
seed = 0
# FSDP2 (fully_shard per transformer block, sharded DCP checkpoints that load on any process count; docs/training.md)
fsdp = dict(
    enabled=False,  # False: DDP (or what `accelerate config` chose)
    strategy="FULL_SHARD",  # or "HYBRID_SHARD": shard inside a node, replicate across nodes
    reshard_after_forward=True,  # free gathered blocks after forward (ZeRO-3); False keeps them (ZeRO-2)
)
max_nonfinite_steps = (
    10  # stop after this many consecutive steps with a non-finite loss or gradient (skipped)
)

# ---- checkpoints, logging, validation
save_every_steps = 2000
keep_last = 3  # checkpoints kept in the work dir
log_every_steps = 20
report_to = "tensorboard"  # "tensorboard" or "wandb"
validation = dict(
    every_steps=2000,  # 0 = off; EMA samples of fixed held-out conditions beside the real crops
    num_images=4,  # held-out samples (the last ones of the dataset, never trained on while validation is on)
    guidance_scale=2.0,
    num_inference_steps=20,
    vae="stabilityai/stable-diffusion-3.5-large",  # decodes the samples: hub id or local folder
)
