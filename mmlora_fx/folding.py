"""LoRA inside the base GEMM: each folded or stacked linear's weight lives in a larger buffer.

Two uses of one buffer `[out + width, in + fold columns]` (weight top left, every slot's A below
it, every slot's B beside it when the linear folds or its stacked expand is the graph's), each
chosen per graph call by its rows:

* **the fold** (prefill, `fold_min_rows`): the expand as extra K of the base GEMM, below;
* **the stack** (decode, `stack_max_rows`): the shrink as extra N of the base GEMM. The call
  `y = x @ W.T + b` becomes `y_ext = x @ [W; A_0 .. A_slots-1; 0].T + [b; 0]`, whose last `width`
  columns are every slot's shrink of every row (what the shrink kernel would compute, rounded
  to the output's dtype), and one kernel (`kernels/lora_stacked.py`) adds each row's own slot's
  expand to the first `out` columns in place: one LoRA launch per sibling group instead of a
  shrink, an expand and, on the tile path, a memset. It reads every resident slot's A, at decode
  a few percent of the weight's bytes at 8 slots of rank 16 (`slots x rank / out` of each
  GEMM's weight), so it pays where launches cost more than those bytes: few rows, few slots.

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
So `W` must already sit inside the larger buffer. `FoldedWeights` gives each such linear a buffer
`[out + width, in + fold columns]`, copies its weight into the top left, and makes the module's
parameter that view (and a stacked linear's bias the view of `[out + width]`). The rewrite
reaches the whole buffer with `as_strided` of the weight it has: same storage, its row stride,
offset 0; `[W | B]` for the fold, `[W; A]` for the stack. The base model's outputs do not change
(the view holds the same values). Memory: every slot's A (`[width, in]`, rows below the weight,
which the fold's shrink GEMM reads too: the slot buffers' A is not contiguous across slots), and
the B columns where the linear folds or stacks with the graph expand (`stack_expand="inductor"`:
the expand as tensor ops after the GEMM, reading each row's B through the weight). The old weight
is let go as soon as its buffer holds it.

Both mirror the slot buffers: the adapter manager calls `mirror(slot)` after every write or
clear of a slot, on the stream that wrote it, so a folded or stacked GEMM reads what the kernels
would. The GEMM reads every slot's columns or rows, also slots no row of the batch uses: their
values must be finite, as the adapter checks on load make them.

Which linears fold: plain 2D weights of served linears that no other module shares, not
sharded, whose output is at least as wide as their input (in a Llama or Qwen layer q, o, gate
and up; in a ViT block qkv, proj and fc1). The expand's pass costs reading and writing the
output; the fold costs a write of x into the GEMM's input buffer where x's producer is a kernel
Inductor generates (a norm), or a copy of x where it is not (attention's output before o), so
narrower outputs (k, v, down, fc2) keep the kernels. The rewrite folds only calls with at least
`fold_min_rows` static rows. Every such linear stacks (`stackable`), in calls of at most
`stack_max_rows` static rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from .adapter_manager import SlotBuffers

__all__ = ["FOLD_MAX_WIDTH", "FoldedWeights", "foldable", "stackable", "shared_weights"]


# The fold's columns are padded to a multiple of this many (zeros in both factors), so that the
# folded weight's rows stay 16-byte aligned in bf16 whatever the slots and rank.
_ALIGN = 8

# The widest fold (slots x rank columns) taken: past it the fold is estimated to cost more GPU time
# than the LoRA kernels it replaces. The fold adds work in proportion to its width (the shrink
# GEMM's N and the base GEMM's extra K: rows x width x (in + out) multiply-adds), where the kernels
# cost about the same whatever the slots (their bytes are the rows' inputs and outputs). At width
# 128 (8 slots of rank 16) the fold took 0.2-0.5x the kernels' time at case a's prefill shapes
# (H100, 2026-12-06, docs/BENCHMARKS.md "Prefill tiles and the fold"): 0.5x at the tower block,
# the least favourable, puts the break-even near 256 columns. An estimate by that scaling, not a
# measurement at 256 or 512 (`gpu_steps kfold` times 32 slots).
FOLD_MAX_WIDTH = 256


@dataclasses.dataclass
class _Fold:
    module: nn.Linear
    buffer: torch.Tensor  # [out + width, in + fold columns]: the weight, each slot's A below, each slot's B beside
    bias: torch.Tensor | None  # [out + width]: the bias, then zeros (stacked linears with a bias)
    slots: SlotBuffers  # what it mirrors
    width: int  # slots x rank, padded
    folds: bool  # whether the linear folds (its GEMM can take B as extra K)
    has_b: bool  # whether B sits beside the weight (it folds, or it stacks with the graph expand)

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[1]


def stackable(module: nn.Module, shared: set[int] = frozenset()) -> bool:
    """Whether a served linear's weight can live in a fold buffer: a plain 2D `nn.Linear` weight
    (and bias) that no other module shares (`shared`: `shared_weights(model)`)."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (isinstance(module, nn.Linear) and type(weight) in (torch.Tensor, nn.Parameter) and weight.dim() == 2
            and id(weight) not in shared and (bias is None or type(bias) in (torch.Tensor, nn.Parameter)))


def foldable(module: nn.Module, shared: set[int] = frozenset()) -> bool:
    """Whether a served linear folds at prefill (see the module's doc): stackable, with an output
    at least as wide as its input."""
    return stackable(module, shared) and module.weight.shape[0] >= module.weight.shape[1]


