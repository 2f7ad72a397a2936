"""Sharded training (FSDP, DeepSpeed ZeRO) is refused, by the Trainer paths and by `attach`, with one message each.

RIFLE re-draws the head in place and keeps L2-SP's reference per parameter: both assume every rank holds whole
parameters, as on one device or under DDP. Under FSDP a rank holds a shard of each parameter (FSDP2's `fully_shard`
turns them into DTensors; FSDP1 flattens them), and re-drawing a sharded head fails mid-run ("FSDP does not support
deepcopy", at the first planned re-init). Refused before the first step instead; supporting it needs every rank to
draw the same full head and keep its own shard, and L2-SP's reference sharded alike, which no test here can check
against DDP yet.
"""

import torch
from torch import nn

SHARDED_TRAINING_REFUSED = (
    "RIFLE supports single-device and DDP (data-parallel) training. FSDP and DeepSpeed shard the head across "
    "ranks, which in-place re-initialization and L2-SP do not handle: launch with DDP."
)
SHARDED_ATTACH_REFUSED = (
    "attach() got a model sharded by FSDP ({how}): RIFLE supports single-device and DDP (data-parallel) training. "
    "FSDP shards the head across ranks, which in-place re-initialization and L2-SP do not handle (the first re-init "
    "would fail mid-run). Wrap the model in torch.nn.parallel.DistributedDataParallel instead of fully_shard / "
    "FullyShardedDataParallel, and build the optimizer and call attach on the bare model."
)


def sharding_of(model: nn.Module) -> str | None:
    """How `model` is sharded across ranks ("fully_shard" for FSDP2, "FullyShardedDataParallel" for FSDP1), or
    None for a model whose ranks hold whole parameters (one device, DDP)."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    modules = list(model.modules())
    if any(isinstance(module, FullyShardedDataParallel) for module in modules):
        return "FullyShardedDataParallel"
    if any(isinstance(module, FSDPModule) for module in modules):
        return "fully_shard"
    if any(isinstance(param, DTensor) for param in model.parameters()):
        return "DTensor parameters"
    return None


def check_not_sharded(model: nn.Module) -> None:
    """Refuse, when `attach` is called, a model FSDP shards: RIFLE would otherwise train and then fail at the
    first planned re-init."""
    how = sharding_of(model)
    if how is not None:
        raise ValueError(SHARDED_ATTACH_REFUSED.format(how=how))
