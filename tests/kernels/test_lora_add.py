"""The Triton path of `mmlora::lora_add_` against the reference.

CPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
when there is no GPU) on tiny shapes, called through `lora_add_triton` directly since the op's
CPU dispatch is the reference. GPU (`-m gpu`, run through the device tool): larger shapes, the
op itself, CUDA-graph replay with new batches and weights, and torch.compile.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from mmlora_fx.kernels import bound_calls, launch_config, tile_counters
from mmlora_fx.kernels.launch_config import LaunchConfig, cdiv, choose_config, tile_bound
from mmlora_fx.kernels import lora_add as lora_add_module
from mmlora_fx.kernels.lora_add import lora_add_, lora_add_triton
from mmlora_fx.kernels.reference import lora_add_reference
from mmlora_fx.kernels.tile_plan import build_tile_plan

from .problems import PATTERNS, Problem, assert_matches, expected_outputs, make_problem, slab_problem

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

interpreter = pytest.mark.skipif(not INTERPRETING or HAS_CUDA, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")


def gpu(test):
    """Marks a test `gpu` and skips it where there is no CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(test))


# Small blocks for tiny shapes: several k splits, k steps, column blocks and tiles per slot.
SMALL_BLOCKS = LaunchConfig(block_m=16, block_k=16, k_chunk=32, block_n=16)
# One split: the shrink stores its sums instead of adding them atomically.
ONE_SPLIT = LaunchConfig(block_m=16, block_k=32, k_chunk=4096, block_n=32)
# The row path with small blocks: several splits (partial sums) and column blocks per row.
ROW_SMALL = LaunchConfig(block_m=1, block_k=16, k_chunk=32, block_n=16, per_row=True)
# Several splits whose sums the tile's last split program adds up (no memset, no atomics).
SUMS_IN_KERNEL = dataclasses.replace(SMALL_BLOCKS, sums_in_kernel=True)


def run_triton(problem: Problem, config: LaunchConfig | None = None) -> list[torch.Tensor]:
    outputs = problem.fresh_outputs()
    lora_add_triton(*problem.args(outputs), config=config)
    return outputs


# ----------------------------------------------------------------------------------------------
# CPU, under the interpreter: tiny shapes, few cases.
# ----------------------------------------------------------------------------------------------

INTERPRETER_CASES = [
    # pattern, requests, rows per request, siblings' out features, max rank, dtype, config
    ("mixed", 6, 5, (40, 24, 72), 16, torch.float32, SMALL_BLOCKS),
    ("every_row_different", 20, 1, (24, 40), 16, torch.float32, SMALL_BLOCKS),
    ("long_segments", 2, 37, (48,), 16, torch.float32, SMALL_BLOCKS),
    ("zero_weight_requests", 7, 3, (24, 16, 40), 8, torch.float32, ONE_SPLIT),
    ("one_adapter", 3, 7, (40, 24), 32, torch.float32, None),
    ("base_only", 4, 2, (24,), 16, torch.float32, SMALL_BLOCKS),
    ("total_zero", 4, 2, (24, 16), 16, torch.float32, None),
    ("mixed", 6, 4, (40, 24, 72), 16, torch.bfloat16, SMALL_BLOCKS),
    ("every_row_different", 9, 1, (40, 24), 16, torch.float16, None),
    ("mixed", 5, 3, (24, 40), 128, torch.float32, None),
    ("long_segments", 3, 20, (24, 40), 16, torch.bfloat16, ONE_SPLIT),
    ("mixed", 6, 5, (40, 24, 72), 16, torch.float32, ROW_SMALL),
    ("zero_weight_requests", 7, 3, (24, 16, 40), 8, torch.float32, ROW_SMALL),
    ("base_only", 4, 2, (24,), 16, torch.float32, ROW_SMALL),
    ("mixed", 6, 4, (40, 24), 16, torch.bfloat16, ROW_SMALL),
    ("long_segments", 2, 37, (48,), 32, torch.float16, ROW_SMALL),
]


@interpreter
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda case: f"{case[0]}-{len(case[3])}-{str(case[5])[6:]}")
def test_triton_matches_reference_interpreted(case):
    pattern, requests, rows_per_request, out_features, max_rank, dtype, config = case
    problem = make_problem(pattern=pattern, requests=requests, rows_per_request=rows_per_request,
                           in_features=80, out_features=out_features, num_slots=5, max_rank=max_rank,
                           dtype=dtype, max_requests=requests + 3, seed=INTERPRETER_CASES.index(case))
    assert_matches(problem, run_triton(problem, config))


SLAB_CASES = [INTERPRETER_CASES[index] for index in (0, 3, 7, 10, 11, 14)]  # tiles, one split, row path; bf16


