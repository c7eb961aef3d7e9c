"""Where mmlora_fx's first decode call spends its time, one process, stacks dumped while it runs.

    python benchmarks/compile_trace.py --out $OUT/trace [--adapters 32] [--batch 1] [--tiny]

A diagnostic, not a benchmark: on 2026-12-06 three concurrent runs of decode_overhead.py on an
H100 compiled the base's decode step in 27 s each and never finished mmlora_fx's compile and first
call in the 475 s left. This builds the same model (benchmarks/e2e.py, Qwen2-VL-7B-shaped, bf16),
the same adapters and the same `mmlora_fx.compile(..., mode="reduce-overhead", dynamic=False)`,
and logs each phase with its time (adapters written, compile() returned, prepare, first call),
while `faulthandler` writes every thread's stack to `stacks.txt` every `--every` seconds, so a
call cut off by its time limit still says where it was. `compile_times.txt` gets dynamo's
per-phase compile times if the first call finishes.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import e2e  # noqa: E402
import mmlora_fx  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between stack dumps")
    parser.add_argument("--tiny", action="store_true", help="e2e's tiny config on the CPU")
    parser.add_argument("--base-first", action="store_true",
                        help="compile and call the base first in the same process, as decode_overhead.py does")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stacks = open(args.out / "stacks.txt", "w")
    faulthandler.dump_traceback_later(args.every, repeat=True, file=stacks)
    t0 = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {message}", flush=True)
        stacks.write(f"\n===== [{time.perf_counter() - t0:7.1f}s] {message}\n")
        stacks.flush()

    device = torch.device("cpu" if args.tiny else "cuda")
    spec = e2e.TINY if args.tiny else e2e.SEVEN_B
    model = e2e.build_model(spec, device, torch.bfloat16)
    step = e2e.DecodeStep(model, args.batch, device, torch.bfloat16)
    e2e.synchronize(device)
    log("model built")
    root = Path(tempfile.mkdtemp(prefix="compile-trace-"))
    modules = e2e.adapter_modules(model)
    adapters = {f"a{index}": e2e.write_adapter(root / f"a{index}", modules, seed=index, device=device)
                for index in range(args.adapters)}
    log(f"{args.adapters} adapters written")
    if args.base_first:
        import copy

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        tensors = list(model.parameters()) + list(model.buffers())
        base = torch.compile(copy.deepcopy(model, memo={id(tensor): tensor for tensor in tensors}),
                             mode=e2e.graph_mode(device), dynamic=False)
        for _ in range(3):
            if device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            step(base)
        e2e.synchronize(device)
        step.rewind()
        log("base compiled, recorded and replayed")
    mode = e2e.graph_mode(device)
    mm = mmlora_fx.compile(model, adapters, max_loras=min(32, args.adapters), max_lora_rank=e2e.RANK, mode=mode,
                           dynamic=False, max_batch_size=max(64, args.batch), inner="inductor")
    log("mmlora_fx.compile returned (adapters loaded)")
    names = e2e.mixed_names(list(adapters), args.batch, min(args.batch, 8, args.adapters), seed=1)
    mm.runtime.prepare(names)
    e2e.synchronize(device)
    log("prepare done")
    step.rewind()
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    step(None)
    e2e.synchronize(device)
    log(f"first call done ({mm.compiled_graphs} graphs)")
    for _ in range(2):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        step(None)
    e2e.synchronize(device)
    log("recorded and replayed")
    faulthandler.cancel_dump_traceback_later()
    from torch._dynamo.utils import compile_times

    (args.out / "compile_times.txt").write_text(str(compile_times(repr="str", aggregate=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
