"""FX passes of mmlora_fx: module ownership, partition labels, and the LoRA rewrite."""

from .coverage import CheckLoRACoverage
from .lora_rewrite import InsertLoRAOps, lora_ops
from .ownership import LinearCall, ResolveOwners, is_linear_call, parse_module_path
from .partition import LabelPartitions, partition_of

__all__ = ["CheckLoRACoverage", "LinearCall", "ResolveOwners", "LabelPartitions", "InsertLoRAOps", "is_linear_call",
           "lora_ops", "parse_module_path", "partition_of"]
