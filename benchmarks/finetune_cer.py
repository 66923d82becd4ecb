"""Fine-tuning CER: a pre-trained SVQ-MAE encoder vs the same encoder from scratch vs filterbanks.

Three arms, each fine-tuned with CTC (``svqmae finetune``) on the same data with the same budget
(``--max-steps`` and/or ``--max-minutes``, the same ``--set`` overrides) and scored with greedy
decoding (``svqmae score``) on held-out speakers:

* ``pretrained``: the encoder from ``--pretrained DIR`` (e.g. ``svqmae pretrain`` on ../shared/data);
* ``random``: the same architecture, randomly initialised (``--model random``);
* ``fbank``: a BiLSTM (``ctc.lstm_layers`` layers, the encoder's width) on the same stacked 80-bin
  log-mel filterbank tokens at the same 25 Hz frame rate (``--model fbank``) - the classic
  "features, no pre-training" baseline.

Sets, split by speaker (no speaker is both trained and tested on):

* ``aishell1_dev`` (Mandarin, 2 speakers): train on one speaker, test on the other;
* ``speechocean762_dev`` (English by Mandarin speakers, 40 speakers): test on the last 8 speakers
  (sorted by id), train on the other 32.

A dev slice (5% of the training utterances, at least 8) is held out of training for the
per-validation CER in the logs; nothing is selected on it (the last model is scored).

    python benchmarks/finetune_cer.py --pretrained runs/pre/model --out runs/ft_bench --max-steps 3000

prints a markdown table of CER (95% bootstrap interval) per set and arm, and writes
``OUT/results.json``. The ``unseen`` column is the share of test characters that never occur in the
training transcripts (they cannot be recognised: a floor under the CER, large for Mandarin).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

SETS = ("aishell1_dev", "speechocean762_dev")
ARMS = ("pretrained", "random", "fbank")


def split_by_speaker(manifest: Path, out: Path, seed: int = 0) -> dict[str, Path]:
    """Write train/dev/test manifests (absolute paths) for one set; returns their paths."""
    import random

    rows = list(csv.DictReader(manifest.open(encoding="utf-8"), delimiter="\t"))
    rows = [r for r in rows if (r.get("text") or "").strip()]
    speakers = sorted({r["speaker"] for r in rows})
    if len(speakers) < 2:
        raise SystemExit(f"{manifest}: needs at least 2 speakers to split by speaker")
    n_test = 1 if len(speakers) < 5 else max(1, len(speakers) // 5)
    test_spk = set(speakers[-n_test:])
    train = [r for r in rows if r["speaker"] not in test_spk]
    test = [r for r in rows if r["speaker"] in test_spk]
    random.Random(seed).shuffle(train)
    n_dev = max(8, len(train) // 20)
    dev, train = train[:n_dev], train[n_dev:]
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        p = out / f"{manifest.parent.name}_{name}.tsv"
        with p.open("w", encoding="utf-8") as f:
            f.write("path\tseconds\tspeaker\ttext\n")
            for r in part:
                f.write(f"{(manifest.parent / r['path']).resolve()}\t{r['seconds']}\t{r['speaker']}\t{r['text']}\n")
        paths[name] = p
    print(f"{manifest.parent.name}: train {len(train)} utts ({len(speakers) - n_test} speakers), dev {len(dev)}, "
          f"test {len(test)} ({n_test} speakers: {', '.join(sorted(test_spk))})", file=sys.stderr)
    return paths


def run_arm(arm: str, pretrained: str | None, preset: str | None, split: dict[str, Path], out: Path,
            overrides: list[str]) -> dict:
    from svqmae.tasks.decode import Decoder
    from svqmae.tasks.finetune import finetune
    from svqmae.tasks.recognizer import load_recognizer
    from svqmae.tasks.transcribe import score

    model = {"pretrained": pretrained, "random": "random", "fbank": "fbank"}[arm]
    t0 = time.monotonic()
    finetune(model, [str(split["train"])], [str(split["dev"])], out, preset=None if arm == "pretrained" else preset,
             overrides=overrides)
    minutes = (time.monotonic() - t0) / 60
    rec = load_recognizer(out)
    report = score(rec, str(split["test"]), Decoder(rec.units))
    (out / "score.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    n_params = sum(p.numel() for p in rec.model.parameters()) / 1e6
    unseen = sum(report["unseen_characters"].values()) / max(report["characters"], 1)
    steps = json.loads((out / "model" / "config.json").read_text())["card"]["steps"]
    return {"set": split["test"].stem.removesuffix("_test"), "arm": arm, "cer": report["cer"],
            "cer_ci95": report["cer_ci95"], "wer": report["wer"], "unseen_share": unseen, "steps": steps,
            "minutes": minutes, "params_m": n_params, "test_utterances": report["utterances"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained", help="pre-trained model (model/ folder or run DIR); without it that arm is skipped")
    ap.add_argument("--preset", help="architecture of the random/fbank arms (default: the pre-trained model's)")
    ap.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--out", required=True, help="working folder (reruns resume each arm's fine-tuning)")
    ap.add_argument("--max-steps", type=int, required=True, help="the equal budget, in optimizer steps")
    ap.add_argument("--max-minutes", type=float, help="also cap each arm's wall-clock minutes")
    ap.add_argument("--units", choices=["char", "bpe"], default="char")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning overrides, all arms")
    args = ap.parse_args()

    from svqmae import api

    preset = args.preset
    if args.pretrained:
        preset = preset or api.load_config(args.pretrained).preset
    elif "pretrained" in args.arms:
        print("no --pretrained given: skipping the pretrained arm", file=sys.stderr)
        args.arms = [a for a in args.arms if a != "pretrained"]
    preset = preset or "tiny"
    overrides = [f"train.max_steps={args.max_steps}", f"units.kind={args.units}", *args.set]
    if args.max_minutes:
        overrides.append(f"train.max_minutes={args.max_minutes}")
    out = Path(args.out)
    results = []
    for name in args.sets:
        split = split_by_speaker(Path(args.data_root) / name / "manifest.tsv", out / "manifests")
        for arm in args.arms:
            print(f"== {name} / {arm}", file=sys.stderr, flush=True)
            results.append(run_arm(arm, args.pretrained, preset, split, out / name / arm, overrides))
            (out / "results.json").write_text(json.dumps(results, indent=1))

    import torch

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nFine-tuning CER, greedy decoding, {args.max_steps} steps per arm, {args.units} units, {machine}\n")
    print("| set | arm | CER % (95% CI) | WER % | unseen test chars % | steps | minutes | params (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["cer_ci95"]
        print(f"| {r['set']} | {r['arm']} | {100 * r['cer']:.1f} ({100 * lo:.1f}-{100 * hi:.1f}) | {100 * r['wer']:.1f} | "
              f"{100 * r['unseen_share']:.1f} | {r['steps']} | {r['minutes']:.1f} | {r['params_m']:.1f} |")


if __name__ == "__main__":
    main()
