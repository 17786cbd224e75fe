"""Training helpers shared by every PixCell trainer (base model, ControlNet, virtual-staining LoRA).

    ema.py         EMA: fp32 exponential moving average of the trainable parameters, swapped in for validation
    optim.py       build_optimizer (AdamW / CAME from cfg.optimizer), build_lr_scheduler (warm-up + constant/cosine)
    sampler.py     ResumableSampler: seeded per-epoch shuffle, sharded over processes, restartable mid-epoch
    checkpoint.py  CheckpointManager: atomic full-state checkpoints (accelerate state + EMA + RNG + data position),
                   keep-last-K, find the latest complete one, portable transformer weights
    signals.py     StopRequest: SIGTERM / SIGUSR1 / wall-time limit -> save and stop, agreed over processes
    precision.py   fp32 attention under fp16/bf16 autocast, gradient checkpointing, autocast dtype
    init.py        initialise_from: --load-from a previous stage / published weights across resolutions
    tracking.py    RunTracker (TensorBoard by default, W&B by flag), progress bar, config + environment dump

Each trainer stays one linear `main(cfg)` in train_scripts/ and calls these.
"""
