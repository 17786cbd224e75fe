"""Export virtual-staining weights trained here to the published file layout, for the published notebook.

    python -m virtual_staining.export_published --target mist_her2 --out release/ \\
        --model StonyBrook-CVLab/PixCell-1024 \\
        --lora work_dirs/lora_her2/lora.safetensors --flow work_dirs/flow_her2/flow_mlp.safetensors

writes, as `StonyBrook-CVLab/pixcell-virtual-staining` lays them out:

    release/ckpts/lora/mist_her2_lora.pth   the whole adapted transformer's state dict (base weights under
                                            `.base_layer.` names + `lora_A/B.default`), as the published files
    release/ckpts/mlp/mist_her2_mlp.pth     the flow MLP's state dict (`../shared/formats/flow_mlp_keys.json`)

Our stainer loads both back (`python -m virtual_staining.stain --lora ... --flow ...`). Either file alone: give
only --lora or only --flow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusion.atomic import atomic_path
from diffusion.command import run_cli
from diffusion.model.flow_mlp import load_flow_mlp
from diffusion.model.loading import load_transformer
from diffusion.model.lora import add_lora, load_lora_weights, read_lora_file, save_published_lora
from virtual_staining.published import BASE_MODEL, TARGETS


def published_paths(out: str | Path, target: str) -> tuple[Path, Path]:
    """(LoRA .pth, flow MLP .pth) paths of `target` under a published-layout folder."""
    root = Path(out) / "ckpts"
    return root / "lora" / f"{target}_lora.pth", root / "mlp" / f"{target}_mlp.pth"


def export_lora(model: str | Path, lora: str | Path, path: Path) -> Path:
    """Base transformer + our adapter file -> the published whole-model `.pth`."""
    transformer = load_transformer(model)
    state, settings = read_lora_file(lora)
    add_lora(transformer, settings)
    load_lora_weights(transformer, lora, state)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_published_lora(transformer, path)


def export_flow(flow: str | Path, path: Path) -> Path:
    """Our flow MLP file -> its published plain state dict `.pth`."""
    model = load_flow_mlp(flow)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder to write ckpts/lora and ckpts/mlp into")
    p.add_argument(
        "--target",
        required=True,
        help=f"file stem, e.g. one of the published {', '.join(TARGETS.values())}, or a new name",
    )
    p.add_argument("--lora", help="adapter of a LoRA run (lora.safetensors)")
    p.add_argument("--flow", help="flow MLP of a flow run (flow_mlp.safetensors)")
    p.add_argument("--model", default=BASE_MODEL, help="the base transformer the adapter was trained on")
    args = p.parse_args(argv)
    if not args.lora and not args.flow:
        raise ValueError("nothing to export: give --lora and/or --flow")
    if not args.target.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--target {args.target!r}: expected a file stem such as mist_her2")
    for flag in ("lora", "flow"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise FileNotFoundError(f"--{flag} {value}: no such file")
    lora_path, flow_path = published_paths(args.out, args.target)
    if args.lora:
        print(f"wrote {export_lora(args.model, args.lora, lora_path)}")
    if args.flow:
        print(f"wrote {export_flow(args.flow, flow_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
