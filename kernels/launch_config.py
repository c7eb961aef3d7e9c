"""Launch heuristics of `mmlora::lora_add_`: which path, blocks, splits and launch mode a call gets.

Everything here is decided from static shapes (rows, feature sizes, rank, slot and request
counts) and the device, never from tensor contents, so that the op stays capturable in a CUDA
graph. The launcher (`lora_add.py`) asks; the kernels (`tile_kernels.py`, `row_kernels.py`)
only receive the answers as arguments and constexprs.

The module globals below are the heuristic's thresholds; `benchmarks/e2e.py --paths` patches
them (and `PLAN_BLOCK_M`) on this module to force a path, so they are read at call time here.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from .tile_plan import PLAN_BLOCK_M

__all__ = ["LaunchConfig", "choose_config", "tile_bound"]

# Programs the shrink aims for: about two per multiprocessor of an H100 (132), enough to keep
# memory busy when few tiles exist (decode) without paying for many float32 atomics.
_TARGET_SHRINK_PROGRAMS = 264
# Requests the in-kernel tile search examines at a time: up to this many, one pass over the
# request tables; more, in blocks of this many (bounds registers for large batches).
_REQUEST_BLOCK = 256
# Row counts up to which one program per row beats tiles grouped by slot (measured on an H100,
# docs/KERNELS.md: at 8 rows the tile path with a tile plan is 2-8 us a layer faster, at 4 they
# are even), and the most request entries the row path reads in one load.
_PER_ROW_MAX_ROWS = 4
# Row counts up to which the row path's kernels launch as programmatic dependents: beyond, the
# expand's programs, started early, hold multiprocessors the shrink needs (measured slower at 8).
_DEPENDENT_LAUNCH_MAX_ROWS = 4
_PER_ROW_MAX_REQUESTS = 1024
# The tile path's split sums reduced in the shrink (its last split program of a tile sums the
# parts) instead of float32 atomics into sums zeroed by a memset each call: one launch less a
# call (`LaunchConfig.sums_in_kernel`). Off: its first form measured 3-11 µs a layer slower at
# decode (H100, docs/BENCHMARKS.md), the chunked-load form since is unmeasured (#15); the benchmarks
# turn it on (`decode_overhead.py --sums-in-kernel`, `kernel_bench.py --variants`).
SUMS_IN_KERNEL = False


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """Static launch parameters of one op call (all derived from shapes, never from data)."""

    block_m: int  # rows per tile (all of one slot)
    block_k: int  # input features per shrink step
    k_chunk: int  # input features per shrink program (a multiple of block_k)
    block_n: int  # output features per expand program
    shrink_warps: int = 4
    expand_warps: int = 4
    shrink_stages: int = 3
    # One program per row (and split, or column block) instead of tiles of one slot's rows:
    # no tile search and no zeroed sums, at the price of re-reading an adapter for each of
    # its rows (from L2). Worth it while rows are few; `choose_config` decides.
    per_row: bool = False
    # Row path on Hopper and newer: launch both kernels as programmatic dependents, so that
    # each starts its table and adapter loads while the kernel before it finishes.
    dependent_launch: bool = True
    # Tile path with several k splits: the tile's last split program sums the splits' parts
    # (`tile_counters.py`), no memset and no float32 atomics; else the parts add atomically
    # into sums zeroed before the shrink.
    sums_in_kernel: bool = False


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division on host ints. `triton.cdiv` is a jit function: called from Python it
    goes through the JIT's argument handling, ~5 us a call, several per op call (#16)."""
    return -(-numerator // denominator)


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, (int(value) - 1).bit_length())


def tile_bound(rows: int, num_slots: int, block_m: int) -> int:
    """The most tiles any batch of `rows` rows over `num_slots` slots can need.

    With `m` slots holding rows, each takes one tile for its first row and one more per
    `block_m` further rows: at most m + (rows - m) // block_m tiles, which grows with m.
    """
    used = min(num_slots, rows)
    return used + (rows - used) // block_m


