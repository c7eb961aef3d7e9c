"""Read PEFT LoRA adapters (`adapter_config.json` + `adapter_model.safetensors`) safely.

Reading validates everything before anything is kept: the files, the config, every tensor's
name, shape, rank and values, and that each targeted module is a linear or embedding layer of the
model that can carry LoRA, or a bare parameter PEFT's `target_parameters` picks (`parameter_targets`
says which: a 2D one used as `x @ W`, read into a linear's layout, or a 3D expert weight, split per
expert). Full copies of base weights (PEFT saves the embeddings and lm_head
an adapter targets) are accepted only where they equal the model's weights. Tensors are read with safetensors only; a pickle is never opened. Each module's
scaling (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA, after `rank_pattern` and
`alpha_pattern`) is folded into its B matrix once: by `read_adapter`, or, for `read_factors`'
factors (the file's tensors, validated, unconverted), by the caller (`fold_into`).

The weights file is read into one buffer, its tensors views of it, by two threads in parts
(`buffered_read`), while names and shapes are checked from its header and values part by part as
they are read: a load costs little more than reading the file where a core is free.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from .buffered_read import FileTensors, start_read
from .errors import (
    AdapterFileError,
    AdapterFormatError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterValueError,
    BaseWeightCopyError,
    UnsupportedAdapterError,
)
from .linear_index import CONV, EMBEDDING, EXPERTS, LINEAR, PARAMETER, LinearIndex
from .parameter_targets import as_linear_layout, parameter_target, peft_shapes, selected_parameter, split_wrappers
from .partitions import can_carry_lora
from .sharding import copy_equals_sharded, is_dtensor

__all__ = ["LoRAModule", "LoRAAdapter", "LoRAFactors", "AdapterFactors", "AdapterScan", "read_adapter",
           "read_factors", "fold_into", "read_adapter_config", "scan_adapter",
           "selected_by_config", "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# A linear's LoRA (`lora_A.weight`, an optional adapter name before `.weight`) and an
# embedding's (`lora_embedding_A`, a bare parameter: no `.weight`).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?:(?P<linear>lora_A|lora_B)(?:\.[^.]+)?\.weight"
                  r"|(?P<embedding>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?)$")
# A full copy of a base layer's weight: PEFT saves one for every embedding layer (input
# embeddings and lm_head) an adapter targets or `save_embedding_layers` names, wrapped
# (`<module>.base_layer.weight`) or not (`<module>.weight`).
_BASE_COPY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.weight$")
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora) is not served",
}
# Which role each tensor name plays, and the kind of layer it belongs on.
_ROLES = {"lora_A": ("lora_A", LINEAR), "lora_B": ("lora_B", LINEAR),
          "lora_embedding_A": ("lora_A", EMBEDDING), "lora_embedding_B": ("lora_B", EMBEDDING)}


# What reading a weights file can raise for a file that is corrupt or unreadable.
_FILE_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError)


@functools.lru_cache(maxsize=1 << 16)  # the same names in every adapter of a model
def _lora_key(key: str) -> tuple[str, str, str] | None:
    """(module, "lora_A" or "lora_B", kind of layer it belongs on) of a LoRA tensor name, or None."""
    match = _KEY.match(key)
    if match is None:
        return None
    role, kind = _ROLES[match.group("linear") or match.group("embedding")]
    # PEFT wraps a module whose parameter `target_parameters` picks, so the names of every layer
    # below it get `.base_layer` (`vision_model.base_layer.model...`): dropped. The trailing ones say
    # which of the module's wrapped parameters the pair adapts (`parameter_targets`): kept.
    owner, depth = split_wrappers(match.group("module"))
    return ".".join(part for part in owner.split(".") if part != "base_layer") + ".base_layer" * depth, role, kind


def _tensor_kind(kind: str) -> str:
    """Which tensor names a target of `kind` carries: an embedding's `lora_embedding_A/B`, every
    other kind's `lora_A/B`."""
    return EMBEDDING if kind == EMBEDDING else LINEAR


