"""Streaming feature shards (parquet) for tens of millions of patches: written by tools/pack_shards.py, read by
`ShardStream`, split over nodes, processes and loader workers, with a shuffle buffer and an exact resume position.

Why parquet (pyarrow) rather than webdataset tar: PixCell's own training data is released as parquet; a parquet
file is split into row groups that can be read independently, so a reader starts at any row group (an exact
resume position costs no scan through the stream, a tar must be read from its start); the schema and the
shapes travel in the file; and the same files open in pandas, DuckDB or Hugging Face datasets for inspection.

Layout of a shards folder:

    shard-000000.parquet ...   one row per stored patch: key (str), path (str, the index entry),
                               vae (fixed-size binary: float16 (32, S/8, S/8), the VAE posterior mean and std),
                               uni (fixed-size binary: float16 (T, C), the UNI2-h tokens, row-major)
    shards.json                written last (the folder is complete when it exists): format, shapes, parent size,
                               the VAE's latent normalisation, and per shard its file, rows and row groups

Reading. The unit of work is a row group (`row_group_size` patches). In pass p over the data the units are
permuted with a generator seeded by (seed, p), the same on every process, and dealt round-robin over the
`world_size * num_workers` consumers (consumer = global rank * num_workers + worker; the global rank already
orders nodes, so each node reads a disjoint part). A consumer expands each patch into its `(S/r)^2` crops,
pushes them through a shuffle buffer (seeded by (seed, p, consumer)) and yields an endless stream, pass after
pass. Nothing in the stream depends on timing, so a consumer's n-th sample is a pure function of
(seed, world size, num_workers, n): to resume, each worker skips the passes it finished (arithmetic), replays its
buffer's draws for the samples taken in the current pass (no I/O, a few microseconds each) and reads on. An "epoch" is nominal, `batches_per_epoch` = crops // global batch.
Exact resume needs the same world size, batch size and num_workers; on other ones the run continues with
another data order (every sample still comes once per pass).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from diffusion.atomic import atomic_path
from diffusion.geometry import UNI_TILE, VAE_FACTOR

if TYPE_CHECKING:
    import pyarrow as pa

SHARDS_FORMAT = "pixcell-feature-shards"
SHARDS_VERSION = 1
SHARDS_META = "shards.json"
SHARDS_DIRNAME = "features_shards"


#################################################################################
#                                   Writing                                     #
#################################################################################


def _schema(vae_shape: tuple[int, ...], uni_shape: tuple[int, ...]):
    import pyarrow as pa

    nbytes = 2  # float16
    return pa.schema(
        [
            ("key", pa.string()),
            ("path", pa.string()),
            ("vae", pa.binary(math.prod(vae_shape) * nbytes)),
            ("uni", pa.binary(math.prod(uni_shape) * nbytes)),
        ],
        metadata={"vae_shape": json.dumps(list(vae_shape)), "uni_shape": json.dumps(list(uni_shape))},
    )


class ShardWriter:
    """Writes patches into `shard-<i>.parquet` files of `shard_size` rows, each in row groups of `row_group_size`;
    `close()` writes shards.json. Every file is written to a temporary name and renamed."""

    def __init__(
        self,
        out: str | Path,
        vae_shape: tuple[int, ...],  # (32, S/8, S/8)
        uni_shape: tuple[int, ...],  # (T, C)
        parent_size: int,
        shard_size: int = 4096,  # patches per file
        row_group_size: int = 64,  # patches per row group: the unit of reading and of the split
        extra_meta: dict | None = None,  # e.g. the encoders and the VAE's latent normalisation
    ):
        if row_group_size < 1 or shard_size < row_group_size:
            raise ValueError(
                f"shards: need 1 <= row_group_size ({row_group_size}) <= shard_size ({shard_size})"
            )
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        if (self.out / SHARDS_META).exists():
            raise FileExistsError(f"{self.out}: holds shards already ({SHARDS_META}); choose another --out")
        self.vae_shape, self.uni_shape = tuple(vae_shape), tuple(uni_shape)
        self.parent_size, self.shard_size, self.row_group_size = parent_size, shard_size, row_group_size
        self.extra_meta = dict(extra_meta or {})
        self.schema = _schema(self.vae_shape, self.uni_shape)
        self.shards: list[dict] = []
        self._rows: list[tuple[str, str, bytes, bytes]] = []

    def add(self, key: str, path: str, vae: np.ndarray, uni: np.ndarray) -> None:
        if tuple(vae.shape) != self.vae_shape or tuple(uni.shape) != self.uni_shape:
            raise ValueError(
                f"{path}: features of shape vae {tuple(vae.shape)}, uni {tuple(uni.shape)}; the shards "
                f"hold vae {self.vae_shape}, uni {self.uni_shape}"
            )
        vae16, uni16 = np.ascontiguousarray(vae, np.float16), np.ascontiguousarray(uni, np.float16)
        self._rows.append((key, path, vae16.tobytes(), uni16.tobytes()))
        if len(self._rows) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        name = f"shard-{len(self.shards):06d}.parquet"
        columns = list(zip(*self._rows))
        table = pa.Table.from_arrays(
            [pa.array(c, type=f.type) for c, f in zip(columns, self.schema)], schema=self.schema
        )
        with atomic_path(self.out / name) as tmp:
            # latents are noise-like float16: compression buys little and costs reading time
            pq.write_table(table, tmp, row_group_size=self.row_group_size, compression="none")
        groups = math.ceil(len(self._rows) / self.row_group_size)
        self.shards.append({"file": name, "rows": len(self._rows), "row_groups": groups})
        self._rows = []

    def close(self) -> Path:
        self._flush()
        meta = {
            "format": SHARDS_FORMAT,
            "version": SHARDS_VERSION,
            "parent_size": self.parent_size,
            "vae_shape": list(self.vae_shape),
            "uni_shape": list(self.uni_shape),
            "row_group_size": self.row_group_size,
            "num_patches": sum(s["rows"] for s in self.shards),
            "shards": self.shards,
            **self.extra_meta,
        }
        with atomic_path(self.out / SHARDS_META) as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
        return self.out / SHARDS_META


def read_shards_meta(folder: str | Path) -> dict:
    path = Path(folder) / SHARDS_META
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found (a shards folder is complete once tools.pack_shards wrote it)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != SHARDS_FORMAT:
        raise ValueError(f"{path}: not a PixCell shards index (format {meta.get('format')!r})")
    return meta


#################################################################################
#                                   Reading                                     #
#################################################################################


@dataclass(frozen=True)
class _Ref:
    """One sample: crop `crop` of row `row` of unit (row group) `unit`, in pass `pass_`."""

    unit: int
    row: int
    crop: int
    pass_: int


class ShardStream(IterableDataset):
    """Endless crops of `resolution` px from a shards folder, this process's and worker's part of them.

    Items are the dicts of PatchFeatureDataset: latent float32 (16, r/8, r/8) drawn from the stored posterior,
    uni float32 (T, C), index (the global sample id), path, crop. Use with a DataLoader of `batch_size` and
    `num_workers`, and `set_position(epoch, batch)` before each `iter(loader)` (BatchStream does).
    """

    def __init__(
        self,
        folder: str | Path,
        resolution: int,
        batch_size: int,  # per process
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,  # the DataLoader's (0: the main process reads)
        seed: int = 0,
        buffer_size: int = 1024,  # crops held for shuffling, per consumer
    ):
        self.folder = Path(folder)
        self.meta = read_shards_meta(self.folder)
        parent = int(self.meta["parent_size"])
        if resolution % UNI_TILE or not UNI_TILE <= resolution <= parent:
            raise ValueError(
                f"resolution {resolution}: expected a multiple of {UNI_TILE} up to the shards' {parent}"
            )
        self.resolution, self.parent_size = resolution, parent
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_workers, self.seed, self.buffer_size = num_workers, seed, max(1, buffer_size)
        self.crops_per_side = parent // resolution
        self.crops_per_patch = self.crops_per_side**2
        self.vae_shape, self.uni_shape = tuple(self.meta["vae_shape"]), tuple(self.meta["uni_shape"])
        # units: (file, row group, rows, first global row)
        self.units: list[tuple[str, int, int, int]] = []
        first = 0
        for shard in self.meta["shards"]:
            for g in range(shard["row_groups"]):
                rows = min(self.meta["row_group_size"], shard["rows"] - g * self.meta["row_group_size"])
                self.units.append((shard["file"], g, rows, first))
                first += rows
        consumers = world_size * max(1, num_workers)
        if len(self.units) < consumers:
            raise ValueError(
                f"{self.folder}: {len(self.units)} row groups for {consumers} readers ({world_size} "
                "processes x workers): pack with a smaller --row-group-size"
            )
        self.epoch, self.start_batch = 0, 0
        self._files: dict = {}

    def __getstate__(self) -> dict:  # open files stay with their process (spawned loader workers reopen them)
        return {**self.__dict__, "_files": {}}

    @property
    def root(self) -> Path:  # named in the trainer's data errors
        return self.folder

    def __getitem__(self, index: int) -> dict:
        """Sample `index` (patch index // crops_per_patch, its crop index % crops_per_patch), first pass's
        noise: for checks and inspection; training iterates."""
        patch, crop = divmod(int(index), self.crops_per_patch)
        unit = next(u for u, (_, _, rows, first) in enumerate(self.units) if first <= patch < first + rows)
        ref = _Ref(unit, patch - self.units[unit][3], crop, 0)
        return self._sample(ref, self._row_group(unit))

    def __len__(self) -> int:  # crops in the whole data
        return int(self.meta["num_patches"]) * self.crops_per_patch

    @property
    def batches_per_epoch(self) -> int:
        return len(self) // (self.batch_size * self.world_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration starts at batch `start_batch` of nominal epoch `epoch` and ends with that epoch."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start batch {start_batch} outside the epoch's {self.batches_per_epoch} batches"
            )
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def set_epoch(self, epoch: int) -> None:  # BatchStream's hook; the position carries the epoch already
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ the deterministic stream of refs
    def _consumer(self) -> tuple[int, int]:
        """(logical worker, workers) of the calling DataLoader worker. The loader takes the j-th batch of an
        iteration from worker j % workers; an iteration that starts at batch k of the epoch therefore rotates
        the workers' roles by k, so that batch i of an epoch always comes from logical worker i % workers."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None and workers != max(1, self.num_workers):
            raise ValueError(f"ShardStream built for {self.num_workers} workers, the loader has {workers}")
        return (worker + self.start_batch) % workers, workers

    def _units_of(self, consumer: int, consumers: int, pass_: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_)
        order = torch.randperm(len(self.units), generator=g).tolist()
        return order[consumer::consumers]

    def _pass_length(self, consumer: int, consumers: int, pass_: int) -> int:
        return (
            sum(self.units[u][2] for u in self._units_of(consumer, consumers, pass_)) * self.crops_per_patch
        )

    def _refs(self, consumer: int, consumers: int, pass_: int = 0) -> Iterator[_Ref]:
        """This consumer's endless stream of samples from pass `pass_` on, shuffled through the buffer."""
        while True:
            rng = np.random.default_rng([self.seed, pass_, consumer])
            buffer: list[_Ref] = []
            for unit in self._units_of(consumer, consumers, pass_):
                for row in range(self.units[unit][2]):
                    for crop in range(self.crops_per_patch):
                        buffer.append(_Ref(unit, row, crop, pass_))
                        if len(buffer) >= self.buffer_size:
                            i = int(rng.integers(len(buffer)))
                            buffer[i], buffer[-1] = buffer[-1], buffer[i]
                            yield buffer.pop()
            while buffer:  # the pass's tail, drained in random order
                i = int(rng.integers(len(buffer)))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
            pass_ += 1

    def _taken(self, worker: int, workers: int, epoch: int, batch: int) -> int:
        """Samples this worker yielded before batch `batch` of epoch `epoch` (the loader takes batch i from
        worker i % workers)."""

        def count(n: int) -> int:  # batches i < n with i % workers == worker
            return (n - worker + workers - 1) // workers if n > worker else 0

        return (epoch * count(self.batches_per_epoch) + count(batch)) * self.batch_size

    # ------------------------------------------------------------------ reading
    def _row_group(self, unit: int):
        import pyarrow.parquet as pq

        name, group, _, _ = self.units[unit]
        if name not in self._files:
            if len(self._files) >= 8:  # a few open files per worker
                self._files.pop(next(iter(self._files))).close()
            self._files[name] = pq.ParquetFile(self.folder / name)
        return self._files[name].read_row_group(group)

    def _sample(self, ref: _Ref, table: pa.Table) -> dict:
        first = self.units[ref.unit][3]
        patch = first + ref.row
        index = patch * self.crops_per_patch + ref.crop
        vae = np.frombuffer(table.column("vae")[ref.row].as_py(), np.float16).reshape(self.vae_shape)
        uni = np.frombuffer(table.column("uni")[ref.row].as_py(), np.float16).reshape(self.uni_shape)
        row, col = divmod(ref.crop, self.crops_per_side)
        lat, grid, c = (
            self.resolution // VAE_FACTOR,
            self.parent_size // UNI_TILE,
            self.resolution // UNI_TILE,
        )
        vae = vae[:, row * lat : (row + 1) * lat, col * lat : (col + 1) * lat]
        tokens = [(row * c + i) * grid + col * c + j for i in range(c) for j in range(c)]
        mean, std = torch.from_numpy(vae.astype(np.float32)).chunk(2)
        state = np.random.SeedSequence([self.seed, ref.pass_, index]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        latent = mean + std * torch.randn(tuple(mean.shape), generator=gen)
        return {
            "latent": latent,  # (16, r/8, r/8)
            "uni": torch.from_numpy(uni[tokens].astype(np.float32)),  # (T, C)
            "index": index,
            "path": table.column("path")[ref.row].as_py(),
            "crop": (row * c, col * c),
        }

    def __iter__(self) -> Iterator[dict]:
        worker, workers = self._consumer()
        consumer, consumers = self.rank * workers + worker, self.world_size * workers
        taken = self._taken(worker, workers, self.epoch, self.start_batch)
        todo = self._taken(worker, workers, self.epoch + 1, 0) - taken
        pass_, skip = 0, taken
        while skip >= (length := self._pass_length(consumer, consumers, pass_)):  # whole passes: arithmetic
            skip, pass_ = skip - length, pass_ + 1
        refs = self._refs(consumer, consumers, pass_)
        # A row group stays in memory while crops of it are in the shuffle buffer: until all its crops of the pass
        # came out (counted from the start of the pass, the replayed ones included).
        out: dict[tuple[int, int], int] = {}
        cache: dict[tuple[int, int], object] = {}

        def count_out(ref: _Ref) -> tuple[int, int]:
            key = (ref.pass_, ref.unit)
            out[key] = out.get(key, 0) + 1
            return key

        for _ in range(skip):  # replay the buffer's draws within the pass: no I/O
            count_out(next(refs))
        for _ in range(todo):
            ref = next(refs)
            key = count_out(ref)
            if key not in cache:
                cache[key] = self._row_group(ref.unit)
            yield self._sample(ref, cache[key])
            if out[key] == self.units[ref.unit][2] * self.crops_per_patch:  # the unit's last crop of the pass
                del out[key]
                cache.pop(key)
