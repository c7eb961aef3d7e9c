"""Adapters at scale (#22): 1,000 adapters on disk, random Zipf mixes per decode step, prefetch.

    python benchmarks/adapters_at_scale.py --out results/at_scale --commit <sha>      # H200/H100
    python benchmarks/adapters_at_scale.py --out results/at_scale_turnover --turnover 128 --commit <sha>
    python benchmarks/adapters_at_scale.py --out /tmp/at_scale --tiny [--turnover 4]  # CPU check

The e2e decode model (benchmarks/e2e.py: Qwen2-VL-7B-shaped, bf16, static KV cache of 512) and
adapters of rank 16 on the language model's q/k/v/o/gate/up/down: 81 MB each, written as PEFT
writes them. `--adapters` directories (1,000) share `--unique` weight files (hard links: 1,000
distinct files of 81 MB would not fit the machine's disk; each directory is still read, validated
and cached as an adapter of its own; the page cache may hold the files, which the JSON says).

Each step is a decode step of `--batch` (64) requests whose adapters are drawn with Zipf
popularity (exponent `--zipf`) over a random order of the adapters, at most `--max-distinct` (32)
distinct per batch; `max_loras` is 32 and the CPU cache (`--cpu-cache`) is smaller than the set.
Two ways to draw the steps' mixes:

- worst case (the default): every step a wholly new mix, the next step's names announced
  (`mm.prefetch`) during each step.
- `--turnover MEAN_TOKENS`: continuous batching on a saturated server. Each request decodes a
  geometric number of steps (mean MEAN_TOKENS), then its place goes to the next queued request,
  whose adapter is drawn Zipf as above (`turnover_batches`). A queued request whose adapter would
  make the batch's distinct adapters exceed `--max-distinct` waits, keeping its place in the
  queue, and the first one behind it that fits is admitted (as vLLM's scheduler treats
  max_loras): the batch stays full and the cap holds. The queue is known `--lookahead` steps
  ahead: after each step, the adapters of the requests that join the batch `--lookahead` steps
  later are announced, as a server would when it admits them to its queue.

Prefetch copies only into slots the running step does not read: with `--max-loras` equal to
`--max-distinct` a full batch leaves none, and prefetch can then only fill the CPU cache (the copy
is made at the step, `prefetch_deferred`); run `--max-loras 48` too to see the copies overlap.

- scale: per step, `prepare` (activate: hits, or copies from the pinned CPU cache, or disk reads),
  the forward, then `mm.prefetch(next step's names)`, which overlaps the forward; a step ends when
  its logits are ready (synchronised: decode reads its tokens back every step).
- resident: the same steps, every adapter of the step put in a slot before its clock starts (so
  `prepare` only hits): what the same mixes cost with all needed adapters resident.

The disk bound: per step, the adapters new to the batch and the disk reads committed within its
clock (each the size of an adapter's weights file); the read bandwidth, measured before the runs
as `--prefetch-workers` threads (default: the manager's, min(4, cores)) reading adapters through
the manager's read path at once (read, validate, pack into pinned memory: what a miss costs);
and `bound_ms_per_step`, the mean bytes read per timed step over that bandwidth. A run is
disk-bound when that bound is at least the resident step: reading its adapters takes longer than
the step itself, however well the reads overlap it. (On the CPU, `--tiny`, prefetch reads in the
caller's thread whatever the workers: the JSON's settings say `background_reads`.)

Measured: every step's milliseconds of both runs; GPU memory allocated and the CPU cache's bytes at
start and end; recompilations (graphs compiled) and CUDA-graph recaptures during the timed steps;
the adapter counters (`mm.stats()`); on sampled steps, the compiled logits against `mm.eager`, each
slot the step reads against its file read afresh (exact), and the logits against PEFT's mixed
batch on a second copy of the model (`--peft-checks` steps); the load time of an adapter against
the time to read its file, and the time to activate one from the CPU cache (one slot write,
synchronised). The JSON (`at_scale.json` under --out) records date, device, versions, commit and
command. `--tiny` runs the tiny e2e config on the CPU with few adapters and steps.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # mmlora_fx, when not installed
sys.path.insert(0, str(HERE))  # e2e

import torch  # noqa: E402

import e2e  # noqa: E402
from run_record import checkout_commit, versions  # noqa: E402
import mmlora_fx  # noqa: E402
from mmlora_fx.graph_captures import CudaGraphCaptures  # noqa: E402
from mmlora_fx.peft_format import WEIGHTS_FILE, read_adapter  # noqa: E402


def settings(args) -> dict:
    big = dict(adapters=1000, unique=256, steps=300, warmup=10, batch=64, max_loras=32, max_distinct=32,
               cpu_cache=200, checks=6, peft_checks=2)
    # The tiny check leaves slots beyond a batch's distinct adapters, so that prefetch copies run.
    tiny = dict(adapters=24, unique=8, steps=16, warmup=2, batch=8, max_loras=6, max_distinct=4, cpu_cache=10,
                checks=3, peft_checks=2)
    chosen = dict(tiny if args.tiny else big)
    for key in chosen:
        if getattr(args, key) is not None:
            chosen[key] = getattr(args, key)
    if chosen["cpu_cache"] >= chosen["adapters"]:
        raise SystemExit("--cpu-cache must be smaller than --adapters (the point is a set larger than the cache)")
    return chosen


def write_adapters(root: Path, model, count: int, unique: int, device) -> list[str]:
    """`count` adapter directories over `unique` weight files (hard links), LM targets only."""
    modules = {name: shape for name, shape in e2e.adapter_modules(model).items()
               if name.startswith("model.language_model")}
    files = [e2e.write_adapter(root / "files" / f"u{index}", modules, seed=index, device=device,
                               target_modules=e2e.LM_TARGETS) for index in range(unique)]
    folder = root / "adapters"
    names = []
    for index in range(count):
        source, target = files[index % unique], folder / f"a{index:04d}"
        target.mkdir(parents=True)
        for name in os.listdir(source):
            os.link(source / name, target / name)
        names.append(target.name)
    return names


def zipf_batches(names: list[str], steps: int, batch: int, max_distinct: int, exponent: float, seed: int):
    """Per step, `batch` names drawn with Zipf popularity, at most `max_distinct` distinct."""
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    weights = [1 / (rank + 1) ** exponent for rank in range(len(order))]
    batches = []
    for _ in range(steps):
        chosen, drawn = [], []
        for _ in range(batch):
            name = rng.choices(order, weights)[0]
            if name not in chosen:
                if len(chosen) == max_distinct:
                    name = rng.choice(chosen)  # the cap: a request of an adapter already in the batch
                else:
                    chosen.append(name)
            drawn.append(name)
        batches.append(drawn)
    return batches


def turnover_batches(names: list[str], steps: int, batch: int, max_distinct: int, exponent: float,
                     mean_tokens: float, seed: int) -> tuple[list[list[str]], list[list[str]], list[int]]:
    """Per step, the adapters of a continuously batched server's `batch` requests, the adapters
    of the requests that joined the batch at that step, and how many requests waited for the
    cap. Each request decodes a geometric number of steps with mean `mean_tokens`; a freed place
    goes to the first queued request whose adapter is in the batch or fits under `max_distinct`
    (the others keep their places). Requests arrive as needed (a saturated server), their adapters
    drawn with Zipf popularity over a random order of `names`."""
    if mean_tokens < 1:
        raise SystemExit("--turnover is a mean number of decode steps per request: at least 1")
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    cumulative = list(itertools.accumulate(1 / (rank + 1) ** exponent for rank in range(len(order))))
    finish = 1 / mean_tokens  # a request's chance to end after each step

    def length() -> int:
        if finish >= 1:
            return 1
        return 1 + int(math.log(1 - rng.random()) / math.log(1 - finish))  # geometric, from 1

    def fits(name: str, distinct: collections.Counter) -> bool:
        return name in distinct or len(distinct) < max_distinct

    queue: list[str] = []  # waiting requests' adapters, first come first
    live: list[list] = []  # [adapter, steps left]
    batches, joined, waiting = [], [], []
    for _ in range(steps):
        live = [request for request in live if request[1] > 0]
        distinct = collections.Counter(name for name, _ in live)
        new = []
        while len(live) < batch:
            place = next((index for index, queued in enumerate(queue) if fits(queued, distinct)), None)
            name = queue.pop(place) if place is not None else None
            while name is None:  # none queued fits: requests arrive until one does
                drawn = rng.choices(order, cum_weights=cumulative)[0]
                if fits(drawn, distinct):
                    name = drawn
                else:
                    queue.append(drawn)
            live.append([name, length()])
            distinct[name] += 1
            new.append(name)
        batches.append([name for name, _ in live])
        joined.append(new)
        waiting.append(len(queue))
        for request in live:
            request[1] -= 1
    return batches, joined, waiting


def turnover_announcements(joined: list[list[str]], lookahead: int, steps: int) -> list[list[str]]:
    """After each step, the adapters to announce: those of the requests joining `lookahead` steps
    later (after the first step, of every step up to then), each once."""
    if lookahead < 1:
        raise SystemExit("--lookahead must be at least 1 (step)")
    announced = []
    for index in range(steps):
        ahead = range(1, lookahead + 1) if index == 0 else [index + lookahead]
        announced.append(list(dict.fromkeys(name for later in ahead if later < len(joined) for name in joined[later])))
    return announced


def new_per_step(batches: list[list[str]]) -> list[int]:
    """Per step, the distinct adapters its batch names that the step before did not."""
    return [len(set(names) - set(batches[index - 1] if index else ())) for index, names in enumerate(batches)]


def read_bandwidth(mm, folder: Path, names: list[str], workers: int) -> dict:
    """Bytes per second of `workers` threads reading adapters through the manager's read path at
    once (as many background reads do), `2 * workers` adapters in all."""
    manager = mm.runtime.manager
    chosen = names[-2 * workers:]
    total = sum((folder / name / WEIGHTS_FILE).stat().st_size for name in chosen)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        began = time.perf_counter()
        list(pool.map(lambda name: manager._read_packed(name, folder / name), chosen))
        seconds = time.perf_counter() - began
    return dict(workers=workers, adapters=len(chosen), bytes=total, seconds=seconds, bytes_per_s=total / seconds)


def disk_bound(run: dict, resident: dict, bandwidth: dict, file_bytes: int, warmup: int) -> dict:
    """The timed steps' mean bytes read from disk over the read bandwidth, against the step."""
    timed = run["disk_reads_per_step"][warmup:]
    per_step = statistics.mean(timed) * file_bytes
    bound_ms = per_step / bandwidth["bytes_per_s"] * 1e3
    return dict(disk_reads_per_step_mean=statistics.mean(timed), disk_bytes_per_step_mean=per_step,
                read_bytes_per_s=bandwidth["bytes_per_s"], prefetch_workers=bandwidth["workers"],
                bound_ms_per_step=bound_ms, ms_per_step_mean=run["ms_per_step_mean"],
                resident_ms_per_step_mean=resident["ms_per_step_mean"],
                bound_over_step=bound_ms / run["ms_per_step_mean"],
                disk_bound=bound_ms >= resident["ms_per_step_mean"])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def slots_match_files(mm, names: list[str], folder: Path) -> bool:
    """Every slot the batch reads holds its adapter's file, read afresh (exact)."""
    manager = mm.runtime.manager
    for name in set(names):
        slot = manager.resident[name]
        dtype = next(iter(manager.buffers.values())).lora_a.dtype
        adapter = read_adapter(name, folder / name, manager.linears, max_rank=manager.max_lora_rank, dtype=dtype)
        for module, buffers in manager.buffers.items():
            weights = adapter.modules.get(module)
            rank = int(buffers.ranks[slot])
            if weights is None:
                if rank != 0:
                    return False
                continue
            if rank != weights.rank or not torch.equal(buffers.lora_a[slot, :rank].cpu(), weights.lora_a) \
                    or not torch.equal(buffers.lora_b[slot, :, :rank].cpu(), weights.lora_b):
                return False
    return True


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def load_against_read(mm, folder: Path, names: list[str]) -> dict:
    """Seconds to read an adapter's file against seconds to load it (read, validate, pack into
    pinned memory), alternating on the same files (both from the page cache after the first)."""
    manager = mm.runtime.manager
    reads, loads = [], []
    for name in names:
        path = folder / name
        began = time.perf_counter()
        with open(path / WEIGHTS_FILE, "rb") as handle:
            handle.read()
        reads.append(time.perf_counter() - began)
        began = time.perf_counter()
        manager._read_packed(name, path)  # what load, a miss and prefetch do with a file
        loads.append(time.perf_counter() - began)
    return dict(read_file_s=statistics.median(reads), load_s=statistics.median(loads),
                ratio=statistics.median(loads) / statistics.median(reads),
                file_bytes=(folder / names[0] / WEIGHTS_FILE).stat().st_size)


