"""Families outside the zoo, built the way a new user meets them: a real transformers class, a
tiny config, random weights, and batches as its processor would give them (nobody wrote
mmlora_fx code for these)."""

from __future__ import annotations

import dataclasses

import torch

from mmlora_fx import zoo

def tiny_text(model_type: str, **overrides) -> dict:
    """The tiny language model every family here uses (one layer, 64 wide), as a sub-config dict."""
    config = dict(model_type=model_type, vocab_size=zoo.VOCAB, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config.update(overrides)
    return config


def with_random_weights(model_class: str, config, seed: int) -> torch.nn.Module:
    """`transformers.<model_class>(config)` with random weights drawn from `seed`, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()


# Mistral3: a Pixtral tower (images of any size, padded to the batch's largest, cut back by
# `image_sizes`) and a patch merger in the projector that merges 2x2 patches.
MISTRAL3_PATCH, MISTRAL3_MERGE = 4, 2
MISTRAL3_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                    "merging_layer", "linear_1", "linear_2"]


def build_mistral3(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=MISTRAL3_PATCH, head_dim=16),
        text_config=tiny_text("mistral", head_dim=16),
        image_token_index=zoo.IMAGE_TOKEN, spatial_merge_size=MISTRAL3_MERGE, vision_feature_layer=-1,
    )
    return with_random_weights("Mistral3ForConditionalGeneration", config, seed)


@dataclasses.dataclass
class Batch:
    inputs: dict
    singles: list[dict]  # each request alone, as its own batch


def mistral3_batch(sizes_per_request: list[list[tuple[int, int]]], seed: int = 0) -> Batch:
    """Requests with images of the given (height, width) sizes; one image token per merged patch."""
    generator = torch.Generator().manual_seed(seed)
    unit = MISTRAL3_PATCH * MISTRAL3_MERGE
    tokens = [sum((height // unit) * (width // unit) for height, width in sizes) for sizes in sizes_per_request]
    length = max(tokens) + 8
    rows, images, sizes = [], [], []
    for count, request_sizes in zip(tokens, sizes_per_request):
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (length - count,), generator=generator).tolist()
        rows.append(text[:3] + [zoo.IMAGE_TOKEN] * count + text[3:])
        for height, width in request_sizes:
            sizes.append((height, width))
            images.append(torch.randn(3, height, width, generator=generator))
    input_ids = torch.tensor(rows)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    singles = [{"input_ids": input_ids[row: row + 1], "attention_mask": inputs["attention_mask"][row: row + 1]}
               for row in range(len(rows))]
    if images:
        # The processor pads every image to the batch's largest and says each one's size.
        height, width = max(size[0] for size in sizes), max(size[1] for size in sizes)
        pixel_values = torch.zeros(len(images), 3, height, width)
        for index, image in enumerate(images):
            pixel_values[index, :, : image.shape[1], : image.shape[2]] = image
        inputs["pixel_values"], inputs["image_sizes"] = pixel_values, torch.tensor(sizes)
        first = 0
        for single, request_sizes in zip(singles, sizes_per_request):
            if request_sizes:
                count = len(request_sizes)
                single["pixel_values"] = pixel_values[first: first + count]
                single["image_sizes"] = inputs["image_sizes"][first: first + count]
                first += count
    return Batch(inputs, singles)


# LLaVA-NeXT: any-resolution tiling. Each image is cut into a base crop plus a grid of crops chosen
# by its size, so images of different sizes send different numbers of crops through the tower;
# the image tokens then follow the unpadded grid (plus a newline per row), not the crops.
LLAVA_NEXT_CROP = 16
LLAVA_NEXT_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "linear_1", "linear_2", "up_proj", "down_proj"]


def build_llava_next(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=LLAVA_NEXT_CROP, patch_size=4, projection_dim=32),
        text_config=tiny_text("llama", head_dim=16),
        image_token_index=zoo.IMAGE_TOKEN, vision_feature_layer=-1,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    )
    return with_random_weights("LlavaNextForConditionalGeneration", config, seed)


def llava_next_crops(size: tuple[int, int], model) -> int:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size)


def _prompt_rows(tokens_per_request: list[list[int]], generator, separate: bool) -> torch.Tensor:
    """One row per request: text, then each image's tokens (a text token before each when `separate`)."""
    length = max(sum(tokens) + len(tokens) for tokens in tokens_per_request) + 6
    rows = []
    for tokens in tokens_per_request:
        body = []
        for count in tokens:
            body += ([zoo.FIRST_TEXT_TOKEN] if separate else []) + [zoo.IMAGE_TOKEN] * count
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (length - len(body),), generator=generator).tolist()
        rows.append(text[:3] + body + text[3:])
    return torch.tensor(rows)


