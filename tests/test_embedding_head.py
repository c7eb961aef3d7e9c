"""LoRA on the input embeddings and on lm_head, per request in mixed batches, against PEFT.

Adapters are made by PEFT with its defaults (so they carry full copies of the embedding and head
weights, equal to the base's) over the embeddings, the head and a linear. Every request is held
to PEFT on that request alone with its adapter, to 1e-4 (float32, CPU), and each adapter's
embedding and head LoRA is shown to move PEFT's own logits well above that.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.passes import lora_ops

from .peft_helpers import (all_targets, assert_eager_and_compiled_equal_peft, assert_generate_equals_peft,
                           assert_rows_equal_peft, lora_layers,
                           make_adapter, peft_logits, peft_model_with, relative_error)

NAMES = ["bob", None, "alice"]
TARGETS = ["embed_tokens", "lm_head", "q_proj", "down_proj"]


def text_lm(tied: bool = False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**zoo._text_config(), tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def adapters_for(base, root, targets):
    return {name: make_adapter(base, root / name, targets, r=2 + 2 * index, lora_alpha=5 + index, seed=index)
            for index, name in enumerate(["alice", "bob"])}


def token_batch(seed: int, requests: int = 3, length: int = 9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (requests, length), generator=generator)


@contextlib.contextmanager
def lora_switched_off(peft, module: str, name: str):
    """PEFT with adapter `name`'s LoRA on `module` scaled to zero."""
    layer = lora_layers(peft)[module]
    saved = layer.scaling[name]
    layer.scaling[name] = 0.0
    try:
        yield
    finally:
        layer.scaling[name] = saved


def assert_each_lora_matters(peft, single, modules, names=("alice", "bob")):
    """Each adapter's LoRA on each of `modules` moves PEFT's logits well above the tolerance."""
    for name in names:
        full = peft_logits(peft, single, name)
        for module in modules:
            with lora_switched_off(peft, module, name):
                assert relative_error(peft_logits(peft, single, name), full) > 1e-2, (name, module)


def served_kinds(mm) -> dict[str, int]:
    """How many LoRA ops of each kind the compiled graphs hold."""
    ops = [op.target for record in mm.backend.records for op in lora_ops(record.graph_module)]
    return {"linear": ops.count(torch.ops.mmlora.lora_linear_.default),
            "embedding": ops.count(torch.ops.mmlora.lora_embedding_.default)}


# --------------------------------------------------------------------------- a text-only LM, Inductor
@pytest.fixture(scope="module")
def text(tmp_path_factory):
    base = text_lm()
    paths = adapters_for(base, tmp_path_factory.mktemp("text"), TARGETS)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(text_lm(), paths, max_loras=2)
    return base, mm, peft_model_with(base, paths)


def test_a_mixed_batch_with_embedding_and_head_lora_equals_peft_eager_and_compiled(text):
    base, mm, peft = text
    input_ids = token_batch(seed=2)
    singles = [{"input_ids": input_ids[row: row + 1]} for row in range(3)]
    assert_eager_and_compiled_equal_peft(mm, peft, {"input_ids": input_ids}, singles, NAMES)
    assert served_kinds(mm)["embedding"] == 1 and served_kinds(mm)["linear"] >= 1
    with torch.no_grad():
        assert_each_lora_matters(peft, singles[0], ["model.embed_tokens", "lm_head"])


def test_generate_with_head_lora_gives_peft_scores_per_request(text):
    """`generate` hands lm_head only each request's last row (`logits_to_keep`), then decode rows."""
    base, mm, peft = text
    assert_generate_equals_peft(mm, peft, token_batch(seed=5, length=7), NAMES, max_new_tokens=4)


# --------------------------------------------------------------------------- tied embeddings
def test_tied_embeddings_serve_the_embedding_and_the_head_lora_apart(tmp_path):
    """One weight tensor, two modules, two LoRAs (PEFT's default, ensure_weight_tying=False)."""
    base = text_lm(tied=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    paths = adapters_for(base, tmp_path, TARGETS)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(text_lm(tied=True), paths, max_loras=2, inner="aot_eager")
    peft = peft_model_with(base, paths)
    input_ids = token_batch(seed=3)
    singles = [{"input_ids": input_ids[row: row + 1]} for row in range(3)]
    assert_eager_and_compiled_equal_peft(mm, peft, {"input_ids": input_ids}, singles, NAMES)
    with torch.no_grad():
        assert_each_lora_matters(peft, singles[2], ["model.embed_tokens", "lm_head"])
    assert served_kinds(mm)["embedding"] == 1


def test_tied_embeddings_with_only_the_embedding_served(tmp_path):
    """The head shares the served embedding's weight but carries no LoRA: the coverage check lets it be."""
    base = text_lm(tied=True)
    paths = adapters_for(base, tmp_path, ["embed_tokens", "q_proj"])
    torch._dynamo.reset()
    mm = mmlora_fx.compile(text_lm(tied=True), paths, max_loras=2, inner="aot_eager")
    peft = peft_model_with(base, paths)
    input_ids = token_batch(seed=4)
    with torch.no_grad():
        logits = mm(input_ids=input_ids, adapter_names=NAMES).logits
    assert_rows_equal_peft(peft, [{"input_ids": input_ids[row: row + 1]} for row in range(3)], logits, NAMES,
                               "compiled")
    assert "lm_head" not in mm.runtime.serving.served


# --------------------------------------------------------------------------- a VLM
def test_a_vlm_serves_embedding_and_head_lora_beside_tower_and_connector_lora(tmp_path):
    family = "tiny-llava"
    base = zoo.build(family)
    paths = adapters_for(base, tmp_path, all_targets(family) + ["embed_tokens", "lm_head"])
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(family), paths, max_loras=2, inner="aot_eager")
    assert {"model.language_model.embed_tokens", "lm_head"} <= mm.runtime.serving.served
    peft = peft_model_with(base, paths)
    batch = zoo.make_batch(base, (1, 0, 2), seed=6)
    singles = zoo.split_batch(base, batch)
    eager, compiled = assert_eager_and_compiled_equal_peft(mm, peft, batch, singles, NAMES)
    with torch.no_grad():
        assert_each_lora_matters(peft, singles[0], ["model.language_model.embed_tokens", "lm_head"])


def test_the_eager_hooks_take_their_input_by_keyword_too(text):
    """Outside the graphs a layer called as `layer(input=x)` gets its LoRA as `layer(x)` does."""
    base, mm, _ = text
    ids = token_batch(seed=5)
    mm.runtime.prepare(NAMES)
    embed, head = mm.model.get_input_embeddings(), mm.model.lm_head
    with torch.no_grad(), mm.runtime.call_scope():
        by_position, by_keyword = embed(ids), embed(input=ids)
        logits_by_position, logits_by_keyword = head(by_position), head(input=by_position)
    torch.testing.assert_close(by_keyword, by_position)
    torch.testing.assert_close(logits_by_keyword, logits_by_position)
    with torch.no_grad():
        assert relative_error(by_position, base.get_input_embeddings()(ids)) > 1e-2, "the LoRA must act"
