"""Time one mixture-of-experts layer's LoRA through `mmlora::lora_experts_add_` on a GPU.

    python benchmarks/expert_kernel_bench.py --out results/ --commit <sha>         # GPU, ~1 minute
    python benchmarks/expert_kernel_bench.py --out /tmp/check --tiny              # the script, on the CPU

The layer is Qwen3-VL-30B-A3B's (hidden 2048, MoE intermediate 768, 128 experts, top-8) as
transformers' `batched_mm` experts run it: gathered rows (`bmm(W[ids], x[..., None])`, row `s`
run by expert `ids[s]`), each token's 8 rows consecutive (`repeat_interleave(8)`: layout
interleave 8), two expert matmuls: gate_up (2048 -> 2 x 768) and down (768 -> 2048), both summed
over PEFT's `in`. LoRA rank 16 in rank-16 buffers `[32 slots, 128 experts, ., .]`, bf16.

For each token count (decode 1, 16, 64: one token per request; prefill 2048: 32 requests of 64
tokens) and number of distinct adapters (1, 8, 32, at most the requests, spread over the
requests at random, every one used), with the router's top-8 drawn at random per token:

* the byte floor: A and B of the distinct (slot, expert) pairs the rows actually hit, read once,
  every input row read once and every output row read and written once, for both matmuls, over
  the device-to-device bandwidth measured in the same run (a 1 GiB copy, read plus written);
* the Triton path (`lora_experts_add_triton`) with `choose_expert_config`'s pick, and forced to
  each of its two sides (`per_row`: one program per row; `grouped`: rows sorted by (slot,
  expert) key on the device, blocks of 16 or 32), and the plain-torch body
  (`lora_experts_add_torch`), each timed as CUDA-graph replays of `--layers` consecutive layers
  with their own buffers (2 at prefill), the median of `triton.testing.do_bench` (which flushes
  L2 before each replay), divided by the layer count;
* the Triton path's delta against the torch body's on fresh outputs (relative error).

`--tiny` runs tiny shapes on the CPU (the kernels under TRITON_INTERPRET=1, perf_counter
timing, no graphs, no bandwidth): it shows the script works end to end; its times mean nothing.
Writes `expert_kernel_bench.json` under --out: date, device, versions, commit, command, every
timing; and prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

if "--tiny" in sys.argv and not torch.cuda.is_available():
    # The kernels run under Triton's interpreter on a CPU; it must be on before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from run_record import checkout_commit, versions  # noqa: E402

from mmlora_fx.kernels.lora_experts import (choose_expert_config, experts_row_slots,  # noqa: E402
                                            lora_experts_add_torch, lora_experts_add_triton)


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    slots: int
    rank: int
    tokens: tuple[int, ...]
    decode_max_tokens: int  # up to this many tokens, one per request; beyond, `prefill_requests` requests
    prefill_requests: int

    def ops(self) -> dict[str, tuple[int, int]]:
        """Expert matmul -> (features read, features written) of its LoRA (both over PEFT's `in`)."""
        return {"gate_up": (self.hidden, 2 * self.intermediate), "down": (self.intermediate, self.hidden)}


QWEN3_VL_30B_A3B = Shape(hidden=2048, intermediate=768, experts=128, top_k=8, slots=32, rank=16,
                         tokens=(1, 16, 64, 2048), decode_max_tokens=64,
                         prefill_requests=32)
TINY = Shape(hidden=32, intermediate=16, experts=8, top_k=2, slots=4, rank=8, tokens=(1, 4, 12), decode_max_tokens=4,
             prefill_requests=4)


@dataclasses.dataclass
class OpBuffers:
    """What one expert matmul's LoRA reads and writes: fixed buffers, as a captured model holds them."""

    x: torch.Tensor  # [rows, c, 1]
    output: torch.Tensor  # [rows, o, 1]
    lora_a: torch.Tensor  # [slots, experts, R, c]
    lora_b: torch.Tensor  # [slots, experts, o, R]
    ranks: torch.Tensor


def make_layer(shape: Shape, rows: int, dtype, device) -> dict[str, OpBuffers]:
    layer = {}
    for name, (reads, writes) in shape.ops().items():
        layer[name] = OpBuffers(
            x=torch.randn(rows, reads, 1, device=device, dtype=dtype),
            output=torch.randn(rows, writes, 1, device=device, dtype=dtype),
            lora_a=torch.randn(shape.slots, shape.experts, shape.rank, reads, device=device, dtype=dtype)
            * reads ** -0.5,
            lora_b=torch.randn(shape.slots, shape.experts, writes, shape.rank, device=device, dtype=dtype) * 0.5,
            ranks=torch.full((shape.slots,), shape.rank, device=device, dtype=torch.int32))
    return layer


def make_batch(shape: Shape, tokens: int, adapters: int, generator: torch.Generator, device):
    """Request tables (one token per request at decode, `prefill_requests` requests beyond), the
    router's top-k expert ids of every row, and the distinct adapters used."""
    requests = tokens if tokens <= shape.decode_max_tokens else shape.prefill_requests
    distinct = min(adapters, requests, shape.slots)
    chosen = torch.randperm(shape.slots, generator=generator)[:distinct]
    slots = torch.cat([chosen, chosen[torch.randint(0, distinct, (requests - distinct,), generator=generator)]])
    slots = slots[torch.randperm(requests, generator=generator)].to(torch.int32)
    cum = torch.arange(requests + 1) * (tokens // requests)
    cum[-1] = tokens  # the last request takes the remainder
    ids = torch.rand(tokens, shape.experts, generator=generator).topk(shape.top_k, dim=1).indices.reshape(-1)
    return slots.to(device), cum.to(device), ids.to(device), requests, distinct


def byte_floor(shape: Shape, rows: int, slots: torch.Tensor, cum: torch.Tensor, ids: torch.Tensor,
               element_size: int) -> tuple[int, int]:
    """(bytes, distinct (slot, expert) pairs hit): those pairs' A and B read once for both
    matmuls, every input row read once, every output row read and written once."""
    row_slots = experts_row_slots(rows, 1, shape.top_k, slots.cpu(), cum.cpu())
    keys = row_slots * shape.experts + ids.cpu()
    pairs = int(torch.unique(keys[row_slots >= 0]).numel())
    total = 0
    for reads, writes in shape.ops().values():
        total += pairs * shape.rank * (reads + writes) + rows * (reads + 2 * writes)
    return total * element_size, pairs


def run_layer(impl, layer: dict[str, OpBuffers], slots, cum, ids, top_k: int) -> None:
    for op in layer.values():
        impl(op.output, op.x, op.lora_a, op.lora_b, op.ranks, ids, True, 1, top_k, slots, cum)


def triton_impl(variant: dict):
    """`lora_experts_add_triton` with `choose_expert_config` overridden by `variant`."""

    def impl(output, x, lora_a, lora_b, ranks, ids, contract_in, tiles, interleave, slots, cum):
        config = choose_expert_config(x.shape[0], True, x.shape[1], lora_a.shape[2], **variant)
        lora_experts_add_triton(output, x, lora_a, lora_b, ranks, ids, contract_in, tiles, interleave, slots, cum,
                                config=config)

    return impl


VARIANTS = {"triton": {}, "per_row": {"per_row_max_rows": 1 << 30}, "grouped": {"per_row_max_rows": 0}}


def time_cuda(step, repeat_ms: int) -> float:
    """Median ms of one replay of a CUDA graph of `step` (kernel_bench's method)."""
    from kernel_bench import time_graph

    return time_graph(step, repeat_ms)


def time_cpu(step, repeats: int = 3) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def check(layer: dict[str, OpBuffers], slots, cum, ids, top_k: int) -> float:
    """Largest relative error of the Triton path's delta against the torch body's."""
    worst = 0.0
    for op in layer.values():
        base = torch.randn_like(op.output)
        ours, theirs = base.clone(), base.clone()
        lora_experts_add_triton(ours, op.x, op.lora_a, op.lora_b, op.ranks, ids, True, 1, top_k, slots, cum)
        lora_experts_add_torch(theirs, op.x, op.lora_a, op.lora_b, op.ranks, ids, True, 1, top_k, slots, cum)
        delta = theirs.float() - base.float()
        worst = max(worst, ((ours.float() - theirs.float()).norm() / delta.norm().clamp(min=1e-6)).item())
    return worst


def copy_bandwidth() -> float:
    from kernel_bench import copy_bandwidth as measure

    return measure()


def markdown_table(results: list[dict]) -> str:
    lines = ["| tokens | rows | adapters (distinct) | (slot, expert) pairs | byte floor µs | Triton µs "
             "| Triton / floor | per-row µs | grouped µs | torch µs | torch / Triton | delta error |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        floor = row.get("floor_us") or float("nan")
        lines.append(f"| {row['tokens']} | {row['rows']} | {row['adapters']} ({row['distinct']}) | {row['pairs']} | "
                     f"{floor:.1f} | {row['triton_us']:.1f} | {row['triton_us'] / floor:.2f} | "
                     f"{row['per_row_us']:.1f} | {row['grouped_us']:.1f} | {row['torch_us']:.1f} | "
                     f"{row['torch_us'] / row['triton_us']:.1f} | {row['check']:.1e} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for expert_kernel_bench.json")
    parser.add_argument("--commit", default=None, help="the commit measured (the device's git HEAD is stale)")
    parser.add_argument("--tokens", default=None, help="token counts, comma-separated (default 1,16,64,2048)")
    parser.add_argument("--adapters", default="1,8,32")
    parser.add_argument("--layers", type=int, default=4, help="layers per graph at decode (2 at prefill)")
    parser.add_argument("--repeat-ms", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes; on a CPU, interpreted kernels")
    args = parser.parse_args()

    shape = TINY if args.tiny else QWEN3_VL_30B_A3B
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        parser.error("needs a CUDA device (or --tiny)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth() if cuda else None
    device_name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"
    print(f"{device_name}: torch {torch.__version__}, triton {triton.__version__}"
          + (f", copy {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""), flush=True)
    token_counts = [int(t) for t in args.tokens.split(",")] if args.tokens else list(shape.tokens)
    results = []
    for tokens in token_counts:
        rows = tokens * shape.top_k
        count = 1 if not cuda else args.layers if tokens <= 64 else 2
        layers = [make_layer(shape, rows, dtype, device) for _ in range(count)]
        for adapters in [int(a) for a in args.adapters.split(",")]:
            slots, cum, ids, requests, distinct = make_batch(shape, tokens, adapters, generator, device)
            floor_bytes, pairs = byte_floor(shape, rows, slots, cum, ids, torch.finfo(dtype).bits // 8)
            row = dict(tokens=tokens, rows=rows, adapters=adapters, distinct=distinct, requests=requests, pairs=pairs,
                       floor_bytes=floor_bytes, floor_us=floor_bytes / bandwidth * 1e6 if bandwidth else None,
                       check=check(layers[0], slots, cum, ids, shape.top_k),
                       gate_up_config=dataclasses.asdict(choose_expert_config(rows, True, shape.hidden, shape.rank)))
            impls = {name: triton_impl(variant) for name, variant in VARIANTS.items()}
            impls["torch"] = lora_experts_add_torch
            for name, impl in impls.items():
                step = lambda impl=impl: [run_layer(impl, layer, slots, cum, ids, shape.top_k)  # noqa: E731
                                          for layer in layers]
                ms = time_cuda(step, args.repeat_ms) if cuda else time_cpu(step)
                row[f"{name}_us"] = ms * 1e3 / count
            results.append(row)
            print(json.dumps({key: float(f"{value:.4g}") if isinstance(value, float) else value
                              for key, value in row.items()}), flush=True)
        del layers
        if cuda:
            torch.cuda.empty_cache()

    table = markdown_table(results)
    print(table)
    record = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=device_name, versions=versions(),
                  commit=args.commit or f"{checkout_commit()} (checkout HEAD, not passed with --commit)",
                  command=" ".join([Path(sys.executable).name, *sys.argv]), shape=dataclasses.asdict(shape),
                  dtype=str(dtype), copy_bytes_per_s=bandwidth, layers=args.layers, repeat_ms=args.repeat_ms,
                  tiny=args.tiny, results=results, markdown=table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "expert_kernel_bench.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out / 'expert_kernel_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
