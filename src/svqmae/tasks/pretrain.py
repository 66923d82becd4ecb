"""Pre-training: SVQ-MAE (or its encoder-only ablation) on unlabeled audio, ``svqmae pretrain``.

One CPU, one GPU, several GPUs or nodes (DDP via ``--devices``/``--num-nodes``, torchrun or SLURM),
bf16 autocast, gradient accumulation, clipping, AdamW with warm-up and cosine decay, a held-out
validation slice with fixed masks, budgets in steps and minutes, atomic checksummed periodic
checkpoints, and resume-by-rerunning the same command, all from :mod:`svqmae.engine`. Runs survive
preemption, non-finite losses, out-of-memory batches, hung ranks and full disks.

Exactness: masks and dropout are pure functions of (seed, step, rank, micro-batch) and a resumed run
skips the batches it already trained on, so a run killed at any step and resumed reaches the same
weights as an uninterrupted one (CPU, ``num_workers`` any).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from .. import config as C
from ..data import (
    AudioError,
    DataError,
    Problems,
    load_cut,
    load_sources,
    pretrain_loader,
    resolve_workers,
    split_heldout,
)
from ..data.loader import check_heldout_size, shar_loader
from ..data.shar import is_shar, open_shars, shar_heldout
from ..engine.args import add_config_args, add_engine_args, add_fault_injection_arg, resolve_args
from ..engine.autobatch import resolve_batch_seconds
from ..engine.checkpoint import TrainingAborted
from ..engine.faults import forward_with_oom_retry, free_memory
from ..engine.module import EngineData, EngineModule, resume_point, run
from ..engine.progress import log, quiet_lightning
from ..engine.schedules import warmup_cosine
from ..engine.speed import apply_speed, device_type
from ..model import SVQMAE, save_model
from .outputs import output_folder

# --------------------------------------------------------------------------- lightning module


class PretrainModule(EngineModule):
    def __init__(self, cfg: C.Config, faults_record: Path | None = None):
        super().__init__(cfg.train, faults_record)
        self.cfg = cfg
        self.model = SVQMAE(cfg.model)
        self.quantizer_stats: dict | None = None  # the learned quantizer's EMA statistics of this optimizer step
        self.retry = None  # (forward, batch) of the step, should its backward pass run out of memory

    def training_step(self, batch, batch_idx):
        step, rank, micro, faults = self.begin_step(batch, batch_idx)
        if batch["waves"].shape[0] == 0:  # every file in the batch failed to load: a zero step
            return self.empty_step()
        armed = [faults is not None]

        def forward(b):  # its masks come from (step, rank, micro, part): the same when recomputed
            if armed[0] and faults.take("oom", step + 1):
                raise torch.OutOfMemoryError("injected out-of-memory (--inject-fault oom)")
            return self.model(b["waves"], torch.tensor(_host_lengths(b)),
                              self.generator(1, step, rank, micro, *b.get("part", ())))

        out = forward_with_oom_retry(forward, batch, _split_batch, _combine_outputs, self._oom_advice(),
                                     on_retry=lambda: self._on_oom(step + 1, batch))
        armed[0] = False
        self.retry = (forward, batch, step + 1, faults)
        if "quantizer_stats" in out:  # applied once per optimizer step (on_before_optimizer_step)
            self.quantizer_stats = _add_stats(self.quantizer_stats, out.pop("quantizer_stats"))
        if faults is not None and faults.take("nan", step + 1):
            out["loss"] = out["loss"] * float("nan")
        self.last_out = {k: v.detach() for k, v in out.items()}  # read on the host only when logged
        self.last_out["audio_seconds"] = sum(_host_lengths(batch)) / self.cfg.model.features.sample_rate
        self.log_dict({f"train/{k}": v for k, v in out.items() if k not in ("tokens", "visible_tokens")},
                      on_step=True, prog_bar=False, batch_size=batch["waves"].shape[0])
        return out["loss"]

    def _oom_advice(self) -> str:
        t, b = self.cfg.train, self.batch_seconds
        return (f"lower train.max_batch_seconds (now {b:g}; e.g. --set train.max_batch_seconds="
                f"{max(t.max_utt_seconds, b / 2):g}) and raise train.accumulate to keep the "
                f"effective batch, or lower train.max_utt_seconds (now {t.max_utt_seconds:g}); then rerun to resume")

    @property
    def batch_seconds(self) -> float:
        """``train.max_batch_seconds`` as the run uses it (an automatic one resolved)."""
        b = getattr(self, "resolved_batch_seconds", None) or self.cfg.train.max_batch_seconds
        return b if b != "auto" else C.preset_batch_seconds(self.cfg.preset)

    def _on_oom(self, step: int, batch, where: str = "") -> None:
        self.oom_retries += 1
        secs = sum(_host_lengths(batch)) / self.cfg.model.features.sample_rate
        print(f"[rank {self.global_rank}] step {step}: out of memory{where} on a batch of {batch['waves'].shape[0]} "
              f"utterances ({secs:.0f} s of audio); retrying it split in two ({self.oom_retries} so far)",
              file=sys.stderr, flush=True)
        if batch["waves"].shape[0] < 2:
            raise TrainingAborted(f"step {step}: out of memory on a single utterance; {self._oom_advice()}")

    def backward(self, loss, *args, **kwargs):
        """Backward; on out-of-memory, drop the step's graph and gradients and redo the batch split in two
        (activation checkpointing, as a forward out-of-memory does). Possible when this is the step's only
        backward so far (no gradients accumulated from earlier micro-batches) on a single device."""
        fresh = all(p.grad is None for p in self.model.parameters())
        forward, batch, step, faults = self.retry or (None, None, self.global_step + 1, None)
        self.retry = None  # the batch is not kept past its step
        try:
            with _injected_backward_oom(self.model, faults is not None and faults.take("oom_backward", step)):
                return super().backward(loss, *args, **kwargs)
        except torch.OutOfMemoryError:
            if forward is None or not fresh or self.trainer.world_size > 1:
                why = "several devices" if self.trainer.world_size > 1 else "gradients of earlier micro-batches"
                raise TrainingAborted(f"step {step}: out of memory in the backward pass ({why}: it cannot be "
                                      f"retried); {self._oom_advice()}") from None
        loss.detach_()  # Lightning still holds the loss: detaching it frees the graph and its activations
        self.model.zero_grad(set_to_none=True)  # what the failed pass had accumulated
        free_memory()
        self._on_oom(step, batch, " in the backward pass")
        with self.trainer.precision_plugin.forward_context():
            out = forward_with_oom_retry(forward, batch, _split_batch, _combine_outputs, self._oom_advice(),
                                         split_first=True)  # its quantizer statistics were kept the first time
        try:
            super().backward(out["loss"], *args, **kwargs)
        except torch.OutOfMemoryError:
            raise TrainingAborted(f"step {step}: out of memory again in the backward pass of a batch split in two; "
                                  f"{self._oom_advice()}") from None

    def on_before_optimizer_step(self, optimizer):
        """The learned quantizer's EMA step: once per optimizer step (whatever the micro-batches, retries or
        recomputations), not on a step skipped as non-finite."""
        if self.quantizer_stats is not None:
            self.model.quantizer.apply_update(self.quantizer_stats, skip=self.update_skipped)
            self.quantizer_stats = None

    def validation_step(self, batch, batch_idx):
        if batch["waves"].shape[0] == 0:
            return
        out = self.model(batch["waves"], torch.tensor(_host_lengths(batch)), self.generator(2, batch_idx))  # fixed masks
        n = batch["waves"].shape[0]
        for k in ("loss", "masked_acc", "code_perplexity"):
            self.log(f"val/{k}", out[k], on_epoch=True, sync_dist=True, batch_size=n)

    def progress_record(self, means: dict, last: dict) -> dict:
        rec = {k: means.get(k) for k in ("loss", "masked_acc", "ce", "code_perplexity", "code_usage")}
        rec["visible_share"] = means.get("visible_tokens", 0) / max(means.get("tokens", 1), 1)
        if "recon" in means:
            rec["recon"] = means["recon"]
        return rec

    def progress_line(self, rec: dict) -> str:
        return f"loss {rec['loss']:.3f} | acc {rec['masked_acc']:.3f} | ppl {rec['code_perplexity']:.0f}"

    def lr_schedule(self):
        return warmup_cosine(self.cfg.train, self.clock.elapsed)

    def checkpoint_config(self) -> dict:
        return C.to_dict(self.cfg)


def _host_lengths(batch: dict) -> tuple[int, ...]:
    """The batch's lengths in samples, on the host: ``host_lengths`` (kept there by the engine when the batch
    moves to the device), else read from ``lengths``."""
    return tuple(batch["host_lengths"]) if "host_lengths" in batch else tuple(batch["lengths"].tolist())


def _split_batch(batch: dict) -> list[dict]:
    """A padded batch -> two halves (by utterance), each trimmed to its own longest utterance."""
    half = (batch["waves"].shape[0] + 1) // 2
    host = _host_lengths(batch)
    parts = []
    for i, sl in enumerate((slice(0, half), slice(half, None))):
        part = {"waves": batch["waves"][sl, : max(host[sl])], "lengths": batch["lengths"][sl], "part": (i + 1,)}
        parts.append(dict(part, host_lengths=host[sl]))
    return parts


def _add_stats(a: dict | None, b: dict) -> dict:
    """The learned quantizer's EMA statistics of two batches together (counts and sums add up)."""
    if a is None:
        return b
    return {"count": a["count"] + b["count"], "total": a["total"] + b["total"], "spare": a["spare"]}