@functools.lru_cache(maxsize=4096)
def choose_config(
    rows: int,
    in_features: int,
    max_rank: int,
    num_slots: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    target_programs: int = _TARGET_SHRINK_PROGRAMS,
    max_splits: int | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    shrink_stages: int | None = None,
    expand_warps: int | None = None,
    per_row_max_rows: int | None = None,
    dependent_launch: bool = True,
    sums_in_kernel: bool = False,
) -> LaunchConfig:
    """Launch parameters for one op call, from its static shapes alone.

    Few rows (decode): tiles of 16 rows and the input features split over many programs, since
    the adapters' A must be streamed by many multiprocessors at once. Many rows (prefill,
    tower): tiles of 32 rows and few splits, since the rows already give enough programs. The
    split count is sized from the tile bound, so that the grid (every program of which runs
    the tile search) stays near `target_programs`, and is one once the tiles alone fill half of
    it (about a program per multiprocessor). An explicit `max_splits` replaces that rule (the
    splits are then sized from the program target, up to it). Large ranks and float32 (whose products run
    as plain FMAs) get smaller blocks to stay within registers. Keyword arguments override
    the heuristic (the benchmark sweeps them).

    Up to `per_row_max_rows` rows the row path runs instead (`LaunchConfig.per_row`): splits
    sized so that rows x splits is near `target_programs`, steps and column blocks sized so
    that a program's tile of A or B stays near 2048 elements.
    """
    block_r = max(16, _next_power_of_2(max_rank))
    wide = dtype == torch.float32
    if rows <= (_PER_ROW_MAX_ROWS if per_row_max_rows is None else per_row_max_rows):
        block_k = block_k or max(16, min(128, 2048 // block_r))
        splits = max(1, min(cdiv(target_programs, max(rows, 1)), 64 if max_splits is None else max_splits,
                            cdiv(in_features, block_k)))
        k_chunk = cdiv(cdiv(in_features, splits), block_k) * block_k
        return LaunchConfig(block_m=1, block_k=block_k, k_chunk=k_chunk,
                            block_n=block_n or max(16, min(128, 2048 // block_r)), per_row=True,
                            dependent_launch=dependent_launch and rows <= _DEPENDENT_LAUNCH_MAX_ROWS)
    if block_m is None:
        block_m = 16 if rows <= 256 or block_r >= 128 or (wide and block_r >= 64) else 32
    if block_k is None:
        # Wide steps, so that a program's slice of A arrives in few round trips: measured at decode,
        # and at prefill too (H100, 2026-12-06, 8 adapters, 32-row tiles: 128 against 64 cut the
        # shrink from 133 to 119 us at the tower block's 8,192 rows, 125 to 106 at the LM layer's 2,584).
        block_k = 32 if block_r > 32 or wide else 128
    if shrink_stages is None:
        shrink_stages = 4 if block_k >= 128 else 3
    if block_n is None:
        if wide:
            block_n = 64 if block_r <= 32 else 32
        elif block_r <= 32:
            block_n = 128  # measured: 256 was 1-3% slower at decode sizes, equal at 4096 rows
        else:
            block_n = 128 if block_r <= 64 else 64
    tiles = max(1, tile_bound(rows, num_slots, block_m))
    if max_splits is None:
        # Once the tiles alone give about a program per multiprocessor, a split would only add the memset and
        # the float32 atomics (measured, H100: one split against two at 8,192 rows, 263 tiles, cut
        # the shrink from 133 to 112 us at the tower block's shapes, 326 to 292 at the LM layer's;
        # at 2,584 rows, 88 tiles, it lost: 412 against 331 us a layer). Counted by the fewest tiles
        # the rows can make (all in one slot), not the bound, which adds a tile per slot: 4,096 rows
        # (128 tiles at least, between the two measured points) keep their splits.
        max_splits = 1 if cdiv(rows, block_m) >= target_programs // 2 else 64
    splits = max(1, min(cdiv(target_programs, tiles), max_splits, cdiv(in_features, block_k)))
    k_chunk = cdiv(cdiv(in_features, splits), block_k) * block_k
    shrink_warps = 8 if block_m >= 64 or block_r >= 64 else 4
    if expand_warps is None:
        # float32 products are FMAs spread over the warps: eight warps spill them at rank 64+.
        expand_warps = 8 if (block_m * block_n >= 8192 or block_r >= 64) and not wide else 4
    return LaunchConfig(block_m=block_m, block_k=block_k, k_chunk=k_chunk, block_n=block_n,
                        shrink_warps=shrink_warps, expand_warps=expand_warps, shrink_stages=shrink_stages,
                        sums_in_kernel=sums_in_kernel)


# ----------------------------------------------------------------------------------------------
# What the launcher asks besides `choose_config`: the same static decisions, kept beside it.
# ----------------------------------------------------------------------------------------------


def config_for_call(rows: int, in_features: int, max_rank: int, num_slots: int, dtype: torch.dtype,
                    num_requests: int, config: LaunchConfig | None = None) -> LaunchConfig:
    """`config` (or `choose_config`'s pick, with `SUMS_IN_KERNEL`), moved to the tile path if the
    row path cannot run it."""
    chosen = config is None
    config = config or choose_config(rows, in_features, max_rank, num_slots, dtype, sums_in_kernel=SUMS_IN_KERNEL)
    if config.per_row and num_requests + 1 > _PER_ROW_MAX_REQUESTS:
        # The row path reads the request tables in one load: too many entries take the tiles.
        config = choose_config(rows, in_features, max_rank, num_slots, dtype, per_row_max_rows=0,
                               sums_in_kernel=SUMS_IN_KERNEL if chosen else config.sums_in_kernel)
    return config


def search_block(num_requests: int) -> tuple[int, bool]:
    """Requests the tile search examines at a time, and whether that is all of them (one pass)."""
    requests_block = max(16, _next_power_of_2(num_requests))
    return min(requests_block, _REQUEST_BLOCK), requests_block <= _REQUEST_BLOCK


def reads_plan(block_m: int, rows: int, capacity: int) -> bool:
    """Whether the tile path reads its tiles from a plan of this capacity (0: no plan).

    A plan is only ever for rows == total weight, in 16-row tiles, up to its capacity.
    """
    return block_m == PLAN_BLOCK_M and rows <= capacity


def interpreting() -> bool:
    """Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1), e.g. on a CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _supports_dependent_launch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launches_dependent(config: LaunchConfig, device: torch.device) -> bool:
    """Whether the row path's kernels launch as programmatic dependents: asked for by `config`,
    compiled (not interpreted), and on Hopper or newer, where the launch attribute exists."""
    return (config.dependent_launch and device.type == "cuda" and not interpreting()
            and _supports_dependent_launch(device.index if device.index is not None else 0))
