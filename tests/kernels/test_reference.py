"""The plain-torch reference and baseline against independent Python loops (CPU)."""

from __future__ import annotations

import pytest
import torch

from mmlora_fx.kernels.reference import lora_add_gather_bmm, lora_add_reference, row_slots

from .problems import PATTERNS, assert_matches, make_problem


def row_slots_loop(slots: list[int], cum: list[int], rows: int) -> list[int]:
    """Row i belongs to request r iff cum[r] * rows <= i * total < cum[r + 1] * rows."""
    total = cum[-1]
    result = []
    for i in range(rows):
        owner = -1
        if total > 0:
            for r in range(len(slots)):
                if cum[r] * rows <= i * total < cum[r + 1] * rows:
                    owner = slots[r]
                    break
        result.append(owner)
    return result


@pytest.mark.parametrize("seed", range(40))
def test_row_slots_matches_loop(seed):
    generator = torch.Generator().manual_seed(seed)
    requests = int(torch.randint(1, 9, (1,), generator=generator))
    max_requests = requests + int(torch.randint(0, 3, (1,), generator=generator))
    weights = torch.randint(0, 6, (requests,), generator=generator)
    if seed % 10 == 0:
        weights.zero_()  # total 0: every row on the base model
    cum = [0] + weights.cumsum(0).tolist()
    cum += [cum[-1]] * (max_requests - requests)
    slots = torch.randint(-1, 7, (max_requests,), generator=generator).tolist()
    # Rows as a multiple of the total (tower), equal to it (language model), or neither.
    for rows in {cum[-1], 2 * cum[-1], int(torch.randint(1, 30, (1,), generator=generator))}:
        got = row_slots(torch.tensor(slots, dtype=torch.int32), torch.tensor(cum, dtype=torch.int64), rows)
        assert got.dtype == torch.int64
        assert got.tolist() == row_slots_loop(slots, cum, rows), (slots, cum, rows)


def test_row_slots_known_case():
    # Two image tokens for request 0, none for request 1, one for request 2; 6 rows: 2 per token.
    got = row_slots(torch.tensor([3, 5, -1, 7], dtype=torch.int32), torch.tensor([0, 2, 2, 3, 3]), 6)
    assert got.tolist() == [3, 3, 3, 3, -1, -1]


def reference_loop(problem) -> list[torch.Tensor]:
    """Row by row in float64, straight from the definition."""
    inputs = problem.x.double().reshape(-1, problem.x.shape[-1])
    slots = row_slots_loop(problem.request_slots.tolist(), problem.request_cum_weights.tolist(), inputs.shape[0])
    results = []
    for output, a, b, ranks in zip(problem.outputs, problem.lora_a, problem.lora_b, problem.slot_ranks):
        result = output.double().clone().reshape(-1, output.shape[-1])
        for i, slot in enumerate(slots):
            rank = int(ranks[slot]) if slot >= 0 else 0
            if rank:
                result[i] += b[slot, :, :rank].double() @ (a[slot, :rank].double() @ inputs[i])
        results.append(result.reshape(output.shape))
    return results


@pytest.mark.parametrize("pattern", PATTERNS)
def test_reference_matches_loop(pattern):
    problem = make_problem(pattern=pattern, requests=5, rows_per_request=3, in_features=24,
                           out_features=(16, 8, 20), num_slots=6, max_rank=8, dtype=torch.float64,
                           max_requests=7, seed=PATTERNS.index(pattern))
    outputs = problem.fresh_outputs()
    lora_add_reference(*problem.args(outputs))
    for got, want in zip(outputs, reference_loop(problem)):
        # The reference multiplies in float32 whatever the inputs; the loop in float64.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["mixed", "every_row_different", "zero_weight_requests", "base_only"])
def test_gather_bmm_matches_reference(pattern, dtype):
    problem = make_problem(pattern=pattern, requests=6, rows_per_request=2, in_features=40,
                           out_features=(24, 16), num_slots=5, max_rank=16, dtype=dtype, seed=3)
    outputs = problem.fresh_outputs()
    lora_add_gather_bmm(*problem.args(outputs))
    assert_matches(problem, outputs)
