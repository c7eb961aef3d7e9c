"""Releases of our dependencies known to break a model family upstream, and our words for it.

A model family on such a release fails inside the dependency (an `AttributeError` deep in a
transformers forward, say), with or without mmlora_fx. `check_supported(model)` turns that
into a typed error that names the release, the family and what to install instead, before
anything is compiled or loaded. The tested set of versions is `constraints.txt` at the root of
the repository.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import UpstreamBreakageError

__all__ = ["KnownBreakage", "KNOWN_BREAKAGE", "known_breakage", "check_supported"]


@dataclasses.dataclass(frozen=True)
class KnownBreakage:
    """`package` at `versions` (a PEP 440 specifier) breaks `model_classes` as `problem` says."""

    package: str
    versions: str
    model_classes: tuple[str, ...]
    problem: str
    install: str  # what to install instead

    def covers(self, version: str) -> bool:
        return Version(version) in SpecifierSet(self.versions)

    def message(self, model_class: str, version: str) -> str:
        return (f"{model_class} does not run on {self.package} {version}, a release known to be broken "
                f"upstream for this family: {self.problem}. Install {self.install} (the tested set of "
                "versions is constraints.txt in the mmlora_fx repository)")


KNOWN_BREAKAGE = (
    KnownBreakage(
        package="transformers",
        versions="==5.24.0",
        model_classes=("Llama4ForConditionalGeneration",),
        problem="its forward reads `outputs.image_outputs` from the language model's MoeCausalLMOutputWithPast "
                "and raises AttributeError on every call, eager or compiled",
        install="'transformers==5.23.0'",
    ),
)


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def known_breakage(model_class: type, versions: dict[str, str] | None = None) -> tuple[KnownBreakage, str, str] | None:
    """The known breakage that hits `model_class` or a base of it: (entry, installed version, the
    broken class's name).

    `versions` ({package: version}) stands in for what is installed (tests use it)."""
    names = [cls.__name__ for cls in model_class.__mro__]
    for entry in KNOWN_BREAKAGE:
        broken = next((name for name in names if name in entry.model_classes), None)
        if broken is None:
            continue
        version = (versions or {}).get(entry.package) or installed_version(entry.package)
        if version is not None and entry.covers(version):
            return entry, version, broken
    return None


def check_supported(model, versions: dict[str, str] | None = None) -> None:
    """Raise `UpstreamBreakageError` if `model`'s family is known broken on an installed release."""
    found = known_breakage(type(model), versions)
    if found is not None:
        entry, version, model_class = found
        raise UpstreamBreakageError(entry.message(model_class, version), package=entry.package, version=version,
                                    model_class=model_class)
