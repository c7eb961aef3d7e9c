"""End to end on the GPU: a Qwen2-VL-7B-shaped model, multi-LoRA against the base model and PEFT.

    python benchmarks/e2e.py --out results/ [--parts decode,prefill,load,soak] [--tiny]

Builds a random-weight Qwen2-VL-7B-shaped model in bf16 from its config (no download): language
model hidden 3584, 28 layers, intermediate 18944, GQA 28/4 heads; vision tower 32 blocks of
1280, merger to 3584. Adapters: rank 16 on q/k/v/o/gate/up/down of the language model,
qkv/proj/fc1/fc2 of the tower and the merger MLP, written in PEFT's format. Parts:

- decode: one decode step (1 new token per request, static KV cache of 512) for batch 1, 16, 64
  with 1, 8, 32 distinct adapters: the compiled base model, mmlora_fx, PEFT's mixed-adapter
  batch (eager), and the byte floor (base weights + the distinct adapters' weights over the
  measured copy bandwidth). CUDA graphs (mode="reduce-overhead") for base and mmlora_fx.
- prefill: 8 requests with one 448x448 image each, 8 distinct adapters over tower, connector
  and language model: base vs mmlora_fx vs PEFT (its mixed batch cannot split a packed tower,
  so PEFT runs the requests one by one; the mixed attempt's error is recorded).
- load: compile time with and without adapters; time to load and activate one adapter.
- soak: decode steps with random adapter mixes while adapters are loaded, evicted and
  reloaded; every 100 steps the compiled output is checked against the uncompiled reference
  (same LoRA through forward hooks); no recompilation or recapture; memory at start and end.
- paths: decode with kernel paths forced by patching `kernels.launch_config`'s defaults (`--paths`,
  names in `KERNEL_PATHS`), each against the base on the same machine.
- profile: device time of decode steps split into kernels and idle, base against mmlora_fx (with
  each kernel path of `--profile-paths`, default `defaults`).

`MOE` / `TINY_MOE` (a Qwen3-VL-30B-A3B-LM-shaped mixture-of-experts model, adapters on attention and
the expert weights) are `benchmarks/decode_overhead.py --model moe`'s; this script runs the dense model.

Each part writes `<part>.json` under --out; the last lines printed are a summary table.
`--tiny` runs the same code on a tiny config (on the CPU, no CUDA graphs) to check the script.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.graph_captures import CudaGraphCaptures
from mmlora_fx.reporting import in_gemm_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however e2e was imported
from run_record import checkout_commit, versions  # noqa: E402

SEVEN_B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
              rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24])),
    vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, in_channels=3,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    image=448,
)
TINY = dict(
    text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6])),
    vision=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=2, mlp_ratio=2, in_channels=3,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    image=56,
)
# A MoE language model for decode (`benchmarks/decode_overhead.py --model moe`): Qwen3-VL-30B-A3B's
# language model's layer shapes (hidden 2048, 128 experts of MoE intermediate 768, top-8, GQA 32/4
# heads of 128, vocabulary 151936, untied head) as transformers' Qwen3MoeForCausalLM, every layer
# MoE, served through the `batched_mm` experts implementation (each row gathers its expert's
# weight; the default expert loop is refused). 6 of the real 48 layers, so that three runs (the
# project's three independent compilations, side by side) fit an 80 GB H100: the base is 8.1 GiB
# (1.16 a layer, embedding and head 1.16), and rank 16 on q/k/v/o is 0.56 MB a layer, on the two
# expert weights of 128 experts 26.2 MB a layer, so one adapter is 161 MB (26.8 MB x 6 layers) and
# 32 of them 5.1 GB. With 8 layers a run took ~25 GiB (estimated), two to a GPU. No vision tower.
MOE = dict(
    model="moe",
    text=dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
              norm_topk_prob=True, decoder_sparse_step=1, num_hidden_layers=6, num_attention_heads=32,
              num_key_value_heads=4, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
              tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=5000000.0)),
)
TINY_MOE = dict(
    model="moe",
    text=dict(hidden_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
              decoder_sparse_step=1, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
              vocab_size=512, max_position_embeddings=2048, tie_word_embeddings=False,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
)
# The specs' names by (model, tiny).
SPECS = {("dense", False): "SEVEN_B", ("dense", True): "TINY", ("moe", False): "MOE", ("moe", True): "TINY_MOE"}
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_TARGETS = ["qkv", "attn.proj", "fc1", "fc2", "mlp.0", "mlp.2"]
# The MoE model's: attention's linears (target_modules) and the fused 3D expert weights
# (PEFT's target_parameters).
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RANK = 16
KV = 512


# --------------------------------------------------------------------------- set-up
TOWER_ATTENTIONS = ("sdpa", "flex")


def use_in_tower(model, choice: str) -> None:
    """Give `model`'s vision tower the attention `choice` (TOWER_ATTENTIONS): "sdpa" leaves it as
    built, "flex" is `mmlora_fx.use_flex_tower_attention`."""
    if choice not in TOWER_ATTENTIONS:
        raise ValueError(f"tower attention {choice!r}: expected one of {TOWER_ATTENTIONS}")
    if choice == "flex":
        mmlora_fx.use_flex_tower_attention(model)


def build_model(spec, device, dtype, tower_attention: str = "sdpa"):
    """`spec`'s model with random weights; `tower_attention` ("sdpa", "flex":
    mmlora_fx/tower_attention.py) is the vision tower's attention (the dense model's only)."""
    if spec.get("model") == "moe":
        return build_moe_model(spec, device, dtype)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config=dict(spec["text"], bos_token_id=zoo.BOS, eos_token_id=zoo.EOS, pad_token_id=zoo.PAD),
        vision_config=spec["vision"], image_token_id=zoo.IMAGE_TOKEN, video_token_id=zoo.VIDEO_TOKEN,
        vision_start_token_id=zoo.VISION_START, vision_end_token_id=zoo.VISION_END,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    use_in_tower(model, tower_attention)
    return model.eval()


def build_moe_model(spec, device, dtype):
    """`MOE`'s Qwen3MoeForCausalLM, its experts run by transformers' `batched_mm` (served)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(**spec["text"], bos_token_id=zoo.BOS, eos_token_id=zoo.EOS, pad_token_id=zoo.PAD)
    config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def adapter_modules(model, targets=None) -> dict[str, tuple[int, ...]]:
    """What the adapters target (PEFT's suffix rule), by the name PEFT saves it under: a linear ->
    (in, out); a 3D expert weight `[experts, out, in]` that `EXPERT_TARGETS` names -> (in, out,
    experts), under its module's name with one `.base_layer` per expert weight of the module
    registered after it (PEFT nests one wrapper per targeted parameter, the last outermost).
    `targets`: the linears' suffixes (e2e's LM and tower targets by default)."""
    targets = targets or LM_TARGETS + VISION_TARGETS
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
            found[name] = (module.in_features, module.out_features)
        experts = [(parameter_name, parameter) for parameter_name, parameter in module.named_parameters(recurse=False)
                   if parameter.dim() == 3 and any(f"{name}.{parameter_name}".endswith("." + t) for t in EXPERT_TARGETS)]
        for depth, (_, parameter) in enumerate(reversed(experts)):
            count, fan_out, fan_in = parameter.shape
            found[name + ".base_layer" * depth] = (fan_in, fan_out, count)
    return found


