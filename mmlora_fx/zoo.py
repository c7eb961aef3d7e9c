"""Tiny multimodal models built from real Hugging Face classes with random weights.

Each family builds a model from a small config (nothing is downloaded) and knows how to make a
valid batch for any model of its class, tiny or not: several requests, each with its own number
of media items (images, or audio clips; zero included) and, where the family allows it, their own
sizes. Every request in
a batch has the same length (text fills what images do not), so a row of the batch can be
compared with the same request run alone, without padding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .row_owners import image_token_runs, modality_token_ids, token_name

__all__ = ["Family", "ZOO", "build", "family_of", "make_batch", "split_batch", "image_token_id", "item_token_id",
           "make_adapter", "split_targets"]

VOCAB = 320
# Ids below FIRST_TEXT_TOKEN are special tokens in the tiny configs; text is drawn above them.
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 10, 11, 12, 13, 14, 15
FIRST_TEXT_TOKEN = 16
TEXT_TOKEN_LIMIT = 1000  # text ids stay low so that real vocabularies' special ids are avoided


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: its class, a tiny config, and how its media items become inputs and tokens.

    An item is an image (`modality` "vision", its size `(height, width)` in pixels) or an audio
    clip ("audio", its size `(frames,)` in mel frames). `item_sizes(config)` lists sizes the family
    takes, the default first; `accepts(config, size)` says whether it takes another;
    `item_tokens(config, size)` is the number of placeholder tokens one such item becomes in the
    language model's input; `media_inputs(config, sizes_per_request, generator)` makes the media
    inputs of a batch; `wrap_tokens(config)` gives the tokens around each item's tokens. `targets`:
    PEFT target suffixes in the tower, the connector and the language model, for adapters over all
    three: `target_modules` suffixes, and names of 3D expert weights (`mlp.experts.gate_up_proj`),
    which name a parameter, not a module, and are PEFT `target_parameters` (`make_adapter` tells
    them apart on the model).
    """

    name: str
    model_class: str
    tiny_config: Callable[[], object]
    item_sizes: Callable[[object], tuple[tuple[int, ...], ...]]
    item_tokens: Callable[[object, tuple[int, ...]], int]
    media_inputs: Callable[[object, list[list[tuple[int, ...]]], torch.Generator], dict]
    targets: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    wrap_tokens: Callable[[object], tuple[list[int], list[int]]] = lambda config: ([], [])
    notes: str = ""
    accepts: Callable[[object, tuple[int, ...]], bool] | None = None
    modality: str = "vision"

    def takes(self, config, size: tuple[int, ...]) -> bool:
        if self.accepts is not None:
            return self.accepts(config, size)
        return size in self.item_sizes(config)

    @property
    def all_targets(self) -> list[str]:
        """The tower's, the connector's and the language model's target suffixes, in that order."""
        return [suffix for part in self.targets for suffix in part]

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        model = getattr(transformers, self.model_class)(self.tiny_config())
        _randomize_constant_parameters(model, seed)
        return _cast_real_tensors(model, dtype).eval()


def _cast_real_tensors(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    # `Module.to(dtype)` would also cast complex buffers to real, dropping their imaginary part
    # (Llama4's vision rotary `freqs_ci` becomes a scaling by cos): cast real floating ones only.
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                module._buffers[name] = buffer.to(dtype)
    return model


def _randomize_constant_parameters(model: nn.Module, seed: int) -> None:
    # Some families initialise norms and gates to constants; random values make every
    # parameter matter, so that a wrong wiring shows in the logits.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and parameter.float().std() == 0:
                noise = torch.randn(parameter.shape, generator=generator) * 0.02
                parameter.add_(noise.to(parameter.dtype))


def image_token_id(config, modality: str = "vision") -> int:
    """The placeholder token of `modality`'s items (images by default) in `config`."""
    ids = modality_token_ids(config, modality)
    if not ids:
        raise AttributeError(f"{type(config).__name__} names no {token_name(modality)} token")
    return ids[0]


def item_token_id(model: nn.Module) -> int:
    """The placeholder token of the items of `model`'s zoo family (images, or audio clips)."""
    return image_token_id(model.config, family_of(model).modality)


def _text_config(**overrides) -> dict:
    config = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    config.update(overrides)
    return config


def _vision_config(**overrides) -> dict:
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=16, patch_size=4)
    config.update(overrides)
    return config


def _stacked_pixels(config, sizes_per_request, generator):
    images = [torch.randn(3, height, width, generator=generator)
              for sizes in sizes_per_request for height, width in sizes]
    return {"pixel_values": torch.stack(images)} if images else {}


