"""Capture a model's forward as the FX graphs dynamo produces, graph breaks included.

`GraphRecorder` is a torch.compile backend that runs the passes (`passes.pipeline.run_passes`:
labelling, and the rewrite where its `rewrite_for` gives one) on every graph dynamo hands it,
keeps a `GraphRecord` of it, and (optionally) notes each call of the compiled graph: dynamo
reuses one graph for every instance of a block, so the calls say which modules a graph really
served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Mapping

import torch
from torch import fx, nn

from .errors import CaptureError
from .partitions import OTHER, PartitionMap, discover_partitions
from .passes import (Labelling, Rewrite, conv_of, embedding_of, experts_of, is_call_node, linear_of, owner_path_of,
                     parameter_matmul_of, run_passes, target_of)
from .reporting import quiet_dynamo
from .upstream import check_supported

__all__ = ["GraphBreak", "GraphInstance", "GraphRecord", "GraphRecorder", "Capture", "capture", "ModuleNames"]


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    """Why dynamo ended a graph: the reason, and the user code it could not trace."""

    reason: str
    location: str


@dataclasses.dataclass
class GraphInstance:
    """One call of a compiled graph: the module each frame local was, and each linear's module."""

    frame_modules: dict[str, str]
    linear_modules: dict[str, str]


@dataclasses.dataclass
class GraphRecord:
    index: int
    function: str
    filename: str
    graph_module: fx.GraphModule
    graph_break: GraphBreak | None
    instances: list[GraphInstance] = dataclasses.field(default_factory=list)
    # The module each frame local was when the graph was compiled ("self": the frame's module).
    frame_modules: dict[str, str] = dataclasses.field(default_factory=dict)

    def call_nodes(self) -> list[fx.Node]:
        return [node for node in self.graph_module.graph.nodes if is_call_node(node)]

    def linear_nodes(self) -> list[fx.Node]:
        return [node for node in self.call_nodes() if linear_of(node) is not None]

    def embedding_nodes(self) -> list[fx.Node]:
        return [node for node in self.call_nodes() if embedding_of(node) is not None]

    def conv_nodes(self) -> list[fx.Node]:
        return [node for node in self.call_nodes() if conv_of(node) is not None]

    def parameter_matmul_nodes(self) -> list[fx.Node]:
        return [node for node in self.call_nodes() if parameter_matmul_of(node) is not None]

    def expert_nodes(self) -> list[fx.Node]:
        return [node for node in self.call_nodes() if experts_of(node) is not None]

    def target_nodes(self) -> list[fx.Node]:
        """Every node of a kind LoRA can target (linears, embedding lookups, convolutions, matmuls with a
        parameter, expert matmuls)."""
        return [node for node in self.call_nodes() if target_of(node) is not None]

    def modules_of(self, node: fx.Node) -> list[str]:
        """The modules a target node called (for a matmul with a parameter: the parameter's name), over
        the graph's recorded calls (a graph is reused for every instance of a block); the module it
        was traced with if none was recorded."""
        modules = {instance.linear_modules.get(node.name) for instance in self.instances}
        modules.discard(None)
        return sorted(modules or {target_of(node).module})