def write_adapter(path: Path, modules, seed: int, device, target_modules=None, lora_alpha: float = 2 * RANK) -> Path:
    """A PEFT LoRA adapter with random weights on `modules` (`adapter_modules`' {name: (in, out)},
    or (in, out, experts) for an expert weight: PEFT's `lora_A [r * experts, in]`, `lora_B [out,
    r * experts]`, and `EXPERT_TARGETS` as the config's `target_parameters`), written as PEFT
    writes it (bf16 safetensors), drawn on `device` (a PEFT model of a 16 GB model would be a
    second copy on the host). `target_modules` goes into its config (e2e's suffixes by default)."""
    from safetensors.torch import save_file

    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out, *experts) in modules.items():
        rows = RANK * (experts[0] if experts else 1)
        a = torch.randn(rows, fan_in, generator=generator, device=device) / fan_in**0.5
        b = torch.randn(fan_out, rows, generator=generator, device=device) * (0.05 / RANK**0.5)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=RANK, lora_alpha=lora_alpha, target_modules=target_modules or LM_TARGETS + VISION_TARGETS,
                  lora_dropout=0.0, bias="none", task_type=None, use_rslora=False, use_dora=False)
    if any(len(shape) == 3 for shape in modules.values()):
        config["target_parameters"] = EXPERT_TARGETS
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def measured_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    if device.type != "cuda":
        return float("nan")
    source = torch.randn(2 * 1024**3 // 4, device=device)  # 2 GiB of float32
    target = torch.empty_like(source)
    milliseconds = timed(lambda: target.copy_(source), device, repeats=20)
    moved = 2 * source.numel() * source.element_size()
    del source, target
    return moved / (milliseconds / 1e3)


def timed(fn, device, repeats=20, warmup=3) -> float:
    """Median milliseconds of `fn()` after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def syncs_in(function, device) -> int | None:
    """Host synchronisations inside `function()`, counted by torch's sync debug mode (CUDA only)."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for warning in caught if "synchroniz" in str(warning.message).lower())


def cudagraph_skips() -> int:
    """Graphs Inductor compiled but left out of CUDA graphs so far in this process: a skipped graph
    runs its kernels from the host at every call (reduce-overhead)."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def uncompile(model):
    model._compiled_call_impl = None
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def graph_mode(device) -> str | None:
    """The compile mode of every part's base and mmlora_fx models: CUDA graphs on a GPU."""
    return "reduce-overhead" if device.type == "cuda" else None


def note(args, progress: dict, key: str, value) -> None:
    """Record one measurement at once, so that a run cut short still leaves its numbers."""
    progress[key] = value
    print(f"  {key}: {value}", flush=True)
    (args.out / "progress.json").write_text(json.dumps(progress, indent=2))


# --------------------------------------------------------------------------- decode
class DecodeStep:
    """One decode step per call over a static cache of KV random tokens.

    The cache appends at its own running length; `rewind()` sets it back to KV. Timed runs let
    it grow by one token per call (a few dozen calls: 512 -> ~540 tokens).
    """

    SPARE = 256

    def __init__(self, model, batch: int, device, dtype):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=KV + self.SPARE)
        generator = torch.Generator(device=device).manual_seed(batch)
        self.input_ids = torch.randint(zoo.FIRST_TEXT_TOKEN, 500, (batch, 1), device=device, generator=generator)
        # M-RoPE's three position rows for the Qwen2-VL model, one for a text-only language model.
        shape = (3, batch, 1) if getattr(model.config, "vision_config", None) is not None else (batch, 1)
        self.position_ids = torch.full(shape, KV, device=device, dtype=torch.long)
        with torch.no_grad():
            model.forward(**self.inputs())  # allocates the cache layers (eagerly)
        for layer in self.cache.layers:
            layer.keys.normal_(0, 1, generator=generator)
            layer.values.normal_(0, 1, generator=generator)
        self.rewind()

    def rewind(self) -> None:
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(KV)

    def inputs(self) -> dict:
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, past_key_values=self.cache,
                    use_cache=True)

    def __call__(self, call=None, **extra):
        with torch.no_grad():
            return (call if call is not None else self.model)(**self.inputs(), **extra).logits


