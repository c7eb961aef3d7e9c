"""The vision tower's attention without a graph break per block, for the base and mmlora_fx alike.

transformers' Qwen2-VL family tower (and those built like it) splits its packed rows per image
with `lengths.tolist()` in every block's attention unless a flash-attention implementation is
asked for: under torch.compile that is a graph break per block, ~5 compiled regions a block
(measured on the CPU: 55 regions a forward at 2 tower blocks, 85 at 8, +5 a block), each a
CUDA-graph replay and a guard check under `mode="reduce-overhead"`. A flash implementation takes
the packed rows with `cu_seq_lens_q` instead, so this registers one under a name containing
"flash" (transformers' test for that branch) that runs `flex_attention` with a block mask of
"same image" built from `cu_seqlens` on the device: the tower becomes one graph (44 regions at
any depth on the CPU), and Inductor's flex kernel skips the blocks the mask empties, so the work is
the per-image attention's, not the packed sequence's square.

This changes the base model's attention kernel, not what it computes; the benchmarks apply it to
the base and to mmlora_fx's model alike (`--tower-attention flex`) and report the base both ways.
"""
from __future__ import annotations

import torch

NAME = "flash_varlen_flex"
CHOICES = ("sdpa", "flex")


def varlen_flex_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          is_causal=False, cu_seq_lens_q=None, **kwargs):
    """transformers' attention-function signature: query/key/value `[1, heads, rows, head_dim]`, the
    rows packed image after image with `cu_seq_lens_q` their boundaries; returns `[1, rows, heads,
    head_dim]` as transformers' own functions do."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if cu_seq_lens_q is None or attention_mask is not None or is_causal or dropout:
        raise NotImplementedError(f"{NAME} serves packed, unmasked, non-causal tower attention only")
    rows = query.shape[2]
    image_of_row = torch.searchsorted(cu_seq_lens_q[1:].to(torch.int64), torch.arange(rows, device=query.device),
                                      right=True)

    def same_image(batch, head, q_row, kv_row):
        return image_of_row[q_row] == image_of_row[kv_row]

    block_mask = create_block_mask(same_image, 1, 1, rows, rows, device=query.device)
    if query.device.type == "cpu":
        # Inductor's CPU flex template reads the layout of its inputs as plain buffers (torch 2.13
        # fails on the tower's permuted views); Triton's reads strides, so CUDA skips the copies.
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    output = flex_attention(query, key, value, block_mask=block_mask, scale=scaling)
    return output.transpose(1, 2), None


def use_in_tower(model, choice: str) -> None:
    """Give `model`'s vision tower (`config.vision_config`) the attention `choice` (CHOICES):
    "sdpa" leaves it as built, "flex" registers and sets `NAME`. The language model keeps its own."""
    if choice == "sdpa":
        return
    if choice != "flex":
        raise ValueError(f"tower attention {choice!r}: expected one of {CHOICES}")
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_flex_attention)
    vision = model.config.vision_config
    # Set as an attribute after the model is built: transformers' checks at load time would look
    # for the flash-attention package behind any name with "flash" in it.
    vision._attn_implementation = NAME
    shared = [module for module in model.modules() if getattr(module, "config", None) is vision]
    if not shared:
        raise ValueError("no module holds the model's vision_config: not a tower this attention knows")
