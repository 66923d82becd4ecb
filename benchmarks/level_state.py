"""What ``model.features.level_state`` adds to frozen features: saved models evaluated with and without it.

The level state (the utterance's per-bin log-mel mean and log standard deviation, through a fixed
orthonormal map; ``SVQMAE.level_to_state``) has no trained weights, so a model saved before the option
existed can be given it without pre-training again: this script loads each model, evaluates it as
saved and with the state switched on (``--mode``: ``off``, ``on``), on the tasks of ``ablation.py``
(keyword spotting, digits and emotion of unseen speakers), and writes OUT/level_state.md and .json.

    python benchmarks/level_state.py --out runs/level_state --tasks ks,digits,er \\
        --model svqmae=runs/s12/s_def_seed{0,1,2} --model encoder_only=runs/s12/e_def_seed{0,1,2} --controls

``--controls`` adds filterbanks and the untrained architecture (``random:tiny``), each with and without
the level (filterbanks: the level state appended as a second layer, through the same map), and
filterbanks with statistics pooling (``fbank-stats``: each dimension's mean and standard deviation),
the plain baseline that sees an utterance's spread as the level state does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import task_specs  # noqa: E402
from quality import DEFAULT_DATA, log  # noqa: E402

from svqmae import config as C  # noqa: E402
from svqmae.model import SVQMAE  # noqa: E402
from svqmae.model.svqmae import level_projection  # noqa: E402
from svqmae.tasks.evaluate import evaluate, get_upstream  # noqa: E402
from svqmae.tasks.evaluate.upstreams import SVQMAEUpstream, Upstream  # noqa: E402


def with_level_state(up: SVQMAEUpstream, on: bool) -> SVQMAEUpstream:
    """The same weights, extracting with (``on``) or without the level state."""
    model = up.model
    f = model.cfg.features
    if f.level_state != on:
        f.level_state = on
        if on and not hasattr(model, "level_proj"):
            model.register_buffer("level_proj", level_projection(2 * f.n_mels, model.cfg.encoder.dim))
    tag = "+level" if on else "+nolevel"  # cache keys apart from each other and from the model as saved
    return SVQMAEUpstream(model, up.name + tag, up.key + tag)


class FbankWithLevel(Upstream):
    """Filterbanks (SUPERB's FBANK, one layer of 240) plus the level state through the same kind of map."""

    def __init__(self):
        super().__init__()
        self.fb = get_upstream("fbank")
        # an svqmae model of the filterbanks' width, for its front end and its level state (level_proj: 2F x 240)
        self.ref = SVQMAE(C.resolve("tiny", overrides=[f"model.encoder.dim={self.fb.dim}"]).model).drop_decoder()
        self.name, self.key = "fbank+level", "fbank+level"
        self.num_layers, self.dim, self.frame_rate = 2, self.fb.dim, self.fb.frame_rate

    @torch.no_grad()
    def forward(self, waves, lengths):
        hidden, frames = self.fb(waves, lengths)  # (1, B, N, 240)
        _, _, level = self.ref.frontend(waves, lengths, with_level=True)  # (B, 2F)
        valid = torch.arange(hidden.shape[2])[None, :] < frames[:, None]  # (B, N)
        return torch.cat([self.ref.level_to_state(level, valid)[None], hidden]), frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/level_state")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="a saved model (run DIR or model/ folder); repeat a NAME for its seeds")
    ap.add_argument("--tasks", default="ks,digits,er")
    ap.add_argument("--controls", action="store_true", help="also fbank and random:tiny, with and without")
    ap.add_argument("--modes", default="off,on", help="off,on (default), or one of them")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-root", default=str(DEFAULT_DATA))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out, tasks = Path(args.out), args.tasks.split(",")
    specs = task_specs(Path(args.data_root), out)
    runs: dict[str, list] = {}  # row name -> [(upstream factory, seed label)]
    for m in args.model:
        name, _, path = m.partition("=")
        for on in (mode == "on" for mode in args.modes.split(",")):
            runs.setdefault(f"{name}, level state {'on' if on else 'off'}", []).append(
                (lambda p=path, on=on: with_level_state(get_upstream(p), on), Path(path).name))
    if args.controls:
        runs["fbank"] = [(lambda: get_upstream("fbank"), "-")]
        runs["fbank + level state"] = [(FbankWithLevel, "-")]
        runs["fbank-stats (mean and std pooled)"] = [(lambda: get_upstream("fbank-stats"), "-")]
        for on in (False, True):
            runs[f"random:tiny, level state {'on' if on else 'off'}"] = [
                (lambda on=on: with_level_state(get_upstream("random:tiny"), on), "-")]
    results: dict[str, dict[str, list[float]]] = {}
    for row, items in runs.items():
        for make, seed in items:
            up = make()
            for t in tasks:
                ts = specs[t]
                opts = {k: v for k, v in ts.items() if k not in ("task", "train", "test")}
                r = evaluate(up, ts["task"], ts["train"], ts.get("test"), out=str(out / "eval" / f"{t}_{up.key}"),
                             cache=str(out / "features"), progress=False, **opts)
                results.setdefault(row, {}).setdefault(t, []).append(round(100 * r["value"], 1))
                log(f"{row} [{seed}] {t}: {100 * r['value']:.1f}")
    lines = ["| features | " + " | ".join(f"{t} (each model; mean)" for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for row, by_task in results.items():
        cells = [" / ".join(f"{v:.1f}" for v in by_task[t]) + f" (**{np.mean(by_task[t]):.1f}**)" for t in tasks]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    (out / "level_state.md").write_text("\n".join(lines) + "\n")
    (out / "level_state.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
