"""The coverage check: a served linear's weight may reach a graph only through its LoRA-carrying linear."""

import pytest
import torch
from torch import nn

from mmlora_fx.backend import our_errors_unwrapped
from mmlora_fx.capture import GraphRecorder, ModuleNames
from mmlora_fx.errors import CaptureError
from mmlora_fx.partitions import PartitionMap, PartitionPrefix
from mmlora_fx.passes import Rewrite


class Block(nn.Module):
    def __init__(self, disguised: bool):
        super().__init__()
        self.up, self.down = nn.Linear(8, 8), nn.Linear(8, 8)
        self.disguised = disguised

    def forward(self, x):
        hidden = self.up(x)
        # A linear in disguise: the weight goes to a matmul the rewrite does not see.
        down = hidden @ self.down.weight.t() if self.disguised else self.down(hidden)
        return down + self.down.weight.shape[0]  # reading the size is harmless


def no_lora(outputs, x, weights):
    """Stands in for the LoRA op: the passes are under test here, not a runtime."""


def check(model, served):
    """Label, rewrite and check the model's graph with `served` module names."""
    weights = {id(module.weight): name for name, module in model.named_modules() if name in served}

    def rewrite_for(record, inputs):
        return Rewrite(lambda linear: linear.module in served, no_lora, weights, f"{record.index} ({record.function})",
                       CaptureError)

    recorder = GraphRecorder(ModuleNames(model), PartitionMap([PartitionPrefix("", "language_model", "user")]),
                             rewrite_for=rewrite_for)
    torch._dynamo.reset()
    try:
        with our_errors_unwrapped():
            torch.compile(model, backend=recorder, fullgraph=True)(torch.randn(2, 8))
    finally:
        torch._dynamo.reset()


def test_served_linears_with_their_op_pass():
    check(Block(disguised=False), {"up", "down"})


def test_a_served_weight_used_outside_a_linear_is_refused_naming_module_graph_and_node():
    with pytest.raises(CaptureError) as caught:
        check(Block(disguised=True), {"up", "down"})
    message = str(caught.value)
    assert "served layer 'down' would run without its LoRA in graph 0 (forward)" in message
    assert "outside a target the rewrite serves" in message


def test_unserved_weights_may_be_used_anyhow():
    check(Block(disguised=True), {"up"})
