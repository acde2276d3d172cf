"""Methods registry: every method is `fn(model, calib_loader, args) -> (model, info)`."""

from .baselines import frequency_pruning, random_pruning, reap_pruning
from .pruning import layerwise_pruning, progressive_pruning
from .skip_calibration import dynamic_skipping

METHODS = {
    "layerwise_pruning": layerwise_pruning,
    "progressive_pruning": progressive_pruning,
    "dynamic_skipping": dynamic_skipping,
    "random_pruning": random_pruning,
    "frequency_pruning": frequency_pruning,
    "reap_pruning": reap_pruning,
}

__all__ = ["METHODS"]
