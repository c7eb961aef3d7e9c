"""LoRA on tensor-parallel linears (issue #23): the op's DTensor rule and the eager row-parallel path.

`sharding.py` says how each served linear is laid out; the slot buffers hold this rank's slice
(`adapter_manager.py`). Here is what the LoRA work needs beyond one process's:

- **The op's sharding rule.** In the graphs of a `parallelize_module` model the linear's input,
  output and weight are DTensors, and so are the arguments of the `mmlora::lora_linear_` op put
  after it. DTensor runs an op on each rank's local shards once it knows the placements the op
  accepts (`register_sharding`): column-parallel weights `Shard(0)` with their outputs `Shard(-1)`
  and a replicated input; row-parallel weights `Shard(1)` with their outputs `Partial()` (the
  linear's product before the module's all-reduce) and an input split by features. Those are the
  placements the linear itself has there, so DTensor moves no data; the op body then gets local
  tensors, as it does in transformers' `tp_plan` graphs (whose layers call `to_local()` themselves).
  On a row-parallel target it adds the partial delta `x_i A_i^T B^T` to the partial output: the
  base's all-reduce sums it with the product, and LoRA adds no collective.
- **Row-parallel outside the graphs.** A forward hook (`mm.eager`, code dynamo did not compile)
  sees the module's output after its all-reduce, so the partial delta cannot ride on it: the
  rank-sized shrink `x_i A_i^T` is all-reduced (a functional collective over the weight's mesh)
  and then expanded with the whole B. The shrink and the expand are `lora_add` with an identity
  factor, so the same kernels run. A column-parallel module that gathers its output (transformers'
  lm_head) shows the hook the whole output: each rank's slice of the delta is all-gathered into it.
- **Column-parallel with A split along the rank** (`tp_lora_a="sharded"`), in the graphs and in
  the hooks alike: each rank shrinks the whole input by its `R/T` rows of A, the `[rows, R/T]`
  shrinks are all-gathered in rank order into the whole `[rows, R]` shrink, and each rank expands
  it with its rows of B. The rank-sized work is split instead of repeated, for one all-gather.
"""

from __future__ import annotations

import functools

import torch

from .kernels.lora_add import lora_add

__all__ = ["register_sharding_rule", "prepare_identities", "lora_add_all_reduced", "lora_add_all_gathered", "gathered"]


@functools.cache
def register_sharding_rule() -> None:
    """Tell DTensor how `mmlora::lora_linear_` runs on sharded linears (once per process)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding

    from . import lora_op  # noqa: F401  (defines the op)

    @register_sharding(torch.ops.mmlora.lora_linear_.default)
    def lora_linear_placements(outputs, x, weights):
        # One strategy: the placements the linears themselves have here. DTensor would otherwise
        # redistribute to match, and an in-place op cannot have its outputs redistributed.
        placements = {tuple(weight.placements) for weight in weights}
        if placements == {(Shard(0),)}:
            output_last = len(outputs[0].tensor_meta.shape) - 1
            return [([], [Shard(output_last)] * len(outputs) + [Replicate()] + [Shard(0)] * len(weights))]
        if placements == {(Shard(1),)}:
            x_last = len(x.tensor_meta.shape) - 1
            return [([], [Partial()] * len(outputs) + [Shard(x_last)] + [Shard(1)] * len(weights))]
        return []  # anything else was refused when the model was compiled (`sharding.target_layouts`)


@functools.cache
def _identities(slots: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[slots, width, width]`, every slot's the same identity (slot stride 0: the kernels read the
    strides given). One tensor per shape: the launcher then finds its checks done (it remembers the
    tensors it checked), and `prepare_identities` makes them when the runtime is built, so none is
    first allocated inside a CUDA-graph capture, in a pool the graph may later reuse."""
    return torch.eye(width, dtype=dtype, device=device).expand(slots, width, width)


