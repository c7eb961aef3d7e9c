"""Which request owns each unit a tower sees: traced through the family's own code, never guessed
(mmlora_fx/row_owners.py)."""

import pytest
import torch

from mmlora_fx import zoo
from mmlora_fx.errors import BatchError
from mmlora_fx.row_owners import (UnitOwnership, ProbeResult, image_token_runs, images_of_requests, probe_tower_rows,
                                  probe_tower_units)

from .families import build_llava_next, llava_next_batch, llava_next_crops


def test_one_image_per_request_with_tokens_is_exact():
    owners, how = images_of_requests(2, [36, 0, 52], runs=[1, 0, 1], images_per_request=None)
    assert owners == [0, 2] and "one input entry per request" in how


def test_runs_of_image_tokens_tell_a_requests_images_apart():
    owners, how = images_of_requests(3, [36, 0, 140], runs=[1, 0, 2], images_per_request=None)
    assert owners == [0, 2, 2] and "run" in how


def test_images_per_request_wins_and_is_checked():
    assert images_of_requests(3, [8, 0, 8], runs=[1, 0, 1], images_per_request=[1, 0, 2])[0] == [0, 2, 2]
    with pytest.raises(BatchError, match="says 2 images but the batch has 3"):
        images_of_requests(3, [8, 0, 8], runs=None, images_per_request=[1, 0, 1])
    with pytest.raises(BatchError, match="request 0 0 images, but it has 8 image tokens"):
        images_of_requests(2, [8, 0, 8], runs=None, images_per_request=[0, 1, 1])
    with pytest.raises(BatchError, match="2 entries but the batch has 3"):
        images_of_requests(2, [8, 0, 8], runs=None, images_per_request=[1, 1])


def test_touching_images_are_not_told_apart_by_tokens_alone():
    assert images_of_requests(3, [8, 0, 8], runs=[1, 0, 1], images_per_request=None) == (None, "")


def test_image_token_runs_count_maximal_runs():
    image = zoo.IMAGE_TOKEN
    text = [zoo.FIRST_TEXT_TOKEN + offset for offset in range(6)]
    ids = torch.tensor([[text[0], image, image, text[1], image, text[2]], text,
                        [image, image, image, text[3], text[4], image]])
    assert image_token_runs(ids, [image]) == [2, 0, 2]


def test_touching_images_are_not_shared_by_tokens_even_when_they_look_equal():
    # Three images of one unit each, four tokens each; the last request's two images touch. Sharing
    # by tokens would be right here, and wrong for a family whose images of equal units differ in tokens.
    units = UnitOwnership.from_probe(ProbeResult([0, 1, 2]), [4, 0, 8], runs=[1, 0, 1], images_per_request=None)
    assert units.owners is None and units.received == 3
    assert "text token between a request's images" in units.how and "images_per_request" in units.how


@pytest.mark.parametrize("units_per_image, tokens", [([0, 1, 1, 2], [4, 0, 8]), ([0, 1, 2], [4, 0, 9])])
def test_images_that_differ_are_not_shared_by_tokens(units_per_image, tokens):
    units = UnitOwnership.from_probe(ProbeResult(units_per_image), tokens, runs=[1, 0, 1], images_per_request=None)
    assert units.owners is None and "images_per_request" in units.how


def test_units_out_of_order_are_not_traced():
    assert UnitOwnership.from_probe(ProbeResult([1, 0]), [4, 4], runs=[1, 1], images_per_request=None).owners is None


def test_probe_finds_each_crop_s_image_and_stops_before_the_tower():
    model = build_llava_next()
    sizes = [[(16, 16)], [], [(16, 30), (32, 32)]]
    batch = llava_next_batch(model, sizes, seed=1)
    crops = [llava_next_crops(size, model) for request in sizes for size in request]
    tower_linear = model.model.vision_tower.encoder.layers[0].mlp.fc1
    calls = []
    handle = tower_linear.register_forward_hook(lambda *args: calls.append(1))
    try:
        probe = probe_tower_units(model, batch.inputs, ["model.vision_tower"])
    finally:
        handle.remove()
    assert probe.sources == [image for image, count in enumerate(crops) for _ in range(count)]
    assert calls == []  # the tower never ran
    assert "forward" not in vars(model.model.vision_tower)  # its forward is its class's again


def test_probe_follows_requests_through_padding_images():
    # Idefics3 lays pixels out [requests, images], padding with all-zero images it drops before the tower.
    model = zoo.build("tiny-idefics3")
    batch = zoo.make_batch(model, (1, 0, 2), seed=2)
    probe = probe_tower_units(model, batch, ["model.vision_model"])
    assert probe.sources == [0, 2, 2]


