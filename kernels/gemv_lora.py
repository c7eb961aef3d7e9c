"""One decode row's linear with its LoRA inside: the base GEMV and the row's adapter in one launch.

Experimental (#15): the runtime calls it for `compile(fused_gemv=True)`'s one-row calls.

At batch 1 a decode step's LoRA is launches, not bytes: the kernel path adds a shrink and an
expand per sibling group (224 kernels a step on e2e's 7B model, ~4.3 µs each inside a CUDA
graph, for ~1 µs of bytes), the stack one expand per group (112). This kernel replaces the base
linear's own GEMV at one row, so LoRA adds no launch at all:

    y = x @ W.T + bias + (x @ A[slot, :rank].T) @ B[slot, :, :rank].T      (slot -1: no LoRA)

The grid is (column blocks of W, splits of K). Each program reads its block of W over its part
of K, and the same part of the row's own slot's A, so it holds a part of the row's shrink; the
expand is linear in the shrink, so the program adds that part's expand of its columns to its
part of the output. The parts of a column block are summed without atomics on the output and
without a memset: each program writes its float32 part to a workspace and counts itself in on
the block's counter; the last one sums the parts, adds the bias, writes the output once and sets
the counter back to 0 for the next call (so the counters are zeroed once, at allocation, and a
CUDA graph can replay the kernel).

Bytes beyond the base GEMV's: the row's own A, once per column block (from L2: `rank /
BLOCK_N` of W's bytes), its B once per split, the workspace (`splits x out` floats). Computed in
float32; the base part is a multiply-and-sum in float32, not cuBLAS's GEMV, so it equals
`F.linear` within bf16 rounding, not bit for bit.

* `gemv_lora_reference`: plain torch, the oracle;
* `gemv_lora_triton`: the kernel (CUDA tensors, or CPU ones under TRITON_INTERPRET=1), with a
  `GemvWorkspace` made once (calls sharing one must run one after another: one stream).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch_config import _next_power_of_2, cdiv

__all__ = ["GemvWorkspace", "gemv_config", "gemv_lora_reference", "gemv_lora_triton"]


def gemv_lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                        lora_b: torch.Tensor, slot_ranks: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """`x [1, in]`, `weight [out, in]`, `lora_a [slots, R, in]`, `lora_b [slots, out, R]` (scaling
    folded in), `slot_ranks [slots]`, `slot [1]` (-1: the base model): `[1, out]` in x's dtype."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    index = int(slot.reshape(-1)[0])
    if index >= 0:
        rank = min(int(slot_ranks[index]), lora_a.shape[1])
        if rank > 0:
            y = y + (x.float() @ lora_a[index, :rank].float().T) @ lora_b[index, :, :rank].float().T
    return y.to(x.dtype)


@dataclasses.dataclass
class GemvWorkspace:
    """The float32 parts (`splits x out` of a call, flat) and one counter per column block (zero
    between calls: the kernel's last program of a block sets it back). One workspace can serve
    every linear of a model, as long as their calls run one after another (one stream): make it
    once for the largest (`for_calls`), before any CUDA-graph capture or warm-up, so that no
    graph's memory pool owns it."""

    parts: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def make(cls, parts: int, blocks: int, device) -> "GemvWorkspace":
        return cls(torch.empty(parts, dtype=torch.float32, device=device),
                   torch.zeros(blocks, dtype=torch.int32, device=device))

    @classmethod
    def for_calls(cls, shapes, device) -> "GemvWorkspace":
        """One workspace for linears of these `(out, in)` shapes at their `gemv_config`."""
        configs = [(out, gemv_config(out, in_features)) for out, in_features in shapes]
        return cls.make(max((config[2] * out for out, config in configs), default=1),
                        max((cdiv(out, config[0]) for out, config in configs), default=1), device)


