"""Full-state training checkpoints: atomic, complete or absent, the last K kept, the latest found on restart.

Layout of `<work_dir>/checkpoints/checkpoint-<step:07d>/`:

    model.safetensors, optimizer.bin, scaler.pt,     accelerate's own state (`Accelerator.save_state`), so DDP,
    random_states_<rank>.pkl                         FSDP (sharded) and DeepSpeed models/optimizers save natively,
                                                     with the python/numpy/torch/CUDA RNG states of every process
    trainer_state.pt                                 step, data position, counters, LR scheduler, EMA (unsharded),
                                                     resolved config text (written by the main process)
    rank_<r>.pt                                      per-process state: the trainer's noise generator, EMA shard
    shards/                                          FSDP runs (fsdp.enabled): model, optimizer and EMA through
                                                     torch.distributed.checkpoint, one file per process, loadable
                                                     on any number of processes (diffusion/training/fsdp.py)
    transformer/, transformer_ema/                   portable weights (diffusers folders: config.json +
                                                     diffusion_pytorch_model.safetensors) for --load-from / export
    meta.json                                        written last: marks the checkpoint complete

Every process writes into `.checkpoint-<step>.tmp/`; after a barrier the main process writes `meta.json` and
renames the folder (one atomic rename), so a kill at any moment leaves either the previous checkpoints or a
stray temporary folder (removed by the next save), never a broken `checkpoint-*`. Old checkpoints are renamed
away before they are deleted, for the same reason. The work dir must be on a file system all nodes share.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_path
from ..checkpoints import CHECKPOINT_DIR, checkpoint_name, latest_checkpoint, list_checkpoints
from ..errors import named_write_errors
from .fsdp import SHARDS_DIR, own_class_name

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import ModelMixin
    from torch.optim.lr_scheduler import LRScheduler

    from .ema import EMA
    from .fsdp import ShardedTrainingState

log = logging.getLogger("pixcell.train")

FORMAT = "pixcell-train-checkpoint"
VERSION = 1


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def read_meta(path: str | Path) -> dict:
    meta = json.loads((Path(path) / "meta.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a PixCell training checkpoint (meta.json format {meta.get('format')!r})"
        )
    return meta


def save_transformer_folder(model: ModelMixin, state_dict: dict[str, Tensor], folder: str | Path) -> Path:
    """A diffusers model folder (config.json + diffusion_pytorch_model.safetensors) from a full state dict.

    `model` supplies the config (a diffusers ConfigMixin, e.g. the unwrapped transformer); `state_dict` is the
    full (gathered) weights, e.g. `accelerator.get_state_dict(model)`. Written atomically.
    """
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        model.save_config(tmp)
        config = json.loads((tmp / "config.json").read_text())
        if config.get("_class_name") != own_class_name(model):  # a sharded (FSDP2) model's config
            config["_class_name"] = own_class_name(model)
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, tmp / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    return folder


class CheckpointManager:
    """Saves and restores the whole training state of one run under `<work_dir>/checkpoints`.

    All processes call `save` and `load` together (accelerate's state saving is collective under FSDP and
    DeepSpeed). `train_state` (main process) and `rank_state` (each process) are picklable dicts of the caller's.
    """

    def __init__(
        self,
        work_dir: str | Path,
        accelerator: Accelerator,
        keep_last: int = 3,
        shards: ShardedTrainingState | None = None,
    ):
        # shards: a fsdp.ShardedTrainingState (model, optimizer, EMA) saved with DCP beside accelerate's state
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.work_dir = Path(work_dir)
        self.root = self.work_dir / CHECKPOINT_DIR
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.shards = shards

    def save(
        self,
        step: int,
        train_state: dict,
        rank_state: dict | None = None,
        ema: EMA | None = None,
        portable: dict[str, tuple[object, dict[str, Tensor]]] | None = None,
    ) -> Path:
        """Write checkpoint `step`; returns its final path.

        ema:       a diffusion.training.ema.EMA (saved in trainer_state.pt, or per rank when `ema.sharded`).
        portable:  {folder name: (config-holding model, full state dict)} written by the main process as diffusers
                   folders; state dicts are only needed on the main process (None elsewhere is fine).

        A save that fails (a full disk: torch.save says "unexpected pos") is an OSError naming the folder, the
        free space and the size of the previous checkpoint; its temporary folder is removed, the earlier
        checkpoints stay as they were.
        """
        tmp = self.root / f".{checkpoint_name(step)}.tmp"
        previous = latest_checkpoint(self.work_dir)
        needed = _folder_bytes(previous) if previous is not None else None  # the last one: a fair estimate
        try:
            with named_write_errors(tmp, needed):
                return self._save(step, train_state, rank_state, ema, portable, tmp)
        except Exception:
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save(
        self,
        step: int,
        train_state: dict,
        rank_state: dict | None,
        ema: EMA | None,
        portable: dict[str, tuple[object, dict[str, Tensor]]] | None,
        tmp: Path,
    ) -> Path:
        acc = self.accelerator
        final = self.root / checkpoint_name(step)
        t0 = time.monotonic()
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".checkpoint-*"):  # leftovers of an interrupted save or delete
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if self.shards is not None:
            self.shards.save(tmp / SHARDS_DIR)
            ema = None  # the EMA is among the shards
        rank = dict(rank_state or {})
        if ema is not None and ema.sharded:
            rank["ema"] = ema.state_dict()
        torch.save(rank, tmp / f"rank_{acc.process_index}.pt")
        if acc.is_main_process:
            state = dict(train_state, step=step)
            if ema is not None and not ema.sharded:
                state["ema"] = ema.state_dict()
            torch.save(state, tmp / "trainer_state.pt")
            for name, (model, sd) in (portable or {}).items():
                save_transformer_folder(model, sd, tmp / name)
        acc.wait_for_everyone()
        if acc.is_main_process:
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "world_size": acc.num_processes,
                "distributed_type": str(acc.distributed_type),
                "ema_sharded": bool(ema is not None and ema.sharded),
                "sharded_checkpoint": self.shards is not None,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            if final.exists():  # the same step saved twice (e.g. a signal right after a periodic save)
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
            log.info("saved checkpoint %s (%.1f s)", final, time.monotonic() - t0)
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for old in list_checkpoints(self.work_dir)[: -self.keep_last]:
            trash = old.with_name(f".{old.name}.trash")
            old.rename(trash)  # no longer "complete" before any file of it disappears
            shutil.rmtree(trash, ignore_errors=True)

    def load(self, path: str | Path, ema: EMA | None = None) -> tuple[dict, dict]:
        """Restore accelerate's state (model, optimizer, scaler, RNG) from `path`; returns (train_state, rank_state).

        The EMA is restored in place when given. A rank file missing (resuming on more processes than saved)
        yields an empty rank_state, and the caller re-seeds what it held.
        """
        path = Path(path)
        meta = read_meta(path)
        acc = self.accelerator
        if bool(meta.get("sharded_checkpoint")) != (self.shards is not None):
            saved, now = ("with", "without") if meta.get("sharded_checkpoint") else ("without", "with")
            raise ValueError(
                f"{path} was saved {saved} fsdp.enabled and this run is {now} it: resume with the "
                "checkpoint's fsdp.enabled (any number of processes), or start another --work-dir"
            )
        if self.shards is not None:
            if meta["world_size"] != acc.num_processes:
                log.warning(
                    "%s was saved by %d process(es), resharding it onto %d",
                    path,
                    meta["world_size"],
                    acc.num_processes,
                )
        elif meta["world_size"] != acc.num_processes:
            log.warning(
                "%s was saved by %d process(es), resuming on %d: the run continues, but not bit-for-bit",
                path,
                meta["world_size"],
                acc.num_processes,
            )
        acc.load_state(str(path))
        if self.shards is not None:
            self.shards.load(path / SHARDS_DIR)
            ema = None  # loaded with the shards
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        rank_file = path / f"rank_{acc.process_index}.pt"
        rank = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.is_file() else {}
        if ema is not None:
            ema_state = rank.get("ema") if meta.get("ema_sharded") else state.get("ema")
            if ema_state is None:
                raise ValueError(f"{path}: no EMA state for process {acc.process_index}")
            ema.load_state_dict(ema_state)
        return state, rank


# What every trainer's checkpoint holds beyond accelerate's state and the EMA: its counters (`state`: step, data
# position, ...), the LR scheduler and the resolved config text (trainer_state.pt), and its noise generators, per
# process (rank_<r>.pt), under the names the trainer gives them.


def save_training_state(
    manager: CheckpointManager,
    step: int,
    state: dict,
    lr_scheduler: LRScheduler,
    config_text: str,
    generators: dict[str, torch.Generator],
    ema: EMA | None = None,
    portable: dict[str, tuple[object, dict[str, Tensor]]] | None = None,
) -> Path:
    """Checkpoint `step` of a trainer (every process calls it); returns its path."""
    train_state = dict(state, lr_scheduler=lr_scheduler.state_dict(), config=config_text)
    rank_state = {name: gen.get_state() for name, gen in generators.items()}
    return manager.save(step, train_state, rank_state, ema=ema, portable=portable)


def saved_config(path: str | Path) -> str | None:
    """The resolved config text a checkpoint was saved with (None for checkpoints from before configs were saved),
    read without restoring anything: a resume compares it with the command's config first."""
    state = torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)
    return state.get("config")


