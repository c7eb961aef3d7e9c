"""Which token each row of a mixture-of-experts matmul belongs to, read off the graph.

An expert matmul does not see the language model's token rows as they are: the family's MoE block
first lays them out for its experts. Two layouts are recognised, each from the op that makes it:

* **tiled** (`h.repeat(n, 1)`, Llama4): every token once per expert, expert-major; row `i` of
  the `n * T` rows is token `i mod T`. A batched matmul then views them as `[experts, T, features]`.
* **interleaved** (`h.repeat_interleave(k, dim=0)`, transformers' `batched_mm` experts): each
  token `k` times in a row (once per routed expert); row `i` is token `i // k`.

From there to the matmul the rows may only pass through ops that keep each row where it is
(elementwise arithmetic and activations, dtype casts, splits of the feature dimension, views
that keep the feature dimension, trailing singleton dimensions) or through an earlier expert
matmul of the same layout (the down projection reads the gate/up projection's rows). Anything
else (a gather by a data-dependent index, a sort, a transpose) leaves the rows' tokens unknown,
and the caller refuses the target with the reason: nothing is guessed.

`RowLayout(tiles, interleave)` says it in two numbers: of `R` rows, row `i` is token
`(i mod (R / tiles)) // interleave`. The same rule table serves the FX walk here and the eager
path's forward tracking (`mmlora_fx.expert_hooks`), through `canonical_name`.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from .meta import example_value

__all__ = ["RowLayout", "TOKEN_ROWS", "canonical_name", "row_preserving", "layout_made_by", "row_layout_of",
           "rows_picked_by_index"]


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Of `R` rows, row `i` is token `(i mod (R / tiles)) // interleave`."""

    tiles: int = 1
    interleave: int = 1


TOKEN_ROWS = RowLayout()