@interpreter
@pytest.mark.parametrize("case", SLAB_CASES, ids=lambda case: f"{case[0]}-{len(case[3])}-{str(case[5])[6:]}")
def test_triton_on_slab_views_matches_reference_interpreted(case):
    """The adapter manager's buffers are views of one slot-major slab: every sibling's A and B
    with a slot stride of the whole row (NaN between them). The kernels read them by the
    strides they are given: the reference's result, and bit for bit the contiguous buffers'."""
    pattern, requests, rows_per_request, out_features, max_rank, dtype, config = case
    problem = make_problem(pattern=pattern, requests=requests, rows_per_request=rows_per_request,
                           in_features=80, out_features=out_features, num_slots=5, max_rank=max_rank,
                           dtype=dtype, max_requests=requests + 3, seed=SLAB_CASES.index(case) + 50)
    slab = slab_problem(problem)
    assert all(a.stride(0) == slab.lora_a[0].stride(0) != a[0].numel() for a in slab.lora_a)
    got = run_triton(slab, config)
    assert_matches(problem, got)
    for got_j, contiguous_j in zip(got, run_triton(problem, config)):
        assert torch.equal(got_j, contiguous_j)


@interpreter
def test_triton_rows_not_proportional_interpreted():
    # 29 rows shared by weights summing to 10: fractional ownership, and leading dims (1, 29).
    problem = make_problem(pattern="mixed", requests=4, rows_per_request=3, in_features=48,
                           out_features=(32, 24), num_slots=4, max_rank=16, dtype=torch.float32,
                           rows=29, seed=11)
    problem.x = problem.x.reshape(1, 29, 48)
    problem.outputs = [output.reshape(1, 29, -1) for output in problem.outputs]
    assert_matches(problem, run_triton(problem, SMALL_BLOCKS))


@interpreter
@pytest.mark.parametrize("config", [SMALL_BLOCKS, ROW_SMALL], ids=["tiles", "per_row"])
def test_triton_rows_not_proportional_both_paths_interpreted(config):
    # 29 rows over weights summing to 10, on each path: rows are owned fractionally.
    problem = make_problem(pattern="every_row_different", requests=5, rows_per_request=2, in_features=48,
                           out_features=(32,), num_slots=5, max_rank=16, dtype=torch.float32, rows=29, seed=12)
    assert_matches(problem, run_triton(problem, config))


@interpreter
def test_triton_row_config_with_over_1024_request_entries_interpreted():
    # 1100 request entries do not fit the row path's one load of the tables, so the op takes the
    # tile path instead; this checks the result, not which path ran.
    problem = make_problem(pattern="every_row_different", requests=20, rows_per_request=1, in_features=32,
                           out_features=(24,), num_slots=6, max_rank=16, dtype=torch.float32,
                           max_requests=1100, seed=14)
    assert_matches(problem, run_triton(problem, ROW_SMALL))


# Row path with NaN where nothing may be read: each sibling's slot ranks (5 slots, buffers of
# rank 16): full, partial and 0.
MASKED_RANKS = [[16, 5, 3, 11, 9], [7, 16, 0, 1, 4], [0, 9, 13, 16, 2]]
# Each row count's slots, -1 included; slot 4 is used by no row (the tables' padding names it).
MASKED_SLOTS = {1: [3], 2: [-1, 0], 3: [2, -1, 2], 4: [0, 3, -1, 2]}
MASKED_UNUSED_SLOT = 4


def masked_problem(rows: int, siblings: int, dtype: torch.dtype, slab: bool, seed: int,
                  device: str = "cpu", in_features: int = 72) -> Problem:
    """One row per request on `MASKED_SLOTS[rows]`, ranks below the buffers' (`MASKED_RANKS`),
    NaN past every slot's rank in A and B and all over the unused slot (which the padding
    entries of the request tables name, owning no rows); with `slab`, A and B are views of one
    slot-major slab (`slab_problem`). A kernel reading any NaN ends up with NaN in the output."""
    out_features = (40, 24, 72)[:siblings]
    problem = make_problem(pattern="every_row_different", requests=rows, rows_per_request=1,
                           in_features=in_features, out_features=out_features, num_slots=5, max_rank=16,
                           dtype=dtype, max_requests=rows + 2, ranks=MASKED_RANKS[:siblings], seed=seed)
    slots = MASKED_SLOTS[rows] + [MASKED_UNUSED_SLOT] * 2
    problem.request_slots = torch.tensor(slots, dtype=torch.int32)
    for a, b, ranks in zip(problem.lora_a, problem.lora_b, MASKED_RANKS):
        for slot, rank in enumerate(ranks):
            a[slot, rank:] = float("nan")
            b[slot, :, rank:] = float("nan")
        a[MASKED_UNUSED_SLOT] = float("nan")
        b[MASKED_UNUSED_SLOT] = float("nan")
    if slab:
        problem = slab_problem(problem)
    return Problem(**{field: _to(value, device) for field, value in vars(problem).items()})


