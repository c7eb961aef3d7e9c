"""The Triton path of `mmlora::lora_experts_add_` against the row-by-row reference.

CPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py
when there is no GPU) on tiny shapes, called through `lora_experts_add_triton` directly since
the op's CPU body is plain torch. GPU (`-m gpu`): larger shapes through the op, and a CUDA graph
replayed with new slots, routing and weights.

Every problem is fresh random data: outputs start as random poison, ranks are below the
buffers' rank with NaN planted past each slot's rank, and an idle slot (rank 0) and a slot no
request uses are all NaN, so a kernel that reads what it must not gets a NaN in its output.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmlora_fx.kernels.lora_experts import (ExpertConfig, choose_expert_config, experts_row_slots, lora_experts_add_,
                                            lora_experts_add_reference, lora_experts_add_torch,
                                            lora_experts_add_triton)

from .problems import in_one_slab
from .test_lora_add import gpu, interpreter

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@dataclasses.dataclass
class ExpertProblem:
    output: torch.Tensor
    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    slot_ranks: torch.Tensor
    expert_ids: torch.Tensor | None
    contract_in: bool
    tiles: int
    interleave: int
    request_slots: torch.Tensor
    request_cum_weights: torch.Tensor

    def args(self, output: torch.Tensor | None = None) -> tuple:
        return (self.output if output is None else output, self.x, self.lora_a, self.lora_b, self.slot_ranks,
                self.expert_ids, self.contract_in, self.tiles, self.interleave, self.request_slots,
                self.request_cum_weights)

    def row_slots(self) -> torch.Tensor:
        rows = self.x.shape[0] if self.expert_ids is not None else self.x.shape[0] * self.x.shape[1]
        return experts_row_slots(rows, self.tiles, self.interleave, self.request_slots.cpu(),
                                 self.request_cum_weights.cpu())


def make_problem(*, gathered: bool, contract_in: bool, tokens: int, tiles: int = 1, interleave: int = 1,
                 experts: int = 4, in_features: int = 40, out_features: int = 24, num_slots: int = 5,
                 max_rank: int = 16, requests: int = 4, padded_requests: int | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> ExpertProblem:
    """Random rows and buffers; tokens shared by `requests` requests of random weights (one of
    weight 0) and slots (-1, the idle slot and the NaN-poisoned ones among them).

    Slot 0 is idle (rank 0, all NaN) and the last slot is used by no request (all NaN); the
    others have random ranks in [1, max_rank) with NaN past them."""
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    rows = tiles * interleave * tokens
    reads, writes = (in_features, out_features) if contract_in else (out_features, in_features)
    lora_a = randn(num_slots, experts, max_rank, in_features) * in_features ** -0.5
    lora_b = randn(num_slots, experts, out_features, max_rank)
    ranks = torch.randint(1, max_rank, (num_slots,), generator=generator)
    ranks[0] = 0
    for slot, rank in enumerate(ranks.tolist()):
        lora_a[slot, :, rank:] = float("nan")
        lora_b[slot, :, :, rank:] = float("nan")
    lora_a[-1] = lora_b[-1] = float("nan")
    slots = torch.randint(-1, num_slots - 1, (requests,), generator=generator)
    slots[: min(3, requests)] = torch.tensor([1, -1, 0])[: min(3, requests)]  # adapted, base model, idle
    weights = torch.randint(1, 4, (requests,), generator=generator)
    weights[-1] = 0
    padded = padded_requests or requests
    request_slots = torch.full((padded,), -1, dtype=torch.int32)
    request_slots[:requests] = slots.to(torch.int32)
    cum = torch.zeros(padded + 1, dtype=torch.int64)
    cum[1: requests + 1] = weights.cumsum(0)
    cum[requests + 1:] = cum[requests]
    if gathered:
        x = randn(rows, reads, 1)
        output = randn(rows, writes, 1)
        expert_ids = torch.randint(0, experts, (rows,), generator=generator)
    else:
        x = randn(experts, rows // experts, reads)
        output = randn(experts, rows // experts, writes)
        expert_ids = None
    on = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
    cast = lambda tensor: tensor.to(device=device, dtype=dtype)  # noqa: E731
    return ExpertProblem(cast(output), cast(x), cast(lora_a), cast(lora_b), on(ranks.to(torch.int32)), on(expert_ids),
                         contract_in, tiles, interleave, on(request_slots), on(cum))


def expected(problem: ExpertProblem) -> torch.Tensor:
    """The reference's result on the CPU, from float64 copies of the inputs."""
    output = problem.output.detach().cpu().double()
    lora_experts_add_reference(output, problem.x.cpu().double(), problem.lora_a.cpu().double(),
                               problem.lora_b.cpu().double(), problem.slot_ranks.cpu(),
                               None if problem.expert_ids is None else problem.expert_ids.cpu(), problem.contract_in,
                               problem.tiles, problem.interleave, problem.request_slots.cpu(),
                               problem.request_cum_weights.cpu())
    return output


