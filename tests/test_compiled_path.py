"""The compiled path never silently drops LoRA: every served linear gets its adapter, whatever
else the process compiled before (#21).

Mistral3 is the family that met it: its patch merger falls back to eager after a graph break,
so `merging_layer` runs outside the graphs and its forward hook is what serves it. Dynamo used
to trace that hook as a frame of its own, where `is_compiling()` is true, and the merger ran
without LoRA. Each test starts from a fresh dynamo state, as a new process would.
"""

import copy
import dataclasses

import pytest
import torch

import mmlora_fx
from mmlora_fx import runtime as runtime_module
from mmlora_fx.capture import GraphRecord
from mmlora_fx.errors import CaptureError, CoverageError

from .families import MISTRAL3_TARGETS, build_mistral3, mistral3_batch
from .peft_helpers import assert_rows_equal_peft, make_adapter, peft_model_with

NAMES = ["alice", None, "bob"]
# One 32x32 image, none, and two of other aspect ratios: the merger sees each image's own grid.
SIZES = [[(32, 32)], [], [(16, 32), (32, 16)]]


@dataclasses.dataclass
class Setting:
    base: torch.nn.Module
    paths: dict
    peft: object
    batch: object


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral3")
    base = build_mistral3()
    paths = {name: make_adapter(base, root / name, MISTRAL3_TARGETS, r=4, lora_alpha=9, seed=index)
             for index, name in enumerate(["alice", "bob", "carol"])}
    return Setting(base, paths, peft_model_with(base, paths), mistral3_batch(SIZES, seed=1))


def assert_equals_peft(setting, logits, names=NAMES):
    assert_rows_equal_peft(setting.peft, setting.batch.singles, logits, names)


def serve(setting, adapters=("alice", "bob")):
    return mmlora_fx.compile(build_mistral3(), {name: setting.paths[name] for name in adapters},
                             max_loras=2, inner="eager")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_and_run_plainly(setting, backend):
    # Another model compiled in the same process: comparing with the base does this.
    other = torch.compile(copy.deepcopy(setting.base), backend=backend)
    with torch.no_grad():
        other(**setting.batch.inputs)


def test_equals_peft_whatever_the_process_compiled_before_and_after(mistral3):
    for backend in ("eager", "aot_eager", "inductor"):
        compile_and_run_plainly(mistral3, backend)
    mm = serve(mistral3)
    with torch.no_grad():
        assert_equals_peft(mistral3, mm(**mistral3.batch.inputs, adapter_names=NAMES).logits)
        assert_equals_peft(mistral3, mm(**mistral3.batch.inputs, adapter_names=NAMES).logits)  # and again
    assert max(mm.verify(**mistral3.batch.inputs, adapter_names=NAMES)) <= 1e-4
    compile_and_run_plainly(mistral3, "aot_eager")  # the other order
    with torch.no_grad():
        assert_equals_peft(mistral3, mm(**mistral3.batch.inputs, adapter_names=NAMES).logits)


def test_without_isolation_reused_foreign_graphs_raise_instead_of_serving_the_base(mistral3, monkeypatch):
    # Before torch 2.13's isolate_recompiles (the GPU image's torch 2.11 has none), the three
    # compilations above leave shared frames run-only, and dynamo runs their plain graphs for
    # this model too. The per-call count of LoRA applications must catch it.
    monkeypatch.setattr(mmlora_fx.api, "_isolated", dict)
    for backend in ("eager", "aot_eager", "inductor"):
        compile_and_run_plainly(mistral3, backend)
    mm = serve(mistral3)
    with pytest.raises(CoverageError, match="without a single LoRA application"), torch.no_grad():
        mm(**mistral3.batch.inputs, adapter_names=NAMES)


def test_several_served_models_compiled_uncompiled_and_compiled_again_in_one_process(mistral3):
    model = build_mistral3()
    first = mmlora_fx.compile(model, {"alice": mistral3.paths["alice"]}, inner="eager")
    second = serve(mistral3, ("bob", "carol"))
    other_names = ["carol", "bob", None]
    with torch.no_grad():
        assert_equals_peft(mistral3, first(**mistral3.batch.inputs, adapter_names=["alice", None, "alice"]).logits,
                           ["alice", None, "alice"])
        assert_equals_peft(mistral3, second(**mistral3.batch.inputs, adapter_names=other_names).logits, other_names)
        model._compiled_call_impl = None  # compilation undone: a plain call is the base model
        assert_equals_peft(mistral3, model(**mistral3.batch.inputs).logits, [None, None, None])
        again = mmlora_fx.compile(model, {"alice": mistral3.paths["alice"], "bob": mistral3.paths["bob"]},
                                  max_loras=2, inner="eager")
        assert_equals_peft(mistral3, again(**mistral3.batch.inputs, adapter_names=NAMES).logits)
        assert_equals_peft(mistral3, second(**mistral3.batch.inputs, adapter_names=other_names).logits, other_names)


def test_the_backend_by_name_serves_linears_outside_the_graphs(mistral3):
    options = {"adapters": {"alice": mistral3.paths["alice"], "bob": mistral3.paths["bob"]}, "max_loras": 2,
               "inner": "eager"}
    compiled = torch.compile(build_mistral3(), backend="mmlora", options=options)
    inputs = mistral3.batch.inputs
    with torch.no_grad():
        for _ in range(2):
            with mmlora_fx.adapter_names(NAMES, input_ids=inputs["input_ids"]):
                assert_equals_peft(mistral3, compiled(**inputs).logits)
        assert_equals_peft(mistral3, compiled(**inputs).logits, [None, None, None])  # outside: the base


def test_a_graph_of_the_hook_alone_is_refused_not_served_as_the_base(mistral3):
    # The hook runs without dynamo (its code is skipped, with all it calls); should dynamo ever
    # compile it as a frame of its own anyway, the backend refuses that graph.
    mm = serve(mistral3)
    hook = runtime_module._eager_lora_hook
    graph = torch.fx.symbolic_trace(lambda x: x)
    record = GraphRecord(index=7, function=hook.__name__, filename=hook.__code__.co_filename,
                         graph_module=graph, graph_break=None)
    with pytest.raises(CaptureError, match="compiled mmlora_fx's LoRA hook as graph 7"):
        mm.backend._rewrite(record, [])
