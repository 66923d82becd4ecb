"""SUPERB-style evaluation of frozen features: ``svqmae evaluate`` and :func:`evaluate`.

``items`` (tasks, options, labelled items, dev splits and folds), ``upstreams`` (svqmae, filterbank,
random and Hugging Face feature extractors), ``features`` (the on-disk feature cache), ``heads`` (layer
mix, utterance and CTC heads and their training), ``report`` (bootstrap intervals, plots, tables),
``protocol`` (the run: :func:`evaluate`) and ``cli``.
"""

from .cli import add_cli
from .items import DEFAULTS, TASKS
from .protocol import evaluate
from .report import bootstrap_ci, markdown_table
from .upstreams import get_upstream

__all__ = ["evaluate", "markdown_table", "bootstrap_ci", "get_upstream", "add_cli", "TASKS", "DEFAULTS"]
