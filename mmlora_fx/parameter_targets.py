"""PEFT's LoRA on bare parameters (`target_parameters`), read into the layout of a linear's LoRA.

PEFT wraps each targeted parameter in a `ParamWrapper` and saves its LoRA under the name of the
module holding the parameter (`<module>.lora_A.weight`): the parameter's own name is only in the
config's `target_parameters` (a name matches when `<module>.<parameter>` equals it or ends with
`.<it>`). For a 2D parameter `W`, PEFT's `lora_A` is `[r, W.shape[1]]`, its `lora_B`
`[W.shape[0], r]`, and the forward uses `W + scaling * lora_B @ lora_A` (a parametrization).

A module that multiplies by `W` computes `x @ W` (Gemma3's projector), so its LoRA delta is
`scaling * x @ lora_B @ lora_A`: a linear's LoRA (`x @ a.T @ b.T`) with `a = lora_B.T` and `b =
lora_A.T`. `as_linear_layout` makes that swap once, when the adapter is read; the slot buffers and
the kernels then serve the parameter as they serve a linear of `W.shape[0] -> W.shape[1]`.
"""

from __future__ import annotations

import torch

from .errors import UnsupportedAdapterError
from .linear_index import LinearIndex

__all__ = ["selected_parameter", "parameter_target", "as_linear_layout", "peft_shapes"]


def _names(config: dict) -> list[str]:
    names = config.get("target_parameters") or []
    return [names] if isinstance(names, str) else list(names)


def selected_parameter(config: dict, name: str) -> bool:
    """Whether PEFT's `target_parameters` pick the parameter `name` (`module.parameter`)."""
    return any(name == key or name.endswith(f".{key}") for key in _names(config))


def parameter_target(adapter: str, module: str, config: dict, linears: LinearIndex) -> str | None:
    """The parameter PEFT's LoRA saved under `module` adapts (its `module.parameter` name), or None
    where the config targets no parameter of `module`. Refuses what is not served, naming why."""
    chosen = sorted(name for name in list(linears.linears) + list(linears.bare_parameters)
                    if name.rpartition(".")[0] == module and selected_parameter(config, name))
    if not chosen:
        return None
    if len(chosen) > 1:
        # PEFT nests one wrapper per parameter (`module.base_layer.lora_A`...): which LoRA is whose
        # follows its matching order, which is not read here.
        raise UnsupportedAdapterError(adapter, f"target_parameters picks {len(chosen)} parameters of one module "
                                      f"({', '.join(chosen)}); LoRA on more than one parameter of a module is not "
                                      "served", module=module)
    name = chosen[0]
    if name in linears.bare_parameters:
        shape = linears.bare_parameters[name]
        why = ("a 3D (expert) parameter: LoRA on expert weights is #17's and refused until it is served"
               if len(shape) == 3 else f"a {len(shape)}D parameter; only 2D parameters used as `x @ W` are served")
        raise UnsupportedAdapterError(adapter, f"target_parameters picks {name} of shape {shape}, {why}", module=module)
    return name


def as_linear_layout(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A, lora_B) of a parameter used as `x @ W`, as a linear's (A, B): swapped and
    transposed (see the module's doc)."""
    return lora_b.T, lora_a.T


def peft_shapes(in_features: int, out_features: int) -> str:
    """The shapes PEFT gives a parameter `W [in_features, out_features]`'s LoRA, for errors."""
    return f"lora_A [r, {out_features}] and lora_B [{in_features}, r] (W is [{in_features}, {out_features}])"

