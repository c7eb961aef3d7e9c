"""The stacked linear's expand (`kernels/lora_stacked.py`): each row's own slot's shrink, read from
the output's extra columns, times its B, added to the output in place. The Triton launch (CPU:
Triton's interpreter, set by tests/conftest.py) against the plain-torch reference, and both against
a per-row loop written here, on fresh random tables and values (never zeros)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mmlora_fx.kernels.lora_stacked import (
    lora_stacked_expand_,
    lora_stacked_expand_reference,
    lora_stacked_expand_triton,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
triton_device = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1")

SLOTS = 5
PAD = 3  # padding columns past the slots' shrinks
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


@dataclasses.dataclass
class Stacked:
    outputs: list[torch.Tensor]
    out_features: list[int]
    lora_b: list[torch.Tensor]
    slot_ranks: list[torch.Tensor]
    request_slots: torch.Tensor
    request_cum_weights: torch.Tensor
    parents: list[torch.Tensor]  # what the outputs are views of (the outputs themselves without views)

    def args(self, outputs: list[torch.Tensor]) -> tuple:
        return outputs, self.out_features, self.lora_b, self.slot_ranks, self.request_slots, self.request_cum_weights

    def fresh(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of the outputs, the same views of copies of their parents: (outputs, parents)."""
        parents = [parent.clone() for parent in self.parents]
        return [parent[:, :output.shape[1]] for parent, output in zip(parents, self.outputs)], parents


