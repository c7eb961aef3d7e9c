"""Prefill with audio (#20): a Whisper-large-shaped audio tower in front of the e2e benchmark's
language model, mmlora_fx against the compiled base model.

    python benchmarks/audio_prefill.py --out results/ --commit <sha> [--runs 3] [--gpus 1] [--layers N]
    python benchmarks/audio_prefill.py --tiny --runs 2 --out /tmp/ap       # checks the script on a CPU
    python benchmarks/audio_prefill.py --merge a/audio_prefill.json b/audio_prefill.json --out results/

Model: `Qwen2AudioForConditionalGeneration` with random weights (seeded), bf16 on the GPU. Audio
tower of Whisper-large's shape (1280 wide, 32 layers, 20 heads, MLP 5120, 128 mel bins, 30-second
clips of 3000 frames, 1500 tower rows per clip); language model of `benchmarks/e2e.py`'s SEVEN_B
(hidden 3584, 28 layers, intermediate 18944, GQA 28/4 heads, vocabulary 152064; plain RoPE, no
mrope). `--layers N` cuts both to N layers.

Batch: 8 requests with clips of 30, 10, -, 20, 30, 5, - and 15 seconds (- : text only), each with
64 text tokens around its clip's audio tokens, right-padded to one length (`attention_mask` 0 on
the padding, as a processor pads a batch). Errors are taken over each request's own positions.

Adapters: 8 distinct rank-16 PEFT adapters (alpha 32, random A and B written in PEFT's format), on
q/k/v/o/gate/up/down of the language model, q/k/v/out_proj/fc1/fc2 of the tower and the
projector's `linear`; one adapter per request, the text-only requests included.

Per compilation (one subprocess each, with its own empty TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR for the base and for mmlora_fx):

- the compiled base: `torch.compile(model)` (Inductor, default mode), `use_cache=False`;
- mmlora_fx: `mmlora_fx.compile(copy, adapters, max_loras=8, max_lora_rank=16)`, timed as a user
  calls it, `mm(**batch, adapter_names=names, use_cache=False)`: every call runs `prepare`
  (adapter slots, token tables, the probe that traces tower rows to their clips);
- timed interleaved in one process: rounds of `--block` forwards of each (the order alternating
  per round), each forward between two synchronisations; per-forward median ms of each;
- first-call (compile) times; the base compiled against the eager base (bf16 noise per request),
  mmlora_fx compiled against `mm.eager` (the same LoRA through hooks, uncompiled), the adapters'
  effect (eager base against `mm.eager`), `mm.runtime.ownership` of the tower's first fc1 and the
  projector, `prepare` alone, and host syncs inside each compiled forward (CUDA only).

The base model and mmlora_fx's are two copies of the same weights, so both stay compiled side by
side (mmlora_fx compiles its model in place); the runtime's coverage check raises if the base's
graphs ever ran for mmlora_fx's model.

The parent runs `--runs` subprocesses (`--gpus N`: N at a time, one GPU each; they wait for each
other after compiling so that no one times while another compiles on the shared host), collects
their results and writes `audio_prefill.json` under --out: date, device, versions, `--commit`, the
command, the set-up, every run (with its samples), and the summary over runs: median [min-max] of
the base ms, the mmlora_fx ms and the overhead. `--budget-s` skips runs (and stops a running one)
before the device's time limit, so the JSON of the runs done still comes back. A full-size run
compiles two 60-layer models (minutes each), so three runs one after another do not fit one
10-minute call: run them at once (`--gpus 3` on a machine with 3 or more GPUs), or one per call
(`--runs 1`) and join the calls' JSON with `--merge`. A run passes when every request's error
against `mm.eager` is at most max(4 x that request's base noise, 1e-2), as in gpu_matrix.py.

`--tiny` (a 2-layer, 32/64-wide model on the CPU, 2 rounds of 3 forwards, both models compiled
with `aot_eager` so that no C++ is built) checks the script; its times are not measurements.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import e2e  # noqa: E402
from benchmarks.e2e import SEVEN_B, synchronize, syncs_in  # noqa: E402
from benchmarks.prefill_runs import (  # noqa: E402
    add_run_arguments, check_against_eager, child_arguments, end_run, extreme, fill_defaults, fresh_caches,
    interleaved, merged, row_errors, run_log, run_waves, spread, stat, timed_calls, wait_turn)
from mmlora_fx import zoo  # noqa: E402

CLIP_SECONDS = [30, 10, None, 20, 30, 5, None, 15]  # one entry per request; None: text only
TEXT_TOKENS = 64
RANK, ALPHA = 16, 32
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
AUDIO_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROJECTOR = "multi_modal_projector.linear"
OWNERSHIP_KEYS = ["model.audio_tower.layers.0.fc1", "model.multi_modal_projector.linear"]

WHISPER_LARGE = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                     num_mel_bins=128, max_source_positions=1500)
TINY_AUDIO = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
                  max_source_positions=50)
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0))


def text_config(tiny: bool) -> dict:
    if tiny:
        return dict(TINY_TEXT)
    text = dict(SEVEN_B["text"])
    # Qwen2 takes plain RoPE: the e2e model's mrope section belongs to Qwen2-VL's three position streams.
    text["rope_parameters"] = {key: value for key, value in text["rope_parameters"].items() if key != "mrope_section"}
    return text


# --------------------------------------------------------------------------- set-up
def build_model(tiny: bool, layers: int | None, device, dtype, seed: int):
    import transformers

    audio = dict(TINY_AUDIO if tiny else WHISPER_LARGE)
    text = text_config(tiny)
    if layers is not None:
        audio["encoder_layers"] = text["num_hidden_layers"] = layers
    extra = {}
    if tiny:  # the tiny vocabulary has no id 151646 (Qwen2-Audio's own audio token): a low special id instead
        extra["audio_token_index"] = zoo.IMAGE_TOKEN
    config = transformers.Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", **audio),
        text_config=dict(model_type="qwen2", pad_token_id=zoo.PAD, bos_token_id=zoo.BOS, eos_token_id=zoo.EOS, **text),
        **extra)
    torch.manual_seed(seed)
    # Built on the device in its dtype: no 33 GB float32 copy on the host, no transfer.
    with torch.device(device):
        model = transformers.Qwen2AudioForConditionalGeneration._from_config(config, dtype=dtype)
    # The weights drawn here, not left to whatever the library's init does in this version:
    # matrices (linears, embeddings, convolutions) N(0, 0.02), biases 0, norm weights 1.
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)
    return model.eval()


def adapter_modules(model) -> dict[str, tuple[int, int]]:
    """The linears the adapters target: name -> (in, out)."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (".language_model." in name and leaf in LM_TARGETS) or (".audio_tower." in name and leaf in AUDIO_TARGETS) \
                or name.endswith(PROJECTOR):
            found[name] = (module.in_features, module.out_features)
    return found


