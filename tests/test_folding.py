"""LoRA inside the base GEMM (mmlora_fx/folding.py): folded (`fold_min_rows`: the expand as extra K)
or stacked (`stack_max_rows`: every slot's A under the weight, the shrink as extra N, one expand
launch a group), a mixed batch still equals PEFT per request, and adapters swapped afterwards are
served without recompiling (the buffers mirror the slots)."""

import copy
import logging

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import OptionError
from mmlora_fx.folding import FoldedWeights
from mmlora_fx.passes.meta import LORA, partition_of

from .peft_helpers import all_targets, assert_rows_equal_peft, peft_family

FAMILY = "tiny-qwen2-vl"
NAMES = ["alice", None, "bob"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return peft_family(tmp_path_factory.mktemp("folding"), lambda: zoo.build(FAMILY), all_targets(FAMILY),
                       names=("alice", "bob", "carol"))


def _batch(model, seed=5):
    batch = zoo.make_batch(model, (1, 0, 2), seed=seed)
    return batch, zoo.split_batch(model, batch)


def _marked_nodes(mm, mark: str):
    """The linear calls of the compiled graphs taken into their base GEMM ("folded" or "stacked")."""
    return [node for record in mm.backend.records for node in record.graph_module.graph.nodes
            if node.meta.get(LORA, {}).get(mark) and node.target is not torch.as_strided]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_folded_linears_equal_peft_per_request(family, inner):
    torch._dynamo.reset()
    mm = mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=3, fold_min_rows=1, inner=inner,
                           dynamic=False)
    folds = mm.runtime.folds
    # Linears at least as wide out as in fold, in the tower and the language model; k, v, o and down do not.
    assert any(".visual." in module or "visual." in module for module in folds.modules), folds.modules
    assert any("mlp.gate_proj" in module for module in folds.modules), folds.modules
    assert not any(module.endswith(("k_proj", "v_proj", "o_proj", "down_proj")) for module in folds.modules)
    batch, singles = _batch(mm.runtime.model)
    with torch.no_grad():
        logits = mm(**batch, adapter_names=NAMES).logits
    assert_rows_equal_peft(family.peft, singles, logits, NAMES, "folded")
    assert _marked_nodes(mm, "folded"), "no linear was folded"

    _equal_peft_after_a_swap(mm, family, batch, singles)


def _equal_peft_after_a_swap(mm, family, batch, singles):
    # Another mix, with an adapter that needs a slot written (and mirrored): no recompilation.
    graphs = mm.backend.graphs
    names = ["carol", "alice", None]
    with torch.no_grad():
        logits = mm(**batch, adapter_names=names).logits
    assert_rows_equal_peft(family.peft, singles, logits, names, "after a swap")
    assert mm.backend.graphs == graphs


# Each way into the base GEMM: the option that takes every call of the test batch, one that takes
# none, and the mark its rewritten linear calls get.
IN_GEMM = {"fold": (dict(fold_min_rows=1), dict(fold_min_rows=10**6), "folded"),
           "stack": (dict(stack_max_rows=10**6), dict(stack_max_rows=1), "stacked"),
           "stack, graph expand": (dict(stack_max_rows=10**6, stack_expand="inductor"),
                                   dict(stack_max_rows=1, stack_expand="inductor"), "stacked"),
           # (the per-column form, "inductor_columns", differs only in how the shrink sums: its
           # PEFT and decode tests below)
           "stack, graph shrink and expand": (dict(stack_max_rows=10**6, stack_expand="inductor", stack_shrink="inductor"),
                                              dict(stack_max_rows=1, stack_expand="inductor", stack_shrink="inductor"),
                                              "stacked")}


