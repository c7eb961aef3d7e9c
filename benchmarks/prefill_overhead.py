"""Prefill overhead of mmlora_fx over the compiled base in issue #16's three cases.

    python benchmarks/prefill_overhead.py --out results/ --commit <sha> --cases a [--runs 3] [--gpus 2 --share-gpu]
    python benchmarks/prefill_overhead.py --tiny --runs 2 --out /tmp/po              # checks the script on a CPU
    python benchmarks/prefill_overhead.py --merge a/prefill_overhead.json b/prefill_overhead.json --out results/

Model, adapters and images are `benchmarks/e2e.py`'s: a random Qwen2-VL-7B-shaped model in bf16
(language model 28 layers of 3584, tower 32 blocks of 1280, merger to 3584), rank-16 PEFT adapters
(alpha 32) on q/k/v/o/gate/up/down of the language model, qkv/proj/fc1/fc2 of the tower blocks and
the merger MLP, images of 448x448 (256 image tokens, 1024 tower rows each), 64 text tokens a
request (`zoo.make_batch`, as `e2e.prefill_batch`). One adapter per request, all distinct:

- a: 8 requests with one image each, 8 adapters (the row of BENCHMARKS.md's "Prefill").
- b: 32 requests with one image each, 32 adapters (`max_loras=32`: one slot per request, so
  every request of the batch reads its own adapter; 32 x 93 MB of slots).
- c: a mixed step: 4 requests in prefill (one image each) beside 4 decoding one token after
  `MIXED_PAST` = 512 tokens of their own, 8 adapters. HF's forward takes one rectangular batch
  [requests, length] over one cache whose rows share one write position, so it cannot run what a
  chunked-prefill server runs (every request's new tokens packed into one stream, each decode
  request one token against its own cache length). The closest honest variant, built here: one
  StaticCache of 512 + L positions (L: the prefill prompts' length); the cache's first 512
  positions hold the decoding requests' past (random keys and values) and are masked out for the
  prefill requests; every row writes its L new positions at 512..512+L; a decoding request's row is
  its one token at the last position, left-padded with L - 1 masked pad tokens. Positions
  (M-RoPE) are given: the prefill rows' from `get_rope_index`, the decoding rows' 512. What it
  costs beyond the real thing: each decoding request runs L query rows through the language model
  (4 x (L - 1) pad rows, LoRA on them too), base and mmlora_fx alike; the tower's work and the
  prefill rows' are what a chunked-prefill step with these requests runs.

Per compilation (one subprocess each, `prefill_runs.run_waves`; fresh Inductor and Triton caches
for every model and case): the base `torch.compile(model, dynamic=False)` and
`mmlora_fx.compile(copy, adapters, max_loras=..., dynamic=False)` over a second module tree sharing
the weights (both stay compiled, so their forwards alternate); static shapes, so each case compiles
its own graphs, as the first call of the default (`dynamic=None`) would; default Inductor mode, no
CUDA graphs (the best the project knows for the base at prefill today: `--capture-scalars` is not
offered because the CPU check in docs/BENCHMARKS.md found it adds graphs per tower block with
several images). Every case is compiled (both models, first call timed) before any is timed; then
runs wait for each other, and with `--share-gpu` time one at a time under a lock.

Per case and run:

- base ms and mmlora_fx ms: `--rounds` rounds of `--block` forwards of each, the order alternating
  per round, each forward between two synchronisations (host work included); mmlora_fx as a user
  calls it, `mm(**inputs, adapter_names=names)`, so `prepare` (slots, token tables, tracing tower
  rows to their images) is inside. The median over samples per run; the summary gives median
  [min-max] over runs of those medians and of the overhead.
- host/GPU split (`e2e.step_profile`, 5 forwards each): `wall_ms` (a forward between syncs, CUDA
  events), `kernels_ms` (the sum of the GPU kernels' durations in one forward, torch.profiler),
  `idle_ms` = wall - kernels (time the GPU waits for the host: launches, Python, host syncs),
  `host_submit_ms` (perf_counter from the call to its return without a final sync; where the
  forward syncs inside, e.g. the tower's `.tolist()`, it includes those waits). A host-bound
  forward has idle_ms large and host_submit_ms close to wall_ms. On the CPU (--tiny) kernels are 0.
- correctness: the compiled mmlora_fx against `mm.eager` (the same LoRA through hooks) per request
  over its own positions (case c: a decoding request's one token), passing at max(4 x the
  request's base noise, 1e-2) with the base noise = compiled base against the eager base, as
  audio_prefill.py; the adapters' effect (compiled base against `mm.eager`) is recorded to show
  LoRA was applied. Also: graphs compiled during timing (should be 0) and dynamo's compiled graphs
  and graph breaks per model.

Writes `prefill_overhead.json` under --out (date, device, versions, --commit, the command, the
set-up, every run with every sample, the summary per case) and prints a table. `--budget-s`,
`--runs`, `--gpus`, `--share-gpu`, `--merge` as audio_prefill.py. At full size a run compiles both
models per case (60-80 s each); with several cases per run, budget the call accordingly
(docs/BENCHMARKS.md, "Prefill overhead, three cases": one case a call on one H100).

`--tiny` (e2e's TINY config in float32 on the CPU, 56x56 images, a 16-token past in case c, both
models compiled with `aot_eager`, 2 rounds of 3 forwards) checks the script; its times are not
measurements.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import e2e  # noqa: E402
from benchmarks.e2e import synchronize  # noqa: E402
from benchmarks.prefill_runs import (  # noqa: E402
    add_run_arguments, check_against_eager, child_arguments, end_run, extreme, fill_defaults, fresh_caches,
    interleaved, merged, row_errors, run_log, run_waves, spread, stat, wait_turn)
from mmlora_fx import zoo  # noqa: E402

CASES = {  # name -> (requests in prefill with one image, requests decoding one token)
    "a": (8, 0),
    "b": (32, 0),
    "c": (4, 4),
}
TINY_CASES = {"a": (3, 0), "b": (6, 0), "c": (2, 2)}
MIXED_PAST, TINY_PAST = 512, 16
JSON = "prefill_overhead.json"


# --------------------------------------------------------------------------- inputs
def case_inputs(model, spec, case: str, tiny: bool, dtype) -> tuple[dict, torch.Tensor, callable]:
    """The case's keyword inputs, a [requests, length] mask of each request's own query positions
    (where errors are taken), and a function run before every forward (case c rewinds the cache)."""
    prefill, decoding = (TINY_CASES if tiny else CASES)[case]
    batch = e2e.prefill_batch(model, spec, prefill)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    if not decoding:
        batch["use_cache"] = False
        return batch, batch["attention_mask"], lambda: None
    return mixed_inputs(model, batch, decoding, TINY_PAST if tiny else MIXED_PAST)


def mixed_inputs(model, batch: dict, decoding: int, past: int):
    """Case c (see the module's docstring): `batch`'s prefill rows and `decoding` rows of one token
    after `past` cached tokens, over one StaticCache of past + length positions."""
    from transformers import StaticCache

    ids = batch["input_ids"]
    device = ids.device
    prefill, length = ids.shape
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                              image_grid_thw=batch["image_grid_thw"],
                                              attention_mask=batch["attention_mask"])
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(zoo.FIRST_TEXT_TOKEN, zoo.TEXT_TOKEN_LIMIT // 2, (decoding,), generator=generator)
    decode_ids = torch.full((decoding, length), zoo.PAD, dtype=ids.dtype)
    decode_ids[:, -1] = tokens
    decode_positions = torch.zeros(3, decoding, length, dtype=positions.dtype)
    decode_positions[:, :, -1] = past
    # Keys: the first `past` positions are the decoding rows' own history, masked for prefill rows.
    mask = torch.zeros(prefill + decoding, past + length, dtype=torch.long)
    mask[:prefill, past:] = batch["attention_mask"].cpu()
    mask[prefill:, :past] = 1
    mask[prefill:, -1] = 1
    inputs = dict(batch, input_ids=torch.cat([ids, decode_ids.to(device)]),
                  attention_mask=mask.to(device),
                  mm_token_type_ids=torch.cat([batch["mm_token_type_ids"],
                                               torch.zeros(decoding, length, dtype=batch["mm_token_type_ids"].dtype,
                                                           device=device)]),
                  position_ids=torch.cat([positions, decode_positions.to(device)], dim=1))
    cache = StaticCache(config=model.config, max_cache_len=past + length)
    inputs.update(past_key_values=cache, use_cache=True)

    def rewind():
        for layer in cache.layers:
            if getattr(layer, "is_initialized", True) and hasattr(layer, "cumulative_length"):
                layer.cumulative_length.fill_(past)

    with torch.no_grad():
        model.forward(**inputs)  # allocates the cache's layers, eagerly
    random = torch.Generator(device=device).manual_seed(8)
    for layer in cache.layers:
        layer.keys.normal_(0, 1, generator=random)
        layer.values.normal_(0, 1, generator=random)
    rewind()
    return inputs, mask[:, past:].to(device), rewind


def describe(spec, case: str, tiny: bool, inputs: dict, names: list[str]) -> dict:
    prefill, decoding = (TINY_CASES if tiny else CASES)[case]
    return {"requests_in_prefill": prefill, "requests_decoding": decoding, "image": spec["image"],
            "images": int(inputs["image_grid_thw"].shape[0]), "tower_rows": int(inputs["pixel_values"].shape[0]),
            "query_length": int(inputs["input_ids"].shape[1]), "query_rows": int(inputs["input_ids"].numel()),
            "past": (TINY_PAST if tiny else MIXED_PAST) if decoding else 0, "adapters": len(set(names)),
            "logits": "every query position (as e2e.py's prefill)"}


# --------------------------------------------------------------------------- one compilation
def run_once(args) -> int:
    """One subprocess: build, compile base and mmlora_fx for every case, then time, split and check."""
    import mmlora_fx
    from torch._dynamo.utils import counters

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    spec = e2e.TINY if args.tiny else e2e.SEVEN_B
    cases = args.cases.split(",")
    result: dict = {"run": args.run_index, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "runs_at_once": args.barrier_count,
                    "phases_s": {}, "cases": {}}
    save, phase = run_log(result, Path(args.result), args.run_index, started)

    try:
        cache_root = Path(args.cache_dir)
        mark = time.perf_counter()
        model = e2e.build_model(spec, device, dtype, args.tower_attention)
        counts = {case: sum((TINY_CASES if args.tiny else CASES)[case]) for case in cases}
        workdir = Path(tempfile.mkdtemp(prefix="prefill-adapters-", dir=cache_root))
        modules = e2e.adapter_modules(model)
        adapters = {f"a{index}": e2e.write_adapter(workdir / f"a{index}", modules, seed=100 + args.seed + index,
                                             device=device)
                    for index in range(max(counts.values()))}
        result["setup"] = dict(model=f"e2e.py {'TINY' if args.tiny else 'SEVEN_B'}, random weights",
                               dtype=str(dtype).removeprefix("torch."), backend=args.inner, mode=args.mode,
                               rounds=args.rounds, fold_min_rows=args.fold_min_rows, tower_attention=args.tower_attention,
                               block=args.block, warmup=args.warmup, rank=e2e.RANK, adapter_modules=len(modules),
                               max_loras=len(adapters), cases={})
        mark = phase("model and adapters", mark)

        with torch.no_grad():
            # mmlora_fx compiles its model in place: a second module tree over the same tensors.
            shared = {id(tensor): tensor for tensor in list(model.parameters()) + list(model.buffers())}
            ours_model = copy.deepcopy(model, memo=shared)
            # Inductor's mode applies to Inductor only (--tiny compiles with aot_eager: no mode).
            mode = args.mode if args.inner == "inductor" and args.mode != "default" else None
            compiled_base = torch.compile(model, backend=args.inner, mode=mode, dynamic=False)
            fresh_caches(cache_root, "mmlora-setup")
            began = time.perf_counter()
            mm = mmlora_fx.compile(ours_model, adapters, max_loras=len(adapters), max_lora_rank=e2e.RANK,
                                   inner=args.inner, mode=mode, dynamic=False, fold_min_rows=args.fold_min_rows)
            result["mmlora_setup_s"] = time.perf_counter() - began
            prepared = {}
            for case in cases:
                inputs, own, rewind = case_inputs(model, spec, case, args.tiny, dtype)
                names = list(adapters)[:counts[case]]
                record = result["cases"][case] = {}
                result["setup"]["cases"][case] = describe(spec, case, args.tiny, inputs, names)

                def base_forward(inputs=inputs, rewind=rewind):
                    rewind()
                    return compiled_base(**inputs).logits

                def mm_forward(inputs=inputs, rewind=rewind, names=names):
                    rewind()
                    # A server's every prefill is a new batch: its token tables are written, though
                    # here the batch repeats (a fill equal to the last one would write nothing).
                    mm.runtime.forget_tables()
                    return mm(**inputs, adapter_names=names).logits

                rewind()
                eager_base = model(**inputs).logits
                for which, forward in (("base", base_forward), ("mmlora", mm_forward)):
                    fresh_caches(cache_root, f"{which}-{case}")
                    graphs = counters["stats"]["unique_graphs"]
                    breaks = sum(counters["graph_break"].values())
                    skips = e2e.cudagraph_skips()
                    synchronize(device)
                    began = time.perf_counter()
                    logits = forward()
                    synchronize(device)
                    record[f"{which}_first_call_s"] = time.perf_counter() - began
                    record[f"{which}_dynamo_graphs"] = counters["stats"]["unique_graphs"] - graphs
                    record[f"{which}_graph_breaks"] = sum(counters["graph_break"].values()) - breaks
                    # Graphs Inductor compiled but left out of CUDA graphs (reduce-overhead): each runs
                    # its kernels from the host at every forward (#16: ours' host time under graphs).
                    record[f"{which}_cudagraph_skips"] = e2e.cudagraph_skips() - skips
                    if which == "base":
                        record["base_noise"] = row_errors(logits, eager_base, own)
                    del logits
                for _ in range(args.warmup):
                    base_forward()
                    mm_forward()
                del eager_base
                prepared[case] = (base_forward, mm_forward, inputs, own, rewind, names)
                mark = phase(f"case {case}: both compiled (first calls) and warm", mark)

            mark = wait_turn(args, result, phase, mark)

            for case, (base_forward, mm_forward, inputs, own, rewind, names) in prepared.items():
                record = result["cases"][case]
                graphs_before, ours_before = counters["stats"]["unique_graphs"], mm.compiled_graphs
                samples, blocks = interleaved({"base": base_forward, "mmlora": mm_forward}, args.rounds, args.block,
                                              device)
                record["base_ms"], record["mmlora_ms"] = spread(samples["base"]), spread(samples["mmlora"])
                record["blocks"] = blocks
                record["overhead"] = record["mmlora_ms"]["median"] / record["base_ms"]["median"] - 1
                record["compiled_during_timing"] = {
                    "dynamo_graphs": counters["stats"]["unique_graphs"] - graphs_before,
                    "mmlora_graphs": mm.compiled_graphs - ours_before}
                mark = phase(f"case {case}: timed", mark)

                if not args.no_split:
                    record["split"] = {which: e2e.step_profile(forward, device)
                                       for which, forward in (("base", base_forward), ("mmlora", mm_forward))}
                    for part in record["split"].values():
                        part.pop("dynamo", None)  # process-wide counters: the per-case figures are above
                    mark = phase(f"case {case}: host/GPU split", mark)
                    record["prepare"] = prepare_cost(mm, inputs, names, device)

                base_logits = base_forward().clone()
                compiled = mm_forward().clone()
                rewind()
                eager = mm.eager(**inputs, adapter_names=names).logits
                check_against_eager(record, compiled, eager, base_logits, own)
                del base_logits, compiled, eager
                mark = phase(f"case {case}: correctness (compiled against mm.eager)", mark)
        result["passed"] = all(record.get("passed", False) for record in result["cases"].values())
        return end_run(result, save, started, device, args.run_index)
    except Exception as error:  # the run's error is part of its result
        return end_run(result, save, started, device, args.run_index, error)


def prepare_cost(mm, inputs, names, device, calls: int = 10) -> dict:
    """What ours does on the host before its forward starts (`prepare`: adapters resident, token
    tables, the tower units traced), from an empty GPU queue: its host ms (median of `calls`) and
    the host syncs it makes (CUDA only). Each sync waits for the GPU's queue to empty; whatever
    host work follows it, until the forward's first kernel, is GPU idle that the base does not have."""
    samples = []
    for _ in range(calls):
        mm.runtime.forget_tables()
        synchronize(device)
        began = time.perf_counter()
        mm._prepare(inputs, names)
        synchronize(device)
        samples.append((time.perf_counter() - began) * 1e3)
    mm.runtime.forget_tables()
    return dict(host_ms=statistics.median(samples), host_ms_min=min(samples),
                syncs=e2e.syncs_in(lambda: mm._prepare(inputs, names), device))


# --------------------------------------------------------------------------- the runs
def summarise(runs: list[dict]) -> dict:
    """Per case: median [min-max] over the runs that timed it."""
    summary = {}
    for case in sorted({case for run in runs for case in run.get("cases", {})}):
        records = [run["cases"][case] for run in runs if case in run.get("cases", {})]
        done = [record for record in records if "base_ms" in record and "mmlora_ms" in record]

        def split(which, key):
            return stat([record.get("split", {}).get(which, {}).get(key) for record in done])

        summary[case] = {
            "runs_timed": len(done),
            "base_ms": stat([record["base_ms"]["median"] for record in done]),
            "mmlora_ms": stat([record["mmlora_ms"]["median"] for record in done]),
            "overhead_pct": stat([100 * record["overhead"] for record in done]),
            "split": {which: {key: split(which, key) for key in ("step_ms", "kernels_ms", "idle_ms", "host_submit_ms",
                                                                  "lora_kernels_ms")}
                      for which in ("base", "mmlora")},
            "base_first_call_s": stat([record.get("base_first_call_s") for record in records]),
            "mmlora_first_call_s": stat([record.get("mmlora_first_call_s") for record in records]),
            "prepare_host_ms": stat([record.get("prepare", {}).get("host_ms") for record in done]),
            "prepare_syncs": [record.get("prepare", {}).get("syncs") for record in done],
            "cudagraph_skips_base_ours": [[record.get("base_cudagraph_skips"), record.get("mmlora_cudagraph_skips")]
                                          for record in records],
            "max_mmlora_vs_eager": extreme(records, "mmlora_vs_eager"),
            "max_base_noise": extreme(records, "base_noise"),
            "min_adapter_effect": extreme(records, "adapter_effect", min),
            "all_passed": bool(records) and all(record.get("passed", False) for record in records),
            "compiled_during_timing": [record.get("compiled_during_timing") for record in done],
        }
    return summary


def table(report: dict) -> list[str]:
    def cell(found, form=".1f"):
        return "-" if not found else f"{found['median']:{form}} [{found['min']:{form}}-{found['max']:{form}}]"

    lines = [f"prefill overhead on {report.get('device')} (median [min-max] over runs)",
             f"{'case':>4} {'runs':>4} {'base ms':>22} {'mmlora_fx ms':>22} {'overhead %':>22} "
             f"{'idle ms base/ours':>18} {'kernels ms base/ours':>21} {'max vs eager':>12} passed"]
    for case, found in report.get("summary", {}).items():
        split = found["split"]

        def pair(key):
            base, ours = split["base"][key], split["mmlora"][key]
            return f"{base['median']:.1f}/{ours['median']:.1f}" if base and ours else "-"

        worst = found["max_mmlora_vs_eager"]
        lines.append(f"{case:>4} {found['runs_timed']:>4} {cell(found['base_ms']):>22} {cell(found['mmlora_ms']):>22} "
                     f"{cell(found['overhead_pct'], '+.1f'):>22} {pair('idle_ms'):>18} {pair('kernels_ms'):>21} "
                     f"{'-' if worst is None else f'{worst:.1e}':>12} {found['all_passed']}")
    for run in report["runs"]:
        if run.get("error") or run.get("status"):
            lines.append(f"run {run.get('run', '?')}: {run.get('error') or run.get('status')}"[:300])
    return lines


def child_command(args, index: int, result: Path, cache: Path, barrier: Path, count: int) -> list[str]:
    return child_arguments(args, index, result, cache, barrier, count, str(Path(__file__).resolve()),
                           flags=("tiny", "share_gpu", "no_split")) + ["--cases", args.cases, "--mode", args.mode,
                                                                 "--tower-attention", args.tower_attention] + (
        ["--fold-min-rows", str(args.fold_min_rows)] if args.fold_min_rows else [])


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON).write_text(json.dumps(report, indent=2))
    print("\n".join(table(report)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--cases", default="a,b,c", help="which of a (8 requests), b (32), c (mixed), in order")
    parser.add_argument("--inner", help="the compiler of both models: inductor (default; --tiny: aot_eager)")
    parser.add_argument("--no-split", action="store_true", help="skip the host/GPU split (torch.profiler)")
    parser.add_argument("--mode", choices=["default", "reduce-overhead"], default="default",
                        help="Inductor's mode for both models: reduce-overhead captures each graph in CUDA graphs "
                        "(the cases' shapes are fixed: one capture per graph)")
    parser.add_argument("--fold-min-rows", type=int, help="mmlora_fx.compile's fold_min_rows: LoRA folded into the "
                        "base GEMMs of linears at least as wide out as in, in calls of at least this many rows")
    parser.add_argument("--tower-attention", choices=e2e.TOWER_ATTENTIONS, default="sdpa",
                        help="the vision tower's attention, for both models: flex runs it without a graph break "
                        "per block (mmlora_fx.use_flex_tower_attention)")
    parser.add_argument("--merge", nargs="+", type=Path, help=f"combine these {JSON} into --out")
    args = parser.parse_args()
    fill_defaults(args)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    if args.child:
        return run_once(args)
    if args.merge:
        write(args.out, merged(args.merge, summarise))
        return 0
    report = run_waves(args, summarise, JSON, child_command, "prefill-overhead-")
    write(args.out, report)
    done = all(found["runs_timed"] == args.runs and found["all_passed"] for found in report["summary"].values())
    return 0 if done and len(report["summary"]) == len(args.cases.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
