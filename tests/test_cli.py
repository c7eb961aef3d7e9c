"""The `mmlora-fx` command."""

import json

from mmlora_fx import zoo
from mmlora_fx.cli import main

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
    assert "served layers:  2 (linears, embeddings, patch embeddings, 2D parameters)" in text


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


def test_zoo_lists_the_tiny_models(capsys):
    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(zoo.ZOO)
    assert len({line.index(zoo.ZOO[line.split()[0]].model_class) for line in lines}) == 1, "aligned columns"
