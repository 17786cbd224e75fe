"""diffusion/data/shards.py: the split over processes and loader workers, the shuffle buffer, the exact resume
position (also through train_pixcell), crops equal to the indexed dataset's."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from diffusion.checkpoints import latest_checkpoint
from diffusion.data.datasets import PatchFeatureDataset
from diffusion.data.shards import ShardStream
from tools.pack_shards import main as pack

REPO = Path(__file__).resolve().parents[3]
TINY = str(REPO / "configs" / "tiny" / "pixcell_tiny_256.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, real_features) -> Path:
    out = tmp_path_factory.mktemp("shards") / "features_shards"
    assert (
        pack(["--root", str(real_features), "--out", str(out), "--shard-size", "2", "--row-group-size", "1"])
        == 0
    )
    return out


def batches(stream: ShardStream, epoch: int, start: int, workers: int, n: int) -> list[list[int]]:
    stream.set_position(epoch, start)
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=workers)
    return [b["index"].tolist() for b in itertools.islice(loader, n)]


def test_one_pass_deals_every_crop_once_over_processes_and_workers(shards):
    world, workers = 2, 2
    streams = [ShardStream(shards, 256, 2, world, r, workers, seed=3, buffer_size=3) for r in range(world)]
    per_consumer = len(streams[0]) // (world * workers)  # 16 crops of 4 patches, 1 patch per unit
    seen = []
    for rank, stream in enumerate(streams):
        for w in range(workers):
            refs = stream._refs(rank * workers + w, world * workers)
            seen += [(r.unit, r.row, r.crop) for r in itertools.islice(refs, per_consumer)]
    assert len(seen) == len(set(seen)) == 16
    # the buffer shuffles: a consumer's crops do not come patch by patch in order
    refs = list(itertools.islice(streams[0]._refs(0, 4), 8))
    assert [r.crop for r in refs] != sorted(r.crop for r in refs)


def test_resume_position_gives_the_same_batches(shards):
    stream = ShardStream(shards, 256, 2, world_size=1, rank=0, num_workers=2, seed=1, buffer_size=5)
    bpe = stream.batches_per_epoch  # 16 crops / batch 2
    straight = batches(stream, 0, 0, 2, bpe) + batches(stream, 1, 0, 2, bpe)
    assert len(straight) == 2 * bpe and all(len(b) == 2 for b in straight)
    for epoch, start in ((0, 3), (1, 0), (1, 5)):  # an odd start rotates the workers' roles
        resumed = batches(stream, epoch, start, 2, 2)
        assert resumed == straight[epoch * bpe + start : epoch * bpe + start + 2], (epoch, start)
    assert batches(stream, 0, 3, 0, 2) != straight[3:5]  # another worker count: another (valid) order


def test_crops_equal_the_indexed_datasets(shards, real_features):
    stream = ShardStream(shards, 256, 1, seed=0)
    ds = PatchFeatureDataset(root=real_features, resolution=256, parent_size=512)
    for i in (0, 5, 15):
        ours, theirs = stream[i], ds[i]
        assert ours["path"] == theirs["path"] and ours["crop"] == theirs["crop"]
        torch.testing.assert_close(ours["uni"], theirs["uni"], rtol=0, atol=0)
        assert ours["latent"].shape == theirs["latent"].shape == (16, 32, 32)


def test_train_pixcell_resumes_exactly_on_shards(tmp_path, shards, real_features):
    from safetensors.torch import load_file

    from train_scripts.train_pixcell import cli

    def train(work: Path, steps: int) -> None:
        argv = [
            TINY,
            "--work-dir",
            str(work),
            "--data-root",
            str(real_features),
            "--report-to",
            "none",
            "--cfg-options",
            "data.feature_format='shards'",
            f"data.features_root='{shards}'",
            f"max_steps={steps}",
            "save_every_steps=2",
        ]
        assert cli(argv) == 0

    train(tmp_path / "straight", 4)
    train(tmp_path / "resumed", 2)
    train(tmp_path / "resumed", 4)
    a, b = (load_file(latest_checkpoint(tmp_path / w) / "model.safetensors") for w in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