class _injected_backward_oom:
    """``--inject-fault oom_backward@STEP``: an out-of-memory error in the middle of the backward pass (once
    part of the gradients exist), raised from a hook on the first encoder block's weights."""

    def __init__(self, model, fire: bool):
        self.model, self.fire, self.handle = model, fire, None

    def __enter__(self):
        if self.fire:
            def hook(grad):
                raise torch.OutOfMemoryError("injected out-of-memory in the backward pass (--inject-fault oom_backward)")
            self.handle = self.model.encoder.blocks[0].qkv.weight.register_hook(hook)

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


def _combine_outputs(outs: list[dict]) -> dict:
    """Per-part outputs -> the batch's: losses and accuracies weighted by masked tokens (so the loss is
    the batch's mean over masked tokens, as without the split), counts summed, the rest averaged."""
    w = [o["tokens"] - o["visible_tokens"] for o in outs]
    total = sum(w)
    combined = {}
    for k in outs[0]:
        if k == "quantizer_stats":
            combined[k] = _add_stats(outs[0][k], outs[1][k]) if len(outs) == 2 else outs[0][k]
        elif k in ("tokens", "visible_tokens"):
            combined[k] = sum(o[k] for o in outs)
        elif k in ("loss", "ce", "masked_acc", "recon"):
            combined[k] = sum(o[k] * wi for o, wi in zip(outs, w)) / total.clamp_min(1)
        else:
            combined[k] = sum(o[k] for o in outs) / len(outs)
    return combined


