"""LoRA folded into the base GEMM at prefill: each folded linear's weight lives in a wider buffer.

At many rows the LoRA kernels' largest cost is the expand's pass over the outputs: it reads and
writes every served output once more (#16; docs/KERNELS.md, "The fold"). Folding removes it. The
rewrite turns a folded linear `y = x @ W.T + b` into

    s = lora_fold_shrink(x, W)                    # [rows, slots * rank]: every slot's shrink,
                                                  # zero outside the row's own slot's columns
    y = cat([x, s]) @ [W | B_0 .. B_slots-1].T + b

where `B_k` is slot k's B (`[out, rank]`, scaling folded in, zero past the adapter's rank). So the
expand is extra K of the base GEMM, and nothing passes over y again.

The graph has only `W` (dynamo reuses one graph for every block, whose weights are its inputs).
So `W` must already sit inside the wider buffer. `FoldedWeights` gives each folded linear a buffer
`[out, in + slots * rank]`, copies its weight into the first `in` columns, and makes the module's
parameter that view. The rewrite reaches the whole buffer with `as_strided` of the weight it has:
same storage, row stride `in + slots * rank`, offset 0. The base model's outputs do not change
(the view holds the same values), and no memory is added beyond the B columns.

The B columns mirror the slot buffers: the adapter manager calls `mirror(slot)` after every
write or clear of a slot, on the same stream, so a folded GEMM reads what the kernels would.

Which linears fold: plain 2D weights of served linears that no other module shares, not
sharded, whose output is at least as wide as their input. The expand's pass costs reading and
writing the output; the fold costs a write of x into the GEMM's input buffer (or a copy where
its producer cannot write it there), so narrower outputs (attention's k and v, o, down) keep
the kernels. The rewrite folds only calls with at least `fold_min_rows` static rows.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

__all__ = ["FoldedWeights", "foldable"]


@dataclasses.dataclass
class _Fold:
    module: nn.Linear
    buffer: torch.Tensor  # [out, in + slots * rank]: the weight, then each slot's B
    lora_b: torch.Tensor  # the slot buffer it mirrors, [slots, out, rank]


def foldable(module: nn.Module) -> bool:
    """Whether a served linear's weight can live in a fold buffer (see the module's doc)."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2
            and weight.shape[0] >= weight.shape[1])


class FoldedWeights:
    """The fold buffers of a model's folded linears, by module name."""

    def __init__(self, model: nn.Module, modules: dict[str, object]):
        """`modules`: each linear to fold -> its slot buffers (`adapter_manager.SlotBuffers`)."""
        self._folds: dict[str, _Fold] = {}
        shared = _shared_weights(model)
        for name, buffers in modules.items():
            module = model.get_submodule(name)
            if not foldable(module) or id(module.weight) in shared or buffers.local_ranks is not None:
                continue
            weight = module.weight
            out_features, in_features = weight.shape
            slots, _, rank = buffers.lora_b.shape
            buffer = torch.zeros(out_features, in_features + slots * rank, dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                buffer[:, :in_features].copy_(weight)
            module.weight = nn.Parameter(buffer[:, :in_features], requires_grad=weight.requires_grad)
            self._folds[name] = _Fold(module, buffer, buffers.lora_b)
        for slot in range(max((f.lora_b.shape[0] for f in self._folds.values()), default=0)):
            self.mirror(slot)

    def __contains__(self, module: str) -> bool:
        return module in self._folds

    def __len__(self) -> int:
        return len(self._folds)

    @property
    def modules(self) -> list[str]:
        return sorted(self._folds)

    def weight(self, module: str) -> torch.Tensor:
        """The module's parameter now: a view of its fold buffer."""
        return self._folds[module].module.weight

    def width(self, module: str) -> int:
        """The columns the fold adds to the module's GEMM: slots x rank."""
        fold = self._folds[module]
        return fold.buffer.shape[1] - fold.module.weight.shape[1]

    def mirror(self, slot: int) -> None:
        """Copy `slot`'s B of every folded linear into its fold buffer (after the slot changed)."""
        for fold in self._folds.values():
            rank = fold.lora_b.shape[2]
            start = fold.module.weight.shape[1] + slot * rank
            fold.buffer[:, start:start + rank].copy_(fold.lora_b[slot], non_blocking=True)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of weights that more than one module holds (a head tied to the embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    return {key for key, count in seen.items() if count > 1}
