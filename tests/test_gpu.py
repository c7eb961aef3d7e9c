"""On a GPU: CUDA-graph replays equal the uncompiled path, before and after adapter swaps.

Run through the device tool (`python -m pytest -m gpu`); skipped without CUDA.
"""

import random

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.graph_captures import CudaGraphCaptures

from .peft_helpers import all_targets, make_adapter, relative_error
from .test_adapter_manager import adapters, make_manager  # noqa: F401 (a fixture)
from .test_adapters_at_scale import expected  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def rewind(cache, length: int) -> None:
    """Set a static cache back to `length` tokens (it appends at its own running length; a
    sliding-window layer keeps a Python copy of it too)."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(length)
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = length


# The MoE family's routing changes with every step's tokens; tiny-llava adds embedding and head LoRA.
# Not tiny-llama4: its chunked-attention cache layer keeps its length as a Python int, which
# dynamo specialises on, so every decode step is a new graph for the base model too (its prefill
# is held to PEFT on CUDA in test_gpu_targets.py).
@pytest.mark.parametrize("family, extra", [("tiny-llava", ["embed_tokens", "lm_head"]), ("tiny-qwen2-vl", []),
                                           ("tiny-qwen3-vl-moe", [])])
def test_cuda_graph_decode_replays_equal_eager_across_adapter_swaps(family, extra, tmp_path):
    decode_replays_equal_eager(family, extra, tmp_path, "cuda")


# 8: the decode steps stacked (3 rows: the expand per row); 10**6: the prefill too (more than 4
# rows: the expand per tile of rows of one slot, found by the search). "inductor": the language
# model's expand as graph ops that Inductor fuses into the outputs' readers; "inductor/inductor":
# its shrink too (one reduction a call), "inductor/inductor_columns": the shrink per rank column.
@pytest.mark.parametrize("stack_max_rows, stack_expand, stack_shrink",
                         [(8, "kernel", "gemm"), (10**6, "kernel", "gemm"), (8, "inductor", "gemm"),
                          (10**6, "inductor", "gemm"), (8, "inductor", "inductor"), (10**6, "inductor", "inductor"),
                          (8, "inductor", "inductor_columns")])
def test_cuda_graph_decode_stacked_in_the_base_gemms_replays_equal_eager(tmp_path, stack_max_rows, stack_expand,
                                                                         stack_shrink):
    decode_replays_equal_eager("tiny-qwen2-vl", [], tmp_path, "cuda", stack_max_rows=stack_max_rows,
                               stack_expand=stack_expand, stack_shrink=stack_shrink)


def test_cuda_graph_decode_with_split_sums_in_the_kernel_replays_equal_eager(tmp_path, monkeypatch):
    """`launch_config.SUMS_IN_KERNEL`: the tile path's split sums reduced in the shrink, on
    counters the runtime's pool hands each call site. Forced here at the tiny model's decode rows
    (the tile path, not the row path) with K cut into 32-wide splits, so that every call's tiles
    meet several splits: prefill and decode steps in CUDA graphs equal `mm.eager` across adapter
    swaps, a load into an evicted slot and an unload, with no recapture."""
    import dataclasses

    from mmlora_fx.kernels import bound_calls, launch_config, lora_add

    chosen = lora_add.config_for_call

    def split(*args, **kwargs):
        return dataclasses.replace(chosen(*args, **kwargs), block_k=16, k_chunk=32)

    monkeypatch.setattr(launch_config, "_PER_ROW_MAX_ROWS", 0)
    monkeypatch.setattr(launch_config, "SUMS_IN_KERNEL", True)
    monkeypatch.setattr(lora_add, "config_for_call", split)
    launch_config.choose_config.cache_clear()  # it read _PER_ROW_MAX_ROWS
    bound_calls.forget()  # bindings keep the config of their first call
    try:
        decode_replays_equal_eager("tiny-qwen2-vl", [], tmp_path, "cuda")
        assert split(3, 64, 16, 2, torch.bfloat16, 3).sums_in_kernel
    finally:
        launch_config.choose_config.cache_clear()
        bound_calls.forget()


def test_cuda_graph_decode_at_one_row_through_the_fused_gemv_replays_equal_eager(tmp_path):
    """`fused_gemv`: a batch of one request decodes through the fused kernel (every language-model
    linear one launch with its LoRA), in CUDA graphs, each step equal to `mm.eager` across adapter
    swaps, a load into an evicted slot and the base model, with no recapture or recompilation."""
    from transformers import StaticCache

    cpu_model = zoo.build("tiny-qwen2-vl")
    paths = {name: make_adapter(cpu_model, tmp_path / name, all_targets("tiny-qwen2-vl"), r=rank,
                                lora_alpha=3 * rank + 1, seed=rank)
             for name, rank in (("alice", 2), ("bob", 4), ("carol", 8))}
    torch._dynamo.reset()
    model = zoo.build("tiny-qwen2-vl").to("cuda")
    mm = mmlora_fx.compile(model, {"alice": paths["alice"], "bob": paths["bob"]}, max_loras=2,
                           mode="reduce-overhead", fused_gemv=True, dynamic=False)
    batch = {key: value.to("cuda") for key, value in zoo.make_batch(cpu_model, (1,), seed=3).items()}
    cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + 16)
    with torch.no_grad():
        mm.eager(**batch, past_key_values=cache, use_cache=True, adapter_names=["alice"])
    position = batch["input_ids"].shape[1]
    tokens = torch.tensor([[zoo.FIRST_TEXT_TOKEN + 3]], device="cuda")

    def step(name):
        nonlocal position, tokens
        inputs = dict(input_ids=tokens, past_key_values=cache, use_cache=True)
        with torch.no_grad():
            rewind(cache, position)
            compiled = mm(**inputs, adapter_names=[name]).logits[:, -1].clone()
            rewind(cache, position)
            eager = mm.eager(**inputs, adapter_names=[name]).logits[:, -1]
        assert relative_error(compiled, eager) <= 1e-4, name
        tokens = eager.argmax(-1, keepdim=True)
        position += 1

    for _ in range(3):  # warm-up, recording, first replay
        step("alice")
    graphs = mm.compiled_graphs
    with CudaGraphCaptures() as captures:
        step("bob")
        step(None)
        mm.load_adapter("carol", paths["carol"])  # evicts the least recently used slot
        step("carol")
        step("bob")
    assert captures.count == 0, "adapter changes must not recapture CUDA graphs"
    assert mm.compiled_graphs == graphs, "adapter changes must not recompile"
    assert any(node.meta.get("mmlora_lora", {}).get("gemv") for record in mm.backend.records
               for node in record.graph_module.graph.nodes), "no linear took the fused GEMV"


def decode_replays_equal_eager(family: str, extra: list[str], root, device: str,
                               stack_max_rows: int | None = None, stack_expand: str = "kernel",
                               stack_shrink: str = "gemm") -> None:
    """Prefill, then decode steps under `mode="reduce-overhead"`, each equal to `mm.eager`, with
    adapters swapped, loaded into an evicted slot and unloaded between replays: no recapture, no
    recompilation. With `stack_max_rows`, the decode steps' linears compute their shrink in the
    base GEMM (`folding.py`), whose A rows mirror each slot write; `stack_expand` says who adds
    their expand (the stack's kernel, or the graph's own ops, reading B mirrored beside the weight)."""
    from transformers import StaticCache

    cpu_model = zoo.build(family)
    paths = {name: make_adapter(cpu_model, root / name, all_targets(family) + extra, r=rank,
                                lora_alpha=3 * rank + 1, seed=rank)
             for name, rank in (("alice", 2), ("bob", 4), ("carol", 8))}
    torch._dynamo.reset()
    model = zoo.build(family).to(device)
    mm = mmlora_fx.compile(model, {"alice": paths["alice"], "bob": paths["bob"]}, max_loras=2,
                           mode="reduce-overhead", stack_max_rows=stack_max_rows, stack_expand=stack_expand,
                           stack_shrink=stack_shrink, dynamic=False if stack_max_rows else None)
    batch = {key: value.to(device) for key, value in zoo.make_batch(cpu_model, (1, 0, 2), seed=3).items()}
    cache = StaticCache(config=model.config, max_cache_len=batch["input_ids"].shape[1] + 16)
    names = ["alice", None, "bob"]
    # The cache must be allocated eagerly: tensors a CUDA graph allocates belong to its pool.
    with torch.no_grad():
        reference = mm.eager(**batch, past_key_values=cache, use_cache=True, adapter_names=names).logits
    rewind(cache, 0)  # the compiled call rewrites the rows the eager one wrote
    with torch.no_grad():
        prefill = mm(**batch, past_key_values=cache, use_cache=True, adapter_names=names).logits
    assert relative_error(prefill, reference) <= 1e-4

    position = batch["input_ids"].shape[1]
    tokens = prefill[:, -1].argmax(-1, keepdim=True)

    def step(names):
        nonlocal position, tokens
        inputs = dict(input_ids=tokens, past_key_values=cache, use_cache=True)
        with torch.no_grad():
            rewind(cache, position)
            compiled = mm(**inputs, adapter_names=names).logits[:, -1].clone()
            rewind(cache, position)
            eager = mm.eager(**inputs, adapter_names=names).logits[:, -1]
        assert relative_error(compiled, eager) <= 1e-4, names
        tokens = eager.argmax(-1, keepdim=True)
        position += 1
        return compiled

    for _ in range(3):  # warm-up, recording, first replay
        step(names)
    graphs = mm.compiled_graphs
    with CudaGraphCaptures() as captures:
        step(["bob", "alice", "alice"])
        step([None, None, "bob"])
        mm.load_adapter("carol", paths["carol"])  # evicts the least recently used slot
        step(["carol", "bob", None])
        mm.unload_adapter("bob")
        last = step(["carol", "alice", "carol"])
    assert captures.count == 0, "adapter changes must not recapture CUDA graphs"
    assert mm.compiled_graphs == graphs, "adapter changes must not recompile"
    assert torch.isfinite(last).all()
    if stack_max_rows:
        marks = [node.meta["mmlora_lora"] for record in mm.backend.records for node in record.graph_module.graph.nodes
                 if node.meta.get("mmlora_lora", {}).get("stacked")]
        assert marks, "no linear was stacked"
        assert any(mark.get("expand") == "graph" for mark in marks) == (stack_expand == "inductor")
        assert any(mark.get("shrink") == "graph" for mark in marks) == (stack_shrink != "gemm")


def prefill_replays_equal_eager(family: str, root, device: str, fold_min_rows: int | None = None) -> None:
    """Prefill with images under `mode="reduce-overhead"`, one batch shape, the adapter mix changing
    every call: each call equals `mm.eager` (the LoRA through hooks, no graphs), and once recorded
    the tower's, connector's and language model's graphs replay with no recapture and no
    recompilation. #16's lead of CUDA graphs for prefill needs exactly this: the vision ownership
    tables refilled in place, read by replays. With `fold_min_rows`, the folded linears' GEMMs
    add their LoRA (`folding.py`), their fold buffers mirroring each slot write."""
    cpu_model = zoo.build(family)
    # With the fold, a third adapter in two slots: replays follow side-stream slot writes, which the
    # fold buffers must mirror.
    ranks = (("alice", 2), ("bob", 4)) + ((("carol", 8),) if fold_min_rows else ())
    paths = {name: make_adapter(cpu_model, root / name, all_targets(family), r=rank, lora_alpha=3 * rank + 1,
                                seed=rank) for name, rank in ranks}
    torch._dynamo.reset()
    model = zoo.build(family).to(device)
    mm = mmlora_fx.compile(model, paths, max_loras=2, mode="reduce-overhead", fold_min_rows=fold_min_rows,
                           dynamic=False if fold_min_rows else None)
    batch = {key: value.to(device) for key, value in zoo.make_batch(cpu_model, (1, 0, 2), seed=3).items()}
    mixes = [["alice", None, "bob"], ["bob", "alice", None], [None, "bob", "alice"],  # warm-up, recording, replay
             ["alice", "alice", "bob"], ["bob", None, "bob"], [None, None, None], ["alice", "bob", "alice"]]
    if fold_min_rows:
        mixes += [["carol", None, "alice"], ["bob", "carol", "carol"], ["alice", "bob", None]]

    def call(names) -> None:
        with torch.no_grad():
            compiled = mm(**batch, use_cache=False, adapter_names=names).logits.clone()
            eager = mm.eager(**batch, use_cache=False, adapter_names=names).logits
        assert relative_error(compiled, eager) <= 1e-4, names

    for names in mixes[:3]:
        call(names)
    graphs = mm.compiled_graphs
    with CudaGraphCaptures() as captures:
        for names in mixes[3:]:
            call(names)
    assert captures.count == 0, "a new adapter mix must not recapture CUDA graphs"
    assert mm.compiled_graphs == graphs, "a new adapter mix must not recompile"
    if fold_min_rows:
        assert any(node.meta.get("mmlora_lora", {}).get("folded") for record in mm.backend.records
                   for node in record.graph_module.graph.nodes), "no linear was folded"


@pytest.mark.parametrize("family", ["tiny-qwen2-vl", "tiny-llava"])
def test_cuda_graph_prefill_with_images_replays_equal_eager_across_adapter_mixes(family, tmp_path):
    prefill_replays_equal_eager(family, tmp_path, "cuda")


def test_cuda_graph_prefill_folded_into_the_base_gemms_replays_equal_eager(tmp_path):
    prefill_replays_equal_eager("tiny-qwen2-vl", tmp_path, "cuda", fold_min_rows=1)


def test_side_stream_slot_writes_serve_the_files_across_prefetch_reload_and_unload(adapters, expected):  # noqa: F811
    """The slot copies of #22 run on a side stream, from pinned memory, with reads in the background:
    after every activate, each slot the batch reads holds exactly its adapter (read on the step's
    stream, as the next forward would), whatever was prefetched, evicted, reloaded or unloaded."""
    manager = make_manager(adapters, max_loras=3, max_cpu_loras=3, device="cuda", background_reads=True)
    manager.load_many(adapters)
    rng = random.Random(0)
    names = sorted(adapters)
    busy = torch.randn(2048, 2048, device="cuda")
    for step in range(40):
        batch = rng.sample(names, rng.randint(1, 3))
        slots = manager.activate(batch)
        busy = busy @ busy / busy.norm()  # a step's work on the current stream, before and after the copies
        for name, slot in zip(batch, slots):
            for module, (a, b, rank) in expected[name].items():
                buffers = manager.buffers[module]
                assert torch.equal(buffers.lora_a[slot].cpu(), a) and torch.equal(buffers.lora_b[slot].cpu(), b), (
                    step, name, module)
                assert int(buffers.ranks[slot]) == rank
        manager.prefetch(rng.sample(names, 2))
        if step % 10 == 9:
            victim = rng.choice(names)
            manager.reload(victim, adapters[victim])
        if step == 25:
            manager.unload("e")
            names.remove("e")
    manager.close()
    assert manager.stats.prefetch_hits > 0


def test_embedding_lora_op_replays_in_a_cuda_graph_with_refilled_tables():
    """The embedding LoRA body reads nothing back to the host: captured once, replayed with new
    slots and new adapter weights, it equals the row-by-row reference each time."""
    from mmlora_fx.kernels.lora_embedding import lora_embedding_add, lora_embedding_add_reference

    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    lora_a = torch.randn(3, 8, 100, device=device, generator=generator)
    lora_b = torch.randn(3, 32, 8, device=device, generator=generator)
    ranks = torch.tensor([8, 4, 2], dtype=torch.int32, device=device)
    slots = torch.tensor([0, -1, 2], dtype=torch.int32, device=device)
    cum = torch.tensor([0, 1, 2, 3], device=device)
    ids = torch.randint(0, 100, (3, 5), device=device, generator=generator)
    base = torch.randn(3, 5, 32, device=device, generator=generator)
    output = base.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lora_embedding_add(output, ids, lora_a, lora_b, ranks, slots, cum)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_embedding_add(output, ids, lora_a, lora_b, ranks, slots, cum)
    for new_slots in ([1, 0, -1], [2, 2, 1]):
        slots.copy_(torch.tensor(new_slots, dtype=torch.int32))
        lora_b.normal_(generator=generator)
        output.copy_(base)
        graph.replay()
        expected = base.clone()
        lora_embedding_add_reference(expected, ids, lora_a, lora_b, ranks, slots, cum)
        assert relative_error(output, expected) <= 1e-5, new_slots
