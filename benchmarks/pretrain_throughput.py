"""Pre-training throughput: SVQ-MAE against Hugging Face's Wav2Vec2ForPreTraining, in one run.

For each (model, size) it runs, in a fresh subprocess (so peak memory is its own), a few warm-up
steps then timed optimizer steps (forward + backward + AdamW) on the same synthetic batch, and
reports audio-seconds per second, peak memory, and model FLOP/s as a share of this machine's
measured matmul peak. Ratios are measured in the same run, on the same machine.

    python benchmarks/pretrain_throughput.py --device cpu --sizes tiny,base
    python benchmarks/pretrain_throughput.py --device cuda --sizes tiny,base --batch 16 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# LibriSpeech 960 h at wav2vec 2.0 BASE's schedule: 400k updates of ~1.6 h of audio each
W2V2_BASE_AUDIO_HOURS = 400_000 * 1.6


def synthetic_batch(batch: int, seconds: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    f0 = 100 + 150 * torch.rand(batch, 1, generator=g)
    waves = sum(torch.sin(2 * torch.pi * k * f0 * t) / k for k in range(1, 6))
    waves = 0.1 * waves + 0.01 * torch.randn(batch, n, generator=g)
    lengths = torch.full((batch,), n)
    lengths[1::2] = int(n * 0.8)  # some padding, as in real batches
    return waves, lengths


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a large square matmul: the machine's practical peak."""
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 50 if device == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(kind: str, size: str, device: str):
    """-> (model, step_fn(waves, lengths, generator) -> loss)."""
    if kind == "wav2vec2":
        from hf_wav2vec2 import build_wav2vec2, wav2vec2_loss

        model = build_wav2vec2(size).to(device)
        return model, lambda w, L, g: wav2vec2_loss(model, w, L, g)
    from svqmae.config import resolve
    from svqmae.model import SVQMAE

    overrides = ["model.variant=encoder_only"] if kind == "encoder_only" else []
    model = SVQMAE(resolve(size, overrides=overrides).model).to(device)
    return model, lambda w, L, g: model(w, L, g)["loss"]


def run_one(kind: str, size: str, device: str, batch: int, seconds: float, steps: int, warmup: int,
            bf16: bool, queue, profile: bool = False) -> None:
    torch.manual_seed(0)
    model, step = build(kind, size, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    waves, lengths = synthetic_batch(batch, seconds)
    waves, lengths = waves.to(device), lengths.to(device)
    def one(i: int) -> None:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = step(waves, lengths, torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        one(i)
    # model FLOPs of one step (forward + backward), counted on a separate step
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        one(warmup)
    flops = fc.get_total_flops()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        one(warmup + 1 + i)
    _sync(device)
    dt = time.perf_counter() - t0
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for i in range(3):
                one(1000 + i)
            _sync(device)
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"--- profile {kind} {size}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=12), file=sys.stderr)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    audio = float(lengths.sum()) / 16000 * steps
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    n_enc = sum(p.numel() for n, p in model.named_parameters() if "encoder" in n and "feature" not in n)
    queue.put(dict(model=kind, size=size, audio_s_per_s=audio / dt, step_s=dt / steps, flops_per_step=flops,
                   flops_per_s=flops * steps / dt, peak_mem_gb=peak / 2**30, params_m=sum(
                       p.numel() for p in model.parameters()) / 1e6, encoder_params_m=n_enc / 1e6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--models", default="svqmae,encoder_only,wav2vec2")
    ap.add_argument("--batch", default="4", help="utterances per batch; a comma list tries each (ascending, "
                    "stopping at the first out-of-memory) and keeps each model's best")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPU)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    args = ap.parse_args()
    bf16 = args.bf16 or args.device == "cuda"
    peak = matmul_peak(args.device, torch.bfloat16 if bf16 else torch.float32)
    ctx = mp.get_context("spawn")
    rows = []
    for size in args.sizes.split(","):
        for kind in args.models.split(","):
            best = None
            for batch in sorted(int(b) for b in args.batch.split(",")):
                q = ctx.Queue()
                p = ctx.Process(target=run_one, args=(kind, size, args.device, batch, args.seconds, args.steps,
                                                      args.warmup, bf16, q, args.profile))
                p.start()
                p.join()
                if p.exitcode != 0:
                    print(f"{kind} {size} batch {batch}: failed (exit {p.exitcode}; out of memory?)", file=sys.stderr)
                    break
                r = q.get()
                r.update(batch=batch, mfu=r["flops_per_s"] / peak)
                print(json.dumps(r), file=sys.stderr, flush=True)
                if best is None or r["audio_s_per_s"] > best["audio_s_per_s"]:
                    best = r
            if best is not None:
                rows.append(best)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    print(f"\nmachine: {dev}; matmul peak {peak / 1e12:.2f} TFLOP/s ({'bf16' if bf16 else 'fp32'}); "
          f"utterances of {args.seconds:.0f} s (half padded to 80%), batch sizes tried {args.batch}, {args.steps} timed steps\n")
    print("| size | model | batch | audio-s / s | vs wav2vec 2.0 | step (s) | peak mem (GiB) | GFLOP / step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["model"] == "wav2vec2" and x["size"] == r["size"]), None)
        ratio = f"{r['audio_s_per_s'] / ref['audio_s_per_s']:.1f}x" if ref else "-"
        print(f"| {r['size']} | {r['model']} | {r['batch']} | {r['audio_s_per_s']:.0f} | {ratio} | {r['step_s']:.3f} | "
              f"{r['peak_mem_gb']:.2f} | {r['flops_per_step'] / 1e9:.0f} | {100 * r['mfu']:.1f}% |")
    for r in rows:
        if r["size"] == "base":
            hours = W2V2_BASE_AUDIO_HOURS * 3600 / r["audio_s_per_s"] / 3600
            print(f"\n{r['model']} BASE: wav2vec 2.0 BASE's LibriSpeech-960 h schedule "
                  f"({W2V2_BASE_AUDIO_HOURS / 1e3:.0f}k h of audio) would take {hours:,.0f} device-hours here; "
                  f"one epoch of 960 h takes {960 / (r['audio_s_per_s']):.2f} device-hours")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "peak_flops": peak, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
