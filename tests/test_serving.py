"""Deployment restrictions: partitions= and target_modules= decide where LoRA is served."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import AdapterTargetError, MMLoRAError
from mmlora_fx.linear_index import LinearIndex
from mmlora_fx.partitions import discover_partitions
from mmlora_fx.passes import lora_ops
from mmlora_fx.serving import ServingPlan, module_suffix

from .conftest import cached_model
from .peft_helpers import all_targets, make_adapter, peft_model_with

FAMILY = "tiny-llava"


def keep_only(source, target, keep):
    """A copy of a PEFT adapter holding only the modules `keep(module)` accepts."""
    target.mkdir()
    tensors = {key: value for key, value in load_file(str(source / "adapter_model.safetensors")).items()
               if keep(key)}
    save_file(tensors, str(target / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    # PEFT gives every module its config targets a fresh LoRA layer: name only the kept ones.
    config["target_modules"] = sorted({key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                       for key in tensors})
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_module_suffix():
    assert module_suffix("model.visual.blocks.0.attn.qkv") == "qkv"
    assert module_suffix("model.visual.merger.mlp.0") == "mlp.0"


def test_default_serving_is_what_the_adapters_target(tmp_path):
    model = cached_model(FAMILY)
    linears = LinearIndex(model, discover_partitions(model))
    adapter = type("Scan", (), {"modules": {"model.language_model.layers.0.self_attn.q_proj": 4,
                                            "model.multi_modal_projector.linear_1": 4}})
    plan = ServingPlan.build(linears, [adapter])
    assert plan.partitions == ("connector", "language_model") and not plan.explicit
    assert plan.target_modules == ("linear_1", "q_proj")
    assert plan.served == {"model.multi_modal_projector.linear_1", "model.language_model.layers.0.self_attn.q_proj",
                           "model.language_model.layers.1.self_attn.q_proj"}
    with pytest.raises(MMLoRAError, match="cannot carry LoRA"):
        ServingPlan.build(linears, partitions=["other"])


def test_restricted_partitions_serve_only_the_language_model(tmp_path):
    base = zoo.build(FAMILY)
    full = make_adapter(base, tmp_path / "full", all_targets(FAMILY), r=4, lora_alpha=7, seed=3)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(FAMILY), {"full": full}, partitions=["language_model"],
                           target_modules=["q_proj", "v_proj", "up_proj"], inner="aot_eager")
    assert mm.runtime.manager.dropped_modules("full"), "tower, connector and down_proj parts are dropped"
    batch = zoo.make_batch(base, (1, 2), seed=1)
    with torch.no_grad():
        logits = mm(**batch, adapter_names=["full", "full"]).logits
    # The reference: PEFT with only the language-model q/v/up parts of the adapter.
    reference_adapter = keep_only(full, tmp_path / "ref", lambda key: "language_model" in key and
                                  any(name in key for name in ("q_proj", "v_proj", "up_proj")))
    peft = peft_model_with(base, {"ref": reference_adapter})
    with torch.no_grad():
        reference = peft(**batch).logits
    assert ((logits - reference).abs().max() / reference.abs().max()).item() <= 1e-4
    served_nodes = [node.meta["mmlora_linear"].module for record in mm.backend.records
                    for node in record.linear_nodes() if node.meta.get("mmlora_lora")]
    assert served_nodes and all("language_model" in module for module in served_nodes)
    assert not any(module.endswith("down_proj") for module in served_nodes)


def test_an_adapter_wider_than_the_compiled_default_is_refused(tmp_path):
    base = cached_model(FAMILY)
    narrow = make_adapter(base, tmp_path / "narrow", ["q_proj"], r=2)
    wide = make_adapter(base, tmp_path / "wide", ["q_proj", "linear_1"], r=2)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(FAMILY), {"narrow": narrow}, inner="aot_eager")
    with pytest.raises(AdapterTargetError, match="does not serve"):
        mm.load_adapter("wide", wide)
    assert mm.adapters == ["narrow"]


def test_siblings_share_one_op():
    """q/k/v (and gate/up) read one input: one LoRA op serves each group."""
    base = cached_model(FAMILY)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(FAMILY), None, partitions=["language_model"], inner="aot_eager")
    with torch.no_grad():
        mm(**zoo.make_batch(base, (0, 1)), adapter_names=[None, None])
    ops = [op for record in mm.backend.records for op in lora_ops(record.graph_module)]
    group_sizes = sorted(len(op.args[0]) for op in ops)
    # Per layer: q/k/v (3), o (1), gate/up (2), down (1); two layers; the input embeddings and lm_head (1 each).
    assert group_sizes == [1, 1, 1, 1, 1, 1, 2, 2, 3, 3]