def _square_image(config):
    size = config.vision_config.image_size
    return ((size, size),)


def _boi_eoi(config):
    return [config.boi_token_index], [config.eoi_token_index]


# --------------------------------------------------------------------------- Qwen2-VL
def _qwen2_vl_config():
    from transformers import Qwen2VLConfig

    text = _text_config(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]))
    del text["head_dim"]
    return Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        text_config=text,
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


def _qwen2_vl_sizes(config):
    unit = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    return ((2 * unit, 2 * unit), (unit, 2 * unit), (2 * unit, 3 * unit))


def _qwen2_vl_accepts(config, size):
    unit = config.vision_config.patch_size * config.vision_config.spatial_merge_size
    return all(side > 0 and side % unit == 0 for side in size)


def _qwen2_vl_tokens(config, size):
    vision = config.vision_config
    patches = (size[0] // vision.patch_size) * (size[1] // vision.patch_size)
    return patches // vision.spatial_merge_size**2


def _qwen2_vl_pixels(config, sizes_per_request, generator):
    vision = config.vision_config
    features = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    grids, pixels = [], []
    for sizes in sizes_per_request:
        for height, width in sizes:
            grid = (1, height // vision.patch_size, width // vision.patch_size)
            grids.append(grid)
            pixels.append(torch.randn(grid[0] * grid[1] * grid[2], features, generator=generator))
    if not grids:
        return {}
    return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}


# --------------------------------------------------------------------------- Qwen3-VL-MoE
# Qwen2-VL's packed patches and grids (`image_grid_thw`, `mm_token_type_ids` for M-RoPE); its tower adds
# deepstack mergers (the features of tower layer 0 merged and added to the language model's first
# layer at the image tokens) beside the final merger; every text layer is MoE (4 experts, top 2, no
# shared expert), served through transformers' `batched_mm` experts (the default expert loop over
# data-dependent token indices is refused).
_QWEN3_VL_MOE_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _qwen3_vl_moe_config():
    from transformers import Qwen3VLMoeConfig

    text = _text_config(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                        tie_word_embeddings=False,
                        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                             mrope_interleaved=True))
    config = Qwen3VLMoeConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=text,
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    config._experts_implementation = "batched_mm"  # reaches the text config (and every sub-config)
    return config


# --------------------------------------------------------------------------- LLaVA
def _llava_config():
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=_vision_config(model_type="clip_vision_model", projection_dim=32),
        text_config=_text_config(model_type="llama"),
        image_token_index=IMAGE_TOKEN, image_seq_length=16, vision_feature_layer=-2,
        vision_feature_select_strategy="default", pad_token_id=PAD,
    )


def _llava_tokens(config, size):
    tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return tokens + (1 if config.vision_feature_select_strategy == "full" else 0)


# --------------------------------------------------------------------------- Idefics3
def _idefics3_config():
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=_vision_config(),
        text_config=_text_config(model_type="llama"),
        image_token_id=IMAGE_TOKEN, scale_factor=2, pad_token_id=PAD,
    )


def _idefics3_tokens(config, size):
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    return patches // config.scale_factor**2


def _idefics3_pixels(config, sizes_per_request, generator):
    # Idefics3 takes [requests, max_images, C, H, W]; all-zero images are padding it drops.
    most = max((len(sizes) for sizes in sizes_per_request), default=0)
    if most == 0:
        return {}
    size = config.vision_config.image_size
    pixel_values = torch.zeros(len(sizes_per_request), most, 3, size, size)
    for request, sizes in enumerate(sizes_per_request):
        for index in range(len(sizes)):
            pixel_values[request, index] = torch.randn(3, size, size, generator=generator)
    return {"pixel_values": pixel_values}


# --------------------------------------------------------------------------- Gemma3
def _gemma3_config():
    from transformers import Gemma3Config

    return Gemma3Config(
        vision_config=_vision_config(model_type="siglip_vision_model", patch_size=2, vision_use_head=False),
        text_config=_text_config(query_pre_attn_scalar=16, sliding_window=64,
                                 layer_types=["sliding_attention", "full_attention"]),
        mm_tokens_per_image=16, image_token_index=IMAGE_TOKEN, boi_token_index=BOI_TOKEN,
        eoi_token_index=EOI_TOKEN, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )


# --------------------------------------------------------------------------- Llama4
def _llama4_config():
    from transformers import Llama4Config

    return Llama4Config(
        # The vision adapter's fc1 takes the pixel-shuffled width: hidden_size / ratio**2.
        vision_config=_vision_config(intermediate_size=128, patch_size=2, vision_output_dim=64,
                                     pixel_shuffle_ratio=0.5, projector_input_dim=64, projector_output_dim=64),
        # MoE layers interleaved with dense ones as Llama4 Maverick has them (interleave_moe_layer_step=2:
        # layer 1 is MoE, layer 0 dense): a router, four routed experts (fused 3D weights), a shared expert.
        text_config=_text_config(intermediate_size_mlp=128, interleave_moe_layer_step=2, num_local_experts=4,
                                 num_experts_per_tok=1, no_rope_layers=[1, 0],
                                 layer_types=["chunked_attention", "full_attention"], attention_chunk_size=256),
        image_token_index=IMAGE_TOKEN, boi_token_index=BOI_TOKEN, eoi_token_index=EOI_TOKEN, pad_token_id=PAD,
    )


# The routed experts' fused 3D weights: PEFT `target_parameters` (the shared expert's linears are
# reached by the module suffixes gate_proj, down_proj).
_LLAMA4_EXPERTS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")


def _llama4_tokens(config, size):
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return int(patches * vision.pixel_shuffle_ratio**2)


# --------------------------------------------------------------------------- Qwen2-Audio
def _qwen2_audio_config():
    from transformers import Qwen2AudioConfig

    text = _text_config(model_type="qwen2")
    del text["head_dim"]
    return Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=32, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50),
        text_config=text, audio_token_index=IMAGE_TOKEN, pad_token_id=PAD,
    )


def _qwen2_audio_frames(config) -> int:
    # Every clip is padded to the tower's full window (30 s in the real model): 2 frames per position.
    return 2 * config.audio_config.max_source_positions


