"""`tile_counters`: zeroed counters handed out once per call site, never shared."""

from __future__ import annotations

import torch

from mmlora_fx.kernels import tile_counters


def test_claims_are_zero_and_do_not_overlap(monkeypatch):
    monkeypatch.setattr(tile_counters, "_POOLS", {})
    device = torch.device("cpu")
    first, second = tile_counters.claim(5, device), tile_counters.claim(7, device)
    assert first.dtype == torch.int32 and first.numel() == 5 and second.numel() == 7
    assert not first.any() and not second.any()
    first.fill_(1)
    assert not second.any()  # another call site's span
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()  # one pool per device


def test_a_spent_pool_gives_none_and_the_caller_zeroes_per_call(monkeypatch):
    monkeypatch.setattr(tile_counters, "_POOLS", {})
    monkeypatch.setattr(tile_counters, "POOL_SIZE", 10)
    device = torch.device("cpu")
    assert tile_counters.claim(8, device) is not None
    assert tile_counters.claim(3, device) is None
    assert tile_counters.claim(2, device).numel() == 2  # what is left still serves smaller claims
    assert tile_counters.claim(0, device) is None
    assert not tile_counters.fresh(4, device).any()
