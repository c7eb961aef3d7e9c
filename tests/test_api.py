"""mmlora_fx.compile: a mixed-adapter batch gives, per request, what PEFT gives for it alone.

Every zoo family is compiled once (Inductor, the default) with three PEFT adapters of different
ranks over its tower, connector and language model (the MoE families' expert weights included);
the batches hold requests with 0, 1 and 2 images (of different sizes for the Qwen-VL families),
one of them on the base model.
"""

import dataclasses

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import BatchError, TooManyAdaptersError, UnknownAdapterError, VerificationError

from .peft_helpers import (all_targets, assert_expert_lora_matters, expert_parameters, make_adapter, peft_logits,
                           peft_model_with, relative_error)

FAMILIES = list(zoo.ZOO)
RANKS = {"alice": 2, "bob": 4, "carol": 8}


@dataclasses.dataclass
class Served:
    family: str
    base: torch.nn.Module
    mm: mmlora_fx.MultiLoRAModel
    peft: object
    paths: dict


def image_sizes(family, counts):
    if family not in ("tiny-qwen2-vl", "tiny-qwen3-vl-moe"):
        return None
    sizes = zoo.ZOO[family].item_sizes(zoo.ZOO[family].tiny_config())
    # Different sizes within and across requests: [], [small], [square, wide] ...
    pool = [sizes[1], sizes[0], sizes[2], sizes[0]]
    start = [sum(counts[:index]) for index in range(len(counts))]
    return [pool[begin: begin + count] for begin, count in zip(start, counts)]


def batch_for(served, counts=(0, 1, 2), seed=0):
    return zoo.make_batch(served.base, counts, item_sizes=image_sizes(served.family, list(counts)), seed=seed)


def assert_matches_peft(served, batch, names, logits):
    for row, (single, name) in enumerate(zip(zoo.split_batch(served.base, batch), names)):
        reference = peft_logits(served.peft, single, name)
        assert relative_error(logits[row], reference) <= 1e-4, (served.family, row, name)
        if name not in (None, "__base__"):
            with torch.no_grad():
                plain = served.base(**single).logits[0]
            assert relative_error(plain, reference) > 1e-2, "the adapter must change the logits"


def until_eos(tokens):
    """Generated tokens up to the first end-of-sequence (a batch pads the rows that stopped)."""
    tokens = tokens.tolist()
    return tokens[: tokens.index(zoo.EOS) + 1] if zoo.EOS in tokens else tokens


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = zoo.build(family)
    paths = {name: make_adapter(base, root / name, all_targets(family), r=rank, lora_alpha=3 * rank + 1, seed=index)
             for index, (name, rank) in enumerate(RANKS.items())}
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(family), paths, max_loras=3)
    return Served(family, base, mm, peft_model_with(base, paths), paths)


def test_mixed_batch_equals_peft_per_request(served):
    batch = batch_for(served)
    names = ["alice", None, "carol"]
    with torch.no_grad():
        logits = served.mm(**batch, adapter_names=names).logits
    assert served.mm.compiled_graphs > 0
    assert_matches_peft(served, batch, names, logits)
    # MoE families: each adapter's LoRA on each expert weight changes PEFT's logits by itself.
    experts = expert_parameters(served.peft)
    assert bool(experts) == any("experts." in target for target in all_targets(served.family))
    if experts:
        singles = zoo.split_batch(served.base, batch)
        assert_expert_lora_matters(served.peft, singles[2], experts, names=["alice", "carol"])


def test_swapping_adapters_needs_no_recompilation(served, tmp_path):
    with torch.no_grad():
        served.mm(**batch_for(served), adapter_names=["alice", "bob", None])
    compiled = served.mm.compiled_graphs
    for seed, names in enumerate([["bob", "alice", "__base__"], ["carol", "carol", "bob"]], start=1):
        batch = batch_for(served, seed=seed)
        with torch.no_grad():
            assert_matches_peft(served, batch, names, served.mm(**batch, adapter_names=names).logits)

    dave = make_adapter(served.base, tmp_path / "dave", all_targets(served.family), r=3, lora_alpha=5, seed=9)
    served.mm.load_adapter("dave", dave)
    served.peft.load_adapter(str(dave), adapter_name="dave")
    served.mm.unload_adapter("alice")
    assert served.mm.adapters == ["bob", "carol", "dave"]
    with pytest.raises(UnknownAdapterError):
        served.mm(**batch_for(served), adapter_names=["alice", None, None])
    batch = batch_for(served, seed=4)
    names = ["dave", None, "bob"]
    with torch.no_grad():
        assert_matches_peft(served, batch, names, served.mm(**batch, adapter_names=names).logits)
    # Same name, new weights: bob serves dave's from the next call on (its slot rewritten in place).
    reloads = served.mm.stats().reloads
    served.mm.reload_adapter("bob", dave)
    batch = batch_for(served, seed=5)
    with torch.no_grad():
        assert_matches_peft(served, batch, ["dave", None, "carol"],
                            served.mm(**batch, adapter_names=["bob", None, "carol"]).logits)
    assert served.mm.stats().reloads == reloads + 1
    assert served.mm.compiled_graphs == compiled, "adapter changes must not recompile"
    served.mm.reload_adapter("bob", served.paths["bob"])  # restore for the tests that follow
    served.mm.load_adapter("alice", served.paths["alice"])