def _to(value, device: str):
    return [item.to(device) for item in value] if isinstance(value, list) else value.to(device)


MASKED_CASES = [
    # rows, siblings, dtype, slab views, config (None: choose_config's blocks)
    (1, 1, torch.float32, False, ROW_SMALL),
    (2, 3, torch.bfloat16, False, ROW_SMALL),
    (3, 2, torch.float32, True, ROW_SMALL),
    (4, 3, torch.float32, True, None),
    (4, 2, torch.bfloat16, True, ROW_SMALL),
    (3, 1, torch.bfloat16, False, None),
    (2, 2, torch.float32, False, None),
    (1, 3, torch.bfloat16, True, ROW_SMALL),
]


@interpreter
@pytest.mark.parametrize("case", MASKED_CASES,
                         ids=lambda c: f"rows{c[0]}-sib{c[1]}-{str(c[2])[6:]}{'-slab' if c[3] else ''}"
                                       f"-{'small' if c[4] else 'chosen'}")
def test_row_path_reads_nothing_past_the_ranks_interpreted(case):
    """The row path: the reference's result for 1-4 rows, 1-3 siblings, slots -1 included,
    ranks below the buffers' with NaN past them and in an unused slot, contiguous buffers or
    slab views."""
    rows, siblings, dtype, slab, config = case
    problem = masked_problem(rows, siblings, dtype, slab, seed=MASKED_CASES.index(case) + 70)
    if config is None:
        config = choose_config(rows, 72, 16, 5, dtype)
        assert config.per_row
    assert_matches(problem, run_triton(problem, config))


def plan_of(problem: Problem, slots: torch.Tensor | None = None) -> torch.Tensor:
    """The tile plan of the problem's tables (of `slots` instead, to make a wrong one)."""
    slots = problem.request_slots if slots is None else slots
    return build_tile_plan(slots.tolist(), problem.request_cum_weights.tolist()).to(problem.x.device)


@interpreter
@pytest.mark.parametrize("pattern", ["mixed", "every_row_different", "one_adapter", "zero_weight_requests",
                                     "base_only", "total_zero"])
@pytest.mark.parametrize("config", [SMALL_BLOCKS, ONE_SPLIT], ids=["splits", "one_split"])
def test_triton_with_a_tile_plan_interpreted(config, pattern):
    # One row per unit of weight: the shrink reads its tiles from the plan.
    problem = make_problem(pattern=pattern, requests=23, rows_per_request=1, in_features=48,
                           out_features=(24, 40), num_slots=5, max_rank=16, dtype=torch.float32,
                           max_requests=30, seed=PATTERNS.index(pattern))
    outputs = problem.fresh_outputs()
    lora_add_triton(*problem.args(outputs), plan_of(problem), config=config)
    assert_matches(problem, outputs)


@interpreter
@pytest.mark.parametrize("with_plan", [False, True], ids=["searched", "planned"])
def test_split_sums_in_the_kernel_match_the_reference_and_leave_the_counters_zero_interpreted(with_plan):
    # One counter set serves call after call: each call's last split program of a tile sets its
    # counter back, so the next batch (other slots, ranks and row shares) starts from zero.
    counters = torch.zeros(64, dtype=torch.int32)
    patterns = ["mixed", "every_row_different", "one_adapter", "zero_weight_requests", "base_only", "total_zero"]
    for seed, pattern in enumerate(patterns):
        problem = make_problem(pattern=pattern, requests=23, rows_per_request=1, in_features=80,
                               out_features=(40, 24, 72), num_slots=5, max_rank=16, dtype=torch.float32,
                               max_requests=30, seed=seed)
        assert cdiv(80, SUMS_IN_KERNEL.k_chunk) == 3  # three splits meet in every tile
        outputs = problem.fresh_outputs()
        lora_add_triton(*problem.args(outputs), plan_of(problem) if with_plan else None, config=SUMS_IN_KERNEL,
                        counters=counters)
        assert_matches(problem, outputs)
        assert not counters.any(), pattern


@interpreter
def test_split_sums_in_the_kernel_over_several_chunks_of_splits_interpreted():
    # Rank 64: the last program loads the parts 8 splits at a time (`_SUM_PARTS_ELEMENTS`), over
    # 10 splits: two loads, the second cut short by the mask.
    problem = make_problem(pattern="mixed", requests=9, rows_per_request=2, in_features=320, out_features=(24, 40),
                           num_slots=4, max_rank=64, dtype=torch.float32, max_requests=12, seed=7)
    assert cdiv(320, SUMS_IN_KERNEL.k_chunk) == 10 and lora_add_module._SUM_PARTS_ELEMENTS // (16 * 64) == 8
    counters = torch.zeros(64, dtype=torch.int32)
    outputs = problem.fresh_outputs()
    lora_add_triton(*problem.args(outputs), config=SUMS_IN_KERNEL, counters=counters)
    assert_matches(problem, outputs)
    assert not counters.any()


