"""ASR fine-tuning with CTC: ``svqmae finetune``.

The recognizer (:class:`svqmae.model.ctc.CTCModel`) is the pre-trained encoder plus a linear CTC head
over character or sentencepiece units (:mod:`svqmae.data.text`). Fine-tuning runs on the same engine
as pre-training (:mod:`svqmae.engine`: Lightning, atomic checksummed periodic checkpoints, resume by
rerunning the same command, bf16 on GPU, DDP, accumulation, clipping), with:

* the encoder frozen (only the head trains) for the first ``ctc.freeze_steps`` optimizer steps;
* the encoder's learning rate a share of the head's (``ctc.encoder_lr_ratio``), optionally decaying
  layer by layer towards the input (``ctc.layer_decay``): see :func:`lr_scales`;
* SpecAugment-style time and frequency masking of the filterbank tokens;
* a tri-stage learning-rate schedule (warm-up, hold, exponential decay; wav2vec 2.0's fine-tuning
  recipe) or the pre-training warm-up + cosine decay.

``--model random --preset P`` trains the same architecture from scratch, and ``--model fbank --preset P``
trains a BiLSTM on the same stacked filterbank tokens (the benchmark's feature baseline). The output
``DIR/model/`` is described in :mod:`svqmae.tasks.recognizer`; transcription and scoring are
:mod:`svqmae.tasks.transcribe`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from lhotse import CutSet

from .. import config as C
from ..data import DataError, Problems, ctc_loader, load_source
from ..data.text import build_units, load_units, normalize
from ..engine.args import add_engine_args, add_set_arg, engine_overrides
from ..engine.module import EngineData, EngineModule, is_multi_device, resume_point, run, trainer_kwargs
from ..engine.progress import log, quiet_lightning
from ..engine.schedules import tristage, warmup_cosine
from ..model import SVQMAE, CheckpointError
from ..model.ctc import CTCModel
from .decode import greedy
from .outputs import output_folder
from .recognizer import finetune_config_from_dict, save_recognizer

# --------------------------------------------------------------------------- data


def prepare_cuts(cuts: list, sources: list[str], units, model: CTCModel, cfg: C.FinetuneConfig, role: str,
                 max_seconds: float | None = None) -> CutSet:
    """Normalise the transcripts of ``cuts`` (loaded from ``sources``) and attach their unit ids
    (``custom['units']``); skip (with counts in the log) what cannot be used for CTC: no/empty
    transcript, too long, or a transcript that needs more CTC frames than the audio gives."""
    skipped: Counter = Counter()
    unseen: Counter = Counter()
    kept = []
    sr = cfg.model.features.sample_rate
    for cut in cuts:
        sup = cut.supervisions[0] if cut.supervisions else None
        text = normalize(sup.text or "", units.lowercase) if sup is not None else ""
        if not text:
            skipped["empty or missing transcript"] += 1
            continue
        if max_seconds and cut.duration > max_seconds:
            skipped[f"longer than train.max_utt_seconds={max_seconds:g}"] += 1
            continue
        miss = units.unseen(text)
        unseen.update(miss)
        ids = units.encode(text)
        need = len(ids) + sum(a == b for a, b in zip(ids, ids[1:]))  # a blank between repeats
        have = int(model.frames(torch.tensor(round(cut.duration * sr))))
        if need > have:
            skipped["transcript needs more CTC frames than the audio has"] += 1
            continue
        sup.custom = dict(sup.custom or {}, units=ids, ref=text)
        kept.append(cut)
    n_src = ", ".join(map(str, sources))
    for reason, n in skipped.items():
        hint = (" (raise ctc.upsample, e.g. --set ctc.upsample=2, or use --units bpe)"
                if "CTC frames" in reason else "")
        log(f"{role}: skipped {n} utterance(s): {reason}{hint}")
    if unseen:
        log(f"{role}: {sum(unseen.values())} character(s) unseen in the training transcripts map to <unk>: "
            + " ".join(f"{ch!r}x{n}" for ch, n in unseen.most_common(20)))
    if not kept:
        raise DataError(f"{n_src}: no usable {role} utterance (need audio with a non-empty `text` transcript; "
                        f"skipped: {dict(skipped) or 'none'})")
    return CutSet.from_cuts(kept)


# --------------------------------------------------------------------------- the lightning module


class FinetuneModule(EngineModule):
    CONFIG_KEY = "svqmae_finetune_config"

    def __init__(self, cfg: C.FinetuneConfig, model: CTCModel, units, freeze_steps: int):
        super().__init__(cfg.train)
        self.cfg, self.model, self.units, self.freeze_steps = cfg, model, units, freeze_steps
        self.val_errors = self.val_chars = 0.0

    def _loss(self, batch, generator, freeze=False):
        lp, frames = self.model(batch["waves"], batch["lengths"], generator, freeze)
        loss = F.ctc_loss(lp.transpose(0, 1), batch["targets"], frames, batch["target_lengths"],
                          blank=0, reduction="mean", zero_infinity=True)
        return loss, lp, frames

    def training_step(self, batch, batch_idx):
        step, rank, micro, _ = self.begin_step(batch, batch_idx)
        if batch["waves"].shape[0] == 0:  # every file in the batch failed to load: a zero step
            return self.empty_step()
        frozen = self.encoder_frozen(step)
        loss, _, _ = self._loss(batch, self.generator(1, step, rank, micro), frozen)
        sr = self.cfg.model.features.sample_rate
        self.last_out = {"loss": float(loss.detach()), "audio_seconds": float(batch["lengths"].sum()) / sr,
                         "frozen": frozen}
        self.log("train/loss", loss, on_step=True, batch_size=batch["waves"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        if batch["waves"].shape[0] == 0:
            return
        loss, lp, frames = self._loss(batch, None)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["waves"].shape[0])
        import jiwer

        for hyp, ref in zip((self.units.decode(x) for x in greedy(lp, frames)), batch["refs"]):
            o = jiwer.process_characters(ref, hyp)
            self.val_errors += o.substitutions + o.deletions + o.insertions
            self.val_chars += o.substitutions + o.deletions + o.hits

    def on_validation_epoch_end(self):
        counts = self.trainer.strategy.reduce(torch.tensor([self.val_errors, self.val_chars], device=self.device),
                                              reduce_op="sum")
        if float(counts[1]) > 0:
            self.log("val/cer", float(counts[0] / counts[1]), sync_dist=False)
        self.val_errors = self.val_chars = 0.0

    def progress_record(self, means: dict, last: dict) -> dict:
        return {"loss": means.get("loss"), "frozen": bool(last.get("frozen"))}

    def progress_line(self, rec: dict) -> str:
        return f"ctc {rec['loss']:.3f}" + (" | encoder frozen" if rec["frozen"] else "")

    def encoder_frozen(self, step: int) -> bool:
        """Whether the encoder runs without gradients at optimizer step ``step``: during the first
        ``freeze_steps``, and throughout with ``ctc.encoder_lr_ratio=0``."""
        return step < self.freeze_steps or self.cfg.ctc.encoder_lr_ratio == 0

    def optimized_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def param_groups(self) -> list[dict]:
        """The engine's groups (weight decay on matrices, none on the rest), each split by learning-rate
        share (:func:`lr_scales`) and ordered from the head down, so group 0 is the head's (the ``lr`` in
        the progress log). A group's ``lr`` is ``train.lr`` times its ``lr_scale``; the schedule (LambdaLR)
        multiplies each group's own rate. With one rate for all (``ctc.encoder_lr_ratio`` and
        ``ctc.layer_decay`` 1) the engine's two groups are kept as they are: the layout earlier versions
        saved in their checkpoints, so those resume."""
        groups = super().param_groups()
        c = self.cfg.ctc
        if c.encoder_lr_ratio == 1.0 and c.layer_decay == 1.0:
            return groups
        scales = lr_scales(self.model, c)
        name_of = {id(p): n for n, p in self.optimized_parameters()}
        rank: dict[float, int] = {}  # share -> the highest place (0 = head) of a parameter that has it
        for name in name_of.values():
            r, share = scales[name]
            rank[share] = min(rank.get(share, r), r)
        out = []
        for share in sorted(rank, key=rank.__getitem__):
            for g in groups:
                params = [p for p in g["params"] if scales[name_of[id(p)]][1] == share]
                if params:
                    out.append({**g, "params": params, "lr": self.t.lr * share, "lr_scale": share})
        return out

    def lr_schedule(self):
        return tristage(self.cfg) if self.cfg.ctc.schedule == "tristage" else warmup_cosine(self.cfg.train)

    def checkpoint_config(self) -> dict:
        return C.to_dict(self.cfg)

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        # "svqmae_config" makes the checkpoint loadable by svqmae.load (the fine-tuned encoder)
        checkpoint["svqmae_config"] = C.to_dict(C.Config(preset=self.cfg.preset, model=self.cfg.model,
                                                         train=self.cfg.train))


def lr_scales(model: CTCModel, c: C.CTCConfig) -> dict[str, tuple[int, float]]:
    """Parameter name -> (place from the top, share of ``train.lr``) for every parameter of ``model``.

    The CTC head gets 1 (place 0). The encoder gets ``c.encoder_lr_ratio`` times ``c.layer_decay ** d``:
    d = 0 for its final norm (place 1), ``n - i`` for block i (0-based) of n (place ``1 + n - i``) and
    ``n + 1`` for the front-end embedding and anything else below the blocks (place ``n + 2``), as in
    BEiT / data2vec fine-tuning. The filterbank BiLSTM baseline has no blocks: its whole backbone gets
    ``c.encoder_lr_ratio`` (place 1)."""
    n = model.cfg.model.encoder.layers
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith(CTCModel.HEAD):
            out[name] = (0, 1.0)
            continue
        block = re.match(r"encoder\.blocks\.(\d+)\.", name)
        if model.backbone != "svqmae" or (block is None and name.startswith("encoder.")):
            depth = 0
        elif block is not None:
            depth = n - int(block.group(1))
        else:
            depth = n + 1
        out[name] = (1 + depth, c.encoder_lr_ratio * c.layer_decay ** depth)
    return out


def _describe_lrs(cfg: C.FinetuneConfig) -> str:
    """One log line: the head's and the encoder's learning rates."""
    c, lr = cfg.ctc, cfg.train.lr
    if c.encoder_lr_ratio == 0:
        return f"learning rate {lr:.2g} for the head; encoder frozen throughout (ctc.encoder_lr_ratio=0)"
    text = f"learning rates: head {lr:.2g}, encoder {lr * c.encoder_lr_ratio:.2g}"
    if c.layer_decay != 1.0:
        n, enc = cfg.model.encoder.layers, lr * c.encoder_lr_ratio
        text += (f" times {c.layer_decay:g}^(n - i) for block i of n={n} ({enc * c.layer_decay:.2g} last, "
                 f"{enc * c.layer_decay ** n:.2g} first) and {c.layer_decay:g}^(n + 1) for the embedding "
                 f"({enc * c.layer_decay ** (n + 1):.2g})")
    return text


def _differences(cfg: C.FinetuneConfig):
    """Saved fine-tuning config -> what differs from ``cfg`` in the architecture, units and CTC settings."""

    def differ(saved: dict) -> list[str]:
        old = finetune_config_from_dict(saved, "checkpoint")
        out = C.arch_diff(old.model, cfg.model)
        return out + [f"{k}: {getattr(old, k)!r} != {getattr(cfg, k)!r}" for k in ("units", "ctc")
                      if getattr(old, k) != getattr(cfg, k)]

    return differ


# --------------------------------------------------------------------------- the job


def finetune(model: str, train: list[str], dev: list[str], out: str | Path, preset: str | None = None,
             yaml_files: list[str] | tuple = (), overrides: list[str] | tuple = ()) -> Path:
    """Fine-tune ``model`` (a pre-trained model path, ``random`` or ``fbank``) with CTC on the labelled
    ``train`` sources, validating on ``dev``; rerunning the same call resumes. Returns ``out/model``."""
    quiet_lightning()
    out = output_folder(out, "finetune")
    if model in ("random", "fbank"):
        encoder, backbone = None, "svqmae" if model == "random" else "lstm"
        cfg = C.resolve_finetune(preset, None, yaml_files, overrides)
    else:
        encoder, backbone = SVQMAE.from_pretrained(model), "svqmae"
        if preset and preset != encoder.config.preset:
            raise C.ConfigError(f"--preset {preset}: {model} is a pre-trained {encoder.config.preset} model; "
                                "--preset is only for --model random or fbank")
        cfg = C.resolve_finetune(None, encoder.config, yaml_files, overrides)
    freeze = cfg.ctc.freeze_steps if encoder is not None else 0  # freezing a random encoder is pointless
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    ckpt, start_step = resume_point(out, FinetuneModule.CONFIG_KEY, _differences(cfg))

    # units: built from the training transcripts on the first run, reused on every resume; nothing is
    # written into ``out`` before the data has been read (a run refused for its data leaves no trace)
    problems = Problems()
    unit_file = out / ("units.txt" if cfg.units.kind == "char" else "units.model")
    raw_train = [c for s in train for c in load_source(s, problems)]
    raw_dev = [c for s in dev for c in load_source(s, problems)]
    if unit_file.is_file():
        try:
            units = load_units(out, cfg.units.kind, cfg.units.lowercase)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        texts = [c.supervisions[0].text or "" for c in raw_train if c.supervisions]
        if not any(normalize(t, cfg.units.lowercase) for t in texts):
            raise DataError(f"{', '.join(train)}: no transcripts (the manifest needs a non-empty `text` column)")
        units = build_units(cfg.units.kind, texts, cfg.units.lowercase, cfg.units.vocab_size, cfg.units.min_count)
    log(f"units: {len(units) - 2} {units.kind} units + blank + <unk> (saved to {unit_file})")

    ctc = CTCModel(cfg, len(units), backbone, encoder)
    train_cuts = prepare_cuts(raw_train, train, units, ctc, cfg, "train", cfg.train.max_utt_seconds)
    dev_cuts = prepare_cuts(raw_dev, dev, units, ctc, cfg, "dev")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(C.to_dict(cfg), sort_keys=False, allow_unicode=True))
    if not unit_file.is_file():
        units.save(out)
    for _, reason in problems.items:
        log(f"skipped {reason}")
    hours = sum(c.duration for c in train_cuts) / 3600
    log(f"data: {len(train_cuts)} utterances ({hours:.2f} h) for training, {len(dev_cuts)} for dev")
    n_params = sum(p.numel() for p in ctc.parameters()) / 1e6
    what = {"random": "from scratch", "fbank": "BiLSTM on filterbanks"}.get(model, f"from {model}")
    log(f"model: {cfg.preset} {backbone} {what}, {n_params:.1f}M parameters, "
        f"{1 / (ctc.downsample_rate / cfg.model.features.sample_rate):.0f} CTC frames/s"
        + (f"; encoder frozen for {freeze} steps" if freeze else ""))
    log(_describe_lrs(cfg))

    module = FinetuneModule(cfg, ctc, units, freeze)
    overrides = {}
    if (freeze or cfg.ctc.encoder_lr_ratio == 0) and is_multi_device(trainer_kwargs(cfg.train), cfg.train) and cfg.train.strategy in ("auto", "ddp"):
        overrides["strategy"] = "ddp_find_unused_parameters_true"  # the frozen encoder gets no gradients at first
    data = EngineData(module, lambda start: ctc_loader(train_cuts, cfg.train, shuffle=True, start=start),
                      lambda: ctc_loader(dev_cuts, cfg.train, shuffle=False))
    trainer, progress = run(module, data, out, cfg.train, ckpt, start_step, problems, "finetune", **overrides)

    if trainer.is_global_zero:
        card = {"fine-tuned from": model, "training data": ", ".join(map(str, train)),
                "steps": trainer.global_step, "training hours of audio": f"{hours:.2f}"}
        cer = trainer.callback_metrics.get("val/cer")
        if cer is not None:
            card["dev CER (greedy)"] = f"{float(cer):.4f}"
        save_recognizer(ctc, units, cfg, out / "model", card)
        progress.write_skipped()
        log(f"done at step {trainer.global_step}: recognizer saved to {out / 'model'}")
    return out / "model"


# --------------------------------------------------------------------------- command line


def cmd_finetune(args) -> None:
    overrides = list(args.set) + engine_overrides(args)
    for flag, key in (("units", "units.kind"), ("vocab_size", "units.vocab_size")):
        if getattr(args, flag, None) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    finetune(args.model, args.train, args.dev, args.out, args.preset, args.config, overrides)


def add_cli(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune an encoder into a CTC speech recognizer (resumes if --out has checkpoints)")
    p.add_argument("--model", required=True, metavar="M",
                   help="pre-trained model (model/ folder or run DIR), `random` (same architecture from scratch, "
                        "with --preset) or `fbank` (BiLSTM on filterbanks, with --preset)")
    p.add_argument("--train", action="append", required=True, metavar="SRC",
                   help="labelled source: TSV/CSV manifest with path and text columns, or lhotse manifest (repeatable)")
    p.add_argument("--dev", action="append", required=True, metavar="SRC", help="labelled dev source (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: config, metrics, checkpoints and the recognizer in model/; rerunning with it resumes")
    p.add_argument("--units", choices=["char", "bpe"], help="output units (default char)")
    p.add_argument("--vocab-size", type=int, help="sentencepiece vocabulary size (--units bpe)")
    p.add_argument("--preset", choices=sorted(C.PRESETS), help="architecture for --model random/fbank (default base)")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="YAML overrides (repeatable)")
    add_set_arg(p, "override any setting, e.g. --set ctc.freeze_steps=0 --set train.lr=1e-4 (repeatable)")
    add_engine_args(p)
    p.set_defaults(func=cmd_finetune)
