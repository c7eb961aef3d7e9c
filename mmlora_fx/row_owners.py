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
   per request given (`images_per_request`, `items_per_request`), or only one request with image
   tokens, or each image's tokens a run of their own (a text token between two images, as every
   chat template puts), this is exact. Otherwise it is not derived, and the caller decides what
   is safe (see `UnitOwnership.from_probe`).

Some towers see no units at all: an omni thinker cuts every clip to its length and joins them
into one sequence before its tower. There the rows of the tower's first served linear are traced
to their clips instead (`probe_tower_rows`), and owned run by run.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import BatchError

__all__ = ["UnitOwnership", "probe_tower_units", "probe_tower_rows", "first_input_entering", "images_of_requests", "image_token_runs",
           "image_tokens_per_request", "trace_units", "rows_are_units", "outermost", "modality_token_ids", "token_name",
           "count_name"]

# Tags must stay exact in the dtype the family casts pixels to: bfloat16 holds integers up to 256.
_MAX_TAGGED_ENTRIES = 256


class _TowerEntered(Exception):
    """Raised inside the probe when the tower is entered, to stop the forward there."""

    def __init__(self, args, kwargs):
        super().__init__("tower entered")
        self.args, self.kwargs = args, kwargs


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Per unit the tower received: the index of the input entry (image, clip, or request) it came
    from, and which input that was; or why that could not be told."""

    sources: list[int] | None
    reason: str = ""
    key: str | None = None


def _short(values: Sequence[int], limit: int = 12) -> str:
    values = list(values)
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ... ({len(values)})]"


def _tagged(value: torch.Tensor, offset: int) -> torch.Tensor:
    shape = (value.shape[0],) + (1,) * (value.dim() - 1)
    tags = torch.arange(offset + 1, offset + value.shape[0] + 1, device=value.device, dtype=value.dtype).view(shape)
    return torch.where(value != 0, tags, torch.zeros((), dtype=value.dtype, device=value.device))


def _tensors_of(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


@contextlib.contextmanager
def _stopping_at(modules: Sequence[nn.Module], stop_for):
    """`stop_for(module)` as the instance `forward` of each of `modules` for the scope; whatever
    instance `forward` they had before (accelerate's device hooks set one) is put back, the class's
    is untouched."""
    saved = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = stop_for(module)
    try:
        yield
    finally:
        for module, forward in zip(modules, saved):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _submodules(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """`model`'s submodules of these names, those it has (a lookup each: a walk over every module,
    as `named_modules()` does, costs a large model ~0.1 ms per forward, where this runs)."""
    found, seen = {}, set()
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        if id(module) not in seen:  # one module under two names is patched and restored once
            seen.add(id(module))
            found[name] = module
    return found


def probe_tower_units(model: nn.Module, batch: Mapping[str, object], tower_roots: Sequence[str]) -> ProbeResult:
    """Run `model`'s uncompiled forward on tagged inputs until a tower root is entered; return, per
    unit of the tower's input, the index along its source input's leading dimension it came from.

    Every floating input of two or more dimensions (`pixel_values`, `input_features`, ...) is tagged,
    each with its own range of tags, so the tower's input also says which of them feeds it."""
    tagged = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    ranges = {}  # key -> (first tag - 1, entries)
    for key, value in tagged.items():
        if not value.is_floating_point() or value.dim() < 2:
            continue
        used = sum(entries for _, entries in ranges.values())
        if used + value.shape[0] > _MAX_TAGGED_ENTRIES:
            continue  # too many to tag exactly; left as it is
        ranges[key] = (used, value.shape[0])
        tagged[key] = _tagged(value, used)
    if not ranges:
        return ProbeResult(None, "the batch has no floating input (pixels, audio features) to follow")
    roots = list(_submodules(model, tower_roots).values())
    if not roots:
        return ProbeResult(None, "no tower module to stop at")

    def stop(*args, **kwargs):
        raise _TowerEntered(args, kwargs)

    entered = None
    try:
        with _stopping_at(roots, lambda root: stop), torch.no_grad():
            model.forward(**tagged)
    except _TowerEntered as reached:
        entered = reached
    except Exception as error:  # the family's own code refused the tags: say so, fall back safely
        return ProbeResult(None, f"the forward on tagged inputs stopped before the tower: {type(error).__name__}: "
                                 f"{str(error)[:200]}")
    if entered is None:
        return ProbeResult(None, "the forward never entered the tower")
    limit = sum(entries for _, entries in ranges.values())
    for value in _tensors_of(entered.args, entered.kwargs):
        if not value.is_floating_point() or value.dim() < 2 or value.shape[0] == 0:
            continue
        flat = value.detach().reshape(value.shape[0], -1).float()
        if not bool(((flat == flat.round()) & (flat >= 0) & (flat <= limit)).all()):
            continue  # not our tags: some other floating input of the tower
        highest = flat.amax(dim=1)
        lowest = torch.where(flat > 0, flat, torch.full_like(flat, float(limit + 1))).amin(dim=1)
        seen = [key for key, (first, entries) in ranges.items()
                if bool(((flat > first) & (flat <= first + entries)).any())]
        key = seen[0] if len(seen) == 1 else None  # the input feeding the tower, even where its units mix entries
        if bool((highest == 0).any()):
            return ProbeResult(None, "a unit the tower received holds no entry of any input", key=key)
        if not bool((lowest == highest).all()):
            return ProbeResult(None, "a unit the tower received mixes two input entries", key=key)
        tags = [int(tag) for tag in highest.tolist()]
        if key is None:
            return ProbeResult(None, "a tower's input mixes entries of two inputs")
        first, entries = ranges[key]
        if not all(first < tag <= first + entries for tag in tags):
            return ProbeResult(None, "a tower's input mixes entries of two inputs")
        return ProbeResult([tag - first - 1 for tag in tags], key=key)
    return ProbeResult(None, "the tower's input does not carry any input's entries (it is computed from them)")


