"""Adapters by name: a CPU cache and a fixed number of GPU slots, both LRU, with pinning and prefetch.

Every served linear owns stacked slot buffers, allocated once, whose addresses never change
(CUDA graphs replay them): `lora_a [max_loras, max_lora_rank, in]`, `lora_b [max_loras, out,
max_lora_rank]` with the scaling folded in, and `ranks [max_loras]` (0 where the adapter in that
slot does not adapt the linear). Smaller ranks are padded with zeros. Loading an adapter into a
slot writes that slot only. On a tensor-parallel model `in` and `out` are this rank's
(`sharding.TargetLayout`: B's output rows of a column-parallel linear, A's input columns of a
row-parallel one): adapters are validated against the global shapes, alike on every rank, and
each rank packs its slice from the same file, with no communication. Where a column-parallel
target's A is split along the rank (`tp_lora_a="sharded"`) its `lora_a` is `[max_loras,
max_lora_rank / ranks, in]`, this rank's rows of each slot's zero-padded A, and `local_ranks`
says how many of them each slot's adapter has (the shrink's ranks; `ranks` stay the expand's).

The buffers of one dtype are views of one slot-major slab `[max_loras, total]` (`_Slab`): each
linear's A and B take their elements of a slot's row, in module order, A before B, so slot `s`
of every linear is the contiguous row `slab[s]` and a buffer's slot stride is `total`, not its
own slot's size (the kernels take the strides they are given). The ranks of all linears are the
rows of one `[linears, max_loras]` int32 table (each linear's `ranks` contiguous).

Adapters are known by name (`register`/`load`), cached on the CPU up to `max_cpu_loras`, and
resident in at most `max_loras` GPU slots. A CPU-cache entry is a slab row already (in memory
pinned when the slots are on a GPU), one per dtype: the buffer its file was read into, B scaled
in place, when the file's data is that row already (every served linear adapted at rank
`max_lora_rank` in the buffers' dtype, in the slab's order, nothing else in it: no copy at
all), else one flat `[total]` buffer per dtype holding each linear's A and B padded to
`max_lora_rank` (zeros for linears it does not adapt). A slot write is one copy per dtype (one
per adapter: `slab[s].copy_(row)`) and, where the slot's ranks change, one copy of the ranks
column, queued on a side stream with an event the step's stream waits on. Evicted adapters are read again from
their directory when a batch needs them. Pinned adapters are never evicted from either.

`prefetch(names)` announces the adapters of the next steps: it reads what is not cached (on
`prefetch_workers` background threads when the slots are on a GPU, several files at once) and
copies them into slots no pending batch uses, so that the step that needs them finds them resident.

Every operation validates first and changes state only once nothing can fail: after an error,
the manager and every loaded adapter are exactly as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import (
    AdapterChangedError,
    AdapterError,
    AdapterFileError,
    AdapterFolderError,
    AdapterTargetError,
    DuplicateAdapterError,
    OptionError,
    PinnedAdapterError,
    TooManyAdaptersError,
    UnknownAdapterError,
)
from .linear_index import LinearIndex
from .peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterFactors, LoRAFactors, fold_into, read_adapter, read_factors
from .serving import ServingPlan
from .sharding import TargetLayout

__all__ = ["SlotBuffers", "AdapterManager", "AdapterStats", "BASE_NAMES"]

# PEFT's convention for "no adapter" in a mixed batch, plus None.
BASE_NAMES = (None, "__base__")


_ALIGN = 64  # elements


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


@dataclasses.dataclass
class SlotBuffers:
    """The stacked slot buffers of one served linear (or 3D expert weight: one pair per expert)."""

    module: str
    lora_a: torch.Tensor  # [max_loras, max_lora_rank, in_features]; experts: [max_loras, experts, R, in]
    lora_b: torch.Tensor  # [max_loras, out_features, max_lora_rank]; experts: [max_loras, experts, out, R]
    ranks: torch.Tensor  # int32 [max_loras]
    # int32 [max_loras]: where A is split along the rank, how many of this rank's rows of A each
    # slot's adapter has (`TargetLayout.local_rank`); None where A is whole.
    local_ranks: torch.Tensor | None = None

    def delta(self, slot: int) -> torch.Tensor:
        """`scaling * B @ A` of the adapter in `slot`, as a [out, in] matrix ([experts, out, in] for experts)."""
        if self.local_ranks is not None:
            raise ValueError(f"{self.module}'s A is split along the rank: this rank holds a part of no delta")
        rank = int(self.ranks[slot])
        return self.lora_b[slot, ..., :rank].float() @ self.lora_a[slot, ..., :rank, :].float()


@dataclasses.dataclass
class _Entry:
    """A known adapter: where it lives, and what of it was dropped by deployment restrictions."""

    path: Path
    dropped: tuple[str, ...] = ()


@dataclasses.dataclass
class _Slab:
    """The slot buffers of one dtype: `data [max_loras, total]`, slot `s` of every linear of that
    dtype being a part of the row `data[s]`; `regions[module]` = (A's offset, A's elements, B's
    offset, B's elements) in a row."""

    data: torch.Tensor
    regions: dict[str, tuple[int, int, int, int]]

    @property
    def total(self) -> int:
        return self.data.shape[1]


@dataclasses.dataclass
class _Packed:
    """An adapter in the slot layout, as the CPU cache keeps it: `rows`, per slab, the contents of
    one slot's row (`[total]`, a view of `flats`, None where it adapts no linear of that slab:
    the slot's row is zeroed), `flats` the host memory they view (one buffer per dtype, or the
    bytes of the file it was read from; pinned when the slots are on a GPU), and `ranks`, per
    rank table, each linear's rank in its order (`rank_columns`: the same as int32 tensors,
    pinned with the rows)."""

    flats: list[torch.Tensor]
    rows: list[torch.Tensor | None]
    ranks: tuple[tuple[int, ...], ...]
    rank_columns: list[torch.Tensor]
    dropped: tuple[str, ...]

    def nbytes(self) -> int:
        return sum(flat.nbytes for flat in self.flats)


@dataclasses.dataclass
class AdapterStats:
    """What the adapter tiers did since the manager was made (`mm.stats()` gives a copy).

    GPU: a batch's adapter found in a slot is a hit, one written into a slot a miss (a slot write,
    `slot_writes` and their host seconds: on a GPU the copies are queued, not waited for;
    `slot_copies` the host-to-device copies they made: one per slab an adapter adapts, one more
    where the slot's ranks change); a
    resident adapter pushed out of its slot is a GPU eviction. CPU: a miss's adapter found in the
    CPU cache is a hit, one read again from its directory a miss; disk reads (loads, reloads,
    misses and prefetches) count with their seconds (each read's own: background reads overlap,
    so `disk_read_s` may exceed the time they took together); an adapter pushed out of the CPU cache is a
    CPU eviction. Prefetch: `prefetched` names announced, `prefetch_hits` a batch's adapters
    found in the slot a prefetch wrote, `prefetch_deferred` announced adapters that found no slot
    to take (every slot held by the pending batch, pinned or announced; their copy is made when
    their batch comes), `prefetch_waits` batches that waited for a background read they
    needed, `prefetch_failures` background reads that failed (their error is raised at the next
    call naming the adapter)."""

    gpu_hits: int = 0
    gpu_misses: int = 0
    gpu_evictions: int = 0
    cpu_hits: int = 0
    cpu_misses: int = 0
    cpu_evictions: int = 0
    disk_reads: int = 0
    disk_read_s: float = 0.0
    slot_writes: int = 0
    slot_write_s: float = 0.0
    slot_copies: int = 0
    reloads: int = 0
    prefetched: int = 0
    prefetch_hits: int = 0
    prefetch_deferred: int = 0
    prefetch_waits: int = 0
    prefetch_failures: int = 0


def _typed(name: str, error: BaseException) -> AdapterError:
    """A background read's failure as the adapter's typed error (out of memory while pinning, say)."""
    if isinstance(error, AdapterError):
        return error
    typed = AdapterFileError(name, f"reading it in the background failed: {type(error).__name__}: {error}")
    typed.__cause__ = error
    return typed


def _coalesced(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors (of one buffer) as few views as cover them exactly: contiguous tensors of equal
    dtype and size whose offsets step evenly (the same linear in every layer of a file) become
    one strided `[count, numel]` view each (`_chains`); any other tensor stays on its own."""
    views: list[torch.Tensor] = []
    keyed: dict[tuple, dict[int, torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_contiguous() and tensor.numel():
            key = (tensor.dtype, tensor.numel(), tensor.untyped_storage().data_ptr())
            keyed.setdefault(key, {})[tensor.storage_offset()] = tensor
        else:
            views.append(tensor)
    for (_, numel, _), by_offset in keyed.items():
        for first, count, step in _chains(tuple(sorted(by_offset)), numel):
            tensor = by_offset[first]
            views.append(tensor if count == 1 else tensor.as_strided((count, numel), (step, 1), first))
    return views


@functools.lru_cache(maxsize=256)  # adapters of one model and rank share their files' layout
def _chains(offsets: tuple[int, ...], numel: int, candidates: int = 64) -> tuple[tuple[int, int, int], ...]:
    """Sorted, non-overlapping `offsets` of `numel`-element tensors as evenly stepped chains
    `(first, count, step)`, found greedily: from the first offset left, the step to one of the next
    `candidates` that makes the longest chain."""
    chains = []
    left = list(offsets)
    while left:
        first, remaining = left[0], set(left)
        best = [first]
        for other in left[1:candidates + 1]:
            step = other - first
            chain = [first]
            while step >= numel and chain[-1] + step in remaining:
                chain.append(chain[-1] + step)
            if len(chain) > len(best):
                best = chain
        chains.append((first, len(best), best[1] - best[0] if len(best) > 1 else 0))
        taken = set(best)
        left = [offset for offset in left if offset not in taken]
    return tuple(chains)


def default_prefetch_workers() -> int:
    """Background reads at once by default: a step whose new adapters come from disk then waits
    for them together, not one after another; no more than the cores (each read keeps a second
    thread busy too, `buffered_read`), nor 4 (each read under way holds an adapter's host buffer
    until it is committed)."""
    return min(4, os.cpu_count() or 1)


def _fingerprint(path: Path) -> tuple:
    """What says an adapter's files are the ones read: each file's size, mtime and inode."""
    found = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            stat = os.stat(path / name)
        except OSError:
            found.append(None)
        else:
            found.append((stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(found)


class AdapterManager:
    def __init__(
        self,
        linears: LinearIndex,
        serving: ServingPlan,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        device: torch.device | str | None = None,
        background_reads: bool | None = None,
        layouts: Mapping[str, TargetLayout] | None = None,
        prefetch_workers: int | None = None,
    ):
        """`background_reads`: prefetch reads adapter files on worker threads (by default when
        the slots are on a GPU; on the CPU prefetch reads in the caller's thread). `layouts`: each
        served target's tensor-parallel layout (`sharding.target_layouts`; default: all replicated).
        `prefetch_workers`: how many of those threads, each reading one adapter at a time
        (default `default_prefetch_workers()`: min(4, cores))."""
        if max_loras < 1:
            raise OptionError(f"max_loras must be at least 1, not {max_loras}")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_cpu_loras < max_loras:
            raise OptionError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
        if max_lora_rank < 1:
            raise OptionError(f"max_lora_rank must be at least 1, not {max_lora_rank}")
        self.linears = linears
        self.serving = serving
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.buffers: dict[str, SlotBuffers] = {}
        self.layouts = {module: (layouts or {}).get(module, TargetLayout()) for module in serving.served}
        # Each served linear's slot shapes, by dtype and device, in module order: the order of a
        # slab row (and of a PEFT file's tensors, sorted by name: `A` before `B` of each module).
        shapes: dict[tuple[torch.dtype, torch.device], list[tuple[str, tuple, tuple]]] = {}
        for module in sorted(serving.served):
            info = linears[module]
            weight = linears.weights[module]
            target = torch.device(device) if device is not None else weight.device
            # A 3D expert weight's buffers hold each expert's factors: [max_loras, experts, ...].
            experts = (info.num_experts,) if info.num_experts else ()
            # This rank's part of a sharded target (`TargetLayout.local_factors` of a global-shaped pair).
            a_global = torch.empty((*experts, max_lora_rank, info.in_features), device="meta")
            b_global = torch.empty((*experts, info.out_features, max_lora_rank), device="meta")
            a_local, b_local = self.layouts[module].local_factors(a_global, b_global)
            shapes.setdefault((weight.dtype, target), []).append((module, tuple(a_local.shape), tuple(b_local.shape)))
        modules = sorted(serving.served)
        # Every linear's ranks: one row of a [rows, max_loras] int32 table per device
        # (contiguous, as the kernels read them); a slot's ranks are a column, written with one copy.
        # After the linears' rows, one more per linear whose A is split along the rank: its local ranks.
        devices = {}
        for (_, target), members in shapes.items():
            devices.setdefault(target, []).extend(module for module, _, _ in members)
        self._rank_tables: list[tuple[torch.Tensor, list[str]]] = []
        self._rank_of: dict[str, tuple[int, int]] = {}  # module -> (table, row)
        self._local_rank_of: dict[str, tuple[int, int]] = {}  # module -> (table, row), A split along the rank
        for target, members in devices.items():
            members = sorted(members)
            split = [module for module in members if self.layouts[module].lora_a_rows is not None]
            table = len(self._rank_tables)
            self._rank_tables.append((torch.zeros(len(members) + len(split), max_loras, dtype=torch.int32,
                                                  device=target), members))
            for row, module in enumerate(members):
                self._rank_of[module] = (table, row)
            for row, module in enumerate(split, start=len(members)):
                self._local_rank_of[module] = (table, row)
        self._slabs: list[_Slab] = []
        views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for (dtype, target), members in shapes.items():
            regions, total = {}, 0
            for module, a_shape, b_shape in members:
                a_size, b_size = math.prod(a_shape), math.prod(b_shape)
                # Every factor starts on a multiple of _ALIGN elements (and so does every slot), as
                # separate allocations did: Triton specialises on 16-byte alignment for vector loads.
                b_offset = _aligned(total + a_size)
                regions[module] = (total, a_size, b_offset, b_size)
                total = _aligned(b_offset + b_size)
            data = torch.zeros(max_loras, total, dtype=dtype, device=target)
            self._slabs.append(_Slab(data, regions))
            for module, a_shape, b_shape in members:
                a_offset, a_size, b_offset, b_size = regions[module]
                # Slot stride `total`; within a slot each factor is contiguous.
                views[module] = (data[:, a_offset:a_offset + a_size].view(max_loras, *a_shape),
                                 data[:, b_offset:b_offset + b_size].view(max_loras, *b_shape))
        for module in modules:
            table, row = self._rank_of[module]
            local = self._local_rank_of.get(module)
            self.buffers[module] = SlotBuffers(module=module, lora_a=views[module][0], lora_b=views[module][1],
                                               ranks=self._rank_tables[table][0][row],
                                               local_ranks=self._rank_tables[local[0]][0][local[1]] if local else None)
        self._known: dict[str, _Entry] = {}
        self._cpu: OrderedDict[str, _Packed] = OrderedDict()  # least recently used first
        self._slots: list[str | None] = [None] * max_loras
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._pinned: set[str] = set()
        # Each slot's ranks (the rank table's column) as last written: a write copies them only
        # where they differ.
        self._slot_ranks: list[tuple[tuple[int, ...], ...]] = [
            tuple((0,) * len(table) for table, _ in self._rank_tables)] * max_loras
        on_gpu = any(buffers.lora_a.is_cuda for buffers in self.buffers.values())
        self._pin = on_gpu
        # Slot writes from activate and prefetch go on a side stream. Per slot, `_ready` is the
        # event of its last side-stream write (a step's stream waits on it before reading the
        # slot) and `_free` an event after which no queued step reads it any more (a write waits
        # on it). `_in_flight` holds the slots of the last batch made resident: its step may still
        # be queued, and until the next batch stamps them with `_free`, nothing writes them.
        self._stream = torch.cuda.Stream(next(iter(self.buffers.values())).lora_a.device) if on_gpu else None
        self._ready: list[torch.cuda.Event | None] = [None] * max_loras
        self._free: list[torch.cuda.Event | None] = [None] * max_loras
        self._in_flight: set[int] = set()
        # Prefetch: names announced for coming batches (kept out of other prefetches' way), reads
        # under way on the workers (with the entry they read for: a name unloaded or reloaded
        # meanwhile makes the result stale), and background errors kept for the next call
        # naming the adapter. A worker only reads files and builds a `_Packed`, touching nothing
        # of the manager; every change to its state (counters included) is made by the caller's
        # thread when it commits a finished read, so no lock is needed, however many workers.
        self._background = on_gpu if background_reads is None else background_reads
        self._executor: ThreadPoolExecutor | None = None
        self._retired_executors: list[ThreadPoolExecutor] = []  # replaced by a new worker count, maybe still reading
        self.prefetch_workers = default_prefetch_workers() if prefetch_workers is None else prefetch_workers
        self._announced: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[str, tuple[_Entry, Future]] = {}
        self._failed: dict[str, AdapterError] = {}
        self._prefetched: set[str] = set()  # written into a slot by prefetch, not yet used by a batch
        self.stats = AdapterStats()
        # Called with a slot's index after every write or clear of it, on the stream that wrote it
        # (the runtime's fold buffers mirror each slot's A and B: `folding.FoldedWeights.mirror`).
        self.slot_listeners: list[Callable[[int], None]] = []

    @property
    def prefetch_workers(self) -> int:
        """How many adapter files background prefetch reads at once."""
        return self._prefetch_workers

    @prefetch_workers.setter
    def prefetch_workers(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise OptionError(f"prefetch_workers must be a positive int, not {count!r}")
        self._prefetch_workers = count
        if self._executor is not None:
            # Reads already submitted finish on the old threads (their futures stay pending here,
            # committed as usual); new ones go to a pool of the new size. `close` waits for both.
            self._executor.shutdown(wait=False)
            self._retired_executors.append(self._executor)
            self._executor = None

    # ------------------------------------------------------------------ what is known
    @property
    def names(self) -> list[str]:
        return list(self._known)

    @property
    def pinned(self) -> set[str]:
        return set(self._pinned)

    @property
    def cpu_cached(self) -> list[str]:
        """Names in the CPU cache, least recently used first."""
        return list(self._cpu)

    @property
    def resident(self) -> dict[str, int]:
        """Adapters in GPU slots (name -> slot), least recently used first."""
        return dict(self._resident)

    @property
    def announced(self) -> list[str]:
        """Names announced by `prefetch` and not yet used by a batch."""
        return list(self._announced)

    def cpu_cache_bytes(self) -> int:
        """Host bytes the CPU cache holds (padded to `max_lora_rank`)."""
        return sum(packed.nbytes() for packed in self._cpu.values())

    def dropped_modules(self, name: str) -> tuple[str, ...]:
        return self._entry(name).dropped

    def _entry(self, name: str) -> _Entry:
        if name not in self._known:
            known = ", ".join(self._known) or "none"
            raise UnknownAdapterError(name, f"is not loaded (loaded: {known})")
        return self._known[name]

    # ------------------------------------------------------------------ reading
    def _read(self, name: str, path) -> _Packed:
        packed, seconds = self._read_packed(name, Path(path))
        self._count_read(seconds)
        return packed

    def _count_read(self, seconds: float) -> None:
        self.stats.disk_reads += 1
        self.stats.disk_read_s += seconds

    def _read_packed(self, name: str, path: Path) -> tuple[_Packed, float]:
        """Read, validate and pack the adapter at `path`; (packed, seconds). Touches no state of
        the manager: the worker thread runs it."""
        began = time.perf_counter()
        before = _fingerprint(path)
        try:
            adapter, dropped = self._read_validated(name, path)
        except AdapterError as error:
            # A file half written when read is corrupt: say why, when it changed meanwhile.
            if _fingerprint(path) != before:
                raise self._changed(name, path, before) from error
            raise
        if _fingerprint(path) != before:
            # A file replaced or rewritten while read: the tensors may mix two versions.
            raise self._changed(name, path, before)
        packed = self._pack(adapter, dropped)
        return packed, time.perf_counter() - began

    @staticmethod
    def _changed(name: str, path: Path, before: tuple) -> AdapterChangedError:
        return AdapterChangedError(
            name, f"{str(path)!r} changed on disk while it was being read ({CONFIG_FILE}, {WEIGHTS_FILE}: size, "
                  f"mtime, inode {before} before, {_fingerprint(path)} after); nothing of it was kept: load it "
                  "again once it is written completely (write a new directory and rename it, to replace atomically)")

    def _read_validated(self, name: str, path):
        dtypes = {buffers.lora_a.dtype for buffers in self.buffers.values()}
        if len(dtypes) == 1:
            # Factors as the file holds them, converted once, straight into the slot layout.
            adapter = read_factors(name, path, self.linears, max_rank=self.max_lora_rank, dtype=next(iter(dtypes)),
                                   pin=self._pin)
        else:  # buffers of several dtypes: float32 matrices, each cast to its buffers' dtype by `_pack`
            adapter = read_adapter(name, path, self.linears, max_rank=self.max_lora_rank)
        unserved = sorted(module for module in adapter.modules if not self.serving.serves(module))
        if unserved and not self.serving.explicit:
            raise AdapterTargetError(
                name,
                f"targets {len(unserved)} linear(s) this compiled model does not serve "
                f"(it serves partitions {list(self.serving.partitions)} and module suffixes "
                f"{list(self.serving.target_modules)}, taken from the adapters given to compile); pass "
                "partitions=/target_modules= to compile to serve them, or to drop them explicitly",
                module=unserved[0],
            )
        for module in unserved:
            del adapter.modules[module]
        return adapter, tuple(unserved)

    def _in_place(self, adapter) -> list[torch.Tensor | None] | None:
        """The slab rows of the file's buffer, when it already is the slot layout: every tensor in
        it is a served factor of the buffers' dtype, shape (rank `max_lora_rank`: no padding) and
        contiguous, and the factors of each slab's linears lie in it as in a slab row (every
        linear of the slab, in its order, nothing between them); None otherwise."""
        if not isinstance(adapter, AdapterFactors) or adapter.buffer is None:
            return None
        if any(self.layouts[module].sharded for module in adapter.modules):
            return None  # this rank's slice of a sharded target is not the file's tensor
        used = 0
        for module, factors in adapter.modules.items():
            buffers = self.buffers[module]
            for tensor, slot in ((factors.lora_a, buffers.lora_a), (factors.lora_b, buffers.lora_b)):
                if tensor.dtype != slot.dtype or tensor.shape != slot.shape[1:] or not tensor.is_contiguous():
                    return None
                used += tensor.nbytes
        # Base-weight copies or dropped modules would be kept for nothing.
        if used != adapter.tensor_bytes:
            return None
        rows: list[torch.Tensor | None] = []
        for slab in self._slabs:
            adapted = [module for module in slab.regions if module in adapter.modules]
            if not adapted:
                rows.append(None)
                continue
            if len(adapted) != len(slab.regions):
                return None  # a slot row needs the zeros of the linears it does not adapt
            first = adapter.modules[adapted[0]].lora_a
            size = first.element_size()
            start = first.data_ptr() - slab.regions[adapted[0]][0] * size
            for module in adapted:
                a_offset, _, b_offset, _ = slab.regions[module]
                factors = adapter.modules[module]
                if (factors.lora_a.data_ptr() != start + a_offset * size
                        or factors.lora_b.data_ptr() != start + b_offset * size):
                    return None
            offset = first.storage_offset() - slab.regions[adapted[0]][0]
            last_a, _, last_b, last_b_size = list(slab.regions.values())[-1]
            # A row ending in alignment padding would read past the file's last factor.
            if offset < 0 or last_b + last_b_size != slab.total:
                return None
            rows.append(first.as_strided((slab.total,), (1,), offset))
        return rows

    def _rank_columns(self, adapter) -> tuple[tuple[tuple[int, ...], ...], list[torch.Tensor]]:
        """Each rank table's column for `adapter` (0 for the linears it does not adapt), as ints and
        as int32 tensors (pinned for a GPU)."""
        ranks = [[0] * len(table) for table, _ in self._rank_tables]
        for module, weights in adapter.modules.items():
            table, row = self._rank_of[module]
            ranks[table][row] = weights.rank
            if module in self._local_rank_of:
                table, row = self._local_rank_of[module]
                ranks[table][row] = self.layouts[module].local_rank(weights.rank)
        columns = []
        for column in ranks:
            tensor = torch.empty(len(column), dtype=torch.int32, pin_memory=self._pin)
            tensor.copy_(torch.tensor(column, dtype=torch.int32))
            columns.append(tensor)
        return tuple(tuple(column) for column in ranks), columns

    def _pack(self, adapter, dropped: tuple[str, ...]) -> _Packed:
        """The adapter as slab rows (pinned for a GPU): the buffer its file was read into, its B
        matrices scaled in place, when that is the layout already (`_in_place`); otherwise one
        flat `[total]` buffer per slab it adapts, each linear's A and B padded to
        `max_lora_rank`, zeros for the linears it does not adapt."""
        ranks, rank_columns = self._rank_columns(adapter)
        rows = self._in_place(adapter)
        if rows is not None:
            by_scaling: dict[float, list[torch.Tensor]] = {}
            for factors in adapter.modules.values():
                by_scaling.setdefault(factors.scaling, []).append(factors.lora_b)
            # A few large ops, not one per linear: each costs a parallel region, which on a busy
            # host waits for every OpenMP thread to be scheduled.
            for scaling, matrices in by_scaling.items():
                if scaling != 1.0:  # times 1 changes nothing, rounded to any dtype
                    for run in _coalesced(matrices):
                        fold_into(run, run, scaling)
            return _Packed([adapter.buffer], rows, ranks, rank_columns, dropped)
        rows = []
        for slab in self._slabs:
            adapted = [module for module in slab.regions if module in adapter.modules]
            if not adapted:
                rows.append(None)
                continue
            flat = torch.empty(slab.total, dtype=slab.data.dtype, pin_memory=self._pin)
            # Zeros where no factor goes: the linears of this slab it does not adapt, and the
            # alignment padding after each factor.
            end = 0
            for module, (a_offset, a_size, b_offset, b_size) in slab.regions.items():
                if module not in adapter.modules:
                    continue
                for start, size in ((a_offset, a_size), (b_offset, b_size)):
                    if start > end:
                        flat[end:start].zero_()
                    end = start + size
            if end < slab.total:
                flat[end:].zero_()
            for module in adapted:
                buffers, weights = self.buffers[module], adapter.modules[module]
                a_offset, a_size, b_offset, b_size = slab.regions[module]
                a = flat[a_offset:a_offset + a_size].view(buffers.lora_a.shape[1:])
                b = flat[b_offset:b_offset + b_size].view(buffers.lora_b.shape[1:])
                rank = weights.rank
                # This rank's slice of a sharded target's factors (the whole of the others').
                lora_a, lora_b = self.layouts[module].local_factors(weights.lora_a, weights.lora_b)
                # `[..., rank, in]` and `[..., out, rank]`: a linear's, or each expert's of a 3D weight.
                # A split along the rank has fewer rows here (`TargetLayout.local_rank`), maybe none.
                a_rank = lora_a.shape[-2]
                a[..., :a_rank, :].copy_(lora_a)
                a[..., a_rank:, :].zero_()
                if isinstance(weights, LoRAFactors):
                    fold_into(b[..., :rank], lora_b, weights.scaling)
                else:  # read_adapter's: scaled already
                    b[..., :rank].copy_(lora_b)
                b[..., rank:].zero_()
            rows.append(flat)
        return _Packed([row for row in rows if row is not None], rows, ranks, rank_columns, dropped)

    # ------------------------------------------------------------------ loading
    def load(self, name: str, path, pin: bool = False) -> None:
        """Read, validate and cache the adapter at `path` under `name`; `pin` keeps it resident."""
        if not isinstance(name, str) or not name or name in BASE_NAMES:
            raise DuplicateAdapterError(str(name), "is reserved for the base model or empty; choose another name")
        if name in self._known:
            raise DuplicateAdapterError(name, f"is already loaded (from {self._known[name].path})")
        if pin and len(self._pinned) + 1 > min(self.max_loras, self.max_cpu_loras):
            raise PinnedAdapterError(
                name, f"cannot be pinned: {len(self._pinned)} adapters are pinned and max_loras is {self.max_loras}"
            )
        packed = self._read(name, path)
        # Nothing below can fail: commit.
        self._known[name] = _Entry(Path(path), packed.dropped)
        self._cache(name, packed)
        if pin:
            self._pinned.add(name)
            self.activate([name])

    def load_many(self, adapters: Mapping[str, object], pin: Iterable[str] = ()) -> None:
        """Load several adapters, with a progress bar when there are many."""
        pin = set(pin)
        items = list(adapters.items())
        for name, path in tqdm(items, desc="loading adapters", unit="adapter", disable=len(items) < 4 or None):
            self.load(name, path, pin=name in pin)

    def load_folder(self, folder) -> list[str]:
        """Load every adapter directory in `folder` (one holding `adapter_config.json`), each under
        its directory's name, with a progress bar; return the names loaded, in name order.

        A bad adapter does not stop the others: they are loaded, and then `AdapterFolderError`
        names each one that failed with its own typed error. Names already loaded are refused
        there too (use `reload` for new weights under a loaded name)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterFileError(None, f"{str(folder)!r} is not a directory of adapters")
        found = sorted(path for path in folder.iterdir() if (path / "adapter_config.json").is_file())
        loaded, failed = [], {}
        for path in tqdm(found, desc="loading adapters", unit="adapter", disable=len(found) < 4 or None):
            try:
                self.load(path.name, path)
            except AdapterError as error:
                failed[path.name] = error
            else:
                loaded.append(path.name)
        if failed:
            raise AdapterFolderError(folder, failed, loaded)
        return loaded

    def reload(self, name: str, path=None) -> None:
        """New weights under a loaded name, from `path` (by default its own directory, read again).

        Validated first: a bad file leaves the old weights everywhere. Then every tier holds the
        new ones: the CPU cache, and the GPU slot if resident (rewritten in place, after the
        queued steps that read it, so the next forward serves them, CUDA-graph replays
        included); an evicted adapter is read from the new path when a batch needs it."""
        entry = self._entry(name)
        path = entry.path if path is None else Path(path)
        packed = self._read(name, path)
        # Nothing below can fail: commit. A read of the old weights under way is stale now.
        self._known[name] = _Entry(path, packed.dropped)
        self._forget_reads(name)
        self.stats.reloads += 1
        self._cache(name, packed)
        slot = self._resident.get(name)
        if slot is not None:
            self._write_slot(slot, packed, in_order=True)

    def _cache(self, name: str, packed: _Packed) -> None:
        self._cpu[name] = packed
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            # Announced adapters go last: evicting one would mean reading it again for its batch.
            candidates = [n for n in self._cpu if n not in self._pinned and n != name]
            victim = next((n for n in candidates if n not in self._announced), None) or next(iter(candidates), None)
            if victim is None:
                break
            del self._cpu[victim]
            self.stats.cpu_evictions += 1

    def unload(self, name: str) -> None:
        """Forget `name`: its CPU entry, its GPU slot (zeroed), its pin, its announcement."""
        self._entry(name)
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._slots[slot] = None
            self._clear_slot(slot)
        self._cpu.pop(name, None)
        self._pinned.discard(name)
        self._forget_reads(name)
        self._announced.pop(name, None)
        self._prefetched.discard(name)
        del self._known[name]

    def _forget_reads(self, name: str) -> None:
        """Drop a background read of `name` and a kept error: they were for another version."""
        pending = self._pending.pop(name, None)
        if pending is not None:
            pending[1].cancel()  # a read already running finishes; its result is then discarded
        self._failed.pop(name, None)

    def pin(self, name: str) -> None:
        self._entry(name)
        if name in self._pinned:
            return
        if len(self._pinned) + 1 > min(self.max_loras, self.max_cpu_loras):
            raise PinnedAdapterError(
                name, f"cannot be pinned: {len(self._pinned)} adapters are pinned and max_loras is {self.max_loras}"
            )
        self.activate([name])
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._entry(name)
        self._pinned.discard(name)

    def close(self) -> None:
        """Stop the worker threads (reads under way finish first, on former pools too)."""
        for executor in self._retired_executors + ([self._executor] if self._executor is not None else []):
            executor.shutdown(wait=True)
        self._retired_executors = []
        self._executor = None

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, names: Iterable[str | None]) -> None:
        """Announce the adapters the next batches need, so that those batches do not wait for them.

        Each name is read from its directory when not in the CPU cache (on worker threads when
        reads are in the background, `prefetch_workers` files at once: this call then returns at
        once) and copied into a GPU slot that no pending batch reads and that holds no pinned or
        announced adapter (on the side stream). With no such slot the copy is made when its batch comes (`prefetch_deferred`).
        An unknown name raises `UnknownAdapterError` before anything changes; a read that failed
        in the background raises its error at the next `prefetch` or `activate` naming it; a
        read that fails here raises at the end of this call, after the other names were served.
        Unloading an announced name drops its announcement."""
        distinct = list(dict.fromkeys(name for name in names if name not in BASE_NAMES))
        for name in distinct:
            self._entry(name)
        # Reads that finished first: a failure among them is this call's to raise, not a stale
        # error for a later call while a fresh read of the same file is under way.
        self._collect_reads()
        self._raise_kept_errors(distinct)
        for name in distinct:
            self._announced[name] = None
            self._announced.move_to_end(name)
            self.stats.prefetched += 1
        # Announcements no batch used expire, oldest first: at most one slot's worth stays held.
        while len(self._announced) > self.max_loras:
            self._announced.popitem(last=False)
        failed: list[AdapterError] = []
        for name in distinct:
            if name in self._resident:
                self._resident.move_to_end(name)
            elif name in self._cpu:
                self._prefetch_copy(name)
            elif name in self._pending:
                continue
            elif self._background:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=self._prefetch_workers,
                                                        thread_name_prefix="mmlora-prefetch")
                entry = self._known[name]
                self._pending[name] = (entry, self._executor.submit(self._read_packed, name, entry.path))
            else:
                try:
                    packed = self._read(name, self._known[name].path)
                except AdapterError as error:
                    failed.append(error)
                    continue
                self._cache(name, packed)
                self._prefetch_copy(name)
        if failed:
            raise failed[0]

    def _raise_kept_errors(self, names: Sequence[str]) -> None:
        """A background read's error, for the first of `names` that has one: raised once."""
        for name in names:
            error = self._failed.pop(name, None)
            if error is not None:
                raise error

    def _collect_reads(self) -> None:
        """Commit the background reads that finished: into the CPU cache, and into a slot when
        announced; a failure is kept for the next call naming the adapter."""
        for name, (entry, future) in list(self._pending.items()):
            if not future.done():
                continue
            del self._pending[name]
            if self._known.get(name) is not entry:
                continue  # unloaded or reloaded since: stale
            error = future.exception()
            if error is not None:
                self.stats.prefetch_failures += 1
                self._failed[name] = _typed(name, error)
                continue
            packed, seconds = future.result()
            self._count_read(seconds)
            self._cache(name, packed)
            if name in self._announced and name not in self._resident:
                self._prefetch_copy(name)

    def wait_for_reads(self) -> None:
        """Wait for the background reads under way and commit them (tests; a clean shutdown)."""
        for _, future in list(self._pending.values()):
            with contextlib.suppress(Exception):
                future.result()
        self._collect_reads()

    def _prefetch_copy(self, name: str) -> None:
        slot = self._prefetch_slot()
        if slot is None:
            self.stats.prefetch_deferred += 1
            return
        self._write_slot(slot, self._cpu[name])
        self._slots[slot] = name
        self._resident[name] = slot
        self._prefetched.add(name)

    def _prefetch_slot(self) -> int | None:
        """A slot prefetch may write: free, or the least recently used not pinned or announced;
        never one the pending batch reads."""
        for slot, name in enumerate(self._slots):
            if name is None and slot not in self._in_flight:
                return slot
        for name, slot in self._resident.items():
            if slot not in self._in_flight and name not in self._pinned and name not in self._announced:
                self._evict(name)
                return slot
        return None

    # ------------------------------------------------------------------ GPU slots
    def check_batch(self, adapter_names: Sequence[str | None]) -> list[str]:
        """The distinct adapters a batch names, after checking they can share the slots."""
        distinct = []
        for name in adapter_names:
            if name in BASE_NAMES:
                continue
            self._entry(name)
            if name not in distinct:
                distinct.append(name)
        if len(distinct) > self.max_loras:
            raise TooManyAdaptersError(
                f"the batch names {len(distinct)} distinct adapters ({', '.join(distinct)}) but there are "
                f"only max_loras={self.max_loras} GPU slots"
            )
        blocked = [n for n in self._pinned if n not in distinct]
        if len(distinct) + len(blocked) > self.max_loras:
            raise TooManyAdaptersError(
                f"the batch needs {len(distinct)} slots but {len(blocked)} of the {self.max_loras} are held by "
                f"pinned adapters ({', '.join(sorted(blocked))})"
            )
        return distinct

    def activate(self, adapter_names: Sequence[str | None]) -> list[int]:
        """Make every adapter of a batch resident; return each request's slot (-1: base model).

        On a GPU the slot writes are queued on the side stream and the current stream waits for
        those of the batch's slots: the step that follows never reads a slot still being written."""
        distinct = self.check_batch(adapter_names)
        self._raise_kept_errors(distinct)
        # Read what is missing first: a file that went bad fails here, before any state changes.
        missing = [name for name in distinct if name not in self._resident]
        fetched = self._finish_reads(missing)
        packs, read = {}, {}
        for name in missing:
            if name in self._cpu:
                packs[name] = self._cpu[name]
            elif name in fetched:
                packs[name] = fetched[name][0]
            else:
                packs[name] = read[name] = self._read(name, self._known[name].path)
        # Nothing below can fail: commit. Cache hits are touched first, so that caching the others
        # evicts adapters this batch does not need.
        for name in missing:
            if name in self._cpu:
                self._cpu.move_to_end(name)
                self.stats.cpu_hits += 1
        for name in missing:
            if name not in self._cpu:
                self.stats.cpu_misses += 1
                if name in fetched:
                    self._count_read(fetched[name][1])
                self._cache(name, packs[name])
        for name in distinct:
            if name in self._resident:
                self._resident.move_to_end(name)
        self.stats.gpu_hits += len(distinct) - len(missing)
        self.stats.gpu_misses += len(missing)
        self.stats.prefetch_hits += sum(1 for name in distinct if name in self._prefetched and name not in missing)
        self._stamp_in_flight()
        for name in missing:
            slot = self._free_slot(keep=distinct)
            self._write_slot(slot, packs[name])
            self._slots[slot] = name
            self._resident[name] = slot
        slots = [self._resident[name] for name in distinct]
        if self._stream is not None:
            current = torch.cuda.current_stream(self._stream.device)
            for slot in slots:
                if self._ready[slot] is not None:
                    current.wait_event(self._ready[slot])
                    self._ready[slot] = None
        self._in_flight = set(slots)
        for name in distinct:
            self._announced.pop(name, None)
            self._prefetched.discard(name)
        # Other reads that finished: cached, and copied for their batch into slots this one does not read.
        self._collect_reads()
        return [-1 if name in BASE_NAMES else self._resident[name] for name in adapter_names]

    def _finish_reads(self, names: Sequence[str]) -> dict[str, tuple[_Packed, float]]:
        """The background reads of `names`, waited for; the first failure raised (and dropped, so
        that the next call reads the file again). Nothing is committed here."""
        waiting = [name for name in names if name in self._pending]
        if any(not self._pending[name][1].done() for name in waiting):
            self.stats.prefetch_waits += 1
        for name in waiting:
            error = self._pending[name][1].exception()
            if error is not None:
                del self._pending[name]
                self.stats.prefetch_failures += 1
                raise _typed(name, error)
        results = {name: self._pending.pop(name)[1].result() for name in waiting}
        return results

    def _stamp_in_flight(self) -> None:
        """The last batch's slots are free to overwrite once the work queued so far is done."""
        if self._stream is not None and self._in_flight:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self._stream.device))
            for slot in self._in_flight:
                self._free[slot] = event
        self._in_flight = set()

    def _evict(self, name: str) -> None:
        slot = self._resident.pop(name)
        self._slots[slot] = None
        self._prefetched.discard(name)
        self.stats.gpu_evictions += 1

    def _free_slot(self, keep: Sequence[str]) -> int:
        for slot, name in enumerate(self._slots):
            if name is None:
                return slot
        # Least recently used first; adapters announced for a later batch only when nothing else is left.
        candidates = [name for name in self._resident if name not in keep and name not in self._pinned]
        victim = next((name for name in candidates if name not in self._announced), None) or next(iter(candidates), None)
        if victim is None:
            raise TooManyAdaptersError("no GPU slot can be freed")  # check_batch makes this unreachable
        slot = self._resident[victim]
        self._evict(victim)
        return slot

    def follow_current_stream(self) -> None:
        """Make later side-stream slot writes wait for what the current stream has queued so far
        (buffers beside the slots set up outside the manager: the runtime's fold buffers)."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))

    def _write_slot(self, slot: int, packed: _Packed, in_order: bool = False) -> None:
        """Copy `packed` into `slot`: on the side stream after the steps that read the slot, or,
        `in_order`, on the current stream (a resident adapter rewritten in place by `reload`:
        after the queued steps that read the old weights, before the next)."""
        began = time.perf_counter()
        if self._stream is None:
            self._copy_into(slot, packed)
        elif in_order:
            current = torch.cuda.current_stream(self._stream.device)
            if self._ready[slot] is not None:
                current.wait_event(self._ready[slot])
                self._ready[slot] = None
            self._copy_into(slot, packed)
            # A later side-stream write waits for this one and for the steps queued before it.
            self._free[slot] = torch.cuda.Event()
            self._free[slot].record(current)
        else:
            with torch.cuda.stream(self._stream):
                if self._free[slot] is not None:
                    self._stream.wait_event(self._free[slot])
                if self._ready[slot] is not None:
                    self._stream.wait_event(self._ready[slot])
                self._copy_into(slot, packed)
                event = torch.cuda.Event()
                event.record(self._stream)
                self._ready[slot] = event
        self.stats.slot_writes += 1
        self.stats.slot_write_s += time.perf_counter() - began

    def _copy_into(self, slot: int, packed: _Packed) -> None:
        # One copy per slab (`slab[slot]` is one contiguous row: every linear's A and B of this
        # slot) from the pinned entry, and the rank column where it changes.
        for slab, row in zip(self._slabs, packed.rows):
            if row is None:
                slab.data[slot].zero_()
            else:
                slab.data[slot].copy_(row, non_blocking=self._pin)
                self.stats.slot_copies += 1
        if self._slot_ranks[slot] != packed.ranks:
            for (table, _), column, before, after in zip(self._rank_tables, packed.rank_columns,
                                                         self._slot_ranks[slot], packed.ranks):
                if before != after:
                    table[:, slot].copy_(column, non_blocking=self._pin)
                    self.stats.slot_copies += 1
            self._slot_ranks[slot] = packed.ranks
        for listener in self.slot_listeners:
            listener(slot)

    def _clear_slot(self, slot: int) -> None:
        """Zero a slot (unload) in order on the current stream, after the steps that read it."""
        if self._stream is not None:
            current = torch.cuda.current_stream(self._stream.device)
            if self._ready[slot] is not None:
                current.wait_event(self._ready[slot])
                self._ready[slot] = None
            # Side-stream writes into this slot must wait for the zeroing too.
            event = torch.cuda.Event()
        for slab in self._slabs:
            slab.data[slot].zero_()
        for table, _ in self._rank_tables:
            table[:, slot].zero_()
        self._slot_ranks[slot] = tuple((0,) * len(table) for table, _ in self._rank_tables)
        for listener in self.slot_listeners:
            listener(slot)
        if self._stream is not None:
            event.record(torch.cuda.current_stream(self._stream.device))
            self._free[slot] = event
        self._in_flight.discard(slot)