def _target_name(adapter: str, module: str, config: dict, linears: LinearIndex) -> str:
    """The indexed target PEFT's LoRA saved under `module` adapts: the module itself, or the
    parameter of it that `target_parameters` picks (PEFT saves that under the module's name,
    `.base_layer` once per later-wrapped parameter of the module): `parameter_targets` decides."""
    return parameter_target(adapter, module, config, linears) or module


def _conv_as_linear(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's conv LoRA (`lora_A [r, C, *kernel]`, `lora_B [out, r, 1, ...]`) as a linear's on each
    patch's flattened pixels (`[r, C * prod(kernel)]`, `[out, r]`); other shapes are left for the
    shape check to refuse."""
    if lora_a.dim() >= 3 and lora_b.dim() == lora_a.dim() and all(size == 1 for size in lora_b.shape[2:]):
        return lora_a.flatten(1), lora_b.flatten(1)
    return lora_a, lora_b


def _base_copy_module(key: str, linears: LinearIndex) -> str | None:
    """The module whose base weight `key` copies (one the model indexes), or None."""
    match = _BASE_COPY.match(key)
    if match is None or match.group("module") not in linears:
        return None
    return match.group("module")


@dataclasses.dataclass(frozen=True)
class LoRAModule:
    """One adapted layer: `delta(x) = x @ lora_a.T @ lora_b.T`, scaling already in `lora_b`.

    An embedding's is the same with `x` the one-hot token: `lora_a` is PEFT's `lora_embedding_A`
    `[rank, num_embeddings]`, `lora_b` its `lora_embedding_B` `[embedding_dim, rank]`, scaled."""

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
    if config.get("target_parameters") is not None and not isinstance(config["target_parameters"], list):
        raise AdapterFormatError(name, f"{CONFIG_FILE}: target_parameters must be a list of parameter names")
    # Python's JSON reads NaN and Infinity: a scaling made of them would turn every B it
    # multiplies into NaN, and a NaN B reaches other requests' rows through 0 * NaN.
    for key, values in (("r", [config.get("r", 8)]), ("lora_alpha", [config.get("lora_alpha", 8)]),
                        ("rank_pattern", _pattern_values(name, config, "rank_pattern")),
                        ("alpha_pattern", _pattern_values(name, config, "alpha_pattern"))):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AdapterFormatError(name, f"{CONFIG_FILE}: {key} must hold finite numbers, not {value!r}")
            if key in ("r", "rank_pattern") and value <= 0:
                raise AdapterFormatError(name, f"{CONFIG_FILE}: {key} must hold positive ranks, not {value!r}")
    return config


def _pattern_values(name: str, config: dict, key: str) -> list:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(name, f"{CONFIG_FILE}: {key} must map module names to numbers")
    return list(patterns.values())


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


# The float dtypes a file's tensors are read as views of one buffer in; a file holding any other
# dtype is read by safetensors tensor by tensor.
def _open_tensors(name: str, path: Path, pin: bool = False) -> FileTensors:
    """The tensors of the adapter's weights file, after safetensors validated it. A file of float
    tensors becomes views of one buffer (pinned with `pin`) that a background thread is reading
    the file into (`buffered_read`; `FileTensors.finish` waits for it): no allocation and copy per
    tensor, and the caller works while it reads. Another file is read by safetensors, tensor by
    tensor."""
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
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
        handle = open(weights, "rb", buffering=0)  # noqa: SIM115 (closed by the read, or below)
    except _FILE_ERRORS as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error
    try:
        # Outside the errors said to be the file's: pinned memory can run out.
        buffer = torch.empty(os.fstat(handle.fileno()).st_size, dtype=torch.uint8, pin_memory=pin)
        try:
            file = start_read(handle, buffer, keys)
        except _FILE_ERRORS as error:
            raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error
    except BaseException:
        handle.close()
        raise
    if file is None:
        # Another dtype, or a file that changed between safetensors' look and the read.
        handle.close()
        return _load_file(name, weights)
    return file


def _load_file(name: str, weights: Path) -> FileTensors:
    """The file read by safetensors, tensor by tensor (it raises on a file it finds corrupt now)."""
    from safetensors.torch import load_file

    try:
        return FileTensors(load_file(str(weights), device="cpu"))
    except _FILE_ERRORS as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error


class _ReadAgain(Exception):
    """The bytes read into the buffer are not the file safetensors validated (it changed while
    read): read it with safetensors instead."""


def _finish(name: str, file: FileTensors) -> None:
    """Wait for `file`'s read; `_ReadAgain` when the bytes read are not the file validated."""
    try:
        complete = file.finish()
    except _FILE_ERRORS as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error
    if not complete:
        raise _ReadAgain


def _value_bound(name: str, file: FileTensors) -> float | None:
    """The largest magnitude in the file, when one pass over its data region (as it is read)
    finds every value finite (base-weight copies included); None when unknown or some value is not
    finite (then each LoRA tensor is checked on its own, as before). Waits for the whole read."""
    try:
        bound = file.value_bound()
    except _FILE_ERRORS as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error
    _finish(name, file)
    return bound


def _read_tensors(name: str, path: Path, pin: bool = False) -> FileTensors:
    """`_open_tensors`, read to the end."""
    file = _open_tensors(name, path, pin)
    try:
        _finish(name, file)
    except _ReadAgain:
        return _load_file(name, path / WEIGHTS_FILE)
    finally:
        file.close()
    return file


def _group_by_module(name: str, tensors: dict[str, torch.Tensor], linears: LinearIndex,
                     config: dict) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The LoRA pairs by target (a module, or the parameter `target_parameters` picks), and the
    base-weight copies by module."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for marker, problem in _UNSUPPORTED_KEYS.items():
            if f".{marker}" in key:
                raise UnsupportedAdapterError(name, f"tensor {key!r}: {problem}")
        parsed = _lora_key(key)
        if parsed is None:
            module = _base_copy_module(key, linears)
            if module is None:
                raise AdapterFormatError(
                    name, f"tensor {key!r} is not a LoRA weight (expected base_model.model.<module>.lora_A.weight, "
                    "or lora_embedding_A on an embedding)"
                )
            copies[module] = tensor
            continue
        module, role, kind = parsed
        module = _target_name(name, module, config, linears)
        if module in linears and _tensor_kind(linears[module].kind) != kind:
            raise AdapterFormatError(
                name, f"tensor {key!r} is a {kind}'s LoRA weight, but the module is a {linears.module_types[module]}",
                module=module)
        if role in grouped.get(module, {}):
            raise AdapterFormatError(name, f"tensor {key!r} is a second {role} for this layer", module=module)
        grouped.setdefault(module, {})[role] = tensor
    for module, pair in grouped.items():
        if set(pair) != {"lora_A", "lora_B"}:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterFormatError(name, f"{missing} weight is missing", module=module)
    return grouped, copies


def _equal_in_chunks(copy: torch.Tensor, weight: torch.Tensor, chunk_bytes: int = 64 << 20) -> bool:
    """`copy` (host) equals `weight` (any device), compared a slab of rows at a time: a 150k-token
    vocabulary's full copy on the GPU would be a gigabyte of temporary, from a prefetch thread."""
    rows = max(1, chunk_bytes // max(1, weight[0].numel() * weight.element_size()))
    for start in range(0, weight.shape[0], rows):
        part = copy[start:start + rows].to(device=weight.device, dtype=weight.dtype)
        if not torch.equal(part, weight[start:start + rows]):
            return False
    return True


def _check_base_copies(name: str, copies: dict[str, torch.Tensor], linears: LinearIndex) -> None:
    """A copy of a base weight equal to the model's changes nothing; any other would replace the
    model's weight for this adapter only, which is not served."""
    for module, copy in sorted(copies.items()):
        weight = linears.weights[module]
        if tuple(copy.shape) != tuple(weight.shape):
            raise BaseWeightCopyError(
                name, f"the adapter carries a copy of this layer's base weight of shape {tuple(copy.shape)}, but the "
                f"model's is {tuple(weight.shape)} (was the vocabulary resized when the adapter was trained?); an "
                "adapter that replaces base weights is not served", module=module)
        if is_dtensor(weight):
            # This rank holds a slice: the copy is held to every rank's, alike everywhere (`sharding.py`).
            equal = copy_equals_sharded(copy, weight)
            if equal is None:
                raise BaseWeightCopyError(
                    name, "the adapter carries a copy of this layer's base weight, which is sharded across "
                    "processes and is not the model's output embeddings: it cannot be checked alike on every "
                    "rank, so it is not served", module=module)
        else:
            equal = _equal_in_chunks(copy, weight.detach())
        if not equal:
            raise BaseWeightCopyError(
                name, "the adapter carries a copy of this layer's base weight that differs from the model's (trained "
                "or resized embeddings, or another base model); an adapter that replaces base weights is not served",
                module=module)


def _check_targets(name: str, modules: list[str], linears: LinearIndex, config: dict) -> None:
    absent = [module for module in modules if module not in linears.module_types and module not in linears]
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise AdapterTargetError(
            name, f"targets {len(absent)} module(s) the model does not have: {shown}", module=absent[0]
        )
    if config.get("ensure_weight_tying") and any(module in linears and linears[module].kind == EMBEDDING
                                                 for module in modules):
        # PEFT then ties lm_head's LoRA to the embedding's (A and B swapped and transposed)
        # instead of reading the head's own tensors: a different adapter from the one saved.
        raise UnsupportedAdapterError(
            name, "ensure_weight_tying (LoRA tied between the input embeddings and lm_head) is not served; "
            "save the adapter with ensure_weight_tying=False (separate embedding and head LoRA)")
    for module in modules:
        if module not in linears:
            kind = linears.module_types[module]
            raise UnsupportedAdapterError(
                name, f"is a {kind}, not a Linear or an Embedding; only LoRA on those, on patch-embedding "
                "convolutions and on 2D (x @ W) and 3D (expert) parameters named by target_parameters is served", module=module)
        info = linears[module]
        if info.refusal is not None:
            raise UnsupportedAdapterError(name, f"is {info.refusal}", module=module)
        if not info.can_carry_lora:
            where = ("outside the language model (its rows are not the language model's tokens)"
                     if info.kind in (EMBEDDING, EXPERTS) and can_carry_lora(info.partition) else
                     "in no partition that carries LoRA (override it with partition_overrides)")
            raise UnsupportedAdapterError(
                name, f"is a {info.kind} in partition '{info.partition}', {where}; LoRA there is not served",
                module=module)
        selected = (selected_parameter(config, module) if info.kind in (PARAMETER, EXPERTS)
                    else selected_by_config(config, module))
        if not selected:
            raise AdapterFormatError(
                name, "has weights, but the config's target_modules/layers_to_transform do not select it",
                module=module,
            )


@dataclasses.dataclass(frozen=True)
class LoRAFactors:
    """One adapted layer's factors as the file holds them (its dtype, not scaled; views of the
    file's tensors in the layer's layout: `lora_a [..., rank, in]`, `lora_b [..., out, rank]`),
    validated, with the scaling still to fold into `lora_b`."""

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    scaling: float


@dataclasses.dataclass
class AdapterFactors:
    """A validated adapter before conversion: its factors by module and, when its file was read
    into one buffer, that buffer (every factor is a view of it) and the bytes of its tensors."""

    name: str
    path: Path
    config: dict
    modules: dict[str, LoRAFactors]
    buffer: torch.Tensor | None
    tensor_bytes: int


def _fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scaling is folded in for matrices of `dtype`: float64 for float32 and float64
    (one rounding); for half-precision ones float32 is enough (its product rounds to the same 8 or
    11 bits but in rare ties) and it keeps a big adapter's load close to the time of reading its file."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def fold_into(out: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
    """`out = (lora_b in the fold dtype * scaling)` rounded to `out`'s dtype: `read_adapter`'s B,
    written into `out` (a slot-layout view, or `lora_b` itself) without temporaries where the
    product in float32 is the fold: `torch.mul` computes half-precision products in float32 and
    rounds each once, as the float32 temporary did."""
    fold = _fold_dtype(out.dtype)
    if fold == torch.float32 and lora_b.dtype in (out.dtype, torch.float32):
        torch.mul(lora_b, scaling, out=out)
    else:
        out.copy_(lora_b.to(fold) * scaling)


def _folded(lora_b: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    return (lora_b.to(_fold_dtype(dtype)) * scaling).to(dtype).contiguous()


def _check_finite(name: str, module: str, tensors, message: str = "holds NaN or infinite values") -> None:
    for kind, tensor in tensors:
        # min and max are NaN when any value is, and infinite when one is: one pass, no temporary.
        low, high = torch.aminmax(tensor)
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            raise AdapterValueError(name, f"{kind} {message}", module=module)


def read_factors(name: str, path, linears: LinearIndex, max_rank: int | None = None,
                 dtype: torch.dtype | None = None, pin: bool = False) -> AdapterFactors:
    """Read and validate the adapter at `path` for the model `linears` describes, without
    converting: each module's factors as views of the file's tensors, the scaling not yet folded
    (`read_adapter` converts them). `dtype` is the dtype they will be converted to (float32 when
    None): factors that would not be finite in it, after the cast and the scaling, are refused
    here (`AdapterValueError`, "overflows <dtype>"). `pin` reads the file into pinned memory.

    Values are checked in one pass over the file's data region where it has one float dtype (its
    largest magnitude also bounds what the conversion can reach), part by part as the file is
    read, while names and shapes are checked from its header; only where that pass finds a value
    that is not finite, or cannot rule out an overflow, is each tensor checked on its own.
    """
    path = Path(path)
    config = read_adapter_config(name, path)
    file = _open_tensors(name, path, pin)
    try:
        return _factors(name, path, config, file, linears, max_rank, dtype)
    except _ReadAgain:
        file.close()
        # The file changed while read: as before the one-buffer read, safetensors reads it again.
        return _factors(name, path, config, _load_file(name, path / WEIGHTS_FILE), linears, max_rank, dtype)
    finally:
        file.close()  # on an error, no thread writes the buffer once it is raised


def _factors(name: str, path: Path, config: dict, file: FileTensors, linears: LinearIndex, max_rank: int | None,
             dtype: torch.dtype | None) -> AdapterFactors:
    """`read_factors` of the file's tensors, which may still be being read (`FileTensors.read`):
    what needs only the header runs first, meanwhile; errors are raised in the order of a check
    after the read (module by module: shapes and ranks, then values)."""
    grouped, copies = _group_by_module(name, file.tensors, linears, config)
    if not grouped:
        raise AdapterFormatError(name, f"{WEIGHTS_FILE} holds no LoRA weights")
    _check_targets(name, sorted(grouped), linears, config)
    default_rank = int(config.get("r", 8))
    default_alpha = float(config.get("lora_alpha", 8))
    prepared: list[LoRAFactors | Exception] = []
    for module in sorted(grouped):
        try:
            prepared.append(_module_factors(name, module, grouped[module], linears[module], config, max_rank,
                                            default_rank, default_alpha))
        except Exception as error:  # noqa: BLE001 (raised below, after the checks of the modules before it)
            prepared.append(error)
            break
    if copies:
        _finish(name, file)  # their values are compared
        _check_base_copies(name, copies, linears)
    bound = _value_bound(name, file)
    out_dtype = dtype or torch.float32
    # Below this, neither rounding to `out_dtype` nor folding a scaling of at most 1 (or `bound`'s
    # margin) can reach infinity.
    limit = torch.finfo(out_dtype).max / 2
    modules: dict[str, LoRAFactors] = {}
    for factors in prepared:
        if isinstance(factors, Exception):
            raise factors
        module, lora_a, lora_b, scaling = factors.module, factors.lora_a, factors.lora_b, factors.scaling
        if bound is None:
            _check_finite(name, module, (("lora_A", lora_a), ("lora_B", lora_b)))
        # Written so that a NaN product (an infinite scaling times an all-zero file) also checks.
        if bound is None or not bound * max(1.0, abs(scaling)) < limit:
            # Finite in the file, infinite after the cast or the scaling (float16 ends at 65504):
            # an infinite B times a zero row is NaN, so it would spoil other requests' rows too.
            converted = (("lora_A", lora_a.to(out_dtype)),
                         (f"lora_B times its scaling {scaling:g}", _folded(lora_b, scaling, out_dtype)))
            _check_finite(name, module, converted,
                          message=f"overflows {str(out_dtype).removeprefix('torch.')}, the model's dtype")
        modules[module] = factors
    return AdapterFactors(name=name, path=path, config=config, modules=modules, buffer=file.buffer,
                          tensor_bytes=sum(tensor.nbytes for tensor in file.tensors.values()))


def _module_factors(name: str, module: str, pair: dict[str, torch.Tensor], info, config: dict,
                    max_rank: int | None, default_rank: int, default_alpha: float) -> LoRAFactors:
    """One module's factors in its layer's layout, their shapes and rank checked (not their values)."""
    lora_a, lora_b = pair["lora_A"], pair["lora_B"]
    peft_a, peft_b = lora_a, lora_b
    if info.kind == CONV:
        lora_a, lora_b = _conv_as_linear(lora_a, lora_b)
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise AdapterShapeError(name, f"lora_A {tuple(peft_a.shape)} and lora_B {tuple(peft_b.shape)} "
                                      "must be matrices" + (" (a conv's: [r, C, *kernel] and [out, r, 1, ...])"
                                                            if info.kind == CONV else ""), module=module)
    if info.kind == PARAMETER:
        lora_a, lora_b = as_linear_layout(lora_a, lora_b)
    if info.kind == EXPERTS:  # shapes checked per expert there: [experts, r, in] and [experts, out, r]
        lora_a, lora_b = _per_expert(name, module, lora_a, lora_b, info)
    rank = lora_a.shape[-2]
    if info.kind != EXPERTS and (lora_a.shape[1] != info.in_features or lora_b.shape[0] != info.out_features
                                 or lora_b.shape[1] != rank):
        names = ("lora_embedding_A", "lora_embedding_B") if info.kind == EMBEDDING else ("lora_A", "lora_B")
        layer = (f"an embedding of {info.in_features} tokens of size {info.out_features}" if info.kind == EMBEDDING
                 else "the parameter used as x @ W" if info.kind == PARAMETER
                 else f"a patch embedding of {info.in_features} pixels per patch -> {info.out_features} channels "
                      "(lora_A flattened to [r, C * prod(kernel)])" if info.kind == CONV
                 else f"a linear of {info.in_features} -> {info.out_features}")
        expected = (peft_shapes(info.in_features, info.out_features) if info.kind == PARAMETER
                    else f"[r, {info.in_features}] and [{info.out_features}, r]")
        raise AdapterShapeError(
            name,
            f"{names[0]} {tuple(peft_a.shape)} and {names[1]} {tuple(peft_b.shape)} do not fit {layer} "
            f"(expected {expected})",
            module=module,
        )
    configured_rank = int(_pattern_value(config.get("rank_pattern"), module, default_rank))
    if rank != configured_rank:
        raise AdapterFormatError(name, f"weights have rank {rank} but the config says r={configured_rank}",
                                 module=module)
    if max_rank is not None and rank > max_rank:
        raise AdapterRankError(name, f"rank {rank} is above max_lora_rank={max_rank}", module=module)
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, default_alpha))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoRAFactors(module=module, lora_a=lora_a, lora_b=lora_b, rank=rank, scaling=scaling)


def read_adapter(name: str, path, linears: LinearIndex, max_rank: int | None = None,
                 dtype: torch.dtype | None = None) -> LoRAAdapter:
    """Read and validate the adapter at `path` for the model `linears` describes.

    Raises an `AdapterError` subclass naming the adapter, the module and the problem. `dtype`
    is the dtype of the returned matrices (float32 when None); each module's scaling is folded
    into its B (in float64 for float32 and float64 matrices, float32 for half-precision ones).
    """
    out_dtype = dtype or torch.float32
    factors = read_factors(name, path, linears, max_rank=max_rank, dtype=out_dtype)
    # A views the file's buffer where it can: copied only when the buffer holds more than the
    # factors (base-weight copies), which a view would keep alive.
    copy = factors.tensor_bytes > sum(f.lora_a.nbytes + f.lora_b.nbytes for f in factors.modules.values())
    modules = {}
    for module, factor in factors.modules.items():
        lora_b = torch.empty(factor.lora_b.shape, dtype=out_dtype)
        fold_into(lora_b, factor.lora_b, factor.scaling)
        modules[module] = LoRAModule(module=module, lora_a=factor.lora_a.to(out_dtype, copy=copy).contiguous(),
                                     lora_b=lora_b, rank=factor.rank, scaling=factor.scaling)
    return LoRAAdapter(name=name, path=factors.path, config=factors.config, modules=modules)


def _per_expert(name: str, module: str, lora_a: torch.Tensor, lora_b: torch.Tensor, info):
    """PEFT's `ParamWrapper` factors of a 3D weight, split per expert: `lora_A [r * experts, in]`
    holds expert `e`'s A in rows `e*r ... e*r + r - 1`; `lora_B [out, r * experts]` interleaves the
    experts (expert `e`'s column `j` is column `j * experts + e`). Returns `[experts, r, in]` and
    `[experts, out, r]`."""
    experts = info.num_experts
    expected = f"[r * {experts}, {info.in_features}] and [{info.out_features}, r * {experts}]"
    if (lora_a.shape[0] % experts or lora_a.shape[1] != info.in_features or lora_b.shape[0] != info.out_features
            or lora_b.shape[1] != lora_a.shape[0] or lora_a.shape[0] == 0):
        raise AdapterShapeError(
            name, f"lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} do not fit a 3D expert weight of "
            f"{experts} experts mapping {info.in_features} -> {info.out_features} (expected {expected})", module=module)
    rank = lora_a.shape[0] // experts
    return (lora_a.reshape(experts, rank, info.in_features),
            lora_b.reshape(info.out_features, rank, experts).permute(2, 0, 1))


@dataclasses.dataclass
class AdapterScan:
    """What an adapter's tensor names target, without loading its weights."""

    name: str
    path: Path
    config: dict
    modules: dict[str, int]  # module -> rank, for modules the model has as linears or embeddings
    unmatched: list[str]  # tensor names whose module is not a linear or an embedding of the model


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
                parsed = _lora_key(key)
                if parsed is None and _base_copy_module(key, linears) is not None:
                    continue  # a copy of a base weight: checked when the adapter is read
                target = _target_name(name, parsed[0], config, linears) if parsed is not None else None
                if target not in linears:
                    unmatched.append(key)
                elif parsed[1] == "lora_A":
                    rows = int(handle.get_slice(key).get_shape()[0])
                    # An expert weight's lora_A stacks every expert's A: its rank is a share of the rows.
                    modules[target] = (rows // linears[target].num_experts if linears[target].kind == EXPERTS
                                       else rows)
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(name, f"{WEIGHTS_FILE} is corrupt or unreadable: {error}") from error
    return AdapterScan(name, path, config, dict(sorted(modules.items())), sorted(unmatched))
