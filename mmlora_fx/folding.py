"""LoRA folded into the base GEMM at prefill: each folded linear's weight lives in a wider buffer.

At many rows the LoRA kernels' largest cost is the expand's pass over the outputs: it reads and
writes every served output once more (#16; docs/KERNELS.md, "The fold"). Folding removes it. The
rewrite turns a folded linear `y = x @ W.T + b` into

    s = lora_fold_shrink(x, W, width)    # [rows, width]: every slot's shrink (one GEMM with the
                                         # fold's A), zero outside the row's own slot's columns
    y = cat([x, s]) @ [W | B_0 .. B_slots-1 | 0].T + b

where `B_k` is slot k's B (`[out, rank]`, scaling folded in, zero past the adapter's rank) and
`width` is slots x rank, padded with zero columns to a multiple of 8. So the expand is extra K
of the base GEMM, and nothing passes over y again.

The graph has only `W` (dynamo reuses one graph for every block, whose weights are its inputs).
So `W` must already sit inside the wider buffer. `FoldedWeights` gives each folded linear a buffer
`[out, in + width]`, copies its weight into the first `in` columns, and makes the module's
parameter that view. The rewrite reaches the whole buffer with `as_strided` of the weight it has:
same storage, row stride `in + width`, offset 0. The base model's outputs do not change (the
view holds the same values). Memory: the B columns, and a contiguous copy of every slot's A
(`[width, in]`, which the shrink's GEMM reads: the slot buffers' A is not contiguous across
slots). The old weight is let go as soon as its buffer holds it.

Both mirror the slot buffers: the adapter manager calls `mirror(slot)` after every write or
clear of a slot, on the stream that wrote it, so a folded GEMM reads what the kernels would. The
GEMM reads every slot's columns, also slots no row of the batch uses (times zero): their values
must be finite, as the adapter checks on load make them.

Which linears fold: plain 2D weights of served linears that no other module shares, not
sharded, whose output is at least as wide as their input (in a Llama or Qwen layer q, o, gate
and up; in a ViT block qkv, proj and fc1). The expand's pass costs reading and writing the
output; the fold costs a write of x into the GEMM's input buffer where x's producer is a kernel
Inductor generates (a norm), or a copy of x where it is not (attention's output before o), so
narrower outputs (k, v, down, fc2) keep the kernels. The rewrite folds only calls with at least
`fold_min_rows` static rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .adapter_manager import SlotBuffers

__all__ = ["FoldedWeights", "foldable", "shared_weights"]


# The fold's columns are padded to a multiple of this many (zeros in both factors), so that the
# folded weight's rows stay 16-byte aligned in bf16 whatever the slots and rank.
_ALIGN = 8


@dataclasses.dataclass
class _Fold:
    module: nn.Linear
    buffer: torch.Tensor  # [out, in + width]: the weight, then each slot's B, then zeros
    lora_a: torch.Tensor  # [width, in]: each slot's A, contiguous (the slot buffer's rows are not), then zeros
    slots: SlotBuffers  # what it mirrors

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1]


def foldable(module: nn.Module, shared: set[int] = frozenset()) -> bool:
    """Whether a served linear's weight can live in a fold buffer (see the module's doc);
    `shared`: `shared_weights(model)`, the weights it must not be one of."""
    weight = getattr(module, "weight", None)
    return (isinstance(module, nn.Linear) and type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2
            and weight.shape[0] >= weight.shape[1] and id(weight) not in shared)


class FoldedWeights:
    """The fold buffers of a model's folded linears, by module name."""

    def __init__(self, model: nn.Module, modules: dict[str, SlotBuffers],
                 moved: Callable[[str, torch.Tensor], None] = lambda name, weight: None):
        """`modules`: each linear to fold -> its slot buffers. `moved(name, parameter)` is told of
        each new parameter at once, so that whoever held the old weight can let it go before the
        next buffer is allocated (no moment with two copies of every folded weight)."""
        self._folds: dict[str, _Fold] = {}
        shared = shared_weights(model)
        for name, slots in modules.items():
            module = model.get_submodule(name)
            if not foldable(module, shared) or slots.local_ranks is not None:
                continue
            out_features, in_features = module.weight.shape
            count, rank = slots.lora_a.shape[:2]
            width = -(-count * rank // _ALIGN) * _ALIGN
            weight = module.weight
            buffer = torch.zeros(out_features, in_features + width, dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                buffer[:, :in_features].copy_(weight)
            module.weight = nn.Parameter(buffer[:, :in_features], requires_grad=weight.requires_grad)
            del weight
            moved(name, module.weight)
            lora_a = torch.zeros(width, in_features, dtype=slots.lora_a.dtype, device=slots.lora_a.device)
            self._folds[name] = _Fold(module, buffer, lora_a, slots)
        for slot in range(max((fold.slots.lora_a.shape[0] for fold in self._folds.values()), default=0)):
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

    def buffer(self, module: str) -> torch.Tensor:
        """`[out, in + width]`: the weight, each slot's B, zeros."""
        return self._folds[module].buffer

    def lora_a(self, module: str) -> torch.Tensor:
        """`[width, in]`: each slot's A (rank rows each), zeros: the fold's shrink reads it."""
        return self._folds[module].lora_a

    def width(self, module: str) -> int:
        """The columns the fold adds to the module's GEMM: slots x rank, padded to a multiple of 8."""
        return self._folds[module].lora_a.shape[0]

    def rank(self, module: str) -> int:
        """Columns per slot (the slot buffers' rank)."""
        return self._folds[module].slots.lora_a.shape[1]

    def mirror(self, slot: int) -> None:
        """Copy `slot`'s A and B of every folded linear into its fold buffers (after the slot changed)."""
        for fold in self._folds.values():
            rank = fold.slots.lora_a.shape[1]
            start = fold.in_features + slot * rank
            fold.buffer[:, start:start + rank].copy_(fold.slots.lora_b[slot], non_blocking=True)
            fold.lora_a[slot * rank:(slot + 1) * rank].copy_(fold.slots.lora_a[slot], non_blocking=True)


def shared_weights(model: nn.Module) -> set[int]:
    """ids of weights that more than one module holds (a head tied to the embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    return {key for key, count in seen.items() if count > 1}
