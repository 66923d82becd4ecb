"""``SVQMAEConfig``: the transformers configuration of an svqmae encoder (and its CTC head).

It holds svqmae's own configuration (``svqmae``: the ``preset`` and ``model`` sections of
:class:`svqmae.config.Config`, as saved in svqmae's ``config.json``) and derives from it the attributes
transformers and its users look for (``hidden_size``, ``num_hidden_layers``, ...; recomputed on every
load, never read back). The CTC head adds ``vocab_size``, ``ctc_upsample`` (CTC frames per token) and
the loss settings, named as in ``Wav2Vec2Config``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from ...config import Config, from_dict, to_dict

# attributes derived from the svqmae section: written to config.json for readers, recomputed on load
DERIVED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "sampling_rate",
           "inputs_to_logits_ratio", "num_mel_bins")


class SVQMAEConfig(PretrainedConfig):
    """Configuration of :class:`SVQMAEModel` and :class:`SVQMAEForCTC`.

    Args:
        svqmae: svqmae's configuration as a dict (``{"preset": ..., "model": {...}}``; a full svqmae config
            with a ``train`` section is accepted, and the ``train`` section dropped). Default: svqmae's
            defaults (the ``base`` architecture).
        vocab_size: CTC outputs (blank and ``<unk>`` included); ``None`` for an encoder without a head.
        ctc_upsample: CTC frames per encoder token (svqmae's ``ctc.upsample``).
        final_dropout: dropout before the CTC head (svqmae's ``ctc.head_dropout``).
        ctc_loss_reduction: ``"mean"`` (svqmae's: per-utterance loss divided by its target length, then
            averaged over the batch) or ``"sum"``.
        ctc_zero_infinity: zero the loss of utterances too short for their transcript.
        pad_token_id: the CTC blank (svqmae's index 0; the tokenizer's pad token).
    """

    model_type = "svqmae"

    def __init__(self, svqmae: dict | None = None, vocab_size: int | None = None, ctc_upsample: int = 1,
                 final_dropout: float = 0.1, ctc_loss_reduction: str = "mean", ctc_zero_infinity: bool = True,
                 pad_token_id: int = 0, **kwargs):
        if kwargs.get("model_type", self.model_type) != self.model_type:
            raise ValueError(f"not an svqmae configuration (model_type={kwargs['model_type']!r})")
        for key in DERIVED:
            kwargs.pop(key, None)
        cfg = from_dict({k: v for k, v in (svqmae or {}).items() if k != "train"}, "svqmae configuration")
        self.svqmae = {"preset": cfg.preset, "model": to_dict(cfg)["model"]}
        self.vocab_size = vocab_size
        self.ctc_upsample = int(ctc_upsample)
        self.final_dropout = final_dropout
        if ctc_loss_reduction not in ("mean", "sum"):
            raise ValueError(f"ctc_loss_reduction must be 'mean' or 'sum', got {ctc_loss_reduction!r}")
        self.ctc_loss_reduction = ctc_loss_reduction
        self.ctc_zero_infinity = ctc_zero_infinity
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        m = cfg.model
        self.hidden_size = m.encoder.dim
        self.num_hidden_layers = m.encoder.layers
        self.num_attention_heads = m.encoder.heads
        self.intermediate_size = m.encoder.ffn_dim
        self.sampling_rate = m.features.sample_rate
        self.num_mel_bins = m.features.n_mels
        hop = int(m.features.sample_rate * m.features.frame_shift_ms / 1000)
        # input samples per output frame (the ASR pipeline aligns its chunks to it)
        self.inputs_to_logits_ratio = hop * m.features.stack // self.ctc_upsample

    def svqmae_config(self) -> Config:
        """svqmae's :class:`~svqmae.config.Config` (``train`` at its defaults)."""
        return from_dict(self.svqmae, "svqmae configuration")