def assert_matches(problem: ExpertProblem, got: torch.Tensor) -> None:
    """`got` equals the reference within the dtype's tolerance, is finite, and every row without
    an adapter (slot -1, rank 0) is bit-for-bit the poison it started as."""
    want = expected(problem)
    rows = problem.row_slots().numel()
    got, want, poison = (t.detach().cpu().reshape(rows, -1) for t in (got, want, problem.output))
    slots = problem.row_slots()
    untouched = (slots < 0) | (problem.slot_ranks.cpu().to(torch.int64)[slots.clamp(min=0)] == 0)
    assert not untouched.all(), "the problem adapts no row"
    assert torch.equal(got[untouched], poison[untouched]), "a row without an adapter changed"
    assert torch.isfinite(got).all(), "non-finite values: padding or an unused slot was read"
    tolerance = TOLERANCE[problem.x.dtype]
    delta, want_delta = got.double() - poison.double(), want - poison.double()
    error = (delta - want_delta).norm() / want_delta.norm()
    assert error <= tolerance, f"delta error {error:.2e} > {tolerance:.0e}"


def run_triton(problem: ExpertProblem, config: ExpertConfig | None = None) -> torch.Tensor:
    output = problem.output.clone()
    lora_experts_add_triton(*problem.args(output), config=config)
    return output


# Per-row programs with several feature splits and column blocks; groups of 16 positions with
# several splits, k steps and column blocks (sorted or not).
PER_ROW = ExpertConfig(block_m=1, block_k=16, k_chunk=16, block_n=16)
GROUPED = ExpertConfig(block_m=16, block_k=16, k_chunk=32, block_n=16)
SORTED = dataclasses.replace(GROUPED, sort=True)

# form, contract_in, tokens, tiles, interleave, dtype, config
INTERPRETER_CASES = [
    ("gathered", True, 9, 1, 2, torch.float32, None),  # default pick: per row
    ("gathered", False, 9, 1, 2, torch.float32, PER_ROW),
    ("gathered", True, 12, 1, 3, torch.float32, SORTED),
    ("gathered", False, 12, 1, 3, torch.float32, SORTED),
    ("gathered", True, 10, 2, 2, torch.float32, GROUPED),  # unsorted groups of gathered rows
    ("gathered", True, 10, 2, 2, torch.float32, SORTED),  # tiles and interleave together
    ("gathered", False, 7, 1, 2, torch.bfloat16, SORTED),
    ("per_expert", True, 6, 4, 1, torch.float32, None),
    ("per_expert", False, 6, 4, 1, torch.float32, PER_ROW),
    ("per_expert", True, 10, 4, 1, torch.float32, GROUPED),
    ("per_expert", False, 5, 4, 2, torch.float32, GROUPED),  # interleaved within each expert's batch
    ("per_expert", True, 9, 4, 1, torch.bfloat16, GROUPED),
]


def _case_id(case) -> str:
    form, contract_in, tokens, tiles, interleave, dtype, config = case
    path = "default" if config is None else "per_row" if config.block_m == 1 else "sorted" if config.sort else "grouped"
    return f"{form}-{'in' if contract_in else 'out'}-{tiles}x{interleave}-{str(dtype)[6:]}-{path}"


