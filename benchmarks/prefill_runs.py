"""What the prefill benchmarks (`audio_prefill.py`, `prefill_overhead.py`) share: independent
compilations as subprocesses with fresh Inductor and Triton caches, waves of runs under a time
budget, interleaved timing, per-request errors, and joining several calls' JSON.

Each script keeps its own model, batch, run and summary; these pieces are the same logic in both,
so they live here once (moved from audio_prefill.py unchanged but for the run's command line and
the JSON's name, which the caller passes)."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.e2e import synchronize  # noqa: E402
from benchmarks.run_record import checkout_commit, versions  # noqa: E402


# --------------------------------------------------------------------------- measuring
def timed_calls(function, count: int, device) -> list[float]:
    """Milliseconds of each of `count` calls, each between two synchronisations (host work included)."""
    samples = []
    for _ in range(count):
        synchronize(device)
        began = time.perf_counter()
        output = function()
        synchronize(device)
        samples.append((time.perf_counter() - began) * 1e3)
        del output
    return samples


def spread(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def row_errors(ours, reference, attention_mask) -> list[float]:
    """Per request: max |ours - reference| / max |reference| over the request's own positions."""
    errors = []
    for row in range(reference.shape[0]):
        keep = attention_mask[row].bool()
        a, b = ours[row][keep].float(), reference[row][keep].float()
        errors.append(((a - b).abs().max() / b.abs().max()).item())
    return errors


def check_against_eager(record: dict, compiled, eager, base, own) -> None:
    """The correctness check of a run (or case): the compiled mmlora_fx's logits against `mm.eager`'s
    per request over its own positions (`own`, as `row_errors`), passing at max(4 x the request's
    base noise, 1e-2), with `record["base_noise"]` the compiled base against the eager base; and
    the adapters' effect, `base`'s logits against `mm.eager`'s (recorded, to show LoRA was applied).
    Sets mmlora_vs_eager, adapter_effect, tolerance and passed in `record`."""
    record["mmlora_vs_eager"] = row_errors(compiled, eager, own)
    record["adapter_effect"] = row_errors(base, eager, own)
    record["tolerance"] = [max(4 * noise, 1e-2) for noise in record["base_noise"]]
    record["passed"] = all(error <= limit for error, limit in zip(record["mmlora_vs_eager"], record["tolerance"]))


def fresh_caches(root: Path, which: str) -> None:
    """Point Inductor and Triton at empty cache directories for the compilation that comes next.

    Both read the variables when they compile; the compile workers keep the environment they
    started with, so they are stopped first (they restart on the next compilation)."""
    try:
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
    except Exception:  # an older torch without it: the workers keep the base's Triton cache
        pass
    for variable, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        path = root / which / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(path)


def wait_for_siblings(barrier: Path | None, count: int, index: int, timeout_s: float) -> float:
    """Parallel runs: wait until every run of this wave has compiled (or `timeout_s`), so that no
    run times its forwards while another compiles on the same host. Returns the seconds waited."""
    if barrier is None or count <= 1:
        return 0.0
    (barrier / f"ready-{index}").write_text("")
    began = time.perf_counter()
    while len(list(barrier.glob("ready-*"))) < count and time.perf_counter() - began < timeout_s:
        time.sleep(0.5)
    return time.perf_counter() - began