def make_stacked(rows: int, out_features: tuple[int, ...], rank: int, dtype: torch.dtype, views: bool,
                 seed: int) -> Stacked:
    """Six requests of unequal weights over `rows` rows (request 1 on the base model, request 2 of
    weight 0, two padding entries), `SLOTS` slots: slot 0 of rank `rank` (above it for sibling 1,
    which must clamp), slot 1 of rank 0, the others below `rank`. With `views`, each output is
    the left part of a wider tensor (a larger row stride) and each B a slice of a larger one."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE)

    width = SLOTS * rank + PAD
    outputs, parents, lora_b, slot_ranks = [], [], [], []
    for j, out in enumerate(out_features):
        parent = randn(rows, out + width + (5 if views else 0))
        parents.append(parent)
        outputs.append(parent[:, :out + width])
        b = randn(SLOTS, out + 2, rank + 3).mul_(0.5)[:, 1:out + 1, :rank] if views else randn(SLOTS, out, rank)
        assert views == (not b.is_contiguous())
        lora_b.append(b)
        ranks = torch.randint(1, rank, (SLOTS,), generator=generator)
        ranks[0], ranks[1] = rank + (4 if j == 1 else 0), 0
        slot_ranks.append(ranks.to(torch.int32 if j % 2 == 0 else torch.int64).to(DEVICE))
    requests, entries = 6, 8
    weights = torch.randint(1, 4, (requests,), generator=generator)
    weights[2] = 0
    request_slots = torch.randint(0, SLOTS, (entries,), generator=generator, dtype=torch.int32)
    request_slots[0] = 2 + seed % (SLOTS - 2)  # a rank below the buffers' owns the first row
    request_slots[1] = -1
    cum = torch.zeros(entries + 1, dtype=torch.int64)
    cum[1:requests + 1] = weights.cumsum(0)
    cum[requests + 1:] = cum[requests]
    return Stacked(outputs, list(out_features), lora_b, slot_ranks, request_slots.to(DEVICE), cum.to(DEVICE), parents)


def per_row_loop(problem: Stacked) -> tuple[list[torch.Tensor], list[bool]]:
    """The expected outputs in float64 from a loop over rows and requests, and which rows it changed."""
    rows = problem.outputs[0].shape[0]
    cum = problem.request_cum_weights.cpu().tolist()
    request_slots = problem.request_slots.cpu().tolist()
    total = cum[-1]
    expected = [output.detach().cpu().double().clone() for output in problem.outputs]
    changed = [False] * rows
    for row in range(rows):
        owners = [r for r in range(len(request_slots)) if cum[r] * rows <= row * total < cum[r + 1] * rows]
        slot = request_slots[owners[0]] if owners else -1
        if slot < 0:
            continue
        for want, features, b, ranks in zip(expected, problem.out_features, problem.lora_b, problem.slot_ranks):
            max_rank = b.shape[2]
            rank = min(int(ranks[slot]), max_rank)
            if rank == 0:
                continue
            start = features + slot * max_rank
            shrunk = want[row, start:start + rank].clone()
            want[row, :features] += b[slot, :, :rank].cpu().double() @ shrunk
            changed[row] = True
    return expected, changed


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu().double(), want.cpu().double(), rtol=tolerance, atol=tolerance)


CASES = [
    # rows, siblings' out features, buffers' rank, dtype, views
    (1, (48,), 8, torch.float32, False),
    (3, (48, 16), 8, torch.bfloat16, True),
    (8, (48, 16, 16), 8, torch.float32, True),
    (8, (48, 16, 16), 8, torch.bfloat16, False),
    (3, (144, 16, 40), 40, torch.float32, False),  # R = 40: blocks of 32 columns, several per sibling
]


@triton_device
@pytest.mark.parametrize("row_path_max_rows", [0, 10**6], ids=["tiles", "rows"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"rows{c[0]}-sib{len(c[1])}-r{c[2]}-{str(c[3])[6:]}"
                                                      f"{'-views' if c[4] else ''}")
def test_triton_and_reference_match_a_per_row_loop(case, row_path_max_rows):
    # Both kernels on every case: one program per row, and per tile of rows of one slot (searched).
    rows, out_features, rank, dtype, views = case
    problem = make_stacked(rows, out_features, rank, dtype, views, seed=CASES.index(case))
    expected, changed = per_row_loop(problem)
    assert any(changed)

    ours, ours_parents = problem.fresh()
    lora_stacked_expand_triton(*problem.args(ours), row_path_max_rows=row_path_max_rows)
    reference, reference_parents = problem.fresh()
    lora_stacked_expand_reference(*problem.args(reference))

    for j, features in enumerate(out_features):
        assert_close(reference[j], expected[j], dtype)
        assert_close(ours[j], expected[j], dtype)
        assert_close(ours[j], reference[j], dtype)
        for got, parents in ((ours, ours_parents), (reference, reference_parents)):
            # Rows no slot adapts are left bit for bit, as is everything past the base output.
            unchanged = ~torch.tensor(changed, device=got[j].device)
            assert torch.equal(got[j][unchanged], problem.outputs[j][unchanged])
            assert torch.equal(parents[j][:, features:], problem.parents[j][:, features:])


@triton_device
@pytest.mark.parametrize("plan_for", ["these tables", "other tables"])
def test_the_tiles_read_from_a_tile_plan_where_it_covers_the_call(plan_for):
    # Decode: one row per request (rows == total weight), the plan the runtime writes once per
    # forward; a plan for other tables is not trusted (the kernel searches instead).
    from mmlora_fx.kernels.tile_plan import build_tile_plan

    problem = make_stacked(20, (48, 16), 8, torch.float32, False, seed=11)
    generator = torch.Generator().manual_seed(3)
    slots = torch.randint(-1, SLOTS, (24,), generator=generator, dtype=torch.int32)
    cum = torch.tensor(list(range(21)) + [20] * 4, dtype=torch.int64)  # 20 requests of one row, 4 padding entries
    problem.request_slots, problem.request_cum_weights = slots.to(DEVICE), cum.to(DEVICE)
    plan = build_tile_plan(slots.tolist(), cum.tolist()) if plan_for == "these tables" else \
        build_tile_plan([0] * 24, list(range(25)))
    expected, changed = per_row_loop(problem)
    assert any(changed)
    ours, _ = problem.fresh()
    lora_stacked_expand_triton(*problem.args(ours), tile_plan=plan.to(DEVICE))
    for j in range(2):
        assert_close(ours[j], expected[j], torch.float32)


@triton_device
def test_a_float32_b_under_bfloat16_outputs_as_under_autocast():
    # An fp32 model in a bf16 autocast: the stacked GEMM gives bf16, the slot buffers stay fp32.
    problem = make_stacked(3, (48, 16), 8, torch.bfloat16, False, seed=7)
    problem.lora_b = [b.float() for b in problem.lora_b]
    expected, changed = per_row_loop(problem)
    assert any(changed)
    for function in (lora_stacked_expand_triton, lora_stacked_expand_reference):
        got, _ = problem.fresh()
        function(*problem.args(got))
        for j in range(2):
            assert_close(got[j], expected[j], torch.bfloat16)


@triton_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_nothing_outside_the_rows_own_rank_is_read(dtype):
    """inf and NaN in every column past the output but the row's own slot's first `rank` (other
    slots, this slot past its rank, the padding) and in B past the ranks: the result is finite
    and the reference's, and those columns keep their inf and NaN."""
    problem = make_stacked(8, (48, 16, 16), 8, dtype, True, seed=40)
    _, changed = per_row_loop(problem)
    rows = 8
    cum = problem.request_cum_weights.cpu().tolist()
    request_slots = problem.request_slots.cpu().tolist()
    for output, features, b, ranks in zip(problem.outputs, problem.out_features, problem.lora_b,
                                          problem.slot_ranks):
        max_rank = b.shape[2]
        for row in range(rows):
            owners = [r for r in range(len(request_slots)) if cum[r] * rows <= row * cum[-1] < cum[r + 1] * rows]
            slot = request_slots[owners[0]] if owners else -1
            keep = min(int(ranks[slot]), max_rank) if slot >= 0 else 0
            poison = torch.full((output.shape[1] - features,), float("nan"), dtype=dtype)
            poison[::2] = float("inf")
            poison[1::4] = -float("inf")
            start = slot * max_rank
            if keep:
                poison[start:start + keep] = output[row, features + start:features + start + keep].cpu()
            output[row, features:] = poison.to(output.device)
        for slot, rank in enumerate(ranks.tolist()):
            b[slot, :, min(rank, max_rank):] = float("nan")
    expected, _ = per_row_loop(problem)

    ours, ours_parents = problem.fresh()
    lora_stacked_expand_triton(*problem.args(ours))
    reference, _ = problem.fresh()
    lora_stacked_expand_reference(*problem.args(reference))
    assert any(changed)
    for j, features in enumerate(problem.out_features):
        assert torch.isfinite(ours[j][:, :features]).all() and torch.isfinite(reference[j][:, :features]).all()
        assert_close(ours[j][:, :features], reference[j][:, :features], dtype)
        assert_close(ours[j][:, :features], expected[j][:, :features], dtype)
        torch.testing.assert_close(ours_parents[j][:, features:], problem.parents[j][:, features:], rtol=0, atol=0,
                                   equal_nan=True)


