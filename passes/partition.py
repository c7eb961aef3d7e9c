"""Label every call node with the partition (tower, connector, language model, other) it runs in."""

from __future__ import annotations

from torch import fx

from mmlora_fx.partitions import OTHER, PartitionMap

__all__ = ["LabelPartitions", "partition_of"]


def partition_of(node: fx.Node) -> str | None:
    """The partition label `LabelPartitions` gave `node`, or None for nodes it does not label."""
    return node.meta.get("mmlora_partition")


class LabelPartitions:
    """Label call nodes by the longest partition prefix owning their module.

    Matches: every node `ResolveOwners` gave an owner (`node.meta["mmlora_owner"]`).
    Writes `node.meta["mmlora_partition"]`: the partition of the linear's own module for linear
    calls, of the owning module otherwise; `other` when the owner is unknown or no prefix owns it.
    """

    def __init__(self, partition_map: PartitionMap):
        self.partition_map = partition_map

    def __call__(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        for node in graph_module.graph.nodes:
            if "mmlora_owner_path" not in node.meta:
                continue
            linear = node.meta.get("mmlora_linear")
            owner = linear.module if linear is not None else node.meta.get("mmlora_owner")
            node.meta["mmlora_partition"] = self.partition_map.partition_of(owner) if owner is not None else OTHER
        return graph_module
