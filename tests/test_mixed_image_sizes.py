"""Images of different sizes in one batch: every tower and connector row gets its own request's
adapter (#13), on families outside the zoo whose tower rows do not follow the image tokens.

- LLaVA-NeXT (any-resolution tiling): an image becomes a number of crops that depends on its
  size, and its image tokens follow the unpadded grid: tower rows are not proportional to tokens.
- LFM2-VL (a fixed patch budget): every image is padded to the same number of patches in the
  tower, while its tokens follow its own grid; the projector runs once per image.

Each request is compared with PEFT on that request alone (float32, 1e-4).
"""

import copy

import pytest
import torch

import mmlora_fx
from mmlora_fx.errors import BatchError

from .families import (LFM2_TARGETS, LLAVA_NEXT_TARGETS, build_lfm2_vl, build_llava_next, lfm2_vl_batch,
                       llava_next_batch)
from .peft_helpers import assert_rows_equal_peft, peft_family

NAMES = ["alice", None, "bob"]
# One small image; none; a wide one and a large one: 3, 0 and 3 + 5 crops, 36, 0 and 52 + 88 tokens.
LLAVA_NEXT_SIZES = [[(16, 16)], [], [(16, 30), (32, 32)]]
# Patch grids inside a 64-patch budget: 24, none, 64 and 24 patches; 6, 0, 16 + 6 tokens.
LFM2_GRIDS = [[(4, 6)], [], [(8, 8), (6, 4)]]


def _family(tmp_path_factory, name, build, targets):
    return peft_family(tmp_path_factory.mktemp(name), build, targets)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    return _family(tmp_path_factory, "llava_next", build_llava_next, LLAVA_NEXT_TARGETS)


@pytest.fixture(scope="module")
def lfm2_vl(tmp_path_factory):
    return _family(tmp_path_factory, "lfm2_vl", build_lfm2_vl, LFM2_TARGETS)


def assert_equals_peft(family, batch, logits, names=NAMES):
    assert_rows_equal_peft(family.peft, batch.singles, logits, names)


def served(family, **options):
    torch._dynamo.reset()
    return mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=2, **options)


def test_tiled_images_of_different_sizes_equal_peft_per_request(llava_next):
    batch = llava_next_batch(llava_next.base, LLAVA_NEXT_SIZES, seed=1)
    mm = served(llava_next, inner="eager")
    with torch.no_grad():
        assert_equals_peft(llava_next, batch, mm.eager(**batch.inputs, adapter_names=NAMES).logits)
        assert_equals_peft(llava_next, batch, mm(**batch.inputs, adapter_names=NAMES).logits)
    tower_and_connector = {module: how for module, how in mm.runtime.ownership.items()}
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in tower_and_connector
    assert "model.multi_modal_projector.linear_1" in tower_and_connector
    assert all(how.startswith("per unit (11 units") for how in tower_and_connector.values()), tower_and_connector


def test_touching_images_of_different_crops_need_images_per_request(llava_next):
    # No text token between the last request's two images: its tokens cannot say where one ends.
    batch = llava_next_batch(llava_next.base, LLAVA_NEXT_SIZES, seed=2, separate=False)
    mm = served(llava_next, inner="eager")
    with torch.no_grad():
        with pytest.raises(BatchError, match="images_per_request"):
            mm.eager(**batch.inputs, adapter_names=NAMES)
        logits = mm.eager(**batch.inputs, adapter_names=NAMES, images_per_request=[1, 0, 2]).logits
    assert_equals_peft(llava_next, batch, logits)


def test_without_the_batch_s_inputs_tiled_rows_are_refused_not_guessed(llava_next):
    # The backend by name gets only input_ids: the crops cannot be traced, and tokens do not fit them.
    batch = llava_next_batch(llava_next.base, LLAVA_NEXT_SIZES, seed=1)
    torch._dynamo.reset()
    options = {"adapters": llava_next.paths, "max_loras": 2, "inner": "eager"}
    compiled = torch.compile(copy.deepcopy(llava_next.base), backend="mmlora", options=options)
    with torch.no_grad(), pytest.raises(BatchError, match="could not trace this family's tower units"):
        with mmlora_fx.adapter_names(NAMES, input_ids=batch.inputs["input_ids"]):
            compiled(**batch.inputs)


def test_padded_patch_budget_images_of_different_sizes_equal_peft_per_request(lfm2_vl):
    batch = lfm2_vl_batch(LFM2_GRIDS, seed=1)
    mm = served(lfm2_vl, inner="eager")
    with torch.no_grad():
        assert_equals_peft(lfm2_vl, batch, mm.eager(**batch.inputs, adapter_names=NAMES).logits)
        assert_equals_peft(lfm2_vl, batch, mm(**batch.inputs, adapter_names=NAMES).logits)
    ownership = mm.runtime.ownership
    assert ownership["model.vision_tower.encoder.layers.0.mlp.fc1"].startswith("per unit (3 units")
    # The projector runs once per image, on that image's tokens: one stream of rows, one per token.
    assert ownership["model.multi_modal_projector.linear_1"].startswith("by image tokens, one row per token over 3")
