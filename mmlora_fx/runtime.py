"""The run-time state of a compiled multi-LoRA model: adapters, slot buffers, token tables.

Before each forward, `prepare(adapter_names, input_ids, ...)` makes the batch's adapters resident
and refills each partition's tables in place: the language model weighs each request 1; the
tower and the connector have two tables, one of units (each image, crop or tile the tower
received, traced to its request by `row_owners`) and one that weighs each request by its image
tokens. The LoRA ops in the graphs call `apply`, which picks the slot buffers of the linears
they serve and, from the shape of the rows, the table that says who owns them (`_owner_table`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .adapter_manager import AdapterManager
from .default_adapters import DefaultAdapters
from .expert_hooks import add_expert_hooks
from .folding import FOLD_MAX_WIDTH, FoldedWeights
from .errors import BatchError, CoverageError, MMLoRAError, OptionError, PartitionError, ShardedModelError
from .kernels.lora_add import lora_add
from .kernels.lora_embedding import lora_embedding_add
from .kernels.lora_experts import lora_experts_add
from .kernels.lora_patch_conv import lora_patch_conv_add, patch_rows
from .kernels.fold_mask import fold_mask_
from .kernels.lora_stacked import lora_stacked_expand_
from .kernels.reference import row_slots
from .linear_index import CONV, EMBEDDING, EXPERTS, LINEAR, PARAMETER, LinearIndex
from .lora_op import REGISTRY
from .parameter_hooks import add_parameter_hooks
from .parameter_hooks import never_compile as _never_compile_parameter_hooks
from .partitions import LANGUAGE_MODEL, discover_partitions, modality_of, tower_label
from .peft_format import scan_adapter
from .reporting import logger
from .row_owners import (UnitOwnership, count_name, first_input_entering, image_tokens_per_request, modality_token_ids,
                         outermost, rows_are_units, token_name, trace_units)
from .serving import ServingPlan
from .sharding import (COLUMN, TP_LORA_A, distributed_layout, gather_slice_digests, is_dtensor, shard_lora_a,
                       target_layouts)
from .token_slots import TokenSlotTable
from .upstream import check_supported

__all__ = ["LoRARuntime", "ServingOptions", "STACK_EXPANDS", "STACK_SHRINKS"]

# Who adds the stacked calls' expand (`ServingOptions.stack_expand`).
STACK_EXPANDS = ("kernel", "inductor")
STACK_SHRINKS = ("gemm", "inductor", "inductor_columns")
# The graph expand writes a few ops per column of the rank (the sum over the rank unrolled, so that
# Inductor can inline it): compile time grows with the rank (tiny-llava's 2-layer language model,
# first call on the CPU, 2026-12-07, with ~5 ops a column, before they became ~2: 31 s with the
# kernel, 41 s at rank 16, 73 s at 32, 178 s at 64). Above this rank the stack's kernel adds it.
GRAPH_EXPAND_MAX_RANK = 16

# Units (images, crops, tiles) one batch may send through a tower: the unit tables' capacity.
MAX_TOWER_UNITS = 1024


@dataclasses.dataclass(frozen=True)
class ServingOptions:
    """How a model is served, as `mmlora_fx.compile` and the `mmlora` backend take it: written once.

    `max_loras` adapters fit in one batch (GPU slots), `max_cpu_loras` stay cached on the CPU
    (default: max(max_loras, the number of adapters given)), `max_lora_rank` sizes the slot
    buffers, `max_batch_size` the token tables; `partitions` and `target_modules` restrict where
    LoRA is served; `partition_overrides` ({prefix: partition}) corrects the discovered partitions;
    `default_adapters` ({"image": name, "audio": name}) serves requests that carry that modality
    and name no adapter with that adapter (`default_adapters.py`); `tp_lora_a` lays out the A of
    column-parallel targets on a tensor-parallel model: `"replicated"` (whole on every rank, each
    computing the whole shrink), `"sharded"` (split along the rank, the shrinks all-gathered:
    `sharding.shard_lora_a`) or `"auto"` (the place of a measured rule; none is measured yet, so
    it is `"replicated"`). Row-parallel and unsharded targets are the same under every value.
    `fold_min_rows` (None: off) folds LoRA into the base GEMM of linears whose output is at least
    as wide as their input, in graph calls of at least that many static rows, where `max_loras x
    max_lora_rank` is at most `FOLD_MAX_WIDTH`; `stack_max_rows`
    (None: off) computes the shrink of served plain linears in their base GEMM (every slot's A
    stacked under the weight), in graph calls of at most that many static rows (`folding.py`);
    `stack_expand` says who adds the stacked calls' expand: `"kernel"` (one Triton launch per
    sibling group, `kernels/lora_stacked.py`) or `"inductor"` (plain tensor ops in the graph,
    which Inductor fuses into the kernels that read the outputs; language-model calls at
    `max_lora_rank` up to `GRAPH_EXPAND_MAX_RANK`, the others keep the kernel). `stack_shrink`
    says who computes the shrink of the calls with the graph expand: `"gemm"` (their base GEMM,
    every slot's A stacked under the weight), or tensor ops too, each row's own slot's A only, the
    GEMM the base's: `"inductor"` (one `[rows, rank]` reduction a call, a kernel of its own that
    siblings share) or `"inductor_columns"` (one reduction per rank column, which Inductor can fuse
    into the kernel producing the input; its first call took ~7x the kernels' on an H100).
    `fused_gemv` (experimental) runs language-model linear calls on one static row (decode at
    batch 1) as one fused kernel: the base GEMV with the row's LoRA inside
    (`kernels/gemv_lora.py`), instead of the base GEMM and the LoRA kernels."""

    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 16
    max_batch_size: int = 64
    partitions: Sequence[str] | None = None
    target_modules: Sequence[str] | None = None
    partition_overrides: Mapping[str, str] | None = None
    default_adapters: Mapping[str, str] | None = None
    prefetch_workers: int | None = None
    tp_lora_a: str = "replicated"
    fold_min_rows: int | None = None
    stack_max_rows: int | None = None
    stack_expand: str = "kernel"
    stack_shrink: str = "gemm"
    fused_gemv: bool = False

    def __post_init__(self):
        if self.tp_lora_a not in TP_LORA_A:
            raise OptionError(f"tp_lora_a must be one of {TP_LORA_A}, not {self.tp_lora_a!r}")
        if self.fold_min_rows is not None and (type(self.fold_min_rows) is not int or self.fold_min_rows < 1):
            raise OptionError(f"fold_min_rows must be None or a positive int, not {self.fold_min_rows!r}")
        if self.stack_max_rows is not None and (type(self.stack_max_rows) is not int or self.stack_max_rows < 1):
            raise OptionError(f"stack_max_rows must be None or a positive int, not {self.stack_max_rows!r}")
        if self.stack_expand not in STACK_EXPANDS:
            raise OptionError(f"stack_expand must be one of {STACK_EXPANDS}, not {self.stack_expand!r}")
        if self.stack_expand != "kernel" and self.stack_max_rows is None:
            raise OptionError(f"stack_expand={self.stack_expand!r} applies to stacked calls only: give stack_max_rows too")
        if self.stack_shrink not in STACK_SHRINKS:
            raise OptionError(f"stack_shrink must be one of {STACK_SHRINKS}, not {self.stack_shrink!r}")
        if type(self.fused_gemv) is not bool:
            raise OptionError(f"fused_gemv must be True or False, not {self.fused_gemv!r}")
        if self.stack_shrink != "gemm" and self.stack_expand != "inductor":
            raise OptionError(f"stack_shrink={self.stack_shrink!r} applies to the graph expand's calls only: give "
                              "stack_expand='inductor' (and stack_max_rows) too")

    @property
    def lora_a_sharded(self) -> bool:
        """Whether A of column-parallel targets is split along the rank ("auto" is not, unmeasured)."""
        return self.tp_lora_a == "sharded"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def taken_from(cls, options: Mapping[str, object]) -> "ServingOptions":
        """The serving options among `options` (a backend's options dict holds Inductor's too)."""
        return cls(**{name: options[name] for name in cls.names() if name in options})


class LoRARuntime:
    def __init__(self, model: nn.Module, adapters: Mapping[str, object] | None = None,
                 options: ServingOptions = ServingOptions()):
        check_supported(model)  # a family broken upstream gets our words, not a traceback from inside it
        adapters = dict(adapters or {})
        self.options = options
        max_loras, max_cpu_loras, max_lora_rank = options.max_loras, options.max_cpu_loras, options.max_lora_rank
        partitions, target_modules = options.partitions, options.target_modules
        partition_overrides, max_batch_size = options.partition_overrides, options.max_batch_size
        self.model = model
        self.partition_map = discover_partitions(model, partition_overrides)
        self.linears = LinearIndex(model, self.partition_map)
        # What the first adapters target decides what is served (unless restricted explicitly);
        # reading the names is enough, the weights are validated when loaded below.
        scans = [scan_adapter(name, path, self.linears) for name, path in adapters.items()]
        self.serving = ServingPlan.build(self.linears, scans, partitions, target_modules)
        # Tensor parallelism (#23): each served target's layout, before any buffer is sized (what is
        # not served is refused here, alike on every rank).
        self.layouts = target_layouts(self.linears, self.serving.served)
        if options.lora_a_sharded:
            self.layouts = shard_lora_a(self.layouts, max_lora_rank, self.linears)
        if any(layout.sharded for layout in self.layouts.values()):
            from .tp_lora import register_sharding_rule

            register_sharding_rule()
            # Adapters on the output embeddings carry PEFT's full copy of its weight: digests of
            # each rank's slice let every rank check such a copy alike (`sharding.py`).
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            for name, layout in self.layouts.items():
                if layout.sharded and head is not None and self.linears.weights[name] is getattr(head, "weight", None):
                    gather_slice_digests(self.linears.weights[name], layout)
        if max_cpu_loras is None:
            max_cpu_loras = max(max_loras, len(adapters))
        self.manager = AdapterManager(self.linears, self.serving, max_loras=max_loras,
                                      max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank, layouts=self.layouts,
                                      prefetch_workers=options.prefetch_workers)
        if any(layout.sharded for layout in self.layouts.values()):
            from .tp_lora import prepare_identities

            prepare_identities(self.manager.buffers[module] for module, layout in self.layouts.items()
                               if layout.sharded and module in self.manager.buffers)
        # Fold buffers before any slot is written (they mirror every write) and before the weights
        # are registered (the folded linears' parameters become views of them).
        fold = options.fold_min_rows is not None
        if fold and max_loras * max_lora_rank > FOLD_MAX_WIDTH:
            logger.warning(f"fold_min_rows={options.fold_min_rows}: no linear folds, as max_loras x max_lora_rank "
                           f"({max_loras} x {max_lora_rank}) is more than {FOLD_MAX_WIDTH} columns, where the fold is "
                           "estimated to cost more GPU time than the LoRA kernels (mmlora_fx/folding.py)")
            fold = False
        self.folds = FoldedWeights(model, {module: self.manager.buffers[module] for module in sorted(self.serving.served)
                                           if self.linears[module].kind == LINEAR and module in self.manager.buffers}
                                   if fold or options.stack_max_rows is not None else {},
                                   fold=fold, stack=options.stack_max_rows is not None,
                                   moved=self.linears.weights.__setitem__, stack_b=self._graph_expands)
        self.manager.slot_listeners.append(self.folds.mirror)
        self.manager.follow_current_stream()  # the first side-stream writes come after the buffers' set-up
        self.manager.load_many(adapters)
        device = next(model.parameters()).device
        partitions = [LANGUAGE_MODEL] + [p for p in self.partition_map.lora_partitions if p != LANGUAGE_MODEL]
        self.tables = {partition: TokenSlotTable(partition, max_batch_size, device) for partition in partitions}
        # Towers and connectors, each with its modality (vision, audio, ...): their rows belong to
        # requests by that modality's tokens and the units its tower received.
        self.modality_partitions = {partition: modality_of(partition) for partition in partitions[1:]}
        self.modalities = sorted(set(self.modality_partitions.values()), key=lambda m: (m != "vision", m))
        # Per tower/connector partition, slots per unit the tower received (one weight per unit).
        self.unit_tables = {partition: TokenSlotTable(partition, MAX_TOWER_UNITS, device)
                            for partition in self.modality_partitions}
        self.units = {modality: UnitOwnership.unknown("no batch yet") for modality in self.modalities}
        self.tower_roots = {modality: outermost(self.partition_map.prefixes_of(tower_label(modality)))
                            for modality in self.modalities}
        config = getattr(model, "config", None)
        self.token_ids = {modality: modality_token_ids(config, modality) for modality in self.modalities}
        # Videos go through the vision tower in a call of their own (Qwen2-VL runs it once for the
        # images, once for the videos); their rows belong to requests by video tokens.
        # `_vision_entries` says which call of a forward carries which, and the tables are kept per
        # call, not per kind: the k-th call of a vision layer reads the k-th table, which `prepare`
        # fills with the tokens of whatever that call carries in this batch. So a CUDA-graph replay
        # of a first call reads the right tokens whether this batch's first call has images or videos.
        self.video_token_ids = modality_token_ids(config, "video") if "vision" in self.modalities else []
        self.second_call_tables = ({partition: TokenSlotTable(partition, max_batch_size, device)
                                    for partition, modality in self.modality_partitions.items() if modality == "vision"}
                                   if self.video_token_ids else {})
        self._vision_entries: tuple[str, ...] = ()
        # How each served tower/connector module's rows were owned in the last forward (inspect shows it).
        self.ownership: dict[str, str] = {}
        self._calls: collections.Counter[str] = collections.Counter()  # per module, calls this forward
        self._stream_rows: collections.Counter[str] = collections.Counter()  # per module, rows seen this forward
        self._stream_modules: dict[str, tuple[str, int]] = {}
        self._plans: dict[tuple[str, ...], tuple] = {}
        self._stacks_checked: set[tuple[str, ...]] = set()  # graph-expand calls whose modules were checked
        # The fused GEMV's one workspace (`fused_gemv` on CUDA), made here, before any compiled
        # call: a CUDA-graph warm-up would allocate it in a graph's private pool.
        self._gemv_workspace = None
        if options.fused_gemv and device.type == "cuda":
            from .kernels.gemv_lora import GemvWorkspace

            self._gemv_workspace = GemvWorkspace.for_calls(
                [tuple(self.linears.weights[module].shape) for module in self.manager.buffers
                 if self.gemv_fits(module, 1)], device)
        from .kernels import launch_config

        if device.type == "cuda" and launch_config.SUMS_IN_KERNEL:
            # The counters of the LoRA kernels' split sums reduced in the shrink, made here for the
            # same reason; only where that option is on (set before compiling: call sites of a
            # runtime made while it was off zero their counters per call).
            from .kernels import tile_counters

            tile_counters.make_pool(device)
        self._traced_tables_used: set[str] = set()  # modalities whose layers have read the unit tables
        self._call_depth = 0  # depth of `call_scope()`s: the eager hooks act only inside one
        # For runtimes the `mmlora` backend builds: says whether the hooks act now (no call scope there).
        self.eager_scope: Callable[[], bool] | None = None
        self.applied: set[str] | None = None  # modules given LoRA, while `recording_applied()` is on
        # LoRA op calls per partition since the last `prepare`, against the partitions it expects.
        self.applications: collections.Counter[str] = collections.Counter()
        self.expected_partitions: set[str] = set()
        self._served_partitions = {self.linears[module].partition for module in self.serving.served}
        self._served_modalities = {self.modality_partitions[p] for p in self._served_partitions
                                   if p in self.modality_partitions}
        # Per modality, its tower's and connector's served linears in model order (the row probe stops at the first).
        self._served_by_modality = {modality: [info.name for info in self.linears if info.name in self.serving.served
                                               and info.kind == LINEAR
                                               and self.modality_partitions.get(info.partition) == modality]
                                    for modality in self.modalities}
        for partition in sorted(self._served_partitions & set(self.modality_partitions)):
            modality = self.modality_partitions[partition]
            if not self.token_ids[modality]:
                # Without the modality's placeholder token no row of its tower can be given a request.
                raise PartitionError(
                    f"{partition} is served, but this model's config names no {modality} token "
                    f"({token_name(modality)}_token_id): which request owns its rows "
                    "cannot be told. Check partition_overrides, or leave it out with partitions=[...]")
        self.adapter_names: list[str | None] = []  # the last batch's, defaults applied
        self.defaults = DefaultAdapters([token_name(modality) for modality in self.modalities]
                                        + (["video"] if self.video_token_ids else []),
                                        is_loaded=lambda name: name in self.manager.names)
        self.defaults.update(options.default_adapters or {})
        for kind in (LINEAR, EMBEDDING, CONV, EXPERTS):
            REGISTRY.register(self, self.linears.of_kind(kind), kind)
        # `x @ W` is served by the linear op (its adapter is in a linear's layout): a linear use of W.
        REGISTRY.register(self, self.linears.of_kind(PARAMETER), LINEAR)
        self._add_eager_hooks()

    def forget_tables(self) -> None:
        """Make the next `prepare` write every token table (each partition's, the tower units', the
        second calls') as for a new batch: for benchmarks that repeat one batch (a fill equal to
        the last one writes nothing)."""
        for table in (*self.tables.values(), *self.unit_tables.values(), *self.second_call_tables.values()):
            table.forget()

    # ------------------------------------------------------------------ before a forward
    def prepare(self, adapter_names: Sequence[str | None], input_ids: torch.Tensor | None = None,
                has_images: bool = False, inputs: Mapping[str, object] | None = None,
                items_per_request: Mapping[str, Sequence[int]] | None = None) -> list[int]:
        """Make the batch's adapters resident and refill the token tables; return the slots.

        `inputs` (the batch's keyword inputs) lets the tower's units be traced to their requests
        (`row_owners`); without it, tower rows are shared by image tokens, with checks.
        `items_per_request` says, by a modality's token name (`image`, `audio`), how many of its
        items each request holds, where the tokens cannot.
        """
        if isinstance(adapter_names, str):
            raise BatchError("adapter_names takes one name per request (a list), not a single string")
        adapter_names = list(adapter_names)
        if input_ids is not None and input_ids.shape[0] != len(adapter_names):
            raise BatchError(f"adapter_names has {len(adapter_names)} names but the batch has "
                             f"{input_ids.shape[0]} requests")
        if len(adapter_names) > self.tables[LANGUAGE_MODEL].max_batch_size:
            raise BatchError(f"the batch has {len(adapter_names)} requests but max_batch_size is "
                             f"{self.tables[LANGUAGE_MODEL].max_batch_size}")
        items = dict(items_per_request or {})
        unknown = sorted(set(items) - {token_name(modality) for modality in self.modalities})
        if unknown:
            raise BatchError(f"{', '.join(count_name(key) for key in unknown)} given, but this model's towers take "
                             f"{[token_name(modality) for modality in self.modalities]}")
        for key, counts in items.items():
            # Checked whether or not the counts are needed for this batch: a wrong call fails every time.
            if len(counts) != len(adapter_names):
                raise BatchError(f"{count_name(key)} has {len(counts)} entries but the batch has {len(adapter_names)} "
                                 "requests")
        tokens = self._modality_tokens(input_ids, has_images, len(adapter_names))
        adapter_names = self._with_defaults(adapter_names, tokens)
        self.manager.check_batch(adapter_names)  # every name known, few enough: before any change
        self.adapter_names = adapter_names
        entries = self._vision_entry_order(inputs, tokens) if any(tokens.get("video", ())) else ()
        units = {modality: self._trace_units(modality, inputs, tokens[modality], items.get(token_name(modality)))
                 if not (modality == "vision" and entries[:1] == ("video",)) else
                 # The tower's first call carries the videos: the units probe would see theirs.
                 UnitOwnership.unknown("the videos enter the vision tower first")
                 for modality in self.modalities}
        for modality in sorted(self._traced_tables_used):
            traced = units[modality]
            media = any(tokens[modality]) or (modality == "vision" and bool(entries))
            if media and traced.owners is None and traced.row_runs is None:
                # Layers that read the unit tables before may be replayed from CUDA graphs with
                # those addresses baked in: tables left from an earlier batch would be read.
                raise BatchError(f"the {modality} tower's layers were served from its traced units or rows, but this "
                                 f"batch's cannot be traced ({traced.how}): which request owns its rows cannot be told")
        slots = self.manager.activate(adapter_names)
        self.tables[LANGUAGE_MODEL].fill(slots, [1] * len(slots))
        for partition, modality in self.modality_partitions.items():
            first = tokens["video"] if modality == "vision" and entries[:1] == ("video",) else tokens[modality]
            self.tables[partition].fill(slots, first)
            owners, row_runs = units[modality].owners, units[modality].row_runs
            if owners is not None:
                self.unit_tables[partition].fill([slots[owner] for owner in owners], [1] * len(owners))
            elif row_runs is not None:
                # Runs of rows instead of units: the same table, each run weighted by its rows.
                self.unit_tables[partition].fill([slots[owner] for owner, _ in row_runs],
                                                 [count for _, count in row_runs])
        for partition, table in self.second_call_tables.items():
            # The second call's: the videos after the images, or the images after the videos.
            table.fill(slots, tokens["video"] if entries[1:] == ("video",) else tokens["vision"] if entries[1:] else
                       [0] * len(slots))
        self._vision_entries = entries
        self.units = units
        self._forget_calls()
        self.ownership.clear()
        # The partitions this batch must reach with LoRA: the language model always runs, a
        # modality's tower and connector when a request has that modality's tokens; only where a
        # linear is served and some request asked for an adapter.
        self.applications.clear()
        running = {LANGUAGE_MODEL} | {partition for partition, modality in self.modality_partitions.items()
                                      if any(tokens[modality]) or (modality == "vision" and entries)}
        self.expected_partitions = (running & self._served_partitions) if any(slot >= 0 for slot in slots) else set()
        return slots

    def names_with_defaults(self, adapter_names: Sequence[str | None], input_ids: torch.Tensor) -> list[str | None]:
        """The names a batch with these `input_ids` runs with, each modality's default adapter given
        to the requests that carry it and name none."""
        return self._with_defaults(list(adapter_names), self._modality_tokens(input_ids, True, len(adapter_names)))

    def _with_defaults(self, adapter_names: list[str | None], tokens: Mapping[str, list[int]]) -> list[str | None]:
        items = {token_name(modality): tokens[modality] for modality in self.modalities}
        if "video" in tokens:
            items["video"] = tokens["video"]
        return self.defaults.resolve(adapter_names, items)

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
        self.units = {modality: UnitOwnership.unknown("base model") for modality in self.modalities}
        self._forget_calls()

    def _forget_calls(self) -> None:
        self._calls.clear()
        self._stream_rows.clear()
        self._stream_modules.clear()

    def _trace_units(self, modality: str, inputs, tokens, items_per_request) -> UnitOwnership:
        if not any(tokens) or modality not in self._served_modalities:
            if items_per_request is not None and any(items_per_request) and not any(tokens):
                raise BatchError(f"{count_name(token_name(modality))} gives {token_name(modality)} items, but the "
                                 f"batch has no {token_name(modality)} tokens")
            return UnitOwnership.unknown(f"no {modality} tokens")
        if inputs is None:
            return UnitOwnership.unknown("the batch's inputs were not given")
        units = trace_units(self.model, inputs, self.tower_roots[modality], self.token_ids[modality], tokens,
                            items_per_request, token_name(modality), self._served_by_modality[modality])
        if units.owners is not None and len(units.owners) > MAX_TOWER_UNITS:
            return UnitOwnership.unknown(f"the tower received {len(units.owners)} units, more than {MAX_TOWER_UNITS}")
        if units.row_runs is not None and len(units.row_runs) > MAX_TOWER_UNITS:
            return UnitOwnership.unknown(f"the tower's rows come in {len(units.row_runs)} runs, more than {MAX_TOWER_UNITS}")
        return units

    def _modality_tokens(self, input_ids, has_media: bool, requests: int) -> dict[str, list[int]]:
        """Per modality, each request's placeholder tokens (its images', its audio's)."""
        tokens = {}
        for modality in self.modalities:
            ids = self.token_ids[modality]
            if not has_media:
                # No media: no tower runs, so no row needs an owner; skip reading input_ids back
                # (on a GPU that read is a host sync, every decode step).
                tokens[modality] = [0] * requests
            elif input_ids is None or not ids:
                raise BatchError(f"a batch with images or audio needs input_ids ({modality} tokens say which "
                                 f"request owns which rows in the {modality} tower and connector)"
                                 + ("" if ids else f"; this model's config names no {modality} token id"))
            else:
                tokens[modality] = image_tokens_per_request(input_ids, ids)
        if self.video_token_ids:
            tokens["video"] = (image_tokens_per_request(input_ids, self.video_token_ids) if has_media and input_ids is not None
                               else [0] * requests)
        return tokens

    def _vision_entry_order(self, inputs: Mapping[str, object] | None, tokens: Mapping[str, list[int]]) -> tuple[str, ...]:
        """Which calls of the vision tower a forward makes for this batch, in order: ("video",) for
        videos alone, and for images and videos whichever the family's code runs first, read off
        that code (`first_input_entering`), never assumed."""
        if not any(tokens["vision"]):
            return ("video",)
        if "vision" not in self._served_modalities:
            return ("image", "video")  # no vision layer reads the tables: the order does not matter
        media = [key for key, value in (inputs or {}).items() if isinstance(value, torch.Tensor)
                 and value.is_floating_point() and value.dim() >= 2 and key != "inputs_embeds"]
        videos = [key for key in media if "video" in key]
        first, why = (first_input_entering(self.model, inputs, self.tower_roots["vision"], media) if videos
                      else (None, "the batch's inputs were not given, or none of them is named for videos"))
        if first is None:
            raise BatchError(f"the batch has images and videos, but which call of the vision tower carries which "
                             f"cannot be told ({why}): run them in separate batches")
        return ("video", "image") if first in videos else ("image", "video")

    # ------------------------------------------------------------------ inside a forward
    def apply(self, outputs: list[torch.Tensor], x: torch.Tensor, modules: list[str]) -> None:
        """Add the LoRA deltas of `modules` (siblings sharing input `x`) to their `outputs`."""
        served, table, lora_a, lora_b, ranks, split = self._cached_plan(modules)
        if not served:
            return
        self._count_application(table.partition, [modules[index] for index in served])
        request_slots, cum_weights, tile_plan = self._owner_table(table, x, modules[served[0]])
        outputs = [outputs[index] for index in served]
        if split is None:
            # Already inside the graph-level op: call the kernels directly, not through a second op.
            lora_add(outputs, x, lora_a, lora_b, ranks, request_slots, cum_weights, tile_plan)
            return
        from .tp_lora import lora_add_all_gathered

        whole, gathered = split
        if whole:
            lora_add([outputs[i] for i in whole], x, [lora_a[i] for i in whole], [lora_b[i] for i in whole],
                     [ranks[i] for i in whole], request_slots, cum_weights, tile_plan)
        for positions, local_ranks, mesh in gathered:
            lora_add_all_gathered([outputs[i] for i in positions], x, [lora_a[i] for i in positions],
                                  [lora_b[i] for i in positions], [ranks[i] for i in positions], local_ranks,
                                  request_slots, cum_weights, tile_plan, mesh)

    def fold_width(self, module: str, rows: int) -> int | None:
        """Columns a graph call of the linear `module` on `rows` static rows gets from the fold
        (its K grows by them), or None: the call keeps the LoRA op."""
        if not self.folds.folds(module) or rows < self.options.fold_min_rows:
            return None
        return self.folds.width(module)

    def stack_width(self, module: str, rows: int) -> int | None:
        """Columns a graph call of the linear `module` on `rows` static rows gets from the stack
        (its output grows by them: every slot's shrink), or None: the call keeps the LoRA op."""
        if not self.folds.stacked(module) or rows > self.options.stack_max_rows:
            return None
        return self.folds.width(module)

    def _graph_expands(self, module: str) -> bool:
        """Whether the stacked linear `module`'s expand is the graph's own (`stack_expand="inductor"`):
        a language-model linear whose slots' rank is at most `GRAPH_EXPAND_MAX_RANK`."""
        return (self.options.stack_expand == "inductor" and self.linears[module].partition == LANGUAGE_MODEL
                and module in self.manager.buffers
                and self.manager.buffers[module].lora_b.shape[-1] <= GRAPH_EXPAND_MAX_RANK)

    def stack_layout(self, module: str) -> tuple[int, int] | None:
        """(slots, rank) of the B beside the stacked linear `module`'s weight, where its stacked
        calls' expand is the graph's own (`_graph_expands`), or None: the stack's kernel adds it."""
        if not self.folds.stacked(module) or not self.folds.has_lora_b(module) or not self._graph_expands(module):
            return None
        lora_b = self.manager.buffers[module].lora_b
        return lora_b.shape[0], lora_b.shape[2]

    def gemv_fits(self, module: str, rows: int) -> bool:
        """Whether a graph call of the linear `module` on `rows` static rows runs the fused GEMV
        (`fused_gemv`): one row, a language-model linear with whole slot buffers and a plain 2D
        weight (the kernel reads the LM table's first request's slot)."""
        if not self.options.fused_gemv or rows != 1 or module not in self.manager.buffers:
            return False
        linear = self.linears[module]
        buffers = self.manager.buffers[module]
        weight = self.linears.weights.get(module)
        return (linear.kind == LINEAR and linear.partition == LANGUAGE_MODEL and buffers.local_ranks is None
                and buffers.lora_a.dim() == 3 and isinstance(weight, torch.Tensor) and not is_dtensor(weight)
                and weight.dim() == 2)

    def gemv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, module: str) -> torch.Tensor:
        """`linear(x, weight, bias)` of one row with its request's LoRA added (`fused_gemv`): the fused
        kernel on CUDA (every linear's calls share the runtime's one workspace: they run in order on
        one stream), the reference elsewhere."""
        from .kernels.gemv_lora import gemv_config, gemv_lora_reference, gemv_lora_triton

        table = self.tables[LANGUAGE_MODEL]
        self._count_application(table.partition, [module])
        table.check_rows(1)
        buffers = self.manager.buffers[module]
        row = x.reshape(1, x.shape[-1])
        if not x.is_cuda:
            out = gemv_lora_reference(row, weight, bias, buffers.lora_a, buffers.lora_b, buffers.ranks,
                                      table.request_slots[:1])
        else:
            out = torch.empty(1, weight.shape[0], dtype=x.dtype, device=x.device)
            gemv_lora_triton(row.contiguous(), weight, bias, buffers.lora_a, buffers.lora_b, buffers.ranks,
                             table.request_slots, out, self._gemv_workspace, gemv_config(*weight.shape))
        return out.view(*x.shape[:-1], weight.shape[0])

    def stacked_row_slots(self, modules: list[str], rows: int) -> torch.Tensor:
        """The adapter slot of each of `rows` language-model rows (int64, -1: the base model), for
        the graph expand of the stacked linears `modules` (every one of a graph's): what the
        kernels' owner search finds, computed on the device from the partition's table, so that
        CUDA graphs replay it as the table changes."""
        key = tuple(modules)
        if key not in self._stacks_checked:  # per graph, not per step: what it checks is fixed at start
            self._refuse_unstacked(modules, lambda module: self.stack_layout(module) is not None, " with B beside it")
            self._stacks_checked.add(key)
        table = self.tables[LANGUAGE_MODEL]
        self._count_application(table.partition, modules)
        table.check_rows(rows)
        return row_slots(table.request_slots, table.request_cum_weights, rows)

    @staticmethod
    def _refuse_unstacked(modules: list[str], stacked: Callable[[str], bool], what: str = "") -> None:
        """Raise where a stacked graph call runs with a module that has no stack buffer (`what`:
        what else it must have): a graph dynamo reused for another instance of its block, whose
        weight is not stacked, so the GEMM before the op read past that weight."""
        unstacked = [module for module in modules if not stacked(module)]
        if unstacked:
            raise MMLoRAError(f"a graph stacked for LoRA ran with the weight of {unstacked}, which has no stack buffer"
                              f"{what} (its weight was replaced after mmlora_fx.compile, or is shared or sharded)")

    def apply_stacked(self, outputs: list[torch.Tensor], modules: list[str]) -> None:
        """Add the LoRA deltas of the stacked linears `modules` (siblings sharing an input) to
        their `outputs`, `[..., out + width]` each: the base output, then every slot's shrink of
        every row, which the base GEMM computed."""
        self._refuse_unstacked(modules, self.folds.stacked)
        served, table, _, lora_b, ranks, _ = self._cached_plan(modules)
        if not served:
            return
        self._count_application(table.partition, [modules[index] for index in served])
        out_features = [b.shape[1] for b in lora_b]
        first = outputs[served[0]]
        request_slots, cum_weights, tile_plan = self._owner_table(table, first[..., :out_features[0]],
                                                                  modules[served[0]])
        rows = [outputs[index].view(-1, outputs[index].shape[-1]) for index in served]
        lora_stacked_expand_(rows, out_features, lora_b, ranks, request_slots, cum_weights, tile_plan)

    def fold_shrink(self, x: torch.Tensor, module: str) -> torch.Tensor:
        """Every slot's shrink of the rows `x` for the folded linear `module`, each row keeping
        only its own slot's columns: `[..., slots * rank]`, the extra K its folded GEMM reads."""
        table = self.tables[self.linears[module].partition]
        self._count_application(table.partition, [module])
        request_slots, cum_weights, _ = self._owner_table(table, x, module)
        rows = x.numel() // x.shape[-1]
        shrunk = x.reshape(rows, x.shape[-1]) @ self.folds.lora_a(module).T
        fold_mask_(shrunk, request_slots, cum_weights, self.folds.rank(module))
        return shrunk.view(*x.shape[:-1], shrunk.shape[-1])

    def apply_after_module(self, output: torch.Tensor, x: torch.Tensor, module: str) -> None:
        """Add the LoRA delta of the linear `module` to `output`, what its module returned for `x`
        (the eager hook's view: after the module's own hooks and tensor-parallel redistribution).

        An unsharded linear is `apply`'s. A sharded one's input and output may be DTensors (whose
        local shards are views: adding to them in place changes the module's output) or local
        tensors (transformers' layers). Column-parallel: the output is this rank's slice of the
        features, or the whole (the module gathered it: transformers' lm_head), which gets every
        rank's slice of the delta, all-gathered (`apply` makes the slice, all-gathering the shrink
        where A is split along the rank). Row-parallel: the output is reduced already, so
        the rank-sized shrink is all-reduced (`tp_lora.lora_add_all_reduced`); an input still
        whole (transformers' `rowwise_split_input`) is cut to this rank's slice first."""
        layout = self.layouts.get(module)
        if layout is None or not layout.sharded:
            self.apply([output], x, [module])
            return
        from . import tp_lora

        info = self.linears[module]
        x = x.to_local() if is_dtensor(x) else x
        partial = is_dtensor(output) and any(placement.is_partial() for placement in output.placements)
        output = output.to_local() if is_dtensor(output) else output
        if layout.style == COLUMN:
            if output.shape[-1] == info.out_features and layout.ranks > 1:
                delta = output.new_zeros(*output.shape[:-1], layout.out_range[1] - layout.out_range[0])
                self.apply([delta], x, [module])
                output += tp_lora.gathered(delta, layout.mesh, info.out_features)
            else:
                self.apply([output], x, [module])
            return
        if x.shape[-1] == info.in_features and layout.ranks > 1:
            x = x[..., layout.in_range[0]:layout.in_range[1]]
        if output.shape[:-1] != x.shape[:-1]:
            raise ShardedModelError(module, distributed_layout(self.linears.weights[module]),
                                    f"its output {tuple(output.shape)} does not hold the rows of its input "
                                    f"{tuple(x.shape)} (scattered by the module): mm.eager cannot add the delta there")
        if partial:
            self.apply([output], x, [module])  # the module's reduction, after this hook, sums the partial delta
            return
        served, table, lora_a, lora_b, ranks, _ = self._cached_plan([module])
        if not served:
            return
        self._count_application(table.partition, [module])
        request_slots, cum_weights, tile_plan = self._owner_table(table, x, module)
        tp_lora.lora_add_all_reduced([output], x.contiguous(), lora_a, lora_b, ranks, request_slots, cum_weights,
                                     tile_plan, layout.mesh)

    def apply_embedding(self, output: torch.Tensor, ids: torch.Tensor, module: str,
                        output_scale: torch.Tensor | None = None) -> None:
        """Add the LoRA delta of the embedding `module` to `output`, its lookup of the token `ids`.

        Embeddings are served in the language model only: the token ids are its rows, one weight
        per request. `output_scale` multiplies the delta where the lookup's output was already
        scaled (an eager hook on Gemma3's scaled embedding sees the product; PEFT scales its
        delta the same way)."""
        served, table, lora_a, lora_b, ranks, _ = self._cached_plan([module])
        if not served:
            return
        self._count_application(table.partition, [module])
        table.check_rows(ids.numel())
        if output_scale is None:
            lora_embedding_add(output, ids, lora_a[0], lora_b[0], ranks[0], table.request_slots,
                               table.request_cum_weights)
            return
        delta = torch.zeros_like(output)
        lora_embedding_add(delta, ids, lora_a[0], lora_b[0], ranks[0], table.request_slots, table.request_cum_weights)
        output += delta * output_scale.to(output.dtype)

    def apply_experts(self, output: torch.Tensor, x: torch.Tensor, module: str, expert_ids: torch.Tensor | None,
                      contracted_dim: int, tiles: int, interleave: int) -> None:
        """Add the LoRA of the 3D expert weight `module` to `output`, its batched product with the
        rows `x` (per expert `[experts, T, c]`, or gathered by `expert_ids`), summed over the weight's
        dimension `contracted_dim`; the rows hold the language model's tokens laid out `(tiles,
        interleave)` (`passes/row_layout.py`)."""
        buffers = self.manager.buffers.get(module)
        if buffers is None:
            return
        info = self.linears[module]
        table = self.tables[info.partition]
        self._count_application(table.partition, [module])
        rows = x.shape[0] * x.shape[1] if expert_ids is None else x.shape[0]
        if rows % (tiles * interleave):
            raise BatchError(f"{module}: {rows} expert rows do not hold whole tokens laid out {tiles} x {interleave}")
        table.check_rows(rows // (tiles * interleave))
        lora_experts_add(output, x, buffers.lora_a, buffers.lora_b, buffers.ranks, expert_ids,
                         contracted_dim == info.in_dim, tiles, interleave, table.request_slots,
                         table.request_cum_weights)

    def apply_conv(self, output: torch.Tensor, x: torch.Tensor, module: str) -> None:
        """Add the LoRA delta of the patch embedding `module` to `output`, its convolution of `x`.

        The patches are the rows (`kernels/lora_patch_conv.py`): `[entries, positions, pixels]`,
        owned per unit where the entries are the tower's units (images), or `[patches, pixels]`
        where each entry is one patch (Qwen2-VL's packed patches), shared by image tokens as the
        tower's other layers' rows are."""
        served, table, lora_a, lora_b, ranks, _ = self._cached_plan([module])
        if not served:
            return
        self._count_application(table.partition, [module])
        kernel = tuple(self.linears.weights[module].shape[2:])  # == the stride: a patch embedding
        rows = patch_rows(x, kernel)
        request_slots, cum_weights, tile_plan = self._owner_table(table, rows, module)
        lora_patch_conv_add(output, x, kernel, lora_a[0], lora_b[0], ranks[0], request_slots, cum_weights, tile_plan,
                            rows=rows)

    def _owner_table(self, table: TokenSlotTable, x: torch.Tensor, module: str):
        """Who owns the rows of `x`: the tables (slots, running weights, tile plan) the kernels read.

        Language model: one weight per request. Tower and connector: rows laid out `[units, ...]`,
        with as many units as the tower received, belong unit by unit to the units' requests (exact,
        for any number of rows per unit); rows of the partition the row probe traced, as many as it
        saw, belong run by run to the runs' requests; other layouts (all images' patches in one
        sequence) are shared by image tokens, which holds where rows follow tokens and is checked
        where it cannot.
        """
        rows = x.numel() // x.shape[-1]
        if table.partition == LANGUAGE_MODEL:
            table.check_rows(rows)
            return table.request_slots, table.request_cum_weights, table.tile_plan
        self._calls[module] += 1
        if self._vision_entries and self.modality_partitions[table.partition] == "vision":
            call = self._calls[module]
            if call > len(self._vision_entries):
                raise BatchError(f"{module} ({table.partition}) ran {call} times in one forward, but the vision tower "
                                 f"is called {len(self._vision_entries)} time(s) for this batch's "
                                 f"{' and '.join(kind + 's' for kind in self._vision_entries)}: which call carries "
                                 "the videos cannot be told")
            if call == 2:
                table = self.second_call_tables[table.partition]
            if self._vision_entries[call - 1] == "video":
                return self._video_owner_table(table, x, module)
        traced = self.units[self.modality_partitions[table.partition]]
        units = traced.units
        if rows_are_units(x.shape, units):
            self.ownership[module] = f"per unit ({units} units; {traced.how})"
            self._traced_tables_used.add(self.modality_partitions[table.partition])
            unit_table = self.unit_tables[table.partition]
            # Views of fixed buffers: the same addresses at every CUDA-graph replay.
            return unit_table.request_slots[:units], unit_table.request_cum_weights[:units + 1], unit_table.tile_plan
        if (traced.row_runs is not None and rows == traced.rows
                and self.linears[traced.rows_module].partition == table.partition):
            # The rows the probe traced, run by run (all items' rows in one sequence): for the
            # layers of the partition probed, each seeing them once per forward, whole.
            if self._calls[module] > 1:
                raise BatchError(
                    f"{module} ({table.partition}) ran {self._calls[module]} times in one forward on {rows} rows each, "
                    f"but the rows traced ({traced.rows_module}'s first call) are the whole batch's: which request "
                    "these rows belong to cannot be told")
            self.ownership[module] = f"per row ({rows} rows in {len(traced.row_runs)} runs; {traced.how})"
            self._traced_tables_used.add(self.modality_partitions[table.partition])
            unit_table, runs = self.unit_tables[table.partition], len(traced.row_runs)
            return unit_table.request_slots[:runs], unit_table.request_cum_weights[:runs + 1], unit_table.tile_plan
        if units is None and rows_are_units(x.shape, traced.received):
            # Rows come per tower unit, but the units' requests are not known: sharing them by
            # tokens would be a guess.
            raise BatchError(f"{module} ({table.partition}) sees its rows as the tower's {traced.received} units "
                             f"{tuple(x.shape)}, but {traced.how}")
        not_traced = f" ({traced.how})" if units is None else ""
        total = table.cum_weights[-1]
        offset = self._stream_rows[module]
        if offset == 0 and rows >= total:
            # The whole batch in one call: shared among the requests by their image tokens.
            self.ownership[module] = f"by {self._token_word(table.partition)} tokens" + not_traced
            self._stream_rows[module] = rows
            table.check_rows(rows, leading=x.shape[0] if x.dim() >= 3 else 1, why=not_traced)
            return table.request_slots, table.request_cum_weights, table.tile_plan
        # Fewer rows than image tokens, or a later call in the same forward (a connector run once
        # per image): the calls read one stream of rows, one per image token, in the tokens' order.
        # `check_streams` holds each such stream to exactly the batch's image tokens afterwards.
        if offset + rows > total:
            raise BatchError(
                f"{module} ({table.partition}) ran {self._calls[module]} times in one forward and saw {offset + rows} "
                f"rows so far, more than the batch's {total} {self._token_word(table.partition)} tokens: which "
                "request its rows belong to cannot be told" + not_traced)
        self.ownership[module] = (f"by {self._token_word(table.partition)} tokens, one row per token over "
                                  f"{self._calls[module]} call(s)" + not_traced)
        self._stream_rows[module] = offset + rows
        self._stream_modules[module] = (table.partition, total)
        # The running weights moved to this call's rows, on the device: a CUDA-graph replay recomputes
        # them from the table's current contents.
        shifted = (table.request_cum_weights - offset).clamp_(0, rows)
        return table.request_slots, shifted, None

    def _video_owner_table(self, table: TokenSlotTable, x: torch.Tensor, module: str):
        """The rows of the vision tower's videos call, shared among the requests by their video
        tokens (`table`: that call's, filled with them), with the same checks as images shared by
        tokens (whole rows, whole blocks)."""
        partition = table.partition
        rows = x.numel() // x.shape[-1]
        if rows < table.cum_weights[-1]:
            raise BatchError(f"{module} ({partition}) saw {rows} rows in the videos' call, fewer than the batch's "
                             f"{table.cum_weights[-1]} video tokens: which request its rows belong to cannot be told")
        table.check_rows(rows, leading=x.shape[0] if x.dim() >= 3 else 1, why=" (videos are shared by video tokens)")
        self.ownership[module] = "; ".join(filter(None, [self.ownership.get(module), "videos by video tokens"]))
        return table.request_slots, table.request_cum_weights, table.tile_plan

    def _token_word(self, partition: str) -> str:
        return token_name(self.modality_partitions[partition])

    def check_streams(self) -> None:
        """After a forward: each module whose rows were read as a stream of image tokens saw exactly
        the batch's image tokens (fewer or more means its rows do not follow the tokens); with
        videos, each vision layer that ran did so once per call of the tower."""
        if len(self._vision_entries) > 1:
            short = sorted(module for module, calls in self._calls.items() if calls < len(self._vision_entries)
                           and self.modality_partitions.get(self.linears[module].partition) == "vision")
            if short:
                raise BatchError(f"{short[0]} ran {self._calls[short[0]]} time(s) in a forward that called the vision "
                                 f"tower for {' and '.join(kind + 's' for kind in self._vision_entries)}: which of its "
                                 "calls carried the videos cannot be told")
        for module, (partition, total) in self._stream_modules.items():
            if self._stream_rows[module] != total:
                raise BatchError(
                    f"{module} ({partition}) saw {self._stream_rows[module]} rows in {self._calls[module]} call(s) "
                    f"for the batch's {total} {self._token_word(partition)} tokens: its rows neither follow the tokens nor come as "
                    "the tower's units, so which request they belong to cannot be told")

    def _cached_plan(self, modules: list[str]):
        plan = self._plans.get(tuple(modules))
        if plan is None:
            plan = self._plans[tuple(modules)] = self._plan(modules)
        return plan

    def _count_application(self, partition: str, modules: list[str]) -> None:
        """One LoRA application in `partition` (the coverage check counts them; `verify` names the modules)."""
        self.applications[partition] += 1
        if self.applied is not None:
            self.applied.update(modules)

    def _plan(self, modules: list[str]):
        """(served indices, table, A, B and rank tables of the served, split): `split` is None unless
        some served target's A is split along the rank; then (positions among the served whose A is
        whole, [(positions whose A is split, their local rank tables, their mesh)], one per mesh)."""
        served = [index for index, module in enumerate(modules) if module in self.manager.buffers]
        partitions = {self.linears[modules[index]].partition for index in served}
        if len(partitions) > 1:
            raise MMLoRAError(f"linears {modules} share an input but sit in partitions {sorted(partitions)}")
        if not served:
            return [], None, [], [], [], None
        buffers = [self.manager.buffers[modules[index]] for index in served]
        table = self.tables[partitions.pop()]
        split = None
        if any(b.local_ranks is not None for b in buffers):
            meshes: dict[int, tuple[list[int], list[torch.Tensor], object]] = {}
            for position, b in enumerate(buffers):
                if b.local_ranks is not None:
                    mesh = self.layouts[b.module].mesh
                    group = meshes.setdefault(id(mesh), ([], [], mesh))
                    group[0].append(position)
                    group[1].append(b.local_ranks)
            split = ([position for position, b in enumerate(buffers) if b.local_ranks is None], list(meshes.values()))
        return (served, table, [b.lora_a for b in buffers], [b.lora_b for b in buffers],
                [b.ranks for b in buffers], split)

    # ------------------------------------------------------------------ outside the graphs
    @contextlib.contextmanager
    def call_scope(self) -> Iterator[None]:
        """The scope of one served call (`MultiLoRAModel.__call__`, `generate`, `eager`).

        Only inside it do the forward hooks add LoRA to linears that run outside the compiled
        graphs. Outside it the model's uncompiled code is the base model again, whatever batch
        the tables were last filled for: a later plain call of the model (by other code, say
        PEFT wrapping the same module, or after compilation is undone) must not pick up a past
        batch's adapters. Inside it, weights this model shares with another compiled one resolve
        to this runtime (`lora_op.WeightRegistry.serving`).
        """
        _never_compile_the_hook()
        self._call_depth += 1
        try:
            with REGISTRY.serving(self):
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
                module.register_forward_hook(_eager_lora_hook, with_kwargs=True)
                module._mmlora_hooked = True
        # Expert matmuls are no modules: their MoE blocks are watched instead (`expert_hooks.py`).
        add_expert_hooks(self, self.model, {name: self.linears.weights[name] for name in self.manager.buffers
                                            if self.linears[name].kind == EXPERTS})
        # Bare parameters have no forward of their own: their holders watch their matmuls.
        add_parameter_hooks(self.model, {name: weight for name, weight in self.linears.of_kind(PARAMETER).items()
                                         if name in self.manager.buffers})


def _never_compile_the_hook() -> None:
    # The hook and everything it calls (the runtime, the reference kernels) run without dynamo
    # when the hook runs as a frame of its own; inlined into a traced module call it still traces.
    # Cheap, and renewed on every call scope: `torch._dynamo.reset()` may clear code states.
    from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy

    set_code_exec_strategy(_eager_lora_hook.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    _never_compile_parameter_hooks()


def _eager_lora_hook(module, args, kwargs, output):
    if not torch.compiler.is_compiling():
        x = args[0] if args else kwargs.get("input")  # `linear(input=x)` is a call too
        if isinstance(module, nn.Embedding):
            runtime, name = REGISTRY.resolve(module.weight, EMBEDDING)
            if runtime.in_call:
                runtime.apply_embedding(output, x, name, _embedding_output_scale(module))
        elif isinstance(module, nn.modules.conv._ConvNd):
            runtime, name = REGISTRY.resolve(module.weight, CONV)
            if runtime.in_call:
                runtime.apply_conv(output, x, name)
        else:
            runtime, name = REGISTRY.resolve(module.weight)
            if runtime.in_call:
                runtime.apply_after_module(output, x, name)
    return output


def _embedding_output_scale(module: nn.Embedding) -> torch.Tensor | None:
    """The factor an embedding's forward multiplies its lookup by (Gemma3's scaled embeddings keep
    it as `embed_scale`, which PEFT applies to its delta too), or None. The graph path needs none:
    its op adds the delta to the lookup itself, before the forward scales it."""
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)):
        return torch.tensor(float(scale), device=module.weight.device)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None
