"""Triton launches replayed through the compiled kernel's own launcher, their arguments bound once.

`kernel[grid](...)` runs Triton's launch path on every call: it binds the arguments to the
kernel's signature, specialises each (dtype, alignment, integer values) into a cache key, finds
the compiled kernel for that key and only then calls the kernel's launcher (`CompiledKernel.run`,
C code that reads the arguments and enqueues the launch). A compiled prefill makes hundreds of
LoRA op calls a forward, two launches each, and pays that path every time (#16).

Our launcher knows when a call's specialisation cannot have changed: the same slot buffers, row
count, strides, dtypes and alignments (`lora_add.launch` keys its calls on them). For such calls
a `DirectLaunch`, made from one launch that went through Triton's path, hands the same compiled
kernel the new call's tensors straight away: the argument list Triton's path built, with the
tensors put back in by position. Nothing else of the call may change, which the caller's key
guarantees; a tensor of the launch that the caller did not name makes the launch unbindable
(`bind` returns None, and the caller keeps Triton's path).

Only compiled kernels (CUDA, not `TRITON_INTERPRET`) are bound, and only while no Triton launch
hook is set: replays do not call hooks (a profiler that installs one later sees the launches made
through Triton's path only).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

__all__ = ["DirectLaunch", "launch_hooks_set"]


def _hook_set(hook) -> bool:
    # Triton 3.9 keeps its hooks as chains (`knobs.HookChain`), present and empty when none is added.
    return hook is not None and bool(getattr(hook, "calls", True))


def launch_hooks_set() -> bool:
    """Whether a Triton launch hook is installed: then launches must go through Triton's path,
    which calls the hooks."""
    try:
        from triton import knobs

        hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    except (ImportError, AttributeError):  # Triton before 3.4 keeps them on CompiledKernel
        from triton.compiler import CompiledKernel

        hooks = (getattr(CompiledKernel, "launch_enter_hook", None), getattr(CompiledKernel, "launch_exit_hook", None))
    return any(map(_hook_set, hooks))


class DirectLaunch:
    """One recorded Triton launch, replayable with other tensors in the same places.

    `bind(kernel, grid, args, kwargs, compiled, tensors)`: `kernel[grid](*args, **kwargs)` returned
    `compiled`; `tensors` are every tensor the launch received (in any order, duplicates allowed).
    `launch(stream, tensors)` enqueues the same kernel with the same grid and non-tensor arguments,
    each tensor argument taken from the new `tensors` at the recorded tensor's index."""

    __slots__ = ("_launcher", "_head", "_template", "_places")

    def __init__(self, launcher, head: tuple, template: list, places: list[tuple[int, int]]):
        self._launcher, self._head, self._template, self._places = launcher, head, template, places

    @classmethod
    def bind(cls, kernel, grid: Sequence[int], args: Sequence, kwargs: dict, compiled,
             tensors: Sequence[torch.Tensor]) -> "DirectLaunch | None":
        if compiled is None or launch_hooks_set():
            return None
        signature = inspect.signature(kernel.fn)
        bound = signature.bind(*args, **{name: value for name, value in kwargs.items()
                                         if name in signature.parameters})
        bound.apply_defaults()
        # What Triton's path passes the launcher after the grid, stream and metadata: every
        # parameter's value in signature order (constexprs included; the launcher skips them).
        values = list(bound.arguments.values())
        template, places = [], []
        for position, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                index = next((i for i, tensor in enumerate(tensors) if tensor is value), None)
                if index is None:
                    return None  # a tensor the caller does not pass again: not replayable
                places.append((position, index))
                value = None  # held by no template: a replay takes the call's own tensor
            template.append(value)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        head = (*grid, compiled.function, compiled.packed_metadata)
        return cls(compiled.run, head, template, places)

    def launch(self, stream: int, tensors: Sequence[torch.Tensor]) -> None:
        values = self._template.copy()
        for position, index in self._places:
            values[position] = tensors[index]
        grid_x, grid_y, grid_z, function, metadata = self._head
        # No launch metadata and no hooks: `bind` refuses while hooks are set.
        self._launcher(grid_x, grid_y, grid_z, stream, function, metadata, None, None, None, *values)
