"""Bound launches (`kernels/direct_launch.py`): a call whose key was seen before hands its tensors
to the launches Triton's path made for the first such call, and gets the same result.

CPU: compiled kernels cannot run, so each kernel's compiled form is stood in for by one that runs
the same kernel under the interpreter with the arguments the launcher receives, in the order the
launcher receives them (what a real `CompiledKernel.run` gets). GPU (`-m gpu`): the real thing.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

from mmlora_fx.kernels import lora_add as lora_add_module
from mmlora_fx.kernels.direct_launch import DirectLaunch
from mmlora_fx.kernels.lora_add import BatchTables, launch

from .problems import assert_matches, make_problem

HAS_CUDA = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interpreter = pytest.mark.skipif(not INTERPRETING or HAS_CUDA, reason="needs TRITON_INTERPRET=1 on a CPU-only machine")
KERNELS = ("_row_shrink_kernel", "_row_expand_kernel", "_shrink_kernel", "_expand_kernel")


class _InterpretedCompiled:
    """A compiled kernel's stand-in: its launcher runs the interpreted kernel with the values it
    receives after the grid, stream and metadata, in signature order (constexprs included)."""

    function, packed_metadata = "function", "metadata"

    def __init__(self, kernel, options: dict, launches: list):
        self.kernel, self.options, self.launches = kernel, options, launches

    def run(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter, exit_, *values):
        assert (function, metadata, launch_metadata, enter, exit_) == ("function", "metadata", None, None, None)
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
            options = {name: value for name, value in kwargs.items() if name not in inspect.signature(self.fn).parameters}
            return _InterpretedCompiled(self.kernel, options, self.launches)
        return run


@pytest.fixture
def bound_on_cpu(monkeypatch):
    """`launch` binding its calls on the CPU, each kernel through the stand-ins; the launches list."""
    launches: list = []
    for name in KERNELS:
        monkeypatch.setattr(lora_add_module, name, _Counting(getattr(lora_add_module, name), launches))
    monkeypatch.setattr(lora_add_module, "_binds", lambda inputs: True)
    monkeypatch.setattr(lora_add_module, "_stream", lambda device: 0)
    lora_add_module.forget_direct_launches()
    yield launches
    lora_add_module.forget_direct_launches()


def _problem(rows_per_request: int, seed: int, problem_slots=None):
    problem = make_problem(pattern="mixed", requests=3, rows_per_request=rows_per_request, in_features=48,
                           out_features=(40, 24), num_slots=4, max_rank=8, dtype=torch.float32,
                           rows=3 * rows_per_request, seed=seed)
    if problem_slots is not None:  # the same slot buffers as another problem (a served group's)
        problem.lora_a, problem.lora_b, problem.slot_ranks = problem_slots
    return problem


def _launch(problem, outputs):
    launch(outputs, problem.x, problem.lora_a, problem.lora_b,
           BatchTables(problem.slot_ranks, problem.request_slots, problem.request_cum_weights))


@interpreter
@pytest.mark.parametrize("rows_per_request", [1, 6], ids=["row path", "tile path"])
def test_a_call_with_a_seen_key_is_replayed_with_its_own_tensors_and_equals_the_reference(bound_on_cpu,
                                                                                          rows_per_request):
    first = _problem(rows_per_request, seed=0)
    _launch(first, outputs := first.fresh_outputs())
    assert_matches(first, outputs)
    assert [how for how, _ in bound_on_cpu] == ["triton", "triton"]
    # New rows, outputs and request tables (same sizes) over the same slot buffers: bound.
    second = _problem(rows_per_request, seed=1, problem_slots=(first.lora_a, first.lora_b, first.slot_ranks))
    bound_on_cpu.clear()
    _launch(second, outputs := second.fresh_outputs())
    assert [how for how, _ in bound_on_cpu] == ["direct", "direct"]
    assert_matches(second, outputs)


@interpreter
def test_other_slot_buffers_or_rows_take_tritons_path_and_bind_anew(bound_on_cpu):
    first = _problem(6, seed=0)
    _launch(first, first.fresh_outputs())
    other_buffers = _problem(6, seed=0)  # equal values, other tensors: identity is the key
    bound_on_cpu.clear()
    _launch(other_buffers, outputs := other_buffers.fresh_outputs())
    assert [how for how, _ in bound_on_cpu] == ["triton", "triton"]
    assert_matches(other_buffers, outputs)
    fewer_rows = _problem(6, seed=0, problem_slots=(first.lora_a, first.lora_b, first.slot_ranks))
    fewer_rows.x, fewer_rows.outputs = fewer_rows.x[:-2].clone(), [output[:-2].clone() for output in fewer_rows.outputs]
    fewer_rows.request_cum_weights = fewer_rows.request_cum_weights.clamp(max=fewer_rows.x.shape[0])
    bound_on_cpu.clear()
    _launch(fewer_rows, outputs := fewer_rows.fresh_outputs())
    assert [how for how, _ in bound_on_cpu] == ["triton", "triton"]
    assert_matches(fewer_rows, outputs)


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
    lora_add_module.forget_direct_launches()
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
    assert len(lora_add_module._DIRECT) == 1  # one key, bound once and replayed three times
