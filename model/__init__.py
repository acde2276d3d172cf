"""Model side: family adapters, the layer-by-layer runner, dynamic skipping, loading."""

from . import fused_experts  # noqa: F401  (registers the "fused" experts implementation)
from .adapters import ADAPTERS, MoEAdapter, MoEError, UnsupportedModelError, find_moe_blocks, supported_families
from .loading import load_model
from .runner import LayerRunner
from .dynamic_skipping import DynamicSkipping

__all__ = ["ADAPTERS", "MoEAdapter", "MoEError", "UnsupportedModelError", "find_moe_blocks", "supported_families",
           "LayerRunner", "DynamicSkipping", "load_model"]
