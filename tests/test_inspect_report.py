"""The inspection report: stable JSON, every linear once, text and DOT renderings."""

import json

from torch import nn

from mmlora_fx.inspect_report import SCHEMA, build_report, collapse_names, render_dot, render_text
from mmlora_fx.linear_index import LinearIndex
from mmlora_fx.partitions import connector_label, tower_label

from mmlora_fx import zoo

from .conftest import cached_capture, cached_model, expected_partition


def report_of(family):
    captured = cached_capture(family)
    return build_report(captured, LinearIndex(cached_model(family), captured.partition_map), family)


def test_json_lists_every_linear_exactly_once_with_its_partition(family):
    report = json.loads(json.dumps(report_of(family)))  # survives a JSON round trip
    assert report["schema"] == SCHEMA
    listed = [entry["module"] for entry in report["linears"]]
    model = cached_model(family)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    assert sorted(listed) == sorted(linears) and len(listed) == len(set(listed))
    for entry in report["linears"]:
        assert entry["partition"] == expected_partition(family, entry["module"])
        assert entry["calls"], f"{entry['module']} was called by some graph node"
    embeddings = {entry["module"]: entry for entry in report["embeddings"]}
    assert sorted(embeddings) == sorted(name for name, module in model.named_modules()
                                        if isinstance(module, nn.Embedding))
    tokens = embeddings[next(name for name, module in model.named_modules() if module is model.get_input_embeddings())]
    assert tokens["partition"] == "language_model" and tokens["can_carry_lora"] and tokens["calls"]
    # 3D expert weights (the MoE families'): each once, called by an expert matmul of its partition.
    experts = {entry["parameter"]: entry for entry in report["experts"]}
    convs = {name for name, module in model.named_modules() if isinstance(module, nn.modules.conv._ConvNd)}
    assert sorted(experts) == sorted(name for name, parameter in model.named_parameters()
                                     if parameter.dim() == 3 and name.rpartition(".")[0] not in convs)
    assert bool(experts) == any("experts." in target for target in zoo.ZOO[family].all_targets)
    for name, entry in experts.items():
        assert entry["partition"] == "language_model" and entry["can_carry_lora"] and entry["calls"], name
        nodes = [node for node in report["partitions"]["language_model"]["expert_nodes"] if name in node["modules"]]
        assert nodes and all(node["rows_owned"].startswith("per request") for node in nodes), name


def test_partitions_summarise_graphs_nodes_and_linears(family):
    report = report_of(family)
    modality = zoo.ZOO[family].modality
    tower, connector = tower_label(modality), connector_label(modality)
    assert set(report["partitions"]) == {tower, connector, "language_model", "other"}
    for partition, entry in report["partitions"].items():
        for node in entry["linear_nodes"]:
            assert node["in_features"] > 0 and node["out_features"] > 0
            assert all(expected_partition(family, module) == partition for module in node["modules"])
    assert report["partitions"][tower]["call_nodes"] > 0
    assert report["partitions"][connector]["call_nodes"] > 0


def test_text_names_partitions_breaks_and_linears():
    text = render_text(report_of("tiny-qwen2-vl"))
    assert "tower\n  prefixes:     model.visual\n" in text
    assert "model.visual.blocks.{0,1}.attn.qkv" in text
    assert "connector\n  prefixes:     model.visual.merger\n" in text
    assert "graph breaks" in text and "Data dependent" in text


def test_dot_draws_partitions_and_graphs():
    dot = render_dot(report_of("tiny-llava"))
    assert dot.startswith('digraph "tiny-llava" {')
    assert '"partition:tower"' in dot and '"graph:0" -> "graph:1"' in dot


def test_collapse_names_folds_one_varying_index():
    assert collapse_names(["a.0.q", "a.1.q", "a.10.q"]) == ["a.{0,1,10}.q"]
    assert collapse_names(["a.0.q", "b.0.q"]) == ["a.0.q", "b.0.q"]
    assert collapse_names(["x.0.y.1", "x.1.y.0"]) == ["x.0.y.1", "x.1.y.0"]


def test_report_says_how_tower_and_connector_rows_are_owned():
    from mmlora_fx.row_owners import modality_token_ids, trace_units

    family = "tiny-llava"
    model, captured = cached_model(family), cached_capture(family)
    ownership = trace_units(model, zoo.make_batch(model, (0, 1, 2)), ["model.vision_tower"],
                            modality_token_ids(model.config, "vision"))
    report = build_report(captured, LinearIndex(model, captured.partition_map), family,
                          ownership={"vision": ownership})
    vision = report["ownership"]["vision"]
    assert vision["units"] == 3 and "run of image tokens" in vision["how"]
    owned = {partition: {node["rows_owned"] for node in entry["linear_nodes"]}
             for partition, entry in report["partitions"].items() if entry["linear_nodes"]}
    assert owned == {"tower": {"per unit"}, "connector": {"per unit"}, "language_model": {"per request"}}
    lookups = report["partitions"]["language_model"]["embedding_nodes"]
    assert [node["modules"] for node in lookups] == [["model.language_model.embed_tokens"]]
    assert lookups[0]["rows_owned"] == "per request"
    assert "row ownership" in render_text(report)
