"""Pre-training throughput and MFU: SVQ-MAE against Hugging Face's Wav2Vec2ForPreTraining, in one run.

For each (size, model, path) it runs, in a fresh subprocess (so peak memory is its own), a few warm-up
steps then timed optimizer steps on the same synthetic batch, at each batch size in turn (ascending,
stopping at the first out-of-memory), and reports audio-seconds per second, peak memory, model FLOPs
per step and MFU against this machine's bf16 (GPU) or fp32 (CPU) matmul peak, measured in the same run.

Paths (``--paths``): ``plain`` is the step of earlier versions (forward, backward, foreach AdamW; eager);
``fast`` is the engine's step with the speed settings this device gets by default (engine.speed: on
CUDA torch.compile'd blocks, packed encoder tokens, shape buckets of 16, fused AdamW with the
non-finite check and gradient clipping done on the device; on a CPU fused AdamW and clipping).
wav2vec 2.0 always runs its own HF step (foreach AdamW).

Model FLOPs (``model_flops``, matmuls only, forward + backward = 3 x forward), per utterance of L
tokens of which v are visible and m = L - v masked, widths D (encoder), E (decoder), FFN F_enc and
F_dec, C = 80 x 4 input features, K codes, decoder convolution k taps:
    encoder  n_enc x [(8 D^2 + 4 D F_enc) v + 4 D v^2] + 2 C D v    (on the visible tokens only)
    decoder  2 D E v + 2 k E L + n_dec x [(8 E^2 + 4 E F_dec) L + 4 E L^2]    (on all L tokens)
    heads    2 E K m (+ 2 E C m with the reconstruction head)
(the encoder-only ablation: the encoder on all L tokens, its head on the m masked ones). Padding is not
counted: MFU is useful work over peak. wav2vec 2.0's FLOPs are counted by torch's FlopCounterMode (it
has no such formula here); the "counted" column gives the counter's figure for every eager run, padding
included.

    python benchmarks/pretrain_throughput.py --device cpu --sizes tiny,base
    python benchmarks/pretrain_throughput.py --device cuda --sizes tiny,base --batch 256,1024 --w2v-batch 16,64 --seconds 15
    # on a machine other jobs share: every model in one process, round-robin, against another version's code
    git archive REV | tar -x -C /tmp/old
    python benchmarks/pretrain_throughput.py --device cpu --interleave --repeat 12 --steps 1 --batch 2 \
        --runs svqmae:plain,baseline:plain,wav2vec2:hf --baseline-src /tmp/old/src
    # real utterances (as the duration-bucketed loader batches them: 40 s of audio per batch)
    python benchmarks/pretrain_throughput.py --device cpu --sizes base --interleave --repeat 3 --steps 4 \
        --data ../shared/data/speechocean762_dev/manifest.tsv --batch-seconds 40 --runs svqmae:fast,wav2vec2:hf
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing as mp
import platform
import resource
import statistics
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


def real_batches(manifest: str, batch_seconds: float, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of real utterances from a manifest (any source svqmae reads; a ``seconds`` column
    spares the probe), as the duration-bucketed training loader forms them: utterances sorted by duration,
    cut into batches of at most ``batch_seconds`` of audio, and ``count`` of those batches drawn at random
    (seeded), each zero-padded to its longest utterance."""
    import random

    from svqmae.data import Problems, load_cut, load_source

    cuts = sorted(load_source(manifest, Problems()), key=lambda c: c.duration)
    groups, cur, total = [], [], 0.0
    for cut in cuts:
        if cur and total + cut.duration > batch_seconds:
            groups.append(cur)
            cur, total = [], 0.0
        cur.append(cut)
        total += cut.duration
    groups.append(cur)
    out = []
    for group in random.Random(seed).sample(groups, min(count, len(groups))):
        xs = [torch.from_numpy(load_cut(cut, 16000)) for cut in group]
        out.append((torch.nn.utils.rnn.pad_sequence(xs, batch_first=True), torch.tensor([len(x) for x in xs])))
    return out


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """Measured FLOP/s of large square matmuls (the best of two sizes): the machine's practical peak."""
    best = 0.0
    for n in ((4096, 8192) if device == "cuda" else (1024,)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        _sync(device)
        reps = max(5, int(2e13 / n**3)) if device == "cuda" else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


CLOCK = time.perf_counter  # --cpu-time: time.process_time (CPU-seconds of this process, all its threads)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_flops(cfg, token_lengths: list[int]) -> float:
    """Model FLOPs of one training step of an SVQMAE with config ``cfg`` (svqmae.config.ModelConfig) on
    utterances of ``token_lengths`` tokens: the formula in this module's docstring."""
    from svqmae.model.masking import num_masked

    enc, dec, q = cfg.encoder, cfg.decoder, cfg.quantizer
    C, K = cfg.features.n_mels * cfg.features.stack, q.num_codebooks * q.codebook_size
    masked = [num_masked(L, cfg.mask.ratio) for L in token_lengths]
    visible = [L - m for L, m in zip(token_lengths, masked)]

    def blocks(t, n: int) -> float:
        return t.layers * ((8 * t.dim**2 + 4 * t.dim * t.ffn_dim) * n + 4 * t.dim * n * n)

    fwd = 0.0
    for L, v, m in zip(token_lengths, visible, masked):
        if cfg.variant == "svqmae":
            D, E = enc.dim, dec.dim
            fwd += blocks(enc, v) + 2 * C * D * v
            fwd += 2 * D * E * v + 2 * cfg.decoder_conv * E * L + blocks(dec, L)
            fwd += 2 * E * K * m + (2 * E * C * m if cfg.recon_weight > 0 else 0)
        else:
            fwd += blocks(enc, L) + 2 * C * enc.dim * L + 2 * enc.dim * K * m
    return 3 * fwd


def load_baseline(src: str) -> str:
    """Import the svqmae package of another version's ``src`` folder (e.g. the branch's starting point,
    ``git archive REV | tar -x``) as ``svqmae_baseline``, next to this one. Returns the name."""
    root = Path(src) / "svqmae"
    spec = importlib.util.spec_from_file_location("svqmae_baseline", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["svqmae_baseline"] = module
    spec.loader.exec_module(module)
    return "svqmae_baseline"


def build(kind: str, size: str, device: str, path: str):
    """-> (model, step(waves, lengths_host, generator, bf16), model FLOPs per step or None). ``kind``
    "baseline" is SVQ-MAE from ``--baseline-src`` (plain path)."""
    if kind == "wav2vec2":
        from hf_wav2vec2 import build_wav2vec2, wav2vec2_loss

        model = build_wav2vec2(size).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(w, L, g, bf16):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = wav2vec2_loss(model, w, L.to(device), g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return model, step, None
    pkg = "svqmae_baseline" if kind == "baseline" else "svqmae"
    resolve = importlib.import_module(f"{pkg}.config").resolve
    cfg = resolve(size, overrides=["model.variant=encoder_only"] if kind == "encoder_only" else [])
    model = importlib.import_module(f"{pkg}.model").SVQMAE(cfg.model).to(device).train()
    try:
        speed_module = importlib.import_module(f"{pkg}.engine.speed")
        Speed, apply_speed, resolve_speed = speed_module.Speed, speed_module.apply_speed, speed_module.resolve_speed
    except ImportError:  # svqmae before the speed settings (comparisons with earlier versions): plain only
        assert path == "plain", "earlier versions have only the plain path"
        speed = None
    else:
        speed = resolve_speed(cfg.train, device) if path == "fast" else Speed()
        apply_speed(model, speed)
    fused = speed is not None and speed.fused_adamw
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=tuple(cfg.train.betas), fused=True if fused else None)

    def step(w, L, g, bf16):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(w, L, g)["loss"]  # lengths on the host: the step's shapes need no device sync
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if path == "fast":  # as the engine: clipping, then the non-finite check, on the device
            params = [p for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=True)
            if fused:
                opt.found_inf = (~torch.isfinite(norm)).float()
        opt.step()

    return model, step, lambda lengths: model_flops(cfg.model, model.frontend.num_tokens(lengths).tolist())


def run_one(kind: str, size: str, path: str, device: str, batches: list[int], seconds: float, steps: int,
            warmup: int, bf16: bool, queue, profile: bool = False, repeat: int = 1) -> None:
    torch.manual_seed(0)
    model, step, formula = build(kind, size, device, path)
    for batch in batches:
        try:
            queue.put(measure(model, step, formula, kind, size, path, device, batch, seconds, steps, warmup, bf16,
                              profile, repeat))
        except torch.OutOfMemoryError:
            print(f"{kind} {size} {path} batch {batch}: out of memory", file=sys.stderr, flush=True)
            break
    queue.put(None)


def run_interleaved(runs: list[tuple[str, str]], size: str, device: str, batch: int, seconds: float, steps: int,
                    warmup: int, bf16: bool, repeat: int, baseline: str | None, data: tuple | None, cpu_time: bool,
                    queue) -> None:
    """Every (kind, path) in one process, timed round-robin: ``repeat`` rounds of ``steps`` steps of each (the
    order reversed every other round), the median round kept. On a shared machine other jobs then slow every
    model alike, so their ratios hold. (Peak memory is the process's, not per model: not reported.)
    ``data`` = (manifest, batch seconds): each round's steps go through ``steps`` batches of its real utterances
    (:func:`real_batches`) instead of one synthetic batch."""
    global CLOCK
    if cpu_time:
        CLOCK = time.process_time
    if baseline:
        load_baseline(baseline)
    torch.manual_seed(0)
    built = [(kind, path, *build(kind, size, device, path)) for kind, path in runs]
    batches = real_batches(data[0], data[1], steps) if data else [synthetic_batch(batch, seconds)] * steps
    batches = [(w.to(device), L) for w, L in batches]
    audio = sum(float(L.sum()) for _, L in batches) / 16000  # per round
    for _, _, _, step, _ in built:
        for i in range(warmup):
            step(*batches[i % len(batches)], torch.Generator().manual_seed(i), bf16)
    rounds = [[] for _ in built]
    for r in range(repeat):
        order = list(range(len(built)))
        for j in order if r % 2 == 0 else order[::-1]:
            step = built[j][3]
            _sync(device)
            t0 = CLOCK()
            for i, (waves, lengths) in enumerate(batches):
                step(waves, lengths, torch.Generator().manual_seed(warmup + r * steps + i), bf16)
            _sync(device)
            rounds[j].append(CLOCK() - t0)
    waves, lengths = batches[0]
    for (kind, path, model, step, formula), times in zip(built, rounds):
        dt = statistics.median(times)
        if formula is None:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as fc:
                step(waves, lengths, torch.Generator().manual_seed(10_000), bf16)
            flops = fc.get_total_flops() * len(batches)
        else:
            flops = sum(formula(L) for _, L in batches)
        batch = f"{len(batches)} real batches of <= {data[1]:g} s" if data else batch
        queue.put(dict(model=kind, size=size, path=path, batch=batch, audio_s_per_s=audio / dt,
                       step_s=dt / len(batches), fastest_step_s=min(times) / len(batches), warmup_s=None,
                       flops_per_step=flops / len(batches), counted_flops_per_step=None, flops_per_s=flops / dt, peak_mem_gb=float("nan"),
                       params_m=sum(p.numel() for p in model.parameters()) / 1e6))
    queue.put(None)


def measure(model, step, formula, kind, size, path, device, batch, seconds, steps, warmup, bf16, profile,
            repeat=1) -> dict:
    waves, lengths = synthetic_batch(batch, seconds)
    waves = waves.to(device)
    t_first = time.perf_counter()
    for i in range(warmup):
        step(waves, lengths, torch.Generator().manual_seed(i), bf16)
    _sync(device)
    warmup_s = time.perf_counter() - t_first
    counted = None
    if path == "plain" or kind == "wav2vec2":  # FLOPs as torch counts them, on a separate step (eager only)
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step(waves, lengths, torch.Generator().manual_seed(warmup), bf16)
        counted = fc.get_total_flops()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = float("inf")
    for r in range(repeat):  # the fastest of ``repeat`` windows: other jobs on a shared machine only slow a window
        _sync(device)
        t0 = time.perf_counter()
        for i in range(steps):
            step(waves, lengths, torch.Generator().manual_seed(warmup + 1 + r * steps + i), bf16)
        _sync(device)
        dt = min(dt, time.perf_counter() - t0)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            for i in range(3):
                step(waves, lengths, torch.Generator().manual_seed(1000 + i), bf16)
            _sync(device)
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"--- profile {kind} {size} {path}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
    audio = float(lengths.sum()) / 16000 * steps
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    flops = formula(lengths) if formula is not None else counted
    return dict(model=kind, size=size, path=path, batch=batch, audio_s_per_s=audio / dt, step_s=dt / steps,
                warmup_s=warmup_s, flops_per_step=flops, counted_flops_per_step=counted, flops_per_s=flops * steps / dt,
                peak_mem_gb=peak / 2**30, params_m=sum(p.numel() for p in model.parameters()) / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--models", default="svqmae,encoder_only,wav2vec2")
    ap.add_argument("--paths", default="plain,fast", help="SVQ-MAE step paths: plain and/or fast (see above)")
    ap.add_argument("--runs", help="MODEL:PATH pairs in this order, e.g. svqmae:fast,wav2vec2:hf,svqmae:plain "
                    "(instead of --models x --paths)")
    ap.add_argument("--batch", default="4", help="utterances per batch; a comma list tries each (ascending, "
                    "stopping at the first out-of-memory) and keeps each model's best")
    ap.add_argument("--w2v-batch", help="wav2vec 2.0's batch sizes (default: --batch)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    ap.add_argument("--repeat", type=int, default=1, help="time this many windows of --steps steps, keep the fastest")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPU)")
    ap.add_argument("--interleave", action="store_true", help="all runs of a size in one process, timed round-robin "
                    "(--repeat rounds, median; the first batch size only): robust ratios on a machine other jobs share")
    ap.add_argument("--baseline-src", help="another version's src/ folder: adds its SVQ-MAE (plain path) as the "
                    "model 'baseline' (use with --runs ...,baseline:plain)")
    ap.add_argument("--data", metavar="MANIFEST", help="with --interleave: real utterances from this TSV manifest "
                    "(path, seconds), --steps batches of them formed as the duration-bucketed loader does")
    ap.add_argument("--batch-seconds", type=float, default=40.0, help="with --data: audio seconds per batch")
    ap.add_argument("--cpu-time", action="store_true", help="with --interleave on a CPU: time in CPU-seconds of the "
                    "process (robust to other jobs on a shared machine; rates are then audio-seconds per CPU-second)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    args = ap.parse_args()
    bf16 = args.bf16 or args.device == "cuda"
    peak = matmul_peak(args.device, torch.bfloat16 if bf16 else torch.float32)
    print(json.dumps({"peak_flops": peak, "bf16": bf16}), file=sys.stderr, flush=True)
    ctx = mp.get_context("spawn")
    rows, failures = [], []
    if args.runs:
        runs = [tuple(r.split(":")) for r in args.runs.split(",")]
    else:
        runs = [(k, p) for k in args.models.split(",") for p in (["hf"] if k == "wav2vec2" else args.paths.split(","))]
    jobs = []
    for size in args.sizes.split(","):
        if args.interleave:
            jobs.append((size, "all", "interleaved", run_interleaved,
                         (runs, size, args.device, int(args.batch.split(",")[0]), args.seconds, args.steps, args.warmup,
                          bf16, args.repeat, args.baseline_src,
                          (args.data, args.batch_seconds) if args.data else None, args.cpu_time)))
            continue
        for kind, path in runs:
            spec = (args.w2v_batch or args.batch) if kind == "wav2vec2" else args.batch
            batches = sorted(int(b) for b in spec.split(","))
            jobs.append((size, kind, path, run_one, (kind, size, path, args.device, batches, args.seconds, args.steps,
                                                     args.warmup, bf16)))
    for size, kind, path, target, job_args in jobs:
        q = ctx.Queue()
        extra = (q,) if target is run_interleaved else (q, args.profile, args.repeat)
        p = ctx.Process(target=target, args=(*job_args, *extra))
        p.start()
        results = []
        while True:  # until the child says it is done (None) or dies
            try:
                r = q.get(timeout=5)
            except Exception:
                if not p.is_alive():
                    break
                continue
            if r is None:
                break
            r["mfu"] = r["flops_per_s"] / peak
            print(json.dumps(r), file=sys.stderr, flush=True)
            results.append(r)
        p.join()
        if p.exitcode != 0:
            failures.append(f"{kind} {size} {path}: exit {p.exitcode}")
            print(f"{kind} {size} {path}: failed (exit {p.exitcode})", file=sys.stderr, flush=True)
        if target is run_interleaved:
            rows += results
        elif results:
            rows.append(max(results, key=lambda r: r["audio_s_per_s"]) | {"tried": [r["batch"] for r in results]})
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    print(f"\nmachine: {dev}; matmul peak {peak / 1e12:.2f} TFLOP/s ({'bf16' if bf16 else 'fp32'}); "
          f"{f'real utterances of {args.data}' if args.data else f'utterances of {args.seconds:.0f} s (half padded to 80%)'}, batch sizes tried {args.batch} "
          f"(wav2vec 2.0: {args.w2v_batch or args.batch}), {'the median' if args.interleave else 'the fastest'} of "
          f"{args.repeat} x {args.steps} timed steps{' (interleaved)' if args.interleave else ''}"
          f"{'; times in CPU-seconds' if args.cpu_time else ''}\n")
    print("| size | model | path | batch | audio-s / s | vs wav2vec 2.0 | step (s) | peak mem (GiB) | "
          "model GFLOP / step | MFU | counted GFLOP / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = next((x for x in rows if x["model"] == "wav2vec2" and x["size"] == r["size"]), None)
        r["vs_wav2vec2"] = r["audio_s_per_s"] / ref["audio_s_per_s"] if ref else None
        ratio = f"{r['vs_wav2vec2']:.1f}x" if ref else "-"
        counted = f"{r['counted_flops_per_step'] / 1e9:,.0f}" if r["counted_flops_per_step"] else "-"
        print(f"| {r['size']} | {r['model']} | {r['path']} | {r['batch']} | {r['audio_s_per_s']:,.0f} | {ratio} | "
              f"{r['step_s']:.3f} | {r['peak_mem_gb']:.2f} | {r['flops_per_step'] / 1e9:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{counted} |")
    for r in rows:
        if r["size"] == "base":
            hours = W2V2_BASE_AUDIO_HOURS * 3600 / r["audio_s_per_s"] / 3600
            print(f"\n{r['model']} ({r['path']}) BASE: wav2vec 2.0 BASE's LibriSpeech-960 h schedule "
                  f"({W2V2_BASE_AUDIO_HOURS / 1e3:.0f}k h of audio) would take {hours:,.0f} device-hours here; "
                  f"one epoch of 960 h takes {960 / (r['audio_s_per_s']):.2f} device-hours")
    for f in failures:
        print(f"FAILED: {f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "peak_flops": peak, "bf16": bf16, "rows": rows,
                                               "failures": failures, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
