"""Audio towers (#20): found from the model's audio sub-config, and every row of them owned by
its own request, as image towers are. Each request against PEFT on that request alone (float32,
1e-4), with clips of different lengths in one batch."""

import copy

import pytest
import torch

import mmlora_fx
from mmlora_fx.partitions import discover_partitions

from mmlora_fx.errors import BatchError, PartitionError

from .families import (OMNI_TARGETS, QWEN2_AUDIO_TARGETS, VOXTRAL_TARGETS, build_audioflamingo3, build_qwen2_5_omni,
                       build_qwen2_audio, build_voxtral, omni_batch, qwen2_audio_batch, voxtral_batch)
from .peft_helpers import assert_rows_equal_peft, peft_family

NAMES = ["alice", None, "bob"]
# A long clip; none; a short one and a full one: 23, 0 and 8 + 25 audio tokens for 50 tower rows each.
FRAMES = [[90], [], [30, 100]]


def _family(tmp_path_factory, name, build, targets):
    return peft_family(tmp_path_factory.mktemp(name), build, targets)


@pytest.fixture(scope="module")
def qwen2_audio(tmp_path_factory):
    return _family(tmp_path_factory, "qwen2_audio", build_qwen2_audio, QWEN2_AUDIO_TARGETS)


@pytest.fixture(scope="module")
def audioflamingo3(tmp_path_factory):
    return _family(tmp_path_factory, "audioflamingo3", build_audioflamingo3, QWEN2_AUDIO_TARGETS + ["linear_1"])


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    return _family(tmp_path_factory, "omni", build_qwen2_5_omni, OMNI_TARGETS)


@pytest.fixture(scope="module")
def voxtral(tmp_path_factory):
    return _family(tmp_path_factory, "voxtral", build_voxtral, VOXTRAL_TARGETS)


def served_equals_peft(family, batch, names=NAMES, **call):
    """Compile `family` with both adapters; assert eager and compiled each equal PEFT per request."""
    base, paths, peft = family
    torch._dynamo.reset()
    mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="eager")
    with torch.no_grad():
        for run in (mm.eager, mm):
            assert_rows_equal_peft(peft, batch.singles, run(**batch.inputs, adapter_names=names, **call).logits,
                                   names, run)
    return mm


def test_the_audio_tower_and_its_projector_are_partitions_of_their_own(qwen2_audio):
    partitions = discover_partitions(qwen2_audio[0])
    assert partitions.partition_of("model.audio_tower.layers.0.self_attn.q_proj") == "tower:audio"
    assert partitions.partition_of("model.multi_modal_projector.linear") == "connector:audio"
    assert partitions.lora_partitions == ["language_model", "connector:audio", "tower:audio"]


def test_clips_of_different_lengths_equal_peft_per_request(qwen2_audio):
    mm = served_equals_peft(qwen2_audio, qwen2_audio_batch(FRAMES, seed=1))
    ownership = mm.runtime.ownership
    assert ownership["model.audio_tower.layers.0.fc1"].startswith("per unit (3 units")
    assert ownership["model.multi_modal_projector.linear"].startswith("per unit (3 units")


def test_masked_and_pooled_clips_equal_peft_per_request(audioflamingo3):
    # AudioFlamingo3 masks clips by `input_features_mask` and pools after its tower.
    mm = served_equals_peft(audioflamingo3, qwen2_audio_batch(FRAMES, seed=3, mask_key="input_features_mask"))
    assert mm.runtime.ownership["model.audio_tower.layers.0.fc1"].startswith("per unit (3 units")


def test_partitions_restrict_by_modality(qwen2_audio):
    base, paths, _ = qwen2_audio
    mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="eager", partitions=["tower:audio"])
    assert mm.runtime.serving.served and all(module.startswith("model.audio_tower") for module in mm.runtime.serving.served)


def test_stacked_frames_equal_peft_per_request(voxtral):
    # The projector stacks four frames into a row: its rows follow the audio tokens, one each.
    mm = served_equals_peft(voxtral, voxtral_batch([1, 0, 1], seed=1))
    assert mm.runtime.ownership["model.audio_tower.layers.0.fc1"].startswith("per unit (2 units")
    assert mm.runtime.ownership["model.multi_modal_projector.linear_1"] == "by audio tokens"


def test_chunks_the_tokens_do_not_tell_apart_are_refused(voxtral):
    # Two chunks of one request give one run of audio tokens: which chunk is whose is not told.
    base, paths, _ = voxtral
    batch = voxtral_batch([1, 0, 2], seed=2)
    mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="eager")
    with torch.no_grad(), pytest.raises(BatchError, match=r"tower:audio.*3 input_features entries"):
        mm.eager(**batch.inputs, adapter_names=NAMES)


