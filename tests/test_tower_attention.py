"""benchmarks/tower_attention.py: the vision tower's attention as flex_attention over a same-image
block mask computes what transformers' per-image SDPA computes, for images of different sizes, and
mmlora_fx serves a model built with it as PEFT does, per request (#16: the base and ours both run
it, so the tower compiles to one graph instead of a few per block)."""

import copy

import pytest
import torch

import mmlora_fx
from benchmarks import e2e, tower_attention
from mmlora_fx import zoo

from .peft_helpers import assert_eager_and_compiled_equal_peft, make_adapter, peft_model_with, relative_error

# A small image, a wide one and a tall one: 16, 24 and 8 patches of 14 pixels (merge 2).
SIZES = [[(56, 56)], [(56, 84)], [(28, 56)]]


def tiny(attention: str):
    return e2e.build_model(e2e.TINY, torch.device("cpu"), torch.float32, tower_attention=attention)


def tower_inputs(model):
    batch = zoo.make_batch(model, [1, 1, 1], item_sizes=SIZES, text_tokens=8, seed=3)
    return batch["pixel_values"], batch["image_grid_thw"]


def test_flex_tower_equals_sdpa_tower_on_images_of_different_sizes():
    sdpa, flex = tiny("sdpa"), tiny("flex")
    assert flex.model.visual.blocks[0].attn.config._attn_implementation == tower_attention.NAME
    assert flex.model.language_model.config._attn_implementation == "sdpa"
    pixels, grid = tower_inputs(sdpa)
    with torch.no_grad():
        expected = sdpa.model.visual(pixels, grid_thw=grid).pooler_output
        assert relative_error(flex.model.visual(pixels, grid_thw=grid).pooler_output, expected) <= 1e-5
        # Inductor's flex kernel skips the blocks the mask empties: the compiled tower must agree too.
        torch._dynamo.reset()
        compiled = torch.compile(flex.model.visual, dynamic=False)(pixels, grid_thw=grid).pooler_output
    assert relative_error(compiled, expected) <= 1e-5


def test_flex_tower_attention_mixes_no_images():
    """Each image's rows attend to that image alone: changing one image leaves the others' rows."""
    model = tiny("flex")
    pixels, grid = tower_inputs(model)
    rows = (grid.prod(dim=-1) // 4).tolist()  # merged rows per image
    changed = pixels.clone()
    first = int(grid[0].prod())
    changed[:first] = torch.randn_like(changed[:first])
    with torch.no_grad():
        before = model.model.visual(pixels, grid_thw=grid).pooler_output
        after = model.model.visual(changed, grid_thw=grid).pooler_output
    assert relative_error(after[:rows[0]], before[:rows[0]]) > 1e-2
    assert torch.equal(after[rows[0]:], before[rows[0]:])


def test_mixed_batch_on_flex_tower_equals_peft_per_request(tmp_path):
    base = tiny("flex")
    targets = e2e.LM_TARGETS + e2e.VISION_TARGETS
    paths = {name: make_adapter(base, tmp_path / name, targets, r=4, lora_alpha=9, seed=seed)
             for seed, name in enumerate(["alice", "bob"])}
    peft_model = peft_model_with(base, paths)
    names = ["bob", None, "alice"]
    batch = zoo.make_batch(base, [1, 1, 1], item_sizes=SIZES, text_tokens=8, seed=5)
    singles = zoo.split_batch(base, batch)
    torch._dynamo.reset()
    mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="aot_eager")
    assert_eager_and_compiled_equal_peft(mm, peft_model, batch, singles, names)


def test_unknown_tower_attention_is_refused():
    with pytest.raises(ValueError, match="tower attention 'flash'"):
        tiny("flash")