def test_greedy_generate_gives_peft_tokens_per_request(served):
    batch = batch_for(served, counts=(1, 0, 2), seed=7)
    names = ["carol", "__base__", "bob"]
    with torch.no_grad():
        tokens = served.mm.generate(**batch, adapter_names=names, max_new_tokens=6, do_sample=False)
    prompt = batch["input_ids"].shape[1]
    for row, (single, name) in enumerate(zip(zoo.split_batch(served.base, batch), names)):
        with torch.no_grad():
            if name == "__base__":
                with served.peft.disable_adapter():
                    reference = served.peft.generate(**single, max_new_tokens=6, do_sample=False)
            else:
                served.peft.set_adapter(name)
                reference = served.peft.generate(**single, max_new_tokens=6, do_sample=False)
        assert until_eos(tokens[row, prompt:]) == until_eos(reference[0, prompt:]), (served.family, name)


def test_bad_batches_fail_before_anything_runs(served):
    batch = batch_for(served)
    compiled = served.mm.compiled_graphs
    resident = served.mm.runtime.manager.resident
    with pytest.raises(UnknownAdapterError, match="adapter 'zoe': is not loaded"):
        served.mm(**batch, adapter_names=["alice", "zoe", None])
    with pytest.raises(BatchError, match="2 names but the batch has 3 requests"):
        served.mm(**batch, adapter_names=["alice", None])
    small = mmlora_fx.MultiLoRAModel(served.mm.model, served.mm.runtime, served.mm.backend)
    served.mm.runtime.manager.max_loras, saved = 2, served.mm.runtime.manager.max_loras
    try:
        with pytest.raises(TooManyAdaptersError, match="3 distinct adapters"):
            small(**batch, adapter_names=["alice", "bob", "carol"])
    finally:
        served.mm.runtime.manager.max_loras = saved
    assert served.mm.runtime.manager.resident == resident
    assert served.mm.compiled_graphs == compiled


def test_verify_returns_each_requests_error_against_eager(served):
    batch = batch_for(served, seed=11)
    errors = served.mm.verify(**batch, adapter_names=["bob", None, "alice"])
    assert len(errors) == 3 and all(0 <= error <= 1e-4 for error in errors), errors


def test_verify_raises_where_the_compiled_path_differs(tmp_path):
    """A model with a deliberate compiled-only difference (its projector scales by 1.5 when traced)."""
    base = zoo.build("tiny-llava")
    path = make_adapter(base, tmp_path / "alice", all_targets("tiny-llava"), r=2)
    model = zoo.build("tiny-llava")
    projector = model.model.multi_modal_projector
    plain_forward = projector.forward

    def forward(image_features):
        output = plain_forward(image_features)
        return output * 1.5 if torch.compiler.is_compiling() else output

    projector.forward = forward
    torch._dynamo.reset()
    mm = mmlora_fx.compile(model, {"alice": path}, inner="aot_eager")
    batch = zoo.make_batch(base, (1, 0), seed=3)
    with pytest.raises(VerificationError, match=r"request\(s\) \[0\] of 2") as caught:
        mm.verify(**batch, adapter_names=["alice", None])
    errors = caught.value.errors
    assert errors[0] > 1e-2 and errors[1] <= 1e-4, "only the request with an image goes through the projector"
    # The caller's tolerance decides.
    assert mm.verify(**batch, adapter_names=["alice", None], tolerance=10.0) == pytest.approx(errors, rel=1e-3)


def test_a_text_only_language_model_serves_a_mixed_batch_like_peft(tmp_path):
    from .test_partitions import text_only_lm

    base = text_only_lm()
    paths = {name: make_adapter(base, tmp_path / name, ["q_proj", "v_proj", "down_proj"], r=2 + 2 * index, seed=index)
             for index, name in enumerate(["alice", "bob"])}
    torch._dynamo.reset()
    mm = mmlora_fx.compile(text_only_lm(), paths, max_loras=2, inner="aot_eager")
    input_ids = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    names = ["bob", None, "alice"]
    with torch.no_grad():
        logits = mm(input_ids=input_ids, adapter_names=names).logits
    peft = peft_model_with(base, paths)
    for row, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with peft.disable_adapter():
                    reference = peft(input_ids=input_ids[row: row + 1]).logits[0]
            else:
                peft.set_adapter(name)
                reference = peft(input_ids=input_ids[row: row + 1]).logits[0]
            plain = base(input_ids=input_ids[row: row + 1]).logits[0]
        assert relative_error(logits[row], reference) <= 1e-4, (row, name)
        if name is not None:
            assert relative_error(plain, reference) > 1e-2, "the adapter must change the logits"


def test_prefetch_workers_reach_the_manager_from_compile_and_the_backend(tmp_path):
    base = zoo.build("tiny-llava")
    paths = {"a": make_adapter(base, tmp_path / "a", all_targets("tiny-llava"), r=4, seed=0)}
    mm = mmlora_fx.compile(zoo.build("tiny-llava"), paths, max_loras=1, prefetch_workers=3, inner="aot_eager")
    assert mm.runtime.manager.prefetch_workers == 3
    with pytest.raises(ValueError, match="prefetch_workers must be a positive int"):
        mmlora_fx.compile(zoo.build("tiny-llava"), paths, max_loras=1, prefetch_workers=0, inner="aot_eager")
    from mmlora_fx.runtime import ServingOptions

    assert ServingOptions.taken_from({"prefetch_workers": 2, "inner": "aot_eager"}).prefetch_workers == 2
