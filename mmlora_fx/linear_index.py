"""Every layer of a model that LoRA can target, by absolute name, with its shape and partition.

Three kinds: linear layers (`nn.Linear`), embedding lookups (`nn.Embedding`) and 3D expert
weights (any 3D parameter `[experts, d1, d2]`, by its parameter name `...experts.gate_up_proj`:
PEFT's `target_parameters`; its in/out follow PEFT's reading of the dimensions: `d2 -> d1`,
or `d1 -> d2` where the owning module says `is_transposed`). An embedding is
indexed like a linear taking a one-hot token: `in_features` is its number of embeddings,
`out_features` its embedding size, which is the layout of PEFT's `lora_embedding_A [r,
num_embeddings]` and `lora_embedding_B [embedding_dim, r]` too, so the adapter reader, the slot
buffers and the serving plan treat both kinds alike.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .partitions import LANGUAGE_MODEL, PartitionMap, can_carry_lora

__all__ = ["LinearInfo", "LinearIndex", "LINEAR", "EMBEDDING", "EXPERTS"]

LINEAR, EMBEDDING, EXPERTS = "linear", "embedding", "experts"


@dataclasses.dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int  # an embedding's number of embeddings (its vocabulary)
    out_features: int  # an embedding's embedding size
    bias: bool
    partition: str
    dtype: torch.dtype
    kind: str = LINEAR
    num_experts: int = 0  # experts only
    in_dim: int = 0  # experts only: the weight's dimension (1 or 2) PEFT calls its input

    @property
    def can_carry_lora(self) -> bool:
        # An embedding's rows are token ids, an expert matmul's rows tokens laid out for the
        # experts: only the language model's token table owns those.
        if self.kind in (EMBEDDING, EXPERTS):
            return self.partition == LANGUAGE_MODEL
        return can_carry_lora(self.partition)


class LinearIndex:
    """The model's `nn.Linear` and `nn.Embedding` modules and, to explain bad targets, every other
    module's type. `weights` maps each indexed module to its weight (a tied head and embedding
    share one tensor)."""

    def __init__(self, model: nn.Module, partition_map: PartitionMap):
        self.partition_map = partition_map
        self.linears: dict[str, LinearInfo] = {}
        self.module_types: dict[str, str] = {}
        self.weights: dict[str, torch.Tensor] = {}
        # Modules holding 3D parameters: all their own parameters' names, in registration order
        # (PEFT nests one wrapper per targeted parameter in that order; its tensor names say the depth).
        self.parameters_of: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            self.module_types[name] = type(module).__name__
            own = list(module.named_parameters(recurse=False))
            if any(parameter.dim() == 3 for _, parameter in own):
                self.parameters_of[name] = [attribute for attribute, _ in own]
            for attribute, parameter in own:
                if parameter.dim() != 3:
                    continue
                full = f"{name}.{attribute}" if name else attribute
                experts, d1, d2 = parameter.shape
                # PEFT's ParamWrapper reads [experts, out, in] unless the module says `is_transposed`.
                in_dim = 1 if getattr(module, "is_transposed", False) else 2
                self.linears[full] = LinearInfo(
                    name=full, in_features=(d1, d2)[in_dim - 1], out_features=(d2, d1)[in_dim - 1], bias=False,
                    partition=partition_map.partition_of(name), dtype=parameter.dtype, kind=EXPERTS,
                    num_experts=experts, in_dim=in_dim)
                self.weights[full] = parameter
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
            elif isinstance(module, nn.Embedding):
                self.linears[name] = LinearInfo(
                    name=name,
                    in_features=module.num_embeddings,
                    out_features=module.embedding_dim,
                    bias=False,
                    partition=partition_map.partition_of(name),
                    dtype=module.weight.dtype,
                    kind=EMBEDDING,
                )
                self.weights[name] = module.weight

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
