"""Reading PEFT LoRA adapters: every PEFT option that changes the weights, and every bad input."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmlora_fx.errors import (
    AdapterFileError,
    AdapterFormatError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterValueError,
    UnsupportedAdapterError,
)
from mmlora_fx.linear_index import LinearIndex
from mmlora_fx.partitions import discover_partitions
from mmlora_fx.peft_format import WEIGHTS_FILE, read_adapter, scan_adapter

from .conftest import cached_model
from .peft_helpers import all_targets, lora_layers, make_adapter, peft_model_with

FAMILY = "tiny-qwen2-vl"


@pytest.fixture(scope="module")
def linears():
    model = cached_model(FAMILY)
    return LinearIndex(model, discover_partitions(model))


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapters") / "good"
    return make_adapter(cached_model(FAMILY), path, all_targets(FAMILY), r=4, lora_alpha=8)


def assert_deltas_match_peft(adapter, path, name="a"):
    """Our (scaled B) @ A equals PEFT's get_delta_weight for every adapted module."""
    peft_model = peft_model_with(cached_model(FAMILY), {name: path})
    layers = lora_layers(peft_model)
    assert set(adapter.modules) == set(layers)
    for module, weights in adapter.modules.items():
        ours = weights.lora_b.double() @ weights.lora_a.double()
        theirs = layers[module].get_delta_weight(name).double()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [
    dict(r=4, lora_alpha=8),
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=4, lora_alpha=8, rank_pattern={"qkv": 2, "down_proj": 6}, alpha_pattern={"fc1": 3.0}),
    dict(r=2, lora_alpha=4, target_modules=r".*\.(qkv|mlp\.0|q_proj)"),
    dict(r=4, lora_alpha=4, layers_to_transform=[1], target_modules=["q_proj", "v_proj"]),
], ids=["plain", "rslora", "patterns", "regex", "layers"])
def test_weights_reproduce_peft_delta(tmp_path, linears, options):
    options = dict(options)
    targets = options.pop("target_modules", all_targets(FAMILY))
    path = make_adapter(cached_model(FAMILY), tmp_path / "a", targets, **options)
    adapter = read_adapter("a", path, linears, max_rank=16)
    assert_deltas_match_peft(adapter, path)
    if "rank_pattern" in options:
        ranks = {module.split(".")[-1]: weights.rank for module, weights in adapter.modules.items()}
        assert ranks["qkv"] == 2 and ranks["down_proj"] == 6 and ranks["fc1"] == 4
        fc1 = next(w for m, w in adapter.modules.items() if m.endswith("fc1"))
        assert fc1.scaling == pytest.approx(3.0 / 4)
    if options.get("use_rslora"):
        assert next(iter(adapter.modules.values())).scaling == pytest.approx(16 / math.sqrt(8))
    if "layers_to_transform" in options:
        assert all(".layers.1." in module for module in adapter.modules)


def test_adapters_target_tower_connector_and_language_model(linears, good_adapter):
    adapter = read_adapter("good", good_adapter, linears)
    partitions = {linears[module].partition for module in adapter.modules}
    assert partitions == {"tower", "connector", "language_model"}


