"""Host work per LoRA op call, on the CPU, with the kernels stubbed out (#16).

    python3 benchmarks/host_cost.py [--json out.json] [--commit <sha>]

Prefill without CUDA graphs is host-bound: every served linear costs a graph-level op call
(`torch.ops.mmlora.lora_linear_`: dispatch, weight lookup, the runtime's plan and table) and a
`lora_add` launch (shape checks, launch parameters, two Triton launches), hundreds per forward.
This times the Python part of both on whatever CPU runs it, without a GPU:

* `graph op`: `torch.ops.mmlora.lora_linear_` on a compiled tiny-llava (q and v of layer 0, as
  the compiled graph calls it, under `torch.no_grad`), up to the call into the kernels, which is
  replaced by a no-op;
* `launch`: `kernels.lora_add.launch` for the e2e model's q/k/v group (3584 -> 3584, 512, 512,
  rank 16, 32 slots, 256 request entries, bf16) at 1, 16 and 4096 rows, with the four Triton
  kernels replaced by no-ops (what remains is our launcher's Python; Triton's own launcher,
  twice per call, comes on top on a GPU host).

With `--device cuda` (a GPU host) nothing is stubbed: the same calls run their real Triton launches
on CUDA tensors (compiled and warmed first), and the clock measures the host's time to hand them to
the GPU, each repeat of `--calls` calls synchronised before its clock starts (a call's kernels then
queue behind one another, fewer than the launch queue holds). That is the whole per-call cost a
prefill without CUDA graphs pays on the host, Triton's launcher included; at 4096 rows the GPU may
be the slower side, which the JSON's `gpu_bound_check` (device time of the same calls) tells.
Each measurement runs twice there: with bound launches (the default: a call whose key was seen
replays its launches through the compiled kernels' launchers, `kernels/direct_launch.py`) and with
every launch through Triton's path (`bound_calls.ENABLED = False`). `--launch-parts` also times
a launch's parts alone.

`--profile` runs each measurement's calls once more under cProfile and splits their host time by
whose code it is (this package's, Triton's, torch's, C functions apart), with the top functions:
on a GPU host, how much of a call is our launcher and how much Triton's launch path (cProfile slows
Python calls, so the split, not the total, is the figure).

Medians of `--repeats` timings of `--calls` calls each. The numbers are the development
machine's (a shared 2-core VM): they compare versions of the code on one machine, not hosts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from run_record import checkout_commit, versions  # noqa: E402


GPU_BOUND_CHECK: list[float] = []  # --device cuda: device µs per call of each measurement, in order
PROFILE = False  # --profile
PROFILES: list[dict] = []  # --profile: where each measurement's host time goes, in order


def split_by_owner(profiler, calls: int, top: int = 12) -> dict:
    """µs per call of the profiled functions' own time, by whose code it is (this package's, Triton's,
    torch's, the rest), and the `top` functions: which part of a call is ours and which Triton's."""
    import pstats

    owners = {"mmlora_fx": 0.0, "triton": 0.0, "torch": 0.0, "C functions": 0.0, "other": 0.0}
    functions = []
    for (path, line, name), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        where = path.replace("\\", "/")
        # C functions (path "~": torch's tensor methods, Triton's compiled launcher, built-ins) are
        # counted apart: cProfile does not say whose code called them.
        # Triton's argument binder is generated with `exec` (`<string>`, `dynamic_func`): Triton's.
        owner = ("C functions" if path == "~" else "triton" if "/triton/" in where or name == "dynamic_func"
                 else "torch" if "/torch/" in where
                 else "mmlora_fx" if any(part in where for part in ("/mmlora_fx/", "/kernels/", "/passes/"))
                 else "other")
        owners[owner] += own / calls * 1e6
        functions.append((own / calls * 1e6, f"{Path(path).name}:{line}({name})"))
    functions.sort(reverse=True)
    c_functions = [(us, name) for us, name in functions if name.startswith("~")]
    return dict(us_per_call_by_owner={key: round(value, 2) for key, value in owners.items()},
                top_functions_us_per_call=[[name, round(us, 2)] for us, name in functions[:top]],
                top_c_functions_us_per_call=[[name, round(us, 2)] for us, name in c_functions[:top]])


def per_call_us(call, calls: int, repeats: int, device: str = "cpu") -> list[float]:
    for _ in range(max(10, calls // 10)):
        call()
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()  # the queue empty: the clock times the host's submissions
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
    if device != "cpu":
        # The same calls' device time: where it exceeds the host's, the GPU, not the host, set the pace.
        began, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        began.record()
        for _ in range(calls):
            call()
        ended.record()
        torch.cuda.synchronize()
        GPU_BOUND_CHECK.append(began.elapsed_time(ended) * 1e3 / calls)
    if PROFILE:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            call()
        profiler.disable()
        if device != "cpu":
            torch.cuda.synchronize()
        PROFILES.append(split_by_owner(profiler, calls))
    return times


class _NoLaunch:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def graph_op_cost(calls: int, repeats: int, device: str = "cpu") -> list[float]:
    import mmlora_fx
    import mmlora_fx.runtime as runtime_module
    from mmlora_fx import zoo

    family = "tiny-llava"
    base = zoo.build(family)
    with tempfile.TemporaryDirectory() as root:
        paths = {name: zoo.make_adapter(base, Path(root) / name, zoo.ZOO[family].all_targets, r=4, seed=index)
                 for index, name in enumerate(["a", "b"])}
        mm = mmlora_fx.compile(zoo.build(family).to(device), paths, max_loras=2, inner="aot_eager")
        batch = {key: value.to(device) if torch.is_tensor(value) else value
                 for key, value in zoo.make_batch(base, (1, 0, 2), seed=3).items()}
        with torch.no_grad():
            mm(**batch, adapter_names=["a", None, "b"])  # the tables, as a forward leaves them
    modules = dict(mm.model.named_modules())
    q, v = (next(module for name, module in modules.items() if name.endswith(f"language_model.layers.0.self_attn.{n}"))
            for n in ("q_proj", "v_proj"))
    x = torch.randn(batch["input_ids"].numel(), q.in_features, device=device)
    outputs = [torch.zeros(x.shape[0], q.out_features, device=device),
               torch.zeros(x.shape[0], v.out_features, device=device)]
    saved = runtime_module.lora_add
    if device == "cpu":
        runtime_module.lora_add = lambda *args: None
    try:
        with torch.no_grad():
            return per_call_us(lambda: torch.ops.mmlora.lora_linear_(outputs, x, [q.weight, v.weight]), calls, repeats,
                               device)
    finally:
        runtime_module.lora_add = saved


def launch_cost(rows: int, calls: int, repeats: int, device: str = "cpu") -> list[float]:
    from mmlora_fx.kernels import lora_add

    saved = {name: getattr(lora_add, name) for name in
             ("_row_shrink_kernel", "_row_expand_kernel", "_shrink_kernel", "_expand_kernel", "launches_dependent")}
    if device == "cpu":
        for name in saved:
            setattr(lora_add, name, _NoLaunch())
        lora_add.launches_dependent = lambda config, device: False
    try:
        dtype, hidden, kv, rank, slots = torch.bfloat16, 3584, 512, 16, 32
        x = torch.randn(rows, hidden, dtype=dtype, device=device)
        outputs = [torch.zeros(rows, width, dtype=dtype, device=device) for width in (hidden, kv, kv)]
        lora_a = [torch.randn(slots, rank, hidden, dtype=dtype, device=device) / 64 for _ in outputs]
        lora_b = [torch.randn(slots, output.shape[1], rank, dtype=dtype, device=device) / 4 for output in outputs]
        ranks = [torch.full((slots,), rank, dtype=torch.int32, device=device) for _ in outputs]
        # 256 requests of rows/256 rows each (1 and 16 rows: the first requests own them all).
        tables = lora_add.BatchTables(ranks, torch.arange(256, dtype=torch.int32, device=device) % slots,
                                      torch.arange(257, device=device) * max(1, rows // 256))
        return per_call_us(lambda: lora_add.launch(outputs, x, lora_a, lora_b, tables), calls, repeats, device)
    finally:
        for name, value in saved.items():
            setattr(lora_add, name, value)


class _Recorder:
    """Stands in for a `@triton.jit` kernel and passes its launches on, keeping each one's grid,
    arguments and the compiled kernel Triton returns (`kernel[grid](...)` returns it)."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            compiled = self.kernel[grid](*args, **kwargs)
            self.calls.append((self.kernel, grid, args, kwargs, compiled))
            return compiled
        return launch


