"""The one place that orders mmlora_fx's FX passes.

Every graph dynamo hands mmlora_fx goes through `run_passes`: first the labelling passes, which
every caller needs (the recorder behind `mmlora-fx inspect`, the serving backend), then, when a
`Rewrite` is given, the LoRA rewrite and the check that it covered every served linear.

1. `ResolveOwners`: the absolute module owning each call node, each linear call's module, and
   each expert matmul's 3D weight with its rows' token layout;
2. `LabelPartitions`: the partition of each call node;
3. `InsertLoRAOps`: a LoRA op after each served target of the kinds `Rewrite.kinds` lists (linears,
   embedding lookups, expert matmuls, matmuls with a bare parameter, patch-embedding convolutions;
   sibling linears share one), or, for linears `Rewrite.fold` folds, LoRA inside their own GEMM;
4. `CheckLoRACoverage`: no served weight is used outside its LoRA op.

The passes import nothing from `mmlora_fx`: what they need from it (the module names, the
partition table, the op, the error to raise) comes in through `Labelling` and `Rewrite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from torch import fx

from .coverage import CheckLoRACoverage, UncoveredLinearError
from .lora_rewrite import InsertLoRAOps
from .ownership import LinearCall, ResolveOwners
from .partition import LabelPartitions
from .targets import LINEAR, TargetKind

__all__ = ["Labelling", "Rewrite", "run_passes"]


@dataclasses.dataclass(frozen=True)
class Labelling:
    """What the labelling passes need for one graph.

    `frame_modules`: the module each frame local is, for this compilation; `linear_module(weight,
    owner_path, frame_modules)`: the linear module a weight tensor belongs to; `label_of(module)`:
    the partition of an absolute module name (or of None: an unknown owner); `parameter_name(weight,
    owner_path, frame_modules)`: a parameter's absolute name (None: matmuls with parameters are
    not labelled).
    """

    frame_modules: Mapping[str, str]
    linear_module: Callable
    label_of: Callable[[str | None], str]
    example_inputs: Sequence[object]
    parameter_name: Callable | None = None  # the absolute name of a parameter tensor (2D `x @ W`, 3D expert weights)


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """What the LoRA rewrite needs for one graph.

    `serves(target)`: whether a target (a `LinearCall` for a linear, an `EmbeddingCall` for an
    embedding lookup) gets a LoRA op; `op`: the op to insert for kinds that bring none;
    `served_weights`: id of each served weight tensor -> its module (or the served modules sharing
    it), for the coverage check; `graph_name`: how errors name the graph; `error`: the
    exception type they raise; `kinds`: what counts as a target (`passes.targets`).
    """

    serves: Callable[[LinearCall], bool]
    op: object
    served_weights: Mapping[int, str | tuple[str, ...]]
    graph_name: str
    error: type[Exception] = UncoveredLinearError
    kinds: Sequence[TargetKind] = (LINEAR,)
    fold: Callable | None = None  # (target, static rows) -> the fold's width, or None (`InsertLoRAOps`)
    fold_op: object = None
    stack: Callable | None = None  # (target, static rows) -> the stack's width, or None (`InsertLoRAOps`)
    stack_op: object = None
    stack_layout: Callable | None = None  # target -> (slots, rank) where the stack's expand is the graph's, or None
    row_slots_op: object = None
    shrink_in_graph: str | None = None  # the graph expand's calls' shrink in tensor ops ("rank", "columns"), not the GEMM
    gemv: Callable | None = None  # (target, static rows) -> whether the call becomes the fused GEMV (`InsertLoRAOps`)
    gemv_op: object = None


def run_passes(graph_module: fx.GraphModule, labelling: Labelling, rewrite: Rewrite | None = None) -> fx.GraphModule:
    """Run the passes on `graph_module` in order (see the module's doc); return it, rewritten in place."""
    ResolveOwners(labelling.frame_modules, labelling.linear_module, labelling.example_inputs,
                  labelling.parameter_name)(graph_module)
    LabelPartitions(labelling.label_of)(graph_module)
    if rewrite is not None:
        InsertLoRAOps(rewrite.serves, rewrite.op, rewrite.kinds, rewrite.fold, rewrite.fold_op, rewrite.stack,
                      rewrite.stack_op, rewrite.stack_layout, rewrite.row_slots_op,
                      rewrite.shrink_in_graph, rewrite.gemv, rewrite.gemv_op)(graph_module)
        CheckLoRACoverage(rewrite.served_weights, labelling.example_inputs, rewrite.graph_name,
                          rewrite.error)(graph_module)
    return graph_module
