"""The `mmlora` torch.compile backend: label, rewrite, then compile each graph with Inductor.

Two ways in:

- `mmlora_fx.compile(model, adapters, ...)` builds a `LoRARuntime` and compiles the model with an
  `MMLoRABackend` bound to it;
- `torch.compile(model, backend="mmlora", options={"adapters": {...}, ...})` (registered through
  the `torch_dynamo_backends` entry point) builds the runtime on the first graph, from the options
  and the module being compiled. Adapter names then go per call through a context manager,
  `with mmlora_fx.adapter_names(["alice", None], input_ids=batch["input_ids"]): out = model(**batch)`;
  calls outside it run the base model.

Options of the `mmlora` backend: `adapters`, `max_loras`, `max_cpu_loras`, `max_lora_rank`,
`partitions`, `target_modules`, `partition_overrides`, `default_adapters`, `max_batch_size`,
`prefetch_workers`, `tp_lora_a`, `fused_gemv` (as `mmlora_fx.compile`; `fold_min_rows`, `stack_max_rows`,
`stack_expand` and `stack_shrink` need `mmlora_fx.compile`),
`inner` (the compiler each rewritten graph goes to: "inductor", the default, or any dynamo backend
name such as "aot_eager"); every other key is an Inductor config patch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from .lora_op import REGISTRY  # (importing it registers torch.ops.mmlora.lora_linear_)
from .capture import GraphRecorder, GraphRecord, ModuleNames
from .errors import CaptureError, MMLoRAError, OptionError
from .passes import CONV, EMBEDDING, EXPERTS, LINEAR, PARAMETER_MATMUL, Rewrite
from .reporting import CompileProgress
from .runtime import LoRARuntime, ServingOptions, _eager_lora_hook

__all__ = ["MMLoRABackend", "mmlora_backend", "adapter_names", "RUNTIME_OPTIONS"]

# The backend's options that are not Inductor's: the adapters, how they are served, the inner compiler.
RUNTIME_OPTIONS = ("adapters",) + ServingOptions.names()


def inner_compiler(name: str, mode: str | None = None, config_patches: Mapping | None = None):
    """A function compiling one FX graph: Inductor with `mode`'s and the given config, or a dynamo backend."""
    if name == "inductor":
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(mode) if mode else {})
        patches.update(config_patches or {})
        return lambda graph_module, example_inputs: compile_fx(graph_module, example_inputs,
                                                               config_patches=patches or None)
    if config_patches:
        raise MMLoRAError(f"options {sorted(config_patches)} are Inductor settings; inner={name!r} takes none")
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)


class MMLoRABackend:
    """Label partitions, insert LoRA ops on served linears, compile with `inner`.

    `graphs` counts the graphs compiled so far (a recompilation adds to it).
    """

    def __init__(self, runtime: LoRARuntime, inner: str = "inductor", mode: str | None = None,
                 config_patches: Mapping | None = None, apply_pending_names: bool = False):
        self.runtime = runtime
        self.compile_graph = inner_compiler(inner, mode, config_patches)
        self.apply_pending_names = apply_pending_names
        self.recorder = GraphRecorder(ModuleNames(runtime.model), runtime.partition_map,
                                      rewrite_for=self._rewrite, compile_graph=self._compile)
        self.progress = CompileProgress()
        # A tied head and embedding share one weight: both names, where both are served.
        self._served_weights: dict[int, tuple[str, ...]] = {}
        for module in sorted(runtime.serving.served):
            key = id(runtime.linears.weights[module])
            self._served_weights[key] = self._served_weights.get(key, ()) + (module,)
        self._kinds = (LINEAR, EMBEDDING.with_op(torch.ops.mmlora.lora_embedding_.default), PARAMETER_MATMUL,
                       CONV.with_op(torch.ops.mmlora.lora_conv_.default),
                       EXPERTS.with_op(torch.ops.mmlora.lora_experts_.default))

    @property
    def graphs(self) -> int:
        return len(self.recorder.records)

    @property
    def records(self) -> list[GraphRecord]:
        return self.recorder.records

    def __call__(self, graph_module: fx.GraphModule, example_inputs: list, **_ignored):
        compiled = self.recorder(graph_module, example_inputs)
        self.progress.graph_compiled()
        return compiled

    def _rewrite(self, record: GraphRecord, example_inputs) -> Rewrite:
        if record.function == _eager_lora_hook.__name__ and record.filename == _eager_lora_hook.__code__.co_filename:
            # The hook alone in a graph means a linear ran eagerly and its LoRA would be traced away.
            raise CaptureError(f"dynamo compiled mmlora_fx's LoRA hook as graph {record.index} of its own: a served "
                               "linear ran outside the graphs and would have run without its adapter")
        serving = self.runtime.serving
        # A served linear's own forward compiled as a frame of its own: its caller ran eagerly, so
        # `Module.__call__` runs the forward hook around this graph and the hook serves the linear.
        # An op here as well would add its delta twice (Mistral3's patch merger, #21).
        hook_served = record.frame_modules.get("self")
        if not serving.serves(hook_served or ""):
            hook_served = None
        weights = {key: tuple(module for module in modules if module != hook_served)
                   for key, modules in self._served_weights.items()}
        weights = {key: modules for key, modules in weights.items() if modules}
        return Rewrite(serves=lambda target: serving.serves(target.module) and target.module != hook_served,
                       op=torch.ops.mmlora.lora_linear_.default, served_weights=weights,
                       graph_name=f"{record.index} ({record.function})", error=CaptureError, kinds=self._kinds,
                       fold=(lambda target, rows: self.runtime.fold_width(target.module, rows)) if len(self.runtime.folds)
                       else None, fold_op=torch.ops.mmlora.lora_fold_shrink.default,
                       stack=(lambda target, rows: self.runtime.stack_width(target.module, rows)) if len(self.runtime.folds)
                       else None, stack_op=torch.ops.mmlora.lora_stacked_.default,
                       stack_layout=(lambda target: self.runtime.stack_layout(target.module)) if len(self.runtime.folds)
                       else None, row_slots_op=torch.ops.mmlora.lora_stacked_row_slots.default,
                       shrink_in_graph={"inductor": "rank", "inductor_columns": "columns"}.get(
                           self.runtime.options.stack_shrink),
                       gemv=(lambda target, rows: self.runtime.gemv_fits(target.module, rows))
                       if self.runtime.options.fused_gemv else None, gemv_op=torch.ops.mmlora.lora_gemv.default)

    def _compile(self, graph_module: fx.GraphModule, example_inputs):
        compiled = self.compile_graph(graph_module, example_inputs)
        runtime = self.runtime
        pending = self.apply_pending_names

        def run(*args):
            # Outside a served call (`call_scope`: through the `torch.compile` backend there is
            # none) the graph's ops resolve weights this model shares with another compiled model
            # to this model's runtime: two models compiled that way over one set of weights would
            # otherwise both serve the one compiled last. Inside one, the call's runtime stays:
            # before torch 2.13 dynamo may run another compilation's graph for a shared frame.
            token = REGISTRY.enter_serving(runtime) if REGISTRY.serving_runtime() is None else None
            try:
                if pending:
                    _PENDING.apply_to(runtime)
                return compiled(*args)
            finally:
                if token is not None:
                    REGISTRY.leave_serving(token)

        return run


