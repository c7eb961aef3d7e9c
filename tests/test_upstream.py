"""Releases known to break a family upstream are refused in our words, before anything is compiled."""

import pytest
import torch

import mmlora_fx
from mmlora_fx import upstream, zoo
from mmlora_fx.cli import main
from mmlora_fx.errors import UpstreamBreakageError

from .conftest import cached_model

BROKEN = {"transformers": "5.24.0"}


def llama4():
    # Built directly: the family's own tests are skipped on a broken release, this one is not.
    return cached_model("tiny-llama4")


def test_llama4_on_transformers_5_24_0_gets_a_typed_error_naming_version_family_and_fix():
    with pytest.raises(UpstreamBreakageError) as caught:
        upstream.check_supported(llama4(), versions=BROKEN)
    message = str(caught.value)
    assert "transformers 5.24.0" in message and "Llama4ForConditionalGeneration" in message
    assert "transformers==5.23.0" in message and "constraints.txt" in message
    assert (caught.value.package, caught.value.version) == ("transformers", "5.24.0")


def test_other_releases_and_other_families_pass():
    upstream.check_supported(llama4(), versions={"transformers": "5.23.0"})
    upstream.check_supported(llama4(), versions={"transformers": "5.17.0"})
    upstream.check_supported(cached_model("tiny-qwen2-vl"), versions=BROKEN)


def test_a_subclass_of_a_broken_class_is_refused_too():
    subclass = type("MyLlama4", (type(llama4()),), {})
    assert upstream.known_breakage(subclass, BROKEN) is not None


def test_compile_refuses_before_loading_anything(monkeypatch):
    monkeypatch.setattr(upstream, "installed_version", lambda package: BROKEN.get(package, "0"))
    model = zoo.build("tiny-llama4")
    with pytest.raises(UpstreamBreakageError, match="5.24.0"):
        mmlora_fx.compile(model, {"alice": "/nonexistent/adapter"})  # refused before the path is read
    assert model._compiled_call_impl is None  # not compiled either


def test_inspect_says_it_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(upstream, "installed_version", lambda package: BROKEN.get(package, "0"))
    assert main(["inspect", "tiny-llama4"]) == 2
    error = capsys.readouterr().err
    assert "mmlora-fx: error: Llama4ForConditionalGeneration does not run on transformers 5.24.0" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("entry", upstream.KNOWN_BREAKAGE, ids=lambda entry: f"{entry.package}{entry.versions}")
def test_each_known_breakage_is_real_where_the_release_is_installed(entry):
    version = upstream.installed_version(entry.package)
    if version is None or not entry.covers(version):
        pytest.skip(f"{entry.package} {version} is installed; the entry is for {entry.versions}")
    family = next(name for name, family in zoo.ZOO.items() if family.model_class in entry.model_classes)
    model = zoo.build(family)
    with pytest.raises(AttributeError), torch.no_grad():
        model(**zoo.make_batch(model, (1, 0)))
