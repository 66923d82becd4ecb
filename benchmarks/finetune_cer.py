"""Fine-tuning CER on unseen speakers: a pre-trained SVQ-MAE encoder vs the same architecture from scratch,
each with its own tuned learning rate, warm-up and freezing, at equal CPU-minute budgets.

Data: ``--corpus`` (default ``speechocean762_dev``: English read by 40 Mandarin speakers) is split BY
SPEAKER into fine-tune, dev and test speakers (the last ``--test-speakers`` in sorted order are the test
speakers, the ``--dev-speakers`` before them the dev speakers). Test speakers are never in fine-tuning,
model selection or pre-training data; dev speakers only choose the settings.

Arms (``--arms``):

* ``pretrained``: the SVQ-MAE encoder of ``--pretrained DIR``, or one pre-trained here (``svqmae pretrain``
  with the preset's defaults, capped at ``--pretrain-minutes``) on ``--pretrain-data``: by default every
  other shared set plus the fine-tune speakers' audio (listed in the output; an existing model's training
  data is checked for test-speaker audio);
* ``random``: the same architecture from scratch (``svqmae finetune --model random``).

For every budget B in ``--budgets`` (CPU-minutes of fine-tuning: user + system time of the process and
its loader workers), each arm:

1. searches the same grid (``--lrs`` x ``--encoder-lr-ratios`` x ``--layer-decays`` x ``--freeze-steps``
   x ``--warmups`` x ``--layer-sums`` x ``--reinit-tops``; freezing or re-initialising a random encoder is
   pointless, so that arm's freeze and re-initialisation are 0) with runs of ``--search-fraction`` x B
   minutes (freeze steps scaled alike) and picks the setting with the lowest dev CER (greedy decoding);
   with ``--search-budget S`` the search runs once, at S minutes, and each arm's choice serves every
   budget. At ``--search-fraction 1`` the first seed's final run is the chosen search run itself
   (trained once, scored on the dev and then the test speakers);
2. fine-tunes with that setting for B minutes per seed (``--seeds``) and scores the test speakers: CER
   with a 95% bootstrap interval over test utterances, and for the pre-trained arm the paired difference
   to the scratch arm of the same seed (a 95% paired bootstrap interval: below 0 everywhere = pre-training
   wins).

Budgets are CPU time, so that they hold on a machine shared with other jobs (wall-clock budgets do not:
two threads waiting for each other under load were seen to run ten times slower): calibration measures
the CPU seconds of a fine-tuning step (encoder frozen and not) as the difference between runs of ``3n``
and ``n`` steps (start-up cancels out), and each run schedules the steps its budget buys
(``train.max_steps``, so the tri-stage schedule ends on time). Each run's CPU minutes are measured and
reported; ``train.max_minutes`` (10 x the budget, wall-clock) only guards against a hung run. No
validation runs inside a budget. ``--threads 1`` (the default) is the most CPU-efficient.

Everything lands in ``--out``: finished runs (``result.json``) are skipped on a rerun and an interrupted
run resumes from its checkpoint, so a long session can be split (``--budgets 4`` today, ``--budgets 8,16``
tomorrow, same ``--out``). Output: one markdown table on stdout (also ``OUT/results.md``, with the grid's
dev CERs and the pre-training data) and ``OUT/results.json``.

    python benchmarks/finetune_cer.py --out runs/ft_cer --pretrain-minutes 15            # pre-trains first
    python benchmarks/finetune_cer.py --out runs/ft_cer --pretrained runs/pre/model --budgets 4,8,16 --seeds 0,1
    python benchmarks/finetune_cer.py --out runs/ft_cer_quick --quick                     # smoke test, < 3 minutes

``--quick`` runs every step above as small as it gets (a 10-step pre-training, a 0.2-minute budget, two
settings per arm, 20 s batches, 1 thread): a check that the pipeline works, not a result.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAFETY = 0.95  # share of the calibrated steps a run schedules (the budget is also a hard wall-clock cap)
OVERHEAD_MINUTES = 0.4  # per run, outside its budget: start-up and scoring (for the time estimate only)
NO_VALIDATION = 10**9  # train.val_every: validating would eat the budget; runs are scored afterwards


START = time.monotonic()


def log(msg: str) -> None:
    """A progress line on stderr, stamped with the minutes since the benchmark started."""
    print(f"[{(time.monotonic() - START) / 60:6.1f} min] {msg}", file=sys.stderr, flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --------------------------------------------------------------------------- data


def read_rows(manifest: Path) -> list[dict]:
    """The rows of a shared-set manifest with a transcript, paths made absolute."""
    rows = list(csv.DictReader(manifest.open(encoding="utf-8"), delimiter="\t"))
    for r in rows:
        r["path"] = str((manifest.parent / r["path"]).resolve())
    return [r for r in rows if (r.get("text") or "").strip()]


def split_by_speaker(manifest: Path, out: Path, n_test: int, n_dev: int) -> dict:
    """Write fine-tune / dev / test manifests (absolute paths): the last ``n_test`` speakers (sorted) are
    the test speakers, the ``n_dev`` before them the dev speakers, the rest fine-tune. Returns the paths
    and the speakers of each part."""
    rows = read_rows(manifest)
    speakers = sorted({r["speaker"] for r in rows})
    if len(speakers) < n_test + n_dev + 1:
        raise SystemExit(f"{manifest}: {len(speakers)} speakers, need more than {n_test} test + {n_dev} dev")
    parts = {"test": speakers[-n_test:], "dev": speakers[-n_test - n_dev:-n_test],
             "finetune": speakers[:-n_test - n_dev]}
    by_part = {name: [r for r in rows if r["speaker"] in spk] for name, spk in parts.items()}
    # "probe": 8 dev utterances, the fine-tuning call's own dev source: validation is off inside the
    # budgets, but Lightning validates once when a run stops on its time cap, so it is kept cheap
    by_part["probe"] = by_part["dev"][:8]
    out.mkdir(parents=True, exist_ok=True)
    split = {"speakers": parts}
    for name, part in by_part.items():
        path = out / f"{manifest.parent.name}_{name}.tsv"
        with path.open("w", encoding="utf-8") as f:
            f.write("path\tseconds\tspeaker\ttext\n")
            for r in part:
                f.write(f"{r['path']}\t{r['seconds']}\t{r['speaker']}\t{r['text']}\n")
        split[name] = path
    log(f"{manifest.parent.name}: fine-tune {len(parts['finetune'])} speakers, dev {len(parts['dev'])} "
        f"({' '.join(parts['dev'])}), test {n_test} ({' '.join(parts['test'])})")
    return split


def audio_of(source: Path) -> set[str] | None:
    """The audio files a TSV/CSV manifest or a folder holds (absolute paths); None for other sources."""
    if source.is_dir():
        return {str(p.resolve()) for p in source.rglob("*") if p.is_file()}
    if source.suffix in (".tsv", ".csv") and source.is_file():
        delim = "\t" if source.suffix == ".tsv" else ","
        rows = csv.DictReader(source.open(encoding="utf-8"), delimiter=delim)
        return {str((source.parent / r["path"]).resolve()) for r in rows if r.get("path")}
    return None


def check_unseen(sources: list[str], test_manifest: Path) -> list[str]:
    """The pre-training sources that hold test-speaker audio (by path); those that cannot be read
    (missing, lhotse manifests) are named in the log as unchecked."""
    test = {r["path"] for r in read_rows(test_manifest)}
    held = {s: audio_of(Path(s)) for s in sources}
    unchecked = [s for s, files in held.items() if files is None]
    if unchecked:
        log(f"not checked for test-speaker audio: {', '.join(unchecked)}")
    return [s for s, files in held.items() if files and files & test]


# --------------------------------------------------------------------------- the pre-trained model


def pretrained_model(args, split: dict, out: Path) -> tuple[str, list[str]]:
    """The pre-trained model's folder and its training data: ``--pretrained``, or pre-train one here."""
    from svqmae import config as C
    from svqmae.tasks.pretrain import pretrain

    if args.pretrained:
        p = Path(args.pretrained)
        meta = p / "config.json" if (p / "config.json").is_file() else p / "model" / "config.json"
        card = json.loads(meta.read_text()).get("card", {}) if meta.is_file() else {}
        return args.pretrained, [s.strip() for s in str(card.get("training data", "unknown")).split(",")]
    sources = args.pretrain_data or [str(m) for m in sorted(Path(args.data_root).glob("*/manifest.tsv"))
                                     if m.parent.name != args.corpus] + [str(split["finetune"])]
    folder = out / "pretrain"
    if not (folder / "model" / "config.json").is_file():  # finished pre-training is not repeated
        overrides = [f"train.max_minutes={args.pretrain_minutes}", *args.pretrain_set]
        if args.pretrain_steps:
            overrides.append(f"train.max_steps={args.pretrain_steps}")
        log(f"== pre-training {args.preset} for at most {args.pretrain_minutes:g} minutes on {', '.join(sources)}")
        pretrain(sources, folder, C.resolve(args.preset, overrides=overrides))
    return str(folder / "model"), sources


