"""Getting features and encoders out of svqmae: ``svqmae extract`` and ``svqmae export-onnx``.

``svqmae extract --model M --data SRC --out DIR [--layers all|i,j] [--format npy|npz]``
    Hidden states for every utterance of a source (folder, TSV/CSV or lhotse manifest), in
    duration-sorted batches, one file per utterance plus ``DIR/index.tsv``:

    - ``--format npy``: ``DIR/features/<id>.npy``, float32 ``(L, T, D)``: the selected layers, stacked.
    - ``--format npz``: ``DIR/features/<id>.npz`` with one ``(T, D)`` float32 array per selected
      layer, named ``layer_<i>``.

    Layer 0 is the input embedding, layer i the output of encoder block i (the last one final-normed).
    ``T`` is the utterance's real token count (padding is cut off), ``downsample_rate`` samples each.
    ``index.tsv`` has one row per utterance: ``id file path seconds tokens`` (``file``: the features,
    relative to DIR; ``path``: the audio) + ``label text speaker`` when the source has them;
    ``DIR/features.json`` records the model, layers, width and frame rate.

``svqmae export-onnx --model M --out encoder.onnx``
    The encoder as an ONNX graph (opset 18; TorchScript exporter, ``--dynamo`` for torch.export):

    - inputs: ``waves`` float32 ``(B, S)`` 16 kHz zero-padded waveforms, ``lengths`` int64 ``(B,)`` real
      samples per row; batch and length are dynamic (the longest row needs at least 640 samples);
    - outputs: ``hidden_states`` float32 ``(L + 1, B, T, D)`` (input embedding + one per layer, the
      same as ``model.extract``), ``token_lengths`` int64 ``(B,)``; ``T = (S + 80) // 640`` for the
      default 25 Hz tokens; rows ``t >= token_lengths[b]`` are padding.

    The filterbank front end is in the graph (waveform in): :class:`MatmulLogFilterBank`, lhotse's
    Kaldi fbank with frames gathered by index and the FFT as a matrix product with a DFT basis. The
    graph matches ``model.extract`` to ~1e-5 on speech; what remains is float32 FFT rounding on the
    PyTorch side (torch's ``rfft`` is ~1e-4 off the exact log-mel in low-energy bins).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import config as C
from .api import load
from .data import Problems, WaveformBatches, cut_fields, cut_path, load_sources
from .model import SVQMAE

# --------------------------------------------------------------------------- layer selection


def parse_layers(spec: str, num_states: int) -> list[int]:
    """``all`` or comma-separated indices into the hidden states (negative counts from the end)."""
    if spec.strip().lower() == "all":
        return list(range(num_states))
    out = []
    for part in spec.split(","):
        try:
            i = int(part)
        except ValueError:
            raise C.ConfigError(f"--layers {spec!r}: expected 'all' or comma-separated integers") from None
        if not -num_states <= i < num_states:
            raise C.ConfigError(
                f"--layers {spec!r}: layer {i} out of range (the model has hidden states 0..{num_states - 1})"
            )
        out.append(i % num_states)
    return out


# --------------------------------------------------------------------------- extract

_UNSAFE = re.compile(r"[^A-Za-z0-9._/-]+")


def _feature_name(cut_id: str, taken: set[str]) -> str:
    """A cut id -> a unique, safe relative file stem (subfolders kept, no absolute paths or '..')."""
    parts = [p for p in _UNSAFE.sub("_", cut_id).split("/") if p not in ("", ".", "..")]
    stem = "/".join(parts) or "utt"
    name, n = stem, 1
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name


def _save_features(path: Path, states: list[np.ndarray], layers: list[int], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(path, np.stack(states))
    else:
        np.savez(path, **{f"layer_{i}": s for i, s in zip(layers, states)})


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def extract_features(
    model_path: str | Path,
    sources: list[str | Path],
    out_dir: str | Path,
    layers: str = "all",
    fmt: str = "npy",
    batch_seconds: float = 60.0,
    device: str = "auto",
    num_workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write per-utterance features and ``index.tsv`` into ``out_dir``; returns the index path.

    Utterances are sorted by duration and batched up to ``batch_seconds`` of audio, so padding is
    small; unreadable files are skipped and listed in ``out_dir/skipped_files.tsv``."""
    from lhotse.dataset import DynamicCutSampler
    from tqdm import tqdm

    if fmt not in ("npy", "npz"):
        raise C.ConfigError(f"--format {fmt!r}: expected npy or npz")
    dev = _device(device)
    model = load(model_path, device=dev)
    num_states = model.cfg.encoder.layers + 1
    chosen = parse_layers(layers, num_states)
    problems = Problems()
    cuts = load_sources(list(sources), problems).sort_by_duration(ascending=False)
    out = Path(out_dir)
    feat_dir = out / "features"
    feat_dir.mkdir(parents=True, exist_ok=True)
    (out / "features.json").write_text(json.dumps({
        "model": str(model_path), "format": fmt, "layers": chosen, "dim": model.cfg.encoder.dim,
        "downsample_rate": model.downsample_rate, "sample_rate": model.cfg.features.sample_rate,
        "frame_rate_hz": model.cfg.features.sample_rate / model.downsample_rate,
        "layout": "(L, T, D) per .npy" if fmt == "npy" else "one (T, D) array 'layer_<i>' per layer in each .npz",
    }, indent=2))

    with warnings.catch_warnings():  # lhotse suggests lazy CutSets; ours are small and already in memory
        warnings.filterwarnings("ignore", message=".*eagerly read CutSet")
        sampler = DynamicCutSampler(cuts, max_duration=batch_seconds, shuffle=False)
    loader = torch.utils.data.DataLoader(
        WaveformBatches(sample_rate=model.cfg.features.sample_rate), sampler=sampler, batch_size=None,
        num_workers=num_workers, prefetch_factor=2 if num_workers else None,
    )
    by_id = {c.id: c for c in cuts}
    extra = [k for k in ("label", "text", "speaker") if any(cut_fields(c)[k] for c in cuts)]
    taken: set[str] = set()
    index = out / "index.tsv"
    start, audio_s = time.monotonic(), 0.0
    bar = tqdm(total=len(cuts), unit="utt", desc="extract", disable=not progress, dynamic_ncols=True)
    with open(index, "w", newline="") as f, torch.inference_mode():
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "file", "path", "seconds", "tokens", *extra])
        for batch in loader:
            problems.items.extend(batch["failed"])
            bar.update(len(batch["failed"]))
            if not batch["ids"]:
                continue
            hidden, tok_len = model.extract(batch["waves"].to(dev), batch["lengths"].to(dev))
            sel = torch.stack([hidden[i] for i in chosen], dim=1).float().cpu().numpy()  # (B, L, T, D)
            for b, cut_id in enumerate(batch["ids"]):
                n = int(tok_len[b])
                rel = f"features/{_feature_name(cut_id, taken)}.{fmt}"
                _save_features(out / rel, list(sel[b, :, :n]), chosen, fmt)
                fields = cut_fields(by_id[cut_id])
                seconds = int(batch["lengths"][b]) / model.cfg.features.sample_rate
                w.writerow([cut_id, rel, cut_path(by_id[cut_id]), f"{seconds:.3f}", n, *(fields[k] for k in extra)])
                audio_s += seconds
            bar.update(len(batch["ids"]))
            bar.set_postfix_str(f"{audio_s / max(time.monotonic() - start, 1e-9):.1f} audio-s/s")
    bar.close()
    if len(problems):
        with open(out / "skipped_files.tsv", "w") as f:
            f.write("path\treason\n")
            f.writelines(f"{p}\t{r}\n" for p, r in problems.items)
    return index


