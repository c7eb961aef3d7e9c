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
    BaseWeightCopyError,
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
        if name in layers[module].lora_embedding_A:
            theirs = theirs.T  # PEFT gives an embedding's delta as [num_embeddings, dim]
        # PEFT multiplies in float32: its rounding, not ours, sets the bound.
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


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


def test_weights_that_overflow_float16_once_scaled_are_refused(tmp_path, linears, good_adapter):
    """Finite in the file, infinite in a float16 slot after folding alpha/r into B: refused, since
    an infinite B would turn other requests' rows into NaN (0 * inf) in a mixed batch."""
    def large(tensors):
        tensors[first_key(tensors, "fc1.lora_B")][0, 0] = 60000.0  # finite in float16, not times alpha/r > 1.1

    path = broken_copy(good_adapter, tmp_path / "a", large)
    read_adapter("x", path, linears, dtype=torch.float32)  # float32 holds it
    with pytest.raises(AdapterValueError, match=r"module '.*fc1': lora_B times its scaling .* overflows float16"):
        read_adapter("x", path, linears, dtype=torch.float16)


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


@pytest.mark.parametrize("change, message", [
    (dict(lora_alpha=float("nan")), "lora_alpha must hold finite numbers, not nan"),
    (dict(lora_alpha=float("inf")), "lora_alpha must hold finite numbers, not inf"),
    (dict(alpha_pattern={"fc1": "abc"}), "alpha_pattern must hold finite numbers, not 'abc'"),
    (dict(alpha_pattern={"fc1": float("nan")}), "alpha_pattern must hold finite numbers"),
    (dict(rank_pattern={"fc1": 0}), "rank_pattern must hold positive ranks, not 0"),
    (dict(rank_pattern=["fc1"]), "rank_pattern must map module names to numbers"),
])
def test_a_scaling_or_rank_that_is_not_a_finite_number_is_refused(tmp_path, linears, good_adapter, change, message):
    """Python's JSON reads NaN and Infinity: a NaN scaling would make every B it folds into NaN,
    and a NaN B reaches other requests' rows (0 x NaN), in every dtype, not only float16."""
    shutil.copytree(good_adapter, tmp_path / "a")
    edit_config(tmp_path / "a", **change)
    for dtype in (torch.float16, torch.bfloat16):
        with pytest.raises(AdapterFormatError, match=message):
            read_adapter("x", tmp_path / "a", linears, dtype=dtype)


@pytest.fixture(scope="module")
def head_and_embedding_adapter(tmp_path_factory):
    """LoRA on the input embeddings and lm_head beside a linear, saved with PEFT's defaults (which
    add full copies of both base weights)."""
    path = tmp_path_factory.mktemp("adapters") / "head"
    return make_adapter(cached_model(FAMILY), path, ["embed_tokens", "lm_head", "q_proj"], r=4, lora_alpha=8)


def test_embedding_and_lm_head_lora_reproduce_peft_delta(linears, head_and_embedding_adapter):
    tensors = load_file(str(head_and_embedding_adapter / WEIGHTS_FILE))
    assert any(key.endswith("embed_tokens.base_layer.weight") for key in tensors), "PEFT saved the base copies"
    adapter = read_adapter("a", head_and_embedding_adapter, linears)
    embedding = "model.language_model.embed_tokens"
    assert {embedding, "lm_head"} <= set(adapter.modules)
    assert adapter.modules[embedding].lora_a.shape == (4, linears[embedding].in_features)
    assert_deltas_match_peft(adapter, head_and_embedding_adapter)
    scan = scan_adapter("a", head_and_embedding_adapter, linears)
    assert not scan.unmatched and scan.modules[embedding] == 4 and scan.modules["lm_head"] == 4


@pytest.mark.parametrize("change, message", [
    (lambda copy: copy.add_(1e-3), "differs from the model's"),
    (lambda copy: torch.cat([copy, copy[:8]]), r"shape \(328, 64\), but the model's is \(320, 64\).*resized"),
], ids=["values", "resized"])
def test_a_base_copy_that_differs_from_the_models_is_refused(tmp_path, linears, head_and_embedding_adapter,
                                                              change, message):
    def edit(tensors):
        key = first_key(tensors, "embed_tokens.base_layer.weight")
        tensors[key] = change(tensors[key].clone())

    path = broken_copy(head_and_embedding_adapter, tmp_path / "a", edit)
    with pytest.raises(BaseWeightCopyError, match=r"module 'model\.language_model\.embed_tokens': .*" + message):
        read_adapter("x", path, linears)


