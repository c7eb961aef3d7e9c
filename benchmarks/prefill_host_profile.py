"""Where the host's time goes in one prefill forward, base against mmlora_fx (#16's diagnosis).

    python3 benchmarks/prefill_host_profile.py --out results/ --case a --commit <sha>    # a GPU host (~200 s)
    python3 benchmarks/prefill_host_profile.py --out /tmp/php --case a --tiny             # checks it on a CPU

`--mode reduce-overhead` compiles both models with CUDA graphs (as `prefill_overhead.py --mode`): the
host's time per forward under graphs, where ours took 14 ms more than the base's (2026-12-06).

`prefill_overhead.py` case a measured (H100, 2026-12-06) +37 ms of GPU idle in our prefill over
the compiled base's, and the host taking 141 ms to submit our forward against the base's 67. This
script says where: one compilation of each model over the same weights (prefill_overhead's case
inputs, model and adapters, default Inductor mode), then torch.profiler with CPU and CUDA activities
over `--forwards` forwards of each, and per model:

- the host's time per forward (wall, synchronised at the end), and the CPU time of each kind of
  host call, by self time (`top_host_calls`: Python-level ops, our `mmlora::` ops, Triton and
  Inductor launches appear under their own names);
- counts a forward of the CUDA runtime calls that matter for idle time: kernel launches
  (`cudaLaunchKernel`, `cuLaunchKernel*`), memsets, device-to-host copies and synchronisations
  (each sync empties the GPU's queue, after which host time is GPU idle time);
- the compiled graphs called a forward (dynamo's frames) and our LoRA ops called a forward.

Writes `prefill_host_profile.json` under --out (date, device, versions, --commit, command, both
models' figures). `--tiny`: e2e's TINY model on the CPU (aot_eager; CPU activities only).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import e2e  # noqa: E402
from benchmarks.e2e import synchronize  # noqa: E402
from benchmarks.prefill_overhead import CASES, TINY_CASES, case_inputs  # noqa: E402
from benchmarks.run_record import checkout_commit, versions  # noqa: E402

# CUDA runtime / driver calls counted a forward, by what they do to the GPU's queue.
CALL_KINDS = {
    "launches": ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"),
    "memsets": ("cudaMemsetAsync", "cuMemsetD8Async", "cuMemsetD32Async"),
    "copies": ("cudaMemcpyAsync", "cuMemcpyAsync", "cuMemcpyDtoHAsync"),
    "syncs": ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize"),
}


def host_profile(forward, device, forwards: int, top: int) -> dict:
    """One model's host figures over `forwards` profiled forwards (after one unprofiled)."""
    from torch.profiler import ProfilerActivity, profile

    forward()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(forwards):
        forward()
    synchronize(device)
    wall_ms = (time.perf_counter() - began) * 1e3 / forwards
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            forward()
        synchronize(device)
    events = prof.key_averages()
    host = sorted((event for event in events if event.self_cpu_time_total > 0),
                  key=lambda event: -event.self_cpu_time_total)
    counts = collections.Counter()
    for event in events:
        for kind, names in CALL_KINDS.items():
            if event.key.startswith(names):
                counts[kind] += event.count
        if event.key.startswith("mmlora::"):
            counts["mmlora_ops"] += event.count
        if "CompiledFunction" in event.key or event.key.startswith("Torch-Compiled Region"):
            counts["compiled_regions"] += event.count
    return dict(
        wall_ms=wall_ms,
        profiled_cpu_ms=sum(event.self_cpu_time_total for event in host) / 1e3 / forwards,
        per_forward={kind: count / forwards for kind, count in sorted(counts.items())},
        top_host_calls={event.key[:80]: [round(event.self_cpu_time_total / 1e3 / forwards, 3), event.count // forwards]
                        for event in host[:top]},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--case", choices=sorted(CASES), default="a")
    parser.add_argument("--forwards", type=int, default=3)
    parser.add_argument("--top", type=int, default=40, help="host calls listed, by self CPU time")
    parser.add_argument("--mode", choices=("default", "reduce-overhead"), default="default",
                        help="Inductor's mode for both models (reduce-overhead: CUDA graphs, as prefill_overhead.py "
                             "--mode; the forward before the timed ones records the graphs)")
    parser.add_argument("--fold-min-rows", type=int, help="mmlora_fx.compile's fold_min_rows (prefill_overhead.py's)")
    parser.add_argument("--tower-attention", choices=e2e.TOWER_ATTENTIONS, default="sdpa",
                        help="the vision tower's attention, for both models (prefill_overhead.py's)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--commit")
    args = parser.parse_args()
    import mmlora_fx

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = e2e.TINY if args.tiny else e2e.SEVEN_B
    inner = "aot_eager" if args.tiny else "inductor"
    requests = sum((TINY_CASES if args.tiny else CASES)[args.case])
    model = e2e.build_model(spec, device, dtype, args.tower_attention)
    workdir = Path(tempfile.mkdtemp(prefix="prefill-host-profile-"))
    modules = e2e.adapter_modules(model)
    adapters = {f"a{index}": e2e.write_adapter(workdir / f"a{index}", modules, seed=100 + index, device=device)
                for index in range(requests)}
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), versions=versions(),
                  commit=args.commit or checkout_commit(), command="python3 " + " ".join(sys.argv),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", case=args.case,
                  requests=requests, inner=inner, mode=args.mode, fold_min_rows=args.fold_min_rows,
                  tower_attention=args.tower_attention, forwards=args.forwards, models={})
    with torch.no_grad():
        # mmlora_fx compiles its model in place: a second module tree over the same tensors.
        shared = {id(tensor): tensor for tensor in list(model.parameters()) + list(model.buffers())}
        ours_model = copy.deepcopy(model, memo=shared)
        # Inductor's mode applies to Inductor only (--tiny compiles with aot_eager: no mode).
        mode = args.mode if inner == "inductor" and args.mode != "default" else None
        base = torch.compile(model, backend=inner, mode=mode, dynamic=False)
        mm = mmlora_fx.compile(ours_model, adapters, max_loras=len(adapters), max_lora_rank=e2e.RANK, inner=inner,
                               mode=mode, dynamic=False, fold_min_rows=args.fold_min_rows)
        inputs, _own, rewind = case_inputs(model, spec, args.case, args.tiny, dtype)
        names = list(adapters)

        def base_forward():
            rewind()
            return base(**inputs).logits

        def ours_forward():
            rewind()
            mm.runtime.forget_tables()  # a new batch's table writes, though the batch repeats
            return mm(**inputs, adapter_names=names).logits

        for which, forward in (("base", base_forward), ("mmlora", ours_forward)):
            began = time.perf_counter()
            forward()  # compiles
            synchronize(device)
            print(f"{which}: first call {time.perf_counter() - began:.0f} s", flush=True)
            result["models"][which] = host_profile(forward, device, args.forwards, args.top)
            found = result["models"][which]
            print(f"{which}: {found['wall_ms']:.1f} ms a forward; profiled host {found['profiled_cpu_ms']:.1f} ms; "
                  f"{found['per_forward']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill_host_profile.json").write_text(json.dumps(result, indent=1))
    for which, found in result["models"].items():
        print(f"\n{which}: top host calls (ms a forward, calls a forward)")
        for name, (ms, count) in list(found["top_host_calls"].items())[:20]:
            print(f"  {ms:8.3f} {count:6d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
