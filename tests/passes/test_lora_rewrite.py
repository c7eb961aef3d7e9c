"""The LoRA rewrite: one op per group of served siblings, placed before any use of their outputs."""

import torch
from torch import fx, nn

from mmlora_fx.capture import GraphRecorder, ModuleNames
from mmlora_fx.partitions import PartitionMap, PartitionPrefix
from mmlora_fx.passes import LINEAR, InsertLoRAOps, Rewrite, TargetKind, lora_of, lora_ops


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
        self.norm = nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x).view(2, 3, 2, 4) * 2  # uses q before k and v are computed
        k = self.k(x).view(2, 3, 2, 4)
        v = self.v(x).view(2, 3, 2, 4)
        mixed = (q * k + v).reshape(2, 3, 8)
        return self.o(mixed) + self.norm(x)


def no_lora(outputs, x, weights):
    """Stands in for the LoRA op: the rewrite is under test here, not a runtime."""


def rewrite(model, serves):
    """The model's graph, labelled and rewritten, with `no_lora` as the op."""
    recorder = GraphRecorder(
        ModuleNames(model), PartitionMap([PartitionPrefix("", "language_model", "user")]),
        rewrite_for=lambda record, inputs: Rewrite(serves, no_lora, {}, str(record.index)),
    )
    torch._dynamo.reset()
    torch.compile(model, backend=recorder, fullgraph=True)(torch.randn(2, 3, 8))
    torch._dynamo.reset()
    [record] = recorder.records
    return record.graph_module


def test_siblings_share_one_op_that_precedes_every_use():
    graph_module = rewrite(Attention(), lambda linear: linear.module != "norm")
    ops = lora_ops(graph_module)
    assert sorted(len(op.args[0]) for op in ops) == [1, 3]
    order = {node: index for index, node in enumerate(graph_module.graph.nodes)}
    for op in ops:
        for output in op.args[0]:
            users = [user for user in output.users if user is not op]
            assert users and all(order[user] > order[op] for user in users), output.name
    group = next(op for op in ops if len(op.args[0]) == 3)
    assert [node.meta["mmlora_linear"].module for node in group.args[0]] == ["q", "k", "v"]
    assert group.args[1] is group.args[0][0].args[0], "the op reads the shared input"


def test_unserved_linears_stay_untouched():
    graph_module = rewrite(Attention(), lambda linear: linear.module in ("q", "o"))
    ops = lora_ops(graph_module)
    served = sorted(node.meta["mmlora_linear"].module for op in ops for node in op.args[0])
    assert served == ["o", "q"]
    untouched = [node for node in graph_module.graph.nodes
                 if node.meta.get("mmlora_linear") and not node.meta.get("mmlora_lora")]
    assert sorted(node.meta["mmlora_linear"].module for node in untouched) == ["k", "norm", "v"]


def test_at_most_three_siblings_per_op():
    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(8, 8) for _ in range(5))

        def forward(self, x):
            return sum(head(x) for head in self.heads)

    graph_module = rewrite(Wide(), lambda linear: True)
    assert isinstance(graph_module, fx.GraphModule)
    assert sorted(len(op.args[0]) for op in lora_ops(graph_module)) == [2, 3]


class Projector(nn.Module):
    """A bare parameter used in a matmul (Gemma3's projector does this): no linear module."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return torch.matmul(x, self.a), torch.matmul(x, self.b)


def test_a_new_target_kind_is_one_entry_with_its_own_op():
    # A kind for `matmul(rows, parameter)`: its matcher and its op, no change to the rewrite.
    def matmul_op(outputs, rows, weights):
        """Stands in for a matmul kind's own LoRA op."""

    def is_parameter_matmul(node):
        return node if node.op == "call_function" and node.target is torch.matmul else None

    kind = TargetKind("matmul", match=is_parameter_matmul, rows_of=lambda node: node.args[0],
                      weight_of=lambda node: node.args[1], op=matmul_op)
    graph_module = fx.symbolic_trace(Projector())
    InsertLoRAOps(lambda target: True, no_lora, kinds=[LINEAR, kind])(graph_module)
    ops = lora_ops(graph_module)
    assert [op.target for op in ops] == [matmul_op, matmul_op]  # the kind's op, not the default one
    for op, weight in zip(ops, ["a", "b"]):
        [output], rows, [parameter] = op.args
        assert output.target is torch.matmul and rows.op == "placeholder" and parameter.target == weight
        assert lora_of(output)["op"] == op.name
