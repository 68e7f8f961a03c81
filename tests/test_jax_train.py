"""`conceptlib train --trainer jax` end to end on CPU: real keras-cv models (random weights from
`conceptlib weights init-random`), 64 px, 2 steps, as a real subprocess. The concept lands in the
library with the jax trainer's metadata; the run folder holds a checkpoint and a preview.

Resume: a worker subprocess (this file run as a script; the jax trainer needs a process whose
Keras backend is jax) starts the CLI run's config.json again, interrupts it after step 1 as
tests/test_train_model.py does for the TensorFlow trainer, and resumes it through
``conceptlib.training.train(resume=...)``; the resumed concept must equal the CLI's uninterrupted
one bit for bit. Both processes share a compilation cache in the test's folder, so the worker's
runs hit the step cache the CLI run filled: they read the weights from the files and build no
keras-cv model for training; with previews due, the models are built in a background thread once
the first step runs (previews read the vectors, never change them or the data).

A second worker (a process of its own, so that each holds only its own runs' memory) trains
another concept with the same shapes but other images (four instead of three), vectors (four
instead of three: both train four rows), steps, learning rate and warmup: those are arguments of
the exported step, so it hits the same cache entry too. Then it trains one step onward from the
CLI run's finished concept (--init-from its file).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import is_flat, png_pixels

pytestmark = pytest.mark.slow


def _env(home: Path, cache: Path) -> dict:
    env = dict(os.environ, CONCEPTLIB_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env.pop("KERAS_BACKEND", None)  # the CLI picks it from --trainer
    # Two crops per image (x2 flipped) keep the one-off VAE work small on CPU; the compile cache
    # lives in the test's folder, never the user's.
    env.update(CONCEPTLIB_JAX_VARIANTS="2", CONCEPTLIB_JAX_CACHE=str(cache))
    env["CONCEPTLIB_JAX_REPORT"] = str(cache.parent / f"trainer-report-{home.name}.json")
    return env


def _images(folder: Path, count: int = 3) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for index in range(count):
        Image.fromarray((rng.random((80, 72 + 8 * index, 3)) * 255).astype("uint8")).save(folder / f"img{index}.png")
    (folder / "img1.txt").write_text("on a wooden shelf\n")
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_weights):
    root = tmp_path_factory.mktemp("jax-train")
    home = root / "home"
    cli = shutil.which("conceptlib")
    weights, _ = random_weights
    cmd = [
        cli, "train", str(_images(root / "images")), "--name", "jax-concept", "--token", "<jax-concept>",
        "--init", "toy robot", "--weights", str(weights), "--resolution", "64", "--steps", "2",
        # Two batches of 1 per update: the step accumulates gradients (a scan inside the exported step).
        "--batch-size", "1", "--grad-accum", "2", "--num-vectors", "3", "--trainer", "jax", "--seed", "3",
        "--checkpoint-every", "1", "--preview-every", "2", "--preview-steps", "2",
        "--preview-prompt", "a watercolor painting of <jax-concept>",
        "--run-dir", str(root / "run"),
    ]
    proc = subprocess.run(cmd, env=_env(home, root / "jax-cache"), capture_output=True, text=True, timeout=1800)
    return {"proc": proc, "home": home, "run": root / "run", "root": root}


@pytest.fixture(scope="module")
def resumed(run):
    """The CLI run's config again, interrupted after step 1 and resumed, in a library of its own."""
    assert run["proc"].returncode == 0, run["proc"].stderr[-4000:]
    root = run["root"]
    home, report = root / "resume-home", {}
    # One process per part: each holds one part's models and allocator leftovers, not both
    # parts' (the machine that runs the suite has 23 GB).
    for part in ("resume", "other"):
        out = root / f"{part}.json"
        proc = subprocess.run(
            [sys.executable, __file__, part, str(run["run"]), str(home), str(out)],
            env=_env(home, root / "jax-cache"), capture_output=True, text=True, timeout=1800,
        )
        assert proc.returncode == 0, f"{part} worker failed:\n{proc.stderr[-4000:]}"
        report.update(json.loads(out.read_text()))
    return {"home": home, "report": report}


