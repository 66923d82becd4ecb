"""The built-in demo corpus: speech synthesized with eSpeak NG, so the project runs end to end on a
machine with no data at all (``svqmae data synth --out DIR [--minutes M] [--seed S]``).

eSpeak NG comes from the ``espeakng-loader`` package (it bundles ``libespeak-ng`` and its voice
data; no system package) and is driven through ``ctypes``. Many voices (English accents and
Mandarin x voice variants), speaking rates and pitches, and light background noise make the
speakers; 3 in 4 voice variants are train-only and the rest test-only, so the splits are
speaker-disjoint and the test voices unheard. Four tasks, each with ``train.tsv`` and ``test.tsv``:

- ``keywords``: 1 s clips of the 12 SUPERB KS classes (ten command words, ``_unknown_`` words,
  ``_silence_`` = background noise); ``label`` is the class, ``text`` the word spoken.
- ``english``: English sentences, upper-case transcripts in ``text``.
- ``mandarin``: Mandarin sentences (the ``cmn`` voice), character transcripts in ``text``.
- ``styles``: English sentences in four speaking styles (``neutral``, ``happy``, ``sad``,
  ``angry``) made from pitch level, pitch range, rate and loudness; ``label`` is the style.

``pretrain.tsv`` at the top lists every train-split file (the unlabeled pre-training set).

``test_items`` (the demo asks for 400) tops the test split of each labelled task (``keywords``,
``styles``) up to at least that many utterances, so that a score on it is precise (400 items: a 95%
interval of at most about +-5 points). The added utterances come after the planned ones, from a
generator of their own, and are spoken by more unseen voices: every test-only variant in every
English accent, each with its own pitch, range and rate. Everything else, the pre-training set
included, is the same file for file as without them.

Everything, audio bytes included, is a pure function of ``seed``, ``minutes`` and ``test_items``. eSpeak NG is not
that by itself, for three reasons, each handled in :class:`ESpeak`:

- Its own random generator (pitch flutter, Klatt noise) is seeded per utterance
  (``espeak_ng_SetRandSeed``).
- The ``klatt 6`` voice variants (``caleb``, ``adam``, ``Reed``, ``benjamin``, ``david``: eSpeak's
  speechPlayer back end) take their aspiration and frication noise from the C library's
  ``rand()``, which eSpeak never seeds: a process-wide state that anything in the process may draw
  from or reseed (``libuuid`` reseeds it with time ^ pid; torch, onnxruntime, grpc and Pillow link
  ``rand`` too), and that a forked worker inherits from its parent. One draw from it anywhere in
  the parent between two runs changed those files, e.g. ``keywords-00027.flac`` (``caleb``) in the
  0.5-minute test corpus. So ``rand()`` is reseeded (``srand``) with the utterance's seed just before
  each synthesis; a worker process has no other thread that could draw from it in between.
- Its synthesis state carries from one utterance to the next (pitch-flutter phase, Klatt filter
  and echo memories live in static variables, which ``espeak_Terminate``/``espeak_Initialize``
  do not reset), so an utterance depends on what the same library copy rendered before. Utterances
  are therefore rendered in fixed shards, in order, each shard by a fresh engine; and every engine
  loads its own private copy of ``libespeak-ng`` (a copied file is a new library to the dynamic
  loader, with fresh statics), so it never starts from state that the parent process, or another
  engine in the same process, left behind (a forked worker would otherwise inherit it).
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .audio import resample, write_audio
from .sources import DataError, write_manifest

FORMAT_VERSION = 2  # 2: klatt 6 voices seeded per utterance (their files changed)
SAMPLE_RATE = 16000
N_SHARDS = 8
TEST_EVERY = 4  # every 4th utterance (and 1 voice variant in 4) is test

KS_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KS_CLASSES = (*KS_WORDS, "_unknown_", "_silence_")
UNKNOWN_WORDS = ("bed", "bird", "cat", "dog", "eight", "five", "four", "happy", "house", "marvin", "nine",
                 "one", "seven", "sheila", "six", "three", "tree", "two", "wow", "zero")
STYLES = ("neutral", "happy", "sad", "angry")
TASKS = ("keywords", "english", "mandarin", "styles")
LABELS = {"keywords": KS_CLASSES, "styles": STYLES}  # the labelled tasks and their classes
SHARE = {"keywords": 0.3, "english": 0.3, "mandarin": 0.15, "styles": 0.25}  # of the minutes asked for
# at least every class once in each split (labels cycle every TEST_EVERY utterances)
MIN_COUNT = {"keywords": len(KS_CLASSES) * TEST_EVERY, "english": 2 * TEST_EVERY, "mandarin": 2 * TEST_EVERY,
             "styles": len(STYLES) * TEST_EVERY}
TYPICAL_SECONDS = {"keywords": 1.0, "english": 2.8, "mandarin": 2.4, "styles": 2.4}  # to plan counts

EN_ACCENTS = ("en-us", "en", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan", "en-us-nyc")
VARIANTS = (
    "f1", "f2", "f3", "f4", "f5", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "klatt", "klatt2", "klatt4",
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Henrique", "Hugo", "Jacky",
    "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "Reed", "adam", "anika", "antonio", "aunty",
    "belinda", "benjamin", "caleb", "david", "ed", "edward", "grandma", "gustave", "ian", "iven", "iven2",
    "john", "linda", "marcelo", "max", "michel", "miguel", "norbert", "pablo", "paul", "pedro", "quincy",
    "rob", "robert", "sandro", "shelby", "steph", "steph2", "travis", "victor", "zac",
)

_EN_SUBJECTS = ("the old man", "a young girl", "my brother", "the teacher", "our neighbour", "the little dog",
                "a tall woman", "the doctor", "his sister", "the farmer", "the children", "a quiet boy",
                "the driver", "her father", "the captain", "my best friend", "the baker", "two students")
_EN_VERBS = ("found", "painted", "carried", "opened", "lost", "cleaned", "bought", "sold", "watched",
             "fixed", "dropped", "wanted", "borrowed", "moved", "counted", "hid", "packed", "washed")
_EN_OBJECTS = ("a red box", "the heavy door", "an old map", "the green bottle", "two small chairs",
               "the broken clock", "a bag of apples", "the yellow kite", "seven letters", "a wooden boat",
               "the silver key", "three blue cups", "a long rope", "the kitchen table", "a warm coat")
_EN_TAILS = ("", "this morning", "near the river", "before dinner", "in the garden", "last winter",
             "at the station", "after school", "on sunday", "by the window", "in the rain", "yesterday")
_ZH_SUBJECTS = ("我", "你", "他", "她", "我们", "他们", "老师", "学生", "妈妈", "爸爸", "朋友", "医生", "弟弟", "姐姐")
_ZH_TIMES = ("今天", "明天", "昨天", "早上", "晚上", "现在", "周末", "下午", "每天", "有时候")
_ZH_PREDICATES = ("想吃苹果", "去学校", "看电影", "买衣服", "喝茶", "写信", "打电话", "读书", "做饭", "回家",
                  "坐火车去北京", "听音乐", "学中文", "开车上班", "洗衣服", "在公园跑步", "买了三本书",
                  "在家休息", "去医院看病", "喝一杯咖啡", "打扫房间", "给朋友写信")


@dataclass(frozen=True)
class Voice:
    """A synthetic speaker: eSpeak voice ``language+variant`` with its own pitch, range and rate."""

    id: str
    voice: str
    pitch: int  # eSpeak 0-99, 50 = the voice's normal pitch
    range: int  # eSpeak 0-99 pitch range
    rate: int  # words per minute
    split: str


@dataclass(frozen=True)
class Utterance:
    """Everything needed to render one file; a pure function of (seed, minutes)."""

    task: str
    split: str
    index: int
    path: str  # relative to the task folder
    text: str
    label: str
    speaker: str
    voice: str
    pitch: int
    range: int
    rate: int
    volume: int  # eSpeak amplitude, 100 = normal
    gain_db: float
    snr_db: float
    noise: str  # white | pink | brown
    seed: int
    clip_seconds: float  # > 0: centre the speech in a clip of exactly this length (keywords)
    silence: bool  # a _silence_ clip: background noise only, no speech


# --------------------------------------------------------------------------- planning


def _voices(rng: random.Random, language: str, accents: tuple[str, ...], test_variants: set[str]) -> list[Voice]:
    out = []
    for variant in VARIANTS:
        accent = accents[rng.randrange(len(accents))]
        out.append(Voice(
            id=f"{accent}+{variant}", voice=f"{accent}+{variant}", pitch=rng.randint(30, 70),
            range=rng.randint(35, 75), rate=rng.randint(140, 195) if language == "en" else rng.randint(130, 175),
            split="test" if variant in test_variants else "train"))
    return out


def _split(i: int) -> str:
    return "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"


def _english(rng: random.Random) -> str:
    parts = (rng.choice(_EN_SUBJECTS), rng.choice(_EN_VERBS), rng.choice(_EN_OBJECTS), rng.choice(_EN_TAILS))
    return " ".join(p for p in parts if p)


def _mandarin(rng: random.Random) -> str:
    return rng.choice(_ZH_SUBJECTS) + rng.choice(_ZH_TIMES) + rng.choice(_ZH_PREDICATES)


def _style(v: Voice, style: str) -> dict:
    """A speaking style as eSpeak settings relative to the speaker's own."""
    p, r, s = v.pitch, v.range, v.rate
    return {
        "neutral": dict(pitch=p, range=r, rate=s, volume=100),
        "happy": dict(pitch=min(p + 18, 99), range=min(r + 35, 99), rate=int(s * 1.12), volume=115),
        "sad": dict(pitch=max(p - 15, 0), range=max(r - 30, 5), rate=int(s * 0.78), volume=70),
        "angry": dict(pitch=min(p + 8, 99), range=min(r + 20, 99), rate=int(s * 1.18), volume=135),
    }[style]


