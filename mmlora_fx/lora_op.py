"""The graph-level LoRA ops: `torch.ops.mmlora.lora_linear_(outputs, x, weights)`,
`torch.ops.mmlora.lora_embedding_(outputs, ids, weights)`, `torch.ops.mmlora.lora_conv_(outputs, x, weights)` and
`torch.ops.mmlora.lora_experts_(outputs, x, weights, expert_ids, contracted_dim, tiles, interleave)`.

The rewrite pass puts one after each served target (a linear or group of siblings, an embedding
lookup). Dynamo reuses a graph for every instance of a block, so the op cannot know at rewrite
time whose weights it will see: it looks the weight tensors up here, finds the runtime and the
modules they belong to, and hands that runtime the work. Under CUDA graphs the lookup runs once,
at capture; the replays reuse the buffers it found, whose contents the runtime changes in place.

A tied head and embedding share one weight tensor, so a weight is registered per kind of use:
the embedding op resolves it to the embedding, the linear op to the head.

Two compiled models may share their weight tensors (two module trees over one set of weights,
each compiled with its own adapters or options). A weight then has one entry per runtime, and a call resolves it
to the runtime whose served call it is in (`WeightRegistry.serving`, entered by the runtime's
`call_scope`, and outside any by each call of a graph its backend compiled, so a model compiled
through the `torch.compile` backend alone resolves to its own runtime too); outside any (the eager hook of a
linear that ran outside the graphs, through the backend alone), to the runtime that registered it last (a model compiled again is served
by its new runtime).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch

from .errors import MMLoRAError
from .sharding import local_tensor

__all__ = ["WeightRegistry", "REGISTRY", "lora_linear_", "lora_stacked_", "lora_stacked_row_slots", "lora_fold_shrink", "lora_embedding_", "lora_conv_",
           "lora_experts_"]


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class WeightRegistry:
    """Which runtime and module a weight tensor belongs to, by kind of use and storage address.

    A DTensor weight (tensor parallelism) is known by its local shard's address and shape: the op
    receives the local shard (DTensor's dispatch unwraps it, or transformers' layers pass
    `to_local()`), an eager hook the DTensor itself; both resolve alike."""

    def __init__(self):
        self._entries: dict[tuple[str, int], tuple[weakref.ReferenceType, str, tuple]] = {}
        # Keys that another live runtime registered too: each runtime's entry, by id. Empty unless
        # two compiled models share weights, so the common lookup costs one truth test more.
        self._shared: dict[tuple[str, int], dict[int, tuple[weakref.ReferenceType, str, tuple]]] = {}
        self._serving: contextvars.ContextVar = contextvars.ContextVar("mmlora_serving", default=None)

    def register(self, runtime, weights: dict[str, torch.Tensor], kind: str = "linear") -> None:
        """Record every `kind` weight of `runtime`'s model (served or not) under `runtime`."""
        reference = weakref.ref(runtime)
        for module, weight in weights.items():
            weight = local_tensor(weight)
            key = (kind, weight.data_ptr())
            entry = (reference, module, tuple(weight.shape))
            previous = self._entries.get(key)
            owner = previous[0]() if previous is not None else None
            if owner is not None and owner is not runtime:
                self._shared.setdefault(key, {id(owner): previous})[id(runtime)] = entry
            self._entries[key] = entry

    @contextlib.contextmanager
    def serving(self, runtime):
        """Inside: weights `runtime` shares with another compiled model resolve to `runtime`."""
        token = self.enter_serving(runtime)
        try:
            yield
        finally:
            self.leave_serving(token)

    def enter_serving(self, runtime) -> contextvars.Token:
        """`serving` without a context manager's overhead (each compiled graph's call enters it):
        pass the token returned to `leave_serving`."""
        return self._serving.set(runtime)

    def leave_serving(self, token: contextvars.Token) -> None:
        self._serving.reset(token)

    def serving_runtime(self):
        """The runtime whose scope is entered here, or None."""
        return self._serving.get()

    def resolve(self, weight: torch.Tensor, kind: str = "linear"):
        # A plain tensor or parameter (every single-process model) skips the DTensor check: it
        # runs on every op call, and a compiled prefill makes hundreds (#16).
        if type(weight) not in _PLAIN_TENSORS:
            weight = local_tensor(weight)
        key = (kind, weight.data_ptr())
        entry = self._entries.get(key)
        if self._shared and key in self._shared:
            serving = self._serving.get()
            mine = self._shared[key].get(id(serving)) if serving is not None else None
            if mine is not None and mine[0]() is serving:  # not a dead runtime's id reused
                entry = mine
        runtime = entry[0]() if entry is not None else None
        if runtime is None or entry[2] != tuple(weight.shape):
            raise MMLoRAError(
                f"a LoRA op received a {kind} weight of shape {tuple(weight.shape)} that belongs to no compiled model: "
                "were the model's parameters moved or replaced after mmlora_fx.compile?"
            )
        return runtime, entry[1]


REGISTRY = WeightRegistry()