# --------------------------------------------------------------------------- the job


def model_differences(cfg: C.Config):
    """Saved checkpoint config -> the model fields that differ from ``cfg`` (a resume must match)."""
    return lambda saved: C.diff(C.from_dict(saved, "checkpoint"), cfg, "model")


def final_metrics(out: Path) -> dict[str, str]:
    """The last logged training and validation figures of a run, for the model card."""
    from ..engine.plots import read_metrics

    rows = read_metrics(out)
    names = {"loss": "final training loss", "masked_acc": "final training masked-code accuracy",
             "val_loss": "final validation loss", "val_masked_acc": "final validation masked-code accuracy"}
    last = {k: next((r[k] for r in reversed(rows) if k in r), None) for k in names}
    return {names[k]: f"{v:.4f}" for k, v in last.items() if isinstance(v, (int, float))}


def estimate_global_stats(model: SVQMAE, cuts, max_cuts: int = 256) -> tuple[int, float]:
    """Set ``model.frontend``'s corpus statistics (``model.features.norm: global``) from the log-mel
    frames of the first ``max_cuts`` cuts (at most 30 s each). Returns (cuts, hours) used."""
    sr = model.cfg.features.sample_rate
    total, sq, frames, used, seconds = 0.0, 0.0, 0, 0, 0.0
    with torch.no_grad():
        for cut in cuts:
            if used >= max_cuts:
                break
            try:
                x = torch.from_numpy(load_cut(cut, sr)[: 30 * sr])[None]
            except AudioError:
                continue
            feats, n = model.frontend.log_mel(x, torch.tensor([x.shape[1]]))
            f = feats[0, : int(n[0])].double()  # (N, F)
            total, sq, frames = total + f.sum(0), sq + (f**2).sum(0), frames + f.shape[0]
            used, seconds = used + 1, seconds + x.shape[1] / sr
    if not frames:
        raise DataError("no readable audio to estimate the filterbank statistics from (model.features.norm=global)")
    mean = total / frames
    std = (sq / frames - mean**2).clamp_min(0).sqrt()
    model.frontend.set_global_stats(mean.float(), std.float())
    return used, seconds / 3600


