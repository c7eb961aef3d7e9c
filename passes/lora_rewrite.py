"""Insert a LoRA op after every served target, one op per group of siblings sharing an input.

The op, `torch.ops.mmlora.lora_linear_(outputs, x, weights)` for linears (each kind of target
brings its own: `lora_embedding_(outputs, ids, weights)` for embedding lookups), adds each row's
adapter delta to the target's outputs in place. It is bound to nothing at rewrite time: dynamo reuses one graph for
every instance of a block, so the op resolves the adapter buffers and the partition's
token-to-slot table from the weights it receives, at run time.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import fx

from .meta import LORA, LORA_OP, PARTITION, example_value, is_lora_op, partition_of
from .targets import LINEAR, TargetKind

__all__ = ["InsertLoRAOps", "lora_ops"]


def lora_ops(graph_module: fx.GraphModule) -> list[fx.Node]:
    """The LoRA op nodes of a rewritten graph."""
    return [node for node in graph_module.graph.nodes if is_lora_op(node)]


def _defined_before(node: fx.Node, anchor: fx.Node, order: dict[fx.Node, int]) -> bool:
    return all(order[arg] < order[anchor] for arg in node.all_input_nodes)


def _placed_together(group: list[fx.Node]) -> fx.Node:
    """Move each sibling right after the previous member of its group; return the last member."""
    anchor = group[0]
    for sibling in group[1:]:
        anchor.append(sibling)
        anchor = sibling
    return anchor


def _bias_of(node: fx.Node):
    """A linear call's bias argument (positional or keyword), or None."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _read_through(node: fx.Node, view: fx.Node, width: int, keep: set[fx.Node]) -> None:
    """Make `view` (the first `out` columns of the stacked call `node`, or their sum with the
    expand) what `node`'s readers read, all but `keep`; `node`'s example value grows by `width`."""
    value = node.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        view.meta["example_value"] = value
        node.meta["example_value"] = value.new_empty(*value.shape[:-1], value.shape[-1] + width)
    node.replace_all_uses_with(view, delete_user_cb=lambda user: user not in keep)


def _static_rows(node: fx.Node, kind: TargetKind) -> int | None:
    """The rows of a linear call whose rows are known at compile time and whose weight is a plain
    2D tensor with contiguous rows, or None (what the fold, the stack and the fused GEMV may take;
    rows known only at run time keep the op, whose kernels serve any count)."""
    if kind.name != LINEAR.name:
        return None
    x, weight = example_value(kind.rows_of(node)), example_value(kind.weight_of(node))
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    if not all(isinstance(size, int) for size in x.shape) or weight.stride(1) != 1:
        return None
    return x.numel() // x.shape[-1]


def _call_after(graph: fx.Graph, anchor: fx.Node, target, args, method: bool = False) -> fx.Node:
    """A `call_method` (`method`) or `call_function` node of `target(*args)` right after `anchor`."""
    with graph.inserting_after(anchor):
        return graph.call_method(target, args) if method else graph.call_function(target, args)


class _RowSlots:
    """The row-slot op nodes of one graph's stacked calls with the graph expand, one per row count,
    right after the graph's inputs, and what every such call shares: the slots clamped to a valid
    index, whether a row has a slot, the gather index per rank."""

    def __init__(self, graph: fx.Graph, op):
        self.graph = graph
        self.op = op
        self.by_rows: dict[int, dict] = {}

    def of(self, rows: int, weight: fx.Node, partition) -> dict:
        entry = self.by_rows.get(rows)
        if entry is None:
            inputs = [node for node in self.graph.nodes if node.op == "placeholder"]
            slots = _call_after(self.graph, inputs[-1], self.op, ([], rows))
            slots.meta[LORA_OP] = True
            slots.meta[PARTITION] = partition
            safe = _call_after(self.graph, slots, torch.clamp, (slots, 0))
            has_slot = _call_after(self.graph, safe, operator.ge, (slots, 0))
            has_slot = _call_after(self.graph, has_slot, "unsqueeze", (has_slot, -1), method=True)
            entry = self.by_rows[rows] = {"slots": slots, "safe": safe, "has_slot": has_slot, "last": has_slot,
                                          "weights": [], "index": {}}
        if weight not in entry["weights"]:
            entry["weights"].append(weight)
        return entry

    def gather_index(self, entry: dict, rows: int, rank: int) -> fx.Node:
        """`[rows, 1, rank]`: each row's slot, the index of its own slot's shrink in `[rows, slots, rank]`."""
        index = entry["index"].get(rank)
        if index is None:
            index = _call_after(self.graph, entry["last"], "view", (entry["safe"], rows, 1, 1), method=True)
            index = _call_after(self.graph, index, "expand", (index, rows, 1, rank), method=True)
            entry["index"][rank] = entry["last"] = index
        return index

    def finish(self) -> None:
        for rows, entry in self.by_rows.items():
            entry["slots"].args = (entry["weights"], rows)


