"""Random inputs for the `lora_add_` tests: fresh random data, never zeros, poisoned outputs.

A problem is a batch of requests (weights, adapter slots) over `rows` rows, a group of 1 to 3
sibling linears sharing `x`, and slot-major LoRA buffers whose padding past each slot's rank
holds garbage (not zeros), so that a kernel reading padding gets a wrong answer.
"""

from __future__ import annotations

import dataclasses

import torch

from mmlora_fx.kernels.reference import lora_add_reference, row_slots

# Request patterns the tests run: name -> (weights, slots) for `requests` requests over `slots`.
PATTERNS = (
    "base_only",  # every request on the base model
    "one_adapter",  # every request on one slot
    "every_row_different",  # decode: one row per request, a different slot each (cycling)
    "long_segments",  # a few requests with many rows each
    "zero_weight_requests",  # some requests own no rows
    "mixed",  # random slots (-1 included), random weights
    "total_zero",  # every weight 0: nothing to do
)


@dataclasses.dataclass
class Problem:
    outputs: list[torch.Tensor]
    x: torch.Tensor
    lora_a: list[torch.Tensor]
    lora_b: list[torch.Tensor]
    slot_ranks: list[torch.Tensor]
    request_slots: torch.Tensor
    request_cum_weights: torch.Tensor

    def args(self, outputs: list[torch.Tensor] | None = None) -> tuple:
        """The op's arguments, with `outputs` in place of the problem's own if given."""
        return (outputs if outputs is not None else self.outputs, self.x, self.lora_a, self.lora_b,
                self.slot_ranks, self.request_slots, self.request_cum_weights)

    def fresh_outputs(self) -> list[torch.Tensor]:
        return [output.clone() for output in self.outputs]


