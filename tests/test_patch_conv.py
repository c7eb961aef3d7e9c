"""LoRA on the towers' patch embeddings (PEFT's conv LoRA on Conv2d and Conv3d), per request, against PEFT.

Adapters are made by PEFT (`init_lora_weights=False`, B widened) over the patch embedding and the
attention queries; every request of a mixed batch (0, 1 and 2 images; Qwen2-VL's of different
sizes) is held to PEFT on that request alone with its adapter, to 1e-4 (float32, CPU), eager and
compiled (aot_eager; LLaVA once on Inductor), and each adapter's conv LoRA is shown to move PEFT's
logits well above that. The op's unfolding is checked against PEFT's own two convolutions, and a
conv that is not a non-overlapping patch embedding is refused with a typed error.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import AdapterShapeError, UnsupportedAdapterError
from mmlora_fx.kernels.lora_patch_conv import lora_patch_conv_add, lora_patch_conv_add_reference
from mmlora_fx.linear_index import CONV, LinearIndex
from mmlora_fx.partitions import discover_partitions
from mmlora_fx.passes import conv_of, lora_ops
from mmlora_fx.peft_format import WEIGHTS_FILE, read_adapter

from .conftest import cached_model
from .peft_helpers import (assert_eager_and_compiled_equal_peft, make_adapter, peft_logits,
                           peft_model_with, relative_error)
from .test_embedding_head import lora_switched_off

NAMES = ["bob", None, "alice"]
PATCH_EMBEDDINGS = {"tiny-llava": "model.vision_tower.embeddings.patch_embedding",
                    "tiny-idefics3": "model.vision_model.embeddings.patch_embedding",
                    "tiny-qwen2-vl": "model.visual.patch_embed.proj"}


def conv_adapters(base, root, family):
    suffix = PATCH_EMBEDDINGS[family].rsplit(".", 1)[-1]
    return {name: make_adapter(base, root / name, [suffix, "q_proj"], r=2 + 2 * index, lora_alpha=5 + index, seed=index)
            for index, name in enumerate(["alice", "bob"])}


def qwen2_vl_sizes():
    sizes = zoo.ZOO["tiny-qwen2-vl"].item_sizes(zoo.ZOO["tiny-qwen2-vl"].tiny_config())
    return [[sizes[1]], [], [sizes[0], sizes[2]]]  # different sizes within and across requests


@pytest.mark.parametrize("family, inner", [("tiny-llava", "inductor"), ("tiny-idefics3", "aot_eager"),
                                           ("tiny-qwen2-vl", "aot_eager")])
def test_patch_embedding_lora_per_request_equals_peft_eager_and_compiled(tmp_path, family, inner):
    base = zoo.build(family)
    paths = conv_adapters(base, tmp_path, family)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(family), paths, max_loras=2, inner=inner)
    module = PATCH_EMBEDDINGS[family]
    assert mm.runtime.linears[module].kind == CONV and module in mm.runtime.serving.served
    peft = peft_model_with(base, paths)
    batch = zoo.make_batch(base, (1, 0, 2), item_sizes=qwen2_vl_sizes() if family == "tiny-qwen2-vl" else None, seed=7)
    singles = zoo.split_batch(base, batch)
    eager, compiled = assert_eager_and_compiled_equal_peft(mm, peft, batch, singles, NAMES)
    # The graph's own conv op served it, its rows owned per image (Qwen2-VL: packed patches, by tokens).
    ops = [op for record in mm.backend.records for op in lora_ops(record.graph_module)
           if op.target is torch.ops.mmlora.lora_conv_.default]
    assert [conv_of(op.args[0][0]).module for op in ops] == [module]
    owned = mm.runtime.ownership[module]
    assert owned.startswith("by image tokens" if family == "tiny-qwen2-vl" else "per unit (3 units"), owned
    with torch.no_grad():
        for row, name in ((0, "bob"), (2, "alice")):
            full = peft_logits(peft, singles[row], name)
            with lora_switched_off(peft, module, name):
                assert relative_error(peft_logits(peft, singles[row], name), full) > 1e-2, (name, module)


@pytest.mark.parametrize("kernel, spatial", [((4, 4), (10, 13)), ((2, 4, 4), (2, 4, 4)), ((2, 3, 2), (4, 6, 5))])
def test_the_op_equals_peft_convolutions_per_row_slot(kernel, spatial):
    """Unfolded patches through the linears' kernel == PEFT's conv by A then 1x1 conv by B, per
    row's slot (ranks below the buffer's, a slot not adapting, a request on the base model,
    a remainder the kernel does not cover)."""
    generator = torch.Generator().manual_seed(0)
    entries, channels, out, slots, rank = 3, 3, 8, 3, 4
    x = torch.randn((entries, channels) + spatial, generator=generator)
    features = channels * torch.Size(kernel).numel()
    lora_a = torch.randn(slots, rank, features, generator=generator)
    lora_b = torch.randn(slots, out, rank, generator=generator)
    ranks = torch.tensor([4, 2, 0], dtype=torch.int32)
    request_slots, cum = torch.tensor([1, -1, 0], dtype=torch.int32), torch.tensor([0, 1, 2, 3])
    conv = torch.nn.functional.conv2d if len(kernel) == 2 else torch.nn.functional.conv3d
    base = conv(x, torch.randn((out, channels) + kernel, generator=generator), stride=kernel)
    ours, expected = base.clone(), base.clone()
    lora_patch_conv_add(ours, x, kernel, lora_a, lora_b, ranks, request_slots, cum)
    lora_patch_conv_add_reference(expected, x, kernel, lora_a, lora_b, ranks, request_slots, cum)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[1], base[1]) and not torch.allclose(ours[0], base[0])


def test_a_conv_that_is_not_a_patch_embedding_is_refused(tmp_path):
    """Qwen2-Audio's first conv (kernel 3, stride 1, padding 1) overlaps: PEFT's LoRA there is no linear on patches."""
    model = cached_model("tiny-qwen2-audio")
    linears = LinearIndex(model, discover_partitions(model))
    assert not linears["model.audio_tower.conv1"].can_carry_lora
    path = make_adapter(model, tmp_path / "conv1", ["conv1"])
    with pytest.raises(UnsupportedAdapterError, match=r"conv1.*not a non-overlapping patch embedding \(kernel \(3,\) != "
                                                      r"stride \(1,\), padding \(1,\)\)"):
        read_adapter("conv1", path, linears)


def test_conv_lora_of_the_wrong_shape_names_the_patch_embedding(tmp_path):
    model = cached_model("tiny-llava")
    linears = LinearIndex(model, discover_partitions(model))
    good = make_adapter(model, tmp_path / "good", ["patch_embedding"])
    module = PATCH_EMBEDDINGS["tiny-llava"]
    assert read_adapter("good", good, linears).modules[module].lora_a.shape == (4, 3 * 4 * 4)
    for role, cut in (("lora_A", lambda t: t[:, :, :2].contiguous()), ("lora_B", lambda t: t.repeat(1, 1, 2, 2))):
        broken = tmp_path / role
        shutil.copytree(good, broken)
        tensors = load_file(str(broken / WEIGHTS_FILE))
        key = next(key for key in tensors if key.endswith(f"patch_embedding.{role}.weight"))
        tensors[key] = cut(tensors[key])
        save_file(tensors, str(broken / WEIGHTS_FILE))
        with pytest.raises(AdapterShapeError, match="patch_embedding"):
            read_adapter(role, broken, linears)
