"""mmlora_fx: many LoRA adapters at once on multimodal models, as a compiler pass over FX graphs."""

from . import errors
from .api import MultiLoRAModel, compile
from .backend import adapter_names, mmlora_backend
from .errors import MMLoRAError

__all__ = ["compile", "MultiLoRAModel", "adapter_names", "mmlora_backend", "MMLoRAError", "errors"]
__version__ = "0.1.0"
