"""What every part of the data room shares: the error type, the problem list of a lenient read,
a cut's fields and audio location, a stable hash, and the held-out slice of a streamed corpus."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from itertools import islice

from lhotse import CutSet


class DataError(ValueError):
    """A bad data source; the message names the file and the problem."""


@dataclass
class Problems:
    """Files that could not be used, with the reason: (path, reason), each file once however often it
    was tried (a training run meets a bad file once per epoch). ``repeated``: items listed more than
    once (path, message), of which one copy was kept."""

    items: list[tuple[str, str]] = field(default_factory=list)
    repeated: list[tuple[str, str]] = field(default_factory=list)
    _seen: set = field(default_factory=set, init=False, repr=False, compare=False)
    _synced: int = field(default=0, init=False, repr=False, compare=False)

    def add(self, path: str, reason: str) -> None:
        path = str(path)
        if self._synced != len(self.items):  # ``items`` was extended directly
            self._seen, self._synced = {p for p, _ in self.items}, len(self.items)
        if path not in self._seen:
            self._seen.add(path)
            self.items.append((path, reason))
            self._synced += 1

    def __len__(self) -> int:
        return len(self.items)


def cut_fields(cut) -> dict:
    """A cut's ``label``, ``text`` and ``speaker`` (from its first supervision), '' where absent."""
    sup = cut.supervisions[0] if cut.supervisions else None
    custom = (sup.custom or {}) if sup is not None else {}
    return {
        "label": str(custom.get("label", "") or ""),
        "text": (sup.text or "") if sup is not None else "",
        "speaker": (sup.speaker or "") if sup is not None else "",
    }


def cut_path(cut) -> str:
    """Where a cut's audio lives: its file, or ``SHARD.tar/CUT_ID`` for audio from a Shar shard."""
    src = cut.recording.sources[0]
    if src.type in ("memory", "shar"):
        custom = cut.custom or {}
        return f"{custom.get('shar_audio') or custom.get('shard_origin') or 'shar'}/{cut.id}"
    return src.source


def stable_hash(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def heldout_from_head(cuts, n: int, window: int | None = None) -> CutSet:
    """The held-out slice of a corpus too large to materialise: the ``n`` cuts with the smallest id
    hash among its first ``window`` (default ``4 n``) cuts, in listed order; one short read, O(n)
    memory. (Shar shards are written in a seeded random order, so their head is a random sample.)"""
    if n <= 0:
        return CutSet.from_cuts([])
    head = list(islice(iter(cuts), window or 4 * n))
    if len(head) < 2:
        return CutSet.from_cuts([])
    ranked = sorted(head, key=lambda c: stable_hash(c.id))[: min(n, len(head) - 1)]
    keep = {c.id for c in ranked}
    return CutSet.from_cuts(c for c in head if c.id in keep)
