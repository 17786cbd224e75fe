"""Training helpers shared by every PixCell trainer (base model, ControlNet, virtual-staining flow MLP and LoRA).

    ema.py         EMA: fp32 exponential moving average of the trainable parameters, swapped in for validation
    optim.py       build_optimizer (AdamW / CAME from cfg.optimizer), build_lr_scheduler (warm-up + constant/cosine)
    sampler.py     ResumableSampler: seeded per-epoch shuffle, sharded over processes, restartable mid-epoch;
                   BatchStream: endless batches that keep the data position in the trainer's state
    checkpoint.py  CheckpointManager: atomic full-state checkpoints (accelerate state + EMA + RNG + data position),
                   keep-last-K, portable transformer weights; save/restore of a trainer's counters, LR
                   scheduler, config and noise generators (the on-disk names and the latest complete checkpoint
                   are the leaf module `diffusion/checkpoints.py`, which the model loaders read too)
    signals.py     StopRequest: SIGTERM / SIGUSR1 / wall-time limit -> save and stop, agreed over processes
    precision.py   fp32 attention under fp16/bf16 autocast, gradient checkpointing, autocast dtype
    init.py        initialise_from: --load-from a previous stage / published weights across resolutions
    step.py        noised_inputs: (x_t, t, noise, condition with null rows) of a diffusion batch; accumulate:
                   forward/backward over the micro-batches of a step; clipped_step: clip, skip non-finite steps;
                   NonFiniteGuard: stop after too many in a row
    tracking.py    RunTracker (TensorBoard by default, W&B by flag), progress bar, config + environment dump
    distill.py     ConsistencyDistiller: the latent consistency distillation objective of a few-step student
    run.py         the trainer skeleton: launch (accelerate, logging, the checkpoint to resume from), start_run ->
                   Run (optimizer, schedule, prepare, EMA, noise generator, counters, restore, run info),
                   TrainLoop (bar, log line, tracker, save on interval; the one stop protocol), shared flags, the
                   error-line entry point; its docstring is a minimal trainer to copy
    fsdp.py        FSDP2 (fully_shard per block, FULL_SHARD / HYBRID_SHARD, bf16 policy) and the DCP sharded
                   training state that reshards on load; came_sharded.py: CAME's step on DTensor shards

Each trainer stays one linear `main(args)` (train_scripts/, virtual_staining/) on run.py's skeleton.
"""
