"""Insert a LoRA op after every served linear, one op per group of siblings sharing an input.

The op, `torch.ops.mmlora.lora_linear_(outputs, x, weights)`, adds each row's adapter delta to
the linear outputs in place. It is bound to nothing at rewrite time: dynamo reuses one graph for
every instance of a block, so the op resolves the adapter buffers and the partition's
token-to-slot table from the weights it receives, at run time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from .meta import LORA, LORA_OP, PARTITION, is_lora_op, linear_of, partition_of
from .ownership import LinearCall

__all__ = ["InsertLoRAOps", "lora_ops"]


def lora_ops(graph_module: fx.GraphModule) -> list[fx.Node]:
    """The LoRA op nodes of a rewritten graph."""
    return [node for node in graph_module.graph.nodes if is_lora_op(node)]


def _defined_before(node: fx.Node, anchor: fx.Node, order: dict[fx.Node, int]) -> bool:
    return all(order[arg] < order[anchor] for arg in node.all_input_nodes)


class InsertLoRAOps:
    """Rewrite served linears to carry LoRA.

    Matches: linear call nodes labelled by `ResolveOwners` (`node.meta["mmlora_linear"]`) for
    which `serves(linear_call)` is true. Inserts `op(outputs, x, weights)` (an in-place custom op,
    `torch.ops.mmlora.lora_linear_.default` in mmlora_fx) after each group. Served linears that read the same input node within one
    partition are siblings (q/k/v, gate/up): they are moved next to each other and share one op,
    so that the LoRA shrink reads the input once.
    Writes `node.meta["mmlora_lora"]` on each served linear (the op node's name and the sibling
    group), and `node.meta["mmlora_lora_op"] = True` on each inserted op.
    """

    def __init__(self, serves: Callable[[LinearCall], bool], op, max_siblings: int = 3):
        self.serves = serves
        self.op = op
        self.max_siblings = max_siblings

    def __call__(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        graph = graph_module.graph
        order = {node: index for index, node in enumerate(graph.nodes)}
        open_groups: dict[tuple, list[fx.Node]] = {}
        groups: list[list[fx.Node]] = []
        for node in graph.nodes:
            linear = linear_of(node)
            if linear is None or not self.serves(linear):
                continue
            key = (node.args[0], partition_of(node))
            group = open_groups.get(key)
            # A sibling joins only if it can move up next to the group's first linear.
            if group is None or len(group) == self.max_siblings or not _defined_before(node, group[0], order):
                group = open_groups[key] = []
                groups.append(group)
            group.append(node)
        for group in groups:
            self._rewrite(graph, group, self.op)
        graph.lint()
        graph_module.recompile()
        return graph_module

    @staticmethod
    def _rewrite(graph: fx.Graph, group: list[fx.Node], lora_op) -> None:
        first = group[0]
        anchor = first
        for sibling in group[1:]:
            anchor.append(sibling)  # moves the sibling right after the previous member
            anchor = sibling
        with graph.inserting_after(anchor):
            op = graph.call_function(lora_op, (list(group), first.args[0], [node.args[1] for node in group]))
        op.meta[LORA_OP] = True
        op.meta[PARTITION] = partition_of(first)
        if "example_value" in first.meta:
            op.meta["example_value"] = None
        for node in group:
            node.meta[LORA] = {"op": op.name, "group": [member.name for member in group]}
