"""The vision tower's attention without a graph break per block: `use_flex_tower_attention(model)`.

transformers' Qwen2-VL family tower (and those built like it) splits its packed rows per image
with `lengths.tolist()` in every block's attention unless a flash-attention implementation is
asked for: under torch.compile that is a graph break per block, ~5 compiled regions a block
(measured on the CPU: 55 regions a forward at 2 tower blocks, 85 at 8, +5 a block), each a
CUDA-graph replay and a guard check under `mode="reduce-overhead"`. A flash implementation takes
the packed rows with `cu_seq_lens_q` instead, so this registers one under a name containing
"flash" (transformers' test for that branch) that runs `flex_attention` with a block mask of
"same image" built from `cu_seqlens` on the device: no break in the blocks (one is left per
forward, at the tower's top: transformers reads `max_seqlen` with `.item()` for any "flash" name),
and Inductor's flex kernel visits only the 128x128 blocks that hold rows of one image, so the work
is the per-image attention's, not the packed sequence's square. The block table is built from the
images' row ranges, O((rows / 128)^2) per block, not by evaluating the mask at every pair of rows.

Run eagerly (the benchmarks' eager references, `mm.eager`) flex_attention would materialise every
pair's score in float32 (~16 GiB a call at case a's 8,192 rows, ~256 GiB at case b's): there the
function runs transformers' own per-image SDPA instead, which an eager run can afford.

This changes the base model's attention kernel, not what it computes, and has nothing to do with
LoRA: apply it to the base model you compare against as well (the benchmarks do, `--tower-attention
flex`, and report the base both ways). It serves towers that hand transformers' attention function
their packed rows with `cu_seq_lens_q` (the Qwen2-VL family's and those built like it); any other
call is refused with `TowerAttentionError` at the first forward.
"""
from __future__ import annotations

import torch

from .errors import TowerAttentionError

__all__ = ["NAME", "use_flex_tower_attention", "varlen_flex_attention", "per_image_sdpa", "same_image_block_mask"]

NAME = "flash_varlen_flex"
BLOCK = 128  # flex_attention's default block of rows


def per_image_sdpa(query, key, value, cu_seqlens, scaling=None):
    """transformers' tower attention without a flash implementation: split per image, SDPA, cat;
    `[1, heads, rows, head_dim]` in, `[1, rows, heads, head_dim]` out."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    outputs = [torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
               for q, k, v in zip(*(torch.split(t, lengths, dim=2) for t in (query, key, value)))]
    return torch.cat(outputs, dim=2).transpose(1, 2)


def same_image_block_mask(cu_seqlens: torch.Tensor, rows: int):
    """The BlockMask of "a row attends to the rows of its own image" from the images' boundaries:
    per block of query rows, the key blocks from the first image's first row to the last image's
    last row (every one partial, the mask deciding inside), with no dense `rows x rows` pass."""
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    bounds = cu_seqlens.to(torch.int64)
    # Each row's image, counted from 1: the boundaries at or before it (the first is 0). Searched in
    # the whole `bounds`, not in the slice `bounds[1:]`: torch 2.11's Inductor cannot lower
    # searchsorted over a slice (NotImplementedError: SliceView, H100, 2026-12-07); 2.13's can.
    # The mask reads it as it comes (Inductor's CPU flex template takes no arithmetic on it).
    image_of_row = torch.searchsorted(bounds, torch.arange(rows, device=device), right=True)
    blocks = -(-rows // BLOCK)
    first_row = torch.arange(blocks, device=device) * BLOCK
    last_row = (first_row + BLOCK).clamp(max=rows) - 1
    low = bounds[image_of_row[first_row] - 1] // BLOCK  # the first key block of the block's first image
    high = -(-bounds[image_of_row[last_row]] // BLOCK)  # past the last key block of its last image
    counts = (high - low).to(torch.int32)
    indices = (low[:, None] + torch.arange(blocks, device=device)).clamp(max=blocks - 1).to(torch.int32)

    def same_image(batch, head, q_row, kv_row):
        return image_of_row[q_row] == image_of_row[kv_row]

    return BlockMask.from_kv_blocks(counts[None, None], indices[None, None], BLOCK_SIZE=BLOCK, mask_mod=same_image,
                                    seq_lengths=(rows, rows))


def varlen_flex_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          is_causal=None, cu_seq_lens_q=None, **kwargs):
    """transformers' attention-function signature: query/key/value `[1, heads, rows, head_dim]`, the
    rows packed image after image with `cu_seq_lens_q` their boundaries; returns `[1, rows, heads,
    head_dim]` as transformers' own functions do."""
    from torch.nn.attention.flex_attention import flex_attention

    if is_causal is None:  # as transformers' own attention functions: the module says, where the call does not
        is_causal = getattr(module, "is_causal", False)
    refused = [why for why, present in (("no cu_seq_lens_q (the images' row boundaries)", cu_seq_lens_q is None),
                                        ("an attention mask", attention_mask is not None),
                                        ("causal attention", is_causal), ("dropout", bool(dropout)),
                                        ("keys of another length than the queries", key.shape[2] != query.shape[2]))
               if present]
    if refused:
        raise TowerAttentionError(
            f"the flex tower attention serves packed, unmasked, non-causal self-attention with cu_seq_lens_q; "
            f"{type(module).__name__} called it with {' and '.join(refused)}: "
            "leave this tower's attention as it was built")
    if not torch.compiler.is_compiling():
        return per_image_sdpa(query, key, value, cu_seq_lens_q, scaling), None
    block_mask = same_image_block_mask(cu_seq_lens_q, query.shape[2])
    if query.device.type == "cpu":
        # Inductor's CPU flex template reads the layout of its inputs as plain buffers (torch 2.13
        # fails on the tower's permuted views); Triton's reads strides, so CUDA skips the copies.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    output = flex_attention(query, key, value, block_mask=block_mask, scale=scaling)
    return output.transpose(1, 2), None


def use_flex_tower_attention(model) -> None:
    """Give `model`'s vision tower (the modules holding `model.config.vision_config`) this attention
    (`NAME`); the language model keeps its own. Call it once on the built model, before compiling,
    and on the base model you compare against alike. Raises `TowerAttentionError` if no module
    holds a `vision_config`."""
    from transformers import AttentionInterface

    vision = getattr(getattr(model, "config", None), "vision_config", None)
    if vision is None or not any(getattr(module, "config", None) is vision for module in model.modules()):
        raise TowerAttentionError(
            f"{type(model).__name__}: no module holds the model's config.vision_config, so there is no vision "
            "tower whose attention this could replace")
    AttentionInterface.register(NAME, varlen_flex_attention)
    # Set as an attribute after the model is built: transformers' checks at load time would look
    # for the flash-attention package behind any name with "flash" in it.
    vision._attn_implementation = NAME
