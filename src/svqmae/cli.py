"""The ``svqmae`` command: argument parsing only.

Each task module listed in ``COMMANDS`` provides ``add_cli(subparsers)`` and registers its own
subcommands (with ``set_defaults(func=...)``). Known errors are printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .config import ConfigError

# the task modules, in the order their commands are listed by ``svqmae --help``
COMMANDS = ("pretrain", "datacmd", "demo", "evaluate", "finetune", "transcribe", "extract", "export", "s3prl",
            "hf.export")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="svqmae", description="SVQ-MAE speech pre-training toolkit")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"svqmae.tasks.{name}").add_cli(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import AudioError, DataError
    from .model import CheckpointError

    try:
        args.func(args)
    except (ConfigError, DataError, AudioError, CheckpointError) as e:
        print(f"svqmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that is not there, or a write that fails midway (disk full, read-only)
        where = f"{e.filename}: " if e.filename else ""
        print(f"svqmae {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"svqmae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
