"""Decode overhead of mmlora_fx over the compiled base on a tensor-parallel model (#23), N GPUs.

    python benchmarks/tp_decode.py --out $OUT/tp --commit <sha> [--gpus 2] [--runs 3]
        [--batches 1,16,64] [--mixes 1,8,32] [--rounds 6] [--steps 100] [--budget-s 540]
        [--mode reduce-overhead|default] [--tp-lora-a replicated|sharded]
    python benchmarks/tp_decode.py --out /tmp/tp-check --tiny --runs 2    # the script, on 2 CPU processes

The model is e2e's language model as a text-only LM: transformers' `Qwen2ForCausalLM` with the
widths of `e2e.SEVEN_B`'s text config (hidden 3584, 28 layers, intermediate 18944, GQA 28/4 heads,
vocabulary 152064, untied head, q/k/v biases as Qwen2-VL's), plain RoPE instead of M-RoPE (decode
of text tokens; the same products), random bf16 weights (seed 0 on every rank), no vision tower
(decode runs none). Every decoder layer is sharded by torch.distributed's tensor-parallel API
(`parallelize_module`, as tests/test_tensor_parallel.py's `shard_llama`: `ColwiseParallel` on
q/k/v/gate/up, `RowwiseParallel` on o/down); the embedding, norms and lm_head stay whole on every
rank. transformers' `tp_plan` is not used here (it loads from a checkpoint: 15 GB written per call).
`--gpus` must divide the 4 KV heads (2 or 4). Adapters: `e2e.write_adapter`, 32 (tiny 4) of rank 16
on the 7 linears of every layer, in PEFT's format; each rank reads its slice of them.
`--tp-lora-a` is the serving option of that name: `replicated` (default; A whole on every rank)
or `sharded` (the column-parallel targets' A split along the rank, one all-gather of the
`[rows, 16]` shrink per target and step). Run the script once with each to compare them; it times
decode only (a few rows a step, where the all-gathers should cost most and save least), not the
long prefills where splitting A is expected to pay.

Each run is one independent compilation on all N GPUs: N processes (one per GPU, spawned by this
script, NCCL over a file store; gloo on the CPU with `--tiny`), each with its own fresh Inductor
and Triton cache. As in `decode_overhead.py` (whose helpers this imports): the runs build and
compile side by side, wait at a barrier, then TIME ONE AT A TIME under an exclusive flock taken by
the run's rank 0 (its other ranks wait on a file, not in a collective: no NCCL kernel spins on a
GPU beside a timing run); the runs stay alive until all have timed. Per (batch, mix): `--rounds`
rounds, each a block of `--steps` decode steps of the base and one of ours per mix (one CUDA event
pair a block, a device sync after every step), the order reversed every other round; the
overhead is the median of the rounds' ratios. Every rank times its own blocks (the collectives keep
the ranks in step); every decision that changes what runs (what the budget skips) is rank 0's,
broadcast, so every rank runs the same steps. `--budget-s` bounds it all, as in decode_overhead.

The base and ours share the sharded weights (a second module tree over the same DTensors) and one
`e2e.DecodeStep` per batch (static KV cache of 512, each rank's cache holds its KV heads). CUDA
graphs: `--mode reduce-overhead` (default on a GPU) captures the NCCL collectives in the graphs;
if it cannot, the run fails with the error recorded and `--mode default` measures without graphs.
Each run records how many CUDA graphs were captured and Inductor's cudagraph skips.

Checks per run and batch (the batch's largest mix): ours compiled against `mm.eager` on the same
sharded model (the eager path all-reduces the rank-sized shrink instead of riding on the base's
all-reduce: a different route to the same sum), the LoRA effect (ours against the base: near zero
would mean ours ran without LoRA), and a digest of the logits per rank (every rank holds the whole
logits: the ranks must agree). Per run, once: the served targets' layouts and the collective LoRA
adds to each (`inspect_report.tensor_parallel_entries`), and the collectives of one step counted by
the profiler for the base and ours, eager and compiled (not under CUDA graphs: a replay shows none).

Writes `tp_decode.json` under --out: date, device, versions, commit (`--commit`; the device's git
HEAD is stale), command, settings, every rank's record of every run (`run<i>.rank<r>.json` as it
goes) and a summary per (batch, mix) from rank 0 (rank 1's overheads beside). The last lines
printed are the summary table. `--tiny` (e2e's TINY text widths, 2 CPU processes, `--inner
aot_eager`, no CUDA graphs, perf_counter timing) checks the script; its times mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import e2e  # noqa: E402
from decode_overhead import (GRACE_S, RESERVE_S, Launch, Worker, count, exclusive, gpu_state, log, mark,  # noqa: E402
                             parse_ints, run_role, spread, stop_processes, timed_steps, wait_for)
from run_record import checkout_commit, versions  # noqa: E402
import mmlora_fx  # noqa: E402

COLLECTIVE_WORDS = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "broadcast")
# Kept on: NVLink multicast stays off (the device machines' rule; set there already).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def settings(args) -> dict:
    tiny = args.tiny
    batches = parse_ints(args.batches) if args.batches else ([1, 4] if tiny else [1, 16, 64])
    mixes = parse_ints(args.mixes) if args.mixes else ([1, 2] if tiny else [1, 8, 32])
    adapters = 4 if tiny else 32
    steps = args.steps if args.steps is not None else (5 if tiny else 100)
    if max(mixes) > adapters:
        raise SystemExit(f"at most {adapters} distinct adapters")
    if steps + args.block_warmup > e2e.DecodeStep.SPARE - 6:
        raise SystemExit(f"--steps must stay within the cache's {e2e.DecodeStep.SPARE} spare positions")
    text = (e2e.TINY if tiny else e2e.SEVEN_B)["text"]
    if text["num_key_value_heads"] % args.gpus or text["num_attention_heads"] % args.gpus:
        raise SystemExit(f"--gpus {args.gpus} does not divide the {text['num_key_value_heads']} KV heads")
    mode = args.mode or (None if tiny else "reduce-overhead")
    return dict(tiny=tiny, world=args.gpus, runs=args.runs, batches=sorted(batches), mixes=sorted(mixes),
                adapters=adapters, steps=steps, rounds=args.rounds if args.rounds is not None else (2 if tiny else 6),
                block_warmup=args.block_warmup, budget_s=args.budget_s,
                mode=None if mode == "default" else mode, inner=args.inner or ("aot_eager" if tiny else "inductor"),
                model="Qwen2ForCausalLM, e2e." + ("TINY" if tiny else "SEVEN_B") + " text widths, plain RoPE",
                sharding="parallelize_module: ColwiseParallel q/k/v/gate/up, RowwiseParallel o/down; "
                         "embedding, norms, lm_head whole", tp_lora_a=args.tp_lora_a)


def mixes_for(config: dict, batch: int) -> list[int]:
    return [distinct for distinct in config["mixes"] if distinct <= batch]


# --------------------------------------------------------------------------- the model
def build_lm(tiny: bool, device):
    """e2e's language model widths as a Qwen2ForCausalLM in bf16, seed 0 (the same on every rank)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = dict((e2e.TINY if tiny else e2e.SEVEN_B)["text"])
    rope = {key: value for key, value in text.pop("rope_parameters").items() if key != "mrope_section"}
    config = Qwen2Config(**text, rope_parameters=rope, tie_word_embeddings=False, bos_token_id=e2e.zoo.BOS,
                         eos_token_id=e2e.zoo.EOS, pad_token_id=e2e.zoo.PAD)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    return model.eval()


def write_adapters(args) -> int:
    """The adapters, once for all runs and ranks (shapes from the unsharded model on the meta device)."""
    shared, config = Path(args.shared), settings(args)
    try:
        device = torch.device("cpu" if config["tiny"] else "cuda")
        modules = e2e.adapter_modules(build_lm(config["tiny"], "meta"), e2e.LM_TARGETS)
        for index in range(config["adapters"]):
            e2e.write_adapter(shared / "adapters" / f"a{index}", modules, seed=index, device=device,
                              target_modules=e2e.LM_TARGETS)
        (shared / "adapters.ready").write_text("")
        log("adapters", args.t0, f"{config['adapters']} adapters written")
        return 0
    except BaseException:
        (shared / "adapters.failed").write_text(traceback.format_exc())
        raise


def collectives_in(fn) -> dict:
    """Collective ops the profiler sees on the host during `fn()`, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    found = {}
    for event in prof.events():
        name = event.name.lower()
        if any(word in name for word in COLLECTIVE_WORDS):
            found[event.name] = found.get(event.name, 0) + 1
    return found


# --------------------------------------------------------------------------- one rank of one run
class Rank(Worker):
    def __init__(self, args):
        self.args, self.config = args, settings(args)
        self.index, self.rank, self.world = args.index, args.rank, self.config["world"]
        self.t0, self.deadline, self.shared = args.t0, args.deadline, Path(args.shared)
        self.cuda = not self.config["tiny"]
        self.device = torch.device(f"cuda:{self.rank}" if self.cuda else "cpu")
        self.out_file = args.out / f"run{self.index}.rank{self.rank}.json"
        self.record = dict(index=self.index, rank=self.rank, world=self.world, pid=os.getpid(),
                           inductor_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                           device=None, first_call_s=dict(base={}, ours={}), checks={}, timings=[], skipped=[])

    def log(self, message: str) -> None:
        log(f"run{self.index}.r{self.rank}", self.t0, message)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def agreed(self, value: bool) -> bool:
        """Rank 0's `value` on every rank (a broadcast): what runs must be the same everywhere."""
        flag = torch.tensor([int(value)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def one(self, step, call) -> None:
        if self.config["mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        step(call)

    # ---------------------------------------------------------------- compile and warm
    def compile_and_warm(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from mmlora_fx.graph_captures import CudaGraphCaptures
        from mmlora_fx.inspect_report import tensor_parallel_entries

        config, record = self.config, self.record
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        from tests.test_tensor_parallel import shard_llama  # the tests' plan, on the same linears

        mesh = init_device_mesh(self.device.type, (self.world,))
        began = time.perf_counter()
        model = shard_llama(build_lm(config["tiny"], self.device), mesh)
        tensors = list(model.parameters()) + list(model.buffers())
        base_module = copy.deepcopy(model, memo={id(tensor): tensor for tensor in tensors})
        self.steps = {batch: e2e.DecodeStep(model, batch, self.device, torch.bfloat16) for batch in config["batches"]}
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
            record["memory_weights_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
        record["build_s"] = time.perf_counter() - began
        record["kv_heads_here"] = self.steps[config["batches"][0]].cache.layers[0].keys.shape[1]
        self.log(f"model built and sharded in {record['build_s']:.0f} s ({record['kv_heads_here']} KV heads here)")

        mode, inner = config["mode"], config["inner"]
        captures = CudaGraphCaptures().__enter__()
        try:
            self.base_module = base_module  # uncompiled: its forward is the eager base
            self.base = torch.compile(base_module, backend=inner, mode=mode, dynamic=False)
            self.warm_base()
            record["graphs_captured_base"] = captures.count
            self.save()

            adapters = self.adapters()
            self.names = list(adapters)
            began = time.perf_counter()
            self.mm = mmlora_fx.compile(model, adapters, max_loras=max(config["mixes"]), max_lora_rank=e2e.RANK,
                                        mode=mode, dynamic=False, max_batch_size=max(config["batches"]), inner=inner,
                                        tp_lora_a=config["tp_lora_a"])
            record["ours_setup_s"] = time.perf_counter() - began
            entries = tensor_parallel_entries(self.mm.runtime.linears, self.mm.runtime.serving, self.mm.runtime.layouts)
            record["layouts"] = layout_counts(entries)
            self.log(f"ours set up in {record['ours_setup_s']:.0f} s; {record['layouts']}")
            for batch, step in self.steps.items():
                self.warm_ours(batch, step)
                record["checks"][batch] = self.check(batch, step)
                self.log(f"b{batch} check: {record['checks'][batch]}")
            record["graphs_captured_total"] = captures.count
        finally:
            captures.__exit__(None, None, None)
        record["graphs_ours"] = self.mm.compiled_graphs
        # The process's cudagraph counters (Worker's warm-up records "cudagraph_skips" per model and batch).
        record["cudagraph_counters"] = {key: value for key, value in
                                        torch._dynamo.utils.counters["inductor"].items() if "cudagraph" in key}
        record["collectives_per_step"] = self.count_collectives()
        if self.cuda:
            record["memory_allocated_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            record["memory_reserved_gib"] = torch.cuda.memory_reserved(self.device) / 2**30
        self.save()

    def check(self, batch: int, step) -> dict:
        """Ours compiled against mm.eager and against the base, the batch's largest mix; a digest of
        ours' logits (the same on every rank)."""
        names = self.assignment(batch, mixes_for(self.config, batch)[-1])
        self.mm.runtime.prepare(names)
        step.rewind()
        self.one(step, None)
        step.rewind()
        self.one(step, None)  # the replay, as timed
        step.rewind()
        if self.config["mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        ours = step().float().clone()
        step.rewind()
        with torch.no_grad():
            eager = self.mm.eager(**step.inputs(), adapter_names=names).logits.float()
        step.rewind()
        if self.config["mode"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        base = step(self.base).float().clone()
        step.rewind()
        self.sync()
        digest = hashlib.sha256(ours.to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes()).hexdigest()[:16]
        return dict(mix=len(set(names)), error_vs_eager=((ours - eager).abs().max() / eager.abs().max()).item(),
                    lora_effect=((ours - base).abs().max() / base.abs().max()).item(), logits_digest=digest)

    def count_collectives(self) -> dict:
        """One step's collectives at the smallest batch, 1 adapter: base and ours, eager and compiled
        (the compiled ones not under CUDA graphs, whose replays the profiler does not see into)."""
        batch = self.config["batches"][0]
        step = self.steps[batch]
        names = self.assignment(batch, 1)
        self.mm.runtime.prepare(names)
        paths = {"base_eager": lambda: step(self.base_module.forward),
                 "ours_eager": lambda: self.mm.eager(**step.inputs(), adapter_names=names)}
        if self.config["mode"] != "reduce-overhead":
            paths.update(base_compiled=lambda: step(self.base), ours_compiled=lambda: step(None))
        found = {}
        for name, fn in paths.items():
            step.rewind()
            with torch.no_grad():
                found[name] = collectives_in(fn)
            self.sync()
        step.rewind()
        return found

    # ---------------------------------------------------------------- timing
    def block(self, step, call) -> float:
        config = self.config
        step.rewind()
        for _ in range(config["block_warmup"]):
            self.one(step, call)
        step.rewind()
        self.sync()
        return timed_steps(lambda: self.one(step, call), config["steps"], self.device)

    def time_batch(self, batch: int, share_ends: float) -> None:
        config, step, record = self.config, self.steps[batch], self.record
        mixes = mixes_for(config, batch)
        # A first guess of each side's ms from a few single steps (the same on every rank).
        guess = {}
        for variant in ["base"] + mixes:
            if variant != "base":
                self.mm.runtime.prepare(self.assignment(batch, variant))
            guess[variant] = e2e.timed(lambda: self.one(step, self.base if variant == "base" else None),
                                       self.device, repeats=3, warmup=1)
            step.rewind()
        kept, cost = [], config["rounds"] * self.block_seconds(guess["base"])
        for distinct in mixes:
            more = config["rounds"] * self.block_seconds(guess[distinct])
            if not self.agreed(time.time() + cost + more <= share_ends):
                break
            kept.append(distinct)
            cost += more
        for distinct in mixes[len(kept):]:
            record["skipped"].append(dict(batch=batch, mix=distinct, reason="budget"))
        variants = ["base"] + kept
        blocks = {variant: [] for variant in variants}
        orders = []
        for round_index in range(config["rounds"] if kept else 0):
            if round_index % 2 == 0:
                pair = min(2, config["rounds"] - round_index)
                seconds = pair * sum(self.block_seconds(blocks[v][-1] if blocks[v] else guess[v]) for v in variants)
                if not self.agreed(time.time() + seconds <= share_ends):
                    record["skipped"].append(dict(batch=batch, mix=kept, what=f"rounds {round_index}+", reason="budget"))
                    break
            order = variants if round_index % 2 == 0 else variants[::-1]
            orders.append(order)
            for variant in order:
                if variant != "base":
                    self.mm.runtime.prepare(self.assignment(batch, variant))
                    self.sync()
                blocks[variant].append(self.block(step, self.base if variant == "base" else None))
        for distinct in kept:
            if not blocks[distinct]:
                continue
            ratios = [ours / base for ours, base in zip(blocks[distinct], blocks["base"])]
            entry = dict(batch=batch, mix=distinct, overhead=statistics.median(ratios) - 1,
                         rounds_overhead=[ratio - 1 for ratio in ratios], rounds=len(ratios),
                         base_ms=statistics.median(blocks["base"]), ours_ms=statistics.median(blocks[distinct]),
                         base_block_ms=blocks["base"], ours_block_ms=blocks[distinct], orders=orders,
                         single_step_guess_ms=dict(base=guess["base"], ours=guess[distinct]))
            record["timings"].append(entry)
            self.log(f"b{batch} d{distinct}: {entry['overhead']:+.1%} over {len(ratios)} rounds "
                     f"(base {entry['base_ms']:.2f} ms, ours {entry['ours_ms']:.2f} ms)")
        self.save()

    def time_all(self) -> None:
        config, record, index = self.config, self.record, self.index
        if self.rank != 0:
            # Rank 0 takes the lock; this rank waits on a file, no collective pending on its GPU.
            record["go"] = wait_for(lambda: (self.shared / f"go.{index}").exists(), self.deadline - RESERVE_S)
            if not record["go"]:
                return
            for batch in config["batches"]:
                self.time_batch(batch, share_ends=float("inf"))  # rank 0's decisions rule (broadcast)
            self.agreed(True)
            return
        record["barrier"] = self.barrier()
        with exclusive(self.shared / "gpu.lock", self.deadline - RESERVE_S) as waited:
            if waited is None:
                record["skipped"].append(dict(what="all timings", reason="lock not acquired before the deadline"))
                # The other ranks must not wait for a go that never comes; they time nothing either.
                return
            share = self.fair_share()
            record["timing"] = dict(lock_waited_s=waited, share_s=share, gpu_state_start=gpu_state(),
                                    started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
            self.log(f"timing (lock after {waited:.0f} s, share {share:.0f} s)")
            (self.shared / f"go.{index}").write_text("")
            timing_began = time.time()
            for batch in config["batches"]:
                self.time_batch(batch, timing_began + share)
            self.agreed(True)  # every rank done with its steps
            record["timing"].update(gpu_state_end=gpu_state(), seconds=time.time() - timing_began)
            self.save()
            mark(self.shared, "done", index)

    def main(self) -> int:
        backend = "nccl" if self.cuda else "gloo"
        if self.cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=f"file://{self.shared}/store.{self.index}", rank=self.rank,
                                world_size=self.world, timeout=datetime.timedelta(seconds=max(60, self.args.budget_s)))
        self.record["device"] = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        status = 0
        try:
            self.log(f"start (pid {os.getpid()})")
            self.compile_and_warm()
            if self.rank == 0:
                mark(self.shared, "ready", self.index)
            self.time_all()
        except Exception as error:
            status = self.failed(error)
        finally:
            self.save()
            if self.rank == 0:
                mark(self.shared, "ready", self.index)
                mark(self.shared, "done", self.index)
        if status:
            return status  # at once: the parent then stops this run's other ranks (stuck in a collective)
        wait_for(lambda: count(self.shared, "done") >= self.config["runs"], self.deadline)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        return status


def layout_counts(entries: list[dict]) -> dict:
    """Served sharded targets by layout, and the collective LoRA adds to each (inspect's words)."""
    found = {}
    for entry in entries:
        layout = entry["layout"]
        if layout is None or not entry.get("served"):
            continue
        key = f"{layout['style']}: compiled {layout['collective_compiled']}; eager {layout['collective_eager']}"
        found[key] = found.get(key, 0) + 1
    return found


# --------------------------------------------------------------------------- parent
def summarize(config: dict, runs: list[list[dict]]) -> list[dict]:
    rows = []
    for batch in config["batches"]:
        for distinct in mixes_for(config, batch):
            by_rank = {}
            for rank in range(config["world"]):
                by_rank[rank] = [entry for ranks in runs if rank < len(ranks) for entry in ranks[rank].get("timings", [])
                                 if entry["batch"] == batch and entry["mix"] == distinct]
            zero = by_rank[0]
            checks = [ranks[0].get("checks", {}).get(str(batch)) for ranks in runs if ranks]
            checks = [check for check in checks if check]
            rows.append(dict(batch=batch, mix=distinct, runs=len(zero),
                             overhead=spread([entry["overhead"] for entry in zero]),
                             base_ms=spread([entry["base_ms"] for entry in zero]),
                             ours_ms=spread([entry["ours_ms"] for entry in zero]),
                             overhead_by_rank={rank: spread([entry["overhead"] for entry in entries])
                                               for rank, entries in by_rank.items()},
                             error_vs_eager=spread([check["error_vs_eager"] for check in checks]),
                             lora_effect=spread([check["lora_effect"] for check in checks])))
    return rows


def agreement(config: dict, runs: list[list[dict]]) -> dict:
    """Per run and batch: whether every rank's logits digest is the same."""
    found = {}
    for index, ranks in enumerate(runs):
        for batch in config["batches"]:
            digests = {ranks[r].get("checks", {}).get(str(batch), {}).get("logits_digest") for r in range(len(ranks))}
            found[f"run{index} b{batch}"] = len(digests) == 1 and None not in digests
    return found


def table(rows: list[dict]) -> list[str]:
    def pct(found):
        return f"{found['median']:+.1%} [{found['min']:+.1%}..{found['max']:+.1%}]" if found else "-"

    def num(found, form):
        return format(found["median"], form) if found else "-"

    lines = [f"{'b/d':>6}  {'rank 0 overhead med [min..max]':>31}  {'rank 1 med':>10}  {'base ms':>8}  "
             f"{'ours ms':>8}  {'err vs eager':>12}  {'LoRA effect':>11}  runs"]
    for row in rows:
        other = row["overhead_by_rank"].get(1)
        lines.append(f"{row['batch']:>3}/{row['mix']:<2}  {pct(row['overhead']):>31}  "
                     f"{num(other, '+.1%'):>10}  {num(row['base_ms'], '.3f'):>8}  {num(row['ours_ms'], '.3f'):>8}  "
                     f"{num(row['error_vs_eager'], '.1e'):>12}  {num(row['lora_effect'], '.3f'):>11}  {row['runs']}")
    lines.append("overhead: median of a run's rounds' ratios, then median [min..max] over runs (rank 0); ms: rank 0's "
                 "median over runs; err vs eager / LoRA effect: max |diff| / max |ref| of the logits, median over runs")
    return lines


def parent(args) -> int:
    config = settings(args)
    launch = Launch(args, __file__, "tp-decode-")
    t0, deadline, shared = launch.t0, launch.deadline, launch.shared
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([Path(sys.executable).name, *sys.argv]), commit=args.commit,
                  git_head_here=checkout_commit(), versions=versions(), settings=config, kv=e2e.KV, rank_r=e2e.RANK,
                  gpu=None if config["tiny"] else gpu_state("name,driver_version,memory.total,clocks.max.sm,power.limit"),
                  nccl=None if config["tiny"] else dict(version=".".join(map(str, torch.cuda.nccl.version())),
                                                        **{key: os.environ.get(key, value)
                                                           for key, value in NCCL_ENV.items()}))
    writer = launch.start("adapters")
    threads = max(1, (os.cpu_count() or 1) // (config["runs"] * config["world"]))
    children = {}
    for index in range(config["runs"]):
        for rank in range(config["world"]):
            env = launch.env(shared / f"run{index}.rank{rank}", threads)
            for key, value in NCCL_ENV.items():
                env.setdefault(key, value)
            children[index, rank] = launch.start("rank", "--index", str(index), "--rank", str(rank), env=env)
    log("main", t0, f"{config['runs']} runs of {config['world']} ranks started; budget {args.budget_s:.0f} s")
    ended = {}
    while len(ended) < len(children) and time.time() < deadline + GRACE_S:
        for (index, rank), child in children.items():
            if (index, rank) in ended or child.poll() is None:
                continue
            ended[index, rank] = child.returncode
            log("main", t0, f"run{index} rank {rank} exited with {child.returncode}")
            if child.returncode != 0:
                # A rank that died leaves the others of its run waiting in a collective: stop them.
                for (other_index, other_rank), other in children.items():
                    if other_index == index and other.poll() is None:
                        other.kill()
            if child.returncode != 0 or rank == 0:
                mark(shared, "ready", index)
                mark(shared, "done", index)
        time.sleep(0.5)
    stop_processes([(None, writer), *children.items()], ended, "killed at the budget or with its run")
    runs = []
    for index in range(config["runs"]):
        ranks = []
        for rank in range(config["world"]):
            path = args.out / f"run{index}.rank{rank}.json"
            record = json.loads(path.read_text()) if path.exists() else dict(index=index, rank=rank, error="no output")
            record["exit"] = ended.get((index, rank))
            ranks.append(record)
        runs.append(ranks)
    result["device"] = next((ranks[0].get("device") for ranks in runs if ranks[0].get("device")), None)
    result["runs"] = runs
    result["summary"] = summarize(config, runs)
    result["ranks_agree"] = agreement(config, runs)
    launch.finish(result, "tp_decode.json")
    first = runs[0][0]
    print(f"layouts (run0 rank0): {first.get('layouts')}")
    print(f"collectives per step (run0 rank0, batch {config['batches'][0]}): {first.get('collectives_per_step')}")
    print(f"ranks agree on the logits: {result['ranks_agree']}")
    print("\n".join(table(result["summary"])), flush=True)
    if config["tiny"]:
        print("--tiny: the script checked end to end; these times measure nothing")
    failed = [(r["index"], r["rank"]) for ranks in runs for r in ranks if r.get("error")]
    if failed:
        print(f"FAILED ranks (run, rank): {failed}")
    return 1 if failed or not all(result["ranks_agree"].values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2, help="tensor-parallel ranks, one process per GPU")
    parser.add_argument("--runs", type=int, default=3, help="independent compilations (N processes each)")
    parser.add_argument("--tiny", action="store_true", help="e2e's tiny widths on CPU processes (gloo)")
    parser.add_argument("--batches", default=None, help="default 1,16,64 (tiny: 1,4)")
    parser.add_argument("--mixes", default=None, help="distinct adapters, default 1,8,32 (tiny: 1,2)")
    parser.add_argument("--rounds", type=int, default=None, help="default 6 (tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per block, default 100 (tiny: 5)")
    parser.add_argument("--block-warmup", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget from the start")
    parser.add_argument("--mode", choices=["reduce-overhead", "default"], default=None,
                        help="torch.compile mode of both models: default reduce-overhead (CUDA graphs); tiny: default")
    parser.add_argument("--tp-lora-a", choices=["replicated", "sharded"], default="replicated",
                        help="LoRA A of the column-parallel targets: whole on every rank, or split along the rank")
    parser.add_argument("--inner", default=None, help="compiler of both models: inductor (tiny: aot_eager)")
    return run_role(parser, parent, write_adapters, Rank, "rank", internal=("index", "rank"))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
