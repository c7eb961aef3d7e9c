"""A prefill linear with its LoRA expand in the GEMM's epilogue: no second pass over the output.

Experimental (#16, case b's lead), for the kernel benchmark only: nothing in the runtime calls it
yet. At many rows the LoRA kernels' largest cost is the expand's pass over the outputs (it reads
and writes every served output once more); the fold removes it by making the expand extra K of
the base GEMM, but multiplies zeros in proportion to slots x rank and stops paying near 256
columns (docs/KERNELS.md, "Many slots at prefill"). Here the base GEMM is our own Triton kernel,
and each output tile adds its rows' own expand before its single store:

    y = x @ W.T + bias + shrunk[row, :rank] @ B[slot(row), :, :rank].T      (slot -1: no LoRA)

`shrunk` is the row's shrink (`x @ A[slot].T`, from the shrink kernel, which reads x once). Rows
of one request are contiguous at prefill (323-1,024 rows a request in #16's cases), so a tile of
`BLOCK_M` rows holds one slot or a few: the epilogue loops over the slots present in the tile,
each a `[BLOCK_M, rank] x [rank, BLOCK_N]` dot over that slot's rows (the others masked to zero),
reading that slot's B tile once for the whole row tile. The dots accumulate in float32 and the
output is rounded once; the shrink enters the epilogue's dot in B's dtype (a float32 shrink is
rounded to it there). A plain grouped-order GEMM: neither persistent nor through TMA, which is
what cuBLAS-class GEMMs on Hopper use; the benchmark says how far that leaves it behind.

It pays only if the GEMM keeps up with cuBLAS at these shapes: the expand is 10% of an LM
layer's base GEMM time at 8,192 rows and 32% of a tower block's (docs/BENCHMARKS.md, "Prefill
tiles and the fold"), which bounds how much slower than cuBLAS it may be. `kernel_bench.py
--epilogue` measures both.

* `gemm_lora_reference`: plain torch, the oracle;
* `gemm_lora_triton`: the kernel (CUDA tensors, or CPU ones under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_config import _next_power_of_2, cdiv

__all__ = ["DEFAULT_CONFIG", "gemm_lora_reference", "gemm_lora_triton"]

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): a common Hopper bf16 tile, unmeasured here.
DEFAULT_CONFIG = (128, 128, 64, 8, 3)


def gemm_lora_reference(x, weight, bias, shrunk, lora_b, slot_ranks, row_slots) -> torch.Tensor:
    """`x @ weight.T + bias` plus each row's expand of its `shrunk` through its slot's B, in
    float32, rounded once to x's dtype. `shrunk` None: the base linear alone."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y += bias.float()
    if shrunk is not None:
        for slot in torch.unique(row_slots[row_slots >= 0]).tolist():
            rows = row_slots == slot
            rank = int(slot_ranks[slot])
            y[rows] += shrunk[rows, :rank].float() @ lora_b[slot, :, :rank].float().T
    return y.to(x.dtype)


@triton.jit
def _gemm_lora_kernel(
    x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, s_ptr, s_row_stride, b_ptr, b_slot_stride, b_row_stride,
    ranks_ptr, max_rank, slots_ptr, out_ptr, out_row_stride, M, N, K,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles walk the column tiles together, so W's tiles are reused from L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid = rows < M
    col_valid = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_valid = k < K
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * x_row_stride + k[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * w_row_stride + k[None, :],
                    mask=col_valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_LORA:
        r = tl.arange(0, BLOCK_R)
        row_slot = tl.load(slots_ptr + rows, mask=row_valid, other=-1)
        shrunk = tl.load(s_ptr + rows[:, None].to(tl.int64) * s_row_stride + r[None, :],
                         mask=row_valid[:, None] & (r[None, :] < max_rank), other=0.0)
        # The slots present in this row tile, in increasing order (at prefill one or two); 2**30
        # stands for none left.
        slot = tl.min(tl.where(row_slot >= 0, row_slot, 1073741824))
        while slot < 1073741824:
            rank = tl.minimum(tl.load(ranks_ptr + slot), max_rank)
            in_rank = r < rank
            part = tl.where((row_slot == slot)[:, None] & in_rank[None, :], shrunk, 0.0)
            b = tl.load(b_ptr + slot.to(tl.int64) * b_slot_stride + cols[:, None].to(tl.int64) * b_row_stride
                        + r[None, :], mask=col_valid[:, None] & in_rank[None, :], other=0.0)
            acc = tl.dot(part.to(b.dtype), tl.trans(b), acc, input_precision=PRECISION)
            slot = tl.min(tl.where(row_slot > slot, row_slot, 1073741824))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_row_stride + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def gemm_lora_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shrunk: torch.Tensor | None,
                     lora_b: torch.Tensor, slot_ranks: torch.Tensor, row_slots: torch.Tensor, out: torch.Tensor,
                     config: tuple[int, int, int, int, int] = DEFAULT_CONFIG, group_m: int = 8) -> torch.Tensor:
    """`gemm_lora_reference` into `out [rows, out_features]` in one launch. `x [rows, in]`,
    `weight [out, in]`, `shrunk [rows, max_rank]` (None: the base linear alone), `lora_b [slots,
    out, max_rank]` (the scaling in it), `slot_ranks [slots]`, `row_slots [rows]` int32 (-1: no
    LoRA); `config` is (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). `row_slots` must name slots
    below `lora_b.shape[0]` or -1 (not checked: it lives on the device)."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    max_rank = lora_b.shape[2]
    if weight.shape[1] != in_features or out.shape != (rows, out_features):
        raise ValueError(f"shapes: x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}")
    if shrunk is not None and (shrunk.shape != (rows, max_rank) or lora_b.shape[1] != out_features
                               or row_slots.shape != (rows,) or slot_ranks.shape != (lora_b.shape[0],)):
        raise ValueError(f"LoRA shapes: shrunk {tuple(shrunk.shape)}, lora_b {tuple(lora_b.shape)}, "
                         f"row_slots {tuple(row_slots.shape)}, slot_ranks {tuple(slot_ranks.shape)}")
    for name, tensor in (("x", x), ("weight", weight), ("out", out), ("shrunk", shrunk), ("lora_b", lora_b),
                         ("bias", bias), ("row_slots", row_slots if shrunk is not None else None),
                         ("slot_ranks", slot_ranks if shrunk is not None else None)):
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous")
    block_m, block_n, block_k, warps, stages = config
    has_lora = shrunk is not None
    grid = (cdiv(rows, block_m) * cdiv(out_features, block_n),)
    _gemm_lora_kernel[grid](
        x, x.stride(0), weight, weight.stride(0), bias if bias is not None else out,
        shrunk if has_lora else out, shrunk.stride(0) if has_lora else 0,
        lora_b, lora_b.stride(0), lora_b.stride(1), slot_ranks, max_rank, row_slots, out, out.stride(0),
        rows, out_features, in_features,
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_R=max(16, _next_power_of_2(max_rank)), GROUP_M=group_m,
        # float32 tensors would run as tf32 by default: the oracle's float32 needs "ieee".
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
    )
    return out