def test_probe_says_why_when_there_is_nothing_to_follow():
    model = zoo.build("tiny-llava")
    batch = zoo.make_batch(model, (1, 0, 0), seed=0)
    assert probe_tower_units(model, {"input_ids": batch["input_ids"]}, ["model.vision_tower"]).sources is None
    assert "no tower module" in probe_tower_units(model, batch, ["no.such.module"]).reason


def test_images_per_request_does_not_map_entries_that_are_not_images():
    # Qwen2-VL sends all images' patches as the tower's rows: 48 entries for 3 images.
    units = UnitOwnership.from_probe(ProbeResult(list(range(48))), [0, 4, 8], runs=[0, 1, 2],
                                     images_per_request=[0, 1, 2])
    assert units.owners is None and "48 input entries" in units.how


class _JoiningThinker(torch.nn.Module):
    """Cuts each clip to its length and joins them into one `[mels, frames]` sequence, as omni
    thinkers do; its tower convolves (per clip, or across the joined sequence) before a linear."""

    def __init__(self, per_clip: bool):
        super().__init__()
        self.per_clip = per_clip
        self.tower = torch.nn.ModuleDict({"conv": torch.nn.Conv1d(4, 8, 3, padding=1), "fc": torch.nn.Linear(8, 8)})

    def forward(self, input_features, feature_attention_mask):
        joined = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        lengths = feature_attention_mask.sum(-1).tolist()
        if self.per_clip:
            rows = torch.cat([self.tower["conv"](clip[None])[0] for clip in joined.split(lengths, dim=1)], dim=1)
        else:
            rows = self.tower["conv"](joined[None])[0]
        return self.tower["fc"](rows.T)


def _clips(lengths, width=12):
    features, mask = torch.zeros(len(lengths), 4, width), torch.zeros(len(lengths), width, dtype=torch.long)
    for index, length in enumerate(lengths):
        features[index, :, :length] = torch.randn(4, length)
        mask[index, :length] = 1
    return {"input_features": features, "feature_attention_mask": mask}


def test_rows_of_joined_clips_are_traced_run_by_run():
    # Five clips need three bits: six forwards up to the tower's linear, none of them past it.
    probe = probe_tower_rows(_JoiningThinker(per_clip=True), _clips([5, 12, 1, 7, 3]), "input_features", ["tower.fc"])
    assert probe.runs == [(0, 5), (1, 12), (2, 1), (3, 7), (4, 3)] and probe.rows == 28


def test_rows_mixing_two_clips_are_not_told():
    # Convolved across the joined sequence, the rows at each seam come from two clips.
    probe = probe_tower_rows(_JoiningThinker(per_clip=False), _clips([5, 12, 3]), "input_features", ["tower.fc"])
    assert probe.runs is None and "from no input entry or from two" in probe.reason


class _WindowedThinker(_JoiningThinker):
    """Runs its tower's linear on fixed windows of the joined rows: its first call sees part of them."""

    def __init__(self):
        super().__init__(per_clip=True)

    def forward(self, input_features, feature_attention_mask):
        joined = input_features.permute(0, 2, 1)[feature_attention_mask.bool()].permute(1, 0)
        lengths = feature_attention_mask.sum(-1).tolist()
        rows = torch.cat([self.tower["conv"](clip[None])[0] for clip in joined.split(lengths, dim=1)], dim=1).T
        return torch.cat([self.tower["fc"](window) for window in rows.split(8)])


def test_rows_seen_in_windows_are_not_told():
    # Clips of 4, 4 and 8 frames: the first window holds clips 0 and 1 only, and its runs would be
    # applied to the second window's rows too (clip 2's): refused instead.
    probe = probe_tower_rows(_WindowedThinker(), _clips([4, 4, 8]), "input_features", ["tower.fc"])
    assert probe.runs is None and "saw 2 of the 3 input_features entries" in probe.reason


def test_a_probe_puts_back_the_instance_forward_it_found():
    # accelerate's device hooks set an instance forward on modules; the probe must not drop it.
    model = _JoiningThinker(per_clip=True)
    hooked = model.tower["fc"].forward
    model.tower["fc"].forward = hooked
    probe = probe_tower_rows(model, _clips([5, 3]), "input_features", ["tower.fc"])
    assert probe.runs == [(0, 5), (1, 3)] and probe.module == "tower.fc"
    assert model.tower["fc"].__dict__["forward"] is hooked
    assert "forward" not in model.tower["conv"].__dict__
