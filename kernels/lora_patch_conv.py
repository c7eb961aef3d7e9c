"""The `mmlora::lora_patch_conv_add_` custom op: mixed-adapter LoRA added to a patch embedding's output.

PEFT's LoRA on a convolution (`lora.Conv2d`, `lora.Conv3d`) is `lora_B(lora_A(x)) * scaling`: `lora_A`
a convolution with the base's kernel, stride and padding from the input channels to `r`, `lora_B`
a 1x1 convolution from `r` to the output channels. On a patch embedding (kernel == stride, no
padding, dilation 1, one group) every output position reads one patch of its own, so that is a
linear on each patch's flattened pixels: `A [r, C * prod(kernel)]` (PEFT's `lora_A` weight,
flattened), `B [out, r]`. The slot buffers hold them as a linear's, and this op unfolds the
patches and runs the linears' kernel (`lora_add`) on them.

Rows: the patches of input entry `n` are rows `[n, positions, C * prod(kernel)]` (a tower's units
when the entries are images, `rows_are_units`), or `[n, C * prod(kernel)]` where each entry is one
patch (Qwen2-VL's Conv3d takes packed patches `[patches, C, T, P, P]` with a kernel covering the
whole patch: the rows its other layers share by image tokens). The output is channels first
`[N, out, *positions]`; the delta is written back in that layout.

This file keeps the op, its fake and two plain-torch bodies together:

* `lora_patch_conv_add_reference`: PEFT's own computation per adapter slot (a convolution by A,
  a 1x1 convolution by B), each row then taking its slot's result: the tests' oracle, which
  shares no code with the unfolding;
* `lora_patch_conv_add`: the op's body, unfold + `lora_add` (Triton on CUDA, the reference on
  the CPU); no host reads, static shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .lora_add import lora_add
from .reference import row_slots

__all__ = ["patch_rows", "lora_patch_conv_add", "lora_patch_conv_add_", "lora_patch_conv_add_reference"]

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def patch_rows(x: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """The non-overlapping patches of `x [N, C, *spatial]` as rows `[N, positions, C * prod(kernel)]`
    (`[N, C * prod(kernel)]` where each entry is one patch), each flattened as the convolution's
    weight is (`C`, then the kernel's dimensions). A remainder the kernel does not cover is dropped,
    as the convolution drops it."""
    dims = len(kernel)
    entries, channels = x.shape[0], x.shape[1]
    counts = [size // step for size, step in zip(x.shape[2:], kernel)]
    covered = x[(slice(None), slice(None)) + tuple(slice(0, count * step) for count, step in zip(counts, kernel))]
    # [N, C, n1, k1, n2, k2, ...] -> [N, n1, n2, ..., C, k1, k2, ...]
    split = covered.reshape([entries, channels] + [value for pair in zip(counts, kernel) for value in pair])
    order = [0] + [2 + 2 * index for index in range(dims)] + [1] + [3 + 2 * index for index in range(dims)]
    positions = math.prod(counts)
    rows = split.permute(order).reshape(entries, positions, channels * math.prod(kernel))
    return rows[:, 0] if positions == 1 else rows


def _check_shapes(output, x, lora_a, lora_b, kernel) -> None:
    """Static shape checks only (no device reads)."""
    features = x.shape[1] * math.prod(kernel)
    if lora_a.shape[2] != features or lora_b.shape[1] != output.shape[1] or lora_b.shape[2] != lora_a.shape[1]:
        raise ValueError(f"lora_patch_conv_add_: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not fit a "
                         f"patch embedding of {features} pixels per patch to {output.shape[1]} channels")
    expected = [x.shape[0], output.shape[1]] + [size // step for size, step in zip(x.shape[2:], kernel)]
    if list(output.shape) != expected:
        raise ValueError(f"lora_patch_conv_add_: output {tuple(output.shape)} is not the patch embedding of input "
                         f"{tuple(x.shape)} with kernel {tuple(kernel)}")


def _channels_last(output: torch.Tensor) -> torch.Tensor:
    """`[N, out, *positions]` as `[N, positions, out]` (a view)."""
    return output.flatten(2).transpose(1, 2)


def lora_patch_conv_add_reference(output, x, kernel, lora_a, lora_b, slot_ranks, request_slots,
                                  request_cum_weights) -> None:
    """`output += scaling * conv1x1(B, conv(A, x))` per row's slot, as PEFT computes it."""
    kernel = tuple(kernel)
    _check_shapes(output, x, lora_a, lora_b, kernel)
    convolution = _CONVOLUTIONS[len(kernel)]
    rows = output.shape[0] * math.prod(output.shape[2:])
    slots = row_slots(request_slots, request_cum_weights, rows)
    delta = torch.zeros_like(_channels_last(output), dtype=torch.float32)
    for slot in range(lora_a.shape[0]):
        rank = int(slot_ranks[slot])
        if rank == 0 or not bool((slots == slot).any()):
            continue
        a = lora_a[slot, :rank].float().reshape((rank, x.shape[1]) + kernel)
        b = lora_b[slot, :, :rank].float().reshape((lora_b.shape[1], rank) + (1,) * len(kernel))
        mine = _channels_last(convolution(convolution(x.float(), a, stride=kernel), b))
        delta += torch.where((slots == slot).view(delta.shape[:2] + (1,)), mine, 0.0)
    _channels_last(output).add_(delta.to(output.dtype))


def lora_patch_conv_add(output, x, kernel, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights,
                        tile_plan=None, rows=None) -> None:
    """The op's body: the patches as rows through the linears' kernel (see the module's doc).
    `rows`: `patch_rows(x, kernel)` where the caller already has it."""
    kernel = tuple(kernel)
    _check_shapes(output, x, lora_a, lora_b, kernel)
    rows = patch_rows(x, kernel) if rows is None else rows
    delta = torch.zeros(rows.shape[:-1] + (output.shape[1],), dtype=output.dtype, device=output.device)
    lora_add([delta], rows, [lora_a], [lora_b], [slot_ranks], request_slots, request_cum_weights, tile_plan)
    _channels_last(output).add_(delta.reshape(output.shape[0], -1, output.shape[1]))


@torch.library.custom_op("mmlora::lora_patch_conv_add_", mutates_args=("output",))
def lora_patch_conv_add_(
    output: torch.Tensor,
    x: torch.Tensor,
    kernel: list[int],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: torch.Tensor,
    request_slots: torch.Tensor,
    request_cum_weights: torch.Tensor,
) -> None:
    """`output += LoRA(patches of x)` per row's adapter slot; see `lora_patch_conv_add_reference`."""
    lora_patch_conv_add(output, x, kernel, lora_a, lora_b, slot_ranks, request_slots, request_cum_weights)


@lora_patch_conv_add_.register_fake
def _lora_patch_conv_add_fake(output, x, kernel, lora_a, lora_b, slot_ranks, request_slots,
                              request_cum_weights) -> None:
    return None
