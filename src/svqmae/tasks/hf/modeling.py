"""``SVQMAEModel`` (the encoder) and ``SVQMAEForCTC`` (encoder + CTC head) as transformers models.

They are svqmae's own modules, not a re-implementation: ``SVQMAEModel`` holds the front end, token
embedding and Transformer of :class:`svqmae.model.SVQMAE` (its decoder and quantizer, which only
pre-training needs, are left out) under the same parameter names, and its forward pass is
``SVQMAE.extract``. So the hidden states are svqmae's: the utterance's level (models with
``model.features.level_state``, the default), the input embedding, then the output of each layer
(the last one final-normed, = ``last_hidden_state``),
one token per ``config.inputs_to_logits_ratio`` samples (640 = 40 ms by default).

``SVQMAEForCTC`` is svqmae's fine-tuned recognizer (:class:`svqmae.model.ctc.CTCModel` with the svqmae
backbone): dropout, a linear CTC head, ``logits`` of shape ``(B, T * ctc_upsample, vocab_size)``, and
with ``labels`` (padded with -100, as for ``Wav2Vec2ForCTC``) the CTC loss svqmae trains with. Frames
past the end of an utterance (batch padding) emit the blank with certainty, so greedy decoding of a
padded batch (``processor.batch_decode(logits.argmax(-1))``) needs no lengths.

Loading a local folder that is not a complete svqmae export (a missing ``config.json`` or weights file,
another model's config, svqmae's own training-folder format, weights that do not fit the config) is a
one-line ``OSError`` that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from ...model import SVQMAE
from ...model.transformer import init_weights
from .configuration import SVQMAEConfig

WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_folder(folder: Path, need_config: bool = True) -> None:
    """Raise a one-line ``OSError`` naming the file if ``folder`` is not a loadable svqmae export."""
    cfg_file = folder / "config.json"
    if need_config:
        if not cfg_file.is_file():
            raise OSError(f"{cfg_file}: missing (a transformers model folder holds config.json and model.safetensors)")
        try:
            meta = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise OSError(f"{cfg_file}: unreadable ({e.__class__.__name__})") from None
        if not isinstance(meta, dict) or meta.get("model_type") != SVQMAEConfig.model_type:
            meta = meta if isinstance(meta, dict) else {}
            if meta.get("format") == "svqmae":
                raise OSError(f"{cfg_file}: an svqmae model folder, not a transformers one; convert it with "
                              f"`svqmae export-hf --model {folder} --out DIR`")
            raise OSError(f"{cfg_file}: not an svqmae model config (model_type={meta.get('model_type')!r})")
    if not any((folder / name).is_file() for name in WEIGHTS_FILES):
        raise OSError(f"{folder / WEIGHTS_FILES[0]}: missing (the model's weights)")


class SVQMAEPreTrainedModel(PreTrainedModel):
    """Common base: configuration class, weight initialisation, input lengths and checked loading."""

    config_class = SVQMAEConfig
    base_model_prefix = "svqmae"
    main_input_name = "input_values"
    _no_split_modules = ["Block"]
    _keep_in_fp32_modules = ["frontend"]  # the filterbank: waveform in, float32 throughout
    # parameters a checkpoint may lack (a new head: initialised) or carry in excess (a head this class drops)
    _new_ok: tuple[str, ...] = ()
    _extra_ok: tuple[str, ...] = ()

    def _init_weights(self, module: nn.Module) -> None:
        """svqmae's initialisation (truncated normal Linear weights, unit LayerNorms) of the modules that
        were not loaded from a checkpoint (e.g. a new CTC head). The filterbank's tables are left alone."""
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and not any(
                getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False)):
            with torch.no_grad():
                init_weights(module)

    def _get_feat_extract_output_lengths(self, input_lengths: torch.Tensor) -> torch.Tensor:
        """Input samples -> encoder tokens (the name Wav2Vec2 gives it)."""
        return self.base_model.frontend.num_tokens(input_lengths)

    @staticmethod
    def sample_lengths(input_values: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B,) real samples per row: the attention mask's sum, or the full width without one."""
        if attention_mask is None:
            return torch.full((input_values.shape[0],), input_values.shape[1], dtype=torch.long,
                              device=input_values.device)
        return attention_mask.sum(-1).long()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``, checked: for a local folder that is not a complete svqmae
        export, and for weights that do not fit the configuration (missing, unexpected or misshapen
        tensors, other than a new CTC head), a one-line ``OSError`` naming the file."""
        where = Path(str(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if where.is_dir():
            check_folder(where, need_config=kwargs.get("config") is None)
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                                  **kwargs)
        except SafetensorError as e:
            raise OSError(f"{where / WEIGHTS_FILES[0]}: unreadable ({' '.join(str(e).split())[:200]})") from None
        except (RuntimeError, ValueError) as e:
            if "mismatched_sizes" not in str(e):
                raise
            raise OSError(f"{where / WEIGHTS_FILES[0]}: weights do not match the svqmae config (tensors of the wrong "
                          "shape, listed in transformers' load report above)") from None
        missing = [k for k in info.get("missing_keys", ()) if not k.startswith(cls._new_ok)]
        unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith(cls._extra_ok)]
        mismatched = [k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())]
        if missing or unexpected or mismatched:
            detail = "; ".join(f"{what} {sorted(keys)[:4]}" for what, keys in
                               (("missing", missing), ("unexpected", unexpected), ("misshapen", mismatched)) if keys)
            raise OSError(f"{where / WEIGHTS_FILES[0]}: weights do not match the svqmae config ({detail})")
        model.base_model.frontend.requires_grad_(False)  # constant tables (loading makes them trainable)
        return (model, info) if want_info else model


class SVQMAEModel(SVQMAEPreTrainedModel):
    """The svqmae encoder: ``input_values`` (B, S) 16 kHz + ``attention_mask`` (B, S) -> ``BaseModelOutput``
    with ``last_hidden_state`` (B, T, D) and, with ``output_hidden_states=True``, every layer's
    ``hidden_states``, those of svqmae's ``extract``: [the utterance's level (``model.features.level_state``),]
    the input embedding, one per layer. Rows ``t >= token_lengths(attention_mask)[b]`` of
    utterance ``b`` are padding."""

    _extra_ok = ("ctc_head.",)  # the encoder of a fine-tuned folder

    def __init__(self, config: SVQMAEConfig):
        super().__init__(config)
        # svqmae's model without its decoder and quantizer. Built on the CPU in float32: lhotse computes
        # the filterbank's tables with numpy, which transformers' meta-device construction (and a bfloat16
        # default dtype) cannot run. The front end stays float32 (_keep_in_fp32_modules).
        dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.device("cpu"):
                core = SVQMAE(config.svqmae_config().model).drop_decoder()
        finally:
            torch.set_default_dtype(dtype)
        self.frontend, self.embed, self.encoder = core.frontend, core.embed.to(dtype), core.encoder.to(dtype)
        self.level_embed = core.level_embed.to(dtype) if core.level_embed is not None else None
        self.with_level_state = core.cfg.features.level_state  # hidden_states[0]: the utterance's level
        if self.with_level_state:
            self.register_buffer("level_proj", core.level_proj)
        self.post_init()

    def token_lengths(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) attention mask -> (B,) real tokens per utterance."""
        return self._get_feat_extract_output_lengths(attention_mask.sum(-1).long())

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> BaseModelOutput | tuple:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        lengths = self.sample_lengths(input_values, attention_mask)
        dtype = self.embed[0].weight.dtype
        with torch.autocast(input_values.device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16)):
            # svqmae's own forward, on these modules: the same states as svqmae's extract
            hidden, _ = SVQMAE.extract(self, input_values, lengths, level_state=self.with_level_state)
        states = tuple(hidden) if output_hidden_states else None
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            return (hidden[-1],) + ((states,) if states is not None else ())
        return BaseModelOutput(last_hidden_state=hidden[-1], hidden_states=states)


