"""Refuse models whose served targets are sharded across processes (tensor parallelism, issue #23).

A model sharded by torch.distributed's tensor-parallel API (`parallelize_module`) or by
transformers' `tp_plan` holds its weights as DTensors: each rank keeps a slice (`Shard(dim)`)
or a copy (`Replicate()`) of the global weight, laid out over a `DeviceMesh`. mmlora_fx's slot
buffers are sized from the global shapes and its ops run on whole local tensors, so until
issue #23 shards each adapter to match, a served target with a DTensor weight is refused here,
before any buffer is allocated: the same error on every rank (the placements are alike on all
of them), so no rank goes on to a collective that another skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

import torch

from .errors import ShardedModelError

__all__ = ["distributed_layout", "check_unsharded"]


def distributed_layout(weight: torch.Tensor) -> str | None:
    """How `weight` is laid out across processes ("placements (Shard(dim=0),) over a 2-rank
    mesh"), or None for an ordinary tensor of this process alone."""
    # No DTensor exists unless its module was imported: the check never imports it itself (a
    # second or two cold; transformers' models usually have imported it already).
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(weight, dtensor.DTensor):
        return None
    mesh = weight.device_mesh
    return (f"placements {tuple(weight.placements)} over a {mesh.size()}-rank {mesh.device_type} mesh "
            f"(global shape {tuple(weight.shape)}, this rank's {tuple(weight.to_local().shape)})")


def check_unsharded(weights: Mapping[str, torch.Tensor], served: Iterable[str]) -> None:
    """Raise `ShardedModelError` naming the first served target (in model order) whose weight is a DTensor."""
    served = set(served)
    sharded = [(name, layout) for name, weight in weights.items() if name in served
               for layout in [distributed_layout(weight)] if layout is not None]
    if sharded:
        name, layout = sharded[0]
        raise ShardedModelError(name, layout, len(sharded))
