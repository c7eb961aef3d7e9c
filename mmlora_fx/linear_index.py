"""Every linear layer of a model, by absolute name, with its shape and partition."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .partitions import PartitionMap, can_carry_lora

__all__ = ["LinearInfo", "LinearIndex"]


@dataclasses.dataclass(frozen=True)
class LinearInfo:
    name: str
    in_features: int
    out_features: int
    bias: bool
    partition: str
    dtype: torch.dtype

    @property
    def can_carry_lora(self) -> bool:
        return can_carry_lora(self.partition)


class LinearIndex:
    """The model's `nn.Linear` modules and, to explain bad targets, every other module's type."""

    def __init__(self, model: nn.Module, partition_map: PartitionMap):
        self.partition_map = partition_map
        self.linears: dict[str, LinearInfo] = {}
        self.module_types: dict[str, str] = {}
        self.weights: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            self.module_types[name] = type(module).__name__
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

    def __contains__(self, name: str) -> bool:
        return name in self.linears

    def __getitem__(self, name: str) -> LinearInfo:
        return self.linears[name]

    def __iter__(self):
        return iter(self.linears.values())

    def __len__(self) -> int:
        return len(self.linears)

    def in_partitions(self, partitions) -> list[LinearInfo]:
        return [info for info in self.linears.values() if info.partition in partitions]
