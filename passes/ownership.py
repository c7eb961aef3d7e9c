"""Resolve which absolute submodule owns each node of a dynamo graph.

Dynamo compiles one graph per code object and reuses it for every instance of a block: its
`nn_module_stack` paths are relative to the compiled frame (`L['self'].mlp.fc1`), and module
parameters arrive as graph inputs. Absolute names come from two places: the frame's locals
(which module `self` is, for this call) and the parameter tensors themselves (which module a
weight belongs to).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx

from .meta import (CONV, EMBEDDING, EXPERTS, LINEAR, OWNER, OWNER_PATH, PARAMETER_MATMUL, owner_of, owner_path_of,
                   through_to_local)
from .row_layout import RowLayout, canonical_name, row_layout_of, rows_picked_by_index

__all__ = [
    "LinearCall",
    "EmbeddingCall",
    "ExpertsCall",
    "ParameterMatmulCall",
    "ConvCall",
    "ResolveOwners",
    "is_linear_call",
    "is_embedding_call",
    "is_matmul_call",
    "is_conv_call",
    "join_module_path",
    "parse_module_path",
]

_LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear}
_EMBEDDING_TARGETS = {torch.nn.functional.embedding, torch.embedding, torch.ops.aten.embedding.default}
_MATMUL_TARGETS = {torch.matmul, operator.matmul}
_CONV_TARGETS = {torch.conv1d, torch.conv2d, torch.conv3d}
_ROOT = re.compile(r"^L\[['\"]([^'\"]+)['\"]\]")
_ITEM = re.compile(r"\._modules\[['\"]([^'\"]+)['\"]\]|\[['\"]([^'\"]+)['\"]\]|\[(\d+)\]|\.([A-Za-z_][A-Za-z_0-9]*)")


@dataclasses.dataclass(frozen=True)
class LinearCall:
    """A linear layer call found in a graph: its module (for this instance) and its shape."""

    module: str
    in_features: int
    out_features: int
    bias: bool
    input_node: str
    weight_input: int | None  # index of the weight among the graph's placeholders
    # Why its rows are picked by a data-dependent index (a per-expert linear on routed tokens), or None.
    rows_picked: str | None = None


@dataclasses.dataclass(frozen=True)
class EmbeddingCall:
    """An embedding lookup found in a graph: its module (for this instance) and its table's shape."""

    module: str
    num_embeddings: int
    embedding_dim: int
    ids_node: str
    weight_input: int | None  # index of the weight among the graph's placeholders


@dataclasses.dataclass(frozen=True)
class ExpertsCall:
    """A batched matmul with a 3D expert weight `[experts, d1, d2]` found in a graph.

    Two forms: `bmm(x [experts, T, d1], W)` (each expert's batch, Llama4) and `bmm(W[ids] [S, d1, d2],
    x [S, d2, 1])` or `bmm(x [S, 1, d1], W[ids])` (each row with its own expert `ids[row]`:
    transformers' `batched_mm`). `contracted_dim` (1 or 2) is the weight's dimension the product
    sums over; `layout` the token each row holds (`row_layout.py`), None where it could not be
    told, with the reason in `why` (the target is then refused, not served)."""

    module: str  # the parameter's absolute name: `...experts.gate_up_proj`
    num_experts: int
    in_features: int  # the contracted size
    out_features: int
    contracted_dim: int
    input_node: str
    expert_ids_node: str | None  # the per-row expert index of the gathered form
    gather_node: str | None  # the `W[ids]` node of the gathered form (it reads the weight too)
    layout: RowLayout | None
    why: str
    weight_input: int | None


@dataclasses.dataclass(frozen=True)
class ParameterMatmulCall:
    """`matmul(x, W)` with `W` a module's 2D parameter (Gemma3's projector): the parameter's name
    (`module.parameter`, in `module` like the other records' targets) and `W`'s shape `[in, out]`."""

    module: str
    in_features: int
    out_features: int
    input_node: str
    weight_input: int | None  # index of the weight among the graph's placeholders


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """A convolution found in a graph (`torch.conv2d(x, weight, bias, stride, ...)`): its module,
    and its weight's shape `[out, in, *kernel]` (`in_features`: the pixels of one patch, `in * prod(kernel)`)."""

    module: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...]
    input_node: str
    weight_input: int | None  # index of the weight among the graph's placeholders


def is_linear_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _LINEAR_TARGETS


def is_embedding_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _EMBEDDING_TARGETS


def _shape(node):
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def is_conv_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _CONV_TARGETS


def is_matmul_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _MATMUL_TARGETS and len(node.args) == 2


def embedding_args(node: fx.Node):
    """(ids, weight) of an embedding call: `F.embedding(ids, weight)`, `torch.embedding(weight, ids)`."""
    args = list(node.args) + [None, None]
    if node.target is torch.nn.functional.embedding:
        return node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1])
    return args[1], args[0]


