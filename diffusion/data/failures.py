"""Bad inputs of a long data loop (feature extraction, packing): each logged with a running count, and a hard
stop past the allowed rate, never a silent substitution."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm


class FailureCounter:
    """Counts bad inputs of a long loop; logs each with a running count; raises past the allowed rate."""

    def __init__(self, max_rate: float, min_failures: int, log_file: Path | None, what: str = "patches"):
        self.max_rate, self.min_failures, self.log_file, self.what = max_rate, min_failures, log_file, what
        self.ok = 0
        self.failed = 0

    def success(self, n: int = 1) -> None:
        self.ok += n

    def failure(self, path: str, reason: str) -> None:
        self.failed += 1
        seen = self.ok + self.failed
        tqdm.write(f"skip {path}: {reason} [{self.failed} of {seen} {self.what} failed so far]")
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_file, "a") as fh:
                fh.write(f"{path}\t{reason}\n")
        if self.failed >= self.min_failures and self.failed / seen > self.max_rate:
            raise RuntimeError(
                f"{self.failed} of {seen} {self.what} failed ({self.failed / seen:.1%} > "
                f"--max-failure-rate {self.max_rate:.1%}); last: {path}: {reason}"
            )