# The graph-level ops are defined through `torch.library.Library` rather than
# `torch.library.custom_op`: the dispatcher then calls the body directly, ~3 us a call on the
# development CPU against ~17 us through custom_op's Python layers (autograd wrapper, in-place
# view bookkeeping, default filling), and a compiled prefill makes hundreds of these calls a
# forward (#16). The schemas say what each op mutates (`Tensor(a!)[] outputs`), which is what
# Inductor's functionalization reads; the in-place ops' fakes return nothing, as the ops do, the
# others' an empty tensor of the output's shape. Serving only: no
# autograd formula (LoRA's share of a gradient through them would be missing, not wrong-signed).
_LIBRARY = torch.library.Library("mmlora", "FRAGMENT")


def _defined_op(schema: str, fake):
    """Define `mmlora::<schema>` with the decorated function as its kernel on every device and
    `fake` (the same arguments) as what it returns under fake tensors."""

    def define(body):
        name = schema.split("(", 1)[0]
        _LIBRARY.define(schema)
        _LIBRARY.impl(name, body, "CompositeExplicitAutograd")
        torch.library.register_fake(f"mmlora::{name}", fake, lib=_LIBRARY)
        return body

    return define


def _graph_op(schema: str):
    """An in-place op (`Tensor(a!)[] outputs`, returning nothing): `_defined_op` with no output."""
    return _defined_op(schema, lambda *args: None)


@_graph_op("lora_linear_(Tensor(a!)[] outputs, Tensor x, Tensor[] weights) -> ()")
def lora_linear_(outputs: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Add each row's adapter delta to the outputs of the linears whose weights are `weights`."""
    runtime, first = REGISTRY.resolve(weights[0])
    modules = [first] + [REGISTRY.resolve(weight)[1] for weight in weights[1:]]
    runtime.apply(outputs, x, modules)


@_graph_op("lora_stacked_(Tensor(a!)[] outputs, Tensor[] weights) -> ()")
def lora_stacked_(outputs: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Add each row's adapter delta to the outputs of the stacked linears whose weights are
    `weights` (`folding.py`): each output ends in every slot's shrink, which the base GEMM computed."""
    runtime, first = REGISTRY.resolve(weights[0])
    runtime.apply_stacked(outputs, [first] + [REGISTRY.resolve(weight)[1] for weight in weights[1:]])


@_defined_op("lora_fold_shrink(Tensor x, Tensor weight, int width) -> Tensor",
             lambda x, weight, width: x.new_empty(*x.shape[:-1], width))
def lora_fold_shrink(x: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
    """The extra K of a folded linear's GEMM (`folding.py`): every slot's shrink of the rows `x`,
    each row keeping its own slot's columns (`width`: slots x rank, padded). A new tensor, not a
    view; Inductor copies it into the GEMM's input buffer (rows x width values, small)."""
    runtime, module = REGISTRY.resolve(weight)
    return runtime.fold_shrink(x, module)


@_defined_op("lora_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
             lambda x, weight, bias: x.new_empty(*x.shape[:-1], weight.shape[0]))
def lora_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`linear(x, weight, bias)` of one row with its request's LoRA inside (`fused_gemv`): a new tensor."""
    runtime, module = REGISTRY.resolve(weight)
    return runtime.gemv(x, weight, bias, module)


@_defined_op("lora_stacked_row_slots(Tensor[] weights, int rows) -> Tensor",
             lambda weights, rows: weights[0].new_empty(rows, dtype=torch.int64))
def lora_stacked_row_slots(weights: list[torch.Tensor], rows: int) -> torch.Tensor:
    """The adapter slot of each of `rows` language-model rows (int64, -1: the base model), for the
    graph expand of the stacked linears whose weights are `weights` (all of one graph's): the
    only LoRA op of such a graph, once per row count (`passes.lora_rewrite`, `stack_expand`)."""
    runtime, first = REGISTRY.resolve(weights[0])
    return runtime.stacked_row_slots([first] + [REGISTRY.resolve(weight)[1] for weight in weights[1:]], rows)


@_graph_op("lora_embedding_(Tensor(a!)[] outputs, Tensor ids, Tensor[] weights) -> ()")
def lora_embedding_(outputs: list[torch.Tensor], ids: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Add each row's adapter delta to the lookups `outputs` of token `ids` in the embedding `weights[0]`."""
    runtime, module = REGISTRY.resolve(weights[0], "embedding")
    runtime.apply_embedding(outputs[0], ids, module)


@_graph_op("lora_experts_(Tensor(a!)[] outputs, Tensor x, Tensor[] weights, Tensor? expert_ids, int contracted_dim, "
           "int tiles, int interleave) -> ()")
def lora_experts_(outputs: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                  expert_ids: torch.Tensor | None, contracted_dim: int, tiles: int, interleave: int) -> None:
    """Add each row's adapter delta for its expert to `outputs[0]`, the product of the rows `x`
    with the 3D expert weight `weights[0]` (gathered by `expert_ids` when given), summed over the
    weight's dimension `contracted_dim`; the rows' tokens are laid out `(tiles, interleave)`."""
    runtime, module = REGISTRY.resolve(weights[0], "experts")
    runtime.apply_experts(outputs[0], x, module, expert_ids, contracted_dim, tiles, interleave)


@_graph_op("lora_conv_(Tensor(a!)[] outputs, Tensor x, Tensor[] weights) -> ()")
def lora_conv_(outputs: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    """Add each row's adapter delta to `outputs[0]`, the patch embedding by `weights[0]` of `x`."""
    runtime, module = REGISTRY.resolve(weights[0], "conv")
    runtime.apply_conv(outputs[0], x, module)
