"""What the LoRA rewrite recognises as a target: one small matcher per kind, plus the op it inserts.

A kind says, for a node, whether it is a target of that kind (the record a labelling pass wrote
for it, or None), which node's rows LoRA reads (targets of one kind that read the same rows in
one partition are siblings and share one op), and which argument is the weight the op resolves
its adapter buffers by at run time. The kinds: a linear call, an embedding lookup (whose
"rows" are its token ids, and whose op the caller binds: `EMBEDDING.with_op(op)`, since passes
import nothing from mmlora_fx), a matmul with a bare 2D parameter (`x @ W`, served by the
linear op: its adapter is read into a linear's layout), and a batched matmul over a 3D expert
weight (`EXPERTS`), which passes its op the per-row expert ids and the facts of the product. A
convolution (a patch embedding) is one too: its op, bound by the caller like the embedding's,
unfolds the patches of its input. The next ones (a grouped matmul over a 3D expert weight) are
new entries here, each with its own matcher and op, not branches in the rewrite.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import fx

from .meta import conv_of, embedding_of, experts_of, linear_of, parameter_matmul_of
from .ownership import embedding_args

__all__ = ["TargetKind", "LINEAR", "EMBEDDING", "EXPERTS", "CONV", "PARAMETER_MATMUL"]


@dataclasses.dataclass(frozen=True)
class TargetKind:
    """`match(node)`: the node's target record (what `serves` is asked about), or None;
    `rows_of(node)`: the input node whose rows LoRA reads; `weight_of(node)`: the weight argument;
    `op`: the op inserted after a group, `op(outputs, rows, weights)` (None: the rewrite's default
    op); at most `max_siblings` targets share one op."""

    name: str
    match: Callable[[fx.Node], object | None]
    rows_of: Callable[[fx.Node], fx.Node]
    weight_of: Callable[[fx.Node], fx.Node]
    op: object = None
    max_siblings: int = 3
    needs_op: bool = False  # the rewrite's default op does not fit this kind: bind one with `with_op`
    # What else the op takes after its weights (the node's facts it needs at run time), and the
    # nodes other than the target that read its weight on its behalf (both: expert matmuls).
    extra_args: Callable[[fx.Node], tuple] = lambda node: ()
    weight_readers: Callable[[fx.Node], list[fx.Node]] = lambda node: []

    def with_op(self, op) -> "TargetKind":
        return dataclasses.replace(self, op=op)


# `F.linear(x, weight, bias)` calls labelled by `ResolveOwners` (`node.meta["mmlora_linear"]`).
def _linear_on_token_rows(node: fx.Node):
    """A linear call whose rows are not picked by an index (those are refused by the coverage check)."""
    call = linear_of(node)
    return call if call is not None and call.rows_picked is None else None


LINEAR = TargetKind("linear", match=_linear_on_token_rows, rows_of=lambda node: node.args[0],
                    weight_of=lambda node: node.args[1])

# `F.embedding(ids, weight)` lookups labelled by `ResolveOwners` (`node.meta["mmlora_embedding"]`):
# the op reads the token ids, not the looked-up rows, and each lookup has its own op.
EMBEDDING = TargetKind("embedding", match=embedding_of, rows_of=lambda node: embedding_args(node)[0],
                       weight_of=lambda node: embedding_args(node)[1], max_siblings=1, needs_op=True)


def _experts_served(node: fx.Node):
    # A matmul whose rows' tokens could not be told is no target: the coverage check refuses a
    # served weight used there, with the reason.
    call = experts_of(node)
    return call if call is not None and call.layout is not None else None


def _node_named(node: fx.Node, name: str | None) -> fx.Node | None:
    if name is None:
        return None
    return next(arg for arg in node.graph.nodes if arg.name == name)


def _experts_weight(node: fx.Node) -> fx.Node:
    gather = _node_named(node, experts_of(node).gather_node)
    return gather.args[0] if gather is not None else node.args[1]


def _experts_extra(node: fx.Node) -> tuple:
    call = experts_of(node)
    return (_node_named(node, call.expert_ids_node), call.contracted_dim, call.layout.tiles, call.layout.interleave)


# `torch.bmm` with a 3D expert weight labelled by `ResolveOwners` (`node.meta["mmlora_experts"]`):
# the op reads the rows the product reads, and gets the expert ids of a gathered weight, which
# weight dimension is summed over, and the rows' token layout. One op per matmul.
EXPERTS = TargetKind("experts", match=_experts_served, rows_of=lambda node: _node_named(node, experts_of(node).input_node),
                     weight_of=_experts_weight, max_siblings=1, needs_op=True, extra_args=_experts_extra,
                     weight_readers=lambda node: [reader for reader in [_node_named(node, experts_of(node).gather_node)]
                                                  if reader is not None])

# `torch.matmul(x, W)` / `x @ W` with `W` a module's 2D parameter, labelled by `ResolveOwners`
# (`node.meta["mmlora_parameter_matmul"]`). `x @ W` is a linear of `W.shape[0] -> W.shape[1]` whose
# adapter is stored in a linear's layout, so the rewrite's default (linear) op serves it.
PARAMETER_MATMUL = TargetKind("parameter_matmul", match=parameter_matmul_of, rows_of=lambda node: node.args[0],
                              weight_of=lambda node: node.args[1])

# `torch.conv2d(x, weight, ...)` (and conv1d/3d) labelled by `ResolveOwners` (`node.meta["mmlora_conv"]`):
# the op reads the convolution's input and unfolds its patches; each convolution has its own op.
CONV = TargetKind("conv", match=conv_of, rows_of=lambda node: node.args[0], weight_of=lambda node: node.args[1],
                  max_siblings=1, needs_op=True)
