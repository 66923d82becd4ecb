"""SVQ-MAE against its encoder-only ablation (and any other configuration) at equal pre-training compute,
over several pre-training seeds, on keyword spotting, spoken digits and emotion of unseen speakers.

Equal compute: each arm's cost per step is measured on this machine first, in CPU seconds (user +
system time of the pre-training process and its loader workers, from ``wait4``), as the difference
between a run of ``3 x --probe-steps`` and one of ``--probe-steps`` steps (start-up cancels out); then
every arm gets the step budget that costs the same CPU seconds as ``--minutes`` of one thread running
the reference arm (the first one). CPU time, unlike wall-clock time, barely moves when other jobs share
the machine, and runs with step budgets are immune to that load; each arm's learning rate decays over
its own steps.

    python benchmarks/ablation.py --out runs/ablation --minutes 12 --seeds 0,1,2 \\
        --arm svqmae= --arm encoder_only=model.variant=encoder_only --parallel 2 --threads 1

Tasks (frozen features, SUPERB-style, head learning rate chosen on dev): 12-class keyword spotting on
speech_commands_dev (speaker-disjoint halves), digits on fsdd (3-fold by speaker) and emotion on
emodb_dev (5-fold by speaker: every test actor unseen). Pre-training data: speechocean762_dev and
aishell1_dev (none of the test speakers). Writes OUT/ablation.md and OUT/ablation.json; both carry each
arm's dev accuracy (the probes' speakers held out of their training side, mean over tasks and seeds), the
figure to choose settings by: the test speakers never choose. A search on one seed overfits that small dev
split (BENCHMARKS.md, 2026-12-05): confirm a winner on several seeds before adopting it. ``--probe-seeds N``
fits every probe with N seeds (its dev speakers, initialization and batch order) and reports their mean: a
probe seed moves keyword spotting by about 1 point, as much as a pre-training seed (BENCHMARKS.md, 2026-12-06).

Controls: ``--random`` evaluates each arm's architecture with random weights (what pre-training adds);
``--wav2vec2`` pre-trains Hugging Face's ``Wav2Vec2ForPreTraining`` of the same size on the same data
for the same CPU-minutes per seed (``benchmarks/hf_wav2vec2.py``, its CPU clock, 1 process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import DEFAULT_DATA, log, speaker_halves  # noqa: E402

from svqmae.tasks.evaluate import evaluate  # noqa: E402

TASKS = ("ks", "digits", "er")


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def difference(a: list[float], b: list[float]) -> dict:
    """a minus b, paired by pre-training seed: the mean, each seed's difference, and a 95% t-interval over
    the seeds (wide with 3 seeds: it counts only the spread between seeds)."""
    d = np.asarray(a) - np.asarray(b)
    h = T975.get(len(d) - 1, 1.96) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "per_seed": d.tolist(), "ci95": [float(d.mean() - h), float(d.mean() + h)]}


def parse_arm(spec: str) -> tuple[str, list[str]]:
    """``NAME=key=value,key=value`` (or ``NAME=``) -> (NAME, overrides)."""
    name, _, rest = spec.partition("=")
    return name, [x for x in rest.split(",") if x]


def pretrain_cmd(sources: list[Path], out: Path, preset: str, overrides: list[str], seed: int, steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "svqmae.cli", "pretrain", "--out", str(out), "--preset", preset,
           "--max-steps", str(steps), "--set", f"train.seed={seed}"]
    for s in sources:
        cmd += ["--data", str(s)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def run(cmd: list[str], threads: int, logfile: Path) -> float:
    """Run a command with ``threads`` threads; returns its CPU seconds (user + system, children included)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_utime + usage.ru_stime


def task_specs(data: Path, out: Path) -> dict[str, dict]:
    """Each task's ``evaluate`` arguments: keyword spotting on speaker-disjoint halves (written to
    OUT/splits), digits 3-fold and emotion 5-fold by speaker."""
    ks_train, ks_test = speaker_halves(data / "speech_commands_dev" / "manifest.tsv", out / "splits")
    return {
        "ks": dict(task="ks", train=str(ks_train), test=str(ks_test)),
        "digits": dict(task="classify", train=str(data / "fsdd" / "manifest.tsv"), folds=3, fold_by="speaker"),
        "er": dict(task="er", train=str(data / "emodb_dev" / "manifest.tsv"), folds=5, fold_by="speaker"),
    }