def _expand_in_graph(graph: fx.Graph, node: fx.Node, weight: fx.Node, width: int, layout: tuple[int, int],
                     row_slots: _RowSlots, anchor: fx.Node, x: fx.Node | None = None, shrink: str = "rank") -> fx.Node:
    """The stacked call `node` (of the weight input `weight`)'s expand as tensor ops after
    `anchor` (`node` or later; see `InsertLoRAOps`); returns the last node added. With `x` (the
    call's rows), `node` is the plain base GEMM and the shrink is tensor ops too (`width` 0), in
    the form `shrink` names (`InsertLoRAOps`' `shrink_in_graph`)."""
    slots, rank = layout
    out_features, in_features = example_value(weight).shape
    row_stride = example_value(weight).stride(0)
    value = example_value(node)
    rows = value.numel() // out_features
    dtype = value.dtype
    entry = row_slots.of(rows, weight, partition_of(node))
    created: set[fx.Node] = set()

    def emit(target, *args, method: bool = False) -> fx.Node:
        nonlocal anchor
        anchor = _call_after(graph, anchor, target, args, method)
        created.add(anchor)
        return anchor

    def weight_read(size, stride, offset) -> fx.Node:
        read = emit(torch.as_strided, weight, size, stride, offset)
        read.meta[LORA] = node.meta[LORA]  # a read of the weight's buffer that serves its LoRA
        return emit(operator.getitem, read, entry["safe"])  # each row's own slot's

    flat = emit("reshape", node, rows, out_features + width, method=True)
    base = emit(operator.getitem, flat, (slice(None), slice(None, out_features)))
    if x is None:
        shrunk = emit(operator.getitem, flat, (slice(None), slice(out_features, out_features + slots * rank)))
        shrunk = emit("reshape", shrunk, rows, slots, rank, method=True)
        own = emit(torch.gather, shrunk, 1, row_slots.gather_index(entry, rows, rank))  # [rows, 1, rank]
        own = emit("float", own, method=True)
    elif shrink == "columns":
        # Each rank column's shrink a reduction of its own over the input (`[rows]` each, like the
        # norm that often produces x), so that Inductor can fuse them into x's producer. Kernels
        # with 16 reductions a served call each: ours' first call took ~7x the kernel path's on an
        # H100 at e2e's 7B shape (360-368 s against 49-54 s, 2026-12-07).
        rows_in = emit("float", emit("reshape", x, rows, in_features, method=True), method=True)
        columns = []
        for column in range(rank):
            lora_a = weight_read((slots, in_features), (rank * row_stride, 1), (out_features + column) * row_stride)
            product = emit(operator.mul, rows_in, emit("float", lora_a, method=True))
            columns.append(emit("sum", product, -1, method=True))
        own = emit("view", emit(torch.stack, columns, -1), rows, 1, rank, method=True)  # [rows, 1, rank]
    else:
        # One `[rows, rank]` reduction over the input: a kernel of its own (its shape is not the
        # producer's), which Inductor can share among siblings reading the same x (q/k/v, gate/up).
        rows_in = emit("float", emit("reshape", x, rows, 1, in_features, method=True), method=True)
        lora_a = weight_read((slots, rank, in_features), (rank * row_stride, row_stride, 1), out_features * row_stride)
        product = emit(operator.mul, rows_in, emit("float", lora_a, method=True))  # [rows, rank, in]
        own = emit("view", emit("sum", product, -1, method=True), rows, 1, rank, method=True)  # [rows, 1, rank]
    lora_b = weight_read((slots, out_features, rank), (rank, row_stride, 1), in_features)  # [rows, out, rank]
    products = emit(operator.mul, own, emit("float", lora_b, method=True))  # [rows, out, rank]
    delta = None
    for column in range(rank):
        # The sum over the rank unrolled: pointwise ops Inductor can inline into the output's
        # readers (`sum(-1)` would be a reduction, a kernel of its own per call).
        term = emit(operator.getitem, products, (Ellipsis, column))
        delta = term if delta is None else emit(operator.add, delta, term)
    total = emit("to", emit(operator.add, emit("float", base, method=True), delta), dtype, method=True)
    served = emit(torch.where, entry["has_slot"], total, base)
    view = emit("reshape", served, *value.shape, method=True)
    _read_through(node, view, width, keep=created)
    node.meta[LORA]["op"] = entry["slots"].name
    node.meta[LORA]["expand"] = "graph"
    if x is not None:
        node.meta[LORA]["shrink"] = "graph"
    return anchor