def cmd_extract(args) -> None:
    index = extract_features(args.model, args.data, args.out, args.layers, args.format, args.batch_seconds,
                             args.device, args.workers, progress=not args.quiet)
    rows = sum(1 for _ in open(index)) - 1
    skipped = Path(args.out) / "skipped_files.tsv"
    note = f"; {sum(1 for _ in open(skipped)) - 1} unreadable files skipped (see {skipped})" if skipped.exists() else ""
    print(f"extract: {rows} utterances -> {Path(args.out) / 'features'}, index {index}{note}")


# --------------------------------------------------------------------------- ONNX


class MatmulLogFilterBank(nn.Module):
    """lhotse's ``Wav2LogFilterBank`` (Kaldi fbank, ``snip_edges=False``) in export-friendly ops.

    The same steps and constants (lhotse's window and mel matrix): edge-reflected framing, DC removal,
    pre-emphasis, window, power spectrum, mel, log. Frames are gathered by index (lhotse uses
    ``as_strided``) and the FFT is a matrix product with a DFT basis: ONNX ``DFT`` kernels lose
    ~1e-5 relative accuracy in float32 (torch's float32 ``rfft`` does too; the matrix product is
    closer to the exact float64 result than either). Matches the original to ~1e-4 on log-mel values."""

    def __init__(self, fbank: nn.Module):
        super().__init__()
        win = fbank.wav2win
        if fbank.use_energy or fbank.use_fft_mag or win.dither or win.snip_edges or not win.remove_dc_offset:
            raise ValueError("MatmulLogFilterBank: only lhotse's default Kaldi fbank settings are supported")
        self.length, self.shift, self.preemph = win._length, win._shift, float(win.preemph_coeff)
        n = fbank.fft_length  # frames are zero-padded to n: only the first `length` rows of the basis matter
        angle = 2 * math.pi * torch.outer(torch.arange(self.length).double(), torch.arange(n // 2 + 1).double()) / n
        self.register_buffer("dft", torch.cat([angle.cos(), -angle.sin()], dim=1).float(), persistent=False)
        self.register_buffer("window", win._window.detach().reshape(-1).clone(), persistent=False)
        self.register_buffer("mel", fbank._fb.detach().clone(), persistent=False)  # (n/2 + 1, F)
        self.register_buffer("eps", fbank._eps.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S), S >= frame length -> (B, N, F) log-mel, N = (S + shift/2) // shift."""
        L, shift = self.length, self.shift
        n_frames = (x.shape[1] + shift // 2) // shift  # symbolic under both ONNX exporters
        left = (L - shift) // 2
        # both ends reflected (edge sample repeated), as lhotse does; frames never reach past L on the right
        padded = torch.cat([x[:, :left].flip(1), x, x[:, -L:].flip(1)], dim=1)
        idx = torch.arange(n_frames, device=x.device)[:, None] * shift + torch.arange(L, device=x.device)
        frames = padded[:, idx]  # (B, N, L)
        frames = frames - frames.mean(-1, keepdim=True)
        frames = frames - self.preemph * torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        re, im = ((frames * self.window) @ self.dft).chunk(2, dim=-1)  # (B, N, n/2 + 1) each
        return torch.max((re * re + im * im) @ self.mel, self.eps).log()


class OnnxEncoder(nn.Module):
    """``(waves, lengths) -> (hidden_states (L+1, B, T, D), token_lengths (B,))``, for export.

    A fresh encoder-only copy of ``model`` (the original is left untouched) whose front end uses
    :class:`MatmulLogFilterBank`."""

    def __init__(self, model: SVQMAE):
        super().__init__()
        enc = SVQMAE(model.cfg).drop_decoder()
        own = enc.state_dict().keys()
        enc.load_state_dict({k: v for k, v in model.state_dict().items() if k in own})
        enc.frontend.fbank = MatmulLogFilterBank(enc.frontend.fbank)
        self.model = enc.eval()

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, tok_len = self.model.extract(waves, lengths)
        return torch.stack(hidden), tok_len


INPUTS, OUTPUTS = ["waves", "lengths"], ["hidden_states", "token_lengths"]


def export_onnx(model: SVQMAE | str | Path, out: str | Path, opset: int = 18, dynamo: bool = False) -> Path:
    """Export the encoder (waveform in, every hidden state out) with dynamic batch and length.

    ``dynamo=False`` (default) uses the TorchScript exporter: seconds instead of the torch.export-based
    exporter's tens of seconds, and verified on other batch sizes and lengths than the traced ones by
    the tests; ``dynamo=True`` uses torch.export (PyTorch's default since 2.9) for the same graph."""
    import logging

    import onnx

    if not isinstance(model, SVQMAE):
        model = load(model)
    wrapper = OnnxEncoder(model).cpu().eval()
    sr = model.cfg.features.sample_rate
    example = (torch.randn(2, sr), torch.tensor([sr, sr * 3 // 4]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer notes; the parity check is what counts
        if dynamo:
            dyn = torch.export.Dim.DYNAMIC
            kwargs = {"dynamic_shapes": {"waves": {0: dyn, 1: dyn}, "lengths": {0: dyn}}}
        else:
            kwargs = {"dynamic_axes": {"waves": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
                                       "hidden_states": {1: "batch", 2: "tokens"}, "token_lengths": {0: "batch"}}}
        torch.onnx.export(wrapper, example, str(out), dynamo=dynamo, opset_version=opset,
                          input_names=INPUTS, output_names=OUTPUTS, **kwargs)
    proto = onnx.load(str(out))
    meta = {"producer": "svqmae", "sample_rate": sr, "downsample_rate": model.downsample_rate,
            "num_hidden_states": model.cfg.encoder.layers + 1, "hidden_size": model.cfg.encoder.dim,
            "inputs": "waves float32 (B,S) 16 kHz zero-padded; lengths int64 (B,) samples",
            "outputs": "hidden_states float32 (L+1,B,T,D); token_lengths int64 (B,)"}
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in meta.items()})
    onnx.save(proto, str(out))
    return out


def check_onnx(model: SVQMAE, onnx_path: str | Path, seed: int = 0) -> float:
    """Max |ONNX - PyTorch| over all hidden states for a padded batch of two different lengths."""
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    sr = model.cfg.features.sample_rate
    lengths = torch.tensor([int(1.3 * sr), int(0.7 * sr)])
    waves = 0.1 * torch.randn(2, int(lengths.max()), generator=g)
    waves[1, lengths[1]:] = 0
    with torch.inference_mode():
        ref, ref_len = model.eval().extract(waves, lengths)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got, got_len = sess.run(None, {"waves": waves.numpy(), "lengths": lengths.numpy()})
    if not np.array_equal(got_len, ref_len.numpy()):
        raise AssertionError(f"{onnx_path}: token lengths differ ({got_len} vs {ref_len.tolist()})")
    return float(np.abs(got - torch.stack(ref).numpy()).max())


def cmd_export_onnx(args) -> None:
    model = load(args.model)
    path = export_onnx(model, args.out, args.opset, dynamo=args.dynamo)
    msg = f"export-onnx: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)"
    if args.check:
        msg += f"; max |onnxruntime - PyTorch| = {check_onnx(model, path):.2e}"
    print(msg)


# --------------------------------------------------------------------------- CLI


def add_cli(sub) -> None:
    """``extract``, ``export-onnx`` and (from :mod:`svqmae.s3prl`) ``s3prl-install``."""
    from .s3prl import add_cli as add_s3prl_cli

    p = sub.add_parser("extract", help="hidden states of every utterance of a source, one file each plus an index")
    p.add_argument("--model", required=True, metavar="M", help="model/ folder, run DIR or .ckpt")
    p.add_argument("--data", action="append", required=True, metavar="SRC",
                   help="folder of audio, TSV/CSV manifest or lhotse manifest (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--layers", default="all", help="'all' (default) or comma-separated indices, 0 = input "
                   "embedding, -1 = last layer, e.g. 6,12")
    p.add_argument("--format", choices=["npy", "npz"], default="npy",
                   help="npy: one (L,T,D) array per utterance; npz: one (T,D) array per layer per utterance")
    p.add_argument("--batch-seconds", type=float, default=60.0, help="audio seconds per batch (default 60)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=1, help="audio loading processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export-onnx", help="export the encoder (waveform in, all hidden states out) to ONNX")
    p.add_argument("--model", required=True, metavar="M", help="model/ folder, run DIR or .ckpt")
    p.add_argument("--out", required=True, metavar="FILE.onnx")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (slower to export)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime-vs-PyTorch parity check on a random batch")
    p.set_defaults(func=cmd_export_onnx)

    add_s3prl_cli(sub)
