"""The `node.meta` keys the passes write, and their readers: the contract, written once.

Every key is written by exactly one pass and read through the functions below, never as a raw
string elsewhere:

| key | written by | value |
| --- | --- | --- |
| `mmlora_owner_path` | `ResolveOwners` | (frame local, relative path) of the innermost module owning the node |
| `mmlora_owner` | `ResolveOwners` | that path made absolute, or None |
| `mmlora_linear` | `ResolveOwners` | a `LinearCall` on linear calls (module from the weight tensor) |
| `mmlora_embedding` | `ResolveOwners` | an `EmbeddingCall` on embedding lookups (module from the weight tensor) |
| `mmlora_experts` | `ResolveOwners` | an `ExpertsCall` on batched matmuls with a 3D expert weight (parameter from the weight tensor) |
| `mmlora_conv` | `ResolveOwners` | a `ConvCall` on convolutions (module from the weight tensor) |
| `mmlora_parameter_matmul` | `ResolveOwners` | a `ParameterMatmulCall` on `matmul(x, W)` with `W` a 2D parameter (named from the tensor) |
| `mmlora_partition` | `LabelPartitions` | the partition label of the node (`InsertLoRAOps` copies it onto its ops) |
| `mmlora_lora` | `InsertLoRAOps` | on a served target: `{"op": op node name, "group": sibling node names}`; also on the nodes that read its weight for it (an expert matmul's `W[ids]`) |
| `mmlora_lora_op` | `InsertLoRAOps` | True on each inserted LoRA op |

A node with `mmlora_owner_path` is a *call node* (call_function, call_method, call_module).
"""

from __future__ import annotations

from typing import Any

from torch import fx

__all__ = [
    "OWNER_PATH", "OWNER", "LINEAR", "EMBEDDING", "EXPERTS", "CONV", "PARAMETER_MATMUL", "PARTITION", "LORA", "LORA_OP",
    "is_call_node", "owner_path_of", "owner_of", "linear_of", "embedding_of", "experts_of", "conv_of", "parameter_matmul_of",
    "target_of", "partition_of", "lora_of", "is_lora_op", "is_to_local", "through_to_local", "example_value",
]

OWNER_PATH = "mmlora_owner_path"
OWNER = "mmlora_owner"
LINEAR = "mmlora_linear"
EMBEDDING = "mmlora_embedding"
EXPERTS = "mmlora_experts"
CONV = "mmlora_conv"
PARAMETER_MATMUL = "mmlora_parameter_matmul"
PARTITION = "mmlora_partition"
LORA = "mmlora_lora"
LORA_OP = "mmlora_lora_op"


def is_to_local(node: fx.Node) -> bool:
    """`w.to_local()`: a DTensor's local shard, a view of its storage. transformers' tensor-parallel
    layers call it on their weights inside the forward, so the linear reads the shard, not the
    parameter; the passes look through it to the parameter (#23)."""
    return node.op == "call_method" and node.target == "to_local"


def through_to_local(node: fx.Node) -> fx.Node:
    """The node `node` is the local shard of, if it is one (`is_to_local`); else `node`."""
    return node.args[0] if is_to_local(node) and isinstance(node.args[0], fx.Node) else node


def is_call_node(node: fx.Node) -> bool:
    """Whether `ResolveOwners` labelled `node` (a call node)."""
    return OWNER_PATH in node.meta


def owner_path_of(node: fx.Node) -> tuple[str | None, str] | None:
    return node.meta.get(OWNER_PATH)


def owner_of(node: fx.Node) -> str | None:
    """The absolute module owning `node`, or None where the frame local is not a known module."""
    return node.meta.get(OWNER)


def linear_of(node: fx.Node):
    """The `LinearCall` of a linear call node, or None."""
    return node.meta.get(LINEAR)


def embedding_of(node: fx.Node):
    """The `EmbeddingCall` of an embedding lookup node, or None."""
    return node.meta.get(EMBEDDING)


def experts_of(node: fx.Node):
    """The `ExpertsCall` of a batched matmul with a 3D expert weight, or None."""
    return node.meta.get(EXPERTS)


def conv_of(node: fx.Node):
    """The `ConvCall` of a convolution node, or None."""
    return node.meta.get(CONV)


def parameter_matmul_of(node: fx.Node):
    """The `ParameterMatmulCall` of a `matmul(x, W)` node with `W` a module's 2D parameter, or None."""
    return node.meta.get(PARAMETER_MATMUL)


def target_of(node: fx.Node):
    """The record of a node LoRA can target (a `LinearCall`, an `EmbeddingCall`, an `ExpertsCall`, a
    `ConvCall` or a `ParameterMatmulCall`), or None."""
    return (node.meta.get(LINEAR) or node.meta.get(EMBEDDING) or node.meta.get(EXPERTS) or node.meta.get(CONV)
            or node.meta.get(PARAMETER_MATMUL))


def example_value(node) -> object:
    """The example value dynamo (`example_value`) or a fake-tensor trace (`val`) recorded for a
    node, or None (also for arguments that are not nodes)."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def partition_of(node: fx.Node) -> str | None:
    """The partition label `LabelPartitions` gave `node`, or None for nodes it does not label."""
    return node.meta.get(PARTITION)


def lora_of(node: fx.Node) -> dict[str, Any] | None:
    """On a served target, its LoRA op and sibling group; None on other nodes."""
    return node.meta.get(LORA)


def is_lora_op(node: fx.Node) -> bool:
    return bool(node.meta.get(LORA_OP))