@pytest.mark.parametrize("way", list(IN_GEMM))
def test_a_resident_slot_that_overflows_reaches_no_other_row(family, way):
    torch._dynamo.reset()
    mm = mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=3, inner="eager", dynamic=False,
                           **IN_GEMM[way][0])
    batch, singles = _batch(mm.runtime.model)
    with torch.no_grad():
        mm(**batch, adapter_names=["carol", None, "alice"])  # carol stays resident
        folds, carol = mm.runtime.folds, mm.runtime.manager.resident["carol"]
        assert carol == 0  # rows of no slot read slot 0 too (the graph ops clamp -1 to 0): the `where` is tested
        for module in folds.modules:  # as if carol's shrink overflowed: its columns become inf
            rank = folds.rank(module)
            folds.lora_a(module)[carol * rank:(carol + 1) * rank] = float("inf")
        logits = mm(**batch, adapter_names=NAMES).logits
    assert torch.isfinite(logits).all()
    assert_rows_equal_peft(family.peft, singles, logits, NAMES)


@pytest.mark.parametrize("way", list(IN_GEMM))
def test_outside_the_options_rows_the_kernels_serve(family, way, caplog):
    torch._dynamo.reset()
    mm = mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=3, inner="eager", dynamic=False,
                           **IN_GEMM[way][1])
    assert len(mm.runtime.folds)  # the buffers exist, but no call has rows in the option's range
    batch, singles = _batch(mm.runtime.model)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="mmlora_fx"):
        logits = mm(**batch, adapter_names=NAMES).logits
    assert_rows_equal_peft(family.peft, singles, logits, NAMES)
    assert not _marked_nodes(mm, IN_GEMM[way][2])
    assert any("no linear call was taken into its base GEMM" in record.getMessage() for record in caplog.records)


def test_fold_buffers_mirror_each_slot_and_keep_the_base_weights(family):
    model = copy.deepcopy(family.base)
    before = {name: module.weight.detach().clone() for name, module in model.named_modules()
              if name.endswith("mlp.gate_proj")}
    mm = mmlora_fx.compile(model, family.paths, max_loras=3, fold_min_rows=1, inner="eager")
    folds, manager = mm.runtime.folds, mm.runtime.manager
    for name, weight in before.items():
        assert torch.equal(model.get_submodule(name).weight, weight)  # same values, now a view of the buffer
        assert model.get_submodule(name).weight.data_ptr() == folds.buffer(name).data_ptr()
        assert mm.runtime.linears.weights[name] is model.get_submodule(name).weight

    def assert_mirrored(module):
        slots, rank, (out, in_features) = manager.buffers[module].lora_a, folds.rank(module), before[module].shape
        for slot in range(3):
            b = folds.buffer(module)[:out, in_features + slot * rank:in_features + (slot + 1) * rank]
            assert torch.equal(b, manager.buffers[module].lora_b[slot])
            assert torch.equal(folds.lora_a(module)[slot * rank:(slot + 1) * rank], slots[slot])
        assert not folds.buffer(module)[:, in_features + 3 * rank:].any()  # the alignment padding
        assert not folds.buffer(module)[out:, in_features:].any()  # below B, right of A
        assert not folds.lora_a(module)[3 * rank:].any()

    module = next(iter(before))
    manager.activate(["bob", "alice"])
    assert manager.buffers[module].lora_b[manager.resident["bob"]].abs().sum() > 0
    assert_mirrored(module)
    bob = manager.resident["bob"]
    manager.unload("bob")
    assert_mirrored(module)
    rank, in_features = folds.rank(module), before[module].shape[1]
    assert not folds.buffer(module)[:, in_features + bob * rank:in_features + (bob + 1) * rank].any()
    assert folds.lora_a(module).data_ptr() == folds.buffer(module)[before[module].shape[0]:].data_ptr()
    assert not folds.lora_a(module)[bob * rank:(bob + 1) * rank].any()


def test_fold_min_rows_is_checked():
    with pytest.raises(OptionError, match="fold_min_rows"):
        mmlora_fx.compile(zoo.build(FAMILY), {}, fold_min_rows=0)


