"""LoRA on bare parameters (`x @ W`) in code that runs outside the compiled graphs.

A served linear gets its LoRA outside the graphs from a forward hook that sees its input and
output. A bare parameter has no forward of its own: the module holding it multiplies by it
somewhere inside its forward (Gemma3's projector: `torch.matmul(normed, W)`), with an input no
hook sees. So while the holding module runs eagerly inside a served call, a torch function mode
watches its matmuls and adds the LoRA delta to the product of each that multiplies by a served
parameter, with the same runtime op as the graphs (`LoRARuntime.apply`, which reads the rows'
owners from their shape).

Under dynamo the hooks return at once (`torch.compiler.is_compiling()`): the graph's own op
serves the parameter, once. Like the linears' hook, this code is kept off dynamo's frames
(`never_compile`): traced as a frame of its own it would find `is_compiling()` true and drop the
LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import CaptureError
from .lora_op import REGISTRY

__all__ = ["add_parameter_hooks", "never_compile"]

# `torch.matmul(x, W)`, `x.matmul(W)` and `x @ W`.
_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class _ParameterLoRAMode(TorchFunctionMode):
    """Adds each served parameter's LoRA delta to the products `x @ W` made while it is active."""

    def __init__(self, runtime, parameters: Mapping[int, str]):
        super().__init__()
        self.runtime = runtime
        self.parameters = parameters  # id of the parameter -> its name (`module.parameter`)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        served_product = func in _MATMULS and len(args) == 2 and not kwargs and id(args[1]) in self.parameters
        if not served_product and getattr(func, "__name__", "") not in _QUERIES:
            used = [self.parameters[id(arg)] for arg in _tensors(args, kwargs) if id(arg) in self.parameters]
            if used:
                # PEFT's parametrization changes every use of W; only `x @ W` gets its LoRA here.
                raise CaptureError(
                    f"served parameter {used[0]!r} is used by {getattr(func, '__name__', func)} in code run outside "
                    "the compiled graphs, not as the right side of x @ W: its LoRA would be left out there (PEFT "
                    "applies it to every use). Leave it out of the adapter's target_parameters")
        result = func(*args, **kwargs)
        if served_product:
            self.runtime.apply([result], args[0], [self.parameters[id(args[1])]])
        return result


# What may look at a served parameter without using its values.
_QUERIES = {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "__len__"}


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, torch.Tensor))
        elif isinstance(value, torch.Tensor):
            yield value


def _enter(module, args):
    if torch.compiler.is_compiling():
        return
    parameters = module._mmlora_parameter_lora
    # As the linears' hook does: the runtime is the weight's (a model compiled again has a new one).
    runtime, _ = REGISTRY.resolve(module._mmlora_parameter_tensor)
    if runtime.in_call:
        mode = _ParameterLoRAMode(runtime, parameters)
        mode.__enter__()
        module._mmlora_parameter_modes.append(mode)
    else:
        module._mmlora_parameter_modes.append(None)


def _leave(module, args, output):
    # Runs also when the forward raised (`always_call`), so no mode is left on the stack.
    if torch.compiler.is_compiling() or not module._mmlora_parameter_modes:
        return output
    mode = module._mmlora_parameter_modes.pop()
    if mode is not None:
        mode.__exit__(None, None, None)
    return output


def add_parameter_hooks(model: nn.Module, served: Mapping[str, torch.Tensor]) -> None:
    """Hooks on the modules holding the `served` parameters (`module.parameter` -> tensor)."""
    never_compile()
    by_module: dict[str, dict[int, str]] = {}
    for name, parameter in served.items():
        by_module.setdefault(name.rpartition(".")[0], {})[id(parameter)] = name
    for module_name, parameters in by_module.items():
        module = model.get_submodule(module_name)
        if getattr(module, "_mmlora_parameter_lora", None) is not None:
            # Compiled again: the hooks find the new runtime from the parameter, no second delta;
            # parameters this compile serves beyond the last one's join the watched set.
            module._mmlora_parameter_lora.update(parameters)
            continue
        module._mmlora_parameter_lora = parameters
        module._mmlora_parameter_tensor = next(tensor for tensor in served.values() if id(tensor) in parameters)
        module._mmlora_parameter_modes = []
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_leave, always_call=True)


def never_compile() -> None:
    """Keep the hooks and the mode off dynamo's frames (see the module's doc)."""
    from torch._dynamo.eval_frame import FrameAction, FrameExecStrategy, set_code_exec_strategy

    for code in (_enter.__code__, _leave.__code__, _ParameterLoRAMode.__torch_function__.__code__):
        set_code_exec_strategy(code, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
