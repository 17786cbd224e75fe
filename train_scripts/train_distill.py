"""Distil PixCell into a few-step student with guidance built in (latent consistency distillation).

    accelerate launch train_scripts/train_distill.py configs/distill/pixcell_256_lcm.py \
        --teacher StonyBrook-CVLab/PixCell-256 --work-dir work_dirs/lcm256 --data-root /data/patches
    python -m tools.sample --model work_dirs/lcm256/student --steps 4 ...      # 4 forwards per image

The teacher (any source `--model` takes: hub id, diffusers folder, original checkpoint, training work dir) is
frozen; the student starts as a copy of it with a zero-initialised guidance embedding (`guidance_embeds` in its
config) and learns, from the stored features (npy or packed), to jump along the teacher's guided ODE
(diffusion/training/distill.py: LCD, Luo et al. 2023, Alg. 1; the target network is the EMA of the student).
`student.kind="lora"` trains LoRA adapters on the attention projections instead (LCM-LoRA), exported as a
folder of a few MB on top of the teacher. To resume, run the same command again; SIGTERM / SIGUSR1 /
`--time-limit` save and stop. Outputs in the work dir:

    sampling.json         the student's sampling defaults (LCM, steps, guidance): the sampling tools read it
    checkpoints/          full training state; transformer/ (online student) and transformer_ema/ (target)
    student/              the released student (EMA target weights, merged), a diffusers folder + sampling.json
    student_lora/         with kind="lora": student.json, adapter.safetensors (diffusion/model/lora.py), the
                          guidance embedding (guidance_embedder.safetensors) + sampling.json
    validation/           rows of [real | teacher (DPM-Solver++) | student (LCM)] for the same conditions and noise
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from mmengine.config import Config
from torch.utils.data import DataLoader

from diffusion.command import run_cli
from diffusion.config import load_config, parse_cfg_options, shipped_config
from diffusion.data.datasets import (
    PatchFeatureDataset,
    check_data_matches_model,
    collate_skip_none,
    held_out_samples,
)
from diffusion.geometry import latent_norm, resolve_norm, to_model_latents
from diffusion.model.loading import load_transformer
from diffusion.model.pixcell_transformer import build_pixcell
from diffusion.model.student import (
    add_student_lora,
    save_lora_student,
    student_from_teacher,
    student_state_dict,
    write_sampling_defaults,
)
from diffusion.sampling.pipeline import PixCellPipeline
from diffusion.sampling.samplers import make_scheduler
from diffusion.training.checkpoint import save_transformer_folder
from diffusion.training.distill import ConsistencyDistiller
from diffusion.training.precision import set_fp32_attention, set_gradient_checkpointing
from diffusion.training.run import RunSettings, add_resume_args, launch, run_trainer, start_run
from diffusion.training.sampler import BatchStream, ResumableSampler
from diffusion.training.step import accumulate
from diffusion.training.validation import fixed_noise, sample_column, validation_grid

log = logging.getLogger("pixcell.train")
SCHEMA = shipped_config("_base_/distill.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="distillation config, e.g. configs/distill/pixcell_256_lcm.py")
    p.add_argument("--work-dir", required=True, help="run folder: checkpoints, logs, validation, the student")
    p.add_argument(
        "--teacher", default=None, help="PixCell to distil: hub id, folder, .pth or work dir (teacher)"
    )
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--data-root", default=None, help="patches root with the stored features (data.root)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size (train_batch_size)")
    add_resume_args(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    options = parse_cfg_options(args.cfg_options)
    flags = {
        "teacher": "teacher",
        "data_root": "data.root",
        "batch_size": "train_batch_size",
        "report_to": "report_to",
    }
    options.update({key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag)})
    cfg = load_config(args.config, options, schema_file=SCHEMA)
    if cfg.student.kind not in ("full", "lora"):
        raise ValueError(f"config: student.kind {cfg.student.kind!r}: expected 'full' or 'lora'")
    if not cfg.teacher:
        raise ValueError(
            "teacher not set: pass --teacher (hub id, diffusers folder, original .pth or work dir)"
        )
    if not cfg.data.root:
        raise ValueError("data root not set: pass --data-root or set PIXCELL_DATA_ROOT (the patches folder)")
    return cfg


def load_teacher(cfg: Config, device: torch.device):
    """The frozen teacher; its geometry must be the config's preset's (resolution, token count, UNI dim)."""
    teacher = load_transformer(cfg.teacher)
    with torch.device("meta"):
        want = build_pixcell(cfg.model, **dict(cfg.model_overrides)).config
    diff = [
        f"{k} {teacher.config.get(k)} vs {want[k]}"
        for k in ("sample_size", "caption_num_tokens", "caption_channels", "in_channels", "out_channels")
        if teacher.config.get(k) != want[k]
    ]
    if diff:
        raise ValueError(f"teacher {cfg.teacher} does not match model {cfg.model}: {'; '.join(diff)}")
    if teacher.config.get("guidance_embeds"):
        raise ValueError(f"teacher {cfg.teacher} is a distilled student already; distil a PixCell model")
    return teacher.requires_grad_(False).eval().to(device)


#################################################################################
#                               Validation grid                                 #
#################################################################################


@torch.no_grad()
def teacher_student_grid(
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    vae: torch.nn.Module,
    held_out: list[dict],
    cfg: Config,
) -> np.ndarray:
    """Rows of [real | teacher | student] for fixed held-out conditions and the same noise: uint8 (N*H, 3*W, 3)."""
    v = cfg.validation
    device = next(teacher.parameters()).device
    uni = torch.stack([h["uni"] for h in held_out]).to(device)
    noise = fixed_noise(teacher, len(held_out), cfg.seed, device)
    columns = []
    for model, sampler, steps in (
        (teacher, "dpm-solver", v.teacher_steps),
        (student, "lcm", v.student_steps),
    ):
        pipe = PixCellPipeline(transformer=model, vae=vae, scheduler=make_scheduler(sampler))
        gen = torch.Generator().manual_seed(cfg.seed)
        columns.append(sample_column(pipe, uni, noise, v.guidance_scale, steps, generator=gen))
    reals = [
        h["real"] if h["real"] is not None else np.zeros_like(columns[0][i]) for i, h in enumerate(held_out)
    ]
    return validation_grid([reals, *columns])


#################################################################################
#                                    Main                                       #
#################################################################################


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    work_dir = Path(args.work_dir)
    accelerator, resume = launch(
        work_dir,
        args.resume_from,
        cfg.mixed_precision,
        ddp_only="train_distill: DDP only (the teacher and the target network are replicated)",
    )
    is_main, device = accelerator.is_main_process, accelerator.device

    # ---- models: frozen teacher; student = teacher + zero guidance embedding (+ LoRA)
    torch.manual_seed(cfg.seed)
    teacher = load_teacher(cfg, device)
    student = student_from_teacher(teacher).to(device)
    s = cfg.student
    if s.kind == "lora":
        names = add_student_lora(student, s.lora_rank, s.lora_alpha)
        log.info(
            "LoRA student: rank %d, %d trainable tensors (%d parameters)",
            s.lora_rank,
            len(names),
            sum(p.numel() for p in student.parameters() if p.requires_grad),
        )
    if cfg.fp32_attention and cfg.mixed_precision != "no":
        set_fp32_attention(student)
    set_gradient_checkpointing(student, cfg.gradient_checkpointing)
    student.train()

    # ---- data: the stored features, as the teacher's trainer reads them
    d = cfg.data
    dataset = PatchFeatureDataset(
        root=d.root,
        index_file=d.index_file,
        dataset_keys=d.dataset_keys,
        resolution=cfg.resolution,
        parent_size=d.parent_size,
        feature_format=d.feature_format,
        features_root=d.features_root,
        seed=cfg.seed,
        max_failure_rate=d.max_failure_rate,
    )
    check_data_matches_model(dataset, teacher, cfg.resolution, str(cfg.model))
    validate = cfg.validation.every_steps > 0
    held_out_idx = list(range(len(dataset) - cfg.validation.num_images, len(dataset))) if validate else []
    sampler = ResumableSampler(
        len(dataset),
        cfg.train_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        seed=cfg.seed,
        exclude=held_out_idx,
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.train_batch_size,
        sampler=sampler,
        num_workers=d.num_workers,
        collate_fn=collate_skip_none,
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    accum = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps or cfg.num_epochs * sampler.batches_per_epoch // accum

    # ---- optimisation; the EMA (trainable tensors only) is the target network theta^-, kept as a module copy
    run = start_run(
        accelerator,
        RunSettings.from_config(cfg),
        work_dir,
        student,
        total_steps,
        resume,
        params=[p for p in student.parameters() if p.requires_grad],
        counters=dict(skipped_samples=0, images_seen=0),
        info=dict(dataset_samples=len(dataset), teacher=str(cfg.teacher)),
    )
    model, unwrapped, state = run.model, run.unwrapped, run.state
    target = copy.deepcopy(unwrapped).requires_grad_(False).eval()
    run.ema.copy_to(target)
    distiller = ConsistencyDistiller(tuple(cfg.distill.guidance_range), cfg.distill.huber_c)
    defaults = dict(
        sampler="lcm",
        steps=cfg.distill.sample_steps,
        guidance=cfg.distill.sample_guidance,
        teacher=str(cfg.teacher),
        guidance_range=list(cfg.distill.guidance_range),
    )
    if is_main:
        write_sampling_defaults(work_dir, **defaults)

    vae, held_out = None, []
    if validate and is_main:
        from diffusion.encoders import load_vae

        vae = load_vae(cfg.validation.vae).to(device).eval()
        resolve_norm((cfg.vae_shift, cfg.vae_scale), latent_norm(vae), f"validation.vae {cfg.validation.vae}")
        held_out = held_out_samples(dataset, held_out_idx, cfg.resolution)

    def save(step: int) -> Path:
        # Portable folders hold plain (LoRA merged) student weights: load_transformer and --model read them.
        portable = {
            "transformer": (unwrapped, student_state_dict(unwrapped)),
            "transformer_ema": (unwrapped, student_state_dict(target)),
        }
        return run.save(step, portable=portable)

    def teacher_fn(x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return teacher(x, encoder_hidden_states=cond, timestep=t, return_dict=False)[0]

    # the prepared (possibly DDP-wrapped) student or its unwrapped EMA target
    def student_fn(
        net: torch.nn.Module,
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        return lambda x, cond, t, w: net(
            x, encoder_hidden_states=cond, timestep=t, guidance=w, return_dict=False
        )[0]

    def loss_of(batch: dict) -> tuple[torch.Tensor, int]:
        state["skipped_samples"] += batch["skipped"]
        x0 = to_model_latents(batch["latent"].to(device), cfg.vae_shift, cfg.vae_scale)  # (B, 16, h, w)
        uni = batch["uni"].to(device)  # (B, T, C)
        with accelerator.autocast():
            out = distiller.loss(
                student_fn(model),
                student_fn(target),
                teacher_fn,
                x0,
                uni,
                teacher.null_condition(len(x0)).to(uni),
                run.generator,
            )
        return out.loss, len(x0)

    batch_stream = BatchStream(loader, sampler, state, set_epoch=dataset.set_epoch)
    log.info(
        "distilling %s for %d steps (%s student): %d process(es) x batch %d x accumulation %d",
        cfg.teacher,
        total_steps,
        s.kind,
        accelerator.num_processes,
        cfg.train_batch_size,
        accum,
    )
    with run.loop(save, args.time_limit, desc="distill") as loop:
        while state["step"] < total_steps and not loop.should_stop(state["step"]):
            batches = run.next_batches(batch_stream, accum)
            if batches is None:  # no loadable sample on some process: skipped together
                continue
            loss, images = accumulate(accelerator, model, batches, loss_of)
            grad_norm, step = run.optimizer_step(cfg.gradient_clip)  # clip, step, LR schedule, EMA
            run.ema.copy_to(target)
            state["images_seen"] += images * accelerator.num_processes
            loop.log_step(step, loss, run.lr, grad_norm, images=images * accelerator.num_processes)
            if validate and is_main and step % cfg.validation.every_steps == 0:
                grid = teacher_student_grid(teacher, target, vae, held_out, cfg)
                loop.save_grid("validation/real_teacher_student", grid, step)
            loop.save_if_due(step)

    if state["step"] >= total_steps and is_main:  # the release: the EMA target (merged), and a LoRA's adapter
        folder = save_transformer_folder(target, student_state_dict(target), work_dir / "student")
        write_sampling_defaults(folder, **defaults)
        if s.kind == "lora":
            lora = save_lora_student(target, work_dir / "student_lora", cfg.teacher)
            write_sampling_defaults(lora, **defaults)
        log.info("the student is in %s", folder)
    return run.finish()


def cli(argv: list[str] | None = None) -> int:
    """The command line: bad input is one `error:` line and exit status 2, as for every tool."""
    return run_cli(lambda a: run_trainer(main, parse_args(a)), argv)


if __name__ == "__main__":
    sys.exit(cli())
