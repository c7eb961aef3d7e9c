"""The one exception family of mmlora_fx.

Every error a user can cause derives from `MMLoRAError`. Adapter errors name the adapter, the
module (when one is at fault) and the problem, so the message alone says what to fix.
"""

from __future__ import annotations

__all__ = [
    "MMLoRAError",
    "AdapterError",
    "AdapterFileError",
    "AdapterChangedError",
    "AdapterFormatError",
    "UnsupportedAdapterError",
    "AdapterRankError",
    "AdapterShapeError",
    "AdapterTargetError",
    "AdapterValueError",
    "BaseWeightCopyError",
    "DuplicateAdapterError",
    "UnknownAdapterError",
    "PinnedAdapterError",
    "DefaultAdapterError",
    "AdapterFolderError",
    "BatchError",
    "TooManyAdaptersError",
    "OptionError",
    "PartitionError",
    "TowerAttentionError",
    "CaptureError",
    "ShardedModelError",
    "CoverageError",
    "UpstreamBreakageError",
    "VerificationError",
]


class MMLoRAError(Exception):
    """Base of every error mmlora_fx raises on bad input."""


class AdapterError(MMLoRAError, ValueError):
    """An adapter cannot be loaded or used; nothing already loaded was changed."""

    def __init__(self, adapter: str | None, problem: str, module: str | None = None):
        self.adapter = adapter
        self.module = module
        self.problem = problem
        parts = []
        if adapter is not None:
            parts.append(f"adapter {adapter!r}")
        if module is not None:
            parts.append(f"module {module!r}")
        parts.append(problem)
        super().__init__(": ".join(parts))


class AdapterFileError(AdapterError):
    """Adapter files are missing, unreadable, corrupt, or only in an unsafe format."""


class AdapterChangedError(AdapterFileError):
    """An adapter's files changed on disk while they were being read: what was read may mix two
    versions, so it is not kept. Read it again once the files are written completely."""


class AdapterFormatError(AdapterError):
    """The adapter config or its tensor names do not follow PEFT's LoRA format."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a PEFT feature mmlora_fx does not serve (DoRA, modules_to_save, ...)."""


class AdapterRankError(AdapterError):
    """The adapter's rank is above the `max_lora_rank` the buffers were sized for."""


class AdapterShapeError(AdapterError):
    """A LoRA matrix does not fit the base layer it targets."""


class AdapterTargetError(AdapterError):
    """The adapter targets a module the model lacks, or one the compiled model does not serve."""


class AdapterValueError(AdapterError):
    """The adapter holds NaN or infinite weights."""


class BaseWeightCopyError(AdapterError):
    """The adapter carries a copy of a base layer's weight (PEFT saves the embeddings and lm_head it
    targets) that differs from the model's, in values or in shape (a resized vocabulary)."""


class DuplicateAdapterError(AdapterError):
    """An adapter of that name is already loaded."""


class UnknownAdapterError(AdapterError, KeyError):
    """No adapter of that name is loaded."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return self.args[0]


class PinnedAdapterError(AdapterError):
    """Pinning would leave no room for other adapters, or the adapter is pinned."""


class DefaultAdapterError(AdapterError):
    """A default adapter given for a modality the model has no tower for, or unloading an adapter
    that is still some modality's default."""


class AdapterFolderError(AdapterError):
    """Some adapters of a folder could not be loaded; the others were. `failed` maps each name
    that failed to its error, `loaded` lists the names that were loaded."""

    def __init__(self, folder, failed: dict, loaded: list):
        self.failed, self.loaded = dict(failed), list(loaded)
        first = next(iter(self.failed.values()))
        super().__init__(None, f"{len(self.failed)} of the adapters in {str(folder)!r} could not be loaded "
                               f"({', '.join(self.failed)}); the other {len(self.loaded)} were. First: {first}")


class BatchError(MMLoRAError, ValueError):
    """A batch cannot be run as asked (adapter names, batch size)."""


class TooManyAdaptersError(BatchError):
    """A batch names more distinct adapters than there are GPU slots (`max_loras`)."""


class OptionError(MMLoRAError, ValueError):
    """A serving option out of its range (`max_loras`, `max_lora_rank`, `prefetch_workers`,
    `tp_lora_a`, ...): raised when the model is compiled, or, through the `mmlora` backend, at its
    first call, as itself rather than inside dynamo's `BackendCompilerFailed`."""


class PartitionError(MMLoRAError):
    """The vision tower, connector or language model cannot be told apart."""


class TowerAttentionError(MMLoRAError, ValueError):
    """`use_flex_tower_attention` was given a model without a vision tower, or the tower called it in a
    way it does not serve (no `cu_seq_lens_q`, a mask, causal attention, dropout, keys of another length
    than the queries)."""


class CaptureError(MMLoRAError):
    """The model could not be captured as FX graphs."""


class ShardedModelError(MMLoRAError):
    """A served target's weight is sharded across processes (a DTensor: tensor parallelism by
    `parallelize_module` or transformers' `tp_plan`) in a layout mmlora_fx does not serve (#23):
    column- and row-parallel linears are served, see `sharding.py`. Raised alike on every rank.
    `module` is the first such target, `layout` its placements and mesh, `reason` why it is refused,
    `count` how many served targets are refused."""

    def __init__(self, module: str, layout: str, reason: str, count: int = 1):
        self.module, self.layout, self.reason, self.count = module, layout, reason, count
        others = f" (and {count - 1} other served target{'s' if count > 2 else ''})" if count > 1 else ""
        super().__init__(
            f"module {module!r}{others} has a sharded weight, a DTensor with {layout}, which is not served: "
            f"{reason}. Leave it out with target_modules=/partitions=, or shard it column- or row-parallel (#23)")


class CoverageError(MMLoRAError):
    """A served call ran part of the model without the LoRA it was compiled to carry."""


class UpstreamBreakageError(MMLoRAError):
    """The model's family is known to be broken upstream on an installed release of a dependency."""

    def __init__(self, message: str, package: str, version: str, model_class: str):
        self.package = package
        self.version = version
        self.model_class = model_class
        super().__init__(message)


class VerificationError(MMLoRAError):
    """`MultiLoRAModel.verify`: the compiled path differs from the eager one beyond the tolerance."""

    def __init__(self, message: str, errors: list[float], tolerance: float):
        self.errors = errors
        self.tolerance = tolerance
        super().__init__(message)