def _qwen2_audio_sizes(config):
    frames = _qwen2_audio_frames(config)
    return ((frames,), (frames * 3 // 5,), (frames * 3 // 10,))


def _qwen2_audio_tokens(config, size):
    return ((size[0] - 1) // 2 + 1 - 2) // 2 + 1


def _qwen2_audio_features(config, sizes_per_request, generator):
    lengths = [size[0] for sizes in sizes_per_request for size in sizes]
    if not lengths:
        return {}
    frames = _qwen2_audio_frames(config)
    features = torch.zeros(len(lengths), config.audio_config.num_mel_bins, frames)
    mask = torch.zeros(len(lengths), frames, dtype=torch.long)
    for index, length in enumerate(lengths):
        features[index, :, :length] = torch.randn(config.audio_config.num_mel_bins, length, generator=generator)
        mask[index, :length] = 1
    return {"input_features": features, "feature_attention_mask": mask}


ZOO: dict[str, Family] = {
    family.name: family
    for family in [
        Family("tiny-qwen2-vl", "Qwen2VLForConditionalGeneration", _qwen2_vl_config, _qwen2_vl_sizes,
               _qwen2_vl_tokens, _qwen2_vl_pixels,
               (("qkv", "fc1"), ("mlp.0", "mlp.2"), ("q_proj", "v_proj", "gate_proj", "down_proj")),
               wrap_tokens=lambda config: ([config.vision_start_token_id], [config.vision_end_token_id]),
               notes="all images' patches packed into one tower call; spatial_merge_size 2; any image size",
               accepts=_qwen2_vl_accepts),
        Family("tiny-qwen3-vl-moe", "Qwen3VLMoeForConditionalGeneration", _qwen3_vl_moe_config, _qwen2_vl_sizes,
               _qwen2_vl_tokens, _qwen2_vl_pixels,
               (("attn.qkv", "mlp.linear_fc1"), ("merger.linear_fc1", "deepstack_merger_list.0.linear_fc2"),
                ("q_proj", "o_proj", *_QWEN3_VL_MOE_EXPERTS)),
               wrap_tokens=lambda config: ([config.vision_start_token_id], [config.vision_end_token_id]),
               notes="Qwen2-VL's packed patches, deepstack mergers; MoE text layers (4 experts, batched_mm)",
               accepts=_qwen2_vl_accepts),
        Family("tiny-llava", "LlavaForConditionalGeneration", _llava_config, _square_image, _llava_tokens,
               _stacked_pixels, (("out_proj", "fc1"), ("linear_1", "linear_2"), ("q_proj", "v_proj", "up_proj",
                                                                                  "down_proj")),
               notes="CLIP tower, two-layer MLP projector"),
        Family("tiny-idefics3", "Idefics3ForConditionalGeneration", _idefics3_config, _square_image,
               _idefics3_tokens, _idefics3_pixels,
               (("out_proj", "fc2"), ("proj",), ("q_proj", "k_proj", "gate_proj", "down_proj")),
               notes="SigLIP-style tower, pixel-shuffle connector"),
        # Gemma3's connector has no linear layer, so no connector target.
        Family("tiny-gemma3", "Gemma3ForConditionalGeneration", _gemma3_config, _square_image,
               lambda config, size: config.mm_tokens_per_image, _stacked_pixels,
               (("out_proj", "fc1"), (), ("q_proj", "o_proj", "up_proj", "down_proj")), wrap_tokens=_boi_eoi,
               notes="SigLIP tower, pooled projector (its projection is a bare parameter, not a linear)"),
        Family("tiny-llama4", "Llama4ForConditionalGeneration", _llama4_config, _square_image, _llama4_tokens,
               _stacked_pixels, (("fc2", "patch_embedding.linear"), ("fc1", "linear_1"),
                                 ("q_proj", "v_proj", "gate_proj", "down_proj", *_LLAMA4_EXPERTS)),
               wrap_tokens=_boi_eoi,
               notes="MoE every other text layer (4 experts, shared expert); one image is one tile; "
                     "vision adapter MLP is connector"),
        Family("tiny-qwen2-audio", "Qwen2AudioForConditionalGeneration", _qwen2_audio_config, _qwen2_audio_sizes,
               _qwen2_audio_tokens, _qwen2_audio_features,
               (("q_proj", "out_proj", "fc1"), ("multi_modal_projector.linear",), ("v_proj", "gate_proj", "down_proj")),
               accepts=lambda config, size: len(size) == 1 and 3 <= size[0] <= _qwen2_audio_frames(config),
               modality="audio",
               notes="Whisper-style audio tower on clips padded to one window (sizes in mel frames); audio only"),
    ]
}


# Families that take every image's patches packed in one `pixel_values [patches, features]`, with
# `image_grid_thw` and `mm_token_type_ids` (text 0, image 1) for their M-RoPE positions.
_PACKED_PATCHES = ("Qwen2VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")


def make_adapter(model: nn.Module, path, target_modules: Sequence[str] | str, r: int = 4, lora_alpha: float = 8,
                 seed: int = 0, **config):
    """Train nothing: save a PEFT LoRA adapter for `model` with random A and B, as PEFT saves it.

    `init_lora_weights=False` gives B random values, and B is then widened so that an adapter
    changes the logits clearly (PEFT's own random B is small). Targets that name a parameter, not a
    module (a 3D expert weight, `experts.gate_up_proj`), go to PEFT's `target_parameters`
    (`split_targets`), beside any passed as `target_parameters=`. Needs PEFT (the tests' and the
    example's dependency, not the package's). Returns the adapter's directory."""
    import copy
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # A string is PEFT's regex form: passed on as it is.
    if isinstance(target_modules, str):
        targets = target_modules
    else:
        targets, parameters = split_targets(model, target_modules)
        if parameters:
            extra = config.pop("target_parameters", None) or []
            extra = [extra] if isinstance(extra, str) else list(extra)
            config["target_parameters"] = list(dict.fromkeys(extra + parameters))
    peft_config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, init_lora_weights=False, **config)
    peft_model = get_peft_model(copy.deepcopy(model), peft_config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5 / max(1, parameter.shape[1]) ** 0.5)
    peft_model.save_pretrained(str(path))
    return Path(path)


def split_targets(model: nn.Module, targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """`targets` as PEFT's (`target_modules`, `target_parameters`): a target that ends no module's name
    but ends a parameter's (`experts.gate_up_proj`, a 3D expert weight) is a parameter target."""
    modules = [name for name, _ in model.named_modules()]
    parameters = [name for name, _ in model.named_parameters()]

    def ends(name: str, target: str) -> bool:
        return name == target or name.endswith(f".{target}")

    module_targets, parameter_targets = [], []
    for target in targets:
        if not any(ends(name, target) for name in modules) and any(ends(name, target) for name in parameters):
            parameter_targets.append(target)
        else:
            module_targets.append(target)
    return module_targets, parameter_targets


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the tiny model `name` with random weights drawn from `seed`."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name].build(seed=seed, dtype=dtype)


def family_of(model: nn.Module) -> Family:
    for family in ZOO.values():
        if type(model).__name__ == family.model_class:
            return family
    known = ", ".join(family.model_class for family in ZOO.values())
    raise TypeError(f"no batch maker for {type(model).__name__}; families with one: {known}")


def make_batch(
    model: nn.Module,
    items_per_request: Sequence[int] = (0, 1, 2),
    item_sizes: Sequence[Sequence[tuple[int, ...]]] | None = None,
    text_tokens: int = 6,
    seed: int = 0,
) -> dict:
    """A batch with one row per request, request `r` holding `items_per_request[r]` media items
    (images; audio clips for an audio family).

    `item_sizes[r]` optionally gives the size of each item of request `r` (`(height, width)` of an
    image, `(frames,)` of a clip; the family's default size otherwise). Every row has the same
    length and at least `text_tokens` text tokens; each item's tokens sit inside the text, a run
    of their own. Returns the model's keyword inputs, with an all-ones `attention_mask`.
    """
    family = family_of(model)
    config = model.config
    sizes_allowed = family.item_sizes(config)
    generator = torch.Generator().manual_seed(seed)
    if item_sizes is None:
        item_sizes = [[sizes_allowed[0]] * count for count in items_per_request]
    item_sizes = [[tuple(size) for size in sizes] for sizes in item_sizes]
    if [len(sizes) for sizes in item_sizes] != list(items_per_request):
        raise ValueError("item_sizes must give one size per item of each request")
    what = token_name(family.modality)
    for sizes in item_sizes:
        for size in sizes:
            if not family.takes(config, size):
                items = "images" if what == "image" else f"{what} items"
                raise ValueError(f"{family.name} takes {items} of sizes like {sizes_allowed}, not {size}")

    before, after = family.wrap_tokens(config)
    item = image_token_id(config, family.modality)
    # A text token before each item that has no tokens of its own around it, as chat templates
    # put one ("<image>\n<image>"): each item's tokens are then a run of their own.
    before = before or [FIRST_TEXT_TOKEN]
    prompts = [[before + [item] * family.item_tokens(config, size) + after for size in sizes]
               for sizes in item_sizes]
    lengths = [sum(len(prompt) for prompt in request) for request in prompts]
    total = max(lengths, default=0) + text_tokens + 1
    vocab = min(config.get_text_config().vocab_size, TEXT_TOKEN_LIMIT)
    bos = config.get_text_config().bos_token_id
    bos = BOS if bos is None else int(bos)
    rows = []
    for request, length in zip(prompts, lengths):
        text = torch.randint(FIRST_TEXT_TOKEN, vocab, (total - 1 - length,), generator=generator).tolist()
        head, tail = text[: len(text) // 2], text[len(text) // 2 :]
        rows.append([bos] + head + [token for prompt in request for token in prompt] + tail)
    input_ids = torch.tensor(rows)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    batch.update(family.media_inputs(config, item_sizes, generator))
    if family.model_class in _PACKED_PATCHES:
        batch["mm_token_type_ids"] = (input_ids == item).int()
    return batch


def split_batch(model: nn.Module, batch: dict) -> list[dict]:
    """Cut a batch from `make_batch` into one batch per request, each holding its own items."""
    family = family_of(model)
    config = model.config
    item = image_token_id(config, family.modality)
    per_image = family.item_tokens(config, family.item_sizes(config)[0])
    runs = image_token_runs(batch["input_ids"], [item])
    requests, next_image, next_row = [], 0, 0
    for index, row in enumerate(batch["input_ids"]):
        tokens = int((row == item).sum())
        single = {key: batch[key][index : index + 1]
                  for key in ("input_ids", "attention_mask", "mm_token_type_ids") if key in batch}
        if tokens and family.model_class in _PACKED_PATCHES:
            grids, seen, rows = [], 0, 0
            while seen < tokens:
                grid = batch["image_grid_thw"][next_image]
                grids.append(grid)
                rows += int(grid.prod())
                seen += int(grid.prod()) // config.vision_config.spatial_merge_size**2
                next_image += 1
            single["pixel_values"] = batch["pixel_values"][next_row : next_row + rows]
            single["image_grid_thw"] = torch.stack(grids)
            next_row += rows
        elif tokens and family.model_class == "Idefics3ForConditionalGeneration":
            single["pixel_values"] = batch["pixel_values"][index : index + 1, : tokens // per_image]
        elif tokens and family.modality == "audio":
            # Clips of different lengths give different tokens: one run of tokens per clip.
            count = runs[index]
            for key in ("input_features", "feature_attention_mask"):
                single[key] = batch[key][next_image : next_image + count]
            next_image += count
        elif tokens:
            count = tokens // per_image
            single["pixel_values"] = batch["pixel_values"][next_image : next_image + count]
            next_image += count
        requests.append(single)
    return requests