def first_input_entering(model: nn.Module, batch: Mapping[str, object], tower_roots: Sequence[str],
                         keys: Sequence[str]) -> tuple[str | None, str]:
    """Which of `keys` (floating inputs of the batch: `pixel_values`, `pixel_values_videos`) the
    tower receives first, by running `model`'s uncompiled forward until the tower is entered with
    each key's values set to a constant of its own (zeros kept); or None and why not.

    A family that runs its vision tower once for the images and once for the videos (Qwen2-VL)
    decides the order in its own code; this reads it off that code, for any number of entries."""
    marked = dict(batch)
    for index, key in enumerate(keys):
        value = batch[key]
        marked[key] = torch.where(value != 0, torch.full((), index + 1, dtype=value.dtype, device=value.device),
                                  torch.zeros((), dtype=value.dtype, device=value.device))
    roots = list(_submodules(model, tower_roots).values())
    if not roots:
        return None, "no tower module to stop at"

    def stop(*args, **kwargs):
        raise _TowerEntered(args, kwargs)

    try:
        with _stopping_at(roots, lambda root: stop), torch.no_grad():
            model.forward(**marked)
    except _TowerEntered as reached:
        for value in _tensors_of(reached.args, reached.kwargs):
            if not value.is_floating_point() or value.numel() == 0:
                continue
            seen = {int(mark) for mark in value.detach().unique().tolist() if mark != 0}
            if len(seen) == 1 and 1 <= next(iter(seen)) <= len(keys):
                return keys[next(iter(seen)) - 1], ""
        return None, "the tower's first input carries none of the marked inputs whole (it is computed from them)"
    except Exception as error:  # the family's own code refused the marks: say so
        return None, f"the forward on marked inputs stopped before the tower: {type(error).__name__}: {str(error)[:200]}"
    return None, "the forward never entered the tower"


@dataclasses.dataclass(frozen=True)
class RowProbe:
    """The rows a tower's first served linear saw, as runs of consecutive rows from one input entry:
    `(entry, rows)` in row order; or why that could not be told."""

    runs: list[tuple[int, int]] | None
    rows: int = 0
    reason: str = ""
    module: str | None = None  # the linear whose rows these are


