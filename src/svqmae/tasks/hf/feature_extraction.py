"""``SVQMAEFeatureExtractor``: raw 16 kHz waveforms -> padded ``input_values`` + ``attention_mask``.

Nothing is computed here: the log-mel filterbank and its per-utterance normalisation are part of the
model (the waveform goes in, as in svqmae), so the feature extractor only batches. Padding is zeros,
and the attention mask tells the model where each utterance ends; the model's output for an
utterance does not depend on the padding around it.
"""

from __future__ import annotations

import numpy as np
from transformers import BatchFeature, SequenceFeatureExtractor
from transformers.utils import logging

logger = logging.get_logger(__name__)


class SVQMAEFeatureExtractor(SequenceFeatureExtractor):
    """Batches mono waveforms at ``sampling_rate`` (16 kHz for every svqmae model so far).

    ``__call__(raw_speech, sampling_rate=16000, padding=True, return_tensors="pt")`` takes one waveform
    (1-D array or list of floats) or a list of them, and returns ``input_values`` (float32, zero-padded)
    and ``attention_mask`` (1 on samples, 0 on padding). Audio at another rate is refused with a message
    that says how to resample it; multi-channel audio must be down-mixed first."""

    model_input_names = ["input_values", "attention_mask"]

    def __init__(self, feature_size: int = 1, sampling_rate: int = 16000, padding_value: float = 0.0,
                 return_attention_mask: bool = True, **kwargs):
        super().__init__(feature_size=feature_size, sampling_rate=sampling_rate, padding_value=padding_value,
                         **kwargs)
        self.return_attention_mask = return_attention_mask

    def __call__(self, raw_speech, padding=True, max_length: int | None = None, truncation: bool = False,
                 pad_to_multiple_of: int | None = None, return_attention_mask: bool | None = None,
                 return_tensors=None, sampling_rate: int | None = None, **kwargs) -> BatchFeature:
        if sampling_rate is None:
            logger.warning_once(f"{type(self).__name__}: no sampling_rate given; the audio is taken to be at "
                                f"{self.sampling_rate} Hz. Pass sampling_rate= to have other rates refused.")
        elif int(sampling_rate) != self.sampling_rate:
            sr, want = int(sampling_rate), self.sampling_rate
            raise ValueError(
                f"{type(self).__name__}: the audio is at {sr} Hz but this model takes {want} Hz; resample it "
                f"first, e.g. librosa.resample(x, orig_sr={sr}, target_sr={want}), "
                f"torchaudio.functional.resample(x, {sr}, {want}) or svqmae.audio.resample(x, {sr}, {want}) "
                f"(the ASR pipeline resamples {{'raw': x, 'sampling_rate': {sr}}} itself, with torchaudio)")
        batched = isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0 and not np.isscalar(raw_speech[0])
        if isinstance(raw_speech, np.ndarray) and raw_speech.ndim > 1:
            if raw_speech.ndim > 2:
                raise ValueError(f"{type(self).__name__}: expected mono audio, got an array of shape "
                                 f"{raw_speech.shape}")
            batched = True
        waves = [np.asarray(x, dtype=np.float32) for x in (raw_speech if batched else [raw_speech])]
        for x in waves:
            if x.ndim != 1:
                raise ValueError(f"{type(self).__name__}: expected mono audio (one sample per time step), got "
                                 f"shape {x.shape}; down-mix it first, e.g. x.mean(axis=-1)")
        padded = self.pad(BatchFeature({"input_values": waves}), padding=padding, max_length=max_length,
                          truncation=truncation, pad_to_multiple_of=pad_to_multiple_of,
                          return_attention_mask=return_attention_mask)
        padded["input_values"] = [np.asarray(x, dtype=np.float32) for x in padded["input_values"]]
        if padded.get("attention_mask") is not None:
            padded["attention_mask"] = [np.asarray(m, dtype=np.int32) for m in padded["attention_mask"]]
        return padded.convert_to_tensors(return_tensors) if return_tensors is not None else padded
