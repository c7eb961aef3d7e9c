"""The `mmlora` torch.compile backend, registered by entry point, with adapter names per call."""

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo

from .peft_helpers import all_targets, make_adapter, peft_model_with
from .test_api import RANKS, Served, assert_matches_peft, batch_for


def test_the_backend_is_registered_by_entry_point():
    assert "mmlora" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.parametrize("family", list(zoo.ZOO))
def test_mixed_batch_through_torch_compile_equals_peft(family, tmp_path):
    base = zoo.build(family)
    paths = {name: make_adapter(base, tmp_path / name, all_targets(family), r=rank, lora_alpha=3 * rank + 1,
                                seed=index)
             for index, (name, rank) in enumerate(RANKS.items())}
    served = Served(family, base, None, peft_model_with(base, paths), paths)
    torch._dynamo.reset()
    model = zoo.build(family)
    # aot_eager inside: test_api compiles every family with Inductor already; this is about the entry.
    compiled = torch.compile(model, backend="mmlora", options={"adapters": paths, "max_loras": 3, "inner": "aot_eager"})
    for seed, names in enumerate([["bob", "__base__", "carol"], [None, "alice", "bob"]]):
        batch = batch_for(served, seed=seed)
        with torch.no_grad(), mmlora_fx.adapter_names(names, input_ids=batch["input_ids"]):
            logits = compiled(**batch).logits
        assert_matches_peft(served, batch, names, logits)
    graphs = model._mmlora_backend.graphs
    batch = batch_for(served, seed=5)
    with torch.no_grad():
        outside = compiled(**batch).logits  # no names: every request on the base model
        plain = base(**batch).logits
    assert ((outside - plain).abs().max() / plain.abs().max()).item() <= 1e-4
    assert model._mmlora_backend.graphs == graphs, "changing names must not recompile"


def test_an_option_out_of_range_is_refused_as_itself_through_the_backend(tmp_path):
    from mmlora_fx.errors import OptionError

    base = zoo.build("tiny-llava")
    paths = {"a": make_adapter(base, tmp_path / "a", all_targets("tiny-llava"), r=4, seed=0)}
    torch._dynamo.reset()
    for options in ({"prefetch_workers": 0}, {"tp_lora_a": "halved"}, {"max_loras": 0}, {"fold_min_rows": 512},
                    {"stack_max_rows": 8}, {"stack_expand": "inductor"}, {"stack_shrink": "inductor"}):
        compiled = torch.compile(zoo.build("tiny-llava"), backend="mmlora",
                                 options={"adapters": paths, "inner": "aot_eager", **options})
        ids = torch.randint(zoo.FIRST_TEXT_TOKEN, zoo.FIRST_TEXT_TOKEN + 50, (1, 3))
        with pytest.raises(OptionError, match=next(iter(options))), torch.no_grad(), \
                mmlora_fx.adapter_names(["a"], input_ids=ids):
            compiled(input_ids=ids)