def training_data(sources: list[str], out: Path, t: C.TrainConfig, problems: Problems, module: PretrainModule):
    """-> (train_loader(start), held-out cuts, training hours or None when streamed, a sample of cuts
    to estimate filterbank statistics from (``model.features.norm=global``)).

    In-memory sources (folders, small manifests) are read whole; a folder's probe is cached in
    ``out/data_cache`` so that a resume does not probe again. Large manifests stay lazy; Shar
    directories are streamed (every source must then be one)."""
    min_s = t.min_utt_seconds
    where = ", ".join(map(str, sources))
    if any(is_shar(s) for s in sources):
        if not all(is_shar(s) for s in sources):
            raise DataError(f"{where}: Shar directories cannot be mixed with other sources in one run; shard them "
                            f"together (svqmae data shard SRC... --out DIR)")
        shar = open_shars(sources)
        val_cuts = shar_heldout(shar, t.val_items, min_s)
        held = frozenset(c.id for c in val_cuts)
        module.streamed = True
        log(f"data: {shar.describe()}, streamed; {len(val_cuts)} held out")

        def train_loader(start):
            return shar_loader(shar, module.resolved_batch_seconds, t.max_utt_seconds, t.num_buckets, t.num_workers, t.seed,
                               t.stream_buffer, exclude=held, min_seconds=min_s, resume=module.stream_saved,
                               speed=t.speed_perturb)

        return train_loader, val_cuts, shar.hours, val_cuts  # a stream's sample: the held-out slice
    cuts = load_sources(sources, problems, cache=out / "data_cache")
    for _, reason in problems.items:
        log(f"skipped {reason}")
    note = f"; {len(problems)} unreadable files skipped" if len(problems) else ""
    if cuts.is_lazy:
        train_cuts, val_cuts = split_heldout(cuts.filter(lambda c: c.duration >= min_s), t.val_items)
        hours = None
        log(f"data: {where}, read lazily (streamed); {len(val_cuts)} held out{note}")
    else:
        cuts = cuts.filter(lambda c: c.duration >= min_s).to_eager()
        if len(cuts) == 0:
            raise DataError(f"{where}: no utterance of at least {min_s} s to train on")
        check_heldout_size(len(cuts), t.val_items, where)
        train_cuts, val_cuts = split_heldout(cuts, t.val_items)
        hours = sum(c.duration for c in train_cuts) / 3600
        log(f"data: {len(train_cuts)} utterances ({hours:.2f} h) for training, {len(val_cuts)} held out{note}")

    def train_loader(start):
        return pretrain_loader(train_cuts, module.resolved_batch_seconds, t.max_utt_seconds, t.num_buckets,
                               t.num_workers, t.seed, shuffle=True, start=start, buffer_size=t.stream_buffer,
                               speed=t.speed_perturb)

    return train_loader, val_cuts, hours, train_cuts


