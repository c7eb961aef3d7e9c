"""Tensor-parallel models are served exactly, on every rank; what is not served is refused alike (#23).

Two processes on the CPU (gloo) shard a tiny Llama over a 2-rank `DeviceMesh` two ways:
torch.distributed's tensor-parallel API (`ColwiseParallel` on q/k/v/gate/up, `RowwiseParallel` on
o/down; lm_head left whole) and transformers' own `tp_plan` (the same, and lm_head column-parallel
with its output gathered, the embedding sharded by vocabulary). Each is served by
`mmlora_fx.compile` (Inductor) with adapters PEFT made on the unsharded model, over every linear
of the decoder layers and lm_head: a mixed batch (two adapters and the base model) must give, per
request and on every rank, PEFT's logits for that request alone on the unsharded model, through
the compiled graphs (row-parallel deltas riding on the base's all-reduce) and through `mm.eager`
(forward hooks: the rank-sized shrink all-reduced). Layouts the runtime does not serve are refused
with the same `ShardedModelError` on every rank, before any buffer is sized.
`run_ranks` runs a function on every rank with the process group and mesh up, its results back by rank.
"""

from __future__ import annotations

import os
import pickle
import shutil
import time

import pytest
import torch
import torch.distributed as dist

from .peft_helpers import peft_logits, peft_model_with

WORLD = 2
TIMEOUT_S = 300  # a rank stuck in a collective fails the test instead of hanging it
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
NAMES = ["bob", None, "alice"]
SWAPPED = ["alice", "bob", None]  # the same graphs and slots, other requests' adapters
SHARDINGS = ["parallelize_module", "tp_plan"]

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def text_lm():
    import transformers

    from mmlora_fx import zoo

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**zoo._text_config())).eval()


def shard_llama(model, mesh):
    """Megatron-style tensor parallelism on every decoder layer (what transformers' Llama tp_plan does)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"}
    plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def sharded_model(sharding: str, mesh, checkpoint: str):
    """The tiny Llama sharded by `parallelize_module` (`shard_llama`) or by transformers' `tp_plan`."""
    if sharding == "parallelize_module":
        return shard_llama(text_lm(), mesh)
    import transformers

    # `tp_size` must be given: transformers derives it from WORLD_SIZE, which a spawned rank
    # lacks, and would then load the model unsharded without a word.
    return transformers.LlamaForCausalLM.from_pretrained(
        checkpoint, distributed_config=transformers.DistributedConfig(tp_plan="auto", tp_size=WORLD)).eval()


