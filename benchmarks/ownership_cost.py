"""What tracing tower rows to their requests costs (#13, #20), and that it stays CUDA-graph safe.

    python benchmarks/ownership_cost.py --out results/ [--family llava-next|qwen2-audio]

A LLaVA-NeXT-shaped model (any-resolution tiling: CLIP-L-wide tower, 336-pixel crops; a 4096-wide
language model; two layers each), random weights in bf16 on the GPU, two PEFT adapters on every
linear but the head, a batch of three requests with images of different sizes (3, 0 and 3 + 5
crops). `--family qwen2-audio`: a Qwen2-Audio-shaped model instead (an audio tower of
Whisper-large's width, 1280, on 30-second clips of 128 mel bins; the same language model), with
clips of 25 s, none, and 10 s + 30 s. It measures, median of `--repeats` after warm-up:

- `prepare` with the batch's inputs (the probe traces crops to requests) and without (no probe,
  as before #13: tokens only), ms; their difference is the derivation's cost per forward;
- the compiled forward (Inductor, no CUDA graphs) of the base and of mmlora_fx, ms;
- host syncs inside the compiled forward, counted with `torch.cuda.set_sync_debug_mode("warn")`,
  for the compiled base and for mmlora_fx (the tables are filled before the forward);
- under CUDA graphs (`mode="reduce-overhead"`): replays with the adapters permuted among the
  requests, each against `mm.eager` of the same batch, relative to the compiled base's own bf16
  noise. Writes `ownership_cost.json` and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mmlora_fx  # noqa: E402
from mmlora_fx import zoo  # noqa: E402
from tests.families import llava_next_batch, qwen2_audio_batch  # noqa: E402
from benchmarks.e2e import syncs_in  # noqa: E402
from tests.peft_helpers import make_adapter  # noqa: E402

SIZES = [[(336, 336)], [], [(336, 672), (672, 672)]]


def build(widths: str):
    import transformers

    if widths == "real":
        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=128)
        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    else:  # a quick check of the script on a CPU
        vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, image_size=16, patch_size=4)
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        pinpoints = [[16, 32], [32, 16], [32, 32]]
    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=2, projection_dim=vision["hidden_size"],
                           **vision),
        text_config=dict(model_type="llama", vocab_size=zoo.VOCAB, num_hidden_layers=2, max_position_embeddings=8192,
                         **text),
        image_token_index=zoo.IMAGE_TOKEN, vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    return transformers.LlavaNextForConditionalGeneration(config).eval()


def build_audio(widths: str):
    import transformers

    if widths == "real":
        audio = dict(d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                     max_source_positions=1500)
        text = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8)
    else:
        audio = dict(d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
                     max_source_positions=50)
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", encoder_layers=2, **audio),
        text_config=dict(model_type="qwen2", vocab_size=zoo.VOCAB, num_hidden_layers=2, max_position_embeddings=8192,
                         **text),
        audio_token_index=zoo.IMAGE_TOKEN)
    torch.manual_seed(0)
    return transformers.Qwen2AudioForConditionalGeneration(config).eval()


def audio_batch(model, widths: str):
    frames = 2 * model.config.audio_config.max_source_positions
    seconds = [[25], [], [10, 30]]
    lengths = [[frames * second // 30 for second in request] for request in seconds]
    import tests.families as families

    families.QWEN2_AUDIO_FRAMES = frames  # the batch helper pads to the tower's clip length
    batch = qwen2_audio_batch(lengths, seed=1).inputs
    mels = model.config.audio_config.num_mel_bins
    if batch["input_features"].shape[1] != mels:  # the helper draws 16 mel bins; widen to the model's
        batch["input_features"] = torch.randn(batch["input_features"].shape[0], mels, frames) * \
            batch["feature_attention_mask"][:, None, :]
    return lengths, batch


def timed(function, repeats: int, device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "runs": times}


def error(ours, reference) -> list[float]:
    return [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours, reference)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--widths", default="real", choices=["real", "tiny"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--family", default="llava-next", choices=["llava-next", "qwen2-audio"])
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.family == "llava-next":
        sizes = SIZES if args.widths == "real" else [[(16, 16)], [], [(16, 30), (32, 32)]]
        cpu_model = build(args.widths)
        batch = llava_next_batch(cpu_model, sizes, seed=1).inputs
    else:
        cpu_model = build_audio(args.widths)
        sizes, batch = audio_batch(cpu_model, args.widths)
    batch = {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
             for key, value in batch.items()}
    base = cpu_model.to(device, dtype)
    names = ["alice", None, "bob"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "versions": {"torch": torch.__version__},
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT).stdout.strip(),
              "command": " ".join(sys.argv), "family": args.family, "sizes": sizes,
              "image_tokens": [int((row == zoo.IMAGE_TOKEN).sum()) for row in batch["input_ids"]]}
    import transformers
    report["versions"]["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as workdir, torch.no_grad():
        linears = [name for name, module in base.named_modules()
                   if isinstance(module, torch.nn.Linear) and "lm_head" not in name]
        import re
        pattern = "|".join(re.escape(name) for name in linears)
        paths = {name: make_adapter(base, Path(workdir) / name, pattern, r=16, lora_alpha=32, seed=index)
                 for index, name in enumerate(["alice", "bob"])}
        torch._dynamo.reset()
        compiled_base = torch.compile(copy.deepcopy(base))
        eager_base = base(**batch).logits
        for _ in range(2):
            noise = error(compiled_base(**batch).logits, eager_base)
        report["base_noise"] = noise
        report["base_forward"] = summary(timed(lambda: compiled_base(**batch), args.repeats, device))
        report["base_syncs_in_forward"] = syncs_in(lambda: compiled_base(**batch), device)
        del compiled_base

        mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2)
        runtime = mm.runtime
        mm(**batch, adapter_names=names)
        report["ownership"] = dict(runtime.ownership)
        input_ids = batch["input_ids"]
        # Each timed call pays a new batch's table writes, though the batch repeats.
        report["prepare_with_probe"] = summary(timed(
            lambda: (runtime.forget_tables(), runtime.prepare(names, input_ids, True, inputs=batch)), args.repeats,
            device))
        report["prepare_without_probe"] = summary(timed(
            lambda: (runtime.forget_tables(), runtime.prepare(names, input_ids, True)), args.repeats, device))
        report["mmlora_forward"] = summary(timed(lambda: (runtime.forget_tables(), mm(**batch, adapter_names=names)),
                                                 args.repeats, device))
        # The forward alone (tables already filled), with its host syncs counted.
        runtime.prepare(names, input_ids, True, inputs=batch)

        def forward_only():
            with mm._served_call():
                mm.model(**batch)
        report["mmlora_syncs_in_forward"] = syncs_in(forward_only, device)
        eager = {tuple(map(str, order)): mm.eager(**batch, adapter_names=list(order)).logits
                 for order in (names, ["bob", "alice", None], [None, "bob", "alice"])}
        del mm
        if device.type == "cuda":
            graphs = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, mode="reduce-overhead")
            replays = []
            for round_ in range(3):
                for order, reference in eager.items():
                    names_now = [None if name == "None" else name for name in order]
                    out = graphs(**batch, adapter_names=names_now).logits.clone()
                    replays.append({"round": round_, "names": names_now, "error": error(out, reference)})
            report["cudagraph_replays"] = replays
            tolerance = [max(4 * value, 1e-2) for value in noise]
            report["cudagraph_passed"] = all(e <= t for replay in replays for e, t in zip(replay["error"], tolerance))
    cost = report["prepare_with_probe"]["median_ms"] - report["prepare_without_probe"]["median_ms"]
    report["probe_ms"] = cost
    report["probe_share_of_forward"] = cost / report["mmlora_forward"]["median_ms"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ownership_cost_{args.family}.json").write_text(json.dumps(report, indent=2))
    brief = {key: (value["median_ms"] if isinstance(value, dict) and "median_ms" in value else value)
             for key, value in report.items() if key not in ("cudagraph_replays", "ownership")}
    print(json.dumps(brief, indent=1))
    return 0 if report.get("cudagraph_passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
