"""Helpers of ``benchmarks/gpu_check.sh``: find (or make) the pre-training data, and summarize the results.

    python benchmarks/gpu_check.py data OUTDIR       # prints one --data argument per line
    python benchmarks/gpu_check.py summary OUTDIR    # OUTDIR/summary.md + summary.json, printed

The summary reads what each part left in OUTDIR (the throughput JSON files, or the JSON lines of their
logs when a part was cut short; the pre-training runs' metrics.jsonl; auto_batch.json; status.tsv) and
checks the issue's goals: BASE MFU >= 40% of the measured bf16 matmul peak, BASE >= 50x and tiny >= 150,000
audio-s/s (one H100/H200), and the speed paths' pre-training loss falling as the plain path's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SETS = ("speech_commands_dev", "speechocean762_dev")
GOALS = {"base_mfu": 0.40, "base_vs_w2v": 50.0, "tiny_audio_s_per_s": 150_000.0}
LOSS_TOLERANCE = 0.05  # the speed paths' final pre-training loss within 5% of the plain path's


def find_data(out: Path) -> list[str]:
    """The shared manifests (SVQMAE_DATA, shared/data, ../shared/data, /work/shared/data), else a synthetic
    corpus of harmonic tones written to OUT/data (enough to see a loss fall)."""
    import os

    here = Path(__file__).resolve().parents[1]
    for root in (os.environ.get("SVQMAE_DATA"), here / "shared" / "data", here.parent / "shared" / "data",
                 "/work/shared/data"):
        if root and all((Path(root) / s / "manifest.tsv").is_file() for s in SETS):
            return [str(Path(root) / s / "manifest.tsv") for s in SETS]
    import soundfile as sf

    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(400):
        n = int(16000 * rng.uniform(1.0, 6.0))
        t = np.arange(n) / 16000
        f0 = rng.uniform(90, 260) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        phase = 2 * np.pi * np.cumsum(f0) / 16000
        x = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)) ** 2
        x = 0.3 * x / (np.abs(x).max() + 1e-9) + 0.003 * rng.standard_normal(n)
        sf.write(str(folder / f"tone{i:04d}.wav"), x.astype(np.float32), 16000)
    return [str(folder)]


def _rows(out: Path) -> tuple[list[dict], float]:
    """Throughput rows and the best measured matmul peak, from the JSON files or, failing them, the logs."""
    rows, peaks = [], []
    for size in ("tiny", "base"):
        path = out / f"throughput_{size}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            rows += data["rows"]
            peaks.append(data["peak_flops"])
            continue
        log = out / f"throughput_{size}.log"
        found: dict = {}
        for line in log.read_text().splitlines() if log.is_file() else []:
            if line.startswith("{"):
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if "peak_flops" in r:
                    peaks.append(r["peak_flops"])
                elif "model" in r:
                    key = (r["model"], r["path"])
                    if key not in found or r["audio_s_per_s"] > found[key]["audio_s_per_s"]:
                        found[key] = r
        rows += list(found.values())
    peak = max(peaks) if peaks else float("nan")
    for r in rows:
        r["mfu"] = r["flops_per_s"] / peak
    return rows, peak


def _losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs if r.get("loss") is not None}


def _rate(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rates = [r["audio_seconds_per_s"] for r in recs if "audio_seconds_per_s" in r][2:]  # past compilation
    return float(np.median(rates)) if rates else None


def summary(out: Path) -> dict:
    lines, verdicts = ["# GPU check", ""], {}
    status = out / "status.tsv"
    if status.is_file():
        lines += ["| part | exit status | seconds |", "|---|---|---|"]
        lines += ["| " + " | ".join(line.split("\t")) + " |" for line in status.read_text().splitlines() if line.strip()]
        lines.append("")
    env = out / "env.log"
    if env.is_file():
        lines += ["```", *env.read_text().strip().splitlines()[-6:], "```", ""]

    rows, peak = _rows(out)
    lines += [f"## Throughput (matmul peak measured in this run: {peak / 1e12:.3g} TFLOP/s)", "",
              "| size | model | path | batch | audio-s / s | vs wav2vec 2.0 | step (s) | peak mem (GiB) | "
              "model GFLOP / step | MFU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = next((x for x in rows if x["model"] == "wav2vec2" and x["size"] == r["size"]), None)
        r["vs_wav2vec2"] = r["audio_s_per_s"] / ref["audio_s_per_s"] if ref else None
        ratio = f"{r['vs_wav2vec2']:.1f}x" if ref else "-"
        lines.append(f"| {r['size']} | {r['model']} | {r['path']} | {r['batch']} | {r['audio_s_per_s']:,.0f} | {ratio} | "
                     f"{r['step_s']:.3f} | {r['peak_mem_gb']:.1f} | {r['flops_per_step'] / 1e9:,.0f} | "
                     f"{100 * r['mfu']:.1f}% |")
    on_gpu = env.is_file() and "cuda True" in env.read_text()
    fast = {r["size"]: r for r in rows if r["model"] == "svqmae" and r["path"] == "fast"} if on_gpu else {}
    base, tiny = fast.get("base"), fast.get("tiny")  # the goals are GPU figures: not measured on a CPU
    verdicts["base_mfu"] = None if base is None else base["mfu"] >= GOALS["base_mfu"]
    verdicts["base_vs_w2v"] = None if base is None or base["vs_wav2vec2"] is None else \
        base["vs_wav2vec2"] >= GOALS["base_vs_w2v"]
    verdicts["tiny_audio_s_per_s"] = None if tiny is None else tiny["audio_s_per_s"] >= GOALS["tiny_audio_s_per_s"]
    base_ratio = "-" if not base or base.get("vs_wav2vec2") is None else f"{base['vs_wav2vec2']:.1f}x"
    tiny_rate = "-" if not tiny else f"{tiny['audio_s_per_s']:,.0f}"
    lines += ["", f"- BASE MFU >= 40%: {_fmt(verdicts['base_mfu'])} ({_pct(base, 'mfu')})",
              f"- BASE >= 50x wav2vec 2.0 BASE: {_fmt(verdicts['base_vs_w2v'])} ({base_ratio})",
              f"- tiny >= 150,000 audio-s/s: {_fmt(verdicts['tiny_audio_s_per_s'])} ({tiny_rate})", ""]

    on, off = _losses(out / "pretrain_on"), _losses(out / "pretrain_off")
    lines += ["## 2-minute tiny pre-training, speed paths on and off (same data, seed and step schedule)", ""]
    common = sorted(set(on) & set(off))
    if common:
        last = common[-max(1, len(common) // 5):]  # the last fifth of the steps both reached
        mean_on, mean_off = (float(np.mean([x[s] for s in last])) for x in (on, off))
        verdicts["loss_like_plain"] = mean_on <= mean_off * (1 + LOSS_TOLERANCE)
        marks = [s for s in common if s in (1, 10) or s % max(1, common[-1] // 8) == 0][:12]
        marks += [common[-1]] if common[-1] not in marks else []
        lines += ["| step | " + " | ".join(str(s) for s in marks) + " |", "|---" * (len(marks) + 1) + "|",
                  "| loss, on | " + " | ".join(f"{on[s]:.3f}" for s in marks) + " |",
                  "| loss, off | " + " | ".join(f"{off[s]:.3f}" for s in marks) + " |", "",
                  f"- steps reached: on {max(on)}, off {max(off)}; audio-s/s (median): on {_num(_rate(out / 'pretrain_on'))}, "
                  f"off {_num(_rate(out / 'pretrain_off'))}",
                  f"- mean loss over steps {last[0]}-{last[-1]}: on {mean_on:.3f}, off {mean_off:.3f}: "
                  f"{_fmt(verdicts['loss_like_plain'])} (on within {100 * LOSS_TOLERANCE:.0f}% of off)", ""]
    else:
        verdicts["loss_like_plain"] = None
        lines += [f"- no common logged steps (on: {len(on)} records, off: {len(off)})", ""]

    auto = out / "auto" / "auto_batch.json"
    lines += ["## Automatic batch (train.max_batch_seconds=auto, BASE, 15 s utterances, margin 0.7)", ""]
    if auto.is_file():
        a = json.loads(auto.read_text())
        verdicts["auto_batch"] = a.get("max_batch_seconds", 0) > 0
        tried = ", ".join(f"{t['utterances']}: " + ("OOM" if t["peak_bytes"] is None else f"{t['peak_bytes'] / 2**30:.1f} GiB")
                          for t in a.get("tried", []))
        lines += [f"- {a['max_batch_seconds']:g} s of audio per batch ({a.get('utterances')} utterances), found in "
                  f"{a.get('search_seconds', '?')} s over {len(a.get('tried', []))} trials (utterances: peak): {tried}", ""]
    else:
        verdicts["auto_batch"] = None
        lines += ["- no auto_batch.json (see auto.log; on a CPU there is no search)", ""]
    lines += ["## Verdicts", "", *(f"- {k}: {_fmt(v)}" for k, v in verdicts.items())]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"peak_flops": peak, "rows": rows, "verdicts": verdicts}, indent=1))
    print(text)
    return verdicts


def _fmt(v) -> str:
    return "not measured" if v is None else ("PASS" if v else "FAIL")


def _pct(r, key) -> str:
    return "-" if not r else f"{100 * r[key]:.1f}%"


def _num(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


if __name__ == "__main__":
    cmd, folder = sys.argv[1], Path(sys.argv[2])
    if cmd == "data":
        print("\n".join(find_data(folder)))
    elif cmd == "summary":
        summary(folder)
    else:
        sys.exit(f"unknown command {cmd!r} (data | summary)")
