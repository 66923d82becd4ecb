"""svqmae as a Hugging Face transformers model (``pip install svqmae[hf]``).

* :class:`SVQMAEConfig` (model type ``svqmae``), :class:`SVQMAEModel` (the encoder: every layer's hidden
  states), :class:`SVQMAEForCTC` (a fine-tuned recognizer), :class:`SVQMAEFeatureExtractor` (16 kHz
  waveforms, padding, attention mask); exported folders add a ``Wav2Vec2CTCTokenizer`` vocabulary and a
  ``Wav2Vec2Processor``.
* ``import svqmae`` registers them with transformers' ``AutoConfig`` / ``AutoModel`` /
  ``AutoModelForCTC`` / ``AutoFeatureExtractor`` / ``AutoProcessor`` / ``AutoTokenizer``, lazily (see
  :mod:`svqmae.tasks.hf.registration`).
* ``svqmae export-hf`` (:mod:`svqmae.tasks.hf.export`) writes a svqmae model or recognizer as a
  transformers folder; with ``--with-code`` the folder carries modeling code generated from svqmae's
  source (:mod:`svqmae.tasks.hf.remote_code`) and loads with ``trust_remote_code=True`` without svqmae.

This package's ``__init__`` imports nothing heavy: the classes are imported (with transformers) on
first access.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "SVQMAEConfig": "configuration",
    "SVQMAEModel": "modeling",
    "SVQMAEForCTC": "modeling",
    "SVQMAEPreTrainedModel": "modeling",
    "SVQMAEFeatureExtractor": "feature_extraction",
    "export_hf": "export",
    "register": "registration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