def test_cli_train_with_jax_trainer_adds_the_concept(run):
    proc = run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().startswith("Added jax-concept (<jax-concept>) to the library: ")
    assert "step 2/2" in proc.stderr
    # keras-cv's models were built without importing TensorFlow (conceptlib.kerascv.sd_modules),
    # so nothing printed TensorFlow's import notices either.
    assert json.loads((run["root"] / "trainer-report-home.json").read_text())["tensorflow_imported"] is False
    assert "oneDNN" not in proc.stderr and "absl::InitializeLog" not in proc.stderr
    assert "softmax over axis" not in proc.stderr  # Keras' warning about 64 px's one-pixel attention
    assert _stages(proc.stderr) == [
        "building the sd-1 models",
        "compiling the training step for 1 x 64 px on CPU, 2 batches per update: the first run of a setting "
        "takes a minute "
        f"or two, later ones reuse it from {run['root'] / 'jax-cache'}",
        "encoding 3 image(s) with the VAE",
        "rendering the preview of step 2",
    ]

    from conceptlib.library import ConceptLibrary

    concept = ConceptLibrary(run["home"]).get("<jax-concept>")
    assert concept.name == "jax-concept" and concept.vectors.shape == (3, 768)
    assert concept.vectors.dtype == np.float32 and np.all(np.isfinite(concept.vectors))
    meta = concept.metadata
    assert meta["trainer"] == "jax" and meta["trainer_version"] == "0.1.0"
    training = json.loads(meta["training"])
    assert training["steps"] == 2 and training["resolution"] == 64
    assert (training["batch_size"], training["grad_accum"]) == (1, 2)
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
        # Three vectors: the step trains four rows, the checkpoint holds the real three.
        assert data["vectors"].shape == (3, 768)
        assert all(data[k].shape in ((), (3, 768)) for k in data.files if k.startswith("optimizer_"))
        assert len([k for k in data.files if k.startswith("optimizer_")]) >= 3
    preview = png_pixels(folder / "previews" / "step-0000002.png")
    assert preview.shape == (64, 128, 3) and not is_flat(preview)  # two 64-px images side by side


def test_a_second_jax_run_uses_the_step_cache_without_keras_cv(run, resumed):
    """The CLI run traced and exported its step; the worker's runs of the same configuration
    (another process) load it and read the weights straight from the files. A run without
    previews never imports keras-cv or TensorFlow (next test); with previews, the models for them
    are built in the background. That they train bit-identically is the test after."""
    cli_report = json.loads((run["root"] / "trainer-report-home.json").read_text())
    assert cli_report["step_cache"] == "stored"
    assert cli_report["flash_layers"] == 0 and cli_report["patched_convs"] > 0  # traced on CPU
    # The traced run's sampler was compiled in the background after step 1, for exactly the
    # previews' shapes: the step-2 and final previews reused it.
    assert cli_report["preview_warmup"] == "sampler" and cli_report["sampler_traces"] == 1
    assert resumed["report"]["trainer"]["step_cache"] == "hit"
    # Built in the background while the device trained, and the sampler compiled there: the
    # previews then ran it without tracing again.
    assert resumed["report"]["trainer"]["preview_warmup"] == "models and sampler"
    assert resumed["report"]["trainer"]["sampler_traces"] == 1
    # ... with the traced run's UNet rewrites (fused attention, kernels) on those models too.
    assert resumed["report"]["trainer"]["preview_patched_convs"] == cli_report["patched_convs"]
    assert resumed["report"]["previews"] == ["step-0000002.png"]
    folder = run["root"] / "jax-cache" / "conceptlib-steps"
    (entry,) = folder.iterdir()
    assert {p.name for p in entry.iterdir()} == {"entry.json", "step.bin", "moments.bin"}


def test_other_images_steps_and_learning_rate_use_the_same_cached_step(resumed):
    """Four images instead of three (12 -> 16 crops, both padded to 16 rows), four vectors instead
    of three (both four rows), 3 steps instead of 2, another learning rate and a warmup: one entry
    serves them (the test above saw only one). The run has no previews, so the process never
    imported keras-cv or TensorFlow."""
    other = resumed["report"]["other_run"]
    assert other["step_cache"] == "hit" and other["latent_variants"] == 16
    assert other["vectors_shape"] == [4, 768]
    folder = resumed["report"]["cache_folder"]
    assert other["stages"] == [
        f"reading the weights and compiling the cached training step for 1 x 64 px on CPU, 2 batches per update "
        f"({folder})",
        "encoding 4 image(s) with the VAE",
    ]
    assert len(other["losses"]) == 3 and all(np.isfinite(loss) and loss > 0 for loss in other["losses"])
    assert resumed["report"]["imported_after_other_run"] == []


