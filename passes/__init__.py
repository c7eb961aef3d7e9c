"""FX passes of mmlora_fx: module ownership, partition labels, and the LoRA rewrite.

`pipeline.run_passes` runs them in order; `meta` holds the `node.meta` keys and their readers.
Nothing here imports `mmlora_fx`: what a pass needs from it is passed in.
"""

from .coverage import CheckLoRACoverage, UncoveredLinearError
from .lora_rewrite import InsertLoRAOps, lora_ops
from .meta import (conv_of, embedding_of, experts_of, is_call_node, is_lora_op, linear_of, lora_of, owner_of,
                   owner_path_of, parameter_matmul_of, partition_of, target_of)
from .ownership import (ConvCall, EmbeddingCall, ExpertsCall, LinearCall, ParameterMatmulCall, ResolveOwners,
                        is_conv_call, is_embedding_call, is_linear_call, parse_module_path)
from .partition import LabelPartitions
from .pipeline import Labelling, Rewrite, run_passes
from .row_layout import RowLayout
from .targets import CONV, EMBEDDING, EXPERTS, LINEAR, PARAMETER_MATMUL, TargetKind

__all__ = ["CheckLoRACoverage", "UncoveredLinearError", "LinearCall", "EmbeddingCall", "ExpertsCall", "RowLayout",
           "EXPERTS", "experts_of", "ResolveOwners", "LabelPartitions",
           "InsertLoRAOps", "TargetKind", "LINEAR", "EMBEDDING", "PARAMETER_MATMUL", "ParameterMatmulCall", "CONV", "ConvCall",
           "is_conv_call", "conv_of", "Labelling", "Rewrite", "run_passes", "is_linear_call",
           "is_embedding_call", "lora_ops", "parse_module_path", "is_call_node", "is_lora_op", "linear_of", "embedding_of",
           "parameter_matmul_of", "target_of", "lora_of", "owner_of", "owner_path_of", "partition_of"]