def mixed_names(names: list[str], batch: int, distinct: int, seed: int) -> list[str]:
    """`batch` names drawn from the first `distinct` adapters, each of them used at least once."""
    chosen = names[:distinct]
    assignment = [chosen[index % distinct] for index in range(batch)]
    random.Random(seed).shuffle(assignment)
    return assignment


def part_decode(args, model, adapters, device, results):
    batches, mixes = ([1, 16, 64], [1, 8, 32]) if not args.tiny else ([1, 4], [1, 2])
    names = list(adapters)
    bandwidth = measured_bandwidth(device)
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if not n.startswith("model.visual") and "embed_tokens" not in n)
    lm_adapter_bytes = sum(RANK * (i + o) * 2 for n, (i, o) in adapter_modules(model).items()
                           if n.startswith("model.language_model"))
    rows = []
    progress = results.setdefault("decode_progress", {})
    steps = {batch: DecodeStep(model, batch, device, torch.bfloat16) for batch in batches}
    mode = graph_mode(device)

    variants = args.variants.split(",")
    base_ms, first_call, mm_ms, mm_first_call, peft_ms = {}, {}, {}, {}, {}
    load_seconds = None
    # Base model, compiled the same way.
    torch._dynamo.reset()
    base = torch.compile(model, mode=mode)
    for batch in (batches if "base" in variants else []):
        steps[batch].rewind()
        began = time.perf_counter()
        steps[batch](base)
        synchronize(device)
        first_call[batch] = time.perf_counter() - began
        steps[batch].rewind()
        base_ms[batch] = timed(lambda: steps[batch](base), device)
        note(args, progress, f"base b{batch}", dict(ms=base_ms[batch], first_call_s=first_call[batch]))
    uncompile(model)

    began = time.perf_counter()
    mm = mmlora_fx.compile(model, adapters, max_loras=max(mixes), max_lora_rank=RANK, mode=mode,
                           max_batch_size=max(batches))
    load_seconds = time.perf_counter() - began
    for batch in (batches if "mmlora" in variants else []):
        for distinct in mixes:
            if distinct > batch:
                continue
            assignment = mixed_names(names, batch, distinct, seed=batch * 100 + distinct)
            mm.runtime.prepare(assignment)
            steps[batch].rewind()
            if batch not in mm_first_call:
                began = time.perf_counter()
                steps[batch]()
                synchronize(device)
                mm_first_call[batch] = time.perf_counter() - began
                steps[batch].rewind()
            mm_ms[batch, distinct] = timed(lambda: steps[batch](), device)
            note(args, progress, f"mmlora b{batch} d{distinct}", dict(ms=mm_ms[batch, distinct],
                                                                     first_call_s=mm_first_call[batch]))
    uncompile(model)

    if "peft" in variants and not args.skip_peft:
        from peft import PeftModel

        peft = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:max(mixes)]:
            peft.load_adapter(str(adapters[name]), adapter_name=name)
        peft.eval()
        for batch in batches:
            for distinct in mixes:
                if distinct > batch:
                    continue
                assignment = mixed_names(names, batch, distinct, seed=batch * 100 + distinct)
                steps[batch].rewind()
                peft_ms[batch, distinct] = timed(lambda: steps[batch](peft, adapter_names=assignment), device,
                                                 repeats=5, warmup=1)
                note(args, progress, f"peft b{batch} d{distinct}", dict(ms=peft_ms[batch, distinct]))
        model = peft.unload()  # the base model again, LoRA layers removed
    for batch in batches:
        for distinct in mixes:
            if distinct > batch:
                continue
            floor_base = base_bytes / bandwidth * 1e3
            floor = (base_bytes + distinct * lm_adapter_bytes) / bandwidth * 1e3
            row = dict(batch=batch, adapters=distinct, base_ms=base_ms.get(batch), mmlora_ms=mm_ms.get((batch, distinct)),
                       peft_ms=peft_ms.get((batch, distinct)), floor_ms=floor)
            if row["base_ms"] and row["mmlora_ms"]:
                row["overhead"] = row["mmlora_ms"] / row["base_ms"] - 1
                row["floor_overhead"] = (floor - floor_base) / row["base_ms"]
                row["target_met"] = row["overhead"] <= 1.25 * row["floor_overhead"] + 0.03
            rows.append(row)
    results["decode"] = dict(rows=rows, bandwidth_bytes_per_s=bandwidth, base_bytes=base_bytes,
                             adapter_bytes_language_model=lm_adapter_bytes, mmlora_setup_s=load_seconds,
                             base_first_call_s=first_call, mmlora_first_call_s=mm_first_call)
    return model


