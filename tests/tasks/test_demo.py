"""svqmae demo --quick: synthesize, pre-train, evaluate, print the table, write the plots; ``--set``
overrides the demo's own settings."""

from __future__ import annotations

import importlib.util
import json

from svqmae import cli
from svqmae.model import SVQMAE


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    sets = ["train.max_steps=8", "model.features.level=true"]
    assert cli.main(["demo", "--out", str(out), "--quick", *(a for s in sets for a in ("--set", s))]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().strip() in printed
    assert (out / "corpus" / "pretrain.tsv").is_file() and (out / "pretrain" / "model" / "model.safetensors").is_file()
    p = summary["pretrain"]
    assert p["steps"] == 8 and len(p["loss"]) == 2 and "pre-training: 8 steps" in printed  # --set wins
    assert summary["overrides"] == sets
    assert SVQMAE.from_pretrained(out / "pretrain" / "model").cfg.features.level
    assert (out / "plots" / "pretrain_curves.png").is_file() and (out / "plots" / "codebook_usage.png").is_file()
    if importlib.util.find_spec("svqmae.evaluate") is not None:
        models = ("fbank", "fbank-stats", "svqmae")
        got = {(r["task"].split(" (")[0], r["model"]) for r in summary["results"]}
        assert got == {(t, m) for t in ("keyword spotting", "speaking style") for m in models}
        assert all(0.0 <= r["value"] <= 1.0 and r["metric"] == "accuracy" for r in summary["results"])
        assert all(r["ci95"][0] <= r["value"] <= r["ci95"][1] for r in summary["results"])
        for task in ("keyword spotting (12 classes)", "speaking style (4 classes)"):
            rs = {r["model"]: r for r in summary["results"] if r["task"] == task}
            cells = " | ".join(f"{100 * rs[m]['value']:.1f}% [{100 * rs[m]['ci95'][0]:.1f}, "
                               f"{100 * rs[m]['ci95'][1]:.1f}]" for m in models)
            assert f"| {task} | {rs['svqmae']['n_test']} | {cells} |" in printed  # every score with its interval
        assert (out / "plots" / "results.png").is_file()
        assert len(list((out / "eval").glob("*.json"))) == 6


def test_full_demo_tests_on_enough_items_for_a_5_point_interval():
    """The full demo's test sets are big enough that a 95% interval is within about +-5 points whatever the
    accuracy (normal approximation at 50%, the widest)."""
    from svqmae.data.synth import plan
    from svqmae.tasks.demo import FULL, TASKS

    items = plan(FULL.minutes, 0, FULL.test_items)
    for _, folder, _ in TASKS:
        n = sum(u.task == folder and u.split == "test" for u in items)
        assert 1.96 * (0.25 / n) ** 0.5 <= 0.05, (folder, n)


def test_demo_bad_set_fails_before_synthesis(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quick", "--set", "model.encoder.layerz=3"]) != 0
    assert "unknown config key 'model.encoder.layerz'" in capsys.readouterr().err
    assert not (out / "corpus").exists()  # nothing synthesized for a run that cannot start
