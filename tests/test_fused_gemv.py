"""`fused_gemv` (experimental): language-model linear calls on one static row become one op, the base
GEMV with the row's LoRA inside (`kernels/gemv_lora.py`; on the CPU its plain-torch reference).
A one-row request equals PEFT alone with its adapter; calls on more rows keep the LoRA op."""

import copy

import pytest
import torch

import mmlora_fx
from mmlora_fx import zoo
from mmlora_fx.errors import OptionError
from mmlora_fx.passes.meta import LORA, LORA_OP

from .peft_helpers import all_targets, assert_rows_equal_peft, peft_family

FAMILY = "tiny-qwen2-vl"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return peft_family(tmp_path_factory.mktemp("gemv"), lambda: zoo.build(FAMILY), all_targets(FAMILY),
                       names=("alice", "bob"))


def _nodes(mm, predicate):
    return [node for record in mm.backend.records for node in record.graph_module.graph.nodes if predicate(node)]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_one_row_runs_the_fused_gemv_and_equals_peft(family, inner, caplog):
    torch._dynamo.reset()
    caplog.set_level("INFO", logger="mmlora_fx")
    mm = mmlora_fx.compile(copy.deepcopy(family.base), family.paths, max_loras=2, fused_gemv=True, inner=inner,
                           dynamic=False)
    single = {"input_ids": torch.tensor([[zoo.FIRST_TEXT_TOKEN + 7]])}
    for name in ("alice", None, "bob"):
        with torch.no_grad():
            logits = mm(**single, adapter_names=[name]).logits
        assert_rows_equal_peft(family.peft, [single], logits, [name], f"one row, {name}")
    fused = _nodes(mm, lambda node: node.meta.get(LORA, {}).get("gemv"))
    assert fused and all(node.target is torch.ops.mmlora.lora_gemv.default for node in fused)
    assert f"{len(fused)} one-row calls as the fused GEMV" in caplog.text  # the compile's summary line says so
    # Every served linear of the language model took it: no LoRA op of the kernels is left.
    assert not _nodes(mm, lambda node: node.meta.get(LORA_OP) and node.target is torch.ops.mmlora.lora_linear_.default)

    # Two rows: the kernels' op as without the option, still equal to PEFT per request.
    pair = {"input_ids": torch.tensor([[zoo.FIRST_TEXT_TOKEN + 7], [zoo.FIRST_TEXT_TOKEN + 9]])}
    names = ["bob", "alice"]
    with torch.no_grad():
        logits = mm(**pair, adapter_names=names).logits
    assert_rows_equal_peft(family.peft, [{"input_ids": pair["input_ids"][:1]}, {"input_ids": pair["input_ids"][1:]}],
                           logits, names, "two rows")
    assert _nodes(mm, lambda node: node.meta.get(LORA_OP) and node.target is torch.ops.mmlora.lora_linear_.default)


def test_fused_gemv_is_checked():
    with pytest.raises(OptionError, match="fused_gemv"):
        mmlora_fx.compile(zoo.build(FAMILY), {}, fused_gemv="yes")