def step_profile(step, device, steps: int = 5) -> dict:
    """Where a decode step's time goes: CUDA-event time against the kernels' device time.

    LoRA kernels are told apart by name (this package's Triton kernels); `idle` is the step's
    time minus all kernels' device time (launch gaps, host waits).
    """
    from torch.profiler import ProfilerActivity, profile

    step()
    synchronize(device)
    step_ms = timed(step, device, repeats=steps, warmup=1)
    submits = []  # host time to hand one step to the GPU (the GPU idle before: nothing queued)
    for _ in range(steps):
        synchronize(device)
        began = time.perf_counter()
        step()
        submits.append((time.perf_counter() - began) * 1e3)
    synchronize(device)
    # On the CPU (the --tiny check) there are no device kernels: the figures come out zero.
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    total = lora = 0.0
    launches = lora_launches = 0
    fused = [0.0, 0.0]  # the fused GEMV's kernels: ms and launches a step (base GEMVs with LoRA inside)
    events = sorted(prof.key_averages(), key=lambda event: -event.self_device_time_total)
    top = {event.key[:60]: [round(event.self_device_time_total / steps / 1e3, 4), event.count // steps]
           for event in events[:12] if event.self_device_time_total > 0}
    for event in events:
        if event.self_device_time_total <= 0:
            continue
        total += event.self_device_time_total / steps / 1e3
        launches += event.count
        if any(tag in event.key for tag in ("_shrink_kernel", "_expand_kernel", "_stacked_tile_kernel")):
            lora += event.self_device_time_total / steps / 1e3
            lora_launches += event.count
        elif "_gemv_lora_kernel" in event.key:  # `fused_gemv`: the base GEMV and its LoRA in one kernel
            fused[0] += event.self_device_time_total / steps / 1e3
            fused[1] += event.count / steps
    # The host's side of a step, from a second profile with CPU activities (the first one's device
    # times stay free of its overhead): what the host runs per step under CUDA graphs, where a
    # replay should be a few graph launches. An `mmlora::` op here ran from the host, not a graph.
    host_calls, per_step = {}, {}
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as host_prof:
            for _ in range(steps):
                step()
            synchronize(device)
        host_events = sorted((event for event in host_prof.key_averages() if event.self_cpu_time_total > 0),
                             key=lambda event: -event.self_cpu_time_total)
        host_calls = {event.key[:60]: [round(event.self_cpu_time_total / steps / 1e3, 4), event.count // steps]
                      for event in host_events[:15]}
        for event in host_prof.key_averages():
            for tag in ("cudaGraphLaunch", "mmlora::", "cudaLaunchKernel", "cuLaunchKernel", "cudaStreamSynchronize"):
                if event.key.startswith(tag):
                    per_step[tag] = per_step.get(tag, 0) + event.count / steps
    graphs = dict(torch._dynamo.utils.counters["stats"])
    # A graph Inductor leaves out of CUDA graphs launches its kernels from the host at every step:
    # more host time and more idle between kernels. Counted over the process (the base runs first).
    return dict(step_ms=step_ms, host_submit_ms=statistics.median(submits), kernels_ms=total, lora_kernels_ms=lora, idle_ms=step_ms - total,
                kernels_per_step=launches / steps, lora_kernels_per_step=lora_launches / steps,
                fused_gemv_kernels_ms_and_count=fused,
                dynamo=graphs, cudagraph_skips_so_far=cudagraph_skips(), top_kernels_ms_and_count=top,
                top_host_ms_and_count=host_calls, host_calls_per_step=per_step)


def measure_base(args, model, steps: dict, mode, measure, found: dict, progress: dict, dynamic=None) -> None:
    """`measure(step)` for each batch's decode step on the base model, compiled like mmlora_fx."""
    torch._dynamo.reset()
    base = torch.compile(model, mode=mode, dynamic=dynamic)
    for batch, step in steps.items():
        step.rewind()
        found[f"base b{batch}"] = measure(lambda: step(base))
        note(args, progress, f"base b{batch}", found[f"base b{batch}"])
    uncompile(model)


def part_profile(args, model, adapters, device, results):
    """Profile decode steps of the base and of mmlora_fx (`--profile-batches`, default 1 and 16),
    both with CUDA graphs.

    mmlora_fx is profiled once per name in `--profile-paths` (`KERNEL_PATHS`' patches of the
    launch heuristics, or `STACK_PATHS`' compile options, each its own compilation; `defaults`
    first), against one base. Base and ours are compiled with `dynamic=False`, as
    decode_overhead.py compiles them (each batch its own graphs; the stack needs static rows);
    before 2026-12-07 the profile let dynamo's automatic dynamic shapes recompile batch 16."""
    batches = [int(batch) for batch in args.profile_batches.split(",")] if args.profile_batches else (
        [1, 16] if not args.tiny else [1, 4])
    steps = {batch: DecodeStep(model, batch, device, torch.bfloat16) for batch in batches}
    mode = graph_mode(device)
    found = results.setdefault("profile", {})
    progress = results.setdefault("profile_progress", {})
    measure_base(args, model, steps, mode, lambda step: step_profile(step, device), found, progress, dynamic=False)
    names = list(adapters)
    for path in args.profile_paths.split(","):
        if path not in KERNEL_PATHS and path not in STACK_PATHS:
            raise SystemExit(f"--profile-paths: unknown kernel path {path!r}; known: "
                             f"{', '.join(list(KERNEL_PATHS) + list(STACK_PATHS))}")
        with launch_config_patched(KERNEL_PATHS[path][1] if path in KERNEL_PATHS else {}):
            # The stack moves the model's weights into new buffers (the base, measured first, read
            # them in place); a later stack path moves them again.
            mm = mmlora_fx.compile(model, adapters, max_loras=8, max_lora_rank=RANK, mode=mode, max_batch_size=64,
                                   dynamic=False, **STACK_PATHS.get(path, {}))
            for batch in batches:
                distinct = min(batch, 8)
                mm.runtime.prepare(mixed_names(names, batch, distinct, seed=batch))  # as the decode part times it
                steps[batch].rewind()
                key = f"mmlora b{batch} d{distinct}" if path == "defaults" else f"mmlora {path} b{batch} d{distinct}"
                found[key] = step_profile(lambda: steps[batch](), device)
                # How many linear calls of the compiled graphs (all batches so far) took the stack,
                # how many of those the graph expand, and how many the fused GEMV: what the path changed.
                counts = in_gemm_counts(mm.backend.records)
                found[key].update(stacked_calls=counts["stacked"], graph_expanded_calls=counts["expand"],
                                  fused_gemv_calls=counts["gemv"])
                note(args, progress, key, found[key])
            uncompile(model)
    return model


@contextlib.contextmanager
def launch_config_patched(patch: dict):
    """`kernels.launch_config`'s module defaults set to `patch` inside (benchmark only)."""
    from mmlora_fx.kernels import launch_config as kernels
    from mmlora_fx.kernels import bound_calls

    defaults = {key: getattr(kernels, key) for key in patch}
    try:
        for key, value in patch.items():
            setattr(kernels, key, value)
        kernels.choose_config.cache_clear()
        bound_calls.forget()  # bound calls keep the blocks they were bound with
        yield
    finally:
        for key, value in defaults.items():
            setattr(kernels, key, value)
        kernels.choose_config.cache_clear()
        bound_calls.forget()


KERNEL_PATHS = {
    # name -> (batch sizes, module globals of kernels.launch_config to set)
    "tiles": ([1], {"_PER_ROW_MAX_ROWS": 0, "_DEPENDENT_LAUNCH_MAX_ROWS": 0}),
    "rows": ([1], {"_PER_ROW_MAX_ROWS": 8, "_DEPENDENT_LAUNCH_MAX_ROWS": 0}),
    "rows_dependent": ([1], {"_PER_ROW_MAX_ROWS": 8, "_DEPENDENT_LAUNCH_MAX_ROWS": 4}),
    "defaults": ([1, 16, 64], {}),  # row path at 1, tiles read from the tile plan at 16 and 64
    "no_plan": ([16, 64], {"PLAN_BLOCK_M": 0}),  # no tile size matches the plan's: every shrink searches
    # The row path up to 16 rows: no memset and no tile search at batch 16 (#15's in-step memsets).
    "rows16": ([1, 16], {"_PER_ROW_MAX_ROWS": 16}),
    # The tile path's split sums reduced in the shrink: no memset a call (#15's in-step memsets).
    "sums": ([16, 64], {"SUMS_IN_KERNEL": True}),
}


# Profile paths that are compile options (mmlora_fx.compile's keywords), not kernel patches.
STACK_PATHS = {
    "stack16": dict(stack_max_rows=16),  # the shrink in the base GEMMs, the stack's expand kernel
    # The same up to 64 rows (#15's batch 64: a shrink and a memset less a group, every slot's A read).
    "stack64": dict(stack_max_rows=64),
    "stack16_graph": dict(stack_max_rows=16, stack_expand="inductor"),  # the expand as graph ops Inductor fuses
    # The shrink as graph ops too: the base GEMMs as they are, each row's slot's A read in one
    # [rows, rank] reduction a call (a kernel siblings share) ...
    "stack16_shrink": dict(stack_max_rows=16, stack_expand="inductor", stack_shrink="inductor"),
    # ... or one reduction per rank column, fused into the input's producer (~7x the first call).
    "stack16_columns": dict(stack_max_rows=16, stack_expand="inductor", stack_shrink="inductor_columns"),
    # Batch 1's language-model linears as one kernel each, the base GEMV with the row's LoRA inside.
    "gemv": dict(fused_gemv=True),
}


def part_paths(args, model, adapters, device, results):
    """Decode with each kernel path of `--paths` forced, on one machine (an A/B of the defaults).

    The paths are `kernels.launch_config`'s module defaults, patched here (benchmark only); each
    needs its own compilation, since CUDA graphs keep the kernels they captured. Batches above
    one hold `min(batch, 8)` distinct adapters. A name given twice is compiled and timed twice
    (`name#2`): the spread between compilations of the same code.
    """
    chosen, times_given = {}, collections.Counter()
    for name in args.paths.split(","):
        times_given[name] += 1
        chosen[name if times_given[name] == 1 else f"{name}#{times_given[name]}"] = KERNEL_PATHS[name]
    batches = sorted({batch for batch_sizes, _ in chosen.values() for batch in batch_sizes})
    steps = {batch: DecodeStep(model, batch, device, torch.bfloat16) for batch in batches}
    mode = graph_mode(device)
    found = results.setdefault("paths", {})
    progress = results.setdefault("paths_progress", {})
    measure_base(args, model, steps, mode, lambda step: timed(step, device), found, progress)
    names = list(adapters)
    for name, (batch_sizes, patch) in chosen.items():
        with launch_config_patched(patch):
            mm = mmlora_fx.compile(model, adapters, max_loras=8, max_lora_rank=RANK, mode=mode, max_batch_size=64)
            for batch in batch_sizes:
                mm.runtime.prepare(mixed_names(names, batch, min(batch, 8, len(names)), seed=batch))
                steps[batch].rewind()
                steps[batch]()
                steps[batch].rewind()
                found[f"{name} b{batch}"] = timed(lambda: steps[batch](), device)
                note(args, progress, f"{name} b{batch}", found[f"{name} b{batch}"])
            uncompile(model)
    return model


# --------------------------------------------------------------------------- prefill
def prefill_batch(model, spec, requests: int):
    size = (spec["image"], spec["image"])
    batch = zoo.make_batch(model, [1] * requests, item_sizes=[[size]] * requests, text_tokens=64, seed=11)
    device = next(model.parameters()).device
    return {key: value.to(device) if key != "pixel_values" else value.to(device, torch.bfloat16)
            for key, value in batch.items()}


def part_prefill(args, model, adapters, device, results, spec):
    requests = 8 if not args.tiny else 3
    names = list(adapters)[:requests]
    batch = prefill_batch(model, spec, requests)
    singles = zoo.split_batch(model, batch)

    def forward(call, **extra):
        with torch.no_grad():
            return call(**batch, use_cache=False, **extra).logits

    torch._dynamo.reset()
    base = torch.compile(model)
    began = time.perf_counter()
    forward(base)
    synchronize(device)
    base_compile_s = time.perf_counter() - began
    base_ms = timed(lambda: forward(base), device, repeats=10)
    uncompile(model)

    began = time.perf_counter()
    mm = mmlora_fx.compile(model, {name: adapters[name] for name in names}, max_loras=requests, max_lora_rank=RANK)
    mm.runtime.prepare(names, batch["input_ids"], has_images=True)
    forward(model)
    synchronize(device)
    mm_compile_s = time.perf_counter() - began
    mm_ms = timed(lambda: forward(model), device, repeats=10)
    reference = forward(model).float()
    uncompile(model)

    peft_sequential_ms = peft_mixed_error = None
    errors = []
    if not args.skip_peft:
        from peft import PeftModel

        peft = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            peft.load_adapter(str(adapters[name]), adapter_name=name)
        peft.eval()
        def sequential():
            outputs = []
            for name, single in zip(names, singles):
                peft.set_adapter(name)
                with torch.no_grad():
                    outputs.append(peft(**single, use_cache=False).logits)
            return outputs

        peft_sequential_ms = timed(sequential, device, repeats=3, warmup=1)
        for row, logits in enumerate(sequential()):
            scale = logits.float().abs().max()
            errors.append(((reference[row] - logits[0].float()).abs().max() / scale).item())
        # Last: a failed mixed batch leaves PEFT's adapter_names hooks behind.
        try:
            forward(peft, adapter_names=names)
        except Exception as error:  # PEFT's mixed batch cannot split the packed tower rows
            peft_mixed_error = f"{type(error).__name__}: {error}"[:300]
        model = peft.unload()
    results["prefill"] = dict(requests=requests, image=spec["image"], base_ms=base_ms, mmlora_ms=mm_ms,
                              overhead=mm_ms / base_ms - 1, peft_sequential_ms=peft_sequential_ms,
                              peft_mixed_batch_error=peft_mixed_error, max_rel_error_vs_peft=max(errors, default=None),
                              base_compile_s=base_compile_s, mmlora_compile_s=mm_compile_s)
    return model


# --------------------------------------------------------------------------- load
def part_load(args, model, adapters, device, results, spare: Path):
    # One slot: activating one of two cached adapters evicts the other, so each activation is
    # a full slot write from the CPU cache.
    first, second = list(adapters)[:2]
    mm = mmlora_fx.compile(model, {first: adapters[first], second: adapters[second]}, max_loras=1,
                           max_cpu_loras=4, max_lora_rank=RANK)
    loads = []
    for index in range(5):
        name = f"fresh{index}"
        synchronize(device)
        began = time.perf_counter()
        mm.load_adapter(name, spare)
        mm.runtime.manager.activate([name])
        synchronize(device)
        loads.append(time.perf_counter() - began)
        mm.unload_adapter(name)
    activations = []
    for index in range(10):
        synchronize(device)
        began = time.perf_counter()
        mm.runtime.manager.activate([first if index % 2 else second])
        synchronize(device)
        activations.append(time.perf_counter() - began)
    uncompile(model)
    results["load"] = dict(load_and_activate_s=statistics.median(loads),
                           activate_from_cpu_cache_s=statistics.median(activations))


# --------------------------------------------------------------------------- soak
def part_soak(args, model, adapters, device, results, pool: list[Path]):
    batch = 16 if not args.tiny else 4
    steps = args.soak_steps
    mode = graph_mode(device)
    names = list(adapters)[:12]
    torch._dynamo.reset()
    mm = mmlora_fx.compile(model, {name: adapters[name] for name in names}, max_loras=8, max_cpu_loras=10,
                           max_lora_rank=RANK, mode=mode, max_batch_size=batch)
    step = DecodeStep(model, batch, device, torch.bfloat16)
    rng = random.Random(0)

    def random_names():
        loaded = mm.adapters
        chosen = rng.sample(loaded, k=min(len(loaded), rng.randint(1, 8)))
        return [rng.choice(chosen + [None]) for _ in range(batch)]

    mm.runtime.prepare(random_names())
    for _ in range(3):  # warm up and record the graphs
        step.rewind()
        torch.compiler.cudagraph_mark_step_begin()
        step()
    synchronize(device)
    graphs_before = mm.compiled_graphs
    memory_start = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    checks, loads, fresh = [], 0, 0
    began = time.perf_counter()
    with CudaGraphCaptures() as captures:
        for index in range(steps):
            assignment = random_names()
            mm.runtime.prepare(assignment)
            step.rewind()
            # A new step: the last step's outputs may be overwritten (kept alive, they would make
            # CUDA-graph trees record a new graph per step).
            torch.compiler.cudagraph_mark_step_begin()
            logits = step()
            if index % 100 == 99:
                compiled = logits.float()
                del logits
                step.rewind()
                with torch.no_grad():
                    reference = mm.eager(**step.inputs(), adapter_names=assignment).logits.float()
                    step.rewind()
                    base = model.forward(**step.inputs()).logits.float()
                scale = reference.abs().max()
                checks.append(dict(step=index + 1, rel_error=((compiled - reference).abs().max() / scale).item(),
                                   lora_effect=((base - reference).abs().max() / scale).item(),
                                   distinct=len({n for n in assignment if n})))
            if index % 50 == 49:  # churn: drop one adapter, load another (evicting others)
                victim = rng.choice(mm.adapters)
                mm.unload_adapter(victim)
                mm.load_adapter(f"soak{fresh}", pool[fresh % len(pool)])
                fresh += 1
                loads += 1
    synchronize(device)
    elapsed = time.perf_counter() - began
    memory_end = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    results["soak"] = dict(steps=steps, batch=batch, seconds=elapsed, checks=checks, adapter_loads=loads,
                           recompilations=mm.compiled_graphs - graphs_before, recaptures=captures.count,
                           memory_start_bytes=memory_start, memory_end_bytes=memory_end,
                           max_rel_error=max(check["rel_error"] for check in checks),
                           min_lora_effect=min(check["lora_effect"] for check in checks))
    uncompile(model)


# --------------------------------------------------------------------------- main
def summary(results) -> list[str]:
    lines = []
    if "decode" in results:
        lines.append("decode step (ms)  batch adapters  base  mmlora_fx  PEFT  floor  overhead  floor-overhead  target")
        def number(value, form):
            return format(value, form) if value is not None else "-"

        for row in results["decode"]["rows"]:
            target = "-" if "target_met" not in row else ("met" if row["target_met"] else "MISSED")
            lines.append(f"  {row['batch']:>5} {row['adapters']:>8}  {number(row['base_ms'], '.2f')}  "
                         f"{number(row['mmlora_ms'], '.2f')}  {number(row['peft_ms'], '.2f')}  "
                         f"{row['floor_ms']:.2f}  {number(row.get('overhead'), '+.1%')}  "
                         f"{number(row.get('floor_overhead'), '+.1%')}  {target}")
    if "prefill" in results:
        p = results["prefill"]
        peft = f"{p['peft_sequential_ms']:.1f}" if p["peft_sequential_ms"] else "-"
        lines.append(f"prefill {p['requests']}x{p['image']}px: base {p['base_ms']:.1f} ms, mmlora_fx "
                     f"{p['mmlora_ms']:.1f} ms ({p['overhead']:+.1%}), PEFT one by one {peft} ms; compile "
                     f"{p['base_compile_s']:.0f} s / {p['mmlora_compile_s']:.0f} s")
    if "load" in results:
        lines.append(f"load+activate one adapter {results['load']['load_and_activate_s'] * 1e3:.0f} ms, "
                     f"activate from CPU cache {results['load']['activate_from_cpu_cache_s'] * 1e3:.1f} ms")
    if "soak" in results:
        s = results["soak"]
        lines.append(f"soak {s['steps']} steps in {s['seconds']:.0f} s: max rel error {s['max_rel_error']:.1e} "
                     f"(LoRA effect >= {s['min_lora_effect']:.2f}), recompilations {s['recompilations']}, "
                     f"recaptures {s['recaptures']}, memory {s['memory_start_bytes'] / 2**30:.2f} -> "
                     f"{s['memory_end_bytes'] / 2**30:.2f} GiB")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="decode,prefill,load,soak")
    parser.add_argument("--tiny", action="store_true", help="a tiny config, to check the script (CPU is fine)")
    parser.add_argument("--commit", help="the commit the run is of (the device's copy of the tree has a stale HEAD)")
    parser.add_argument("--soak-steps", type=int, default=2000)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--variants", default="base,mmlora,peft", help="decode: which of base,mmlora,peft to time")
    parser.add_argument("--paths", default="tiles,rows,rows_dependent,defaults,no_plan",
                        help=f"paths: which kernel paths to time, of {', '.join(KERNEL_PATHS)}")
    parser.add_argument("--profile-paths", default="defaults",
                        help="profile: the kernel paths (KERNEL_PATHS names) to profile mmlora_fx with, each compiled")
    parser.add_argument("--profile-batches", default=None, help="profile: decode batches, default 1,16 (tiny: 1,4)")
    args = parser.parse_args()
    spec = TINY if args.tiny else SEVEN_B
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "versions": versions(), "commit": args.commit or checkout_commit(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}
    began = time.perf_counter()
    model = build_model(spec, device, torch.bfloat16)
    print(f"model built in {time.perf_counter() - began:.0f} s", flush=True)
    root = Path(tempfile.mkdtemp(prefix="mmlora-adapters-"))
    modules = adapter_modules(model)
    began = time.perf_counter()
    adapters = {f"a{index}": write_adapter(root / f"a{index}", modules, seed=index, device=device)
                for index in range(32 if not args.tiny else 4)}
    pool = [write_adapter(root / f"pool{index}", modules, seed=100 + index, device=device) for index in range(4)]
    print(f"adapters written in {time.perf_counter() - began:.0f} s", flush=True)
    for part in args.parts.split(","):
        began = time.perf_counter()
        if part == "decode":
            model = part_decode(args, model, adapters, device, results)
        elif part == "prefill":
            model = part_prefill(args, model, adapters, device, results, spec)
        elif part == "paths":
            model = part_paths(args, model, adapters, device, results)
        elif part == "profile":
            model = part_profile(args, model, adapters, device, results)
        elif part == "load":
            part_load(args, model, adapters, device, results, pool[0])
        elif part == "soak":
            part_soak(args, model, adapters, device, results, pool)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"part {part} done in {time.perf_counter() - began:.0f} s", flush=True)
        (args.out / f"{part}.json").write_text(json.dumps(results.get(part), indent=2))
    (args.out / "e2e.json").write_text(json.dumps(results, indent=2))
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
