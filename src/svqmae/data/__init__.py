"""The data room: audio I/O (``audio``), sources and manifests (``sources``), batching and sampling
(``loader``), corpus recipes (``recipes``), the synthesized demo corpus (``synth``) and text units
(``text``). It imports nothing of svqmae but ``config``."""

from .audio import AudioError, read_audio, resample
from .loader import (
    CTCBatches,
    EndlessBatches,
    EpochBatches,
    WaveformBatches,
    batch_loader,
    ctc_loader,
    pretrain_loader,
    resolve_workers,
    split_heldout,
)
from .sources import (
    DataError,
    Problems,
    check_source,
    cut_fields,
    cut_path,
    cuts_to_rows,
    load_cut,
    load_source,
    load_sources,
    read_span,
    write_manifest,
)

__all__ = ["AudioError", "read_audio", "resample", "CTCBatches", "EndlessBatches", "EpochBatches",
           "WaveformBatches", "batch_loader", "ctc_loader", "pretrain_loader", "resolve_workers", "split_heldout", "DataError",
           "Problems", "check_source", "cut_fields", "cut_path", "cuts_to_rows", "load_cut", "load_source",
           "load_sources", "read_span", "write_manifest"]
