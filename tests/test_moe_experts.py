"""LoRA on mixture-of-experts weights (PEFT's `target_parameters`), per request in mixed batches, against PEFT.

A Llama4 with MoE layers (every other layer: four experts, a shared expert) serves adapters over
the fused expert weights, the shared expert, attention, the vision tower and the connector; a
Qwen3-MoE language model serves them through transformers' `batched_mm` experts (each row gathers
its expert's weight). Every request is held to PEFT on that request alone with its adapter, to
1e-4 (float32, CPU), eager and compiled, and each adapter's expert LoRA is shown to move PEFT's
own logits well above that. Adapters that do not fit, and experts run in a form whose rows'
tokens cannot be told, are refused with typed errors.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import AdapterFormatError, AdapterShapeError, CaptureError
from mmlora_fx.passes import lora_ops

from .peft_helpers import (all_targets, assert_eager_and_compiled_equal_peft, assert_expert_lora_matters,
                           assert_generate_equals_peft, assert_rows_equal_peft, make_adapter, peft_model_with)
from .test_embedding_head import token_batch

NAMES = ["bob", None, "alice"]
LLAMA4_EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
QWEN3_EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def llama4_moe():
    # The zoo's: layer 1 is MoE (interleave_moe_layer_step=2), layer 0 dense, as Llama4 Maverick interleaves them.
    return zoo.build("tiny-llama4")


def qwen3_moe(experts_implementation: str = "batched_mm"):
    config = transformers.Qwen3MoeConfig(**zoo._text_config(), moe_intermediate_size=32, num_local_experts=4,
                                         num_experts_per_tok=2, decoder_sparse_step=1)
    config._experts_implementation = experts_implementation
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def expert_adapters(base, root, targets, parameters):
    return {name: make_adapter(base, root / name, targets, r=2 + 2 * index, lora_alpha=5 + index, seed=index,
                               target_parameters=parameters)
            for index, name in enumerate(["alice", "bob"])}


def expert_ops(mm) -> int:
    return sum(op.target is torch.ops.mmlora.lora_experts_.default
               for record in mm.backend.records for op in lora_ops(record.graph_module))


# --------------------------------------------------------------------------- Llama4: bmm per expert
@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    base = llama4_moe()
    # The zoo's targets name the expert weights already (as target_parameters); passing them again is harmless.
    targets = all_targets("tiny-llama4") + ["shared_expert.up_proj"]
    paths = expert_adapters(base, tmp_path_factory.mktemp("llama4"), targets, LLAMA4_EXPERTS)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(llama4_moe(), paths, max_loras=2, inner="aot_eager")
    return base, mm, peft_model_with(base, paths)


def test_llama4_moe_mixed_batch_equals_peft_eager_and_compiled(llama4):
    base, mm, peft = llama4
    served = mm.runtime.serving.served
    assert {"language_model.model.layers.1.feed_forward.experts.gate_up_proj",
            "language_model.model.layers.1.feed_forward.experts.down_proj",
            "language_model.model.layers.1.feed_forward.shared_expert.up_proj"} <= served
    assert any(module.startswith("vision_model.") for module in served)
    batch = zoo.make_batch(base, (1, 0, 2), seed=3)
    singles = zoo.split_batch(base, batch)
    eager, compiled = assert_eager_and_compiled_equal_peft(mm, peft, batch, singles, NAMES)
    with torch.no_grad():
        assert_expert_lora_matters(peft, singles[0], ["gate_up_proj", "down_proj"])
    assert expert_ops(mm) == 2


def test_llama4_moe_decode_rows_equal_peft(llama4):
    base, mm, peft = llama4
    assert_generate_equals_peft(mm, peft, token_batch(seed=8, length=5), NAMES, max_new_tokens=3, sequences=False)


# --------------------------------------------------------------------------- Qwen3-MoE: batched_mm, gathered rows
def test_qwen3_moe_batched_mm_experts_equal_peft_eager_and_inductor(tmp_path):
    base = qwen3_moe()
    paths = expert_adapters(base, tmp_path, ["q_proj"], QWEN3_EXPERTS)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(qwen3_moe(), paths, max_loras=2)  # Inductor
    peft = peft_model_with(base, paths)
    input_ids = token_batch(seed=4)
    singles = [{"input_ids": input_ids[row: row + 1]} for row in range(3)]
    with torch.no_grad():
        eager = mm.eager(input_ids=input_ids, adapter_names=NAMES).logits
        compiled = mm(input_ids=input_ids, adapter_names=NAMES).logits
        assert_rows_equal_peft(peft, singles, eager, NAMES, "eager")
        assert_rows_equal_peft(peft, singles, compiled, NAMES, "compiled")
        assert_expert_lora_matters(peft, singles[2], ["gate_up_proj", "down_proj"])
    assert expert_ops(mm) == 2 * base.config.num_hidden_layers


def test_an_expert_loop_over_data_dependent_tokens_is_refused_naming_the_weight(tmp_path):
    base = qwen3_moe("eager")
    paths = expert_adapters(base, tmp_path, ["q_proj"], QWEN3_EXPERTS)
    mm = mmlora_fx.compile(qwen3_moe("eager"), paths, max_loras=2, inner="aot_eager")
    with pytest.raises(CaptureError, match=r"experts\.gate_up_proj.*batched_mm"):
        with torch.no_grad():
            mm.eager(input_ids=token_batch(seed=1), adapter_names=NAMES)
    # The refused forward left no torch-function mode behind (later code would run inside it).
    assert torch._C._len_torch_function_stack() == 0


# --------------------------------------------------------------------------- typed errors
def test_expert_lora_of_the_wrong_shape_is_refused_and_nothing_loaded_is_lost(tmp_path, llama4):
    base, mm, _ = llama4
    path = make_adapter(base, tmp_path / "bad", ["q_proj"], r=2, target_parameters=LLAMA4_EXPERTS)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(key for key in tensors if key.endswith("experts.lora_A.weight"))
    tensors[key] = tensors[key][:-1]  # 7 rows: not r x 4 experts
    save_file(tensors, str(path / "adapter_model.safetensors"))
    before = mm.runtime.manager.names
    with pytest.raises(AdapterShapeError, match=r"down_proj.*4 experts"):
        mm.load_adapter("bad", path)
    assert mm.runtime.manager.names == before


def test_expert_lora_nested_deeper_than_the_config_selects_is_refused(tmp_path, llama4):
    base, mm, _ = llama4
    path = make_adapter(base, tmp_path / "nested", ["q_proj"], r=2, target_parameters=LLAMA4_EXPERTS)
    config = json.loads((path / "adapter_config.json").read_text())
    # Two wrappers' tensors, but a config naming one parameter: which tensors adapt which is unknown.
    config["target_parameters"] = ["feed_forward.experts.down_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="wrapper"):
        mm.load_adapter("nested", path)


def test_a_model_compiled_again_keeps_its_expert_lora_outside_the_graphs(tmp_path):
    """The eager expert path finds its runtime from the weights at each call: after a second
    compile of the same model, `mm.eager` (the reference) still carries the expert LoRA."""
    base = qwen3_moe()
    paths = expert_adapters(base, tmp_path, ["q_proj"], QWEN3_EXPERTS)
    peft = peft_model_with(base, paths)
    model = qwen3_moe()
    mmlora_fx.compile(model, paths, max_loras=2, inner="aot_eager")
    model._compiled_call_impl = None  # compiled again, as a user who changes the served set would
    again = mmlora_fx.compile(model, paths, max_loras=2, inner="aot_eager")
    input_ids = token_batch(seed=4)
    singles = [{"input_ids": input_ids[row: row + 1]} for row in range(3)]
    with torch.no_grad():
        eager = again.eager(input_ids=input_ids, adapter_names=NAMES).logits
    assert_rows_equal_peft(peft, singles, eager, NAMES, "eager after a second compile")


def test_tokens_moved_before_the_expert_layout_are_refused_in_the_graph(tmp_path, monkeypatch):
    """A MoE block that lays its tokens out sequence-major before repeating them for the experts
    (the same maths per token, so PEFT is unchanged) must be refused, not served with the
    requests' rows mixed up: the repeat's input is walked back to where the rows were computed."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    def sequence_major(self, hidden_states):
        batch, length, hidden = hidden_states.shape
        rows = hidden_states.transpose(0, 1).reshape(-1, hidden)
        _, weights, experts = self.gate(rows)
        return self.experts(rows, experts, weights).view(length, batch, hidden).transpose(0, 1)

    monkeypatch.setattr(modeling_qwen3_moe.Qwen3MoeSparseMoeBlock, "forward", sequence_major)
    base = qwen3_moe()
    paths = expert_adapters(base, tmp_path, ["q_proj"], QWEN3_EXPERTS)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(qwen3_moe(), paths, max_loras=2, inner="aot_eager")
    with pytest.raises(CaptureError, match="moves or repeats the token rows before they are laid out"):
        with torch.no_grad():
            mm(input_ids=token_batch(seed=4), adapter_names=NAMES)


def test_a_linear_on_rows_picked_by_an_index_is_refused(tmp_path, monkeypatch):
    """A per-expert `nn.Linear` sees the tokens routed to it (`h[idx]`): some rows, in the router's
    order. No share of the requests' rows fits them, so the served linear is refused at the first
    call instead of being given rows by position."""
    from transformers.models.llama import modeling_llama

    from .test_embedding_head import adapters_for, text_lm

    def routed(self, x):
        flat = x.reshape(-1, x.shape[-1])
        order = torch.argsort(flat[:, 0])  # a data-dependent routing of the token rows
        picked = flat[order]
        out = self.down_proj(self.act_fn(self.gate_proj(picked)) * self.up_proj(picked))
        return torch.zeros_like(flat).index_copy(0, order, out).view_as(x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", routed)
    paths = adapters_for(text_lm(), tmp_path, ["gate_proj", "down_proj"])
    torch._dynamo.reset()
    mm = mmlora_fx.compile(text_lm(), paths, max_loras=2, inner="aot_eager")
    with pytest.raises(CaptureError, match="a linear on rows picked by an index"):
        with torch.no_grad():
            mm(input_ids=token_batch(seed=1), adapter_names=NAMES)
