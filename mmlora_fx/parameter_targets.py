"""PEFT's LoRA on bare parameters (`target_parameters`): which parameter a saved LoRA pair adapts,
and its layout. The one reader of `target_parameters`; the parameter's kind is the index's
(`linear_index.parameter_kind`: a 2D parameter is a matmul `x @ W`, a 3D one an expert weight).

PEFT wraps each targeted parameter in a `ParamWrapper` and saves its LoRA under the name of the
module holding the parameter (`<module>.lora_A.weight`): the parameter's own name is only in the
config's `target_parameters` (a name matches when `<module>.<parameter>` equals it or ends with
`.<it>`). Several targeted parameters of one module nest one wrapper each, in the module's
registration order (PEFT wraps them as it meets them): the last one's tensors sit on the module
itself, each earlier one's one `.base_layer` deeper (`<module>.base_layer.lora_A.weight`). The
layers below a wrapped module get `.base_layer` inside their names too
(`vision_model.base_layer.model...`); `peft_format` drops those and leaves the trailing ones,
which say the depth, for `parameter_target`.

A 2D parameter `W`: PEFT's `lora_A` is `[r, W.shape[1]]`, its `lora_B` `[W.shape[0], r]`, and the
forward uses `W + scaling * lora_B @ lora_A` (a parametrization). A module that multiplies by `W`
computes `x @ W` (Gemma3's projector), so its LoRA delta is `scaling * x @ lora_B @ lora_A`: a
linear's LoRA (`x @ a.T @ b.T`) with `a = lora_B.T` and `b = lora_A.T`. `as_linear_layout` makes
that swap once, when the adapter is read; the slot buffers and the kernels then serve the
parameter as they serve a linear of `W.shape[0] -> W.shape[1]`.

A 3D expert weight `[experts, d1, d2]`: `lora_A [r * experts, in]` and `lora_B [out, r * experts]`,
split per expert by `peft_format` (see `linear_index` for PEFT's in/out).
"""

from __future__ import annotations

import torch

from .errors import AdapterFormatError, UnsupportedAdapterError
from .linear_index import LinearIndex

__all__ = ["selected_parameter", "parameter_target", "split_wrappers", "as_linear_layout", "peft_shapes"]

_WRAPPER = ".base_layer"


def _names(config: dict) -> list[str]:
    names = config.get("target_parameters") or []
    return [names] if isinstance(names, str) else list(names)


def selected_parameter(config: dict, name: str) -> bool:
    """Whether PEFT's `target_parameters` pick the parameter `name` (`module.parameter`)."""
    return any(name == key or name.endswith(f".{key}") for key in _names(config))


def split_wrappers(module: str) -> tuple[str, int]:
    """`owner(.base_layer)*` -> (owner, how many `.base_layer` end it)."""
    depth = 0
    while module.endswith(_WRAPPER):
        module, depth = module[: -len(_WRAPPER)], depth + 1
    return module, depth


def parameter_target(adapter: str, module: str, config: dict, linears: LinearIndex) -> str | None:
    """The parameter (`owner.parameter`) a LoRA pair saved under `module` (`owner(.base_layer)*`)
    adapts, or None where it is no parameter's (a layer's own LoRA, or a module no
    `target_parameters` entry reaches). Refuses, naming why, a pair nested deeper than the config
    selects parameters of its module (`AdapterFormatError`) and a parameter that is neither 2D nor
    3D (`UnsupportedAdapterError`)."""
    owner, depth = split_wrappers(module)
    if (depth == 0 and owner in linears) or owner not in linears.parameters_of or not _names(config):
        return None
    selected = [parameter for parameter in linears.parameters_of[owner]
                if selected_parameter(config, f"{owner}.{parameter}")]
    if depth == 0 and not selected:
        return None
    if depth >= len(selected):
        raise AdapterFormatError(
            adapter, f"LoRA weights {depth} wrapper(s) deep, but the config's target_parameters select "
            f"{len(selected)} parameter(s) of this module ({selected}): which parameter they adapt cannot be told",
            module=owner)
    name = f"{owner}.{selected[len(selected) - 1 - depth]}"
    if name not in linears:
        shape = linears.bare_parameters[name]
        raise UnsupportedAdapterError(
            adapter, f"target_parameters picks {name} of shape {shape}, a {len(shape)}D parameter; only 2D parameters "
            "used as `x @ W` and 3D expert weights [experts, d1, d2] are served", module=owner)
    return name


def as_linear_layout(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A, lora_B) of a parameter used as `x @ W`, as a linear's (A, B): swapped and
    transposed (see the module's doc)."""
    return lora_b.T, lora_a.T


def peft_shapes(in_features: int, out_features: int) -> str:
    """The shapes PEFT gives a parameter `W [in_features, out_features]`'s LoRA, for errors."""
    return f"lora_A [r, {out_features}] and lora_B [{in_features}, r] (W is [{in_features}, {out_features}])"
