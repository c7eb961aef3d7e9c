"""What the passes saw and did, as a JSON-ready report, a text table, or a DOT drawing.

The JSON layout is stable (its `schema` field names the version) and documented in
docs/INSPECT.md; the text and DOT forms are rendered from it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import networkx as nx
import torch

from .capture import Capture
from .linear_index import CONV, EMBEDDING, EXPERTS, LINEAR, PARAMETER, LinearIndex
from .partitions import LANGUAGE_MODEL, OTHER, PARTITIONS, modality_of
from .passes import conv_of, embedding_of, experts_of, linear_of, lora_of, parameter_matmul_of, partition_of
from .row_owners import UnitOwnership, rows_are_units, token_name
from .sharding import distributed_layout, layout_of

__all__ = ["SCHEMA", "build_report", "render_text", "render_dot", "collapse_names", "tensor_parallel_entries"]

SCHEMA = "mmlora-fx.inspect/1"


def _rows_owned(partition: str, shape, ownership: dict) -> str:
    """How the runtime owns the rows of a linear input of `shape` (see `LoRARuntime._owner_table`)."""
    if partition == LANGUAGE_MODEL:
        return "per request"
    modality = modality_of(partition)
    if modality is None:
        return "-"
    traced = ownership.get(modality)
    units = traced.units if traced is not None else None
    return "per unit" if rows_are_units(shape, units) else f"by {token_name(modality)} tokens"


def build_report(capture: Capture, linears: LinearIndex, model: str, adapters=(), serving=None,
                 ownership: dict[str, UnitOwnership] | None = None, layouts=None, folds=None, stacks=None,
                 stack_expand: str = "kernel", stack_shrink: str = "gemm") -> dict:
    """The inspection report of one capture; `adapters` are `AdapterScan`s, `serving` a `ServingPlan`,
    `ownership` per modality the example batch's tower units traced to their requests (`row_owners.trace_units`),
    `layouts` the served targets' `TargetLayout`s as compiled (`mm.runtime.layouts`: with the
    serving options' choices, such as A split along the rank), where known. `folds(modules,
    input_shape)`: whether a served linear call would be folded into its base GEMM
    (`compile(fold_min_rows=...)`), marked `"folds"` on linear calls; `stacks` the same for the
    stack (`compile(stack_max_rows=...)`), marked `"stacks"` (the fold wins where both would),
    with `"stack_expand"`: `"graph"` where `compile(stack_expand="inductor")` writes the call's
    expand as graph ops (language-model calls), `"kernel"` elsewhere; those get `"stack_shrink"`:
    `"graph"` where `compile(stack_shrink="inductor"` or `"inductor_columns")` writes their shrink as graph ops
    too, else `"gemm"`."""
    ownership = ownership or {}
    calls = {**capture.embedding_calls(), **capture.linear_calls(), **capture.parameter_matmul_calls(),
             **capture.conv_calls(), **capture.expert_calls()}
    graphs = []
    partition_graphs = defaultdict(list)
    partition_calls = Counter()
    partition_linear_nodes = defaultdict(list)
    partition_embedding_nodes = defaultdict(list)
    partition_matmul_nodes = defaultdict(list)
    partition_conv_nodes = defaultdict(list)
    partition_expert_nodes = defaultdict(list)
    for record in capture.graphs:
        counts = Counter(partition_of(node) for node in record.call_nodes())
        for partition, count in counts.items():
            partition_graphs[partition].append(record.index)
            partition_calls[partition] += count
        nodes = {node.name: node for node in record.graph_module.graph.nodes}
        for node in record.linear_nodes():
            entry = _linear_like(record, node, linear_of(node), nodes, serving, ownership)
            if folds is not None:
                entry["folds"] = bool(entry["lora"] and folds(entry["modules"], entry["input_shape"]))
            if stacks is not None:
                entry["stacks"] = bool(entry["lora"] and not entry.get("folds")
                                       and stacks(entry["modules"], entry["input_shape"]))
                if entry["stacks"]:
                    entry["stack_expand"] = ("graph" if stack_expand == "inductor"
                                             and partition_of(node) == LANGUAGE_MODEL else "kernel")
                    if entry["stack_expand"] == "graph":
                        entry["stack_shrink"] = "gemm" if stack_shrink == "gemm" else "graph"
            partition_linear_nodes[partition_of(node)].append(entry)
        for node in record.parameter_matmul_nodes():
            # `x @ W` is served as a linear of W.shape[0] -> W.shape[1]; its "module" is the parameter.
            partition_matmul_nodes[partition_of(node)].append(
                _linear_like(record, node, parameter_matmul_of(node), nodes, serving, ownership))
        for node in record.conv_nodes():
            entry = _linear_like(record, node, conv_of(node), nodes, serving, ownership)
            entry["kernel"] = list(conv_of(node).kernel)
            # The rows are its patches: [entries, positions, pixels], or [patches, pixels] (one each).
            shape = entry["input_shape"] or []
            positions = 1
            for size, step in zip(shape[2:], entry["kernel"]):
                positions *= size // step
            rows = shape[:1] + ([positions] if positions > 1 else []) + [entry["in_features"]] if shape else []
            entry["rows_owned"] = _rows_owned(partition_of(node), rows, ownership)
            partition_conv_nodes[partition_of(node)].append(entry)
        for node in record.expert_nodes():
            call = experts_of(node)
            entry = _linear_like(record, node, call, nodes, serving, ownership)
            entry["num_experts"] = call.num_experts
            entry["form"] = "gathered" if call.expert_ids_node is not None else "per expert"
            entry["layout"] = None if call.layout is None else {"tiles": call.layout.tiles,
                                                                "interleave": call.layout.interleave}
            entry["rows_owned"] = _expert_rows_owned(partition_of(node), call)
            partition_expert_nodes[partition_of(node)].append(entry)
        for node in record.embedding_nodes():
            lookup = embedding_of(node)
            value = nodes[lookup.ids_node].meta.get("example_value") if lookup.ids_node in nodes else None
            shape = list(value.shape) if isinstance(value, torch.Tensor) else None
            modules = record.modules_of(node)
            partition_embedding_nodes[partition_of(node)].append({
                "graph": record.index, "node": node.name, "modules": modules,
                "num_embeddings": lookup.num_embeddings, "embedding_dim": lookup.embedding_dim,
                "lora": lora_of(node) is not None or (serving is not None and any(map(serving.serves, modules))),
                "input_shape": shape,
                # Token ids are rows of the language model only (embeddings elsewhere carry no LoRA).
                "rows_owned": "per request" if partition_of(node) == LANGUAGE_MODEL else "-",
            })
        frames = sorted({instance.frame_modules.get("self", "") for instance in record.instances})
        graphs.append({
            "index": record.index,
            "function": record.function,
            "file": record.filename,
            "frame_modules": frames,
            "calls": len(record.instances),
            "nodes": len(record.graph_module.graph.nodes),
            "call_nodes": sum(counts.values()),
            "partitions": dict(sorted(counts.items())),
            "graph_break": None if record.graph_break is None else {
                "reason": record.graph_break.reason, "location": record.graph_break.location},
        })
    partitions = {}
    # The model's own partitions (an audio-only model has no vision tower to list), in a fixed order.
    present = set(capture.partition_map.lora_partitions) | {LANGUAGE_MODEL, OTHER}
    for partition in [p for p in PARTITIONS if p in present] + sorted(present - set(PARTITIONS)):
        partitions[partition] = {
            "prefixes": capture.partition_map.prefixes_of(partition),
            "graphs": partition_graphs.get(partition, []),
            "call_nodes": partition_calls.get(partition, 0),
            "linear_nodes": partition_linear_nodes.get(partition, []),
            "embedding_nodes": partition_embedding_nodes.get(partition, []),
            "parameter_matmul_nodes": partition_matmul_nodes.get(partition, []),
            "conv_nodes": partition_conv_nodes.get(partition, []),
            "expert_nodes": partition_expert_nodes.get(partition, []),
        }
    report = {
        "schema": SCHEMA,
        "model": {"name": model, "class": type(capture.model).__name__},
        "prefixes": capture.partition_map.to_json(),
        "partitions": partitions,
        "graphs": graphs,
        "graph_breaks": [{"graph": index, "reason": graph_break.reason, "location": graph_break.location}
                         for index, graph_break in capture.graph_breaks],
        "linears": [
            {"module": info.name, "partition": info.partition, "in_features": info.in_features,
             "out_features": info.out_features, "bias": info.bias,
             "calls": [{"graph": graph, "node": node} for graph, node in calls.get(info.name, [])]}
            for info in linears if info.kind == LINEAR
        ],
        "embeddings": [
            {"module": info.name, "partition": info.partition, "num_embeddings": info.in_features,
             "embedding_dim": info.out_features, "can_carry_lora": info.can_carry_lora,
             "calls": [{"graph": graph, "node": node} for graph, node in calls.get(info.name, [])]}
            for info in linears if info.kind == EMBEDDING
        ],
        "convs": [
            {"module": info.name, "partition": info.partition, "in_features": info.in_features,
             "out_features": info.out_features, "can_carry_lora": info.can_carry_lora, "refusal": info.refusal,
             "calls": [{"graph": graph, "node": node} for graph, node in calls.get(info.name, [])]}
            for info in linears if info.kind == CONV
        ],
        "parameters": [
            {"parameter": info.name, "partition": info.partition, "in_features": info.in_features,
             "out_features": info.out_features,
             "calls": [{"graph": graph, "node": node} for graph, node in calls.get(info.name, [])]}
            for info in linears if info.kind == PARAMETER
        ],
        "experts": [
            {"parameter": info.name, "partition": info.partition, "num_experts": info.num_experts,
             "shape": list(linears.weights[info.name].shape),
             # PEFT's reading (its lora_A [r * experts, in], lora_B [out, r * experts]), not the product's.
             "in_features": info.in_features, "out_features": info.out_features,
             "can_carry_lora": info.can_carry_lora,
             **({"served": serving.serves(info.name)} if serving is not None else {}),
             "calls": [{"graph": graph, "node": node} for graph, node in calls.get(info.name, [])]}
            for info in linears if info.kind == EXPERTS
        ],
        "adapters": [_adapter_entry(scan, linears, calls, serving) for scan in adapters],
        "tensor_parallel": tensor_parallel_entries(linears, serving, layouts),
        "serving": serving.to_json() if serving is not None else None,
        "ownership": {modality: {"units": traced.units, "how": traced.how} for modality, traced in ownership.items()},
    }
    return report


def tensor_parallel_entries(linears: LinearIndex, serving=None, layouts=None) -> list[dict]:
    """Every target whose weight is sharded across processes (a DTensor), as this rank sees it: its
    placements, how its LoRA is laid out (`sharding.TargetLayout.to_json`: `column` / `row`, this
    rank's slice, the collective LoRA adds in the compiled graphs and in the eager hooks) or why it
    is refused, and (with a serving plan) whether it is served. A target in `layouts` (a runtime's)
    is shown as served there (A split along the rank: the shrink's all-gather is its collective).
    Empty for a model of one process."""
    layouts = layouts or {}
    entries = []
    for info in linears:
        weight = linears.weights[info.name]
        placements = distributed_layout(weight)
        if placements is None:
            continue
        layout, refusal = (layouts[info.name], None) if info.name in layouts else layout_of(info.kind, weight)
        entries.append({"module": info.name, "kind": info.kind, "partition": info.partition, "placements": placements,
                        "layout": layout.to_json() if layout is not None else None, "refusal": refusal,
                        **({"served": serving.serves(info.name)} if serving is not None else {})})
    return entries


def _tensor_parallel_lines(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    rows = []
    for entry in entries:
        layout = entry["layout"]
        if layout is None:
            row = [entry["module"], "refused", "-", "-", "-", entry["refusal"][:80]]
        else:
            piece = layout["out_range"] or layout["in_range"]
            side = "out" if layout["out_range"] else "in"
            rows_of_a = layout.get("lora_a_rows")
            piece = f"{side} {piece[0]}:{piece[1]}" + (f", A rows {rows_of_a[0]}:{rows_of_a[1]}" if rows_of_a else "")
            row = [entry["module"], layout["style"], piece,
                   layout["collective_compiled"], layout["collective_eager"], ""]
        rows.append(row + (["yes" if entry["served"] else "-"] if "served" in entry else []))
    header = ["module", "layout", "this rank's slice", "LoRA collective (compiled)", "(eager)", "refusal"]
    laid = next((entry["layout"] for entry in entries if entry["layout"] is not None), None)
    title = (f"tensor parallelism (rank {laid['rank']} of {laid['ranks']}): sharded targets" if laid is not None
             else "tensor parallelism: sharded targets")
    return ["", title] + _table(rows, header + (["served"] if "served" in entries[0] else []))


def _linear_like(record, node, target, nodes, serving, ownership) -> dict:
    """A linear call's (or a matmul with a parameter's) entry: its modules, shape, LoRA and rows."""
    value = nodes[target.input_node].meta.get("example_value") if target.input_node in nodes else None
    shape = list(value.shape) if isinstance(value, torch.Tensor) else None
    modules = record.modules_of(node)
    return {
        "graph": record.index, "node": node.name, "modules": modules,
        "in_features": target.in_features, "out_features": target.out_features,
        # Rewritten graphs say it; a capture is asked what the served set would give.
        "lora": lora_of(node) is not None or (serving is not None and any(map(serving.serves, modules))),
        "input_shape": shape,
        "rows_owned": _rows_owned(partition_of(node), shape or [], ownership),
    }


def _expert_rows_owned(partition: str, call) -> str:
    """How the runtime owns an expert matmul's rows: the language model's tokens, laid out for the
    experts (`passes/row_layout.py`); refused where the layout could not be told."""
    if partition != LANGUAGE_MODEL:
        return "-"
    if call.layout is None:
        return f"refused: {call.why}"
    layout = []
    if call.layout.tiles > 1:
        layout.append(f"tokens tiled {call.layout.tiles}x")
    if call.layout.interleave > 1:
        layout.append(f"{call.layout.interleave} rows per token")
    return "per request" + (f" ({', '.join(layout)})" if layout else "")


def _adapter_entry(scan, linears: LinearIndex, calls, serving) -> dict:
    modules = []
    for module, rank in scan.modules.items():
        entry = {"module": module, "kind": linears[module].kind, "partition": linears[module].partition, "rank": rank,
                 "nodes": [{"graph": graph, "node": node} for graph, node in calls.get(module, [])]}
        if serving is not None:
            entry["served"] = serving.serves(module)
        modules.append(entry)
    return {"name": scan.name, "path": str(scan.path), "modules": modules, "unmatched_keys": scan.unmatched}


_NUMBER = re.compile(r"(?<=\.)\d+(?=\.|$)")


def collapse_names(names: list[str]) -> list[str]:
    """Fold names that differ in one layer index: `a.0.q`, `a.1.q` -> `a.{0,1}.q`."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name in names:
        numbers = _NUMBER.findall(name)
        template = _NUMBER.sub("#", name)
        groups[(template, len(numbers))].append(name)
    collapsed = []
    for (template, count), members in groups.items():
        if len(members) == 1 or count == 0:
            collapsed.extend(members)
            continue
        columns = list(zip(*(_NUMBER.findall(member) for member in members)))
        varying = [index for index, column in enumerate(columns) if len(set(column)) > 1]
        if len(varying) != 1:
            collapsed.extend(members)
            continue
        parts = template.split("#")
        values = sorted(set(columns[varying[0]]), key=int)
        text = parts[0]
        for index in range(count):
            text += ("{" + ",".join(values) + "}") if index == varying[0] else columns[index][0]
            text += parts[index + 1]
        collapsed.append(text)
    return collapsed


# The target kinds' node tables after the linears': (the partition entry's key, the title, the
# header of the names column, the kind's own columns as (header, the node's key or a function of it)).
_OTHER_NODE_TABLES = (
    ("embedding_nodes", "embedding lookups", "module(s)", [("tokens", "num_embeddings"), ("dim", "embedding_dim")]),
    ("conv_nodes", "convolutions", "module(s)", [("kernel", lambda node: "x".join(map(str, node["kernel"]))),
                                                ("in", "in_features"), ("out", "out_features")]),
    ("parameter_matmul_nodes", "matmuls x @ W with a parameter", "parameter",
     [("in", "in_features"), ("out", "out_features")]),
    ("expert_nodes", "expert matmuls (3D expert weights)", "parameter",
     [("experts x in x out", lambda node: f"{node['num_experts']}x{node['in_features']}x{node['out_features']}"),
      ("form", "form")]),
)


def _lora_cell(node: dict) -> str:
    """How a served call gets its LoRA: the kernels ("yes"), folded, stacked (its expand by the
    stack's kernel, or by graph ops: "stacked, graph expand"; its shrink too: "graph shrink and expand")."""
    if node.get("folds"):
        return "folded"
    if node.get("stacks"):
        if node.get("stack_shrink") == "graph":
            return "graph shrink and expand"
        return "stacked, graph expand" if node.get("stack_expand") == "graph" else "stacked"
    return "yes"


def _node_table(nodes: list[dict], names: str, columns, serving: bool) -> list[str]:
    """One kind's target nodes of a partition: graph, node and names, the kind's own `columns`, the
    rows owned and, with adapters, whether LoRA is served."""
    rows = [[node["graph"], node["node"], " ".join(collapse_names(node["modules"]))]
            + [value(node) if callable(value) else node[value] for _, value in columns]
            + [node.get("rows_owned", "-")]
            + ([_lora_cell(node) if node["lora"] else "-"] if serving else [])
            for node in nodes]
    header = ["graph", "node", names] + [title for title, _ in columns] + ["rows owned"] + (["LoRA"] if serving else [])
    return _table(rows, header, indent="    ")


def _table(rows: list[list[str]], header: list[str], indent: str = "  ") -> list[str]:
    widths = [max(len(str(row[column])) for row in [header] + rows) for column in range(len(header))]
    lines = [indent + "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)).rstrip()]
    lines += [indent + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in rows]
    return lines


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "-"
    parts, start, previous = [], indices[0], indices[0]
    for index in indices[1:] + [None]:
        if index is not None and index == previous + 1:
            previous = index
            continue
        parts.append(str(start) if start == previous else f"{start}-{previous}")
        if index is not None:
            start = previous = index
    return ",".join(parts)


def render_text(report: dict) -> str:
    model = report["model"]
    lines = [f"{model['name']} ({model['class']}): {len(report['graphs'])} graphs, "
             f"{len(report['graph_breaks'])} graph breaks, {len(report['linears'])} linear modules, "
             f"{len(report.get('embeddings', []))} embeddings, {len(report.get('convs', []))} convolutions, "
             f"{len(report.get('parameters', []))} 2D parameters, {len(report.get('experts', []))} expert weights", ""]
    for partition, entry in report["partitions"].items():
        linear_modules = sum(len(node["modules"]) for node in entry["linear_nodes"])
        lines.append(f"{partition}")
        lines.append(f"  prefixes:     {', '.join(entry['prefixes']) or '-'}")
        lines.append(f"  graphs:       {_ranges(entry['graphs'])}")
        lines.append(f"  call nodes:   {entry['call_nodes']}")
        lines.append(f"  linear nodes: {len(entry['linear_nodes'])} (calling {linear_modules} modules)")
        serving = bool(report["serving"])
        if entry["linear_nodes"]:
            lines += _node_table(entry["linear_nodes"], "module(s)",
                                 [("in", "in_features"), ("out", "out_features")], serving)
        for key, title, names, columns in _OTHER_NODE_TABLES:
            nodes = entry.get(key, [])
            if nodes:
                lines.append(f"  {title}: {len(nodes)}")
                lines += _node_table(nodes, names, columns, serving)
        lines.append("")
    ownership = report.get("ownership") or {}
    if ownership:
        lines.append("row ownership (towers and connectors)")
        for modality, traced in ownership.items():
            units = traced["units"]
            lines.append(f"  {modality + ' units:':14}{units if units is not None else 'not traced'}: {traced['how']}")
        lines.append("  per unit: rows laid out [units, ...] belong unit by unit to the units' requests; by tokens: "
                     "shared by the requests' tokens of that modality, checked")
        lines.append("")
    lines.append("graph breaks (each ends the graph named; the next graph resumes after it)")
    if report["graph_breaks"]:
        rows = [[entry["graph"], entry["location"].rsplit("/", 1)[-1], entry["reason"][:100]]
                for entry in report["graph_breaks"]]
        lines += _table(rows, ["graph", "where", "reason"])
    else:
        lines.append("  none")
    lines += _tensor_parallel_lines(report.get("tensor_parallel") or [])
    if report["serving"]:
        serving = report["serving"]
        lines += ["", "serving", f"  partitions:     {', '.join(serving['partitions'])}",
                  f"  target modules: {', '.join(serving['target_modules'])}",
                  f"  served layers:  {serving['served_modules']} (linears, embeddings, patch embeddings, 2D "
                  "parameters, expert weights)"]
    for adapter in report["adapters"]:
        lines += ["", f"adapter {adapter['name']} ({adapter['path']})"]
        rows = [[entry["module"], entry.get("kind", LINEAR), entry["partition"], entry["rank"],
                 ", ".join(f"{node['graph']}:{node['node']}" for node in entry["nodes"]) or "(not called)"]
                + ([("yes" if entry["served"] else "no, outside the served set")] if "served" in entry else [])
                for entry in adapter["modules"]]
        header = ["module", "kind", "partition", "rank", "graph:node"] + (["served"] if report["serving"] else [])
        lines += _table(rows, header)
        if adapter["unmatched_keys"]:
            lines.append(f"  ERROR: {len(adapter['unmatched_keys'])} tensor(s) match no linear, embedding or "
                         "target parameter of the model:")
            lines += [f"    {key}" for key in adapter["unmatched_keys"]]
    return "\n".join(lines) + "\n"


def report_graph(report: dict) -> nx.DiGraph:
    """The partitions and graphs as a networkx graph: graph nodes in execution order, each
    joined to the partitions whose nodes it holds."""
    drawing = nx.DiGraph(name=report["model"]["name"])
    for partition, entry in report["partitions"].items():
        drawing.add_node(f"partition:{partition}", kind="partition",
                         label=f"{partition}\\n{entry['call_nodes']} call nodes, "
                               f"{len(entry['linear_nodes'])} linear nodes")
    previous = None
    breaks = {entry["graph"]: entry for entry in report["graph_breaks"]}
    for graph in report["graphs"]:
        name = f"graph:{graph['index']}"
        drawing.add_node(name, kind="graph",
                         label=f"graph {graph['index']}\\n{graph['function']}\\n{graph['call_nodes']} call nodes")
        if previous is not None:
            # The break that ended the previous graph is what led to this one.
            reason = breaks.get(graph["index"] - 1, {}).get("reason", "")
            drawing.add_edge(previous, name, kind="next", label=reason[:40])
        for partition, count in graph["partitions"].items():
            drawing.add_edge(name, f"partition:{partition}", kind="holds", label=str(count))
        previous = name
    return drawing


_COLOURS = {"tower": "lightblue", "connector": "orange", "language_model": "palegreen", "other": "lightgrey"}


def render_dot(report: dict) -> str:
    drawing = report_graph(report)

    def quote(text: str) -> str:
        return '"' + str(text).replace('"', "'") + '"'

    lines = [f"digraph {quote(drawing.graph['name'])} {{", "  rankdir=LR;", "  node [shape=box];"]
    for node, data in drawing.nodes(data=True):
        style = ""
        if data["kind"] == "partition":
            colour = _COLOURS.get(node.split(":", 1)[1], "white")
            style = f", style=filled, fillcolor={colour}, shape=ellipse"
        lines.append(f"  {quote(node)} [label={quote(data['label'])}{style}];")
    for source, target, data in drawing.edges(data=True):
        style = ", style=dashed" if data["kind"] == "holds" else ""
        lines.append(f"  {quote(source)} -> {quote(target)} [label={quote(data['label'])}{style}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