def test_interrupted_jax_run_resumes_to_the_same_concept(run, resumed):
    from conceptlib.library import ConceptLibrary

    report = resumed["report"]
    assert report["interrupted_after_step"] == 1 and report["resumed_from_step"] == 1
    # The interrupted run stopped with exactly step 1's checkpoint, the one the CLI run wrote.
    assert report["checkpoints_when_interrupted"] == ["step-0000001.npz"]
    with np.load(run["run"] / "checkpoints" / "step-0000001.npz") as full, np.load(report["checkpoint"]) as part:
        assert sorted(full.files) == sorted(part.files)
        for key in full.files:
            np.testing.assert_array_equal(part[key], full[key], err_msg=key)

    full = ConceptLibrary(run["home"]).get("<jax-concept>")
    part = ConceptLibrary(resumed["home"]).get("<jax-concept>")
    # Step i draws its batch from fold_in(seed key, i) and the checkpoint holds the exact carry
    # (vectors, Adam state), so the resumed run is bit-identical, as for the TensorFlow trainer.
    np.testing.assert_array_equal(part.vectors, full.vectors)
    assert part.metadata["loss_history"] == full.metadata["loss_history"]
    assert part.metadata["final_loss"] == full.metadata["final_loss"]
    assert part.metadata["preview_source"] == "generated"
    assert [step for step, _ in json.loads(part.metadata["loss_history"])] == [1, 2]


def test_the_runs_checkpoint_and_folder_import_into_another_library(run, tmp_path, monkeypatch):
    """Step 1's checkpoint imports as a concept of its own (an earlier state of the run, with its
    step's loss); the run folder imports as its final concept, its checkpoints skipped."""
    from click.testing import CliRunner

    from conceptlib.cli import main
    from conceptlib.library import ConceptLibrary

    assert run["proc"].returncode == 0
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "other-library"))
    result = CliRunner().invoke(main, ["import", str(run["run"] / "checkpoints" / "step-0000001.npz")])
    assert result.exit_code == 0, result.output
    library = ConceptLibrary(tmp_path / "other-library")
    step1 = library.get("<jax-concept-step1>")
    with np.load(run["run"] / "checkpoints" / "step-0000001.npz") as data:
        np.testing.assert_array_equal(step1.vectors, data["vectors"])
    final = ConceptLibrary(run["home"]).get("jax-concept")
    assert json.loads(step1.metadata["loss_history"]) == json.loads(final.metadata["loss_history"])[:1]
    result = CliRunner().invoke(main, ["import", str(run["run"])])
    assert result.exit_code == 0, result.output
    assert "1 imported, 1 skipped" in result.output and "1 training checkpoint (steps 1)" in result.output
    np.testing.assert_array_equal(library.get("jax-concept").vectors, final.vectors)


def test_a_run_continues_from_the_cli_runs_concept(resumed):
    """--init-from the finished concept's file: the run starts from its vectors, so one Adam step
    moves each element by at most the learning rate (Adam's first step is lr * g/|g|, plus a
    decoupled weight decay of lr * 0.004 * x). Started from words or at random, they would differ by O(1)."""
    continued = resumed["report"]["continued"]
    assert continued["step_cache"] == "hit" and continued["num_vectors"] == 3
    assert 0 < continued["max_change"] <= continued["learning_rate"] * 1.01
    assert continued["init_from"] == continued["expected_init_from"]
    assert continued["init_from"]["name"] == "jax-concept" and continued["init_from"]["token"] == "<jax-concept>"
    assert continued["init_words"] == []


def _stages(stderr: str) -> list[str]:
    """The stage lines of a run ("[m:ss] what it does"), without their times."""
    return [re.sub(r"^\[\d+:\d\d\] ", "", line) for line in stderr.splitlines() if re.match(r"\[\d+:\d\d\] ", line)]


