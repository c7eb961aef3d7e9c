"""Time embedding LoRA (`mmlora::lora_embedding_add_`'s two bodies) on a GPU (#18).

    python3 benchmarks/embedding_bench.py --json out.json [--commit <sha>]

Qwen2's input embeddings (152,064 x 3584), bf16, rank 16 in rank-16 buffers, 32 adapter slots,
decode-like batches (one row per request) and a prefill-like one (32 requests), with 1, 8 and 32
distinct adapters spread at random as `kernel_bench.py` spreads them. For each: the byte floor
(the rows' A columns and the distinct adapters' B read once, the embeddings read and written once,
over the copy bandwidth measured in the same run), the CUDA path (the gathered columns expanded by
`lora_add`'s kernels), the plain-torch loop over the slots (the CPU path) and the base lookup
itself (`F.embedding` into the output), each as the median CUDA-graph replay of `--layers`
independent copies (`kernel_bench.time_graph`), divided by the copies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from kernel_bench import HIDDEN, VOCAB, copy_bandwidth, make_batch, time_graph  # noqa: E402
from mmlora_fx.kernels.lora_embedding import lora_embedding_add_torch, lora_embedding_add_triton  # noqa: E402
from run_record import checkout_commit, versions  # noqa: E402

DEVICE = "cuda"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,16,64,4096")
    parser.add_argument("--adapters", default="1,8,32")
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeat-ms", type=int, default=40)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    dtype, device = torch.bfloat16, DEVICE
    bandwidth = copy_bandwidth()
    weight = torch.randn(VOCAB, HIDDEN, device=device, dtype=dtype)
    copies = [(torch.randn(args.slots, args.rank, VOCAB, device=device, dtype=dtype),
               torch.randn(args.slots, HIDDEN, args.rank, device=device, dtype=dtype) * 0.1,
               torch.full((args.slots,), args.rank, dtype=torch.int32, device=device)) for _ in range(args.layers)]
    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        ids = torch.randint(0, VOCAB, (rows,), device=device)
        outputs = [torch.randn(rows, HIDDEN, device=device, dtype=dtype) for _ in copies]
        for adapters in [int(a) for a in args.adapters.split(",")]:
            slots, cum, _, requests, distinct = make_batch(rows, adapters, args.slots, 256, generator)
            floor = 2 * (rows * args.rank + distinct * HIDDEN * args.rank + 2 * rows * HIDDEN)
            row = dict(rows=rows, adapters=adapters, distinct=distinct, requests=requests,
                       floor_us=floor / bandwidth * 1e6)
            check = [out.clone() for out in outputs[:1]], [out.clone() for out in outputs[:1]]
            lora_embedding_add_triton(check[0][0], ids, *copies[0][:2], copies[0][2], slots, cum)
            lora_embedding_add_torch(check[1][0], ids, *copies[0][:2], copies[0][2], slots, cum)
            delta = check[1][0].float() - outputs[0].float()
            row["check"] = ((check[0][0].float() - check[1][0].float()).norm() / delta.norm()).item()
            for name, body in (("triton", lora_embedding_add_triton), ("torch", lora_embedding_add_torch)):
                ms = time_graph(lambda: [body(out, ids, a, b, ranks, slots, cum)
                                         for out, (a, b, ranks) in zip(outputs, copies)], args.repeat_ms)
                row[f"{name}_us"] = ms * 1e3 / len(copies)
            ms = time_graph(lambda: [torch.index_select(weight, 0, ids, out=out) for out in outputs], args.repeat_ms)
            row["base_lookup_us"] = ms * 1e3 / len(copies)
            results.append(row)
            print(json.dumps({key: float(f"{value:.4g}") if isinstance(value, float) else value
                              for key, value in row.items()}), flush=True)
    lines = ["| rows | adapters (distinct) | byte floor µs | Triton µs | torch loop µs | torch / Triton | base lookup µs "
             "| delta error |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results:
        lines.append(f"| {row['rows']} | {row['adapters']} ({row['distinct']}) | {row['floor_us']:.1f} | "
                     f"{row['triton_us']:.1f} | {row['torch_us']:.1f} | {row['torch_us'] / row['triton_us']:.1f} | "
                     f"{row['base_lookup_us']:.1f} | {row['check']:.1e} |")
    print("\n".join(lines))
    if args.json:
        header = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=torch.cuda.get_device_name(),
                      versions=versions(), commit=args.commit or checkout_commit(), copy_tb_s=bandwidth / 1e12,
                      command="python3 " + " ".join(sys.argv))
        Path(args.json).write_text(json.dumps(dict(header=header, results=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
