"""Count CUDA-graph captures: swapping adapters must never make a compiled model record a new graph."""

from __future__ import annotations

import torch

__all__ = ["CudaGraphCaptures"]


class CudaGraphCaptures:
    """Within `with CudaGraphCaptures() as captures:`, `captures.count` is the number of CUDA graphs
    recorded in the process (Inductor's CUDA-graph trees record through `torch.cuda.CUDAGraph`).
    Without CUDA it counts nothing."""

    def __init__(self):
        self.count = 0
        self._original = None

    def __enter__(self) -> "CudaGraphCaptures":
        if torch.cuda.is_available():
            self._original = original = torch.cuda.CUDAGraph.capture_begin

            def counting(graph, *args, **kwargs):
                self.count += 1
                return original(graph, *args, **kwargs)

            torch.cuda.CUDAGraph.capture_begin = counting
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            torch.cuda.CUDAGraph.capture_begin = self._original
            self._original = None