def pretrain(sources: list[str], out: str | Path, cfg: C.Config) -> Path:
    """Pre-train on ``sources`` into ``out``; rerunning the same call resumes. Returns ``out/model``."""
    out = output_folder(out, "pretrain")
    quiet_lightning()
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    ckpt, start_step = resume_point(out, PretrainModule.CONFIG_KEY, model_differences(cfg))

    problems = Problems()
    module = PretrainModule(cfg, faults_record=out / "faults_fired.json")
    fresh = not out.exists()
    try:
        train_loader, val_cuts, hours, sample = training_data(sources, out, cfg.train, problems, module)
    except DataError:
        if fresh:  # a run refused for its data leaves nothing behind, not even the probe cache
            shutil.rmtree(out, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)  # the data is read: from here on the run writes into out
    C.save_yaml(cfg, out / "config.yaml")
    n_params = sum(p.numel() for p in module.model.encoder.parameters()) / 1e6
    log(f"model: {cfg.preset} {cfg.model.variant}, encoder {n_params:.1f}M parameters")
    if cfg.model.features.norm == "global" and ckpt is None:  # on resume they come with the checkpoint
        n, h = estimate_global_stats(module.model, sample)
        log(f"filterbank statistics (model.features.norm=global) from {n} utterances ({h:.2f} h)")
    t, speed = cfg.train, module.speed
    apply_speed(module.model, replace(speed, compile=False))  # the layout first: the batch search runs eagerly
    batch_seconds = module.resolved_batch_seconds = resolve_batch_seconds(cfg, out, module.model, speed, device_type())
    apply_speed(module.model, speed)
    log(f"speed: {speed.describe()}; {resolve_workers(t.num_workers)} loader workers")

    def val_loader():
        if val_cuts is None or len(val_cuts) == 0:
            return []
        return pretrain_loader(val_cuts, batch_seconds, t.max_utt_seconds, 1, 0, t.seed, shuffle=False)

    trainer, progress = run(module, EngineData(module, train_loader, val_loader), out, t, ckpt, start_step,
                            problems, "pretrain")
    if trainer.is_global_zero:
        figures = []
        try:
            from ..engine.plots import plot_pretrain

            figures.append(plot_pretrain(out))
        except Exception as e:  # plotting must never fail a finished run
            log(f"(plots not written: {e})")
        card = {"training data": ", ".join(map(str, sources)), "steps": trainer.global_step,
                "training hours of audio": "streamed" if hours is None else f"{hours:.2f}", **final_metrics(out)}
        save_model(module.model, cfg, out / "model", card, figures=figures)
        progress.write_skipped()
        log(f"done at step {trainer.global_step}: model saved to {out / 'model'}")
    return out / "model"


# --------------------------------------------------------------------------- command line


def cmd_pretrain(args) -> None:
    pretrain(args.data, args.out, resolve_args(args))


def add_cli(sub) -> None:
    p = sub.add_parser("pretrain", help="self-supervised pre-training on unlabeled audio (resumes if --out has checkpoints)")
    p.add_argument("--data", action="append", required=True, metavar="SRC",
                   help="folder of audio, TSV/CSV manifest or lhotse manifest (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run folder: config, metrics, checkpoints and model/; rerunning with it resumes")
    add_config_args(p)
    add_engine_args(p)
    add_fault_injection_arg(p)  # --inject-fault KIND@STEP[:rankR] -> train.inject_faults
    p.set_defaults(func=cmd_pretrain)
