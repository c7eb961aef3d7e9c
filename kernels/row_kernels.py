"""The row path's Triton kernels (up to a few rows: decode at small batch), one program per row.

* shrink (`_row_shrink_kernel`, grid `rows x k_splits`): the program finds its row's slot with
  one load of each request table and one comparison per request (no tile search), multiplies a
  `k_chunk` slice of the row by every sibling's A and stores float32 partial sums per split.
* expand (`_row_expand_kernel`, grid `column blocks of all siblings x rows`): adds the splits'
  partial sums (one load), multiplies by a block of B and adds to the output row in place.
  Nothing is zeroed beforehand, so there is no memset. At up to 4 rows on Hopper both kernels
  launch as programmatic dependents: the expand loads its tables and B while the shrink runs.
  An adapter shared by several rows is read once per row (from L2), which is why this path
  stops at a few rows.

Siblings come as unrolled pointer arguments with a `NUM_SIBLINGS` constexpr, as on the tile
path (`tile_kernels.py`). Launched by `lora_add.py`, with the blocks and the launch mode
`launch_config.py` chose.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _row_b_block(b_ptr, slot, b_slot_stride, b_row_stride, n, column_valid, r, rank):
    """Rows `n` of B[slot] ([BLOCK_N, BLOCK_R]), zero past the rank and past the last column."""
    b_ptrs = b_ptr + slot.to(tl.int64) * b_slot_stride + n[:, None].to(tl.int64) * b_row_stride + r[None, :]
    return tl.load(b_ptrs, mask=column_valid[:, None] & (r[None, :] < rank), other=0.0)


@triton.jit
def _row_add_expanded(out_ptr, row_offset, n, column_valid, b_tile, shrunk):
    """`out[row, n] += b_tile @ shrunk` in float32, stored in the output's dtype (`row_offset`:
    where the row starts, in elements)."""
    out_ptrs = out_ptr + row_offset + n
    current = tl.load(out_ptrs, mask=column_valid, other=0.0)
    delta = tl.sum(b_tile.to(tl.float32) * shrunk[None, :], axis=1)
    tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=column_valid)


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
        b_tile = _row_b_block(b_ptr, slot, b_slot_stride, b_row_stride, n, column_valid, r, rank)
        if DEPENDENT_LAUNCH:
            tl.extra.cuda.gdc_wait()  # the shrink (and so the kernel before it) has finished
        partial_ptrs = (partial_ptr + ((split[:, None] * NUM_SIBLINGS + SIBLING) * rows + row).to(tl.int64)
                        * BLOCK_R + r[None, :])
        shrunk = tl.sum(tl.load(partial_ptrs, mask=split[:, None] < num_splits, other=0.0), axis=0)
        _row_add_expanded(out_ptr, row.to(tl.int64) * out_features, n, column_valid, b_tile, shrunk)


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
