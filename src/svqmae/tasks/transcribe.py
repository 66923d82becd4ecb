"""Transcription and scoring with a fine-tuned recognizer: ``svqmae transcribe`` and ``svqmae score``.

Greedy or beam-search CTC decoding (optionally with a KenLM n-gram, :mod:`svqmae.tasks.decode`); long
recordings are decoded in chunks; scoring reports CER and WER (jiwer) with 95% bootstrap intervals,
the characters unseen in fine-tuning and the worst utterances."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import config as C
from ..data import AudioError, DataError, Problems, cut_path, load_cut, load_source
from ..data.text import normalize, words
from ..engine.args import number
from .decode import Decoder
from .evaluate.report import bootstrap_ci
from .outputs import output_file
from .recognizer import Recognizer, load_recognizer


@torch.no_grad()
def transcribe_cuts(rec: Recognizer, cuts, decoder: Decoder, max_batch_seconds: float = 60.0,
                    chunk_seconds: float = 30.0, problems: Problems | None = None) -> list[str | None]:
    """Text for each cut, in order. Long recordings are cut into ``chunk_seconds`` pieces whose CTC
    outputs are joined before decoding; pieces are batched by length. With ``problems``, a file that
    cannot be decoded (truncated, NaN samples, ...) is recorded there and gets None; without, it is an
    ``AudioError``."""
    model = rec.model
    device = next(model.parameters()).device
    sr = rec.cfg.model.features.sample_rate
    step = max(int(chunk_seconds * sr), model.downsample_rate)
    pieces = []  # (cut index, piece index, waveform)
    failed = set()
    for i, cut in enumerate(cuts):
        try:
            x = load_cut(cut, sr)
        except AudioError as e:
            if problems is None:
                raise
            problems.add(cut_path(cut), str(e))
            failed.add(i)
            continue
        pieces += [(i, j, x[k:k + step]) for j, k in enumerate(range(0, len(x), step))]
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    order = sorted(range(len(pieces)), key=lambda p: len(pieces[p][2]))
    while order:
        take = [order.pop(0)]
        while order and len(pieces[order[0]][2]) * (len(take) + 1) <= max_batch_seconds * sr:
            take.append(order.pop(0))
        xs = [torch.from_numpy(pieces[p][2]) for p in take]
        lengths = torch.tensor([len(x) for x in xs])
        waves = nn.utils.rnn.pad_sequence(xs, batch_first=True).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lp, frames = model(waves, lengths.to(device))
        for p, row, n in zip(take, lp, frames.tolist()):
            outputs[pieces[p][:2]] = row[:n].float().cpu()
    texts = []
    for i in range(len(cuts)):
        if i in failed:
            texts.append(None)
            continue
        parts = [outputs[k] for k in sorted(k for k in outputs if k[0] == i)]
        lp = torch.cat(parts)[None]
        texts.append(decoder(lp, torch.tensor([lp.shape[1]]))[0])
    return texts


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TRANSCRIPT_SUFFIXES = (".json", ".tsv", ".txt")


def cmd_transcribe(args) -> None:
    if args.out:  # checked before any work: the transcripts are printed before they are written
        output_file(args.out, "transcripts", suffixes=TRANSCRIPT_SUFFIXES)
    rec = load_recognizer(args.model, _device())
    decoder = Decoder(rec.units, args.beam, args.lm, args.alpha, args.beta)
    problems = Problems()
    cuts = [c for src in args.inputs for c in load_source(src, problems)]
    texts = transcribe_cuts(rec, cuts, decoder, chunk_seconds=args.chunk_seconds, problems=problems)
    for _, reason in problems.items:
        print(f"svqmae transcribe: skipped {reason}", file=sys.stderr)
    rows = [{"path": _cut_path(c), "seconds": round(c.duration, 3), "text": t}
            for c, t in zip(cuts, texts) if t is not None]
    for r in rows:
        print(f"{r['path']}\t{r['text']}", flush=True)
    if args.out:
        write_rows(rows, Path(args.out))
        print(f"svqmae transcribe: {len(rows)} transcripts written to {args.out}", file=sys.stderr)


def _cut_path(cut) -> str:
    p = cut_path(cut)
    return p if not cut.start else f"{p}@{cut.start:.2f}"


def write_rows(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1, ensure_ascii=False), encoding="utf-8")
    elif out.suffix.lower() in TRANSCRIPT_SUFFIXES:
        out.write_text("path\tseconds\ttext\n" + "".join(f"{r['path']}\t{r['seconds']}\t{r['text']}\n" for r in rows),
                       encoding="utf-8")
    else:
        raise C.ConfigError(f"{out}: --out must end in .json or .tsv")


def score(rec: Recognizer, data: str, decoder: Decoder, worst: int = 10) -> dict:
    """CER and WER (jiwer) of ``rec`` on the labelled source ``data``, with 95% bootstrap intervals,
    the characters the model never saw in training, and the worst utterances."""
    import jiwer

    problems = Problems()
    cuts = list(load_source(data, problems))
    refs = [normalize((c.supervisions[0].text or "") if c.supervisions else "", rec.units.lowercase) for c in cuts]
    empty = sum(not r for r in refs)
    cuts = [c for c, r in zip(cuts, refs) if r]
    refs = [r for r in refs if r]
    if not cuts:
        raise DataError(f"{data}: no utterance with a non-empty `text` transcript to score")
    hyps = transcribe_cuts(rec, cuts, decoder)
    unseen: Counter = Counter()
    with_unseen = 0
    rows, ce, cn, we, wn = [], [], [], [], []
    for c, r, h in zip(cuts, refs, hyps):
        miss = rec.units.unseen(r)
        unseen.update(miss)
        with_unseen += bool(miss)
        o = jiwer.process_characters(r, h)
        ce.append(o.substitutions + o.deletions + o.insertions)
        cn.append(o.substitutions + o.deletions + o.hits)
        w = jiwer.process_words(" ".join(words(r)), " ".join(words(h)) or "")
        we.append(w.substitutions + w.deletions + w.insertions)
        wn.append(w.substitutions + w.deletions + w.hits)
        rows.append({"path": _cut_path(c), "ref": r, "hyp": h, "char_errors": ce[-1], "chars": cn[-1],
                     "cer": ce[-1] / max(cn[-1], 1), "unseen": "".join(sorted(set(miss)))})
    ce, cn, we, wn = map(np.asarray, (ce, cn, we, wn))
    report = {
        "model": str(rec.path), "data": str(data), "decoding": {"beam": decoder.beam, "lm": decoder.lm},
        "utterances": len(rows), "skipped_empty_transcripts": empty, "skipped_unreadable": len(problems),
        "cer": float(ce.sum() / max(cn.sum(), 1)), "cer_ci95": bootstrap_ci(ce, cn),
        "wer": float(we.sum() / max(wn.sum(), 1)), "wer_ci95": bootstrap_ci(we, wn),
        "characters": int(cn.sum()), "words": int(wn.sum()),
        "unseen_characters": dict(unseen.most_common()), "utterances_with_unseen_characters": with_unseen,
        "unseen_note": "characters absent from the fine-tuning transcripts cannot be recognised; they stay in "
                       "the references and count as errors",
        "worst": sorted(rows, key=lambda r: (-r["char_errors"], r["path"]))[:worst],
    }
    return report


def cmd_score(args) -> None:
    output_file(args.out, "score")
    rec = load_recognizer(args.model, _device())
    decoder = Decoder(rec.units, args.beam, args.lm, args.alpha, args.beta)
    report = score(rec, args.data, decoder, args.worst)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    lo, hi = report["cer_ci95"]
    print(f"CER {100 * report['cer']:.2f}% (95% CI {100 * lo:.2f}-{100 * hi:.2f}) | "
          f"WER {100 * report['wer']:.2f}% | {report['utterances']} utterances -> {out}")
    if report["skipped_empty_transcripts"]:
        print(f"svqmae score: skipped {report['skipped_empty_transcripts']} utterance(s) with an empty transcript",
              file=sys.stderr)
    if report["unseen_characters"]:
        chars = "".join(report["unseen_characters"])
        print(f"svqmae score: {report['utterances_with_unseen_characters']} reference(s) hold characters unseen in "
              f"fine-tuning ({chars[:40]}); they count as errors (listed in {out})", file=sys.stderr)


# --------------------------------------------------------------------------- command line


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam", type=number(">= 1"), default=1, help="beam width (1: greedy; >1: pyctcdecode beam search)")
    p.add_argument("--lm", metavar="ARPA", help="KenLM n-gram (ARPA or binary) for shallow fusion; needs `pip install kenlm`")
    p.add_argument("--alpha", type=float, default=0.5, help="LM weight (with --lm)")
    p.add_argument("--beta", type=float, default=1.0, help="word insertion bonus (with --lm)")


def add_cli(sub) -> None:
    p = sub.add_parser("transcribe", help="transcribe audio files with a fine-tuned model (text per file on stdout)")
    p.add_argument("--model", required=True, metavar="DIR", help="fine-tuned model (DIR or DIR/model)")
    p.add_argument("inputs", nargs="+", metavar="FILE|FOLDER", help="audio files, folders (recursive) or manifests")
    p.add_argument("--out", metavar="OUT.json|OUT.tsv", help="also write the transcripts to a JSON or TSV file")
    p.add_argument("--chunk-seconds", type=number("> 0", float), default=30.0, help="longer recordings are decoded in pieces")
    _add_decode_args(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("score", help="CER/WER of a fine-tuned model on a labelled source, with 95%% bootstrap intervals")
    p.add_argument("--model", required=True, metavar="DIR", help="fine-tuned model (DIR or DIR/model)")
    p.add_argument("--data", required=True, metavar="SRC", help="labelled source (manifest with a text column)")
    p.add_argument("--out", required=True, metavar="REPORT.json",
                   help="the report: CER, WER, intervals, unseen characters, worst utterances")
    p.add_argument("--worst", type=number(">= 0"), default=10, help="how many of the worst utterances to list")
    _add_decode_args(p)
    p.set_defaults(func=cmd_score)
