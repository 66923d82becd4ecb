"""Registering the svqmae classes with transformers' Auto* classes, lazily.

``import svqmae`` calls :func:`install`. Registering eagerly would import transformers' model machinery
(``PreTrainedModel`` and the Auto classes: about 2.5 s on a small CPU) on every ``import svqmae``,
which takes under 2 s itself. Instead each registration waits for the Auto module it extends:

* transformers not installed (``importlib.util.find_spec`` finds nothing): nothing happens;
* otherwise a ``sys.meta_path`` finder watches the imports of ``transformers.models.auto.*_auto``
  (the modules that define ``AutoConfig``, ``AutoModel`` / ``AutoModelForCTC``,
  ``AutoFeatureExtractor``, ``AutoProcessor``, ``AutoTokenizer``; ``from transformers import
  AutoModel`` or ``pipeline(...)`` imports them, ``import transformers`` alone does not) and registers
  the matching svqmae classes right after such a module has run, before user code can call it. Auto
  modules imported before svqmae are handled by :func:`install` at once.

A registration imports the svqmae class (and so transformers' ``PreTrainedModel``, ...). When an Auto
module finishes while a module the registration needs is itself half-imported (transformers imports
some Auto modules from inside ``modeling_utils``, ``processing_utils``, ...; ``NEEDS`` lists them), the
registration waits for the next import (of anything) after which it is safe. A failing
registration (an incompatible transformers, say) is a warning, never an error of ``import svqmae`` or
of the user's import; :func:`register` does all of it at once and lets errors through.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

AUTO = "transformers.models.auto."
TRIGGERS = {  # watched module -> the registration that extends it
    AUTO + "configuration_auto": "config",
    AUTO + "modeling_auto": "models",
    AUTO + "feature_extraction_auto": "feature_extractor",
    AUTO + "processing_auto": "processor",
    AUTO + "tokenization_auto": "tokenizer",
}
# transformers modules each registration imports (directly or through svqmae's classes): they must not be
# half-imported at the time (svqmae's own tasks.hf modules neither)
_T = "transformers."
NEEDS = {
    "config": (_T + "configuration_utils",),
    "models": (_T + "configuration_utils", _T + "modeling_utils", _T + "modeling_outputs"),
    "feature_extractor": (_T + "configuration_utils", _T + "feature_extraction_utils",
                          _T + "feature_extraction_sequence_utils", _T + "audio_utils"),
    "processor": (_T + "configuration_utils", _T + "modeling_utils", _T + "processing_utils", _T + "models.wav2vec2",
                  _T + "models.wav2vec2.processing_wav2vec2", _T + "tokenization_utils_base",
                  _T + "feature_extraction_utils", _T + "image_processing_utils"),
    "tokenizer": (_T + "configuration_utils", _T + "tokenization_utils_base", _T + "tokenization_python",
                  _T + "models.wav2vec2", _T + "models.wav2vec2.tokenization_wav2vec2"),
}

_done: set[str] = set()  # registrations made
_ready: set[str] = set()  # registrations whose Auto module has run, waiting for a safe moment
_running = False


def _register_one(name: str) -> None:
    from .configuration import SVQMAEConfig

    if name == "config":
        from transformers import AutoConfig

        AutoConfig.register(SVQMAEConfig.model_type, SVQMAEConfig, exist_ok=True)
    elif name == "models":
        from transformers import AutoModel, AutoModelForCTC

        from .modeling import SVQMAEForCTC, SVQMAEModel

        AutoModel.register(SVQMAEConfig, SVQMAEModel, exist_ok=True)
        AutoModelForCTC.register(SVQMAEConfig, SVQMAEForCTC, exist_ok=True)
    elif name == "feature_extractor":
        from transformers import AutoFeatureExtractor

        from .feature_extraction import SVQMAEFeatureExtractor

        AutoFeatureExtractor.register(SVQMAEConfig, SVQMAEFeatureExtractor, exist_ok=True)
    elif name == "processor":
        from transformers import AutoProcessor, Wav2Vec2Processor

        AutoProcessor.register(SVQMAEConfig, Wav2Vec2Processor, exist_ok=True)
    elif name == "tokenizer":
        from transformers import AutoTokenizer, Wav2Vec2CTCTokenizer

        AutoTokenizer.register(SVQMAEConfig, slow_tokenizer_class=Wav2Vec2CTCTokenizer, exist_ok=True)
    _done.add(name)


def register() -> None:
    """Register SVQMAEConfig (model type ``svqmae``) with ``AutoConfig``, SVQMAEModel with ``AutoModel``,
    SVQMAEForCTC with ``AutoModelForCTC``, SVQMAEFeatureExtractor with ``AutoFeatureExtractor``, and the
    processor and tokenizer classes of exported folders (``Wav2Vec2Processor``, ``Wav2Vec2CTCTokenizer``)
    with ``AutoProcessor`` and ``AutoTokenizer``. Idempotent; errors propagate."""
    for name in dict.fromkeys(TRIGGERS.values()):
        if name not in _done:
            _register_one(name)
    _ready.clear()
    uninstall()


def _half_imported(names) -> bool:
    for name in names:
        spec = getattr(sys.modules.get(name), "__spec__", None)
        if getattr(spec, "_initializing", False):
            return True
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False)
               for n, m in list(sys.modules.items()) if n.startswith(__package__ + "."))


def _retry() -> None:
    """Make the waiting registrations whose modules are all complete now (config first)."""
    global _running
    if _running or not _ready:
        return
    _running = True
    try:
        for name in [n for n in ("config", "models", "feature_extractor", "processor", "tokenizer") if n in _ready]:
            if _half_imported(NEEDS[name]):
                continue
            _ready.discard(name)
            try:
                _register_one(name)
            except ImportError:
                _ready.add(name)  # a circular import after all: try again at a later import
            except Exception as e:  # never break the user's import over an optional integration
                warnings.warn(f"svqmae: could not register its {name} class(es) with transformers' Auto classes "
                              f"({e.__class__.__name__}: {str(e)[:200]}); call svqmae.tasks.hf.register() to "
                              "see why", stacklevel=3)
    finally:
        _running = False
    if set(TRIGGERS.values()) <= _done:
        uninstall()


class _LoaderThenRegister:
    """Wraps the real loader of a watched module: executes the module, then registers what it allows."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _ready.add(TRIGGERS[self._name])
        _retry()


class _AutoImportHook(importlib.abc.MetaPathFinder):
    """Watches the Auto modules' imports (and retries waiting registrations at every other import)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TRIGGERS:
            _retry()
            return None
        for finder in list(sys.meta_path):  # the others (this hook of another svqmae copy too: no recursion)
            own = finder is self or type(finder).__name__ == type(self).__name__
            find = None if own else getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderThenRegister(spec.loader, fullname)
                return spec
        return None


def _hooks() -> list:
    return [f for f in sys.meta_path if isinstance(f, _AutoImportHook)]


def uninstall() -> None:
    """Remove the import hook."""
    for f in _hooks():
        sys.meta_path.remove(f)


def install() -> None:
    """Arrange for the registrations to happen as transformers' Auto modules get imported (see above)."""
    if _hooks() or set(TRIGGERS.values()) <= _done:
        return
    if sys.modules.get("transformers") is None and importlib.util.find_spec("transformers") is None:
        return
    sys.meta_path.insert(0, _AutoImportHook())
    for module, name in TRIGGERS.items():
        if module in sys.modules:
            _ready.add(name)
    _retry()
