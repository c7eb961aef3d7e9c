"""Check that every served linear a graph computes carries its LoRA op: coverage, not hope.

A served linear's weight can reach a graph in ways `InsertLoRAOps` does not rewrite: a linear
call whose module could not be resolved, the weight fed to a matmul of its own (`x @ w.t()`), or
an `nn.Linear` called as a submodule. A served expert weight likewise: read by anything but a
batched matmul whose rows' tokens were traced (an expert loop's `F.linear(x[idx], W[e])`, a
grouped matmul, rows gathered by a data-dependent index). Each would run the base layer with no adapter and no
error, so a graph holding one is refused at compile time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import fx, nn

from .meta import example_value, experts_of, is_lora_op, is_to_local, linear_of, lora_of, target_of

__all__ = ["CheckLoRACoverage", "UncoveredLinearError"]


class UncoveredLinearError(Exception):
    """A served linear would run without its LoRA op (the default error of `CheckLoRACoverage`)."""


def _is_tensor_value(node: fx.Node) -> bool:
    value = example_value(node)
    return value is None or isinstance(value, torch.Tensor)


class CheckLoRACoverage:
    """Refuse a graph in which a served linear's weight is used without its LoRA op.

    Matches: placeholders whose example input is the weight of a served target
    (`served_weights`: id of the weight tensor -> module name, or the names of the served modules
    sharing it: a tied head and embedding), get_attr nodes holding one, and `call_module` nodes
    calling a served `nn.Linear` or `nn.Embedding`.
    Allowed users of such a weight: targets `InsertLoRAOps` rewrote (`node.meta["mmlora_lora"]`),
    the LoRA op itself, targets resolved to another module sharing the weight that is not served
    (the head tied to a served embedding), and nodes that read no tensor from it (its size).
    Writes nothing into `node.meta`; raises `error` (mmlora_fx passes its `CaptureError`) naming
    the module, the graph, the node and why.
    """

    def __init__(self, served_weights: Mapping[int, str | Collection[str]], example_inputs: Sequence[object],
                 graph_name: str, error: type[Exception] = UncoveredLinearError):
        self.served_weights = {key: (value,) if isinstance(value, str) else tuple(value)
                               for key, value in served_weights.items()}
        self.example_inputs = example_inputs
        self.graph_name = graph_name
        self.error = error

    def __call__(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
        for index, node in enumerate(placeholders):
            tensor = self.example_inputs[index] if index < len(self.example_inputs) else None
            self._check_users(node, self.served_weights.get(id(tensor)))
        for node in graph_module.graph.nodes:
            if node.op == "get_attr":
                self._check_users(node, self.served_weights.get(id(getattr(graph_module, node.target, None))))
            elif node.op == "call_module":
                module = graph_module.get_submodule(node.target)
                if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) in self.served_weights:
                    self._refuse(self.served_weights[id(module.weight)], node,
                                 f"the {type(module).__name__} is called as a submodule, which the LoRA rewrite does "
                                 "not reach")
        return graph_module

    def _check_users(self, weight: fx.Node, modules: tuple[str, ...] | None) -> None:
        if modules is None:
            return
        for user in weight.users:
            if is_lora_op(user) or (lora_of(user) and weight in user.args[:2]):
                continue
            if is_to_local(user):
                self._check_users(user, modules)  # the local shard of a sharded weight: its users are the weight's
                continue
            if not _is_tensor_value(user):
                continue  # reads the weight's size, not its values
            target = target_of(user)
            if target is not None and target.module not in modules:
                continue  # another module's use of a shared weight, and that module is not served
            experts = next((experts_of(node) for node in [user, *user.users] if experts_of(node) is not None), None)
            if experts is not None and experts.layout is None:
                reason = f"an expert matmul whose rows' tokens cannot be told ({experts.why})"
            elif linear_of(user) is not None and linear_of(user).rows_picked is not None:
                reason = (f"a linear on rows picked by an index ({linear_of(user).rows_picked}): which request each "
                          "row belongs to cannot be told (per-expert linears on routed tokens are not served; "
                          "fused 3D expert weights are)")
            elif linear_of(user) is None and user.op == "call_function" and "linear" in str(user.target):
                reason = "a linear call whose module could not be resolved"
            else:
                reason = (f"the weight is used by {user.op} {user.target} outside a target the rewrite serves (a "
                          "linear, an embedding lookup, a patch-embedding convolution, a matmul x @ W with the parameter, "
                          "a batched matmul with the expert weight)")
            self._refuse(modules, user, reason)

    def _refuse(self, modules: tuple[str, ...], node: fx.Node, reason: str) -> None:
        target = target_of(node)
        module = target.module if target is not None and target.module in modules else " / ".join(modules)
        raise self.error(
            f"served layer {module!r} would run without its LoRA in graph {self.graph_name}, node {node.name!r}: "
            f"{reason}. Serve it elsewhere or leave it out with target_modules=/partitions= "
            "(and please report the model)"
        )
