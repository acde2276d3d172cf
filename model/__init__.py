from .adapters import ADAPTERS, MoEAdapter, UnsupportedModelError, find_moe_blocks, supported_families
from .runner import LayerRunner

__all__ = ["ADAPTERS", "MoEAdapter", "UnsupportedModelError", "find_moe_blocks", "supported_families", "LayerRunner"]