@interpreter
def test_split_sums_in_the_kernel_need_counters_at_zero_interpreted():
    # What the reset guards against: a counter left at 1 makes a tile's second-to-last split
    # program take itself for the last and store a partial sum.
    problem = make_problem(pattern="one_adapter", requests=8, rows_per_request=2, in_features=80,
                           out_features=(40,), num_slots=4, max_rank=16, dtype=torch.float32,
                           ranks=[[16, 16, 16, 16]], seed=2)
    outputs = problem.fresh_outputs()
    lora_add_triton(*problem.args(outputs), config=SUMS_IN_KERNEL, counters=torch.ones(64, dtype=torch.int32))
    with pytest.raises(AssertionError):
        assert_matches(problem, outputs)
    with pytest.raises(ValueError, match=f"needs {tile_bound(16, 4, 16)} int32 counters"):
        lora_add_triton(*problem.args(problem.fresh_outputs()), config=SUMS_IN_KERNEL,
                        counters=torch.zeros(1, dtype=torch.int32))


@interpreter
def test_triton_reads_the_plan_only_for_the_rows_it_covers_interpreted():
    # A plan of other slots is followed when it covers the row count (so the kernel does read
    # it) and ignored at any other row count (twice the rows: the search runs).
    problem = make_problem(pattern="every_row_different", requests=12, rows_per_request=1, in_features=32,
                           out_features=(24,), num_slots=6, max_rank=16, dtype=torch.float32, seed=21)
    wrong_plan = plan_of(problem, problem.request_slots.roll(1))
    outputs = problem.fresh_outputs()
    lora_add_triton(*problem.args(outputs), wrong_plan, config=SMALL_BLOCKS)
    with pytest.raises(AssertionError):
        assert_matches(problem, outputs)
    doubled = make_problem(pattern="every_row_different", requests=12, rows_per_request=1, in_features=32,
                           out_features=(24,), num_slots=6, max_rank=16, dtype=torch.float32, rows=24, seed=21)
    outputs = doubled.fresh_outputs()
    lora_add_triton(*doubled.args(outputs), wrong_plan, config=SMALL_BLOCKS)
    assert_matches(doubled, outputs)


@interpreter
def test_triton_refuses_a_malformed_plan_interpreted():
    problem = make_problem(pattern="mixed", requests=4, rows_per_request=1, in_features=32,
                           out_features=(24,), num_slots=4, max_rank=16, dtype=torch.float32, seed=3)
    outputs = problem.fresh_outputs()
    with pytest.raises(ValueError, match="tile plan"):
        lora_add_triton(*problem.args(outputs), plan_of(problem)[:-1])
    assert all(torch.equal(got, poison) for got, poison in zip(outputs, problem.outputs))  # nothing written


@interpreter
def test_triton_large_weights_interpreted():
    # Weights in the billions over 40 rows: weight * rows far beyond 32 bits.
    problem = make_problem(pattern="mixed", requests=5, rows_per_request=10**9, in_features=32,
                           out_features=(24,), num_slots=4, max_rank=16, dtype=torch.float32,
                           rows=40, seed=13)
    assert_matches(problem, run_triton(problem))


@interpreter
def test_triton_many_slots_interpreted():
    # More slots than one search block (40 -> 64 padded), more requests than one pass (300 > 256).
    problem = make_problem(pattern="every_row_different", requests=150, rows_per_request=1, in_features=32,
                           out_features=(24, 16), num_slots=40, max_rank=16, dtype=torch.float32,
                           max_requests=300, seed=9)
    assert_matches(problem, run_triton(problem))


@interpreter
def test_triton_can_fail_interpreted():
    # The check is not a tautology: a kernel given a wrong slot table is caught.
    problem = make_problem(pattern="every_row_different", requests=6, rows_per_request=1, in_features=32,
                           out_features=(24,), num_slots=6, max_rank=16, dtype=torch.float32, seed=5)
    outputs = problem.fresh_outputs()
    wrong = problem.request_slots.roll(1)
    lora_add_triton(outputs, problem.x, problem.lora_a, problem.lora_b, problem.slot_ranks, wrong,
                    problem.request_cum_weights)
    with pytest.raises(AssertionError):
        assert_matches(problem, outputs)


