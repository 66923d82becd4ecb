"""SVQ-MAE against its encoder-only ablation (and any other configuration) at equal pre-training compute,
over several pre-training seeds, on keyword spotting, spoken digits and emotion of unseen speakers.

Equal compute: each arm's cost per step is measured on this machine first (``--probe-steps`` steps of
every arm, interleaved, twice; the median), then every arm gets the step budget that costs the same
seconds as ``--minutes`` of the reference arm (the first one). Runs with step budgets are immune to
other load on a shared machine, and each arm's learning rate decays over its own steps.

    python benchmarks/ablation.py --out runs/ablation --minutes 12 --seeds 0,1,2 \\
        --arm svqmae= --arm encoder_only=model.variant=encoder_only --parallel 2 --threads 1

Tasks (frozen features, SUPERB-style, head learning rate chosen on dev): 12-class keyword spotting on
speech_commands_dev (speaker-disjoint halves), digits on fsdd (3-fold by speaker) and emotion on
emodb_dev (5-fold by speaker: every test actor unseen). Pre-training data: speechocean762_dev and
aishell1_dev (none of the test speakers). Writes OUT/ablation.md and OUT/ablation.json.
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


def run(cmd: list[str], threads: int, logfile: Path) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "a") as f:
        subprocess.run(cmd, check=True, env=env, stdout=f, stderr=subprocess.STDOUT)


def seconds_per_step(run_dir: Path) -> float:
    """From a probe run's metrics: seconds per step after the first logged window (start-up excluded)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    (a, b) = rows[0], rows[-1]
    return (b["elapsed_s"] - a["elapsed_s"]) / max(b["step"] - a["step"], 1)


def probe(args, arms, sources, out: Path) -> dict[str, float]:
    """Seconds per step of each arm: ``probe_steps`` steps, arms interleaved, twice; the median of the
    parallel slots' measurements (the probes run ``--parallel`` at a time, as the real runs will)."""
    cost: dict[str, list[float]] = {name: [] for name, _ in arms}
    jobs = [(name, ov, rep) for rep in range(2) for name, ov in arms]
    with ThreadPoolExecutor(args.parallel) as pool:
        def one(job):
            name, ov, rep = job
            d = out / "probe" / f"{name}_{rep}"
            if not (d / "model").is_dir():
                run(pretrain_cmd(sources, d, args.preset, ov + ["train.log_every=5"], 0, args.probe_steps),
                    args.threads, d.parent / f"{name}_{rep}.log")
            return name, seconds_per_step(d)

        for name, s in pool.map(one, jobs):
            cost[name].append(s)
    return {k: float(np.median(v)) for k, v in cost.items()}


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
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--no-fbank", action="store_true", help="leave the filterbank baseline out")
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
        log("seconds per step: " + ", ".join(f"{k} {v:.3f}" for k, v in cost.items())
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

    ks_train, ks_test = speaker_halves(data / "speech_commands_dev" / "manifest.tsv", out / "splits")
    task_spec = {
        "ks": dict(task="ks", train=str(ks_train), test=str(ks_test)),
        "digits": dict(task="classify", train=str(data / "fsdd" / "manifest.tsv"), folds=3, fold_by="speaker"),
        "er": dict(task="er", train=str(data / "emodb_dev" / "manifest.tsv"), folds=5, fold_by="speaker"),
    }
    models = {(name, seed): str(out / f"{name}_seed{seed}" / "model") for name, _ in arms for seed in seeds}
    if not args.no_fbank:
        models[("fbank", 0)] = "fbank"
    results: dict[tuple[str, int, str], dict] = {}
    for (name, seed), spec in models.items():
        for t in tasks:
            ts = task_spec[t]
            opts = {k: v for k, v in ts.items() if k not in ("task", "train", "test")}
            r = evaluate(spec, ts["task"], ts["train"], ts.get("test"), out=str(out / "eval" / f"{t}_{name}_{seed}"),
                         cache=str(out / "features"), progress=False, **opts)
            results[(name, seed, t)] = r
            log(f"{name} seed {seed} {t}: {100 * r['value']:.1f}")

    names = [name for name, _ in arms] + ([] if args.no_fbank else ["fbank"])
    lines = ["| model | steps | " + " | ".join(f"{t} (mean of seeds; each seed)" for t in tasks) + " |",
             "|---|---|" + "---|" * len(tasks)]
    summary = {}
    for name in names:
        row = [name, str(steps.get(name, "-"))]
        for t in tasks:
            vals = [100 * results[(name, s, t)]["value"] for s in (seeds if name != "fbank" else [0])]
            summary[(name, t)] = vals
            row.append(f"{np.mean(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})")
        lines.append("| " + " | ".join(row) + " |")
    ref = arms[0][0]
    for name, _ in arms[1:]:
        diffs = []
        for t in tasks:
            d = [a - b for a, b in zip(summary[(ref, t)], summary[(name, t)])]
            diffs.append(f"{t} {np.mean(d):+.1f} (per seed {', '.join(f'{x:+.1f}' for x in d)})")
        lines.append(f"\n{ref} minus {name}: " + "; ".join(diffs))
    cis = {f"{n}/{s}/{t}": r["ci95"] for (n, s, t), r in results.items()}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    note = (f"\nEqual compute: {args.minutes:g} min of {ref} per arm ("
            + (", ".join(f"{k} {v:.3f} s/step" for k, v in cost.items()) if cost else "fixed steps")
            + f"); {args.parallel} pre-training(s) at a time, {args.threads} thread(s) each; {machine}; "
            f"pre-training took {pre_minutes:.0f} min in all. Accuracy %, test speakers unseen in pre-training.")
    text = "\n".join(lines) + "\n" + note + "\n"
    print(text)
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"steps": steps, "seconds_per_step": cost, "args": vars(args),
                                                   "accuracy": {f"{k[0]}/{k[1]}": v for k, v in summary.items()},
                                                   "ci95": cis}, indent=1))


if __name__ == "__main__":
    main()
