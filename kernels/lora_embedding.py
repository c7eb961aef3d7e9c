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
  its shapes depend only on the input's and the buffers' (a loop over the slots, a static count),
  so a CUDA graph captures it and replays it with refilled tables and buffers. Its cost is a
  gather of `rows x R` values and `slots` products of `[rows, R] @ [R, dim]`: small next to
  the model, so no Triton kernel of its own.
"""

from __future__ import annotations

import torch

from .reference import row_slots

__all__ = ["lora_embedding_add", "lora_embedding_add_", "lora_embedding_add_reference"]


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


def lora_embedding_add(output, ids, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights) -> None:
    """The op's body: the reference's result with no host synchronisation (see the module's doc)."""
    _check_shapes(output, ids, lora_a, lora_b, slot_ranks)
    flat_ids = ids.reshape(-1).to(torch.int64)
    flat = output.view(-1, output.shape[-1])
    rows = flat_ids.numel()
    if rows == 0 or lora_a.shape[0] == 0 or lora_a.shape[1] == 0:
        return
    slots = row_slots(request_slots, request_cum_weights, rows)
    gather = slots.clamp(min=0)
    # Ranks below the buffer's are padded with zeros, but not trusted: columns past a slot's rank are masked.
    row_ranks = torch.where(slots >= 0, slot_ranks.to(torch.int64)[gather], 0)
    keep = torch.arange(lora_a.shape[1], device=lora_a.device) < row_ranks[:, None]  # [rows, R]
    # Each row's column A[slot, :, token]: the two advanced indices put the rows first, [rows, R].
    shrunk = torch.where(keep, lora_a[gather, :, flat_ids].float(), 0.0)
    delta = torch.zeros(rows, flat.shape[-1], dtype=torch.float32, device=flat.device)
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
