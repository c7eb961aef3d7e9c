"""The tiny model zoo: real Hugging Face classes, valid batches, requests that can be split."""

import pytest
import torch

from mmlora_fx import zoo
from mmlora_fx.errors import MMLoRAError  # noqa: F401  (the package imports cleanly)

from .conftest import cached_model


def test_every_family_is_a_real_transformers_class(family):
    import transformers

    model = cached_model(family)
    assert type(model) is getattr(transformers, zoo.ZOO[family].model_class)
    assert sum(parameter.numel() for parameter in model.parameters()) < 1_000_000


def test_a_batch_row_equals_its_request_run_alone(family):
    """Requests with 0, 1 and 2 images share one batch and give what they give alone."""
    model = cached_model(family)
    batch = zoo.make_batch(model, (0, 1, 2), seed=3)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, single in enumerate(zoo.split_batch(model, batch)):
            alone = model(**single).logits[0]
            torch.testing.assert_close(logits[row], alone, rtol=1e-4, atol=1e-5)


def test_requests_hold_the_items_asked_for(family):
    model = cached_model(family)
    batch = zoo.make_batch(model, (2, 0, 1))
    item = zoo.item_token_id(model)
    counts = [(row == item).sum().item() for row in batch["input_ids"]]
    per_image = zoo.ZOO[family].item_tokens(model.config, zoo.ZOO[family].item_sizes(model.config)[0])
    assert counts == [2 * per_image, 0, per_image]
    assert batch["input_ids"].shape[0] == 3


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen3-vl-moe"])
def test_qwen_vl_takes_images_of_different_sizes(name):
    model = cached_model(name)
    sizes = zoo.ZOO[name].item_sizes(model.config)
    batch = zoo.make_batch(model, (1, 2), item_sizes=[[sizes[1]], [sizes[0], sizes[2]]])
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 4, 4], [1, 4, 6]]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, single in enumerate(zoo.split_batch(model, batch)):
            torch.testing.assert_close(logits[row], model(**single).logits[0], rtol=1e-4, atol=1e-5)


def test_unknown_sizes_and_models_are_refused():
    model = cached_model("tiny-llava")
    with pytest.raises(ValueError, match="takes images of sizes like"):
        zoo.make_batch(model, (1,), item_sizes=[[(7, 7)]])
    qwen = cached_model("tiny-qwen2-vl")
    assert zoo.make_batch(qwen, (1,), item_sizes=[[(24, 32)]])["image_grid_thw"].tolist() == [[1, 6, 8]]
    with pytest.raises(ValueError, match="takes images of sizes like"):
        zoo.make_batch(qwen, (1,), item_sizes=[[(12, 16)]])  # not a multiple of patch * merge
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("tiny-nothing")


def test_audio_clips_of_different_lengths_split_by_their_token_runs():
    model = cached_model("tiny-qwen2-audio")
    batch = zoo.make_batch(model, (2, 0, 1), item_sizes=[[(100,), (31,)], [], [(60,)]], seed=2)
    assert [(row == zoo.item_token_id(model)).sum().item() for row in batch["input_ids"]] == [25 + 8, 0, 15]
    singles = zoo.split_batch(model, batch)
    assert [single["feature_attention_mask"].sum(-1).tolist() for single in singles if "input_features" in single] == \
        [[100, 31], [60]]
    with torch.no_grad():
        logits = model(**batch).logits
        for row, single in enumerate(singles):
            torch.testing.assert_close(logits[row], model(**single).logits[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"takes audio items of sizes like \(\(100,\)"):
        zoo.make_batch(model, (1,), item_sizes=[[(101,)]])
