"""The ``svqmae`` command. Each subcommand lives in its own function; errors are one line."""

from __future__ import annotations

import argparse
import sys

from . import config as C


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="model size preset (default: base)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML overrides (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set model.encoder.layers=6 (repeatable)")


def _resolve(args) -> C.Config:
    overrides = list(args.set)
    for flag, key in (("max_steps", "train.max_steps"), ("max_minutes", "train.max_minutes"),
                      ("devices", "train.devices"), ("num_nodes", "train.num_nodes"),
                      ("precision", "train.precision"), ("accumulate", "train.accumulate")):
        v = getattr(args, flag, None)
        if v is not None:
            overrides.append(f"{key}={v}")
    return C.resolve(args.preset, args.config, overrides)


def cmd_pretrain(args) -> None:
    from .train import pretrain

    pretrain(args.data, args.out, _resolve(args))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="svqmae", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pre-training on unlabeled audio (resumes if --out has checkpoints)")
    p.add_argument("--data", action="append", required=True, metavar="SRC",
                   help="folder of audio, TSV/CSV manifest or lhotse manifest (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    _add_config_args(p)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--devices", help="GPUs per node (int), or auto")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--precision", choices=["auto", "bf16", "32"])
    p.add_argument("--accumulate", type=int, help="gradient accumulation steps")
    p.set_defaults(func=cmd_pretrain)
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
