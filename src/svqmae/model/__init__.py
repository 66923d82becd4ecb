"""The model room: front end, Transformer, masking, quantizer, the SVQ-MAE model, the CTC model and
how models are saved and loaded. It imports nothing of svqmae but ``config``."""

from .io import CheckpointError, load_config, save_model
from .svqmae import SVQMAE

__all__ = ["SVQMAE", "CheckpointError", "load_config", "save_model"]
