"""LoRA on a bare parameter used as `x @ W` (PEFT's `target_parameters`): Gemma3's projection.

Adapters are made by PEFT (`init_lora_weights=False`, B widened) over the projector's
`mm_input_projection_weight` and a linear of each partition; every request of a mixed batch (0, 1
and 2 images) is held to PEFT on that request alone with its adapter, to 1e-4 (float32, CPU),
eager and compiled, and each adapter's parameter LoRA is shown to move PEFT's logits well above
that. What is not served is refused with a typed error naming the parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import AdapterShapeError, CaptureError, UnsupportedAdapterError
from mmlora_fx.linear_index import EXPERTS, PARAMETER, LinearIndex
from mmlora_fx.partitions import discover_partitions
from mmlora_fx.passes import lora_ops, parameter_matmul_of
from mmlora_fx.peft_format import WEIGHTS_FILE, read_adapter

from .peft_helpers import (assert_eager_and_compiled_equal_peft, lora_layers, make_adapter,
                           peft_logits, peft_model_with, relative_error)
from .test_embedding_head import lora_switched_off

FAMILY = "tiny-gemma3"
PROJECTOR = "model.multi_modal_projector"
PROJECTION = f"{PROJECTOR}.mm_input_projection_weight"
NAMES = ["bob", None, "alice"]


def projection_adapters(base, root):
    return {name: make_adapter(base, root / name, ["q_proj"], r=2 + 2 * index, lora_alpha=5 + index, seed=index,
                               target_parameters=["mm_input_projection_weight"])
            for index, name in enumerate(["alice", "bob"])}


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    base = zoo.build(FAMILY)
    paths = projection_adapters(base, tmp_path_factory.mktemp("gemma3"))
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(FAMILY), paths, max_loras=2, inner="aot_eager")
    return base, mm, peft_model_with(base, paths), paths


def test_the_projection_parameter_is_indexed_as_x_at_w_and_served(gemma3):
    base, mm, _, _ = gemma3
    info = mm.runtime.linears[PROJECTION]
    weight = base.get_submodule(PROJECTOR).mm_input_projection_weight
    assert (info.kind, info.partition) == (PARAMETER, "connector")
    assert (info.in_features, info.out_features) == tuple(weight.shape)  # x @ W: W is [in, out]
    assert PROJECTION in mm.runtime.serving.served


def test_the_reader_gives_peft_delta_in_the_x_at_w_orientation(gemma3):
    base, mm, peft, paths = gemma3
    layer = lora_layers(peft)[PROJECTOR]
    for name, path in paths.items():
        ours = read_adapter(name, path, mm.runtime.linears).modules[PROJECTION]
        # x @ (W + delta) = x @ W + x @ a.T @ b.T: delta is (b @ a).T in W's own [in, out] layout.
        torch.testing.assert_close((ours.lora_b.double() @ ours.lora_a.double()).T,
                                   layer.get_delta_weight(name).double(), rtol=1e-5, atol=1e-6)


def test_a_mixed_batch_with_projection_lora_equals_peft_eager_and_compiled(gemma3):
    base, mm, peft, _ = gemma3
    batch = zoo.make_batch(base, (1, 0, 2), seed=11)
    singles = zoo.split_batch(base, batch)
    eager, compiled = assert_eager_and_compiled_equal_peft(mm, peft, batch, singles, NAMES)
    # The compiled graph serves the matmul itself (not the eager hooks), rows owned per image.
    served = [op for record in mm.backend.records for op in lora_ops(record.graph_module)
              if parameter_matmul_of(op.args[0][0]) is not None]
    assert [parameter_matmul_of(op.args[0][0]).module for op in served] == [PROJECTION]
    assert mm.runtime.ownership[PROJECTION].startswith("per unit (3 units")
    with torch.no_grad():
        for row, name in ((0, "bob"), (2, "alice")):
            full = peft_logits(peft, singles[row], name)
            with lora_switched_off(peft, PROJECTOR, name):
                assert relative_error(peft_logits(peft, singles[row], name), full) > 1e-2, name


def test_projection_lora_of_the_wrong_shape_names_the_parameter(tmp_path, gemma3):
    from safetensors.torch import load_file, save_file

    base, mm, _, paths = gemma3
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in paths["alice"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(broken / WEIGHTS_FILE))
    key = next(key for key in tensors if key.endswith("multi_modal_projector.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(broken / WEIGHTS_FILE))
    with pytest.raises(AdapterShapeError, match="mm_input_projection_weight.*x @ W"):
        read_adapter("broken", broken, mm.runtime.linears)


def with_extra_parameters(**shapes) -> nn.Module:
    """tiny-gemma3 with more bare parameters on its projector."""
    model = copy.deepcopy(zoo.build(FAMILY))
    projector = model.get_submodule(PROJECTOR)
    for name, shape in shapes.items():
        projector.register_parameter(name, nn.Parameter(torch.randn(shape)))
    return model


def test_a_3d_parameter_is_an_expert_weight_served_in_the_language_model_only(tmp_path):
    """The one reader of target_parameters gives a 3D parameter to the experts kind: read per expert
    (checked against PEFT's delta) in the language model, refused as experts in the connector."""
    model = with_extra_parameters(experts=(2, 32, 64))
    mlp = "model.language_model.layers.0.mlp"
    model.get_submodule(mlp).register_parameter("experts", nn.Parameter(torch.randn(3, 16, 32)))
    index = LinearIndex(model, discover_partitions(model))
    connector, language = index[f"{PROJECTOR}.experts"], index[f"{mlp}.experts"]
    assert (connector.kind, connector.partition, connector.num_experts) == (EXPERTS, "connector", 2)
    assert (language.kind, language.partition, language.num_experts) == (EXPERTS, "language_model", 3)
    assert (language.in_features, language.out_features) == (32, 16)  # PEFT reads [experts, out, in]

    path = make_adapter(model, tmp_path / "experts", ["q_proj"], target_parameters=[f"{mlp}.experts"])
    ours = read_adapter("experts", path, index).modules[f"{mlp}.experts"]
    peft_delta = lora_layers(peft_model_with(model, {"experts": path}))[mlp].get_delta_weight("experts")
    torch.testing.assert_close((ours.lora_b.double() @ ours.lora_a.double()), peft_delta.double(), rtol=1e-5, atol=1e-6)

    path = make_adapter(model, tmp_path / "connector", ["q_proj"], target_parameters=[f"{PROJECTOR}.experts"])
    with pytest.raises(UnsupportedAdapterError, match=r"experts in partition 'connector'.*not the language model's"):
        read_adapter("connector", path, index)


def test_a_parameter_neither_2d_nor_3d_is_refused_naming_its_shape(tmp_path):
    import json

    model = with_extra_parameters(scale=(64,))
    # PEFT makes no LoRA on a 1D parameter: a projection adapter whose config names the 1D one.
    path = make_adapter(model, tmp_path / "scale", ["q_proj"], target_parameters=["mm_input_projection_weight"])
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_parameters"] = ["scale"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapterError, match=r"scale of shape \(64,\), a 1D parameter"):
        read_adapter("scale", path, LinearIndex(model, discover_partitions(model)))


def test_two_parameters_of_one_module_are_told_apart_by_peft_nesting(tmp_path):
    """PEFT nests one wrapper per parameter of a module (`.base_layer` deeper for each earlier one):
    each pair is read onto its own parameter, held to PEFT's delta for that parameter."""
    model = with_extra_parameters(second=(32, 64))
    path = make_adapter(model, tmp_path / "two", ["q_proj"], target_parameters=["mm_input_projection_weight", "second"])
    modules = read_adapter("two", path, LinearIndex(model, discover_partitions(model))).modules
    layers = {layer.parameter_name: layer for name, layer in lora_layers(peft_model_with(model, {"two": path})).items()
              if name.startswith(PROJECTOR)}
    assert set(layers) == {"mm_input_projection_weight", "second"}
    for parameter, layer in layers.items():
        ours = modules[f"{PROJECTOR}.{parameter}"]
        torch.testing.assert_close((ours.lora_b.double() @ ours.lora_a.double()).T,
                                   layer.get_delta_weight("two").double(), rtol=1e-5, atol=1e-6)


def test_a_parameter_not_used_in_a_matmul_is_refused_at_the_first_call(tmp_path):
    """Llama4's vision position table is added, not multiplied by: its LoRA would be dropped."""
    base = zoo.build("tiny-llama4")
    path = make_adapter(base, tmp_path / "table", ["q_proj"], target_parameters=["positional_embedding_vlm"])
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build("tiny-llama4"), {"table": path}, inner="aot_eager")
    assert "vision_model.positional_embedding_vlm" in mm.runtime.serving.served
    with pytest.raises(CaptureError, match="'vision_model.positional_embedding_vlm' would run without its LoRA"):
        with torch.no_grad():
            mm(**zoo.make_batch(base, (1, 0), seed=3), adapter_names=["table", None])
    # Outside the graphs too (`mm.eager`, and `generate`, which encodes images eagerly): refused,
    # not run with the table's LoRA left out.
    with pytest.raises(CaptureError, match="'vision_model.positional_embedding_vlm' is used by .* not as the right side"):
        with torch.no_grad():
            mm.eager(**zoo.make_batch(base, (1, 0), seed=3), adapter_names=["table", None])
