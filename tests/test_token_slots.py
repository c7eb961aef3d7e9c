"""Token tables: requests own rows in proportion to their weights, whatever the row count."""

import pytest
import torch

from mmlora_fx.errors import BatchError
from mmlora_fx.kernels.reference import row_slots
from mmlora_fx.kernels.tile_plan import build_tile_plan
from mmlora_fx.token_slots import TokenSlotTable


def test_rows_follow_request_weights_at_any_row_count():
    table = TokenSlotTable("tower", max_batch_size=6, device=torch.device("cpu"))
    table.fill([3, -1, 0, 5], [2, 0, 1, 3])  # a request without images owns no tower rows
    for rows_per_token in (1, 4):
        rows = 6 * rows_per_token
        slots = row_slots(table.request_slots, table.request_cum_weights, rows).tolist()
        expected = [3] * 2 * rows_per_token + [0] * rows_per_token + [5] * 3 * rows_per_token
        assert slots == expected


def test_refilling_replaces_the_previous_batch_in_place():
    table = TokenSlotTable("language_model", max_batch_size=4, device=torch.device("cpu"))
    addresses = (table.request_slots.data_ptr(), table.request_cum_weights.data_ptr())
    table.fill([1, 2, 3, 0], [1, 1, 1, 1])
    table.fill([2, -1], [1, 1])
    assert (table.request_slots.data_ptr(), table.request_cum_weights.data_ptr()) == addresses
    assert row_slots(table.request_slots, table.request_cum_weights, 4).tolist() == [2, 2, -1, -1]
    table.fill([], [])
    assert row_slots(table.request_slots, table.request_cum_weights, 3).tolist() == [-1, -1, -1]


def test_the_same_batch_again_copies_nothing_and_a_change_after_it_is_written(monkeypatch):
    # Decode steps of an unchanged batch refill the same tables: no host-to-device copies then.
    table = TokenSlotTable("language_model", max_batch_size=4, device=torch.device("cpu"))
    table.fill([1, -1, 0], [1, 1, 1])
    copies = []
    original = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *args, **kwargs: copies.append(self) or original(
        self, *args, **kwargs))
    table.fill([1, -1, 0], [1, 1, 1])
    assert copies == []
    table.fill([1, 0, 0], [1, 1, 1])  # one request's adapter changed
    assert len(copies) == 3  # slots, running weights, tile plan
    assert row_slots(table.request_slots, table.request_cum_weights, 3).tolist() == [1, 0, 0]
    assert torch.equal(table.tile_plan, build_tile_plan([1, 0, 0], [0, 1, 2, 3]))
    table.fill([1, 0, 0], [1, 2, 1])  # same slots, other weights
    assert row_slots(table.request_slots, table.request_cum_weights, 4).tolist() == [1, 0, 0, 0]
    assert len(copies) == 6
    table.forget()  # a benchmark repeating a batch that must pay a new batch's writes
    table.fill([1, 0, 0], [1, 2, 1])
    assert len(copies) == 9
    assert row_slots(table.request_slots, table.request_cum_weights, 4).tolist() == [1, 0, 0, 0]


def test_rows_that_do_not_split_are_refused():
    table = TokenSlotTable("tower", max_batch_size=4, device=torch.device("cpu"))
    table.fill([0, 1], [2, 1])
    table.check_rows(12)
    with pytest.raises(BatchError, match="saw 10 rows, which do not split"):
        table.check_rows(10)


def test_batches_larger_than_the_tables_are_refused():
    table = TokenSlotTable("language_model", max_batch_size=2, device=torch.device("cpu"))
    with pytest.raises(BatchError, match="max_batch_size is 2"):
        table.fill([0, 0, 0], [1, 1, 1])


def test_filling_writes_the_tile_plan_in_place():
    table = TokenSlotTable("language_model", max_batch_size=8, device=torch.device("cpu"))
    address = table.tile_plan.data_ptr()
    table.fill([4, -1, 0, 4], [1, 1, 1, 1])
    assert torch.equal(table.tile_plan, build_tile_plan([4, -1, 0, 4], [0, 1, 2, 3, 4]))
    table.fill([], [])
    assert table.tile_plan.data_ptr() == address
    assert int(table.tile_plan[0]) == -1  # no batch: the kernels search (and find nothing)


def test_rows_no_request_owns_are_refused_when_an_adapter_was_asked_for():
    table = TokenSlotTable("tower", max_batch_size=4, device=torch.device("cpu"))
    table.fill([0, -1], [0, 0])  # an adapter asked for, but no image tokens to weigh the tower by
    with pytest.raises(BatchError, match="saw 12 rows, but no request of the batch owns any tower row"):
        table.check_rows(12)
    table.fill([-1, -1], [0, 0])  # every request on the base model: nothing to attribute
    table.check_rows(12)
    table.fill([], [])
    table.check_rows(12)