def test_tied_and_narrow_weights_do_not_fold_and_widths_are_aligned():
    linear = torch.nn.Linear(8, 4)
    wide = torch.nn.Linear(4, 8)
    model = torch.nn.ModuleDict(dict(narrow=linear, wide=wide, tied=torch.nn.Linear(4, 8)))
    model["tied"].weight = wide.weight

    class Buffers:
        local_ranks = None
        lora_a = torch.zeros(2, 3, 4)
        lora_b = torch.zeros(2, 8, 3)

    folds = FoldedWeights(model, {"narrow": Buffers(), "wide": Buffers(), "tied": Buffers()})
    assert folds.modules == []
    model["tied"] = torch.nn.Linear(4, 8)
    moved = {}
    folds = FoldedWeights(model, {"wide": Buffers()}, moved=moved.__setitem__)
    assert folds.modules == ["wide"] and folds.width("wide") == 8  # 2 slots x rank 3, padded to 8
    assert moved == {"wide": model["wide"].weight} and folds.buffer("wide").shape == (8 + 8, 4 + 8)  # A below, B beside
    assert not folds.stacked("wide")


def test_every_plain_untied_linear_stacks_with_its_bias_in_a_buffer_of_zeros_after_it():
    wide, narrow = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4, bias=False)
    model = torch.nn.ModuleDict(dict(narrow=narrow, wide=wide, tied=torch.nn.Linear(4, 8)))
    model["tied"].weight = wide.weight

    class Buffers:
        local_ranks = None
        lora_a = torch.randn(2, 3, 8)
        lora_b = torch.randn(2, 4, 3)

    weight = narrow.weight.detach().clone()
    folds = FoldedWeights(model, {"narrow": Buffers()}, fold=False, stack=True)
    assert folds.modules == ["narrow"] and folds.stacked("narrow") and not folds.folds("narrow")
    assert folds.buffer("narrow").shape == (4 + 8, 8)  # no B columns: it does not fold
    assert torch.equal(model["narrow"].weight, weight) and model["narrow"].weight.is_contiguous()
    assert torch.equal(folds.lora_a("narrow")[:6], Buffers.lora_a.reshape(6, 8))  # mirrored at once
    assert not folds.lora_a("narrow")[6:].any()
    assert not folds.has_lora_b("narrow")
    # With the graph expand, B beside too, though it does not fold: the expand reads it there.
    model["narrow"] = torch.nn.Linear(8, 4, bias=False)
    folds = FoldedWeights(model, {"narrow": Buffers()}, fold=False, stack=True, stack_b=lambda name: True)
    assert folds.buffer("narrow").shape == (4 + 8, 8 + 8) and model["narrow"].weight.stride() == (8 + 8, 1)
    assert torch.equal(folds.lora_b("narrow"), Buffers.lora_b)  # [slots, out, rank], beside the weight
    assert not folds.buffer("narrow")[:4, 8 + 6:].any()  # the padding columns
    model = torch.nn.ModuleDict(dict(wide=torch.nn.Linear(4, 8)))
    bias = model["wide"].bias.detach().clone()
    Buffers.lora_a, Buffers.lora_b = torch.randn(2, 3, 4), torch.randn(2, 8, 3)
    folds = FoldedWeights(model, {"wide": Buffers()}, fold=True, stack=True)
    assert folds.folds("wide") and folds.stacked("wide")
    stacked_bias = torch.as_strided(model["wide"].bias, (8 + 8,), (1,), 0)
    assert torch.equal(stacked_bias[:8], bias) and not stacked_bias[8:].any()


# inner="inductor" runs only with the stack's default, the kernel expand: the graph expand and
# shrink (measured slower at decode, off by default) run with inner="eager" here, where their
# rewrite is the same and Inductor's CPU compile of their ops would cost ~70 s a test (fresh
# caches). Compiled, they run in the CPU decode test below (shrink and expand) and in
# tests/test_gpu.py's CUDA-graph decode (each alone and together).
@pytest.mark.parametrize("stack_expand, stack_shrink, inner",
                         [("kernel", "gemm", "eager"), ("kernel", "gemm", "inductor"), ("inductor", "gemm", "eager"),
                          ("inductor", "inductor", "eager"), ("inductor", "inductor_columns", "eager")])