@interpreter
def test_shape_checks_still_refuse_after_the_same_buffers_passed_them_interpreted():
    # The launcher remembers A, B and rank tables it has checked (the slot buffers, the same at
    # every call): a later call that pairs them with outputs of another width, or passes other
    # buffers, is still refused.
    problem = make_problem(pattern="mixed", requests=3, rows_per_request=2, in_features=32,
                           out_features=(24, 16), num_slots=4, max_rank=8, dtype=torch.float32, seed=4)
    assert_matches(problem, run_triton(problem))
    assert_matches(problem, run_triton(problem))  # the remembered set, served again
    tables = (problem.slot_ranks, problem.request_slots, problem.request_cum_weights)
    narrow = [torch.zeros(problem.x.shape[0], 23), torch.zeros(problem.x.shape[0], 16)]
    with pytest.raises(ValueError, match="B has shape"):
        lora_add_triton(narrow, problem.x, problem.lora_a, problem.lora_b, *tables)
    short_ranks = [problem.slot_ranks[0][:-1], problem.slot_ranks[1]]
    with pytest.raises(ValueError, match="one entry per slot"):
        lora_add_triton(problem.fresh_outputs(), problem.x, problem.lora_a, problem.lora_b, short_ranks,
                        *tables[1:])
    other_a = [problem.lora_a[0], problem.lora_a[1][:, :, :-1]]
    with pytest.raises(ValueError, match="shape and strides of the first"):
        lora_add_triton(problem.fresh_outputs(), problem.x, other_a, problem.lora_b, *tables)
    with pytest.raises(ValueError, match="x has 31 features, A takes 32"):
        lora_add_triton(problem.fresh_outputs(), problem.x[:, :-1], problem.lora_a, problem.lora_b, *tables)


def test_op_cpu_runs_reference_and_passes_opcheck():
    problem = make_problem(pattern="mixed", requests=4, rows_per_request=2, in_features=24,
                           out_features=(16, 8), num_slots=4, max_rank=8, dtype=torch.float32, seed=2)
    outputs = problem.fresh_outputs()
    torch.ops.mmlora.lora_add_(*problem.args(outputs))
    assert_matches(problem, outputs)
    torch.library.opcheck(lora_add_, problem.args(problem.fresh_outputs()))
    torch.library.opcheck(lora_add_, problem.args(problem.fresh_outputs()) + (plan_of(problem),))


def test_choose_config_is_static_and_sane():
    for rows in (1, 4, 5, 8, 16, 64, 256, 1000, 4096):
        for rank in (8, 16, 64, 128):
            for dtype in (torch.float32, torch.bfloat16):
                config = choose_config(rows, 3584, rank, 32, dtype)
                assert config.k_chunk % config.block_k == 0 and config.k_chunk >= config.block_k
                assert config.block_m >= (1 if config.per_row else 16) and config.block_n >= 16
                assert config.per_row == (rows <= 4)
    assert not choose_config(16, 3584, 16, 32, per_row_max_rows=0).per_row
    # Decode splits the input features over many programs; prefill hardly at all.
    assert 3584 // choose_config(1, 3584, 16, 32).k_chunk >= 16
    assert 3584 // choose_config(4096, 3584, 16, 32).k_chunk <= 4
    # Once the tiles alone give about a program per multiprocessor, no split (no memset, no atomics):
    # the tower block's 8,192 rows (256 tiles of 32 at least); the LM's 2,584 rows (81) and 4,096
    # rows (128, though the bound over 8 slots is 135) still split; an explicit cap replaces the rule.
    assert choose_config(8192, 1280, 16, 8).k_chunk == 1280
    assert choose_config(2584, 3584, 16, 8).k_chunk < 3584
    assert choose_config(4096, 1280, 16, 8).k_chunk < 1280
    assert choose_config(8192, 1280, 16, 8, max_splits=2).k_chunk == 640


