"""The `mmlora::lora_embedding_add_` custom op: mixed-adapter LoRA added to embedding lookups in place.

PEFT's embedding LoRA adds, for token `t`, `scaling * B @ A[:, t]` to its embedding
(`lora_embedding_A [r, num_embeddings]`, `lora_embedding_B [embedding_dim, r]`). The slot
buffers hold `A` as `lora_a [slots, R, num_embeddings]` and the scaled `B` as `lora_b [slots,
embedding_dim, R]`, like a linear's: a lookup is a linear on the one-hot token. Rows (token ids,
all leading dims flattened) belong to requests as in `reference.py`; each row takes its slot's
column `A[:, t]` (a gather, not a product) and then that slot's `B`.

This file keeps the op, its fake and two plain-torch bodies together:

* `lora_embedding_add_reference`: row by row, the oracle of the tests;
* `lora_embedding_add`: the op's body on every device. It reads nothing back to the host and
  its shapes depend only on the input's and the buffers' (a static count), so a CUDA graph
  captures it and replays it with refilled tables and buffers. It gathers each row's column
  `A[slot, :, token]` (`rows x R` values), then:
  - on CUDA, the expand is `lora_add`'s Triton kernels (`lora_add.py`), with the gathered
    columns as the input and an identity as every slot's A: rows grouped by slot, each slot's B
    read once, two launches. The plain-torch loop below would be ~3 launches per slot on every
    decode step, and at prefill `slots` products over all rows;
  - elsewhere (the CPU), a loop over the slots of `[rows, R] @ [R, dim]` products.
"""

from __future__ import annotations

import torch

from .lora_add import BatchTables, launch
from .reference import row_slots

__all__ = ["lora_embedding_add", "lora_embedding_add_", "lora_embedding_add_reference", "lora_embedding_add_torch",
           "lora_embedding_add_triton"]


def _check_shapes(output: torch.Tensor, ids: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  slot_ranks: torch.Tensor) -> None:
    """Static shape checks only (no device reads)."""
    slots, rank, _ = lora_a.shape
    if lora_b.shape[0] != slots or lora_b.shape[2] != rank or lora_b.shape[1] != output.shape[-1]:
        raise ValueError(f"lora_embedding_add_: B has shape {tuple(lora_b.shape)}, A {tuple(lora_a.shape)}, "
                         f"the embeddings are of size {output.shape[-1]}")
    if output.numel() != ids.numel() * output.shape[-1]:
        raise ValueError(f"lora_embedding_add_: {ids.numel()} token ids but embeddings of shape {tuple(output.shape)}")
    if slot_ranks.numel() != slots:
        raise ValueError("lora_embedding_add_: slot_ranks must have one entry per slot")


def lora_embedding_add_reference(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """`output[i] += lora_b[s, :, :rank] @ lora_a[s, :rank, ids[i]]`, row by row (s: row i's slot)."""
    _check_shapes(output, ids, lora_a, lora_b, slot_ranks)
    flat_ids = ids.reshape(-1)
    flat = output.view(-1, output.shape[-1])
    slots = row_slots(request_slots, request_cum_weights, flat_ids.numel())
    for row, slot in enumerate(slots.tolist()):
        rank = int(slot_ranks[slot]) if slot >= 0 else 0
        if rank == 0:
            continue
        column = lora_a[slot, :rank, int(flat_ids[row])].float()
        flat[row] += (lora_b[slot, :, :rank].float() @ column).to(flat.dtype)


def _row_columns(ids, lora_a, slot_ranks, request_slots, request_cum_weights):
    """Each row's slot, and its column `A[slot, :, token]` zeroed past the slot's rank ([rows, R])."""
    flat_ids = ids.reshape(-1).to(torch.int64)
    slots = row_slots(request_slots, request_cum_weights, flat_ids.numel())
    gather = slots.clamp(min=0)
    # Ranks below the buffer's are padded with zeros, but not trusted: columns past a slot's rank are masked.
    row_ranks = torch.where(slots >= 0, slot_ranks.to(torch.int64)[gather], 0)
    keep = torch.arange(lora_a.shape[1], device=lora_a.device) < row_ranks[:, None]
    # The two advanced indices put the rows first: [rows, R].
    return slots, torch.where(keep, lora_a[gather, :, flat_ids], 0.0)


def _nothing_to_add(ids, lora_a) -> bool:
    return ids.numel() == 0 or lora_a.shape[0] == 0 or lora_a.shape[1] == 0


def lora_embedding_add_triton(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """The CUDA path on any device (the tests run it on the CPU under `TRITON_INTERPRET=1`):
    `output[i] += lora_b[slot_i] @ columns[i]` through `lora_add`'s kernels, the gathered columns
    as the rows' input and an identity as every slot's A. The columns are zero past each row's
    rank (the identity's zeros would meet a NaN there as 0 * NaN); rows of slot -1 are left alone
    by the kernels."""
    _check_shapes(output, ids, lora_a, lora_b, slot_ranks)
    if _nothing_to_add(ids, lora_a):
        return
    _, columns = _row_columns(ids, lora_a, slot_ranks, request_slots, request_cum_weights)
    identity = torch.eye(lora_a.shape[1], dtype=columns.dtype, device=columns.device).expand(lora_a.shape[0], -1, -1)
    launch([output.view(-1, output.shape[-1])], columns, [identity], [lora_b],
           BatchTables([slot_ranks], request_slots, request_cum_weights))


def lora_embedding_add(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """The op's body: the reference's result with no host synchronisation (see the module's doc);
    each path checks the shapes itself."""
    body = lora_embedding_add_triton if output.is_cuda else lora_embedding_add_torch
    body(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights)


def lora_embedding_add_torch(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """The CPU path on any device (the benchmark times it on CUDA against the kernels)."""
    _check_shapes(output, ids, lora_a, lora_b, slot_ranks)
    if _nothing_to_add(ids, lora_a):
        return
    flat = output.view(-1, output.shape[-1])
    slots, columns = _row_columns(ids, lora_a, slot_ranks, request_slots, request_cum_weights)
    shrunk = columns.float()
    delta = torch.zeros(flat.shape[0], flat.shape[-1], dtype=torch.float32, device=flat.device)
    for slot in range(lora_a.shape[0]):
        # Masked after the product, not only before it: a slot no row of this batch reads (an
        # idle slot, or one a prefetch is writing on a side stream) must not reach the other
        # rows through 0 * inf = NaN.
        mine = (slots == slot)[:, None]
        delta += torch.where(mine, torch.where(mine, shrunk, 0.0) @ lora_b[slot].float().T, 0.0)
    flat += delta.to(flat.dtype)


@torch.library.custom_op("mmlora::lora_embedding_add_", mutates_args=("output",))
def lora_embedding_add_(
    output: torch.Tensor,
    ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
) -> None:
    """`output += LoRA(ids)` per row's adapter slot; see `lora_embedding_add_reference`."""
    lora_embedding_add(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights)


@lora_embedding_add_.register_fake
def _lora_embedding_add_fake(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    return None
