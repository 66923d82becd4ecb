"""wav2vec 2.0 pre-training with Hugging Face's ``Wav2Vec2ForPreTraining``, as in HF's pre-training example
(``run_wav2vec2_pretraining_no_trainer.py``): its own span masking (``_compute_mask_indices``), negatives
(``_sample_negative_indices``), contrastive + diversity loss, Gumbel temperature annealing.

Used by ``benchmarks/quality.py`` (equal-budget comparison) and ``benchmarks/pretrain_throughput.py``.

    model = build_wav2vec2("tiny")
    loss = wav2vec2_loss(model, waves, lengths, torch.Generator().manual_seed(0))
    pretrain_wav2vec2(["data/a", "data/b"], "runs/w2v", minutes=30, size="tiny", device="cpu")
    # then: svqmae evaluate --model hf:runs/w2v ...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices
from transformers.utils import logging as hf_logging

# pre-training masking of the wav2vec 2.0 paper (HF's example passes these; the config default is for fine-tuning)
PRETRAIN = dict(mask_time_prob=0.65, mask_time_length=10, mask_time_min_masks=2)

SIZES = {
    # svqmae's tiny encoder size: 4 layers x 256, 4 heads, FFN 1024, no dropout; a narrower conv front end
    # (256 channels instead of 512; this makes wav2vec 2.0 faster, not slower)
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 conv_dim=(256,) * 7, codevector_dim=256, proj_codevector_dim=128,
                 hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                 final_dropout=0.0, layerdrop=0.0),
    # the standard BASE configuration (Wav2Vec2Config's defaults: 12 x 768, FFN 3072, conv 512)
    "base": dict(feat_proj_dropout=0.1, layerdrop=0.05),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_wav2vec2(size: str = "tiny") -> Wav2Vec2ForPreTraining:
    """A randomly initialized ``Wav2Vec2ForPreTraining`` of size ``tiny`` (4 x 256) or ``base``."""
    if size not in SIZES:
        raise ValueError(f"unknown wav2vec 2.0 size {size!r} (choose from {', '.join(SIZES)})")
    config = Wav2Vec2Config(**SIZES[size], **PRETRAIN)
    config.architectures = ["Wav2Vec2ForPreTraining"]
    return Wav2Vec2ForPreTraining(config)


def _normalize(waves: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its real samples (Wav2Vec2FeatureExtractor's do_normalize)."""
    n = valid.sum(1, keepdim=True).clamp_min(1)
    mean = (waves * valid).sum(1, keepdim=True) / n
    var = (((waves - mean) * valid) ** 2).sum(1, keepdim=True) / n
    return (waves - mean) / torch.sqrt(var + 1e-7) * valid


