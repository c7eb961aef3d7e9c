"""The `mmlora::lora_experts_add_` custom op: mixed-adapter LoRA on a mixture of experts' 3D weights.

PEFT's LoRA on a 3D expert weight `W [experts, d1, d2]` (`LoraConfig(target_parameters=...)`)
adds to each expert's slice a delta `scaling * B_e @ A_e` (`A_e [r, in]`, `B_e [out, r]`, in PEFT's
naming of the weight's dimensions), so an expert matmul gets, per row, the product of its input
with its request's delta for its expert. The slot buffers hold `lora_a [slots, experts, R, in]`
and the scaled `lora_b [slots, experts, out, R]`.

The rows come in one of two forms (`passes/ownership.ExpertsCall`):

* per expert: `x [experts, T, c]`, expert `e`'s batch in `x[e]`;
* gathered: `x [S, c]` (trailing singleton dimensions dropped), row `s` run by expert `expert_ids[s]`;

and `contract_in` says whether the model's product sums over PEFT's `in` (then the delta is
`x @ A_e.T @ B_e.T`) or over its `out` (Llama4 multiplies `x @ W_e` with `W_e [d1, d2]` while
PEFT calls `d2` the input: then `x @ B_e @ A_e`). Each row's token, and so its request, follows
its layout (`passes/row_layout.RowLayout`: of `R` rows, row `i` is token `(i mod (R / tiles)) //
interleave`); the requests own the tokens as in `reference.py`.

This file keeps the op, its fake, its plain-torch bodies and its Triton path together:

* `lora_experts_add_reference`: row by row, the tests' oracle;
* `lora_experts_add_torch`: the op's body on the CPU (and wherever the Triton path does not
  run). No host reads, shapes that depend only on the input's and the buffers' (a loop over the
  slots, a static count). Per slot it costs one batched product per expert of rank `R`
  (per-expert form) or a gather of each row's `[R, c]` and `[o, R]` factors (gathered form);
* `lora_experts_add_triton`: the body on CUDA tensors (`lora_experts_add` dispatches on the
  device). Both indirections, token -> adapter slot (request tables and row layout) and row ->
  expert (the router's `expert_ids`, or the row's batch), are resolved on the device into one
  key per row, `slot * experts + expert` (-1: no adapter). Two kernels follow, a shrink (grid
  `row blocks x feature splits`, float32 partial sums per split, stored: no memset) and an
  expand (grid `column blocks x row blocks`, summing the splits in one load and adding into
  the output rows in place). Each program loops over the distinct keys of its rows and reads
  each key's factor once for all its rows. Up to 512 rows (decode: a token's top-k rows hit
  distinct experts anyway) a block is one row and its key is worked out in the kernel from the
  tables (two launches in all). Beyond, blocks of 16 or 32 rows: per-expert rows already come
  in runs of one key (expert-major, tokens in request order); gathered rows are first keyed by
  a small kernel and put in key order by a device `torch.sort` (static shape), so a block holds
  one or a few keys. `choose_expert_config` picks from the static row count.

Both bodies read nothing back to the host and size everything from static shapes: a CUDA graph
captures either and replays it with refilled request tables, new routing and new adapter
weights. The factors past a slot's rank, and every slot no row uses, are never read (they may
hold garbage or NaN); accumulation is in float32, the output keeps its dtype.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch_config import cdiv, interpreting
from .reference import row_slots

__all__ = ["ExpertConfig", "choose_expert_config", "experts_row_slots", "lora_experts_add", "lora_experts_add_",
           "lora_experts_add_reference", "lora_experts_add_torch", "lora_experts_add_triton"]


def _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in: bool) -> None:
    """Static shape checks only (no device reads)."""
    slots, experts, rank, in_features = lora_a.shape
    out_features = lora_b.shape[2]
    if lora_b.shape[:2] != (slots, experts) or lora_b.shape[3] != rank:
        raise ValueError(f"lora_experts_add_: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not pair")
    reads, writes = (in_features, out_features) if contract_in else (out_features, in_features)
    # Gathered rows carry a trailing singleton dimension (`[S, c, 1]`, `[S, 1, c]`): features per row.
    read = x.shape[-1] if expert_ids is None else x[0].numel()
    written = output.shape[-1] if expert_ids is None else output[0].numel()
    if read != reads or written != writes:
        raise ValueError(f"lora_experts_add_: rows of {read} features into {written}, but the "
                         f"factors map {reads} to {writes}")
    if expert_ids is None and x.shape[0] != experts:
        raise ValueError(f"lora_experts_add_: {x.shape[0]} expert batches for {experts} experts")
    if expert_ids is not None and expert_ids.numel() != x.shape[0]:
        raise ValueError(f"lora_experts_add_: {expert_ids.numel()} expert ids for {x.shape[0]} rows")
    if slot_ranks.numel() != slots:
        raise ValueError("lora_experts_add_: slot_ranks must have one entry per slot")


def _rows(x: torch.Tensor, expert_ids) -> torch.Tensor:
    """The rows as `[experts, T, c]` (per expert) or `[S, c]` (gathered)."""
    if expert_ids is None:
        return x
    return x.reshape(x.shape[0], -1)


def experts_row_slots(rows: int, tiles: int, interleave: int, request_slots, request_cum_weights) -> torch.Tensor:
    """The adapter slot of each of `rows` rows laid out `(tiles, interleave)` over the tokens."""
    tokens = rows // (tiles * interleave)
    token_slots = row_slots(request_slots, request_cum_weights, tokens)
    index = (torch.arange(rows, device=token_slots.device) % (rows // tiles)) // interleave
    return token_slots[index]


def _factors(lora_a: torch.Tensor, lora_b: torch.Tensor, contract_in: bool):
    """(shrink [.., c, R], expand [.., R, o]) of each slot and expert: the delta is `x @ shrink @ expand`."""
    if contract_in:
        return lora_a.transpose(-1, -2), lora_b.transpose(-1, -2)
    return lora_b, lora_a


def lora_experts_add_reference(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                               request_slots, request_cum_weights) -> None:
    """Row by row: `output[row] += x[row] @ shrink[slot, expert, :, :rank] @ expand[slot, expert, :rank]`."""
    _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in)
    rows_in = _rows(x, expert_ids).reshape(-1, x.shape[-1] if expert_ids is None else _rows(x, expert_ids).shape[-1])
    flat = output.reshape(rows_in.shape[0], -1)
    slots = experts_row_slots(rows_in.shape[0], tiles, interleave, request_slots, request_cum_weights)
    per_expert = rows_in.shape[0] // lora_a.shape[1]
    shrink, expand = _factors(lora_a, lora_b, contract_in)
    deltas = torch.zeros_like(flat, dtype=torch.float32)
    for row, slot in enumerate(slots.tolist()):
        rank = int(slot_ranks[slot]) if slot >= 0 else 0
        if rank == 0:
            continue
        expert = int(expert_ids.reshape(-1)[row]) if expert_ids is not None else row // per_expert
        deltas[row] = rows_in[row].float() @ shrink[slot, expert, :, :rank].float() @ expand[slot, expert, :rank].float()
    output.add_(deltas.view(output.shape).to(output.dtype))


def lora_experts_add_torch(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                           request_slots, request_cum_weights) -> None:
    """The op's plain-torch body (CPU, and wherever the Triton path does not run): the
    reference's result with no host synchronisation (see the module's doc)."""
    _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in)
    rows_in = _rows(x, expert_ids)
    count = rows_in.shape[0] * rows_in.shape[1] if expert_ids is None else rows_in.shape[0]
    if count == 0 or lora_a.shape[0] == 0 or lora_a.shape[2] == 0:
        return
    slots = experts_row_slots(count, tiles, interleave, request_slots, request_cum_weights)
    shrink, expand = _factors(lora_a, lora_b, contract_in)
    rank_cap = lora_a.shape[2]
    # Ranks below the buffer's are padded with zeros, but not trusted: the factors past a slot's
    # rank are selected away (not multiplied by zero: 0 x NaN is NaN), and so is what a slot of
    # rank 0, or one no row uses, would add.
    columns = torch.arange(rank_cap, device=lora_a.device)
    delta = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
    if expert_ids is None:
        mine_shape = rows_in.shape[:2] + (1,)  # [experts, T, 1]
        slots = slots.view(mine_shape)
        for slot in range(lora_a.shape[0]):
            keep = columns < slot_ranks[slot].to(torch.int64)  # [R]
            shrunk = torch.bmm(rows_in.float(), torch.where(keep, shrink[slot].float(), 0.0))  # [experts, T, R]
            mine = torch.bmm(shrunk, torch.where(keep[:, None], expand[slot].float(), 0.0))
            # Selected after both products: a slot no row uses may hold anything, NaN included.
            delta += torch.where(slots == slot, mine, 0.0).view(output.shape)
    else:
        ids = expert_ids.reshape(-1).to(torch.int64)
        gather = slots.clamp(min=0)
        row_ranks = torch.where(slots >= 0, slot_ranks.to(torch.int64)[gather], 0)
        keep = columns < row_ranks[:, None]  # [S, R]: nothing kept for rows without an adapter
        shrink_rows = torch.where(keep[:, None, :], shrink[gather, ids].float(), 0.0)  # [S, c, R]
        expand_rows = torch.where(keep[:, :, None], expand[gather, ids].float(), 0.0)  # [S, R, o]
        shrunk = torch.bmm(rows_in.float()[:, None, :], shrink_rows)  # [S, 1, R]
        # Rows without an adapter are selected away: their input may be infinite (0 x inf is NaN).
        adapted = keep.any(-1)[:, None]
        delta += torch.where(adapted, torch.bmm(shrunk, expand_rows)[:, 0, :], 0.0).view(output.shape)
    output.add_(delta.to(output.dtype))


# ----------------------------------------------------------------------------------------------
# Triton path (CUDA tensors; CPU tensors under TRITON_INTERPRET=1): one shrink and one expand.
# ----------------------------------------------------------------------------------------------

# Row counts up to which one program per row runs (no sort, no grouping): at decode the rows
# mostly hit distinct (slot, expert) pairs, so per-row reads are the byte floor anyway.
# Measured (H100, 2026-12-06, `benchmarks/expert_kernel_bench.py`): at 512 rows (64 tokens x
# top-8) one row per program took 93-97 us against 100-164 us grouped and sorted; at 16,384
# rows 2.3 ms against 0.3-0.8 ms. The crossover lies between; 512 is the largest size measured
# on the per-row side.
_PER_ROW_MAX_ROWS = 512
# Programs the shrink aims for, as `launch_config._TARGET_SHRINK_PROGRAMS` (about two per H100 SM).
_TARGET_PROGRAMS = 264
# Keys are `slot * experts + expert`; the loop over a block's keys takes the smallest pending one.
_NO_KEY = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """Static launch parameters of one Triton call (from shapes only, never from data)."""

    block_m: int  # rows (positions) per program; 1: one program per row
    block_k: int  # features per shrink step
    k_chunk: int  # features per shrink program (a multiple of block_k)
    block_n: int  # output features per expand program
    # Rows grouped by key through a device sort first (the gathered form: a token's top-k rows
    # are consecutive and hit different experts). Per-expert rows come expert-major with the
    # tokens in request order, so consecutive rows share their key already.
    sort: bool = False


def choose_expert_config(rows: int, gathered: bool, features: int, max_rank: int, *,
                         per_row_max_rows: int | None = None, block_m: int | None = None) -> ExpertConfig:
    """Launch parameters from static shapes: one program per row up to `per_row_max_rows` rows,
    blocks of 16 (32 from 4096 rows) rows otherwise, the shrink's features split so that the
    grid holds about `_TARGET_PROGRAMS` programs. Keywords override (the benchmark sweeps them)."""
    block_r = _block_r(max_rank)
    if rows <= (_PER_ROW_MAX_ROWS if per_row_max_rows is None else per_row_max_rows):
        block_m, block_k, block_n = 1, max(16, min(128, 2048 // block_r)), max(16, min(128, 2048 // block_r))
    else:
        block_m = block_m or (32 if rows >= 4096 else 16)
        block_k, block_n = 64, 128 if block_r <= 32 else 64
    blocks = cdiv(rows, block_m)
    splits = max(1, min(cdiv(_TARGET_PROGRAMS, blocks), 64, cdiv(features, block_k)))
    k_chunk = cdiv(cdiv(features, splits), block_k) * block_k
    return ExpertConfig(block_m=block_m, block_k=block_k, k_chunk=k_chunk, block_n=block_n,
                        sort=gathered and block_m > 1)


def _block_r(max_rank: int) -> int:
    return max(16, 1 << max(0, (int(max_rank) - 1).bit_length()))


@triton.jit
def _row_keys(row, valid, rows_per_tile, interleave, tokens, expert_ids_ptr, rows_per_expert,
              slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts,
              GATHERED: tl.constexpr, REQUESTS: tl.constexpr):
    """Each row's key `slot * experts + expert`, -1 where no adapter applies (slot -1, rank 0,
    no weight in the batch, an expert id out of range), from the tables alone.

    Row `i` holds token `(i mod rows_per_tile) // interleave` (`RowLayout`); request `r` owns
    token `t` when `cum[r] * tokens <= t * total < cum[r + 1] * tokens` (`reference.row_slots`),
    so the owner is the number of requests ending at or before `t`: one comparison per request,
    in blocks of REQUESTS.
    """
    token = ((row % rows_per_tile) // interleave).to(tl.int64)
    total = tl.load(cum_ptr + num_requests)
    owner = tl.zeros_like(row)
    for first in range(1, num_requests + 1, REQUESTS):
        ids = first + tl.arange(0, REQUESTS)
        bound = tl.load(cum_ptr + ids, mask=ids <= num_requests, other=0)
        ended = (ids <= num_requests)[None, :] & (bound[None, :] * tokens <= token[:, None] * total)
        owner += tl.sum(ended.to(tl.int32), axis=1)
    owner = tl.minimum(owner, num_requests - 1)
    slot = tl.load(slots_ptr + owner, mask=valid, other=-1)
    slot = tl.where((total > 0) & (slot >= 0) & (slot < num_slots), slot, -1)
    if GATHERED:
        expert = tl.load(expert_ids_ptr + row, mask=valid, other=-1).to(tl.int32)
    else:
        expert = row // rows_per_expert
    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0), mask=slot >= 0, other=0), max_rank)
    adapted = valid & (slot >= 0) & (rank > 0) & (expert >= 0) & (expert < experts)
    return tl.where(adapted, slot * experts + expert, -1)


@triton.jit
def _expert_keys_kernel(keys_ptr, rows, rows_per_tile, interleave, tokens, expert_ids_ptr, rows_per_expert,
                        slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts,
                        BLOCK: tl.constexpr, GATHERED: tl.constexpr, REQUESTS: tl.constexpr):
    """The keys of every row, for the device sort that groups them (`ExpertConfig.sort`)."""
    row = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = row < rows
    key = _row_keys(row, valid, rows_per_tile, interleave, tokens, expert_ids_ptr, rows_per_expert,
                    slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts, GATHERED, REQUESTS)
    tl.store(keys_ptr + row, key, mask=valid)


@triton.jit
def _block_rows(block, rows, sorted_keys_ptr, order_ptr, rows_per_tile, interleave, tokens, expert_ids_ptr,
                rows_per_expert, slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts,
                BLOCK_M: tl.constexpr, SORTED: tl.constexpr, GATHERED: tl.constexpr, REQUESTS: tl.constexpr):
    """A program's positions, the rows they hold and their keys: sorted positions through the
    sort's order, or the rows themselves with their keys worked out here (no extra launch)."""
    position = block * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = position < rows
    if SORTED:
        key = tl.load(sorted_keys_ptr + position, mask=valid, other=-1)
        row = tl.load(order_ptr + position, mask=valid, other=0).to(tl.int32)
    else:
        row = position
        key = _row_keys(row, valid, rows_per_tile, interleave, tokens, expert_ids_ptr, rows_per_expert,
                        slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts, GATHERED,
                        REQUESTS)
    return position, row, key