@pytest.mark.parametrize("seed", range(200))
def test_tile_bound_holds(seed):
    # The grid is sized by tile_bound: no batch may need more tiles than it says.
    generator = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(1, 300, (1,), generator=generator))
    num_slots = int(torch.randint(1, 40, (1,), generator=generator))
    block_m = (16, 32, 64)[seed % 3]
    cuts = torch.randint(0, rows + 1, (int(torch.randint(0, 40, (1,), generator=generator)),), generator=generator)
    bounds = torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([rows])])
    slots = torch.randint(-1, num_slots, (bounds.numel() - 1,), generator=generator)
    rows_per_slot = torch.zeros(num_slots, dtype=torch.int64)
    for slot, count in zip(slots.tolist(), bounds.diff().tolist()):
        if slot >= 0:
            rows_per_slot[slot] += count
    needed = int(((rows_per_slot + block_m - 1) // block_m).sum())
    assert needed <= tile_bound(rows, num_slots, block_m)


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------

GPU_SHAPES = [
    # requests, rows per request, in features, siblings' out features (decode-like, then prefill-like)
    (1, 1, 1000, (520, 72, 72)),
    (64, 1, 1024, (1024, 256, 256)),
    (200, 1, 768, (1000, 3000)),
    (4, 300, 1000, (520, 72, 72)),
    (3, 1024, 512, (1500,)),
]


@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}-{len(shape[3])}")
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@gpu
def test_op_matches_reference_gpu(dtype, pattern, shape):
    requests, rows_per_request, in_features, out_features = shape
    problem = make_problem(pattern=pattern, requests=requests, rows_per_request=rows_per_request,
                           in_features=in_features, out_features=out_features, num_slots=24, max_rank=16,
                           dtype=dtype, device="cuda", max_requests=requests + 5,
                           seed=10 * PATTERNS.index(pattern) + GPU_SHAPES.index(shape))
    outputs = problem.fresh_outputs()
    torch.ops.mmlora.lora_add_(*problem.args(outputs))
    assert_matches(problem, outputs)


@pytest.mark.parametrize("max_rank", [8, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows_per_request", [1, 200])
@gpu
def test_op_ranks_gpu(rows_per_request, dtype, max_rank):
    problem = make_problem(pattern="mixed", requests=40 if rows_per_request == 1 else 6,
                           rows_per_request=rows_per_request, in_features=640, out_features=(384, 128, 200),
                           num_slots=8, max_rank=max_rank, dtype=dtype, device="cuda", seed=max_rank)
    outputs = problem.fresh_outputs()
    torch.ops.mmlora.lora_add_(*problem.args(outputs))
    assert_matches(problem, outputs)


@pytest.mark.parametrize("config", [ONE_SPLIT, SMALL_BLOCKS, LaunchConfig(block_m=64, block_k=64, k_chunk=256, block_n=128),
                                    ROW_SMALL, LaunchConfig(block_m=1, block_k=128, k_chunk=128, block_n=256, per_row=True),
                                    LaunchConfig(block_m=1, block_k=64, k_chunk=256, block_n=64, per_row=True,
                                                 dependent_launch=False)],
                         ids=["one_split", "small_blocks", "large_blocks", "per_row_small", "per_row_large",
                              "per_row_plain_launch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@gpu
def test_configs_gpu(dtype, config):
    for pattern, requests, rows_per_request in (("every_row_different", 50, 1), ("mixed", 7, 40)):
        problem = make_problem(pattern=pattern, requests=requests, rows_per_request=rows_per_request,
                               in_features=300, out_features=(200, 72, 130), num_slots=12, max_rank=16,
                               dtype=dtype, device="cuda", max_requests=400, seed=requests)
        assert_matches(problem, run_triton(problem, config))


@pytest.mark.parametrize("with_plan", [False, True], ids=["searched", "planned"])
@gpu
def test_llm_sizes_gpu(with_plan):
    # The benchmark's gate/up at decode and prefill sizes, every row on its own slot or long runs.
    for requests, rows_per_request in ((64, 1), (8, 128)):
        problem = make_problem(pattern="mixed", requests=requests, rows_per_request=rows_per_request,
                               in_features=3584, out_features=(18944, 18944), num_slots=32, max_rank=16,
                               dtype=torch.bfloat16, device="cuda", max_requests=256, seed=requests)
        outputs = problem.fresh_outputs()
        torch.ops.mmlora.lora_add_(*problem.args(outputs), plan_of(problem) if with_plan else None)
        assert_matches(problem, outputs)


@pytest.mark.parametrize("requests", [9, 64, 256])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@gpu
def test_op_with_a_tile_plan_gpu(dtype, pattern, requests):
    # Decode: one row per request, so the plan covers the rows (up to its 256-row capacity).
    problem = make_problem(pattern=pattern, requests=requests, rows_per_request=1, in_features=1024,
                           out_features=(1024, 256, 256), num_slots=32, max_rank=16, dtype=dtype, device="cuda",
                           max_requests=256, seed=requests + PATTERNS.index(pattern))
    outputs = problem.fresh_outputs()
    torch.ops.mmlora.lora_add_(*problem.args(outputs), plan_of(problem))
    assert_matches(problem, outputs)


@pytest.fixture
def sums_in_kernel(monkeypatch):
    """The op's chosen configs with the split sums reduced in the kernel, bound afresh (a
    binding keeps the config of its first call), and the bindings dropped again after."""
    monkeypatch.setattr(launch_config, "SUMS_IN_KERNEL", True)
    tile_counters.make_pool(torch.device("cuda", torch.cuda.current_device()))  # as the runtime does at set-up
    bound_calls.forget()
    yield
    bound_calls.forget()


@pytest.mark.parametrize("requests, num_slots, in_features", [(16, 8, 3584), (64, 32, 3584), (64, 32, 18944)],
                         ids=["b16", "b64", "b64_down"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@gpu
def test_op_with_split_sums_in_the_kernel_gpu(sums_in_kernel, dtype, pattern, requests, num_slots, in_features):
    # Decode shapes of the 7B layer, through the op (a bound call site with its own counters): the
    # first call goes through Triton's path, the others replay the binding with new batches.
    for seed in range(3):
        problem = make_problem(pattern=pattern, requests=requests, rows_per_request=1, in_features=in_features,
                               out_features=(3584, 512, 512) if in_features == 3584 else (3584,),
                               num_slots=num_slots, max_rank=16, dtype=dtype, device="cuda", max_requests=256,
                               rows=requests, seed=seed)
        if seed == 0:
            static = problem
        else:  # the same tensors (one call site), new contents
            _load_batch(static, problem, None)
        outputs = [output.clone() for output in static.outputs]
        torch.ops.mmlora.lora_add_(*static.args(outputs), None)
        assert_matches(problem, outputs)
    assert launch_config.config_for_call(requests, in_features, 16, num_slots, dtype, 256).sums_in_kernel
    pool, used = tile_counters._POOLS[static.x.device]
    assert used > 0 and not pool.any()  # claimed, and every counter back at 0


@gpu
def test_cuda_graph_replay_with_split_sums_in_the_kernel_gpu(sums_in_kernel):
    shape = dict(requests=48, rows_per_request=1, in_features=512, out_features=(384, 128, 128), num_slots=16,
                 max_rank=16, dtype=torch.bfloat16, device="cuda", max_requests=64, rows=48)
    static = make_problem(pattern="mixed", seed=0, **shape)
    plan = plan_of(static)
    assert_graph_replays_match(static, plan, shape, lambda: torch.ops.mmlora.lora_add_(*static.args(), plan))
    pool, used = tile_counters._POOLS[static.x.device]
    assert used > 0 and not pool.any()  # the graph's span claimed at the warm-up, back at 0 after each replay


@gpu
def test_opcheck_gpu():
    problem = make_problem(pattern="mixed", requests=8, rows_per_request=3, in_features=256,
                           out_features=(128, 64), num_slots=4, max_rank=16, dtype=torch.bfloat16,
                           device="cuda", seed=4)
    torch.library.opcheck(lora_add_, problem.args(problem.fresh_outputs()))
    torch.library.opcheck(lora_add_, problem.args(problem.fresh_outputs()) + (plan_of(problem),))


def _load_batch(static: Problem, fresh: Problem, plan: torch.Tensor | None) -> None:
    """Copy a new batch (its tile plan too, if there is one) and new adapter contents into the
    captured buffers, in place."""
    for name in ("x", "request_slots", "request_cum_weights"):
        getattr(static, name).copy_(getattr(fresh, name))
    if plan is not None:
        plan.copy_(plan_of(fresh))
    for name in ("outputs", "lora_a", "lora_b", "slot_ranks"):
        for target, source in zip(getattr(static, name), getattr(fresh, name)):
            target.copy_(source)


@pytest.mark.parametrize("requests, rows_per_request", [(4, 1), (48, 1), (4, 96)],
                         ids=["row_path", "tiles_decode", "tiles_prefill"])
@gpu
def test_cuda_graph_replay_gpu(requests, rows_per_request):
    # Rows stay fixed (a graph's shapes are); each batch's weights share them out anew.
    shape = dict(requests=requests, rows_per_request=rows_per_request, in_features=512,
                 out_features=(384, 128, 128), num_slots=16, max_rank=16, dtype=torch.bfloat16,
                 device="cuda", max_requests=64, rows=requests * rows_per_request)
    static = make_problem(pattern="mixed", seed=0, **shape)
    plan = plan_of(static)  # read where a batch has one row per unit of weight (tiles_decode)
    assert_graph_replays_match(static, plan, shape, lambda: torch.ops.mmlora.lora_add_(*static.args(), plan))


def assert_graph_replays_match(static, plan, shape, call) -> None:
    """`call` (on `static`'s buffers) captured in a CUDA graph after a warm-up, then replayed
    with the same rows and new slots, weights (row ownership) and adapter contents each time,
    each replay equal to the reference."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed, pattern in enumerate(["every_row_different", "mixed", "one_adapter", "zero_weight_requests",
                                    "base_only", "long_segments"], start=1):
        fresh = make_problem(pattern=pattern, seed=seed, **shape)
        _load_batch(static, fresh, plan)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(fresh, [output.clone() for output in static.outputs])


@gpu
def test_torch_compile_gpu():
    """Inside an Inductor graph (directly and through another custom op), with CUDA graphs."""

    @torch.library.custom_op("mmlora_test::linear_with_lora", mutates_args=())
    def linear_with_lora(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         ranks: torch.Tensor, slots: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
        y = x @ weight.T
        torch.ops.mmlora.lora_add_([y], x, [a], [b], [ranks], slots, cum)
        return y

    @linear_with_lora.register_fake
    def _(x, weight, a, b, ranks, slots, cum):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def model(x, weight, a, b, ranks, slots, cum):
        hidden = x @ weight.T  # the op on an Inductor intermediate
        torch.ops.mmlora.lora_add_([hidden], x, [a], [b], [ranks], slots, cum)
        return torch.relu(hidden) + linear_with_lora(x, weight, a, b, ranks, slots, cum)

    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    shape = dict(requests=32, rows_per_request=1, in_features=256, out_features=(256,), num_slots=8,
                 max_rank=16, dtype=torch.float32, device="cuda", max_requests=32)
    weight = torch.randn(256, 256, device="cuda") / 16
    for seed, pattern in enumerate(["mixed", "every_row_different", "one_adapter", "mixed"]):
        problem = make_problem(pattern=pattern, seed=seed, **shape)
        args = (problem.x, weight, problem.lora_a[0], problem.lora_b[0], problem.slot_ranks[0],
                problem.request_slots, problem.request_cum_weights)
        got = compiled(*args).clone()
        hidden = (problem.x.double() @ weight.double().T).cpu()
        lora_add_reference([hidden], problem.x.double().cpu(), [problem.lora_a[0].double().cpu()],
                           [problem.lora_b[0].double().cpu()], [problem.slot_ranks[0].cpu()],
                           problem.request_slots.cpu(), problem.request_cum_weights.cpu())
        want = torch.relu(hidden) + hidden
        error = (got.double().cpu() - want).norm() / want.norm()
        assert error < 1e-4, f"{pattern}: relative error {error:.2e}"


# ----------------------------------------------------------------------------------------------
# GPU: the row path where nothing past the ranks may be read, and chained dependent launches
# ----------------------------------------------------------------------------------------------


def row_configs(rows: int, in_features: int, max_rank: int, num_slots: int, dtype: torch.dtype) -> dict:
    """The row path with small blocks, with `choose_config`'s blocks (dependent launch at up
    to 4 rows on Hopper), and with those blocks launched plainly."""
    chosen = choose_config(rows, in_features, max_rank, num_slots, dtype)
    return {"small": ROW_SMALL, "chosen": chosen,
            "plain_launch": choose_config(rows, in_features, max_rank, num_slots, dtype, dependent_launch=False)}


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@gpu
def test_row_path_reads_nothing_past_the_ranks_gpu(dtype, rows):
    """NaN past the ranks and in an unused slot, slab views, 3 siblings; then the benchmark's
    gate/up (3584 -> 2 x 18944) at decode sizes."""
    for slab in (False, True):
        problem = masked_problem(rows, 3, dtype, slab, seed=rows, device="cuda", in_features=1000)
        for name, config in row_configs(rows, 1000, 16, 5, dtype).items():
            assert config.per_row, name
            assert_matches(problem, run_triton(problem, config))
    problem = make_problem(pattern="mixed", requests=rows, rows_per_request=1, in_features=3584,
                           out_features=(18944, 18944), num_slots=32, max_rank=16, dtype=dtype, device="cuda",
                           max_requests=256, rows=rows, seed=rows)
    for name, config in row_configs(rows, 3584, 16, 32, dtype).items():
        assert_matches(problem, run_triton(problem, config))


@gpu
def test_row_path_chained_in_a_cuda_graph_gpu():
    """Two row-path calls back to back in one graph, the second reading the first's output as its
    x: with dependent launches the second starts early and must wait before reading x and its
    output (float32, against the reference applied twice)."""
    rows, hidden = 4, 512
    config = choose_config(rows, hidden, 16, 8, torch.float32)
    first = make_problem(pattern="every_row_different", requests=rows, rows_per_request=1, in_features=hidden,
                         out_features=(hidden,), num_slots=8, max_rank=16, dtype=torch.float32, device="cuda",
                         seed=1)
    second = make_problem(pattern="every_row_different", requests=rows, rows_per_request=1, in_features=hidden,
                          out_features=(hidden, 256), num_slots=8, max_rank=16, dtype=torch.float32,
                          device="cuda", seed=2)
    # The first's delta scaled up, so that a second call reading x too early is caught.
    first.lora_b = [b * 64 for b in first.lora_b]
    hidden_in, outputs = first.outputs[0].clone(), [output.clone() for output in second.outputs]

    def step():
        hidden_state.copy_(hidden_in)
        for output, start in zip(captured, outputs):
            output.copy_(start)
        lora_add_triton(*first.args([hidden_state]), config=config)
        lora_add_triton(*second.args(captured), config=config)

    hidden_state = torch.empty_like(hidden_in)
    captured = [torch.empty_like(output) for output in outputs]
    second.x = hidden_state
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        for output in captured:
            output.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want_hidden = expected_outputs(dataclasses.replace(first, outputs=[hidden_in]))[0]
        want = expected_outputs(dataclasses.replace(second, x=want_hidden.float().cuda(), outputs=outputs))
        for got, expected in zip(captured, want):
            error = (got.double().cpu() - expected).norm() / expected.norm()
            assert error < 1e-4, f"relative error {error:.2e}"