def test_stacked_linears_equal_peft_per_request(family, inner, stack_expand, stack_shrink, caplog):
    torch._dynamo.reset()
    mm = mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=3, stack_max_rows=10**6, inner=inner,
                           stack_expand=stack_expand, stack_shrink=stack_shrink, dynamic=False)
    folds = mm.runtime.folds
    # Every served plain linear stacks, narrow ones too; none folds (fold_min_rows is off).
    assert any(module.endswith("down_proj") for module in folds.modules), folds.modules
    assert not any(folds.folds(module) for module in folds.modules)
    batch, singles = _batch(mm.runtime.model)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="mmlora_fx"):
        logits = mm(**batch, adapter_names=NAMES).logits
    # The compile's summary line says what was stacked, and which calls shrink and expand in graph ops.
    stacked = _marked_nodes(mm, "stacked")
    shrunk_in_graph = [node for node in stacked if node.meta[LORA].get("shrink") == "graph"]
    summary = f"0 linear calls folded, {len(stacked) - len(shrunk_in_graph)} stacked" + (
        f"; {len(shrunk_in_graph)} linear calls with shrink and expand as graph ops" if shrunk_in_graph else "")
    assert any(summary in record.getMessage() for record in caplog.records), (
        summary, [record.getMessage() for record in caplog.records])
    assert_rows_equal_peft(family.peft, singles, logits, NAMES, "stacked")
    assert stacked, "no linear was stacked"
    # Siblings share one op: q, k and v of a layer are stacked under one lora_stacked_. With the
    # graph expand the language model's calls have none: one row-slot op per graph serves them all.
    ops = {node.meta[LORA]["op"] for node in stacked}
    assert len(ops) < len(stacked)
    in_graph = [node for node in stacked if node.meta[LORA].get("expand") == "graph"]
    if stack_expand == "kernel":
        assert not in_graph
    else:
        assert in_graph and {partition_of(node) for node in in_graph} == {"language_model"}
        assert len(in_graph) < len(stacked)  # the tower's calls keep the stack's kernel
        graphs = {record.index: record.graph_module for record in mm.backend.records}
        row_slot_ops = [node for module in graphs.values() for node in module.graph.nodes
                        if node.target is torch.ops.mmlora.lora_stacked_row_slots.default]
        assert 0 < len(row_slot_ops) <= len(graphs) and len({node.meta[LORA]["op"] for node in in_graph}) == len(
            row_slot_ops)
    # With the graph shrink, those calls' GEMMs read the weight as it is (no stacked A under it);
    # the other stacked calls keep the stacked GEMM.
    assert shrunk_in_graph == (in_graph if stack_shrink != "gemm" else [])
    for node in stacked:
        weight = node.args[1]
        assert (weight.op == "placeholder") == (node in shrunk_in_graph), (node, weight)
    _equal_peft_after_a_swap(mm, family, batch, singles)


@pytest.mark.parametrize("stack_shrink", ["gemm", "inductor"])
def test_the_graph_expand_beside_the_fold_with_padded_columns(tmp_path, stack_shrink):
    # 3 slots of rank 6: 18 columns, padded to 24; q, gate and up fold (fold_min_rows=1), k, v, o
    # and down stack with the graph expand. Every row as PEFT gives it.
    family = peft_family(tmp_path, lambda: zoo.build(FAMILY), all_targets(FAMILY), names=("alice", "bob", "carol"))
    torch._dynamo.reset()
    model = copy.deepcopy(family.base)
    mm = mmlora_fx.compile(model, family.paths, max_loras=3, max_lora_rank=6, fold_min_rows=1,
                           stack_max_rows=10**6, stack_expand="inductor", stack_shrink=stack_shrink, inner="eager",
                           dynamic=False)
    folds = mm.runtime.folds
    graph_expanded = [module for module in folds.modules if mm.runtime.stack_layout(module)]
    assert graph_expanded and all(folds.width(module) == 24 for module in folds.modules)
    # B beside only where the fold or the graph expand reads it: the tower's stacked linears that
    # do not fold keep contiguous rows.
    assert all(folds.has_lora_b(module) == (folds.folds(module) or module in graph_expanded)
               for module in folds.modules)
    assert any(not folds.has_lora_b(module) for module in folds.modules)
    batch, singles = _batch(mm.runtime.model)
    with torch.no_grad():
        logits = mm(**batch, adapter_names=NAMES).logits
    assert_rows_equal_peft(family.peft, singles, logits, NAMES, "fold and graph expand")
    marks = [node.meta[LORA] for node in _marked_nodes(mm, "stacked")]
    assert any(mark.get("expand") == "graph" for mark in marks) and _marked_nodes(mm, "folded")
    assert any(mark.get("shrink") == "graph" for mark in marks) == (stack_shrink != "gemm")