def test_embedding_lora_of_the_wrong_shape_names_the_embedding(tmp_path, linears, head_and_embedding_adapter):
    def widen(tensors):
        key = first_key(tensors, "lora_embedding_A")
        tensors[key] = torch.randn(4, tensors[key].shape[1] + 10)

    path = broken_copy(head_and_embedding_adapter, tmp_path / "a", widen)
    with pytest.raises(AdapterShapeError, match=r"embed_tokens': lora_embedding_A \(4, 330\) .* do not fit an "
                                                r"embedding of 320 tokens of size 64"):
        read_adapter("x", path, linears)


def test_embedding_lora_on_a_linear_and_the_reverse_are_format_errors(tmp_path, linears, head_and_embedding_adapter):
    def onto_lm_head(tensors):
        for kind in ("lora_embedding_A", "lora_embedding_B"):
            tensors[f"base_model.model.lm_head.{kind}"] = tensors.pop(first_key(tensors, kind))

    path = broken_copy(head_and_embedding_adapter, tmp_path / "a", onto_lm_head)
    with pytest.raises(AdapterFormatError, match=r"is a embedding's LoRA weight, but the module is a Linear"):
        read_adapter("x", path, linears)


def test_nan_in_embedding_lora(tmp_path, linears, head_and_embedding_adapter):
    def poison(tensors):
        tensors[first_key(tensors, "lora_embedding_B")][0, 0] = float("nan")

    path = broken_copy(head_and_embedding_adapter, tmp_path / "a", poison)
    with pytest.raises(AdapterValueError, match=r"embed_tokens': lora_B holds NaN"):
        read_adapter("x", path, linears)


def test_lora_tied_between_embeddings_and_head_is_refused(tmp_path, linears, head_and_embedding_adapter):
    shutil.copytree(head_and_embedding_adapter, tmp_path / "a")
    edit_config(tmp_path / "a", ensure_weight_tying=True)
    with pytest.raises(UnsupportedAdapterError, match="ensure_weight_tying .* is not served"):
        read_adapter("x", tmp_path / "a", linears)


def test_an_embedding_outside_the_language_model_is_refused(tmp_path):
    """A tower's position embeddings see no language-model tokens: nothing can own their rows."""
    model = cached_model("tiny-llava")
    path = make_adapter(model, tmp_path / "a", ["position_embedding"])
    tower_linears = LinearIndex(model, discover_partitions(model))
    with pytest.raises(UnsupportedAdapterError, match=r"position_embedding': is an embedding other than the model's "
                                                      "input embeddings"):
        read_adapter("x", path, tower_linears)


def test_a_position_table_in_the_language_model_is_refused(tmp_path):
    """GPT-2's `wpe` looks up positions shared by every request, not the requests' tokens: its rows
    would be handed out by the token table wrongly, so only `get_input_embeddings()` is served."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)).eval()
    path = make_adapter(model, tmp_path / "a", ["wpe", "wte"])
    linears = LinearIndex(model, discover_partitions(model))
    assert linears["transformer.wte"].can_carry_lora and not linears["transformer.wpe"].can_carry_lora
    with pytest.raises(UnsupportedAdapterError, match=r"transformer.wpe': is an embedding other than the model's "
                                                      "input embeddings"):
        read_adapter("x", path, linears)


def test_weights_the_config_does_not_select(tmp_path, linears, good_adapter):
    shutil.copytree(good_adapter, tmp_path / "a")
    edit_config(tmp_path / "a", target_modules=["q_proj"])
    with pytest.raises(AdapterFormatError, match="target_modules/layers_to_transform do not select it"):
        read_adapter("x", tmp_path / "a", linears)


def test_lora_weights_on_a_module_in_partition_other(good_adapter):
    model = cached_model(FAMILY)
    layer = "model.language_model.layers.0"
    linears = LinearIndex(model, discover_partitions(model, {layer: "other"}))
    with pytest.raises(UnsupportedAdapterError, match=rf"module '{layer}\.[a-z_.]+': is a linear in partition 'other', "
                                                      "in no partition that carries LoRA"):
        read_adapter("x", good_adapter, linears)


def test_base_weight_copies_are_compared_slab_by_slab():
    """A copy that differs only in its last rows is told apart with slabs much smaller than it."""
    from mmlora_fx.peft_format import _equal_in_chunks

    weight = torch.randn(100, 8)
    copy = weight.clone()
    assert _equal_in_chunks(copy, weight, chunk_bytes=3 * 8 * 4)
    copy[99, 7] += 1
    assert not _equal_in_chunks(copy, weight, chunk_bytes=3 * 8 * 4)