def prepare_identities(buffers) -> None:
    """Make the identities the sharded paths of these `SlotBuffers` will use (outside any capture)."""
    for b in buffers:
        for width in {b.lora_a.shape[-2], b.lora_b.shape[-1]}:
            _identities(b.lora_a.shape[0], width, b.lora_a.dtype, b.lora_a.device)


def _shrunk(x, lora_a, ranks, request_slots, cum_weights, tile_plan) -> list[torch.Tensor]:
    """Each sibling's shrink `x A^T` (`[rows, width]`, width A's rows), by the rows' slots and the
    `ranks` given: `lora_add` with an identity B, so the same kernels run, siblings in one call."""
    width = lora_a[0].shape[-2]
    identity = _identities(lora_a[0].shape[0], width, x.dtype, x.device)
    shrinks = [x.new_zeros(*x.shape[:-1], width) for _ in lora_a]
    lora_add(shrinks, x, lora_a, [identity] * len(lora_a), ranks, request_slots, cum_weights, tile_plan)
    return shrinks


def _expand(output, shrink, lora_b, ranks, request_slots, cum_weights, tile_plan) -> None:
    """`output += shrink B^T` by the rows' slots: `lora_add` with an identity A."""
    identity = _identities(lora_b.shape[0], lora_b.shape[-1], shrink.dtype, shrink.device)
    lora_add([output], shrink, [identity], [lora_b], [ranks], request_slots, cum_weights, tile_plan)


def _waited(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed import _functional_collectives as funcol

    return tensor.wait() if isinstance(tensor, funcol.AsyncCollectiveTensor) else tensor


def lora_add_all_reduced(outputs, x, lora_a, lora_b, ranks, request_slots, cum_weights, tile_plan, mesh) -> None:
    """Add the LoRA of row-parallel siblings to their reduced `outputs`: per sibling, the shrink
    `x_i A_i^T` of this rank's input slice `x` (`[rows, R]`, R the slots' rank), all-reduced over
    `mesh`, then expanded with the whole B."""
    from torch.distributed import _functional_collectives as funcol

    shrinks = _shrunk(x, lora_a, ranks, request_slots, cum_weights, tile_plan)
    for output, shrink, b, slot_ranks in zip(outputs, shrinks, lora_b, ranks):
        reduced = _waited(funcol.all_reduce(shrink, "sum", mesh))
        _expand(output, reduced, b, slot_ranks, request_slots, cum_weights, tile_plan)


def lora_add_all_gathered(outputs, x, lora_a, lora_b, ranks, local_ranks, request_slots, cum_weights, tile_plan,
                          mesh) -> None:
    """Add the LoRA of column-parallel siblings whose A is split along the rank (`tp_lora_a="sharded"`)
    to their `outputs` (this rank's output features): per sibling, the shrink of the whole input `x`
    by this rank's `R/T` rows of A (`[rows, R/T]`, by the slots' `local_ranks`), all-gathered over
    `mesh` in rank order into `[rows, R]` (every rank's rows of A, in order: the whole shrink), then
    expanded with this rank's rows of B, by the slots' whole `ranks`."""
    from torch.distributed import _functional_collectives as funcol

    shrinks = _shrunk(x, lora_a, local_ranks, request_slots, cum_weights, tile_plan)
    for output, shrink, b, slot_ranks in zip(outputs, shrinks, lora_b, ranks):
        whole = _waited(funcol.all_gather_tensor(shrink, shrink.dim() - 1, mesh)).contiguous()
        _expand(output, whole, b, slot_ranks, request_slots, cum_weights, tile_plan)


def gathered(delta: torch.Tensor, mesh, features: int) -> torch.Tensor:
    """This rank's slice `[..., out_i]` of a column-parallel delta, all-gathered over `mesh` into the
    whole `[..., features]` (DTensor's gather: the last rank's slice may be shorter)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = (*delta.shape[:-1], features)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(delta, mesh, [Shard(delta.dim() - 1)], run_check=False, shape=shape,
                              stride=stride).full_tensor()
