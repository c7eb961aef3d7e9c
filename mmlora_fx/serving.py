"""Which linear layers a compiled model serves LoRA on.

The served set is fixed at compile time: each served linear gets slot buffers and a LoRA op in
the graph, so that adapters loaded later need no recompilation. It is every linear in the
allowed `partitions` whose name ends with one of the `target_modules` suffixes (a bare
parameter's name ends with the parameter's: `mm_input_projection_weight`).

When the user gives `partitions=` or `target_modules=`, they are deployment restrictions applied
to every adapter: adapter modules outside them are dropped (and `inspect` shows which). When the
user gives neither, both are derived from the adapters given to `compile` (with no adapter either,
every linear and embedding: a bare parameter is served only where named), and an adapter loaded
later that targets a linear outside that set is refused, since silently dropping part of it
would change its results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from .errors import MMLoRAError
from .linear_index import IMPLICIT_KINDS, LinearIndex

__all__ = ["ServingPlan", "module_suffix"]


def module_suffix(module: str) -> str:
    """The name a deployment restriction uses for a module: its last component, or the last two
    when the last is a bare index (`visual.merger.mlp.0` -> `mlp.0`)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[-1].isdigit():
        return ".".join(parts[-2:])
    return parts[-1]


def _matches(module: str, suffixes: Iterable[str]) -> bool:
    return any(module == suffix or module.endswith("." + suffix) for suffix in suffixes)


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    partitions: tuple[str, ...]
    target_modules: tuple[str, ...]
    explicit: bool
    served: frozenset[str]

    @classmethod
    def build(cls, linears: LinearIndex, adapters=(), partitions=None, target_modules=None) -> "ServingPlan":
        """`adapters` are anything with a `.modules` mapping keyed by module name."""
        explicit = partitions is not None or target_modules is not None
        adapter_modules = sorted({module for adapter in adapters for module in adapter.modules})
        known = linears.partition_map.lora_partitions
        if partitions is None:
            partitions = sorted({linears[module].partition for module in adapter_modules if module in linears}) \
                if adapter_modules else list(known)
        unknown = [partition for partition in partitions if partition not in known]
        if unknown:
            raise MMLoRAError(f"partitions={list(partitions)}: {unknown} cannot carry LoRA in this model; "
                              f"choose from {', '.join(known)}")
        implicit = target_modules is None and not adapter_modules
        candidates = [info for info in linears.in_partitions(partitions) if not implicit or info.kind in IMPLICIT_KINDS]
        if target_modules is None:
            if adapter_modules:
                target_modules = sorted({module_suffix(module) for module in adapter_modules})
            else:
                target_modules = sorted({module_suffix(info.name) for info in candidates})
        served = frozenset(info.name for info in candidates if _matches(info.name, target_modules))
        if not served:
            raise MMLoRAError(f"no linear layer is served: partitions={list(partitions)} and "
                              f"target_modules={list(target_modules)} select none")
        return cls(tuple(partitions), tuple(target_modules), explicit, served)

    def serves(self, module: str) -> bool:
        return module in self.served

    def to_json(self) -> dict:
        return {"partitions": list(self.partitions), "target_modules": list(self.target_modules),
                "explicit": self.explicit, "served_modules": len(self.served)}
