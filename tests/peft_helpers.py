"""Adapters made with PEFT (the adapter format and the oracle), and PEFT models to compare with."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# Per family: module-name suffixes (PEFT target_modules) in the tower, the connector and the
# language model. Gemma3's connector has no linear layer, so no connector target.
FAMILY_TARGETS = {
    "tiny-qwen2-vl": (["qkv", "fc1"], ["mlp.0", "mlp.2"], ["q_proj", "v_proj", "gate_proj", "down_proj"]),
    "tiny-llava": (["out_proj", "fc1"], ["linear_1", "linear_2"], ["q_proj", "v_proj", "up_proj", "down_proj"]),
    "tiny-idefics3": (["out_proj", "fc2"], ["proj"], ["q_proj", "k_proj", "gate_proj", "down_proj"]),
    "tiny-gemma3": (["out_proj", "fc1"], [], ["q_proj", "o_proj", "up_proj", "down_proj"]),
    "tiny-llama4": (["fc2", "patch_embedding.linear"], ["fc1", "linear_1"], ["q_proj", "v_proj", "gate_proj", "down_proj"]),
}


def all_targets(family: str) -> list[str]:
    tower, connector, language_model = FAMILY_TARGETS[family]
    return tower + connector + language_model


def make_adapter(model: torch.nn.Module, path, target_modules, r: int = 4, lora_alpha: float = 8,
                 seed: int = 0, **config) -> Path:
    """Save a PEFT LoRA adapter with random A and B (init_lora_weights=False) for `model`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                             init_lora_weights=False, **config)
    peft_model = get_peft_model(copy.deepcopy(model), peft_config)
    # PEFT's random init scales B small; widen it so adapters change the logits clearly.
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5 / max(1, parameter.shape[1]) ** 0.5)
    peft_model.save_pretrained(str(path))
    return Path(path)


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