def _utterance(rng: random.Random, task: str, i: int, split: str, v: Voice, label: str) -> Utterance:
    """Utterance ``i`` of ``task``, spoken by ``v``: its text and rendering settings drawn from ``rng``."""
    settings = dict(pitch=v.pitch, range=v.range, rate=v.rate, volume=100)
    clip, silence, speaker = 0.0, False, v.id
    if task == "keywords":
        text = rng.choice(UNKNOWN_WORDS) if label == "_unknown_" else "" if label == "_silence_" else label
        clip, silence = 1.0, label == "_silence_"
        speaker = "" if silence else v.id
    elif task == "mandarin":
        text = _mandarin(rng)
    else:
        text = _english(rng).upper()
        if task == "styles":
            settings = _style(v, label)
    return Utterance(
        task=task, split=split, index=i, path=f"audio/{task}-{i:05d}.flac", text=text, label=label,
        speaker=speaker, voice=v.voice, gain_db=rng.uniform(-9.0, -3.0), snr_db=rng.uniform(22.0, 40.0),
        noise=rng.choice(("white", "pink", "brown")), seed=rng.randrange(2**31), clip_seconds=clip,
        silence=silence, **settings)


def plan(minutes: float, seed: int, test_items: int = 0) -> list[Utterance]:
    """The corpus as a list of utterances to render (deterministic); ``test_items``: see the module
    docstring (the utterances it adds come last, the others are the same with or without it)."""
    rng = random.Random(f"svqmae-synth/{seed}")
    variants = list(VARIANTS)
    rng.shuffle(variants)
    test_variants = set(variants[: len(variants) // TEST_EVERY])
    voices = {"en": _voices(rng, "en", EN_ACCENTS, test_variants), "zh": _voices(rng, "zh", ("cmn",), test_variants)}
    by_split = {lang: {s: [v for v in vs if v.split == s] for s in ("train", "test")} for lang, vs in voices.items()}
    out: list[Utterance] = []
    for task in TASKS:
        n = max(round(minutes * 60 * SHARE[task] / TYPICAL_SECONDS[task]), MIN_COUNT[task])
        lang = "zh" if task == "mandarin" else "en"
        labels = LABELS.get(task)
        for i in range(n):
            split = _split(i)
            v = rng.choice(by_split[lang][split])
            out.append(_utterance(rng, task, i, split, v, labels[(i // TEST_EVERY) % len(labels)] if labels else ""))
    if test_items > 0:
        out += _more_test_items(out, seed, test_items, by_split["en"]["test"])
    return out


def _more_test_items(planned: list[Utterance], seed: int, test_items: int, test_voices: list[Voice]) -> list[Utterance]:
    """Test utterances after the planned ones, so that each labelled task has at least ``test_items``
    (every class equally often among those added), by the planned test voices and more: each test-only
    variant in every English accent, each with its own pitch, range and rate."""
    rng = random.Random(f"svqmae-synth/{seed}/more-test")
    taken = {v.id for v in test_voices}
    voices = list(test_voices)
    for variant in sorted({v.id.split("+")[1] for v in test_voices}):
        for accent in EN_ACCENTS:
            if f"{accent}+{variant}" not in taken:
                voices.append(Voice(id=f"{accent}+{variant}", voice=f"{accent}+{variant}", pitch=rng.randint(30, 70),
                                    range=rng.randint(35, 75), rate=rng.randint(140, 195), split="test"))
    out = []
    for task, labels in LABELS.items():
        mine = [u for u in planned if u.task == task]
        missing = test_items - sum(u.split == "test" for u in mine)
        extra = -(-missing // len(labels)) * len(labels) if missing > 0 else 0  # whole rounds of the classes
        out += [_utterance(rng, task, len(mine) + j, "test", rng.choice(voices), labels[j % len(labels)])
                for j in range(extra)]
    return out


# --------------------------------------------------------------------------- eSpeak NG via ctypes


class ESpeak:
    """eSpeak NG in this process, on a private copy of the library (see the module docstring): its
    state depends only on what this engine rendered, never on other engines or the parent process.
    Use as a context manager, or call :meth:`close`, to unload it."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    _RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4  # espeak_PARAMETER
    _SYNCHRONOUS, _CHARS_UTF8, _POS_CHARACTER = 2, 1, 1

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise RuntimeError("the demo corpus needs eSpeak NG: pip install espeakng-loader") from None
        self.lib = self._private_copy(Path(espeakng_loader.get_library_path()))
        self._libc_srand = self._find_srand()
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self.sample_rate = self.lib.espeak_Initialize(self._SYNCHRONOUS, 0,
                                                      espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("eSpeak NG failed to initialize")
        self._chunks: list[np.ndarray] = []

        def collect(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._cb = self._CALLBACK(collect)  # keep a reference: the library calls it
        self.lib.espeak_SetSynthCallback(self._cb)

    @staticmethod
    def _private_copy(path: Path) -> ctypes.CDLL:
        """Load a fresh instance of the shared library: the dynamic loader shares an already loaded
        file (its static variables included), but a copy at another path is another library. Where
        no copy can be loaded (a ``noexec`` temporary folder) this falls back to the shared one,
        which is fresh too in a worker process whose parent never used eSpeak."""
        tmp = tempfile.mkdtemp(prefix="svqmae-espeak-")
        try:
            copy = Path(tmp) / f"{Path(tmp).name}-{path.name}"  # a unique name too (Windows)
            shutil.copyfile(path, copy)
            return ctypes.CDLL(str(copy), mode=getattr(os, "RTLD_LOCAL", 0))
        except OSError:
            return ctypes.CDLL(str(path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the mapping outlives the file (POSIX)

    @staticmethod
    def _find_srand():
        """The C library's ``srand`` (the ``klatt 6`` voices' noise comes from its ``rand()``)."""
        try:
            f = ctypes.CDLL(None).srand
        except (AttributeError, OSError, TypeError):  # no process-wide C library handle (Windows)
            return None
        f.argtypes, f.restype = [ctypes.c_uint], None
        return f

    def say(self, text: str, voice: str, rate: int, pitch: int, range_: int, volume: int, seed: int) -> np.ndarray:
        """Synthesize ``text``; float32 mono at ``self.sample_rate``."""
        if self.lib is None:
            raise RuntimeError("this eSpeak NG engine is closed")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        for param, value in ((self._RATE, rate), (self._PITCH, pitch), (self._RANGE, range_), (self._VOLUME, volume)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        if self._libc_srand is not None:
            self._libc_srand(seed & 0xFFFFFFFF)
        self._chunks = []
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, self._POS_CHARACTER, 0, self._CHARS_UTF8, None, None)
        self.lib.espeak_Synchronize()
        x = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        self._chunks = []
        return x.astype(np.float32) / 32768.0

    def close(self) -> None:
        """Shut the engine down and unload its copy of the library."""
        lib, self.lib = self.lib, None
        if lib is None:
            return
        import _ctypes

        lib.espeak_Terminate()
        if hasattr(_ctypes, "dlclose"):  # POSIX
            _ctypes.dlclose(lib._handle)

    def __enter__(self) -> ESpeak:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- rendering


def _noise(rng: np.random.Generator, n: int, kind: str) -> np.ndarray:
    """Unit-RMS white, pink (1/f) or brown (1/f^2) noise."""
    w = rng.standard_normal(n)
    if kind != "white":
        spec = np.fft.rfft(w)
        f = np.arange(spec.size, dtype=np.float64)
        f[0] = 1.0
        spec /= f ** (0.5 if kind == "pink" else 1.0)
        w = np.fft.irfft(spec, n)
    return (w / (np.sqrt(np.mean(w**2)) + 1e-12)).astype(np.float32)


def _trim(x: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    idx = np.flatnonzero(np.abs(x) > floor)
    return x[idx[0]: idx[-1] + 1] if idx.size else x


def render(u: Utterance, engine: ESpeak | None) -> np.ndarray:
    """One utterance as float32 at 16 kHz."""
    rng = np.random.default_rng(u.seed)
    if u.silence:  # background only: noise at a low level, sometimes with mains hum
        n = int(u.clip_seconds * SAMPLE_RATE)
        x = _noise(rng, n, u.noise) * 10 ** (rng.uniform(-50, -25) / 20)
        if rng.random() < 0.3:
            t = np.arange(n) / SAMPLE_RATE
            x += 10 ** (rng.uniform(-55, -35) / 20) * np.sin(2 * np.pi * rng.choice([50, 60]) * t)
        return x.astype(np.float32)
    speech = _trim(engine.say(u.text, u.voice, u.rate, u.pitch, u.range, u.volume, u.seed))
    speech = resample(speech, engine.sample_rate, SAMPLE_RATE) * 10 ** (u.gain_db / 20)
    if u.clip_seconds > 0:  # a fixed-length clip, the speech at a random position
        n = int(u.clip_seconds * SAMPLE_RATE)
        if speech.size > n:
            start = (speech.size - n) // 2
            speech = speech[start: start + n]
        x = np.zeros(n, np.float32)
        off = int(rng.integers(0, n - speech.size + 1))
        x[off: off + speech.size] = speech
    else:  # leading and trailing pauses
        pad = rng.integers(int(0.05 * SAMPLE_RATE), int(0.3 * SAMPLE_RATE), size=2)
        x = np.concatenate([np.zeros(pad[0], np.float32), speech, np.zeros(pad[1], np.float32)])
    level = np.sqrt(np.mean(speech**2)) + 1e-9
    x = x + _noise(rng, x.size, u.noise) * level * 10 ** (-u.snr_db / 20)
    return x.astype(np.float32)


def _render_shard(job: tuple[str, list[Utterance]]) -> list[tuple[str, int, float]]:
    """Render a shard in order (in a fresh process); -> [(task, index, seconds)]."""
    out_dir, items = job
    engine = ESpeak() if any(not u.silence for u in items) else None
    done = []
    try:
        for u in items:
            x = render(u, engine)
            write_audio(Path(out_dir) / u.task / u.path, x, SAMPLE_RATE)
            done.append((u.task, u.index, x.size / SAMPLE_RATE))
    finally:
        if engine is not None:
            engine.close()
    return done


def _pool_context():
    # fork is cheap and needs no re-import; elsewhere spawn (the worker imports only this module)
    return mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def synthesize(out: str | Path, minutes: float = 30.0, seed: int = 0, workers: int | None = None,
               log=print, test_items: int = 0) -> dict:
    """Write the demo corpus into ``out`` (see the module docstring); returns its summary, also
    saved as ``out/corpus.json``. A corpus already there with the same settings is reused."""
    if minutes <= 0:
        raise DataError(f"{out}: --minutes must be > 0 (got {minutes})")
    if test_items < 0:
        raise DataError(f"{out}: test_items must be >= 0 (got {test_items})")
    out = Path(out)
    stamp = out / "corpus.json"
    settings = {"format": FORMAT_VERSION, "minutes": minutes, "seed": seed, "test_items": test_items}
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except ValueError:
            old = {}
        if all(old.get(k) == v for k, v in settings.items()):
            log(f"demo corpus already in {out} ({old['hours'] * 60:.1f} min); reusing it")
            return old
    t0 = time.monotonic()
    items = plan(minutes, seed, test_items)
    out.mkdir(parents=True, exist_ok=True)
    shards = [(str(out), items[k::N_SHARDS]) for k in range(N_SHARDS) if items[k::N_SHARDS]]
    workers = max(1, min(workers or os.cpu_count() or 1, len(shards)))
    log(f"synthesizing {len(items)} utterances (~{minutes:g} min) with eSpeak NG into {out} ({workers} processes)")
    with _pool_context().Pool(workers, maxtasksperchild=1) as pool:
        seconds = {(t, i): s for shard in pool.map(_render_shard, shards, chunksize=1) for t, i, s in shard}
    summary = dict(settings, tasks={}, hours=sum(seconds.values()) / 3600)
    pretrain_rows = []
    for task in TASKS:
        rows = {"train": [], "test": []}
        for u in (u for u in items if u.task == task):
            rows[u.split].append({"path": u.path, "seconds": f"{seconds[task, u.index]:.3f}",
                                  "speaker": u.speaker, "label": u.label, "text": u.text})
        for split, r in rows.items():
            write_manifest(r, out / task / f"{split}.tsv")
        pretrain_rows += [dict(r, path=f"{task}/{r['path']}") for r in rows["train"]]
        summary["tasks"][task] = {
            split: {"utterances": len(r), "minutes": round(sum(float(x["seconds"]) for x in r) / 60, 2),
                    "speakers": len({x["speaker"] for x in r if x["speaker"]})}
            for split, r in rows.items()}
    write_manifest(pretrain_rows, out / "pretrain.tsv")
    summary["voices"] = sorted({asdict(u)["voice"] for u in items})
    stamp.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    log(f"demo corpus: {summary['hours'] * 60:.1f} min of audio in {time.monotonic() - t0:.0f} s; "
        f"manifests {out}/<{'|'.join(TASKS)}>/<train|test>.tsv and {out}/pretrain.tsv")
    return summary
