"""Graph breaks of the Qwen2-VL forward per dynamo setting, on the CPU (#16's lead: "the tower
captured without a graph break per block, e.g. capture_scalar_outputs").

    python benchmarks/graph_breaks.py --json results/graph_breaks.json

For each setting (dynamo's defaults; `capture_scalar_outputs`; `capture_dynamic_output_shape_ops`;
both; the tower's attention as flex_attention, `mmlora_fx/tower_attention.py`, with dynamo's defaults) it compiles e2e.py's TINY model (float32) with a backend that counts how many compiled
graphs one forward calls, for prefill batches of 1 and 8 images (56x56) and towers of 2 and 4
blocks: the graphs a forward calls grow by (calls at 4 blocks - calls at 2) / 2 per tower block,
which is what the per-block graph break costs at run time (dynamo compiles a block's graphs once
and calls them in every block, so compile-time counters do not show it). The outputs are checked
against the eager forward. Then mmlora_fx (`inner="aot_eager"`) on the zoo's tiny-qwen2-vl, a mixed
batch of 0, 1 and 2 images with two adapters and the base, against PEFT per request, as the tests
do. A setting that fails to compile records its error.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import e2e  # noqa: E402
from benchmarks.run_record import checkout_commit, versions  # noqa: E402

SETTINGS = {"default": {}, "capture_scalar_outputs": {"capture_scalar_outputs": True},
            "capture_dynamic_output_shape_ops": {"capture_dynamic_output_shape_ops": True},
            "both": {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True},
            "flex_tower_attention": {}}
# Settings that change the model, not dynamo: the tower's attention (`e2e.build_model`'s).
TOWER_ATTENTION = {"flex_tower_attention": "flex"}


def graph_calls(depth: int, images: int, tower_attention: str = "sdpa") -> dict:
    """Compiled graphs and graphs called per forward (the second call) of e2e's TINY model."""
    from torch._dynamo.utils import counters

    calls = collections.Counter()

    def counting(graph, example_inputs):
        index = len(calls)
        calls[index] = 0

        def run(*inputs):
            calls[index] += 1
            return graph.forward(*inputs)

        return run

    spec = dict(e2e.TINY, vision=dict(e2e.TINY["vision"], depth=depth))
    model = e2e.build_model(spec, torch.device("cpu"), torch.float32, tower_attention)
    batch = e2e.prefill_batch(model, spec, images)
    batch["pixel_values"] = batch["pixel_values"].float()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        reference = model(**batch, use_cache=False).logits
        compiled = torch.compile(model, backend=counting)
        compiled(**batch, use_cache=False)
        calls.clear()
        logits = compiled(**batch, use_cache=False).logits
    return dict(compiled_graphs=counters["stats"]["unique_graphs"], graph_calls_per_forward=sum(calls.values()),
                graph_break_reasons={key.splitlines()[0][:120]: value for key, value in counters["graph_break"].items()},
                error_vs_eager=((logits - reference).abs().max() / reference.abs().max()).item())


def mmlora_against_peft(tower_attention: str = "sdpa") -> dict:
    """mmlora_fx's mixed batch against PEFT per request (tests/peft_helpers' oracle)."""
    import mmlora_fx
    from mmlora_fx import zoo
    from tests.peft_helpers import all_targets, make_adapter, peft_logits, peft_model_with, relative_error

    family = "tiny-qwen2-vl"
    base = zoo.build(family)
    e2e.use_in_tower(base, tower_attention)
    sizes = zoo.ZOO[family].item_sizes(base.config)
    batch = zoo.make_batch(base, [0, 1, 2], item_sizes=[[], [sizes[1]], [sizes[0], sizes[2]]])
    root = Path(tempfile.mkdtemp(prefix="graph-breaks-"))
    paths = {name: make_adapter(base, root / name, all_targets(family), r=rank, lora_alpha=3 * rank + 1, seed=index)
             for index, (name, rank) in enumerate({"alice": 2, "carol": 8}.items())}
    peft = peft_model_with(base, paths)
    names = ["alice", None, "carol"]
    torch._dynamo.reset()
    served = zoo.build(family)
    e2e.use_in_tower(served, tower_attention)
    mm = mmlora_fx.compile(served, paths, max_loras=2, inner="aot_eager")
    with torch.no_grad():
        logits = mm(**batch, adapter_names=names).logits
    singles = zoo.split_batch(base, batch)
    return dict(compiled_graphs=mm.compiled_graphs,
                error_vs_peft=[relative_error(logits[row], peft_logits(peft, single, name))
                               for row, (single, name) in enumerate(zip(singles, names))])


def attempt(function, *args) -> dict:
    try:
        return function(*args)
    except Exception as error:  # a setting that does not compile: its error is the finding
        return dict(error=f"{type(error).__name__}: {error}"[:400], traceback=traceback.format_exc()[-2000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--commit", help="the code's commit (default: the checkout's)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="which settings, in order")
    args = parser.parse_args()
    report = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device="cpu", versions=versions(),
                  commit=args.commit or checkout_commit(), command=" ".join([Path(sys.executable).name] + sys.argv),
                  settings={})
    for name in args.settings.split(","):
        patch, tower = SETTINGS[name], TOWER_ATTENTION.get(name, "sdpa")
        with torch._dynamo.config.patch(**patch):
            found = {f"{images} images, {depth} blocks": attempt(graph_calls, depth, images, tower)
                     for images in (1, 8) for depth in (2, 4)}
            for images in (1, 8):
                low, high = found[f"{images} images, 2 blocks"], found[f"{images} images, 4 blocks"]
                if "error" not in low and "error" not in high:
                    found[f"{images} images: graph calls per tower block"] = (
                        high["graph_calls_per_forward"] - low["graph_calls_per_forward"]) / 2
            found["mmlora_fx vs PEFT (tiny-qwen2-vl)"] = attempt(mmlora_against_peft, tower)
        report["settings"][name] = found
        print(name, json.dumps({key: ({k: v for k, v in value.items() if k not in ("graph_break_reasons", "traceback")}
                                      if isinstance(value, dict) else value) for key, value in found.items()}),
              flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
