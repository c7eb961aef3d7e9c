"""The `mmlora::lora_add_` custom op: mixed-adapter LoRA work added to linear outputs in place.

This module is the op and its launcher: shape checks, buffers, grids and the two launches. The
pieces it puts together live beside it, one job each:

* `reference.py`: the semantics (rows owned by requests in proportion to their weights, one
  adapter slot per request, a group of linears sharing one input) in plain torch, which is the
  op's CPU path;
* `launch_config.py`: which path and blocks a call gets, from its static shapes
  (`choose_config`);
* `row_kernels.py`: the row path (up to 4 rows: decode at small batch), one program per row;
* `tile_kernels.py`: the tile path (more rows), rows grouped into tiles of one slot each, found
  by an in-kernel search or read from a tile plan (`tile_plan.py`); where its shrink splits K,
  the splits' sums meet in sums zeroed by a memset, or (`LaunchConfig.sums_in_kernel`) in the
  tile's last split program, on counters from `tile_counters.py`.

On CUDA tensors the op runs two launches, a shrink and an expand, on one of the two paths;
elsewhere it runs the reference. Everything the grids depend on is static (rows, slot count,
feature sizes): tiles that turn out empty at run time exit at once. Nothing reads device memory
from the host, so the op can be captured in a CUDA graph and replayed with new `request_slots`,
cum weights and adapter weights. Loads beyond a slot's actual rank are masked off, so padding
is neither read nor trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Sequence

import torch

from .launch_config import (
    LaunchConfig,
    _next_power_of_2,
    cdiv,
    choose_config,
    config_for_call,
    interpreting,
    launches_dependent,
    reads_plan,
    search_block,
    tile_bound,
)
from . import bound_calls
from .reference import lora_add_reference
from .row_kernels import _row_expand_kernel, _row_shrink_kernel
from .tile_kernels import _expand_kernel, _shrink_kernel
from .tile_plan import plan_capacity

# LaunchConfig, choose_config and tile_bound are re-exported: callers of this module's
# launcher import them from here.
__all__ = ["BatchTables", "LaunchConfig", "choose_config", "launch", "lora_add", "lora_add_", "lora_add_triton",
           "tile_bound"]


@dataclasses.dataclass(frozen=True)
class BatchTables:
    """The per-batch tables of one op call, which the reference, the checks and both paths read.

    `slot_ranks[j]`: each slot's rank for sibling j (0: the slot does not adapt it);
    `request_slots`: each request's slot (-1: base model); `request_cum_weights`: the running
    sums of the requests' weights, one entry more than the requests (see `reference.py`);
    `tile_plan`: optional, `tile_plan.build_tile_plan` of these request tables.

    Python side only: the custom op's schema is tensors, so the op packs these at its boundary.
    """

    slot_ranks: Sequence[torch.Tensor]
    request_slots: torch.Tensor
    request_cum_weights: torch.Tensor
    tile_plan: torch.Tensor | None = None


# The most float32 parts the last split program of a tile loads at once (`_sum_parts`' CHUNK
# splits of `block_m x block_r`): 32 splits at rank 16 with 16-row tiles, fewer at larger ranks or
# tiles (registers).
_SUM_PARTS_ELEMENTS = 8192


def _padded(items: list, count: int = 3) -> list:
    """`items` repeated up to `count` entries: unused kernel arguments still need a tensor."""
    return list(items) + [items[0]] * (count - len(items))


# A, B and the rank tables are the manager's slot buffers: the same tensors at every call of a
# served group. Their checks (two dozen shape and stride reads, ~9 us a call on the development
# CPU, and a prefill makes hundreds of calls, #16) run once per set of tensors, remembered by the
# tensors' ids with weak references (a recycled id is never taken for a checked tensor) and
# A's shape (nothing in this package reshapes a buffer in place).
_CHECKED_WEIGHTS: dict[tuple[int, ...], tuple[tuple, list[weakref.ref]]] = {}
_CHECKED_LIMIT = 4096


def _check_weights(lora_a, lora_b, slot_ranks, out_features: list[int]) -> None:
    """The checks of A, B and the rank tables, which do not depend on the call's rows."""
    n = len(lora_a)
    if not 1 <= n <= 3 or not len(lora_b) == len(slot_ranks) == len(out_features) == n:
        raise ValueError(f"lora_add_: expected 1 to 3 siblings with one A, B and rank table each, got "
                         f"{len(out_features)}")
    tensors = (*lora_a, *lora_b, *slot_ranks)
    key = (*map(id, tensors), *out_features)
    found = _CHECKED_WEIGHTS.get(key)
    if (found is not None and found[0] == lora_a[0].shape
            and all(ref() is tensor for ref, tensor in zip(found[1], tensors))):
        return
    slots, rank, in_features = lora_a[0].shape
    for j in range(n):
        if tuple(lora_a[j].shape) != (slots, rank, in_features) or lora_a[j].stride() != lora_a[0].stride():
            raise ValueError("lora_add_: every sibling's A must have the shape and strides of the first")
        if lora_a[j].stride(-1) != 1 or lora_b[j].stride(-1) != 1:
            raise ValueError("lora_add_: A and B must be contiguous in their last dimension")
        if lora_b[j].shape[0] != slots or lora_b[j].shape[2] != rank or lora_b[j].shape[1] != out_features[j]:
            raise ValueError(f"lora_add_: sibling {j}'s B has shape {tuple(lora_b[j].shape)}")
        if lora_b[j].stride(1) != lora_b[0].stride(1):
            raise ValueError("lora_add_: every sibling's B must have the row stride of the first")
        if slot_ranks[j].numel() != slots:
            raise ValueError(f"lora_add_: slot_ranks[{j}] must have one entry per slot")
    if len(_CHECKED_WEIGHTS) >= _CHECKED_LIMIT:
        _CHECKED_WEIGHTS.clear()
    _CHECKED_WEIGHTS[key] = (lora_a[0].shape, [weakref.ref(tensor) for tensor in tensors])