def _stopped_input(model: nn.Module, batch: Mapping[str, object],
                   stop_at: Sequence[nn.Module]) -> tuple[torch.Tensor | None, nn.Module | None]:
    """The first input of the first module of `stop_at` that `model`'s uncompiled forward on `batch`
    calls, and that module."""
    reached_module = []

    def stopper(module):
        def stop(*args, **kwargs):
            reached_module.append(module)
            raise _TowerEntered(args, kwargs)
        return stop

    try:
        with _stopping_at(stop_at, stopper), torch.no_grad():
            model.forward(**batch)
    except _TowerEntered as reached:
        first = next(_tensors_of(reached.args, reached.kwargs), None)
        return (first.detach() if first is not None else None), reached_module[0]
    return None, None


def probe_tower_rows(model: nn.Module, batch: Mapping[str, object], key: str,
                     stop_at: Sequence[str]) -> RowProbe:
    """Which entry of `batch[key]` each row of the first of the `stop_at` linears comes from.

    For towers that join all items into one sequence of rows (a thinker cutting clips to their
    lengths and concatenating them), where no unit is one item. Tags do not survive a convolution,
    but NaN does: it reaches exactly the rows computed from it. So the forward runs, up to that
    linear, with entries poisoned by their index's bits: for bit `b`, once with NaN in the entries
    whose bit is 1 and once in those whose bit is 0 (zeros kept, as the tags keep them). A row
    from one entry is NaN in exactly one run of each pair, which spells the entry; a row from no
    entry or from two is NaN in neither or both, and the rows are not told; so is a first call that
    sees only some entries (a tower running its linear on windows of the rows). 2 x max(1,
    ceil(log2 entries)) forwards of the family's code up to that linear: the stem only where the
    tower's first linear is served (otherwise the layers before the first served one run too).
    """
    value = batch[key]
    modules = _submodules(model, stop_at)
    stop_modules = list(modules.values())
    if not isinstance(value, torch.Tensor) or not stop_modules:
        return RowProbe(None, reason="nothing to probe")
    entries = value.shape[0]
    bits = max(1, (entries - 1).bit_length())
    index = torch.arange(entries, device=value.device).view((entries,) + (1,) * (value.dim() - 1))
    nan = torch.full((), float("nan"), dtype=value.dtype, device=value.device)
    spelled, rows, reached = None, None, None
    names_of = {id(module): name for name, module in modules.items()}
    for bit in range(bits):
        poisoned_in = []
        for rail in (1, 0):
            chosen = ((index >> bit) & 1) == rail
            batch_now = dict(batch)
            batch_now[key] = torch.where(chosen & (value != 0), nan, value)
            try:
                seen, module = _stopped_input(model, batch_now, stop_modules)
            except Exception as error:  # the family's own code refused NaN: say so, fall back safely
                return RowProbe(None, reason=f"the forward on poisoned inputs failed: {type(error).__name__}: "
                                             f"{str(error)[:200]}")
            if seen is None or seen.dim() == 0:
                return RowProbe(None, reason="the forward never reached the tower's first served linear")
            flat = seen.reshape(-1, seen.shape[-1])
            if (rows is not None and flat.shape[0] != rows) or (reached is not None and module is not reached):
                return RowProbe(None, reason="the poisoned forwards reached different linears or rows")
            rows, reached = flat.shape[0], module
            poisoned_in.append(torch.isnan(flat).any(dim=-1))
        one, zero = poisoned_in
        if not bool((one ^ zero).all()):
            return RowProbe(None, rows=rows, reason="a row of the tower's first served linear comes from no input entry "
                                                    "or from two")
        spelled = one.long() << bit if spelled is None else spelled | (one.long() << bit)
    owners = spelled.tolist()
    if any(entry >= entries for entry in owners):
        return RowProbe(None, rows=rows, reason="a row of the tower's first served linear spells no input entry")
    # Every entry with values must be in these rows: a tower that runs its linear once per window
    # of the joined rows shows the probe its first window only, and runs from it would be applied
    # to the other windows' rows.
    present = (value.reshape(entries, -1) != 0).any(dim=1).nonzero().flatten().tolist()
    missing = sorted(set(present) - set(owners))
    if missing:
        return RowProbe(None, rows=rows, reason=f"the first call of the tower's first served linear saw {len(set(owners))} "
                                                f"of the {len(present)} {key} entries (the tower runs it on part of "
                                                "the rows at a time)")
    runs: list[tuple[int, int]] = []
    for entry in owners:
        if runs and runs[-1][0] == entry:
            runs[-1] = (entry, runs[-1][1] + 1)
        else:
            runs.append((entry, 1))
    return RowProbe(runs, rows=rows, module=names_of.get(id(reached)))


