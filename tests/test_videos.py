"""Videos (#18, item 4): Qwen2-VL's `pixel_values_videos`, alone and beside images in one batch
and in one request, each request's adapter on the vision tower's video rows, equal to PEFT.

Qwen2-VL runs its vision tower once for the batch's images and once for its videos; mmlora_fx
reads which call comes first off the family's code, and shares each call's rows among the
requests by their image or video tokens.
"""

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import BatchError

from .peft_helpers import all_targets, assert_rows_equal_peft, peft_family, peft_logits, relative_error

FAMILY = "tiny-qwen2-vl"


def video_batch(model, requests, seed=0, text_tokens=6):
    """A Qwen2-VL batch: `requests[r]` lists request r's media in prompt order, each
    ("image", (height, width)) or ("video", (frames, height, width)). Returns the batch and one
    batch per request holding only its own media (for PEFT alone)."""
    config = model.config
    vision = config.vision_config
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    generator = torch.Generator().manual_seed(seed)
    token_of = {"image": config.image_token_id, "video": config.video_token_id}
    prompts, media = [], []
    for items in requests:
        prompt, own = [], {"image": [], "video": []}
        for kind, size in items:
            frames, height, width = (1, *size) if kind == "image" else size
            grid = (max(1, frames // vision.temporal_patch_size), height // vision.patch_size, width // vision.patch_size)
            pixels = torch.randn(grid[0] * grid[1] * grid[2], features, generator=generator)
            prompt += [zoo.FIRST_TEXT_TOKEN, zoo.VISION_START] + [token_of[kind]] * (
                grid[0] * grid[1] * grid[2] // vision.spatial_merge_size**2) + [zoo.VISION_END]
            own[kind].append((grid, pixels))
        prompts.append(prompt)
        media.append(own)
    total = max(len(prompt) for prompt in prompts) + text_tokens + 1
    rows = []
    for prompt in prompts:
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, min(config.get_text_config().vocab_size, zoo.TEXT_TOKEN_LIMIT),
                             (total - 1 - len(prompt),),
                             generator=generator).tolist()
        rows.append([zoo.BOS] + text[: len(text) // 2] + prompt + text[len(text) // 2:])
    input_ids = torch.tensor(rows)

    def batch_of(indices):
        ids = input_ids[indices]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "mm_token_type_ids": (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()}
        for kind, pixels_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                           ("video", "pixel_values_videos", "video_grid_thw")):
            chosen = [item for index in indices for item in media[index][kind]]
            if chosen:
                batch[pixels_key] = torch.cat([pixels for _, pixels in chosen])
                batch[grid_key] = torch.tensor([grid for grid, _ in chosen])
        return batch

    return batch_of(list(range(len(requests)))), [batch_of([index]) for index in range(len(requests))]


IMAGE = ("image", (16, 16))
WIDE = ("image", (8, 16))
CLIP = ("video", (4, 8, 16))  # 2 temporal patches of 2 x 4 patches: 4 video tokens
LONG = ("video", (6, 16, 16))  # 3 temporal patches of 4 x 4: 12 video tokens


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return peft_family(tmp_path_factory.mktemp("videos"), lambda: zoo.build(FAMILY), all_targets(FAMILY),
                       names=("alice", "bob", "carol"))


def assert_adapters_act(family, singles, logits, names):
    for row, (single, name) in enumerate(zip(singles, names)):
        if name is not None:
            assert relative_error(logits[row], peft_logits(family.peft, single, None)) > 1e-2, (row, name)


@pytest.mark.parametrize("layout", [
    # videos alone; videos and images in one batch and in one request; a text-only request
    [[CLIP], [LONG], [CLIP, LONG]],
    [[IMAGE, CLIP], [], [LONG], [WIDE]],
    [[LONG, IMAGE], [CLIP, WIDE, CLIP], [IMAGE]],
], ids=["videos", "mixed", "both-in-one-request"])
def test_eager_mixed_batch_with_videos_equals_peft_per_request(family, layout):
    mm = mmlora_fx.compile(zoo.build(FAMILY), family.paths, max_loras=3)
    batch, singles = video_batch(family.base, layout, seed=len(layout))
    names = ["alice", "bob", "carol", None][: len(layout)]
    with torch.no_grad():
        logits = mm.eager(**batch, adapter_names=names).logits
    assert_rows_equal_peft(family.peft, singles, logits, names, label="eager")
    assert_adapters_act(family, singles, logits, names)
    assert mm.runtime._vision_entries == (("image", "video") if "pixel_values" in batch else ("video",))


def test_tables_are_kept_per_call_of_the_tower_not_per_kind(family):
    """What CUDA-graph replays rely on: a vision layer's first call always reads the partition's
    table and its second the second-call table, each filled with whatever that call carries."""
    mm = mmlora_fx.compile(zoo.build(FAMILY), family.paths, max_loras=3)
    runtime = mm.runtime
    batch, _ = video_batch(family.base, [[IMAGE, CLIP], [LONG]])
    mm.eager(**batch, adapter_names=["alice", "bob"])
    images, videos = [4, 0], [4, 12]  # image and video tokens per request
    assert runtime.tables["tower"].cum_weights == [0, images[0], sum(images)]
    assert runtime.second_call_tables["tower"].cum_weights == [0, videos[0], sum(videos)]
    batch, _ = video_batch(family.base, [[CLIP], [LONG]])  # videos alone: the first call carries them
    mm.eager(**batch, adapter_names=["alice", "bob"])
    assert runtime.tables["tower"].cum_weights == [0, 4, 16]
    assert runtime.second_call_tables["tower"].cum_weights == [0, 0, 0]


def test_compiled_mixed_batch_with_videos_equals_peft_per_request(family):
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(FAMILY), family.paths, max_loras=3)
    layout = [[IMAGE, CLIP], [], [LONG], [WIDE]]
    # the second forward has the same shapes, fresh inputs and the adapters moved between requests:
    # the tables change, the graphs do not (the eager tests cover the other layouts)
    for seed, names in enumerate([["alice", "bob", "carol", "alice"], ["carol", None, "alice", "bob"]]):
        batch, singles = video_batch(family.base, layout, seed=seed)
        with torch.no_grad():
            logits = mm(**batch, adapter_names=names).logits
        assert_rows_equal_peft(family.peft, singles, logits, names, label=f"compiled {seed}")
        if seed == 0:
            graphs = mm.compiled_graphs
            assert graphs > 0
    assert mm.compiled_graphs == graphs and mm.runtime.applications["tower"] > 0


def test_a_video_default_adapter_serves_requests_that_carry_videos(family):
    mm = mmlora_fx.compile(zoo.build(FAMILY), family.paths, max_loras=3, default_adapters={"video": "bob"})
    batch, singles = video_batch(family.base, [[CLIP], [IMAGE], []], seed=7)
    with torch.no_grad():
        logits = mm.eager(**batch, adapter_names=[None, None, None]).logits
    assert_rows_equal_peft(family.peft, singles, logits, ["bob", None, None])


def test_videos_on_a_model_without_a_video_token_are_refused(family):
    model = zoo.build(FAMILY)
    mm = mmlora_fx.compile(model, family.paths, max_loras=3)
    batch, _ = video_batch(family.base, [[CLIP], [IMAGE]])
    mm.runtime.video_token_ids = []
    with pytest.raises(BatchError, match="no video token"):
        mm.eager(**batch, adapter_names=["alice", "bob"])
