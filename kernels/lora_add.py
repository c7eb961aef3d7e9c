"""The `mmlora::lora_add_` custom op: mixed-adapter LoRA work added to linear outputs in place.

Semantics are those of `reference.lora_add_reference` (rows owned by requests in proportion to
their weights, one adapter slot per request, a group of linears sharing one input). On CUDA
tensors the op runs the Triton kernels of this module; elsewhere it runs the reference.

The CUDA path is two launches, a shrink and an expand, on one of two paths chosen from the
row count alone (`choose_config`).

Row path (up to 4 rows: decode at small batch), one program per row:

* shrink (`_row_shrink_kernel`, grid `rows x k_splits`): the program finds its row's slot with
  one load of each request table and one comparison per request (no tile search), multiplies a
  `k_chunk` slice of the row by every sibling's A and stores float32 partial sums per split.
* expand (`_row_expand_kernel`, grid `column blocks of all siblings x rows`): adds the splits'
  partial sums (one load), multiplies by a block of B and adds to the output row in place.
  Nothing is zeroed beforehand, so there is no memset. At up to 4 rows on Hopper both kernels
  launch as programmatic dependents: the expand loads its tables and B while the shrink runs.
  An adapter shared by several rows is read once per row (from L2), which is why this path
  stops at a few rows.

Tile path (more rows), with a memset of the float32 sums when the shrink splits the input
features:

* shrink (`_shrink_kernel`, grid `tiles x k_splits`): each program first works out, from
  `request_slots` and `request_cum_weights` alone, which tile it owns: a slot and up to
  `block_m` rows of that slot (the rows of every slot, in row order, cut into tiles of
  `block_m`). Grouping rows by slot is what lets one adapter's A and B be read once for all
  its rows, however the requests interleave. It then multiplies those rows of `x` by a
  `k_chunk`-wide slice of every sibling's A (x is read once for all siblings) and adds the
  float32 sums into a zeroed buffer with atomics (a single split stores them instead); the
  split-0 program also records the tile (slot, ranks, rows) for the expand.
* expand (`_expand_kernel`, grid `column blocks of all siblings x tiles`): each program loads
  its tile's sums, multiplies by a block of the sibling's B and adds the result to the output
  rows, in place.

A tile plan (`tile_plan.py`), written on the host with the request tables once per forward,
spares the shrink programs the search when the row count is the total weight (decode): each
program then reads its tile in one load.

Everything the grids depend on is static (rows, slot count, feature sizes): tiles that turn out
empty at run time exit at once. Nothing reads device memory from the host, so the op can be
captured in a CUDA graph and replayed with new `request_slots`, cum weights and adapter weights.
Loads beyond a slot's actual rank are masked off, so padding is neither read nor trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from .reference import lora_add_reference
from .tile_plan import PLAN_BLOCK_M, plan_capacity, planned_tile

__all__ = ["LaunchConfig", "choose_config", "lora_add", "lora_add_", "lora_add_triton", "tile_bound"]

# Programs the shrink aims for: about two per multiprocessor of an H100 (132), enough to keep
# memory busy when few tiles exist (decode) without paying for many float32 atomics.
_TARGET_SHRINK_PROGRAMS = 264
# Requests the in-kernel tile search examines at a time: up to this many, one pass over the
# request tables; more, in blocks of this many (bounds registers for large batches).
_REQUEST_BLOCK = 256
# Row counts up to which one program per row beats tiles grouped by slot (measured on an H100,
# docs/KERNELS.md: at 8 rows the tile path with a tile plan is 2-8 us a layer faster, at 4 they
# are even), and the most request entries the row path reads in one load.
_PER_ROW_MAX_ROWS = 4
# Row counts up to which the row path's kernels launch as programmatic dependents: beyond, the
# expand's programs, started early, hold multiprocessors the shrink needs (measured slower at 8).
_DEPENDENT_LAUNCH_MAX_ROWS = 4
_PER_ROW_MAX_REQUESTS = 1024


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Static launch parameters of one op call (all derived from shapes, never from data)."""

    block_m: int  # rows per tile (all of one slot)
    block_k: int  # input features per shrink step
    k_chunk: int  # input features per shrink program (a multiple of block_k)
    block_n: int  # output features per expand program
    shrink_warps: int = 4
    expand_warps: int = 4
    shrink_stages: int = 3
    # One program per row (and split, or column block) instead of tiles of one slot's rows:
    # no tile search and no zeroed sums, at the price of re-reading an adapter for each of
    # its rows (from L2). Worth it while rows are few; `choose_config` decides.
    per_row: bool = False
    # Row path on Hopper and newer: launch both kernels as programmatic dependents, so that
    # each starts its table and adapter loads while the kernel before it finishes.
    dependent_launch: bool = True


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def tile_bound(rows: int, num_slots: int, block_m: int) -> int:
    """The most tiles any batch of `rows` rows over `num_slots` slots can need.

    With `m` slots holding rows, each takes one tile for its first row and one more per
    `block_m` further rows: at most m + (rows - m) // block_m tiles, which grows with m.
    """
    used = min(num_slots, rows)
    return used + (rows - used) // block_m


