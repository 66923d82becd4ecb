"""Batches: duration-bucketed dynamic batches of 16 kHz waveforms from lhotse samplers, as one pass
(evaluation) or as the endless training stream (exactly resumable for in-memory and lazy CutSets;
from its read position, within a bound, for Shar streams: :mod:`svqmae.data.shar`); random crops of
long utterances; CTC targets for fine-tuning. Padding is zeros; ``lengths`` give each utterance's
samples."""

from __future__ import annotations

import os
import random
import warnings
from functools import partial

import torch
from lhotse import CutSet
from lhotse.dataset import DynamicBucketingSampler, DynamicCutSampler

from ..config import TrainConfig
from .audio import AudioError, resample
from .common import DataError, cut_path, heldout_from_head, stable_hash
from .sources import read_span


def split_heldout(cuts: CutSet, n: int) -> tuple[CutSet, CutSet]:
    """A deterministic held-out slice of ``n`` cuts (by hash of id); (train, heldout). A lazy CutSet
    stays lazy: its slice is drawn from its head (see :func:`heldout_from_head`)."""
    if cuts.is_lazy:
        held = heldout_from_head(cuts, n)
        ids = frozenset(c.id for c in held)
        return cuts.filter(partial(_not_in, ids)), held
    ranked = sorted(cuts, key=lambda c: stable_hash(c.id))
    held = {c.id for c in ranked[: min(n, max(len(ranked) - 1, 0))]}
    return cuts.filter(lambda c: c.id not in held).to_eager(), cuts.filter(lambda c: c.id in held).to_eager()


MIN_TRAIN_CUTS = 4  # duration bucketing: two buckets of two utterances


def check_heldout_size(n: int, val_items: int, where: str) -> None:
    """A ``DataError`` in one line, with the number needed, unless ``n`` utterances hold the held-out slice
    of ``val_items`` and at least :data:`MIN_TRAIN_CUTS` to train on (otherwise the slice would take
    almost everything and the training stream be one repeated batch)."""
    need = val_items + MIN_TRAIN_CUTS
    if n >= need:
        return
    hint = (f"add audio, or hold out fewer (e.g. --set train.val_items={n - MIN_TRAIN_CUTS})"
            if n > MIN_TRAIN_CUTS else "add audio")
    raise DataError(f"{where}: {n} usable utterance(s); the held-out slice (train.val_items={val_items}) and "
                    f"duration bucketing ({MIN_TRAIN_CUTS} to train on) need at least {need}: {hint}")


def _not_in(ids: frozenset, cut) -> bool:
    return cut.id not in ids