class FoldedWeights:
    """The fold buffers of a model's folded and stacked linears, by module name."""

    def __init__(self, model: nn.Module, modules: dict[str, SlotBuffers], fold: bool = True, stack: bool = False,
                 moved: Callable[[str, torch.Tensor], None] = lambda name, weight: None,
                 stack_b: Callable[[str], bool] = lambda name: False):
        """`modules`: each served linear -> its slot buffers; those `fold` (B beside the weight, for
        `foldable` ones) or `stack` (A below it, for `stackable` ones) takes get a buffer.
        `moved(name, parameter)` is told of each new weight at once, so that whoever held the old
        weight can let it go before the next buffer is allocated (no moment with two copies of
        every folded weight). `stack_b(name)`: whether a stacked linear also keeps B beside its
        weight (where the stack's graph expand reads it: `stack_expand="inductor"`)."""
        self._folds: dict[str, _Fold] = {}
        self.stacks = stack
        shared = shared_weights(model)
        for name, slots in modules.items():
            module = model.get_submodule(name)
            folds = fold and foldable(module, shared)
            if not (folds or (stack and stackable(module, shared))) or slots.local_ranks is not None:
                continue
            out_features, in_features = module.weight.shape
            count, rank = slots.lora_a.shape[:2]
            width = -(-count * rank // _ALIGN) * _ALIGN
            weight = module.weight
            # B beside the weight where the linear folds, or stacks with the graph expand
            # (`stack_expand="inductor"`), which reads each row's B from there through the weight.
            # Elsewhere the weight's rows stay contiguous and no B is copied.
            has_b = folds or (stack and stack_b(name))
            buffer = torch.zeros(out_features + width, in_features + (width if has_b else 0), dtype=weight.dtype,
                                 device=weight.device)
            with torch.no_grad():
                buffer[:out_features, :in_features].copy_(weight)
            module.weight = nn.Parameter(buffer[:out_features, :in_features], requires_grad=weight.requires_grad)
            del weight
            moved(name, module.weight)
            bias = None
            if stack and module.bias is not None:
                bias = torch.zeros(out_features + width, dtype=module.bias.dtype, device=module.bias.device)
                with torch.no_grad():
                    bias[:out_features].copy_(module.bias)
                module.bias = nn.Parameter(bias[:out_features], requires_grad=module.bias.requires_grad)
            self._folds[name] = _Fold(module, buffer, bias, slots, width, folds, has_b)
        for slot in range(max((fold.slots.lora_a.shape[0] for fold in self._folds.values()), default=0)):
            self.mirror(slot)

    def __contains__(self, module: str) -> bool:
        return module in self._folds

    def __len__(self) -> int:
        return len(self._folds)

    @property
    def modules(self) -> list[str]:
        return sorted(self._folds)

    def folds(self, module: str) -> bool:
        """Whether the module's GEMM can take the fold (B beside its weight)."""
        fold = self._folds.get(module)
        return fold is not None and fold.folds

    def stacked(self, module: str) -> bool:
        """Whether the module's GEMM can take the stack (A below its weight, a bias with zeros after it)."""
        return self.stacks and module in self._folds

    def has_lora_b(self, module: str) -> bool:
        """Whether each slot's B sits beside the module's weight (it folds, or takes the graph expand)."""
        fold = self._folds.get(module)
        return fold is not None and fold.has_b

    def weight(self, module: str) -> torch.Tensor:
        """The module's parameter now: a view of its fold buffer."""
        return self._folds[module].module.weight

    def buffer(self, module: str) -> torch.Tensor:
        """`[out + width, in + fold columns]`: the weight, each slot's A below it, each slot's B
        beside it (where the module folds or takes the graph expand), zeros."""
        return self._folds[module].buffer

    def lora_a(self, module: str) -> torch.Tensor:
        """`[width, in]` (a view of the buffer): each slot's A (rank rows each), zeros: the fold's
        shrink reads it."""
        fold = self._folds[module]
        return fold.buffer[fold.out_features:, :fold.in_features]

    def lora_b(self, module: str) -> torch.Tensor:
        """`[slots, out, rank]` (a view of the buffer, beside the weight): each slot's B, zero past
        the adapter's rank; the stack's graph expand reads it through the weight the same way."""
        fold = self._folds[module]
        if not fold.has_b:
            raise KeyError(f"{module}'s fold buffer has no B beside its weight")
        count, rank = fold.slots.lora_b.shape[0], fold.slots.lora_b.shape[2]
        return fold.buffer.as_strided((count, fold.out_features, rank), (rank, fold.buffer.stride(0), 1),
                                      fold.buffer.storage_offset() + fold.in_features)

    def width(self, module: str) -> int:
        """The columns the fold adds to the module's GEMM (its K) or the stack adds to its output
        (its N): slots x rank, padded to a multiple of 8."""
        return self._folds[module].width

    def rank(self, module: str) -> int:
        """Columns per slot (the slot buffers' rank)."""
        return self._folds[module].slots.lora_a.shape[1]

    def mirror(self, slot: int) -> None:
        """Copy `slot`'s A and B of every folded linear into its fold buffers (after the slot changed)."""
        for fold in self._folds.values():
            rank = fold.slots.lora_a.shape[1]
            row = fold.out_features + slot * rank
            fold.buffer[row:row + rank, :fold.in_features].copy_(fold.slots.lora_a[slot], non_blocking=True)
            if fold.has_b:
                start = fold.in_features + slot * rank
                fold.buffer[:fold.out_features, start:start + rank].copy_(fold.slots.lora_b[slot], non_blocking=True)


def shared_weights(model: nn.Module) -> set[int]:
    """ids of weights that more than one module holds (a head tied to the embeddings)."""
    seen: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            seen[id(weight)] = seen.get(id(weight), 0) + 1
    return {key for key, count in seen.items() if count > 1}