def activate_from_cpu_cache(mm, device, repeats: int = 10) -> tuple[float, float]:
    """Median seconds to make a CPU-cached adapter that is not resident resident (one slot write,
    an LRU slot evicted once the slots are full), synchronised; and the host-to-device copies
    each made (one slab row, plus a ranks column where the slot's ranks changed)."""
    manager = mm.runtime.manager
    candidates = [name for name in manager.cpu_cached if name not in manager.resident][-repeats:]
    samples = []
    copies = manager.stats.slot_copies
    for name in candidates:
        synchronize(device)
        began = time.perf_counter()
        manager.activate([name])
        synchronize(device)
        samples.append(time.perf_counter() - began)
    return statistics.median(samples), (manager.stats.slot_copies - copies) / max(1, len(candidates))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the tiny e2e config, few adapters and steps (CPU)")
    parser.add_argument("--commit", default=None, help="the commit run (the device's git HEAD is stale)")
    for key in ("adapters", "unique", "steps", "warmup", "batch", "max_loras", "max_distinct", "cpu_cache", "checks",
                "peft_checks"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--turnover", type=float, default=None, metavar="MEAN_TOKENS",
                        help="continuous batching: requests decode this many steps on average (default: off, "
                             "a wholly new mix every step)")
    parser.add_argument("--lookahead", type=int, default=4, help="with --turnover: steps the queue is known ahead")
    parser.add_argument("--prefetch-workers", type=int, default=None,
                        help="background reads at once (default: the manager's, min(4, cores))")
    args = parser.parse_args()
    config = settings(args)
    config.update(zipf=args.zipf, turnover=args.turnover, lookahead=args.lookahead if args.turnover else None)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = e2e.TINY if args.tiny else e2e.SEVEN_B
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([Path(sys.executable).name, *sys.argv]), commit=args.commit,
                  git_head_here=checkout_commit(), versions=versions(), settings=config,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  spec="TINY" if args.tiny else "SEVEN_B", rank=e2e.RANK, kv=e2e.KV)

    def save():
        (args.out / "at_scale.json").write_text(json.dumps(result, indent=2))

    began = time.perf_counter()
    model = e2e.build_model(spec, device, torch.bfloat16)
    root = Path(tempfile.mkdtemp(prefix="mmlora-at-scale-"))
    names = write_adapters(root, model, config["adapters"], config["unique"], device)
    folder = root / "adapters"
    print(f"model and {len(names)} adapters ({config['unique']} files) in {time.perf_counter() - began:.0f} s",
          flush=True)

    mode = e2e.graph_mode(device)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(model, {}, max_loras=config["max_loras"], max_cpu_loras=config["cpu_cache"],
                           max_lora_rank=e2e.RANK, max_batch_size=config["batch"], partitions=["language_model"],
                           target_modules=e2e.LM_TARGETS, mode=mode)
    if args.prefetch_workers is not None:
        mm.runtime.manager.prefetch_workers = args.prefetch_workers
    config["prefetch_workers"] = mm.runtime.manager.prefetch_workers
    config["background_reads"] = mm.runtime.manager._background
    began = time.perf_counter()
    mm.load_adapters(folder)
    result["load_all_s"] = time.perf_counter() - began
    result["load_against_read"] = load_against_read(mm, folder, names[:10])
    result["activate_from_cpu_cache_s"], result["slot_copies_per_activation"] = activate_from_cpu_cache(mm, device)
    result["read_bandwidth"] = read_bandwidth(mm, folder, names, config["prefetch_workers"])
    save()
    print(f"loaded in {result['load_all_s']:.0f} s; load/read {result['load_against_read']['ratio']:.2f}x; "
          f"activate from the CPU cache {result['activate_from_cpu_cache_s'] * 1e3:.2f} ms "
          f"({result['slot_copies_per_activation']:g} copies each); read bandwidth "
          f"{result['read_bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s with {config['prefetch_workers']} reading",
          flush=True)

    step = e2e.DecodeStep(model, config["batch"], device, torch.bfloat16)
    total = config["warmup"] + config["steps"]
    if args.turnover is None:
        batches = zipf_batches(names, total + 1, config["batch"], config["max_distinct"], args.zipf, args.seed)
        announce = batches[1:]  # after each step, the next step's names
    else:
        batches, joined, waiting = turnover_batches(names, total + args.lookahead + 1, config["batch"],
                                                    config["max_distinct"], args.zipf, args.turnover, args.seed)
        announce = turnover_announcements(joined, args.lookahead, total)
        result["joined_per_step"] = [len(new) for new in joined[:total]]
        result["waiting_for_the_cap_per_step"] = waiting[:total]
    result["mode"] = "worst_case" if args.turnover is None else "turnover"
    result["distinct_per_step"] = [len(set(b)) for b in batches[:total]]
    result["new_adapters_per_step"] = new_per_step(batches[:total])
    check_steps = set(range(config["warmup"], total, max(1, config["steps"] // max(1, config["checks"]))))

    def forward(names_now):
        mm.runtime.prepare(names_now)
        step.rewind()
        # A new step: the last step's outputs may be overwritten (CUDA-graph trees).
        torch.compiler.cudagraph_mark_step_begin()
        return step()

    def run(label: str, prefetch: bool) -> dict:
        times, checks, disk_reads = [], [], []
        stats_before = graphs_before = memory_start = cache_start = captures = None
        with CudaGraphCaptures() as counted:
            for index in range(total):
                if index == config["warmup"]:  # after warm-up (compilation, graph records): the timed steps
                    synchronize(device)
                    graphs_before, captures = mm.compiled_graphs, counted.count
                    stats_before = mm.stats()
                    memory_start = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                    cache_start = mm.runtime.manager.cpu_cache_bytes()
                if not prefetch:
                    mm.runtime.manager.activate(batches[index])  # every adapter of the step in a slot
                synchronize(device)
                reads = mm.runtime.manager.stats.disk_reads
                clock = time.perf_counter()
                logits = forward(batches[index])
                if prefetch:
                    mm.prefetch(announce[index])
                synchronize(device)
                times.append((time.perf_counter() - clock) * 1e3)
                disk_reads.append(mm.runtime.manager.stats.disk_reads - reads)
                if index in check_steps:
                    compiled = logits.float().clone()
                    step.rewind()
                    with torch.no_grad():
                        eager = mm.eager(**step.inputs(), adapter_names=batches[index]).logits.float()
                    checks.append(dict(step=index, rel_error_vs_eager=relative(compiled, eager),
                                       slots_match_files=slots_match_files(mm, batches[index], folder),
                                       logits=compiled.cpu(), eager_logits=eager.cpu()))
                del logits
        synchronize(device)
        stats = mm.stats()
        timed = times[config["warmup"]:]
        return dict(label=label, ms_per_step_median=statistics.median(timed), ms_per_step_mean=statistics.mean(timed),
                    ms_per_step_p90=sorted(timed)[int(0.9 * (len(timed) - 1))], step_ms=times,
                    disk_reads_per_step=disk_reads,
                    recompilations=mm.compiled_graphs - graphs_before, recaptures=counted.count - captures,
                    memory_start_bytes=memory_start,
                    memory_end_bytes=torch.cuda.memory_allocated() if device.type == "cuda" else 0,
                    memory_peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
                    cpu_cache_start_bytes=cache_start, cpu_cache_end_bytes=mm.runtime.manager.cpu_cache_bytes(),
                    stats_during_timed_steps={key: value - getattr(stats_before, key)
                                              for key, value in vars(stats).items()},
                    checks=checks)

    scale = run("scale", prefetch=True)
    mm.runtime.manager.wait_for_reads()
    resident = run("resident", prefetch=False)
    # The two runs read the same steps: their logits must agree exactly where both checked.
    for ours, theirs in zip(scale["checks"], resident["checks"]):
        ours["equal_to_resident_run"] = bool(torch.equal(ours["logits"], theirs["logits"]))
    peft_checks = check_peft(spec, device, folder, batches, scale["checks"][:config["peft_checks"]], step)
    for run_result in (scale, resident):
        for check in run_result["checks"]:
            check.pop("logits")
            check.pop("eager_logits")
    result.update(scale=scale, resident=resident, peft_checks=peft_checks,
                  ms_per_step_ratio=scale["ms_per_step_median"] / resident["ms_per_step_median"])
    file_bytes = result["load_against_read"]["file_bytes"]
    result["disk_bound"] = bound = disk_bound(scale, resident, result["read_bandwidth"], file_bytes, config["warmup"])
    save()
    mm.runtime.manager.close()
    s = scale
    timed = slice(config["warmup"], None)
    new = statistics.mean(result["new_adapters_per_step"][timed])
    if args.turnover is None:
        print(f"worst case: a new mix every step, {new:.2f} adapters new to the batch per step")
    else:
        print(f"turnover: {args.turnover:g} steps a request on average, queue known {args.lookahead} steps ahead; "
              f"{statistics.mean(result['joined_per_step'][timed]):.2f} requests and {new:.2f} adapters new to the "
              f"batch per step; {statistics.mean(result['waiting_for_the_cap_per_step'][timed]):.1f} requests "
              "waiting for the cap")
    print(f"disk: {bound['disk_reads_per_step_mean']:.2f} reads, {bound['disk_bytes_per_step_mean'] / 1e6:.1f} MB "
          f"a step at {bound['read_bytes_per_s'] / 1e9:.2f} GB/s ({bound['prefetch_workers']} reading): bound "
          f"{bound['bound_ms_per_step']:.2f} ms/step against {bound['ms_per_step_mean']:.2f} (mean; resident "
          f"{bound['resident_ms_per_step_mean']:.2f}): {'disk-bound' if bound['disk_bound'] else 'not disk-bound'}")
    print(f"scale {s['ms_per_step_median']:.2f} ms/step against resident {resident['ms_per_step_median']:.2f} "
          f"({result['ms_per_step_ratio'] - 1:+.1%}); recompilations {s['recompilations']}, recaptures "
          f"{s['recaptures']}; memory {s['memory_start_bytes'] / 2**30:.2f} -> {s['memory_end_bytes'] / 2**30:.2f} GiB; "
          f"stats {s['stats_during_timed_steps']}")
    print(f"checks: {[(c['step'], round(c['rel_error_vs_eager'], 6), c['slots_match_files'], c.get('equal_to_resident_run')) for c in s['checks']]}")
    print(f"PEFT: {peft_checks}")
    print(f"written {args.out / 'at_scale.json'}")
    return 0


def check_peft(spec, device, folder: Path, batches, checks: list[dict], step) -> list[dict]:
    """The checked steps' compiled logits against PEFT's mixed batch, on a second model built
    with the same seed (the compiled one carries mmlora_fx's hooks)."""
    if not checks:
        return []
    from peft import PeftModel

    model = e2e.build_model(spec, device, torch.bfloat16)
    peft = None
    found = []
    for check in checks:
        names = batches[check["step"]]
        for name in dict.fromkeys(names):
            if peft is None:
                peft = PeftModel.from_pretrained(model, str(folder / name), adapter_name=name).eval()
            elif name not in peft.peft_config:
                peft.load_adapter(str(folder / name), adapter_name=name)
        step.rewind()
        with torch.no_grad():
            reference = peft(**step.inputs(), adapter_names=names).logits.float().cpu()
            step.rewind()
            with peft.disable_adapter():
                base = peft(**step.inputs()).logits.float().cpu()
        found.append(dict(step=check["step"], rel_error_vs_peft=relative(check["logits"], reference),
                          eager_rel_error_vs_peft=relative(check["eager_logits"], reference),
                          lora_effect=relative(base, reference)))
    del peft, model
    return found


if __name__ == "__main__":
    sys.exit(main())
