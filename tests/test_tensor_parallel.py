"""A tensor-parallel-sharded model is refused with `ShardedModelError`, alike on every rank (#23).

Two processes on the CPU (gloo) shard a tiny Llama with torch.distributed's tensor-parallel API
(`ColwiseParallel` on q/k/v/gate/up, `RowwiseParallel` on o/down) over a 2-rank `DeviceMesh`, and
with transformers' own `tp_plan`, and pass it to `mmlora_fx.compile` with adapters PEFT made on the
unsharded model. Without the refusal, compile returned and the first call failed with an untyped
error from DTensor's dispatch (compiled) or a misleading one (eager). Only served targets are
checked: adapters on the lm_head `parallelize_module` left whole are served, equal to PEFT.
`run_ranks` is the harness issue #23's exact tests need: a function run on every rank with the
process group and mesh up, its results back by rank.
"""

from __future__ import annotations

import os
import pickle
import time

import pytest
import torch
import torch.distributed as dist

from .peft_helpers import peft_logits, peft_model_with

WORLD = 2
TIMEOUT_S = 120  # a rank stuck in a collective fails the test instead of hanging it
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["bob", None, "alice"]

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


def refusal(model, paths) -> dict | None:
    """What `mmlora_fx.compile` says to `model`: the `ShardedModelError`'s fields, or None if it accepted it."""
    import mmlora_fx
    from mmlora_fx.errors import ShardedModelError

    try:
        mmlora_fx.compile(model, paths, max_loras=2, inner="eager")
    except ShardedModelError as error:
        return dict(message=str(error), module=error.module, layout=error.layout, count=error.count)
    return None


def compile_sharded(rank: int, mesh, paths: dict, checkpoint: str, head_paths: dict, ids: torch.Tensor,
                    references: list) -> dict:
    """On one rank: the tiny Llama sharded by `parallelize_module` and by transformers' `tp_plan`,
    each checked to compute the unsharded logits, then given to `mmlora_fx.compile`; and the
    `parallelize_module` model served with adapters on its unsharded lm_head only, each request's
    logits held to `references` (PEFT's, on the unsharded model)."""
    import transformers

    import mmlora_fx

    with torch.no_grad():
        unsharded = text_lm()(input_ids=ids).logits

    def checked(model) -> dict:
        from torch.distributed.tensor import DTensor

        with torch.no_grad():
            error = ((model(input_ids=ids).logits - unsharded).abs().max() / unsharded.abs().max()).item()
        return dict(sharded=isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor), sharded_error=error,
                    refused=refusal(model, paths))

    results = {}
    model = shard_llama(text_lm(), mesh)
    results["parallelize_module"] = checked(model)
    if hasattr(transformers, "DistributedConfig"):  # transformers' own tensor parallelism (DTensor weights)
        model = transformers.LlamaForCausalLM.from_pretrained(
            checkpoint, distributed_config=transformers.DistributedConfig(tp_plan="auto", tp_size=WORLD)).eval()
        results["tp_plan"] = checked(model)
    mm = mmlora_fx.compile(shard_llama(text_lm(), mesh), head_paths, max_loras=2, inner="eager")
    with torch.no_grad():
        logits = mm(input_ids=ids, adapter_names=NAMES).logits
    results["unsharded_targets"] = [relative_error(row, reference) for row, reference in zip(logits, references)]
    return results


def relative_error(ours, reference) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results of `compile_sharded`, adapters made by PEFT on the unsharded model."""
    from mmlora_fx import zoo

    folder = tmp_path_factory.mktemp("tensor_parallel")
    base = text_lm()
    base.save_pretrained(folder / "base")
    paths = {name: zoo.make_adapter(base, folder / name, TARGETS, r=4, lora_alpha=9, seed=index)
             for index, name in enumerate(["alice", "bob"])}
    head_paths = {name: zoo.make_adapter(base, folder / f"{name}-head", ["lm_head"], r=4, lora_alpha=9, seed=index)
                  for index, name in enumerate(["alice", "bob"])}
    ids = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (len(NAMES), 9), generator=torch.Generator().manual_seed(1))
    peft = peft_model_with(base, head_paths)
    references = [peft_logits(peft, {"input_ids": ids[row: row + 1]}, name) for row, name in enumerate(NAMES)]
    base_logits = peft_logits(peft, {"input_ids": ids[:1]}, None)
    assert relative_error(references[0], base_logits) > 1e-2  # the head's LoRA matters
    return run_ranks(compile_sharded, (paths, str(folder / "base"), head_paths, ids, references), folder)


@pytest.mark.parametrize("sharding", ["parallelize_module", "tp_plan"])
def test_sharded_model_is_refused_alike_on_every_rank(ranks, sharding):
    if sharding not in ranks[0]:
        pytest.skip("this transformers has no DistributedConfig (tp_plan)")
    results = [by_sharding[sharding] for by_sharding in ranks]
    for rank, result in enumerate(results):
        assert result["sharded"] and result["sharded_error"] <= 1e-5, (rank, result)  # sharded, and correctly
        refused = result["refused"]
        assert refused is not None, f"rank {rank}: mmlora_fx.compile accepted a model sharded by {sharding}"
        assert refused["module"] == "model.layers.0.self_attn.q_proj", refused
        assert "Shard(dim=0)" in refused["layout"] and "2-rank cpu mesh" in refused["layout"], refused
        assert "#23" in refused["message"], refused
        assert refused["count"] == 2 * len(TARGETS), refused  # every served linear of both layers
    assert results[0]["refused"] == results[1]["refused"]  # the same error on every rank: none hangs


def test_unsharded_targets_of_a_sharded_model_equal_peft(ranks):
    """Only served targets are checked: LoRA on lm_head, which `parallelize_module` left whole,
    is served on every rank of the sharded model, each request equal to PEFT on the unsharded one."""
    for rank, by_sharding in enumerate(ranks):
        assert max(by_sharding["unsharded_targets"]) <= 1e-4, (rank, by_sharding["unsharded_targets"])
