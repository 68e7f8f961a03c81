#!/usr/bin/env bash
# Installs conceptlib, its KerasCV stack, the built-in trainer plugins and the test tools into the
# current Python environment, from this checkout alone (plus PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check \
  -e ".[kerascv,test]" \
  -e plugins/conceptlib-tensorflow \
  -e plugins/conceptlib-jax
# open-clip-torch ships the CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) that KerasCV's
# tokenizer otherwise downloads from GitHub. conceptlib only reads that file and never imports
# the package, so its (multi-GB, torch-based) dependencies are skipped on purpose.
python3 -m pip install -q --disable-pip-version-check --no-deps open-clip-torch==3.3.0
