"""Two PEFT adapters on a tiny multimodal model: one mixed batch, compared with PEFT per request.

    python examples/mixed_batch.py [--model tiny-qwen2-vl] [--inner inductor]

Builds a zoo model (random weights, no download; `--model tiny-qwen2-audio` for audio), makes two
LoRA adapters with PEFT over its tower, connector and language model, compiles the model with
`mmlora_fx.compile`, runs one batch whose requests carry different adapters (one the base model)
and different numbers of images (or audio clips), and prints, per request, how far its logits are
from PEFT's for that request alone.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import mmlora_fx
from mmlora_fx import zoo

def peft_logits(base, adapters: dict, request: dict, name):
    """What PEFT gives for one request alone, with its adapter (or none)."""
    from peft import PeftModel

    with torch.no_grad():
        if name is None:
            return base(**request).logits[0]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[name]))
        return peft_model.eval()(**request).logits[0]


def main() -> int:
    # PEFT 0.21 asks transformers 5 for `is_gradient_checkpointing`, deprecated there: not ours to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2-vl", choices=list(zoo.ZOO))
    parser.add_argument("--inner", default="inductor", help="compiler of the rewritten graphs (inductor, aot_eager)")
    args = parser.parse_args()

    base = zoo.build(args.model)
    workdir = Path(tempfile.mkdtemp(prefix="mmlora-fx-example-"))
    family = zoo.ZOO[args.model]
    adapters = {name: zoo.make_adapter(base, workdir / name, family.all_targets, r=rank, lora_alpha=3 * rank + 1,
                                       seed=seed)
                for seed, (name, rank) in enumerate([("alice", 4), ("bob", 8)])}
    what = zoo.token_name(family.modality)
    items = "images" if what == "image" else "clips"
    print(f"{args.model}: adapters alice (rank 4) and bob (rank 8) over {what} tower, connector and language model")

    started = time.perf_counter()
    mm = mmlora_fx.compile(zoo.build(args.model), adapters, max_loras=2, inner=args.inner)
    batch = zoo.make_batch(base, (1, 0, 2), seed=1)
    names = ["alice", None, "bob"]
    print(f"compiling with {args.inner} and running one mixed batch (a minute or two on a CPU) ...")
    with torch.no_grad():
        logits = mm(**batch, adapter_names=names).logits
    print(f"done in {time.perf_counter() - started:.0f} s, {mm.compiled_graphs} graphs compiled\n")

    print(f"{'request':>7}  {items:>6}  {'adapter':8}  {'rel. error vs PEFT':>18}  {'adapter effect':>14}  agrees")
    worst = 0.0
    images = (1, 0, 2)
    for row, (request, name) in enumerate(zip(zoo.split_batch(base, batch), names)):
        reference = peft_logits(base, adapters, request, name)
        with torch.no_grad():
            plain = base(**request).logits[0]
        scale = reference.abs().max()
        error = ((logits[row] - reference).abs().max() / scale).item()
        effect = ((plain - reference).abs().max() / scale).item()
        worst = max(worst, error)
        print(f"{row:>7}  {images[row]:>6}  {name or 'base':8}  {error:>18.1e}  {effect:>14.2f}  "
              f"{'yes' if error <= 1e-4 else 'NO'}")
    print(f"\nevery request equals PEFT alone (max relative error {worst:.1e} <= 1e-4): {worst <= 1e-4}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
