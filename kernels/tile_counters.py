"""Counters for the tile shrink's split sums reduced in the kernel (`LaunchConfig.sums_in_kernel`, #15).

When a tile's shrink is split over K, each split's sums must meet in one place. The default adds
them with float32 atomics into a buffer zeroed before the shrink: one memset kernel a call, 112 a
decode step of the 7B model, each with its launch gap inside a CUDA graph. With `sums_in_kernel`
each split program stores its part apart and counts itself in on its tile's counter; the last one
to arrive sums the parts in a fixed order, stores the tile's sums and sets the counter back to 0.
The counters are therefore zero between calls and need zeroing only once, when they are made:
that is this module's job.

* `make_pool(device)`: the device's pool of counters, zeroed once, never freed. It must be made
  outside any CUDA-graph capture and outside a CUDA-graph warm-up (Inductor's `reduce-overhead`
  warms up in a graph's private memory pool, which can hand the memory to another tensor later):
  the runtime makes it at set-up (`LoRARuntime`, where `launch_config.SUMS_IN_KERNEL` is on then),
  before anything compiles. Nothing makes it on first use.
* `claim(count, device)`: `count` counters of the pool (rounded up to 4, so that every span keeps
  the pool's 16-byte alignment, which Triton specialises on) for one call site to keep:
  `bound_calls` claims a span on a call's first (recorded) launch, and its replays, and the CUDA
  graphs that capture them, reuse that span for good. None where the device has no pool or the
  pool is spent (logged once): the caller then zeroes counters per call, a memset as before.
* `release(span)`: the last span claimed, given back (a binding that did not bind).

A span serves one binding key (`bound_calls.call_key`: the slot buffers, row count and layouts),
so calls with one key must not run at once: as the runtime's token tables and outputs already
require, one model's calls run one after another on one stream. A counter that two calls raced
on would stay wrong for good.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["POOL_SIZE", "claim", "make_pool", "release"]

logger = logging.getLogger(__name__)

# 4 MiB of int32: a decode call site of the 7B model takes ~8-36 counters, a prefill one a few
# hundred, and every rebinding (`bound_calls.forget`) claims anew: spans are never reused, since a
# captured graph may still hold one.
POOL_SIZE = 1 << 20
_ALIGN = 4  # counters: 16 bytes

# Device -> [the pool, the first counter not yet claimed].
_POOLS: dict[torch.device, list] = {}


def _device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _span(count: int) -> int:
    """Counters a claim of `count` takes from the pool (whole 16-byte steps)."""
    return -(-count // _ALIGN) * _ALIGN


def make_pool(device) -> bool:
    """Make `device`'s pool if it has none; whether it has one. Call it outside any CUDA-graph
    warm-up; during a capture it makes none (its zeros would be written only when the graph
    replays), and calls on the device then zero their counters per call."""
    device = _device(device)
    if device not in _POOLS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        _POOLS[device] = [torch.zeros(POOL_SIZE, dtype=torch.int32, device=device), 0]
    return True


def claim(count: int, device) -> torch.Tensor | None:
    """`count` int32 counters at zero that no other claim shares, or None (see the module's doc)."""
    pool = _POOLS.get(_device(device))
    if pool is None or count <= 0:
        return None
    counters, used = pool
    size = _span(count)
    if used + size > counters.numel():
        if used <= counters.numel():
            logger.warning(f"tile_counters: the pool of {counters.numel()} counters on {counters.device} is spent; "
                           "later call sites zero their split sums per call (a memset each)")
            pool[1] = counters.numel() + 1  # warned
        return None
    pool[1] = used + size
    return counters[used:used + count]


def release(span: torch.Tensor) -> None:
    """Give back `span` if it is the last one claimed (else it stays claimed: spans are cheap)."""
    pool = _POOLS.get(_device(span.device))
    if pool is None or span.untyped_storage().data_ptr() != pool[0].untyped_storage().data_ptr():
        return
    start = span.storage_offset()
    if start + _span(span.numel()) == pool[1]:
        pool[1] = start
