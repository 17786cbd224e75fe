"""Stop cleanly when the cluster or the user asks: SIGTERM / SIGUSR1 (SLURM pre-emption, `--signal=USR1@120`), Ctrl-C
(SIGINT), or a wall-time limit.

The handler only sets a flag; the training loop polls `should_stop(accelerator)` once per optimizer step, which
agrees over all processes (one tiny all-reduce), so every rank stops at the same step, saves one checkpoint
together and exits. Re-running the same command resumes from it.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from types import FrameType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("pixcell.train")

# Ctrl-C (SIGINT) stops a run like SIGTERM: a checkpoint, then exit status 130 (`INTERRUPT_STATUS`) and one line.
# A second Ctrl-C while that checkpoint is being written stops at once (KeyboardInterrupt; the checkpoint is
# written to a temporary name, so the earlier ones stay whole).
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
INTERRUPT_STATUS = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


def interrupt_line(err: BaseException) -> str:
    """The one line of a command stopped by Ctrl-C (every tool and trainer, through diffusion.command.run_cli): what was
    kept (the KeyboardInterrupt's message, when the code that stopped says), and how to continue."""
    kept = str(err) or "every file already written is whole"
    return f"interrupted (Ctrl-C): {kept}; run the same command again to continue"


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from '3600', '90m', '4h', '1-02:30:00' (SLURM D-HH:MM:SS), 'HH:MM:SS' or 'MM:SS'; None passes."""
    if text is None or text == "":
        return None
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", s)
    if m:
        return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", s)
    if m:
        d, h, mi, sec = (int(x) if x else 0 for x in m.groups())
        return float(((d * 24 + h) * 60 + mi) * 60 + sec)
    raise ValueError(f"time limit {text!r}: expected seconds, 90m, 4h, HH:MM:SS or D-HH:MM:SS")


class StopRequest:
    """Collects stop reasons: a caught signal, or the wall-time limit (minus a margin to save the checkpoint)."""

    def __init__(self, time_limit: float | None = None, margin: float = 0.0, install: bool = True):
        self.start = time.monotonic()
        self.time_limit = time_limit
        self.margin = margin
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if install:
            self.install()

    def install(self) -> None:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # async-signal context: only set a flag
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the checkpoint
        self.signal_name = name

    def local_reason(self) -> str | None:
        if self.signal_name:
            return f"received {self.signal_name}"
        if self.time_limit is not None and time.monotonic() - self.start >= self.time_limit - self.margin:
            return f"wall-time limit of {self.time_limit:.0f} s reached"
        return None

    def should_stop(self, accelerator: Accelerator | None = None) -> str | None:
        """The stop reason if any process wants to stop (collective when there are several processes)."""
        reason = self.local_reason()
        if accelerator is None or accelerator.num_processes == 1:
            return reason
        flag = torch.tensor([1.0 if reason else 0.0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0:
            return reason or "another process was asked to stop"
        return None