def broken_copy(source, target, change):
    """A copy of the adapter at `source` whose tensors `change(tensors)` edits."""
    shutil.copytree(source, target)
    tensors = load_file(str(target / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(target / WEIGHTS_FILE))
    return target


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def first_key(tensors, part):
    return next(key for key in sorted(tensors) if part in key)


def test_missing_directory(tmp_path, linears):
    with pytest.raises(AdapterFileError, match=r"adapter 'x': directory .* does not exist"):
        read_adapter("x", tmp_path / "nowhere", linears)


def test_missing_config(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(AdapterFileError, match="adapter_config.json is missing"):
        read_adapter("x", tmp_path / "a", linears)


def test_config_that_is_not_json(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        read_adapter("x", tmp_path / "a", linears)


def test_pickle_only_adapter_is_refused_with_the_reason(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    torch.save({}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickle.*never opens.*safetensors"):
        read_adapter("x", tmp_path / "a", linears)


def test_missing_weights(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    with pytest.raises(AdapterFileError, match=f"{WEIGHTS_FILE} is missing"):
        read_adapter("x", tmp_path / "a", linears)


def test_corrupt_safetensors(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    data = (tmp_path / "a" / WEIGHTS_FILE).read_bytes()
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupt or unreadable"):
        read_adapter("x", tmp_path / "a", linears)


def test_rank_above_max_rank(linears, good_adapter):
    with pytest.raises(AdapterRankError, match=r"module '.*': rank 4 is above max_lora_rank=2"):
        read_adapter("x", good_adapter, linears, max_rank=2)


def test_shape_mismatch_names_the_module(tmp_path, linears, good_adapter):
    def widen(tensors):
        key = first_key(tensors, "q_proj.lora_A")
        tensors[key] = torch.randn(tensors[key].shape[0], tensors[key].shape[1] + 3)

    path = broken_copy(good_adapter, tmp_path / "a", widen)
    with pytest.raises(AdapterShapeError, match=r"module '.*q_proj'.*do not fit a linear of 64 -> 64"):
        read_adapter("x", path, linears)


def test_target_absent_from_model(tmp_path, linears, good_adapter):
    def rename(tensors):
        for kind in ("lora_A", "lora_B"):
            key = first_key(tensors, f"layers.0.self_attn.q_proj.{kind}")
            tensors[key.replace("layers.0", "layers.7")] = tensors.pop(key)

    path = broken_copy(good_adapter, tmp_path / "a", rename)
    with pytest.raises(AdapterTargetError, match=r"does not have: model\.language_model\.layers\.7\.self_attn\.q_proj"):
        read_adapter("x", path, linears)
    scan = scan_adapter("x", path, linears)
    assert len(scan.unmatched) == 2 and all("layers.7" in key for key in scan.unmatched)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_weights(tmp_path, linears, good_adapter, value):
    def poison(tensors):
        tensors[first_key(tensors, "fc1.lora_B")][0, 0] = value

    path = broken_copy(good_adapter, tmp_path / "a", poison)
    with pytest.raises(AdapterValueError, match=r"module '.*fc1': lora_B holds NaN or infinite values"):
        read_adapter("x", path, linears)


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "biases"),
    (dict(peft_type="IA3"), "peft_type IA3"),
])
def test_unsupported_config_features(tmp_path, linears, good_adapter, change, message):
    shutil.copytree(good_adapter, tmp_path / "a")
    edit_config(tmp_path / "a", **change)
    with pytest.raises(UnsupportedAdapterError, match=message):
        read_adapter("x", tmp_path / "a", linears)


def test_lora_on_lm_head_and_embeddings_is_refused(tmp_path, linears):
    model = cached_model(FAMILY)
    path = make_adapter(model, tmp_path / "head", ["lm_head"])
    with pytest.raises(UnsupportedAdapterError, match=r"lm_head.*not served"):
        read_adapter("x", path, linears)
    path = make_adapter(model, tmp_path / "embed", ["embed_tokens"])
    with pytest.raises(UnsupportedAdapterError, match="embedding"):
        read_adapter("x", path, linears)


def test_weights_the_config_does_not_select(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    edit_config(tmp_path / "a", target_modules=["q_proj"])
    with pytest.raises(AdapterFormatError, match="target_modules/layers_to_transform do not select it"):
        read_adapter("x", tmp_path / "a", linears)


def test_lora_weights_on_a_module_in_partition_other(tmp_path, linears, good_adapter):
    def to_lm_head(tensors):
        for kind in ("lora_A", "lora_B"):
            key = first_key(tensors, f"layers.0.self_attn.q_proj.{kind}")
            tensors[f"base_model.model.lm_head.{kind}.weight"] = tensors.pop(key)

    path = broken_copy(good_adapter, tmp_path / "a", to_lm_head)
    with pytest.raises(UnsupportedAdapterError, match=r"module 'lm_head': is in partition 'other'"):
        read_adapter("x", path, linears)