class ModuleNames:
    """Absolute names of a model's modules and parameters, looked up by object identity."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        # Tied weights have several names; linears pick the one of their own module.
        self.parameters: dict[int, list[str]] = {}
        for name, parameter in model.named_parameters(remove_duplicate=False):
            self.parameters.setdefault(id(parameter), []).append(name)

    def frame_modules(self, frame) -> dict[str, str]:
        """The model's modules among a frame's locals; `self` falls back to the nearest caller's.

        Glue code in a free function (no module of its own) belongs to the module that called it.
        """
        found = {local: self.modules[id(value)] for local, value in frame.f_locals.items()
                 if isinstance(value, nn.Module) and id(value) in self.modules}
        caller = frame.f_back
        while "self" not in found and caller is not None:
            value = caller.f_locals.get("self")
            if isinstance(value, nn.Module) and id(value) in self.modules:
                found["self"] = self.modules[id(value)]
            caller = caller.f_back
        return found

    def linear_module(self, weight, owner_path, frame_modules) -> str | None:
        """The linear module whose weight is `weight`, preferring the one at `owner_path`."""
        names = self.parameters.get(id(weight))
        if not names:
            return None
        local, relative = owner_path
        root = frame_modules.get(local)
        owner = ".".join(part for part in (root, relative) if part) if root is not None else None
        modules = [name.rpartition(".")[0] for name in names]
        return owner if owner in modules else modules[0]

    def parameter_name(self, weight, owner_path, frame_modules) -> str | None:
        """The absolute name of the parameter `weight` (`module.parameter`: a 2D `x @ W` or a 3D expert
        weight), preferring the one at `owner_path`; None for a tensor that is no parameter."""
        module = self.linear_module(weight, owner_path, frame_modules)
        if module is None:
            return None
        names = self.parameters[id(weight)]
        return next(name for name in names if name.rpartition(".")[0] == module)


def _compiling_frame():
    """The frame dynamo is compiling right now: its code, and the frame object itself.

    The instruction translator holds the frame's code and locals; the Python frame that called
    it is still on the stack, outside dynamo, and is found by its locals.
    """
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    return tx.f_code, _FrameView(tx.f_locals, _user_caller(tx.f_code))


@dataclasses.dataclass
class _FrameView:
    f_locals: Mapping[str, object]
    f_back: object


def _user_caller(code):
    """The first Python frame on the stack outside torch (the caller of the compiled frame)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code is code or "/torch/" in frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def _graph_break(graph_module: fx.GraphModule) -> GraphBreak | None:
    reason = getattr(graph_module, "compile_subgraph_reason", None)
    if reason is None or not reason.graph_break:
        return None
    text = str(reason.reason).strip()
    # Dynamo's reasons carry an explanation, hints and debug context; the first lines say what broke.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = " ".join(line.removeprefix("Explanation: ") for line in lines[:2])
    location = ""
    if reason.user_stack:
        frame = reason.user_stack[-1]
        location = f"{frame.filename}:{frame.lineno} in {frame.name}"
    return GraphBreak(summary, location)


class GraphRecorder:
    """A torch.compile backend that labels and records every graph before compiling it.

    `rewrite_for(record, example_inputs)` may give a `passes.Rewrite` for a graph (the passes run
    it after labelling); `compile_graph(graph_module, example_inputs)` makes the callable dynamo
    runs (the graph itself, run eagerly, by default). With `record_calls`, every call of a graph
    appends a `GraphInstance` to its record.
    """

    def __init__(
        self,
        names: ModuleNames,
        partition_map: PartitionMap,
        rewrite_for: Callable[[GraphRecord, list], Rewrite | None] | None = None,
        compile_graph: Callable[[fx.GraphModule, list], Callable] | None = None,
        record_calls: bool = False,
    ):
        self.names = names
        self.partition_map = partition_map
        self.rewrite_for = rewrite_for
        self.compile_graph = compile_graph
        self.record_calls = record_calls
        self.records: list[GraphRecord] = []

    def __call__(self, graph_module: fx.GraphModule, example_inputs: list, **_options) -> Callable:
        code, frame = _compiling_frame()
        frame_modules = self.names.frame_modules(frame)
        record = GraphRecord(
            index=len(self.records), function=code.co_name, filename=code.co_filename,
            graph_module=graph_module, graph_break=_graph_break(graph_module), frame_modules=dict(frame_modules),
        )
        self.records.append(record)
        labelling = Labelling(frame_modules, self.names.linear_module, self._label_of, example_inputs,
                              self.names.parameter_name)
        rewrite = self.rewrite_for(record, example_inputs) if self.rewrite_for is not None else None
        run_passes(graph_module, labelling, rewrite)
        compiled = self.compile_graph(graph_module, example_inputs) if self.compile_graph else graph_module.forward
        if not self.record_calls:
            return compiled
        return self._recording(record, compiled)

    def _label_of(self, module: str | None) -> str:
        return self.partition_map.partition_of(module) if module is not None else OTHER

    def _recording(self, record: GraphRecord, compiled: Callable) -> Callable:
        targets = record.target_nodes()
        linear_weights = {node.name: target_of(node).weight_input for node in targets
                          if target_of(node).weight_input is not None}
        linear_owners = {node.name: owner_path_of(node) for node in targets}
        names = self.names
        # A matmul's target (x @ W, or an expert matmul) is the parameter itself, the other kinds' their module.
        name_of = {node.name: names.parameter_name if parameter_matmul_of(node) is not None or experts_of(node) is not None
                   else names.linear_module for node in targets}

        def run(*args):
            frame = sys._getframe(1)
            while frame is not None and (frame.f_code.co_name, frame.f_code.co_filename) != (
                record.function, record.filename
            ):
                frame = frame.f_back
            frame_modules = names.frame_modules(frame) if frame is not None else {}
            linear_modules = {}
            for node_name, index in linear_weights.items():
                module = name_of[node_name](args[index], linear_owners[node_name], frame_modules)
                if module is not None:
                    linear_modules[node_name] = module
            record.instances.append(GraphInstance(frame_modules, linear_modules))
            return compiled(*args)

        return run