@interpreter
@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=_case_id)
def test_triton_matches_reference_interpreted(case):
    form, contract_in, tokens, tiles, interleave, dtype, config = case
    tiles = 4 if form == "per_expert" else tiles  # one tile per expert, as `bmm(x [experts, T, c], W)` has
    problem = make_problem(gathered=form == "gathered", contract_in=contract_in, tokens=tokens, tiles=tiles,
                           interleave=interleave, dtype=dtype, seed=INTERPRETER_CASES.index(case))
    assert_matches(problem, run_triton(problem, config))


@interpreter
@pytest.mark.parametrize("case", [INTERPRETER_CASES[index] for index in (0, 2, 6, 8, 10, 11)], ids=_case_id)
def test_triton_on_slab_views_matches_reference_interpreted(case):
    """A and B as views of one slot-major slab (the adapter manager's layout: slot stride the
    whole row, NaN between them): the reference's result."""
    form, contract_in, tokens, tiles, interleave, dtype, config = case
    tiles = 4 if form == "per_expert" else tiles
    problem = make_problem(gathered=form == "gathered", contract_in=contract_in, tokens=tokens, tiles=tiles,
                           interleave=interleave, dtype=dtype, seed=INTERPRETER_CASES.index(case) + 60)
    lora_a, lora_b = in_one_slab([problem.lora_a, problem.lora_b])
    assert lora_a.stride(0) == lora_b.stride(0) != problem.lora_a[0].numel()
    assert_matches(problem, run_triton(dataclasses.replace(problem, lora_a=lora_a, lora_b=lora_b), config))


@interpreter
@pytest.mark.parametrize("config", [PER_ROW, SORTED], ids=["per_row", "sorted"])
def test_triton_request_tables_longer_than_one_comparison_block_interpreted(config):
    # 150 request entries (most of them padding): the key search compares them in several blocks.
    problem = make_problem(gathered=True, contract_in=True, tokens=12, interleave=2, requests=20, padded_requests=150,
                           seed=40)
    assert_matches(problem, run_triton(problem, config))


@interpreter
def test_triton_can_fail_interpreted():
    # The comparison is not a tautology: rows routed to other experts are caught.
    problem = make_problem(gathered=True, contract_in=True, tokens=8, interleave=2, seed=41)
    wrong = dataclasses.replace(problem, expert_ids=(problem.expert_ids + 1) % 4)
    with pytest.raises(AssertionError):
        assert_matches(problem, run_triton(wrong, SORTED))


@pytest.mark.parametrize("case", INTERPRETER_CASES[::2], ids=_case_id)
def test_torch_body_matches_reference(case):
    # The CPU path and fallback meets the same checks (NaN past the ranks and in unused slots included).
    form, contract_in, tokens, tiles, interleave, dtype, _ = case
    tiles = 4 if form == "per_expert" else tiles
    problem = make_problem(gathered=form == "gathered", contract_in=contract_in, tokens=tokens, tiles=tiles,
                           interleave=interleave, dtype=dtype, seed=INTERPRETER_CASES.index(case))
    output = problem.output.clone()
    lora_experts_add_torch(*problem.args(output))
    assert_matches(problem, output)


@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "per_expert"])
def test_rows_without_an_adapter_are_untouched_even_when_their_input_is_infinite(gathered):
    """A base-model row's output stays as it was whatever its input holds: the torch body selects
    such rows away rather than adding their 0 x inf = NaN."""
    problem = make_problem(gathered=gathered, contract_in=True, tokens=8, seed=7)
    rows = problem.output.reshape(problem.x.shape[0] * (1 if gathered else problem.x.shape[1]), -1).shape[0]
    slots = experts_row_slots(rows, problem.tiles, problem.interleave, problem.request_slots,
                              problem.request_cum_weights)
    base_rows = (slots < 0).nonzero().flatten()
    assert base_rows.numel() > 0 and (slots >= 1).any()
    flat_x = problem.x.reshape(rows, -1)
    flat_x[base_rows] = float("inf")
    output = problem.output.clone()
    lora_experts_add_torch(*problem.args(output))
    flat_out, before = output.reshape(rows, -1), problem.output.reshape(rows, -1)
    assert torch.equal(flat_out[base_rows], before[base_rows])
    assert torch.isfinite(flat_out[slots >= 1]).all()


