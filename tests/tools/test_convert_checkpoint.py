"""tools/convert_checkpoint.py in both directions, and its errors."""

from __future__ import annotations

import torch

from diffusion.command import run_cli
from diffusion.model.loading import load_transformer, save_original_checkpoint
from diffusion.model.pixcell_transformer import build_pixcell
from tools.convert_checkpoint import main


def test_convert_both_ways(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_pixcell("PixCell-tiny-64")
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    save_original_checkpoint(model, tmp_path / "orig.pth", as_ema=True)
    assert run_cli(main, [str(tmp_path / "orig.pth"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert run_cli(main, [str(tmp_path / "hf"), str(tmp_path / "back.ckpt")]) == 0
    a, b = load_transformer(tmp_path / "hf"), load_transformer(tmp_path / "back.ckpt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]) and torch.equal(v, b.state_dict()[k]), k
    assert "1 UNI token" in capsys.readouterr().out


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert run_cli(main, [str(tmp_path / "none.pth"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "none.pth" in err and "\n" not in err
    (tmp_path / "folder").mkdir()
    assert run_cli(main, [str(tmp_path / "folder"), str(tmp_path / "out")]) == 2
    assert "no PixCell transformer here" in capsys.readouterr().err
