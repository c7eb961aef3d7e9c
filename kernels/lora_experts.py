"""The `mmlora::lora_experts_add_` custom op: mixed-adapter LoRA on a mixture of experts' 3D weights.

PEFT's LoRA on a 3D expert weight `W [experts, d1, d2]` (`LoraConfig(target_parameters=...)`)
adds to each expert's slice a delta `scaling * B_e @ A_e` (`A_e [r, in]`, `B_e [out, r]`, in PEFT's
naming of the weight's dimensions), so an expert matmul gets, per row, the product of its input
with its request's delta for its expert. The slot buffers hold `lora_a [slots, experts, R, in]`
and the scaled `lora_b [slots, experts, out, R]`.

The rows come in one of two forms (`passes/ownership.ExpertsCall`):

* per expert: `x [experts, T, c]`, expert `e`'s batch in `x[e]`;
* gathered: `x [S, c]` (trailing singleton dimensions dropped), row `s` run by expert `expert_ids[s]`;

and `contract_in` says whether the model's product sums over PEFT's `in` (then the delta is
`x @ A_e.T @ B_e.T`) or over its `out` (Llama4 multiplies `x @ W_e` with `W_e [d1, d2]` while
PEFT calls `d2` the input: then `x @ B_e @ A_e`). Each row's token, and so its request, follows
its layout (`passes/row_layout.RowLayout`: of `R` rows, row `i` is token `(i mod (R / tiles)) //
interleave`); the requests own the tokens as in `reference.py`.

This file keeps the op, its fake and two plain-torch bodies together:

* `lora_experts_add_reference`: row by row, the tests' oracle;
* `lora_experts_add`: the op's body on every device. No host reads, shapes that depend only on
  the input's and the buffers' (a loop over the slots, a static count): a CUDA graph captures it
  and replays it with refilled tables and buffers. Per slot it costs one batched product per
  expert of rank `R` (per-expert form) or a gather of each row's `[R, c]` and `[o, R]` factors
  (gathered form; the model's own `W[ids]` gathers far more). A Triton path would group rows by
  (slot, expert) as the tile plan groups them by slot, and read A/B by `(slot, expert)` offsets.
"""

from __future__ import annotations

import torch

from .reference import row_slots

__all__ = ["lora_experts_add", "lora_experts_add_", "lora_experts_add_reference", "experts_row_slots"]


def _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in: bool) -> None:
    """Static shape checks only (no device reads)."""
    slots, experts, rank, in_features = lora_a.shape
    out_features = lora_b.shape[2]
    if lora_b.shape[:2] != (slots, experts) or lora_b.shape[3] != rank:
        raise ValueError(f"lora_experts_add_: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not pair")
    reads, writes = (in_features, out_features) if contract_in else (out_features, in_features)
    # Gathered rows carry a trailing singleton dimension (`[S, c, 1]`, `[S, 1, c]`): features per row.
    read = x.shape[-1] if expert_ids is None else x[0].numel()
    written = output.shape[-1] if expert_ids is None else output[0].numel()
    if read != reads or written != writes:
        raise ValueError(f"lora_experts_add_: rows of {read} features into {written}, but the "
                         f"factors map {reads} to {writes}")
    if expert_ids is None and x.shape[0] != experts:
        raise ValueError(f"lora_experts_add_: {x.shape[0]} expert batches for {experts} experts")
    if expert_ids is not None and expert_ids.numel() != x.shape[0]:
        raise ValueError(f"lora_experts_add_: {expert_ids.numel()} expert ids for {x.shape[0]} rows")
    if slot_ranks.numel() != slots:
        raise ValueError("lora_experts_add_: slot_ranks must have one entry per slot")


def _rows(x: torch.Tensor, expert_ids) -> torch.Tensor:
    """The rows as `[experts, T, c]` (per expert) or `[S, c]` (gathered)."""
    if expert_ids is None:
        return x
    return x.reshape(x.shape[0], -1)


