"""A data sampler that can stop and restart mid-epoch, exactly, on any number of processes.

Epoch e shuffles the sample indices with a generator seeded by (seed, e): the same order on every process and on
every run. Global batch b of the epoch is `order[b*W*B : (b+1)*W*B]` (W processes, B samples per process), and
process r takes its slice `[r*B : (r+1)*B]`. A run stopped after k batches of epoch e resumes with
`set_position(e, k)` and sees exactly the batches it would have seen. The incomplete last global batch is dropped
(every process makes the same number of steps, as DDP needs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields this process's sample indices for the current epoch, from batch `start_batch` on."""

    def __init__(
        self,
        num_samples: int,  # dataset length
        batch_size: int,  # per process
        num_replicas: int = 1,  # world size
        rank: int = 0,
        seed: int = 0,
        exclude: Sequence[int] = (),  # indices never trained on (held-out validation samples)
        shuffle: bool = True,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        excluded = set(int(i) for i in exclude)
        if excluded:
            self.indices = torch.tensor(
                [i for i in range(num_samples) if i not in excluded], dtype=torch.long
            )
        else:  # no Python list of hundreds of millions of ints (the UNI prior trains on every 256 px crop)
            self.indices = torch.arange(num_samples, dtype=torch.long)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"dataset of {len(self.indices)} training samples is smaller than one global batch "
                f"({num_replicas} process(es) x {batch_size}): lower train_batch_size or add data"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // (self.batch_size * self.num_replicas)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Continue epoch `epoch` from its batch `start_batch` (0 = the whole epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start batch {start_batch} outside the epoch's {self.batches_per_epoch} batches"
            )
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.indices[torch.randperm(len(self.indices), generator=g)]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        global_batch = self.batch_size * self.num_replicas
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            yield from order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class BatchStream:
    """The loader's batches, epoch after epoch without end, from the data position in `state`: its "epoch" and
    "batch_in_epoch" advance in place, so a checkpoint of `state` resumes at the first batch not yet taken."""

    def __init__(
        self,
        loader: Iterable,  # a DataLoader over `sampler`
        sampler: ResumableSampler,
        state: dict,
        set_epoch: Callable[[int], None] | None = None,  # e.g. the dataset's, called at each epoch start
    ):
        self.loader, self.sampler, self.state, self.set_epoch = loader, sampler, state, set_epoch
        self._iter: Iterator | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self):
        state = self.state
        while True:
            if self._iter is None:
                self.sampler.set_position(state["epoch"], state["batch_in_epoch"])
                if self.set_epoch is not None:
                    self.set_epoch(state["epoch"])
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                state["epoch"], state["batch_in_epoch"], self._iter = state["epoch"] + 1, 0, None
                continue
            state["batch_in_epoch"] += 1
            return batch

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch_in_epoch) of the next batch."""
        return self.state["epoch"], self.state["batch_in_epoch"]

    def rewind(self, position: tuple[int, int]) -> None:
        """Back to `position`: the batches taken since were not trained on."""
        self.state["epoch"], self.state["batch_in_epoch"] = position
        self._iter = None
