#!/usr/bin/env bash
# Make the reference weights: generate a synthetic training set and a held-out set (another seed),
# train the segmentation network and the crop classifier, evaluate on the held-out set.
#
#   bench/train_reference.sh                 # defaults below (one GPU, 16 cores: about 7 minutes)
#   TRAIN_COUNT=400 TEST_COUNT=100 SIZE=256 SEG_EPOCHS=3 CLS_EPOCHS=3 bench/train_reference.sh
#
# FINE_TUNE=1 adds a fine-tune of the segmentation network on a set with negatives (photos
# without skin), on windows of FT_CROP px; SEGMENTATION_INIT=FILE skips the training from scratch
# and fine-tunes FILE. The fine-tune run reported in docs/model-card.md ("Fine-tuning with
# negatives"; not shipped: it lost the real faces) is, on 2 CPU cores, about 10 minutes:
#
#   SEGMENTATION_INIT=dermpacs/inference/weights/segmentation.safetensors FINE_TUNE=1 \
#   CLASSIFIER_WEIGHTS=dermpacs/inference/weights/classifier.safetensors TEST_COUNT=200 \
#   DEVICE=cpu REAL_PHOTOS="photos ..." bench/train_reference.sh
#
# Writes to $RESULTS (default var/reference): segmentation.safetensors, classifier.safetensors,
# evaluation.json, train.log, and real_photos.jpg/.json (bench/real_photos.py). docs/model-card.md records the run that made the shipped weights.
set -euo pipefail

PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-var/reference}
DATA=${DATA:-/tmp/dermpacs-reference}
TRAIN_SEED=${TRAIN_SEED:-1}
TEST_SEED=${TEST_SEED:-2}          # never used for training
TRAIN_COUNT=${TRAIN_COUNT:-4000}
TEST_COUNT=${TEST_COUNT:-600}
SIZE=${SIZE:-512}                  # long side of the generated photos and of the analysis scale
SEG_EPOCHS=${SEG_EPOCHS:-60}
SEG_BATCH=${SEG_BATCH:-32}
SEG_TIME=${SEG_TIME:-290}          # seconds; fewer epochs when they would not fit
CLS_EPOCHS=${CLS_EPOCHS:-40}
CLS_BATCH=${CLS_BATCH:-256}
CLS_TIME=${CLS_TIME:-230}
WORKERS=${WORKERS:-$(nproc)}
VERSION=${VERSION:-0.1.0-synthetic}
FINE_TUNE=${FINE_TUNE:-0}
FT_COUNT=${FT_COUNT:-480}          # photos of the fine-tune set (seed TRAIN_SEED), ...
FT_NEGATIVES=${FT_NEGATIVES:-0.3}  # ... this share of them without skin
FT_CROP=${FT_CROP:-256}            # random windows of the analysis-scale photo
FT_EPOCHS=${FT_EPOCHS:-2}
FT_BATCH=${FT_BATCH:-8}
FT_LR=${FT_LR:-2e-4}
FT_VERSION=${FT_VERSION:-0.2.0-synthetic}
DEVICE=${DEVICE:-auto}
REALISTIC=${REALISTIC:-0}          # 1: every set drawn with synth --realistic (docs/training.md)
SYNTH_FLAGS=()
[ "$REALISTIC" = 1 ] && SYNTH_FLAGS+=(--realistic)

mkdir -p "$RESULTS" "$DATA"
LOG="$RESULTS/train.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
export DERMPACS__MODEL__LONG_SIDE=$SIZE

# step LOGFILE NAME COMMAND...: run, log its output and duration
step() {
  local log=$1 name=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  echo "== $name took $((SECONDS - start)) s" | tee -a "$log"
}

{
  echo "host: $(uname -n) $(nproc) cores"
  "$PYTHON" -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} 2>&1 | tee -a "$LOG"

dermpacs() { "$PYTHON" -m dermpacs.cli "$@"; }

step "$LOG" synth-train dermpacs synth --out "$DATA/train" --count "$TRAIN_COUNT" \
  --seed "$TRAIN_SEED" --size "$SIZE" --workers "$WORKERS" --no-progress "${SYNTH_FLAGS[@]}"