def _rank_main(rank: int, fn, args, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        result = fn(rank, init_device_mesh("cpu", (WORLD,)), *args)
    finally:
        dist.destroy_process_group()
    with open(f"{folder}/rank{rank}.pkl", "wb") as file:
        pickle.dump(result, file)


def run_ranks(fn, args, folder) -> list:
    """`fn(rank, mesh, *args)` on `WORLD` spawned CPU processes under gloo; its results by rank.
    `fn` must be importable (module level); a rank that raises fails the test with its traceback."""
    import torch.multiprocessing as mp

    # gloo's file store waits forever for a folder that does not exist: the test would read as a hang.
    os.makedirs(folder, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(fn, args, str(folder)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s (a rank hung in a collective?)")
    results = []
    for rank in range(WORLD):
        with open(os.path.join(folder, f"rank{rank}.pkl"), "rb") as file:
            results.append(pickle.load(file))
    return results


def relative_error(ours, reference) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def _errors(logits, names, references) -> list[float]:
    return [relative_error(row, references[index, name]) for index, (row, name) in enumerate(zip(logits, names))]


def _error_fields(error) -> dict:
    return dict(type=type(error).__name__, message=str(error), module=getattr(error, "module", None),
                reason=getattr(error, "reason", None))


def refusal(model, paths) -> dict | None:
    """What `mmlora_fx.compile` says to `model`: the `ShardedModelError`'s fields, or None if it accepted it."""
    import mmlora_fx
    from mmlora_fx.errors import ShardedModelError

    try:
        mmlora_fx.compile(model, paths, max_loras=2, inner="eager")
    except ShardedModelError as error:
        return _error_fields(error)
    return None


def refused_layouts(mesh, checkpoint: str, paths: dict, embedding_paths: dict) -> dict:
    """`refusal` of each layout the runtime does not serve: transformers' vocabulary-sharded
    embedding, a weight on a 2-D mesh, a replicated DTensor weight (sized, never run: the
    refusal comes before any buffer or graph)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def with_weight(placements, on_mesh):
        model = text_lm()
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.weight = torch.nn.Parameter(distribute_tensor(q_proj.weight.detach(), on_mesh, placements))
        return model

    return {"vocabulary-sharded embedding": refusal(sharded_model("tp_plan", mesh, checkpoint), embedding_paths),
            "2-D mesh": refusal(with_weight([Replicate(), Shard(0)], init_device_mesh("cpu", (1, WORLD))), paths),
            "replicated DTensor": refusal(with_weight([Replicate()], mesh), paths)}


def serve_sharded(rank: int, mesh, paths: dict, checkpoint: str, ids: torch.Tensor, references: dict,
                  bad_paths: dict, embedding_paths: dict) -> dict:
    """On one rank, for each sharding: the model checked to be sharded and to compute the unsharded
    logits, served by `mmlora_fx.compile` (Inductor); each request's error against `references`
    (PEFT on the unsharded model, by (row, adapter)) through the compiled graphs, a second batch
    with the adapters swapped between requests, and `mm.eager`; the graphs compiled before and
    after the second batch; each target's slot buffer shapes and inspect entry; what loading each
    of `bad_paths` raises. Then the refused layouts."""
    from torch.distributed.tensor import DTensor

    import mmlora_fx
    from mmlora_fx.capture import Capture
    from mmlora_fx.errors import AdapterError
    from mmlora_fx.inspect_report import build_report, render_text

    with torch.no_grad():
        unsharded = text_lm()(input_ids=ids).logits
    results = {}
    for sharding in SHARDINGS:
        torch._dynamo.reset()
        model = sharded_model(sharding, mesh, checkpoint)
        result = results[sharding] = {}
        with torch.no_grad():
            result["sharded"] = isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor)
            result["sharded_error"] = relative_error(model(input_ids=ids).logits, unsharded)
            mm = mmlora_fx.compile(model, paths, max_loras=2)
            result["compiled"] = _errors(mm(input_ids=ids, adapter_names=NAMES).logits, NAMES, references)
            graphs = len(mm.backend.records)
            result["swapped"] = _errors(mm(input_ids=ids, adapter_names=SWAPPED).logits, SWAPPED, references)
            result["recompiled"] = len(mm.backend.records) - graphs
            result["eager"] = _errors(mm.eager(input_ids=ids, adapter_names=NAMES).logits, NAMES, references)
        result["buffers"] = {module: (tuple(buffers.lora_a.shape[1:]), tuple(buffers.lora_b.shape[1:]))
                             for module, buffers in mm.runtime.manager.buffers.items() if ".layers.0." in module
                             or module == "lm_head"}
        report = build_report(Capture(model, mm.runtime.partition_map, mm.backend.records), mm.runtime.linears,
                              sharding, serving=mm.runtime.serving)
        result["inspect"] = {entry["module"]: entry for entry in report["tensor_parallel"]}
        result["inspect_text"] = render_text(report)
        result["bad_adapters"] = {}
        for name, path in bad_paths.items():
            try:
                mm.load_adapter(name, path)
            except AdapterError as error:
                result["bad_adapters"][name] = _error_fields(error)
        result["adapters_after_bad"] = sorted(mm.adapters)
    torch._dynamo.reset()
    results["refused"] = refused_layouts(mesh, checkpoint, paths, embedding_paths)
    return results


def _edited(source, destination, marker: str, edit):
    """A copy of the adapter at `source` whose tensor named with `marker` is `edit(tensor)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    tensors = load_file(destination / "adapter_model.safetensors")
    key = next(key for key in tensors if marker in key)
    tensors[key] = edit(tensors[key]).contiguous()
    save_file(tensors, destination / "adapter_model.safetensors")
    return str(destination)


def _changed_last_row(tensor):
    tensor = tensor.clone()
    tensor[-1] += 1.0
    return tensor


def peft_references(base, paths, names) -> tuple[torch.Tensor, dict]:
    """A prompt per request of a batch naming `names`, and PEFT's logits on the unsharded `base` for
    each request alone with each adapter the batch names (None: the base model)."""
    from mmlora_fx import zoo

    ids = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (len(names), 9), generator=torch.Generator().manual_seed(1))
    peft = peft_model_with(base, paths)
    references = {(row, name): peft_logits(peft, {"input_ids": ids[row:row + 1]}, name)
                  for row in range(len(names)) for name in set(names)}
    return ids, references


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results of `serve_sharded`, adapters made by PEFT on the unsharded model."""
    from mmlora_fx import zoo

    folder = tmp_path_factory.mktemp("tensor_parallel")
    base = text_lm()
    base.save_pretrained(folder / "base")
    paths = {name: zoo.make_adapter(base, folder / name, TARGETS, r=4, lora_alpha=9, seed=index)
             for index, name in enumerate(["alice", "bob"])}
    embedding_paths = {"emb": zoo.make_adapter(base, folder / "emb", ["embed_tokens", "q_proj"], r=4, seed=3)}
    ids, references = peft_references(base, paths, NAMES)
    for row in range(len(NAMES)):  # every adapter changes every request's logits clearly
        assert min(relative_error(references[row, name], references[row, None]) for name in paths) > 1e-2
    bad_paths = {
        # o_proj's A holding one rank's input columns only
        "carol": _edited(paths["alice"], folder / "carol", "layers.0.self_attn.o_proj.lora_A",
                         lambda tensor: tensor[:, : tensor.shape[1] // WORLD]),
        # PEFT's copy of the lm_head's base weight, changed in the last rank's slice only (under tp_plan)
        "dave": _edited(paths["alice"], folder / "dave", "lm_head.base_layer.weight", _changed_last_row),
    }
    return run_ranks(serve_sharded, (paths, str(folder / "base"), ids, references, bad_paths, embedding_paths),
                     folder)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_mixed_batch_on_a_sharded_model_equals_peft_on_every_rank(ranks, sharding):
    """Each request of a mixed batch equals PEFT on the unsharded model, on both ranks, compiled
    and eager; swapping the adapters between requests recompiles nothing."""
    for rank, by_sharding in enumerate(ranks):
        result = by_sharding[sharding]
        assert result["sharded"] and result["sharded_error"] <= 1e-5, (rank, result)  # sharded, and correctly
        for path in ("compiled", "swapped", "eager"):
            assert max(result[path]) <= 1e-4, (rank, path, result[path])
        assert result["recompiled"] == 0, (rank, result["recompiled"])


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_each_rank_holds_its_slice_of_every_adapter(ranks, sharding):
    """Slot buffers are sized by the rank's local slice: B split by output rows on column-parallel
    targets, A split by input on row-parallel ones, whole where the weight is (parallelize_module's
    lm_head); transformers' lm_head is column-parallel."""
    rank_r = 16  # compile's default max_lora_rank
    head_out = 320 // WORLD if sharding == "tp_plan" else 320
    expected = {
        "model.layers.0.self_attn.q_proj": ((rank_r, 64), (64 // WORLD, rank_r)),
        "model.layers.0.self_attn.k_proj": ((rank_r, 64), (32 // WORLD, rank_r)),
        "model.layers.0.self_attn.o_proj": ((rank_r, 64 // WORLD), (64, rank_r)),
        "model.layers.0.mlp.up_proj": ((rank_r, 64), (128 // WORLD, rank_r)),
        "model.layers.0.mlp.down_proj": ((rank_r, 128 // WORLD), (64, rank_r)),
        "lm_head": ((rank_r, 64), (head_out, rank_r)),
    }
    for rank, by_sharding in enumerate(ranks):
        buffers = by_sharding[sharding]["buffers"]
        for module, shapes in expected.items():
            assert buffers[module] == shapes, (rank, module, buffers[module])


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_inspect_shows_each_sharded_target_and_its_collective(ranks, sharding):
    for rank, by_sharding in enumerate(ranks):
        entries = by_sharding[sharding]["inspect"]
        q_proj, o_proj = entries["model.layers.0.self_attn.q_proj"], entries["model.layers.0.self_attn.o_proj"]
        assert q_proj["served"] and q_proj["layout"]["style"] == "column", q_proj
        assert q_proj["layout"]["out_range"] == [32 * rank, 32 * (rank + 1)], q_proj
        assert q_proj["layout"]["collective_compiled"] == "none", q_proj
        assert o_proj["layout"]["style"] == "row" and o_proj["layout"]["in_range"] == [32 * rank, 32 * (rank + 1)]
        assert o_proj["layout"]["collective_compiled"] == "none (rides on the base's all-reduce)", o_proj
        assert o_proj["layout"]["collective_eager"] == "all-reduce [rows, r]", o_proj
        assert ("lm_head" in entries) == (sharding == "tp_plan")  # parallelize_module left it whole
        if sharding == "tp_plan":
            embedding = entries["model.embed_tokens"]
            assert embedding["layout"] is None and "vocabulary-sharded" in embedding["refusal"], embedding
            assert not embedding["served"]
        text = by_sharding[sharding]["inspect_text"]
        assert f"tensor parallelism (rank {rank} of {WORLD})" in text
        assert "all-reduce [rows, r]" in text


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("name, error, module", [("carol", "AdapterShapeError", "model.layers.0.self_attn.o_proj"),
                                                 ("dave", "BaseWeightCopyError", "lm_head")])
def test_a_bad_adapter_is_refused_alike_on_every_rank(ranks, sharding, name, error, module):
    """Adapters are validated against the global shapes and weights, so a bad one fails on every
    rank with the same typed error and leaves the loaded adapters as they were: an o_proj A
    holding one rank's input columns, and a copy of lm_head's base weight that differs in the last
    rank's slice only (which under tp_plan only that rank holds)."""
    errors = [by_sharding[sharding]["bad_adapters"].get(name) for by_sharding in ranks]
    assert errors[0] is not None and errors[0]["type"] == error and errors[0]["module"] == module, errors[0]
    assert errors[0] == errors[1]
    assert all(by_sharding[sharding]["adapters_after_bad"] == ["alice", "bob"] for by_sharding in ranks)


@pytest.mark.parametrize("case, module, words", [
    ("vocabulary-sharded embedding", "model.embed_tokens", "vocabulary-sharded embedding"),
    ("2-D mesh", "model.layers.0.self_attn.q_proj", "2-dimensional mesh"),
    ("replicated DTensor", "model.layers.0.self_attn.q_proj", "not a replicated DTensor"),
])
def test_layouts_not_served_are_refused_alike_on_every_rank(ranks, case, module, words):
    refusals = [by_sharding["refused"][case] for by_sharding in ranks]
    assert refusals[0] is not None, f"mmlora_fx.compile accepted a model with a {case}"
    assert refusals[0]["type"] == "ShardedModelError" and refusals[0]["module"] == module, refusals[0]
    assert words in refusals[0]["reason"] and "#23" in refusals[0]["message"], refusals[0]
    assert refusals[0] == refusals[1]  # the same error on every rank: none goes on to a collective alone


def uneven_lm():
    """The tiny Llama with an MLP of 129: gate/up (column) and down (row) split 65 + 64."""
    import transformers

    from mmlora_fx import zoo

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**zoo._text_config(intermediate_size=129))).eval()


def serve_uneven(rank: int, mesh, paths: dict, checkpoint: str, ids: torch.Tensor, references: dict) -> dict:
    import transformers

    import mmlora_fx

    torch._dynamo.reset()
    model = transformers.LlamaForCausalLM.from_pretrained(
        checkpoint, distributed_config=transformers.DistributedConfig(tp_plan="auto", tp_size=WORLD)).eval()
    found = {}
    with torch.no_grad():
        mm = mmlora_fx.compile(model, {name: paths[name] for name in ("alice", "bob")}, max_loras=2, inner="eager")
        found["compiled"] = _errors(mm(input_ids=ids, adapter_names=NAMES).logits, NAMES, references)
        found["eager"] = _errors(mm.eager(input_ids=ids, adapter_names=NAMES).logits, NAMES, references)
        # bob's file again under another name, after an unload: other slots, the same deltas.
        mm.unload_adapter("bob")
        mm.load_adapter("carol", paths["bob"])
        names = ["carol", "alice", None]
        as_bob = ["bob", "alice", None]
        found["reloaded"] = _errors(mm(input_ids=ids, adapter_names=names).logits, as_bob, references)
    found["down_proj_slice"] = tuple(mm.runtime.manager.buffers["model.layers.0.mlp.down_proj"].lora_a.shape[1:])
    return found


def test_uneven_shards_per_module_ranks_and_partial_adapters_equal_peft_on_every_rank(tmp_path):
    """transformers' tp_plan splits an MLP of 129 unevenly (65 + 64); alice has a rank per module
    (rank_pattern), bob targets one column-parallel and one row-parallel linear only, and a reload
    under another name lands in other slots. (torch's `parallelize_module` cannot shard this MLP:
    the base model itself fails in torch 2.13, `RowwiseParallel` assuming even shards.)"""
    from mmlora_fx import zoo

    base = uneven_lm()
    base.save_pretrained(tmp_path / "base")
    decoder = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = {"alice": zoo.make_adapter(base, tmp_path / "alice", decoder, r=4, lora_alpha=9, seed=0,
                                       rank_pattern={"o_proj": 2, "down_proj": 8, "up_proj": 3}),
             "bob": zoo.make_adapter(base, tmp_path / "bob", ["q_proj", "down_proj"], r=6, lora_alpha=5, seed=1)}
    ids = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (3, 9), generator=torch.Generator().manual_seed(1))
    peft = peft_model_with(base, paths)
    references = {(row, name): peft_logits(peft, {"input_ids": ids[row:row + 1]}, name)
                  for row in range(3) for name in set(NAMES)}
    results = run_ranks(serve_uneven, (paths, str(tmp_path / "base"), ids, references), tmp_path / "ranks")
    for rank, found in enumerate(results):
        for key in ("compiled", "eager", "reloaded"):
            assert max(found[key]) <= 1e-4, (rank, key, found[key])
    # down_proj's A is cut by input: 65 columns on rank 0, 64 on rank 1.
    assert [found["down_proj_slice"][-1] for found in results] == [65, 64]


# A split along the rank (`tp_lora_a="sharded"`): R = 8 over 2 ranks, 4 rows of A each. bob's
# rank 3 < R/T leaves rank 1 no row of his A (local rank 0); carol has a rank per module.
SPLIT_R = 8
SPLIT_NAMES = ["bob", None, "alice", "carol"]
SPLIT_AFTER = ["dave", "carol", "bob", None]  # dave is alice's file: loaded after an eviction


def serve_split_a(rank: int, mesh, paths: dict, checkpoint: str, ids: torch.Tensor, references: dict) -> dict:
    """On one rank, per sharding, served with A split along the rank (graphs compiled with the
    eager compiler: the op's body is the same as under Inductor): each request's error against
    `references` in the graphs and in `mm.eager`, again after unloading alice and loading her file
    as dave (other slot contents, no new graph); q_proj's buffers and local ranks; inspect's
    entries. Then what `max_lora_rank` 7 (not a multiple of the 2 ranks) gives."""
    import mmlora_fx
    from mmlora_fx.capture import Capture
    from mmlora_fx.inspect_report import build_report

    results = {}
    for sharding in SHARDINGS:
        torch._dynamo.reset()
        model = sharded_model(sharding, mesh, checkpoint)
        found = results[sharding] = {}
        with torch.no_grad():
            mm = mmlora_fx.compile(model, {name: paths[name] for name in ("alice", "bob", "carol")}, max_loras=3,
                                   max_lora_rank=SPLIT_R, tp_lora_a="sharded", inner="eager")
            found["compiled"] = _errors(mm(input_ids=ids, adapter_names=SPLIT_NAMES).logits, SPLIT_NAMES, references)
            found["eager"] = _errors(mm.eager(input_ids=ids, adapter_names=SPLIT_NAMES).logits, SPLIT_NAMES, references)
            graphs = len(mm.backend.records)
            mm.unload_adapter("alice")
            mm.load_adapter("dave", paths["alice"])
            as_alice = [name if name != "dave" else "alice" for name in SPLIT_AFTER]
            found["reloaded"] = _errors(mm(input_ids=ids, adapter_names=SPLIT_AFTER).logits, as_alice, references)
            found["recompiled"] = len(mm.backend.records) - graphs
        q_proj = mm.runtime.manager.buffers["model.layers.0.self_attn.q_proj"]
        slots = mm.runtime.manager.resident
        found["q_proj"] = (tuple(q_proj.lora_a.shape[1:]), tuple(q_proj.lora_b.shape[1:]),
                           {name: (int(q_proj.ranks[slot]), int(q_proj.local_ranks[slot]))
                            for name, slot in slots.items()})
        found["o_proj_local_ranks"] = mm.runtime.manager.buffers["model.layers.0.self_attn.o_proj"].local_ranks
        report = build_report(Capture(model, mm.runtime.partition_map, mm.backend.records), mm.runtime.linears,
                              sharding, serving=mm.runtime.serving, layouts=mm.runtime.layouts)
        found["inspect"] = {entry["module"].rsplit(".", 1)[-1]: entry["layout"] for entry in report["tensor_parallel"]
                            if entry["module"].startswith("model.layers.0.self_attn.")}
    torch._dynamo.reset()
    results["refused"] = refusal_of(shard_llama(text_lm(), mesh), {"bob": paths["bob"]}, max_lora_rank=SPLIT_R - 1,
                                    tp_lora_a="sharded")
    return results


def refusal_of(model, paths, **options) -> dict | None:
    """`refusal` with serving options."""
    import mmlora_fx
    from mmlora_fx.errors import ShardedModelError

    try:
        mmlora_fx.compile(model, paths, inner="eager", **options)
    except ShardedModelError as error:
        return _error_fields(error)
    return None


@pytest.fixture(scope="module")
def split_a(tmp_path_factory):
    from mmlora_fx import zoo

    folder = tmp_path_factory.mktemp("split_a")
    base = text_lm()
    base.save_pretrained(folder / "base")
    paths = {"alice": zoo.make_adapter(base, folder / "alice", TARGETS, r=SPLIT_R, lora_alpha=9, seed=0),
             "bob": zoo.make_adapter(base, folder / "bob", TARGETS, r=3, lora_alpha=5, seed=1),
             "carol": zoo.make_adapter(base, folder / "carol", TARGETS, r=6, lora_alpha=7, seed=2,
                                       rank_pattern={"q_proj": 5, "v_proj": 1})}
    ids, references = peft_references(base, paths, SPLIT_NAMES)
    return run_ranks(serve_split_a, (paths, str(folder / "base"), ids, references), folder / "ranks")


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_lora_a_split_along_the_rank_equals_peft_on_every_rank(split_a, sharding):
    """tp_lora_a="sharded": each request of a mixed batch (ranks 8, 3 < R/T and 6 with per-module
    ranks, and the base model) equals PEFT on the unsharded model on both ranks, in the graphs and
    in the hooks (transformers' lm_head gathers its output: the gathered delta's path), and after
    an unload and a load into the freed slot, with no new graph."""
    for rank, by_sharding in enumerate(split_a):
        found = by_sharding[sharding]
        for key in ("compiled", "eager", "reloaded"):
            assert max(found[key]) <= 1e-4, (rank, key, found[key])
        assert found["recompiled"] == 0, (rank, found["recompiled"])


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_each_rank_holds_its_rows_of_a_split_a(split_a, sharding):
    """Column-parallel q_proj holds R/T of A's rows and its output rows of B at the whole rank, and
    each slot's local rank is what of the adapter's rank falls in this rank's rows (bob's 3: 3 on
    rank 0, none on rank 1); row-parallel o_proj's A stays whole along the rank. inspect shows
    the rows and the shrink's all-gather as the column target's collective."""
    for rank, by_sharding in enumerate(split_a):
        found = by_sharding[sharding]
        a_shape, b_shape, ranks = found["q_proj"]
        assert a_shape == (SPLIT_R // WORLD, 64) and b_shape == (64 // WORLD, SPLIT_R), found["q_proj"]
        expected = {"dave": (8, 4), "bob": (3, (3, 0)[rank]), "carol": (5, (4, 1)[rank])}
        assert ranks == expected, (rank, ranks)
        assert found["o_proj_local_ranks"] is None
        q_proj, o_proj = found["inspect"]["q_proj"], found["inspect"]["o_proj"]
        assert q_proj["lora_a_rows"] == [4 * rank, 4 * (rank + 1)], q_proj
        assert q_proj["collective_compiled"] == "all-gather [rows, R]", q_proj
        assert q_proj["collective_eager"].startswith("all-gather [rows, R]"), q_proj
        assert o_proj["lora_a_rows"] is None and o_proj["collective_eager"] == "all-reduce [rows, r]", o_proj


def test_a_max_lora_rank_not_split_evenly_is_refused_alike_on_every_rank(split_a):
    refusals = [by_sharding["refused"] for by_sharding in split_a]
    assert refusals[0] is not None, "tp_lora_a='sharded' accepted max_lora_rank 7 over 2 ranks"
    assert refusals[0]["type"] == "ShardedModelError", refusals[0]
    assert "max_lora_rank=7" in refusals[0]["reason"] and "not a multiple of 2" in refusals[0]["reason"], refusals[0]
    assert refusals[0] == refusals[1]