class SVQMAEForCTC(SVQMAEPreTrainedModel):
    """The svqmae encoder + a linear CTC head (svqmae's fine-tuned recognizer), as ``Wav2Vec2ForCTC``:
    ``logits`` (B, T * ctc_upsample, vocab_size) and, with ``labels`` (B, L) padded with -100, ``loss``."""

    _new_ok = ("ctc_head.",)  # a CTC model made from a pre-trained encoder gets a new head

    def __init__(self, config: SVQMAEConfig):
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("SVQMAEForCTC needs config.vocab_size (CTC outputs, blank included), e.g. "
                             "SVQMAEForCTC.from_pretrained(DIR, vocab_size=len(tokenizer))")
        self.svqmae = SVQMAEModel(config)
        self.dropout = nn.Dropout(config.final_dropout)
        self.ctc_head = nn.Linear(config.hidden_size, config.vocab_size * config.ctc_upsample)
        self.post_init()

    def freeze_base_model(self) -> None:
        """Train the CTC head only (svqmae's ``ctc.freeze_steps`` phase)."""
        for p in self.svqmae.parameters():
            p.requires_grad = False

    def frames(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) CTC frames per utterance."""
        return self._get_feat_extract_output_lengths(self.sample_lengths(input_values, attention_mask)) \
            * self.config.ctc_upsample

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutput | tuple:
        V, k = self.config.vocab_size, self.config.ctc_upsample
        if labels is not None and labels.max() >= V:
            raise ValueError(f"label ids must be < vocab_size ({V}), got {int(labels.max())}")
        out = self.svqmae(input_values, attention_mask, output_hidden_states=output_hidden_states, return_dict=True)
        h = out.last_hidden_state
        B, T, _ = h.shape
        logits = self.ctc_head(self.dropout(h)).view(B, T * k, V)
        frames = self.frames(input_values, attention_mask)
        beyond = torch.arange(T * k, device=logits.device)[None, :] >= frames[:, None]  # (B, T*k) padding
        if beyond.any():
            blank_only = torch.full((V,), -1e4, dtype=logits.dtype, device=logits.device)
            blank_only[self.config.pad_token_id] = 0.0
            logits = torch.where(beyond[..., None], blank_only, logits)
        loss = self.ctc_loss(logits, frames, labels) if labels is not None else None
        if return_dict is False or (return_dict is None and not self.config.return_dict):
            rest = (logits,) + ((out.hidden_states,) if out.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return CausalLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)

    def ctc_loss(self, logits: torch.Tensor, frames: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CTC loss as svqmae fine-tunes with it (blank = ``pad_token_id``; ``mean``: each utterance's loss
        divided by its label count, averaged). ``labels``: (B, L), -100 (any negative) past each label."""
        valid = labels >= 0
        log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)  # (T*k, B, V)
        return F.ctc_loss(log_probs, labels.masked_select(valid), frames, valid.sum(-1),
                          blank=self.config.pad_token_id, reduction=self.config.ctc_loss_reduction,
                          zero_infinity=self.config.ctc_zero_infinity)
