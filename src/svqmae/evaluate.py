"""``from svqmae.evaluate import evaluate``: the evaluation API at the import path earlier versions
documented; the implementation is :mod:`svqmae.tasks.evaluate`."""

from .tasks.evaluate import TASKS, bootstrap_ci, evaluate, get_upstream, markdown_table

__all__ = ["evaluate", "markdown_table", "bootstrap_ci", "get_upstream", "TASKS"]
