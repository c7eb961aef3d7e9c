"""Shared fixtures: zoo models and their captures are built once per test session."""

from __future__ import annotations

import functools
import os
import re

import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; it must be on before any
    # kernel is defined, so before mmlora_fx (and its kernels) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mmlora_fx import zoo

# What each family's linears are, written out by hand from the Hugging Face sources: the
# partition labels found automatically must agree with this.
GROUND_TRUTH = {
    "tiny-qwen2-vl": {
        "tower": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
        "connector": r"model\.visual\.merger\.mlp\.[02]",
        "language_model": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head",
    },
    "tiny-llava": {
        "tower": r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
        "connector": r"model\.multi_modal_projector\.linear_[12]",
        "language_model": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head",
    },
    "tiny-idefics3": {
        "tower": r"model\.vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
        "connector": r"model\.connector\.modality_projection\.proj",
        "language_model": r"model\.text_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head",
    },
    "tiny-gemma3": {
        "tower": r"model\.vision_tower\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])",
        # The pooled projector multiplies by a bare parameter: the connector has no linear.
        "connector": r"(?!)",
        "language_model": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head",
    },
    "tiny-llama4": {
        "tower": r"vision_model\.(patch_embedding\.linear|model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.fc[12]))",
        "connector": r"vision_model\.vision_adapter\.mlp\.fc[12]|multi_modal_projector\.linear_1",
        # The head sits inside the language model here (Llama4ForCausalLM): it is the language model's too.
        # Dense layers' feed_forward.{gate,up,down}_proj; MoE layers' router and shared expert (their
        # routed experts are 3D parameters, no linears).
        "language_model": r"language_model\.(model\.layers\.\d+\.(self_attn\.[qkvo]_proj|"
                          r"feed_forward\.((shared_expert\.)?(gate|up|down)_proj|router))|lm_head)",
    },
}

GROUND_TRUTH["tiny-qwen3-vl-moe"] = {
    "tower": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc[12])",
    # The final merger and the deepstack mergers (registered after the blocks, called between them).
    "connector": r"model\.visual\.(merger|deepstack_merger_list\.\d+)\.linear_fc[12]",
    # Every text layer is MoE: attention linears, and the router (`mlp.gate`, no nn.Linear: F.linear on
    # its own weight); the experts are 3D parameters.
    "language_model": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.gate)|lm_head",
}

GROUND_TRUTH["tiny-qwen2-audio"] = {
    "tower:audio": r"model\.audio_tower\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc[12])",
    "connector:audio": r"model\.multi_modal_projector\.linear",
    "language_model": r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|lm_head",
}

# Modules that hold the connector's (non-linear) work, one per family.
CONNECTOR_MODULES = {
    "tiny-qwen2-audio": "model.multi_modal_projector",
    "tiny-qwen2-vl": "model.visual.merger",
    "tiny-qwen3-vl-moe": "model.visual.deepstack_merger_list",
    "tiny-llava": "model.multi_modal_projector",
    "tiny-idefics3": "model.connector",
    "tiny-gemma3": "model.multi_modal_projector",
    "tiny-llama4": "vision_model.vision_adapter",
}


def expected_partition(family: str, module: str) -> str:
    for partition, pattern in GROUND_TRUTH[family].items():
        if re.fullmatch(pattern, module):
            return partition
    raise AssertionError(f"{family}: {module} is in no ground-truth pattern")


@functools.cache
def cached_model(family: str) -> torch.nn.Module:
    return zoo.build(family)


@functools.cache
def cached_capture(family: str):
    from mmlora_fx.capture import capture

    model = cached_model(family)
    return capture(model, zoo.make_batch(model, (0, 1, 2)))


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason printed, the tests of a zoo family known broken upstream on an installed release."""
    import transformers

    from mmlora_fx.upstream import known_breakage

    broken = {}
    for name, family in zoo.ZOO.items():
        found = known_breakage(getattr(transformers, family.model_class))
        if found is not None:
            entry, version, model_class = found
            broken[name] = entry.message(model_class, version)
    for item in items:
        for name, reason in broken.items():
            if f"[{name}" in item.nodeid or f"-{name}" in item.nodeid:
                item.add_marker(pytest.mark.skip(reason=f"known upstream breakage: {reason}"))


@pytest.fixture(params=list(zoo.ZOO))
def family(request) -> str:
    return request.param
