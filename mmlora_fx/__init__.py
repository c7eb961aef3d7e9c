"""mmlora_fx: many LoRA adapters at once on multimodal models, as a compiler pass over FX graphs."""

from . import errors
from .api import MultiLoRAModel, compile
from .backend import adapter_names, mmlora_backend
from .errors import MMLoRAError
from .tower_attention import use_flex_tower_attention

__all__ = ["compile", "MultiLoRAModel", "adapter_names", "mmlora_backend", "MMLoRAError", "errors",
           "use_flex_tower_attention"]
__version__ = "0.1.0"
