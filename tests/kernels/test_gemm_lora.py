"""A prefill linear with its LoRA expand in the GEMM's epilogue (`kernels/gemm_lora.py`,
experimental): the Triton kernel (CPU: Triton's interpreter, set by tests/conftest.py) against the
plain-torch reference, and the reference against LoRA's formula written here, on fresh random
values, with rows of several slots (and none) sharing a row tile."""

from __future__ import annotations

import os

import pytest
import torch

from mmlora_fx.kernels.gemm_lora import gemm_lora_reference, gemm_lora_triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
triton_device = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1")

SLOTS, MAX_RANK = 3, 6
# 70 rows in segments of one slot each (-1: the base model), so that 16-row tiles hold a slot
# beside base rows (0-15), base rows only (16-31), three slots and base rows (32-47), one slot.
SEGMENTS = ((2, 10), (-1, 22), (0, 4), (1, 5), (-1, 2), (2, 27))
SMALL = (16, 16, 16, 4, 1)  # the interpreter's tiles: tl.dot needs 16


def _problem(out_features=40, in_features=56, seed=0, bias=True, segments=SEGMENTS, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    rows = sum(count for _, count in segments)
    row_slots = torch.cat([torch.full((count,), slot, dtype=torch.int32) for slot, count in segments])
    lora_a = randn(SLOTS, MAX_RANK, in_features) * in_features ** -0.5
    lora_b = randn(SLOTS, out_features, MAX_RANK)
    ranks = torch.tensor([MAX_RANK, 2, 4], dtype=torch.int32)
    x = randn(rows, in_features)
    shrunk = torch.einsum("mk,mrk->mr", x, lora_a[row_slots.clamp(min=0).long()])
    # Past a slot's rank its B and the rows' shrink hold inf: a kernel that reads them spoils the rows.
    for slot, rank in enumerate(ranks.tolist()):
        lora_b[slot, :, rank:] = float("inf")
        shrunk[row_slots == slot, rank:] = float("inf")
    problem = dict(x=x, weight=randn(out_features, in_features) * in_features ** -0.5,
                   bias=randn(out_features) if bias else None, shrunk=shrunk, lora_b=lora_b, slot_ranks=ranks,
                   row_slots=row_slots)
    problem = {name: value.to(DEVICE) if value is not None else None for name, value in problem.items()}
    for name in ("x", "weight", "bias", "shrunk", "lora_b"):
        if problem[name] is not None:
            problem[name] = problem[name].to(dtype)
    return problem, lora_a


def test_reference_is_the_base_linear_plus_each_rows_lora():
    problem, lora_a = _problem()
    got = gemm_lora_reference(**problem)
    expected = torch.nn.functional.linear(problem["x"], problem["weight"], problem["bias"])
    for row, slot in enumerate(problem["row_slots"].tolist()):
        if slot >= 0:
            rank = int(problem["slot_ranks"][slot])
            a, b = lora_a[slot, :rank].to(DEVICE), problem["lora_b"][slot, :, :rank]
            expected[row] += problem["x"][row] @ a.T @ b.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@triton_device
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_the_reference_with_several_slots_in_a_tile(bias):
    problem, _ = _problem(seed=1, bias=bias)
    out = torch.full((problem["x"].shape[0], problem["weight"].shape[0]), float("nan"), device=DEVICE)
    gemm_lora_triton(**problem, out=out, config=SMALL, group_m=2)
    assert torch.isfinite(out).all(), "a value past a slot's rank was read"
    torch.testing.assert_close(out, gemm_lora_reference(**problem), rtol=1e-4, atol=1e-4)


@triton_device
def test_kernel_without_lora_is_the_base_linear():
    problem, _ = _problem(seed=2)
    out = torch.empty(problem["x"].shape[0], problem["weight"].shape[0], device=DEVICE)
    gemm_lora_triton(**dict(problem, shrunk=None), out=out, config=SMALL)
    torch.testing.assert_close(out, torch.nn.functional.linear(problem["x"], problem["weight"], problem["bias"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_CUDA, reason="Hopper-sized tiles in bf16: too slow for the interpreter")
@pytest.mark.parametrize("config", [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                    (64, 128, 64, 4, 4)])
def test_kernel_in_bf16_at_the_benchmarks_configs(config):
    # Several 128-row tiles with two or three slots each (and base rows), N and K not multiples of
    # the blocks: the configs `kernel_bench --epilogue` times, on the tensor cores.
    segments = ((2, 100), (0, 60), (-1, 40), (1, 90), (2, 30), (0, 200))
    problem, _ = _problem(out_features=300, in_features=200, seed=4, segments=segments, dtype=torch.bfloat16)
    out = torch.full((problem["x"].shape[0], 300), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    gemm_lora_triton(**problem, out=out, config=config)
    expected = gemm_lora_reference(**problem)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=5e-2)


def test_refuses_mismatched_shapes():
    problem, _ = _problem(seed=3)
    with pytest.raises(ValueError, match="LoRA shapes"):
        gemm_lora_triton(**dict(problem, shrunk=problem["shrunk"][:, :4]),
                         out=torch.empty(problem["x"].shape[0], problem["weight"].shape[0], device=DEVICE))
