"""Adapters by name: a CPU cache and a fixed number of GPU slots, both LRU, with pinning.

Every served linear owns stacked slot buffers, allocated once, whose addresses never change
(CUDA graphs replay them): `lora_a [max_loras, max_lora_rank, in]`, `lora_b [max_loras, out,
max_lora_rank]` with the scaling folded in, and `ranks [max_loras]` (0 where the adapter in that
slot does not adapt the linear). Smaller ranks are padded with zeros. Loading an adapter into a
slot writes that slot only.

Adapters are known by name (`register`/`load`), cached on the CPU (validated, in the buffers'
dtype, in pinned memory when the buffers are on a GPU) up to `max_cpu_loras`, and resident in
at most `max_loras` GPU slots. Evicted adapters are read again from their directory when a batch
needs them. Pinned adapters are never evicted from either. Every operation validates first and
changes state only once nothing can fail: after an error, the manager and every loaded adapter
are exactly as before.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import (
    AdapterError,
    AdapterFileError,
    AdapterFolderError,
    AdapterTargetError,
    DuplicateAdapterError,
    PinnedAdapterError,
    TooManyAdaptersError,
    UnknownAdapterError,
)
from .linear_index import LinearIndex
from .peft_format import LoRAAdapter, read_adapter
from .serving import ServingPlan

__all__ = ["SlotBuffers", "AdapterManager", "AdapterStats", "BASE_NAMES"]

# PEFT's convention for "no adapter" in a mixed batch, plus None.
BASE_NAMES = (None, "__base__")


@dataclasses.dataclass
class SlotBuffers:
    """The stacked slot buffers of one served linear."""

    module: str
    lora_a: torch.Tensor  # [max_loras, max_lora_rank, in_features]
    lora_b: torch.Tensor  # [max_loras, out_features, max_lora_rank]
    ranks: torch.Tensor  # int32 [max_loras]

    def write(self, slot: int, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None) -> None:
        if lora_a is None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
            self.ranks[slot] = 0
            return
        rank = lora_a.shape[0]
        non_blocking = lora_a.is_pinned()
        self.lora_a[slot, :rank].copy_(lora_a, non_blocking=non_blocking)
        self.lora_a[slot, rank:].zero_()
        self.lora_b[slot, :, :rank].copy_(lora_b, non_blocking=non_blocking)
        self.lora_b[slot, :, rank:].zero_()
        self.ranks[slot] = rank

    def delta(self, slot: int) -> torch.Tensor:
        """`scaling * B @ A` of the adapter in `slot`, as a [out, in] matrix."""
        rank = int(self.ranks[slot])
        return self.lora_b[slot, :, :rank].float() @ self.lora_a[slot, :rank].float()


@dataclasses.dataclass
class _Entry:
    """A known adapter: where it lives, and what of it was dropped by deployment restrictions."""

    path: Path
    dropped: tuple[str, ...] = ()


@dataclasses.dataclass
class AdapterStats:
    """What the adapter tiers did since the manager was made (`mm.stats()` gives a copy).

    GPU: a batch's adapter found in a slot is a hit, one written into a slot a miss (a slot write,
    `slot_writes` and their host seconds: on a GPU the copies are queued, not waited for); a
    resident adapter pushed out of its slot is a GPU eviction. CPU: a miss's adapter found in the
    CPU cache is a hit, one read again from its directory a miss; disk reads (loads, reloads and
    misses) count with their seconds; an adapter pushed out of the CPU cache is a CPU eviction."""

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
    reloads: int = 0


class AdapterManager:
    def __init__(
        self,
        linears: LinearIndex,
        serving: ServingPlan,
        max_loras: int = 4,
        max_cpu_loras: int | None = None,
        max_lora_rank: int = 16,
        device: torch.device | str | None = None,
    ):
        if max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, not {max_loras}")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be at least max_loras ({max_loras})")
        if max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, not {max_lora_rank}")
        self.linears = linears
        self.serving = serving
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_lora_rank = max_lora_rank
        self.buffers: dict[str, SlotBuffers] = {}
        for module in sorted(serving.served):
            info = linears[module]
            weight = linears.weights[module]
            target = torch.device(device) if device is not None else weight.device
            self.buffers[module] = SlotBuffers(
                module=module,
                lora_a=torch.zeros(max_loras, max_lora_rank, info.in_features, dtype=weight.dtype, device=target),
                lora_b=torch.zeros(max_loras, info.out_features, max_lora_rank, dtype=weight.dtype, device=target),
                ranks=torch.zeros(max_loras, dtype=torch.int32, device=target),
            )
        self._known: dict[str, _Entry] = {}
        self._cpu: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self._slots: list[str | None] = [None] * max_loras
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._pinned: set[str] = set()
        self.stats = AdapterStats()

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

    def dropped_modules(self, name: str) -> tuple[str, ...]:
        return self._entry(name).dropped

    def _entry(self, name: str) -> _Entry:
        if name not in self._known:
            known = ", ".join(self._known) or "none"
            raise UnknownAdapterError(name, f"is not loaded (loaded: {known})")
        return self._known[name]

    # ------------------------------------------------------------------ loading
    def _read(self, name: str, path) -> tuple[LoRAAdapter, tuple[str, ...]]:
        began = time.perf_counter()
        try:
            return self._read_validated(name, path)
        finally:
            self.stats.disk_reads += 1
            self.stats.disk_read_s += time.perf_counter() - began

    def _read_validated(self, name: str, path) -> tuple[LoRAAdapter, tuple[str, ...]]:
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
        for module in adapter.modules.values():
            dtype = self.buffers[module.module].lora_a.dtype
            lora_a, lora_b = module.lora_a.to(dtype), module.lora_b.to(dtype)
            if self.buffers[module.module].lora_a.is_cuda:
                lora_a, lora_b = lora_a.pin_memory(), lora_b.pin_memory()
            adapter.modules[module.module] = dataclasses.replace(module, lora_a=lora_a, lora_b=lora_b)
        return adapter, tuple(unserved)

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
        adapter, dropped = self._read(name, path)
        # Nothing below can fail: commit.
        self._known[name] = _Entry(Path(path), dropped)
        self._cache(name, adapter)
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
        new ones: the CPU cache, and the GPU slot if resident (rewritten in place, so the next
        forward serves them, CUDA-graph replays included); an evicted adapter is read from the new
        path when a batch needs it."""
        entry = self._entry(name)
        path = entry.path if path is None else Path(path)
        adapter, dropped = self._read(name, path)
        # Nothing below can fail: commit.
        self._known[name] = _Entry(path, dropped)
        self.stats.reloads += 1
        self._cache(name, adapter)
        slot = self._resident.get(name)
        if slot is not None:
            self._write_slot(slot, adapter)

    def _cache(self, name: str, adapter: LoRAAdapter) -> None:
        self._cpu[name] = adapter
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            victim = next((n for n in self._cpu if n not in self._pinned and n != name), None)
            if victim is None:
                break
            del self._cpu[victim]
            self.stats.cpu_evictions += 1

    def _cpu_adapter(self, name: str) -> LoRAAdapter:
        if name in self._cpu:
            self._cpu.move_to_end(name)
            self.stats.cpu_hits += 1
            return self._cpu[name]
        self.stats.cpu_misses += 1
        adapter, _ = self._read(name, self._known[name].path)
        self._cache(name, adapter)
        return adapter

    def unload(self, name: str) -> None:
        """Forget `name`: its CPU entry, its GPU slot (zeroed) and its pin."""
        self._entry(name)
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._slots[slot] = None
            for buffers in self.buffers.values():
                buffers.write(slot, None, None)
        self._cpu.pop(name, None)
        self._pinned.discard(name)
        del self._known[name]

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
        """Make every adapter of a batch resident; return each request's slot (-1: base model)."""
        distinct = self.check_batch(adapter_names)
        # Read evicted adapters first: a file that went bad fails here, before any slot changes.
        missing = [name for name in distinct if name not in self._resident]
        adapters = {name: self._cpu_adapter(name) for name in missing}
        for name in distinct:
            if name in self._resident:
                self._resident.move_to_end(name)
        self.stats.gpu_hits += len(distinct) - len(missing)
        self.stats.gpu_misses += len(missing)
        for name in missing:
            slot = self._free_slot(keep=distinct)
            self._write_slot(slot, adapters[name])
            self._slots[slot] = name
            self._resident[name] = slot
        return [-1 if name in BASE_NAMES else self._resident[name] for name in adapter_names]

    def _free_slot(self, keep: Sequence[str]) -> int:
        for slot, name in enumerate(self._slots):
            if name is None:
                return slot
        for name, slot in self._resident.items():  # least recently used first
            if name not in keep and name not in self._pinned:
                del self._resident[name]
                self._slots[slot] = None
                self.stats.gpu_evictions += 1
                return slot
        raise TooManyAdaptersError("no GPU slot can be freed")  # check_batch makes this unreachable

    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        began = time.perf_counter()
        self._write_slot_buffers(slot, adapter)
        self.stats.slot_writes += 1
        self.stats.slot_write_s += time.perf_counter() - began

    def _write_slot_buffers(self, slot: int, adapter: LoRAAdapter) -> None:
        for module, buffers in self.buffers.items():
            weights = adapter.modules.get(module)
            if weights is None:
                buffers.write(slot, None, None)
            else:
                buffers.write(slot, weights.lora_a, weights.lora_b)
