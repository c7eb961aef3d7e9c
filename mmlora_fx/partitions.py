"""Which submodules are the towers, the connectors and the language model.

A `PartitionMap` is a table of module-name prefixes, each with a partition label; a module
belongs to the partition of the longest prefix that owns it, so `model.visual.merger`
(connector) wins over `model.visual` (tower). Modules no prefix owns are `other`.

Labels: `language_model`; per modality, a tower and a connector. The vision modality's are
`tower` and `connector`; every other modality's name them: `tower:audio`, `connector:audio`
(the modality is the sub-config's name without `_config`: `audio_config` -> audio).

`discover_partitions` derives the table from the module tree of a Hugging Face multimodal model,
with no table per model class:

- the language model is the shallowest submodule built from `config.text_config`; each other
  sub-config (`vision_config`, `audio_config`, `speech_config`, ...) that built a submodule gives
  a tower, the shallowest one built from it (each module keeps the config it was built from);
- a tower's connector is every module with parameters that sits beside the tower and the language
  model under their common parent (LLaVA's `multi_modal_projector`, Idefics3's `connector`; with
  several towers there, the modules whose name says the tower's modality, and an error for those
  that say none),
  plus, inside the tower, every module holding a linear that is registered after the tower's
  stack of repeated blocks on the path down to it (Qwen2-VL's `visual.merger`, Llama4's
  `vision_model.vision_adapter`); norms after the blocks stay in the tower;
- the input and output embeddings (the token embedding and `lm_head`, wherever they sit: beside
  the language model in a VLM, inside it in Llama4) are the language model's: the rows they see
  are its token rows (prefill `[B, S]`, decode `[B, 1]`, the head's `logits_to_keep` rows), so
  its token table owns them;
- a model whose config nests no sub-config (a plain `LlamaForCausalLM`) is all language model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

from torch import nn

from .errors import PartitionError

TOWER, CONNECTOR, LANGUAGE_MODEL, OTHER = "tower", "connector", "language_model", "other"
VISION = "vision"
# The vision modality's labels; other modalities' add theirs (`tower:audio`).
PARTITIONS = (TOWER, CONNECTOR, LANGUAGE_MODEL, OTHER)
# Partitions that can carry LoRA, for a vision-language model; `other` (glue no prefix owns) never does.
LORA_PARTITIONS = (TOWER, CONNECTOR, LANGUAGE_MODEL)
_MODALITY_LABEL = re.compile(r"^(tower|connector):([a-z][a-z0-9_]*)$")
# Words in a module's name that say it belongs to a modality (for connectors beside several towers).
_MODALITY_WORDS = {VISION: ("vision", "visual", "image", "vit"), "audio": ("audio", "speech", "sound")}

__all__ = [
    "TOWER", "CONNECTOR", "LANGUAGE_MODEL", "OTHER", "PARTITIONS", "LORA_PARTITIONS", "VISION",
    "PartitionPrefix", "PartitionMap", "discover_partitions", "tower_label", "connector_label",
    "modality_of", "is_partition", "can_carry_lora", "kind_of",
]


def tower_label(modality: str) -> str:
    return TOWER if modality == VISION else f"{TOWER}:{modality}"


def connector_label(modality: str) -> str:
    return CONNECTOR if modality == VISION else f"{CONNECTOR}:{modality}"


def kind_of(partition: str) -> str:
    """`tower`, `connector`, `language_model` or `other`, whatever the modality."""
    match = _MODALITY_LABEL.match(partition)
    return match.group(1) if match else partition


def modality_of(partition: str) -> str | None:
    """The modality of a tower or connector label (None for the language model and `other`)."""
    if partition in (TOWER, CONNECTOR):
        return VISION
    match = _MODALITY_LABEL.match(partition)
    return match.group(2) if match else None


def is_partition(label: str) -> bool:
    return label in PARTITIONS or _MODALITY_LABEL.match(label) is not None


def can_carry_lora(label: str) -> bool:
    return is_partition(label) and label != OTHER


@dataclasses.dataclass(frozen=True)
class PartitionPrefix:
    prefix: str
    partition: str
    source: str  # "default" (discovered) or "user" (override)
    reason: str = ""


class PartitionMap:
    """Longest-prefix table from module names to partition labels."""

    def __init__(self, prefixes: Iterable[PartitionPrefix]):
        self._prefixes: dict[str, PartitionPrefix] = {}
        for entry in prefixes:
            if not is_partition(entry.partition):
                raise PartitionError(
                    f"prefix {entry.prefix!r}: unknown partition {entry.partition!r}; "
                    f"use one of {', '.join(PARTITIONS)}, or tower:<modality> / connector:<modality>"
                )
            self._prefixes[entry.prefix] = entry

    @property
    def prefixes(self) -> list[PartitionPrefix]:
        return sorted(self._prefixes.values(), key=lambda entry: entry.prefix)

    def with_overrides(self, overrides: Mapping[str, str] | None) -> "PartitionMap":
        """A copy where `overrides` ({prefix: partition}) replace or add prefixes."""
        if not overrides:
            return self
        entries = dict(self._prefixes)
        for prefix, partition in overrides.items():
            entries[prefix] = PartitionPrefix(prefix, partition, "user")
        return PartitionMap(entries.values())

    def owning_prefix(self, module_name: str) -> PartitionPrefix | None:
        best = None
        for prefix, entry in self._prefixes.items():
            if _is_under(module_name, prefix) and (best is None or len(prefix) > len(best.prefix)):
                best = entry
        return best

    def partition_of(self, module_name: str) -> str:
        entry = self.owning_prefix(module_name)
        return entry.partition if entry is not None else OTHER

    def prefixes_of(self, partition: str) -> list[str]:
        return [entry.prefix for entry in self.prefixes if entry.partition == partition]

    @property
    def lora_partitions(self) -> list[str]:
        """The labels of this map that can carry LoRA: the language model, then towers and connectors."""
        labels = {entry.partition for entry in self.prefixes if can_carry_lora(entry.partition)}
        return sorted(labels, key=lambda label: (label != LANGUAGE_MODEL, modality_of(label) != VISION, label))

    @property
    def modalities(self) -> list[str]:
        """The modalities that have a tower, vision first."""
        found = {modality_of(entry.partition) for entry in self.prefixes if kind_of(entry.partition) == TOWER}
        return sorted(found, key=lambda modality: (modality != VISION, modality))

    def to_json(self) -> list[dict]:
        return [dataclasses.asdict(entry) for entry in self.prefixes]


def _is_under(module_name: str, prefix: str) -> bool:
    if prefix == "":
        return True
    return module_name == prefix or module_name.startswith(prefix + ".")


def discover_partitions(model: nn.Module, overrides: Mapping[str, str] | None = None) -> PartitionMap:
    """Find the default prefixes of a Hugging Face multimodal model, then apply `overrides`."""
    config = getattr(model, "config", None)
    modules = dict(model.named_modules())
    if config is not None and not _sub_configs(config):
        # No modality sub-config (a `LlamaForCausalLM`): the whole model is the language model.
        entries = [PartitionPrefix("", LANGUAGE_MODEL, "default", "no modality sub-config: the whole model")]
        return PartitionMap(entries + _embeddings(model, modules)).with_overrides(overrides)
    language_model = _shallowest_built_from(modules, getattr(config, "text_config", None))
    towers = {}  # modality -> tower prefix
    for name in _sub_configs(config):
        if name == "text_config" or not name.endswith("_config"):
            continue
        tower = _shallowest_built_from(modules, getattr(config, name))
        if tower is not None and tower != language_model and not any(_is_under(tower, other) for other in towers.values()):
            towers[name[: -len("_config")]] = tower
    if (language_model is None or not towers) and not overrides:
        missing = [label for label, found in (("language model", language_model), ("modality tower", towers))
                   if not found]
        raise PartitionError(
            f"{type(model).__name__}: found no {' and no '.join(missing)} "
            f"(no submodule was built from config.text_config / any other of its sub-configs "
            f"{_sub_configs(config)}); pass the prefixes yourself, e.g. {{'model.visual': 'tower', ...}}"
        )
    entries: list[PartitionPrefix] = []
    if language_model is not None:
        entries.append(PartitionPrefix(language_model, LANGUAGE_MODEL, "default",
                                       "built from config.text_config"))
    for modality, tower in towers.items():
        entries.append(PartitionPrefix(tower, tower_label(modality), "default",
                                       f"built from config.{modality}_config"))
        entries += _connectors_inside_tower(modules, tower, connector_label(modality))
    if towers and language_model is not None:
        entries += _connectors_beside(model, modules, towers, language_model)
    entries += _embeddings(model, modules)
    return PartitionMap(entries).with_overrides(overrides)


def _sub_configs(config) -> list[str]:
    """The names of the configs nested in `config` (text_config, vision_config, audio_config, ...)."""
    from transformers import PretrainedConfig

    if config is None:
        return []
    return [name for name, value in vars(config).items() if isinstance(value, PretrainedConfig)]


def _shallowest_built_from(modules: dict[str, nn.Module], config) -> str | None:
    if config is None:
        return None
    matches = [name for name, module in modules.items()
               if name and _built_from(getattr(module, "config", None), config)]
    if not matches:
        return None
    return min(matches, key=lambda name: (name.count("."), name))


def _built_from(module_config, config) -> bool:
    # Submodules may hold the config object itself or a copy of it (`_from_config` copies).
    if module_config is None:
        return False
    if module_config is config:
        return True
    return type(module_config) is type(config) and module_config.to_dict() == config.to_dict()


def _holds_linear(module: nn.Module) -> bool:
    return any(isinstance(sub, nn.Linear) for sub in module.modules())


def _block_stack(modules: dict[str, nn.Module], tower: str) -> str | None:
    """The tower's stack of repeated blocks: its ModuleList as long as the tower's config says it has
    layers (`num_hidden_layers`, Qwen's `depth`), the one with the most parameters among those or, where
    none is, among all. A tiny tower's blocks can weigh less than the lists of modules that run beside
    them (Qwen3-VL's deepstack mergers, one per chosen block)."""
    layers = getattr(getattr(modules.get(tower), "config", None), "num_hidden_layers", None)
    best, best_key = None, None
    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and _is_under(name, tower) and len(module) > 0:
            key = (len(module) == layers, sum(p.numel() for p in module.parameters()))
            if best_key is None or key > best_key:
                best, best_key = name, key
    return best


def _connectors_inside_tower(modules: dict[str, nn.Module], tower: str, label: str) -> list[PartitionPrefix]:
    stack = _block_stack(modules, tower)
    if stack is None:
        return []
    # Walk from the tower down to the block stack; at each step, the siblings registered after
    # the step that hold a linear come after the blocks: they project features for the LM.
    entries = []
    path = stack[len(tower) + 1 :].split(".") if stack != tower else []
    parent = tower
    for step in path:
        children = list(modules[parent].named_children())
        names = [child for child, _ in children]
        position = names.index(step)
        for child, module in children[position + 1 :]:
            if _holds_linear(module):
                name = f"{parent}.{child}" if parent else child
                entries.append(PartitionPrefix(name, label, "default",
                                               f"inside the tower, after its blocks {stack}"))
        parent = f"{parent}.{step}" if parent else step
    return entries


def _common_parent(first: str, second: str) -> str:
    common = []
    for a, b in zip(first.split("."), second.split(".")):
        if a != b:
            break
        common.append(a)
    return ".".join(common)


def _connectors_beside(model, modules, towers: dict[str, str], language_model: str) -> list[PartitionPrefix]:
    embeddings = {_module_name(modules, model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None),
                  _module_name(modules, model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)}
    entries, unclaimed = [], []
    for modality, tower in towers.items():
        parent = _common_parent(tower, language_model)
        for child, module in modules[parent].named_children():
            name = f"{parent}.{child}" if parent else child
            if (_is_under(language_model, name) or name in embeddings or any(_is_under(t, name) for t in towers.values())
                    or not any(True for _ in module.parameters())):
                continue
            if len(towers) == 1:
                owner = modality
            else:
                # Several towers beside one language model: the module's name must say whose it is.
                claims = [m for m in towers if any(word in child.lower() for word in _MODALITY_WORDS.get(m, (m,)))]
                if len(claims) != 1:
                    unclaimed.append(name)
                    continue
                owner = claims[0]
            if owner == modality and all(entry.prefix != name for entry in entries):
                entries.append(PartitionPrefix(name, connector_label(modality), "default",
                                               "beside the tower and the language model"))
    if unclaimed:
        raise PartitionError(
            f"{type(model).__name__}: {sorted(set(unclaimed))} sit beside the towers {towers} and the language model, "
            "and their names do not say which tower they serve; name them with partition_overrides, e.g. "
            f"{{'{sorted(set(unclaimed))[0]}': 'connector:audio'}}")
    return entries


def _module_name(modules: dict[str, nn.Module], target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in modules.items():
        if module is target:
            return name
    return None


def _embeddings(model: nn.Module, modules: dict[str, nn.Module]) -> list[PartitionPrefix]:
    entries = []
    for getter, what in (("get_input_embeddings", "input embeddings"), ("get_output_embeddings", "output embeddings")):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        name = _module_name(modules, module)
        if name:
            entries.append(PartitionPrefix(name, LANGUAGE_MODEL, "default",
                                           f"{what}: their rows are the language model's tokens"))
    return entries
