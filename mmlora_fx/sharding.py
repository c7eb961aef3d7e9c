"""How each served target is laid out across tensor-parallel ranks (issue #23), and what is refused.

A model sharded by torch.distributed's tensor-parallel API (`parallelize_module`) or by
transformers' `tp_plan` holds its weights as DTensors: each rank keeps a slice (`Shard(dim)`) or a
copy (`Replicate()`) of the global weight, laid out over a `DeviceMesh`. The placement of a served
linear's weight `W [out, in]` says how its LoRA is laid out, with no per-model code:

- an ordinary tensor: `replicated`, the whole LoRA on every rank, as on one process;
- `Shard(0)`, column-parallel (`ColwiseParallel`, `colwise`): `x` is whole on every rank and each
  rank computes a slice of the outputs. A is whole, B is split by output rows like W; no collective.
  With `tp_lora_a="sharded"` (`shard_lora_a`) A is split too, along the rank: each rank holds
  `R/T` of the `R = max_lora_rank` rows of every slot's zero-padded A, and the `[rows, R/T]`
  shrinks are all-gathered into `[rows, R]` before the expand (`tp_lora.lora_add_all_gathered`);
- `Shard(1)`, row-parallel (`RowwiseParallel`, `rowwise`): `x` comes split by input features and
  each rank's product is a partial sum that the base reduces. A is split by input like W, B whole.
  In the compiled graphs the LoRA op runs right after the linear, on its partial output, so each
  rank adds its partial delta `x_i A_i^T B^T` there and the base's own all-reduce sums the delta with
  the product: no collective of LoRA's own. Outside the graphs (`mm.eager`, the forward hooks) the
  module's output is reduced already, so the rank-sized shrink `x_i A_i^T` is all-reduced first
  (`tp_lora.py`; a column-parallel module that gathers its output gets the delta all-gathered there).

Everything else is refused with `ShardedModelError` naming the target and why, before any buffer
is sized: a sharded embedding (transformers' vocabulary-sharded `embed_tokens`), convolution, bare
parameter or expert weight, a `Shard` on another dimension or a strided one (transformers' packed
gate/up), a replicated DTensor weight, a mesh of more than one dimension. Placements are the same
on every rank, so every rank accepts or refuses alike and none waits in a collective that another
skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from collections.abc import Iterable

import torch

from .errors import ShardedModelError
from .linear_index import LINEAR, LinearIndex

__all__ = ["REPLICATED", "COLUMN", "ROW", "TP_LORA_A", "TargetLayout", "distributed_layout", "layout_of",
           "target_layouts", "shard_lora_a", "local_tensor", "is_dtensor", "gather_slice_digests",
           "copy_equals_sharded"]

REPLICATED, COLUMN, ROW = "replicated", "column", "row"
# The `tp_lora_a` serving option: A of column-parallel targets whole on every rank, or split along
# the rank. "auto" is the measured rule's place; unmeasured (no multi-GPU machine yet), it is "replicated".
TP_LORA_A = ("replicated", "sharded", "auto")


def _dtensor_class():
    # No DTensor exists unless its module was imported: nothing here imports it itself (a second
    # or two cold; transformers' models usually have imported it already).
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(tensor: object) -> bool:
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of `tensor` (a view sharing its storage), or `tensor` itself if it is no DTensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


@dataclasses.dataclass(frozen=True)
class TargetLayout:
    """How one served target's LoRA is laid out on this rank: `style` (`replicated`, `column`,
    `row`), the mesh's `ranks` and this rank's coordinate, and the part of the global features it
    holds (`out_range` for column, `in_range` for row: `[start, stop)`). `mesh` is the weight's
    `DeviceMesh` (its group is what the eager row path all-reduces over). `lora_a_rows`: the rows
    `[start, stop)` of every slot's zero-padded A (`max_lora_rank` rows) this rank holds, on a
    column-parallel target whose A is split along the rank (`shard_lora_a`); None where A is whole."""

    style: str = REPLICATED
    ranks: int = 1
    rank: int = 0
    out_range: tuple[int, int] | None = None
    in_range: tuple[int, int] | None = None
    placements: str = ""
    lora_a_rows: tuple[int, int] | None = None
    mesh: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def sharded(self) -> bool:
        return self.style != REPLICATED

    def local_factors(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of an adapter's `lora_a [..., r, in]` and `lora_b [..., out, r]` (views).
        Where A is split along the rank, A's part has `local_rank(r)` rows (those of `lora_a_rows`
        that an adapter of rank r has; the others are the padding's zeros) and B keeps every rank."""
        if self.style == COLUMN:
            start, stop = self.out_range
            if self.lora_a_rows is not None:
                lora_a = lora_a[..., self.lora_a_rows[0]:self.lora_a_rows[1], :]
            return lora_a, lora_b[..., start:stop, :]
        if self.style == ROW:
            start, stop = self.in_range
            return lora_a[..., start:stop], lora_b
        return lora_a, lora_b

    def local_rank(self, rank: int) -> int:
        """How many of an adapter's `rank` rows of A this rank holds (its shrink's rank)."""
        if self.lora_a_rows is None:
            return rank
        start, stop = self.lora_a_rows
        return min(max(rank - start, 0), stop - start)

    def collective(self, compiled: bool) -> str:
        """The collective LoRA adds to the target, in the compiled graphs or in the eager hooks."""
        if self.lora_a_rows is not None:
            return "all-gather [rows, R]" + ("" if compiled else " (and [rows, out] if gathered)")
        if self.style == COLUMN and not compiled:
            return "none (all-gather [rows, out] if gathered)"
        if self.style != ROW:
            return "none"
        return "none (rides on the base's all-reduce)" if compiled else "all-reduce [rows, r]"

    def to_json(self) -> dict:
        return {"style": self.style, "placements": self.placements, "ranks": self.ranks, "rank": self.rank,
                "out_range": list(self.out_range) if self.out_range else None,
                "in_range": list(self.in_range) if self.in_range else None,
                "lora_a_rows": list(self.lora_a_rows) if self.lora_a_rows else None,
                "collective_compiled": self.collective(compiled=True),
                "collective_eager": self.collective(compiled=False)}


