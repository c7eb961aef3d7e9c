"""benchmarks/kernel_bench.py's folded GEMMs (`--fold`), stacked GEMMs (`--stack`) and GEMMs with
the expand in their epilogue (`--epilogue`) compute what they claim: each sibling's base output
plus its LoRA delta, on the CPU in float32, against the gather/bmm baseline."""

import torch

from benchmarks import kernel_bench

OPS = {"qkv": (64, (64, 16, 16)), "o": (64, (64,)), "gate_up": (64, (96, 96)), "down": (96, (64,))}


def _layer_and_batch():
    torch.manual_seed(0)
    layer = kernel_bench.make_layer(40, 4, 8, torch.float32, device="cpu", ops=OPS)
    for op in layer.values():  # as the adapter manager leaves slots: rank 3 padded with zeros, one empty
        for a, b, ranks in zip(op.lora_a, op.lora_b, op.slot_ranks):
            ranks[1], ranks[2] = 3, 0
            a[1, 3:], b[1, :, 3:], a[2], b[2] = 0, 0, 0, 0
    weights = {name: [torch.randn(out, inputs) * inputs ** -0.5 for out in outs] for name, (inputs, outs) in OPS.items()}
    # Six requests over 40 rows (uneven runs), one of them the base model.
    slots = torch.tensor([0, 1, 2, -1, 3, 1] + [-1] * 10, dtype=torch.int32)
    cum = torch.tensor(list(range(7)) + [6] * 10)
    return layer, weights, slots, cum


def test_folded_gemms_give_the_base_output_plus_each_rows_delta():
    layer, weights, slots, cum = _layer_and_batch()
    assert kernel_bench.check_folded(layer, weights, slots, cum) < 1e-5


def test_the_fold_check_sees_a_row_given_every_slots_delta(monkeypatch):
    layer, weights, slots, cum = _layer_and_batch()
    make_folded = kernel_bench.make_folded

    def unmasked(*args):
        folded = make_folded(*args)
        folded.mask.fill_(1)
        return folded

    monkeypatch.setattr(kernel_bench, "make_folded", unmasked)
    assert kernel_bench.check_folded(layer, weights, slots, cum) > 0.1


def test_gemms_with_the_rows_expand_in_their_epilogue_give_the_base_output_plus_each_rows_delta():
    # `--epilogue`: kernels/gemm_lora.py under Triton's interpreter, 16-row tiles over uneven requests.
    layer, weights, slots, cum = _layer_and_batch()
    assert kernel_bench.check_epilogue(layer, weights, slots, cum, (16, 16, 16, 4, 1)) < 1e-5


def test_the_epilogue_check_sees_every_row_given_one_slots_expand(monkeypatch):
    layer, weights, slots, cum = _layer_and_batch()
    make_epilogue = kernel_bench.make_epilogue

    def every_row_slot_0(*args):
        op = make_epilogue(*args)
        op.row_slots.clamp_(min=0, max=0)
        return op

    monkeypatch.setattr(kernel_bench, "make_epilogue", every_row_slot_0)
    assert kernel_bench.check_epilogue(layer, weights, slots, cum, (16, 16, 16, 4, 1)) > 0.1


def test_stacked_gemms_and_expands_give_the_base_output_plus_each_rows_delta():
    # `--stack`: every slot's A stacked under each weight, then lora_stacked_expand_ (Triton's
    # interpreter on the CPU).
    layer, weights, slots, cum = _layer_and_batch()
    assert kernel_bench.check_stacked(layer, weights, slots, cum) < 1e-5  # 40 rows: the tile kernel
    assert kernel_bench.check_stacked(layer, weights, slots, cum, row_path_max_rows=10**9) < 1e-5  # one program a row


def test_the_stack_check_sees_a_shrink_missing_from_the_gemm(monkeypatch):
    layer, weights, slots, cum = _layer_and_batch()
    make_stacked = kernel_bench.make_stacked

    def without_a(op, base_weights):
        stacked = make_stacked(op, base_weights)
        for weight, out in zip(stacked.weights, stacked.out_features):
            weight[out:] = 0
        return stacked

    monkeypatch.setattr(kernel_bench, "make_stacked", without_a)
    assert kernel_bench.check_stacked(layer, weights, slots, cum) > 0.1


def test_gemv_lora_bench_runs_and_its_fused_kernel_matches_the_reference(tmp_path, monkeypatch):
    # benchmarks/gemv_lora_bench.py --tiny: the script as the GPU step runs it (three configs, one
    # with 8 warps, one with its least K steps a split pinned), on the CPU under Triton's interpreter; its recorded errors are checks.
    import json
    import sys

    from benchmarks import gemv_lora_bench

    out = tmp_path / "gemv.json"
    monkeypatch.setattr(sys, "argv", ["gemv_lora_bench.py", "--tiny", "--configs", "8x32x16,2x16x16x8,8x32x16x4x1",
                                      "--json", str(out)])
    assert gemv_lora_bench.main() == 0
    report = json.loads(out.read_text())
    for record in report["ops"].values():
        assert set(record["configs"]) == {"8x32x16", "2x16x16x8", "8x32x16x4x1"}
        for found in record["configs"].values():
            assert found["error"] < 1e-5 and found["base_error"] < 1e-5
