"""Default adapters per modality (#18): a request that carries images (or audio) and names no
adapter gets the modality's default; "__base__" and text-only requests keep the base model."""

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.default_adapters import DefaultAdapters
from mmlora_fx.errors import BatchError, DefaultAdapterError, UnknownAdapterError

from .peft_helpers import all_targets, assert_rows_equal_peft, peft_family, peft_logits, relative_error

FAMILY = "tiny-llava"


def defaults_over(items=("image", "audio"), loaded=("asr", "ocr", "chat")):
    return DefaultAdapters(items, is_loaded=lambda name: name in loaded)


def test_a_request_carrying_a_modality_and_no_name_gets_its_default():
    defaults = defaults_over()
    defaults.update({"image": "ocr", "audio": "asr"})
    names = defaults.resolve([None, None, None, "chat", "__base__"],
                             {"image": [2, 0, 0, 1, 1], "audio": [0, 1, 0, 0, 0]})
    assert names == ["ocr", "asr", None, "chat", "__base__"]


def test_a_request_carrying_two_modalities_with_different_defaults_is_refused():
    defaults = defaults_over()
    defaults.update({"image": "ocr", "audio": "asr"})
    with pytest.raises(BatchError, match="request 1 .* image and audio"):
        defaults.resolve([None, None], {"image": [0, 1], "audio": [0, 2]})
    defaults.set("audio", "ocr")  # the same default for both: nothing to choose between
    assert defaults.resolve([None, None], {"image": [0, 1], "audio": [0, 2]}) == [None, "ocr"]


def test_bad_defaults_are_refused_and_leave_the_others_as_they_were():
    defaults = defaults_over()
    defaults.set("image", "ocr")
    with pytest.raises(DefaultAdapterError, match="'video' requests"):
        defaults.update({"audio": "asr", "video": "chat"})
    with pytest.raises(UnknownAdapterError, match="'nobody'.*not loaded"):
        defaults.update({"audio": "nobody"})
    assert defaults.as_dict() == {"image": "ocr"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    family = peft_family(tmp_path_factory.mktemp("defaults"), lambda: zoo.build(FAMILY), all_targets(FAMILY))
    mm = mmlora_fx.compile(zoo.build(FAMILY), family.paths, max_loras=2, default_adapters={"image": "alice"})
    return family, mm


def test_mixed_batch_with_an_image_default_equals_peft_per_request(served):
    family, mm = served
    batch = zoo.make_batch(family.base, (0, 1, 2, 1), seed=3)
    singles = zoo.split_batch(family.base, batch)
    with torch.no_grad():
        logits = mm.eager(**batch, adapter_names=[None, None, "bob", "__base__"]).logits
    # Request 1 carries an image and names none: alice, the image default. Request 0 is text only.
    assert_rows_equal_peft(family.peft, singles, logits, [None, "alice", "bob", None])
    assert relative_error(logits[1], peft_logits(family.peft, singles[1], None)) > 1e-2, "the default must act"
    assert mm.runtime.adapter_names == [None, "alice", "bob", "__base__"]
    assert mm.adapter_names_for([None, None, "bob", "__base__"], batch["input_ids"]) == mm.runtime.adapter_names
    with torch.no_grad():  # adapter_names left out: every request names none
        logits = mm.eager(**batch).logits
    assert_rows_equal_peft(family.peft, singles, logits, [None, "alice", "alice", "alice"])


def test_a_default_cannot_be_unloaded_until_it_is_replaced(served):
    family, mm = served
    with pytest.raises(DefaultAdapterError, match="'alice'.*default adapter for image"):
        mm.unload_adapter("alice")
    assert "alice" in mm.adapters and mm.default_adapters == {"image": "alice"}
    with pytest.raises(DefaultAdapterError, match="'audio' requests"):
        mm.set_default_adapter("audio", "bob")  # LLaVA has no audio tower
    mm.set_default_adapter("image", "bob")
    try:
        batch = zoo.make_batch(family.base, (1, 0), seed=4)
        with torch.no_grad():
            logits = mm.eager(**batch, adapter_names=[None, None]).logits
        assert_rows_equal_peft(family.peft, zoo.split_batch(family.base, batch), logits, ["bob", None])
    finally:
        mm.set_default_adapter("image", "alice")