def token_name(modality: str) -> str:
    """What configs and messages call a modality's items and tokens: `image` for vision, else the modality."""
    return "image" if modality == "vision" else modality


def modality_token_ids(config, modality: str) -> list[int]:
    """The ids a config gives a modality's placeholder token (`image_token_id`, `audio_token_index`, ...)."""
    ids = []
    for key in (f"{token_name(modality)}_token_id", f"{token_name(modality)}_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value not in ids:
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


def items_word(what: str) -> str:
    """A modality's items in messages: "images", "audio items"."""
    return "images" if what == "image" else f"{what} items"


def count_name(what: str) -> str:
    """The call argument that gives a modality's items per request, as messages name it."""
    return "images_per_request" if what == "image" else f"items_per_request[{what!r}]"


def images_of_requests(image_count: int, image_tokens: Sequence[int], runs: Sequence[int] | None,
                       images_per_request: Sequence[int] | None, what: str = "image") -> tuple[list[int] | None, str]:
    """The request of each of `image_count` items (images, clips; in order), and how that was told;
    None if it cannot be. `what` names the items in messages."""
    requests = len(image_tokens)
    given = count_name(what)
    if images_per_request is not None:
        counts = [int(count) for count in images_per_request]
        if len(counts) != requests:
            raise BatchError(f"{given} has {len(counts)} entries but the batch has {requests} requests")
        if sum(counts) != image_count:
            raise BatchError(f"{given} says {sum(counts)} {items_word(what)} but the batch has {image_count}")
        mismatched = [row for row, (count, tokens) in enumerate(zip(counts, image_tokens)) if (count > 0) != (tokens > 0)]
        if mismatched:
            row = mismatched[0]
            raise BatchError(f"{given} gives request {row} {counts[row]} {items_word(what)}, but it has "
                             f"{image_tokens[row]} {what} tokens")
        how = given
    elif sum(1 for tokens in image_tokens if tokens) == image_count:
        counts, how = [1 if tokens else 0 for tokens in image_tokens], f"one input entry per request with {what} tokens"
    elif sum(1 for tokens in image_tokens if tokens) == 1:
        # One request has this modality's tokens: every item is its own, however many.
        counts, how = [image_count if tokens else 0 for tokens in image_tokens], f"one request with {what} tokens"
    elif runs is not None and sum(runs) == image_count:
        counts, how = list(runs), f"one run of {what} tokens per {what}"
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
    # For towers whose rows are one sequence of all items (no unit is an item): per run of rows, its
    # request and its length, and the rows in all, as the tower's first served linear saw them.
    row_runs: list[tuple[int, int]] | None = None
    rows: int | None = None
    rows_module: str | None = None  # the linear whose rows were traced (its partition's layers use the runs)

    @property
    def units(self) -> int | None:
        return len(self.owners) if self.owners is not None else None

    @classmethod
    def unknown(cls, why: str, received: int | None = None) -> "UnitOwnership":
        return cls(None, why, received)

    @classmethod
    def from_probe(cls, probe: ProbeResult, image_tokens: Sequence[int], runs: Sequence[int] | None,
                   images_per_request: Sequence[int] | None, what: str = "image") -> "UnitOwnership":
        """`what` names the modality's items in messages (image, audio)."""
        if probe.sources is None:
            return cls.unknown(probe.reason)
        sources = probe.sources
        if any(later < earlier for earlier, later in zip(sources, sources[1:])):
            return cls.unknown(f"the tower received its units out of the {items_word(what)}' order", len(sources))
        images = sorted(set(sources))  # input entries that reached the tower (padding ones do not)
        if images_per_request is not None and sum(images_per_request) != len(images):
            # The entries are not images (all images' patches as rows, say): nothing to map them by.
            return cls.unknown(f"the tower received {len(images)} input entries, not the {sum(images_per_request)} "
                               f"{items_word(what)} {count_name(what)} gives", len(sources))
        image_owner, how = images_of_requests(len(images), image_tokens, runs, images_per_request, what)
        if image_owner is not None:
            owner_of = dict(zip(images, image_owner))
            return cls([owner_of[source] for source in sources], f"units traced to their {probe.key} entries; {how}",
                       len(sources))
        # Which images belong to which request is not known. Sharing the units by image tokens would
        # be a guess (exact only where every image gives the same tokens): say so instead.
        return cls.unknown(
            f"the batch does not say which of the {len(images)} {probe.key} entries its tower received belong to which "
            f"request ({what} tokens per request {_short(image_tokens)}, in {_short(runs or [])} runs): "
            + (f"put a text token between a request's images, or pass images_per_request=[...] if those entries "
               "are its images" if what == "image" else
               f"pass {count_name(what)}=[...] if those entries are its {what} items, or put a text token between "
               f"a request's {what} items"),
            len(sources))


    @classmethod
    def from_row_probe(cls, probe: RowProbe, key: str, image_tokens: Sequence[int], runs: Sequence[int] | None,
                       images_per_request: Sequence[int] | None, what: str = "image") -> "UnitOwnership":
        if probe.runs is None:
            return cls.unknown(probe.reason)
        entries = [entry for entry, _ in probe.runs]
        if any(later < earlier for earlier, later in zip(entries, entries[1:])):
            return cls.unknown(f"the tower's rows come out of the {items_word(what)}' order")
        items = sorted(set(entries))
        item_owner, how = images_of_requests(len(items), image_tokens, runs, images_per_request, what)
        if item_owner is None:
            return cls.unknown(f"the batch does not say which of the {len(items)} {key} entries in the tower's rows "
                               f"belong to which request ({what} tokens per request {_short(image_tokens)})")
        owner_of = dict(zip(items, item_owner))
        return cls(None, f"rows traced to their {key} entries; {how}", row_runs=[(owner_of[entry], count)
                   for entry, count in probe.runs], rows=probe.rows, rows_module=probe.module)


def outermost(prefixes: Sequence[str]) -> list[str]:
    """The prefixes not inside another one of them (the towers' roots)."""
    return [prefix for prefix in prefixes
            if not any(other != prefix and prefix.startswith(other + ".") for other in prefixes)]


def trace_units(model: nn.Module, inputs: Mapping[str, object], tower_roots: Sequence[str],
                token_ids: Sequence[int], image_tokens: Sequence[int] | None = None,
                images_per_request: Sequence[int] | None = None, what: str = "image",
                served: Sequence[str] = ()) -> UnitOwnership:
    """The request of each unit `model`'s tower receives for the batch `inputs` (see the module's doc).

    Where the tower's units are not items (all clips joined into one sequence before it), and
    `served` names the linears served in the tower and its connector, the rows of the first of them
    are traced instead (`probe_tower_rows`)."""
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or not token_ids:
        return UnitOwnership.unknown("the batch has no input_ids with image tokens")
    if image_tokens is None:
        image_tokens = image_tokens_per_request(input_ids, token_ids)
    runs = image_token_runs(input_ids, token_ids)
    probe = probe_tower_units(model, inputs, tower_roots)
    units = UnitOwnership.from_probe(probe, image_tokens, runs, images_per_request, what)
    if units.owners is None and probe.sources is None and probe.key is not None and served:
        rows = UnitOwnership.from_row_probe(probe_tower_rows(model, inputs, probe.key, served), probe.key,
                                            image_tokens, runs, images_per_request, what)
        if rows.row_runs is not None:
            return rows
        return UnitOwnership.unknown(f"{units.how}, and {rows.how}")
    return units


def rows_are_units(shape: Sequence[int], units: int | None) -> bool:
    """Whether an activation of `shape` holds its rows as `[units, ...]`, one block per tower unit."""
    return bool(units) and len(shape) >= 3 and shape[0] == units