def dev_accuracy(report: dict) -> float:
    """The probe's accuracy on its dev split (speakers held out of the training side), mean over folds."""
    return float(np.mean([r["dev_accuracy"] for r in report["runs"]]))


def probe(args, arms, sources, out: Path) -> dict[str, float]:
    """CPU seconds per step of each arm: (CPU of 3n steps - CPU of n steps) / 2n, arms interleaved,
    ``--parallel`` probes at a time as the real runs will be."""
    n = args.probe_steps
    jobs = [(name, ov, steps) for steps in (n, 3 * n) for name, ov in arms]
    cache = out / "probe" / "cpu_seconds.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    with ThreadPoolExecutor(args.parallel) as pool:
        def one(job):
            name, ov, steps = job
            key = f"{name}/{steps}"
            if key not in done:
                d = out / "probe" / f"{name}_{steps}"
                done[key] = run(pretrain_cmd(sources, d, args.preset, ov + ["train.val_every=100000"], 0, steps),
                                args.threads, d.parent / f"{name}_{steps}.log")
            return key

        list(pool.map(one, jobs))
    cache.write_text(json.dumps(done, indent=1))
    return {name: (done[f"{name}/{3 * n}"] - done[f"{name}/{n}"]) / (2 * n) for name, _ in arms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                    help="an arm: name and comma-separated --set overrides (the first arm is the reference)")
    ap.add_argument("--minutes", type=float, default=12.0, help="compute budget: this many minutes of the first arm")
    ap.add_argument("--steps", type=int, help="give every arm this many steps instead (no equal-compute probe)")
    ap.add_argument("--probe-steps", type=int, default=60)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--parallel", type=int, default=1, help="pre-trainings running at the same time")
    ap.add_argument("--threads", type=int, default=2, help="threads per pre-training")
    ap.add_argument("--eval-threads", type=int, help="threads of the evaluation after the pre-trainings (default: --threads)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--probe-seeds", type=int, default=1,
                    help="fit each probe with this many seeds (dev split, initialization, batch order) and report "
                         "their mean: a probe seed moves keyword spotting by about 1 point, as much as a pre-training seed")
    ap.add_argument("--no-fbank", action="store_true", help="leave the filterbank baseline out")
    ap.add_argument("--random", action="store_true", help="also each arm's architecture with random weights")
    ap.add_argument("--wav2vec2", action="store_true", help="also wav2vec 2.0 (HF) at the same CPU-minutes per seed")
    ap.add_argument("--data-root", default=str(DEFAULT_DATA))
    args = ap.parse_args()
    arms = [parse_arm(a) for a in (args.arm or ["svqmae=", "encoder_only=model.variant=encoder_only"])]
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    data, out = Path(args.data_root), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = [data / "speechocean762_dev" / "manifest.tsv", data / "aishell1_dev" / "manifest.tsv"]
    t0 = time.monotonic()

    if args.steps:
        steps = {name: args.steps for name, _ in arms}
        cost = {}
    else:
        cost = probe(args, arms, sources, out)
        budget = args.minutes * 60
        steps = {name: max(1, int(round(budget / cost[name]))) for name, _ in arms}
        log("CPU seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in cost.items())
            + " -> steps: " + ", ".join(f"{k} {v}" for k, v in steps.items()))

    jobs = [(name, ov, seed) for seed in seeds for name, ov in arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        def one(job):
            name, ov, seed = job
            d = out / f"{name}_seed{seed}"
            if not (d / "model" / "model.safetensors").is_file():
                run(pretrain_cmd(sources, d, args.preset, ov, seed, steps[name]), args.threads, out / f"{name}_seed{seed}.log")
            return d

        list(pool.map(one, jobs))
    pre_minutes = (time.monotonic() - t0) / 60

    import torch

    from svqmae import config as C
    from svqmae.model import SVQMAE, save_model

    # on a shared machine two threads mostly wait for each other; the evaluation runs alone
    torch.set_num_threads(args.eval_threads or args.threads)
    seeds_of = {name: seeds for name, _ in arms}
    if args.wav2vec2:
        from hf_wav2vec2 import pretrain_wav2vec2

        for seed in seeds:
            d = out / f"wav2vec2_seed{seed}"
            if not (d / "pretrain.json").is_file():
                pretrain_wav2vec2([str(s) for s in sources], d, args.minutes, args.preset, seed=seed, clock="cpu")
            steps.setdefault("wav2vec2", json.loads((d / "pretrain.json").read_text())["steps"])
        seeds_of["wav2vec2"] = seeds
    if args.random:
        for name, ov in arms:
            d = out / f"{name}_random" / "model"
            if not (d / "model.safetensors").is_file():
                cfg = C.resolve(args.preset, overrides=ov)
                torch.manual_seed(0)
                save_model(SVQMAE(cfg.model), cfg, d, card={"steps": 0})
            seeds_of[f"{name}_random"] = [0]
    task_spec = task_specs(data, out)
    models = {(name, seed): str(out / f"{name}_seed{seed}" / "model") for name, _ in arms for seed in seeds}
    for name in seeds_of:
        if name == "wav2vec2":
            models.update({(name, seed): f"hf:{out / f'wav2vec2_seed{seed}'}" for seed in seeds})
        elif name.endswith("_random"):
            models[(name, 0)] = str(out / name / "model")
    if not args.no_fbank:
        models[("fbank", 0)] = "fbank"
        seeds_of["fbank"] = [0]
    results: dict[tuple[str, int, str], dict] = {}
    for (name, seed), spec in models.items():
        for t in tasks:
            ts = task_spec[t]
            opts = {k: v for k, v in ts.items() if k not in ("task", "train", "test")}
            # probe seed 0 keeps the report folder it always had; its interval is the one recorded
            reports = [evaluate(spec, ts["task"], ts["train"], ts.get("test"), seed=p, cache=str(out / "features"),
                                out=str(out / "eval" / (f"{t}_{name}_{seed}" + (f"_p{p}" if p else ""))),
                                progress=False, **opts) for p in range(args.probe_seeds)]
            r = {**reports[0], "value": float(np.mean([x["value"] for x in reports])),
                 "runs": [run for x in reports for run in x["runs"]]}  # dev_accuracy: mean over probe seeds
            results[(name, seed, t)] = r
            log(f"{name} seed {seed} {t}: {100 * r['value']:.1f} (dev {100 * dev_accuracy(r):.1f})"
                + (f" (mean of {args.probe_seeds} probe seeds)" if args.probe_seeds > 1 else ""))

    names = list(seeds_of)
    lines = ["| model | steps | " + " | ".join(f"{t} (mean of seeds; each seed)" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    summary = {}
    for name in names:
        row = [name, str(steps.get(name, "-"))]
        for t in tasks:
            vals = [100 * results[(name, s, t)]["value"] for s in seeds_of[name]]
            summary[(name, t)] = vals
            row.append(f"{np.mean(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})")
        lines.append("| " + " | ".join(row) + " |")
    ref = arms[0][0]
    for name, _ in arms[1:]:
        diffs = []
        for t in tasks:
            d = difference(summary[(ref, t)], summary[(name, t)])
            diffs.append(f"{t} {d['mean']:+.1f} (per seed {', '.join(f'{x:+.1f}' for x in d['per_seed'])}; "
                         f"95% t-interval over seeds [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}])")
        lines.append(f"\n{ref} minus {name}: " + "; ".join(diffs))
    cis = {f"{n}/{s}/{t}": r["ci95"] for (n, s, t), r in results.items()}
    dev = {f"{n}/{s}/{t}": round(100 * dev_accuracy(r), 2) for (n, s, t), r in results.items()}
    # model selection without the test speakers: each arm's dev accuracy (the probes' held-out speakers of
    # the training side), averaged over the tasks and seeds
    selection = {name: round(float(np.mean([dev[f"{name}/{s}/{t}"] for s in seeds_of[name] for t in tasks])), 2)
                 for name in names}
    lines.append("\nmean dev accuracy over tasks (for choosing a setting; test speakers not used): "
                 + ", ".join(f"{k} {v:.1f}" for k, v in selection.items()))
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    note = (f"\nEqual compute: {args.minutes:g} CPU-minutes of {ref} per arm ("
            + (", ".join(f"{k} {v:.3f} CPU-s/step" for k, v in cost.items()) if cost else "fixed steps")
            + f"); {args.parallel} pre-training(s) at a time, {args.threads} thread(s) each; {machine}; "
            f"pre-training took {pre_minutes:.0f} min in all. Accuracy %, test speakers unseen in pre-training.")
    text = "\n".join(lines) + "\n" + note + "\n"
    print(text)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"steps": steps, "seconds_per_step": cost, "args": vars(args),
                                                   "accuracy": {f"{k[0]}/{k[1]}": v for k, v in summary.items()},
                                                   "ci95": cis, "dev_accuracy": dev, "selection": selection},
                                                  indent=1))


if __name__ == "__main__":
    main()
