"""The expand of a stacked linear: each row's own slot's shrink, read from the GEMM's extra columns.

A stacked linear (mmlora_fx/folding.py, decode) computes every resident slot's shrink inside the
base GEMM: its output is `y_ext [rows, out + width]`, the base output in columns `0 .. out` and
slot `k`'s shrink of the row in columns `out + k * R .. out + (k + 1) * R` (`R`: the slot
buffers' rank; columns past `slots * R` are padding and belong to no slot). What is left is the
expand, for each sibling `j` of a group and each row whose slot `k` is not -1:

    y_ext[row, :out] += y_ext[row, out + k * R : out + k * R + rank] @ lora_b[j][k, :, :rank].T

with `rank = min(slot_ranks[j][k], R)` (0: the slot does not adapt this linear) and the scaling
already folded into B. Rows belong to requests as in `reference.py` (`request_cum_weights`,
`request_slots`); rows of the base model (slot -1) are left as they are, and so is every column
past `out`.

* `lora_stacked_expand_reference`: plain torch, the oracle and the CPU path;
* `lora_stacked_expand_triton`: one launch for all siblings (1 to 3). Up to 4 rows one program
  per row and column block, as on the row path's expand (`row_kernels.py`, whose helpers it
  reuses): the program finds its row's slot and ranks from the tables, loads its block of B and
  the row's `rank` shrink values from the output's own columns, and adds the product in place.
  Beyond, one program per tile of up to 16 rows of one slot and column block, the tile path's
  tiles (`tile_plan.py`'s plan where it covers the call, else the search: `tile_kernels._tile_of`), which
  reads its slot's B block once for the tile: per row, B would be re-read by every row (~1.6 MB
  a row for a 7B layer);
* `lora_stacked_expand_`: the Triton kernel on CUDA tensors, the reference elsewhere.

The delta is computed in float32 and added to the output's float32 value, then rounded once.
Only the row's own slot's first `rank` columns are read (a select or a masked load, never a
product with zero): another slot's shrink, or this slot's past its rank, may be inf or NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import _next_power_of_2, cdiv, reads_plan, search_block, tile_bound
from .reference import row_slots
from .row_kernels import _pick, _row_add_expanded, _row_b_block, _slot_of_row, _slot_ranks
from .tile_kernels import _tile_of
from .tile_plan import PLAN_BLOCK_M, plan_capacity

__all__ = ["lora_stacked_expand_", "lora_stacked_expand_reference", "lora_stacked_expand_triton"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check(outputs, out_features, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """Shape, layout and dtype checks of one call (no device reads)."""
    n = len(outputs)
    if not 1 <= n <= 3 or not len(out_features) == len(lora_b) == len(slot_ranks) == n:
        raise ValueError(f"lora_stacked_expand: expected 1 to 3 siblings with one output, out_features, B and "
                         f"rank table each, got {len(outputs)} outputs, {len(out_features)} out_features, "
                         f"{len(lora_b)} B and {len(slot_ranks)} rank tables")
    if request_cum_weights.numel() != request_slots.numel() + 1:
        raise ValueError(f"lora_stacked_expand: {request_slots.numel()} request slots need "
                         f"{request_slots.numel() + 1} running weights, got {request_cum_weights.numel()}")
    if lora_b[0].dim() != 3:
        raise ValueError(f"lora_stacked_expand: B must be [slots, out, rank], got shape {tuple(lora_b[0].shape)}")
    slots, _, rank = lora_b[0].shape
    rows, dtype = outputs[0].shape[0], outputs[0].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"lora_stacked_expand: outputs must be bfloat16, float16 or float32, got {dtype}")
    for j, (output, features, b, ranks) in enumerate(zip(outputs, out_features, lora_b, slot_ranks)):
        if output.dim() != 2 or output.stride(1) != 1:
            raise ValueError(f"lora_stacked_expand: output {j} must be 2D with contiguous columns, got shape "
                             f"{tuple(output.shape)}, strides {output.stride()}")
        if output.shape[0] != rows or output.dtype != dtype:
            raise ValueError(f"lora_stacked_expand: output {j} is {tuple(output.shape)} {output.dtype}, output 0 "
                             f"has {rows} rows of {dtype}")
        if output.shape[1] - features < slots * rank:
            raise ValueError(f"lora_stacked_expand: output {j} has {output.shape[1]} columns, {features} outputs "
                             f"and {slots} slots of rank {rank} need at least {features + slots * rank}")
        # B may be wider than the outputs (an fp32 model under a bf16 autocast): both are read
        # into float32.
        if tuple(b.shape) != (slots, features, rank) or b.dtype not in _DTYPES:
            raise ValueError(f"lora_stacked_expand: sibling {j}'s B is {tuple(b.shape)} {b.dtype}, expected "
                             f"{(slots, features, rank)} in bfloat16, float16 or float32")
        if b.stride(2) != 1 and rank > 1:
            raise ValueError(f"lora_stacked_expand: sibling {j}'s B must be contiguous in its last dimension, "
                             f"got strides {b.stride()}")
        if ranks.numel() != slots:
            raise ValueError(f"lora_stacked_expand: slot_ranks[{j}] has {ranks.numel()} entries for {slots} slots")


def lora_stacked_expand_reference(outputs: list[torch.Tensor], out_features: list[int], lora_b: list[torch.Tensor],
                                  slot_ranks: list[torch.Tensor], request_slots: torch.Tensor,
                                  request_cum_weights: torch.Tensor) -> None:
    """Add each row's own slot's expand to `outputs[j][:, :out_features[j]]` in place (see the module docstring)."""
    _check(outputs, out_features, lora_b, slot_ranks, request_slots, request_cum_weights)
    rows = outputs[0].shape[0]
    if rows == 0 or request_slots.numel() == 0:
        return
    slots = row_slots(request_slots, request_cum_weights, rows)
    present = [int(slot) for slot in torch.unique(slots).tolist() if 0 <= slot < lora_b[0].shape[0]]
    for output, features, b, ranks in zip(outputs, out_features, lora_b, slot_ranks):
        max_rank = b.shape[2]
        for slot in present:
            rank = min(int(ranks[slot]), max_rank)
            if rank <= 0:
                continue
            owned = slots == slot
            start = features + slot * max_rank
            shrunk = output[owned, start:start + rank].float()  # only this slot's first `rank` columns
            delta = shrunk @ b[slot, :, :rank].float().T
            output[owned, :features] = (output[owned, :features].float() + delta).to(output.dtype)


@triton.jit
def _stacked_expand_block(
    out_ptr, out_row_stride, out_features, b_ptr, b_slot_stride, b_row_stride, ranks_ptr, max_rank,
    column_block, row, rows, slots_ptr, cum_ptr, num_requests, num_slots,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr, REQUESTS: tl.constexpr,
):
    ranks = _slot_ranks(ranks_ptr, num_slots, max_rank, SLOTS)
    slot = _slot_of_row(row, rows, slots_ptr, cum_ptr, num_requests, num_slots, REQUESTS)
    rank = _pick(ranks, slot, SLOTS)
    if (slot >= 0) & (rank > 0):
        r = tl.arange(0, BLOCK_R)
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        column_valid = n < out_features
        b_tile = _row_b_block(b_ptr, slot, b_slot_stride, b_row_stride, n, column_valid, r, rank)
        row_offset = row.to(tl.int64) * out_row_stride
        # The row's own slot's shrink, masked past the rank: other slots' columns and the padding
        # are never read (they may hold inf or NaN). The programs of a row write only columns
        # below `out_features`, so no program overwrites what another reads.
        shrunk_ptrs = out_ptr + row_offset + out_features + slot.to(tl.int64) * max_rank + r
        shrunk = tl.load(shrunk_ptrs, mask=r < rank, other=0.0).to(tl.float32)
        _row_add_expanded(out_ptr, row_offset, n, column_valid, b_tile, shrunk)


@triton.jit
def _stacked_expand_kernel(
    out0_ptr, out1_ptr, out2_ptr, out0_row_stride, out1_row_stride, out2_row_stride,
    out0_features, out1_features, out2_features,
    b0_ptr, b1_ptr, b2_ptr, b0_slot_stride, b1_slot_stride, b2_slot_stride,
    b0_row_stride, b1_row_stride, b2_row_stride,
    rank0_ptr, rank1_ptr, rank2_ptr, max_rank, blocks0, blocks1,
    slots_ptr, cum_ptr, num_requests, num_slots, rows,
    NUM_SIBLINGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS: tl.constexpr,
    REQUESTS: tl.constexpr,
):
    # Rows on the first axis: a grid's second axis stops at 65535 and a tower call has more rows.
    row = tl.program_id(0)
    column_block = tl.program_id(1)  # over the column blocks of all siblings, sibling 0 first
    if column_block < blocks0:
        _stacked_expand_block(out0_ptr, out0_row_stride, out0_features, b0_ptr, b0_slot_stride, b0_row_stride,
                              rank0_ptr, max_rank, column_block, row, rows, slots_ptr, cum_ptr, num_requests,
                              num_slots, BLOCK_R, BLOCK_N, SLOTS, REQUESTS)
    elif NUM_SIBLINGS > 1:
        if column_block < blocks0 + blocks1:
            _stacked_expand_block(out1_ptr, out1_row_stride, out1_features, b1_ptr, b1_slot_stride, b1_row_stride,
                                  rank1_ptr, max_rank, column_block - blocks0, row, rows, slots_ptr, cum_ptr,
                                  num_requests, num_slots, BLOCK_R, BLOCK_N, SLOTS, REQUESTS)
        elif NUM_SIBLINGS > 2:
            _stacked_expand_block(out2_ptr, out2_row_stride, out2_features, b2_ptr, b2_slot_stride, b2_row_stride,
                                  rank2_ptr, max_rank, column_block - blocks0 - blocks1, row, rows, slots_ptr,
                                  cum_ptr, num_requests, num_slots, BLOCK_R, BLOCK_N, SLOTS, REQUESTS)


@triton.jit
def _stacked_tile_block(
    out_ptr, out_row_stride, out_features, b_ptr, b_slot_stride, b_row_stride, ranks_ptr, max_rank,
    column_block, slot, tile_rows,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    if rank > 0:
        r = tl.arange(0, BLOCK_R)
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_valid = tile_rows >= 0
        row_offsets = tl.where(row_valid, tile_rows, 0).to(tl.int64) * out_row_stride
        # The tile's rows' shrink of their (common) slot, masked past the rank; B once for the tile.
        shrunk = tl.load(out_ptr + row_offsets[:, None] + out_features + slot.to(tl.int64) * max_rank + r[None, :],
                         mask=row_valid[:, None] & (r[None, :] < rank), other=0.0).to(tl.float32)
        b_tile = tl.load(b_ptr + slot.to(tl.int64) * b_slot_stride + n[:, None].to(tl.int64) * b_row_stride
                         + r[None, :], mask=(n[:, None] < out_features) & (r[None, :] < rank), other=0.0)
        delta = tl.dot(shrunk, tl.trans(b_tile.to(tl.float32)), input_precision=PRECISION)
        ptrs = out_ptr + row_offsets[:, None] + n[None, :]
        inside = row_valid[:, None] & (n[None, :] < out_features)
        current = tl.load(ptrs, mask=inside, other=0.0)
        tl.store(ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=inside)


@triton.jit
def _stacked_tile_kernel(
    out0_ptr, out1_ptr, out2_ptr, out0_row_stride, out1_row_stride, out2_row_stride,
    out0_features, out1_features, out2_features,
    b0_ptr, b1_ptr, b2_ptr, b0_slot_stride, b1_slot_stride, b2_slot_stride,
    b0_row_stride, b1_row_stride, b2_row_stride,
    rank0_ptr, rank1_ptr, rank2_ptr, max_rank, blocks0, blocks1,
    slots_ptr, cum_ptr, num_requests, num_slots, plan_ptr, plan_capacity, rows,
    NUM_SIBLINGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr, REQUESTS: tl.constexpr, ONE_PASS: tl.constexpr, USE_PLAN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Rows grouped by slot (the tile path's tiles: from the plan, else the search): each
    program reads its slot's B block once for up to BLOCK_M rows."""
    tile = tl.program_id(0)
    column_block = tl.program_id(1)  # over the column blocks of all siblings, sibling 0 first
    slot, tile_rows = _tile_of(tile, slots_ptr, cum_ptr, num_requests, num_slots, plan_ptr, plan_capacity, rows,
                               BLOCK_M, SLOTS, REQUESTS, ONE_PASS, USE_PLAN)
    if slot >= 0:
        if column_block < blocks0:
            _stacked_tile_block(out0_ptr, out0_row_stride, out0_features, b0_ptr, b0_slot_stride, b0_row_stride,
                                rank0_ptr, max_rank, column_block, slot, tile_rows, BLOCK_M, BLOCK_R, BLOCK_N,
                                PRECISION)
        elif NUM_SIBLINGS > 1:
            if column_block < blocks0 + blocks1:
                _stacked_tile_block(out1_ptr, out1_row_stride, out1_features, b1_ptr, b1_slot_stride, b1_row_stride,
                                    rank1_ptr, max_rank, column_block - blocks0, slot, tile_rows, BLOCK_M, BLOCK_R,
                                    BLOCK_N, PRECISION)
            elif NUM_SIBLINGS > 2:
                _stacked_tile_block(out2_ptr, out2_row_stride, out2_features, b2_ptr, b2_slot_stride, b2_row_stride,
                                    rank2_ptr, max_rank, column_block - blocks0 - blocks1, slot, tile_rows, BLOCK_M,
                                    BLOCK_R, BLOCK_N, PRECISION)