def _split_media(inputs: dict, input_ids, items_per_request: list[int], media_keys: list[str]) -> list[dict]:
    """Each request alone: its row of `input_ids` and its own entries of every key in `media_keys`."""
    singles, first = [], 0
    for row, count in enumerate(items_per_request):
        single = {"input_ids": input_ids[row: row + 1], "attention_mask": inputs["attention_mask"][row: row + 1]}
        if count:
            single.update({key: inputs[key][first: first + count] for key in media_keys})
            first += count
        singles.append(single)
    return singles


def llava_next_batch(model, sizes_per_request: list[list[tuple[int, int]]], seed: int = 0,
                     separate: bool = True) -> Batch:
    """Requests with images of the given (height, width) sizes, as LLaVA-NeXT's processor gives them:
    `pixel_values [images, most crops, 3, crop, crop]` (padding crops zero) and `image_sizes`."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [size for request in sizes_per_request for size in request]
    crops = [llava_next_crops(size, model) for size in sizes]
    crop = model.config.vision_config.image_size
    pixel_values = torch.zeros(len(sizes), max(crops, default=1), 3, crop, crop)
    for index, count in enumerate(crops):
        pixel_values[index, :count] = torch.randn(count, 3, crop, crop, generator=generator)
    # Image tokens per image, as the model packs them: counted from its own features of that image.
    with torch.no_grad():
        tokens = [model.model.get_image_features(pixel_values[index: index + 1], torch.tensor([size])).pooler_output[0]
                  .shape[0] for index, size in enumerate(sizes)]
    per_request, first = [], 0
    for request in sizes_per_request:
        per_request.append(tokens[first: first + len(request)])
        first += len(request)
    input_ids = _prompt_rows(per_request, generator, separate)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if sizes:
        inputs.update(pixel_values=pixel_values, image_sizes=torch.tensor(sizes))
    singles = _split_media(inputs, input_ids, [len(request) for request in sizes_per_request],
                            ["pixel_values", "image_sizes"])
    return Batch(inputs, singles)


# LFM2-VL: a SigLIP2 NaFlex tower. Its processor pads every image to one patch budget
# (`pixel_values [images, budget, patch pixels]`, `pixel_attention_mask`), while the image tokens
# follow each image's own grid; the projector then runs once per image, on that image's tokens.
LFM2_PATCH, LFM2_BUDGET = 4, 64
LFM2_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "patch_embedding", "linear_1", "linear_2", "w1", "w2"]


def build_lfm2_vl(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.Lfm2VlConfig(
        vision_config=dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, patch_size=LFM2_PATCH, num_patches=LFM2_BUDGET, num_channels=3),
        text_config=tiny_text("lfm2", num_hidden_layers=2, layer_types=["full_attention", "conv"]),
        image_token_id=zoo.IMAGE_TOKEN, projector_hidden_size=48, downsample_factor=2,
    )
    return with_random_weights("Lfm2VlForConditionalGeneration", config, seed)


def lfm2_vl_batch(grids_per_request: list[list[tuple[int, int]]], seed: int = 0) -> Batch:
    """Requests with images of the given (rows, columns) patch grids (even, at most the budget)."""
    generator = torch.Generator().manual_seed(seed)
    grids = [grid for request in grids_per_request for grid in request]
    patch_pixels = 3 * LFM2_PATCH * LFM2_PATCH
    pixel_values = torch.zeros(len(grids), LFM2_BUDGET, patch_pixels)
    mask = torch.zeros(len(grids), LFM2_BUDGET, dtype=torch.long)
    for index, (height, width) in enumerate(grids):
        pixel_values[index, : height * width] = torch.randn(height * width, patch_pixels, generator=generator)
        mask[index, : height * width] = 1
    per_request, first = [], 0
    for request in grids_per_request:
        per_request.append([(height // 2) * (width // 2) for height, width in request])
        first += len(request)
    input_ids = _prompt_rows(per_request, generator, separate=True)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    keys = ["pixel_values", "spatial_shapes", "pixel_attention_mask"]
    if grids:
        inputs.update(pixel_values=pixel_values, spatial_shapes=torch.tensor(grids), pixel_attention_mask=mask)
    singles = _split_media(inputs, input_ids, [len(request) for request in grids_per_request], keys)
    return Batch(inputs, singles)


# Qwen2-Audio: a Whisper-style audio tower. Every clip is padded to the same number of mel frames
# (`input_features [clips, mels, frames]`, `feature_attention_mask [clips, frames]`), so the tower
# sees the same rows per clip, while a clip's audio tokens follow its own length.
QWEN2_AUDIO_FRAMES = 100  # 2 x max_source_positions
QWEN2_AUDIO_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "linear", "gate_proj", "down_proj"]


def build_qwen2_audio(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", d_model=32, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=QWEN2_AUDIO_FRAMES // 2),
        text_config=tiny_text("qwen2"),
        audio_token_index=zoo.IMAGE_TOKEN,
    )
    return with_random_weights("Qwen2AudioForConditionalGeneration", config, seed)


def qwen2_audio_tokens(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def qwen2_audio_batch(frames_per_request: list[list[int]], seed: int = 0,
                      mask_key: str = "feature_attention_mask") -> Batch:
    """Requests with audio clips of the given lengths in mel frames (at most QWEN2_AUDIO_FRAMES)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [frames for request in frames_per_request for frames in request]
    features = torch.zeros(len(lengths), 16, QWEN2_AUDIO_FRAMES)
    mask = torch.zeros(len(lengths), QWEN2_AUDIO_FRAMES, dtype=torch.long)
    for index, frames in enumerate(lengths):
        features[index, :, :frames] = torch.randn(16, frames, generator=generator)
        mask[index, :frames] = 1
    per_request = [[qwen2_audio_tokens(frames) for frames in request] for request in frames_per_request]
    input_ids = _prompt_rows(per_request, generator, separate=True)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if lengths:
        inputs.update({"input_features": features, mask_key: mask})
    singles = _split_media(inputs, input_ids, [len(request) for request in frames_per_request],
                            ["input_features", mask_key])
    return Batch(inputs, singles)