def request_table(pattern: str, requests: int, rows_per_request: int, num_slots: int,
                  generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Per-request weights and slots of `pattern` (weights in rows when one row per weight)."""
    randint = lambda low, high, n: torch.randint(low, high, (n,), generator=generator).tolist()  # noqa: E731
    weights = [rows_per_request] * requests
    if pattern == "base_only":
        slots = [-1] * requests
    elif pattern == "one_adapter":
        slots = [randint(0, num_slots, 1)[0]] * requests
    elif pattern == "every_row_different":
        offset = randint(0, num_slots, 1)[0]
        slots = [(offset + r) % num_slots for r in range(requests)]
    elif pattern == "long_segments":
        slots = randint(0, num_slots, requests)
    elif pattern == "zero_weight_requests":
        slots = randint(-1, num_slots, requests)
        weights = [w if r % 3 else 0 for r, w in enumerate(randint(1, 2 * rows_per_request + 1, requests))]
    elif pattern == "mixed":
        slots = randint(-1, num_slots, requests)
        weights = randint(0, 2 * rows_per_request + 1, requests)
    elif pattern == "total_zero":
        slots = randint(0, num_slots, requests)
        weights = [0] * requests
    else:
        raise ValueError(pattern)
    return weights, slots


def make_problem(
    *,
    pattern: str,
    requests: int,
    rows_per_request: int,
    in_features: int,
    out_features: tuple[int, ...],
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: str = "cpu",
    max_requests: int | None = None,
    rows: int | None = None,
    ranks: list[list[int]] | None = None,
    seed: int = 0,
) -> Problem:
    """A random problem; `rows` defaults to the weights' sum (one row per unit of weight).

    Slot ranks are random in [0, max_rank] (with 0 and max_rank present when there are enough
    slots) unless `ranks` gives them per sibling. `max_requests` pads the request tables.
    """
    generator = torch.Generator().manual_seed(seed)
    weights, slots = request_table(pattern, requests, rows_per_request, num_slots, generator)
    max_requests = max_requests or requests
    padded_slots = slots + [int(torch.randint(-1, num_slots, (1,), generator=generator))] * (max_requests - requests)
    cum = [0]
    for weight in weights:
        cum.append(cum[-1] + weight)
    cum += [cum[-1]] * (max_requests - requests)
    if rows is None:  # one row per unit of weight, or some rows anyway when the total is 0
        rows = cum[-1] or requests * rows_per_request

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    if ranks is None:
        ranks = []
        for _ in out_features:
            chosen = torch.randint(0, max_rank + 1, (num_slots,), generator=generator).tolist()
            if num_slots >= 3:
                chosen[0], chosen[1] = max_rank, 0
            ranks.append(chosen)
    x = randn(rows, in_features)
    lora_a = [randn(num_slots, max_rank, in_features, scale=in_features ** -0.5) for _ in out_features]
    lora_b = [randn(num_slots, out, max_rank, scale=max(1, max_rank) ** -0.5) for out in out_features]
    outputs = [randn(rows, out) for out in out_features]
    return Problem(
        outputs=[tensor.to(device) for tensor in outputs],
        x=x.to(device),
        lora_a=[tensor.to(device) for tensor in lora_a],
        lora_b=[tensor.to(device) for tensor in lora_b],
        slot_ranks=[torch.tensor(r, dtype=torch.int32, device=device) for r in ranks],
        request_slots=torch.tensor(padded_slots, dtype=torch.int32, device=device),
        request_cum_weights=torch.tensor(cum, dtype=torch.int64, device=device),
    )


def expected_outputs(problem: Problem) -> list[torch.Tensor]:
    """The reference's result on the CPU, from float64 copies (it multiplies in float32)."""
    outputs = [output.detach().cpu().double() for output in problem.outputs]
    lora_add_reference(
        outputs,
        problem.x.cpu().double(),
        [a.cpu().double() for a in problem.lora_a],
        [b.cpu().double() for b in problem.lora_b],
        [r.cpu() for r in problem.slot_ranks],
        problem.request_slots.cpu(),
        problem.request_cum_weights.cpu(),
    )
    return outputs


TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_matches(problem: Problem, actual: list[torch.Tensor]) -> None:
    """`actual` equals the reference within the dtype's tolerance, and every row the
    batch does not adapt (slot -1, rank 0) is bit-for-bit the poison it started as."""
    expected = expected_outputs(problem)
    rows = problem.x.reshape(-1, problem.x.shape[-1]).shape[0]
    slots = row_slots(problem.request_slots.cpu(), problem.request_cum_weights.cpu(), rows)
    tolerance = TOLERANCE[problem.x.dtype]
    for j, (got, want, poison) in enumerate(zip(actual, expected, problem.outputs)):
        got = got.detach().cpu().reshape(-1, got.shape[-1])
        want = want.reshape(got.shape)
        poison = poison.reshape(got.shape)
        ranks = problem.slot_ranks[j].cpu().to(torch.int64)
        untouched = (slots < 0) | (ranks[slots.clamp(min=0)] == 0)
        assert torch.equal(got[untouched], poison.cpu()[untouched]), f"output {j}: a row without LoRA changed"
        got64 = got.double()
        assert torch.isfinite(got64).all(), f"output {j}: non-finite values"
        error = (got64 - want).norm() / want.norm().clamp(min=1e-12)
        assert error <= tolerance, f"output {j}: relative error {error:.2e} > {tolerance:.0e}"
        worst = ((got64 - want).abs() / (want.abs() + 1.0)).max() if want.numel() else 0.0
        assert worst <= 8 * tolerance, f"output {j}: worst element error {worst:.2e}"
        # The delta alone must be right too: the poison must not hide a missing update. The
        # output is stored in its dtype, so the delta is known only to the rounding of the exact
        # result in that dtype: where the delta is small beside the output (bf16, one row, a
        # low-rank slot: 0.14 of the delta on 2026-12-06), that rounding is allowed for too.
        delta_error = ((got64 - poison.cpu().double()) - (want - poison.cpu().double())).norm()
        delta_norm = (want - poison.cpu().double()).norm()
        rounding = (want.to(got.dtype).double() - want).norm()
        if delta_norm > 0:
            assert delta_error <= 4 * tolerance * delta_norm + 2 * rounding, \
                f"output {j}: delta error {delta_error / delta_norm:.2e} (the output's rounding alone: {rounding / delta_norm:.2e})"


def in_one_slab(factors: list[torch.Tensor], gap: int = 3) -> list[torch.Tensor]:
    """`factors` (each `[slots, ...]`, one slot count) copied into one slot-major slab `[slots,
    total]`, as the adapter manager lays its buffers out, and returned as its views: slot `s` of
    every factor lies in the row `slab[s]`, so their slot stride is `total`, not their own slot's
    size. `gap` NaN elements sit after each factor's part of a row: a kernel reading a factor with
    the wrong slot stride meets them (or another factor's values)."""
    slots = factors[0].shape[0]
    sizes = [factor[0].numel() for factor in factors]
    slab = torch.full((slots, sum(sizes) + gap * len(sizes)), float("nan"), dtype=factors[0].dtype,
                      device=factors[0].device)
    views, offset = [], 0
    for factor, size in zip(factors, sizes):
        view = slab[:, offset:offset + size].view(factor.shape)
        view.copy_(factor)
        views.append(view)
        offset += size + gap
    return views


def slab_problem(problem: Problem, gap: int = 3) -> Problem:
    """`problem` with every sibling's A and B views of one slab (`in_one_slab`): A0, B0, A1, B1..."""
    views = in_one_slab([factor for pair in zip(problem.lora_a, problem.lora_b) for factor in pair], gap)
    assert views[0].stride(0) != views[0][0].numel()
    return dataclasses.replace(problem, lora_a=views[0::2], lora_b=views[1::2])
