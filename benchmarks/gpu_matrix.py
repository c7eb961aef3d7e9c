"""GPU correctness matrix (#21): per family and request, compiled against eager against PEFT, in bf16.

    python benchmarks/gpu_matrix.py --out results/ [--families mistral3,tiny-qwen2-vl,tiny-llava]

Per family: a random-weight model in bf16 on the GPU, two PEFT adapters (rank 16) on every linear
but the head, a batch of three requests (one image; none; two images of other sizes where the
family takes them) moved to the GPU as a processor's output would be. It compares, per request:

- the compiled base (Inductor) against the eager base on the same inputs: bf16 noise, measured;
- mmlora_fx compiled (Inductor; without and with CUDA graphs) against `mm.eager`;
- `mm.eager` against PEFT run on that request alone.

A comparison passes when its error is at most max(4 x the request's noise, 1e-2). `mistral3` is
the Mistral3-shaped model of #21 (Pixtral tower 1024 wide, Mistral LM 4096 wide, 4 layers each);
`real-<family>` is a zoo family at real layer widths (LM 4096 wide, tower 1024, two layers each;
its tiny images and vocabulary kept); `tiny-<family>` runs the zoo's tiny widths. Writes `gpu_matrix.json` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mmlora_fx  # noqa: E402
from mmlora_fx import zoo  # noqa: E402
from tests.peft_helpers import make_adapter, peft_model_with  # noqa: E402

NAMES = ["alice", None, "bob"]


def mistral3_real():
    import transformers

    config = transformers.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                           num_attention_heads=16, image_size=1540, patch_size=14, head_dim=64),
        text_config=dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=4096),
        image_token_index=zoo.IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    return transformers.Mistral3ForConditionalGeneration(config).eval()


def mistral3_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    unit = 28
    sizes_per_request = [[(448, 448)], [], [(224, 448), (448, 224)]]
    tokens = [sum((h // unit) * (w // unit) for h, w in sizes) for sizes in sizes_per_request]
    length = max(tokens) + 16
    rows, images, sizes = [], [], []
    for count, request in zip(tokens, sizes_per_request):
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, 1000, (length - count,), generator=generator).tolist()
        rows.append(text[:8] + [zoo.IMAGE_TOKEN] * count + text[8:])
        for h, w in request:
            sizes.append((h, w))
            images.append(torch.randn(3, h, w, generator=generator))
    input_ids = torch.tensor(rows)
    pixel_values = torch.zeros(len(images), 3, 448, 448)
    for index, image in enumerate(images):
        pixel_values[index, :, : image.shape[1], : image.shape[2]] = image
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values,
             "image_sizes": torch.tensor(sizes)}
    singles, first = [], 0
    for row, request in enumerate(sizes_per_request):
        single = {"input_ids": input_ids[row: row + 1], "attention_mask": batch["attention_mask"][row: row + 1]}
        if request:
            single["pixel_values"] = pixel_values[first: first + len(request)]
            single["image_sizes"] = batch["image_sizes"][first: first + len(request)]
            first += len(request)
        singles.append(single)
    return batch, singles


# Real layer widths, two layers each: a 7B-class language model and a ViT-L-class tower.
REAL_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, num_hidden_layers=2)
REAL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=2)


def widened(name: str):
    """The zoo family `name` at real layer widths (its tiny image sizes and vocabulary kept)."""
    import transformers

    family = zoo.ZOO[name]
    config = family.tiny_config()
    text, vision = config.text_config, config.vision_config
    for key, value in REAL_TEXT.items():
        setattr(text, key, value)
    if name == "tiny-qwen2-vl":
        text.rope_parameters = dict(text.rope_parameters, mrope_section=[16, 24, 24])
        for key, value in dict(embed_dim=1280, hidden_size=4096, num_heads=16, depth=2, mlp_ratio=4).items():
            setattr(vision, key, value)
    else:
        for key, value in REAL_VISION.items():
            setattr(vision, key, value)
    if name == "tiny-llama4":
        text.intermediate_size_mlp = REAL_TEXT["intermediate_size"]
        # The vision adapter's fc1 takes the pixel-shuffled width (hidden / ratio**2 = 4096).
        for key in ("vision_output_dim", "projector_input_dim", "projector_output_dim"):
            setattr(vision, key, 4096)
    if name == "tiny-gemma3":
        text.query_pre_attn_scalar = REAL_TEXT["head_dim"]
    torch.manual_seed(0)
    return getattr(transformers, family.model_class)(config).eval()


def family_setup(name: str):
    if name == "mistral3":
        return mistral3_real, mistral3_batch
    if name.startswith("real-"):
        zoo_name = "tiny-" + name.removeprefix("real-")
        model = widened(zoo_name)

        def make_real_batch(seed: int):
            batch = zoo.make_batch(model, (1, 0, 2), seed=seed)
            return batch, zoo.split_batch(model, batch)

        return (lambda: widened(zoo_name)), make_real_batch
    model = zoo.build(name)

    def make_batch(seed: int):
        batch = zoo.make_batch(model, (1, 0, 2), seed=seed)
        return batch, zoo.split_batch(model, batch)

    return (lambda: zoo.build(name)), make_batch


def to_device(batch: dict, device, dtype) -> dict:
    return {key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
            for key, value in batch.items()}


def errors(ours, reference) -> list[float]:
    return [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours, reference)]


def logits(output):
    return output.logits.detach().clone()


def run_family(name: str, workdir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    build, make_batch = family_setup(name)
    started = time.perf_counter()
    base = build().to(device, dtype)
    batch, singles = make_batch(1)
    batch, singles = to_device(batch, device, dtype), [to_device(single, device, dtype) for single in singles]
    # Every linear but the head, by full name (a suffix like `proj` would also catch Qwen2-VL's Conv3d).
    linears = "|".join(re.escape(module) for module, sub in base.named_modules()
                       if isinstance(sub, torch.nn.Linear) and "lm_head" not in module)
    paths = {adapter: make_adapter(base, workdir / f"{name}-{adapter}", linears, r=16, lora_alpha=32, seed=index)
             for index, adapter in enumerate(["alice", "bob"])}
    result = {"family": name, "targets": len(linears.split("|"))}
    with torch.no_grad():
        eager_base = logits(base(**batch))
        torch._dynamo.reset()
        compiled_base = torch.compile(copy.deepcopy(base))
        noise = errors(logits(compiled_base(**batch)), eager_base)
        del compiled_base
        result["base_noise"] = noise
        tolerance = [max(4 * value, 1e-2) for value in noise]
        peft = peft_model_with(base, paths)
        peft_reference = []
        for single, adapter in zip(singles, NAMES):
            if adapter is None:
                with peft.disable_adapter():
                    peft_reference.append(logits(peft(**single))[0])
            else:
                peft.set_adapter(adapter)
                peft_reference.append(logits(peft(**single))[0])
        del peft
        for mode in (None, "reduce-overhead"):
            label = "cudagraphs" if mode else "compiled"
            # No reset: the compiled base above stays in the process, as it does for a user comparing.
            if mode and device.type != "cuda":
                continue
            mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, max_lora_rank=16, mode=mode)
            ours = [logits(mm(**batch, adapter_names=NAMES)) for _ in range(3)][-1]
            eager = logits(mm.eager(**batch, adapter_names=NAMES))
            result[f"{label}_vs_eager"] = errors(ours, eager)
            if mode is None:
                result["eager_vs_peft"] = errors(eager, peft_reference)
                result["adapter_effect"] = errors(eager_base, peft_reference)
            del mm
    result["tolerance"] = tolerance
    result["passed"] = all(error <= limit for key in ("compiled_vs_eager", "cudagraphs_vs_eager", "eager_vs_peft")
                           for error, limit in zip(result.get(key, []), tolerance))
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results")
    parser.add_argument("--families", default="mistral3,tiny-qwen2-vl,tiny-llava")
    parser.add_argument("--device", default="cuda", help="cpu (with --dtype float32) checks the script")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers
    import triton

    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__},
              "command": " ".join(sys.argv), "families": []}
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.families.split(","):
            try:
                report["families"].append(run_family(name, Path(workdir), device, dtype))
            except Exception as error:  # a family that fails is a row of the table, not the end of it
                report["families"].append({"family": name, "error": f"{type(error).__name__}: {error}"[:2000],
                                           "passed": False})
            (out / "gpu_matrix.json").write_text(json.dumps(report, indent=2))
    print(f"{'family':14} {'noise':>18} {'compiled/eager':>22} {'cudagraphs/eager':>22} {'eager/PEFT':>22} passed")
    fmt = lambda values: "/".join(f"{value:.1e}" for value in values)  # noqa: E731
    for row in report["families"]:
        if "error" in row:
            print(f"{row['family']:14} ERROR {row['error'][:300]}")
            continue
        print(f"{row['family']:14} {fmt(row['base_noise']):>18} {fmt(row['compiled_vs_eager']):>22} "
              f"{fmt(row.get('cudagraphs_vs_eager', [])):>22} {fmt(row['eager_vs_peft']):>22} {row['passed']}"
              f"  ({row['seconds']:.0f} s)")
    return 0 if all(row["passed"] for row in report["families"]) else 1


if __name__ == "__main__":
    sys.exit(main())
