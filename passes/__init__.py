"""FX passes of mmlora_fx: ownership, partition labels, and the LoRA rewrite."""

from .ownership import LinearCall, ResolveOwners, is_linear_call, parse_module_path
from .partition import LabelPartitions, partition_of

__all__ = ["LinearCall", "ResolveOwners", "LabelPartitions", "is_linear_call", "parse_module_path", "partition_of"]