@functools.lru_cache(maxsize=4096)
def choose_config(
    rows: int,
    in_features: int,
    max_rank: int,
    num_slots: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    target_programs: int = _TARGET_SHRINK_PROGRAMS,
    max_splits: int = 64,
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    shrink_stages: int | None = None,
    expand_warps: int | None = None,
    per_row_max_rows: int | None = None,
    dependent_launch: bool = True,
) -> LaunchConfig:
    """Launch parameters for one op call, from its static shapes alone.

    Few rows (decode): tiles of 16 rows and the input features split over many programs, since
    the adapters' A must be streamed by many multiprocessors at once. Many rows (prefill,
    tower): tiles of 32 rows and few splits, since the rows already give enough programs. The
    split count is sized from the tile bound, so that the grid (every program of which runs
    the tile search) stays near `target_programs`. Large ranks and float32 (whose products run
    as plain FMAs) get smaller blocks to stay within registers. Keyword arguments override
    the heuristic (the benchmark sweeps them).

    Up to `per_row_max_rows` rows the row path runs instead (`LaunchConfig.per_row`): splits
    sized so that rows x splits is near `target_programs`, steps and column blocks sized so
    that a program's tile of A or B stays near 2048 elements.
    """
    block_r = max(16, _next_power_of_2(max_rank))
    wide = dtype == torch.float32
    if rows <= (_PER_ROW_MAX_ROWS if per_row_max_rows is None else per_row_max_rows):
        block_k = block_k or max(16, min(128, 2048 // block_r))
        splits = max(1, min(triton.cdiv(target_programs, max(rows, 1)), max_splits, triton.cdiv(in_features, block_k)))
        k_chunk = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
        return LaunchConfig(block_m=1, block_k=block_k, k_chunk=k_chunk,
                            block_n=block_n or max(16, min(128, 2048 // block_r)), per_row=True,
                            dependent_launch=dependent_launch and rows <= _DEPENDENT_LAUNCH_MAX_ROWS)
    if block_m is None:
        block_m = 16 if rows <= 256 or block_r >= 128 or (wide and block_r >= 64) else 32
    if block_k is None:
        # Decode: wide steps, so that a program's slice of A arrives in few round trips.
        block_k = 32 if block_r > 32 or wide else 128 if block_m <= 16 else 64
    if shrink_stages is None:
        shrink_stages = 4 if block_k >= 128 else 3
    if block_n is None:
        if wide:
            block_n = 64 if block_r <= 32 else 32
        elif block_r <= 32:
            block_n = 128  # measured: 256 was 1-3% slower at decode sizes, equal at 4096 rows
        else:
            block_n = 128 if block_r <= 64 else 64
    tiles = max(1, tile_bound(rows, num_slots, block_m))
    splits = max(1, min(triton.cdiv(target_programs, tiles), max_splits, triton.cdiv(in_features, block_k)))
    k_chunk = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    shrink_warps = 8 if block_m >= 64 or block_r >= 64 else 4
    if expand_warps is None:
        # float32 products are FMAs spread over the warps: eight warps spill them at rank 64+.
        expand_warps = 8 if (block_m * block_n >= 8192 or block_r >= 64) and not wide else 4
    return LaunchConfig(block_m=block_m, block_k=block_k, k_chunk=k_chunk, block_n=block_n,
                        shrink_warps=shrink_warps, expand_warps=expand_warps, shrink_stages=shrink_stages)


# ----------------------------------------------------------------------------------------------
# In-kernel tile search: which slot and which rows a tile holds, from the request tables alone.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _ceil_scaled(weight, rows, total):
    """ceil(weight * rows / total) for non-negative int64 `weight` and `total` > 0.

    A float64 quotient estimate, off by at most one, corrected with exact integer products:
    an int64 division is a long software routine on the GPU, and this search sits on the
    critical path of every program. Exact while weight * rows < 2**53.
    """
    numerator = weight * rows
    estimate = (numerator.to(tl.float64) / total.to(tl.float64)).to(tl.int64)
    quotient = tl.maximum(estimate - 1, 0)
    for _ in tl.static_range(3):  # the estimate is within one of the floor: at most 3 steps up
        quotient += (quotient * total < numerator).to(tl.int64)
    return quotient


@triton.jit
def _request_spans(first, slots_ptr, cum_ptr, num_requests, num_slots, rows, total, REQUESTS: tl.constexpr):
    """Slot, first row and row count of requests `first .. first + REQUESTS` (count 0: no LoRA)."""
    request = first + tl.arange(0, REQUESTS)
    present = request < num_requests
    slot = tl.load(slots_ptr + request, mask=present, other=-1)
    begin = tl.load(cum_ptr + request, mask=present, other=0)
    end = tl.load(cum_ptr + request + 1, mask=present, other=0)
    # Row i is the request's when begin * rows <= i * total < end * rows: the rows from
    # ceil(begin * rows / total) up to ceil(end * rows / total).
    divisor = tl.maximum(total, 1)
    lo = _ceil_scaled(begin, rows, divisor)
    hi = _ceil_scaled(end, rows, divisor)
    adapted = present & (slot >= 0) & (slot < num_slots) & (total > 0)
    count = tl.where(adapted, hi - lo, 0).to(tl.int32)
    return slot, lo.to(tl.int32), count


@triton.jit
def _rows_per_slot(slot, count, SLOTS: tl.constexpr):
    """Rows owned by each slot id 0 .. SLOTS - 1, over requests with slots `slot` and `count` rows."""
    slot_ids = tl.arange(0, SLOTS)
    return tl.sum(tl.where(slot_ids[:, None] == slot[None, :], count[None, :], 0), axis=1)


@triton.jit
def _owner_of(tile, rows_per_slot, BLOCK_M: tl.constexpr, SLOTS: tl.constexpr):
    """The slot of `tile` (-1 if there is none) and its index among that slot's tiles.

    Tiles are laid out slot by slot, each slot over `cdiv(rows, BLOCK_M)` of them: the owner
    is the first slot whose tiles end past `tile`.
    """
    slot_ids = tl.arange(0, SLOTS)
    tiles_per_slot = (rows_per_slot + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles_per_slot, axis=0)
    owner = tl.sum((tiles_end <= tile).to(tl.int32), axis=0)
    owner_start = tl.sum(tl.where(slot_ids == owner, tiles_end - tiles_per_slot, 0), axis=0)
    found = tile < tl.sum(tiles_per_slot, axis=0)
    return tl.where(found, owner, -1), tile - owner_start


@triton.jit
def _rows_at(position, slot, request_slot, lo, count, seen, tile_rows):
    """Fill `tile_rows` at the `position`s (counted over `slot`'s rows in row order) that fall in
    these requests; `seen` is the number of `slot`'s rows in the requests before them."""
    mine = tl.where(request_slot == slot, count, 0)
    start = seen + tl.cumsum(mine, axis=0) - mine
    inside = (start[None, :] <= position[:, None]) & (position[:, None] < (start + mine)[None, :])
    found = tl.sum(inside.to(tl.int32), axis=1) > 0
    row = tl.sum(tl.where(inside, lo[None, :] + position[:, None] - start[None, :], 0), axis=1)
    return tl.where(found, row, tile_rows), seen + tl.sum(mine, axis=0)


@triton.jit
def _find_tile(
    tile, slots_ptr, cum_ptr, num_requests, num_slots, rows,
    BLOCK_M: tl.constexpr, SLOTS: tl.constexpr, REQUESTS: tl.constexpr, ONE_PASS: tl.constexpr,
):
    """The slot of `tile` (-1: empty tile) and its rows (-1 past the slot's last row).

    With ONE_PASS (every request fits one block) the request tables are loaded once: at decode
    sizes this search is on the critical path of every program, and each pass over memory is a
    round trip.
    """
    total = tl.load(cum_ptr + num_requests)
    offsets = tl.arange(0, BLOCK_M)
    empty = tl.full([BLOCK_M], -1, dtype=tl.int32)
    if ONE_PASS:
        request_slot, lo, count = _request_spans(0, slots_ptr, cum_ptr, num_requests, num_slots, rows, total, REQUESTS)
        slot, slot_tile = _owner_of(tile, _rows_per_slot(request_slot, count, SLOTS), BLOCK_M, SLOTS)
        tile_rows, _ = _rows_at(slot_tile * BLOCK_M + offsets, slot, request_slot, lo, count, 0, empty)
    else:
        rows_per_slot = tl.zeros([SLOTS], dtype=tl.int32)
        for first in range(0, num_requests, REQUESTS):
            request_slot, _, count = _request_spans(first, slots_ptr, cum_ptr, num_requests, num_slots, rows, total,
                                                    REQUESTS)
            rows_per_slot += _rows_per_slot(request_slot, count, SLOTS)
        slot, slot_tile = _owner_of(tile, rows_per_slot, BLOCK_M, SLOTS)
        tile_rows = empty
        seen = 0
        for first in range(0, num_requests, REQUESTS):
            request_slot, lo, count = _request_spans(first, slots_ptr, cum_ptr, num_requests, num_slots, rows, total,
                                                     REQUESTS)
            tile_rows, seen = _rows_at(slot_tile * BLOCK_M + offsets, slot, request_slot, lo, count, seen, tile_rows)
    return slot, tile_rows


# ----------------------------------------------------------------------------------------------
# Shrink: shrunk[j, tile row, r] (+)= x[row, k-chunk] @ A_j[slot, r, k-chunk]^T
# ----------------------------------------------------------------------------------------------


@triton.jit
def _shrink_step(acc, x_tile, a_ptr, slot_offset, rank_ids, rank, k, k_end, a_rank_stride,
                 PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += x_tile @ A[slot, :rank, k]^T (rows of A past the slot's rank are not loaded)."""
    a_ptrs = a_ptr + slot_offset + rank_ids[:, None].to(tl.int64) * a_rank_stride + k[None, :]
    a_tile = tl.load(a_ptrs, mask=(rank_ids[:, None] < rank) & (k[None, :] < k_end), other=0.0)
    if UPCAST:
        return acc + tl.dot(x_tile.to(tl.float32), tl.trans(a_tile.to(tl.float32)), input_precision=PRECISION)
    return acc + tl.dot(x_tile, tl.trans(a_tile), input_precision=PRECISION)


@triton.jit
def _store_shrunk(shrunk_ptr, acc, sibling, tile, num_tiles, row_valid, rank,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, ATOMIC: tl.constexpr):
    """Write (one split: store) or add (several splits: relaxed float32 atomics) a tile's sums."""
    base = (sibling * num_tiles + tile).to(tl.int64) * (BLOCK_M * BLOCK_R)
    r = tl.arange(0, BLOCK_R)
    ptrs = shrunk_ptr + base + tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + r[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=row_valid[:, None] & (r[None, :] < rank), sem="relaxed")
    else:
        tl.store(ptrs, acc)


@triton.jit
def _shrink_kernel(
    x_ptr, x_row_stride,
    a0_ptr, a1_ptr, a2_ptr, a_slot_stride, a_rank_stride,
    rank0_ptr, rank1_ptr, rank2_ptr, max_rank,
    slots_ptr, cum_ptr, num_requests, num_slots, plan_ptr, plan_capacity,
    tile_meta_ptr, tile_rows_ptr, shrunk_ptr,
    rows, in_features, k_chunk, num_tiles,
    NUM_SIBLINGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SLOTS: tl.constexpr, REQUESTS: tl.constexpr, ONE_PASS: tl.constexpr, ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, USE_PLAN: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    if USE_PLAN:
        total = tl.load(cum_ptr + num_requests)
        covered, slot, tile_rows = planned_tile(tile, plan_ptr, plan_capacity, rows, total, num_slots, BLOCK_M)
        if not covered:
            slot, tile_rows = _find_tile(tile, slots_ptr, cum_ptr, num_requests, num_slots, rows,
                                         BLOCK_M, SLOTS, REQUESTS, ONE_PASS)
    else:
        slot, tile_rows = _find_tile(tile, slots_ptr, cum_ptr, num_requests, num_slots, rows,
                                     BLOCK_M, SLOTS, REQUESTS, ONE_PASS)
    if slot < 0:
        if split == 0:
            tl.store(tile_meta_ptr + tile * 4, -1)
        return

    rank0 = tl.minimum(tl.load(rank0_ptr + slot), max_rank)
    rank1 = rank0 * 0
    rank2 = rank0 * 0
    if NUM_SIBLINGS > 1:
        rank1 = tl.minimum(tl.load(rank1_ptr + slot), max_rank)
    if NUM_SIBLINGS > 2:
        rank2 = tl.minimum(tl.load(rank2_ptr + slot), max_rank)
    if split == 0:
        # The tile table: the expand reads slot, ranks and rows here instead of searching again.
        meta = tl.arange(0, 4)
        meta_values = tl.where(meta == 0, slot, tl.where(meta == 1, rank0, tl.where(meta == 2, rank1, rank2)))
        tl.store(tile_meta_ptr + tile * 4 + meta, meta_values)
        tl.store(tile_rows_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M), tile_rows)

    if tl.maximum(rank0, tl.maximum(rank1, rank2)) > 0:  # a slot adapting no sibling costs no loads
        row_valid = tile_rows >= 0
        x_rows = x_ptr + tl.where(row_valid, tile_rows, 0).to(tl.int64)[:, None] * x_row_stride
        rank_ids = tl.arange(0, BLOCK_R)
        slot_offset = slot.to(tl.int64) * a_slot_stride
        acc0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        k_begin = split * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, in_features)
        for k_start in range(k_begin, k_end, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            # One load of x serves every sibling.
            x_tile = tl.load(x_rows + k[None, :], mask=row_valid[:, None] & (k[None, :] < k_end), other=0.0)
            acc0 = _shrink_step(acc0, x_tile, a0_ptr, slot_offset, rank_ids, rank0, k, k_end, a_rank_stride,
                                PRECISION, UPCAST)
            if NUM_SIBLINGS > 1:
                acc1 = _shrink_step(acc1, x_tile, a1_ptr, slot_offset, rank_ids, rank1, k, k_end,
                                    a_rank_stride, PRECISION, UPCAST)
            if NUM_SIBLINGS > 2:
                acc2 = _shrink_step(acc2, x_tile, a2_ptr, slot_offset, rank_ids, rank2, k, k_end,
                                    a_rank_stride, PRECISION, UPCAST)
        _store_shrunk(shrunk_ptr, acc0, 0, tile, num_tiles, row_valid, rank0, BLOCK_M, BLOCK_R, ATOMIC)
        if NUM_SIBLINGS > 1:
            _store_shrunk(shrunk_ptr, acc1, 1, tile, num_tiles, row_valid, rank1, BLOCK_M, BLOCK_R, ATOMIC)
        if NUM_SIBLINGS > 2:
            _store_shrunk(shrunk_ptr, acc2, 2, tile, num_tiles, row_valid, rank2, BLOCK_M, BLOCK_R, ATOMIC)


# ----------------------------------------------------------------------------------------------
# Expand: out_j[row, n-block] += shrunk[j, tile rows] @ B_j[slot, n-block, :rank]^T
# ----------------------------------------------------------------------------------------------


@triton.jit
def _expand_block(
    out_ptr, out_features, b_ptr, b_slot_stride, b_row_stride, max_rank,
    column_block, tile, num_tiles, tile_meta_ptr, tile_rows_ptr, shrunk_ptr,
    SIBLING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m = tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    # Everything that depends on the tile alone is loaded at once, before any branch: at decode
    # sizes each dependent round trip to memory is a visible share of the kernel.
    meta_ids = tl.arange(0, 4)
    meta = tl.load(tile_meta_ptr + tile * 4 + meta_ids)
    tile_rows = tl.load(tile_rows_ptr + tile * BLOCK_M + m)
    shrunk_base = (SIBLING * num_tiles + tile).to(tl.int64) * (BLOCK_M * BLOCK_R)
    shrunk = tl.load(shrunk_ptr + shrunk_base + m[:, None] * BLOCK_R + r[None, :])
    slot = tl.sum(tl.where(meta_ids == 0, meta, 0), axis=0)
    rank = tl.minimum(tl.sum(tl.where(meta_ids == 1 + SIBLING, meta, 0), axis=0), max_rank)
    if (slot >= 0) & (rank > 0):
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        column_valid = n < out_features
        b_ptrs = b_ptr + slot.to(tl.int64) * b_slot_stride + n[:, None].to(tl.int64) * b_row_stride + r[None, :]
        b_tile = tl.load(b_ptrs, mask=column_valid[:, None] & (r[None, :] < rank), other=0.0)
        row_valid = tile_rows >= 0
        out_ptrs = out_ptr + tl.where(row_valid, tile_rows, 0).to(tl.int64)[:, None] * out_features + n[None, :]
        out_mask = row_valid[:, None] & column_valid[None, :]
        current = tl.load(out_ptrs, mask=out_mask, other=0.0)
        # Sums past the rank are zero or unwritten: drop them. float32 operands: under tf32 the
        # bf16/fp16 B is exact and the sums lose only tf32 rounding; ieee for float32 outputs.
        shrunk = tl.where((r < rank)[None, :], shrunk, 0.0)
        delta = tl.dot(shrunk, tl.trans(b_tile.to(tl.float32)), input_precision=PRECISION)
        tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=out_mask)


@triton.jit
def _expand_kernel(
    out0_ptr, out1_ptr, out2_ptr, out0_features, out1_features, out2_features,
    b0_ptr, b1_ptr, b2_ptr, b0_slot_stride, b1_slot_stride, b2_slot_stride, b_row_stride, max_rank,
    blocks0, blocks1,
    tile_meta_ptr, tile_rows_ptr, shrunk_ptr, num_tiles,
    NUM_SIBLINGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    column_block = tl.program_id(0)  # over the column blocks of all siblings, sibling 0 first
    tile = tl.program_id(1)
    if column_block < blocks0:
        _expand_block(out0_ptr, out0_features, b0_ptr, b0_slot_stride, b_row_stride, max_rank,
                      column_block, tile, num_tiles, tile_meta_ptr, tile_rows_ptr, shrunk_ptr,
                      0, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION)
    elif NUM_SIBLINGS == 2:
        _expand_block(out1_ptr, out1_features, b1_ptr, b1_slot_stride, b_row_stride, max_rank,
                      column_block - blocks0, tile, num_tiles, tile_meta_ptr, tile_rows_ptr, shrunk_ptr,
                      1, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION)
    elif NUM_SIBLINGS == 3:
        if column_block < blocks0 + blocks1:
            _expand_block(out1_ptr, out1_features, b1_ptr, b1_slot_stride, b_row_stride, max_rank,
                          column_block - blocks0, tile, num_tiles, tile_meta_ptr, tile_rows_ptr, shrunk_ptr,
                          1, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION)
        else:
            _expand_block(out2_ptr, out2_features, b2_ptr, b2_slot_stride, b_row_stride, max_rank,
                          column_block - blocks0 - blocks1, tile, num_tiles, tile_meta_ptr, tile_rows_ptr,
                          shrunk_ptr, 2, BLOCK_M, BLOCK_R, BLOCK_N, PRECISION)


# ----------------------------------------------------------------------------------------------
# Row path (few rows): every program serves one row, so no tile search and no zeroed sums.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _slot_of_row(row, rows, slots_ptr, cum_ptr, num_requests, num_slots, REQUESTS: tl.constexpr):
    """The adapter slot of `row` (-1: base model), from one load of each request table.

    Request r owns row i when cum[r] * rows <= i * total < cum[r + 1] * rows, so the owner of
    `row` is the number of requests whose end is at or before it: one comparison per request,
    no division, and requests owning no rows fall out on their own.
    """
    ids = tl.arange(0, REQUESTS)
    cum = tl.load(cum_ptr + ids, mask=ids <= num_requests, other=0)
    request_slot = tl.load(slots_ptr + ids, mask=ids < num_requests, other=-1)
    total = tl.sum(tl.where(ids == num_requests, cum, 0), axis=0)
    ended = (ids >= 1) & (ids <= num_requests) & (cum * rows <= row.to(tl.int64) * total)
    owner = tl.sum(ended.to(tl.int32), axis=0)
    slot = tl.sum(tl.where(ids == owner, request_slot, 0), axis=0)
    return tl.where((total > 0) & (slot >= 0) & (slot < num_slots), slot, -1)


@triton.jit
def _slot_ranks(ranks_ptr, num_slots, max_rank, SLOTS: tl.constexpr):
    """Every slot's rank for one sibling, loaded before the slot is known (no dependent round trip)."""
    ids = tl.arange(0, SLOTS)
    return tl.minimum(tl.load(ranks_ptr + ids, mask=ids < num_slots, other=0), max_rank)


@triton.jit
def _pick(values, slot, SLOTS: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, SLOTS) == slot, values, 0), axis=0)


@triton.jit
def _row_shrink_step(acc, x_chunk, a_ptr, slot_offset, rank_ids, rank, k, k_end, a_rank_stride):
    """acc[r] += A[slot, r, k] . x[k] for r below the slot's rank (a dot per rank, float32)."""
    a_ptrs = a_ptr + slot_offset + rank_ids[:, None].to(tl.int64) * a_rank_stride + k[None, :]
    a_tile = tl.load(a_ptrs, mask=(rank_ids[:, None] < rank) & (k[None, :] < k_end), other=0.0)
    return acc + tl.sum(a_tile.to(tl.float32) * x_chunk[None, :], axis=1)


@triton.jit
def _row_shrink_kernel(
    x_ptr, x_row_stride,
    a0_ptr, a1_ptr, a2_ptr, a_slot_stride, a_rank_stride,
    rank0_ptr, rank1_ptr, rank2_ptr, max_rank,
    slots_ptr, cum_ptr, num_requests, num_slots,
    partial_ptr, rows, in_features, k_chunk,
    NUM_SIBLINGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SLOTS: tl.constexpr,
    REQUESTS: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    if DEPENDENT_LAUNCH:
        # Let the expand start its own table and B loads now; it waits for these sums itself.
        tl.extra.cuda.gdc_launch_dependents()
    ranks0 = _slot_ranks(rank0_ptr, num_slots, max_rank, SLOTS)
    ranks1 = ranks0
    ranks2 = ranks0
    if NUM_SIBLINGS > 1:
        ranks1 = _slot_ranks(rank1_ptr, num_slots, max_rank, SLOTS)
    if NUM_SIBLINGS > 2:
        ranks2 = _slot_ranks(rank2_ptr, num_slots, max_rank, SLOTS)
    slot = _slot_of_row(row, rows, slots_ptr, cum_ptr, num_requests, num_slots, REQUESTS)
    if slot >= 0:
        rank0 = _pick(ranks0, slot, SLOTS)
        rank1 = _pick(ranks1, slot, SLOTS)
        rank2 = _pick(ranks2, slot, SLOTS)
        rank_ids = tl.arange(0, BLOCK_R)
        slot_offset = slot.to(tl.int64) * a_slot_stride
        if DEPENDENT_LAUNCH:
            # The tables and ranks were written before the previous kernel started; x may come
            # from a kernel still running: wait for it before reading x.
            tl.extra.cuda.gdc_wait()
        acc0 = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_R], dtype=tl.float32)
        k_begin = split * k_chunk
        k_end = tl.minimum(k_begin + k_chunk, in_features)
        for k_start in range(k_begin, k_end, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            x_chunk = tl.load(x_ptr + row.to(tl.int64) * x_row_stride + k, mask=k < k_end, other=0.0).to(tl.float32)
            acc0 = _row_shrink_step(acc0, x_chunk, a0_ptr, slot_offset, rank_ids, rank0, k, k_end, a_rank_stride)
            if NUM_SIBLINGS > 1:
                acc1 = _row_shrink_step(acc1, x_chunk, a1_ptr, slot_offset, rank_ids, rank1, k, k_end,
                                        a_rank_stride)
            if NUM_SIBLINGS > 2:
                acc2 = _row_shrink_step(acc2, x_chunk, a2_ptr, slot_offset, rank_ids, rank2, k, k_end,
                                        a_rank_stride)
        # Partial sums [split, sibling, row, rank] by plain stores (zero past the rank, since
        # A was masked there): the expand adds the splits up, so nothing needs zeroing first.
        base = (split * NUM_SIBLINGS * rows + row).to(tl.int64) * BLOCK_R
        tl.store(partial_ptr + base + rank_ids, acc0)
        if NUM_SIBLINGS > 1:
            tl.store(partial_ptr + base + rows * BLOCK_R + rank_ids, acc1)
        if NUM_SIBLINGS > 2:
            tl.store(partial_ptr + base + 2 * rows * BLOCK_R + rank_ids, acc2)


@triton.jit
def _row_expand_block(
    out_ptr, out_features, b_ptr, b_slot_stride, b_row_stride, ranks_ptr, num_slots, max_rank,
    column_block, row, rows, slots_ptr, cum_ptr, num_requests, partial_ptr, num_splits,
    SIBLING: tl.constexpr, NUM_SIBLINGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, SLOTS: tl.constexpr, REQUESTS: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):
    r = tl.arange(0, BLOCK_R)
    split = tl.arange(0, SPLITS)
    # What the shrink does not write (tables, ranks, B) is loaded first: with a dependent
    # launch that overlaps the shrink; every split's partial sums then come in one load (a loop
    # would be a round trip each).
    ranks = _slot_ranks(ranks_ptr, num_slots, max_rank, SLOTS)
    slot = _slot_of_row(row, rows, slots_ptr, cum_ptr, num_requests, num_slots, REQUESTS)
    rank = _pick(ranks, slot, SLOTS)
    if (slot >= 0) & (rank > 0):
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        column_valid = n < out_features
        b_ptrs = b_ptr + slot.to(tl.int64) * b_slot_stride + n[:, None].to(tl.int64) * b_row_stride + r[None, :]
        b_tile = tl.load(b_ptrs, mask=column_valid[:, None] & (r[None, :] < rank), other=0.0)
        if DEPENDENT_LAUNCH:
            tl.extra.cuda.gdc_wait()  # the shrink (and so the kernel before it) has finished
        partial_ptrs = (partial_ptr + ((split[:, None] * NUM_SIBLINGS + SIBLING) * rows + row).to(tl.int64)
                        * BLOCK_R + r[None, :])
        shrunk = tl.sum(tl.load(partial_ptrs, mask=split[:, None] < num_splits, other=0.0), axis=0)
        out_ptrs = out_ptr + row.to(tl.int64) * out_features + n
        current = tl.load(out_ptrs, mask=column_valid, other=0.0)
        delta = tl.sum(b_tile.to(tl.float32) * shrunk[None, :], axis=1)
        tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=column_valid)


@triton.jit
def _row_expand_kernel(
    out0_ptr, out1_ptr, out2_ptr, out0_features, out1_features, out2_features,
    b0_ptr, b1_ptr, b2_ptr, b0_slot_stride, b1_slot_stride, b2_slot_stride, b_row_stride,
    rank0_ptr, rank1_ptr, rank2_ptr, max_rank, blocks0, blocks1,
    slots_ptr, cum_ptr, num_requests, num_slots, partial_ptr, rows, num_splits,
    NUM_SIBLINGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    SLOTS: tl.constexpr, REQUESTS: tl.constexpr, DEPENDENT_LAUNCH: tl.constexpr,
):
    column_block = tl.program_id(0)  # over the column blocks of all siblings, sibling 0 first
    row = tl.program_id(1)
    if column_block < blocks0:
        _row_expand_block(out0_ptr, out0_features, b0_ptr, b0_slot_stride, b_row_stride, rank0_ptr, num_slots,
                          max_rank, column_block, row, rows, slots_ptr, cum_ptr, num_requests, partial_ptr,
                          num_splits, 0, NUM_SIBLINGS, BLOCK_R, BLOCK_N, SPLITS, SLOTS, REQUESTS, DEPENDENT_LAUNCH)
    elif NUM_SIBLINGS == 2:
        _row_expand_block(out1_ptr, out1_features, b1_ptr, b1_slot_stride, b_row_stride, rank1_ptr, num_slots,
                          max_rank, column_block - blocks0, row, rows, slots_ptr, cum_ptr, num_requests,
                          partial_ptr, num_splits, 1, NUM_SIBLINGS, BLOCK_R, BLOCK_N, SPLITS, SLOTS, REQUESTS,
                          DEPENDENT_LAUNCH)
    elif NUM_SIBLINGS == 3:
        if column_block < blocks0 + blocks1:
            _row_expand_block(out1_ptr, out1_features, b1_ptr, b1_slot_stride, b_row_stride, rank1_ptr, num_slots,
                              max_rank, column_block - blocks0, row, rows, slots_ptr, cum_ptr, num_requests,
                              partial_ptr, num_splits, 1, NUM_SIBLINGS, BLOCK_R, BLOCK_N, SPLITS, SLOTS, REQUESTS,
                          DEPENDENT_LAUNCH)
        else:
            _row_expand_block(out2_ptr, out2_features, b2_ptr, b2_slot_stride, b_row_stride, rank2_ptr, num_slots,
                              max_rank, column_block - blocks0 - blocks1, row, rows, slots_ptr, cum_ptr,
                              num_requests, partial_ptr, num_splits, 2, NUM_SIBLINGS, BLOCK_R, BLOCK_N, SPLITS,
                              SLOTS, REQUESTS, DEPENDENT_LAUNCH)


# ----------------------------------------------------------------------------------------------
# Launch wrapper
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _supports_dependent_launch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _padded(items: list, count: int = 3) -> list:
    """`items` repeated up to `count` entries: unused kernel arguments still need a tensor."""
    return list(items) + [items[0]] * (count - len(items))


def _check_shapes(outputs, inputs, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """Static shape checks only (no device reads)."""
    if request_cum_weights.numel() != request_slots.numel() + 1:
        raise ValueError("lora_add_: request_cum_weights must have one entry more than request_slots")
    n = len(outputs)
    if not 1 <= n <= 3 or not len(lora_a) == len(lora_b) == len(slot_ranks) == n:
        raise ValueError(f"lora_add_: expected 1 to 3 siblings with one A, B and rank table each, got {n}")
    slots, rank, in_features = lora_a[0].shape
    for j in range(n):
        if tuple(lora_a[j].shape) != (slots, rank, in_features) or lora_a[j].stride() != lora_a[0].stride():
            raise ValueError("lora_add_: every sibling's A must have the shape and strides of the first")
        if lora_a[j].stride(-1) != 1 or lora_b[j].stride(-1) != 1:
            raise ValueError("lora_add_: A and B must be contiguous in their last dimension")
        if lora_b[j].shape[0] != slots or lora_b[j].shape[2] != rank or lora_b[j].shape[1] != outputs[j].shape[-1]:
            raise ValueError(f"lora_add_: sibling {j}'s B has shape {tuple(lora_b[j].shape)}")
        if lora_b[j].stride(1) != lora_b[0].stride(1):
            raise ValueError("lora_add_: every sibling's B must have the row stride of the first")
        if not outputs[j].is_contiguous() or outputs[j].numel() // max(outputs[j].shape[-1], 1) != inputs.shape[0]:
            raise ValueError(f"lora_add_: output {j} must be contiguous with the rows of x")
        if slot_ranks[j].numel() != slots:
            raise ValueError(f"lora_add_: slot_ranks[{j}] must have one entry per slot")


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
) -> None:
    """The Triton path of `lora_add_` (two launches; see the module docstring).

    Runs on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1`. `tile_plan`, if given,
    must be `tile_plan.build_tile_plan` of these request tables (the tile path reads its tiles
    there when it covers the row count). `config` overrides the launch parameters
    `choose_config` picks from the shapes.
    """
    inputs = x.reshape(-1, x.shape[-1])
    if inputs.stride(-1) != 1:
        inputs = inputs.contiguous()
    rows, in_features = inputs.shape
    _check_shapes(outputs, inputs, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights)
    num_slots, max_rank, _ = lora_a[0].shape
    if rows == 0 or num_slots == 0 or max_rank == 0 or request_slots.numel() == 0:
        return
    n = len(outputs)
    flat_outputs = [output.view(-1, output.shape[-1]) for output in outputs]
    out_features = [output.shape[1] for output in flat_outputs]
    num_requests = request_slots.numel()
    config = config or choose_config(rows, in_features, max_rank, num_slots, x.dtype)
    if config.per_row and num_requests + 1 > _PER_ROW_MAX_REQUESTS:
        # The row path reads the request tables in one load: too many entries take the tiles.
        config = choose_config(rows, in_features, max_rank, num_slots, x.dtype, per_row_max_rows=0)
    block_r = max(16, _next_power_of_2(max_rank))
    num_splits = triton.cdiv(in_features, config.k_chunk)
    request_slots = request_slots.to(torch.int32)
    request_cum_weights = request_cum_weights.to(torch.int64)
    ranks = _padded([ranks.to(torch.int32) for ranks in slot_ranks])

    device = inputs.device
    capacity = plan_capacity(tile_plan) if tile_plan is not None else 0
    if tile_plan is not None and tile_plan.device != device:
        raise ValueError(f"lora_add_: the tile plan is on {tile_plan.device}, the rows on {device}")
    a, o, b, features = _padded(lora_a), _padded(flat_outputs), _padded(lora_b), _padded(out_features)
    blocks = [triton.cdiv(features, config.block_n) for features in out_features]
    slots_block = max(16, _next_power_of_2(num_slots))
    if config.per_row:
        partials = torch.empty(num_splits * n * rows * block_r, dtype=torch.float32, device=device)
        tables = (request_slots, request_cum_weights, num_requests, num_slots)
        dependent = (config.dependent_launch and device.type == "cuda" and not _interpreting()
                     and _supports_dependent_launch(device.index if device.index is not None else 0))
        launch = {"launch_pdl": True} if dependent else {}
        requests_block = max(16, _next_power_of_2(num_requests + 1))  # the tables in one load, total included
        _row_shrink_kernel[(rows, num_splits)](
            inputs, inputs.stride(0),
            a[0], a[1], a[2], lora_a[0].stride(0), lora_a[0].stride(1),
            ranks[0], ranks[1], ranks[2], max_rank,
            *tables, partials, rows, in_features, config.k_chunk,
            NUM_SIBLINGS=n, BLOCK_R=block_r, BLOCK_K=config.block_k, SLOTS=slots_block,
            REQUESTS=requests_block, DEPENDENT_LAUNCH=dependent,
            num_warps=config.shrink_warps, **launch,
        )
        _row_expand_kernel[(sum(blocks), rows)](
            o[0], o[1], o[2], features[0], features[1], features[2],
            b[0], b[1], b[2], b[0].stride(0), b[1].stride(0), b[2].stride(0), lora_b[0].stride(1),
            ranks[0], ranks[1], ranks[2], max_rank, blocks[0], _padded(blocks)[1],
            *tables, partials, rows, num_splits,
            NUM_SIBLINGS=n, BLOCK_R=block_r, BLOCK_N=config.block_n, SPLITS=max(2, _next_power_of_2(num_splits)),
            SLOTS=slots_block, REQUESTS=requests_block, DEPENDENT_LAUNCH=dependent,
            num_warps=config.expand_warps, **launch,
        )
        return

    block_m = config.block_m
    num_tiles = tile_bound(rows, num_slots, block_m)
    requests_block = max(16, _next_power_of_2(num_requests))
    precision = "tf32" if x.dtype in (torch.float16, torch.bfloat16) else "ieee"
    # The interpreter multiplies bf16 blocks as raw integers: give it float32 operands.
    upcast = _interpreting() and x.dtype == torch.bfloat16
    # A plan is only ever for rows == total weight, in 16-row tiles, up to its capacity.
    use_plan = block_m == PLAN_BLOCK_M and rows <= capacity
    tile_meta = torch.empty(num_tiles * 4, dtype=torch.int32, device=device)  # slot, rank of each sibling
    tile_rows = torch.empty(num_tiles * block_m, dtype=torch.int32, device=device)
    # Several splits add into zeroed sums (one memset); one split stores them.
    allocate = torch.zeros if num_splits > 1 else torch.empty
    shrunk = allocate(n * num_tiles * block_m * block_r, dtype=torch.float32, device=device)

    _shrink_kernel[(num_tiles, num_splits)](
        inputs, inputs.stride(0),
        a[0], a[1], a[2], lora_a[0].stride(0), lora_a[0].stride(1),
        ranks[0], ranks[1], ranks[2], max_rank,
        request_slots, request_cum_weights, num_requests, num_slots,
        tile_plan if use_plan else request_slots, capacity,
        tile_meta, tile_rows, shrunk,
        rows, in_features, config.k_chunk, num_tiles,
        NUM_SIBLINGS=n, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
        SLOTS=slots_block, REQUESTS=min(requests_block, _REQUEST_BLOCK),
        ONE_PASS=requests_block <= _REQUEST_BLOCK, ATOMIC=num_splits > 1,
        PRECISION=precision, UPCAST=upcast, USE_PLAN=use_plan,
        num_warps=config.shrink_warps, num_stages=config.shrink_stages,
    )
    _expand_kernel[(sum(blocks), num_tiles)](
        o[0], o[1], o[2], features[0], features[1], features[2],
        b[0], b[1], b[2], b[0].stride(0), b[1].stride(0), b[2].stride(0), lora_b[0].stride(1), max_rank,
        blocks[0], _padded(blocks)[1],
        tile_meta, tile_rows, shrunk, num_tiles,
        NUM_SIBLINGS=n, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=config.block_n,
        PRECISION=precision, num_warps=config.expand_warps,
    )


def lora_add(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights, tile_plan=None) -> None:
    """The op's body, for callers already inside a custom op: Triton on CUDA, the reference elsewhere."""
    if x.is_cuda:
        lora_add_triton(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights, tile_plan)
    else:
        lora_add_reference(outputs, x, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights)


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
