"""Tile plans: the tile path's grouping of rows by adapter slot, worked out on the host.

Without a plan, every shrink program of every op call finds its tile from the request tables
(`tile_kernels._find_tile`): a search over all requests and slots, run again by each of the
~264 programs of each of a layer's four calls. At decode sizes that search is the largest part
of the shrink. Yet every call of a partition within one forward shares the same request tables,
and at decode the same row count. So when the tables are filled (`TokenSlotTable.fill`, once per
forward, on the host, which has the slots and weights anyway) the tiles are written out once for
the case "one row per unit of weight" (rows == total weight: the language model at decode, one
row per request). A shrink whose row count is that total reads its tile in one load; any other
row count (prefill, the tower's several rows per image token) searches as before.

A plan is one int32 tensor, so that it can sit next to the tables at a fixed address and be
refilled in place between CUDA-graph replays:

* `[0]`: the row count the plan is for (the total weight), or -1: no plan;
* `[1]`: how many tiles it holds;
* `[HEADER + t]`: tile t's slot, for t below the capacity;
* `[HEADER + capacity + t * PLAN_BLOCK_M + i]`: tile t's rows (-1 past its last row).

Tiles are laid out as the search lays them out (slots in increasing order, each slot's rows in
row order cut into tiles of `PLAN_BLOCK_M`), so both give the same tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["PLAN_BLOCK_M", "PLAN_CAPACITY", "build_tile_plan", "plan_capacity", "tile_plan_size"]

PLAN_HEADER = 16  # entries before the slots, so that the slots and rows start 64-byte aligned
_PLAN_HEADER = tl.constexpr(PLAN_HEADER)  # the same, for the kernels (globals they read must be constexpr)
PLAN_BLOCK_M = 16  # rows per tile: the tile path's tile height at decode sizes (`choose_config`)
# Most rows a plan covers: the decode sizes the tile path serves with 16-row tiles. Every tile
# holds at least one row, so this many rows never need more tiles than this.
PLAN_CAPACITY = 256


def tile_plan_size(capacity: int = PLAN_CAPACITY) -> int:
    """Entries of a plan tensor covering up to `capacity` rows."""
    return PLAN_HEADER + capacity * (1 + PLAN_BLOCK_M)


def plan_capacity(plan: torch.Tensor) -> int:
    """The capacity of a plan tensor, checking its size and type."""
    capacity, remainder = divmod(plan.numel() - PLAN_HEADER, 1 + PLAN_BLOCK_M)
    if plan.dtype != torch.int32 or plan.dim() != 1 or remainder or capacity < 0 or capacity % 16:
        raise ValueError(f"a tile plan is a 1-d int32 tensor of tile_plan_size(capacity) entries with capacity a "
                         f"multiple of 16, got {plan.dtype} of shape {tuple(plan.shape)}")
    return capacity


def build_tile_plan(slots: Sequence[int], cum_weights: Sequence[int], capacity: int = PLAN_CAPACITY) -> torch.Tensor:
    """The plan (a CPU tensor) for requests with these slots and running weights.

    Covers rows == total weight, where request r owns rows cum_weights[r] .. cum_weights[r + 1].
    A batch whose total is 0 or above `capacity` gets an empty plan (the kernels search).
    """
    # Filled by slices: building the whole plan as one list would take several times longer.
    plan = torch.full((tile_plan_size(capacity),), -1, dtype=torch.int32)
    plan[1:PLAN_HEADER] = 0
    total = int(cum_weights[len(slots)]) if len(cum_weights) > len(slots) else 0
    if not 0 < total <= capacity:
        return plan
    rows_of_slot: dict[int, list[int]] = {}
    for request, slot in enumerate(slots):
        if slot >= 0:
            rows_of_slot.setdefault(int(slot), []).extend(range(int(cum_weights[request]),
                                                                int(cum_weights[request + 1])))
    tile_slots, tile_rows = [], []
    for slot in sorted(rows_of_slot):
        rows = rows_of_slot[slot]
        for start in range(0, len(rows), PLAN_BLOCK_M):
            chunk = rows[start:start + PLAN_BLOCK_M]
            tile_slots.append(slot)
            tile_rows += chunk + [-1] * (PLAN_BLOCK_M - len(chunk))
    tiles = len(tile_slots)
    plan[0], plan[1] = total, tiles
    if tiles:
        plan[PLAN_HEADER:PLAN_HEADER + tiles] = torch.tensor(tile_slots, dtype=torch.int32)
        rows_start = PLAN_HEADER + capacity
        plan[rows_start:rows_start + tiles * PLAN_BLOCK_M] = torch.tensor(tile_rows, dtype=torch.int32)
    return plan


@triton.jit
def planned_tile(tile, plan_ptr, capacity, rows, total, num_slots, BLOCK_M: tl.constexpr):
    """Whether the plan covers `rows` rows of a batch of this `total`, and if so `tile`'s slot
    (-1: no such tile) and rows. All loads are issued at once: one round trip to memory."""
    header = tl.load(plan_ptr + tl.arange(0, 2))
    # Clamped indices rather than masks: the tile may lie past the capacity (tiles of a row count
    # the plan does not cover), and loads stay unmasked, which every Triton interpreter accepts.
    within = tile < capacity
    entry = tl.minimum(tile, capacity - 1)
    slot = tl.load(plan_ptr + _PLAN_HEADER + entry)
    tile_rows = tl.load(plan_ptr + _PLAN_HEADER + capacity + entry * BLOCK_M + tl.arange(0, BLOCK_M))
    planned_rows = tl.sum(tl.where(tl.arange(0, 2) == 0, header, 0), axis=0)
    tiles = tl.sum(tl.where(tl.arange(0, 2) == 1, header, 0), axis=0)
    covered = (planned_rows == rows) & (planned_rows == total)
    slot = tl.where(within & (tile < tiles) & (slot < num_slots), slot, -1)
    return covered, slot, tl.where(within, tile_rows, -1)
