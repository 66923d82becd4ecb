"""The ``svqmae`` command.

Each module listed in ``COMMAND_MODULES`` that exists provides ``add_cli(subparsers)`` and registers its
own subcommands (with ``set_defaults(func=...)``). Known errors are printed as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from . import config as C


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="model size preset (default: base)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML overrides (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.encoder.layers=6 (repeatable)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Budget and device flags shared by every training command (each sets a ``train.*`` field)."""
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--devices", help="GPUs per node (int), or auto")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--precision", choices=["auto", "bf16", "32"])
    p.add_argument("--accumulate", type=int, help="gradient accumulation steps")


ENGINE_FLAGS = (("max_steps", "train.max_steps"), ("max_minutes", "train.max_minutes"),
                ("devices", "train.devices"), ("num_nodes", "train.num_nodes"),
                ("precision", "train.precision"), ("accumulate", "train.accumulate"))


def engine_overrides(args) -> list[str]:
    """``--max-steps 5`` etc. as ``train.max_steps=5`` overrides, for the flags that were given."""
    return [f"{key}={getattr(args, flag)}" for flag, key in ENGINE_FLAGS if getattr(args, flag, None) is not None]


def _resolve(args) -> C.Config:
    overrides = list(args.set) + engine_overrides(args)
    return C.resolve(args.preset, args.config, overrides)


def cmd_pretrain(args) -> None:
    from .train import pretrain

    pretrain(args.data, args.out, _resolve(args))


COMMAND_MODULES = ("datacmd", "demo", "evaluate", "finetune", "interop", "tasks.hf.export")


def add_pretrain_cli(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training on unlabeled audio (resumes if --out has checkpoints)")
    p.add_argument("--data", action="append", required=True, metavar="SRC",
                   help="folder of audio, TSV/CSV manifest or lhotse manifest (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    _add_config_args(p)
    add_engine_args(p)
    from .resilience import add_fault_injection_arg

    add_fault_injection_arg(p)  # --inject-fault KIND@STEP[:rankR] -> train.inject_faults
    p.set_defaults(func=cmd_pretrain)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="svqmae", description="SVQ-MAE speech pre-training toolkit")
    sub = ap.add_subparsers(dest="command", required=True)
    add_pretrain_cli(sub)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(f"svqmae.{name}") is not None:
            importlib.import_module(f"svqmae.{name}").add_cli(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .api import CheckpointError
    from .audio import AudioError
    from .data import DataError

    try:
        args.func(args)
    except (C.ConfigError, DataError, AudioError, CheckpointError, FileNotFoundError) as e:
        print(f"svqmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"svqmae {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