def build_audioflamingo3(seed: int = 0) -> torch.nn.Module:
    """AudioFlamingo3: clips padded like Qwen2-Audio's, masked by `input_features_mask`, pooled after the tower."""
    import transformers

    config = transformers.AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, num_mel_bins=16,
                          max_source_positions=QWEN2_AUDIO_FRAMES // 2),
        text_config=tiny_text("qwen2"),
        audio_token_id=zoo.IMAGE_TOKEN,
    )
    return with_random_weights("AudioFlamingo3ForConditionalGeneration", config, seed)


# Voxtral: a Whisper-style tower on 30-second chunks (`input_features [chunks, mels, frames]`),
# whose projector stacks four frames into one row (a reshape): one audio token per four frames.
VOXTRAL_FRAMES = 40  # 2 x max_source_positions
VOXTRAL_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "linear_1", "linear_2", "up_proj", "down_proj"]


def build_voxtral(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.VoxtralConfig(
        audio_config=dict(model_type="voxtral_encoder", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, num_mel_bins=16, max_source_positions=VOXTRAL_FRAMES // 2),
        text_config=tiny_text("llama", head_dim=16),
        audio_token_id=zoo.IMAGE_TOKEN,
    )
    return with_random_weights("VoxtralForConditionalGeneration", config, seed)


def voxtral_batch(chunks_per_request: list[int], seed: int = 0) -> Batch:
    """Requests with the given numbers of 30-second chunks of audio (each chunk its tokens' run)."""
    generator = torch.Generator().manual_seed(seed)
    tokens_per_chunk = VOXTRAL_FRAMES // 2 // 2  # the tower halves the frames, the projector stacks 4 -> 2x2
    features = torch.randn(sum(chunks_per_request), 16, VOXTRAL_FRAMES, generator=generator)
    per_request = [[tokens_per_chunk * chunks] if chunks else [] for chunks in chunks_per_request]
    input_ids = _prompt_rows(per_request, generator, separate=True)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "input_features": features}
    return Batch(inputs, _split_media(inputs, input_ids, chunks_per_request, ["input_features"]))


# Qwen2.5-Omni's thinker: an audio tower and a vision tower beside one language model. The thinker
# cuts every clip back to its own length and joins them as `[mels, frames]` before its audio tower,
# which chunks, convolves and packs them: the tower's rows are all clips' frames in one sequence.
OMNI_AUDIO_TOKEN, OMNI_IMAGE_TOKEN = zoo.IMAGE_TOKEN, zoo.IMAGE_TOKEN + 1
OMNI_AUDIO_START, OMNI_AUDIO_END, OMNI_VISION_START, OMNI_VISION_END = 300, 301, 302, 303
OMNI_FRAMES, OMNI_PATCH = 60, 4
OMNI_TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "audio_tower.proj", "attn.q", "attn.proj", "mlp.0", "mlp.2", "gate_proj", "down_proj"]


