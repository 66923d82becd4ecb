"""SVQ-MAE: compute-efficient self-supervised speech pre-training."""
__version__ = "0.1.0"

from .api import extract_audio, load, save_model  # noqa: E402
from .model import SVQMAE  # noqa: E402
from .tasks.hf.registration import install as _install_hf  # noqa: E402

_install_hf()  # registers the transformers classes when transformers' Auto classes get imported (if ever)

__all__ = ["SVQMAE", "load", "save_model", "extract_audio", "__version__"]