@triton.jit
def _next_key(key, pending, ranks_ptr, max_rank, experts):
    """The smallest pending key, its rows, the rows still pending after it, and its slot, expert
    and rank. A block holds few distinct keys (sorted or per-expert rows come in runs), so the
    loop over them is short; each pass reads that (slot, expert)'s factor once for all its rows."""
    current = tl.min(tl.where(pending, key, 2147483647), axis=0)
    mine = key == current
    slot = current // experts
    rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
    return mine, pending & (key != current), slot, current % experts, rank


@triton.jit
def _expert_shrink_kernel(
    x_ptr, x_expert_stride, x_row_stride, x_feature_stride, x_rows_per_expert,
    f_ptr, f_slot_stride, f_expert_stride, f_rank_stride, f_feature_stride,
    partial_ptr, rows, features, k_chunk,
    sorted_keys_ptr, order_ptr, rows_per_tile, interleave, tokens, expert_ids_ptr, rows_per_expert,
    slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SORTED: tl.constexpr,
    GATHERED: tl.constexpr, REQUESTS: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """partial[split, position, r] = x[row, k-chunk] . shrink[slot, expert, r, k-chunk] for r below the rank."""
    block = tl.program_id(0)
    split = tl.program_id(1)
    position, row, key = _block_rows(block, rows, sorted_keys_ptr, order_ptr, rows_per_tile, interleave, tokens,
                                     expert_ids_ptr, rows_per_expert, slots_ptr, cum_ptr, num_requests, num_slots,
                                     ranks_ptr, max_rank, experts, BLOCK_M, SORTED, GATHERED, REQUESTS)
    valid = position < rows
    # x rows as `[experts, T, c]` (per expert) or `[S, 1, c]` (gathered, x_rows_per_expert 1).
    x_rows = x_ptr + ((row // x_rows_per_expert).to(tl.int64) * x_expert_stride
                      + (row % x_rows_per_expert).to(tl.int64) * x_row_stride)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_begin = split * k_chunk
    k_end = tl.minimum(k_begin + k_chunk, features)
    pending = key >= 0
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        mine, pending, slot, expert, rank = _next_key(key, pending, ranks_ptr, max_rank, experts)
        f_base = f_ptr + slot.to(tl.int64) * f_slot_stride + expert.to(tl.int64) * f_expert_stride
        for k_start in range(k_begin, k_end, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            # Only this key's rows are loaded (the others' lanes are masked), so x is read once
            # in all. The factor past the rank is never read: it may hold NaN, and through the
            # dot even the block's other rows (x zeroed here) would take 0 x NaN = NaN.
            x_tile = tl.load(x_rows[:, None] + k[None, :].to(tl.int64) * x_feature_stride,
                             mask=mine[:, None] & (k < k_end)[None, :], other=0.0)
            f_ptrs = f_base + r[:, None].to(tl.int64) * f_rank_stride + k[None, :].to(tl.int64) * f_feature_stride
            f_tile = tl.load(f_ptrs, mask=(r < rank)[:, None] & (k < k_end)[None, :], other=0.0)
            if USE_DOT:
                if UPCAST:
                    acc += tl.dot(x_tile.to(tl.float32), tl.trans(f_tile.to(tl.float32)), input_precision=PRECISION)
                else:
                    acc += tl.dot(x_tile, tl.trans(f_tile), input_precision=PRECISION)
            else:
                acc += tl.sum(x_tile.to(tl.float32)[:, None, :] * f_tile.to(tl.float32)[None, :, :], axis=2)
    # Every valid position is stored (zeros for rows without an adapter): the expand adds the
    # splits up, so nothing is zeroed beforehand.
    offsets = (split * rows + position).to(tl.int64)[:, None] * BLOCK_R + r[None, :]
    tl.store(partial_ptr + offsets, acc, mask=valid[:, None])


@triton.jit
def _expert_expand_kernel(
    out_ptr, out_expert_stride, out_row_stride, out_feature_stride, out_rows_per_expert,
    g_ptr, g_slot_stride, g_expert_stride, g_feature_stride, g_rank_stride,
    partial_ptr, num_splits, rows, out_features,
    sorted_keys_ptr, order_ptr, rows_per_tile, interleave, tokens, expert_ids_ptr, rows_per_expert,
    slots_ptr, cum_ptr, num_requests, num_slots, ranks_ptr, max_rank, experts,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    SORTED: tl.constexpr, GATHERED: tl.constexpr, REQUESTS: tl.constexpr, USE_DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out[row, n-block] += (sum of the splits' partial sums) . expand[slot, expert, n-block, :rank]."""
    column_block = tl.program_id(0)
    block = tl.program_id(1)
    position, row, key = _block_rows(block, rows, sorted_keys_ptr, order_ptr, rows_per_tile, interleave, tokens,
                                     expert_ids_ptr, rows_per_expert, slots_ptr, cum_ptr, num_requests, num_slots,
                                     ranks_ptr, max_rank, experts, BLOCK_M, SORTED, GATHERED, REQUESTS)
    adapted = key >= 0
    if tl.max(adapted.to(tl.int32), axis=0) > 0:
        r = tl.arange(0, BLOCK_R)
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        column_valid = n < out_features
        # Every split's partial sums in one load (a loop would be a dependent round trip each).
        split = tl.arange(0, SPLITS)
        offsets = ((split[:, None] * rows + position[None, :]).to(tl.int64)[:, :, None] * BLOCK_R
                   + r[None, None, :])
        present = (split[:, None] < num_splits) & adapted[None, :]
        shrunk = tl.sum(tl.load(partial_ptr + offsets, mask=present[:, :, None], other=0.0), axis=0)
        delta = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        pending = adapted
        while tl.max(pending.to(tl.int32), axis=0) > 0:
            mine, pending, slot, expert, rank = _next_key(key, pending, ranks_ptr, max_rank, experts)
            g_ptrs = (g_ptr + slot.to(tl.int64) * g_slot_stride + expert.to(tl.int64) * g_expert_stride
                      + n[:, None].to(tl.int64) * g_feature_stride + r[None, :].to(tl.int64) * g_rank_stride)
            g_tile = tl.load(g_ptrs, mask=column_valid[:, None] & (r < rank)[None, :], other=0.0).to(tl.float32)
            # This key's rows, and its rank's columns only: sums past the rank are dropped.
            part = tl.where(mine[:, None] & (r < rank)[None, :], shrunk, 0.0)
            # Selected to this key's rows after the product too: the loader refuses non-finite
            # factors, but were one to get through, the other rows' zeros times it would be NaN.
            if USE_DOT:
                # float32 operands: under tf32 a bf16/fp16 factor is exact (as the tile path's expand).
                delta += tl.where(mine[:, None], tl.dot(part, tl.trans(g_tile), input_precision=PRECISION), 0.0)
            else:
                delta += tl.where(mine[:, None], tl.sum(part[:, None, :] * g_tile[None, :, :], axis=2), 0.0)
        out_rows = out_ptr + ((row // out_rows_per_expert).to(tl.int64) * out_expert_stride
                              + (row % out_rows_per_expert).to(tl.int64) * out_row_stride)
        out_ptrs = out_rows[:, None] + n[None, :].to(tl.int64) * out_feature_stride
        out_mask = adapted[:, None] & column_valid[None, :]
        current = tl.load(out_ptrs, mask=out_mask, other=0.0)
        tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=out_mask)


def _factor_strides(factor: torch.Tensor, rank_dim: int, feature_dim: int) -> tuple[int, int, int, int]:
    """(slot, expert, rank, feature) strides of a `[slots, experts, ., .]` factor."""
    return factor.stride(0), factor.stride(1), factor.stride(rank_dim), factor.stride(feature_dim)


def _row_strides(tensor: torch.Tensor, gathered: bool) -> tuple[int, int, int, int]:
    """(expert, row, feature strides, rows per expert) of `[experts, T, f]` or of `[S, f]` (as `[S, 1, f]`)."""
    if gathered:
        return tensor.stride(0), 0, tensor.stride(1), 1
    return tensor.stride(0), tensor.stride(1), tensor.stride(2), tensor.shape[1]


def lora_experts_add_triton(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                            request_slots, request_cum_weights, *, config: ExpertConfig | None = None) -> None:
    """The Triton path of the op (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

    Launches: the shrink and the expand, and before them, where the rows are grouped
    (`ExpertConfig.sort`), a keys kernel and a device `torch.sort` of the keys (static shape).
    Grids come from the row count, the features and `config` (`choose_expert_config`'s pick
    unless given): nothing is read back to the host.
    """
    _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in)
    gathered = expert_ids is not None
    num_slots, experts, max_rank, _ = lora_a.shape
    rows = x.shape[0] if gathered else x.shape[0] * x.shape[1]
    num_requests = request_slots.numel()
    if rows == 0 or num_slots == 0 or max_rank == 0 or num_requests == 0:
        return
    x_rows = x.reshape(rows, -1) if gathered else x
    # The output is written in place: a gathered one that is no view of `[S, o]` goes through a copy.
    out_rows = output.view(rows, -1) if gathered and _viewable(output, rows) else output
    staged = gathered and out_rows is output
    if staged:
        out_rows = output.reshape(rows, -1).clone()
    features = x_rows.shape[-1]
    out_features = out_rows.shape[-1]
    # Shrink over the features read, expand into those written (`_factors`, by strides here).
    if contract_in:
        shrink, shrink_strides = lora_a, _factor_strides(lora_a, 2, 3)
        expand, expand_strides = lora_b, _factor_strides(lora_b, 2, 3)  # [slot, expert, out, R]: n then r
    else:
        shrink, shrink_strides = lora_b, _factor_strides(lora_b, 3, 2)
        expand, expand_strides = lora_a, _factor_strides(lora_a, 3, 2)  # [slot, expert, R, in]: n is in
    config = config or choose_expert_config(rows, gathered, features, max_rank)
    block_r = _block_r(max_rank)
    num_splits = cdiv(features, config.k_chunk)
    blocks = cdiv(rows, config.block_m)
    device = x.device
    ids = expert_ids.reshape(-1) if gathered else request_slots  # unused pointer when per expert
    tables = (rows // tiles, interleave, rows // (tiles * interleave), ids, rows // experts,
              request_slots.to(torch.int32), request_cum_weights.to(torch.int64), num_requests, num_slots,
              slot_ranks.to(torch.int32), max_rank, experts)
    requests = _requests_block(num_requests, config.block_m)
    if config.sort:
        keys = torch.empty(rows, dtype=torch.int32, device=device)
        _expert_keys_kernel[(cdiv(rows, 64),)](keys, rows, *tables, BLOCK=64, GATHERED=gathered,
                                                      REQUESTS=_requests_block(num_requests, 64))
        sorted_keys, order = torch.sort(keys)
    else:
        sorted_keys, order = request_slots, request_slots  # unused pointers
    use_dot = config.block_m >= 16
    # float32 operands (the expand's sums; the shrink's when upcast) multiply under tf32 when
    # rows and factors are bf16/fp16 (their mantissas fit tf32), ieee when either is float32.
    half = {x.dtype, lora_a.dtype} <= {torch.float16, torch.bfloat16}
    precision = "tf32" if half else "ieee"
    # The interpreter multiplies bf16 blocks as raw integers: give it float32 operands; mixed
    # dtypes (float32 buffers on bf16 rows, say) meet in float32 too.
    upcast = (interpreting() and torch.bfloat16 in (x.dtype, lora_a.dtype)) or x.dtype != lora_a.dtype
    partial = torch.empty(num_splits * rows * block_r, dtype=torch.float32, device=device)
    _expert_shrink_kernel[(blocks, num_splits)](
        x_rows, *_row_strides(x_rows, gathered), shrink, *shrink_strides,
        partial, rows, features, config.k_chunk, sorted_keys, order, *tables,
        BLOCK_M=config.block_m, BLOCK_R=block_r, BLOCK_K=config.block_k, SORTED=config.sort, GATHERED=gathered,
        REQUESTS=requests, USE_DOT=use_dot, UPCAST=upcast, PRECISION=precision,
    )
    _expert_expand_kernel[(cdiv(out_features, config.block_n), blocks)](
        out_rows, *_row_strides(out_rows, gathered), expand, *expand_strides,
        partial, num_splits, rows, out_features, sorted_keys, order, *tables,
        BLOCK_M=config.block_m, BLOCK_R=block_r, BLOCK_N=config.block_n,
        SPLITS=max(2, 1 << (num_splits - 1).bit_length()), SORTED=config.sort, GATHERED=gathered,
        REQUESTS=requests, USE_DOT=use_dot, PRECISION=precision,
    )
    if staged:
        output.copy_(out_rows.view(output.shape))


def _viewable(tensor: torch.Tensor, rows: int) -> bool:
    try:
        tensor.view(rows, -1)
    except RuntimeError:
        return False
    return True


def _requests_block(num_requests: int, block_m: int) -> int:
    """Request entries `_row_keys` compares at a time: all of them in one pass where they fit,
    the comparison matrix (rows x requests) bounded to 4096 elements otherwise."""
    # At least 64: a handful of compiled variants covers every decode batch.
    return max(64, min(1 << (num_requests - 1).bit_length(), 4096 // block_m, 1024))


def lora_experts_add(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                     request_slots, request_cum_weights) -> None:
    """The op's body, for callers already inside a custom op: Triton on CUDA, plain torch elsewhere."""
    body = lora_experts_add_triton if x.is_cuda else lora_experts_add_torch
    body(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave, request_slots,
         request_cum_weights)


@torch.library.custom_op("mmlora::lora_experts_add_", mutates_args=("output",))
def lora_experts_add_(
    output: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    expert_ids: torch.Tensor | None,
    contract_in: bool,
    tiles: int,
    interleave: int,
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
) -> None:
    """`output += LoRA(x)` per row's adapter slot and expert; see `lora_experts_add_reference`."""
    lora_experts_add(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                     request_slots, request_cum_weights)


@lora_experts_add_.register_fake
def _lora_experts_add_fake(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                           request_slots, request_cum_weights) -> None:
    return None
