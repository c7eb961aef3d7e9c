"""On a GPU: every kind of target beside the linears (#17, #18) is served per request, equal to PEFT.

The CPU tests hold each kind to PEFT in float32; these run the same checks with the model, PEFT
and the batch on CUDA and the default Inductor backend, so the CUDA paths of the kinds' ops (the
embedding gather, the patch convolution, the expert products, the parameter hooks) are the ones
compared. Run through the device tool (`python -m pytest -m gpu`); skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo

from .peft_helpers import all_targets, assert_eager_and_compiled_equal_peft, make_adapter, peft_model_with
from .test_videos import CLIP, IMAGE, LONG, video_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NAMES = ["bob", None, "alice"]

# family -> (extra PEFT targets beside the zoo's linears, target_parameters, modules that must be served)
CASES = {
    "tiny-llama4": ([], None, ["language_model.model.layers.1.feed_forward.experts.gate_up_proj",
                               "language_model.model.layers.1.feed_forward.experts.down_proj"]),
    "tiny-qwen3-vl-moe": ([], None, ["model.language_model.layers.0.mlp.experts.gate_up_proj"]),
    "tiny-llava": (["patch_embedding", "embed_tokens", "lm_head"], None,
                   ["model.vision_tower.embeddings.patch_embedding", "model.language_model.embed_tokens", "lm_head"]),
    "tiny-qwen2-vl": (["proj", "embed_tokens", "lm_head"], None,
                      ["model.visual.patch_embed.proj", "model.language_model.embed_tokens", "lm_head"]),
    "tiny-gemma3": ([], ["mm_input_projection_weight"], ["model.multi_modal_projector.mm_input_projection_weight"]),
}


@pytest.fixture(autouse=True)
def float32_convolutions():
    """cuDNN runs float32 convolutions in TF32 unless told not to (matmuls are float32 by
    default): PEFT's Conv3d LoRA on Qwen2-VL's patches then moved the logits by 5.6e-4 against
    ours (H100, 2026-12-06), above the float32 tolerance these tests hold, for no fault of either."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def on_cuda(batch: dict) -> dict:
    return {key: value.cuda() if torch.is_tensor(value) else value for key, value in batch.items()}


@pytest.mark.parametrize("family", list(CASES))
def test_every_target_kind_equals_peft_per_request_on_cuda(family, tmp_path):
    extra, parameters, must_serve = CASES[family]
    base = zoo.build(family)
    paths = {name: make_adapter(base, tmp_path / name, all_targets(family) + extra, r=2 + 2 * index,
                                lora_alpha=5 + index, seed=index, target_parameters=parameters)
             for index, name in enumerate(["alice", "bob"])}
    peft = peft_model_with(base, paths).cuda()
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(family).cuda(), paths, max_loras=2)
    served = mm.runtime.serving.served
    assert set(must_serve) <= served, sorted(set(must_serve) - served)
    if family == "tiny-qwen2-vl":  # videos and images in one batch and in one request
        batch, singles = video_batch(base, [[IMAGE, CLIP], [], [LONG]], seed=4)
    else:
        batch = zoo.make_batch(base, (1, 0, 2), seed=5)
        singles = zoo.split_batch(base, batch)
    assert_eager_and_compiled_equal_peft(mm, peft, on_cuda(batch), [on_cuda(single) for single in singles], NAMES)
    assert mm.compiled_graphs > 0
