"""Which request owns each unit (image, crop, tile) a tower sees: derived from the batch, not guessed.

A tower's layers see their rows as `[units, rows per unit, width]` where a unit is one image,
crop or tile that entered the tower. How many units an image becomes is the family's own logic
(an any-resolution family cuts an image into a number of crops that depends on its size; a
family with a fixed patch budget gives each image one padded unit), and the number of image
tokens an image gives the language model need not be proportional to its units. So the tower's
rows cannot be shared among requests by image tokens. Two steps find each unit's request:

1. **Units to images, by probing the family's own code** (`probe_tower_units`). The batch's
   floating inputs (`pixel_values` and the like) are replaced by *tags*: each entry along the
   leading dimension is filled with its index + 1 (zeros kept, since families drop all-zero
   padding images by their values). The model's uncompiled forward then runs until its tower is
   entered, and is stopped there. Whatever the family did on the way (select each image's crops,
   flatten `[requests, images]`, drop padding images) moved the tags with the pixels, so the
   tensor the tower receives says, per unit, which input entry it came from. Only indexing and
   reshaping run, on the host's dispatch of the same device: no tower, no language model.
2. **Images to requests** (`images_of_requests`): the `i`-th image belongs to the request where
   the `i`-th image's tokens sit. With one image per request that has image tokens, or the count
   per request given (`images_per_request`), or each image's tokens a run of their own (a text
   token between two images, as every chat template puts), this is exact. Otherwise it is not
   derived, and the caller decides what is safe (see `UnitOwnership.from_batch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import BatchError

__all__ = ["UnitOwnership", "probe_tower_units", "images_of_requests", "image_token_runs", "image_token_ids",
           "image_tokens_per_request", "trace_units", "rows_are_units", "outermost"]

# Tags must stay exact in the dtype the family casts pixels to: bfloat16 holds integers up to 256.
_MAX_TAGGED_ENTRIES = 256


class _TowerEntered(Exception):
    """Raised inside the probe when the tower is entered, to stop the forward there."""

    def __init__(self, args, kwargs):
        super().__init__("tower entered")
        self.args, self.kwargs = args, kwargs


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Per unit the tower received: the index of the input entry (image, or request) it came from;
    or why that could not be told."""

    sources: list[int] | None
    reason: str = ""


def _short(values: Sequence[int], limit: int = 12) -> str:
    values = list(values)
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ... ({len(values)})]"


def _tagged(value: torch.Tensor) -> torch.Tensor:
    shape = (value.shape[0],) + (1,) * (value.dim() - 1)
    tags = torch.arange(1, value.shape[0] + 1, device=value.device, dtype=value.dtype).view(shape)
    return torch.where(value != 0, tags, torch.zeros((), dtype=value.dtype, device=value.device))