def restore_training_state(
    manager: CheckpointManager,
    path: str | Path,
    state: dict,
    lr_scheduler: LRScheduler,
    generators: dict[str, torch.Generator],
    ema: EMA | None = None,
) -> dict:
    """Continue from checkpoint `path`: accelerate's state and the EMA, the LR scheduler, the keys of `state`
    (updated in place) and the generators (a process without a rank file, on more processes than saved, keeps
    its fresh seed). -> the checkpoint's trainer state (its `config` text among it)."""
    saved, rank_state = manager.load(path, ema=ema)
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    state.update({k: saved[k] for k in state})
    for name, gen in generators.items():
        if name in rank_state:
            gen.set_state(rank_state[name].to(gen.get_state().device))
    return saved


def register_lora_checkpoint_hooks(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` / `load_state` store only the LoRA weights of adapted models.

    accelerate would otherwise write the whole transformer (2.4 GB for PixCell-1024, frozen and identical in every
    checkpoint). The save hook trims each adapted model's state dict to its `lora_` entries; the load hook reads
    them back (strictly: exactly the model's LoRA entries) and takes the model out of accelerate's own loading.
    DDP and single-process runs; FSDP/DeepSpeed save models natively and are not needed for a LoRA this small.
    """
    from accelerate.utils import SAFE_WEIGHTS_NAME
    from safetensors.torch import load_file

    from ..model.lora import has_lora

    def unwrap(m: torch.nn.Module) -> torch.nn.Module:
        return accelerator.unwrap_model(m)

    def save_hook(models: list[torch.nn.Module], weights: list[dict[str, Tensor]], output_dir: str) -> None:
        for model, state in zip(models, weights):
            if has_lora(unwrap(model)):
                for key in [k for k in state if "lora_" not in k]:
                    del state[key]

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for i, model in enumerate(list(models)):
            inner = unwrap(model)
            if not has_lora(inner):
                continue
            name = (
                SAFE_WEIGHTS_NAME
                if i == 0
                else SAFE_WEIGHTS_NAME.replace(".safetensors", f"_{i}.safetensors")
            )
            state = {k.removeprefix("module."): v for k, v in load_file(str(Path(input_dir) / name)).items()}
            own = {k for k in inner.state_dict() if "lora_" in k}
            if set(state) != own:
                raise ValueError(f"{input_dir}/{name}: LoRA weights do not match the model's adapter")
            inner.load_state_dict(state, strict=False)
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
