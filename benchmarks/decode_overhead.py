"""Decode overhead of mmlora_fx over the compiled base, measured so that it repeats (#15).

    python benchmarks/decode_overhead.py --out results/ --commit <sha> [--runs 3]
        [--batches 1,16,64] [--mixes 1,8,32] [--rounds 6] [--steps 100] [--budget-s 540]
    python benchmarks/decode_overhead.py --out /tmp/check --tiny --runs 2     # the script, on the CPU
    python benchmarks/decode_overhead.py --model moe --out results/ --commit <sha> --runs 3
        --steps 50 --rounds 4 --budget-s 500                                  # the MoE model (below)

(`--tiny`: e2e's tiny config on the CPU, no CUDA graphs, perf_counter timing, and the dynamo
backend "eager" for both models (`--inner`): it checks the script and the passes in about two
minutes on two cores, where Inductor's C++ compile of even the tiny model takes minutes per
batch size; add `--inner inductor` to compile it as on the GPU. Its times mean nothing.)

The model, adapters and decode step are `benchmarks/e2e.py`'s (imported, not copied): a random
Qwen2-VL-7B-shaped model in bf16, 32 distinct rank-16 adapters on every LM linear (and the
tower's, which decode does not run) (`--model moe`: see below), one decode step (one new token per request) over a static
KV cache of 512 tokens, CUDA graphs (`mode="reduce-overhead"`, `dynamic=False`) for both the
base and mmlora_fx. For each batch (1, 16, 64) and number of distinct adapters (1, 8, 32, at
most the batch) it measures the overhead ours/base - 1 twice, in the same process:

- old: e2e's `--parts decode` method: the median of 20 single-step CUDA-event timings
  (`e2e.timed`) of the base, then of ours. e2e's numbers spread 5-11 points between
  compilations, as much as the effect to remove; this column shows whether that spread is the
  method's.
- new: `--rounds` rounds; each round times a block of `--steps` steps of the base and a block of
  ours per mix with one CUDA event pair per block (ms per step = block time / steps), the order
  reversed every other round (A B C, C B A: a slow drift of clocks or temperature lands on both
  sides alike). The figure is the median of the per-round ratios; the rounds are kept. One base
  block per round serves all of a batch's mixes (same batch, same base graph): 4 blocks a round
  at batch 64 instead of 6, GPU time that three runs in one device call do not have.

Where the spread between compilations comes from is then visible in the output: run to run
(`--runs` independent compilations, each in its own process with its own fresh Inductor AND
Triton cache, so no kernel choice or autotuning result is inherited), round to round inside one
run (the rounds' min-max: measurement noise), old against new in one run (too few steps, no
interleaving), the base's own ms run to run (kernel choices of the base), and the SM clock,
memory clock, temperature and power around each run's timing (nvidia-smi at the start and end,
and sampled every second while it times).

Why the processes are arranged as they are: a device call may take 10 minutes, and a cold
compilation of the 7B decode step takes ~40-100 s per batch size, for the base and again for
ours. So the runs COMPILE CONCURRENTLY (16 cores), then wait at a barrier (a ready file each,
written after compiling and warming; a timeout so one slow run cannot hold the others), and TIME
ONE AT A TIME under an exclusive `fcntl.flock`: while a run times, no other process uses the GPU
or compiles. A run that has timed stays alive and idle until all have (no CUDA context torn down
beside a timing run). `--serial-compile` takes the lock for compiling too (slower: for checking
whether autotuning under a shared GPU changes the kernels picked). `--budget-s` (from the
parent's start) bounds it all: each run gets a fair share of the time left when it takes the
lock and skips the (batch, mix) timings that would not fit, recording them; the parent kills
what is still running at the budget and writes what it has.

Details that matter for the numbers:

- The base and ours share the weights (a second module tree, `copy.deepcopy` with the
  parameters and buffers in its memo), so both fit one process and are timed side by side, and
  one `DecodeStep` per batch (the same static cache and inputs) serves both; every block
  rewinds the cache first, so both sides run the same KV lengths (512 to 512 + steps).
- `torch.compiler.cudagraph_mark_step_begin()` before every step, both methods: the base and
  ours share one CUDA-graph tree manager, and without a new step ours called after the base
  could be recorded as a child of the base's graph (a new capture) instead of replaying its own.
- `--sync step` (default): every step ends with a device sync, as a decode loop that reads each
  token back does, and as the old method's single-step timings do (host launch time included),
  so old and new measure the same quantity; `--sync block` lets the host run ahead (GPU time
  only).
- `mm.runtime.prepare(assignment)` (e2e's `mixed_names(names, batch, distinct,
  seed=batch*100+distinct)`) before each block of ours, outside the timed interval; every mix
  is prepared and run while warming, so all adapters are resident in their slots before timing.
  `--served-call` runs each of ours' steps through `mm(..., adapter_names=...)` instead of the
  compiled model alone (the same assignment: what a server calling `mm(...)` every step of an
  unchanged batch pays on the host, `prepare` and the call's scope included).
- Both models are static per batch size (`dynamic=False`). e2e compiled without it, so its
  batch 16 and 64 graphs were dynamic-shape recompiles ("dynamic recompile" in BENCHMARKS.md):
  the old column here is e2e's timing method, not e2e's graphs.
- A LoRA-effect check per batch (ours' logits against the base's, relative to the base's
  scale): a value near zero would mean ours replayed plain graphs (#21) and its times mean
  nothing.

`--model moe` (issue #17): e2e's `MOE` instead, a mixture-of-experts language model with the real
layer shapes of Qwen3-VL-30B-A3B's (transformers' Qwen3MoeForCausalLM: hidden 2048, every layer
128 experts of MoE intermediate 768 with top-8 routing, GQA 32/4 heads of 128, vocabulary 151936,
untied head; experts run by transformers' `batched_mm`, the implementation served) with 6 of its
48 layers, random bf16 weights (8.1 GiB), no vision tower. The 32 rank-16 adapters cover q/k/v/o
(`target_modules`) and the fused expert weights `mlp.experts.gate_up_proj` and `down_proj` of
all 128 experts (PEFT's `target_parameters`): 26.8 MB a layer, 161 MB an adapter, 4.8 GiB for the
32 slots. Per run (process) about 8.1 + 4.8 GiB, the KV caches (0.75 GiB for batches 1, 16 and 64)
and the CUDA-graph pool, whose batch-64 temporaries are GBs (`batched_mm` gathers each of the
512 rows' expert weights: 3 GiB for gate_up): about 20 GiB (estimated), so `--runs 3` fits an 80 GB GPU. The
same decode step, timing and checks as the dense model's; each run also records how many served
targets are expert weights and how many LoRA ops of ours' graphs are expert ones, and fails when
either is zero (the figure would measure attention LoRA alone). `--tiny` with it: `TINY_MOE`
(2 layers of 8 experts, top-2).

Writes `decode_overhead.json` under --out: the date, device, versions (torch, triton,
transformers, peft), the commit (`--commit`; the device's git HEAD is stale), the command, the
settings, every run's raw data (compile and first-call seconds per batch, clocks, old and new
timings with all rounds, what was skipped) and a summary per (batch, mix): old and new overhead
as median [min-max] over the runs, base and ours ms per step. Each run also writes
`run<i>.json` as it goes, so a call cut short still leaves its numbers. The last lines printed
are the summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import fcntl
import functools
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # mmlora_fx, when not installed
sys.path.insert(0, str(HERE))  # e2e

import torch  # noqa: E402

import e2e  # noqa: E402
from run_record import checkout_commit, versions  # noqa: E402
import mmlora_fx  # noqa: E402
from mmlora_fx.kernels import launch_config  # noqa: E402
from mmlora_fx.passes import lora_ops  # noqa: E402
from mmlora_fx.reporting import in_gemm_counts  # noqa: E402

SMI_FIELDS = "clocks.sm,clocks.mem,temperature.gpu,power.draw"
# What a run keeps for itself at the end of the budget: writing its file and exiting; the parent
# adds its own margin (GRACE_S) before killing.
RESERVE_S = 20.0
GRACE_S = 15.0


# --------------------------------------------------------------------------- small helpers
def elapsed(t0: float) -> str:
    return f"{time.time() - t0:6.1f}s"


def log(prefix: str, t0: float, message: str) -> None:
    # Flushed at once, with seconds since the parent started: a call killed at its limit shows
    # where each process was.
    print(f"[{prefix} {elapsed(t0)}] {message}", flush=True)


def marker(shared: Path, kind: str, index: int) -> Path:
    return shared / f"{kind}.{index}"


def mark(shared: Path, kind: str, index: int, text: str = "") -> None:
    path = marker(shared, kind, index)
    if not path.exists():
        path.write_text(text)


def count(shared: Path, kind: str) -> int:
    return len(list(shared.glob(f"{kind}.*")))


def wait_for(predicate, until: float, poll: float = 0.2) -> bool:
    """Poll `predicate` until it holds (True) or the wall clock passes `until` (False)."""
    while not predicate():
        if time.time() >= until:
            return False
        time.sleep(poll)
    return True


@contextlib.contextmanager
def exclusive(path: Path, until: float):
    """An exclusive flock on `path`, waited for until `until`; yields the seconds waited, or
    None when the lock did not come in time (the body then must not use the GPU)."""
    began = time.time()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    locked = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.time() >= until:
                    break
                time.sleep(0.1)
        yield (time.time() - began) if locked else None
    finally:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def timed_steps(one, steps: int, device, sync_each: bool = True) -> float:
    """ms per step of `steps` calls of `one()`: one CUDA event pair around them (with a
    synchronisation after each step where `sync_each`, as decode reads its tokens back), or
    perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            one()
            if sync_each:
                torch.cuda.synchronize(device)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps
    began = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - began) * 1e3 / steps