def _check_shapes(outputs, inputs, lora_a, lora_b, tables: BatchTables) -> None:
    """Static shape checks only (no device reads)."""
    if tables.request_cum_weights.numel() != tables.request_slots.numel() + 1:
        raise ValueError("lora_add_: request_cum_weights must have one entry more than request_slots")
    _check_weights(lora_a, lora_b, tables.slot_ranks, [output.shape[-1] for output in outputs])
    if inputs.shape[1] != lora_a[0].shape[-1]:
        raise ValueError(f"lora_add_: x has {inputs.shape[1]} features, A takes {lora_a[0].shape[-1]}")
    for j, output in enumerate(outputs):
        if not output.is_contiguous() or output.numel() // max(output.shape[-1], 1) != inputs.shape[0]:
            raise ValueError(f"lora_add_: output {j} must be contiguous with the rows of x")


def launch(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    tables: BatchTables,
    *,
    config: LaunchConfig | None = None,
    counters: torch.Tensor | None = None,
) -> None:
    """The Triton path of `lora_add_`: a shrink and an expand on the row path or the tile path.

    Runs on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1`. The tile path reads its
    tiles from `tables.tile_plan` when the plan covers the row count. `config` overrides the
    launch parameters `choose_config` picks from the shapes. `counters` (int32 zeros, one per
    tile at least, left zero) replaces the call's own for split sums reduced in the kernel
    (`LaunchConfig.sums_in_kernel`; tests pass one to see it set back).

    On a GPU, the first call with a given key goes through the checks, the heuristics and
    Triton's launch path, and binds its launches; later calls with that key hand their tensors to
    the bound launches directly (`bound_calls.py`).
    """
    inputs = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if inputs.stride(-1) != 1:
        inputs = inputs.contiguous()
    key = None
    if config is None and counters is None and bound_calls.bindable(inputs):
        key = bound_calls.call_key(outputs, inputs, lora_a, lora_b, tables)
        if bound_calls.replay(key, inputs, outputs, lora_a, lora_b, tables):
            return
    _check_shapes(outputs, inputs, lora_a, lora_b, tables)
    flat_outputs = [output if output.dim() == 2 else output.view(-1, output.shape[-1]) for output in outputs]
    recorder = bound_calls.Recorder(inputs.device) if key is not None else None
    converted = bound_calls.kernel_tables(tables)
    allocate = recorder.allocate if recorder else functools.partial(bound_calls.scratch, device=inputs.device)
    if recorder is not None:
        counters_for = recorder.counters
    elif counters is not None:
        counters_for = functools.partial(_given_counters, counters)
    else:
        counters_for = functools.partial(bound_calls.scratch, dtype=torch.int32, device=inputs.device, zero=True)
    _launch_through_triton(flat_outputs, inputs, x.dtype, lora_a, lora_b, converted, config, allocate,
                           recorder.run if recorder else _run, counters_for)
    if recorder is not None:
        recorder.bind(key, inputs, flat_outputs, lora_a, lora_b, tables, converted)