def wav2vec2_loss(model: Wav2Vec2ForPreTraining, waves: torch.Tensor, lengths: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """Contrastive + diversity loss per masked frame, for a (B, S) batch of 16 kHz waveforms.

    Masks and negatives are drawn by HF's numpy functions, seeded from ``generator`` (the global numpy
    state is left untouched). Padding is never masked nor sampled as a negative."""
    cfg, device = model.config, waves.device
    B, S = waves.shape
    valid = torch.arange(S, device=device)[None] < lengths.to(device)[:, None]
    T = int(model._get_feat_extract_output_lengths(torch.tensor(S)))
    feat_len = model._get_feat_extract_output_lengths(lengths.cpu()).clamp(max=T)
    frame_valid = (torch.arange(T)[None] < feat_len[:, None]).long()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        mask = _compute_mask_indices((B, T), cfg.mask_time_prob, cfg.mask_time_length,
                                     attention_mask=frame_valid, min_masks=cfg.mask_time_min_masks)
        negatives = _sample_negative_indices((B, T), cfg.num_negatives, mask_time_indices=mask)
    finally:
        np.random.set_state(state)
    out = model(
        _normalize(waves.float(), valid),
        attention_mask=valid.long() if cfg.feat_extract_norm == "layer" else None,
        mask_time_indices=torch.from_numpy(mask).to(device),
        sampled_negative_indices=torch.from_numpy(negatives).long().to(device),
    )
    return out.loss / max(int(mask.sum()), 1)


def pretrain_wav2vec2(sources: list[str], out_dir: str | Path, minutes: float, size: str = "tiny",
                      device: str = "cpu", max_steps: int | None = None, lr: float = 5e-4, seed: int = 0,
                      clock: str = "wall") -> Path:
    """Pre-train for ``minutes`` of wall-clock time (``clock="cpu"``: of this process's CPU time, with the
    loader in-process so that the clock sees all the work) and at most ``max_steps``, with the batching and learning-rate
    schedule of svqmae's preset of the same name (audio seconds per batch, utterance crop, warm-up, cosine decay
    over ``max_steps``; without it the horizon is 10^6 steps, so the time budget binds, as for
    ``svqmae pretrain --max-minutes``), AdamW (0.9, 0.98), clipping at 1.0, HF's Gumbel temperature decay
    (2 -> 0.5, x0.999995 per step). Saves with ``save_pretrained`` (model and feature extractor), so
    ``hf:out_dir`` loads it. Returns ``out_dir``."""
    from svqmae import config as C
    from svqmae.data import Problems, load_sources, pretrain_loader
    from svqmae.engine.schedules import lr_lambda

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = C.resolve(size, overrides=[f"train.max_steps={max_steps or 10**6}"]).train
    schedule = lr_lambda(t)
    torch.manual_seed(seed)
    cuts = load_sources(sources, Problems()).filter(lambda c: c.duration >= t.min_utt_seconds).to_eager()
    workers = 0 if clock == "cpu" else t.num_workers
    loader = pretrain_loader(cuts, t.max_batch_seconds, t.max_utt_seconds, t.num_buckets, workers, seed)
    now = time.process_time if clock == "cpu" else time.monotonic
    model = build_wav2vec2(size).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    gen = torch.Generator().manual_seed(seed)
    budget = minutes * 60
    log(f"wav2vec 2.0 {size}: {sum(p.numel() for p in model.wav2vec2.encoder.parameters()) / 1e6:.1f}M encoder "
        f"parameters, {len(cuts)} utterances, {minutes} min on {device}")
    step, epoch, audio, t0, c0 = 0, 0, 0.0, time.monotonic(), now()
    metrics = open(out / "metrics.jsonl", "w")
    done = False
    while not done:
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            if (budget > 0 and now() - c0 >= budget) or step >= t.max_steps:
                done = True
                break
            if batch["waves"].shape[0] == 0:
                continue
            for g in opt.param_groups:
                g["lr"] = lr * schedule(step)
            model.set_gumbel_temperature(max(0.5, 2.0 * 0.999995**step))
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                loss = wav2vec2_loss(model, batch["waves"].to(device), batch["lengths"].to(device), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            audio += float(batch["lengths"].sum()) / 16000
            if step % 10 == 0:
                rec = {"step": step, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"],
                       "audio_seconds_per_s": round(audio / max(time.monotonic() - t0, 1e-9), 1),
                       "elapsed_s": round(time.monotonic() - t0, 1)}
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                log(f"w2v step {step} | loss {rec['loss']:.3f} | {rec['audio_seconds_per_s']:.0f} audio-s/s | "
                    f"{rec['elapsed_s'] / 60:.1f}/{minutes} min")
        epoch += 1
    metrics.close()
    hf_logging.disable_progress_bar()
    model.eval().save_pretrained(out)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=model.config.feat_extract_norm == "layer").save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps({"size": size, "steps": step, "minutes": minutes, "clock": clock,
                                                   "device": device,
                                                   "audio_hours_seen": round(audio / 3600, 3)}, indent=2))
    log(f"wav2vec 2.0: {step} steps, {audio / 3600:.2f} h of audio seen; saved to {out}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="pre-train wav2vec 2.0 (HF Wav2Vec2ForPreTraining) on a time budget")
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lr", type=float, default=5e-4)
    a = ap.parse_args()
    pretrain_wav2vec2(a.data, a.out, a.minutes, a.size, a.device, lr=a.lr)


if __name__ == "__main__":
    main()