def stop_processes(processes: list, ended: dict, reason: str) -> None:
    """Terminate the `(key, process)` still running (killed if one does not end in 10 s), waiting
    for each; `ended[key]` says `reason` and the exit code for each keyed one not ended before."""
    for _, process in processes:
        if process.poll() is None:
            process.terminate()
    for key, process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if key is not None and key not in ended:
            ended[key] = f"{reason} ({process.returncode})"


def spread(values: list[float]) -> dict | None:
    values = [value for value in values if value is not None]
    if not values:
        return None
    return dict(median=statistics.median(values), min=min(values), max=max(values), values=values)


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def smi_ids() -> list[str]:
    """nvidia-smi's `-i` for the GPU this process sees (the first of CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return ["-i", visible] if visible else []


def gpu_state(fields: str = SMI_FIELDS) -> str | None:
    """One nvidia-smi reading (None without nvidia-smi: the CPU check)."""
    try:
        result = subprocess.run(["nvidia-smi", *smi_ids(), f"--query-gpu={fields}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else f"error: {result.stderr.strip()[:200]}"


def clock_reasons() -> str | None:
    """Why the clocks are held down now (a bit mask: power cap, thermal, ...), by the field's new
    name or its old one."""
    for field in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        found = gpu_state(field)
        if found is None or not found.startswith("error"):
            return found
    return found


class ClockSampler:
    """nvidia-smi sampling once a second while a run times (one process of ours, little CPU):
    start/end readings alone would miss a clock drop in the middle of the timing phase."""

    def __init__(self, path: Path):
        self.path = path
        self.process = self.file = None

    def __enter__(self):
        try:
            self.file = open(self.path, "w")
            self.process = subprocess.Popen(
                ["nvidia-smi", *smi_ids(), f"--query-gpu=timestamp,{SMI_FIELDS}", "--format=csv,noheader,nounits",
                 "-lms", "1000"], stdout=self.file, stderr=subprocess.DEVNULL)
        except OSError:
            self.process = None
        return self

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        if self.file is not None:
            self.file.close()

    def summary(self) -> dict | None:
        if self.process is None:
            return None
        rows = []
        for line in self.path.read_text().splitlines():
            parts = [part.strip() for part in line.split(",")]
            if len(parts) != 5:
                continue
            with contextlib.suppress(ValueError):
                rows.append(dict(timestamp=parts[0], sm_mhz=float(parts[1]), mem_mhz=float(parts[2]),
                                 temp_c=float(parts[3]), power_w=float(parts[4])))
        if not rows:
            return dict(samples=[])
        sm = [row["sm_mhz"] for row in rows]
        return dict(sm_mhz_min=min(sm), sm_mhz_median=statistics.median(sm), sm_mhz_max=max(sm),
                    mem_mhz_min=min(row["mem_mhz"] for row in rows),
                    temp_c_max=max(row["temp_c"] for row in rows),
                    power_w_median=statistics.median(row["power_w"] for row in rows), samples=rows)


# --------------------------------------------------------------------------- settings
def settings(args) -> dict:
    """The parsed flags with the --tiny defaults filled in."""
    tiny = args.tiny
    batches = parse_ints(args.batches) if args.batches else ([1, 4] if tiny else [1, 16, 64])
    mixes = parse_ints(args.mixes) if args.mixes else ([1, 2] if tiny else [1, 8, 32])
    adapters = 4 if tiny else 32  # as e2e.py writes them
    # The tiny defaults only have to exercise the code (rounds in an A B / B A pair) quickly.
    steps = args.steps if args.steps is not None else (10 if tiny else 100)
    rounds = args.rounds if args.rounds is not None else (2 if tiny else 6)
    old_repeats = args.old_repeats if args.old_repeats is not None else (5 if tiny else 20)
    if steps + args.block_warmup > e2e.DecodeStep.SPARE - 6:
        raise SystemExit(f"--steps {steps} + --block-warmup {args.block_warmup} must stay within the cache's "
                         f"{e2e.DecodeStep.SPARE} spare positions (250 at most)")
    if old_repeats + 3 > e2e.DecodeStep.SPARE:
        raise SystemExit("--old-repeats too large for the cache's spare positions")
    if max(mixes) > adapters:
        raise SystemExit(f"at most {adapters} distinct adapters")
    inner = args.inner or ("eager" if tiny else "inductor")
    return dict(model=args.model, tiny=tiny, inner=inner, batches=sorted(batches), mixes=sorted(mixes),
                adapters=adapters, steps=steps, rounds=rounds, block_warmup=args.block_warmup, old_repeats=old_repeats, sync=args.sync,
                runs=args.runs, budget_s=args.budget_s, serial_compile=args.serial_compile,
                stack_max_rows=args.stack_max_rows, stack_expand=args.stack_expand, stack_shrink=args.stack_shrink,
                served_call=args.served_call, fused_gemv=args.fused_gemv, sums_in_kernel=args.sums_in_kernel)


def model_spec(config: dict) -> tuple[dict, list[str] | None]:
    """e2e's spec of `--model` (tiny or not) and its adapters' linear targets (None: e2e's default)."""
    spec = getattr(e2e, e2e.SPECS[config["model"], config["tiny"]])
    return spec, (e2e.MOE_TARGETS if config["model"] == "moe" else None)


def mixes_for(config: dict, batch: int) -> list[int]:
    return [distinct for distinct in config["mixes"] if distinct <= batch]


# --------------------------------------------------------------------------- adapter writer
def write_adapters(args) -> int:
    """Writes the adapters once for all runs (e2e's write_adapter, same seeds and device), while
    the runs build their models; the shapes come from a model on the meta device."""
    t0, shared, config = args.t0, Path(args.shared), settings(args)
    try:
        device = torch.device("cpu" if config["tiny"] else "cuda")
        spec, targets = model_spec(config)
        modules = e2e.adapter_modules(e2e.build_model(spec, "meta", torch.bfloat16), targets)
        root = shared / "adapters"
        for index in range(config["adapters"]):
            e2e.write_adapter(root / f"a{index}", modules, seed=index, device=device, target_modules=targets)
        (shared / "adapters.ready").write_text("")
        log("adapters", t0, f"{config['adapters']} adapters written")
        return 0
    except BaseException:
        (shared / "adapters.failed").write_text(traceback.format_exc())
        raise


# --------------------------------------------------------------------------- one run (child)
class Worker:
    """What a process that compiles, warms and times both models does alike here (`Run`: one run)
    and in tp_decode.py (`Rank`: one rank of a run). A subclass sets config, record, shared,
    deadline and out_file, and steps, base, mm and names as it builds, and defines log, sync and
    one (one decode step: of the base with call=base, of ours with call=None)."""

    def save(self) -> None:
        self.out_file.write_text(json.dumps(self.record, indent=1))

    def assignment(self, batch: int, distinct: int) -> list[str]:
        return e2e.mixed_names(self.names, batch, distinct, seed=batch * 100 + distinct)

    def warm_base(self) -> None:
        """The compiled base's first call at every batch (timed: the compilation), then 3 more."""
        record = self.record
        for batch, step in self.steps.items():
            step.rewind()
            skips = e2e.cudagraph_skips()
            began = time.perf_counter()
            self.one(step, self.base)
            self.sync()
            record["first_call_s"]["base"][batch] = time.perf_counter() - began
            for _ in range(3):  # CUDA graphs: the first call warms, the second records, then replays
                self.one(step, self.base)
            self.sync()
            self.record_skips("base", batch, skips)
            self.log(f"base b{batch} first call {record['first_call_s']['base'][batch]:.1f} s")

    def record_skips(self, which: str, batch: int, before: int) -> None:
        """The graphs Inductor left out of CUDA graphs since `before` (`e2e.cudagraph_skips()`), for
        `which` model at `batch`: each runs its kernels from the host at every step."""
        self.record.setdefault("cudagraph_skips", dict(base={}, ours={}))[which][batch] = e2e.cudagraph_skips() - before

    def prepare(self, assignment) -> None:
        """Ours' tables for `assignment` (its adapters made resident); remembered for `--served-call`."""
        self.prepared = assignment
        self.mm.runtime.prepare(assignment)

    def warm_ours(self, batch: int, step) -> None:
        """Ours at `batch`, each of the batch's mixes prepared (its adapters made resident): the
        batch's first call timed (the compilation), then 3 calls a mix."""
        record = self.record
        for distinct in mixes_for(self.config, batch):
            self.prepare(self.assignment(batch, distinct))  # makes its adapters resident
            step.rewind()
            if batch not in record["first_call_s"]["ours"]:
                skips = e2e.cudagraph_skips()
                began = time.perf_counter()
                self.one(step, None)
                self.sync()
                record["first_call_s"]["ours"][batch] = time.perf_counter() - began
                self.record_skips("ours", batch, skips)
                # What the compile options took in ours' graphs so far (all batches): a path that
                # did not engage would time the kernels under its name.
                counts = in_gemm_counts(self.mm.backend.records)
                record.setdefault("in_gemm_calls", {})[batch] = {key: counts[key] for key in ("gemv", "folded", "stacked")}
                self.log(f"ours b{batch} first call {record['first_call_s']['ours'][batch]:.1f} s")
            for _ in range(3):
                self.one(step, None)
            self.sync()

    def adapters(self) -> dict[str, Path]:
        """The adapters' paths by name, once the writer (`write_adapters`) has written them all."""
        if not wait_for(lambda: (self.shared / "adapters.ready").exists()
                        or (self.shared / "adapters.failed").exists(), self.deadline):
            raise RuntimeError("no adapters before the deadline")
        if (self.shared / "adapters.failed").exists():
            raise RuntimeError("the adapter writer failed")
        root = self.shared / "adapters"
        return {f"a{index}": root / f"a{index}" for index in range(self.config["adapters"])}

    def block_seconds(self, ms: float) -> float:
        """A guess of one block's wall time, for the budget (margin for host work and syncs)."""
        return (self.config["steps"] + self.config["block_warmup"]) * ms * 1.15 / 1e3 + 0.05

    def barrier(self) -> dict:
        """Waits until every run is compiled and warm (their ready markers) or the timeout, which
        leaves the budget's end for timing what there is: complete, and the seconds waited."""
        began = time.time()
        complete = wait_for(lambda: count(self.shared, "ready") >= self.config["runs"], self.deadline - 2 * RESERVE_S)
        return dict(complete=complete, waited_s=time.time() - began)

    def fair_share(self) -> float:
        """The seconds this run may time: a fair share of what is left for each run not timed yet,
        this one included."""
        left = self.deadline - RESERVE_S - time.time()
        return left / max(1, self.config["runs"] - count(self.shared, "done"))

    def failed(self, error: Exception) -> int:
        """Records `error` and its traceback (call it in the except block) and logs it; the exit status."""
        self.record["error"] = f"{type(error).__name__}: {error}"
        self.record["traceback"] = traceback.format_exc()
        self.log(f"FAILED: {self.record['error']}")
        return 1


class Run(Worker):
    """One independent compilation: compile and warm both models, then (under the lock) time."""

    def __init__(self, args):
        self.args = args
        self.config = settings(args)
        self.index = args.index
        self.t0 = args.t0
        self.deadline = args.deadline
        self.shared = Path(args.shared)
        self.device = torch.device("cpu" if self.config["tiny"] else "cuda")
        self.cuda = self.device.type == "cuda"
        self.out_file = args.out / f"run{self.index}.json"
        self.record = dict(index=self.index, pid=os.getpid(), host_cores=os.cpu_count(),
                           inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                           triton_cache=os.environ.get("TRITON_CACHE_DIR"),
                           compile_threads=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
                           device=torch.cuda.get_device_name() if self.cuda else "cpu",
                           first_call_s=dict(base={}, ours={}), lora_effect={}, timings=[], skipped=[])

    def log(self, message: str) -> None:
        log(f"run{self.index}", self.t0, message)

    def sync(self) -> None:
        e2e.synchronize(self.device)

    def one(self, step, call) -> None:
        """One decode step (of the base with call=base, of ours with call=None: the compiled model
        itself, or with `--served-call` `mm(..., adapter_names=...)` as a server calls it every
        step, its `prepare`, scope and checks included)."""
        if call is None and self.config.get("served_call"):
            call = functools.partial(self.mm, adapter_names=self.prepared)  # marks the CUDA-graph step itself
        elif self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # see the module docstring
        step(call)

    # ---------------------------------------------------------------- compile and warm
    def compile_and_warm(self) -> None:
        config, record = self.config, self.record
        # The base and ours each compile one entry per batch size, on code objects they share
        # (transformers' forward wrappers): a frame over the recompile limit would fall back to
        # eager and its timings would mean nothing. Raising the limit changes no compiled code.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        spec, _ = model_spec(config)
        began = time.perf_counter()
        model = e2e.build_model(spec, self.device, torch.bfloat16)
        # The base's own module tree over the same tensors: base and ours in one process, one copy
        # of the weights (16 GB at 7B), and the same memory for both.
        tensors = list(model.parameters()) + list(model.buffers())
        base_module = copy.deepcopy(model, memo={id(tensor): tensor for tensor in tensors})
        assert all(a is b for a, b in zip(model.parameters(), base_module.parameters()))
        del tensors
        self.steps = {batch: e2e.DecodeStep(model, batch, self.device, torch.bfloat16) for batch in config["batches"]}
        self.sync()
        if self.cuda:
            # The steps' eager first forwards left their temporaries cached (GBs at batch 64 for the
            # MoE model's gathered expert weights), where the CUDA-graph pool cannot reuse them.
            torch.cuda.empty_cache()
        record["build_s"] = time.perf_counter() - began
        self.log(f"model built, decode steps made in {record['build_s']:.0f} s")

        mode = e2e.graph_mode(self.device)
        record["mode"] = mode
        adapters = self.adapters()
        self.names = list(adapters)

        def compile_ours():
            began = time.perf_counter()
            # The LoRA kernels' split sums reduced in the shrink (no memset a call): read at each
            # call site's first launch, so set before anything runs.
            launch_config.SUMS_IN_KERNEL = config.get("sums_in_kernel", False)
            # mmlora_fx.compile hands its other keywords to torch.compile (api.compile's
            # **compile_kwargs -> model.compile), so dynamic=False reaches it as it does the base.
            self.mm = mmlora_fx.compile(model, adapters, max_loras=max(config["mixes"]), max_lora_rank=e2e.RANK,
                                        mode=mode, dynamic=False, max_batch_size=max(config["batches"]),
                                        inner=config["inner"], stack_max_rows=config["stack_max_rows"],
                                        stack_expand=config.get("stack_expand", "kernel"),
                                        stack_shrink=config.get("stack_shrink", "gemm"),
                                        fused_gemv=config.get("fused_gemv", False))
            record["ours_setup_s"] = time.perf_counter() - began

        if config["stack_max_rows"]:
            # The stack moves ours' weights into buffers with every slot's A below them. The base
            # takes the same views (same values, same layout), so that one copy of the weights
            # serves both and the base's GEMMs read what they read without it; before anything
            # compiles, which is lazy (the first call). The base lets go of its linears' weights
            # first, so that each old weight is freed as its buffer is made (no moment with two
            # copies), and then takes every linear's weight from ours, moved or not.
            linears = [name for name, module in base_module.named_modules() if isinstance(module, torch.nn.Linear)]
            for name in linears:
                base_module.get_submodule(name).weight = base_module.get_submodule(name).bias = None
            compile_ours()
            for name in linears:
                mine, base = model.get_submodule(name), base_module.get_submodule(name)
                base.weight, base.bias = mine.weight, mine.bias
            assert all(a is b for a, b in zip(model.parameters(), base_module.parameters()))
            record["stacked_linears"] = len(self.mm.runtime.folds)
        self.base = torch.compile(base_module, backend=config["inner"], mode=mode, dynamic=False)
        self.warm_base()
        self.save()

        if not config["stack_max_rows"]:
            compile_ours()
        served = sorted(self.mm.runtime.serving.served)
        record["served_targets"] = len(served)
        record["served_expert_weights"] = len([name for name in served
                                               if any(name.endswith("." + target) for target in e2e.EXPERT_TARGETS)])
        self.log(f"ours serves {len(served)} targets, {record['served_expert_weights']} of them expert weights")
        if config["model"] == "moe" and not record["served_expert_weights"]:
            raise RuntimeError("no expert weight is served: the MoE figure would measure attention LoRA only")
        record["ours_dynamic_false_passed"] = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter
                                                  in inspect.signature(mmlora_fx.compile).parameters.values())
        record["isolate_recompiles"] = "isolate_recompiles" in inspect.signature(torch.compile).parameters
        for batch, step in self.steps.items():
            self.warm_ours(batch, step)
            record["lora_effect"][batch] = self.lora_effect(batch, step)
            effect = record["lora_effect"][batch]
            self.log(f"ours b{batch}: LoRA effect on the logits {effect:.3f}"
                     + (" -- NEAR ZERO: ours did not apply LoRA, its times mean nothing" if effect < 1e-3 else ""))
        record["graphs_ours"] = self.mm.compiled_graphs
        # LoRA ops in ours' compiled graphs: expert ones too for the MoE model (else its experts ran
        # without LoRA in the graphs).
        ops = [op.target for graph in self.mm.backend.records for op in lora_ops(graph.graph_module)]
        record["graph_lora_ops"] = len(ops)
        record["graph_expert_lora_ops"] = sum(target is torch.ops.mmlora.lora_experts_.default for target in ops)
        self.log(f"ours' graphs hold {len(ops)} LoRA ops, {record['graph_expert_lora_ops']} on expert weights")
        if config["model"] == "moe" and not record["graph_expert_lora_ops"]:
            raise RuntimeError("ours' graphs hold no expert LoRA op")
        if self.cuda:
            record["memory_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
            record["memory_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
        self.save()

    def lora_effect(self, batch: int, step) -> float:
        """max |ours - base| / max |base| of one step's logits, with the batch's largest mix."""
        self.prepare(self.assignment(batch, mixes_for(self.config, batch)[-1]))
        step.rewind()
        self.one(step, None)
        step.rewind()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        ours = step().float().clone()  # cloned: the next step may reuse the graph's output memory
        step.rewind()
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()
        base = step(self.base).float().clone()
        step.rewind()
        return ((ours - base).abs().max() / base.abs().max()).item()

    # ---------------------------------------------------------------- timing
    def block(self, step, call) -> float:
        """ms per step of one block of `steps` steps, one event pair (or perf_counter on the CPU)."""
        config = self.config
        step.rewind()
        for _ in range(config["block_warmup"]):  # the first step after the other model's block
            self.one(step, call)
        step.rewind()
        self.sync()
        return timed_steps(lambda: self.one(step, call), config["steps"], self.device, config["sync"] == "step")

    def time_batch(self, batch: int, share_ends: float) -> None:
        config, step, record = self.config, self.steps[batch], self.record
        mixes = mixes_for(config, batch)
        old_guess = (config["old_repeats"] + 3) * (1 + len(mixes)) * 0.1  # 100 ms a step: generous
        if time.time() + old_guess > share_ends:
            for distinct in mixes:
                record["skipped"].append(dict(batch=batch, mix=distinct, what="old and new", reason="budget"))
            self.log(f"b{batch}: skipped (budget)")
            return
        state = gpu_state()

        # Old: e2e's part_decode, the base once per batch, then ours per mix (20 single steps).
        step.rewind()
        old_base = e2e.timed(lambda: self.one(step, self.base), self.device, repeats=config["old_repeats"])
        old_ours = {}
        for distinct in mixes:
            self.prepare(self.assignment(batch, distinct))
            self.sync()
            step.rewind()
            old_ours[distinct] = e2e.timed(lambda: self.one(step, None), self.device, repeats=config["old_repeats"])

        # New: fit as many of the mixes as the share allows (smallest first), then interleave.
        kept = []
        cost = config["rounds"] * self.block_seconds(old_base)
        for distinct in mixes:
            more = config["rounds"] * self.block_seconds(old_ours[distinct])
            if time.time() + cost + more > share_ends:
                break
            kept.append(distinct)
            cost += more
        for distinct in mixes[len(kept):]:
            record["skipped"].append(dict(batch=batch, mix=distinct, what="new", reason="budget"))
        variants = ["base"] + kept
        blocks = {variant: [] for variant in variants}
        orders = []
        if kept:
            for round_index in range(config["rounds"]):
                if round_index % 2 == 0:
                    # Rounds go in pairs (A B, B A: drift cancels), so check a pair's time, from
                    # the blocks measured so far: the old method's guess may be off.
                    pair = min(2, config["rounds"] - round_index)
                    guess = pair * sum(self.block_seconds(blocks[variant][-1] if blocks[variant] else
                                                          (old_base if variant == "base" else old_ours[variant]))
                                       for variant in variants)
                    if time.time() + guess > share_ends:
                        record["skipped"].append(dict(batch=batch, mix=kept, what=f"new rounds {round_index}+",
                                                      reason="budget"))
                        self.log(f"b{batch}: new method cut after {round_index} rounds (budget)")
                        break
                order = variants if round_index % 2 == 0 else variants[::-1]
                orders.append(order)
                for variant in order:
                    if variant == "base":
                        blocks["base"].append(self.block(step, self.base))
                    else:
                        self.prepare(self.assignment(batch, variant))
                        self.sync()
                        blocks[variant].append(self.block(step, None))

        for distinct in mixes:
            entry = dict(batch=batch, mix=distinct, gpu_state_before=state,
                         old=dict(base_ms=old_base, ours_ms=old_ours[distinct],
                                  overhead=old_ours[distinct] / old_base - 1))
            if distinct in kept and blocks[distinct]:
                ratios = [ours / base for ours, base in zip(blocks[distinct], blocks["base"])]
                entry["new"] = dict(
                    overhead=statistics.median(ratios) - 1, rounds_overhead=[ratio - 1 for ratio in ratios],
                    rounds_min=min(ratios) - 1, rounds_max=max(ratios) - 1,
                    pooled_overhead=sum(blocks[distinct]) / sum(blocks["base"]) - 1,
                    rounds=len(ratios), base_ms=statistics.median(blocks["base"]), ours_ms=statistics.median(blocks[distinct]),
                    base_block_ms=blocks["base"], ours_block_ms=blocks[distinct], orders=orders)
            record["timings"].append(entry)
            new = entry.get("new")
            self.log(f"b{batch} d{distinct}: old {entry['old']['overhead']:+.1%} (base {old_base:.2f} ms); new "
                     + (f"{new['overhead']:+.1%} [{new['rounds_min']:+.1%}..{new['rounds_max']:+.1%}] over "
                        f"{len(blocks['base'])} rounds (base {new['base_ms']:.2f} ms, ours {new['ours_ms']:.2f} ms)"
                        if new else "skipped (budget)"))
        self.save()

    def time_all(self) -> None:
        config, record = self.config, self.record
        runs = config["runs"]
        # Everyone compiled and warm (or the timeout): from here on nothing compiles beside a
        # timing run. The timeout leaves the budget's end for timing what there is.
        record["barrier"] = barrier = self.barrier()
        barrier["ready"] = count(self.shared, "ready")
        self.log(f"barrier {'complete' if barrier['complete'] else 'TIMED OUT'} after {barrier['waited_s']:.0f} s")
        with exclusive(self.shared / "gpu.lock", self.deadline - RESERVE_S) as waited:
            if waited is None:
                record["skipped"].append(dict(what="all timings", reason="lock not acquired before the deadline"))
                return
            share = self.fair_share()
            share_ends = time.time() + share
            record["timing"] = dict(lock_waited_s=waited, share_s=share, started=datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"), still_compiling=runs - count(self.shared, "ready"))
            self.log(f"timing (lock after {waited:.0f} s, share {share:.0f} s)")
            timing_began = time.time()
            record["timing"]["gpu_state_start"] = gpu_state()
            record["timing"]["clock_reasons_start"] = clock_reasons()
            with ClockSampler(self.shared / f"clocks.{self.index}.csv") as sampler:
                for batch in config["batches"]:
                    self.time_batch(batch, share_ends)
            record["timing"]["gpu_state_end"] = gpu_state()
            record["timing"]["clock_reasons_end"] = clock_reasons()
            record["timing"]["clocks"] = sampler.summary()
            record["timing"]["seconds"] = time.time() - timing_began
            self.save()
            mark(self.shared, "done", self.index)

    def main(self) -> int:
        try:
            self.log(f"start (pid {os.getpid()}, Inductor cache {self.record['inductor_cache']})")
            if self.config["serial_compile"]:
                with exclusive(self.shared / "gpu.lock", self.deadline - RESERVE_S) as waited:
                    if waited is None:
                        raise RuntimeError("compile lock not acquired before the deadline")
                    self.compile_and_warm()
            else:
                self.compile_and_warm()
            mark(self.shared, "ready", self.index)
            self.time_all()
            status = 0
        except Exception as error:  # recorded; the others go on (a KeyboardInterrupt or a kill stops it)
            status = self.failed(error)
        finally:
            self.save()
            mark(self.shared, "ready", self.index)
            mark(self.shared, "done", self.index)
        # Stay alive (idle, GPU memory kept) until every run has timed: a process exiting tears
        # down its CUDA context, which should not happen beside a run that times (a failed run too).
        wait_for(lambda: count(self.shared, "done") >= self.config["runs"], self.deadline)
        return status


# --------------------------------------------------------------------------- parent
def summarize(config: dict, runs: list[dict]) -> list[dict]:
    rows = []
    for batch in config["batches"]:
        for distinct in mixes_for(config, batch):
            entries = [entry for run in runs for entry in run.get("timings", [])
                       if entry["batch"] == batch and entry["mix"] == distinct]
            news = [entry["new"] for entry in entries if "new" in entry]
            first = [run.get("first_call_s", {}) for run in runs]
            rows.append(dict(
                batch=batch, mix=distinct, runs_old=len(entries), runs_new=len(news),
                old_overhead=spread([entry["old"]["overhead"] for entry in entries]),
                new_overhead=spread([new["overhead"] for new in news]),
                new_pooled_overhead=spread([new["pooled_overhead"] for new in news]),
                within_run_rounds_spread=spread([new["rounds_max"] - new["rounds_min"] for new in news]),
                old_base_ms=spread([entry["old"]["base_ms"] for entry in entries]),
                old_ours_ms=spread([entry["old"]["ours_ms"] for entry in entries]),
                base_ms=spread([new["base_ms"] for new in news]), ours_ms=spread([new["ours_ms"] for new in news]),
                first_call_base_s=spread([f.get("base", {}).get(str(batch), f.get("base", {}).get(batch))
                                          for f in first]),
                first_call_ours_s=spread([f.get("ours", {}).get(str(batch), f.get("ours", {}).get(batch))
                                          for f in first])))
    return rows


def table(rows: list[dict]) -> list[str]:
    def overhead(found):
        if not found:
            return "-"
        return f"{found['median']:+.1%} [{found['min']:+.1%}..{found['max']:+.1%}]"

    def points(found):
        return f"{(found['max'] - found['min']) * 100:.1f}" if found else "-"

    def ms(found):
        return f"{found['median']:.2f}" if found else "-"

    lines = [f"{'b/d':>6}  {'old overhead med [min..max]':>29} {'pts':>5}  {'new overhead med [min..max]':>29} "
             f"{'pts':>5}  {'rounds pts':>10}  {'base ms':>8}  {'ours ms':>8}  runs"]
    for row in rows:
        rounds = row["within_run_rounds_spread"]
        rounds_points = f"{rounds['median'] * 100:.1f}" if rounds else "-"
        lines.append(f"{row['batch']:>3}/{row['mix']:<2}  {overhead(row['old_overhead']):>29} "
                     f"{points(row['old_overhead']):>5}  {overhead(row['new_overhead']):>29} "
                     f"{points(row['new_overhead']):>5}  {rounds_points:>10}  "
                     f"{ms(row['base_ms']):>8}  {ms(row['ours_ms']):>8}  {row['runs_old']}/{row['runs_new']}")
    lines.append("pts: max - min over runs in points of overhead; rounds pts: median over runs of the rounds' "
                 "max - min; base/ours ms: new method, median over runs; runs: old/new")
    widest = {method: max(((row[f"{method}_overhead"]["max"] - row[f"{method}_overhead"]["min"]) * 100
                           for row in rows if row[f"{method}_overhead"] and len(row[f"{method}_overhead"]["values"]) > 1),
                          default=None) for method in ("old", "new")}
    lines.append("widest spread over runs: " + ", ".join(
        f"{method} {value:.1f} pts" if value is not None else f"{method} -" for method, value in widest.items()))
    first = []
    for row in rows:
        if row["mix"] == min(r["mix"] for r in rows if r["batch"] == row["batch"]):
            base, ours = row["first_call_base_s"], row["first_call_ours_s"]
            first.append(f"b{row['batch']} base {base['median']:.0f} / ours {ours['median']:.0f}"
                         if base and ours else f"b{row['batch']} -")
    lines.append("first call s (compile + CUDA-graph warm-up, median over runs): " + "; ".join(first))
    return lines


class Launch:
    """A parent's start and end (this script's and tp_decode.py's): its clock `t0`, the `deadline`
    (t0 + --budget-s), --out made, and a scratch folder `shared` with the processes it starts, each
    the `script` again in a role (`start`); `finish` writes the result and removes the folder."""

    def __init__(self, args, script: str, prefix: str):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget_s
        args.out.mkdir(parents=True, exist_ok=True)
        self.shared = Path(tempfile.mkdtemp(prefix=prefix))
        self.script = str(Path(script).resolve())
        self.common = [*sys.argv[1:], "--shared", str(self.shared), "--t0", repr(self.t0),
                       "--deadline", repr(self.deadline)]

    def start(self, role: str, *more: str, env: dict | None = None) -> subprocess.Popen:
        """The script again, with the parent's flags and the shared folder, in `role`."""
        return subprocess.Popen([sys.executable, self.script, *self.common, "--role", role, *more], env=env)

    @staticmethod
    def env(caches: Path, threads: int) -> dict:
        """A compiling process's environment: Inductor and Triton caches of its own under `caches`
        (nothing inherited), and its share of the cores (`threads`) unless set."""
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"))
        # The runs compile side by side: split the cores rather than start runs x cores workers.
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
        # And their intra-op threads: runs x cores OpenMP threads made every small host op of the
        # adapter loads wait on descheduled threads (2026-12-06, H100: two runs sat in
        # AdapterManager._pack for 85 s and more, where one process loads the 32 adapters in 3 s).
        env.setdefault("OMP_NUM_THREADS", str(threads))
        return env

    def finish(self, result: dict, name: str) -> None:
        """`result` with its seconds as `name` under --out; the shared folder removed (--keep-caches: kept)."""
        result["seconds"] = time.time() - self.t0
        (self.args.out / name).write_text(json.dumps(result, indent=1))
        if not self.args.keep_caches:
            shutil.rmtree(self.shared, ignore_errors=True)
        log("main", self.t0, f"wrote {self.args.out / name}")


def parent(args) -> int:
    config = settings(args)
    launch = Launch(args, __file__, "decode-overhead-")
    t0, deadline, shared = launch.t0, launch.deadline, launch.shared
    if not args.commit:
        log("main", t0, "no --commit given: the local git HEAD is recorded (stale on the device)")
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]), commit=args.commit, git_head_here=checkout_commit(),
        versions=versions(), settings=config, spec=e2e.SPECS[config["model"], config["tiny"]], kv=e2e.KV,
        rank=e2e.RANK, device=None, gpu=None)
    if not config["tiny"]:
        result["gpu"] = gpu_state("name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit")
    writer = launch.start("adapters")
    children = {}
    threads = max(1, (os.cpu_count() or 1) // config["runs"])
    for index in range(config["runs"]):
        children[index] = launch.start("child", "--index", str(index), env=launch.env(shared / f"run{index}", threads))
    log("main", t0, f"{config['runs']} runs started; budget {args.budget_s:.0f} s")
    ended = {}
    writer_rc = None
    while len(ended) < len(children) and time.time() < deadline + GRACE_S:
        if writer_rc is None and writer.poll() is not None:
            writer_rc = writer.returncode
            if writer_rc != 0:
                (shared / "adapters.failed").touch()
        for index, child in children.items():
            if index not in ended and child.poll() is not None:
                ended[index] = child.returncode
                # A run that died hard wrote no markers: let the barrier and the lock go on without it.
                mark(shared, "ready", index)
                mark(shared, "done", index)
                log("main", t0, f"run{index} exited with {child.returncode}")
        time.sleep(0.5)
    stop_processes([(None, writer), *children.items()], ended, "killed at the budget")  # past the budget: ours to stop
    runs = []
    for index in range(config["runs"]):
        path = args.out / f"run{index}.json"
        run = json.loads(path.read_text()) if path.exists() else dict(index=index, error="no output")
        run["exit"] = ended.get(index)
        runs.append(run)
    result["device"] = next((run["device"] for run in runs if run.get("device")), None)
    result["runs"] = runs
    result["summary"] = summarize(config, runs)
    launch.finish(result, "decode_overhead.json")
    print("\n".join(table(result["summary"])), flush=True)
    failed = [run["index"] for run in runs if run.get("error")]
    return 1 if failed else 0


def run_role(parser, parent, write_adapters, worker, worker_role: str, internal: tuple[str, ...] = ("index",),
             keep_caches_help: str | None = None) -> int:
    """The end of the main of a script whose parent starts itself again in other roles (this one,
    tp_decode.py): adds --commit, --keep-caches and the internal flags (--role, the ints `internal`
    that place a worker, --shared, --t0, --deadline), parses, and runs the role: `parent(args)`,
    `write_adapters(args)` (role "adapters") or `worker(args).main()` (role `worker_role`)."""
    parser.add_argument("--commit", default=None, help="the commit measured (the device's git HEAD is stale)")
    parser.add_argument("--keep-caches", action="store_true", help=keep_caches_help)
    # Internal: the parent starts itself again in these roles.
    parser.add_argument("--role", choices=["parent", worker_role, "adapters"], default="parent", help=argparse.SUPPRESS)
    for name in internal:
        parser.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shared", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "parent":
        return parent(args)
    if args.role == "adapters":
        return write_adapters(args)
    return worker(args).main()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3, help="independent compilations, one process each")
    parser.add_argument("--model", choices=["dense", "moe"], default="dense",
                        help="e2e's Qwen2-VL-7B-shaped model (dense) or its Qwen3-VL-30B-A3B-LM-shaped MoE model")
    parser.add_argument("--tiny", action="store_true", help="e2e's tiny config on the CPU, to check the script")
    parser.add_argument("--batches", default=None, help="default 1,16,64 (tiny: 1,4)")
    parser.add_argument("--mixes", default=None, help="distinct adapters, default 1,8,32 (tiny: 1,2)")
    parser.add_argument("--rounds", type=int, default=None, help="new method: rounds, default 6 (tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="new method: steps per block, default 100 (tiny: 10)")
    parser.add_argument("--block-warmup", type=int, default=1, help="untimed steps before each block")
    parser.add_argument("--old-repeats", type=int, default=None, help="old method: timed single steps, default 20 "
                        "as e2e (tiny: 5)")
    parser.add_argument("--sync", choices=["step", "block"], default="step",
                        help="new method: sync after every step (as decode reads tokens back) or once per block")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget from the start")
    parser.add_argument("--serial-compile", action="store_true", help="runs also compile one at a time (the lock)")
    parser.add_argument("--inner", default=None, help="the compiler of both models: inductor (tiny: eager)")
    parser.add_argument("--stack-max-rows", type=int, default=None,
                        help="mmlora_fx.compile's stack_max_rows: the shrink in the base GEMMs of calls on at most "
                             "this many rows (every slot's A stacked under each weight; the base shares the views)")
    parser.add_argument("--stack-expand", choices=["kernel", "inductor"], default="kernel",
                        help="mmlora_fx.compile's stack_expand: who adds the stacked calls' expand (the stack's Triton "
                             "kernel, or tensor ops in the graph that Inductor fuses into the outputs' readers)")
    parser.add_argument("--served-call", action="store_true",
                        help="ours' steps through mm(..., adapter_names=...) as a server calls it each step (prepare, "
                             "the call's scope and checks on the host), not the compiled model alone")
    parser.add_argument("--stack-shrink", choices=["gemm", "inductor", "inductor_columns"], default="gemm",
                        help="mmlora_fx.compile's stack_shrink (with --stack-expand inductor): the graph expand's calls' "
                             "shrink in the stacked GEMM, or tensor ops: one reduction a call (inductor), or one per "
                             "rank column that Inductor fuses into the input's producer (inductor_columns)")
    parser.add_argument("--fused-gemv", action="store_true",
                        help="mmlora_fx.compile's fused_gemv: the language model's linear calls on one row (batch 1) "
                             "as one kernel each, the base GEMV with the row's LoRA inside")
    parser.add_argument("--sums-in-kernel", action="store_true",
                        help="the LoRA kernels' split sums reduced in the shrink (kernels/launch_config.py's "
                             "SUMS_IN_KERNEL: no memset a call) instead of float32 atomics into zeroed sums")
    return run_role(parser, parent, write_adapters, Run, "child",
                    keep_caches_help="keep the runs' Inductor/Triton caches")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
