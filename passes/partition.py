"""Label every call node with the partition (tower, connector, language model, other) it runs in."""

from __future__ import annotations

from collections.abc import Callable

from torch import fx

from .meta import PARTITION, is_call_node, owner_of, partition_of, target_of

__all__ = ["LabelPartitions", "partition_of"]


class LabelPartitions:
    """Label call nodes by the longest partition prefix owning their module.

    Matches: every call node `ResolveOwners` labelled.
    Writes `node.meta["mmlora_partition"]`: `label_of(module)` of the linear's or embedding's own
    module for linear calls and embedding lookups, of the owning module otherwise, `label_of(None)` when the owner is unknown (the caller's
    partition table says what that is: `other`).
    """

    def __init__(self, label_of: Callable[[str | None], str]):
        self.label_of = label_of

    def __call__(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        for node in graph_module.graph.nodes:
            if not is_call_node(node):
                continue
            target = target_of(node)
            node.meta[PARTITION] = self.label_of(target.module if target is not None else owner_of(node))
        return graph_module