class InsertLoRAOps:
    """Rewrite served targets to carry LoRA.

    Matches: nodes that one of `kinds` (`passes.targets`; by default the linear calls labelled by
    `ResolveOwners`) matches and for which `serves(target)` is true. Inserts the kind's op (or
    `op`, an in-place custom op, `torch.ops.mmlora.lora_linear_.default` in mmlora_fx) as
    `op(outputs, rows, weights)` after each group. Served targets of one kind that read the same
    rows within one partition are siblings (q/k/v, gate/up): they are moved next to each other and
    share one op, so that the LoRA shrink reads the input once.
    Writes `node.meta["mmlora_lora"]` on each served target (the op node's name and the sibling
    group), and `node.meta["mmlora_lora_op"] = True` on each inserted op.

    Folding (`fold`, `fold_op`; mmlora_fx's `folding.py`): a served linear call for which
    `fold(target, rows)` gives a width (rows: the call's static rows) is not grouped. Its input
    becomes `cat([x, fold_op(x, weight, width)])` and its weight `as_strided(weight)` over the
    weight's row plus `width` more columns, so its own GEMM adds the delta. The fold op node is
    marked as the target's LoRA op; the target and the `as_strided` node get `"folded": width`
    in `node.meta["mmlora_lora"]`.

    Stacking (`stack`, `stack_op`): served linear calls for which `stack(target, rows)` gives a
    width are grouped as usual, but each computes `linear(x, as_strided(weight), as_strided(bias))`
    over its weight's rows plus `width` more (every slot's A) and its bias plus `width` zeros, so
    its output ends in every slot's shrink; `stack_op(outputs, weights)` after the group adds the
    expand in place, and the target's readers read `output[..., :out]`. The targets and their
    `as_strided` nodes get `"stacked": width` in `node.meta["mmlora_lora"]`.

    The stack's graph expand (`stack_layout`, `row_slots_op`): a stacked call for whose target
    `stack_layout(target)` gives (slots, rank), each slot's B lying `[out, slots x rank]` beside
    its weight, gets no op. Its expand is plain tensor ops after the GEMM, which Inductor can fuse
    into the kernels that read the output: each row's own slot's `rank` shrink columns
    (`gather`), its slot's B (indexed through `as_strided(weight)`), their products summed over
    the rank unrolled (pointwise, so it can be inlined into a reader), added to the base columns
    in float32 and rounded, rows of no slot left as they are. The rows' slots come from
    `row_slots_op(weights, rows)`, one node per row count after the graph's inputs, over the
    weights of every call it serves (it checks them); that node is the group's LoRA op
    (`node.meta["mmlora_lora_op"]`), and the targets get `"expand": "graph"` beside `"stacked"`.
    With `shrink_in_graph`, those calls' GEMMs stay the base's (`"shrink": "graph"` beside the rest):
    the shrink is tensor ops too over each row's own slot's A (read through `as_strided(weight)`
    below the weight) instead of the GEMM reading every slot's A: `"rank"`, one `[rows, rank]`
    reduction over the input (a kernel of its own, shared by siblings); `"columns"`, one sum over
    the input per rank column, so that Inductor can fuse them into the kernel that produces the
    input (a norm, an activation), at a far longer compile.

    The fused GEMV (`gemv`, `gemv_op`): a served linear call for which `gemv(target, rows)` is true
    (one static row, at decode) is not grouped: the call itself becomes `gemv_op(x, weight, bias)`,
    the base GEMV with the row's LoRA inside, and is marked as its own LoRA op with `"gemv": True`.
    """

    def __init__(self, serves: Callable[[object], bool], op, kinds: Sequence[TargetKind] = (LINEAR,),
                 fold: Callable[[object, int], int | None] | None = None, fold_op=None,
                 stack: Callable[[object, int], int | None] | None = None, stack_op=None,
                 stack_layout: Callable[[object], tuple[int, int] | None] | None = None, row_slots_op=None,
                 shrink_in_graph: str | None = None, gemv: Callable[[object, int], bool] | None = None,
                 gemv_op=None):
        self.serves = serves
        self.gemv = gemv
        self.gemv_op = gemv_op
        self.op = op
        self.kinds = tuple(kinds)
        self.fold = fold
        self.fold_op = fold_op
        self.stack = stack
        self.stack_op = stack_op
        self.stack_layout = stack_layout
        self.row_slots_op = row_slots_op
        if shrink_in_graph not in (None, "rank", "columns"):
            raise ValueError(f"shrink_in_graph must be None, 'rank' or 'columns', not {shrink_in_graph!r}")
        self.shrink_in_graph = shrink_in_graph
        unbound = [kind.name for kind in self.kinds if kind.needs_op and kind.op is None]
        if unbound:
            raise ValueError(f"target kinds {unbound} need an op of their own: pass kind.with_op(op)")

    def __call__(self, graph_module: fx.GraphModule) -> fx.GraphModule:
        graph = graph_module.graph
        order = {node: index for index, node in enumerate(graph.nodes)}
        open_groups: dict[tuple, list[fx.Node]] = {}
        groups: list[tuple[TargetKind, list[fx.Node]]] = []
        for node in graph.nodes:
            kind = next((kind for kind in self.kinds if kind.match(node) is not None), None)
            if kind is None or not self.serves(kind.match(node)):
                continue
            if self._takes_gemv(node, kind):
                self._rewrite_gemv(node, kind, self.gemv_op)
                continue
            width = self._fold_width(node, kind)
            if width is not None:
                self._rewrite_folded(graph, node, kind, width, self.fold_op)
                continue
            stacked = self._stack_width(node, kind)
            key = (kind.name, kind.rows_of(node), partition_of(node), stacked is not None)
            group, widths = open_groups.get(key, (None, None))
            # A sibling joins only if it can move up next to the group's first target.
            if group is None or len(group) == kind.max_siblings or not _defined_before(node, group[0], order):
                group, widths = open_groups[key] = ([], {})
                groups.append((kind, group, widths))
            group.append(node)
            if stacked is not None:
                widths[node] = stacked
        row_slots = _RowSlots(graph, self.row_slots_op)
        for kind, group, widths in groups:
            # The graph expand reads B through a weight that is a graph input (dynamo's parameters
            # are): its row-slot op sits after the inputs and takes the weights as arguments.
            layouts = [self.stack_layout(kind.match(node))
                       if widths and self.stack_layout is not None and kind.weight_of(node).op == "placeholder"
                       else None for node in group]
            if widths and all(layouts):
                weights = [kind.weight_of(node) for node in group]
                if self.shrink_in_graph:
                    anchor = _placed_together(group)  # the base GEMMs as they are
                    for node in group:
                        node.meta[LORA] = {"group": [member.name for member in group], "stacked": widths[node]}
                else:
                    self._rewrite_stacked(graph, group, kind, widths, None)
                    anchor = group[-1]
                # Every sibling's expand after the group's last GEMM: the GEMMs first, so that
                # Inductor's scheduler finds each expand next to the kernel that reads it.
                for node, weight, layout in zip(group, weights, layouts):
                    anchor = _expand_in_graph(graph, node, weight, 0 if self.shrink_in_graph else widths[node], layout,
                                              row_slots, anchor, kind.rows_of(node) if self.shrink_in_graph else None,
                                              self.shrink_in_graph)
            elif widths:
                self._rewrite_stacked(graph, group, kind, widths, self.stack_op)
            else:
                self._rewrite(graph, group, kind, kind.op if kind.op is not None else self.op)
        row_slots.finish()
        graph.lint()
        graph_module.recompile()
        return graph_module

    def _takes_gemv(self, node: fx.Node, kind: TargetKind) -> bool:
        """Whether this call becomes the fused GEMV: `_static_rows` that `gemv(target, rows)` takes."""
        rows = _static_rows(node, kind) if self.gemv is not None else None
        return rows is not None and bool(self.gemv(kind.match(node), rows))

    @staticmethod
    def _rewrite_gemv(node: fx.Node, kind: TargetKind, gemv_op) -> None:
        x, weight, bias = kind.rows_of(node), kind.weight_of(node), _bias_of(node)
        node.target = gemv_op
        node.args = (x, weight, bias)
        node.kwargs = {}
        node.meta[LORA_OP] = True
        node.meta[LORA] = {"op": node.name, "group": [node.name], "gemv": True}

    def _fold_width(self, node: fx.Node, kind: TargetKind) -> int | None:
        """The fold's width for this call, or None: not a linear, no fold, dynamic rows, or a
        weight that is not the start of a fold buffer's rows."""
        width = self._in_gemm_width(node, kind, self.fold)
        weight = example_value(kind.weight_of(node)) if width is not None else None
        if weight is None or weight.stride(0) != weight.shape[1] + width:
            return None
        return width

    def _stack_width(self, node: fx.Node, kind: TargetKind) -> int | None:
        """The stack's width for this call, or None: as `_in_gemm_width`, or a bias that is not a
        graph input (a computed bias has no zeros after it to read). Dynamo's guards cannot tell a
        stacked weight from a plain one of the same strides; the op checks at run time that the
        module it serves is stacked (`LoRARuntime.apply_stacked`)."""
        width = self._in_gemm_width(node, kind, self.stack)
        bias = _bias_of(node)
        if width is None or (bias is not None and (not isinstance(bias, fx.Node) or bias.op not in ("placeholder",
                                                                                                     "get_attr"))):
            return None
        return width

    @staticmethod
    def _in_gemm_width(node: fx.Node, kind: TargetKind, choose) -> int | None:
        """What `choose(target, static rows)` (the fold's or the stack's) gives this call, or None:
        not a linear, none chosen, dynamic rows, or a weight that is not the top left of a buffer."""
        rows = _static_rows(node, kind) if choose is not None else None
        width = choose(kind.match(node), rows) if rows is not None else None
        if width is None or example_value(kind.weight_of(node)).storage_offset() != 0:
            return None
        return width

    @staticmethod
    def _rewrite_folded(graph: fx.Graph, node: fx.Node, kind: TargetKind, width: int, fold_op) -> None:
        x, weight = kind.rows_of(node), kind.weight_of(node)
        out_features, in_features = example_value(weight).shape
        with graph.inserting_before(node):
            shrunk = graph.call_function(fold_op, (x, weight, width))
            joined = graph.call_function(torch.cat, ([x, shrunk], -1))
            whole = graph.call_function(torch.as_strided, (weight, (out_features, in_features + width),
                                                           (in_features + width, 1), 0))
        node.args = (joined, whole, *node.args[2:])
        shrunk.meta[LORA_OP] = True
        shrunk.meta[PARTITION] = partition_of(node)
        record = {"op": shrunk.name, "group": [node.name], "folded": width}
        node.meta[LORA] = record
        whole.meta[LORA] = record

    @staticmethod
    def _rewrite_stacked(graph: fx.Graph, group: list[fx.Node], kind: TargetKind, widths: dict[fx.Node, int],
                         stack_op) -> None:
        anchor = _placed_together(group)
        weights = [kind.weight_of(node) for node in group]
        out_features = {}
        for node, weight in zip(group, weights):
            value = example_value(weight)
            (out, in_features), width = value.shape, widths[node]
            out_features[node] = out
            bias = _bias_of(node)
            with graph.inserting_before(node):
                whole = graph.call_function(torch.as_strided, (weight, (out + width, in_features), (value.stride(0), 1), 0))
                if bias is not None:
                    bias = graph.call_function(torch.as_strided, (bias, (out + width,), (1,), 0))
            node.args = (node.args[0], whole, bias)
            node.kwargs = {key: value for key, value in node.kwargs.items() if key != "bias"}
            node.meta[LORA] = whole.meta[LORA] = {"group": [member.name for member in group], "stacked": width}
        if stack_op is None:
            return  # the graph expand (`_expand_in_graph`) takes each target from here
        with graph.inserting_after(anchor):
            op = graph.call_function(stack_op, (list(group), weights))
        op.meta[LORA_OP] = True
        op.meta[PARTITION] = partition_of(group[0])
        anchor = op
        for node in group:
            with graph.inserting_after(anchor):
                view = graph.call_function(operator.getitem, (node, (Ellipsis, slice(None, out_features[node]))))
            anchor = view
            _read_through(node, view, widths[node], keep={op, view})
            node.meta[LORA]["op"] = op.name
        if "example_value" in group[0].meta:
            op.meta["example_value"] = None

    @staticmethod
    def _rewrite(graph: fx.Graph, group: list[fx.Node], kind: TargetKind, lora_op) -> None:
        first = group[0]
        anchor = _placed_together(group)
        with graph.inserting_after(anchor):
            op = graph.call_function(lora_op, (list(group), kind.rows_of(first), [kind.weight_of(node) for node in group],
                                               *kind.extra_args(first)))
        op.meta[LORA_OP] = True
        op.meta[PARTITION] = partition_of(first)
        if "example_value" in first.meta:
            op.meta["example_value"] = None
        for node in group:
            node.meta[LORA] = {"op": op.name, "group": [member.name for member in group]}
            for reader in kind.weight_readers(node):
                reader.meta[LORA] = {"op": op.name, "group": [member.name for member in group]}