def run_wave(args, indices: list[int], deadline: float | None, runs_dir: Path, child_command, prefix: str) -> list[dict]:
    """Run the compilations `indices` at once (one GPU each when more than one), until done or `deadline`.
    `child_command(args, index, result, cache, barrier, count)` is the script's command line for one run."""
    results = []
    with tempfile.TemporaryDirectory(prefix=prefix) as scratch:
        scratch = Path(scratch)
        barrier = scratch / "barrier"
        barrier.mkdir()
        processes = []
        for slot, index in enumerate(indices):
            cache = scratch / f"run{index}"
            cache.mkdir()
            environment = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "base" / "inductor"),
                               TRITON_CACHE_DIR=str(cache / "base" / "triton"), PYTHONUNBUFFERED="1")
            if len(indices) > 1:
                if not args.share_gpu:
                    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                    environment["CUDA_VISIBLE_DEVICES"] = visible.split(",")[slot] if visible else str(slot)
                # Compilations in parallel share the host's cores; each gets its share of workers.
                environment["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 2) // len(indices) - 2))
                # Intra-op threads too: runs x cores OpenMP threads stalled the adapter loads of
                # concurrent runs (decode_overhead.py, 2026-12-06).
                environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // len(indices)))
            result = runs_dir / f"run{index}.json"
            command = child_command(args, index, result, cache, barrier, len(indices))
            # A session of its own, so that a stopped run takes its compile workers with it.
            process = subprocess.Popen(command, env=environment, cwd=ROOT, start_new_session=True)
            processes.append((index, process, result))
        stopped = set()
        while any(process.poll() is None for _, process, _ in processes):
            if deadline is not None and time.time() > deadline:
                for index, process, _ in processes:
                    if process.poll() is None:
                        print(f"[parent] budget reached: stopping run {index}", flush=True)
                        os.killpg(process.pid, signal.SIGKILL)
                        stopped.add(index)
                break
            for index, process, _ in processes:
                # A run that failed before the barrier would hold its siblings there: stand in for it.
                if process.poll() not in (None, 0):
                    (barrier / f"ready-{index}").write_text("")
            time.sleep(1)
        for index, process, result in processes:
            process.wait()
            found = json.loads(result.read_text()) if result.is_file() else {"run": index}
            if index in stopped:
                found["status"] = "stopped at the time budget"
            elif process.returncode != 0 and "error" not in found:
                found["error"] = f"the run exited with {process.returncode}"
            found["returncode"] = process.returncode
            results.append(found)
    return results


def stat(values) -> dict | None:
    """Median, min and max of the values that are not None (None when there are none)."""
    values = [value for value in values if value is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def extreme(records: list[dict], key: str, pick=max):
    """The largest (`pick=min`: smallest) per-request value of `key` over the records that have it."""
    return pick((pick(record[key]) for record in records if key in record), default=None)


# --------------------------------------------------------------------------- the runs
def run_waves(args, summarise, name: str, child_command, prefix: str) -> dict:
    """The parent: `args.runs` compilations, `args.gpus` at a time, until done or `--budget-s`
    (no wave starts that would not end in time by the longest so far). The report (date, versions,
    commit, command, every run, `summarise(runs)`) is rewritten under --out after each wave, so a
    call cut off still leaves the runs done."""
    began = time.time()
    deadline = began + args.budget_s - 15 if args.budget_s else None  # 15 s left to write the JSON
    runs_dir = args.out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": None, "versions": versions(),
              "commit": args.commit or f"{checkout_commit()} (checkout HEAD, not passed with --commit)",
              "command": " ".join([Path(sys.executable).name] + sys.argv), "runs": [], "skipped": []}
    indices = list(range(args.runs))
    wave_size = max(1, args.gpus)
    longest = 0.0
    while indices:
        wave, indices = indices[:wave_size], indices[wave_size:]
        elapsed = time.time() - began
        if deadline is not None and longest and time.time() + longest > deadline:
            report["skipped"] += wave + indices
            print(f"[parent] {elapsed:.0f} s: skipping runs {wave + indices}: the longest run took {longest:.0f} s "
                  f"and the budget is {args.budget_s:.0f} s", flush=True)
            break
        print(f"[parent] {elapsed:.0f} s: starting run(s) {wave}", flush=True)
        wave_began = time.time()
        for found in run_wave(args, wave, deadline, runs_dir, child_command, prefix):
            report["runs"].append(found)
            report["device"] = report["device"] or found.get("device")
        longest = max(longest, time.time() - wave_began)
        report["setup"] = next((run["setup"] for run in report["runs"] if "setup" in run), None)
        report["summary"] = summarise(report["runs"])
        (args.out / name).write_text(json.dumps(report, indent=2))  # kept if the call is cut off
        print(f"[parent] {time.time() - began:.0f} s: run(s) {wave} done in {time.time() - wave_began:.0f} s",
              flush=True)
    report["setup"] = next((run["setup"] for run in report["runs"] if "setup" in run), None)
    report["summary"] = summarise(report["runs"])
    report["seconds"] = time.time() - began
    if args.tiny:
        report["note"] = "--tiny: a check of the script on a tiny config, not a measurement"
    return report


# What a run's setup fixes about what it measures: runs that differ in any of these are not
# runs of one setting, and their median would mean nothing.
MERGE_MUST_AGREE = ("model", "dtype", "backend", "mode", "fold_min_rows", "tower_attention", "rank",
                    "adapter_modules", "max_loras")


def merged(paths: list[Path], summarise) -> dict:
    """Several parents' JSON (separate device calls) as one: every run, the summary recomputed.

    Refuses (ValueError) reports whose setups differ in any of `MERGE_MUST_AGREE`, or that ran on
    another device or torch build."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    def fixed(report):  # the setup's keys, the device and the torch build
        return dict((report.get("setup") or {}), device=report.get("device"),
                    torch=(report.get("versions") or {}).get("torch"))

    first = fixed(reports[0])
    for path, report in zip(paths[1:], reports[1:]):
        setup = fixed(report)
        differ = [f"{key}: {first.get(key)!r} in {paths[0]}, {setup.get(key)!r} in {path}"
                  for key in MERGE_MUST_AGREE + ("device", "torch") if first.get(key) != setup.get(key)]
        if differ:
            raise ValueError("cannot merge runs of different settings; " + "; ".join(differ))
    runs = []
    for path, report in zip(paths, reports):
        for run in report["runs"]:
            runs.append(dict(run, run=len(runs), run_in_source=run.get("run"), source=str(path),
                             source_commit=report.get("commit")))
    result = {key: reports[0].get(key) for key in ("date", "device", "versions", "commit", "setup")}
    result.update(command=" ".join(sys.argv), merged_from=[
        {key: report.get(key) for key in ("date", "device", "versions", "commit", "command")} for report in reports],
        runs=runs, summary=summarise(runs))
    return result


# --------------------------------------------------------------------------- inside one run
def run_log(result: dict, out: Path, index: int, started: float):
    """`save()` writes the run's result now (a run stopped later keeps what it had); `phase(name,
    since)` records and prints the seconds since `since`, saves, and returns the time now."""
    def save():
        out.write_text(json.dumps(result, indent=2))

    def phase(name: str, since: float) -> float:
        now = time.perf_counter()
        result["phases_s"][name] = round(now - since, 2)
        print(f"[run {index}] {now - started:7.1f} s  {name} ({now - since:.1f} s)", flush=True)
        save()
        return now

    return save, phase


def end_run(result: dict, save, started: float, device, index: int, error: Exception | None = None) -> int:
    """The run's last record (peak GPU memory, or the error and its traceback), saved; its exit status."""
    if error is None:
        if device.type == "cuda":
            result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
        result["traceback"] = traceback.format_exc()[-6000:]
    result["seconds"] = time.perf_counter() - started
    save()
    if error is not None:
        print(f"[run {index}] FAILED: {result['error']}", flush=True)
    return 0 if error is None else 1


_HELD = []  # the GPU lock's file, open (so held) until the process exits


def take_gpu(args) -> float | None:
    """Runs sharing one GPU (--share-gpu) compile at once but time one at a time: the lock is held
    from here to the end of the run (timing, checks, syncs). Seconds waited; None when not shared."""
    if not (args.share_gpu and args.barrier):
        return None
    gpu_lock = open(Path(args.barrier) / "gpu.lock", "w")
    _HELD.append(gpu_lock)
    began = time.perf_counter()
    fcntl.flock(gpu_lock, fcntl.LOCK_EX)
    return time.perf_counter() - began


def wait_turn(args, result: dict, phase, mark: float) -> float:
    """A compiled and warm run's wait before it times: for the other runs of its wave to compile
    (`wait_for_siblings`), then with --share-gpu for the GPU (`take_gpu`), the seconds recorded in
    `result` as waited_for_siblings_s and waited_for_gpu_s. Returns `phase`'s mark: a new one
    after waiting for the GPU, else `mark`."""
    result["waited_for_siblings_s"] = wait_for_siblings(
        Path(args.barrier) if args.barrier else None, args.barrier_count, args.run_index, args.barrier_timeout_s)
    waited = take_gpu(args)
    if waited is not None:
        result["waited_for_gpu_s"] = waited
        mark = phase("GPU to itself", mark)
    return mark


def interleaved(forwards: dict, rounds: int, block: int, device, after_round=lambda round_: None):
    """`rounds` rounds of a block of `block` timed calls of each of the two `forwards` ({name:
    function}), the order alternating per round, so that drift of the machine (clocks, temperature,
    the host) falls on both. Returns every call's ms by name, and each block's median."""
    names = list(forwards)
    samples = {name: [] for name in names}
    blocks = []
    for round_ in range(rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            found = timed_calls(forwards[name], block, device)
            samples[name] += found
            blocks.append({"round": round_, "which": name, "median_ms": statistics.median(found)})
        after_round(round_)
    return samples, blocks


# --------------------------------------------------------------------------- arguments
def add_run_arguments(parser) -> None:
    """The arguments every prefill benchmark takes; each script adds its own (--inner, --merge, ...)."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", help="the code's commit (the device copy's git HEAD may be stale)")
    parser.add_argument("--runs", type=int, default=3, help="independent compilations, one subprocess each")
    parser.add_argument("--gpus", type=int, default=1, help="runs at once, one GPU each (1: one after another)")
    parser.add_argument("--share-gpu", action="store_true",
                        help="the --gpus runs at once share one GPU: they compile together and time one at a time")
    parser.add_argument("--tiny", action="store_true", help="a tiny config on the CPU, to check the script")
    parser.add_argument("--rounds", type=int, help="timed rounds, each a block of base and of mmlora_fx (4; --tiny 2)")
    parser.add_argument("--block", type=int, help="timed forwards per block (10; --tiny 3)")
    parser.add_argument("--warmup", type=int, help="forwards of each after the first, untimed (2; --tiny 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=560,
                        help="wall seconds for the whole command (0: none): no run starts that would not end "
                        "in time by the longest so far, and a run still going at the end is stopped")
    parser.add_argument("--barrier-timeout-s", type=float, default=300, help=argparse.SUPPRESS)
    # The subprocess's own arguments.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--barrier-count", type=int, default=1, help=argparse.SUPPRESS)


def fill_defaults(args) -> None:
    """--tiny checks the script, not the speed: fewer forwards, and no C++ builds on the CPU."""
    for key, full, tiny in (("inner", "inductor", "aot_eager"), ("rounds", 4, 2), ("block", 10, 3), ("warmup", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)


def child_arguments(args, index: int, result: Path, cache: Path, barrier: Path, count: int, script: str,
                    flags=("tiny", "share_gpu")) -> list[str]:
    """The command line of run `index`: the shared arguments, and `flags` where set."""
    command = [sys.executable, script, "--child", "--run-index", str(index),
               "--result", str(result), "--cache-dir", str(cache), "--barrier", str(barrier),
               "--barrier-count", str(count), "--out", str(args.out), "--seed", str(args.seed),
               "--rounds", str(args.rounds), "--block", str(args.block), "--warmup", str(args.warmup),
               "--barrier-timeout-s", str(args.barrier_timeout_s), "--inner", args.inner]
    for flag in flags:
        if getattr(args, flag):
            command.append("--" + flag.replace("_", "-"))
    return command
