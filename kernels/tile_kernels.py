"""The tile path's Triton kernels (more than a few rows): a tile search, a shrink and an expand.

* shrink (`_shrink_kernel`, grid `tiles x k_splits`): each program first works out, from
  `request_slots` and `request_cum_weights` alone, which tile it owns: a slot and up to
  `block_m` rows of that slot (the rows of every slot, in row order, cut into tiles of
  `block_m`). Grouping rows by slot is what lets one adapter's A and B be read once for all
  its rows, however the requests interleave. It then multiplies those rows of `x` by a
  `k_chunk`-wide slice of every sibling's A (x is read once for all siblings) and adds the
  float32 sums into a zeroed buffer with atomics (a single split stores them instead); the
  split-0 program also records the tile (slot, ranks, rows) for the expand. With `LAST_SUMS`
  (`LaunchConfig.sums_in_kernel`) no buffer is zeroed: each split stores its part apart and
  counts itself in on the tile's counter (`tile_counters.py`), and the last to arrive sums the
  parts in a fixed order, stores the tile's sums and sets the counter back to 0.
* expand (`_expand_kernel`, grid `column blocks of all siblings x tiles`): each program loads
  its tile's sums, multiplies by a block of the sibling's B and adds the result to the output
  rows, in place.

A tile plan (`tile_plan.py`), written on the host with the request tables once per forward,
spares the shrink programs the search when the row count is the total weight (decode): each
program then reads its tile in one load (`planned_tile`).

Siblings (up to three linears sharing one input) come as unrolled pointer arguments with a
`NUM_SIBLINGS` constexpr, and the kernels' names are what profiler traces are matched on
(`benchmarks/e2e.py`): keep both as they are. Launched by `lora_add.py`, with the blocks
`launch_config.py` chose.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tile_plan import planned_tile


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
def _sum_parts(parts_ptr, shrunk_ptr, sibling, tile, num_tiles, num_splits, NUM_SIBLINGS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr):
    """Store the sum of a tile's split parts (`parts[split, sibling, tile]`) as its sums, in a fixed
    order: `CHUNK` splits' parts a load, the loads unrolled so that the compiler can overlap them
    (a loop of one load a split was one L2 round trip each, part of the +8-17 µs a layer measured
    at 7-30 splits); `CHUNK` bounds each load's registers at large ranks."""
    offsets = tl.arange(0, BLOCK_M * BLOCK_R)
    total = tl.zeros([BLOCK_M * BLOCK_R], dtype=tl.float32)
    for first in tl.static_range(0, SPLITS, CHUNK):
        splits = first + tl.arange(0, CHUNK)
        base = ((splits * NUM_SIBLINGS + sibling) * num_tiles + tile).to(tl.int64) * (BLOCK_M * BLOCK_R)
        # Other programs wrote these: past this multiprocessor's L1 (.cg), from L2.
        parts = tl.load(parts_ptr + base[:, None] + offsets[None, :], mask=(splits < num_splits)[:, None], other=0.0,
                        cache_modifier=".cg")
        total += tl.sum(parts, axis=0)
    tl.store(shrunk_ptr + (sibling * num_tiles + tile).to(tl.int64) * (BLOCK_M * BLOCK_R) + offsets, total)


@triton.jit
def _tile_of(
    tile, slots_ptr, cum_ptr, num_requests, num_slots, plan_ptr, plan_capacity, rows,
    BLOCK_M: tl.constexpr, SLOTS: tl.constexpr, REQUESTS: tl.constexpr, ONE_PASS: tl.constexpr,
    USE_PLAN: tl.constexpr,
):
    """`tile`'s slot (-1: empty tile) and rows: from the plan where it covers this call (rows and
    total as planned), else from the search."""
    if USE_PLAN:
        total = tl.load(cum_ptr + num_requests)
        covered, slot, tile_rows = planned_tile(tile, plan_ptr, plan_capacity, rows, total, num_slots, BLOCK_M)
        if not covered:
            slot, tile_rows = _find_tile(tile, slots_ptr, cum_ptr, num_requests, num_slots, rows,
                                         BLOCK_M, SLOTS, REQUESTS, ONE_PASS)
    else:
        slot, tile_rows = _find_tile(tile, slots_ptr, cum_ptr, num_requests, num_slots, rows,
                                     BLOCK_M, SLOTS, REQUESTS, ONE_PASS)
    return slot, tile_rows


@triton.jit
def _shrink_kernel(
    x_ptr, x_row_stride,
    a0_ptr, a1_ptr, a2_ptr, a_slot_stride, a_rank_stride,
    rank0_ptr, rank1_ptr, rank2_ptr, max_rank,
    slots_ptr, cum_ptr, num_requests, num_slots, plan_ptr, plan_capacity,
    tile_meta_ptr, tile_rows_ptr, shrunk_ptr, parts_ptr, counters_ptr,
    rows, in_features, k_chunk, num_tiles, num_splits,
    NUM_SIBLINGS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    SLOTS: tl.constexpr, REQUESTS: tl.constexpr, ONE_PASS: tl.constexpr, ATOMIC: tl.constexpr,
    LAST_SUMS: tl.constexpr, SPLITS: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, USE_PLAN: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    slot, tile_rows = _tile_of(tile, slots_ptr, cum_ptr, num_requests, num_slots, plan_ptr, plan_capacity, rows,
                               BLOCK_M, SLOTS, REQUESTS, ONE_PASS, USE_PLAN)
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
        # Where this split's sums go: the tile's sums (one split: stored; several: added with
        # atomics), or with LAST_SUMS its own part, parts[split, sibling, tile], stored whole (rows
        # and ranks past the valid ones hold zeros) for the tile's last split program to sum.
        first = 0
        sums_ptr = shrunk_ptr
        if LAST_SUMS:
            first = split * NUM_SIBLINGS
            sums_ptr = parts_ptr
        _store_shrunk(sums_ptr, acc0, first, tile, num_tiles, row_valid, rank0, BLOCK_M, BLOCK_R, ATOMIC)
        if NUM_SIBLINGS > 1:
            _store_shrunk(sums_ptr, acc1, first + 1, tile, num_tiles, row_valid, rank1, BLOCK_M, BLOCK_R, ATOMIC)
        if NUM_SIBLINGS > 2:
            _store_shrunk(sums_ptr, acc2, first + 2, tile, num_tiles, row_valid, rank2, BLOCK_M, BLOCK_R, ATOMIC)
        if LAST_SUMS:
            # Every program of the tile counts itself in (rank 0 for all siblings: none does, and
            # the expand drops the tile's sums unread by rank). Every warp's stores issued before
            # the one thread that counts the program in (a scalar atomic is one thread's); acq_rel
            # then makes them visible to the last program.
            tl.debug_barrier()
            arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
            if arrived == num_splits - 1:
                for sibling in tl.static_range(NUM_SIBLINGS):
                    _sum_parts(parts_ptr, shrunk_ptr, sibling, tile, num_tiles, num_splits, NUM_SIBLINGS, BLOCK_M,
                               BLOCK_R, SPLITS, CHUNK)
                tl.store(counters_ptr + tile, 0)  # zero again for the next call: no memset


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
