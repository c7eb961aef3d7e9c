"""Read PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) safely.

Reading validates everything before anything is kept: the files, the config, every tensor's
name, shape, rank and values, and that each targeted module is a linear layer of the model that
can carry LoRA. Tensors are read with safetensors only; a pickle is never opened. Each module's
scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA, after `rank_pattern` and
`alpha_pattern`) is folded into its B matrix once, here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from .errors import (
    AdapterFileError,
    AdapterFormatError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterValueError,
    UnsupportedAdapterError,
)
from .linear_index import LinearIndex
from .partitions import can_carry_lora

__all__ = ["LoRAModule", "LoRAAdapter", "AdapterScan", "read_adapter", "read_adapter_config", "scan_adapter",
           "selected_by_config", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_embedding_A": "LoRA on embedding layers is not served",
    "lora_embedding_B": "LoRA on embedding layers is not served",
    "lora_magnitude_vector": "DoRA (use_dora) is not served",
}


@dataclasses.dataclass(frozen=True)
class LoRAModule:
    """One adapted linear: `delta(x) = x @ lora_a.T @ lora_b.T`, scaling already in `lora_b`."""

    module: str
    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank], scaled
    rank: int
    scaling: float


@dataclasses.dataclass
class LoRAAdapter:
    name: str
    path: Path
    config: dict
    modules: dict[str, LoRAModule]

    @property
    def max_rank(self) -> int:
        return max((module.rank for module in self.modules.values()), default=0)

    def nbytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules.values())


def read_adapter_config(name: str, path: Path) -> dict:
    """The adapter's config, after checking it describes a LoRA adapter mmlora_fx can serve."""
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(name, f"directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise AdapterFileError(name, f"{str(path)!r} is not a directory (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFileError(name, f"{CONFIG_FILE} is missing from {str(path)!r}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise AdapterFileError(name, f"cannot read {config_path}: {error}") from error
    except json.JSONDecodeError as error:
        raise AdapterFormatError(name, f"{CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(name, f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(name, f"peft_type {peft_type} is not served (only LORA)")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(name, "DoRA (use_dora) is not served")
    if config.get("modules_to_save"):
        raise UnsupportedAdapterError(
            name, f"modules_to_save {config['modules_to_save']} is not served (it replaces whole modules per adapter)"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise UnsupportedAdapterError(name, "trained biases (bias != 'none' or lora_bias) are not served")
    if config.get("target_parameters"):
        raise UnsupportedAdapterError(name, "target_parameters (LoRA on bare parameters) is not served")
    for key in ("r", "lora_alpha"):
        if key in config and not isinstance(config[key], (int, float)):
            raise AdapterFormatError(name, f"{CONFIG_FILE}: {key} must be a number, not {config[key]!r}")
    if int(config.get("r", 8)) <= 0:
        raise AdapterFormatError(name, f"{CONFIG_FILE}: r must be positive, not {config.get('r')}")
    return config


def _pattern_value(patterns: dict, module: str, default):
    # PEFT's rule: a pattern key matches a module whose name ends with it (as a regex).
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def selected_by_config(config: dict, module: str) -> bool:
    """Whether PEFT's target selection (`target_modules`, `layers_to_transform`, ...) picks `module`."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, module):
                return False
        elif module in exclude or any(module.endswith(f".{key}") for key in exclude):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{target}") for target in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            raise AdapterFileError(
                name,
                f"{str(path)!r} holds only {PICKLE_FILE}, a pickle, which mmlora_fx never opens because "
                f"unpickling runs arbitrary code; save the adapter with safetensors "
                f"(save_pretrained(..., safe_serialization=True)) to get {WEIGHTS_FILE}",
            )
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is missing from {str(path)!r}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error


def _group_by_module(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for marker, problem in _UNSUPPORTED_KEYS.items():
            if f".{marker}" in key:
                raise UnsupportedAdapterError(name, f"tensor {key!r}: {problem}")
        if key.endswith(".base_layer.weight"):
            raise UnsupportedAdapterError(
                name, f"tensor {key!r} replaces a base layer's weight (PEFT saves those when LoRA targets "
                "lm_head or embeddings); LoRA there is not served")
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(
                name, f"tensor {key!r} is not a LoRA weight (expected base_model.model.<module>.lora_A.weight)"
            )
        grouped.setdefault(match.group("module"), {})[match.group("kind")] = tensor
    for module, pair in grouped.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterFormatError(name, f"{missing} weight is missing", module=module)
    return grouped


def _check_targets(name: str, modules: list[str], linears: LinearIndex, config: dict) -> None:
    absent = [module for module in modules if module not in linears.module_types]
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise AdapterTargetError(
            name, f"targets {len(absent)} module(s) the model does not have: {shown}", module=absent[0]
        )
    for module in modules:
        if module not in linears:
            kind = linears.module_types[module]
            raise UnsupportedAdapterError(name, f"is a {kind}, not a Linear; only LoRA on linear layers is served",
                                          module=module)
        partition = linears[module].partition
        if not can_carry_lora(partition):
            raise UnsupportedAdapterError(
                name, f"is in partition '{partition}' (lm_head, embeddings); LoRA there is not served", module=module
            )
        if not selected_by_config(config, module):
            raise AdapterFormatError(
                name, "has weights, but the config's target_modules/layers_to_transform do not select it",
                module=module,
            )


def read_adapter(name: str, path, linears: LinearIndex, max_rank: int | None = None,
                 dtype: torch.dtype | None = None) -> LoRAAdapter:
    """Read and validate the adapter at `path` for the model `linears` describes.

    Raises an `AdapterError` subclass naming the adapter, the module and the problem. `dtype`
    is the dtype of the returned matrices (float32 when None).
    """
    path = Path(path)
    config = read_adapter_config(name, path)
    grouped = _group_by_module(name, _read_tensors(name, path))
    if not grouped:
        raise AdapterFormatError(name, f"{WEIGHTS_FILE} holds no LoRA weights")
    _check_targets(name, sorted(grouped), linears, config)

    default_rank = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", 8))
    modules: dict[str, LoRAModule] = {}
    for module in sorted(grouped):
        lora_a, lora_b = grouped[module]["lora_A"], grouped[module]["lora_B"]
        info = linears[module]
        if lora_a.dim() != 2 or lora_b.dim() != 2:
            raise AdapterShapeError(name, f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} "
                                          "must be matrices", module=module)
        rank = lora_a.shape[0]
        if lora_a.shape[1] != info.in_features or lora_b.shape[0] != info.out_features or lora_b.shape[1] != rank:
            raise AdapterShapeError(
                name,
                f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit a linear of "
                f"{info.in_features} -> {info.out_features} (expected [r, {info.in_features}] and "
                f"[{info.out_features}, r])",
                module=module,
            )
        configured_rank = int(_pattern_value(config.get("rank_pattern"), module, default_rank))
        if rank != configured_rank:
            raise AdapterFormatError(name, f"weights have rank {rank} but the config says r={configured_rank}",
                                     module=module)
        if max_rank is not None and rank > max_rank:
            raise AdapterRankError(name, f"rank {rank} is above max_lora_rank={max_rank}", module=module)
        for kind, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
            # min and max are NaN when any value is, and infinite when one is: one pass, no
            # temporary (isfinite().all() is 25x slower on bf16 on a CPU: most of a load).
            low, high = torch.aminmax(tensor)
            if not (math.isfinite(low.item()) and math.isfinite(high.item())):
                raise AdapterValueError(name, f"{kind} holds NaN or infinite values", module=module)
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, default_alpha))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        out_dtype = dtype or torch.float32
        # The scaling is folded in float64 for float32 and float64 matrices (one rounding); for
        # half-precision ones float32 is enough (its product rounds to the same 8 or 11 bits but
        # in rare ties) and it keeps a big adapter's load close to the time of reading its file.
        fold = torch.float64 if out_dtype in (torch.float32, torch.float64) else torch.float32
        modules[module] = LoRAModule(
            module=module,
            lora_a=lora_a.to(out_dtype).contiguous(),
            lora_b=(lora_b.to(fold) * scaling).to(out_dtype).contiguous(),
            rank=rank,
            scaling=scaling,
        )
    return LoRAAdapter(name=name, path=path, config=config, modules=modules)


@dataclasses.dataclass
class AdapterScan:
    """What an adapter's tensor names target, without loading its weights."""

    name: str
    path: Path
    config: dict
    modules: dict[str, int]  # module -> rank, for modules the model has as linears
    unmatched: list[str]  # tensor names whose module is not a linear of the model


def scan_adapter(name: str, path, linears: LinearIndex) -> AdapterScan:
    """Map an adapter's tensors to the model's linears by name; names that match none are listed."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config = read_adapter_config(name, path)
    if not (path / WEIGHTS_FILE).is_file():
        _read_tensors(name, path)  # raises the right error
    modules, unmatched = {}, []
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as handle:
            for key in handle.keys():
                match = _KEY.match(key)
                if match is None or match.group("module") not in linears:
                    unmatched.append(key)
                elif match.group("kind") == "lora_A":
                    modules[match.group("module")] = int(handle.get_slice(key).get_shape()[0])
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error
    return AdapterScan(name, path, config, dict(sorted(modules.items())), sorted(unmatched))