class EpochBatches(torch.utils.data.Sampler):
    """Wraps a lhotse sampler: one pass of (epoch, index, CutSet), so that crops are reproducible."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        for i, cuts in enumerate(self.sampler):
            yield self.epoch, i, cuts


class EndlessBatches(EpochBatches):
    """Epoch after epoch of (epoch, index, cuts) in one endless stream that starts at ``start`` (the
    batch after the last one trained on). The data's epochs are the stream's own, not Lightning's:
    Lightning sees a single endless epoch (``max_steps`` ends it), so a run resumed at any step, even
    at an epoch boundary, reads exactly the batches the uninterrupted run would have read."""

    def __init__(self, sampler, start: tuple[int, int] = (0, 0)):
        super().__init__(sampler)
        self.start = start

    def set_epoch(self, epoch: int) -> None:
        pass  # Lightning's epoch counter is not the data's

    def __iter__(self):
        epoch, skip = self.start
        while True:
            self.epoch = epoch
            self.sampler.set_epoch(epoch)
            n = 0
            for i, cuts in enumerate(self.sampler):
                n += 1
                if i >= skip:
                    yield epoch, i, cuts
            if n == 0:
                return  # nothing to train on
            epoch, skip = epoch + 1, 0


def resolve_workers(num_workers: int | str) -> int:
    """``train.num_workers``: a number, or "auto": on GPUs, the CPU cores per local GPU less one (2 to 16:
    the loader must keep up with the device); on a CPU, min(2, cores / 2) (the loader shares the cores
    with training). Batches are the same whatever the number (an exactly resumable stream)."""
    if num_workers != "auto":
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or max(1, torch.cuda.device_count())
        return max(2, min(16, cores // gpus - 1))
    return max(1, min(2, cores // 2))


def batch_loader(dataset, sampler, num_workers: int | str, start: tuple[int, int] | None) -> torch.utils.data.DataLoader:
    """A DataLoader over a lhotse sampler's batches: one pass (``start=None``, evaluation) or the endless
    training stream from ``start`` = (epoch, index of the next batch). On CUDA, batches are pinned, so
    that they reach the device without the host waiting."""
    stream = EpochBatches(sampler) if start is None else EndlessBatches(sampler, start)
    return _loader(dataset, num_workers, sampler=stream)


def _loader(dataset, num_workers: int | str, **kw) -> torch.utils.data.DataLoader:
    """A DataLoader of ready batches with ``train.num_workers`` workers (see :func:`resolve_workers`)."""
    num_workers = resolve_workers(num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       prefetch_factor=max(2, min(4, 8 // num_workers)) if num_workers else None,
                                       pin_memory=torch.cuda.is_available(), **kw)


class WaveformBatches(torch.utils.data.Dataset):
    """(epoch, index, CutSet) -> {"waves": (B, S), "lengths": (B,), "ids", "failed", "epoch", "index"}.

    Cuts longer than ``max_seconds`` are randomly cropped (a pure function of seed, epoch and cut
    id); files that fail to load are dropped from the batch and listed in ``failed`` (strict=False),
    or raise (strict=True). ``speed`` > 0 plays each utterance at a random speed in ``[1 - speed,
    1 + speed]`` (tempo and pitch together, as sox's ``speed``; also a pure function of seed, epoch and
    cut id), cropped first so that it still lasts at most ``max_seconds``; a batch's audio seconds then
    differ from what the sampler counted by up to a factor ``1 / (1 - speed)`` (uncropped utterances
    played slower)."""

    def __init__(self, sample_rate=16000, max_seconds: float | None = None, seed: int = 0, strict=False,
                 speed: float = 0.0):
        self.sample_rate, self.max_seconds, self.seed, self.strict = sample_rate, max_seconds, seed, strict
        self.speed = speed

    def __getitem__(self, item):
        epoch, index, cuts = item if isinstance(item, tuple) else (0, 0, item)
        waves, ids, failed = [], [], []
        for cut in cuts:
            full = cut.custom or {}
            offset, dur = full.get("full_start", cut.start), full.get("full_duration", cut.duration)
            factor = 1.0
            if self.speed:
                factor = random.Random(f"speed/{self.seed}/{epoch}/{cut.id}").uniform(1 - self.speed, 1 + self.speed)
            if self.max_seconds and dur > self.max_seconds * factor:
                rng = random.Random(f"{self.seed}/{epoch}/{cut.id}")
                offset += rng.uniform(0, dur - self.max_seconds * factor)
                dur = self.max_seconds * factor
            try:
                x = read_span(cut, offset, dur, self.sample_rate)
            except AudioError as e:
                if self.strict:
                    raise
                failed.append((cut_path(cut), str(e)))
                continue
            if factor != 1.0:  # heard at sample_rate, samples taken at sample_rate * factor: 1/factor as long
                x = resample(x, round(self.sample_rate * factor), self.sample_rate)
            waves.append(torch.from_numpy(x))
            ids.append(cut.id)
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        batch = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
        for i, w in enumerate(waves):
            batch[i, : len(w)] = w
        return {"waves": batch, "lengths": lengths, "ids": ids, "failed": failed, "epoch": epoch, "index": index}


def _crop_view(cut, max_seconds: float):
    """The cut as the sampler should count it (at most ``max_seconds``), remembering its full extent
    so that the loader can pick a random crop."""
    if cut.duration <= max_seconds:
        return cut
    short = cut.truncate(duration=max_seconds, preserve_id=True)
    short.custom = dict(cut.custom or {}, full_start=cut.start, full_duration=cut.duration)
    return short


def shuffled_sampler(cuts: CutSet, max_duration: float, num_buckets: int, seed: int, buffer_size: int = 20000):
    """Shuffled dynamic batches of ``cuts``: duration-bucketed in ``num_buckets`` buckets, or one bucket
    (no bucketing) where there are fewer than 2 to make (a few utterances, ``train.num_buckets=1``):
    lhotse's bucketing sampler needs at least 2."""
    with warnings.catch_warnings():  # an eager CutSet is deliberate: it is already in memory
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
        if num_buckets >= 2:
            return DynamicBucketingSampler(cuts, max_duration=max_duration, num_buckets=num_buckets, shuffle=True,
                                           seed=seed, drop_last=False, buffer_size=buffer_size)
        return DynamicCutSampler(cuts, max_duration=max_duration, shuffle=True, seed=seed, drop_last=False,
                                 shuffle_buffer_size=buffer_size)