def test_an_override_never_leaves_tower_rows_unowned(qwen2_audio):
    # Named as the vision tower, the audio tower's rows would be weighed by image tokens, which this
    # model does not have: refused when compiling.
    base, paths, _ = qwen2_audio
    overrides = {"model.audio_tower": "tower", "model.multi_modal_projector": "connector"}
    with pytest.raises(PartitionError, match="names no vision token"):
        mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="eager", partition_overrides=overrides)


def test_an_override_to_another_modality_is_refused_when_its_rows_have_no_owner(qwen2_audio):
    # A tower named for a modality with no tokens in the batch: its rows belong to no request.
    base, paths, _ = qwen2_audio
    overrides = {"model.audio_tower": "tower:audio", "model.multi_modal_projector.linear": "tower:speech"}
    with pytest.raises(PartitionError, match="tower:speech is served, but this model's config names no speech token"):
        mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="eager", partition_overrides=overrides)


OMNI_NAMES = ["alice", None, "bob", "alice", "bob"]
# Audio alone; an image alone; two clips and an image; text alone; an image and a clip. Clip lengths
# chosen so that the tower's rows (half the frames) are not twice the audio tokens: 25 rows for 12
# tokens, 12 for 6, 30 for 15, 20 for 10.
OMNI_REQUESTS = [{"audio": [50]}, {"images": [(4, 4)]}, {"audio": [23, 60], "images": [(2, 4)]}, {},
                 {"audio": [40], "images": [(2, 2)]}]


def test_an_omni_batch_of_audio_images_and_text_equals_peft_per_request(omni):
    # Qwen2.5-Omni's thinker joins all clips into one sequence before its tower: no unit is a clip, so
    # the rows of the tower's first served linear are traced to their clips (NaN through the stem).
    mm = served_equals_peft(omni, omni_batch(OMNI_REQUESTS, seed=1), OMNI_NAMES)
    assert mm.runtime.ownership["model.audio_tower.layers.0.fc1"].startswith("per row (87 rows in 4 runs")
    assert mm.runtime.ownership["model.audio_tower.proj"].startswith("by audio tokens")
    assert mm.runtime.ownership["model.visual.blocks.0.attn.q"].startswith("by image tokens")


def test_the_omni_partitions_name_both_modalities(omni):
    partitions = discover_partitions(omni[0])
    assert partitions.partition_of("model.audio_tower.layers.0.fc1") == "tower:audio"
    assert partitions.partition_of("model.audio_tower.proj") == "connector:audio"
    assert partitions.partition_of("model.visual.blocks.0.attn.q") == "tower"
    assert partitions.partition_of("model.visual.merger.mlp.0") == "connector"
    assert partitions.modalities == ["vision", "audio"]


def test_chunks_counted_per_request_equal_peft_per_request(voxtral):
    # Said by the caller: request 2's one run of audio tokens is two 30-second chunks.
    mm = served_equals_peft(voxtral, voxtral_batch([1, 0, 2], seed=2), items_per_request={"audio": [1, 0, 2]})
    assert "items_per_request['audio']" in mm.runtime.ownership["model.audio_tower.layers.0.fc1"]


def test_chunks_of_the_only_request_with_audio_are_all_its_own(voxtral):
    mm = served_equals_peft(voxtral, voxtral_batch([0, 0, 3], seed=4))
    assert "one request with audio tokens" in mm.runtime.ownership["model.audio_tower.layers.0.fc1"]


def test_items_per_request_must_name_a_modality_of_the_model(voxtral):
    base, paths, _ = voxtral
    batch = voxtral_batch([1, 0, 1], seed=2)
    mm = mmlora_fx.compile(copy.deepcopy(base), paths, max_loras=2, inner="eager")
    with torch.no_grad(), pytest.raises(BatchError, match=r"images_per_request given, but this model's towers take \['audio'\]"):
        mm.eager(**batch.inputs, adapter_names=NAMES, items_per_request={"image": [1, 0, 1]})
    with torch.no_grad(), pytest.raises(BatchError, match=r"items_per_request\['audio'\] has 2 entries but the batch has 3"):
        mm.eager(**batch.inputs, adapter_names=NAMES, items_per_request={"audio": [1, 0]})
    with torch.no_grad(), pytest.raises(BatchError, match="given twice"):
        mm.eager(**batch.inputs, adapter_names=NAMES, images_per_request=[1, 0, 1], items_per_request={"image": [1, 0, 1]})
    with torch.no_grad(), pytest.raises(BatchError, match=r"received 2 input entries, not the 3 audio items items_per_request\['audio'\] gives"):
        mm.eager(**batch.inputs, adapter_names=NAMES, items_per_request={"audio": [1, 0, 2]})
