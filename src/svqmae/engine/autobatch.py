"""``train.max_batch_seconds=auto``: the largest batch that fits the device, found once and cached.

On a GPU, synthetic training steps (forward + backward, in the run's precision and layout, before any
compilation) are measured for their peak memory on growing numbers of utterances of
``train.max_utt_seconds`` (the most memory per second of audio a batch can need: the longest
utterances, whose attention costs most), doubling, then bisecting to within 5%, until the largest
that fits in ``train.auto_batch_margin`` of the device's memory, less the optimizer's state, is
found. The result is printed and written to ``DIR/auto_batch.json`` with what it depends on (device,
its memory, the model, the utterance length, precision, layout, margin); a resumed run finds it there
and so reads exactly the batches it read before. On a CPU, "auto" is the preset's figure, without a
search. The out-of-memory split-and-retry stays as the safety net.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .. import config as C
from ..model.io import atomic_write_bytes
from .faults import free_memory
from .progress import log, rank

CACHE = "auto_batch.json"


def search_utterances(trial: Callable[[int], int], fits_in: int, max_trials: int = 24,
                      tolerance: float = 0.05) -> tuple[int, list[tuple[int, int | None]]]:
    """The largest n for which ``trial(n)`` (peak bytes of a step on n utterances; it may raise
    ``torch.OutOfMemoryError``) stays within ``fits_in`` bytes: doubling from 1, then bisecting until
    the bracket is within ``tolerance``. Returns (n, [(n tried, peak or None for out of memory)]);
    n = 0 when even one utterance does not fit."""
    lo, hi, n, tried = 0, None, 1, []
    while len(tried) < max_trials:
        try:
            peak = trial(n)
        except torch.OutOfMemoryError:
            peak = None
        free_memory()
        tried.append((n, peak))
        if peak is not None and peak <= fits_in:
            lo = n
        else:
            hi = n
        if hi is None:
            n *= 2
            continue
        if hi - lo <= max(1, int(lo * tolerance)):
            break
        n = (lo + hi) // 2
    return lo, tried


def cuda_peak(device: torch.device) -> tuple[Callable[[], None], Callable[[int], int]]:
    """(reset, measure) of the CUDA caching allocator's peak allocated bytes on ``device``."""

    def measure(n: int) -> int:
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)

    return (lambda: torch.cuda.reset_peak_memory_stats(device)), measure


def memory_trial(model, seconds: float, device: torch.device, bf16: bool,
                 peak: tuple[Callable[[], None], Callable[[int], int]] | None = None) -> Callable[[int], int]:
    """trial(n): forward + backward of n synthetic utterances of ``seconds`` on ``model`` (on ``device``)
    -> the step's peak memory in bytes (weights, gradients, activations), by ``peak`` = (reset,
    measure(n)) (default: :func:`cuda_peak`). The model's weights and gradients are left as they were."""
    reset, measure = peak or cuda_peak(device)
    n_samples = int(model.cfg.features.sample_rate * seconds)
    g = torch.Generator(device=device).manual_seed(0)

    def trial(n: int) -> int:
        model.zero_grad(set_to_none=True)
        reset()
        try:
            waves = 0.1 * torch.randn(n, n_samples, device=device, generator=g)
            lengths = torch.full((n,), n_samples)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(waves, lengths, torch.Generator().manual_seed(0))
            out["loss"].backward()
            return measure(n)
        finally:
            model.zero_grad(set_to_none=True)

    return trial


def gpu_search(cfg: C.Config, model) -> dict:
    """Search this machine's GPU for the largest batch (see the module's docstring) -> the cache record."""
    t = cfg.train
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    optimizer_state = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # AdamW moments, fp32
    fits_in = int(t.auto_batch_margin * total) - optimizer_state
    bf16 = t.precision in ("auto", "bf16")
    was_training = model.training
    model.to(device).train()
    t0 = time.monotonic()
    try:
        n, tried = search_utterances(memory_trial(model, t.max_utt_seconds, device, bf16), fits_in)
    finally:
        model.cpu().train(was_training)
        free_memory()
    if n == 0:
        raise C.ConfigError(f"train.max_batch_seconds=auto: one utterance of {t.max_utt_seconds:g} s does not fit in "
                            f"{t.auto_batch_margin:g} of this GPU's memory; lower train.max_utt_seconds")
    return {"max_batch_seconds": n * t.max_utt_seconds, "utterances": n, "fits_in_bytes": fits_in,
            "search_seconds": round(time.monotonic() - t0, 1),
            "tried": [{"utterances": k, "peak_bytes": p} for k, p in tried]}


def cache_key(cfg: C.Config, speed, device: str) -> dict:
    """What the automatic batch depends on: a cached one is used only when all of it matches."""
    t = cfg.train
    key = {"device": device, "model": C.to_dict(cfg.model), "max_utt_seconds": t.max_utt_seconds,
           "precision": t.precision, "pack": speed.pack, "margin": t.auto_batch_margin}
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        key.update(gpu=props.name, memory_bytes=props.total_memory)
    return key


def resolve_batch_seconds(cfg: C.Config, out: Path, model, speed, device: str,
                          search: Callable[[C.Config, object], dict] = gpu_search,
                          wait_s: float = 900.0) -> float:
    """``train.max_batch_seconds`` as a number: itself, or for "auto" the preset's figure on a CPU, else
    the cached or freshly searched largest batch (rank 0 searches; other ranks wait for its file)."""
    t = cfg.train
    if t.max_batch_seconds != "auto":
        return float(t.max_batch_seconds)
    if device != "cuda":
        seconds = max(C.preset_batch_seconds(cfg.preset), t.max_utt_seconds)
        log(f"batch: {seconds:g} s of audio (train.max_batch_seconds=auto on a CPU: the {cfg.preset} preset's figure)")
        return seconds
    path = Path(out) / CACHE
    key = cache_key(cfg, speed, device)
    deadline = time.monotonic() + (wait_s if rank() != 0 else 0)
    while True:
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.get("key") == key:
            log(f"batch: {cached['max_batch_seconds']:g} s of audio (found automatically earlier: {path})")
            return float(cached["max_batch_seconds"])
        if time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    log(f"batch: searching for the largest that fits ({t.auto_batch_margin:g} of the device's memory)...")
    record = search(cfg, model)
    if rank() == 0:
        atomic_write_bytes(path, json.dumps({"key": key, **record}, indent=1).encode())
    log(f"batch: {record['max_batch_seconds']:g} s of audio ({record.get('utterances', '?')} utterances of "
        f"{t.max_utt_seconds:g} s), found automatically; cached in {path}")
    return float(record["max_batch_seconds"])
