"""One decode row's linear with its LoRA in one launch (`kernels/gemv_lora.py`, experimental): the
Triton kernel (CPU: Triton's interpreter, set by tests/conftest.py) against the plain-torch
reference, and the reference against PEFT's formula written here, on fresh random values."""

from __future__ import annotations

import os

import pytest
import torch

from mmlora_fx.kernels.gemv_lora import GemvWorkspace, gemv_config, gemv_lora_reference, gemv_lora_triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
triton_device = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1")

SLOTS, MAX_RANK = 3, 6


def _problem(out_features, in_features, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE)

    lora_a = randn(SLOTS, MAX_RANK, in_features) * in_features ** -0.5
    lora_b = randn(SLOTS, out_features, MAX_RANK)
    ranks = torch.tensor([MAX_RANK, 2, 4], dtype=torch.int32, device=DEVICE)
    # Past slot 1's rank its A and B hold inf: a kernel that reads them spoils the row.
    lora_a[1, 2:] = float("inf")
    lora_b[1, :, 2:] = float("inf")
    return dict(x=randn(1, in_features), weight=randn(out_features, in_features) * in_features ** -0.5,
                bias=randn(out_features) if bias else None, lora_a=lora_a, lora_b=lora_b, slot_ranks=ranks)


def test_reference_is_the_base_linear_plus_the_slots_lora():
    problem = _problem(24, 40, seed=0)
    for slot in (-1, 0, 1, 2):
        got = gemv_lora_reference(**problem, slot=torch.tensor([slot], dtype=torch.int32))
        expected = torch.nn.functional.linear(problem["x"], problem["weight"], problem["bias"])
        if slot >= 0:
            rank = int(problem["slot_ranks"][slot])
            a, b = problem["lora_a"][slot, :rank], problem["lora_b"][slot, :, :rank]
            expected = expected + problem["x"] @ a.T @ b.T
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@triton_device
@pytest.mark.parametrize("out_features, in_features, programs, bias",
                         [(40, 100, 1, True),      # one column block, one split
                          (40, 100, 6, False),     # K split in parts summed by the last program
                          (200, 72, 8, True),      # several blocks, a cut last block, splits past K's end
                          ])
def test_kernel_equals_the_reference_for_every_slot(out_features, in_features, programs, bias):
    problem = _problem(out_features, in_features, seed=out_features + in_features, bias=bias)
    config = gemv_config(out_features, in_features, programs=programs, block_n=32, block_k=16)
    workspace = GemvWorkspace.make(config[2] * out_features, -(-out_features // config[0]), DEVICE)
    out = torch.full((1, out_features), float("nan"), device=DEVICE)
    # Every slot in turn through the same workspace: the counters are back at 0 after each call.
    for slot in (2, -1, 1, 0, 2):
        slot_tensor = torch.tensor([slot], dtype=torch.int32, device=DEVICE)
        gemv_lora_triton(**problem, slot=slot_tensor, out=out, workspace=workspace, config=config)
        expected = gemv_lora_reference(**problem, slot=slot_tensor)
        assert torch.isfinite(out).all(), f"slot {slot}: a value past the slot's rank was read"
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert int(workspace.counters.abs().sum()) == 0
    if programs > 1:
        assert config[2] > 1, "the case meant to split K did not"


def test_splits_cover_k_with_none_empty():
    for out_features, in_features in ((4096, 4096), (4096, 14336), (512, 3584), (3584, 18944), (40, 100)):
        block_n, block_k, splits = gemv_config(out_features, in_features)
        step = -(-(-(-in_features // splits)) // block_k) * block_k  # the launcher's K per split
        assert splits * step >= in_features and (splits - 1) * step < in_features, (out_features, in_features)


def test_wide_outputs_split_k_in_at_least_two_steps_narrow_ones_in_one():
    # The 7B layer's sweep (H100, 2026-12-07): q and o lost with one-step splits, k and v took them.
    for out_features, in_features, least in ((3584, 3584, 2), (18944, 3584, 2), (3584, 18944, 2), (512, 3584, 1)):
        block_n, block_k, splits = gemv_config(out_features, in_features)
        steps = -(-in_features // block_k)
        assert -(-steps // splits) >= least, (out_features, in_features, splits)
    assert gemv_config(3584, 3584) == (128, 128, 14) and gemv_config(512, 3584) == (128, 128, 28)
    assert gemv_config(3584, 3584, min_steps=1) == (128, 128, 28)


def test_refuses_a_workspace_too_small():
    problem = _problem(40, 100, seed=1)
    config = gemv_config(40, 100, programs=6, block_n=32, block_k=16)
    workspace = GemvWorkspace.make(config[2] * 40 - 1, 2, DEVICE)
    with pytest.raises(ValueError, match="workspace"):
        gemv_lora_triton(**problem, slot=torch.tensor([0], dtype=torch.int32, device=DEVICE),
                         out=torch.empty(1, 40, device=DEVICE), workspace=workspace, config=config)