def write_adapter(path: Path, modules, seed: int, device) -> Path:
    """e2e's random adapter writer (e2e's scales), over `modules`. PEFT's suffix rule over the
    targets picks exactly `modules`: the tower has no o/gate/up/down projection and the language
    model no out_proj/fc1/fc2."""
    targets = sorted(set(LM_TARGETS + AUDIO_TARGETS)) + [PROJECTOR.rsplit(".", 1)[-1]]
    return e2e.write_adapter(path, modules, seed, device, target_modules=targets, lora_alpha=ALPHA)


def audio_tokens(frames: int) -> int:
    """Qwen2-Audio's tokens for a clip of `frames` mel frames (conv stride 2, then pooling by 2)."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def clip_frames(config) -> list[int | None]:
    """Each request's clip in mel frames (100 a second at Whisper's shape: 30 s fill the tower's 3000)."""
    full = 2 * config.audio_config.max_source_positions
    return [None if seconds is None else full * seconds // 30 for seconds in CLIP_SECONDS]


def make_batch(config, seed: int, device, dtype) -> dict:
    """The 8 requests as a processor gives them: every clip padded to the tower's frames with
    `feature_attention_mask` marking its length; in each row, 3 text tokens, the clip's run of
    audio tokens, 61 text tokens, then padding."""
    generator = torch.Generator().manual_seed(seed)
    mels, full = config.audio_config.num_mel_bins, 2 * config.audio_config.max_source_positions
    token = config.audio_token_index
    high = min(zoo.TEXT_TOKEN_LIMIT, config.text_config.vocab_size)
    if zoo.FIRST_TEXT_TOKEN <= token < high or token == zoo.PAD:
        raise ValueError(f"the audio token {token} is among the text or padding ids")
    frames = clip_frames(config)
    clips = [count for count in frames if count]
    features = torch.zeros(len(clips), mels, full)
    feature_mask = torch.zeros(len(clips), full, dtype=torch.long)
    for index, count in enumerate(clips):
        features[index, :, :count] = torch.randn(mels, count, generator=generator)
        feature_mask[index, :count] = 1
    rows = []
    for count in frames:
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, high, (TEXT_TOKENS,), generator=generator).tolist()
        rows.append(text[:3] + [token] * (audio_tokens(count) if count else 0) + text[3:])
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), zoo.PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)] = torch.tensor(row)
        attention_mask[index, :len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "input_features": features.to(device, dtype), "feature_attention_mask": feature_mask.to(device)}


