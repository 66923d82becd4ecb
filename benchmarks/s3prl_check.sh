#!/usr/bin/env bash
# svqmae through the real s3prl (0.4.18), end to end, on a CPU machine; not part of the unit tests.
#
#   benchmarks/s3prl_check.sh [WORK_DIR]        (default: runs/s3prl_check)
#
# 1. builds its own environment in WORK_DIR/venv from requirements/s3prl-gpu.txt (PyPI's torch 2.11 and
#    torchaudio 2.11, s3prl 0.4.18 from PyPI; the CUDA build runs on CPU) plus svqmae from this checkout;
#    an existing WORK_DIR/venv is reused;
# 2. `svqmae s3prl-install`: the svqmae upstream into the installed s3prl package (its run_downstream.py
#    runs as `python -m s3prl.run_downstream`);
# 3. synthesizes a small corpus (`svqmae data synth`) and pre-trains a tiny model for 20 steps;
# 4. writes the corpus' keyword clips in s3prl's Speech Commands layout (svqmae.data.recipes.write_s3prl_ks);
# 5. checks that s3prl's S3PRLUpstream gives svqmae's extract() features, the same alone and in a batch;
# 6. run_downstream.py -d speech_commands: train 20 steps, then evaluate the saved checkpoint on test;
#    prints the test accuracy.
# WORK_DIR/log.txt keeps the full output of every step. Needs: python3 (3.10+), network access to PyPI
# for step 1, ~6 GB of disk.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(realpath -m "${1:-$REPO/runs/s3prl_check}")
PYTHON=${PYTHON:-python3}
VENV=$WORK/venv
PY=$VENV/bin/python
LOG=$WORK/log.txt
STEPS=20
T0=$(date +%s)

mkdir -p "$WORK"
: > "$LOG"
say() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
run() { "$@" >> "$LOG" 2>&1 || { echo "FAILED: $* (last lines of $LOG:)"; tail -25 "$LOG"; exit 1; }; }

say "environment: $VENV"
if [ ! -x "$VENV/bin/svqmae" ]; then
    run "$PYTHON" -m venv "$VENV"
    run "$VENV/bin/pip" install -r "$REPO/requirements/s3prl-gpu.txt"
    run "$VENV/bin/pip" install "$REPO"
fi
say "$("$PY" -c 'import torch, torchaudio, s3prl; print(f"torch {torch.__version__}, torchaudio {torchaudio.__version__}, s3prl {s3prl.__version__}")')"

say "svqmae s3prl-install"
run "$VENV/bin/svqmae" s3prl-install

say "corpus: svqmae data synth (12 minutes) and a tiny model pre-trained for $STEPS steps"
[ -f "$WORK/synth/corpus.json" ] || run "$VENV/bin/svqmae" data synth --out "$WORK/synth" --minutes 12 --seed 0 --workers 2
rm -rf "$WORK/pretrain"
run "$VENV/bin/svqmae" pretrain --data "$WORK/synth/pretrain.tsv" --out "$WORK/pretrain" --preset tiny \
    --max-steps "$STEPS"
MODEL=$WORK/pretrain/model

say "keyword clips in s3prl's Speech Commands layout: $WORK/ks"
rm -rf "$WORK/ks"
"$PY" - "$WORK/synth/keywords" "$WORK/ks" <<'EOF' 2>&1 | tee -a "$LOG"
# the synthesized keyword task as s3prl reads Speech Commands: word folders named SPEAKER_nohash_N.wav
# (every 5th train speaker named into s3prl's dev bucket, none into its discarded one), _silence_ clips
# as _background_noise_ files, the test split under the 12 class folders
import csv, sys
from pathlib import Path
from svqmae.data.recipes import s3prl_ks_speaker, write_s3prl_ks

src, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = {s: list(csv.DictReader(open(src / f"{s}.tsv"), delimiter="\t")) for s in ("train", "test")}
speakers = sorted({r["speaker"] for r in rows["train"] if r["label"] != "_silence_"})
name = {s: s3prl_ks_speaker(s, "dev" if i % 5 == 4 else "train") for i, s in enumerate(speakers)}
train, noise, test, n = [], [], [], {}
for r in rows["train"]:
    if r["label"] == "_silence_":
        noise.append(src / r["path"])
        continue
    k = n[r["speaker"]] = n.get(r["speaker"], -1) + 1
    train.append((r["text"], f"{name[r['speaker']]}_nohash_{k}", src / r["path"]))
