"""tools/pack_shards.py: the index and features of the real-slide fixture into parquet shards, from either
feature format, the same bytes; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from diffusion.data.features import load_npy, npy_feature_paths
from diffusion.data.index import read_index
from tools.pack_shards import main as pack


def test_packs_npy_and_packed_features_into_the_same_shards(tmp_path, real_features):
    a, b = tmp_path / "from_npy", tmp_path / "from_packed"
    common = ["--root", str(real_features), "--shard-size", "3", "--row-group-size", "2"]
    assert pack([*common, "--out", str(a)]) == 0
    assert pack([*common, "--out", str(b), "--format", "packed"]) == 0
    meta = json.loads((a / "shards.json").read_text())
    assert meta["num_patches"] == 4 and meta["parent_size"] == 512
    assert [(s["rows"], s["row_groups"]) for s in meta["shards"]] == [(3, 2), (1, 1)]
    assert meta["vae_shape"] == [32, 64, 64] and meta["uni_shape"] == [4, 96]
    for shard in meta["shards"]:
        ta, tb = pq.read_table(a / shard["file"]), pq.read_table(b / shard["file"])
        assert ta.equals(tb)
        assert pq.ParquetFile(a / shard["file"]).metadata.num_row_groups == shard["row_groups"]
    first = pq.read_table(a / "shard-000000.parquet").slice(0, 1).to_pylist()[0]
    name = read_index(real_features / "metadata" / "patch_names_all.hdf5")["cmu_512"][0]
    assert first["path"] == name
    vae = np.frombuffer(first["vae"], np.float16).reshape(32, 64, 64)
    assert np.array_equal(vae, load_npy(npy_feature_paths(real_features, name)[0]))


def test_bad_input_is_one_line(tmp_path, real_features, capsys):
    out = tmp_path / "s"
    assert pack(["--root", str(real_features), "--out", str(out), "--keys", "nope_512"]) == 2
    assert "nope_512" in capsys.readouterr().err
    assert pack(["--root", str(real_features), "--out", str(out)]) == 0
    assert pack(["--root", str(real_features), "--out", str(out)]) == 2  # never over a finished set
    assert "holds shards already" in capsys.readouterr().err
