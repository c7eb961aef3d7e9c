"""The partition pass: every call node gets its owner's partition; unknown owners are other."""

import torch
from torch import fx

from mmlora_fx.partitions import PartitionMap, PartitionPrefix
from mmlora_fx.passes import LabelPartitions, partition_of


def test_labels_follow_the_owner_and_default_to_other():
    graph = fx.Graph()
    x = graph.placeholder("x")
    first = graph.call_function(torch.relu, (x,))
    second = graph.call_function(torch.sigmoid, (first,))
    third = graph.call_function(torch.tanh, (second,))
    graph.output(third)
    module = fx.GraphModule(torch.nn.Module(), graph)
    first.meta.update(mmlora_owner_path=("self", "visual.merger"), mmlora_owner="model.visual.merger")
    second.meta.update(mmlora_owner_path=("self", "blocks.0"), mmlora_owner="model.visual.blocks.0")
    third.meta.update(mmlora_owner_path=("other", ""), mmlora_owner=None)
    table = PartitionMap([PartitionPrefix("model.visual", "tower", "user"),
                          PartitionPrefix("model.visual.merger", "connector", "user")])
    LabelPartitions(lambda owner: table.partition_of(owner) if owner is not None else "other")(module)
    assert [partition_of(node) for node in (x, first, second, third)] == [None, "connector", "tower", "other"]
