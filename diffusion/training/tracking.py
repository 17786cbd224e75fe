"""What a run reports: scalars and images (TensorBoard by default, offline; W&B by flag), a progress bar, and the
resolved config plus the environment (versions, world size) saved in the work dir.

Only the main process writes; the others get a tracker whose methods do nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path

if TYPE_CHECKING:
    from accelerate import Accelerator

REPORT_TO = ("tensorboard", "wandb", "none")


class RunTracker:
    """log_scalars / log_image / close over TensorBoard (`<work_dir>/tensorboard`) or Weights & Biases."""

    def __init__(
        self,
        work_dir: str | Path,
        report_to: str = "tensorboard",
        enabled: bool = True,  # False on non-main processes
        run_name: str | None = None,
        config: Mapping | None = None,
    ):
        if report_to not in REPORT_TO:
            raise ValueError(f"report_to {report_to!r}: expected one of {', '.join(REPORT_TO)}")
        self.report_to = report_to if enabled else "none"
        self._tb = self._wandb = None
        work_dir = Path(work_dir)
        if self.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(work_dir / "tensorboard"))
        elif self.report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ValueError(
                    "report_to wandb: the wandb package is not installed (pip install wandb)"
                ) from None
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "pixcell"),
                name=run_name or work_dir.name,
                dir=str(work_dir),
                config=dict(config or {}),
                resume="allow",
                id=_wandb_run_id(work_dir),
            )

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)
        elif self._wandb is not None:
            self._wandb.log({k: float(v) for k, v in values.items()}, step=step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> None:
        """image: uint8 (H, W, 3)."""
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
        elif self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(image)}, step=step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        elif self._wandb is not None:
            self._wandb.finish()


def _wandb_run_id(work_dir: Path) -> str:
    """One W&B run per work dir, so a resumed run continues the same curves."""
    path = work_dir / "wandb_run_id.txt"
    if path.is_file():
        return path.read_text().strip()
    run_id = f"{work_dir.name}-{int(time.time())}"
    path.write_text(run_id)
    return run_id


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> tqdm:
    """Steps bar (ETA from tqdm); the loop sets loss / lr / img/s as postfix."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step")


class Throughput:
    """Images per second over the steps since the last `rate()` call."""

    def __init__(self):
        self._t, self._n = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self._n += images

    def rate(self) -> float:
        now = time.perf_counter()
        r = self._n / max(now - self._t, 1e-9)
        self._t, self._n = now, 0
        return r


def environment(accelerator: Accelerator | None = None, argv: list[str] | None = None) -> dict:
    """Versions, devices and the distributed setup of this run (saved as env.json)."""
    import accelerate
    import diffusers

    info: dict = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "accelerate": accelerate.__version__,
        "argv": list(sys.argv if argv is None else argv),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if accelerator is not None:
        info.update(
            world_size=accelerator.num_processes,
            num_machines=int(os.environ.get("NUM_MACHINES", os.environ.get("SLURM_NNODES", 1))),
            distributed_type=str(accelerator.distributed_type),
            mixed_precision=str(accelerator.mixed_precision),
            device=str(accelerator.device),
        )
    return info


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hand_edited_config(work_dir: str | Path) -> Path | None:
    """`<work_dir>/config.py` when it differs from what the last run wrote there (its hash is in env.json), i.e.
    when it was edited by hand; else None (also for work dirs written before the hash was recorded)."""
    config, env = Path(work_dir) / "config.py", Path(work_dir) / "env.json"
    try:
        written = json.loads(env.read_text()).get("config_sha256")
        text = config.read_text()
    except (OSError, ValueError):
        return None
    return config if written and _sha256(text) != written else None


def save_run_info(work_dir: str | Path, config_text: str, env: dict) -> Path | None:
    """`<work_dir>/config.py` (the resolved config, what runs) and `<work_dir>/env.json` (with config.py's hash),
    written atomically. A config.py edited by hand since the last run wrote it is kept as `config.py.edited`
    (the settings come from the command line, never from this record) -> that copy, or None."""
    work_dir = Path(work_dir)
    kept = None
    edited = hand_edited_config(work_dir)
    if edited is not None:
        kept = edited.with_name("config.py.edited")
        with atomic_path(kept) as tmp:
            tmp.write_text(edited.read_text())
    with atomic_path(work_dir / "config.py") as tmp:
        tmp.write_text(config_text)
    with atomic_path(work_dir / "env.json") as tmp:
        tmp.write_text(json.dumps({**env, "config_sha256": _sha256(config_text)}, indent=2, default=str))
    return kept
