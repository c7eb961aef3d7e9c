"""The flex tower attention (mmlora_fx/tower_attention.py) on the GPU at e2e's 7B tower shape, one attention
call: does Inductor compile it (head dim 80), does it equal transformers' per-image SDPA, and what
does it cost against that SDPA loop (#16's case a: 8 images of 1,024 patches; case b: 32).

    python3 benchmarks/tower_attention_check.py --out results/ [--images 8,32] [--commit <sha>]

Writes tower_attention_check.json (date, device, versions, commit, command, every timing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mmlora_fx import tower_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_record import checkout_commit, versions  # noqa: E402

HEADS, HEAD_DIM, ROWS_PER_IMAGE = 16, 80, 1024  # e2e.SEVEN_B's tower: embed 1280 / 16 heads; 448x448 / 14^2
# Besides the cases of equal images: images of other sizes, whose boundaries fall inside 128-row
# blocks, and a last block cut short (784 = 28x28 patches, 1,300 = 26x50, 2,116 = 46x46).
MIXED_ROWS = [1024, 784, 1300, 2116, 576]


def timed_ms(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", default="8,32,mixed", help="images of 1,024 rows, or `mixed` (MIXED_ROWS)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--commit")
    args = parser.parse_args()
    device = torch.device("cuda")
    result = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=torch.cuda.get_device_name(),
                  versions=versions(), commit=args.commit or checkout_commit(), command="python3 " + " ".join(sys.argv),
                  shape=dict(heads=HEADS, head_dim=HEAD_DIM, rows_per_image=ROWS_PER_IMAGE), cases={})
    flex = torch.compile(tower_attention.varlen_flex_attention, dynamic=False)
    for images in args.images.split(","):
        lengths = MIXED_ROWS if images == "mixed" else [ROWS_PER_IMAGE] * int(images)
        rows = sum(lengths)
        generator = torch.Generator(device=device).manual_seed(len(lengths))
        query, key, value = (torch.randn(1, HEADS, rows, HEAD_DIM, device=device, dtype=torch.bfloat16,
                                         generator=generator) for _ in range(3))
        cu_seqlens = torch.tensor([0] + lengths, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        began = time.perf_counter()
        ours = flex(None, query, key, value, cu_seq_lens_q=cu_seqlens)[0]
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - began
        reference = tower_attention.per_image_sdpa(query, key, value, cu_seqlens)
        error = ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()
        sdpa_ms = timed_ms(lambda: tower_attention.per_image_sdpa(query, key, value, cu_seqlens), args.repeats)
        flex_ms = timed_ms(lambda: flex(None, query, key, value, cu_seq_lens_q=cu_seqlens), args.repeats)
        result["cases"][images] = dict(rows=rows, lengths=lengths, first_call_s=compile_s, relative_error=error, sdpa_ms=sdpa_ms,
                                       flex_ms=flex_ms, sdpa_median_ms=statistics.median(sdpa_ms),
                                       flex_median_ms=statistics.median(flex_ms))
        print(f"{images} images ({rows} rows): error {error:.2e}, first call {compile_s:.1f} s, per-image SDPA "
              f"{statistics.median(sdpa_ms):.3f} ms, flex {statistics.median(flex_ms):.3f} ms (medians of "
              f"{args.repeats}, CUDA events, each a whole call with its host work)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tower_attention_check.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