def _tensors_of(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


def probe_tower_units(model: nn.Module, batch: Mapping[str, object], tower_roots: Sequence[str],
                      pixel_key: str = "pixel_values") -> ProbeResult:
    """Run `model`'s uncompiled forward on tagged inputs until a tower root is entered; return, per
    unit of the tower's input, the index along `pixel_key`'s leading dimension it came from."""
    pixels = batch.get(pixel_key)
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point() or pixels.dim() < 2:
        return ProbeResult(None, f"the batch has no floating {pixel_key} to follow")
    if pixels.shape[0] > _MAX_TAGGED_ENTRIES:
        return ProbeResult(None, f"{pixel_key} has {pixels.shape[0]} leading entries, more than can be tagged exactly")
    tagged = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    tagged[pixel_key] = _tagged(pixels)
    modules = dict(model.named_modules())
    roots = [modules[name] for name in tower_roots if name in modules]
    if not roots:
        return ProbeResult(None, "no tower module to stop at")

    def stop(*args, **kwargs):
        raise _TowerEntered(args, kwargs)

    for root in roots:
        root.forward = stop  # an instance attribute, deleted below: the class's forward is untouched
    entered = None
    try:
        with torch.no_grad():
            model.forward(**tagged)
    except _TowerEntered as reached:
        entered = reached
    except Exception as error:  # the family's own code refused the tags: say so, fall back safely
        return ProbeResult(None, f"the forward on tagged inputs stopped before the tower: {type(error).__name__}: "
                                 f"{str(error)[:200]}")
    finally:
        for root in roots:
            del root.forward
    if entered is None:
        return ProbeResult(None, "the forward never entered the tower")
    limit = pixels.shape[0]
    for value in _tensors_of(entered.args, entered.kwargs):
        if not value.is_floating_point() or value.dim() < 2 or value.shape[0] == 0:
            continue
        flat = value.detach().reshape(value.shape[0], -1).float()
        if not bool(((flat == flat.round()) & (flat >= 0) & (flat <= limit)).all()):
            continue  # not our tags: some other floating input of the tower
        highest = flat.amax(dim=1)
        lowest = torch.where(flat > 0, flat, torch.full_like(flat, float(limit + 1))).amin(dim=1)
        if bool((highest == 0).any()):
            return ProbeResult(None, "a unit the tower received holds no pixel of any input image")
        if not bool((lowest == highest).all()):
            return ProbeResult(None, "a unit the tower received mixes pixels of two input images")
        return ProbeResult([int(tag) - 1 for tag in highest.tolist()])
    return ProbeResult(None, f"the tower's input does not carry {pixel_key}'s entries (it is computed from them)")


def image_token_ids(config) -> list[int]:
    """The ids a config gives its image placeholder token."""
    ids = []
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def _image_token_mask(input_ids: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in token_ids:
        mask |= input_ids == token
    return mask


def image_tokens_per_request(input_ids: torch.Tensor, token_ids: Sequence[int]) -> list[int]:
    return _image_token_mask(input_ids, token_ids).sum(dim=-1).tolist()


def image_token_runs(input_ids: torch.Tensor, token_ids: Sequence[int]) -> list[int]:
    """Per request, the number of maximal runs of image tokens."""
    mask = _image_token_mask(input_ids, token_ids)
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    return starts.sum(dim=-1).tolist()


def images_of_requests(image_count: int, image_tokens: Sequence[int], runs: Sequence[int] | None,
                       images_per_request: Sequence[int] | None) -> tuple[list[int] | None, str]:
    """The request of each of `image_count` images (in order), and how that was told; None if it cannot be."""
    requests = len(image_tokens)
    if images_per_request is not None:
        counts = [int(count) for count in images_per_request]
        if len(counts) != requests:
            raise BatchError(f"images_per_request has {len(counts)} entries but the batch has {requests} requests")
        if sum(counts) != image_count:
            raise BatchError(f"images_per_request says {sum(counts)} images but the batch has {image_count}")
        mismatched = [row for row, (count, tokens) in enumerate(zip(counts, image_tokens)) if (count > 0) != (tokens > 0)]
        if mismatched:
            row = mismatched[0]
            raise BatchError(f"images_per_request gives request {row} {counts[row]} images, but it has "
                             f"{image_tokens[row]} image tokens")
        how = "images_per_request"
    elif sum(1 for tokens in image_tokens if tokens) == image_count:
        counts, how = [1 if tokens else 0 for tokens in image_tokens], "one input entry per request with image tokens"
    elif runs is not None and sum(runs) == image_count:
        counts, how = list(runs), "one run of image tokens per image"
    else:
        return None, ""
    owners = [row for row, count in enumerate(counts) for _ in range(count)]
    return owners, how


@dataclasses.dataclass
class UnitOwnership:
    """The request owning each unit a tower received, for one batch; or why it is not known."""

    owners: list[int] | None  # per unit, its request
    how: str  # how the owners were told (for `mmlora-fx inspect` and errors), or why they were not
    received: int | None = None  # units the tower received, where the probe saw them (owners or not)

    @property
    def units(self) -> int | None:
        return len(self.owners) if self.owners is not None else None

    @classmethod
    def unknown(cls, why: str, received: int | None = None) -> "UnitOwnership":
        return cls(None, why, received)

    @classmethod
    def from_probe(cls, probe: ProbeResult, image_tokens: Sequence[int], runs: Sequence[int] | None,
                   images_per_request: Sequence[int] | None) -> "UnitOwnership":
        if probe.sources is None:
            return cls.unknown(probe.reason)
        sources = probe.sources
        if any(later < earlier for earlier, later in zip(sources, sources[1:])):
            return cls.unknown("the tower received its units out of the images' order", len(sources))
        images = sorted(set(sources))  # input entries that reached the tower (padding ones do not)
        if images_per_request is not None and sum(images_per_request) != len(images):
            # The entries are not images (all images' patches as rows, say): nothing to map them by.
            return cls.unknown(f"the tower received {len(images)} input entries, not the {sum(images_per_request)} "
                               "images images_per_request gives", len(sources))
        image_owner, how = images_of_requests(len(images), image_tokens, runs, images_per_request)
        if image_owner is not None:
            owner_of = dict(zip(images, image_owner))
            return cls([owner_of[source] for source in sources], f"units traced to their images; {how}", len(sources))
        # Which images belong to which request is not known. Sharing the units by image tokens would
        # be a guess (exact only where every image gives the same tokens): say so instead.
        return cls.unknown(
            f"the batch does not say which of the {len(images)} input entries its tower received belong to which "
            f"request (image tokens per request {_short(image_tokens)}, in {_short(runs or [])} runs): put a text "
            "token between a request's images, or pass images_per_request=[...] if those entries are its images",
            len(sources))


def outermost(prefixes: Sequence[str]) -> list[str]:
    """The prefixes not inside another one of them (the towers' roots)."""
    return [prefix for prefix in prefixes
            if not any(other != prefix and prefix.startswith(other + ".") for other in prefixes)]


def trace_units(model: nn.Module, inputs: Mapping[str, object], tower_roots: Sequence[str],
                token_ids: Sequence[int], image_tokens: Sequence[int] | None = None,
                images_per_request: Sequence[int] | None = None) -> UnitOwnership:
    """The request of each unit `model`'s tower receives for the batch `inputs` (see the module's doc)."""
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or not token_ids:
        return UnitOwnership.unknown("the batch has no input_ids with image tokens")
    if image_tokens is None:
        image_tokens = image_tokens_per_request(input_ids, token_ids)
    probe = probe_tower_units(model, inputs, tower_roots)
    return UnitOwnership.from_probe(probe, image_tokens, image_token_runs(input_ids, token_ids), images_per_request)


def rows_are_units(shape: Sequence[int], units: int | None) -> bool:
    """Whether an activation of `shape` holds its rows as `[units, ...]`, one block per tower unit."""
    return bool(units) and len(shape) >= 3 and shape[0] == units