# Up to this many rows each row's program reads its own B (no search, no tiles); beyond, tiles.
ROW_PATH_MAX_ROWS = 4


def _padded(items: list, count: int = 3) -> list:
    """`items` repeated up to `count` entries: unused kernel arguments still need a value."""
    return list(items) + [items[0]] * (count - len(items))


def lora_stacked_expand_triton(outputs: list[torch.Tensor], out_features: list[int], lora_b: list[torch.Tensor],
                               slot_ranks: list[torch.Tensor], request_slots: torch.Tensor,
                               request_cum_weights: torch.Tensor, tile_plan: torch.Tensor | None = None,
                               row_path_max_rows: int = ROW_PATH_MAX_ROWS) -> None:
    """`lora_stacked_expand_reference` in one launch (CUDA tensors, or CPU ones under TRITON_INTERPRET=1):
    one program per row up to `row_path_max_rows` rows, else per tile of rows of one slot (from
    `tile_plan` where it covers the call, as the tile path's shrink reads it, else the search).

    Nothing is read from the device on the host, so the call can be captured in a CUDA graph
    (once its tables are in the kernel's dtypes: int32 ranks and slots, int64 running weights;
    others are converted here, which allocates).
    """
    _check(outputs, out_features, lora_b, slot_ranks, request_slots, request_cum_weights)
    rows = outputs[0].shape[0]
    num_slots, _, max_rank = lora_b[0].shape
    num_requests = request_slots.numel()
    if rows == 0 or num_slots == 0 or max_rank == 0 or num_requests == 0:
        return
    n = len(outputs)
    # The row path's table dtypes: the running weights in int64, so that `cum * rows` cannot overflow.
    ranks = [table.to(torch.int32) for table in slot_ranks]
    request_slots = request_slots.to(torch.int32)
    request_cum_weights = request_cum_weights.to(torch.int64)
    block_r = max(16, _next_power_of_2(max_rank))
    block_n = max(16, min(128, 2048 // block_r))  # B's block near 2048 elements, as on the row path
    blocks = [cdiv(features, block_n) for features in out_features]
    if sum(blocks) == 0:
        return
    b = _padded(lora_b)
    sibling_args = (*_padded(outputs), *(output.stride(0) for output in _padded(outputs)), *_padded(list(out_features)),
                    *b, *(sibling.stride(0) for sibling in b), *(sibling.stride(1) for sibling in b),
                    *_padded(ranks), max_rank, blocks[0], _padded(blocks)[1])
    slots_block = max(16, _next_power_of_2(num_slots))
    if rows <= row_path_max_rows:
        _stacked_expand_kernel[(rows, sum(blocks))](
            *sibling_args, request_slots, request_cum_weights, num_requests, num_slots, rows,
            NUM_SIBLINGS=n, BLOCK_R=block_r, BLOCK_N=block_n, SLOTS=slots_block,
            REQUESTS=max(16, _next_power_of_2(num_requests + 1)),  # the tables in one load, total included
        )
        return
    capacity = plan_capacity(tile_plan) if tile_plan is not None else 0
    use_plan = reads_plan(PLAN_BLOCK_M, rows, capacity)
    requests_block, one_pass = search_block(num_requests)
    precision = "ieee" if outputs[0].dtype == torch.float32 else "tf32"
    _stacked_tile_kernel[(tile_bound(rows, num_slots, PLAN_BLOCK_M), sum(blocks))](
        *sibling_args, request_slots, request_cum_weights, num_requests, num_slots,
        tile_plan if use_plan else request_slots, capacity, rows,
        NUM_SIBLINGS=n, BLOCK_M=PLAN_BLOCK_M, BLOCK_R=block_r, BLOCK_N=block_n, SLOTS=slots_block,
        REQUESTS=requests_block, ONE_PASS=one_pass, USE_PLAN=use_plan, PRECISION=precision,
    )


def lora_stacked_expand_(outputs: list[torch.Tensor], out_features: list[int], lora_b: list[torch.Tensor],
                         slot_ranks: list[torch.Tensor], request_slots: torch.Tensor,
                         request_cum_weights: torch.Tensor, tile_plan: torch.Tensor | None = None) -> None:
    """Add each row's own slot's expand to the stacked outputs in place: Triton on CUDA, the reference elsewhere."""
    if outputs and outputs[0].is_cuda:
        lora_stacked_expand_triton(outputs, out_features, lora_b, slot_ranks, request_slots, request_cum_weights,
                                   tile_plan)
    else:
        lora_stacked_expand_reference(outputs, out_features, lora_b, slot_ranks, request_slots, request_cum_weights)