def gemv_config(out_features: int, in_features: int, programs: int = 1056, block_n: int = 128,
                block_k: int = 128, min_steps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, splits of K): column blocks of `block_n` (the A re-read is `rank /
    block_n` of W's bytes), and K split until there are about `programs` programs, in whole
    `block_k` steps, at least `min_steps` a split (by default two where the outputs alone make 16
    blocks or more, else one).

    Fitted to the 7B layer's sweep on an H100 (2026-12-07 12:53 UTC, two calls within 0.3 µs,
    docs/BENCHMARKS.md "The fused GEMV in the decode step"), where at 4 warps it picks each op's
    fastest of the configs timed: q and o (28 blocks) 14 splits, 15.9 / 15.8 µs against 18.5 /
    18.2 at 28 one-step splits; gate and up (148 blocks) 7 splits at 1,056 programs, 55.6 / 55.2
    µs against 57.6 / 57.5 at 528 programs of 64-wide steps; down (28 blocks, 18,944 inputs) 37
    splits, 55.5 µs against 57.0; k and v (4 blocks) 28 one-step splits, 6.9 µs (6.5 at 8 warps,
    which the launch does not take). The layer: 211.8 µs against 218.8 for the earlier default
    (528 programs, 64-wide steps), cuBLAS 200.0 and cuBLAS plus the LoRA kernels 225.5. Other
    shapes are not measured."""
    blocks = cdiv(out_features, block_n)
    steps = cdiv(in_features, block_k)
    if min_steps is None:
        # Wide outputs fill the GPU with few splits; there one-step splits lost (q and o: 18.5
        # against 15.9 µs), narrow ones (k, v: 4 blocks) take every split they can get.
        min_steps = 1 if blocks < 16 else 2
    splits = max(1, min(cdiv(programs, blocks), max(1, steps // min_steps)))
    # Splits of whole K steps; as many as those steps need (no split left with nothing to read).
    return block_n, block_k, cdiv(in_features, cdiv(cdiv(in_features, splits), block_k) * block_k)


@triton.jit
def _gemv_lora_kernel(
    x_ptr, w_ptr, w_row_stride, bias_ptr, a_ptr, a_slot_stride, a_row_stride, b_ptr, b_slot_stride, b_row_stride,
    ranks_ptr, max_rank, slot_ptr, parts_ptr, counters_ptr, out_ptr, out_features, in_features, k_per_split,
    HAS_BIAS: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = n < out_features
    r = tl.arange(0, BLOCK_R)
    slot = tl.load(slot_ptr)
    rank = tl.minimum(tl.load(ranks_ptr + tl.maximum(slot, 0)), max_rank)
    # The base model (slot -1) reads no A or B: rank 0.
    r_valid = r < tl.where(slot >= 0, rank, 0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    shrunk = tl.zeros((BLOCK_R,), dtype=tl.float32)
    slot_offset = tl.maximum(slot, 0).to(tl.int64) * a_slot_stride
    k_start = split * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_valid = k < in_features
        x = tl.load(x_ptr + k, mask=k_valid, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * w_row_stride + k[None, :],
                    mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        # The row's own slot's A, past its rank never read (another slot's rows may hold inf).
        a = tl.load(a_ptr + slot_offset + r[:, None] * a_row_stride + k[None, :],
                    mask=r_valid[:, None] & k_valid[None, :], other=0.0)
        shrunk += tl.sum(a.to(tl.float32) * x[None, :], axis=1)
    # This split's part of the shrink, expanded over the block's columns (the expand is linear).
    b = tl.load(b_ptr + tl.maximum(slot, 0).to(tl.int64) * b_slot_stride + n[:, None].to(tl.int64) * b_row_stride
                + r[None, :], mask=n_valid[:, None] & r_valid[None, :], other=0.0)
    acc += tl.sum(b.to(tl.float32) * shrunk[None, :], axis=1)
    if SPLITS == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)
        tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=n_valid)
    else:
        tl.store(parts_ptr + split * out_features + n, acc, mask=n_valid)
        # Every warp's stores issued before the one thread that counts the program in (a scalar
        # atomic is one thread's); acq_rel then makes them visible to the last program.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + block, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for part in tl.static_range(SPLITS):
                total += tl.load(parts_ptr + part * out_features + n, mask=n_valid, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + n, mask=n_valid, other=0.0).to(tl.float32)
            tl.store(out_ptr + n, total.to(out_ptr.dtype.element_ty), mask=n_valid)
            tl.store(counters_ptr + block, 0)


def gemv_lora_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, slot_ranks: torch.Tensor, slot: torch.Tensor, out: torch.Tensor,
                     workspace: GemvWorkspace, config: tuple[int, int, int], num_warps: int = 4) -> torch.Tensor:
    """`gemv_lora_reference` into `out [1, out]` in one launch; `config` from `gemv_config`, and a
    `workspace` of at least `splits x out` parts and `out / BLOCK_N` counters (`GemvWorkspace.for_calls`).
    Reads nothing back to the host: a CUDA graph can capture it (`slot` and `slot_ranks` int32 on
    the device)."""
    out_features, in_features = weight.shape
    if x.shape != (1, in_features) or x.stride(-1) != 1:
        raise ValueError(f"gemv_lora: x must be one contiguous row of {in_features}, got {tuple(x.shape)}")
    if weight.stride(1) != 1 or out.shape != (1, out_features) or not out.is_contiguous():
        raise ValueError(f"gemv_lora: the weight's rows and out [1, {out_features}] must be contiguous")
    slots, max_rank, a_in = lora_a.shape
    if a_in != in_features or tuple(lora_b.shape) != (slots, out_features, max_rank) or lora_a.stride(2) != 1 \
            or lora_b.stride(2) != 1:
        raise ValueError(f"gemv_lora: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit a "
                         f"{in_features} -> {out_features} linear, or are not contiguous in their last dimension")
    if slot.dtype != torch.int32 or slot_ranks.dtype != torch.int32:
        raise ValueError("gemv_lora: slot and slot_ranks must be int32 (the kernel reads them as they are)")
    block_n, block_k, splits = config
    if workspace.parts.numel() < splits * out_features or workspace.counters.numel() < cdiv(out_features, block_n):
        raise ValueError(f"gemv_lora: the workspace holds {workspace.parts.numel()} parts and "
                         f"{workspace.counters.numel()} counters; this call needs {splits * out_features} and "
                         f"{cdiv(out_features, block_n)}")
    k_per_split = cdiv(cdiv(in_features, splits), block_k) * block_k
    _gemv_lora_kernel[(cdiv(out_features, block_n), splits)](
        x, weight, weight.stride(0), bias if bias is not None else x, lora_a, lora_a.stride(0), lora_a.stride(1),
        lora_b, lora_b.stride(0), lora_b.stride(1), slot_ranks, max_rank, slot, workspace.parts,
        workspace.counters, out, out_features, in_features, k_per_split,
        HAS_BIAS=bias is not None, SPLITS=splits, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, _next_power_of_2(max_rank)), num_warps=num_warps,
    )
    return out
