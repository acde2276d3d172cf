"""Methods registry: every method is `fn(model, calib_loader, args) -> (model, info)`."""

from .pruning import layerwise_pruning, progressive_pruning
from .skipping import dynamic_skipping

METHODS = {
    "layerwise_pruning": layerwise_pruning,
    "progressive_pruning": progressive_pruning,
    "dynamic_skipping": dynamic_skipping,
}

__all__ = ["METHODS"]