def distributed_layout(weight: torch.Tensor) -> str | None:
    """How `weight` is laid out across processes ("placements (Shard(dim=0),) over a 2-rank
    mesh"), or None for an ordinary tensor of this process alone."""
    if not is_dtensor(weight):
        return None
    mesh = weight.device_mesh
    return (f"placements {tuple(weight.placements)} over a {mesh.size()}-rank {mesh.device_type} mesh "
            f"(global shape {tuple(weight.shape)}, this rank's {tuple(weight.to_local().shape)})")


def layout_of(kind: str, weight: torch.Tensor) -> tuple[TargetLayout | None, str | None]:
    """The layout of a served target's `weight`, or (None, why it is refused)."""
    if not is_dtensor(weight):
        return TargetLayout(), None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(weight.placements)
    mesh = weight.device_mesh
    if kind != LINEAR:
        what = "a vocabulary-sharded embedding" if kind == "embedding" else f"a sharded {kind} target"
        return None, (f"{what}: LoRA on sharded weights is served on linear layers only (column- or "
                      "row-parallel); leave it out with target_modules=, or keep it unsharded")
    if mesh.ndim != 1:
        return None, (f"a {mesh.ndim}-dimensional mesh {tuple(mesh.shape)}: LoRA is served on a 1-D "
                      "tensor-parallel mesh only")
    placement = placements[0]
    # `type(...) is Shard`: a strided shard (transformers' packed gate/up) is a Shard subclass whose
    # local rows are not one contiguous slice of W.
    if type(placement) is not Shard or placement.dim not in (0, 1):
        return None, (f"placement {placement}: LoRA is served on column-parallel (Shard(0)) and row-parallel "
                      "(Shard(1)) linears, and on unsharded ones (an ordinary tensor, not a replicated DTensor)")
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    dim = placement.dim
    piece = (offset[dim], offset[dim] + local_shape[dim])
    return TargetLayout(style=COLUMN if dim == 0 else ROW, ranks=mesh.size(), rank=mesh.get_local_rank(),
                        out_range=piece if dim == 0 else None, in_range=piece if dim == 1 else None,
                        placements=str(placements), mesh=mesh), None


