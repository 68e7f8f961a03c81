"""`conceptlib train --trainer jax` end to end on CPU: real keras-cv models (random weights from
`conceptlib weights init-random`), 64 px, 2 steps, as a real subprocess. The concept lands in the
library with the jax trainer's metadata; the run folder holds a checkpoint and a preview."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _env(home: Path) -> dict:
    env = dict(os.environ, CONCEPTLIB_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("KERAS_BACKEND", None)  # the CLI picks it from --trainer
    # Two crops per image (x2 flipped) keep the one-off VAE work small on CPU; no compile cache
    # in the user's folder from a test.
    env.update(CONCEPTLIB_JAX_VARIANTS="2", CONCEPTLIB_JAX_CACHE="off")
    return env


def _images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for index in range(2):
        Image.fromarray((rng.random((80, 72 + 8 * index, 3)) * 255).astype("uint8")).save(folder / f"img{index}.png")
    (folder / "img1.txt").write_text("on a wooden shelf\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax-train")
    home = root / "home"
    cli = shutil.which("conceptlib")
    init = subprocess.run(
        [cli, "weights", "init-random", str(root / "weights")],
        env=_env(home), capture_output=True, text=True, timeout=900,
    )
    assert init.returncode == 0, init.stderr[-3000:]
    cmd = [
        cli, "train", str(_images(root / "images")), "--name", "jax-concept", "--token", "<jax-concept>",
        "--init", "toy robot", "--weights", str(root / "weights"), "--resolution", "64", "--steps", "2",
        "--batch-size", "2", "--num-vectors", "2", "--trainer", "jax", "--seed", "3",
        "--checkpoint-every", "1", "--preview-every", "2", "--preview-steps", "2",
        "--run-dir", str(root / "run"),
    ]
    proc = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=1800)
    return {"proc": proc, "home": home, "run": root / "run"}


def test_cli_train_with_jax_trainer_adds_the_concept(run):
    proc = run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().startswith("Added jax-concept (<jax-concept>) to the library: ")
    assert "step 2/2" in proc.stderr

    from conceptlib.library import ConceptLibrary

    concept = ConceptLibrary(run["home"]).get("<jax-concept>")
    assert concept.name == "jax-concept" and concept.vectors.shape == (2, 768)
    assert concept.vectors.dtype == np.float32 and np.all(np.isfinite(concept.vectors))
    meta = concept.metadata
    assert meta["trainer"] == "jax" and meta["trainer_version"] == "0.1.0"
    training = json.loads(meta["training"])
    assert training["steps"] == 2 and training["resolution"] == 64 and training["batch_size"] == 2
    history = json.loads(meta["loss_history"])
    assert [step for step, _ in history] == [1, 2]
    assert all(np.isfinite(loss) and loss > 0 for _, loss in history)
    assert meta["preview_source"] == "generated"


def test_jax_run_folder_has_checkpoint_and_preview(run):
    assert run["proc"].returncode == 0
    folder = run["run"]
    assert (folder / "concept.safetensors").is_file()
    checkpoint = folder / "checkpoints" / "step-0000001.npz"
    assert checkpoint.is_file()
    with np.load(checkpoint) as data:
        # The vectors after step 1 and Adam's state (iterations, learning rate, m, v).
        assert data["vectors"].shape == (2, 768)
        assert len([k for k in data.files if k.startswith("optimizer_")]) >= 3
    assert (folder / "previews" / "step-0000002.png").is_file()