def architecture(model: str) -> tuple[str, list[str]]:
    """The preset of a pre-trained model and ``--set`` items that give ``--model random`` its architecture."""
    from svqmae import api
    from svqmae import config as C

    cfg = api.load_config(model)

    def leaves(d: dict, prefix: str):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]

    return cfg.preset, list(leaves(C.to_dict(cfg)["model"], "model."))


# --------------------------------------------------------------------------- settings and budgets


@dataclass(frozen=True)
class Setting:
    """One point of the search grid."""

    lr: float  # train.lr (the head's)
    ratio: float  # ctc.encoder_lr_ratio
    decay: float  # ctc.layer_decay
    freeze: int  # ctc.freeze_steps at the full budget (pre-trained arm only)
    warmup: float  # tri-stage warm-up, share of the steps (hold 0.4, decay the rest)
    layer_sum: bool = False  # ctc.layer_sum: the head reads a learned weighted sum of every layer
    reinit: int = 0  # ctc.reinit_top: the top blocks restart from random weights (pre-trained arm only)

    def tag(self) -> str:
        return (f"lr{self.lr:g}_r{self.ratio:g}_ld{self.decay:g}_f{self.freeze}_w{self.warmup:g}"
                + ("_sum" if self.layer_sum else "") + (f"_re{self.reinit}" if self.reinit else ""))

    def describe(self) -> str:
        text = f"lr {self.lr:g}, encoder x{self.ratio:g}"
        if self.decay != 1.0:
            text += f", layer decay {self.decay:g}"
        if self.freeze:
            text += f", freeze {self.freeze}"
        if self.layer_sum:
            text += ", layer sum"
        if self.reinit:
            text += f", top {self.reinit} re-initialised"
        return text + f", warm-up {self.warmup:.0%}"

    def overrides(self, steps: int, freeze: int) -> list[str]:
        return [f"train.lr={self.lr}", f"ctc.encoder_lr_ratio={self.ratio}", f"ctc.layer_decay={self.decay}",
                f"ctc.freeze_steps={freeze}", f"train.max_steps={steps}",
                f"ctc.stages=[{self.warmup},0.4,{round(0.6 - self.warmup, 6)}]",
                f"train.warmup_steps={max(1, round(self.warmup * steps))}",
                f"ctc.layer_sum={str(self.layer_sum).lower()}", f"ctc.reinit_top={self.reinit}"]


