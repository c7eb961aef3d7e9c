"""The runtime's uncompiled path (LoRA through hooks) is the reference the graphs must equal."""

import torch

import mmlora_fx
from mmlora_fx import zoo

from .peft_helpers import all_targets, make_adapter


def test_eager_hooks_equal_the_compiled_graphs(tmp_path):
    family = "tiny-idefics3"
    base = zoo.build(family)
    paths = {name: make_adapter(base, tmp_path / name, all_targets(family), r=rank, lora_alpha=5, seed=rank)
             for name, rank in (("a", 2), ("b", 6))}
    torch._dynamo.reset()
    mm = mmlora_fx.compile(zoo.build(family), paths, max_loras=2, inner="aot_eager")
    batch = zoo.make_batch(base, (2, 1, 0), seed=2)
    names = ["b", "a", "b"]
    with torch.no_grad():
        compiled = mm(**batch, adapter_names=names).logits
        eager = mm.eager(**batch, adapter_names=names).logits
        plain = base(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert (compiled - plain).abs().max() > 1e-2


def test_compiling_a_model_again_does_not_apply_lora_twice_outside_the_graphs(tmp_path):
    family = "tiny-llava"
    base = zoo.build(family)
    path = make_adapter(base, tmp_path / "a", all_targets(family), r=2, lora_alpha=5)
    torch._dynamo.reset()
    once = mmlora_fx.compile(zoo.build(family), {"a": path}, inner="aot_eager")
    model = zoo.build(family)
    batch = zoo.make_batch(base, (1, 0), seed=4)
    first = mmlora_fx.compile(model, {"a": path}, inner="aot_eager")
    with torch.no_grad():
        first.eager(**batch, adapter_names=["a", None])  # its tables now hold the batch
    twice = mmlora_fx.compile(model, {"a": path}, inner="aot_eager")  # the latest compile owns the model
    with torch.no_grad():
        reference = once.eager(**batch, adapter_names=["a", None]).logits
        eager = twice.eager(**batch, adapter_names=["a", None]).logits
        compiled = twice(**batch, adapter_names=["a", None]).logits
    torch.testing.assert_close(eager, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, reference, rtol=1e-5, atol=1e-5)


def test_outside_a_served_call_the_uncompiled_model_is_the_base_model(tmp_path):
    # The hooks stay on the model's linears; a plain call of its uncompiled forward (as PEFT or
    # any other code makes) must neither add the last batch's adapters nor refuse its rows.
    family = "tiny-llava"
    base = zoo.build(family)
    path = make_adapter(base, tmp_path / "a", all_targets(family), r=2, lora_alpha=5)
    torch._dynamo.reset()
    model = zoo.build(family)
    mm = mmlora_fx.compile(model, {"a": path}, inner="aot_eager")
    three = zoo.make_batch(base, (1, 0, 1), seed=5)
    one = zoo.make_batch(base, (1,), seed=6)
    with torch.no_grad():
        served = mm.eager(**three, adapter_names=["a", "a", "a"]).logits  # tables now hold 3 requests
        plain_three = model.forward(**three).logits
        plain_one = model.forward(**one).logits  # 1 request: would not split over the 3-request table
        assert (served - base(**three).logits).abs().max() > 1e-2
        torch.testing.assert_close(plain_three, base(**three).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain_one, base(**one).logits, rtol=1e-5, atol=1e-5)


class _NoHostRead(torch.Tensor):
    """input_ids whose values may not be read back to the host (as a GPU tensor's would sync)."""

    def tolist(self):
        raise AssertionError("input_ids were read back to the host")


def test_a_batch_without_media_does_not_read_its_tokens_back(tmp_path):
    # A decode step: no pixels or audio, so no tower runs and no row needs an owner.
    family = "tiny-llava"
    base = zoo.build(family)
    runtime = mmlora_fx.compile(base, {"a": make_adapter(base, tmp_path / "a", all_targets(family), r=2)},
                                inner="eager").runtime
    input_ids = torch.tensor([[5, 6], [7, 8]]).as_subclass(_NoHostRead)
    assert runtime.prepare(["a", None], input_ids, has_images=False) == [0, -1]
    assert runtime.tables["tower"].cum_weights == [0, 0, 0]
