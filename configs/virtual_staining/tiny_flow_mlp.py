# Tests / CPU smoke runs only: a tiny flow MLP for the 96-d tiny UNI stand-in, on 1024 px synthetic pairs.
_base_ = ["./_base_/flow_mlp.py"]

uni_dtype = "fp32"
uni_batch_size = 4
data = dict(num_workers=0)
flow = dict(
    in_channels=96,
    out_channels=96,
    model_channels=64,
    time_embed_dim=64,
    bottleneck_channels=64,
    num_res_blocks=2,
)
train_batch_size = 2
num_epochs = 4
optimizer = dict(type="AdamW", lr=1e-3, weight_decay=0.0)
save_every_steps = 4
log_every_steps = 2
report_to = "none"
validation = dict(every_steps=4, flow_steps=10)