def test_choose_expert_config_per_row_at_decode_grouped_beyond():
    assert choose_expert_config(8, True, 2048, 16).block_m == 1
    grouped = choose_expert_config(16384, True, 2048, 16)
    assert grouped.block_m > 1 and grouped.sort
    assert not choose_expert_config(16384, False, 2048, 16).sort  # per-expert rows come in runs already
    for rows in (8, 128, 512, 16384):
        config = choose_expert_config(rows, True, 768, 16)
        assert config.k_chunk % config.block_k == 0


def test_op_cpu_runs_the_torch_body_and_passes_opcheck():
    problem = make_problem(gathered=True, contract_in=False, tokens=6, interleave=2, seed=42)
    problem.lora_a.nan_to_num_(0.0)  # opcheck compares against reruns: keep its own checks free of NaN noise
    problem.lora_b.nan_to_num_(0.0)
    output = problem.output.clone()
    torch.ops.mmlora.lora_experts_add_(*problem.args(output))
    assert_matches(problem, output)
    torch.library.opcheck(lora_experts_add_, problem.args(problem.output.clone()))


# ----------------------------------------------------------------------------------------------
# GPU: the op itself (Triton on CUDA tensors), larger shapes, and CUDA-graph replay.
# ----------------------------------------------------------------------------------------------

GPU_CASES = [
    # form, contract_in, tokens, interleave (top-k), dtype
    ("gathered", True, 1, 8, torch.bfloat16),
    ("gathered", False, 16, 8, torch.bfloat16),
    ("gathered", True, 64, 8, torch.float32),
    ("gathered", True, 600, 8, torch.bfloat16),
    ("per_expert", False, 3, 1, torch.bfloat16),
    ("per_expert", True, 300, 1, torch.float32),
]


@gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: f"{case[0]}-{case[1]}-{case[2]}-{str(case[4])[6:]}")
def test_op_matches_reference_on_gpu(case):
    form, contract_in, tokens, interleave, dtype = case
    problem = make_problem(gathered=form == "gathered", contract_in=contract_in, tokens=tokens,
                           tiles=16 if form == "per_expert" else 1, interleave=interleave, experts=16,
                           in_features=256, out_features=192, num_slots=9, requests=min(tokens + 2, 40), dtype=dtype,
                           seed=GPU_CASES.index(case), device="cuda")
    output = problem.output.clone()
    torch.ops.mmlora.lora_experts_add_(*problem.args(output))
    assert_matches(problem, output)


@gpu
@pytest.mark.parametrize("tokens", [2, 64], ids=["per_row", "sorted"])
def test_op_replays_in_a_cuda_graph_with_new_slots_routing_and_weights(tokens):
    """Captured once, replayed with refilled slot tables, new expert ids and new adapter
    weights: equal to the reference each time (nothing read back to the host at capture)."""
    problem = make_problem(gathered=True, contract_in=True, tokens=tokens, interleave=4, experts=8,
                           in_features=128, out_features=96, num_slots=6, requests=4, seed=50, device="cuda")
    base = problem.output.clone()
    output = base.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lora_experts_add_(*problem.args(output))  # compile and allocator warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_experts_add_(*problem.args(output))
    generator = torch.Generator(device="cuda").manual_seed(51)
    for new_slots in ([2, 1, -1, 3], [3, 3, 1, 0], [-1, 2, 2, 1]):
        problem.request_slots.copy_(torch.tensor(new_slots, dtype=torch.int32))
        problem.expert_ids.random_(0, 8, generator=generator)
        rank_mask = torch.arange(problem.lora_a.shape[2], device="cuda")[None, :] < problem.slot_ranks[:, None]
        fresh_a = torch.randn(problem.lora_a.shape, device="cuda", generator=generator)
        fresh_b = torch.randn(problem.lora_b.shape, device="cuda", generator=generator)
        problem.lora_a.copy_(torch.where(rank_mask[:, None, :, None], fresh_a, float("nan")))
        problem.lora_b.copy_(torch.where(rank_mask[:, None, None, :], fresh_b, float("nan")))
        output.copy_(base)
        graph.replay()
        assert_matches(problem, output)
