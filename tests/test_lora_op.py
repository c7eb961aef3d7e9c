"""The graph-level ops' weight registry: which compiled model a LoRA op call serves.

An op call finds its runtime from the weight tensors it receives. Two compiled models over one
set of weight tensors (two module trees sharing parameters) must each get their own adapters:
before the registry kept one entry per runtime, the model compiled first silently served the
second model's adapters.
"""

from __future__ import annotations

import copy

import torch

import mmlora_fx
from mmlora_fx import zoo

from .peft_helpers import make_adapter, relative_error

FAMILY = "tiny-llava"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def two_models_over_one_set_of_weights(tmp_path):
    """Two module trees sharing every parameter and buffer, two adapters of the same targets with
    different weights, and a batch of token ids."""
    torch._dynamo.reset()
    first_model = zoo.build(FAMILY)
    alice = make_adapter(first_model, tmp_path / "alice", TARGETS, r=4, lora_alpha=9, seed=0)
    bob = make_adapter(first_model, tmp_path / "bob", TARGETS, r=4, lora_alpha=9, seed=1)
    tensors = list(first_model.parameters()) + list(first_model.buffers())
    second_model = copy.deepcopy(first_model, memo={id(tensor): tensor for tensor in tensors})
    ids = torch.randint(zoo.FIRST_TEXT_TOKEN, zoo.FIRST_TEXT_TOKEN + 50, (2, 2),
                        generator=torch.Generator().manual_seed(3))
    return first_model, second_model, alice, bob, ids


def test_two_compiled_models_sharing_weights_each_serve_their_own_adapters(tmp_path):
    """Adapters under one name but with different weights: each call resolves the shared weights
    to its own runtime, the model compiled first included; outside any call the model is the
    base model."""
    first_model, second_model, alice, bob, ids = two_models_over_one_set_of_weights(tmp_path)
    names = ["a", None]
    first = mmlora_fx.compile(first_model, {"a": alice}, max_loras=1, inner="aot_eager")
    with torch.no_grad():
        first_alone = first(input_ids=ids, adapter_names=names).logits.clone()
    second = mmlora_fx.compile(second_model, {"a": bob}, max_loras=1, inner="aot_eager")
    with torch.no_grad():
        second_logits = second(input_ids=ids, adapter_names=names).logits.clone()
        first_logits = first(input_ids=ids, adapter_names=names).logits.clone()
        first_eager = first.eager(input_ids=ids, adapter_names=names).logits
        second_eager = second.eager(input_ids=ids, adapter_names=names).logits
        plain = first_model.forward(input_ids=ids).logits  # outside any call: the base model
    assert torch.equal(first_logits, first_alone)
    assert relative_error(first_eager, first_alone) <= 1e-4
    assert relative_error(second_eager, second_logits) <= 1e-4
    # Both adapters matter and differ (a call served by the other model would show); request 1
    # has none and is the base model's.
    for logits in (first_logits, second_logits):
        assert relative_error(logits[0], plain[0]) > 1e-2 and relative_error(logits[1], plain[1]) <= 1e-5
    assert relative_error(first_logits[0], second_logits[0]) > 1e-2


def test_two_models_compiled_through_the_backend_alone_over_shared_weights_each_serve_their_own(tmp_path):
    """Through `torch.compile(model, backend="mmlora")` no served call scope is entered: each
    compiled graph's call resolves the shared weights to the runtime of the backend that compiled
    it, so the model compiled first keeps its own adapter after the second is compiled."""
    first_model, second_model, alice, bob, ids = two_models_over_one_set_of_weights(tmp_path)
    names = ["a", None]
    first = torch.compile(first_model, backend="mmlora",
                          options={"adapters": {"a": alice}, "max_loras": 1, "inner": "aot_eager"})
    second = torch.compile(second_model, backend="mmlora",
                           options={"adapters": {"a": bob}, "max_loras": 1, "inner": "aot_eager"})
    with torch.no_grad(), mmlora_fx.adapter_names(names, input_ids=ids):
        first_alone = first(input_ids=ids).logits.clone()
        second_logits = second(input_ids=ids).logits.clone()
        first_logits = first(input_ids=ids).logits.clone()
    plain = zoo.build(FAMILY)
    plain.load_state_dict(first_model.state_dict())
    with torch.no_grad():
        base = plain(input_ids=ids).logits
    assert torch.equal(first_logits, first_alone)
    for logits in (first_logits, second_logits):
        assert relative_error(logits[0], base[0]) > 1e-2 and relative_error(logits[1], base[1]) <= 1e-5
    assert relative_error(first_logits[0], second_logits[0]) > 1e-2
