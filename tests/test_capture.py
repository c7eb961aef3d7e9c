"""Capture: every graph dynamo produces, with breaks, owners and partition labels."""

import re

from torch import nn

from mmlora_fx import zoo
from mmlora_fx import partitions
from mmlora_fx.capture import capture

from .conftest import CONNECTOR_MODULES, cached_capture, cached_model, expected_partition


def test_capture_sees_every_linear_the_forward_runs(family):
    captured = cached_capture(family)
    model = cached_model(family)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    called = set(captured.linear_calls())
    assert linears <= called
    # Beside them, modules that call `F.linear` on a 2D weight of their own (Qwen3-MoE's routers).
    modules = dict(model.named_modules())
    for name in called - linears:
        weight = getattr(modules[name], "weight", None)
        assert isinstance(weight, nn.Parameter) and weight.dim() == 2, name


def test_linear_nodes_are_labelled_with_the_ground_truth_partition(family):
    captured = cached_capture(family)
    checked = 0
    for record in captured.graphs:
        for node in record.linear_nodes():
            for instance in record.instances:
                module = instance.linear_modules[node.name]
                assert expected_partition(family, module) == node.meta["mmlora_partition"], module
                checked += 1
    assert checked >= len(captured.linear_calls())


def test_connector_nodes_are_not_labelled_tower(family):
    captured = cached_capture(family)
    connector = CONNECTOR_MODULES[family]
    labels = {node.meta["mmlora_partition"] for record in captured.graphs for node in record.call_nodes()
              if (node.meta["mmlora_owner"] or "").startswith(connector)}
    assert labels == {partitions.connector_label(zoo.ZOO[family].modality)}


def test_reused_graphs_record_one_instance_per_block():
    """Qwen2-VL's vision attention breaks on .tolist(): its graph serves both blocks."""
    captured = cached_capture("tiny-qwen2-vl")
    qkv = [(record, node) for record in captured.graphs for node in record.linear_nodes()
           if node.meta["mmlora_linear"].module.endswith("attn.qkv")]
    assert len(qkv) == 1
    record, node = qkv[0]
    assert [instance.linear_modules[node.name] for instance in record.instances] == [
        "model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.attn.qkv"]
    assert [instance.frame_modules["self"] for instance in record.instances] == [
        "model.visual.blocks.0.attn", "model.visual.blocks.1.attn"]


def test_graph_breaks_keep_their_reason_and_location():
    captured = cached_capture("tiny-qwen2-vl")
    assert captured.graph_breaks, "Qwen2-VL's tower breaks the graph"
    reasons = " ".join(graph_break.reason for _, graph_break in captured.graph_breaks)
    assert re.search(r"Data dependent|Dynamic shape|item\(\)", reasons)
    assert all(re.search(r"\.py:\d+ in ", graph_break.location) for _, graph_break in captured.graph_breaks)


def test_a_user_override_changes_the_labels_of_captured_nodes():
    model = cached_model("tiny-llava")
    captured = capture(model, zoo.make_batch(model, (1,)),
                       partition_overrides={"model.multi_modal_projector": "tower"})
    labels = {node.meta["mmlora_linear"].module: node.meta["mmlora_partition"]
              for record in captured.graphs for node in record.linear_nodes()}
    assert labels["model.multi_modal_projector.linear_1"] == "tower"
    assert labels["model.language_model.layers.0.mlp.up_proj"] == "language_model"
