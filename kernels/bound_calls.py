"""`lora_add` calls bound once and replayed through the compiled kernels' launchers (#16).

On a GPU, a launch through Triton's path costs ~46 µs of host time for the two kernels of a call
on the H100's host, and our launcher's checks and heuristics as much again; a compiled prefill
without CUDA graphs makes hundreds of calls a forward. Most calls repeat an earlier one's
everything but its tensors: the same slot buffers, row count, strides, dtypes and alignments.

`call_key` names that everything. The first call with a key runs as always, through a `Recorder`
that keeps its scratch sizes and its launches, and `Recorder.bind` binds them (`DirectLaunch`).
Later calls with the key `replay`: they allocate the same scratch and hand their own tensors to
the bound launches, skipping the checks, the heuristics and Triton's path.

Not bound: calls with an explicit launch config, calls under Triton's interpreter, calls while a
Triton launch hook is set, and first calls that pass one tensor object in two roles (their
launches could not tell the roles apart in a later call). `forget()` drops every binding; call it
after changing `launch_config`'s heuristics, which a binding does not see.
"""

from __future__ import annotations

import weakref

import torch

from . import tile_counters
from .direct_launch import DirectLaunch
from .launch_config import interpreting

__all__ = ["ENABLED", "Recorder", "bindable", "call_key", "forget", "kernel_tables", "replay", "scratch"]

ENABLED = True  # off: every launch takes Triton's path (the benchmarks compare the two)

# Key -> (weak references checking the key's tensor ids, scratch sizes, bound launches).
_BOUND: dict[tuple, tuple[list[weakref.ref], list, list[DirectLaunch]]] = {}
_LIMIT = 4096


def bindable(inputs: torch.Tensor) -> bool:
    """Whether a call on these rows may be bound: compiled kernels only (CUDA, not interpreted)."""
    return ENABLED and inputs.is_cuda and not interpreting()


def forget() -> None:
    """Drop every binding: the next calls take Triton's path again and bind anew."""
    _BOUND.clear()


def call_key(outputs, inputs: torch.Tensor, lora_a, lora_b, tables) -> tuple:
    """Everything a call's launches depend on besides its tensors' addresses: the slot buffers and
    plan by identity (their shapes, strides and layout with them; A's shape and the sibling count
    as well, so that a buffer reshaped in place or lists of other lengths never match), the rows'
    shape, row stride, dtype and 16-byte alignment, the outputs' shapes, dtypes, contiguity and
    alignment, the tables' sizes, dtypes and alignment: what Triton specialises on and what our
    heuristics read."""
    slots, cum_weights, plan = tables.request_slots, tables.request_cum_weights, tables.tile_plan
    return (inputs.shape, inputs.stride(0), inputs.dtype, inputs.device, inputs.data_ptr() % 16,
            len(lora_a), lora_a[0].shape, *map(id, lora_a), *map(id, lora_b), *map(id, tables.slot_ranks),
            id(plan) if plan is not None else None,
            slots.numel(), slots.dtype, slots.data_ptr() % 16,
            cum_weights.numel(), cum_weights.dtype, cum_weights.data_ptr() % 16,
            *[(output.shape, output.dtype, output.is_contiguous(), output.data_ptr() % 16) for output in outputs])


