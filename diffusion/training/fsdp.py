"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the transformer, and its sharded checkpoints (DCP).

Why fully_shard here rather than accelerate's FSDP plugin: accelerate sets up FSDP only on GPUs (on a CPU machine
`accelerate launch --use_fsdp` falls back to one independent process each), while fully_shard runs the same on
CPU (gloo) and GPU (NCCL). accelerate still starts the processes, owns the process group, autocast, logging and
the RNG states; the model and optimizer are simply not given to `accelerator.prepare`.

    fsdp = dict(enabled=True, strategy="FULL_SHARD")    # shard over all processes
    fsdp = dict(enabled=True, strategy="HYBRID_SHARD")  # shard inside a node, replicate across nodes (HSDP)

What is sharded: each transformer block is its own FSDP unit (all-gathered just before its forward and backward,
freed after), the rest (embedders, final layer) is the root unit. Parameters, gradients, AdamW / CAME state and
the EMA are DTensors sharded on dim 0; the null-condition buffer is replicated. `mixed_precision="bf16"` becomes
FSDP's MixedPrecisionPolicy (bf16 compute copies of the fp32 shards, gradients reduced in fp32).

Checkpoints (`ShardedTrainingState`) go through `torch.distributed.checkpoint`: each process writes its shards
of the model, optimizer and EMA, keyed by parameter name, so a checkpoint saved on N processes loads on M (DCP
reshards on load): 2 -> 1, 1 -> 2, one node -> two. With one process, `fsdp.enabled` trains the plain model and
still writes and reads this format. Consolidated weights (the portable `transformer/`, `transformer_ema/`
folders) are gathered with `full_state_dict` (collective).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .ema import EMA

log = logging.getLogger("pixcell.train")

STRATEGIES = ("FULL_SHARD", "HYBRID_SHARD")
SHARDS_DIR = "shards"  # the DCP folder inside a checkpoint


@dataclass(frozen=True)
class FSDPSettings:
    """The `fsdp` config, resolved once."""

    strategy: str  # FULL_SHARD or HYBRID_SHARD
    reshard_after_forward: bool  # free the gathered block after forward (ZeRO-3); False keeps it (ZeRO-2)
    param_dtype: torch.dtype | None  # compute dtype of the gathered parameters (None: the stored fp32)


def fsdp_settings(cfg: Mapping[str, object]) -> FSDPSettings | None:
    """`cfg.fsdp` -> settings, or None when FSDP is off. Reads fsdp.enabled/strategy/reshard_after_forward and
    mixed_precision."""
    f = cfg.get("fsdp") or {}
    if not f.get("enabled", False):
        return None
    strategy = f.get("strategy", "FULL_SHARD")
    if strategy not in STRATEGIES:
        raise ValueError(f"config: fsdp.strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    precision = cfg.mixed_precision
    if precision == "fp16":
        raise ValueError(
            "config: fsdp with mixed_precision 'fp16' is not supported (no sharded grad scaler): use 'bf16' or 'no'"
        )
    dtype = {"bf16": torch.bfloat16, "no": None}[precision]
    return FSDPSettings(strategy, bool(f.get("reshard_after_forward", True)), dtype)


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def device_mesh(device: torch.device, strategy: str):
    """1-D mesh ("shard",) for FULL_SHARD; 2-D ("replicate", "shard") for HYBRID_SHARD, one row per node
    (LOCAL_WORLD_SIZE processes, as torchrun / accelerate launch set it)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    if strategy == "FULL_SHARD":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise ValueError(f"HYBRID_SHARD: {world} processes are not a whole number of nodes of {local}")
    return init_device_mesh(device.type, (world // local, local), mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, settings: FSDPSettings, device: torch.device) -> nn.Module:
    """fully_shard each transformer block, then the root, in place (FSDP2 changes the module's class, keeps its
    methods and parameter names). Without a process group (one process) the model stays as it is."""
    model.to(device)
    if not is_distributed():
        log.info("fsdp: one process, training unsharded (checkpoints in the sharded format all the same)")
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = device_mesh(device, settings.strategy)
    kwargs: dict[str, Any] = dict(
        mesh=mesh,
        reshard_after_forward=settings.reshard_after_forward,
        mp_policy=MixedPrecisionPolicy(param_dtype=settings.param_dtype, reduce_dtype=torch.float32),
    )
    blocks = getattr(model, "transformer_blocks", None)
    if blocks is None:
        raise ValueError(f"fsdp: {type(model).__name__} has no transformer_blocks to wrap")
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    dtype = settings.param_dtype or "fp32"
    log.info(
        "fsdp: %s over mesh %s, %d blocks + root, params %s",
        settings.strategy,
        tuple(mesh.shape),
        len(blocks),
        dtype,
    )
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (consolidated) weights on CPU: gathered from the shards under FSDP (collective: every process
    calls it; the main process gets the tensors, the others an empty dict), the plain state dict otherwise."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_distributed():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def own_class_name(model: nn.Module) -> str:
    """The model's own class name: fully_shard subclasses a module in place (PixCellTransformer2DModel becomes
    FSDPPixCellTransformer2DModel), and a saved config must name the class the published loaders know."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return type(model).__name__
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (the shard of a DTensor, the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


class ShardedTrainingState:
    """Model, optimizer and EMA as one DCP `Stateful`: parameter-name keys, shards per process, resharded on
    load to whatever this run's sharding is."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None = None):
        self.model, self.optimizer, self.ema = model, optimizer, ema

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        out: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
        if self.ema is not None:  # loaded in place into the shadow tensors themselves
            out["ema"] = {"rate": self.ema.rate, **dict(zip(self.ema.names, self.ema.shadow))}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_sd, optim_sd = state["model"], state["optim"]
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        if self.ema is not None:
            self.ema.rate = float(state["ema"]["rate"])

    def save(self, folder: str | os.PathLike) -> None:
        """Every process writes its shards into `folder` (collective)."""
        import torch.distributed.checkpoint as dcp

        with _one_process_ok():
            dcp.save({"train": self}, checkpoint_id=str(folder))

    def load(self, folder: str | os.PathLike) -> None:
        """Read `folder`, saved on any number of processes, into this run's shards (collective)."""
        import torch.distributed.checkpoint as dcp

        with _one_process_ok():
            dcp.load({"train": self}, checkpoint_id=str(folder))


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield
