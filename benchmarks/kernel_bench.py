"""Time the LoRA work of one decoder layer through `mmlora::lora_add_` on a GPU.

One layer of a 7B-class GQA model (hidden 3584, intermediate 18944; q 3584->3584, k and v
3584->512, o 3584->3584, gate and up 3584->18944, down 18944->3584), bf16, rank 16 in rank-16
buffers, 32 adapter slots, 256 request entries: four op calls per layer as the runtime makes
them (qkv with 3 siblings, o, gate_up with 2 siblings, down).

For each row count and number of distinct adapters, it reports:

* the byte floor: the distinct adapters' A and B for all 7 linears read once, each input read
  once and each output read and written once, over the device-to-device bandwidth measured in
  the same run (a 1 GiB copy, bytes read plus written);
* the Triton kernels and a plain-torch gather/bmm implementation (no host sync either), both
  timed as CUDA-graph replays of `--layers` consecutive layers with distinct buffers (launch
  gaps as in a captured decode step), median of `triton.testing.do_bench` (which flushes L2
  before each replay), divided by the layer count;
* with `--base`, the base linears' own GEMMs (`x @ W.T` into the outputs, no LoRA), timed the
  same way: what the LoRA time compares with in a real step;
* with `--fold`, the base GEMMs with LoRA folded in (`FoldedOp`): one dense GEMM for every
  slot's shrink, a mask to each row's slot, and the expand as extra columns of K in each base
  GEMM, so no kernel reads and writes the outputs again. Timed like the base; what it costs over
  the base ("folded - base") compares with the Triton column. Timed twice: x as its producer
  left it in the fold's buffer, and x copied in first (what an op in place of the linear pays);
  with `--per-op`, both and the base GEMMs per op. It folds every op and lets siblings share one
  buffer, with the mask precomputed; the compiler's fold (`fold_min_rows`, mmlora_fx/folding.py)
  folds only linears with out >= in, each with its own `[x | s]`, and masks with a Triton kernel
  per call: `gpu_steps prefill_a_fold` measures that one;
* with `--stack`, the base GEMMs with every slot's A stacked under each weight (`StackedOp`, as
  `stack_max_rows` builds them: mmlora_fx/folding.py), so each GEMM also gives every slot's
  shrink, then one `lora_stacked_expand_` launch per op adds each row's own slot's expand (#15's
  lead: one LoRA launch per op at decode). "stacked - base" compares with the Triton column;
  the expand kernel the default does not pick at those rows (per row, or per tile) is timed too;
* with `--epilogue CONFIGS`, `kernels/gemm_lora.py` (`EpilogueOp`): our Triton GEMM per sibling
  without LoRA ("gemm", against cuBLAS's base GEMMs) and with each row's own expand in its
  epilogue ("lora", against the base GEMMs plus the Triton column's shrink and expand), per config
  (#16 case b's lead: no pass over the outputs at many slots).

`--shape lm_head` times the language model head instead of a decoder layer: one op of 3584 ->
152,064 (Qwen2's vocabulary), as head LoRA runs at decode (#18).

Batches: rows <= 256 are decode-like (one row per request, rows requests); more rows are
prefill-like (32 requests of rows/32 rows). `d` distinct adapters are spread over the requests
at random (every one used; `d` is capped at the number of requests).

Each batch's tile plan (`kernels/tile_plan.py`) is built once and passed to every call, as the
runtime does once per forward. `--variants` times `choose_config` overrides besides the default
(`"plan": false` drops the plan; each variant's delta is checked as `check_<name>`); e.g.
`--variants '{"k512": {"block_k": 512}}'`. `--profile` adds each kernel's device time per layer
(torch.profiler, eager calls). The run in docs/BENCHMARKS.md is `benchmarks/gpu_kernels.sh`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import torch
import triton
import triton.language as tl
import triton.testing

from mmlora_fx.kernels import tile_counters
from mmlora_fx.kernels.gemm_lora import gemm_lora_triton
from mmlora_fx.kernels.launch_config import choose_config
from mmlora_fx.kernels.lora_add import lora_add_triton
from mmlora_fx.kernels.lora_stacked import ROW_PATH_MAX_ROWS, lora_stacked_expand_triton
from mmlora_fx.kernels.reference import lora_add_gather_bmm, row_slots
from mmlora_fx.kernels.tile_plan import build_tile_plan

HIDDEN, INTERMEDIATE, KV = 3584, 18944, 512
# op name -> (input features, siblings' output features)
LAYER_OPS = {
    "qkv": (HIDDEN, (HIDDEN, KV, KV)),
    "o": (HIDDEN, (HIDDEN,)),
    "gate_up": (HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    "down": (INTERMEDIATE, (HIDDEN,)),
}
VOCAB = 152064
# A block of the e2e model's vision tower (Qwen2-VL-7B's: 1280 wide, MLP 5120), as served at
# prefill: qkv one linear of 3 x 1280, the attention's projection, fc1 and fc2.
TOWER, TOWER_MLP = 1280, 5120
TOWER_OPS = {
    "qkv": (TOWER, (3 * TOWER,)),
    "proj": (TOWER, (TOWER,)),
    "fc1": (TOWER, (TOWER_MLP,)),
    "fc2": (TOWER_MLP, (TOWER,)),
}
SHAPES = {"layer": LAYER_OPS, "tower": TOWER_OPS, "lm_head": {"lm_head": (HIDDEN, (VOCAB,))}}


@dataclasses.dataclass
class OpBuffers:
    """What one op call reads and writes: fixed buffers, as a captured model holds them."""

    x: torch.Tensor
    outputs: list[torch.Tensor]
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    slot_ranks: list[torch.Tensor]


def make_layer(rows: int, num_slots: int, max_rank: int, dtype: torch.dtype, device: str = "cuda",
               ops: dict = LAYER_OPS) -> dict[str, OpBuffers]:
    """Random activations and adapter buffers (every slot loaded at full rank) for one layer."""
    layer = {}
    for name, (in_features, out_features) in ops.items():
        layer[name] = OpBuffers(
            x=torch.randn(rows, in_features, device=device, dtype=dtype),
            outputs=[torch.randn(rows, out, device=device, dtype=dtype) for out in out_features],
            lora_a=[torch.randn(num_slots, max_rank, in_features, device=device, dtype=dtype) * in_features ** -0.5
                    for _ in out_features],
            lora_b=[torch.randn(num_slots, out, max_rank, device=device, dtype=dtype) * 0.5 for out in out_features],
            slot_ranks=[torch.full((num_slots,), max_rank, device=device, dtype=torch.int32) for _ in out_features],
        )
    return layer


def make_batch(rows: int, adapters: int, num_slots: int, max_requests: int, generator: torch.Generator,
               device: str = "cuda"):
    """Request tables for `rows` rows and `adapters` distinct adapters, their tile plan (as the
    runtime writes it once per forward), and their counts."""
    requests = rows if rows <= 256 else 32
    distinct = min(adapters, requests, num_slots)
    chosen = torch.randperm(num_slots, generator=generator)[:distinct]
    slots = torch.cat([chosen, chosen[torch.randint(0, distinct, (requests - distinct,), generator=generator)]])
    slots = slots[torch.randperm(requests, generator=generator)]
    padded = torch.full((max_requests,), -1, dtype=torch.int32)
    padded[:requests] = slots.to(torch.int32)
    cum = torch.full((max_requests + 1,), requests, dtype=torch.int64)  # every request weighs 1
    cum[: requests + 1] = torch.arange(requests + 1)
    plan = build_tile_plan(padded.tolist(), cum.tolist())
    return padded.to(device), cum.to(device), plan.to(device), requests, distinct


def byte_floor(rows: int, distinct: int, rank: int, element_size: int, ops: dict = LAYER_OPS) -> int:
    """Bytes one layer must move: used adapters' A and B once, x once, outputs read and written."""
    adapter = sum(rank * in_features + rank * out for in_features, outs in ops.values() for out in outs)
    activations = sum(in_features + 2 * sum(outs) for in_features, outs in ops.values())
    return element_size * (distinct * adapter + rows * activations)


def run_layer(impl, layer: dict[str, OpBuffers], slots: torch.Tensor, cum: torch.Tensor, plan=None) -> None:
    for op in layer.values():
        impl(op.outputs, op.x, op.lora_a, op.lora_b, op.slot_ranks, slots, cum, plan)


def make_base_weights(ops: dict, dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    """The base linears' weights `[out, in]` of one layer, one per sibling."""
    return {name: [torch.randn(out, in_features, device="cuda", dtype=dtype) * in_features ** -0.5 for out in outs]
            for name, (in_features, outs) in ops.items()}


def run_base(layer: dict[str, OpBuffers], weights: dict[str, list[torch.Tensor]]) -> None:
    for name, op in layer.items():
        for output, weight in zip(op.outputs, weights[name]):
            torch.matmul(op.x, weight.T, out=output)


@dataclasses.dataclass
class FoldedOp:
    """One op folded into its base GEMMs (#16's lead: the expand inside the base GEMM, no pass over
    the outputs). `buffer` is `[rows, siblings * slots * rank + in]`, laid out `[s_0 | x | s_1 |
    s_2 ...]`: x as if its producer wrote it there, each s_j sibling j's shrink over every slot,
    masked to the row's slot. Sibling j's GEMM reads the contiguous columns `[s_0 | x]` (j = 0),
    `[x | s_1]` (j = 1) or `[x | s_1 .. s_j]` (j >= 2, zeros against s_1 .. s_j-1 in its weight),
    so `inputs[j] @ weights[j].T` is its base output plus its delta in one GEMM."""

    buffer: torch.Tensor
    x: torch.Tensor  # the view of x in `buffer`
    source: torch.Tensor  # x where its producer left it (for `run_folded(copy_input=True)`)
    shrinks: list[torch.Tensor]  # views of each s_j in `buffer`
    shrink_a: torch.Tensor  # [siblings * slots * rank, in]: every slot's A of every sibling
    mask: torch.Tensor  # [rows, slots * rank]: 1 where the column's slot is the row's
    inputs: list[torch.Tensor]
    weights: list[torch.Tensor]
    outputs: list[torch.Tensor]


def make_folded(op: OpBuffers, weights: list[torch.Tensor], slots: torch.Tensor, cum: torch.Tensor) -> FoldedOp:
    """`op` and its base weights laid out for `run_folded`. Relies on what the adapter manager
    guarantees: padding past a slot's rank and empty slots are zeros, the scaling is in B."""
    rows, in_features = op.x.shape
    num_slots, rank = op.lora_a[0].shape[:2]
    width = num_slots * rank
    siblings = len(op.lora_a)
    buffer = torch.zeros(rows, in_features + siblings * width, device=op.x.device, dtype=op.x.dtype)
    starts = [0] + [width + in_features + (j - 1) * width for j in range(1, siblings)]  # s_j's first column
    x = buffer[:, width:width + in_features]
    x.copy_(op.x)
    column_slots = torch.arange(width, device=op.x.device) // rank
    mask = (column_slots[None, :] == row_slots(slots, cum, rows)[:, None]).to(op.x.dtype)
    inputs, folded_weights = [], []
    for j, (weight, b) in enumerate(zip(weights, op.lora_b)):
        first = 0 if j == 0 else width
        last = width + in_features if j == 0 else starts[j] + width
        folded = torch.zeros(weight.shape[0], last - first, device=weight.device, dtype=weight.dtype)
        folded[:, width - first:width - first + in_features] = weight
        folded[:, starts[j] - first:starts[j] - first + width] = b.permute(1, 0, 2).reshape(-1, width)
        inputs.append(buffer[:, first:last])
        folded_weights.append(folded)
    return FoldedOp(buffer, x, op.x, [buffer[:, start:start + width] for start in starts],
                    torch.cat([a.reshape(width, in_features) for a in op.lora_a]), mask, inputs, folded_weights,
                    op.outputs)


def run_folded(folded: dict[str, FoldedOp], copy_input: bool = False) -> None:
    """Every op of a layer folded: one GEMM for all siblings' shrinks over all slots, one masking
    kernel per sibling, one GEMM per sibling whose K grows by slots x rank (more at j >= 2).
    `copy_input`: x is first copied into the buffer, as an op must that cannot have x's producer
    write it there (an op in place of the linear, outside Inductor's fusion)."""
    for op in folded.values():
        if copy_input:
            op.x.copy_(op.source)
        shrunk = op.x @ op.shrink_a.T
        width = op.mask.shape[1]
        for j, shrink in enumerate(op.shrinks):
            torch.mul(shrunk[:, j * width:(j + 1) * width], op.mask, out=shrink)
        for inputs, output, weight in zip(op.inputs, op.outputs, op.weights):
            torch.matmul(inputs, weight.T, out=output)


def check_folded(layer: dict[str, OpBuffers], weights: dict[str, list[torch.Tensor]], slots, cum) -> float:
    """Largest relative error of the folded GEMMs' delta (folded output minus the base GEMM's)
    against the gather/bmm baseline's delta."""
    worst = 0.0
    for name, op in layer.items():
        fresh = OpBuffers(op.x, [torch.empty_like(o) for o in op.outputs], op.lora_a, op.lora_b, op.slot_ranks)
        folded = make_folded(fresh, weights[name], slots, cum)
        folded.x.normal_()  # the copy in must bring x back
        run_folded({name: folded}, copy_input=True)
        worst = max(worst, delta_error(fresh.outputs, op, weights[name], slots, cum))
    return worst


def delta_error(outputs: list[torch.Tensor], op: OpBuffers, weights: list[torch.Tensor], slots, cum) -> float:
    """Largest relative error, over `op`'s siblings, of `outputs` (each sibling's base output plus
    its delta, computed some way) against the base GEMM plus the gather/bmm baseline's delta,
    relative to that delta."""
    bases = [op.x @ w.T for w in weights]
    theirs = [base.clone() for base in bases]
    lora_add_gather_bmm(theirs, op.x, op.lora_a, op.lora_b, op.slot_ranks, slots, cum)
    worst = 0.0
    for o, t, base in zip(outputs, theirs, bases):
        delta = t.float() - base.float()
        worst = max(worst, ((o.float() - t.float()).norm() / delta.norm().clamp(min=1e-6)).item())
    return worst


@dataclasses.dataclass
class EpilogueOp:
    """One op's siblings as `kernels/gemm_lora.py` runs them (#16 case b's lead): our Triton GEMM
    with each row's own expand in its epilogue. `shrunk[j]` is sibling j's shrink of every row
    through its own slot, `[rows, rank]` in x's dtype, made once (the shrink kernel writes float32
    sums laid out per tile: a hookup would read twice these bytes, or have it write this). The
    shrink is not timed here: the kernels' profile (`--profile`) has its time."""

    x: torch.Tensor
    weights: list[torch.Tensor]
    shrunk: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    slot_ranks: list[torch.Tensor]
    row_slots: torch.Tensor
    outputs: list[torch.Tensor]


def make_epilogue(op: OpBuffers, weights: list[torch.Tensor], slots: torch.Tensor, cum: torch.Tensor) -> EpilogueOp:
    owners = row_slots(slots, cum, op.x.shape[0])
    shrunk = []
    for lora_a in op.lora_a:
        found = torch.zeros(op.x.shape[0], lora_a.shape[1], device=op.x.device, dtype=op.x.dtype)
        for slot in torch.unique(owners[owners >= 0]).tolist():
            rows = owners == slot
            found[rows] = op.x[rows] @ lora_a[slot].T
        shrunk.append(found)
    return EpilogueOp(op.x, weights, shrunk, op.lora_b, op.slot_ranks, owners.to(torch.int32), op.outputs)


def run_epilogue(ops: dict[str, EpilogueOp], config: tuple, lora: bool = True) -> None:
    """Every sibling's GEMM through `gemm_lora_triton`: with the rows' expand (`lora`) or without
    (the Triton GEMM against cuBLAS's)."""
    for op in ops.values():
        for weight, shrunk, lora_b, ranks, output in zip(op.weights, op.shrunk, op.lora_b, op.slot_ranks, op.outputs):
            gemm_lora_triton(op.x, weight, None, shrunk if lora else None, lora_b, ranks, op.row_slots, output,
                             config)


def check_epilogue(layer: dict[str, OpBuffers], weights: dict[str, list[torch.Tensor]], slots, cum, config) -> float:
    """Largest relative error of `run_epilogue`'s delta (its output minus the base GEMM's) against
    the gather/bmm baseline's delta."""
    worst = 0.0
    for name, op in layer.items():
        fresh = OpBuffers(op.x, [torch.empty_like(o) for o in op.outputs], op.lora_a, op.lora_b, op.slot_ranks)
        run_epilogue({name: make_epilogue(fresh, weights[name], slots, cum)}, config)
        worst = max(worst, delta_error(fresh.outputs, op, weights[name], slots, cum))
    return worst


@dataclasses.dataclass
class StackedOp:
    """One op's base GEMMs with every slot's A stacked under each weight (`[out + slots * rank, in]`),
    writing `[rows, out + slots * rank]`: the base output, then every slot's shrink of every row."""

    x: torch.Tensor
    weights: list[torch.Tensor]
    outputs: list[torch.Tensor]
    out_features: list[int]
    lora_b: list[torch.Tensor]
    slot_ranks: list[torch.Tensor]


def make_stacked(op: OpBuffers, weights: list[torch.Tensor]) -> StackedOp:
    rows = op.x.shape[0]
    stacked = [torch.cat([weight, a.reshape(-1, a.shape[-1])]) for weight, a in zip(weights, op.lora_a)]
    return StackedOp(op.x, stacked, [torch.empty(rows, w.shape[0], device=w.device, dtype=w.dtype) for w in stacked],
                     [weight.shape[0] for weight in weights], op.lora_b, op.slot_ranks)


def run_stacked(stacked: dict[str, StackedOp], slots: torch.Tensor, cum: torch.Tensor, plan=None,
                row_path_max_rows: int | None = None) -> None:
    """Every op of a layer stacked: its GEMMs, then one expand launch for its siblings (one program
    per row up to `row_path_max_rows` rows, the kernel's default if None; else per tile)."""
    options = {} if row_path_max_rows is None else {"row_path_max_rows": row_path_max_rows}
    for op in stacked.values():
        for output, weight in zip(op.outputs, op.weights):
            torch.matmul(op.x, weight.T, out=output)
        lora_stacked_expand_triton(op.outputs, op.out_features, op.lora_b, op.slot_ranks, slots, cum, plan, **options)


def check_stacked(layer: dict[str, OpBuffers], weights: dict[str, list[torch.Tensor]], slots, cum, plan=None,
                  row_path_max_rows: int | None = None) -> float:
    """Largest relative error of the stacked path's delta against the gather/bmm baseline's."""
    worst = 0.0
    for name, op in layer.items():
        stacked = make_stacked(op, weights[name])
        run_stacked({name: stacked}, slots, cum, plan, row_path_max_rows)
        outputs = [o[:, :out] for o, out in zip(stacked.outputs, stacked.out_features)]
        worst = max(worst, delta_error(outputs, op, weights[name], slots, cum))
    return worst


def torch_impl(outputs, x, lora_a, lora_b, slot_ranks, slots, cum, plan) -> None:
    lora_add_gather_bmm(outputs, x, lora_a, lora_b, slot_ranks, slots, cum)


def time_graph(step, repeat_ms: int) -> float:
    """Median milliseconds of one replay of a CUDA graph of `step`, captured after a warm-up."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile, autotune caches and allocator warm-up stay outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    median = triton.testing.do_bench(graph.replay, warmup=max(10, repeat_ms // 4), rep=repeat_ms, return_mode="median")
    del graph
    return median


def base_per_op(layers: list[dict[str, OpBuffers]], base_weights: list[dict[str, list[torch.Tensor]]],
                repeat_ms: int) -> dict[str, float]:
    """µs a layer of each op's base GEMMs alone (cuBLAS), as `op_<name>_base_us`."""
    found = {}
    for op_name in layers[0]:
        ms = time_graph(lambda: [torch.matmul(layer[op_name].x, w.T, out=o) for layer, weights in zip(layers, base_weights)
                                 for o, w in zip(layer[op_name].outputs, weights[op_name])], repeat_ms)
        found[f"op_{op_name}_base_us"] = ms * 1e3 / len(layers)
    return found


def copy_bandwidth() -> float:
    """Device-to-device bandwidth in bytes/s (a 1 GiB copy, bytes read plus bytes written)."""
    source = torch.randn(2**28, device="cuda")
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), warmup=25, rep=200, return_mode="median")
    return 2 * source.numel() * source.element_size() / (ms * 1e-3)


@triton.jit
def _empty_kernel(flag_ptr):
    tl.store(flag_ptr + tl.program_id(0), 1)


def launch_floor_us(launches: int, layers: int, repeat_ms: int) -> float:
    """Microseconds per layer of `launches` near-empty Triton kernels per layer in one graph.

    What kernel boundaries alone cost inside a CUDA graph (each launch one program storing one
    word): the latency floor under any implementation that launches that many kernels.
    """
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    ms = time_graph(lambda: [_empty_kernel[(1,)](flag) for _ in range(launches * layers)], repeat_ms)
    return ms * 1e3 / layers


def triton_impl(variant: dict):
    """`lora_add_triton` with `choose_config`'s heuristic overridden by `variant` (and without
    the tile plan if it holds `"plan": false`)."""
    variant = dict(variant)
    use_plan = variant.pop("plan", True)
    # With `"sums_in_kernel": true`, one counter set for every call (they run one after another and
    # leave it zero), made at the first call, outside any capture: a call's own would be a memset.
    counters: dict[torch.device, torch.Tensor] = {}

    def impl(outputs, x, lora_a, lora_b, slot_ranks, slots, cum, plan):
        config = choose_config(x.shape[0], x.shape[-1], lora_a[0].shape[1], lora_a[0].shape[0], x.dtype, **variant)
        kept = None
        if config.sums_in_kernel:
            if x.device not in counters:
                counters[x.device] = torch.zeros(tile_counters.POOL_SIZE, dtype=torch.int32, device=x.device)
            kept = counters[x.device]
        lora_add_triton(outputs, x, lora_a, lora_b, slot_ranks, slots, cum, plan if use_plan else None,
                        config=config, counters=kept)

    return impl


def check_against_torch(layer, slots, cum, plan, impl=None) -> float:
    """Largest relative error of the kernels' delta (`impl`'s: a variant's) against the gather/bmm
    baseline's."""
    impl = impl or lora_add_triton
    worst = 0.0
    for op in layer.values():
        # Fresh outputs: the timed replays keep adding into op.outputs, whose growing values
        # would make bf16 rounding, not the kernels, dominate the comparison.
        bases = [torch.randn_like(output) for output in op.outputs]
        ours = [base.clone() for base in bases]
        theirs = [base.clone() for base in bases]
        impl(ours, op.x, op.lora_a, op.lora_b, op.slot_ranks, slots, cum, plan)
        lora_add_gather_bmm(theirs, op.x, op.lora_a, op.lora_b, op.slot_ranks, slots, cum)
        for o, t, base in zip(ours, theirs, bases):
            delta = t.float() - base.float()
            worst = max(worst, ((o.float() - t.float()).norm() / delta.norm().clamp(min=1e-6)).item())
    return worst


def kernel_breakdown(layer: dict[str, OpBuffers], slots, cum, plan, iterations: int = 5,
                     impl=None) -> dict[str, float]:
    """Mean device microseconds per layer of each kernel the Triton path (`impl`'s: a
    variant's) launches (profiler)."""
    impl = impl or lora_add_triton
    return kernel_breakdown_of(lambda: run_layer(impl, layer, slots, cum, plan), iterations)


