"""`tile_counters`: zeroed counters made once per device, handed out once per call site, never shared."""

from __future__ import annotations

import pytest
import torch

from mmlora_fx.kernels import tile_counters

CPU = torch.device("cpu")


@pytest.fixture
def pools(monkeypatch):
    monkeypatch.setattr(tile_counters, "_POOLS", {})


def test_nothing_is_claimed_before_the_pool_is_made(pools):
    # Made on first use, the pool could land in a CUDA-graph warm-up's private memory.
    assert tile_counters.claim(4, CPU) is None
    tile_counters.make_pool(CPU)
    assert tile_counters.claim(4, CPU) is not None


def test_claims_are_zero_and_do_not_overlap(pools):
    tile_counters.make_pool(CPU)
    first, second = tile_counters.claim(5, CPU), tile_counters.claim(7, CPU)
    assert first.dtype == torch.int32 and first.numel() == 5 and second.numel() == 7
    assert not first.any() and not second.any()
    first.fill_(1)
    assert not second.any()  # another call site's span
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # one pool per device
    assert second.storage_offset() % 4 == 0  # spans keep 16-byte alignment


def test_a_spent_pool_gives_none_and_says_so_once(pools, monkeypatch, caplog):
    monkeypatch.setattr(tile_counters, "POOL_SIZE", 12)
    tile_counters.make_pool(CPU)
    assert tile_counters.claim(8, CPU) is not None
    with caplog.at_level("WARNING", logger=tile_counters.__name__):
        assert tile_counters.claim(5, CPU) is None
        assert tile_counters.claim(1, CPU) is None
    assert [record.message for record in caplog.records if "spent" in record.message] and len(caplog.records) == 1
    assert tile_counters.claim(0, CPU) is None


def test_the_last_span_can_be_given_back(pools):
    tile_counters.make_pool(CPU)
    kept = tile_counters.claim(3, CPU)
    last = tile_counters.claim(6, CPU)
    tile_counters.release(kept)  # not the last one: stays claimed
    tile_counters.release(last)
    again = tile_counters.claim(6, CPU)
    assert again.storage_offset() == last.storage_offset() and kept.storage_offset() == 0
