"""Plain-torch reference of the mixed-adapter LoRA work: the CPU path and the test oracle.

Rows and requests. An activation with `rows` rows (all leading dimensions flattened) is shared
by the requests of a batch in order, each request owning a contiguous run of rows in proportion
to its weight: `request_cum_weights` holds the running sums of the weights (`[0, w0, w0+w1,
...]`, padded with the total), so request `r` owns row `i` when

    cum[r] * rows <= i * total < cum[r + 1] * rows.

The language model weighs every request 1 (each owns `rows / batch` rows); the tower and the
connector weigh a request by its image tokens, so a request owns the rows its images became,
whatever the number of rows per image token. `request_slots[r]` is the adapter slot of request
`r`, or -1 for the base model (no LoRA).

The LoRA work, for each output `j` of a group of linears sharing the input `x`:

    outputs[j][i] += (x[i] @ lora_a[j][s, :rank].T) @ lora_b[j][s, :, :rank].T,  s = slot of row i

with `rank = slot_ranks[j][s]` (0: the adapter in slot `s` does not adapt this linear) and the
adapter's scaling already folded into `lora_b`. The shrink accumulates in float32.
"""

from __future__ import annotations

import torch

__all__ = ["row_slots", "lora_add_reference", "lora_add_gather_bmm"]


def row_slots(request_slots: torch.Tensor, request_cum_weights: torch.Tensor, rows: int) -> torch.Tensor:
    """The adapter slot of each of `rows` rows (int64, -1 for the base model)."""
    device = request_slots.device
    total = request_cum_weights[-1]
    bounds = request_cum_weights[1:].to(torch.int64) * rows
    targets = torch.arange(rows, device=device, dtype=torch.int64) * total
    owners = torch.searchsorted(bounds, targets, right=True).clamp(max=request_slots.numel() - 1)
    slots = request_slots.to(torch.int64)[owners]
    return torch.where(total > 0, slots, torch.full_like(slots, -1))


def lora_add_reference(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    slot_ranks: list[torch.Tensor],
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
) -> None:
    """Add each row's adapter delta to `outputs` in place (see the module docstring)."""
    inputs = x.reshape(-1, x.shape[-1])
    slots = row_slots(request_slots, request_cum_weights, inputs.shape[0])
    present = [int(slot) for slot in torch.unique(slots).tolist() if slot >= 0]
    for output, a, b, ranks in zip(outputs, lora_a, lora_b, slot_ranks):
        flat = output.view(-1, output.shape[-1])
        for slot in present:
            rank = int(ranks[slot])
            if rank == 0:
                continue
            rows = slots == slot
            shrunk = inputs[rows].float() @ a[slot, :rank].float().T
            delta = shrunk @ b[slot, :, :rank].float().T
            flat[rows] += delta.to(flat.dtype)


def lora_add_gather_bmm(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    slot_ranks: list[torch.Tensor],
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
) -> None:
    """The same work in plain torch with no host synchronisation: the benchmark's baseline.

    Every row gathers its own copy of its adapter's A and B and runs a batched matrix product,
    so memory traffic grows with rows times adapter size (no sharing between rows of one
    adapter). Ranks below the buffer's are honoured by masking the shrunk columns, and rows of
    the base model (slot -1) or of slots with rank 0 add nothing. The products run in the
    input dtype (float32 accumulation inside the matrix library).
    """
    inputs = x.reshape(-1, x.shape[-1])
    slots = row_slots(request_slots, request_cum_weights, inputs.shape[0])
    gather = slots.clamp(min=0)
    adapted = slots >= 0
    for output, a, b, ranks in zip(outputs, lora_a, lora_b, slot_ranks):
        flat = output.view(-1, output.shape[-1])
        row_ranks = torch.where(adapted, ranks.to(torch.int64)[gather], 0)
        keep = torch.arange(a.shape[1], device=a.device) < row_ranks[:, None]  # [rows, R]
        shrunk = torch.bmm(inputs[:, None, :], a[gather].transpose(1, 2))  # [rows, 1, R]
        shrunk = shrunk * keep[:, None, :].to(shrunk.dtype)
        delta = torch.bmm(shrunk, b[gather].transpose(1, 2))  # [rows, 1, out]
        flat += delta[:, 0, :]