def target_layouts(linears: LinearIndex, served: Iterable[str]) -> dict[str, TargetLayout]:
    """Each served target's layout; `ShardedModelError` naming the first refused one (in model
    order), why, and how many served targets are refused."""
    served = set(served)
    layouts, refused = {}, []
    for name, weight in linears.weights.items():
        if name not in served:
            continue
        layout, why = layout_of(linears[name].kind, weight)
        if layout is None:
            refused.append((name, distributed_layout(weight), why))
        else:
            layouts[name] = layout
    if refused:
        name, layout, why = refused[0]
        raise ShardedModelError(name, layout, why, len(refused))
    return layouts


def shard_lora_a(layouts: dict[str, TargetLayout], max_lora_rank: int, linears: LinearIndex) -> dict[str, TargetLayout]:
    """`layouts` with every column-parallel target's A split along the rank (`tp_lora_a="sharded"`):
    rank k of T holds rows `[k*R/T, (k+1)*R/T)` of each slot's A, R = `max_lora_rank`.
    `ShardedModelError` where R is not a multiple of T: every rank sees the same R and mesh, so all
    refuse alike, before any buffer is sized. Row-parallel and unsharded targets are unchanged."""
    columns = [name for name, layout in layouts.items() if layout.style == COLUMN]
    refused = [name for name in columns if max_lora_rank % layouts[name].ranks]
    if refused:
        name, ranks = refused[0], layouts[refused[0]].ranks
        raise ShardedModelError(
            name, distributed_layout(linears.weights[name]),
            f"tp_lora_a='sharded' splits the rows of its LoRA A (max_lora_rank={max_lora_rank}) over the "
            f"{ranks}-rank mesh, and {max_lora_rank} is not a multiple of {ranks}: give a multiple "
            f"(such as {-(-max_lora_rank // ranks) * ranks}), or tp_lora_a='replicated'", len(refused))
    sharded = dict(layouts)
    for name in columns:
        layout = layouts[name]
        share = max_lora_rank // layout.ranks
        sharded[name] = dataclasses.replace(layout, lora_a_rows=(layout.rank * share, (layout.rank + 1) * share))
    return sharded


# PEFT saves a full copy of the base weight of the lm_head and embeddings an adapter targets; the
# reader refuses one that differs from the model's. A rank holds only its slice of a sharded weight,
# and comparing that slice alone would let ranks disagree about the same file. So each rank's slice
# is digested once, when the model is compiled (one all-gather of digests, on every rank), and a
# copy is cut into every rank's slice and each held to its digest: the same answer everywhere, with
# no communication when an adapter is read. Kept on the weight (a DTensor parameter) itself.
_DIGESTS = "_mmlora_slice_digests"


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().flatten().view(torch.uint8)
    return hashlib.sha256(memoryview(data.numpy())).hexdigest()


def gather_slice_digests(weight: torch.Tensor, layout: TargetLayout) -> None:
    """Gather every rank's (slice of the sharded dimension, digest of its local data) of `weight`
    over its mesh. A collective: every rank calls it for the same weights, in the same order."""
    import torch.distributed as dist

    dim = 0 if layout.style == COLUMN else 1
    piece = layout.out_range if layout.style == COLUMN else layout.in_range
    mine = (dim, piece, str(weight.dtype), _digest(weight.to_local()))
    everyone = [None] * layout.ranks
    dist.all_gather_object(everyone, mine, group=layout.mesh.get_group())
    setattr(weight, _DIGESTS, everyone)


def copy_equals_sharded(copy: torch.Tensor, weight: torch.Tensor) -> bool | None:
    """Whether `copy` (the whole weight, from an adapter file) equals the sharded `weight` on every
    rank, by the gathered digests; None where none were gathered for `weight`."""
    digests = getattr(weight, _DIGESTS, None)
    if digests is None:
        return None
    converted = copy.to(weight.dtype)
    for dim, (start, stop), _, digest in digests:
        if _digest(converted.narrow(dim, start, stop - start)) != digest:
            return False
    return True
