"""Bound calls (`kernels/bound_calls.py`, `kernels/direct_launch.py`): a call whose key was seen
before hands its tensors to the launches Triton's path made for the first such call, and gets the
same result; a call that differs in anything a kernel is specialised on goes through Triton's path.

CPU: compiled kernels cannot run, so each kernel's compiled form is stood in for by one that runs
the same kernel under the interpreter with the arguments the launcher receives, in the order the
launcher receives them (what a real `CompiledKernel.run` gets). The stand-in also holds a replay to
what the compiled kernel was specialised for: every non-tensor argument equal, every tensor of the
same dtype and 16-byte alignment. GPU (`-m gpu`): the real thing.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from mmlora_fx.kernels import bound_calls, launch_config, tile_counters
from mmlora_fx.kernels import lora_add as lora_add_module
from mmlora_fx.kernels.direct_launch import DirectLaunch
from mmlora_fx.kernels.launch_config import cdiv, tile_bound
from mmlora_fx.kernels.lora_add import BatchTables, launch
from mmlora_fx.kernels.tile_plan import build_tile_plan

from .problems import assert_matches, make_problem

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interpreter = pytest.mark.skipif(not INTERPRETING or HAS_CUDA, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")
KERNELS = ("_row_shrink_kernel", "_row_expand_kernel", "_shrink_kernel", "_expand_kernel")


def _specialised_on(values) -> list:
    """What a compiled kernel is specialised for, per argument: a tensor's dtype and 16-byte
    alignment, any other value itself."""
    return [(value.dtype, value.data_ptr() % 16 == 0) if isinstance(value, torch.Tensor) else value
            for value in values]


class _InterpretedCompiled:
    """A compiled kernel's stand-in: its launcher runs the interpreted kernel with the values it
    receives after the grid, stream and metadata, in signature order (constexprs included), once it
    has checked them against what the kernel was compiled for."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, kernel, grid, values: list, options: dict, launches: list):
        self.kernel, self.options, self.launches = kernel, options, launches
        self.grid, self.specialised = tuple(grid) + (1,) * (3 - len(grid)), _specialised_on(values)

    def run(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *values):
        assert (function, metadata, launch_metadata, enter, exit_) == ("function", "metadata", None, None, None)
        assert (grid_x, grid_y, grid_z) == self.grid and _specialised_on(values) == self.specialised, \
            "a replay ran a kernel compiled for other arguments"
        self.launches.append(("direct", self.kernel))
        names = list(inspect.signature(self.kernel.fn).parameters)
        self.kernel[(grid_x, grid_y, grid_z)](**dict(zip(names, values)), **self.options)


