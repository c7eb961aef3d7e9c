"""Owner resolution: relative dynamo paths and parameters become absolute module names."""

import pytest
import torch
from torch import nn

from mmlora_fx.capture import GraphRecorder, ModuleNames
from mmlora_fx.partitions import PartitionMap, PartitionPrefix
from mmlora_fx.passes import parse_module_path


@pytest.mark.parametrize("path, expected", [
    ("L['self'].layers[0].mlp.fc1", ("self", "layers.0.mlp.fc1")),
    ("L['self']._modules['visual']._modules['blocks']['1']", ("self", "visual.blocks.1")),
    ("L['self']", ("self", "")),
    ("L['block'].attn", ("block", "attn")),
    ("G['something']", (None, "G['something']")),
])
def test_parse_module_path(path, expected):
    assert parse_module_path(path) == expected


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        x = self.fc(x)
        torch._dynamo.graph_break()  # every block instance reuses this frame's graphs
        return x.relu()


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        # No loop: dynamo resumes this frame after each block's break, so the head is captured.
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[2](x)
        return self.head(x)


def test_one_graph_per_block_resolves_to_each_instance():
    model = Tower()
    recorder = GraphRecorder(ModuleNames(model), PartitionMap([PartitionPrefix("blocks", "tower", "user")]),
                             record_calls=True)
    torch._dynamo.reset()
    torch.compile(model, backend=recorder)(torch.randn(3, 4))
    torch._dynamo.reset()
    fc_nodes = [(record, node) for record in recorder.records for node in record.linear_nodes()
                if node.meta["mmlora_linear"].module.endswith(".fc")]
    modules = [instance.linear_modules[node.name] for record, node in fc_nodes for instance in record.instances]
    assert sorted(modules) == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    assert all(node.meta["mmlora_partition"] == "tower" for _, node in fc_nodes)
    head = [node for record in recorder.records for node in record.linear_nodes()
            if node.meta["mmlora_linear"].module == "head"]
    assert len(head) == 1 and head[0].meta["mmlora_partition"] == "other"
    assert head[0].meta["mmlora_linear"].in_features == 4 and head[0].meta["mmlora_linear"].out_features == 2
