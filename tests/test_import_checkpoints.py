"""Keeping an earlier state of a training run: `conceptlib import RUN/checkpoints/step-N.npz` adds
the checkpoint's vectors as a concept with the metadata of one trained to step N (and that
step's preview grid), and importing a run folder takes its final concept, never its checkpoints
or the concept it started from. Run folders are written here as `conceptlib train` writes them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conceptlib.cli import main
from conceptlib.concept import Concept
from conceptlib.files import write_concept
from conceptlib.formats import load_any
from conceptlib.library import ConceptLibrary
from conceptlib.runs import Checkpoint, RunDirectory
from conceptlib.training import TrainingConfig
from helpers import cli_imports

LOSSES = [1.0 - 0.01 * i for i in range(30)]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "home"))
    return ConceptLibrary(tmp_path / "home")


def _vectors(step: int) -> np.ndarray:
    return np.random.default_rng(step).standard_normal((2, 768)).astype(np.float32)


def _run(tmp_path, *, finished=False, previews=(20,), init_from=None) -> RunDirectory:
    """A run of <doll> stopped after step 30, with checkpoints at steps 10, 20 and 30."""
    run = RunDirectory(tmp_path / "run")
    config = TrainingConfig(images=str(tmp_path / "photos"), name="doll", token="<doll>", weights="random",
                            trainer="jax", init=[] if init_from else ["toy"], init_from=init_from, num_vectors=2,
                            steps=50, checkpoint_every=10, preview_every=20)
    start = Concept("source", "<source>", _vectors(0)) if init_from else None
    run.create(config, {"image_sha256": ["ab" * 32], "init_ids": [] if init_from else [5988],
                        "init_tokens": [] if init_from else ["toy"], "random_weights": True,
                        "trainer_version": "0.1.0"}, start)
    for step in (10, 20, 30):
        run.save_checkpoint(Checkpoint(step, _vectors(step), [np.int64(step)], LOSSES[:step]))
    run.previews.mkdir()
    for step in previews:
        Image.fromarray(np.full((64, 128, 3), step, np.uint8)).save(run.preview_path(step))
    if finished:
        write_concept(Concept("doll", "<doll>", _vectors(50)), run.concept_path)
    return run


def test_a_checkpoint_becomes_a_concept_with_its_steps_metadata(home, tmp_path):
    run = _run(tmp_path)
    result = CliRunner().invoke(main, ["import", str(run.checkpoint_path(20))])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Imported doll-step20 (<doll-step20>, 2x768) from ")
    concept = home.get("doll-step20")
    assert concept.token == "<doll-step20>"
    np.testing.assert_array_equal(concept.vectors, _vectors(20))
    meta = concept.metadata
    assert json.loads(meta["checkpoint_of"]) == {"run": str(run.path.resolve()), "step": 20}
    # What is shared names the run by its folder only (the library's absolute path holds the home).
    for fmt in ("conceptlib", "kohya", "diffusers", "a1111"):
        out = tmp_path / f"shared-{fmt}"
        out.mkdir()
        assert CliRunner().invoke(main, ["export", "doll-step20", "--format", fmt, "--out", str(out)]).exit_code == 0
        data = b"".join(path.read_bytes() for path in out.rglob("*") if path.is_file())
        assert str(run.path.resolve()).encode() not in data and str(tmp_path).encode() not in data, fmt
        if fmt == "conceptlib":
            shared = load_any(next(out.iterdir()))[0]
            assert json.loads(shared.metadata["checkpoint_of"]) == {"run": run.path.name, "step": 20}
    assert json.loads(meta["loss_history"]) == [[i + 1, round(loss, 6)] for i, loss in enumerate(LOSSES[:20])]
    assert meta["final_loss"] == f"{LOSSES[19]:.6f}"
    assert meta["trainer"] == "jax" and meta["trainer_version"] == "0.1.0" and meta["random_weights"] == "true"
    assert json.loads(meta["init_tokens"]) == ["toy"] and json.loads(meta["image_sha256"]) == ["ab" * 32]
    assert json.loads(meta["training"])["num_vectors"] == 2
    # The thumbnail of that step's preview grid.
    assert meta["preview_source"] == "generated"
    out = tmp_path / "preview.png"
    assert CliRunner().invoke(main, ["show", "doll-step20", "--preview", str(out)]).exit_code == 0
    with Image.open(out) as image:
        assert image.size == (128, 64) and image.getpixel((5, 5)) == (20, 20, 20)


def test_a_checkpoint_without_a_preview_and_with_a_name_and_token_given(home, tmp_path):
    run = _run(tmp_path, init_from="source")
    result = CliRunner().invoke(main, ["import", str(run.checkpoint_path(30)), "--name", "doll-best", "--token", "<doll-best>"])
    assert result.exit_code == 0, result.output
    meta = home.get("<doll-best>").metadata
    assert "preview" not in meta and json.loads(meta["loss_history"])[-1] == [30, round(LOSSES[29], 6)]
    assert json.loads(meta["init_from"])["token"] == "<source>" and json.loads(meta["init_tokens"]) == []


def test_a_run_folder_imports_its_final_concept_only(home, tmp_path):
    run = _run(tmp_path, finished=True, init_from="source")
    result = CliRunner().invoke(main, ["import", str(run.path)])
    assert result.exit_code == 0, result.output
    assert [h.name for h in home.list()] == ["doll"]
    assert f"Skipped {run.path / 'checkpoints'}: 3 training checkpoints (steps 10, 20, 30); the run's final " in result.output
    assert f"Skipped {run.path / 'init.safetensors'}: the concept this run started from" in result.output


def test_an_unfinished_run_folder_names_its_latest_checkpoint(home, tmp_path):
    run = _run(tmp_path)
    result = CliRunner().invoke(main, ["import", str(run.path)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: {run.path}: 3 training checkpoints (steps 10, 20, 30) of a training run that has not finished; "
        f"import the checkpoint you want by its own path, e.g. {run.checkpoint_path(30)}, or resume the run "
        f"with `conceptlib train --resume {run.path}`"
    ]
    assert home.list() == []


def test_npz_files_that_are_not_checkpoints_are_one_line_errors(home, tmp_path):
    np.savez(tmp_path / "arrays.npz", vectors=_vectors(1))
    result = CliRunner().invoke(main, ["import", str(tmp_path / "arrays.npz")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "an .npz file that is not a conceptlib training checkpoint (RUN/checkpoints/step-N.npz)" in result.output
    run = _run(tmp_path)
    run.checkpoint_path(20).write_bytes(b"PK\x03\x04 damaged")
    result = CliRunner().invoke(main, ["import", str(run.checkpoint_path(20))])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert f"{run.checkpoint_path(20)}: unreadable checkpoint" in result.output
    assert result.output.strip().endswith(f"import another step's checkpoint from {run.checkpoints}")
    run.checkpoint_path(20).write_bytes(b"not an archive at all")  # numpy would try it as a pickle
    result = CliRunner().invoke(main, ["import", str(run.checkpoint_path(20))])
    assert result.exit_code == 1 and "unreadable checkpoint (not an .npz archive)" in result.output
    assert "allow_pickle" not in result.output
    assert home.list() == []


def test_a_checkpoint_token_taken_in_the_library_is_refused(home, tmp_path):
    run = _run(tmp_path)
    assert CliRunner().invoke(main, ["import", str(run.checkpoint_path(10))]).exit_code == 0
    again = CliRunner().invoke(main, ["import", str(run.checkpoint_path(10))])
    assert again.exit_code == 0 and again.output.startswith("Already in the library: doll-step10")
    result = CliRunner().invoke(main, ["import", str(run.checkpoint_path(20)), "--token", "<doll-step10>"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "token '<doll-step10>' is already used by concept 'doll-step10'" in result.output
    assert [h.name for h in home.list()] == ["doll-step10"]


def test_importing_a_checkpoint_imports_no_model_library(home, tmp_path):
    run = _run(tmp_path)
    code, imported, process = cli_imports(["import", str(run.checkpoint_path(20))], dict(os.environ))
    assert code == 0, process.stderr
    assert not {"tensorflow", "keras", "keras_cv", "jax", "torch"} & set(imported)


# --- `conceptlib runs RUN`: the steps to pick from -----------------------------------------


def _mean(start: int, stop: int, losses=LOSSES) -> float:
    return sum(losses[start:stop]) / (stop - start)


def test_runs_run_lists_its_steps_and_how_to_import_one(home, tmp_path):
    run = _run(tmp_path, previews=(20, 30))
    result = CliRunner().invoke(main, ["runs", str(run.path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("run  doll (<doll>), jax, started ") and "stopped at step 30/50" in lines[0]
    assert lines[0].endswith(f"continue with conceptlib train --resume {run.path}")  # not in the runs folder
    assert lines[1] == "  settings: sd-1, 50 steps, batch 1, lr 0.005 cosine, 512 px, 2 vector(s), template object, seed 0"
    assert lines[2:] == [
        f"  step     10  loss {_mean(0, 10):.4f}  checkpoints/step-0000010.npz",
        f"  step     20  loss {_mean(10, 20):.4f}  checkpoints/step-0000020.npz  previews/step-0000020.png",
        f"  step     30  loss {_mean(20, 30):.4f}  checkpoints/step-0000030.npz  previews/step-0000030.png",
        f"Import a step as a concept: conceptlib import {run.checkpoint_path(30)}",
    ]
    summary = json.loads(CliRunner().invoke(main, ["runs", str(run.path), "--json"]).output)
    assert summary["status"] == "stopped" and [entry["step"] for entry in summary["steps"]] == [10, 20, 30]
    assert summary["config"]["steps"] == 50 and summary["config"]["token"] == "<doll>"
    assert summary["steps"][1] == {
        "step": 20, "loss": round(_mean(10, 20), 6), "checkpoint": str(run.checkpoint_path(20)),
        "preview": str(run.preview_path(20)), "concept": None,
    }


def test_runs_run_of_a_finished_run_by_name_ends_with_its_concept(home, tmp_path):
    run = _run(home.runs_dir, previews=(20, 50))  # a run folder in the library's runs folder
    losses = LOSSES + [0.5] * 20  # 50 steps
    history = json.dumps([[i + 1, loss] for i, loss in enumerate(losses)])
    write_concept(Concept("doll", "<doll>", _vectors(50), {"loss_history": history}), run.concept_path)
    result = CliRunner().invoke(main, ["runs", "run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "finished, 50 steps, 2 preview(s)" in lines[0]
    # Losses now come from the concept's history, which covers every step.
    assert lines[3] == f"  step     20  loss {_mean(10, 20, losses):.4f}  checkpoints/step-0000020.npz  previews/step-0000020.png"
    assert lines[5] == "  step     50  loss 0.5000  concept.safetensors  previews/step-0000050.png"
    assert lines[6] == f"Import a step as a concept: conceptlib import {run.checkpoint_path(30)}"


def test_runs_run_shows_accumulation_stepped_rates_and_a_template_file(home, tmp_path):
    run = _run(tmp_path)
    data = json.loads(run.config_path.read_text())
    data["config"].update(batch_size=2, grad_accum=4, lr_schedule="stepped", lr_steps=[[0.05, 10], [0.005, None]],
                          template=str(tmp_path / "templates" / "mine.txt"), seed=7)
    run.config_path.write_text(json.dumps(data))
    lines = CliRunner().invoke(main, ["runs", str(run.path)]).output.splitlines()
    assert lines[1] == ("  settings: sd-1, 50 steps, batch 2 x 4 accumulated, lr 0.05:10, 0.005, 512 px, 2 vector(s), "
                        "template mine.txt, seed 7")


def test_runs_run_refuses_what_is_not_a_run(home, tmp_path):
    for name in ("no-such-run", str(tmp_path)):
        result = CliRunner().invoke(main, ["runs", name])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert f"{name}: not a training run (no folder of that name or path holding config.json)" in result.output
    run = _run(tmp_path)
    run.config_path.write_text("{not json")
    result = CliRunner().invoke(main, ["runs", str(run.path)])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert str(run.config_path) in result.output


def test_runs_run_imports_no_model_library(home, tmp_path):
    run = _run(tmp_path)
    code, imported, process = cli_imports(["runs", str(run.path)], dict(os.environ))
    assert code == 0, process.stderr
    assert not {"tensorflow", "keras", "keras_cv", "jax", "torch"} & set(imported)