class _Counting:
    """A kernel whose `kernel[grid](...)` runs it interpreted, counts the launch and returns a
    compiled stand-in, as Triton's path returns the compiled kernel."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches, self.fn = kernel, launches, kernel.fn

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append(("triton", self.kernel))
            self.kernel[grid](*args, **kwargs)
            signature = inspect.signature(self.fn)
            bound = signature.bind(*args, **{name: value for name, value in kwargs.items() if name in signature.parameters})
            bound.apply_defaults()
            options = {name: value for name, value in kwargs.items() if name not in signature.parameters}
            return _InterpretedCompiled(self.kernel, grid, list(bound.arguments.values()), options, self.launches)
        return run


@pytest.fixture
def bound_on_cpu(monkeypatch):
    """`launch` binding its calls on the CPU, each kernel through the stand-ins; the launches list."""
    launches: list = []
    for name in KERNELS:
        monkeypatch.setattr(lora_add_module, name, _Counting(getattr(lora_add_module, name), launches))
    monkeypatch.setattr(bound_calls, "bindable", lambda inputs: True)
    monkeypatch.setattr(bound_calls, "_stream", lambda device: 0)
    bound_calls.forget()
    yield launches
    bound_calls.forget()


def _problem(rows_per_request: int, seed: int):
    return make_problem(pattern="mixed", requests=3, rows_per_request=rows_per_request, in_features=48,
                        out_features=(40, 24), num_slots=4, max_rank=8, dtype=torch.float32,
                        rows=3 * rows_per_request, seed=seed)


def _launch(problem, outputs, plan=None):
    launch(outputs, problem.x, problem.lora_a, problem.lora_b,
           BatchTables(problem.slot_ranks, problem.request_slots, problem.request_cum_weights, plan))


def _next_call(launches: list, problem, outputs=None, plan=None) -> list[str]:
    """How `problem`'s call launched its kernels ("triton" or "direct"), after checking its result
    against the reference."""
    launches.clear()
    outputs = problem.fresh_outputs() if outputs is None else outputs
    _launch(problem, outputs, plan)
    assert_matches(problem, outputs)
    return [how for how, _ in launches]


def _same_buffers(problem, first):
    """`problem` served by `first`'s slot buffers (a served group's, the same at every call)."""
    problem.lora_a, problem.lora_b, problem.slot_ranks = first.lora_a, first.lora_b, first.slot_ranks
    return problem


@interpreter
@pytest.mark.parametrize("rows_per_request", [1, 6], ids=["row path", "tile path"])
def test_a_call_with_a_seen_key_is_replayed_with_its_own_tensors_and_equals_the_reference(bound_on_cpu,
                                                                                          rows_per_request):
    first = _problem(rows_per_request, seed=0)
    _launch(first, outputs := first.fresh_outputs())
    assert_matches(first, outputs)
    assert [how for how, _ in bound_on_cpu] == ["triton", "triton"]
    # New rows, outputs and request tables (same sizes) over the same slot buffers: bound.
    second = _same_buffers(_problem(rows_per_request, seed=1), first)
    assert _next_call(bound_on_cpu, second) == ["direct", "direct"]


@pytest.fixture
def sums_on_cpu(monkeypatch):
    """The split sums reduced in the kernel, with a fresh counter pool on the CPU."""
    monkeypatch.setattr(launch_config, "SUMS_IN_KERNEL", True)
    monkeypatch.setattr(tile_counters, "_POOLS", {})
    tile_counters.make_pool(torch.device("cpu"))


def _split_problem(seed: int):
    """A tile-path call whose shrink splits K (300 inputs: several 128-wide steps)."""
    return make_problem(pattern="mixed", requests=3, rows_per_request=6, in_features=300, out_features=(40, 24),
                        num_slots=4, max_rank=8, dtype=torch.float32, rows=18, seed=seed)


@interpreter
def test_split_sums_in_the_kernel_keep_the_counter_span_their_first_call_claimed(bound_on_cpu, sums_on_cpu):
    # The call site's first call claims its counters from the device's pool; its replays take
    # the same span (a CUDA graph captures its address), which every call leaves at zero.
    first = _split_problem(0)
    config = launch_config.config_for_call(18, 300, 8, 4, torch.float32, 3)
    assert config.sums_in_kernel and cdiv(300, config.k_chunk) > 1  # several splits meet in the kernel
    assert _next_call(bound_on_cpu, first) == ["triton", "triton"]
    pool, claimed = tile_counters._POOLS[first.x.device]
    assert claimed >= tile_bound(18, 4, config.block_m)
    (scratch_sizes,) = [bound[1] for bound in bound_calls._BOUND.values()]
    assert not [entry for entry in scratch_sizes if isinstance(entry, tuple) and entry[2]]  # no buffer zeroed a call
    for seed in (1, 2):
        assert _next_call(bound_on_cpu, _same_buffers(_split_problem(seed), first)) == ["direct", "direct"]
    assert tile_counters._POOLS[first.x.device][1] == claimed  # the replays claimed nothing more
    assert not pool.any()
    pool.fill_(1)  # the span spoilt: a replay that counts on it goes wrong
    with pytest.raises(AssertionError):
        _next_call(bound_on_cpu, _same_buffers(_split_problem(3), first))


@interpreter
def test_a_call_that_does_not_bind_gives_its_counter_span_back(bound_on_cpu, sums_on_cpu):
    problem = _split_problem(0)
    # The same output in two roles (both siblings add into it): such a call is never bound.
    output = problem.fresh_outputs()[0]
    launch([output, output], problem.x, problem.lora_a, [problem.lora_b[0], problem.lora_b[0]],
           BatchTables(problem.slot_ranks, problem.request_slots, problem.request_cum_weights))
    assert [how for how, _ in bound_on_cpu] == ["triton", "triton"]
    assert not bound_calls._BOUND and tile_counters._POOLS[torch.device("cpu")][1] == 0


@interpreter
def test_tables_in_other_dtypes_than_the_kernels_are_bound_too(bound_on_cpu):
    first = _problem(6, seed=0)
    first.request_slots, first.slot_ranks = first.request_slots.long(), [ranks.long() for ranks in first.slot_ranks]
    _launch(first, first.fresh_outputs())
    second = _same_buffers(_problem(6, seed=1), first)
    second.request_slots = second.request_slots.long()
    assert _next_call(bound_on_cpu, second) == ["direct", "direct"]


@interpreter
def test_other_slot_buffers_or_rows_take_tritons_path_and_bind_anew(bound_on_cpu):
    first = _problem(6, seed=0)
    _launch(first, first.fresh_outputs())
    other_buffers = _problem(6, seed=0)  # equal values, other tensors: identity is the key
    assert _next_call(bound_on_cpu, other_buffers) == ["triton", "triton"]
    fewer_rows = _same_buffers(_problem(6, seed=0), first)
    fewer_rows.x, fewer_rows.outputs = fewer_rows.x[:-2].clone(), [output[:-2].clone() for output in fewer_rows.outputs]
    fewer_rows.request_cum_weights = fewer_rows.request_cum_weights.clamp(max=fewer_rows.x.shape[0])
    assert _next_call(bound_on_cpu, fewer_rows) == ["triton", "triton"]


def _varied(what: str, first):
    """A call over `first`'s slot buffers that differs from it in `what` alone (besides fresh
    rows, outputs and tables), and the plan to pass with it."""
    second = _same_buffers(_problem(6, seed=1), first)
    plan = None
    if what == "more request entries":  # the tables padded: another request count
        second.request_slots = torch.cat([second.request_slots, torch.tensor([-1], dtype=torch.int32)])
        second.request_cum_weights = torch.cat([second.request_cum_weights, second.request_cum_weights[-1:]])
    elif what == "other rank tables":  # equal values, other tensors: identity is the key
        second.slot_ranks = [ranks.clone() for ranks in first.slot_ranks]
    elif what == "a row stride":  # the rows as a view of wider rows
        wide = torch.randn(second.x.shape[0], second.x.shape[1] + 8)
        wide[:, :second.x.shape[1]] = second.x
        second.x = wide[:, :second.x.shape[1]]
    elif what == "a tile plan":
        slots = second.request_slots.clamp(min=-1)
        second.request_cum_weights = torch.arange(second.request_slots.numel() + 1) * 6  # rows == total weight
        plan = build_tile_plan(slots.tolist(), second.request_cum_weights.tolist())
    return second, plan


@interpreter
@pytest.mark.parametrize("what", ["more request entries", "other rank tables", "a row stride", "an output's alignment",
                                  "a tile plan"])
def test_a_call_that_differs_in_what_a_kernel_is_specialised_on_takes_tritons_path(bound_on_cpu, what):
    first = _problem(6, seed=0)
    _launch(first, first.fresh_outputs())
    second, plan = _varied(what, first)
    outputs = second.fresh_outputs()
    if what == "an output's alignment":  # the rows one element into their storage
        outputs = [torch.cat([torch.zeros(1), output.flatten()])[1:].view_as(output) for output in outputs]
    assert _next_call(bound_on_cpu, second, outputs, plan) == ["triton", "triton"]


@interpreter
def test_a_first_call_with_one_output_in_two_roles_is_not_bound(bound_on_cpu):
    first = make_problem(pattern="mixed", requests=3, rows_per_request=6, in_features=48, out_features=(24, 24),
                         num_slots=4, max_rank=8, dtype=torch.float32, rows=18, seed=0)
    shared = torch.zeros(18, 24)
    _launch(first, [shared, shared])  # both siblings add into one tensor
    second = make_problem(pattern="mixed", requests=3, rows_per_request=6, in_features=48, out_features=(24, 24),
                          num_slots=4, max_rank=8, dtype=torch.float32, rows=18, seed=1)
    assert _next_call(bound_on_cpu, _same_buffers(second, first)) == ["triton", "triton"]


@interpreter
def test_forgetting_the_bindings_sends_the_next_call_through_tritons_path(bound_on_cpu):
    first = _problem(6, seed=0)
    _launch(first, first.fresh_outputs())
    bound_calls.forget()
    assert _next_call(bound_on_cpu, first) == ["triton", "triton"]


def test_a_launch_with_a_tensor_the_caller_does_not_pass_again_is_not_bound():
    def kernel(x, y, n, BLOCK):  # noqa: N803 - a constexpr's name, as in the kernels
        pass

    class Kernel:
        fn = staticmethod(kernel)

    class Compiled:
        function, packed_metadata = "f", "m"

        def run(self, *args):
            self.args = args

    x, y = torch.zeros(2), torch.zeros(3)
    compiled = Compiled()
    assert DirectLaunch.bind(Kernel(), (4,), (x, y, 7), {"BLOCK": 16, "num_warps": 4}, compiled, [x]) is None
    bound = DirectLaunch.bind(Kernel(), (4,), (x, y, 7), {"BLOCK": 16, "num_warps": 4}, compiled, [y, x, y])
    new_x, new_y = torch.ones(2), torch.ones(3)
    bound.launch(11, [new_y, new_x, new_y])
    assert compiled.args[:9] == (4, 1, 1, 11, "f", "m", None, None, None)
    assert compiled.args[9] is new_x and compiled.args[10] is new_y and compiled.args[11:] == (7, 16)
    assert DirectLaunch.bind(Kernel(), (4,), (x, y, 7), {"BLOCK": 16}, None, [x, y]) is None  # stubbed kernel


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("rows_per_request", [1, 40], ids=["row path", "tile path"])
def test_bound_calls_on_the_gpu_equal_the_reference_call_after_call(rows_per_request):
    bound_calls.forget()
    first = make_problem(pattern="mixed", requests=3, rows_per_request=rows_per_request, in_features=512,
                         out_features=(512, 128), num_slots=8, max_rank=16, dtype=torch.bfloat16, device="cuda",
                         rows=3 * rows_per_request, seed=0)
    slot_buffers = (first.lora_a, first.lora_b, first.slot_ranks)
    for seed in range(4):
        problem = make_problem(pattern="mixed", requests=3, rows_per_request=rows_per_request, in_features=512,
                               out_features=(512, 128), num_slots=8, max_rank=16, dtype=torch.bfloat16,
                               device="cuda", rows=3 * rows_per_request, seed=seed)
        problem.lora_a, problem.lora_b, problem.slot_ranks = slot_buffers
        _launch(problem, outputs := problem.fresh_outputs())
        torch.cuda.synchronize()
        assert_matches(problem, outputs)
    assert len(bound_calls._BOUND) == 1  # one key, bound once and replayed three times
