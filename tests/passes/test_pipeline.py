"""The pass pipeline: one ordered list, and `passes/` standing on its own (it imports nothing of mmlora_fx)."""

import ast
from pathlib import Path

import torch
from torch import fx, nn

from mmlora_fx.passes import Labelling, Rewrite, linear_of, lora_of, partition_of, run_passes

PASSES = Path(__file__).resolve().parents[2] / "passes"


def test_passes_import_nothing_from_mmlora_fx():
    for path in sorted(PASSES.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not any(name == "mmlora_fx" or name.startswith("mmlora_fx.") for name in names), path.name


def test_run_passes_labels_then_rewrites_in_order():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(4, 4)

        def forward(self, x):
            return self.up(x)

    model = Model()
    graph_module = fx.symbolic_trace(model)
    weights = {id(model.up.weight): "up"}
    # symbolic_trace calls the linear as a module: fold it into a linear call, as dynamo gives it.
    for node in list(graph_module.graph.nodes):
        if node.op == "call_module":
            with graph_module.graph.inserting_before(node):
                weight = graph_module.graph.placeholder("up_weight")
                weight.meta["example_value"] = model.up.weight
                node.op, node.target, node.args = "call_function", torch.nn.functional.linear, (node.args[0], weight)
    graph_module.recompile()
    seen = []

    def no_lora(outputs, x, weights):
        seen.append(len(outputs))

    labelling = Labelling({"self": ""}, lambda weight, path, frames: "up", lambda owner: "language_model",
                          [None, model.up.weight])
    run_passes(graph_module, labelling, Rewrite(lambda linear: True, no_lora, weights, "g"))
    [linear] = [node for node in graph_module.graph.nodes if linear_of(node) is not None]
    assert linear_of(linear).module == "up" and partition_of(linear) == "language_model" and lora_of(linear)
    graph_module(torch.randn(2, 4), model.up.weight)
    assert seen == [1]
