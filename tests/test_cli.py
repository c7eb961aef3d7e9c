"""The `mmlora-fx` command."""

import json

from mmlora_fx import zoo
from mmlora_fx.cli import main
from mmlora_fx.inspect_report import render_text

from .conftest import cached_model
from .peft_helpers import make_adapter


def test_inspect_json_with_an_adapter(tmp_path, capsys):
    path = make_adapter(cached_model("tiny-llava"), tmp_path / "alice", ["q_proj", "linear_1"], r=2)
    output = tmp_path / "report.json"
    assert main(["inspect", "tiny-llava", "--adapter", f"alice={path}", "--format", "json", "-o", str(output)]) == 0
    report = json.loads(output.read_text())
    adapter = report["adapters"][0]
    assert adapter["name"] == "alice" and adapter["unmatched_keys"] == []
    partitions = {entry["module"]: entry["partition"] for entry in adapter["modules"]}
    assert partitions["model.multi_modal_projector.linear_1"] == "connector"
    assert partitions["model.vision_tower.encoder.layers.0.self_attn.q_proj"] == "tower"
    assert all(entry["nodes"] for entry in adapter["modules"]), "every adapted module maps to a graph node"
    assert report["serving"]["partitions"] == ["connector", "language_model", "tower"]


def test_inspect_reports_adapter_keys_that_match_nothing_as_an_error(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = make_adapter(cached_model("tiny-llava"), tmp_path / "bad", ["linear_1"], r=2)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors = {key.replace("linear_1", "linear_9"): value for key, value in tensors.items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    assert main(["inspect", "tiny-llava", "--adapter", str(path)]) == 1
    captured = capsys.readouterr()
    assert "ERROR: 2 tensor(s) match no linear, embedding or target parameter of the model" in captured.out
    assert "linear_9" in captured.err


def test_inspect_restrictions_show_what_is_served(capsys):
    assert main(["inspect", "tiny-llava", "--partitions", "language_model", "--target-modules", "q_proj"]) == 0
    text = capsys.readouterr().out
    assert "partitions:     language_model" in text and "target modules: q_proj" in text
    assert "served layers:  2 (linears, embeddings, patch embeddings, 2D parameters, expert weights)" in text


def test_inspect_shows_embedding_and_head_lora_as_served_targets(tmp_path, capsys):
    path = make_adapter(cached_model("tiny-llava"), tmp_path / "head", ["embed_tokens", "lm_head", "q_proj"], r=2)
    assert main(["inspect", "tiny-llava", "--adapter", str(path)]) == 0
    text = capsys.readouterr().out
    assert "embedding lookups: 1" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  model.") or
            line.startswith("  lm_head")}
    assert rows["model.language_model.embed_tokens"][1:3] == ["embedding", "language_model"]
    assert rows["lm_head"][1:3] == ["linear", "language_model"]
    assert rows["model.language_model.embed_tokens"][-1] == rows["lm_head"][-1] == "yes"
    assert "match no linear" not in text, "PEFT's copies of the base weights are no unmatched keys"


def test_inspect_shows_a_target_parameter_and_its_matmul(tmp_path, capsys):
    """Gemma3's projection, a bare parameter used as `x @ W`: listed, called, and served by the adapter."""
    path = make_adapter(cached_model("tiny-gemma3"), tmp_path / "projection", ["q_proj"], r=2,
                        target_parameters=["mm_input_projection_weight"])
    output = tmp_path / "report.json"
    assert main(["inspect", "tiny-gemma3", "--adapter", str(path), "--format", "json", "-o", str(output)]) == 0
    report = json.loads(output.read_text())
    name = "model.multi_modal_projector.mm_input_projection_weight"
    [parameter] = report["parameters"]
    assert (parameter["parameter"], parameter["partition"], parameter["in_features"]) == (name, "connector", 32)
    [matmul] = report["partitions"]["connector"]["parameter_matmul_nodes"]
    assert matmul["modules"] == [name] and matmul["lora"] and matmul["rows_owned"] == "per unit"
    assert {"graph": matmul["graph"], "node": matmul["node"]} in parameter["calls"]
    entry = next(entry for entry in report["adapters"][0]["modules"] if entry["module"] == name)
    assert (entry["kind"], entry["partition"], entry["served"]) == ("parameter", "connector", True)
    assert main(["inspect", "tiny-gemma3", "--adapter", str(path)]) == 0
    assert "matmuls x @ W with a parameter: 1" in capsys.readouterr().out


def test_inspect_shows_patch_embedding_convs_and_their_rows(tmp_path, capsys):
    path = make_adapter(cached_model("tiny-llava"), tmp_path / "patches", ["patch_embedding"], r=2)
    output = tmp_path / "report.json"
    assert main(["inspect", "tiny-llava", "--adapter", str(path), "--format", "json", "-o", str(output)]) == 0
    report = json.loads(output.read_text())
    name = "model.vision_tower.embeddings.patch_embedding"
    [conv] = report["convs"]
    assert (conv["module"], conv["partition"], conv["in_features"], conv["can_carry_lora"]) == (name, "tower", 48, True)
    [node] = report["partitions"]["tower"]["conv_nodes"]
    assert node["modules"] == [name] and node["kernel"] == [4, 4] and node["lora"] and node["rows_owned"] == "per unit"
    assert report["adapters"][0]["modules"][0]["kind"] == "conv"
    assert main(["inspect", "tiny-llava", "--adapter", str(path)]) == 0
    assert "convolutions: 1" in capsys.readouterr().out


def test_inspect_shows_expert_weights_as_served_targets_per_partition(tmp_path, capsys):
    """The MoE families' 3D expert weights: listed once each, their matmuls in the language model's
    partition (experts x in x out, rows owned per request as laid out for the experts), served by an
    adapter that targets them and not by one that does not."""
    family = "tiny-qwen3-vl-moe"
    model = cached_model(family)
    experts = make_adapter(model, tmp_path / "experts", zoo.ZOO[family].all_targets, r=2)
    plain = make_adapter(model, tmp_path / "plain", ["q_proj"], r=2)
    output = tmp_path / "report.json"
    assert main(["inspect", family, "--adapter", str(experts), "--format", "json", "-o", str(output)]) == 0
    report = json.loads(output.read_text())
    names = [f"model.language_model.layers.{layer}.mlp.experts.{weight}" for layer in (0, 1)
             for weight in ("gate_up_proj", "down_proj")]
    listed = {entry["parameter"]: entry for entry in report["experts"]}
    assert sorted(listed) == sorted(names)
    gate_up = listed[names[0]]
    assert (gate_up["partition"], gate_up["num_experts"], gate_up["shape"], gate_up["served"]) == \
        ("language_model", 4, [4, 64, 64], True)
    assert gate_up["can_carry_lora"] and gate_up["calls"]
    nodes = report["partitions"]["language_model"]["expert_nodes"]
    assert sorted(module for node in nodes for module in node["modules"]) == sorted(names)
    for node in nodes:
        assert node["lora"] and node["num_experts"] == 4 and node["form"] == "gathered"
        # batched_mm: each token's top-2 experts, two rows per token.
        assert node["layout"] == {"tiles": 1, "interleave": 2} and node["rows_owned"] == "per request (2 rows per token)"
    down = next(node for node in nodes if node["modules"] == [names[1]])
    assert (down["in_features"], down["out_features"]) == (32, 64)
    assert all(not entry["expert_nodes"] for partition, entry in report["partitions"].items()
               if partition != "language_model")
    kinds = {entry["module"]: entry["kind"] for entry in report["adapters"][0]["modules"]}
    assert {kinds[name] for name in names} == {"experts"}

    capsys.readouterr()
    assert main(["inspect", family, "--adapter", str(plain)]) == 0
    text = capsys.readouterr().out
    assert "4 expert weights" in text and "expert matmuls (3D expert weights): 4" in text
    rows = [line.split() for line in text.splitlines() if "mlp.experts." in line and line.startswith("    ")]
    assert len(rows) == 4 and all(row[3:5] in (["4x64x64", "gathered"], ["4x32x64", "gathered"]) for row in rows)
    assert all(row[-1] == "-" for row in rows), "an adapter without expert LoRA leaves the experts unserved"


def test_zoo_lists_the_tiny_models(capsys):
    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(zoo.ZOO)
    assert len({line.index(zoo.ZOO[line.split()[0]].model_class) for line in lines}) == 1, "aligned columns"


def _served_linear_calls(tmp_path, path, *flags) -> tuple[list[tuple[str, dict]], str]:
    """(partition, node) of each served linear call `inspect tiny-qwen2-vl --format json` reports
    with the adapter at `path` and `flags`, and the report as the text format shows it (rendered
    from the JSON: one capture serves both)."""
    output = tmp_path / "report.json"
    assert main(["inspect", "tiny-qwen2-vl", "--adapter", f"alice={path}", *flags, "--format", "json",
                 "-o", str(output)]) == 0
    report = json.loads(output.read_text())
    return [(partition, node) for partition, entry in report["partitions"].items()
            for node in entry["linear_nodes"] if node["lora"]], render_text(report)


def test_inspect_marks_the_linears_the_fold_would_take(tmp_path, capsys):
    # q_proj (out = in) folds; k_proj (out < in in tiny-qwen2-vl's language model) keeps the kernels.
    model = cached_model("tiny-qwen2-vl")
    path = make_adapter(model, tmp_path / "alice", ["q_proj", "k_proj"], r=2)
    calls, text = _served_linear_calls(tmp_path, path, "--fold-min-rows", "1")
    folds = {module: node["folds"] for _, node in calls for module in node["modules"]}
    assert any(module.endswith("self_attn.q_proj") for module in folds) and any(module.endswith("k_proj") for module in folds)
    assert all(fold == module.endswith("q_proj") for module, fold in folds.items()), folds
    assert "folded" in text
    assert main(["inspect", "tiny-qwen2-vl", "--adapter", f"alice={path}", "--fold-min-rows", "100000"]) == 0
    assert "folded" not in capsys.readouterr().out


def test_inspect_marks_the_linears_the_stack_would_take(tmp_path, capsys):
    # Every served plain linear stacks on few rows, narrow ones (k_proj) too; with the fold as well,
    # q_proj folds (the fold wins) and k_proj stacks.
    model = cached_model("tiny-qwen2-vl")
    path = make_adapter(model, tmp_path / "alice", ["q_proj", "k_proj"], r=2)
    calls, text = _served_linear_calls(tmp_path, path, "--stack-max-rows", "100000", "--fold-min-rows", "1")
    marks = {module: (node["folds"], node["stacks"]) for _, node in calls for module in node["modules"]}
    assert marks and all(mark == ((True, False) if module.endswith("q_proj") else (False, True))
                         for module, mark in marks.items()), marks
    assert "stacked" in text and "folded" in text
    assert main(["inspect", "tiny-qwen2-vl", "--adapter", f"alice={path}", "--stack-max-rows", "1"]) == 0
    assert "stacked" not in capsys.readouterr().out  # the example batch's calls have more rows


def test_inspect_marks_the_stacked_calls_whose_expand_the_graph_writes(tmp_path, capsys):
    # With --stack-expand inductor the language model's stacked calls get their expand as graph
    # ops; the tower's keep the stack's kernel.
    model = cached_model("tiny-qwen2-vl")
    path = make_adapter(model, tmp_path / "alice", ["k_proj", "qkv"], r=2)
    graph_expand = ("--stack-max-rows", "100000", "--stack-expand", "inductor")
    calls, text = _served_linear_calls(tmp_path, path, *graph_expand)
    expands = {(partition, node["stack_expand"]) for partition, node in calls}
    assert expands == {("language_model", "graph"), ("tower", "kernel")}, expands
    assert "stacked, graph expand" in text
    # --stack-shrink inductor: those calls' shrink as graph ops too; the tower's calls unchanged.
    graph_shrink = (*graph_expand, "--stack-shrink", "inductor")
    calls, text = _served_linear_calls(tmp_path, path, *graph_shrink)
    shrinks = {(partition, node.get("stack_shrink")) for partition, node in calls}
    assert shrinks == {("language_model", "graph"), ("tower", None)}, shrinks
    assert "graph shrink and expand" in text
    # As compile refuses it: the shrink as graph ops needs the graph expand.
    assert main(["inspect", "tiny-qwen2-vl", "--stack-max-rows", "8", "--stack-shrink", "inductor"]) == 2
    assert "stack_shrink='inductor' applies to the graph expand's calls only" in capsys.readouterr().err
