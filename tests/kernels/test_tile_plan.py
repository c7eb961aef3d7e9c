"""Tile plans: the host's grouping of rows by slot, as the tile path's search would find it."""

from __future__ import annotations

import pytest
import torch

from mmlora_fx.kernels.reference import row_slots
from mmlora_fx.kernels.tile_plan import PLAN_BLOCK_M, PLAN_HEADER, build_tile_plan, plan_capacity, tile_plan_size


def tiles_from_rows(slots: list[int], cum: list[int]) -> list[tuple[int, list[int]]]:
    """Each slot's rows (owners from the reference, one row per unit of weight) in 16-row tiles."""
    total = cum[-1]
    owner = row_slots(torch.tensor(slots, dtype=torch.int32), torch.tensor(cum), total).tolist() if total else []
    tiles = []
    for slot in sorted({s for s in owner if s >= 0}):
        rows = [row for row, s in enumerate(owner) if s == slot]
        tiles += [(slot, rows[i:i + PLAN_BLOCK_M]) for i in range(0, len(rows), PLAN_BLOCK_M)]
    return tiles


def tiles_of(plan: torch.Tensor) -> list[tuple[int, list[int]]]:
    capacity = plan_capacity(plan)
    slots = plan[PLAN_HEADER:PLAN_HEADER + capacity]
    rows = plan[PLAN_HEADER + capacity:].view(capacity, PLAN_BLOCK_M)
    return [(int(slots[t]), [r for r in rows[t].tolist() if r >= 0]) for t in range(int(plan[1]))]


@pytest.mark.parametrize("seed", range(60))
def test_plan_holds_each_slots_rows_in_row_order_cut_into_tiles(seed):
    generator = torch.Generator().manual_seed(seed)
    requests = int(torch.randint(1, 80, (1,), generator=generator))
    slots = torch.randint(-1, 12, (requests,), generator=generator).tolist()
    weights = torch.randint(0, 5 if seed % 2 else 2, (requests,), generator=generator).tolist()
    cum = [0]
    for weight in weights:
        cum.append(cum[-1] + weight)
    plan = build_tile_plan(slots, cum)
    if not 0 < cum[-1] <= 256:
        assert int(plan[0]) == -1 and int(plan[1]) == 0
        return
    assert int(plan[0]) == cum[-1]
    assert tiles_of(plan) == tiles_from_rows(slots, cum)
    # Unused tile entries say "no tile" and no row, so a stale read adds nothing.
    capacity = plan_capacity(plan)
    assert (plan[PLAN_HEADER + int(plan[1]):PLAN_HEADER + capacity] == -1).all()


def test_plan_ignores_padding_past_the_batch():
    # Tables padded to max_batch_size: entries past the batch change nothing.
    assert torch.equal(build_tile_plan([2, 0], [0, 1, 2]), build_tile_plan([2, 0], [0, 1, 2, 2, 2]))


def test_batches_a_plan_does_not_cover():
    for slots, cum in (([], [0]), ([1, 2], [0, 0, 0]), ([0] * 3, [0, 100, 200, 300])):
        plan = build_tile_plan(slots, cum)
        assert int(plan[0]) == -1 and int(plan[1]) == 0


def test_plan_size_is_checked():
    assert plan_capacity(build_tile_plan([], [0], capacity=32)) == 32
    with pytest.raises(ValueError, match="tile plan"):
        plan_capacity(torch.zeros(tile_plan_size(32) + 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="tile plan"):
        plan_capacity(torch.zeros(tile_plan_size(32), dtype=torch.int64))