def parse_module_path(path: str) -> tuple[str | None, str]:
    """Split a dynamo module path into (frame local, dotted path below it).

    `L['self'].layers[0]._modules['mlp']` -> ("self", "layers.0.mlp"); a path that does not
    start at a frame local gives (None, path).
    """
    match = _ROOT.match(path)
    if match is None:
        return None, path
    local, rest = match.group(1), path[match.end():]
    parts = []
    for item in _ITEM.finditer(rest):
        parts.append(next(group for group in item.groups() if group is not None))
    return local, ".".join(parts)


def join_module_path(root: str, relative: str) -> str:
    return ".".join(part for part in (root, relative) if part)


class ResolveOwners:
    """Label every call node with the absolute module that owns it.

    Matches: every `call_function`, `call_method` and `call_module` node.
    Writes into `node.meta`:
      - `mmlora_owner_path`: (frame local, relative path) of the innermost module in the node's
        `nn_module_stack`, or (`"self"`, "") when the node is glue in the frame's own code;
      - `mmlora_owner`: that path made absolute with `frame_modules` (the module each frame local
        is, for the instance being compiled); None when the local is not a known module;
      - `mmlora_linear` (linear calls only): a `LinearCall` whose module comes from the weight
        tensor (`linear_module(weight, owner_path, frame_modules)` names it), which is exact
        even where the owner path is not;
      - `mmlora_embedding` (embedding lookups only): an `EmbeddingCall`, its module found the
        same way (a tied head and embedding share the weight: the owner path picks which);
      - `mmlora_experts` (`torch.bmm` calls reading a 3D parameter, directly or gathered by an
        index: `W[ids]`): an `ExpertsCall` naming the parameter (`parameter_name(weight, ...)`),
        with the layout of its rows' tokens walked back to the op that made it (`row_layout.py`);
      - `mmlora_parameter_matmul` (`torch.matmul(x, W)` / `x @ W` whose `W` is a 2D parameter that
        `parameter_name(weight, owner_path, frame_modules)` names; not given: none is recorded): a
        `ParameterMatmulCall`;
      - `mmlora_conv` (convolutions `torch.conv1d/2d/3d` only): a `ConvCall`, its module found from
        the weight as a linear's is.
    """

    def __init__(
        self,
        frame_modules: Mapping[str, str],
        linear_module: Callable[[object, tuple[str | None, str], Mapping[str, str]], str | None],
        example_inputs: Sequence[object],
        parameter_name: Callable[[object, tuple[str | None, str], Mapping[str, str]], str | None] | None = None,
    ):
        self.frame_modules = frame_modules
        self.linear_module = linear_module
        self.example_inputs = example_inputs
        self.parameter_name = parameter_name

    def __call__(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
        placeholder_index = {node: index for index, node in enumerate(placeholders)}
        for node in graph_module.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            local, relative = self._owner_path(node)
            node.meta[OWNER_PATH] = (local, relative)
            root = self.frame_modules.get(local)
            node.meta[OWNER] = join_module_path(root, relative) if root is not None else None
            if is_linear_call(node):
                node.meta[LINEAR] = self._linear_call(graph_module, node, placeholder_index)
            elif is_embedding_call(node):
                node.meta[EMBEDDING] = self._embedding_call(graph_module, node, placeholder_index)
            elif is_conv_call(node):
                node.meta[CONV] = self._conv_call(graph_module, node, placeholder_index)
            elif is_matmul_call(node) and self.parameter_name is not None:
                record = self._parameter_matmul_call(graph_module, node, placeholder_index)
                if record is not None:
                    node.meta[PARAMETER_MATMUL] = record
        if self.parameter_name is not None:
            expert_layouts: dict[fx.Node, RowLayout] = {}
            for node in graph_module.graph.nodes:
                if node.op == "call_function" and canonical_name(node.target) == "bmm":
                    call = self._experts_call(graph_module, node, placeholder_index, expert_layouts)
                    if call is not None:
                        node.meta[EXPERTS] = call
                        if call.layout is not None:
                            expert_layouts[node] = call.layout
        return graph_module

    def _expert_weight(self, graph_module, node, placeholder_index):
        """(weight node, 3D parameter tensor, placeholder index, expert ids node or None) of a bmm operand."""
        if not isinstance(node, fx.Node):
            return None
        ids = None
        if node.op == "call_function" and canonical_name(node.target) == "getitem" and isinstance(node.args[1], fx.Node):
            node, ids = node.args[0], node.args[1]
        tensor, index = self._tensor_of(graph_module, node, placeholder_index)
        if not isinstance(tensor, torch.nn.Parameter) or tensor.dim() != 3:
            return None
        return node, tensor, index, ids

    def _experts_call(self, graph_module, node, placeholder_index, expert_layouts) -> ExpertsCall | None:
        left, right = node.args[0], node.args[1]
        found_right = self._expert_weight(graph_module, right, placeholder_index)
        found_left = self._expert_weight(graph_module, left, placeholder_index) if found_right is None else None
        if found_right is None and found_left is None:
            return None
        weight, tensor, index, ids = found_right or found_left
        # x @ W sums over the weight's dim 1; W @ x over its dim 2.
        contracted = 1 if found_right is not None else 2
        rows = left if found_right is not None else right
        if ids is None and (found_left is not None or _shape(rows) is None or _shape(rows)[0] != tensor.shape[0]):
            return None  # not one batch per expert: nothing this kind serves (coverage refuses a served weight)
        module = self.parameter_name(tensor, owner_path_of(node), self.frame_modules)
        if module is None:
            return None
        experts, d1, d2 = (int(size) for size in tensor.shape)
        in_features, out_features = (d1, d2) if contracted == 1 else (d2, d1)
        layout, why = row_layout_of(rows, expert_layouts)
        if layout is not None and ids is None and (layout.tiles != experts or layout.interleave != 1):
            layout, why = None, (f"each expert's batch must hold every token once (rows tiled {experts} times), but "
                                 f"the rows are laid out {layout}")
        return ExpertsCall(module=module, num_experts=experts, in_features=in_features, out_features=out_features,
                           contracted_dim=contracted, input_node=rows.name, expert_ids_node=ids.name if ids is not None else None,
                           gather_node=(right if found_right is not None else left).name if ids is not None else None,
                           layout=layout, why=why, weight_input=index)

    def _conv_call(self, graph_module, node, placeholder_index) -> ConvCall | None:
        # `torch.conv1d(x, w)` or with keywords (LFM2's short convolutions pass `weight=`).
        x = node.args[0] if len(node.args) > 0 else node.kwargs.get("input")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        tensor, weight_input = self._tensor_of(graph_module, weight, placeholder_index)
        module = self.linear_module(tensor, owner_path_of(node), self.frame_modules) if tensor is not None else None
        value = weight.meta.get("example_value") if isinstance(weight, fx.Node) else None
        if value is None or module is None or not isinstance(x, fx.Node):
            return None
        kernel = tuple(int(size) for size in value.shape[2:])
        return ConvCall(module=module, in_features=int(value.shape[1]) * math.prod(kernel),
                        out_features=int(value.shape[0]), kernel=kernel, input_node=x.name, weight_input=weight_input)

    def _parameter_matmul_call(self, graph_module, node, placeholder_index) -> ParameterMatmulCall | None:
        if len(node.args) != 2:  # `torch.matmul(input=..., other=...)`: not the `x @ W` form recognised
            return None
        x, weight = node.args
        tensor, weight_input = self._tensor_of(graph_module, weight, placeholder_index)
        value = weight.meta.get("example_value") if isinstance(weight, fx.Node) else None
        # Only a parameter of the model multiplied from the right, as a matrix, is a target.
        if tensor is None or value is None or value.dim() != 2 or not isinstance(x, fx.Node):
            return None
        name = self.parameter_name(tensor, owner_path_of(node), self.frame_modules)
        if name is None:
            return None
        return ParameterMatmulCall(module=name, in_features=int(value.shape[0]), out_features=int(value.shape[1]),
                                   input_node=x.name, weight_input=weight_input)

    def _embedding_call(self, graph_module, node, placeholder_index) -> EmbeddingCall | None:
        ids, weight = embedding_args(node)
        tensor, weight_input = self._tensor_of(graph_module, weight, placeholder_index)
        module = self.linear_module(tensor, owner_path_of(node), self.frame_modules) if tensor is not None else None
        value = weight.meta.get("example_value") if isinstance(weight, fx.Node) else None
        # A lookup in a table that is no module's parameter is nothing LoRA can target.
        if value is None or module is None or not isinstance(ids, fx.Node):
            return None
        return EmbeddingCall(module=module, num_embeddings=int(value.shape[0]), embedding_dim=int(value.shape[1]),
                             ids_node=ids.name, weight_input=weight_input)

    @staticmethod
    def _owner_path(node: fx.Node) -> tuple[str | None, str]:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "self", ""
        path, _ = list(stack.values())[-1]
        return parse_module_path(path)

    def _linear_call(self, graph_module, node, placeholder_index) -> LinearCall | None:
        args = list(node.args) + [None] * 3
        x, weight, bias = args[0], args[1], node.kwargs.get("bias", args[2])
        tensor, weight_input = self._tensor_of(graph_module, weight, placeholder_index)
        module = None
        if tensor is not None:
            module = self.linear_module(tensor, owner_path_of(node), self.frame_modules)
        if module is None:
            # No parameter behind the weight: fall back to the owner path.
            module = owner_of(node)
        value = weight.meta.get("example_value") if isinstance(weight, fx.Node) else None
        if value is None or module is None:
            return None
        return LinearCall(
            module=module,
            in_features=int(value.shape[1]),
            out_features=int(value.shape[0]),
            bias=bias is not None,
            input_node=x.name if isinstance(x, fx.Node) else str(x),
            weight_input=weight_input,
            rows_picked=rows_picked_by_index(x),
        )

    def _tensor_of(self, graph_module, weight, placeholder_index):
        if not isinstance(weight, fx.Node):
            return None, None
        weight = through_to_local(weight)  # a tensor-parallel layer's local shard: its parameter's
        if weight.op == "placeholder":
            index = placeholder_index[weight]
            if index < len(self.example_inputs):
                return self.example_inputs[index], index
            return None, index
        if weight.op == "get_attr":
            return getattr(graph_module, weight.target, None), None
        return None, None
