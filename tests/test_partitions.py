"""Partition prefixes: found from the module tree, longest prefix wins, users can override."""

import pytest
from torch import nn

from mmlora_fx.errors import PartitionError
from mmlora_fx import zoo
from mmlora_fx.partitions import PartitionMap, PartitionPrefix, connector_label, discover_partitions, tower_label

from .conftest import CONNECTOR_MODULES, cached_model, expected_partition


def test_default_prefixes_label_every_linear_as_the_ground_truth_says(family):
    model = cached_model(family)
    partitions = discover_partitions(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert partitions.partition_of(name) == expected_partition(family, name), name


def test_the_input_embeddings_and_the_head_are_the_language_models_wherever_they_sit(family):
    """Their rows are the language model's tokens, nested in it (Llama4's head) or beside it (a VLM's)."""
    model = cached_model(family)
    partitions = discover_partitions(model)
    names = {id(module): name for name, module in model.named_modules()}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        assert partitions.partition_of(names[id(layer)]) == "language_model", names[id(layer)]


def test_the_connector_is_told_apart_from_the_tower(family):
    partitions = discover_partitions(cached_model(family))
    connector, modality = CONNECTOR_MODULES[family], zoo.ZOO[family].modality
    assert partitions.partition_of(connector) == connector_label(modality)
    assert partitions.prefixes_of(tower_label(modality)), "a tower prefix is found"
    assert connector not in partitions.prefixes_of(tower_label(modality))


def test_longest_prefix_wins():
    table = PartitionMap([PartitionPrefix("model.visual", "tower", "user"),
                          PartitionPrefix("model.visual.merger", "connector", "user")])
    assert table.partition_of("model.visual.blocks.0.attn.qkv") == "tower"
    assert table.partition_of("model.visual.merger.mlp.0") == "connector"
    assert table.partition_of("model.visual_extra") == "other"  # a prefix owns whole components only
    assert table.partition_of("lm_head") == "other"


def test_user_overrides_replace_and_add_prefixes():
    model = cached_model("tiny-qwen2-vl")
    default = discover_partitions(model)
    assert default.partition_of("model.visual.merger.mlp.0") == "connector"
    overridden = discover_partitions(model, {"model.visual.merger": "tower",
                                             "model.language_model.layers.1": "other"})
    assert overridden.partition_of("model.visual.merger.mlp.0") == "tower"
    assert overridden.partition_of("model.language_model.layers.1.mlp.up_proj") == "other"
    assert overridden.partition_of("model.language_model.layers.0.mlp.up_proj") == "language_model"


def test_unknown_partition_names_are_refused():
    with pytest.raises(PartitionError, match="unknown partition 'vision'"):
        PartitionMap([PartitionPrefix("model.visual", "vision", "user")])


def test_a_model_without_tower_or_language_model_says_so():
    with pytest.raises(PartitionError, match="no language model and no modality tower"):
        discover_partitions(nn.Sequential(nn.Linear(2, 2)))


def text_only_lm():
    import torch
    import transformers

    from mmlora_fx import zoo

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**zoo._text_config())).eval()


def test_a_text_only_language_model_is_served_whole_with_no_overrides():
    partitions = discover_partitions(text_only_lm())
    assert partitions.partition_of("model.layers.0.self_attn.q_proj") == "language_model"
    assert partitions.partition_of("model.layers.1.mlp.down_proj") == "language_model"
    assert partitions.partition_of("lm_head") == "language_model"
    assert partitions.partition_of("model.embed_tokens") == "language_model"
    assert not partitions.prefixes_of("tower") and not partitions.prefixes_of("connector")
