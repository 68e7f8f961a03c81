"""`conceptlib train` end to end on the real keras-cv models (random weights, 64 px, CPU).

Keras fixes its backend per process and the UNet costs ~17 s and several GB to build, so the
model-level checks run once, in a worker subprocess (this file run as a script, TensorFlow
backend), that builds the models once and reports what it measured as JSON; the tests assert on
that report. The CLI itself runs as a real subprocess.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import interrupt_when_ready, is_flat, png_pixels

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()


def _env(home: Path) -> dict:
    return dict(os.environ, CONCEPTLIB_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def make_images(folder: Path, count: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for index in range(count):
        Image.fromarray((rng.random((72 + 8 * index, 96, 3)) * 255).astype("uint8")).save(folder / f"img{index}.png")
    (folder / "img1.txt").write_text("sitting on a red chair\n")
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, random_weights):
    root = tmp_path_factory.mktemp("train")
    weights, _ = random_weights
    return {"root": root, "weights": weights, "images": make_images(root / "images"), "home": root / "home"}


@pytest.fixture(scope="module")
def cli_run(workspace):
    cmd = [
        shutil.which("conceptlib"), "train", str(workspace["images"]),
        "--name", "cli-concept", "--token", "<cli-concept>", "--init", "toy cat",
        "--weights", str(workspace["weights"]), "--resolution", "64", "--steps", "2",
        "--batch-size", "1", "--num-vectors", "2", "--trainer", "tensorflow", "--seed", "5",
        "--lr", "0.01:1, 0.005",  # AUTOMATIC1111's stepped syntax: 0.01 for step 1, then 0.005
        "--checkpoint-every", "1", "--preview-every", "2", "--preview-steps", "2",
        "--run-dir", str(workspace["root"] / "cli-run"),
    ]
    proc = subprocess.run(cmd, env=_env(workspace["home"]), capture_output=True, text=True, timeout=900)
    return proc


@pytest.fixture(scope="module")
def report(workspace, cli_run):
    out = workspace["root"] / "report.json"
    proc = subprocess.run(
        [sys.executable, str(HERE), str(workspace["weights"]), str(workspace["images"]), str(workspace["home"]), str(out)],
        env=_env(workspace["home"]), capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_cli_train_adds_concept_with_full_metadata(workspace, cli_run):
    assert cli_run.returncode == 0, cli_run.stderr[-3000:]
    assert cli_run.stdout.strip().startswith("Added cli-concept (<cli-concept>) to the library: ")
    assert "RANDOM weights" in cli_run.stderr
    assert "step 2/2" in cli_run.stderr and "loss" in cli_run.stderr
    # What the run does before its first step and between steps, each line with the time so far.
    stages = [re.sub(r"^\[\d+:\d\d\] ", "", line) for line in cli_run.stderr.splitlines() if re.match(r"\[\d+:\d\d\] ", line)]
    assert stages == [
        "building the sd-1 models",
        "tracing the training step (the first step takes longer than the others)",
        "rendering the preview of step 2",
    ]

    from conceptlib.library import ConceptLibrary

    concept = ConceptLibrary(workspace["home"]).get("cli-concept")
    assert concept.token == "<cli-concept>" and concept.vectors.shape == (2, 768)
    meta = concept.metadata
    assert meta["trainer"] == "tensorflow" and meta["trainer_version"] == "0.1.0"
    assert json.loads(meta["init_tokens"]) == ["toy", "cat"]
    training = json.loads(meta["training"])
    assert training["steps"] == 2 and training["resolution"] == 64 and training["seed"] == 5
    assert training["num_vectors"] == 2 and training["batch_size"] == 1 and training["template"] == "object"
    assert training["lr_schedule"] == "stepped" and training["lr_steps"] == [[0.01, 1], [0.005, None]]
    history = json.loads(meta["loss_history"])
    assert [step for step, _ in history] == [1, 2]
    assert float(meta["final_loss"]) == pytest.approx(history[-1][1], abs=1e-6)
    assert len(json.loads(meta["image_sha256"])) == 3
    assert meta["random_weights"] == "true" and meta["preview_source"] == "generated"
    import base64

    # The final preview's thumbnail (longest side 128): the two 64-px preview images side by side.
    thumbnail = png_pixels(base64.b64decode(meta["preview"]))
    assert thumbnail.shape == (64, 128, 3) and not is_flat(thumbnail)
    assert meta["created_at"] and meta["modelspec.trigger_phrase"] == "<cli-concept>"

    run = workspace["root"] / "cli-run"
    assert (run / "config.json").is_file() and (run / "concept.safetensors").is_file()
    with np.load(run / "checkpoints" / "step-0000001.npz") as data:
        # The vectors after step 1 and the optimizer's state (iterations, learning rate, Adam's m, v).
        assert data["vectors"].shape == (2, 768) and np.all(np.isfinite(data["vectors"]))
        assert json.loads(bytes(data["meta"]).decode())["step"] == 1
        optimizer = [k for k in data.files if k.startswith("optimizer_")]
        assert len(optimizer) >= 3 and all(data[k].shape in ((), (2, 768)) for k in optimizer)
    preview = png_pixels(run / "previews" / "step-0000002.png")
    assert preview.shape == (64, 128, 3) and not is_flat(preview)  # two 64-px images side by side


def test_cli_trains_an_sd2_concept(workspace, tmp_path):
    """SD 2.x end to end under the TensorFlow trainer: keras-cv's TextEncoderV2 (1024 wide, the
    penultimate layer) and DiffusionModelV2, random weights in memory (no SD 2 weight files here)."""
    home = tmp_path / "home"
    cmd = [
        shutil.which("conceptlib"), "train", str(workspace["images"]), "--base-model", "sd-2", "--weights", "random",
        "--name", "sd2-doll", "--token", "<sd2-doll>", "--init", "doll", "--resolution", "64", "--steps", "2",
        "--batch-size", "1", "--trainer", "tensorflow", "--seed", "3", "--checkpoint-every", "1",
        "--run-dir", str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building the sd-2 models" in proc.stderr and "step 2/2" in proc.stderr

    from conceptlib.library import ConceptLibrary

    concept = ConceptLibrary(home).get("sd2-doll")
    assert concept.vectors.shape == (1, 1024) and concept.base_model == "sd-2"
    training = json.loads(concept.metadata["training"])
    assert training["base_model"] == "sd-2" and training["resolution"] == 64
    history = json.loads(concept.metadata["loss_history"])
    assert [step for step, _ in history] == [1, 2] and all(np.isfinite(loss) for _, loss in history)
    with np.load(tmp_path / "run" / "checkpoints" / "step-0000001.npz") as data:
        after_one = data["vectors"]
    # Each step moved the vector (the gradient reached it through the V2 text encoder).
    assert after_one.shape == (1, 1024) and not np.array_equal(after_one, concept.vectors)


def test_ctrl_c_stops_a_cli_run_and_resume_finishes_it(workspace):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) once the run has saved its
    second checkpoint: it stops with exit 130 and says how to continue; `--resume` then finishes
    the 4 steps and adds the concept with every step's loss."""
    run = workspace["root"] / "ctrl-c-run"
    cmd = [
        shutil.which("conceptlib"), "train", str(workspace["images"]), "--name", "ctrl-c", "--init", "toy",
        "--weights", str(workspace["weights"]), "--resolution", "64", "--steps", "4", "--trainer", "tensorflow",
        "--checkpoint-every", "1", "--run-dir", str(run),
    ]
    second = run / "checkpoints" / "step-0000002.npz"
    _, code, _, stderr = interrupt_when_ready(cmd, _env(workspace["home"]), second.exists, "its second checkpoint")
    assert code == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"Interrupted\. Continue from step-000000[23]\.npz with: conceptlib train --resume {re.escape(str(run))}", last)
    assert not (run / "concept.safetensors").exists()

    resumed = subprocess.run([shutil.which("conceptlib"), "train", "--resume", str(run)], env=_env(workspace["home"]),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    from conceptlib.library import ConceptLibrary

    history = json.loads(ConceptLibrary(workspace["home"]).get("ctrl-c").metadata["loss_history"])
    assert [step for step, _ in history] == [1, 2, 3, 4]


def test_trained_concept_loads_with_conceptlib_apply(report):
    applied = report["apply"]
    assert applied["tokens"] == ["<cli-concept>"]
    # The applied token encodes exactly as the training loss saw it...
    assert applied["max_diff_vs_training_encoding"] < 1e-5
    # ...differs from the prompt without it, and unload restores the original encoding.
    assert applied["changed_by_token"]
    assert applied["unload_bit_identical"]


def test_only_the_new_vectors_change(report):
    # Text encoder (incl. the token table) + UNet + VAE encoder: ~990 variables, hashed before and
    # after the fixed-batch run and three training runs.
    assert report["variables_checked"] > 900 and report["token_table_checked"]
    assert report["changed_variables"] == []
    assert report["vectors_moved"]


def test_loss_falls_on_a_fixed_batch(report):
    losses = report["fixed_batch_losses"]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert losses[-1] < losses[0]


def test_gradient_accumulation_trains_like_the_whole_batch(report):
    """--batch-size 2 --grad-accum 2 sees the data of --batch-size 4 and makes the same updates."""
    accumulation = report["grad_accum"]
    assert accumulation["recorded"] == [1, 2]
    whole, parts = accumulation["losses"]
    assert len(whole) == len(parts) == 2
    np.testing.assert_allclose(parts, whole, rtol=1e-5)
    assert accumulation["moved"] > 1e-3  # the comparison is not between two untrained starts
    # The parts' gradients are summed in another order than the whole batch's (float32, oneDNN
    # threads): the vectors agree to ~1e-6 in most runs, 2.4e-6 in one, against the ~7.5e-3 they
    # moved. Wrong data would change the losses above; a wrong scale, the gradient compared in
    # test_jax_equivalence.
    assert accumulation["max_diff"] < 1e-4, accumulation


def test_conceptlib_train_in_python_returns_the_new_concept(report):
    """conceptlib.train took the CLI's options by their Python names (the resume check below shows
    it trained exactly what the same TrainingConfig does) and returned the library's Concept."""
    api = report["python_api"]
    assert (api["type"], api["token"], api["shape"], api["trainer"]) == ("Concept", "<full>", [2, 768], "tensorflow")
    assert (api["author"], api["tags"]) == ("Jo Doe", "test")
    assert {key: api["training"][key] for key in ("steps", "resolution", "seed", "lr_schedule")} == {
        "steps": 4, "resolution": 64, "seed": 3, "lr_schedule": "cosine"}


def test_resumed_run_ends_with_the_same_vectors(report):
    resume = report["resume"]
    assert resume["interrupted_after_step"] == 2 and resume["resumed_from_step"] == 2
    assert resume["vectors_equal"], resume
    assert resume["losses_equal"], resume


# ------------------------------------------------------------------------------------------------
# Worker: python tests/test_train_model.py WEIGHTS IMAGES HOME OUT.json


def _hash_variables(models) -> dict[str, str]:
    import hashlib

    import keras

    hashes = {}
    for model in models:
        for index, variable in enumerate(model.variables):
            data = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
            hashes[f"{model.name}/{index}/{variable.path}"] = hashlib.sha256(data.tobytes()).hexdigest()
    return hashes


def _worker(weights_dir: str, images: str, home: str, out: str) -> None:
    import keras

    import conceptlib
    import conceptlib_tensorflow as ctf
    from conceptlib.kerascv.models import build_stable_diffusion
    from conceptlib.kerascv.textual_inversion import encode_prompt, make_optimizer
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, prepare, train
    from conceptlib.weights import resolve_weights
    from helpers import run_interrupted

    library = ConceptLibrary(home)
    weights = resolve_weights("sd-1", weights_dir, ["text_encoder", "diffusion_model", "image_encoder"])
    report: dict = {}

    # 1. The CLI-trained concept applied to a keras-cv StableDiffusion.
    sd = build_stable_diffusion("sd-1", 64, resolve_weights("sd-1", weights_dir, ["text_encoder"]))
    prompt = "a photo of <cli-concept> on a table"
    plain = np.asarray(sd.encode_text("a photo of on a table"))
    concept = library.get("cli-concept")
    ti = ctf.build_models("sd-1", 64, weights)
    ids = encode_prompt(sd.tokenizer, prompt, concept.token, ti.new_ids(concept.num_vectors))
    expected = keras.ops.convert_to_numpy(
        ti.encode_text(concept.vectors, ti.frozen_state(), np.asarray([ids], dtype=np.int32))
    )
    before_apply = np.asarray(sd.encode_text("a photo of a cat"))
    with conceptlib.apply(sd, ["cli-concept"], library=library) as handle:
        encoded = np.asarray(sd.encode_text(prompt))
        tokens = list(handle.tokens)
    report["apply"] = {
        "tokens": tokens,
        "max_diff_vs_training_encoding": float(np.abs(encoded - expected).max()),
        "changed_by_token": bool(np.abs(encoded - plain).max() > 0),
        "unload_bit_identical": bool(np.array_equal(before_apply, np.asarray(sd.encode_text("a photo of a cat")))),
    }
    del sd

    models = [ti.text_encoder, ti.diffusion_model, ti.image_encoder]
    hashes_before = _hash_variables(models)

    # 2. Loss on one fixed batch over 20 steps.
    config = TrainingConfig(images=images, name="fixed", token="<fixed>", weights=weights_dir, resolution=64,
                            steps=20, init=["cat"], seed=1, learning_rate=2e-2, lr_schedule="constant")
    job = prepare(config, library=library)
    rows = keras.Variable(job.initial_vectors(ti.token_table()), dtype="float32")
    initial = np.asarray(rows.numpy()).copy()
    optimizer = make_optimizer(config.learning_rate, config.steps, schedule="constant")
    optimizer.build([rows])
    step = ctf.make_train_step(ti, rows, optimizer)
    batch = job.batch(0)
    report["fixed_batch_losses"] = [float(step(batch)) for _ in range(config.steps)]
    report["vectors_moved"] = bool(np.abs(np.asarray(rows.numpy()) - initial).max() > 0)

    # 3. Resume: an interrupted run, resumed, ends like an uninterrupted one.
    def settings(name):
        return TrainingConfig(images=images, name=name, token=f"<{name}>", weights=weights_dir, resolution=64,
                              steps=4, num_vectors=2, init=["toy"], seed=3, checkpoint_every=2)

    # The uninterrupted run through the Python API, conceptlib.train, with the same settings.
    full = conceptlib.train(images, name="full", weights=weights_dir, resolution=64, steps=4, num_vectors=2,
                            init="toy", seed=3, checkpoint_every=2, library=library, progress=False,
                            author="Jo Doe", tags="test")
    report["python_api"] = {
        "type": type(full).__name__, "token": full.token, "shape": list(full.vectors.shape),
        "trainer": full.metadata["trainer"], "author": full.metadata.get("modelspec.author"),
        "tags": full.metadata.get("modelspec.tags"), "training": json.loads(full.metadata["training"]),
    }
    job = prepare(settings("part"), library=library)
    job.progress.enabled = False
    interrupted = run_interrupted(job, after_step=2)
    resumed_header, resumed_job = train(None, library=library, resume=job.run_dir.path, progress=False)
    full, resumed = library.get("full"), library.get("part")
    report["resume"] = {
        "interrupted_after_step": interrupted,
        "resumed_from_step": resumed_job.start_step,
        "vectors_equal": bool(np.array_equal(full.vectors, resumed.vectors)),
        "max_diff": float(np.abs(full.vectors - resumed.vectors).max()),
        "losses_equal": full.metadata["loss_history"] == resumed.metadata["loss_history"],
    }

    # 4. Gradient accumulation: 2 batches of 2 per update train the vectors a batch of 4 does.
    def accumulation(name, batch_size, grad_accum):
        config = TrainingConfig(images=images, name=name, token=f"<{name}>", weights=weights_dir, resolution=64,
                                steps=2, batch_size=batch_size, grad_accum=grad_accum, init=["toy"], seed=5,
                                checkpoint_every=0)
        _, run = train(config, library=library, progress=False)
        return library.get(name), run.initial_vectors(ti.token_table())

    (whole, start), (parts, _) = accumulation("whole-batch", 4, 1), accumulation("two-parts", 2, 2)
    report["grad_accum"] = {
        "max_diff": float(np.abs(whole.vectors - parts.vectors).max()),
        "moved": float(np.abs(whole.vectors - start).max()),
        "losses": [json.loads(c.metadata["loss_history"]) for c in (whole, parts)],
        "recorded": [json.loads(c.metadata["training"])["grad_accum"] for c in (whole, parts)],
    }

    # 5. No model weight changed through all of the above.
    hashes_after = _hash_variables(models)
    report["variables_checked"] = len(hashes_before)
    table_keys = [f"{m.name}/{i}/{v.path}" for m in models for i, v in enumerate(m.variables) if v is ti._token_table]
    report["token_table_checked"] = len(table_keys) == 1 and table_keys[0] in hashes_before
    report["changed_variables"] = sorted(k for k in hashes_before if hashes_before[k] != hashes_after.get(k))
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = "tensorflow"
    _worker(*sys.argv[1:5])