def launch_parts(rows: int, calls: int, repeats: int) -> dict[str, list[float] | str]:
    """On a GPU host: host µs a call of the parts of one `launch` (q/k/v at `rows` rows), each timed
    alone: the whole launch; its Triton launches replayed through `kernel[grid](...)` (Triton's launch
    path, without our launcher); the same launches handed straight to the compiled kernels' launcher
    (`CompiledKernel.run`, what Triton's path ends in), with tensors and with raw pointers; the
    scratch allocations; the whole launch with its calls bound (`kernels/bound_calls.py`). What a launcher that binds its arguments once could save (#16)."""
    import inspect

    from mmlora_fx.kernels import bound_calls, lora_add

    names = ("_row_shrink_kernel", "_row_expand_kernel", "_shrink_kernel", "_expand_kernel")
    saved = {name: getattr(lora_add, name) for name in names}
    recorded: list = []
    dtype, hidden, kv, rank, slots = torch.bfloat16, 3584, 512, 16, 32
    x = torch.randn(rows, hidden, dtype=dtype, device="cuda")
    outputs = [torch.zeros(rows, width, dtype=dtype, device="cuda") for width in (hidden, kv, kv)]
    lora_a = [torch.randn(slots, rank, hidden, dtype=dtype, device="cuda") / 64 for _ in outputs]
    lora_b = [torch.randn(slots, output.shape[1], rank, dtype=dtype, device="cuda") / 4 for output in outputs]
    ranks = [torch.full((slots,), rank, dtype=torch.int32, device="cuda") for _ in outputs]
    tables = lora_add.BatchTables(ranks, torch.arange(256, dtype=torch.int32, device="cuda") % slots,
                                  torch.arange(257, device="cuda") * max(1, rows // 256))
    whole = lambda: lora_add.launch(outputs, x, lora_a, lora_b, tables)  # noqa: E731
    # Recorded through Triton's path (a bound call would replay without reaching the kernels' objects).
    bound_calls.ENABLED = False
    whole()  # compiles
    for name in names:
        setattr(lora_add, name, _Recorder(saved[name], recorded))
    try:
        whole()
    finally:
        for name, value in saved.items():
            setattr(lora_add, name, value)
    parts: dict[str, list[float] | str] = {"whole launch, Triton's path": per_call_us(whole, calls, repeats, "cuda")}
    bound_calls.ENABLED = True
    bound_calls.forget()
    parts["whole launch, bound"] = per_call_us(whole, calls, repeats, "cuda")

    def triton_path():
        for kernel, grid, args, kwargs, _ in recorded:
            kernel[grid](*args, **kwargs)

    parts["Triton's launch path only (kernel[grid])"] = per_call_us(triton_path, calls, repeats, "cuda")
    try:
        import triton

        runtime_knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
        hooks = (getattr(runtime_knobs, "launch_enter_hook", None), getattr(runtime_knobs, "launch_exit_hook", None))
        direct = []
        for kernel, grid, args, kwargs, compiled in recorded:
            signature = inspect.signature(kernel.fn)
            params = {name: value for name, value in kwargs.items() if name in signature.parameters}
            bound = signature.bind(*args, **params)
            bound.apply_defaults()
            grid = tuple(grid) + (1,) * (3 - len(grid))
            direct.append((compiled, grid, list(bound.arguments.values())))
        stream = torch.cuda.current_stream().cuda_stream

        def compiled_run(as_pointers: bool):
            launches = [(compiled, grid, [value.data_ptr() if as_pointers and torch.is_tensor(value) else value
                                          for value in values]) for compiled, grid, values in direct]

            def call():
                for compiled, grid, values in launches:
                    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, *hooks, *values)
            return call

        for output in outputs:  # fresh: bf16 sums added to thousands of times stop changing
            output.zero_()
        compiled_run(False)()
        torch.cuda.synchronize()
        parts["direct launches changed every output"] = str(all(bool(output.ne(0).any()) for output in outputs))
        parts["CompiledKernel.run, tensors"] = per_call_us(compiled_run(False), calls, repeats, "cuda")
        parts["CompiledKernel.run, pointers"] = per_call_us(compiled_run(True), calls, repeats, "cuda")
    except Exception as error:  # noqa: BLE001 - Triton's private launcher differs between versions
        parts["CompiledKernel.run"] = f"failed: {type(error).__name__}: {error}"

    def allocations():
        torch.empty(1024, dtype=torch.int32, device="cuda")
        torch.empty(1024, dtype=torch.int32, device="cuda")
        torch.zeros(3 * 1024 * 16, dtype=torch.float32, device="cuda")

    parts["scratch: two empty, one zeros"] = per_call_us(allocations, calls, repeats, "cuda")
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--json")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: real Triton launches on a GPU host, nothing stubbed")
    parser.add_argument("--profile", action="store_true",
                        help="also run each measurement's calls once under cProfile: µs per call by owner "
                             "(ours, Triton's, torch's) and the top functions, in the JSON and printed")
    parser.add_argument("--launch-parts", action="store_true",
                        help="with --device cuda: also time the parts of a launch alone (Triton's path, its "
                             "compiled launcher, the scratch allocations)")
    args = parser.parse_args()
    global PROFILE
    PROFILE = args.profile
    torch.set_num_threads(1)
    from mmlora_fx.kernels import bound_calls

    results = {}
    # On a GPU, calls after the first with a key replay bound launches (`kernels/direct_launch.py`);
    # with them off, every launch takes Triton's path, as before they existed.
    for direct in (True, False) if args.device == "cuda" else (True,):
        bound_calls.ENABLED = direct
        bound_calls.forget()
        how = "" if args.device == "cpu" else ", bound launches" if direct else ", Triton's path"
        results[f"graph op (lora_linear_, q and v){how}"] = graph_op_cost(args.calls, args.repeats, args.device)
        for rows in (1, 16, 4096):
            results[f"launch, q/k/v, {rows} rows{how}"] = launch_cost(rows, args.calls, args.repeats, args.device)
    bound_calls.ENABLED = True
    parts = {}
    if args.launch_parts and args.device == "cuda":
        PROFILE = False
        for rows in (1, 16, 4096):
            parts[f"{rows} rows"] = launch_parts(rows, args.calls, args.repeats)
        for rows, measured in parts.items():
            for name, times in measured.items():
                shown = times if isinstance(times, str) else f"{statistics.median(times):.1f} µs"
                print(f"launch parts, {rows}: {name}: {shown}")
    what = "kernels stubbed" if args.device == "cpu" else "real launches, host time to submit"
    print(f"| host work per call ({what}) | median µs | min-max µs |\n|---|---:|---:|")
    for name, times in results.items():
        print(f"| {name} | {statistics.median(times):.1f} | {min(times):.1f}-{max(times):.1f} |")
    for name, device_us in zip(results, GPU_BOUND_CHECK):
        print(f"device time per call, {name}: {device_us:.1f} µs")
    for name, split in zip(results, PROFILES):
        print(f"under cProfile, {name}: {split['us_per_call_by_owner']} µs a call; top: "
              f"{split['top_functions_us_per_call'][:6]}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), versions=versions(), commit=args.commit or checkout_commit(),
            device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu (kernels stubbed)",
            command="python3 " + " ".join(sys.argv), calls=args.calls, results_us=results,
            gpu_bound_check=dict(zip(results, GPU_BOUND_CHECK)), profiles=dict(zip(results, PROFILES)),
            launch_parts_us=parts), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