def test_stack_expand_is_checked():
    with pytest.raises(OptionError, match="stack_expand"):
        mmlora_fx.compile(zoo.build(FAMILY), {}, stack_max_rows=4, stack_expand="triton")
    with pytest.raises(OptionError, match="give stack_max_rows too"):  # it would change nothing
        mmlora_fx.compile(zoo.build(FAMILY), {}, stack_expand="inductor")
    with pytest.raises(OptionError, match="stack_shrink"):
        mmlora_fx.compile(zoo.build(FAMILY), {}, stack_max_rows=4, stack_expand="inductor", stack_shrink="kernel")
    with pytest.raises(OptionError, match="give stack_expand='inductor'"):  # the kernel reads the GEMM's shrink
        mmlora_fx.compile(zoo.build(FAMILY), {}, stack_max_rows=4, stack_shrink="inductor")


def test_stack_max_rows_is_checked():
    with pytest.raises(OptionError, match="stack_max_rows"):
        mmlora_fx.compile(zoo.build(FAMILY), {}, stack_max_rows=True)


def test_decode_steps_stacked_equal_eager_across_swaps_loads_and_unloads(tmp_path):
    # The GPU test's flow (tests/test_gpu.py) on the CPU: prefill through the kernels (more rows
    # than stack_max_rows), decode steps stacked.
    from .test_gpu import decode_replays_equal_eager

    decode_replays_equal_eager("tiny-qwen2-vl", [], tmp_path, "cpu", stack_max_rows=8)


def test_decode_steps_with_the_graph_shrink_and_expand_equal_eager_across_swaps_loads_and_unloads(tmp_path):
    # The same with the language model's shrink and expand as graph ops (stack_expand="inductor"):
    # B mirrored beside each weight, each row's slot's A read below it, which the base GEMM no longer
    # reads (one reduction a call; the per-column form and the graph expand alone: tests/test_gpu.py).
    from .test_gpu import decode_replays_equal_eager

    decode_replays_equal_eager("tiny-qwen2-vl", [], tmp_path, "cpu", stack_max_rows=8, stack_expand="inductor",
                               stack_shrink="inductor")


def test_a_fold_wider_than_the_rule_keeps_the_kernels(family, caplog):
    # 17 slots of rank 16: 272 columns, past FOLD_MAX_WIDTH (256), where the fold's extra GEMM work is
    # estimated to cost more than the kernels. Nothing folds; the call says so; LoRA still applies.
    from mmlora_fx.folding import FOLD_MAX_WIDTH

    model = copy.deepcopy(family.base)
    assert 17 * 16 > FOLD_MAX_WIDTH >= 16 * 16
    with caplog.at_level("WARNING", logger="mmlora_fx"):
        mm = mmlora_fx.compile(model, family.paths, max_loras=17, max_lora_rank=16, fold_min_rows=1, inner="eager")
    assert "no linear folds" in caplog.text and "17 x 16" in caplog.text
    assert len(mm.runtime.folds) == 0
    torch._dynamo.reset()
    batch, singles = _batch(mm.runtime.model)
    with torch.no_grad():
        logits = mm(**batch, adapter_names=NAMES).logits
    assert_rows_equal_peft(family.peft, singles, logits, NAMES, "too wide to fold")
    assert not _marked_nodes(mm, "folded")
    narrower = mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=16, max_lora_rank=16,
                                 fold_min_rows=1, inner="eager")
    assert len(narrower.runtime.folds) > 0