def experts_row_slots(rows: int, tiles: int, interleave: int, request_slots, request_cum_weights) -> torch.Tensor:
    """The adapter slot of each of `rows` rows laid out `(tiles, interleave)` over the tokens."""
    tokens = rows // (tiles * interleave)
    token_slots = row_slots(request_slots, request_cum_weights, tokens)
    index = (torch.arange(rows, device=token_slots.device) % (rows // tiles)) // interleave
    return token_slots[index]


def _factors(lora_a: torch.Tensor, lora_b: torch.Tensor, contract_in: bool):
    """(shrink [.., c, R], expand [.., R, o]) of each slot and expert: the delta is `x @ shrink @ expand`."""
    if contract_in:
        return lora_a.transpose(-1, -2), lora_b.transpose(-1, -2)
    return lora_b, lora_a


def lora_experts_add_reference(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                               request_slots, request_cum_weights) -> None:
    """Row by row: `output[row] += x[row] @ shrink[slot, expert, :, :rank] @ expand[slot, expert, :rank]`."""
    _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in)
    rows_in = _rows(x, expert_ids).reshape(-1, x.shape[-1] if expert_ids is None else _rows(x, expert_ids).shape[-1])
    flat = output.reshape(rows_in.shape[0], -1)
    slots = experts_row_slots(rows_in.shape[0], tiles, interleave, request_slots, request_cum_weights)
    per_expert = rows_in.shape[0] // lora_a.shape[1]
    shrink, expand = _factors(lora_a, lora_b, contract_in)
    deltas = torch.zeros_like(flat, dtype=torch.float32)
    for row, slot in enumerate(slots.tolist()):
        rank = int(slot_ranks[slot]) if slot >= 0 else 0
        if rank == 0:
            continue
        expert = int(expert_ids.reshape(-1)[row]) if expert_ids is not None else row // per_expert
        deltas[row] = rows_in[row].float() @ shrink[slot, expert, :, :rank].float() @ expand[slot, expert, :rank].float()
    output.add_(deltas.view(output.shape).to(output.dtype))


def lora_experts_add(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                     request_slots, request_cum_weights) -> None:
    """The op's body: the reference's result with no host synchronisation (see the module's doc)."""
    _check_shapes(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in)
    rows_in = _rows(x, expert_ids)
    count = rows_in.shape[0] * rows_in.shape[1] if expert_ids is None else rows_in.shape[0]
    if count == 0 or lora_a.shape[0] == 0 or lora_a.shape[2] == 0:
        return
    slots = experts_row_slots(count, tiles, interleave, request_slots, request_cum_weights)
    shrink, expand = _factors(lora_a, lora_b, contract_in)
    rank_cap = lora_a.shape[2]
    # Ranks below the buffer's are padded with zeros, but not trusted: columns past a slot's rank are masked.
    columns = torch.arange(rank_cap, device=lora_a.device)
    delta = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
    if expert_ids is None:
        mine_shape = rows_in.shape[:2] + (1,)  # [experts, T, 1]
        slots = slots.view(mine_shape)
        for slot in range(lora_a.shape[0]):
            keep = (columns < slot_ranks[slot].to(torch.int64)).to(torch.float32)
            shrunk = torch.bmm(rows_in.float(), shrink[slot].float()) * keep  # [experts, T, R]
            shrunk = torch.where(slots == slot, shrunk, 0.0)
            delta += torch.bmm(shrunk, expand[slot].float()).view(output.shape)
    else:
        ids = expert_ids.reshape(-1).to(torch.int64)
        gather = slots.clamp(min=0)
        row_ranks = torch.where(slots >= 0, slot_ranks.to(torch.int64)[gather], 0)
        keep = (columns < row_ranks[:, None]).to(torch.float32)  # [S, R]
        shrunk = torch.bmm(rows_in.float()[:, None, :], shrink[gather, ids].float())[:, 0, :] * keep  # [S, R]
        shrunk = torch.where((slots >= 0)[:, None], shrunk, 0.0)
        delta += torch.bmm(shrunk[:, None, :], expand[gather, ids].float())[:, 0, :].view(output.shape)
    output.add_(delta.to(output.dtype))


@torch.library.custom_op("mmlora::lora_experts_add_", mutates_args=("output",))
def lora_experts_add_(
    output: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    expert_ids: torch.Tensor | None,
    contract_in: bool,
    tiles: int,
    interleave: int,
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
) -> None:
    """`output += LoRA(x)` per row's adapter slot and expert; see `lora_experts_add_reference`."""
    lora_experts_add(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                     request_slots, request_cum_weights)


@lora_experts_add_.register_fake
def _lora_experts_add_fake(output, x, lora_a, lora_b, slot_ranks, expert_ids, contract_in, tiles, interleave,
                           request_slots, request_cum_weights) -> None:
    return None