def build_qwen2_5_omni(seed: int = 0) -> torch.nn.Module:
    import transformers

    config = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, max_source_positions=OMNI_FRAMES // 2, n_window=10, output_dim=64),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3,
                           patch_size=OMNI_PATCH, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        text_config=tiny_text("qwen2_5_omni_text", rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                        mrope_section=[2, 3, 3])),
        audio_token_index=OMNI_AUDIO_TOKEN, image_token_index=OMNI_IMAGE_TOKEN, video_token_index=zoo.IMAGE_TOKEN + 2,
        audio_start_token_id=OMNI_AUDIO_START, audio_end_token_id=OMNI_AUDIO_END,
    )
    config.vision_start_token_id, config.vision_end_token_id = OMNI_VISION_START, OMNI_VISION_END
    return with_random_weights("Qwen2_5OmniThinkerForConditionalGeneration", config, seed)


def omni_audio_tokens(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def omni_batch(requests: list[dict], seed: int = 0) -> Batch:
    """Requests each with audio clips (`"audio": [frames, ...]`) and images (`"images": [(rows, columns)
    of patches, ...]`), in that order in the prompt, as the thinker's processor lays them out."""
    generator = torch.Generator().manual_seed(seed)
    clips = [frames for request in requests for frames in request.get("audio", [])]
    grids = [grid for request in requests for grid in request.get("images", [])]
    bodies = []
    for request in requests:
        body = []
        for frames in request.get("audio", []):
            body += [OMNI_AUDIO_START] + [OMNI_AUDIO_TOKEN] * omni_audio_tokens(frames) + [OMNI_AUDIO_END]
        for rows, columns in request.get("images", []):
            body += [OMNI_VISION_START] + [OMNI_IMAGE_TOKEN] * (rows * columns // 4) + [OMNI_VISION_END]
        bodies.append(body)
    length = max(len(body) for body in bodies) + 6
    input_ids = []
    for body in bodies:
        text = torch.randint(zoo.FIRST_TEXT_TOKEN, 300, (length - len(body),), generator=generator).tolist()
        input_ids.append(text[:3] + body + text[3:])
    input_ids = torch.tensor(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    features = torch.zeros(len(clips), 16, OMNI_FRAMES)
    mask = torch.zeros(len(clips), OMNI_FRAMES, dtype=torch.long)
    for index, frames in enumerate(clips):
        features[index, :, :frames] = torch.randn(16, frames, generator=generator)
        mask[index, :frames] = 1
    patch_pixels = 3 * 2 * OMNI_PATCH * OMNI_PATCH
    patches = [torch.randn(rows * columns, patch_pixels, generator=generator) for rows, columns in grids]
    if clips:
        inputs.update(input_features=features, feature_attention_mask=mask)
    if grids:
        inputs.update(pixel_values=torch.cat(patches), image_grid_thw=torch.tensor([[1, r, c] for r, c in grids]))
    singles, clip, image = [], 0, 0
    for row, request in enumerate(requests):
        single = {"input_ids": input_ids[row: row + 1], "attention_mask": inputs["attention_mask"][row: row + 1]}
        count = len(request.get("audio", []))
        if count:
            single.update(input_features=features[clip: clip + count], feature_attention_mask=mask[clip: clip + count])
            clip += count
        count = len(request.get("images", []))
        if count:
            single.update(pixel_values=torch.cat(patches[image: image + count]),
                          image_grid_thw=inputs["image_grid_thw"][image: image + count])
            image += count
        singles.append(single)
    return Batch(inputs, singles)
