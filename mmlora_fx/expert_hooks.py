"""Expert LoRA outside the graphs: the eager path of 3D expert weights.

A linear's eager LoRA is a forward hook on the linear; an expert matmul is no module of its own
(`torch.bmm` inside the experts' forward), so its eager path watches the MoE block instead: while
a block that holds a served expert weight runs eagerly inside a served call, a torch-function mode
follows which token each row holds from the block's input (its token rows) with the graph walk's
rule table (`passes/row_layout.py`: the layouts `repeat` and `repeat_interleave` make, the ops
that keep rows in place), and adds each expert matmul's LoRA (`LoRARuntime.apply_experts`) right
after it. A served expert weight read any other way there (an expert loop's `W[e]`, a matmul
whose rows' tokens were not followed) raises `CaptureError` naming it: never a silent base run.
While dynamo traces, the hooks do nothing (the graph's own op serves the matmul).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from .errors import CaptureError
from .linear_index import EXPERTS
from .lora_op import REGISTRY
from .passes.row_layout import TOKEN_ROWS, canonical_name, layout_made_by, row_preserving

__all__ = ["ExpertRowsMode", "add_expert_hooks"]


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


class ExpertRowsMode(TorchFunctionMode):
    """Follows row layouts through one MoE block's eager forward and serves its expert matmuls."""

    def __init__(self, runtime, weights: dict[int, str], block: str):
        super().__init__()
        self.runtime = runtime
        self.weights = weights  # id of each served 3D weight -> its name
        self.block = block
        self.layouts: dict[int, tuple[torch.Tensor, object]] = {}  # id -> (tensor kept alive, layout)
        self.gathered: dict[int, tuple[torch.Tensor, str, torch.Tensor]] = {}  # W[ids] -> (copy, weight, ids)

    def tag(self, tensor, layout) -> None:
        if isinstance(tensor, torch.Tensor) and layout is not None:
            self.layouts[id(tensor)] = (tensor, layout)

    def layout_of(self, tensor):
        entry = self.layouts.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():
            return func(*args, **kwargs)
        name = canonical_name(func)
        served = [arg for arg in args if isinstance(arg, torch.Tensor) and id(arg) in self.weights]
        if name == "getitem" and served and isinstance(args[1], torch.Tensor) and args[1].dim() == 1 \
                and not args[1].dtype.is_floating_point and args[1].dtype != torch.bool:
            result = func(*args, **kwargs)
            self.gathered[id(result)] = (result, self.weights[id(args[0])], args[1])
            return result
        result = func(*args, **kwargs)
        if isinstance(result, torch.Size) or not isinstance(result, (torch.Tensor, tuple, list)):
            return result  # a size, a dtype: reads no values
        if name == "bmm":
            self._serve_bmm(args, result)
            return result
        if served:
            raise CaptureError(
                f"served expert weight {self.weights[id(served[0])]!r} is read by {name} in the eager forward of "
                f"{self.block!r}, not by a batched matmul whose rows' tokens are known: it would run without its LoRA "
                "(an expert loop over data-dependent token indices is not served; use a traceable experts "
                "implementation such as config._experts_implementation='batched_mm')")
        self._propagate(name, args, kwargs, result)
        return result

    def _propagate(self, name, args, kwargs, result) -> None:
        sources = [arg for arg in args if isinstance(arg, torch.Tensor)]
        made = layout_made_by(name, tuple(args), kwargs)
        if made is not None and sources and self.layout_of(sources[0]) == TOKEN_ROWS:
            self.tag(result, made)
            return
        pieces = list(result) if isinstance(result, (tuple, list)) else [result]
        if not pieces or not isinstance(pieces[0], torch.Tensor):
            return
        full = [arg for arg in sources if row_preserving(name, args, kwargs, _shape(arg), _shape(pieces[0]))]
        if name == "getitem" and not (isinstance(args[1], tuple) and all(item is Ellipsis or item == slice(None)
                                                                          for item in args[1][:-1])):
            full = []
        layouts = {self.layout_of(arg) for arg in full}
        if full and len(layouts) == 1 and None not in layouts:
            for piece in pieces:
                self.tag(piece, next(iter(layouts)))

    def _serve_bmm(self, args, result) -> None:
        left, right = args[0], args[1]
        for weight_side, rows, contracted in ((right, left, 1), (left, right, 2)):
            gathered = self.gathered.get(id(weight_side))
            if id(weight_side) in self.weights and contracted == 1:
                module, ids = self.weights[id(weight_side)], None
            elif gathered is not None and gathered[0] is weight_side:
                module, ids = gathered[1], gathered[2]
            else:
                continue
            layout = self.layout_of(rows)
            if layout is None or (ids is None and (layout.tiles != weight_side.shape[0] or layout.interleave != 1)):
                raise CaptureError(
                    f"served expert weight {module!r} is multiplied in the eager forward of {self.block!r} with rows "
                    f"whose tokens could not be followed from the block's input (layout {layout}): which request "
                    "each row belongs to cannot be told")
            self.runtime.apply_experts(result, rows, module, ids, contracted, layout.tiles, layout.interleave)
            self.tag(result, layout)
            return
        if any(id(arg) in self.weights for arg in (left, right)):
            raise CaptureError(f"a served expert weight is multiplied in an unrecognised form in {self.block!r}")


def add_expert_hooks(runtime, model, served: dict[str, torch.Tensor]) -> None:
    """Hooks on each MoE block (the parent of the module holding a served 3D weight)."""
    if not served:
        return
    weights = {id(weight): name for name, weight in served.items()}
    owners = {name.rpartition(".")[0] for name in served}
    blocks = {owner.rpartition(".")[0] for owner in owners}
    for name, module in model.named_modules():
        if name in blocks and not getattr(module, "_mmlora_expert_hooked", False):
            # The hook finds its runtime from a served weight at each call, as the linears' does: a
            # model compiled again has a new runtime, and the first one's would no longer be in a call.
            weight = next(tensor for served_name, tensor in served.items() if served_name.startswith(name + "."))
            module.register_forward_pre_hook(_enter(weight, weights, name), with_kwargs=True)
            # always_call: the mode is left even when the forward raises (an expert loop refused, say).
            module.register_forward_hook(_leave, always_call=True)
            module._mmlora_expert_hooked = True


def _enter(weight, weights, block):
    def enter(module, args, kwargs):
        if torch.compiler.is_compiling():
            return None
        runtime, _ = REGISTRY.resolve(weight, EXPERTS)
        if not runtime.in_call:
            return None
        mode = ExpertRowsMode(runtime, weights, block)
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        mode.tag(hidden, TOKEN_ROWS)
        module._mmlora_expert_modes = getattr(module, "_mmlora_expert_modes", []) + [mode]
        mode.__enter__()
        return None

    return enter


def _leave(module, args, output):
    modes = getattr(module, "_mmlora_expert_modes", None)
    if modes and not torch.compiler.is_compiling():
        modes.pop().__exit__(None, None, None)
    return output
