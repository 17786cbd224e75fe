# Every key train_scripts/train_prior.py reads, with its default (a config may set only these keys).
# The UNI prior: a rectified flow from Gaussian noise to the stored UNI2-h tokens of the training patches.

# ---- data: the dataset index and the stored UNI features (the root comes from --data-root)
data = dict(
    root=None,
    index_file=None,  # default <root>/metadata/patch_names_all.hdf5
    index_keys=None,  # index keys to train on, e.g. ["tcga_diagnostic_1024"]; None = every *_<parent_size>
    parent_size=1024,  # side of the stored patches, px
    feature_format="npy",  # "npy" (<patch>_uni.npy beside the patches) or "packed" (HDF5 shards)
    features_root=None,  # npy: default the root; packed: default <root>/features_packed
    num_workers=4,  # feature-reading DataLoader workers
    max_failure_rate=0.01,  # unreadable samples tolerated before the run stops
    in_memory=False,  # keep the tokens once read (small datasets only: T * C * 4 bytes per sample)
)
resolution = 256  # 256: one token per sample (prior for PixCell-256); 1024: 16-token grids (PixCell-1024)
label_from = None  # None (unconditional), "dataset", "cancer" (from the patch paths) or a CSV (patch,label)
label_dropout = 0.1  # fraction of labels replaced by the null label (classifier-free guidance)
stats_samples = 8192  # samples for the per-channel standardisation of the tokens

# ---- model
prior = dict(
    width=1024,
    depth=6,  # residual blocks (1 token) or transformer blocks (16 tokens)
    num_heads=8,  # transformer only
    dropout=0.0,
)

# ---- optimisation
train_batch_size = 1024  # samples per process and step
num_epochs = 10
max_steps = None  # overrides num_epochs when set
optimizer = dict(type="AdamW", lr=2e-4, weight_decay=0.0)
lr_schedule = dict(type="constant", warmup_steps=500)
gradient_clip = 1.0  # max global grad norm, None = off
ema_rate = 0.999  # None = no EMA; the exported prior/ holds the EMA weights
seed = 0

# ---- checkpoints, logging
save_every_steps = 2000
keep_last = 3
log_every_steps = 50
report_to = "tensorboard"  # "tensorboard", "wandb" or "none"