# ------------------------------------------------------------------------------------------------
# Workers: python tests/test_jax_train.py resume|other RUN_FOLDER HOME OUT.json


def _resume_worker(run_folder: str, home: str, out: str) -> None:
    """The CLI run's config interrupted after step 1, then resumed."""
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import RunDirectory, TrainingConfig, prepare, train
    from helpers import run_interrupted

    config = TrainingConfig.from_dict(RunDirectory(run_folder).read()["config"])
    library = ConceptLibrary(home)
    config.run_dir = str(Path(home) / "interrupted-run")
    job = prepare(config, library=library)
    job.progress.enabled = False
    interrupted = run_interrupted(job, after_step=1)
    checkpoints = sorted(p.name for p in job.run_dir.checkpoints.glob("*.npz"))
    _, resumed_job = train(None, library=library, resume=job.run_dir.path, progress=False)
    report = {
        "interrupted_after_step": interrupted,
        "checkpoints_when_interrupted": checkpoints,
        "checkpoint": str(job.run_dir.checkpoint_path(1)),
        "resumed_from_step": resumed_job.start_step,
        "trainer": json.loads(Path(os.environ["CONCEPTLIB_JAX_REPORT"]).read_text()),  # the resumed run's
        "previews": sorted(p.name for p in job.run_dir.previews.glob("*.png")),
    }
    Path(out).write_text(json.dumps(report, indent=2))


def _other_worker(run_folder: str, home: str, out: str) -> None:
    """Another concept of the same shapes (no previews: never imports keras-cv), then one step
    onward from the CLI run's finished concept."""
    from conceptlib.files import read_concept
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import RunDirectory, TrainingConfig, init_record, prepare, train

    config = TrainingConfig.from_dict(RunDirectory(run_folder).read()["config"])
    library = ConceptLibrary(home)

    other = TrainingConfig.from_dict(dict(
        config.to_dict(), images=str(_images(Path(home) / "other-images", count=4)), name="other",
        token="<other>", num_vectors=4, steps=3, learning_rate=2e-3, warmup_steps=1, checkpoint_every=0, preview_every=0,
        preview_prompt=None,
        run_dir=str(Path(home) / "other-run"),
    ))
    other_job = prepare(other, library=library)
    other_job.progress.stream = io.StringIO()  # for its stage lines
    other_result = other_job.trainer_cls().run(other_job)
    other_report = json.loads(Path(os.environ["CONCEPTLIB_JAX_REPORT"]).read_text())
    report = {
        "other_run": {
            "step_cache": other_report["step_cache"], "latent_variants": other_report["latent_variants"],
            "losses": [float(loss) for loss in other_job.losses], "vectors_shape": list(other_result.vectors.shape),
            "stages": _stages(other_job.progress.stream.getvalue()),
        },
        "imported_after_other_run": sorted({name.split(".")[0] for name in sys.modules} & {"keras_cv", "tensorflow"}),
        "cache_folder": str(Path(os.environ["CONCEPTLIB_JAX_CACHE"]) / "conceptlib-steps"),
    }

    # One step onward from the CLI run's finished concept (--init-from its file).
    source = Path(run_folder) / "concept.safetensors"
    continued = TrainingConfig.from_dict(dict(
        config.to_dict(), init=[], init_from=str(source), num_vectors=None, name="continued", token="<continued>",
        steps=1, checkpoint_every=0, preview_every=0, preview_prompt=None, run_dir=str(Path(home) / "continued-run"),
    ))
    header, continued_job = train(continued, library=library, progress=False)
    start = read_concept(source)
    trained = library.get(header.name)
    report["continued"] = {
        "step_cache": json.loads(Path(os.environ["CONCEPTLIB_JAX_REPORT"]).read_text())["step_cache"],
        "num_vectors": continued_job.config.num_vectors,
        "max_change": float(np.abs(trained.vectors - start.vectors).max()),
        "learning_rate": continued.learning_rate,
        "init_from": json.loads(trained.metadata["init_from"]),
        "expected_init_from": init_record(start),
        "init_words": json.loads(trained.metadata["init_words"]),
    }
    Path(out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = "jax"
    {"resume": _resume_worker, "other": _other_worker}[sys.argv[1]](*sys.argv[2:5])
