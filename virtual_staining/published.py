"""Where the published virtual-staining weights live, and how a weights reference becomes a local file.

`StonyBrook-CVLab/pixcell-virtual-staining` holds one LoRA and one flow MLP per target (file names as the
published notebook downloads them): MIST HER2, ER, PR, Ki67 and HER2Match (HER2). The LoRA `.pth` files hold the
whole adapted PixCell-1024 (see `diffusion.model.lora`); the flow MLP `.pth` files the published state dict
(`../shared/formats/flow_mlp_keys.json`).

A weights reference is a local file, or `OWNER/REPO:PATH/IN/REPO` on the Hugging Face Hub.
"""

from __future__ import annotations

from pathlib import Path

PUBLISHED_REPO = "StonyBrook-CVLab/pixcell-virtual-staining"
BASE_MODEL = "StonyBrook-CVLab/PixCell-1024"
# (dataset, stain) -> file stem in the published repo
TARGETS: dict[tuple[str, str], str] = {
    ("MIST", "HER2"): "mist_her2",
    ("MIST", "ER"): "mist_er",
    ("MIST", "PR"): "mist_pr",
    ("MIST", "Ki67"): "mist_ki67",
    ("HER2Match", "HER2"): "her2match",
}


def published_refs(stain: str, dataset: str = "MIST") -> tuple[str, str]:
    """(LoRA reference, flow-MLP reference) of the published weights for a stain of a dataset."""
    key = TARGETS.get((dataset, stain))
    if key is None:
        known = ", ".join(f"{d}/{s}" for d, s in TARGETS)
        raise ValueError(f"no published weights for --dataset {dataset} --stain {stain} (published: {known})")
    return f"{PUBLISHED_REPO}:ckpts/lora/{key}_lora.pth", f"{PUBLISHED_REPO}:ckpts/mlp/{key}_mlp.pth"


def resolve_weights(ref: str | Path, what: str = "weights") -> Path:
    """A local file as is; `OWNER/REPO:PATH` downloaded through the Hub cache (one-line error when it cannot be)."""
    path = Path(ref)
    if path.is_file():
        return path
    text = str(ref)
    if ":" in text and text.split(":", 1)[0].count("/") == 1 and not text.startswith((".", "/")):
        repo, filename = text.split(":", 1)
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as err:
            raise RuntimeError(
                f"cannot download {what} {text} ({type(err).__name__}): pass a local file instead, or allow "
                "network access to the Hub (unset HF_HUB_OFFLINE)"
            ) from None
    raise FileNotFoundError(f"{what} {ref}: no such file (nor a hub reference OWNER/REPO:PATH)")
