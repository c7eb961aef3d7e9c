"""GPU correctness matrix (#21): per family and request, compiled against eager against PEFT, in bf16.

    python benchmarks/gpu_matrix.py --out results/ [--families mistral3,qwen2.5-vl,real-llava,tiny-llava]

Per family: a random-weight model in bf16 on the GPU, two PEFT adapters (rank 16) on every linear
but the head, a batch of three requests (one image; none; two images of other sizes where the
family takes them) moved to the GPU as a processor's output would be. It compares, per request:

- the compiled base (Inductor) against the eager base on the same inputs: bf16 noise, measured;
- mmlora_fx compiled (Inductor; without and with CUDA graphs) against `mm.eager`;
- `mm.eager` against PEFT run on that request alone.

A comparison passes when its error is at most max(4 x the request's noise, 1e-2). Families:

- `mistral3`: the Mistral3-shaped model of #21 (Pixtral tower 1024 wide, Mistral LM 4096 wide,
  4 layers each), outside the zoo;
- `qwen2.5-vl`: Qwen2.5-VL-7B's layer widths (tower 1280 wide, SwiGLU 3420, windowed attention
  in one block of two, full in the other; merger to 3584; LM 3584 wide, 18944, 28/4 heads, two
  layers; its real vocabulary), outside the zoo, images of 448x448, 224x448 and 308x224 pixels;
- `real-<family>`: a zoo family at real layer widths (LM 4096 wide, tower 1024, two layers each;
  its tiny images and vocabulary kept);
- `tiny-<family>`: the zoo's tiny widths.

Writes `gpu_matrix.json` and prints a table.
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
from benchmarks.run_record import checkout_commit, versions  # noqa: E402
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


# Not shared with tests/families.py's `mistral3_batch`: that one counts image tokens with the tiny
# tower's patch (4 pixels); this tower's is 14, and its images are sized for it.
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


def qwen2_5_vl_real(text_width: int = 3584, text_mlp: int = 18944, heads: int = 28, kv_heads: int = 4,
                   tower_width: int = 1280, tower_mlp: int = 3420, tower_heads: int = 16, vocab: int = 152064):
    """Qwen2.5-VL at Qwen2.5-VL-7B's layer widths, two layers each (smaller widths check the script)."""
    import transformers

    config = transformers.Qwen2_5_VLConfig(
        # Block 0 attends within windows of 112 pixels (4x4 merged patches), block 1 over the image.
        vision_config=dict(depth=2, hidden_size=tower_width, intermediate_size=tower_mlp, num_heads=tower_heads,
                           out_hidden_size=text_width, in_channels=3, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=text_mlp, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=1000000.0,
                                              mrope_section=[16, 24, 24]),
                         bos_token_id=zoo.BOS, eos_token_id=zoo.EOS, pad_token_id=zoo.PAD),
        image_token_id=zoo.IMAGE_TOKEN, video_token_id=zoo.VIDEO_TOKEN, vision_start_token_id=zoo.VISION_START,
        vision_end_token_id=zoo.VISION_END, bos_token_id=zoo.BOS, eos_token_id=zoo.EOS, pad_token_id=zoo.PAD,
    )
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen2_5_vl_batch(model, seed: int):
    """One 448x448 image; none; 224x448 and 308x224 (windows cut at the image's edge), as packed patches."""
    vision = model.config.vision_config
    generator = torch.Generator().manual_seed(seed)
    sizes_per_request = [[(448, 448)], [], [(224, 448), (308, 224)]]
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    grids = [[(1, h // vision.patch_size, w // vision.patch_size) for h, w in sizes] for sizes in sizes_per_request]
    tokens = [[t * h * w // vision.spatial_merge_size**2 for t, h, w in request] for request in grids]
    length = max(sum(count + 2 for count in request) for request in tokens) + 16
    rows, pixels = [], []
    for request_tokens, request_grids in zip(tokens, grids):
        images = [token for count in request_tokens
                  for token in [zoo.VISION_START] + [zoo.IMAGE_TOKEN] * count + [zoo.VISION_END]]
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, zoo.TEXT_TOKEN_LIMIT, (length - 1 - len(images),),
                             generator=generator).tolist()
        rows.append([zoo.BOS] + text[:8] + images + text[8:])
        pixels.append([torch.randn(t * h * w, features, generator=generator) for t, h, w in request_grids])
    input_ids = torch.tensor(rows)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "mm_token_type_ids": (input_ids == zoo.IMAGE_TOKEN).int(),
             "pixel_values": torch.cat([image for request in pixels for image in request]),
             "image_grid_thw": torch.tensor([grid for request in grids for grid in request])}
    singles = []
    for row, (request_pixels, request_grids) in enumerate(zip(pixels, grids)):
        single = {key: batch[key][row: row + 1] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if request_grids:
            single["pixel_values"] = torch.cat(request_pixels)
            single["image_grid_thw"] = torch.tensor(request_grids)
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
    """The family's model (built once) and its batch maker: seed -> (batch, one batch per request)."""
    if name == "mistral3":
        return mistral3_real(), mistral3_batch
    if name == "qwen2.5-vl":
        model = qwen2_5_vl_real()
        return model, lambda seed: qwen2_5_vl_batch(model, seed)
    if name.startswith("real-"):
        model = widened("tiny-" + name.removeprefix("real-"))
    else:
        model = zoo.build(name)

    def make_batch(seed: int):
        batch = zoo.make_batch(model, (1, 0, 2), seed=seed)
        return batch, zoo.split_batch(model, batch)

    return model, make_batch


def cast(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """`model.to(device, dtype)`, complex buffers kept complex (Llama4's vision rotary `freqs_ci`:
    `.to` a real dtype drops their imaginary part, and the tower then runs without its rotation)."""
    complex_buffers = {name: buffer for name, buffer in model.named_buffers() if buffer.is_complex()}
    model.to(device, dtype)
    for name, buffer in complex_buffers.items():
        module, _, key = name.rpartition(".")
        model.get_submodule(module)._buffers[key] = buffer.to(device)
    return model


def to_device(batch: dict, device, dtype) -> dict:
    return {key: (value.to(device, dtype) if value.is_floating_point() else value.to(device))
            for key, value in batch.items()}


def errors(ours, reference) -> list[float]:
    return [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip(ours, reference)]


def logits(output):
    return output.logits.detach().clone()


def run_family(name: str, workdir: Path, device: torch.device, dtype: torch.dtype) -> dict:
    started = time.perf_counter()
    base, make_batch = family_setup(name)
    base = cast(base, device, dtype)
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
    parser.add_argument("--families", default="mistral3,qwen2.5-vl,real-llava,real-qwen2-vl,real-idefics3,"
                        "real-gemma3,real-llama4")
    parser.add_argument("--device", default="cuda", help="cpu (with --dtype float32) checks the script")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "versions": versions(),
              "command": " ".join(sys.argv), "commit": checkout_commit(), "families": []}
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