def _run(kernel, grid: tuple, *args, **kwargs) -> None:
    kernel[grid](*args, **kwargs)


def _given_counters(counters: torch.Tensor, count: int) -> torch.Tensor:
    if counters.dtype != torch.int32 or counters.numel() < count:
        raise ValueError(f"lora_add_: the call needs {count} int32 counters, got {counters.numel()} of "
                         f"{counters.dtype}")
    return counters


def _launch_through_triton(flat_outputs, inputs, dtype, lora_a, lora_b, tables: BatchTables, config, allocate,
                           run, counters_for) -> None:
    """`launch`'s heuristics and launches through Triton's path, for checked 2-d outputs and rows
    and tables in the kernels' dtypes: scratch comes from `allocate(numel, dtype, zero)`, the
    in-kernel split sums' counters (zero, left zero) from `counters_for(count)`, and each
    launch goes through `run(kernel, grid, *args, **kwargs)`."""
    rows, in_features = inputs.shape
    num_slots, max_rank, _ = lora_a[0].shape
    if rows == 0 or num_slots == 0 or max_rank == 0 or tables.request_slots.numel() == 0:
        return
    n = len(flat_outputs)
    out_features = [output.shape[1] for output in flat_outputs]
    num_requests = tables.request_slots.numel()
    config = config_for_call(rows, in_features, max_rank, num_slots, dtype, num_requests, config)
    block_r = max(16, _next_power_of_2(max_rank))
    num_splits = cdiv(in_features, config.k_chunk)
    request_slots, request_cum_weights = tables.request_slots, tables.request_cum_weights
    ranks = _padded(list(tables.slot_ranks))

    device = inputs.device
    tile_plan = tables.tile_plan
    capacity = plan_capacity(tile_plan) if tile_plan is not None else 0
    if tile_plan is not None and tile_plan.device != device:
        raise ValueError(f"lora_add_: the tile plan is on {tile_plan.device}, the rows on {device}")
    # Both paths' kernels take exactly three siblings' arguments (NUM_SIBLINGS says how many are
    # real): the lists are padded to three and passed spread out, sibling 0 first.
    a, o, b, features = _padded(lora_a), _padded(flat_outputs), _padded(lora_b), _padded(out_features)
    b_slot_strides = [sibling_b.stride(0) for sibling_b in b]
    blocks = [cdiv(features, config.block_n) for features in out_features]
    slots_block = max(16, _next_power_of_2(num_slots))
    # The request tables as both paths' kernels take them.
    request_args = (request_slots, request_cum_weights, num_requests, num_slots)
    if config.per_row:
        partials = allocate(num_splits * n * rows * block_r, torch.float32)
        dependent = launches_dependent(config, device)
        launch_options = {"launch_pdl": True} if dependent else {}
        requests_block = max(16, _next_power_of_2(num_requests + 1))  # the tables in one load, total included
        run(_row_shrink_kernel, (rows, num_splits),
            inputs, inputs.stride(0),
            *a, lora_a[0].stride(0), lora_a[0].stride(1),
            *ranks, max_rank,
            *request_args, partials, rows, in_features, config.k_chunk,
            NUM_SIBLINGS=n, BLOCK_R=block_r, BLOCK_K=config.block_k, SLOTS=slots_block,
            REQUESTS=requests_block, DEPENDENT_LAUNCH=dependent,
            num_warps=config.shrink_warps, **launch_options)
        run(_row_expand_kernel, (sum(blocks), rows),
            *o, *features,
            *b, *b_slot_strides, lora_b[0].stride(1),
            *ranks, max_rank, blocks[0], _padded(blocks)[1],
            *request_args, partials, rows, num_splits,
            NUM_SIBLINGS=n, BLOCK_R=block_r, BLOCK_N=config.block_n, SPLITS=max(2, _next_power_of_2(num_splits)),
            SLOTS=slots_block, REQUESTS=requests_block, DEPENDENT_LAUNCH=dependent,
            num_warps=config.expand_warps, **launch_options)
        return

    block_m = config.block_m
    num_tiles = tile_bound(rows, num_slots, block_m)
    requests_block, one_pass = search_block(num_requests)
    precision = "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
    # The interpreter multiplies bf16 blocks as raw integers: give it float32 operands.
    upcast = interpreting() and dtype == torch.bfloat16
    use_plan = reads_plan(block_m, rows, capacity)
    tile_meta = allocate(num_tiles * 4, torch.int32)  # slot, rank of each sibling
    tile_rows = allocate(num_tiles * block_m, torch.int32)
    # Several splits add into zeroed sums (one memset), or with `sums_in_kernel` store their parts
    # apart for the tile's last split to sum (counters zero between calls: no memset); one split
    # stores the sums.
    last_sums = num_splits > 1 and config.sums_in_kernel
    atomic = num_splits > 1 and not last_sums
    shrunk = allocate(n * num_tiles * block_m * block_r, torch.float32, zero=atomic)
    split_block = _next_power_of_2(num_splits) if last_sums else 1
    if last_sums:
        parts = allocate(num_splits * n * num_tiles * block_m * block_r, torch.float32)
        counters = counters_for(num_tiles)
    else:
        parts = counters = shrunk  # not read

    run(_shrink_kernel, (num_tiles, num_splits),
        inputs, inputs.stride(0),
        *a, lora_a[0].stride(0), lora_a[0].stride(1),
        *ranks, max_rank,
        *request_args,
        tile_plan if use_plan else request_slots, capacity,
        tile_meta, tile_rows, shrunk, parts, counters,
        rows, in_features, config.k_chunk, num_tiles, num_splits,
        NUM_SIBLINGS=n, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
        SLOTS=slots_block, REQUESTS=requests_block,
        ONE_PASS=one_pass, ATOMIC=atomic, LAST_SUMS=last_sums,
        SPLITS=split_block, CHUNK=min(split_block, max(1, _SUM_PARTS_ELEMENTS // (block_m * block_r))),
        PRECISION=precision, UPCAST=upcast, USE_PLAN=use_plan,
        num_warps=config.shrink_warps, num_stages=config.shrink_stages)
    run(_expand_kernel, (sum(blocks), num_tiles),
        *o, *features,
        *b, *b_slot_strides, lora_b[0].stride(1), max_rank,
        blocks[0], _padded(blocks)[1],
        tile_meta, tile_rows, shrunk, num_tiles,
        NUM_SIBLINGS=n, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=config.block_n,
        PRECISION=precision, num_warps=config.expand_warps)


def lora_add_triton(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    slot_ranks: list[torch.Tensor],
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
    tile_plan: torch.Tensor | None = None,
    *,
    config: LaunchConfig | None = None,
    counters: torch.Tensor | None = None,
) -> None:
    """`launch` with the tables given as the op's tensors (the benchmark and the tests call this).

    Runs on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1`. `tile_plan`, if given,
    must be `tile_plan.build_tile_plan` of these request tables (the tile path reads its tiles
    there when it covers the row count). `config` overrides the launch parameters
    `choose_config` picks from the shapes; `counters` as `launch` takes them.
    """
    launch(outputs, x, lora_a, lora_b, BatchTables(slot_ranks, request_slots, request_cum_weights, tile_plan),
           config=config, counters=counters)


def lora_add(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights, tile_plan=None) -> None:
    """The op's body, for callers already inside a custom op: Triton on CUDA, the reference elsewhere."""
    if x.is_cuda:
        launch(outputs, x, lora_a, lora_b, BatchTables(slot_ranks, request_slots, request_cum_weights, tile_plan))
    else:
        lora_add_reference(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights)


# The op's schema is made of tensors (a custom op cannot take a dataclass): its tables are
# packed into `BatchTables` by `lora_add`, the body, and never cross the op boundary as one.
@torch.library.custom_op("mmlora::lora_add_", mutates_args=("outputs",))
def lora_add_(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    slot_ranks: list[torch.Tensor],
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
    tile_plan: torch.Tensor | None = None,
) -> None:
    """`outputs[j] += LoRA_j(x)` per row's adapter slot; see `reference.lora_add_reference`.

    `tile_plan` (optional) must be `tile_plan.build_tile_plan` of the same request tables: it
    only saves the CUDA kernels work, and the result is the same with it or without it.
    """
    lora_add(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights, tile_plan)


@lora_add_.register_fake
def _lora_add_fake(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights,
                   tile_plan=None) -> None:
    return None