def describe(config, batch, dtype) -> dict:
    audio, text = config.audio_config, config.text_config
    frames = clip_frames(config)
    return {
        "model": "Qwen2AudioForConditionalGeneration, random weights (N(0, 0.02) matrices)",
        "audio_tower": dict(d_model=audio.d_model, layers=audio.encoder_layers, heads=audio.encoder_attention_heads,
                            ffn=audio.encoder_ffn_dim, mel_bins=audio.num_mel_bins,
                            frames_per_clip=2 * audio.max_source_positions, rows_per_clip=audio.max_source_positions),
        "language_model": dict(hidden=text.hidden_size, layers=text.num_hidden_layers,
                               intermediate=text.intermediate_size, heads=text.num_attention_heads,
                               kv_heads=text.num_key_value_heads, vocab=text.vocab_size),
        "requests": len(CLIP_SECONDS), "clip_seconds": CLIP_SECONDS, "clip_frames": frames,
        "audio_tokens": [audio_tokens(count) if count else 0 for count in frames],
        "text_tokens_per_request": TEXT_TOKENS, "sequence_length": batch["input_ids"].shape[1],
        "tokens_unpadded": int(batch["attention_mask"].sum()),
        "tower_rows": batch["input_features"].shape[0] * audio.max_source_positions,
        "adapters": dict(count=len(CLIP_SECONDS), rank=RANK, alpha=ALPHA, language_model=LM_TARGETS,
                         audio_tower=AUDIO_TARGETS, projector=PROJECTOR),
        "dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------- one compilation
def run_once(args) -> int:
    """One subprocess: build, compile the base and mmlora_fx, time them interleaved, check, save."""
    import mmlora_fx

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict = {"run": args.run_index, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "runs_at_once": args.barrier_count,
                    "phases_s": {}}
    save, phase = run_log(result, Path(args.result), args.run_index, started)

    try:
        cache_root = Path(args.cache_dir)
        fresh_caches(cache_root, "base")
        mark = time.perf_counter()
        model = build_model(args.tiny, args.layers, device, dtype, args.seed)
        batch = make_batch(model.config, args.seed + 1, device, dtype)
        result["setup"] = dict(describe(model.config, batch, dtype), backend=args.inner, rounds=args.rounds,
                               block=args.block, warmup=args.warmup)
        names = [f"a{index}" for index in range(len(CLIP_SECONDS))]
        mask = batch["attention_mask"]
        mark = phase("model and batch built", mark)
        workdir = Path(tempfile.mkdtemp(prefix="audio-prefill-adapters-", dir=cache_root))
        modules = adapter_modules(model)
        adapters = {name: write_adapter(workdir / name, modules, seed=100 + index, device=device)
                    for index, name in enumerate(names)}
        result["setup"]["adapter_modules"] = len(modules)
        mark = phase("adapters written", mark)

        with torch.no_grad():
            # A second module tree for mmlora_fx, which compiles its model in place: both stay
            # compiled so that their forwards can alternate. It shares the weights (the memo maps
            # every tensor to itself), so that three runs fit one GPU at once (--share-gpu).
            shared = {id(tensor): tensor for tensor in list(model.parameters()) + list(model.buffers())}
            ours_model = copy.deepcopy(model, memo=shared)
            eager_base = model(**batch, use_cache=False).logits
            mark = phase("eager base forward", mark)

            compiled_base = torch.compile(model, backend=args.inner)

            def base_forward():
                return compiled_base(**batch, use_cache=False).logits

            synchronize(device)
            began = time.perf_counter()
            logits = base_forward()
            synchronize(device)
            result["base_first_call_s"] = time.perf_counter() - began
            result["base_noise"] = row_errors(logits, eager_base, mask)
            del logits
            mark = phase("base compiled (first call)", mark)

            fresh_caches(cache_root, "mmlora")
            began = time.perf_counter()
            mm = mmlora_fx.compile(ours_model, adapters, max_loras=len(names), max_lora_rank=RANK, inner=args.inner)
            synchronize(device)
            result["mmlora_setup_s"] = time.perf_counter() - began

            def mm_forward():
                mm.runtime.forget_tables()  # a new batch's table writes, though the batch repeats
                return mm(**batch, adapter_names=names, use_cache=False).logits

            began = time.perf_counter()
            mm_forward()
            synchronize(device)
            result["mmlora_first_call_s"] = time.perf_counter() - began
            mark = phase("mmlora_fx compiled (setup and first call)", mark)

            for _ in range(args.warmup):
                base_forward()
                mm_forward()
            synchronize(device)
            mark = phase(f"warm-up ({args.warmup} of each)", mark)
            mark = wait_turn(args, result, phase, mark)

            from torch._dynamo.utils import counters

            graphs_before, ours_before = counters["stats"]["unique_graphs"], mm.compiled_graphs
            marks = [mark]
            samples, blocks = interleaved(
                {"base": base_forward, "mmlora": mm_forward}, args.rounds, args.block, device,
                after_round=lambda round_: marks.append(phase(f"timed round {round_ + 1}/{args.rounds}", marks[-1])))
            mark = marks[-1]
            result["base_ms"], result["mmlora_ms"] = spread(samples["base"]), spread(samples["mmlora"])
            result["blocks"] = blocks
            result["overhead"] = result["mmlora_ms"]["median"] / result["base_ms"]["median"] - 1
            result["compiled_during_timing"] = {"dynamo_graphs": counters["stats"]["unique_graphs"] - graphs_before,
                                                "mmlora_graphs": mm.compiled_graphs - ours_before}
            save()

            # `prepare` alone (slots, tables, the probe): the host work every call above included.
            result["prepare_ms"] = spread(timed_calls(lambda: (mm.runtime.forget_tables(), mm._prepare(batch, names)),
                                                      args.block, device))

            compiled = mm_forward().clone()
            result["ownership"] = {key: mm.runtime.ownership.get(key) for key in OWNERSHIP_KEYS}
            result["ownership_kinds"] = dict(collections.Counter(
                value.split(" (")[0] for value in mm.runtime.ownership.values()))
            eager = mm.eager(**batch, adapter_names=names, use_cache=False).logits
            check_against_eager(result, compiled, eager, eager_base, mask)
            del compiled, eager, eager_base
            mark = phase("correctness (compiled against mm.eager)", mark)

            if not args.no_syncs and device.type == "cuda":
                result["base_syncs_in_forward"] = syncs_in(base_forward, device)
                mm._prepare(batch, names)  # tables filled first: only the forward's own syncs count

                def forward_only():
                    with mm._served_call():
                        return mm.model(**batch, use_cache=False).logits

                result["mmlora_syncs_in_forward"] = syncs_in(forward_only, device)
                mark = phase("host syncs counted", mark)
        return end_run(result, save, started, device, args.run_index)
    except Exception as error:  # the run's error is part of its result
        return end_run(result, save, started, device, args.run_index, error)


# --------------------------------------------------------------------------- the runs
def summarise(runs: list[dict]) -> dict:
    done = [run for run in runs if "base_ms" in run and "mmlora_ms" in run]
    return {
        "runs_timed": len(done),
        "base_ms": stat([run["base_ms"]["median"] for run in done]),
        "mmlora_ms": stat([run["mmlora_ms"]["median"] for run in done]),
        "overhead_pct": stat([100 * run["overhead"] for run in done]),
        "prepare_ms": stat([run.get("prepare_ms", {}).get("median") for run in done]),
        "base_first_call_s": stat([run.get("base_first_call_s") for run in done]),
        "mmlora_setup_s": stat([run.get("mmlora_setup_s") for run in done]),
        "mmlora_first_call_s": stat([run.get("mmlora_first_call_s") for run in done]),
        "max_mmlora_vs_eager": extreme(runs, "mmlora_vs_eager"),
        "max_base_noise": extreme(runs, "base_noise"),
        "min_adapter_effect": extreme(runs, "adapter_effect", min),
        "all_passed": all(run.get("passed", False) for run in runs) if runs else False,
        "compiled_during_timing": [run.get("compiled_during_timing") for run in done],
    }


def table(report: dict) -> list[str]:
    def cell(stat, form=".1f"):
        return "-" if not stat else f"{stat['median']:{form}} [{stat['min']:{form}}-{stat['max']:{form}}]"

    setup = next((run["setup"] for run in report["runs"] if "setup" in run), {})
    lines = [f"audio prefill on {report.get('device')}: {setup.get('requests')} requests, clips "
             f"{setup.get('clip_seconds')} s, sequence {setup.get('sequence_length')}, tower "
             f"{setup.get('audio_tower', {}).get('layers')} layers, LM {setup.get('language_model', {}).get('layers')} "
             "layers",
             f"{'run':>4} {'base ms':>24} {'mmlora_fx ms':>24} {'overhead':>9} {'compile s base/ours':>20} "
             f"{'vs eager (max)':>15} {'noise (max)':>12} passed"]
    for run in report["runs"]:
        if "base_ms" not in run:
            lines.append(f"{run.get('run', '?'):>4} {run.get('error') or run.get('status') or 'not timed'}"[:300])
            continue
        compile_s = f"{run['base_first_call_s']:.0f}/{run['mmlora_setup_s'] + run['mmlora_first_call_s']:.0f}"
        lines.append(f"{run['run']:>4} {cell(run['base_ms']):>24} {cell(run['mmlora_ms']):>24} "
                     f"{100 * run['overhead']:>+8.1f}% {compile_s:>20} "
                     f"{max(run.get('mmlora_vs_eager', [float('nan')])):>15.1e} "
                     f"{max(run.get('base_noise', [float('nan')])):>12.1e} {run.get('passed')}")
    summary = report["summary"]
    lines.append(f"median [min-max] over {summary['runs_timed']} compilations: base {cell(summary['base_ms'])} ms, "
                 f"mmlora_fx {cell(summary['mmlora_ms'])} ms, overhead {cell(summary['overhead_pct'], '+.1f')} %, "
                 f"prepare {cell(summary['prepare_ms'], '.2f')} ms")
    return lines


def child_command(args, index: int, result: Path, cache: Path, barrier: Path, count: int) -> list[str]:
    command = child_arguments(args, index, result, cache, barrier, count, str(Path(__file__).resolve()))
    if args.layers is not None:
        command += ["--layers", str(args.layers)]
    if args.no_syncs:
        command.append("--no-syncs")
    return command


def merge(args) -> int:
    """Several parents' JSON (separate device calls) as one: every run, the summary recomputed."""
    write(args.out, merged(args.merge, summarise))
    return 0


def write(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "audio_prefill.json").write_text(json.dumps(report, indent=2))
    print("\n".join(table(report)), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser)
    parser.add_argument("--layers", type=int, help="cut the tower and the language model to this many layers")
    parser.add_argument("--inner", help="the compiler of both models: inductor (default; --tiny: aot_eager, "
                        "which skips the CPU's C++ builds, a minute of a check)")
    parser.add_argument("--no-syncs", action="store_true", help="skip counting host syncs")
    parser.add_argument("--merge", nargs="+", type=Path, help="combine these audio_prefill.json into --out")
    args = parser.parse_args()
    fill_defaults(args)
    if args.child:
        return run_once(args)
    if args.merge:
        return merge(args)

    report = run_waves(args, summarise, "audio_prefill.json", child_command, "audio-prefill-")
    write(args.out, report)
    return 0 if report["summary"]["runs_timed"] == args.runs and report["summary"]["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
