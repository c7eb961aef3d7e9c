"""Loading one adapter from disk against reading its file (#22's load target: within 1.3x).

    python benchmarks/adapter_load.py                      # CPU: slots on the CPU, nothing pinned
    python benchmarks/adapter_load.py --device cuda        # slots on the GPU, pinned CPU cache
    python benchmarks/adapter_load.py --profile            # and where a load's time goes (cProfile)

One adapter of the e2e model's shape (benchmarks/e2e.py: a Qwen2-VL-7B-shaped language model, 28
layers, hidden 3584, intermediate 18944, 512 kv, rank 16 on q/k/v/o/gate/up/down, bf16: 81 MB),
written as PEFT writes it (e2e.write_adapter), and an `AdapterManager` (one slot, rank 16) over the
model built on the meta device (the manager needs only its layers' names, shapes and dtype).

Timed, alternating on the same file (so each from a warm page cache after the first), median of
`--repeats`:
- read: the file's bytes read (`read_fresh`: `f.read()` into new memory, as adapters_at_scale.py
  measures it and as a load must, since the CPU cache keeps the bytes in memory of its own;
  `read_warm_buffer`: `readinto` a buffer allocated and touched once, outside the clock: the copy
  from the page cache alone, without the page faults of new memory), and
  `safetensors.torch.load_file` (the file as tensors);
- load: `AdapterManager._read_packed` (what `load`, a CPU-cache miss and prefetch do with a file:
  read, validate, pack into the slot-layout CPU cache, pinned with `--device cuda`), and
  `read_adapter` (read, validate and convert into separate matrices: the public reader).
The ratio reported against the target is load / read_fresh. Each timed call starts from memory
handed back to the system (glibc's `malloc_trim(0)` first, where there is one): a read into new
memory then pays its page faults every time, as a load into the CPU cache of a new adapter does;
otherwise whether glibc happens to hold freed pages decides it (a fresh 81 MB read took 6 or 38
ms on the 2-core CPU). `--device cuda` pins the cache: its pinned blocks come from torch's caching
host allocator, reused across loads without page faults, so compare its load with
read_warm_buffer too.

Activation (#22's activation target: at most 5 ms per 81 MB adapter from the CPU cache), timed after
the loads, median of `--repeats` x 2: a second manager (one slot, two CPU entries) holds the adapter
under two names, and each sample is `activate([name])` of the one not resident, synchronised: a CPU
hit written into the slot, which is one copy of its pinned slab row (`slot_copies_per_activation`
says how many copies each made). Beside it, on the same entry and device: `slab_row_copy` (one
`copy_` of the row into the slot, synchronised: the floor) and `per_linear_copies` (the layout
before the slab: two copies per linear into separate contiguous buffers on a side stream, as
activation was, 25 ms on an H100 for this adapter). GB/s is the adapter's bytes over each time.
`--json PATH` writes the numbers with the versions, device and commit. The run takes ~10-20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import datetime
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # mmlora_fx, when not installed
sys.path.insert(0, str(HERE))  # e2e

import torch  # noqa: E402

import e2e  # noqa: E402
from run_record import checkout_commit, versions  # noqa: E402
from mmlora_fx.adapter_manager import AdapterManager  # noqa: E402
from mmlora_fx.linear_index import LinearIndex  # noqa: E402
from mmlora_fx.partitions import discover_partitions  # noqa: E402
from mmlora_fx.peft_format import WEIGHTS_FILE, read_adapter  # noqa: E402
from mmlora_fx.serving import ServingPlan  # noqa: E402


def make_manager(spec, device: torch.device) -> AdapterManager:
    model = e2e.build_model(spec, "meta", torch.bfloat16)
    linears = LinearIndex(model, discover_partitions(model))
    serving = ServingPlan.build(linears, partitions=["language_model"], target_modules=e2e.LM_TARGETS)
    return AdapterManager(linears, serving, max_loras=1, max_cpu_loras=1, max_lora_rank=e2e.RANK, device=device)


def activation_manager(spec, device: torch.device) -> AdapterManager:
    """One slot and two CPU entries: activating the entry not resident writes the slot."""
    model = e2e.build_model(spec, "meta", torch.bfloat16)
    linears = LinearIndex(model, discover_partitions(model))
    serving = ServingPlan.build(linears, partitions=["language_model"], target_modules=e2e.LM_TARGETS)
    return AdapterManager(linears, serving, max_loras=1, max_cpu_loras=2, max_lora_rank=e2e.RANK, device=device)


def time_activation(spec, device: torch.device, path: Path, repeats: int) -> dict:
    """Activation from the CPU cache, synchronised, against one raw row copy and the per-linear copies."""
    manager = activation_manager(spec, device)
    manager.load("a", path)
    manager.load("b", path)
    [row] = manager._cpu["a"].rows
    [slab] = manager._slabs

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def sample(function) -> float:
        sync()
        began = time.perf_counter()
        function()
        sync()
        return time.perf_counter() - began

    # The layout before the slab: each linear's slot buffers of their own, written with two copies
    # per linear from views of the entry, on a side stream.
    separate = {module: (torch.empty_like(buffers.lora_a[0]), torch.empty_like(buffers.lora_b[0]))
                for module, buffers in manager.buffers.items()}
    views = {module: (row[a:a + na].view(buffers.lora_a.shape[1:]), row[b:b + nb].view(buffers.lora_b.shape[1:]))
             for (module, (a, na, b, nb)), buffers in zip(slab.regions.items(), manager.buffers.values())}
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    pinned = device.type == "cuda"

    def per_linear_copies():
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for module, (a, b) in separate.items():
                a.copy_(views[module][0], non_blocking=pinned)
                b.copy_(views[module][1], non_blocking=pinned)

    def slab_row_copy():
        slab.data[0].copy_(row, non_blocking=pinned)

    names = ["a", "b"]
    for name in names * 2:  # warm: first calls, the side stream, the allocator
        manager.activate([name])
    per_linear_copies()
    slab_row_copy()
    samples = {"activate": [], "slab_row_copy": [], "per_linear_copies": []}
    copies = manager.stats.slot_copies
    for _ in range(repeats):
        for name in names:
            samples["activate"].append(sample(lambda: manager.activate([name])))  # noqa: B023
    copies = (manager.stats.slot_copies - copies) / (len(names) * repeats)
    for _ in range(repeats):
        samples["slab_row_copy"].append(sample(slab_row_copy))
        samples["per_linear_copies"].append(sample(per_linear_copies))
    median = {name: statistics.median(values) for name, values in samples.items()}
    # The entry is the file's buffer (the file is a slab row already) or a row packed from it.
    in_place = manager._cpu["a"].flats[0].dtype == torch.uint8
    return dict(row_bytes=row.nbytes, pinned=row.is_pinned() if device.type == "cuda" else False, in_place=in_place,
                slot_copies_per_activation=copies, copies_before=2 * len(manager.buffers),
                median_ms={name: value * 1e3 for name, value in median.items()},
                gb_per_s={name: row.nbytes / value / 1e9 for name, value in median.items()},
                samples_ms={name: [value * 1e3 for value in values] for name, values in samples.items()})


def write(root: Path, manager: AdapterManager) -> Path:
    modules = {name: (info.in_features, info.out_features) for name, info in
               ((name, manager.linears[name]) for name in manager.buffers)}
    return e2e.write_adapter(root / "adapter", modules, seed=0, device="cpu", target_modules=e2e.LM_TARGETS)


def _trim():
    """Hand freed heap memory back to the system (glibc), so that the next large allocation is new."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timed(function, trim: bool = True) -> float:
    if trim:
        _trim()
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the slots are: cpu, or cuda (pinned CPU cache)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tiny", action="store_true", help="the tiny e2e shape (a check of the script)")
    parser.add_argument("--profile", action="store_true", help="cProfile one load; print the top functions")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-trim", action="store_true",
                        help="no malloc_trim before each call: with GLIBC_TUNABLES="
                             "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184, freed "
                             "memory is reused (no page faults), as torch's caching host allocator reuses pinned blocks")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--commit", default=None, help="the commit run (a device's git HEAD may be stale)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    manager = make_manager(e2e.TINY if args.tiny else e2e.SEVEN_B, device)
    root = Path(tempfile.mkdtemp(prefix="mmlora-adapter-load-"))
    try:
        return run(args, device, manager, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, device: torch.device, manager: AdapterManager, root: Path) -> int:
    path = write(root, manager)
    weights = path / WEIGHTS_FILE
    size = weights.stat().st_size
    buffer = bytearray(size)
    dtype = next(iter(manager.buffers.values())).lora_a.dtype

    def read_warm_buffer():
        with open(weights, "rb", buffering=0) as handle:
            assert handle.readinto(buffer) == size

    def read_fresh():
        with open(weights, "rb") as handle:
            assert len(handle.read()) == size

    def read_tensors():
        from safetensors.torch import load_file
        load_file(str(weights))

    def load():
        manager._read_packed("adapter", path)

    def validate():
        return read_adapter("adapter", path, manager.linears, max_rank=manager.max_lora_rank, dtype=dtype)

    adapter = validate()
    parts = dict(read_fresh=read_fresh, read_warm_buffer=read_warm_buffer, read_safetensors=read_tensors, load=load,
                 read_adapter=validate)
    for function in parts.values():  # warm: the page cache, the allocator, first-call costs
        function()
    samples = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, function in parts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(timed(function, trim=not args.no_trim))
    median = {name: statistics.median(values) for name, values in samples.items()}
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=args.commit or checkout_commit(), versions=versions(), device=str(device),
                  device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  cpu_count=os.cpu_count(), threads=torch.get_num_threads(), trim=not args.no_trim,
                  glibc_tunables=os.environ.get("GLIBC_TUNABLES"),
                  spec="TINY" if args.tiny else "SEVEN_B", file_bytes=size, linears=len(adapter.modules),
                  repeats=args.repeats, median_ms={name: value * 1e3 for name, value in median.items()},
                  samples_ms={name: [value * 1e3 for value in values] for name, values in samples.items()},
                  load_over_read=median["load"] / median["read_fresh"],
                  load_over_read_warm_buffer=median["load"] / median["read_warm_buffer"],
                  load_over_read_safetensors=median["load"] / median["read_safetensors"])
    print(f"{size / 1e6:.1f} MB, {len(adapter.modules)} linears, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}:")
    for name, value in median.items():
        print(f"  {name:17s} {value * 1e3:8.2f} ms")
    print(f"  load / read_fresh {result['load_over_read']:.2f}x (target 1.3x); load / read_warm_buffer "
          f"{result['load_over_read_warm_buffer']:.2f}x; load / read_safetensors "
          f"{result['load_over_read_safetensors']:.2f}x")
    activation = time_activation(e2e.TINY if args.tiny else e2e.SEVEN_B, device, path, args.repeats)
    result["activation"] = activation
    print(f"activation from the CPU cache ({activation['row_bytes'] / 1e6:.1f} MB, pinned: {activation['pinned']}), "
          f"entry {'the file as read' if activation['in_place'] else 'packed'}, "
          f"synchronised, median of {2 * args.repeats}: {activation['slot_copies_per_activation']:g} copies each "
          f"({activation['copies_before']} before the slab)")
    for name, value in activation["median_ms"].items():
        print(f"  {name:17s} {value:8.2f} ms  {activation['gb_per_s'][name]:6.1f} GB/s")
    print(f"  activate {activation['median_ms']['activate']:.2f} ms (target 5 ms per 81 MB)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            load()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    sys.exit(main())
