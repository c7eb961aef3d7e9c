"""What the LoRA rewrite recognises as a target: one small matcher per kind, plus the op it inserts.

A kind says, for a node, whether it is a target of that kind (the record a labelling pass wrote
for it, or None), which node's rows LoRA reads (targets of one kind that read the same rows in
one partition are siblings and share one op), and which argument is the weight the op resolves
its adapter buffers by at run time. Two kinds today: a linear call, and an embedding lookup (whose
"rows" are its token ids, and whose op the caller binds: `EMBEDDING.with_op(op)`, since passes
import nothing from mmlora_fx), and a matmul with a bare 2D parameter (`x @ W`, served by the
linear op: its adapter is read into a linear's layout). The next ones (a grouped matmul over a
3D expert weight) are new entries here, each with its own matcher and op, not branches in the
rewrite. A convolution (a patch embedding) is one too: its op, bound by the caller like the
embedding's, unfolds the patches of its input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import fx

from .meta import conv_of, embedding_of, linear_of, parameter_matmul_of
from .ownership import embedding_args

__all__ = ["TargetKind", "LINEAR", "EMBEDDING", "CONV", "PARAMETER_MATMUL"]


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

    def with_op(self, op) -> "TargetKind":
        return dataclasses.replace(self, op=op)


# `F.linear(x, weight, bias)` calls labelled by `ResolveOwners` (`node.meta["mmlora_linear"]`).
LINEAR = TargetKind("linear", match=linear_of, rows_of=lambda node: node.args[0], weight_of=lambda node: node.args[1])

# `F.embedding(ids, weight)` lookups labelled by `ResolveOwners` (`node.meta["mmlora_embedding"]`):
# the op reads the token ids, not the looked-up rows, and each lookup has its own op.
EMBEDDING = TargetKind("embedding", match=embedding_of, rows_of=lambda node: embedding_args(node)[0],
                       weight_of=lambda node: embedding_args(node)[1], max_siblings=1, needs_op=True)

# `torch.matmul(x, W)` / `x @ W` with `W` a module's 2D parameter, labelled by `ResolveOwners`
# (`node.meta["mmlora_parameter_matmul"]`). `x @ W` is a linear of `W.shape[0] -> W.shape[1]` whose
# adapter is stored in a linear's layout, so the rewrite's default (linear) op serves it.
PARAMETER_MATMUL = TargetKind("parameter_matmul", match=parameter_matmul_of, rows_of=lambda node: node.args[0],
                              weight_of=lambda node: node.args[1])

# `torch.conv2d(x, weight, ...)` (and conv1d/3d) labelled by `ResolveOwners` (`node.meta["mmlora_conv"]`):
# the op reads the convolution's input and unfolds its patches; each convolution has its own op.
CONV = TargetKind("conv", match=conv_of, rows_of=lambda node: node.args[0], weight_of=lambda node: node.args[1],
                  max_siblings=1, needs_op=True)
