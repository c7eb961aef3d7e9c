"""One decode row: the base GEMV with its LoRA in one launch (`kernels/gemv_lora.py`) against cuBLAS
plus our LoRA kernels, per op of e2e's 7B language-model layer (#15's batch-1 lead).

    python3 benchmarks/gemv_lora_bench.py --json out.json --commit <sha>     # a GPU (~60-120 s)
    TRITON_INTERPRET=1 python3 benchmarks/gemv_lora_bench.py --tiny          # checks it on a CPU

Prediction before it ran: at batch 1 a step's LoRA is 224 launches of the kernel path (0.96 ms
of kernels at ~4.3 µs each) or 112 of the stack (0.33 ms), where its bytes are ~1 µs a layer.
The fused kernel adds none. It pays if its GEMV runs near cuBLAS's: the layer's GEMVs take ~170 µs
(466 MB of weights at ~2.7 TB/s), so every 1% the Triton GEMV loses is ~1.7 µs a layer (~48 µs a
step), against the ~34 µs a layer the kernel path's LoRA costs. Its own extra bytes: the row's
A once per column block from L2 (`rank / BLOCK_N` of W: 12.5% at 128 columns), B once per split.

Per op (q, k, v, o, gate, up, down; one row; `--slots` slots of rank 16, the row's adapter in
one of them), CUDA-graph replays of `--layers` distinct copies of the op, more for small ops (at
least ~100 MB of weights a graph, so that they come from HBM, not L2), µs per call:

- `cublas`: `F.linear` alone (the compiled base's GEMV);
- `cublas_lora`: `F.linear`, then `lora_add` (the kernel path's LoRA at one row);
- `gemv`: the fused kernel for a row of the base model (slot -1: its GEMV alone);
- `gemv_lora`: the fused kernel with the row's adapter;

for each `gemv_config` in `--configs` (programs x BLOCK_N x BLOCK_K). Each is checked against
`gemv_lora_reference` (float32) on fresh random values; `cublas_lora`'s error is the baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run_record import checkout_commit, versions  # noqa: E402
from mmlora_fx.kernels.gemv_lora import GemvWorkspace, gemv_config, gemv_lora_reference, gemv_lora_triton  # noqa: E402
from mmlora_fx.kernels.lora_add import lora_add  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 3584, 18944, 512
OPS = {"q": (HIDDEN, HIDDEN, True), "k": (HIDDEN, KV, True), "v": (HIDDEN, KV, True), "o": (HIDDEN, HIDDEN, False),
       "gate": (HIDDEN, INTERMEDIATE, False), "up": (HIDDEN, INTERMEDIATE, False), "down": (INTERMEDIATE, HIDDEN, False)}
TINY_OPS = {"q": (64, 48, True), "down": (96, 40, False)}  # (in, out, bias)


def make_op(in_features, out_features, bias, slots, rank, dtype, device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    return dict(x=randn(1, in_features), weight=randn(out_features, in_features) * in_features ** -0.5,
                bias=randn(out_features) if bias else None,
                lora_a=randn(slots, rank, in_features) * in_features ** -0.5, lora_b=randn(slots, out_features, rank),
                slot_ranks=torch.full((slots,), rank, dtype=torch.int32, device=device))


def time_calls(step, repeat_ms: int, device) -> float:
    """Median ms of one replay of a CUDA graph of `step` (on the CPU: one call, wall time)."""
    if device.type != "cuda":
        began = time.perf_counter()
        step()
        return (time.perf_counter() - began) * 1e3
    from benchmarks.kernel_bench import time_graph

    return time_graph(step, repeat_ms)


def error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8, help="distinct copies of each op per graph")
    parser.add_argument("--configs", default="1056x128x128,528x128x64x4x1,528x128x128x4x1,1056x128x64x4x1,"
                                             "1056x128x128x4x1,2112x128x64x4x1,1056x128x128x8x1,1056x128x128x8",
                        help="programs x BLOCK_N x BLOCK_K [x warps, default 4 [x least K steps a split, default "
                             "gemv_config's rule]] per fused config; the first is gemv_config's default. The "
                             "2026-12-07 12:53 sweep's labels had no fifth field and meant one step (x1 now)")
    parser.add_argument("--repeat-ms", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="small shapes, one layer, float32 (a CPU check)")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    ops = TINY_OPS if args.tiny else OPS
    layers = 1 if args.tiny else args.layers
    # Each config under the label it was given, its missing fields filled: warps 4, gemv_config's rule.
    configs = {text: tuple(int(part) for part in text.split("x")) for text in args.configs.split(",")}
    configs = {text: config + (4, None)[len(config) - 3:] for text, config in configs.items()}
    generator = torch.Generator(device=device).manual_seed(0)
    slot = torch.tensor([args.slots // 2], dtype=torch.int32, device=device)
    no_slot = torch.tensor([-1], dtype=torch.int32, device=device)
    # The kernel path's tables for one row of one request in that slot.
    max_requests = 16
    request_slots = torch.full((max_requests,), -1, dtype=torch.int32, device=device)
    request_slots[0] = slot
    cum = torch.ones(max_requests + 1, dtype=torch.int64, device=device)
    cum[0] = 0
    results = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=torch.cuda.get_device_name()
                   if device.type == "cuda" else "cpu", versions=versions(), commit=args.commit or checkout_commit(),
                   command=" ".join(sys.argv), slots=args.slots, rank=args.rank, layers=layers, ops={})
    for name, (in_features, out_features, bias) in ops.items():
        # At least ~100 MB of weights per graph (twice an H100's L2), so small ops (k, v) come from
        # HBM too: their 8 copies alone (29 MB) would fit in L2.
        count = layers if args.tiny else max(layers, min(32, -(-100_000_000 // (2 * in_features * out_features))))
        copies = [make_op(in_features, out_features, bias, args.slots, args.rank, dtype, device, generator)
                  for _ in range(count)]
        outs = [torch.empty(1, out_features, device=device, dtype=dtype) for _ in copies]
        record = results["ops"][name] = dict(in_features=in_features, out_features=out_features)
        expected = gemv_lora_reference(**copies[0], slot=slot)

        def cublas(lora: bool):
            for op, out in zip(copies, outs):
                # Into the output buffer, as Inductor's extern GEMM calls write (no copy kernel).
                if op["bias"] is not None:
                    torch.addmm(op["bias"], op["x"], op["weight"].T, out=out)
                else:
                    torch.mm(op["x"], op["weight"].T, out=out)
                if lora:
                    lora_add([out], op["x"], [op["lora_a"]], [op["lora_b"]], [op["slot_ranks"]], request_slots, cum)

        record["copies"] = count
        record["cublas_us"] = time_calls(lambda: cublas(False), args.repeat_ms, device) * 1e3 / count
        record["cublas_lora_us"] = time_calls(lambda: cublas(True), args.repeat_ms, device) * 1e3 / count
        cublas(True)
        record["cublas_lora_error"] = error(outs[0], expected)
        record["configs"] = {}
        for key, (programs, block_n, block_k, warps, min_steps) in configs.items():
            config = gemv_config(out_features, in_features, programs=programs, block_n=block_n, block_k=block_k,
                                 min_steps=min_steps)
            spaces = [GemvWorkspace.make(config[2] * out_features, -(-out_features // config[0]), device)
                      for _ in copies]

            def fused(which):
                for op, out, space in zip(copies, outs, spaces):
                    gemv_lora_triton(**op, slot=which, out=out, workspace=space, config=config, num_warps=warps)

            found = record["configs"][key] = dict(config=list(config))
            found["gemv_us"] = time_calls(lambda: fused(no_slot), args.repeat_ms, device) * 1e3 / count
            found["gemv_lora_us"] = time_calls(lambda: fused(slot), args.repeat_ms, device) * 1e3 / count
            fused(slot)
            found["error"] = error(outs[0], expected)
            fused(no_slot)
            found["base_error"] = error(outs[0], gemv_lora_reference(**copies[0], slot=no_slot))
        best = min(record["configs"].values(), key=lambda found: found["gemv_lora_us"])
        print(f"{name:5s} {in_features:6d}->{out_features:6d}  cublas {record['cublas_us']:7.1f}  "
              f"+lora {record['cublas_lora_us']:7.1f}  fused best {best['gemv_lora_us']:7.1f} "
              f"(gemv {best['gemv_us']:7.1f}, config {best['config']}, error {best['error']:.1e}; "
              f"cublas+lora error {record['cublas_lora_error']:.1e})", flush=True)
    # Per layer: each op's best config.
    layer = {key: sum(record[key] for record in results["ops"].values()) for key in ("cublas_us", "cublas_lora_us")}
    for key in ("gemv_us", "gemv_lora_us"):
        layer[f"best_{key}"] = sum(min(found[key] for found in record["configs"].values())
                                   for record in results["ops"].values())
    results["layer_us"] = layer
    print("layer µs:", {key: round(value, 1) for key, value in layer.items()})
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
