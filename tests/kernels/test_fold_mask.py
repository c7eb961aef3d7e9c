"""The fold's mask (`kernels/fold_mask.py`): each row keeps its own slot's columns of the folded
shrink, in one Triton launch equal to the plain-torch reference, on fresh random tables and
values (CPU: Triton's interpreter)."""

import os

import pytest
import torch

from mmlora_fx.kernels.fold_mask import fold_mask_, fold_mask_reference, fold_mask_triton
from mmlora_fx.kernels.reference import row_slots

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
triton_device = pytest.mark.skipif(not (HAS_CUDA or INTERPRETING), reason="needs a GPU or TRITON_INTERPRET=1")


def _tables(requests: int, entries: int, slots: int, generator, empty=False):
    weights = torch.randint(0 if empty else 1, 5, (requests,), generator=generator)
    request_slots = torch.full((entries,), -1, dtype=torch.int32)
    request_slots[:requests] = torch.randint(-1, slots, (requests,), generator=generator, dtype=torch.int32)
    cum = torch.full((entries + 1,), int(weights.sum()), dtype=torch.int64)
    cum[0] = 0
    cum[1:requests + 1] = weights.cumsum(0)
    return request_slots, cum


@triton_device
@pytest.mark.parametrize("seed", range(12))
def test_one_launch_keeps_what_the_reference_keeps(seed):
    generator = torch.Generator().manual_seed(seed)
    device = "cuda" if HAS_CUDA else "cpu"
    rows = int(torch.randint(1, 90, (1,), generator=generator))
    slots, rank = int(torch.randint(1, 5, (1,), generator=generator)), int(torch.randint(1, 9, (1,), generator=generator))
    width = slots * rank + int(torch.randint(0, 8, (1,), generator=generator))  # alignment padding past the slots
    requests = int(torch.randint(1, 9, (1,), generator=generator))
    entries = requests + int(torch.randint(0, 70, (1,), generator=generator))  # more than one block of 64
    request_slots, cum = _tables(requests, entries, slots, generator)
    shrunk = torch.randn(rows, width, generator=generator)
    expected = shrunk.clone()
    fold_mask_reference(expected, request_slots, cum, rank)
    ours = shrunk.to(device)
    fold_mask_triton(ours, request_slots.to(device), cum.to(device), rank)
    assert torch.equal(ours.cpu(), expected)
    # The reference itself: a row keeps exactly its slot's columns.
    owner = row_slots(request_slots, cum, rows)
    for row in range(rows):
        kept = (torch.arange(width) // rank) == owner[row]
        assert torch.equal(expected[row][kept], shrunk[row][kept]) and not expected[row][~kept].any()


@triton_device
def test_base_rows_and_an_empty_batch_keep_nothing_and_inf_elsewhere_gives_no_nan():
    device = "cuda" if HAS_CUDA else "cpu"
    request_slots = torch.tensor([1, -1, 0, -1], dtype=torch.int32, device=device)
    cum = torch.tensor([0, 2, 4, 6, 6], dtype=torch.int64, device=device)
    shrunk = torch.randn(12, 6, device=device)
    shrunk[:, 2:4] = float("inf")  # slot 1's columns (rank 2) overflowed
    fold_mask_(shrunk, request_slots, cum, 2) if device == "cuda" else fold_mask_triton(shrunk, request_slots, cum, 2)
    assert not shrunk.isnan().any()
    assert shrunk[4:8].eq(0).all()  # the base model's rows
    assert shrunk[8:, :2].ne(0).all() and shrunk[8:, 2:].eq(0).all()  # slot 0's rows keep only slot 0
    empty = torch.randn(5, 6, device=device)
    fold_mask_triton(empty, request_slots, torch.zeros(5, dtype=torch.int64, device=device), 2)
    assert empty.eq(0).all()


def test_mismatched_tables_are_refused():
    with pytest.raises(ValueError, match="running weights"):
        fold_mask_triton(torch.zeros(3, 4), torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64), 2)
