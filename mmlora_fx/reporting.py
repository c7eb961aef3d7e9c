"""What a user sees while a model compiles: progress, one summary of graph breaks, no wall of logs.

Dynamo logs a multi-line warning for every graph break it meets (Qwen2-VL's tower breaks on
`.tolist()` in every block). Those breaks are expected in upstream model code, and mmlora_fx
records every one of them anyway (`mmlora-fx inspect` lists them), so while a served call
compiles, dynamo's warnings are held back and one summary in our words goes to the `mmlora_fx`
logger instead. `compile(..., verbose=True)`, or `TORCH_LOGS` set in the environment, lets
dynamo's own messages through. Compiling shows a progress bar (graphs compiled so far) when
standard error is a terminal.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["logger", "quiet_dynamo", "CompileProgress", "graph_break_summary", "in_gemm_counts", "in_gemm_summary"]

logger = logging.getLogger("mmlora_fx")
if not logger.handlers:
    # Like transformers: a handler of our own, so the one-line summaries show without any logging
    # set-up; `logging.getLogger("mmlora_fx").setLevel(logging.WARNING)` silences them.
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("mmlora_fx: %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

class _HoldBackDynamo(logging.Filter):
    """Drops dynamo's and Inductor's records below ERROR while `depth` > 0.

    A filter on torch's handlers, switched by a counter, costs nothing per call; setting logger
    levels instead would clear the logging module's caches over torch's hundreds of loggers on
    every decode step."""

    def __init__(self):
        super().__init__()
        self.depth = 0

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.depth and record.levelno < logging.ERROR
                    and record.name.startswith(("torch._dynamo", "torch._inductor")))


_HOLD_BACK = _HoldBackDynamo()


@contextlib.contextmanager
def quiet_dynamo(verbose: bool = False) -> Iterator[None]:
    """Hold back dynamo's and Inductor's warnings (graph breaks) inside; errors still show."""
    if verbose or os.environ.get("TORCH_LOGS"):
        yield
        return
    # torch._logging gives "torch" and each of its components a handler of its own.
    for name in ("torch", "torch._dynamo", "torch._inductor"):
        for handler in logging.getLogger(name).handlers:
            if _HOLD_BACK not in handler.filters:
                handler.addFilter(_HOLD_BACK)
    _HOLD_BACK.depth += 1
    try:
        yield
    finally:
        _HOLD_BACK.depth -= 1


def graph_break_summary(records: Sequence, seconds: float, listed: int = 3) -> str:
    """One line on what a call compiled: how many graphs, how long, and where dynamo broke."""
    text = f"compiled {len(records)} graph{'s' if len(records) != 1 else ''} in {seconds:.0f} s"
    breaks = collections.Counter((_short_reason(record.graph_break.reason), record.graph_break.location)
                                 for record in records if record.graph_break is not None)
    if not breaks:
        return text + " with no graph break"
    places = [f"{count}x {reason} at {_short(location)}" if count > 1 else f"{reason} at {_short(location)}"
              for (reason, location), count in breaks.most_common(listed)]
    more = len(breaks) - listed
    return (f"{text}; dynamo broke the forward {sum(breaks.values())} times (expected in upstream model code): "
            f"{'; '.join(places)}{f'; and {more} more places' if more > 0 else ''}. "
            "`mmlora-fx inspect` lists them all; compile(..., verbose=True) shows dynamo's own messages")


def in_gemm_counts(records: Sequence) -> collections.Counter:
    """Linear calls of these graphs (`CompileRecord`s) by what the compile options made of them:
    `folded`, `stacked` (of which `shrink`: shrink and expand as graph ops; `expand`: the graph
    expand), `gemv` (the fused GEMV). The `as_strided` nodes that carry the same marks are not calls."""
    return collections.Counter(mark for record in records for node in record.graph_module.graph.nodes
                               for mark in ("folded", "stacked", "shrink", "expand", "gemv")
                               if node.meta.get("mmlora_lora", {}).get(mark) and node.op == "call_function"
                               and node.target is not torch.as_strided)


def in_gemm_summary(records: Sequence) -> str:
    """What the fold, the stack and the fused GEMV took in these graphs (`fold_min_rows`,
    `stack_max_rows`, `fused_gemv`): linear calls folded, stacked and fused, or why none was."""
    marks = in_gemm_counts(records)
    if not marks:
        return ("; no linear call was taken into its base GEMM: fold_min_rows, stack_max_rows and fused_gemv take "
                "only calls on rows known at compile time, in their range (compile with dynamic=False)")
    # The graph shrink's calls carry the stack's mark (they are in its range) but keep the base GEMM.
    in_graph = (f"; {marks['shrink']} linear calls with shrink and expand as graph ops (their GEMMs unchanged)"
                if marks["shrink"] else "")
    fused = f", {marks['gemv']} one-row calls as the fused GEMV" if marks["gemv"] else ""
    return (f"; LoRA inside the base GEMM: {marks['folded']} linear calls folded, "
            f"{marks['stacked'] - marks['shrink']} stacked{fused}{in_graph}")


def _short_reason(reason: str) -> str:
    """The operation dynamo could not trace, from its explanation: the first name in backquotes."""
    match = re.search(r"`([^`]+)`", reason)
    if match is None:
        return reason[:60]
    name = match.group(1)
    # `.item()` and `.tolist()` reach dynamo as this op.
    return "`.item()`" if name in ("aten._local_scalar_dense.default", "Tensor.item()") else f"`{name}`"


def _short(location: str) -> str:
    # "/.../site-packages/transformers/models/qwen2_vl/modeling_qwen2_vl.py:1160 in forward" -> "modeling_qwen2_vl.py:1160 in forward"
    return location.rsplit("/", 1)[-1] if location else "an unknown place"


class CompileProgress:
    """Counts the graphs a served call compiles; shows a bar while it does, a summary after."""

    def __init__(self):
        self._bar = None
        self._active = False

    def graph_compiled(self) -> None:
        if not self._active:
            return
        if self._bar is None:
            self._bar = tqdm(desc="mmlora_fx: compiling", unit=" graphs", disable=None, leave=False)
        self._bar.update()

    @contextlib.contextmanager
    def call(self, records: list, verbose: bool = False, in_gemm: bool = False) -> Iterator[None]:
        """Around one served call: quiet dynamo, show progress, then summarise what was compiled (and,
        `in_gemm`, what the fold and the stack took)."""
        before, started = len(records), time.perf_counter()
        self._active = True
        try:
            with quiet_dynamo(verbose):
                yield
        finally:
            self._active = False
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if len(records) > before:
                logger.info(graph_break_summary(records[before:], time.perf_counter() - started)
                            + (in_gemm_summary(records[before:]) if in_gemm else ""))
