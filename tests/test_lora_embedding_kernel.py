"""The embedding LoRA op's sync-free body against its row-by-row reference."""

import os

import pytest
import torch

from mmlora_fx.kernels.lora_embedding import (lora_embedding_add, lora_embedding_add_reference,
                                              lora_embedding_add_triton)

from .kernels.problems import in_one_slab

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def test_the_op_body_equals_the_reference_per_row_slot_and_rank():
    generator = torch.Generator().manual_seed(0)
    slots, max_rank, vocab, dim = 3, 8, 50, 16
    lora_a = torch.randn(slots, max_rank, vocab, generator=generator)
    lora_b = torch.randn(slots, dim, max_rank, generator=generator)
    ranks = torch.tensor([2, 8, 0], dtype=torch.int32)  # slot 2 does not adapt this embedding
    # Past each slot's rank the buffers hold garbage, which neither body may read.
    lora_a[0, 2:] = float("nan")
    # Four requests of 5 tokens: slots 1, base, 0, 2.
    ids = torch.randint(0, vocab, (4, 5), generator=generator)
    request_slots = torch.tensor([1, -1, 0, 2], dtype=torch.int32)
    cum_weights = torch.tensor([0, 1, 2, 3, 4])
    base = torch.randn(4, 5, dim, generator=generator)
    ours, reference = base.clone(), base.clone()
    lora_embedding_add(ours, ids, lora_a, lora_b, ranks, request_slots, cum_weights)
    lora_embedding_add_reference(reference, ids, lora_a, lora_b, ranks, request_slots, cum_weights)
    torch.testing.assert_close(ours, reference)
    assert torch.equal(ours[1], base[1]) and torch.equal(ours[3], base[3]), "base and rank-0 rows are untouched"
    expected = base[2, 0] + lora_b[0, :, :2] @ lora_a[0, :2, ids[2, 0]]
    torch.testing.assert_close(ours[2, 0], expected)


def test_a_slot_no_row_reads_cannot_reach_the_other_rows():
    """An infinite value in an idle slot (or one a prefetch is writing) leaves every other row
    finite and equal to the reference: 0 * inf would otherwise be NaN in all of them."""
    generator = torch.Generator().manual_seed(1)
    lora_a, lora_b = torch.randn(3, 4, 50, generator=generator), torch.randn(3, 8, 4, generator=generator)
    lora_b[2, 0, 0] = float("inf")
    ranks = torch.tensor([4, 4, 4], dtype=torch.int32)
    ids = torch.randint(0, 50, (2, 5), generator=generator)
    request_slots, cum = torch.tensor([0, -1], dtype=torch.int32), torch.tensor([0, 1, 2])
    ours, reference = torch.zeros(2, 5, 8), torch.zeros(2, 5, 8)
    lora_embedding_add(ours, ids, lora_a, lora_b, ranks, request_slots, cum)
    lora_embedding_add_reference(reference, ids, lora_a, lora_b, ranks, request_slots, cum)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference)


def test_the_custom_op_and_its_fake_trace():
    """The op compiles (its fake gives Inductor the shapes) and mutates the lookup in place."""
    lora_a, lora_b = torch.randn(2, 4, 30), torch.randn(2, 8, 4)
    ranks, slots, cum = torch.tensor([4, 4], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32), torch.tensor([0, 1, 2])
    weight = torch.randn(30, 8)

    def lookup(ids):
        out = torch.nn.functional.embedding(ids, weight)
        torch.ops.mmlora.lora_embedding_add_(out, ids, lora_a, lora_b, ranks, slots, cum)
        return out * 2

    ids = torch.randint(0, 30, (2, 3))
    torch._dynamo.reset()
    compiled = torch.compile(lookup, backend="aot_eager", fullgraph=True)(ids)
    torch.testing.assert_close(compiled, lookup(ids))


@pytest.mark.skipif(not INTERPRETING or torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 on a CPU")
@pytest.mark.parametrize("slab", [False, True], ids=["contiguous", "slab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_path_equals_the_reference_interpreted(dtype, slab):
    """What CUDA runs (the gathered columns expanded by lora_add's kernels through an identity A),
    on the CPU under Triton's interpreter: per row's slot and rank, with NaN past a rank and an
    infinite value in a slot no row reads, rows of the base model untouched. `slab`: A and B are
    views of one slot-major slab, as the adapter manager allocates them (slot stride the row's)."""
    generator = torch.Generator().manual_seed(2)
    slots, max_rank, vocab, dim = 4, 8, 40, 24
    lora_a = torch.randn(slots, max_rank, vocab, generator=generator).to(dtype)
    lora_b = torch.randn(slots, dim, max_rank, generator=generator).to(dtype)
    ranks = torch.tensor([3, 8, 0, 5], dtype=torch.int32)
    lora_a[0, 3:] = float("nan")
    lora_b[0, :, 3:] = float("nan")
    lora_b[3, 0, 0] = float("inf")  # slot 3: no request of this batch
    if slab:
        lora_a, lora_b = in_one_slab([lora_a, lora_b])
        assert lora_b.stride(0) != lora_b[0].numel()
    ids = torch.randint(0, vocab, (5, 3), generator=generator)
    request_slots = torch.tensor([1, -1, 0, 2, 0], dtype=torch.int32)
    cum_weights = torch.tensor([0, 1, 2, 3, 4, 5])
    base = torch.randn(5, 3, dim, generator=generator).to(dtype)
    ours, reference = base.clone(), base.clone()
    lora_embedding_add_triton(ours, ids, lora_a, lora_b, ranks, request_slots, cum_weights)
    lora_embedding_add_reference(reference, ids, lora_a, lora_b, ranks, request_slots, cum_weights)
    assert torch.isfinite(ours).all()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), reference.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(ours[1], base[1]) and torch.equal(ours[3], base[3]), "base and rank-0 rows are untouched"
    assert (ours[0] != base[0]).any() and (ours[2] != base[2]).any()
