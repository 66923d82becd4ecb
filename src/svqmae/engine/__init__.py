"""The engine room: the one Lightning training engine shared by pre-training and fine-tuning.

``module`` (module base, trainer settings, the run), ``progress`` (terminal lines and metrics.jsonl),
``checkpoint`` (atomic, checksummed checkpoint files and resume), ``faults`` (signals, non-finite
steps, out-of-memory, hung ranks, fault injection), ``schedules`` (learning rates), ``args`` (the
training commands' shared flags) and ``plots``. It imports ``config`` and ``model`` only.
"""