step "$LOG" synth-test dermpacs synth --out "$DATA/test" --count "$TEST_COUNT" \
  --seed "$TEST_SEED" --size "$SIZE" --workers "$WORKERS" --no-progress "${SYNTH_FLAGS[@]}"

# The two networks train at the same time on the same GPU: neither keeps it busy alone.
# CLASSIFIER_WEIGHTS=FILE reuses a classifier trained on the same set instead.
CLS_LOG="$DATA/classifier.log"
: >"$CLS_LOG"
if [ -n "${CLASSIFIER_WEIGHTS:-}" ]; then
  echo "== classifier: reusing $CLASSIFIER_WEIGHTS" | tee -a "$CLS_LOG"
  cp "$CLASSIFIER_WEIGHTS" "$DATA/classifier.safetensors"
  true &
else step "$CLS_LOG" train-classifier dermpacs train classifier --data "$DATA/train" \
  --out "$DATA/classifier.safetensors" --epochs "$CLS_EPOCHS" --batch-size "$CLS_BATCH" \
  --seed "$TRAIN_SEED" --time-limit "$CLS_TIME" --workers "$((WORKERS / 2))" \
  --version "$VERSION" --no-progress >/dev/null &
fi
CLS_PID=$!
if [ -n "${SEGMENTATION_INIT:-}" ]; then
  echo "== segmentation: starting from $SEGMENTATION_INIT" | tee -a "$LOG"
  cp "$SEGMENTATION_INIT" "$DATA/segmentation.safetensors"
else step "$LOG" train-segmentation dermpacs train segmentation --data "$DATA/train" \
  --out "$DATA/segmentation.safetensors" --epochs "$SEG_EPOCHS" --batch-size "$SEG_BATCH" \
  --seed "$TRAIN_SEED" --time-limit "$SEG_TIME" --workers "$((WORKERS / 2))" \
  --version "$VERSION" --device "$DEVICE" --no-progress
fi
if [ "$FINE_TUNE" = 1 ]; then
  # negatives (skies, leaves, animals, wood, warm cloth, food, flowers, cups) teach what is not
  # skin; the regular photos beside them keep the lesions (docs/model-card.md)
  step "$LOG" synth-finetune dermpacs synth --out "$DATA/finetune" --count "$FT_COUNT" \
    --seed "$TRAIN_SEED" --size "$SIZE" --negatives "$FT_NEGATIVES" --workers "$WORKERS" \
    --no-progress "${SYNTH_FLAGS[@]}"
  mv "$DATA/segmentation.safetensors" "$DATA/segmentation-base.safetensors"
  step "$LOG" finetune-segmentation dermpacs train segmentation --data "$DATA/finetune" \
    --out "$DATA/segmentation.safetensors" --init "$DATA/segmentation-base.safetensors" \
    --crop "$FT_CROP" --epochs "$FT_EPOCHS" --batch-size "$FT_BATCH" --learning-rate "$FT_LR" \
    --seed "$TRAIN_SEED" --version "$FT_VERSION" --device "$DEVICE" --no-progress
fi
cp "$DATA/segmentation.safetensors" "$RESULTS/"
cls_status=0
wait "$CLS_PID" || cls_status=$?
cat "$CLS_LOG" >>"$LOG"
[ "$cls_status" -eq 0 ] || { echo "== classifier training failed ($cls_status)" | tee -a "$LOG"; exit 1; }
cp "$DATA/classifier.safetensors" "$RESULTS/"
step "$LOG" evaluate dermpacs evaluate --data "$DATA/test" \
  --segmentation-weights "$RESULTS/segmentation.safetensors" \
  --classifier-weights "$RESULTS/classifier.safetensors" --batch-size 32 --json --no-progress \
  --out "$RESULTS/evaluation.json"
# real photographs bundled with installed packages (scikit-image, matplotlib, scikit-learn)
step "$LOG" real-photos "$PYTHON" bench/real_photos.py \
  --segmentation-weights "$RESULTS/segmentation.safetensors" \
  --classifier-weights "$RESULTS/classifier.safetensors" \
  --out "$RESULTS/real_photos.jpg" --json "$RESULTS/real_photos.json" ${REAL_PHOTOS:-} ||
  echo "== real photos: none analysed" | tee -a "$LOG"
echo "== total $SECONDS s" | tee -a "$LOG"
