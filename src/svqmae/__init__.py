"""SVQ-MAE: compute-efficient self-supervised speech pre-training."""
__version__ = "0.1.0"

from .api import extract_audio, load, save_model  # noqa: E402
from .model import SVQMAE  # noqa: E402

__all__ = ["SVQMAE", "load", "save_model", "extract_audio", "__version__"]
