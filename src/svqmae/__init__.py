"""SVQ-MAE: compute-efficient self-supervised speech pre-training."""
import os

__version__ = "0.1.0"

# OpenMP threads that wait without spinning, unless the user chose otherwise: where the cores are shared
# (loader workers beside training, other jobs), spinning threads burn the cores the others need; a BASE step
# on 2 busy cores took 7x the wall time (BENCHMARKS.md, "CPU, both trees in one run"). Read once, when the
# OpenMP runtime loads: this takes effect when svqmae is imported before torch (the CLI always is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import extract_audio, load, save_model  # noqa: E402
from .model import SVQMAE  # noqa: E402
from .tasks.hf.registration import install as _install_hf  # noqa: E402

_install_hf()  # registers the transformers classes when transformers' Auto classes get imported (if ever)

__all__ = ["SVQMAE", "load", "save_model", "extract_audio", "__version__"]