@contextlib.contextmanager
def our_errors_unwrapped():
    """Re-raise our typed errors that dynamo wrapped in `BackendCompilerFailed` as themselves."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as error:
        inner = getattr(error, "inner_exception", None)
        if isinstance(inner, MMLoRAError):
            raise inner from None
        raise


# --------------------------------------------------------------------------- per-call names
@dataclasses.dataclass
class _Batch:
    names: Sequence[str | None] | None
    input_ids: torch.Tensor | None
    has_images: bool


class _PendingNames(threading.local):
    """The adapter names of the forward in progress, for runtimes built by the `mmlora` backend."""

    def __init__(self):
        self.batch: _Batch | None = None
        self.version = 0
        self.applied: dict[int, int] = {}

    def apply_to(self, runtime: LoRARuntime) -> None:
        if self.applied.get(id(runtime)) == self.version:
            return
        if self.batch is None or self.batch.names is None:
            runtime.prepare_base()
        else:
            runtime.prepare(self.batch.names, self.batch.input_ids, self.batch.has_images)
        self.applied[id(runtime)] = self.version

    def serve_eagerly(self, runtime: LoRARuntime) -> bool:
        """Whether a linear running outside the graphs gets LoRA now: inside `adapter_names` (with
        the runtime's tables refreshed for this batch first, as a graph would)."""
        if self.batch is None:
            return False
        self.apply_to(runtime)
        return True


_PENDING = _PendingNames()


@contextlib.contextmanager
def adapter_names(names: Sequence[str | None], input_ids: torch.Tensor | None = None, has_images: bool = False):
    """Run the forwards inside with one adapter name per request (None or "__base__": base model).

    For models compiled with `torch.compile(model, backend="mmlora", ...)`. `input_ids` is needed
    when the batch has images: image tokens say which request owns which tower rows.
    """
    previous = _PENDING.batch
    _PENDING.batch = _Batch(list(names), input_ids, has_images or input_ids is not None)
    _PENDING.version += 1
    try:
        with our_errors_unwrapped():
            yield
    finally:
        _PENDING.batch = previous
        _PENDING.version += 1


# --------------------------------------------------------------------------- entry point
_BACKENDS: dict[int, tuple[dict, MMLoRABackend]] = {}


def _model_being_compiled() -> nn.Module:
    """The outermost module on the stack of the call being compiled (the compiled model)."""
    import sys

    from torch._dynamo.eval_frame import OptimizedModule

    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, nn.Module) and not isinstance(candidate, OptimizedModule):
            outermost = candidate
        frame = frame.f_back
    if outermost is None:
        raise MMLoRAError("backend='mmlora' found no module being compiled: compile the model itself")
    return outermost


def mmlora_backend(graph_module: fx.GraphModule, example_inputs: list, options: dict | None = None,
                   mode: str | None = None):
    """The `mmlora` backend for `torch.compile(model, backend="mmlora", options={...})`."""
    options = options if options is not None else {}
    entry = _BACKENDS.get(id(options))
    if entry is None or entry[0] is not options:
        model = _model_being_compiled()
        inner = options.get("inner", "inductor")
        patches = {key: value for key, value in options.items() if key not in RUNTIME_OPTIONS + ("inner",)}
        for option, default in (("fold_min_rows", None), ("stack_max_rows", None), ("stack_expand", "kernel"),
                                ("stack_shrink", "gemm")):
            if options.get(option, default) != default:
                # The fold and the stack move weights into larger buffers before capture; here
                # dynamo has already captured the old ones.
                raise OptionError(f"{option} needs mmlora_fx.compile: through backend='mmlora' the model is "
                                  "captured before its weights could move into the fold's buffers")
        runtime = LoRARuntime(model, options.get("adapters"), ServingOptions.taken_from(options))
        runtime.eager_scope = functools.partial(_PENDING.serve_eagerly, runtime)
        backend = MMLoRABackend(runtime, inner=inner, mode=mode, config_patches=patches, apply_pending_names=True)
        entry = _BACKENDS[id(options)] = (options, backend)  # keeps `options` alive: its id stays unique
        model._mmlora_backend = backend
    return entry[1](graph_module, example_inputs)
