"""Choose each variant's best setting over several ``ablation.py`` runs, once, and compare the two on test.

Every ``--run`` is an ``--out`` folder of ``benchmarks/ablation.py`` (its ``ablation.json``). Each arm is
SVQ-MAE or the encoder-only ablation by its overrides (``model.variant=encoder_only``). Within each
variant the settings are ranked by their mean dev accuracy over tasks, pre-training seeds and probe
seeds (test speakers never choose), the best of each is taken, and their test accuracies are compared
per task: the mean difference over pre-training seeds, each seed's difference, and a 95% t-interval over
the seeds (wide with 3 seeds: it counts only the spread between seeds).

    python benchmarks/choose.py --run runs/s11/c4 --run runs/s11/do ... [--require-probe-seeds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ablation import difference, parse_arm  # noqa: E402


def variant(overrides: list[str]) -> str:
    return "encoder_only" if "model.variant=encoder_only" in overrides else "svqmae"


def load_runs(folders: list[str], probe_seeds: int | None) -> dict[str, dict]:
    """name -> {variant, run, dev, steps, tasks: {task: [test accuracy per pre-training seed]}}."""
    rows: dict[str, dict] = {}
    for folder in folders:
        f = Path(folder) / "ablation.json"
        if not f.is_file():
            raise SystemExit(f"{f}: not found (an ablation.py --out folder is expected)")
        d = json.loads(f.read_text())
        got = d["args"].get("probe_seeds", 1)
        if probe_seeds and got != probe_seeds:
            raise SystemExit(f"{f}: fitted with {got} probe seed(s), {probe_seeds} required")
        for spec in d["args"]["arm"]:
            name, ov = parse_arm(spec)
            if name in rows:
                raise SystemExit(f"{f}: arm {name} also in {rows[name]['run']}")
            tasks = {k.split("/", 1)[1]: v for k, v in d["accuracy"].items() if k.split("/", 1)[0] == name}
            rows[name] = {"variant": variant(ov), "overrides": ",".join(ov), "run": folder, "dev": d["selection"][name],
                          "steps": d["steps"].get(name), "tasks": tasks}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="DIR", help="an ablation.py --out folder")
    ap.add_argument("--require-probe-seeds", type=int, help="refuse runs fitted with another number of probe seeds")
    ap.add_argument("--out", help="write the table and the comparison here as JSON too")
    args = ap.parse_args()
    rows = load_runs(args.run, args.require_probe_seeds)
    tasks = list(next(iter(rows.values()))["tasks"])
    print("| setting | variant | steps | " + " | ".join(f"{t}, each seed (mean)" for t in tasks) + " | mean dev |")
    print("|---|---|---|" + "---|" * len(tasks) + "---|")
    best = {}
    for v in ("svqmae", "encoder_only"):
        names = sorted((n for n in rows if rows[n]["variant"] == v), key=lambda n: -rows[n]["dev"])
        if not names:
            raise SystemExit(f"no {v} arm in the runs given")
        best[v] = names[0]
        for n in names:
            r = rows[n]
            cells = [" / ".join(f"{x:.1f}" for x in r["tasks"][t]) + f" ({np.mean(r['tasks'][t]):.1f})" for t in tasks]
            print(f"| {n} | {v} | {r['steps']} | " + " | ".join(cells) + f" | {r['dev']:.1f} |")
    s, e = best["svqmae"], best["encoder_only"]
    diffs = {t: difference(rows[s]["tasks"][t], rows[e]["tasks"][t]) for t in tasks}
    print(f"\nchosen on dev: {s} ({rows[s]['dev']:.1f}) and {e} ({rows[e]['dev']:.1f})")
    for t, d in diffs.items():
        print(f"{s} minus {e}, {t}: {d['mean']:+.1f} (per seed {' / '.join(f'{x:+.1f}' for x in d['per_seed'])}; "
              f"95% t-interval over seeds [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}])")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "chosen": best, "difference": diffs}, indent=1))


if __name__ == "__main__":
    main()
