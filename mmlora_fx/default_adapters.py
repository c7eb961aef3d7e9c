"""Default adapters per modality: requests that carry a modality and name no adapter get its default.

What serving stacks call default multimodal LoRAs: a speech model whose audio path is only good
with its ASR adapter, say. `default_adapters={"audio": "asr"}` serves every request that carries
audio and names no adapter (None) with `asr`; `"__base__"` still means the base model, explicitly.
A request is said to carry a modality when its `input_ids` hold that modality's placeholder
tokens, so the defaults act on the steps that see the media (a prefill, `generate` as a whole);
a decode loop driven by hand passes the names `resolve` gave its prefill (`mm.adapter_names_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .errors import BatchError, DefaultAdapterError, UnknownAdapterError

__all__ = ["DefaultAdapters"]


class DefaultAdapters:
    """The default adapter of each modality (keyed by its items' name: `image`, `audio`)."""

    def __init__(self, items: Sequence[str], is_loaded: Callable[[str], bool]):
        self._items = tuple(items)  # the item names this model's towers take
        self._is_loaded = is_loaded
        self._defaults: dict[str, str] = {}

    def set(self, item: str, name: str | None) -> None:
        """Make `name` the default of `item` requests (None: no default)."""
        if item not in self._items:
            raise DefaultAdapterError(name, f"was given as the default for {item!r} requests, but this model's towers "
                                            f"take {list(self._items) or 'no media'}")
        if name is None:
            self._defaults.pop(item, None)
            return
        if not isinstance(name, str) or not self._is_loaded(name):
            raise UnknownAdapterError(name, f"is not loaded, so it cannot be the default for {item} requests: "
                                            "load it first")
        self._defaults[item] = name

    def update(self, defaults: Mapping[str, str | None]) -> None:
        """Set several at once; on a bad entry none of them is set."""
        before = dict(self._defaults)
        try:
            for item, name in defaults.items():
                self.set(item, name)
        except Exception:
            self._defaults = before
            raise

    def as_dict(self) -> dict[str, str]:
        return dict(self._defaults)

    def items_defaulting_to(self, name: str) -> list[str]:
        return [item for item, default in self._defaults.items() if default == name]

    def resolve(self, adapter_names: Sequence[str | None], items_per_request: Mapping[str, Sequence[int]]) -> list:
        """`adapter_names` with each None replaced by the default of the modality its request carries
        (`items_per_request[item][r] > 0`). A request carrying two modalities whose defaults differ
        is refused: which adapter it wants cannot be told."""
        if not self._defaults:
            return list(adapter_names)
        resolved = []
        for request, name in enumerate(adapter_names):
            if name is not None:
                resolved.append(name)
                continue
            wanted = {self._defaults[item] for item in self._defaults if items_per_request[item][request] > 0}
            if len(wanted) > 1:
                carried = [item for item in self._defaults if items_per_request[item][request] > 0]
                raise BatchError(f"request {request} names no adapter and carries {' and '.join(carried)}, whose "
                                 f"default adapters differ ({', '.join(sorted(wanted))}): name its adapter")
            resolved.append(wanted.pop() if wanted else None)
        return resolved