for i, r in enumerate(rows["test"]):
    test.append((r["label"], f"test{i:05d}_nohash_0", src / r["path"]))
for split, s in write_s3prl_ks(out, train, noise, test).items():
    print(f"  s3prl {split}: {s['utterances']} clips")
EOF

say "features: s3prl's S3PRLUpstream against svqmae's extract()"
"$PY" - "$MODEL" "$WORK/synth" <<'EOF' 2>&1 | grep -v "^ESPnet is not installed" | tee -a "$LOG"
# keyword clips and sentences of different lengths (most not multiples of the 640-sample hop), batched
# through s3prl's S3PRLUpstream, against each alone and against svqmae.load(...).extract(...)
import csv, sys
from pathlib import Path
import torch
from torch.nn.utils.rnn import pad_sequence
from s3prl.nn import S3PRLUpstream
import svqmae
from svqmae.data.audio import read_audio

model_dir, synth = sys.argv[1], Path(sys.argv[2])
paths = []
for task, k in (("keywords", 3), ("english", 5), ("styles", 3)):
    rows = list(csv.DictReader(open(synth / task / "test.tsv"), delimiter="\t"))
    paths += [synth / task / r["path"] for r in rows[:k]]
wavs = [torch.from_numpy(read_audio(p, 16000)) for p in paths]
lens = torch.tensor([len(w) for w in wavs])
up = S3PRLUpstream("svqmae_local", model_dir).eval()
model = svqmae.load(model_dir)
with torch.no_grad():
    hs, hs_len = up(pad_sequence(wavs, batch_first=True), lens)
    d_extract = d_alone = 0.0
    for i, w in enumerate(wavs):
        alone, alone_len = up(w[None], lens[i : i + 1])
        ref, tok = model.extract(w[None], lens[i : i + 1])
        n, t = int(hs_len[0][i]), int(tok[0])
        assert n == int(alone_len[0][0]) == -(-len(w) // 640)
        for layer in range(len(hs)):
            d_alone = max(d_alone, (hs[layer][i, :n] - alone[layer][0, :n]).abs().max().item())
            d_extract = max(d_extract, (hs[layer][i, :t] - ref[layer][0, :t]).abs().max().item())
ok = d_extract < 1e-4 and d_alone < 1e-4
print(f"  {len(wavs)} utterances of {int(lens.min())}..{int(lens.max())} samples, {len(hs)} hidden states: "
      f"S3PRLUpstream vs extract() max |diff| {d_extract:.1e}, batched vs alone {d_alone:.1e}")
print(f"  features matched extract: {'yes' if ok else 'NO'}")
sys.exit(0 if ok else 1)
EOF

say "run_downstream.py -d speech_commands: train $STEPS steps (--device cpu)"
rm -rf "$WORK/exp"
cd "$WORK"
run "$PY" -m s3prl.run_downstream -m train -u svqmae_local -k "$MODEL" -d speech_commands \
    -c "$WORK/ks/speech_commands.yaml" -p "$WORK/exp" --device cpu \
    -o "config.runner.total_steps=$STEPS,,config.runner.eval_step=$STEPS,,config.runner.save_step=$STEPS,,config.runner.log_step=10,,config.downstream_expert.datarc.batch_size=8,,config.downstream_expert.datarc.num_workers=0"
CKPT=$WORK/exp/states-$STEPS.ckpt
[ -f "$CKPT" ] || { echo "FAILED: no $CKPT"; exit 1; }

say "run_downstream.py -m evaluate -e $CKPT (test split)"
run "$PY" -m s3prl.run_downstream -m evaluate -e "$CKPT" --device cpu
ACC=$(grep -o "test acc: [0-9.]*" "$LOG" | tail -1 | awk '{print $3}')
[ -n "$ACC" ] || { echo "FAILED: no test accuracy in $LOG"; exit 1; }
say "keyword spotting (s3prl speech_commands, $STEPS downstream steps on a $STEPS-step tiny model): test accuracy $ACC"
say "done in $(( $(date +%s) - T0 )) s; log: $LOG"