def kernel_breakdown_of(step, iterations: int = 5) -> dict[str, float]:
    """Mean device microseconds per call of `step` of each kernel it launches (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_device_time_total > 0:
            name = event.key.split("(")[0][:40]
            totals[name] = totals.get(name, 0.0) + event.self_device_time_total / iterations
    return totals


def _rounded(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def parse_variants(text: str | None) -> dict[str, dict]:
    variants = {"default": {}}
    if text:
        variants.update(json.loads(text))
    return variants


def main() -> int:
    from run_record import checkout_commit  # a script's neighbour: benchmarks/ is on sys.path when run

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="layer")
    parser.add_argument("--base", action="store_true", help="also time the base linears' GEMMs")
    parser.add_argument("--fold", action="store_true",
                        help="also time the base GEMMs with LoRA folded in (every slot's shrink in one GEMM, the "
                             "expand as extra K of the base GEMM; implies --base)")
    parser.add_argument("--stack", action="store_true",
                        help="also time the base GEMMs with every slot's A stacked under each weight and one expand "
                             "launch per op (stack_max_rows' path; implies --base)")
    parser.add_argument("--epilogue", default=None, metavar="CONFIGS",
                        help="also time kernels/gemm_lora.py: our Triton GEMM without and with each row's expand in its "
                             "epilogue, per config BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGES (comma-separated; implies --base)")
    parser.add_argument("--rows", default="1,16,64,256,4096")
    parser.add_argument("--adapters", default="1,8,32")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8, help="distinct layers per graph (2 at 4096 rows and more)")
    parser.add_argument("--repeat-ms", type=int, default=100)
    parser.add_argument("--variants", help='JSON {name: choose_config overrides} timed besides the default')
    parser.add_argument("--per-op", action="store_true", help="also time each op of the layer alone")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also print each kernel's device time per layer")
    parser.add_argument("--commit", default=None, help="the commit run (the device's git HEAD is stale)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    args.base = args.base or args.fold or args.stack or bool(args.epilogue)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    variants = parse_variants(args.variants)
    bandwidth = copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"{device}: torch {torch.__version__}, triton {triton.__version__}, copy {bandwidth / 1e12:.2f} TB/s",
          flush=True)

    empty_us = launch_floor_us(8, args.layers, args.repeat_ms)
    print(f"8 empty launches per layer in a graph: {empty_us:.1f} us", flush=True)
    ops = SHAPES[args.shape]
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        count = args.layers if rows <= 256 else 2
        layers = [make_layer(rows, args.slots, args.rank, dtype, ops=ops) for _ in range(count)]
        base_weights = [make_base_weights(ops, dtype) for _ in range(count)] if args.base else None
        for adapters in [int(a) for a in args.adapters.split(",")]:
            slots, cum, plan, requests, distinct = make_batch(rows, adapters, args.slots, args.max_requests, generator)
            floor_us = byte_floor(rows, distinct, args.rank, 2, ops) / bandwidth * 1e6
            row = dict(rows=rows, adapters=adapters, distinct=distinct, requests=requests, floor_us=floor_us,
                       check=check_against_torch(layers[0], slots, cum, plan))
            for name, variant in variants.items():
                impl = triton_impl(variant)
                if variant:  # a variant's own result, checked as the default's is
                    row[f"check_{name}"] = check_against_torch(layers[0], slots, cum, plan, impl)
                ms = time_graph(lambda: [run_layer(impl, layer, slots, cum, plan) for layer in layers], args.repeat_ms)
                row[f"ours_{name}_us"] = ms * 1e3 / count
            if args.per_op:
                impl = triton_impl({})
                for op_name in ops:
                    ms = time_graph(lambda: [impl(l[op_name].outputs, l[op_name].x, l[op_name].lora_a,
                                                  l[op_name].lora_b, l[op_name].slot_ranks, slots, cum, plan)
                                             for l in layers], args.repeat_ms)
                    row[f"op_{op_name}_us"] = ms * 1e3 / count
            if args.profile:
                row["kernels_us"] = kernel_breakdown(layers[0], slots, cum, plan)
                for name, variant in variants.items():
                    if variant:
                        row[f"kernels_{name}_us"] = kernel_breakdown(layers[0], slots, cum, plan,
                                                                     impl=triton_impl(variant))
            if base_weights is not None:
                ms = time_graph(lambda: [run_base(layer, weights) for layer, weights in zip(layers, base_weights)],
                                args.repeat_ms)
                row["base_us"] = ms * 1e3 / count
            if args.fold:
                row["check_fold"] = check_folded(layers[0], base_weights[0], slots, cum)
                folded = [{name: make_folded(op, weights[name], slots, cum) for name, op in layer.items()}
                          for layer, weights in zip(layers, base_weights)]
                ms = time_graph(lambda: [run_folded(f) for f in folded], args.repeat_ms)
                row["fold_us"] = ms * 1e3 / count
                ms = time_graph(lambda: [run_folded(f, copy_input=True) for f in folded], args.repeat_ms)
                row["fold_copy_us"] = ms * 1e3 / count
                if args.per_op:  # which ops the fold pays for: base, folded, folded with the copy
                    row.update(base_per_op(layers, base_weights, args.repeat_ms))
                    for op_name in ops:
                        for copy_input, key in ((False, "fold"), (True, "fold_copy")):
                            ms = time_graph(lambda: [run_folded({op_name: f[op_name]}, copy_input) for f in folded],
                                            args.repeat_ms)
                            row[f"op_{op_name}_{key}_us"] = ms * 1e3 / count
                del folded
            if args.stack:
                row["check_stack"] = check_stacked(layers[0], base_weights[0], slots, cum, plan)
                stacked = [{name: make_stacked(op, weights[name]) for name, op in layer.items()}
                           for layer, weights in zip(layers, base_weights)]
                ms = time_graph(lambda: [run_stacked(s, slots, cum, plan) for s in stacked], args.repeat_ms)
                row["stack_us"] = ms * 1e3 / count
                if args.profile:
                    row["kernels_stack_us"] = kernel_breakdown_of(lambda: run_stacked(stacked[0], slots, cum, plan))
                # The other expand kernel at these rows: one program per row where the default
                # tiles, and tiles where it runs per row (#15: which wins where).
                other = 0 if rows <= ROW_PATH_MAX_ROWS else 10**9
                row["check_stack_other"] = check_stacked(layers[0], base_weights[0], slots, cum, plan, other)
                ms = time_graph(lambda: [run_stacked(s, slots, cum, plan, other) for s in stacked], args.repeat_ms)
                row["stack_other_us"] = ms * 1e3 / count
                row["stack_other"] = "tiles" if other == 0 else "rows"
                del stacked
            if args.epilogue:
                epilogues = [{name: make_epilogue(op, weights[name], slots, cum) for name, op in layer.items()}
                             for layer, weights in zip(layers, base_weights)]
                for text in args.epilogue.split(","):
                    config = tuple(int(part) for part in text.split("x"))
                    row[f"check_epilogue_{text}"] = check_epilogue(layers[0], base_weights[0], slots, cum, config)
                    for lora, key in ((False, "gemm"), (True, "lora")):
                        ms = time_graph(lambda: [run_epilogue(e, config, lora) for e in epilogues], args.repeat_ms)
                        row[f"epilogue_{key}_{text}_us"] = ms * 1e3 / count
                    if args.per_op:
                        for op_name in ops:
                            for lora, key in ((False, "gemm"), (True, "lora")):
                                ms = time_graph(lambda: [run_epilogue({op_name: e[op_name]}, config, lora)
                                                         for e in epilogues], args.repeat_ms)
                                row[f"op_{op_name}_epilogue_{key}_{text}_us"] = ms * 1e3 / count
                if args.per_op and not args.fold:  # cuBLAS per op, as the fold's per-op rows have it
                    row.update(base_per_op(layers, base_weights, args.repeat_ms))
                del epilogues
            if not args.skip_torch:
                ms = time_graph(lambda: [run_layer(torch_impl, layer, slots, cum) for layer in layers],
                                args.repeat_ms)
                row["torch_us"] = ms * 1e3 / count
            results.append(row)
            print(json.dumps(_rounded(row)), flush=True)
        del layers, base_weights
        torch.cuda.empty_cache()

    header = dict(shape=args.shape, commit=args.commit or checkout_commit(), device=device, torch=torch.__version__, triton=triton.__version__,
                  copy_tb_s=bandwidth / 1e12, empty_launches_us=empty_us, date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  command="python3 " + " ".join(sys.argv))
    table = markdown_table(results, variants)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, results=results), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{header['date']}, {device}, torch {header['torch']}, triton {header['triton']}, "
                    f"measured copy bandwidth {header['copy_tb_s']:.2f} TB/s (read + write), "
                    f"8 empty launches per layer {empty_us:.1f} us\n\n"
                    f"`{header['command']}`\n\n{table}\n")
    return 0


def markdown_table(results: list[dict], variants: dict) -> str:
    names = list(variants)
    base = any("base_us" in row for row in results)
    fold = any("fold_us" in row for row in results)
    stack = any("stack_us" in row for row in results)
    epilogues = sorted({key[len("epilogue_lora_"):-len("_us")] for row in results for key in row
                        if key.startswith("epilogue_lora_")})
    lines = ["| rows | adapters (distinct) | requests | byte floor µs | Triton µs | Triton / floor | torch gather/bmm µs | torch / Triton | Triton vs torch delta error |"
             + "".join(f" {name} µs |" for name in names[1:]) + (" base GEMM µs | Triton / base |" if base else "")
             + (" folded GEMMs µs | folded - base µs | the same, x copied in: - base µs | folded delta error |" if fold else "")
             + (" stacked GEMMs + expands µs | stacked - base µs | stacked delta error | the other expand kernel:"
                " stacked - base µs |" if stack else "")
             + "".join(f" {c}: our GEMM - base µs | {c}: with the expand - base µs | {c}: delta error |"
                       for c in epilogues),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(names) - 1) + ("---:|---:|" if base else "")
             + ("---:|---:|---:|---:|" if fold else "") + ("---:|---:|---:|---:|" if stack else "")
             + "---:|---:|---:|" * len(epilogues)]
    for row in results:
        ours = row["ours_default_us"]
        torch_us = row.get("torch_us", math.nan)
        lines.append(
            f"| {row['rows']} | {row['adapters']} ({row['distinct']}) | {row['requests']} | {row['floor_us']:.1f} | "
            f"{ours:.1f} | {ours / row['floor_us']:.2f} | {torch_us:.1f} | {torch_us / ours:.1f} | {row['check']:.1e} |"
            + "".join(f" {row[f'ours_{name}_us']:.1f} |" for name in names[1:])
            + (f" {row['base_us']:.1f} | {ours / row['base_us']:.3f} |" if base else "")
            + (f" {row['fold_us']:.1f} | {row['fold_us'] - row['base_us']:.1f} | "
               f"{row['fold_copy_us'] - row['base_us']:.1f} | {row['check_fold']:.1e} |"
               if fold else "")
            + (f" {row['stack_us']:.1f} | {row['stack_us'] - row['base_us']:.1f} | {row['check_stack']:.1e} | "
               f"{row['stack_other']} {row['stack_other_us'] - row['base_us']:.1f} |" if stack else "")
            + "".join(f" {row[f'epilogue_gemm_{c}_us'] - row['base_us']:.1f} | "
                      f"{row[f'epilogue_lora_{c}_us'] - row['base_us']:.1f} | {row[f'check_epilogue_{c}']:.1e} |"
                      for c in epilogues))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
