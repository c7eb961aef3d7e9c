"""Each row's own slot's columns of a folded linear's shrink, the others zeroed, in one kernel.

A folded linear (mmlora_fx/folding.py) computes every resident slot's shrink for every row in
one GEMM, `shrunk [rows, width]`, slot `k` in columns `k * rank .. (k + 1) * rank` (columns past
`slots * rank`, alignment padding, belong to no slot). Each row must keep only its own slot's
columns: the base GEMM then adds exactly its adapter's delta. Rows belong to requests as in
`reference.py` (`request_cum_weights`, `request_slots`; slot -1: the base model, every column
zeroed).

* `fold_mask_reference`: plain torch (`row_slots`, a compare, `where`), the oracle and the CPU path;
* `fold_mask_triton`: one launch, each program finding its rows' owners from the request tables
  (a count of the running bounds at or below each row, as `searchsorted(right=True)` does) and
  rewriting its rows in place. The reference takes ~8 small kernels; a prefill forward folds
  hundreds of calls.
* `fold_mask_`: the Triton kernel on CUDA tensors, the reference elsewhere.

Zeroing is a select, never a product: a column of another slot that overflowed to inf must
give 0, not NaN (inf * 0), or it would reach every row through the GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import row_slots

__all__ = ["fold_mask_", "fold_mask_reference", "fold_mask_triton"]


def fold_mask_reference(shrunk: torch.Tensor, request_slots: torch.Tensor, request_cum_weights: torch.Tensor,
                        rank: int) -> None:
    """Zero, in place, every column of `shrunk [rows, width]` outside its row's slot's `rank` columns."""
    slots = row_slots(request_slots, request_cum_weights, shrunk.shape[0])
    columns = torch.arange(shrunk.shape[1], device=shrunk.device) // rank
    shrunk.copy_(torch.where(columns[None, :] == slots[:, None], shrunk, torch.zeros((), dtype=shrunk.dtype,
                                                                                     device=shrunk.device)))


@triton.jit
def _fold_mask_kernel(shrunk_ptr, stride_row, rows, width, slots_ptr, cum_ptr, entries, rank,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < rows
    total = tl.load(cum_ptr + entries).to(tl.int64)
    targets = offs_m.to(tl.int64) * total
    # Row i's owner: how many requests' end bounds (cum[r + 1] * rows) are at or below i * total.
    owners = tl.zeros([BLOCK_M], dtype=tl.int32)
    for start in range(0, entries, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        bounds = tl.load(cum_ptr + 1 + offs_r, mask=offs_r < entries, other=0).to(tl.int64) * rows
        hit = (bounds[None, :] <= targets[:, None]) & (offs_r[None, :] < entries)
        owners += tl.sum(hit.to(tl.int32), axis=1)
    owners = tl.minimum(owners, entries - 1)
    slot = tl.load(slots_ptr + owners, mask=row_ok, other=-1).to(tl.int32)
    slot = tl.where(total > 0, slot, -1)
    for start in range(0, width, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        ptrs = shrunk_ptr + offs_m[:, None].to(tl.int64) * stride_row + offs_n[None, :]
        inside = row_ok[:, None] & (offs_n[None, :] < width)
        values = tl.load(ptrs, mask=inside, other=0.0)
        keep = (offs_n[None, :] // rank) == slot[:, None]
        tl.store(ptrs, tl.where(keep, values, tl.zeros_like(values)), mask=inside)


def fold_mask_triton(shrunk: torch.Tensor, request_slots: torch.Tensor, request_cum_weights: torch.Tensor,
                     rank: int) -> None:
    """`fold_mask_reference` in one launch (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)."""
    rows, width = shrunk.shape
    if shrunk.stride(1) != 1:
        raise ValueError(f"fold_mask: the shrink's columns must be contiguous, got strides {shrunk.stride()}")
    entries = request_slots.numel()
    if request_cum_weights.numel() != entries + 1:
        raise ValueError(f"fold_mask: {entries} request slots need {entries + 1} running weights, "
                         f"got {request_cum_weights.numel()}")
    block_m = 32
    grid = (triton.cdiv(rows, block_m),)
    _fold_mask_kernel[grid](shrunk, shrunk.stride(0), rows, width, request_slots, request_cum_weights, entries, rank,
                            BLOCK_M=block_m, BLOCK_N=min(128, triton.next_power_of_2(width)), BLOCK_R=64)


def fold_mask_(shrunk: torch.Tensor, request_slots: torch.Tensor, request_cum_weights: torch.Tensor, rank: int) -> None:
    """Keep each row's own slot's columns of a folded shrink, zero the rest, in place."""
    if shrunk.is_cuda:
        fold_mask_triton(shrunk, request_slots, request_cum_weights, rank)
    else:
        fold_mask_reference(shrunk, request_slots, request_cum_weights, rank)
