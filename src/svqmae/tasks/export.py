"""Encoders out of svqmae: ``svqmae export-onnx``.

``svqmae export-onnx --model M --out encoder.onnx``
    The encoder as an ONNX graph (opset 18; TorchScript exporter, ``--dynamo`` for torch.export):

    - inputs: ``waves`` float32 ``(B, S)`` 16 kHz zero-padded waveforms, ``lengths`` int64 ``(B,)`` real
      samples per row; batch and length are dynamic (the longest row needs at least 640 samples);
    - outputs: ``hidden_states`` float32 ``(num_states, B, T, D)`` (the same as ``model.extract``:
      [the utterance's level,] the input embedding, one per layer), ``token_lengths`` int64 ``(B,)``;
      ``T = (S + 80) // 640`` for the default 25 Hz tokens; rows ``t >= token_lengths[b]`` are padding.

    The filterbank front end is in the graph (waveform in): :class:`MatmulLogFilterBank`, lhotse's
    Kaldi fbank with frames gathered by index and the FFT as a matrix product with a DFT basis. The
    graph matches ``model.extract`` to ~1e-5 on speech; what remains is float32 FFT rounding on the
    PyTorch side (torch's ``rfft`` is ~1e-4 off the exact log-mel in low-energy bins).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..engine.args import number
from ..model import SVQMAE
from ..model.io import one_line
from .outputs import output_file

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
    """``(waves, lengths) -> (hidden_states (num_states, B, T, D), token_lengths (B,))``, for export.

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
        model = SVQMAE.from_pretrained(model)
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
        try:
            torch.onnx.export(wrapper, example, str(out), dynamo=dynamo, opset_version=opset,
                              input_names=INPUTS, output_names=OUTPUTS, **kwargs)
        except torch.onnx.errors.OnnxExporterError as e:
            raise ConfigError(f"--opset {opset}: the encoder cannot be exported at this opset ({one_line(e)}); "
                              f"the default is 18") from None
    proto = onnx.load(str(out))
    meta = {"producer": "svqmae", "sample_rate": sr, "downsample_rate": model.downsample_rate,
            "num_hidden_states": model.num_states, "hidden_size": model.cfg.encoder.dim,
            "inputs": "waves float32 (B,S) 16 kHz zero-padded; lengths int64 (B,) samples",
            "outputs": "hidden_states float32 (num_hidden_states,B,T,D); token_lengths int64 (B,)"}
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
    output_file(args.out, "onnx")
    model = SVQMAE.from_pretrained(args.model)
    path = export_onnx(model, args.out, args.opset, dynamo=args.dynamo)
    msg = f"export-onnx: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)"
    if args.check:
        msg += f"; max |onnxruntime - PyTorch| = {check_onnx(model, path):.2e}"
    print(msg)


# --------------------------------------------------------------------------- command line


def add_cli(sub) -> None:
    p = sub.add_parser("export-onnx", help="export the encoder (waveform in, all hidden states out) to ONNX")
    p.add_argument("--model", required=True, metavar="M", help="model/ folder, run DIR or .ckpt")
    p.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    p.add_argument("--opset", type=number(">= 1"), default=18, help="ONNX opset version (default 18)")
    p.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (slower to export)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime-vs-PyTorch parity check on a random batch")
    p.set_defaults(func=cmd_export_onnx)
