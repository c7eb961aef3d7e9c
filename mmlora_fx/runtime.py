"""The run-time state of a compiled multi-LoRA model: adapters, slot buffers, token tables.

Before each forward, `prepare(adapter_names, input_ids)` makes the batch's adapters resident
and refills each partition's `TokenSlotTable` in place: the language model weighs each request
1, the tower and the connector weigh it by its image tokens (images belong to requests in the
order their image tokens appear). The LoRA ops in the graphs call `apply`, which picks the
slot buffers of the linears they serve and the table of their partition.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .adapter_manager import AdapterManager
from .errors import BatchError, CoverageError, MMLoRAError
from .kernels.lora_add import lora_add
from .linear_index import LinearIndex
from .lora_op import REGISTRY
from .partitions import LANGUAGE_MODEL, LORA_PARTITIONS, discover_partitions
from .peft_format import scan_adapter
from .serving import ServingPlan
from .token_slots import TokenSlotTable
from .upstream import check_supported

__all__ = ["LoRARuntime"]

_VISION_PARTITIONS = tuple(p for p in LORA_PARTITIONS if p != LANGUAGE_MODEL)


def _image_token_ids(config) -> list[int]:
    ids = []
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


class LoRARuntime:
    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, object] | None = None,
        *,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        partitions: Sequence[str] | None = None,
        target_modules: Sequence[str] | None = None,
        partition_overrides: Mapping[str, str] | None = None,
        max_batch_size: int = 64,
    ):
        check_supported(model)  # a family broken upstream gets our words, not a traceback from inside it
        adapters = dict(adapters or {})
        self.model = model
        self.partition_map = discover_partitions(model, partition_overrides)
        self.linears = LinearIndex(model, self.partition_map)
        # What the first adapters target decides what is served (unless restricted explicitly);
        # reading the names is enough, the weights are validated when loaded below.
        scans = [scan_adapter(name, path, self.linears) for name, path in adapters.items()]
        self.serving = ServingPlan.build(self.linears, scans, partitions, target_modules)
        if max_cpu_loras is None:
            max_cpu_loras = max(max_loras, len(adapters))
        self.manager = AdapterManager(self.linears, self.serving, max_loras=max_loras,
                                      max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank)
        self.manager.load_many(adapters)
        device = next(model.parameters()).device
        self.tables = {partition: TokenSlotTable(partition, max_batch_size, device) for partition in LORA_PARTITIONS}
        self.image_token_ids = _image_token_ids(getattr(model, "config", None))
        self._plans: dict[tuple[str, ...], tuple] = {}
        self._call_depth = 0  # depth of `call_scope()`s: the eager hooks act only inside one
        # For runtimes the `mmlora` backend builds: says whether the hooks act now (no call scope there).
        self.eager_scope: Callable[[], bool] | None = None
        self.applied: set[str] | None = None  # modules given LoRA, while `recording_applied()` is on
        # LoRA op calls per partition since the last `prepare`, against the partitions it expects.
        self.applications: collections.Counter[str] = collections.Counter()
        self.expected_partitions: set[str] = set()
        self._served_partitions = {self.linears[module].partition for module in self.serving.served}
        REGISTRY.register(self, self.linears.weights)
        self._add_eager_hooks()

    # ------------------------------------------------------------------ before a forward
    def prepare(self, adapter_names: Sequence[str | None], input_ids: torch.Tensor | None = None,
                has_images: bool = False) -> list[int]:
        """Make the batch's adapters resident and refill the token tables; return the slots."""
        if isinstance(adapter_names, str):
            raise BatchError("adapter_names takes one name per request (a list), not a single string")
        adapter_names = list(adapter_names)
        if input_ids is not None and input_ids.shape[0] != len(adapter_names):
            raise BatchError(f"adapter_names has {len(adapter_names)} names but the batch has "
                             f"{input_ids.shape[0]} requests")
        if len(adapter_names) > self.tables[LANGUAGE_MODEL].max_batch_size:
            raise BatchError(f"the batch has {len(adapter_names)} requests but max_batch_size is "
                             f"{self.tables[LANGUAGE_MODEL].max_batch_size}")
        self.manager.check_batch(adapter_names)  # every name known, few enough: before any change
        image_tokens = self._image_tokens(input_ids, has_images, len(adapter_names))
        slots = self.manager.activate(adapter_names)
        self.tables[LANGUAGE_MODEL].fill(slots, [1] * len(slots))
        for partition in _VISION_PARTITIONS:
            self.tables[partition].fill(slots, image_tokens)
        # The partitions this batch must reach with LoRA: the language model always runs, the
        # tower and the connector when a request has image tokens; only where a linear is served
        # and some request asked for an adapter.
        self.applications.clear()
        running = {LANGUAGE_MODEL} | (set(_VISION_PARTITIONS) if any(image_tokens) else set())
        self.expected_partitions = (running & self._served_partitions) if any(slot >= 0 for slot in slots) else set()
        return slots

    def check_coverage(self) -> None:
        """After a served call (not under CUDA graphs, whose replays call no Python): every partition
        the batch ran must have had its LoRA applied at least once. None at all means code that is
        not this model's compiled graphs ran for it."""
        missing = sorted(partition for partition in self.expected_partitions if not self.applications[partition])
        if missing:
            raise CoverageError(
                f"the forward ran the {' and the '.join(missing)} without a single LoRA application: compiled code "
                "that mmlora_fx did not rewrite ran for this model (dynamo reuses another compilation's graphs "
                "once a shared frame hits its recompile limit; torch 2.13's isolate_recompiles prevents it). "
                "The output is the base model's; call torch._dynamo.reset() before mmlora_fx.compile, or use torch>=2.13"
            )

    def prepare_base(self) -> None:
        """Tables that give every request the base model."""
        for table in self.tables.values():
            table.fill([], [])

    def _image_tokens(self, input_ids, has_images: bool, requests: int) -> list[int]:
        if input_ids is None or not self.image_token_ids:
            if has_images:
                raise BatchError("a batch with images needs input_ids (image tokens say which request owns "
                                 "which image rows in the tower and the connector)")
            return [0] * requests
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.image_token_ids:
            mask |= input_ids == token
        return mask.sum(dim=-1).tolist()

    # ------------------------------------------------------------------ inside a forward
    def apply(self, outputs: list[torch.Tensor], x: torch.Tensor, modules: list[str]) -> None:
        """Add the LoRA deltas of `modules` (siblings sharing input `x`) to their `outputs`."""
        plan = self._plans.get(tuple(modules))
        if plan is None:
            plan = self._plans[tuple(modules)] = self._plan(modules)
        served, table, lora_a, lora_b, ranks = plan
        if not served:
            return
        self.applications[table.partition] += 1
        if self.applied is not None:
            self.applied.update(modules[index] for index in served)
        table.check_rows(x.numel() // x.shape[-1])
        # Already inside the graph-level op: call the kernels directly, not through a second op.
        lora_add([outputs[index] for index in served], x, lora_a, lora_b, ranks,
                 table.request_slots, table.request_cum_weights, table.tile_plan)

    def _plan(self, modules: list[str]):
        served = [index for index, module in enumerate(modules) if module in self.manager.buffers]
        partitions = {self.linears[modules[index]].partition for index in served}
        if len(partitions) > 1:
            raise MMLoRAError(f"linears {modules} share an input but sit in partitions {sorted(partitions)}")
        if not served:
            return [], None, [], [], []
        buffers = [self.manager.buffers[modules[index]] for index in served]
        table = self.tables[partitions.pop()]
        return (served, table, [b.lora_a for b in buffers], [b.lora_b for b in buffers],
                [b.ranks for b in buffers])

    # ------------------------------------------------------------------ outside the graphs
    @contextlib.contextmanager
    def call_scope(self) -> Iterator[None]:
        """The scope of one served call (`MultiLoRAModel.__call__`, `generate`, `eager`).

        Only inside it do the forward hooks add LoRA to linears that run outside the compiled
        graphs. Outside it the model's uncompiled code is the base model again, whatever batch
        the tables were last filled for: a later plain call of the model (by other code, say
        PEFT wrapping the same module, or after compilation is undone) must not pick up a past
        batch's adapters.
        """
        _never_compile_the_hook()
        self._call_depth += 1
        try:
            yield
        finally:
            self._call_depth -= 1

    @contextlib.contextmanager
    def recording_applied(self) -> Iterator[set[str]]:
        """Collect the served modules that got their LoRA inside (a debug aid: `MultiLoRAModel.verify`
        names the modules the compiled path left out). CUDA-graph replays call no Python and record nothing."""
        previous, self.applied = self.applied, set()
        try:
            yield self.applied
        finally:
            self.applied = previous

    @property
    def in_call(self) -> bool:
        return self._call_depth > 0 or (self.eager_scope is not None and self.eager_scope())

    def _add_eager_hooks(self) -> None:
        """LoRA for served linears that run outside compiled graphs, through forward hooks.

        Code dynamo does not compile runs eagerly: frames it skips, and work Hugging Face does
        before the compiled forward (newer `generate` encodes the images eagerly, through
        `get_image_features`). A hook on every served linear applies the same op with the same
        tables and buffers there. While dynamo traces, the hook does nothing: the graph's own
        LoRA op serves the linear, so it is never applied twice. The hooks exist before any
        compilation, so adding them causes no recompilation. Like the graph op, a hook finds its
        runtime from the weight, so a model compiled again gets no second hook and no second delta.
        Hooks act only inside their runtime's `call_scope()`.

        The hook must never be compiled as a frame of its own, nor what it calls. A linear that runs eagerly inside
        a compiled region (its caller fell back to eager after a graph break, or dynamo skips its
        frame) calls the hook with dynamo's frame callback still installed; dynamo would then
        trace the hook alone, `is_compiling()` would be true in that graph, and the linear would
        silently run without LoRA (Mistral3's patch merger did, #21). So the hook's code is on
        dynamo's skip list: it still inlines into graphs that trace a linear's call, and it runs
        eagerly everywhere else.
        """
        _never_compile_the_hook()
        for name, module in self.model.named_modules():
            if name in self.manager.buffers and not getattr(module, "_mmlora_hooked", False):
                module.register_forward_hook(_eager_lora_hook)
                module._mmlora_hooked = True


def _never_compile_the_hook() -> None:
    # The hook and everything it calls (the runtime, the reference kernels) run without dynamo
    # when the hook runs as a frame of its own; inlined into a traced module call it still traces.
    # Cheap, and renewed on every call scope: `torch._dynamo.reset()` may clear code states.
    from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy

    set_code_exec_strategy(_eager_lora_hook.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


def _eager_lora_hook(module, args, output):
    if not torch.compiler.is_compiling():
        runtime, name = REGISTRY.resolve(module.weight)
        if runtime.in_call:
            runtime.apply([output], args[0], [name])
    return output
