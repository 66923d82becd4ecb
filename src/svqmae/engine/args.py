"""Command-line flags shared by every training command; each sets a config field, so the config
stays the single source of truth (``--max-steps 5`` is ``--set train.max_steps=5``)."""

from __future__ import annotations

import argparse
import json

from .. import config as C
from ..config import ConfigError
from .faults import parse_fault


def number(spec: str, kind: type = int):
    """An argparse ``type`` for a flag that is no config field (those are checked with the config): a
    ``kind`` number within the range ``spec`` (written as config fields declare theirs, e.g. ``"> 0"``,
    ``">= 1"``, ``"(0, 1)"``); anything else is argparse's error naming the flag."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not C.in_range(value, spec):
            raise argparse.ArgumentTypeError(f"must be {spec}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_set_arg(p: argparse.ArgumentParser,
                help: str = "override any config field, e.g. --set model.encoder.layers=6 (repeatable)") -> None:
    """``--set KEY=VALUE`` (repeatable): config overrides, applied after presets and YAML files."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="model size preset (default: base)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML overrides (repeatable)")
    add_set_arg(p)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Budget and device flags shared by every training command (each sets a ``train.*`` field)."""
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (train.max_steps)")
    p.add_argument("--max-minutes", type=float,
                   help="time budget in minutes; the run stops at whichever of the two comes first (train.max_minutes)")
    p.add_argument("--devices", help="GPUs per node (int), or auto")
    p.add_argument("--num-nodes", type=int, help="nodes of the job (train.num_nodes)")
    p.add_argument("--precision", choices=["auto", "bf16", "32"],
                   help="auto: bf16 autocast on GPUs, 32-bit on CPUs (train.precision)")
    p.add_argument("--accumulate", type=int, help="gradient accumulation steps")


ENGINE_FLAGS = (("max_steps", "train.max_steps"), ("max_minutes", "train.max_minutes"),
                ("devices", "train.devices"), ("num_nodes", "train.num_nodes"),
                ("precision", "train.precision"), ("accumulate", "train.accumulate"))


def engine_overrides(args) -> list[str]:
    """``--max-steps 5`` etc. as ``train.max_steps=5`` overrides, for the flags that were given."""
    return [f"{key}={getattr(args, flag)}" for flag, key in ENGINE_FLAGS if getattr(args, flag, None) is not None]


def resolve_args(args) -> C.Config:
    """The pre-training config of parsed arguments: preset -> ``--config`` YAMLs -> ``--set`` -> engine flags."""
    return C.resolve(args.preset, args.config, list(args.set) + engine_overrides(args))


class InjectFaultAction(argparse.Action):
    """``--inject-fault KIND@STEP[:rankR]`` (repeatable) -> ``--set train.inject_faults=[...]``."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            parse_fault(value)
        except ConfigError as e:
            parser.error(str(e))
        faults = list(getattr(namespace, self.dest, None) or []) + [value]
        setattr(namespace, self.dest, faults)
        namespace.set = list(getattr(namespace, "set", None) or []) + [f"train.inject_faults={json.dumps(faults)}"]


def add_fault_injection_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inject-fault", action=InjectFaultAction, metavar="KIND@STEP[:rankR]", dest="inject_fault",
                   help="testing: inject a fault (nan, oom, oom_backward, sigterm, sigkill, hang) in the batch of optimizer step STEP, "
                        "on rank R (default 0); repeatable; each fires once per --out")
