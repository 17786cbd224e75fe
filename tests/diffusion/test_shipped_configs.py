"""Configs ship with the package: a wheel holds configs/ beside diffusion/, and an installed copy loads a config
by its name from a directory that is not the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from diffusion.config import CONFIG_ROOT, config_file, shipped_config

REPO = Path(__file__).resolve().parents[2]


def test_config_file_finds_paths_and_shipped_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the checkout: the relative name alone does not exist here
    want = CONFIG_ROOT / "tiny" / "pixcell_tiny_256.py"
    assert config_file("configs/tiny/pixcell_tiny_256.py") == want
    assert config_file("tiny/pixcell_tiny_256.py") == want
    assert shipped_config("_base_/lora.py") == CONFIG_ROOT / "_base_" / "lora.py"
    own = tmp_path / "mine.py"
    own.write_text("_base_ = []\n")
    assert config_file(own) == own  # a file given by path wins
    with pytest.raises(FileNotFoundError, match="config configs/nope.py: no such file"):
        config_file("configs/nope.py")


def test_an_installed_wheel_loads_configs_by_name_outside_the_checkout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ".",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("pixcell-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    shipped = {n for n in names if n.startswith("configs/")}
    in_repo = {p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.py")}
    assert shipped == in_repo
    code = (
        "import diffusion, diffusion.config as c\n"
        "print(diffusion.__file__)\n"
        "print(c.load_config('configs/tiny/pixcell_tiny_256.py').model)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[0] == str(site / "diffusion" / "__init__.py")  # the installed copy, not the checkout
    assert out[1] == "PixCell-tiny-256"
