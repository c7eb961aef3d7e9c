"""Adapters made with PEFT (the adapter format and the oracle), and PEFT models to compare with."""

from __future__ import annotations

import copy
from pathlib import Path

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