def grid(args, arm: str) -> list[Setting]:
    """The search grid; the random arm's freeze and re-initialisation are 0 (both mean nothing for a
    random encoder)."""
    freezes = args.freeze_steps if arm == "pretrained" else [0]
    reinits = args.reinit_tops if arm == "pretrained" else [0]
    points = itertools.product(args.lrs, args.encoder_lr_ratios, args.layer_decays, freezes, args.warmups,
                               [bool(x) for x in args.layer_sums], reinits)
    return list(dict.fromkeys(Setting(*p) for p in points))


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished children (loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def steps_within(minutes: float, freeze: int, ratio: float, cost: dict) -> int:
    """Optimizer steps that ``minutes`` CPU-minutes buy: ``freeze`` frozen steps (or all with ``ratio`` 0),
    the rest with the encoder training, at the calibrated ``cost`` (CPU seconds per step)."""
    budget = 60 * minutes
    if ratio == 0 or freeze * cost["frozen"] >= budget:
        return max(1, int(SAFETY * budget / cost["frozen"]))
    return max(1, int(SAFETY * (freeze + (budget - freeze * cost["frozen"]) / cost["unfrozen"])))


def calibrate(out: Path, split: dict, preset: str, arch: list[str], base: list[str], steps: int) -> dict:
    """CPU seconds per step of this architecture with the encoder frozen and training (from scratch: the
    cost does not depend on the weights): (CPU of a 3n-step run - CPU of an n-step run) / 2n."""
    from svqmae.tasks.finetune import finetune

    cache = out / "calibration_cpu.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cost = {}
    for name, ratio in (("unfrozen", 1.0), ("frozen", 0.0)):
        used = {}
        for n in (steps, 3 * steps):
            c0 = cpu_seconds()
            finetune("random", [str(split["finetune"])], [str(split["probe"])], out / "calibration" / f"{name}{n}",
                     preset=preset, overrides=[*arch, *base, f"train.max_steps={n}", f"ctc.encoder_lr_ratio={ratio}",
                                               f"train.ckpt_every_steps={n}"])
            used[n] = cpu_seconds() - c0
        cost[name] = (used[3 * steps] - used[steps]) / (2 * steps)
    cache.write_text(json.dumps(cost))
    log(f"calibration: {cost['unfrozen']:.3f} CPU-s per step training the encoder, {cost['frozen']:.3f} frozen")
    return cost


# --------------------------------------------------------------------------- one run


def fine_tune_and_score(folder: Path, model: str, preset: str | None, split: dict, overrides: list[str],
                        score_on: str) -> dict:
    """Fine-tune into ``folder`` and score on ``split[score_on]``; a finished run is read back, an
    interrupted one resumes from its checkpoint."""
    import torch

    from svqmae.engine.checkpoint import latest_checkpoint
    from svqmae.tasks.decode import Decoder
    from svqmae.tasks.finetune import finetune
    from svqmae.tasks.recognizer import load_recognizer
    from svqmae.tasks.transcribe import score

    done = folder / ("result.json" if score_on == "dev" else f"result_{score_on}.json")
    if done.is_file():
        return json.loads(done.read_text())
    trained = folder / "trained.json"
    if not trained.is_file():
        resumed = (folder / "checkpoints").is_dir()
        t0, c0 = time.monotonic(), cpu_seconds()
        finetune(model, [str(split["finetune"])], [str(split["probe"])], folder, preset=preset, overrides=overrides)
        steps = json.loads((folder / "model" / "config.json").read_text())["card"]["steps"]
        # the clock train.max_minutes is checked against (Lightning's Timer, kept across a resume)
        timer = torch.load(latest_checkpoint(folder), weights_only=True)["callbacks"]["Timer"]
        trained.write_text(json.dumps({"steps": steps, "resumed": resumed,
                                       "minutes": (cpu_seconds() - c0) / 60,  # CPU, start-up included
                                       "train_wall_minutes": timer["time_elapsed"]["train"] / 60,
                                       "wall_minutes": (time.monotonic() - t0) / 60}))
    t0 = time.monotonic()
    rec = load_recognizer(folder)
    report = score(rec, str(split[score_on]), Decoder(rec.units), worst=10**9)  # every utterance, for pairing
    log(f"{folder}: {score_on} CER {100 * report['cer']:.1f}% (scored in {time.monotonic() - t0:.0f} s)")
    result = {**json.loads(trained.read_text()), "scored_on": score_on, "cer": report["cer"],
              "cer_ci95": report["cer_ci95"], "wer": report["wer"],
              "utterances": {r["path"]: [r["char_errors"], r["chars"]] for r in report["worst"]}}
    done.write_text(json.dumps(result))
    return result


def paired_difference(a: dict, b: dict, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """CER(a) - CER(b) on the same utterances, with a 95% paired bootstrap interval."""
    keys = sorted(a["utterances"])
    ea, na = np.array([a["utterances"][k] for k in keys], dtype=np.float64).T
    eb, nb = np.array([b["utterances"][k] for k in keys], dtype=np.float64).T
    idx = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    diffs = ea[idx].sum(1) / na[idx].sum(1) - eb[idx].sum(1) / nb[idx].sum(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(ea.sum() / na.sum() - eb.sum() / nb.sum()), float(lo), float(hi)


# --------------------------------------------------------------------------- the benchmark


def estimate_minutes(args, n_settings: dict[str, int]) -> float:
    """Wall-clock minutes the whole plan takes (finished runs included): pre-training, calibration,
    then per budget B and arm, its search runs (``search_fraction`` x B each) and final runs (B each)."""
    budget_shares = sum(n * args.search_fraction + len(args.seeds) for n in n_settings.values())
    runs = sum(n + len(args.seeds) for n in n_settings.values()) * len(args.budgets)
    pre = 0 if args.pretrained or "pretrained" not in args.arms else args.pretrain_minutes
    return pre + 2 + budget_shares * sum(args.budgets) + runs * OVERHEAD_MINUTES


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="working folder (rerun to resume; finished runs are kept)")
    ap.add_argument("--pretrained", help="an existing pre-trained model (model/ folder or run DIR)")
    ap.add_argument("--pretrain-minutes", type=float, default=15.0, help="without --pretrained: pre-train this long")
    ap.add_argument("--pretrain-steps", type=int, default=0, help="... and at most this many steps (0: the preset's)")
    ap.add_argument("--pretrain-data", action="append", metavar="SRC",
                    help="pre-training sources (default: every other shared set + the fine-tune speakers' audio)")
    ap.add_argument("--preset", default="tiny", help="architecture when pre-training here")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="pre-training overrides (when pre-training here)")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA))
    ap.add_argument("--corpus", default="speechocean762_dev", help="labelled set under --data-root, split by speaker")
    ap.add_argument("--test-speakers", type=int, default=8)
    ap.add_argument("--dev-speakers", type=int, default=6)
    ap.add_argument("--arms", type=lambda s: s.split(","), default=["pretrained", "random"])
    ap.add_argument("--budgets", type=floats, default=[4.0, 8.0, 16.0], help="fine-tuning CPU-minutes, e.g. 4,8,16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--seeds", type=ints, default=[0], help="fine-tuning seeds of the final runs, e.g. 0,1")
    ap.add_argument("--lrs", type=floats, default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--encoder-lr-ratios", type=floats, default=[0.1, 1.0])
    ap.add_argument("--layer-decays", type=floats, default=[1.0])
    ap.add_argument("--freeze-steps", type=ints, default=[0, 100], help="pre-trained arm only")
    ap.add_argument("--warmups", type=floats, default=[0.1], help="tri-stage warm-up shares")
    ap.add_argument("--layer-sums", type=ints, default=[0], help="ctc.layer_sum values, e.g. 0,1")
    ap.add_argument("--reinit-tops", type=ints, default=[0], help="ctc.reinit_top values, pre-trained arm only")
    ap.add_argument("--search-fraction", type=float, default=0.25, help="search runs get this share of a budget")
    ap.add_argument("--search-budget", type=float, default=0.0,
                    help="search once, at this budget, and use each arm's choice at every budget (0: search "
                         "at each budget)")
    ap.add_argument("--calibration-steps", type=int, default=40)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning overrides, all runs")
    ap.add_argument("--quick", action="store_true", help="smoke test of the whole pipeline in under 3 minutes")
    args = ap.parse_args(argv)
    if not args.budgets or not args.seeds:
        ap.error("--budgets and --seeds need at least one value")
    if args.quick:  # every step of the pipeline, each as small as it gets (20 s batches, 1 thread: a shared
        # machine slows one thread far less than two, which wait for each other)
        args.threads = 1
        args.budgets, args.seeds, args.search_fraction, args.calibration_steps = [0.2], args.seeds[:1], 0.5, 10
        args.lrs, args.encoder_lr_ratios, args.freeze_steps = [3e-3], [0.1, 1.0], [0]
        args.layer_decays, args.warmups, args.test_speakers, args.dev_speakers = [1.0], [0.1], 2, 1
        args.pretrain_minutes, args.pretrain_steps = min(args.pretrain_minutes, 0.2), args.pretrain_steps or 10
        args.set = ["train.max_batch_seconds=20", "train.num_workers=0", *args.set]
        args.pretrain_set = ["train.max_batch_seconds=30", "train.val_items=4", "train.num_workers=0",
                             *args.pretrain_set]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from svqmae.engine.progress import quiet_lightning

    torch.set_num_threads(args.threads)
    quiet_lightning()
    out = Path(args.out)
    split = split_by_speaker(Path(args.data_root) / args.corpus / "manifest.tsv", out / "manifests",
                             args.test_speakers, args.dev_speakers)
    settings = {arm: grid(args, arm) for arm in args.arms}
    hours = estimate_minutes(args, {a: len(s) for a, s in settings.items()}) / 60
    log(f"plan: {sum(map(len, settings.values()))} search runs and {len(args.arms) * len(args.seeds)} final runs "
        f"per budget, budgets {args.budgets} minutes: about {hours:.1f} hours on an idle machine")

    model, pre_sources, leaked = None, [], []
    preset, arch = args.preset, []  # the random arm's architecture: the preset's, or the pre-trained model's
    if "pretrained" in args.arms:
        model, pre_sources = pretrained_model(args, split, out)
        preset, arch = architecture(model)
        leaked = check_unseen(pre_sources, split["test"])
        if leaked:
            log(f"WARNING: the pre-training data holds test-speaker audio: {', '.join(leaked)}")
    base = [f"train.val_every={NO_VALIDATION}", "train.log_every=5", "units.kind=char", *args.set]
    cost = calibrate(out, split, preset, arch, base, args.calibration_steps)

    def run(arm: str, s: Setting, budget: float, share: float, seed: int, folder: Path, score_on: str) -> dict:
        """One fine-tuning run of ``share`` x ``budget`` minutes (freeze steps scaled alike), scored."""
        freeze = round(s.freeze * share) if arm == "pretrained" else 0
        steps = steps_within(share * budget, freeze, s.ratio, cost)
        overrides = [*base, *s.overrides(steps, freeze), f"train.max_minutes={10 * share * budget}",
                     f"train.seed={seed}"]
        log(f"== {arm} | {share * budget:g} min, {steps} steps | {s.describe()} | seed {seed} -> {folder}")
        if arm == "pretrained":
            return fine_tune_and_score(folder, model, None, split, overrides, score_on)
        return fine_tune_and_score(folder, "random", preset, split, [*arch, *overrides], score_on)

    def search(budget: float) -> dict:
        """Each arm's setting with the lowest dev CER after runs of ``search_fraction`` x ``budget``."""
        chosen = {}
        for arm in args.arms:
            dev = {s: run(arm, s, budget, args.search_fraction, args.seeds[0],
                          out / f"budget{budget:g}min" / "search" / arm / s.tag(), "dev") for s in settings[arm]}
            best = min(dev, key=lambda s: dev[s]["cer"])  # ties: the first in grid order
            chosen[arm] = (best, dev[best]["cer"], budget)
            searches.extend({"budget": budget, "arm": arm, "setting": asdict(s), "dev_cer": r["cer"],
                             "steps": r["steps"], "chosen": s == best} for s, r in dev.items())
        return chosen

    rows, searches = [], []
    once = search(args.search_budget) if args.search_budget else None
    for budget in args.budgets:  # budget by budget: an interrupted session keeps whole budgets
        where = out / f"budget{budget:g}min"
        chosen = once or search(budget)
        for seed in args.seeds:
            final = {}
            for arm in args.arms:
                s, _, searched_at = chosen[arm]
                folder = where / "final" / arm / f"seed{seed}"
                if args.search_fraction == 1.0 and searched_at == budget and seed == args.seeds[0]:
                    folder = where / "search" / arm / s.tag()  # the same run: trained once, scored on test too
                final[arm] = run(arm, s, budget, 1.0, seed, folder, "test")
            for arm, r in final.items():
                row = {"budget": budget, "arm": arm, "seed": seed, "setting": asdict(chosen[arm][0]),
                       "dev_cer": chosen[arm][1], "searched_at": chosen[arm][2],
                       **{k: r[k] for k in ("steps", "minutes", "cer", "cer_ci95", "wer", "resumed")}}
                if arm == "pretrained" and "random" in final:
                    row["delta"] = paired_difference(r, final["random"])
                rows.append(row)
        table, details = write_report(out, args, rows, searches, split, model, pre_sources, leaked)
    log(f"done; {out / 'results.md'}:\n{details}")
    print(table)


def write_report(out: Path, args, rows: list[dict], searches: list[dict], split: dict, model: str | None,
                 pre_sources: list[str], leaked: list[str]) -> tuple[str, str]:
    """The markdown table, then the grid's dev CERs and the pre-training data, into OUT/results.md, and
    everything into OUT/results.json; returns (table, the rest)."""
    import torch

    test_spk = split["speakers"]["test"]
    names = {"pretrained": "SVQ-MAE pre-trained", "random": "same architecture from scratch"}
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [f"Fine-tuning CER on unseen speakers of {args.corpus} ({machine}; greedy decoding; fine-tune "
             f"{len(split['speakers']['finetune'])} speakers, dev {len(split['speakers']['dev'])}, test {len(test_spk)})",
             "", "| budget (CPU-min) | arm | seed | chosen settings (dev CER) | steps | CPU-min used | test CER % (95% CI) "
             "| vs scratch, points (95% CI) | test speakers |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["cer_ci95"]
        delta = "-"
        if "delta" in r:
            d, dlo, dhi = r["delta"]
            delta = f"{100 * d:+.1f} ({100 * dlo:+.1f} to {100 * dhi:+.1f})"
        at = r.get("searched_at", r["budget"])
        chosen = (f"{Setting(**r['setting']).describe()} ({100 * r['dev_cer']:.1f}"
                  + (f", searched at {at:g} min)" if at != r["budget"] else ")"))
        lines.append(f"| {r['budget']:g} | {names.get(r['arm'], r['arm'])} | {r['seed']} | {chosen} | "
                     f"{r['steps']} | {r['minutes']:.2f}{' (resumed)' if r['resumed'] else ''} | "
                     f"{100 * r['cer']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | {delta} | {' '.join(test_spk)} |")
    table = "\n".join(lines)
    extra = ["", "Search (dev speakers; * = chosen):", "", "| budget (CPU-min) | arm | setting | steps | dev CER % |",
             "|---|---|---|---|---|"]
    extra += [f"| {s['budget']:g} | {s['arm']} | {Setting(**s['setting']).describe()}{' *' if s['chosen'] else ''} | "
              f"{s['steps']} | {100 * s['dev_cer']:.1f} |" for s in searches]
    extra += ["", f"Pre-trained model: {model or '-'}; pre-training data: {', '.join(pre_sources) or '-'}"
              + (f" (WARNING: holds test-speaker audio: {', '.join(leaked)})" if leaked else
                 " (no test-speaker audio in it)" if pre_sources else "")]
    (out / "results.md").write_text(table + "\n" + "\n".join(extra) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "speakers": split["speakers"], "pretrained": model,
         "pretraining_data": pre_sources, "rows": rows, "search": searches}, indent=1, default=str))
    return table, "\n".join(extra)


if __name__ == "__main__":
    main()