def _keyed_tensors(lora_a, lora_b, tables) -> list[torch.Tensor]:
    """The tensors `call_key` names by identity."""
    return [*lora_a, *lora_b, *tables.slot_ranks] + ([tables.tile_plan] if tables.tile_plan is not None else [])


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`: the tables are in the kernels' dtypes already, and `.to` costs ~2 us a
    call even when it returns its input."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def kernel_tables(tables):
    """`tables` (`lora_add.BatchTables`) in the dtypes the kernels take (the same tensors where
    they are already)."""
    # Built by position (`dataclasses.replace` takes a few µs more, on every replay).
    return type(tables)([_as(ranks, torch.int32) for ranks in tables.slot_ranks],
                        _as(tables.request_slots, torch.int32), _as(tables.request_cum_weights, torch.int64),
                        tables.tile_plan)


def scratch(numel: int, dtype: torch.dtype, device: torch.device, zero: bool = False) -> torch.Tensor:
    """One scratch buffer of a call (zeroed where the kernels add into it)."""
    return (torch.zeros if zero else torch.empty)(numel, dtype=dtype, device=device)


def _call_tensors(inputs, outputs, lora_a, lora_b, tables, scratch) -> list[torch.Tensor]:
    """The tensors a call's launches take (`tables` in the kernels' dtypes), in the order
    `DirectLaunch` indexes them. An output's flat view shares its address with the output (outputs
    are contiguous), so either stands in a replay."""
    plan = [tables.tile_plan] if tables.tile_plan is not None else []
    return [inputs, *outputs, *lora_a, *lora_b, *tables.slot_ranks, tables.request_slots, tables.request_cum_weights,
            *plan, *scratch]


def _stream(device: torch.device) -> int:
    """The current CUDA stream's handle, as Triton's path takes it (no Stream object made)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


def replay(key: tuple, inputs, outputs, lora_a, lora_b, tables) -> bool:
    """Run the call bound under `key` with these tensors; False if none is (then run it as always)."""
    bound = _BOUND.get(key)
    if bound is None:
        return False
    references, scratch_sizes, launches = bound
    if not all(reference() is tensor for reference, tensor in zip(references, _keyed_tensors(lora_a, lora_b, tables))):
        return False  # a key tensor's id reused by another tensor
    device = inputs.device
    # A kept tensor (the call site's counters, which the kernels leave zero) is the same every call.
    buffers = [entry if isinstance(entry, torch.Tensor) else scratch(entry[0], entry[1], device, entry[2])
               for entry in scratch_sizes]
    tensors = _call_tensors(inputs, outputs, lora_a, lora_b, kernel_tables(tables), buffers)
    stream = _stream(device)
    try:
        for launch in launches:
            launch.launch(stream, tensors)
    except BaseException:
        _BOUND.pop(key, None)  # the next call goes through Triton's path, which raises its own error
        raise
    return True


class Recorder:
    """The scratch and the launches of one call through Triton's path, for `bind`: pass `allocate`
    and `run` to the launcher instead of allocating and launching directly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.scratch: list[torch.Tensor] = []
        # Per entry: (numel, dtype, zero) for a buffer each call allocates, or a tensor kept for good.
        self.scratch_sizes: list[tuple[int, torch.dtype, bool] | torch.Tensor] = []
        self.launched: list[tuple] = []
        self.claimed: list[torch.Tensor] = []  # counter spans, given back if the call does not bind

    def allocate(self, numel: int, dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        tensor = scratch(numel, dtype, self.device, zero)
        self.scratch.append(tensor)
        self.scratch_sizes.append((numel, dtype, zero))
        return tensor

    def counters(self, count: int) -> torch.Tensor:
        """`count` zeroed int32 counters that the call's kernels leave zero: a span of the device's
        pool that this call site keeps (`tile_counters.claim`), else zeros allocated each call."""
        kept = tile_counters.claim(count, self.device)
        if kept is None:
            return self.allocate(count, torch.int32, zero=True)
        self.scratch.append(kept)
        self.scratch_sizes.append(kept)
        self.claimed.append(kept)
        return kept

    def run(self, kernel, grid: tuple, *args, **kwargs) -> None:
        self.launched.append((kernel, grid, args, kwargs, kernel[grid](*args, **kwargs)))

    def bind(self, key: tuple, inputs, flat_outputs, lora_a, lora_b, tables, converted) -> None:
        """Bind the recorded launches under `key` (`flat_outputs`: the 2-d outputs the launches took;
        `converted`: `kernel_tables(tables)` as the launches took them, the same tensor objects)."""
        if self._bind(key, inputs, flat_outputs, lora_a, lora_b, tables, converted):
            return
        # The next call with this key records (and claims) again: give the spans back, unless a
        # graph being captured now holds them.
        if not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            for span in reversed(self.claimed):
                tile_counters.release(span)

    def _bind(self, key: tuple, inputs, flat_outputs, lora_a, lora_b, tables, converted) -> bool:
        if not self.launched:
            return False
        # The tensors not named by the key may differ from call to call: one object in two of their
        # roles (the same output twice, say) would bind both roles to one tensor of a later call.
        per_call = [inputs, *flat_outputs, converted.request_slots, converted.request_cum_weights]
        if len({id(tensor) for tensor in per_call}) != len(per_call):
            return False
        tensors = _call_tensors(inputs, flat_outputs, lora_a, lora_b, converted, self.scratch)
        launches = [DirectLaunch.bind(kernel, grid, args, kwargs, compiled, tensors)
                    for kernel, grid, args, kwargs, compiled in self.launched]
        if any(launch is None for launch in launches):
            return False
        if len(_BOUND) >= _LIMIT:
            _BOUND.clear()
        _BOUND[key] = ([weakref.ref(tensor) for tensor in _keyed_tensors(lora_a, lora_b, tables)], self.scratch_sizes,
                       launches)
        return True
