"""Every layer of a model that LoRA can target, by absolute name, with its shape and partition.

Kinds: linear layers (`nn.Linear`), embedding lookups (`nn.Embedding`), convolutions
(`nn.Conv1d/2d/3d`: LoRA is served on the non-overlapping patch embeddings among them, a linear on
each patch's `C * prod(kernel)` pixels, the layout of PEFT's flattened `lora_A`), and the bare
parameters of other modules, indexed by the parameter's own name (`module.parameter`), which PEFT's
`target_parameters` reach: a 2D parameter is one a module multiplies its input by (`x @ W`:
Gemma3's `mm_input_projection_weight`; kind `parameter`), a 3D one an expert weight `[experts, d1,
d2]` (`...experts.gate_up_proj`, used in `torch.bmm`; kind `experts`, its in/out following PEFT's
reading of the dimensions: `d2 -> d1`, or `d1 -> d2` where the owning module says
`is_transposed`). The dimension alone decides which (`parameter_kind`); parameters of any other
dimension are kept in `bare_parameters`, to explain a refusal. Each is indexed like a linear: an
embedding takes a one-hot token (`in_features` its number of embeddings, `out_features` its
embedding size, the layout of PEFT's `lora_embedding_A [r, num_embeddings]` and `lora_embedding_B
[embedding_dim, r]` too); a parameter `W [in, out]` of `x @ W` has `in_features = W.shape[0]`; an
expert weight is a linear per expert. So the adapter reader, the slot buffers and the serving plan
treat every kind alike.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .partitions import LANGUAGE_MODEL, PartitionMap, can_carry_lora

__all__ = ["LinearInfo", "LinearIndex", "LINEAR", "EMBEDDING", "PARAMETER", "CONV", "EXPERTS", "IMPLICIT_KINDS",
           "parameter_kind", "patch_embedding_refusal"]

LINEAR, EMBEDDING, PARAMETER, CONV, EXPERTS = "linear", "embedding", "parameter", "conv", "experts"
# The kinds served where nothing names targets (no adapter, no target_modules): a bare parameter
# (2D or 3D) is served only where named, since only its use in a graph says whether it is a matmul's.
IMPLICIT_KINDS = (LINEAR, EMBEDDING)
# Modules whose parameters are their layer's own (served, or refused, as that layer).
_LAYERS = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)


@dataclasses.dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int  # an embedding's number of embeddings (its vocabulary)
    out_features: int  # an embedding's embedding size
    bias: bool
    partition: str
    dtype: torch.dtype
    kind: str = LINEAR
    refusal: str | None = None  # why this layer cannot carry LoRA whatever its partition (a conv's geometry)
    num_experts: int = 0  # experts only
    in_dim: int = 0  # experts only: the weight's dimension (1 or 2) PEFT calls its input

    @property
    def can_carry_lora(self) -> bool:
        if self.refusal is not None:
            return False
        # An embedding's rows are token ids, an expert matmul's rows tokens laid out for the
        # experts: only the language model's token table owns those.
        if self.kind in (EMBEDDING, EXPERTS):
            return self.partition == LANGUAGE_MODEL
        return can_carry_lora(self.partition)


class LinearIndex:
    """The model's `nn.Linear`, `nn.Embedding` and convolution modules, the bare 2D and 3D parameters of its other
    modules and, to explain bad targets, every other module's type and every other bare
    parameter's shape (`bare_parameters`). `weights` maps each indexed target to its weight (a tied
    head and embedding share one tensor)."""

    def __init__(self, model: nn.Module, partition_map: PartitionMap):
        self.partition_map = partition_map
        self.linears: dict[str, LinearInfo] = {}
        self.module_types: dict[str, str] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.bare_parameters: dict[str, tuple[int, ...]] = {}
        # Only the input embeddings look up the requests' tokens: a learned position table (GPT-2's
        # `wpe`, OPT's offset positions) looks up ids shared by every request, or computed from
        # them, so its rows are no request's and the token table would hand them out wrongly.
        getter = getattr(model, "get_input_embeddings", None)
        try:
            input_embeddings = getter() if callable(getter) else None
        except (NotImplementedError, AttributeError):
            input_embeddings = None
        # Modules holding bare parameters: all their own parameters' names, in registration order
        # (PEFT nests one wrapper per targeted parameter in that order; its tensor names say the depth).
        self.parameters_of: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            self.module_types[name] = type(module).__name__
            if not isinstance(module, _LAYERS):
                self._index_parameters(name, module, partition_map)
            if isinstance(module, nn.Linear):
                self.linears[name] = LinearInfo(
                    name=name,
                    in_features=module.in_features,
                    out_features=module.out_features,
                    bias=module.bias is not None,
                    partition=partition_map.partition_of(name),
                    dtype=module.weight.dtype,
                )
                self.weights[name] = module.weight
            elif isinstance(module, nn.modules.conv._ConvNd):
                self.linears[name] = LinearInfo(
                    name=name,
                    in_features=module.in_channels * math.prod(module.kernel_size),
                    out_features=module.out_channels,
                    bias=module.bias is not None,
                    partition=partition_map.partition_of(name),
                    dtype=module.weight.dtype,
                    kind=CONV,
                    refusal=patch_embedding_refusal(module),
                )
                self.weights[name] = module.weight
            elif isinstance(module, nn.Embedding):
                self.linears[name] = LinearInfo(
                    name=name,
                    in_features=module.num_embeddings,
                    out_features=module.embedding_dim,
                    bias=False,
                    partition=partition_map.partition_of(name),
                    dtype=module.weight.dtype,
                    kind=EMBEDDING,
                    refusal=None if module is input_embeddings else (
                        "an embedding other than the model's input embeddings (get_input_embeddings()): its ids "
                        "are not the requests' tokens (a position table, say), so no request owns its rows"),
                )
                self.weights[name] = module.weight

    def _index_parameters(self, name: str, module: nn.Module, partition_map: PartitionMap) -> None:
        own = list(module.named_parameters(recurse=False))
        if own:
            self.parameters_of[name] = [attribute for attribute, _ in own]
        for parameter_name, parameter in own:
            full = f"{name}.{parameter_name}" if name else parameter_name
            kind = parameter_kind(parameter)
            if kind == PARAMETER:
                self.linears[full] = LinearInfo(
                    name=full,
                    in_features=parameter.shape[0],
                    out_features=parameter.shape[1],
                    bias=False,
                    partition=partition_map.partition_of(full),
                    dtype=parameter.dtype,
                    kind=PARAMETER,
                )
            elif kind == EXPERTS:
                experts, d1, d2 = parameter.shape
                # PEFT's ParamWrapper reads [experts, out, in] unless the module says `is_transposed`.
                in_dim = 1 if getattr(module, "is_transposed", False) else 2
                self.linears[full] = LinearInfo(
                    name=full, in_features=(d1, d2)[in_dim - 1], out_features=(d2, d1)[in_dim - 1], bias=False,
                    partition=partition_map.partition_of(full), dtype=parameter.dtype, kind=EXPERTS,
                    num_experts=experts, in_dim=in_dim)
            else:
                self.bare_parameters[full] = tuple(parameter.shape)
                continue
            self.weights[full] = parameter

    def __contains__(self, name: str) -> bool:
        return name in self.linears

    def __getitem__(self, name: str) -> LinearInfo:
        return self.linears[name]

    def __iter__(self):
        return iter(self.linears.values())

    def __len__(self) -> int:
        return len(self.linears)

    def in_partitions(self, partitions) -> list[LinearInfo]:
        """The targets of `partitions` that can carry LoRA."""
        return [info for info in self.linears.values() if info.partition in partitions and info.can_carry_lora]

    def of_kind(self, kind: str) -> dict[str, torch.Tensor]:
        """The weights of the indexed modules of one kind, by module."""
        return {name: self.weights[name] for name, info in self.linears.items() if info.kind == kind}


def parameter_kind(parameter: torch.Tensor) -> str | None:
    """The kind of LoRA target a bare parameter is (PEFT's `target_parameters`), from its dimension
    alone: 2D `x @ W` (`PARAMETER`), 3D expert weight (`EXPERTS`), or None (not served)."""
    return {2: PARAMETER, 3: EXPERTS}.get(parameter.dim())


def patch_embedding_refusal(conv: nn.Module) -> str | None:
    """Why the convolution `conv` is not a non-overlapping patch embedding (kernel == stride, no
    padding, dilation 1, one group, not transposed), or None if it is: only there is PEFT's conv
    LoRA a linear on each patch, which is what is served."""
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution"
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    problems = [
        f"kernel {tuple(conv.kernel_size)} != stride {tuple(conv.stride)}" if tuple(conv.kernel_size) != tuple(conv.stride)
        else None,
        f"padding {padding!r}" if padding not in ("valid", (0,) * len(conv.kernel_size)) else None,
        f"dilation {tuple(conv.dilation)}" if any(step != 1 for step in conv.dilation) else None,
        f"groups={conv.groups}" if conv.groups != 1 else None,
    ]
    problems = [problem for problem in problems if problem]
    if not problems:
        return None
    return (f"a {type(conv).__name__} that is not a non-overlapping patch embedding ({', '.join(problems)}); LoRA "
            "is served on convolutions whose kernel equals their stride, with no padding, dilation or groups")
