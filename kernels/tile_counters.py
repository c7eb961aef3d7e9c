"""Counters for the tile shrink's split sums reduced in the kernel (`LaunchConfig.sums_in_kernel`, #15).

When a tile's shrink is split over K, each split's sums must meet in one place. The default adds
them with float32 atomics into a buffer zeroed before the shrink: one memset kernel a call, 112 a
decode step of the 7B model, each with its launch gap inside a CUDA graph. With `sums_in_kernel`
each split program stores its part apart and counts itself in on its tile's counter; the last one
to arrive sums the parts in split order, stores the tile's sums and sets the counter back to 0.
The counters are therefore zero between calls and need zeroing only once, when they are made:
that is this module's job.

* `claim(count, device)`: `count` counters of a pool made once per device (zeroed when it is
  made, never freed, never zeroed again), for one call site to keep: `bound_calls` claims a span
  on a call's first (recorded) launch, and its replays, and the CUDA graphs that capture them,
  reuse that span for good. Two calls sharing a span must not run at once; one call site's calls
  run one after another on its stream (as its outputs and tables require anyway), and other call
  sites have spans of their own. Returns None where no span can be had: the pool is spent, or
  the first claim on a device comes during a CUDA-graph capture (zeros made there would be
  written only when the graph replays). The caller then zeroes counters per call, as before.
* `fresh(count, device)`: zeroed counters for one call alone (calls that are not bound: the
  interpreter, explicit launch configs).

A span is never given back: the pool (65,536 counters, 256 KiB) outlasts many thousands of call
sites of a few dozen tiles each; past it, calls fall back to per-call zeros.
"""

from __future__ import annotations

import torch

__all__ = ["POOL_SIZE", "claim", "fresh"]

POOL_SIZE = 1 << 16

# Device -> [the pool, the first counter not yet claimed].
_POOLS: dict[torch.device, list] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def claim(count: int, device: torch.device) -> torch.Tensor | None:
    """`count` int32 counters at zero that no other claim shares, or None (see the module's doc)."""
    pool = _POOLS.get(device)
    if pool is None:
        if _capturing(device):
            return None
        pool = _POOLS[device] = [torch.zeros(POOL_SIZE, dtype=torch.int32, device=device), 0]
    counters, used = pool
    if count <= 0 or used + count > counters.numel():
        return None
    pool[1] = used + count
    return counters[used:used + count]


def fresh(count: int, device: torch.device) -> torch.Tensor:
    """Zeroed counters for one call."""
    return torch.zeros(max(count, 1), dtype=torch.int32, device=device)