@triton_device
def test_no_rows_owned_changes_nothing_and_the_dispatcher_takes_the_reference_on_cpu():
    problem = make_stacked(3, (48, 16), 8, torch.float32, False, seed=50)
    problem.request_cum_weights = torch.zeros_like(problem.request_cum_weights)  # every weight 0
    ours, _ = problem.fresh()
    lora_stacked_expand_triton(*problem.args(ours))
    assert all(torch.equal(got, want) for got, want in zip(ours, problem.outputs))

    problem = make_stacked(3, (48, 16), 8, torch.float32, False, seed=51)
    dispatched, _ = problem.fresh()
    lora_stacked_expand_(*problem.args(dispatched))
    direct, _ = problem.fresh()
    (lora_stacked_expand_triton if HAS_CUDA else lora_stacked_expand_reference)(*problem.args(direct))
    assert all(torch.equal(got, want) for got, want in zip(dispatched, direct))


def _broken(change: str) -> tuple:
    """A valid call (two siblings, 4 slots of rank 4, width 16) with one thing wrong."""
    out_features = [8, 6]
    outputs = [torch.randn(3, features + 16) for features in out_features]
    lora_b = [torch.randn(4, features, 4) for features in out_features]
    ranks = [torch.full((4,), 4, dtype=torch.int32) for _ in out_features]
    request_slots = torch.tensor([0, 1], dtype=torch.int32)
    cum = torch.tensor([0, 1, 2], dtype=torch.int64)
    if change == "lengths":
        lora_b = lora_b[:1]
    elif change == "no siblings":
        outputs, out_features, lora_b, ranks = [], [], [], []
    elif change == "four siblings":
        outputs, out_features, lora_b, ranks = outputs * 2, out_features * 2, lora_b * 2, ranks * 2
    elif change == "3d output":
        outputs[1] = outputs[1][None]
    elif change == "columns not contiguous":
        outputs[0] = torch.randn(outputs[0].shape[1], 3).T
    elif change == "too narrow":
        outputs[1] = outputs[1][:, :-1]
    elif change == "b shape":
        lora_b[1] = torch.randn(4, 6, 5)
    elif change == "b dtype":
        lora_b[0] = lora_b[0].to(torch.int32)
    elif change == "rank table":
        ranks[1] = ranks[1][:3]
    elif change == "running weights":
        cum = cum[:2]
    return outputs, out_features, lora_b, ranks, request_slots, cum


ERRORS = {
    "lengths": "expected 1 to 3 siblings",
    "no siblings": "expected 1 to 3 siblings",
    "four siblings": "expected 1 to 3 siblings",
    "3d output": "must be 2D",
    "columns not contiguous": "contiguous columns",
    "too narrow": "need at least",
    "b shape": "B is",
    "b dtype": "B is",
    "rank table": "slot_ranks",
    "running weights": "running weights",
}


@pytest.mark.parametrize("function", [lora_stacked_expand_triton, lora_stacked_expand_reference],
                         ids=["triton", "reference"])
@pytest.mark.parametrize("change", list(ERRORS))
def test_bad_calls_are_refused(function, change):
    with pytest.raises(ValueError, match=ERRORS[change]):
        function(*_broken(change))


def test_the_unchanged_call_of_the_error_tests_is_valid():
    outputs, *rest = _broken("none")
    before = [output.clone() for output in outputs]
    lora_stacked_expand_reference(outputs, *rest)
    assert not torch.equal(outputs[0], before[0])