def pretrain_loader(cuts: CutSet, max_batch_seconds: float, max_utt_seconds: float, num_buckets: int,
                    num_workers: int | str, seed: int, shuffle: bool = True,
                    start: tuple[int, int] | None = None, buffer_size: int = 20000,
                    speed: float = 0.0) -> torch.utils.data.DataLoader:
    """Duration-bucketed dynamic batches, DDP-aware (lhotse reads rank/world size when
    torch.distributed is initialized), loaded in worker processes. One pass per epoch, or with
    ``start`` the endless training stream from that (epoch, batch index) (see ``EndlessBatches``).
    A lazy CutSet (a large manifest) is streamed: shuffled and bucketed in a buffer of
    ``buffer_size`` cuts; its resume replays the cut metadata of the epoch up to ``start``.
    ``speed``: random speed perturbation (see ``WaveformBatches``)."""
    dataset = WaveformBatches(max_seconds=max_utt_seconds, seed=seed, speed=speed)
    if cuts.is_lazy and shuffle:
        sampler = shuffled_sampler(cuts.map(partial(_crop_view, max_seconds=max_utt_seconds)), max_batch_seconds,
                                   num_buckets, seed, buffer_size)
        return batch_loader(dataset, sampler, num_workers, start)
    # the sampler sees cropped durations, so a batch never holds more than max_batch_seconds of audio
    cropped = CutSet.from_cuts(_crop_view(c, max_utt_seconds) for c in cuts)
    if shuffle:
        sampler = shuffled_sampler(cropped, max_batch_seconds, min(num_buckets, len(cuts) // 2), seed)
    else:
        sampler = DynamicCutSampler(cropped, max_duration=max_batch_seconds, shuffle=False)
    return batch_loader(dataset, sampler, num_workers, start)


def shar_loader(shar, max_batch_seconds: float, max_utt_seconds: float, num_buckets: int, num_workers: int | str,
                seed: int, buffer_size: int, exclude=frozenset(), min_seconds: float = 0.0,
                resume: list[dict] | None = None, epochs: int | None = None,
                speed: float = 0.0) -> torch.utils.data.DataLoader:
    """The training stream of a Shar source (:class:`svqmae.data.shar.SharStream`): its shards split
    over nodes x ranks x ``num_workers`` loader workers, cropped, bucketed and batched as
    :func:`pretrain_loader` does; endless, or ``epochs`` passes. ``resume``: the stream positions a
    checkpoint saved (see :func:`svqmae.data.shar.resume_positions`). ``speed``: as ``pretrain_loader``'s."""
    from .shar import SharStream, duration_bins

    bins = duration_bins(shar, num_buckets, max_utt_seconds)
    dataset = WaveformBatches(max_seconds=max_utt_seconds, seed=seed, speed=speed)
    stream = SharStream(shar, dataset, max_batch_seconds, bins, seed, buffer_size,
                        crop=partial(_crop_view, max_seconds=max_utt_seconds), exclude=exclude,
                        min_seconds=min_seconds, resume=resume, epochs=epochs)
    return _loader(stream, num_workers)


class CTCBatches(WaveformBatches):
    """Waveform batches (see :class:`WaveformBatches`) plus the CTC targets:
    ``targets`` (sum of lengths,) flat unit ids, ``target_lengths`` (B,), ``refs`` normalised texts."""

    def __getitem__(self, item):
        batch = super().__getitem__(item)
        cuts = item[2] if isinstance(item, tuple) else item
        sups = {c.id: c.supervisions[0].custom for c in cuts}
        ids = [sups[i]["units"] for i in batch["ids"]]
        batch["targets"] = torch.tensor([u for x in ids for u in x], dtype=torch.long)
        batch["target_lengths"] = torch.tensor([len(x) for x in ids], dtype=torch.long)
        batch["refs"] = [sups[i]["ref"] for i in batch["ids"]]
        return batch


def ctc_loader(cuts: CutSet, t: TrainConfig, shuffle: bool,
               start: tuple[int, int] | None = None) -> torch.utils.data.DataLoader:
    """Duration-bucketed dynamic batches (DDP-aware through lhotse), never cropped (CTC needs the
    whole transcript). One pass, or with ``start`` the endless training stream from that (epoch,
    batch index) (see ``EndlessBatches``)."""
    if shuffle:
        sampler = shuffled_sampler(cuts, t.max_batch_seconds, min(t.num_buckets, len(cuts) // 2), t.seed)
    else:
        sampler = DynamicCutSampler(cuts, max_duration=t.max_batch_seconds, shuffle=False)
    return batch_loader(CTCBatches(seed=t.seed), sampler, t.num_workers if shuffle else 0, start)