# Ops that keep every row where it is (each output row computed from the same input row alone).
_ELEMENTWISE = {"mul", "add", "sub", "div", "truediv", "neg", "silu", "gelu", "relu", "sigmoid", "tanh", "softplus",
                "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "pow", "exp", "square"}
_FEATURE_SPLITS = {"chunk", "split", "getitem"}  # checked: along the last dimension only
_VIEWS = {"view", "reshape", "unsqueeze", "squeeze"}  # checked: the feature dimension kept
_OPERATORS = {operator.mul: "mul", operator.add: "add", operator.sub: "sub", operator.truediv: "truediv",
              operator.neg: "neg", operator.getitem: "getitem", operator.imul: "mul", operator.iadd: "add"}


def canonical_name(target) -> str:
    """One name per op, whether the graph calls it as a method, a torch function or an operator."""
    if isinstance(target, str):
        return target
    if target in _OPERATORS:
        return _OPERATORS[target]
    name = getattr(target, "__name__", str(target))
    return name.strip("_") if name.startswith("__") else name


def _shape(node) -> tuple[int, ...] | None:
    value = example_value(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def layout_made_by(name: str, args: tuple, kwargs: dict) -> RowLayout | None:
    """The layout `repeat(n, 1)` or `repeat_interleave(k, dim=0)` of token rows makes, else None."""
    if name == "repeat":
        repeats = args[1:] if len(args) > 2 else (args[1] if len(args) == 2 else ())
        repeats = tuple(repeats) if isinstance(repeats, (tuple, list, torch.Size)) else (repeats,)
        if len(repeats) == 2 and isinstance(repeats[0], int) and repeats[1] == 1:
            return RowLayout(tiles=repeats[0])
    if name == "repeat_interleave":
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        dim = args[2] if len(args) > 2 else kwargs.get("dim")
        if isinstance(repeats, int) and dim == 0:
            return RowLayout(interleave=repeats)
    return None


def row_preserving(name: str, args: tuple, kwargs: dict, in_shape, out_shape) -> bool:
    """Whether op `name` from an input of `in_shape` to `out_shape` keeps every row where it is."""
    if in_shape is None or out_shape is None:
        return False
    if name in _ELEMENTWISE:
        return tuple(in_shape) == tuple(out_shape)
    trailing_one = (len(in_shape) == len(out_shape) + 1 and in_shape[-1] == 1 and in_shape[:-1] == out_shape) or (
        len(out_shape) == len(in_shape) + 1 and out_shape[-1] == 1 and out_shape[:-1] == in_shape)
    if name in ("unsqueeze", "squeeze"):
        return trailing_one
    if name in ("view", "reshape"):
        # The feature dimension and the row count kept: the rows' order in memory is the same.
        return trailing_one or (in_shape[-1] == out_shape[-1] and _rows(in_shape) == _rows(out_shape))
    if name in _FEATURE_SPLITS:
        return tuple(in_shape[:-1]) == tuple(out_shape[:-1])
    return False


def _indexes_features_only(index) -> bool:
    """`x[..., a:b]` or `x[:, :, a:b]`: an index that slices the last dimension only."""
    if not isinstance(index, tuple) or not index:
        return False
    leading = index[:-1]
    return all(item is Ellipsis or item == slice(None) for item in leading) and isinstance(index[-1], (slice, int)) \
        and (Ellipsis in leading or len(leading) > 0)


def _rows(shape) -> int:
    count = 1
    for size in shape[:-1]:
        count *= size
    return count


# Ops that move rows: what they return holds the tokens in another order, or only some of them.
_ROW_MOVING = {"transpose", "permute", "t", "swapaxes", "swapdims", "movedim", "flip", "roll", "index_select",
               "gather", "take", "sort", "argsort", "cat", "stack", "masked_select", "nonzero", "index", "unbind"}


def _moved_before(node, depth: int) -> str | None:
    """Why the rows `node` holds may not be the tokens in order, or None. Walked back through ops
    that keep rows in place to the op that computed them (a norm, a linear: row by row) or to a
    graph input; an op that moves rows, or a second layout, on the way is the reason."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    name = canonical_name(node.target)
    if name in _ROW_MOVING or layout_made_by(name, tuple(node.args), dict(node.kwargs)) is not None:
        return f"{node.format_node()} moves or repeats the token rows before they are laid out for the experts"
    if name == "getitem" and isinstance(node.args[0], fx.Node) and not _indexes_features_only(node.args[1]) \
            and canonical_name(node.args[0].target) not in ("chunk", "split"):
        return f"{node.format_node()} picks rows by an index before they are laid out for the experts"
    sources = [arg for arg in node.args if isinstance(arg, fx.Node) and isinstance(example_value(arg), torch.Tensor)]
    full = [arg for arg in sources if row_preserving(name, node.args, node.kwargs, _shape(arg), _shape(node))]
    if not full:
        return None  # computed here, row by row as far as the walk can tell (a norm, a linear)
    return next((why for why in (_moved_before(arg, depth - 1) for arg in full) if why is not None), None)


def row_layout_of(node: fx.Node, expert_layouts: dict[fx.Node, RowLayout], depth: int = 64) -> tuple[RowLayout | None, str]:
    """(layout of the token rows `node` holds, "") or (None, why not): walks the graph back from
    `node` to the op that laid the rows out. `expert_layouts` holds the expert matmuls already
    labelled (their outputs keep their inputs' layout)."""
    if node in expert_layouts:
        return expert_layouts[node], ""
    if depth == 0 or not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None, f"the rows come from {getattr(node, 'op', node)} {getattr(node, 'target', '')}, not from a token layout"
    name = canonical_name(node.target)
    made = layout_made_by(name, tuple(node.args), dict(node.kwargs))
    if made is not None:
        # The layout is made of token rows only if what was repeated still holds the tokens in
        # order: `h.transpose(0, 1).reshape(-1, H).repeat(n, 1)` repeats them sequence-major.
        why = _moved_before(node.args[0], depth - 1)
        return (made, "") if why is None else (None, why)
    if name == "getitem" and isinstance(node.args[0], fx.Node) and canonical_name(node.args[0].target) in ("chunk", "split"):
        # `chunk(x, 2, dim=-1)[i]`: a split of the features, checked on the chunk itself.
        return row_layout_of(node.args[0], expert_layouts, depth - 1)
    value = example_value(node)
    # A split's value is a tuple of pieces: the rows of each piece are the input's.
    out_shape = tuple(value[0].shape) if isinstance(value, (tuple, list)) and value else _shape(node)
    if name == "getitem" and not _indexes_features_only(node.args[1]):
        return None, f"{node.format_node()} picks rows by an index: which token each row holds is not followed"
    sources = [arg for arg in node.args if isinstance(arg, fx.Node) and isinstance(example_value(arg), torch.Tensor)]
    full = [arg for arg in sources if row_preserving(name, node.args, node.kwargs, _shape(arg), out_shape)]
    if not full:
        return None, f"{node.format_node()} does not keep rows in place"
    # Operands broadcast along the rows (a routing weight per row, a scalar) are not followed; the
    # full-shaped ones must all agree.
    layouts = [row_layout_of(arg, expert_layouts, depth - 1) for arg in full]
    found = {layout for layout, _ in layouts}
    if None in found:
        return next((layout, why) for layout, why in layouts if layout is None)
    if len(found) > 1:
        return None, f"{node.name} mixes rows of layouts {sorted(map(str, found))}"
    return found.pop(), ""


_PICKING = {"index_select", "gather", "take", "masked_select", "index"}


def rows_picked_by_index(node, depth: int = 16) -> str | None:
    """Why the rows `node` holds were picked by a data-dependent index (`h[token_idx]`,
    `index_select`: a per-expert `nn.Linear` on the tokens routed to it), or None. Walked back
    through ops that keep rows in place to the op that computed them. A linear on such rows holds
    some of the tokens, in the router's order: no share of the requests' rows fits them."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    name = canonical_name(node.target)
    if name in _PICKING:
        return f"{node.format_node()} picks the rows by an index"
    if name == "getitem" and len(node.args) > 1 and isinstance(node.args[0], fx.Node) \
            and canonical_name(node.args[0].target) not in ("chunk", "split"):
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(isinstance(item, fx.Node) for item in index):
            return f"{node.format_node()} picks the rows by an index"
    sources = [arg for arg in node.args if isinstance(arg, fx.Node) and isinstance(example_value(arg), torch.Tensor)]
    full = [arg for arg in sources if row_preserving(name, node.args, node.kwargs, _shape(arg), _shape(node))]
    return next((why for why in (rows_picked_by_index(arg, depth - 1) for arg in full) if why is not None), None)
