"""Families outside the zoo, built the way a new user meets them: a real transformers class, a
tiny config, random weights, and batches as its processor would give them (nobody wrote
mmlora_fx code for these)."""

from __future__ import annotations

import dataclasses

import torch

from mmlora_fx import zoo

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
        text_config=dict(model_type="mistral", vocab_size=zoo.VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512),
        image_token_index=zoo.IMAGE_TOKEN, spatial_merge_size=MISTRAL3_MERGE, vision_feature_layer=-1,
    )
    torch.manual_seed(seed)
    return transformers.Mistral3ForConditionalGeneration(config).eval()


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
