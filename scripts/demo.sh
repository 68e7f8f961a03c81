#!/usr/bin/env bash
# conceptlib's main job, offline, on CPU, in a few minutes:
#   make example images -> write RANDOM weights -> train a concept -> list it -> generate with it.
#
# Stable Diffusion weights cannot be downloaded here, so this uses RANDOMLY INITIALISED weights
# (`conceptlib weights init-random`): every step is the real pipeline, but the trained concept is
# meaningless and the generated pictures are noise. Real use: pass --weights DIR with keras-cv's
# weight files (or let KerasCV download them), train at 512 px for ~1000+ steps, on a GPU.
#
# Without DEMO_DIR it works in a fresh temporary folder and deletes the ~4 GB of random weights
# at the end (also when a step fails or it is interrupted), keeping the small results (run folder,
# library, generated images), and says where they are. DEMO_DIR=path keeps everything there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DEMO_DIR:-}" ]; then
  WORK="$DEMO_DIR"
  mkdir -p "$WORK"
else
  WORK="$(mktemp -d -t conceptlib-demo-XXXXXX)"
  delete_weights() {
    # Only the folder this run made inside its own temporary folder.
    rm -rf -- "$WORK/weights"
  }
  on_exit() {
    local status=$?
    delete_weights
    if [ "$status" -ne 0 ]; then
      echo "Demo stopped (exit $status); deleted its random weights. What it made so far is in $WORK" \
        "(delete it with: rm -rf $(printf %q "$WORK"))" >&2
    fi
  }
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
fi
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
if [ -z "${DEMO_DIR:-}" ]; then
  delete_weights
  echo "Deleted the random weights (~4 GB, $WORK/weights); the results above stay in $WORK."
  echo "Delete them with: rm -rf $(printf %q "$WORK")"
fi