@dataclasses.dataclass
class Capture:
    """Every graph of one captured forward, with the partition table used to label them."""

    model: nn.Module
    partition_map: PartitionMap
    graphs: list[GraphRecord]

    @property
    def graph_breaks(self) -> list[tuple[int, GraphBreak]]:
        return [(record.index, record.graph_break) for record in self.graphs if record.graph_break]

    def linear_calls(self) -> dict[str, list[tuple[int, str]]]:
        """Every linear module that ran, with the (graph, node) pairs that called it."""
        return self._calls(GraphRecord.linear_nodes)

    def embedding_calls(self) -> dict[str, list[tuple[int, str]]]:
        """Every embedding module looked up, with the (graph, node) pairs that did."""
        return self._calls(GraphRecord.embedding_nodes)

    def conv_calls(self) -> dict[str, list[tuple[int, str]]]:
        """Every convolution module that ran, with the (graph, node) pairs that called it."""
        return self._calls(GraphRecord.conv_nodes)

    def expert_calls(self) -> dict[str, list[tuple[int, str]]]:
        """Every 3D expert weight multiplied by (`torch.bmm`), with the (graph, node) pairs that did."""
        return self._calls(GraphRecord.expert_nodes)

    def parameter_matmul_calls(self) -> dict[str, list[tuple[int, str]]]:
        """Every parameter multiplied by (`x @ W`), with the (graph, node) pairs that did."""
        return self._calls(GraphRecord.parameter_matmul_nodes)

    def _calls(self, nodes_of) -> dict[str, list[tuple[int, str]]]:
        calls: dict[str, list[tuple[int, str]]] = {}
        for record in self.graphs:
            for node in nodes_of(record):
                for module in record.modules_of(node):
                    calls.setdefault(module, []).append((record.index, node.name))
        return calls


@contextlib.contextmanager
def _fresh_dynamo():
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def capture(
    model: nn.Module,
    batch: Mapping[str, object],
    partition_map: PartitionMap | None = None,
    partition_overrides: Mapping[str, str] | None = None,
    verbose: bool = False,
) -> Capture:
    """Run `model(**batch)` once under torch.compile and return every graph dynamo produced.

    Dynamo's own graph-break warnings are held back unless `verbose`: the capture records every
    break, and `mmlora-fx inspect` reports them."""
    check_supported(model)
    if partition_map is None:
        partition_map = discover_partitions(model, partition_overrides)
    recorder = GraphRecorder(ModuleNames(model), partition_map, record_calls=True)
    with _fresh_dynamo(), torch.no_grad(), quiet_dynamo(verbose):
        try:
            torch.compile(model, backend=recorder, dynamic=False)(**batch)
        except Exception as error:  # dynamo wraps user errors; say which model failed
            raise CaptureError(f"capturing {type(model).__name__} failed: {error}") from error
    if not recorder.records:
        raise CaptureError(f"dynamo produced no graph for {type(model).__name__}")
    return Capture(model, partition_map, recorder.records)
