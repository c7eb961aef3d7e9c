"""mmlora_fx.use_flex_tower_attention: the vision tower's attention as flex_attention over a
same-image block mask computes what transformers' per-image SDPA computes, for images of different
sizes; mmlora_fx serves a model built with it as PEFT does, per request (#16: the base and ours both
run it, so the tower compiles to one graph instead of a few per block); what it does not serve is
refused with TowerAttentionError."""

import copy

import pytest
import torch

import mmlora_fx
from benchmarks import e2e
from mmlora_fx import tower_attention, zoo
from mmlora_fx.errors import TowerAttentionError

from .peft_helpers import assert_eager_and_compiled_equal_peft, make_adapter, peft_model_with, relative_error

# A small image, a wide one and a tall one: 16, 24 and 8 patches of 14 pixels (merge 2).
SIZES = [[(56, 56)], [(56, 84)], [(28, 56)]]


def tiny(attention: str):
    return e2e.build_model(e2e.TINY, torch.device("cpu"), torch.float32, tower_attention=attention)


def tower_inputs(model):
    batch = zoo.make_batch(model, [1, 1, 1], item_sizes=SIZES, text_tokens=8, seed=3)
    return batch["pixel_values"], batch["image_grid_thw"]


def test_compiled_flex_tower_equals_sdpa_tower_on_images_of_different_sizes():
    sdpa, flex = tiny("sdpa"), tiny("flex")
    assert flex.model.visual.blocks[0].attn.config._attn_implementation == tower_attention.NAME
    assert flex.model.language_model.config._attn_implementation == "sdpa"
    pixels, grid = tower_inputs(sdpa)
    with torch.no_grad():
        expected = sdpa.model.visual(pixels, grid_thw=grid).pooler_output
        # Run eagerly the function takes transformers' per-image SDPA (flex would materialise
        # every pair's score): the same as the SDPA tower.
        assert relative_error(flex.model.visual(pixels, grid_thw=grid).pooler_output, expected) <= 1e-6
        torch._dynamo.reset()
        compiled = torch.compile(flex.model.visual, dynamic=False)(pixels, grid_thw=grid).pooler_output
    assert relative_error(compiled, expected) <= 1e-5


# Images whose boundaries fall inside flex's 128-row blocks, and a last block cut short.
LENGTHS = [100, 7, 193, 130]


def test_flex_attention_keeps_images_apart_across_block_boundaries():
    """Compiled, each image's rows attend to that image alone, as per-image SDPA: changing one
    image's keys and values leaves every other image's rows as they were."""
    generator = torch.Generator().manual_seed(0)
    rows = sum(LENGTHS)
    query, key, value = (torch.randn(1, 2, rows, 16, generator=generator) for _ in range(3))
    cu_seqlens = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    torch._dynamo.reset()
    attention = torch.compile(tower_attention.varlen_flex_attention, dynamic=False)
    with torch.no_grad():
        before = attention(None, query, key, value, cu_seq_lens_q=cu_seqlens)[0]
        assert relative_error(before, tower_attention.per_image_sdpa(query, key, value, cu_seqlens)) <= 1e-5
        second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])  # 7 rows inside the first block
        key[:, :, second], value[:, :, second] = torch.randn(2, 1, 2, LENGTHS[1], 16, generator=generator)
        after = attention(None, query, key, value, cu_seq_lens_q=cu_seqlens)[0]
    assert relative_error(after[:, second], before[:, second]) > 1e-2
    assert torch.allclose(after[:, :second.start], before[:, :second.start], atol=1e-6)
    assert torch.allclose(after[:, second.stop:], before[:, second.stop:], atol=1e-6)


def test_the_block_table_visits_only_blocks_holding_a_query_block_s_images():
    # 4 blocks of 128 rows; images [0, 100), [100, 107), [107, 300), [300, 430).
    mask = tower_attention.same_image_block_mask(torch.tensor([0, 100, 107, 300, 430]), 430)
    counts, indices = mask.kv_num_blocks.flatten().tolist(), mask.kv_indices[0, 0].tolist()
    # Query block 0 (rows 0-127) holds images 0-2: keys 0-299, blocks 0-2; block 1 (128-255) image
    # 2: keys 107-299, blocks 0-2; block 2 (256-383) images 2-3: blocks 0-3; block 3 image 3: 2-3.
    assert counts == [3, 3, 4, 2]
    assert [row[:count] for row, count in zip(indices, counts)] == [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [2, 3]]


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


def test_a_model_without_a_vision_tower_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(TowerAttentionError, match="LlamaForCausalLM: no module holds the model's config.vision_config"):
        mmlora_fx.use_flex_tower_attention(text_only)


@pytest.mark.parametrize("call, refused", [
    (dict(), "no cu_seq_lens_q"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4]), is_causal=True), "causal attention"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4]), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool), dropout=0.1),
     "an attention mask and dropout"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4]), key_rows=6), "keys of another length than the queries"),
])
def test_calls_it_does_not_serve_are_refused_by_name(call, refused):
    call = dict(call)  # the parameter's own dict stays as collected
    query, key = torch.randn(1, 2, 4, 8), torch.randn(1, 2, call.pop("key_rows", 4), 8)
    with pytest.raises(TowerAttentionError, match=f"Linear called it with {refused}"):
        tower_attention.varlen_flex_attention(torch.nn.Linear(1, 1), query, key, key, **call)


def test_a_causal_module_is_refused_when_the_call_does_not_say():
    # transformers' attention functions read `module.is_causal` where the call passes no is_causal.
    module, query = torch.nn.Linear(1, 1), torch.randn(1, 2, 4, 8)
    module.is_causal = True
    with pytest.raises(TowerAttentionError, match="Linear called it with causal attention"):
        tower_attention.varlen_flex_attention(module, query, query, query, cu_seq_lens_q=torch.tensor([0, 4]))
    module.is_causal = False
    served = tower_attention.varlen_flex_attention(module, query, query, query, cu_seq_lens_q=torch.tensor([0, 4]))[0]
    assert relative_error(served, tower_attention.per_image_sdpa(query, query, query, torch.tensor([0, 4]))) == 0


def test_benchmarks_refuse_an_unknown_tower_attention():
    with pytest.raises(ValueError, match="tower attention 'flash'"):
        tiny("flash")
