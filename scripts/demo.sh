#!/usr/bin/env bash
# conceptlib's main job, offline, on CPU, in a few minutes:
#   make example images -> write RANDOM weights -> train a concept -> list it -> generate with it.
#
# Stable Diffusion weights cannot be downloaded here, so this uses RANDOMLY INITIALISED weights
# (`conceptlib weights init-random`): every step is the real pipeline, but the trained concept is
# meaningless and the generated pictures are noise. Real use: pass --weights DIR with keras-cv's
# weight files (or let KerasCV download them), train at 512 px for ~1000+ steps, on a GPU.
#
# DEMO_DIR=path keeps the results (default: a fresh temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${DEMO_DIR:-$(mktemp -d -t conceptlib-demo-XXXXXX)}"
mkdir -p "$WORK"
export CONCEPTLIB_HOME="$WORK/library"   # a library of its own, so the demo touches nothing else
export TF_CPP_MIN_LOG_LEVEL=2

echo "== 1/5 example images (a toy robot drawn by examples/make_images.py) -> $WORK/images"
python3 examples/make_images.py "$WORK/images"

echo
echo "== 2/5 RANDOM Stable Diffusion weights -> $WORK/weights"
echo "   (NOT real weights: they cannot be downloaded here; results will be noise)"
conceptlib weights init-random "$WORK/weights"

echo
echo "== 3/5 train <toy-robot> at 64 px for 4 steps (real use: 512 px, 1000+ steps, real weights)"
conceptlib train "$WORK/images" --name toy-robot --token "<toy-robot>" --init "toy robot" \
  --num-vectors 2 --weights "$WORK/weights" --resolution 64 --steps 4 --batch-size 1 --seed 0 \
  --checkpoint-every 2 --preview-every 4 --preview-steps 2 --run-dir "$WORK/run"

echo
echo "== 4/5 the library"
conceptlib list

echo
echo "== 5/5 generate with the new token (random weights: expect noise)"
conceptlib generate "a photo of <toy-robot> on the moon" --weights "$WORK/weights" --size 64 \
  --steps 5 --num-images 1 --seed 0 --out "$WORK/generated"

echo
echo "Done. Run folder (config, checkpoints, preview): $WORK/run"
echo "Library: $CONCEPTLIB_HOME   Generated images: $WORK/generated"
