"""Adapters made with PEFT (the adapter format and the oracle), and PEFT models to compare with."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import NamedTuple

import torch

from mmlora_fx import zoo
from mmlora_fx.zoo import make_adapter  # noqa: F401  (the one adapter maker tests, example and benchmarks use)


def all_targets(family: str) -> list[str]:
    """PEFT target suffixes over the zoo family's tower, connector and language model."""
    return zoo.ZOO[family].all_targets


def peft_model_with(model: torch.nn.Module, adapters: dict[str, Path]):
    """A PEFT model on a copy of `model` holding every adapter of `adapters`."""
    from peft import PeftModel

    names = list(adapters)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(adapters[name]), adapter_name=name)
    return peft_model.eval()


def lora_layers(peft_model):
    """PEFT's LoRA layers by the module name the base model gives them."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: module for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


class PeftFamily(NamedTuple):
    """A base model, its adapters on disk by name, and a PEFT model holding them all."""

    base: torch.nn.Module
    paths: dict
    peft: object


def peft_family(root, build, targets, names=("alice", "bob")) -> PeftFamily:
    """`build()` with one rank-4 adapter per name over `targets`, saved under `root`."""
    base = build()
    paths = {name: make_adapter(base, root / name, targets, r=4, lora_alpha=9, seed=index)
             for index, name in enumerate(names)}
    return PeftFamily(base, paths, peft_model_with(base, paths))


def peft_logits(peft_model, single: dict, name):
    """What PEFT gives for one request alone with adapter `name` (None or "__base__": the base model)."""
    with torch.no_grad():
        if name in (None, "__base__"):
            with peft_model.disable_adapter():
                return peft_model(**single).logits[0]
        peft_model.set_adapter(name)
        return peft_model(**single).logits[0]


def relative_error(ours, reference) -> float:
    """The largest absolute difference over the reference's largest magnitude (in float32)."""
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def assert_rows_equal_peft(peft_model, singles, logits, names, label="") -> None:
    """Row `r` of `logits` equals PEFT on `singles[r]` alone with adapter `names[r]`, to 1e-4."""
    for row, (single, name) in enumerate(zip(singles, names)):
        error = relative_error(logits[row], peft_logits(peft_model, single, name))
        assert error <= 1e-4, (label, row, name, error)


def assert_eager_and_compiled_equal_peft(mm, peft_model, batch, singles, names):
    """`mm.eager` and the compiled `mm` on `batch` each equal PEFT per request; both logits back."""
    with torch.no_grad():
        eager = mm.eager(**batch, adapter_names=names).logits
        compiled = mm(**batch, adapter_names=names).logits
    assert_rows_equal_peft(peft_model, singles, eager, names, "eager")
    assert_rows_equal_peft(peft_model, singles, compiled, names, "compiled")
    return eager, compiled


def expert_parameters(peft_model) -> list[str]:
    """The names (`gate_up_proj`, ...) of the 3D expert weights PEFT's `target_parameters` wrapped."""
    return sorted({layer.parameter_name for layer in lora_layers(peft_model).values()
                   if getattr(layer, "parameter_name", None) is not None
                   and layer.get_param().dim() == 3})


def assert_expert_lora_matters(peft_model, single, parameters, names=("alice", "bob")) -> None:
    """Each adapter's LoRA on each expert weight moves PEFT's logits well above the tolerance."""
    layers = lora_layers(peft_model)
    for name in names:
        full = peft_logits(peft_model, single, name)
        for parameter in parameters:
            layer = next(layer for layer in layers.values() if getattr(layer, "parameter_name", None) == parameter)
            saved = layer.scaling[name]
            layer.scaling[name] = 0.0
            try:
                assert relative_error(peft_logits(peft_model, single, name), full) > 1e-2, (name, parameter)
            finally:
                layer.scaling[name] = saved


def assert_generate_equals_peft(mm, peft_model, input_ids, names, max_new_tokens, sequences=True) -> None:
    """`mm.generate` on the batch gives, per request, PEFT's greedy generation of that request
    alone: every step's scores to 1e-4 (and the tokens, with `sequences`)."""
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = mm.generate(input_ids=input_ids, adapter_names=names, **options)
        for row, name in enumerate(names):
            single = input_ids[row: row + 1]
            if name in (None, "__base__"):
                with peft_model.disable_adapter():
                    reference = peft_model.generate(input_ids=single, **options)
            else:
                peft_model.set_adapter(name)
                reference = peft_model.generate(input_ids=single, **options)
            if sequences:
                assert ours.sequences[row].tolist() == reference.sequences[0].tolist(), name
            for step, (score, expected) in enumerate(zip(ours.scores, reference.scores)):
                assert relative_error(score[row], expected[0]) <= 1e-4, (name, step)
