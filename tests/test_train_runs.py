"""`conceptlib runs` lists the library's training runs (finished, stopped with where to resume,
not checkpointed yet, unreadable) without importing TensorFlow, and `train --resume` takes a run's
name from that list as well as its folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conceptlib.cli import main
from helpers import cli_imports
from conceptlib.concept import Concept
from conceptlib.errors import TrainingError
from conceptlib.files import write_concept
from conceptlib.library import ConceptLibrary
from conceptlib.runs import Checkpoint, RunDirectory
from conceptlib.training import TrainingConfig


@pytest.fixture
def library(tmp_path, monkeypatch):
    """A library whose runs folder holds four runs, oldest first: finished (with a preview),
    stopped at step 20 of 100, started without a checkpoint, and one with a corrupt config."""
    root = tmp_path / "home"
    monkeypatch.setenv("CONCEPTLIB_HOME", str(root))
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    library = ConceptLibrary(root)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(images / f"p{index}.png")
    vectors = rng.standard_normal((1, 768)).astype(np.float32)

    def run(folder, name, steps, checkpoints=(), **extra):
        path = RunDirectory(library.runs_dir / folder)
        config = TrainingConfig(images=str(images), name=name, token=f"<{name}>", weights="random", steps=steps)
        path.create(config, extra)
        for step in checkpoints:
            path.save_checkpoint(Checkpoint(step, vectors, [np.int64(step), vectors], [1.0] * step))
        return path

    done = run("done-20261127-010000-11", "done", 5, [5])
    write_concept(Concept("done", "<done>", vectors), done.concept_path)
    done.previews.mkdir()
    Image.new("RGB", (8, 8)).save(done.previews / "step-0000005.png")
    run("ink-20261127-020000-12", "ink", 100, [10, 20], image_sha256=["not these images"])
    run("fresh-20261127-030000-13", "fresh", 50)
    broken = library.runs_dir / "broken-20261127-040000-14"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{not json")
    (library.runs_dir / "not-a-run").mkdir()  # no config.json: not listed
    for age, folder in enumerate(["done-20261127-010000-11", "ink-20261127-020000-12",
                                  "fresh-20261127-030000-13", "broken-20261127-040000-14"]):
        os.utime(library.runs_dir / folder / "config.json", (1_800_000_000 + age, 1_800_000_000 + age))
    return library


def test_runs_lists_each_run_and_how_to_continue_it(library):
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("done-20261127-010000-11  done (<done>), tensorflow, started ")
    assert lines[0].endswith(": finished, 5 steps, 1 preview(s)")
    assert lines[1].endswith(": stopped at step 20/100; continue with conceptlib train --resume ink-20261127-020000-12")
    assert "fresh-20261127-030000-13  fresh (<fresh>)" in lines[2]
    assert lines[2].endswith(": stopped before its first checkpoint; "
                             "conceptlib train --resume fresh-20261127-030000-13 starts it over")
    assert lines[3].startswith("broken-20261127-040000-14  unreadable: ")
    assert "corrupt" in lines[3]


def test_runs_json(library):
    result = CliRunner().invoke(main, ["runs", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)
    assert [(r["run"], r["status"], r.get("step")) for r in runs] == [
        ("done-20261127-010000-11", "finished", 5),
        ("ink-20261127-020000-12", "stopped", 20),
        ("fresh-20261127-030000-13", "no checkpoint", 0),
        ("broken-20261127-040000-14", "unreadable", None),
    ]
    assert runs[1]["steps"] == 100 and runs[1]["token"] == "<ink>" and runs[1]["previews"] == 0
    assert runs[1]["path"] == str(library.runs_dir / "ink-20261127-020000-12")


def test_a_diverged_run_and_a_stray_checkpoint_name(library):
    """NaN losses are null in --json (strict JSON), and a hand-made step-final.npz is passed over."""
    ink = RunDirectory(library.runs_dir / "ink-20261127-020000-12")
    vectors = np.ones((1, 768), np.float32)
    ink.save_checkpoint(Checkpoint(30, vectors, [np.int64(30), vectors], [1.0] * 20 + [float("nan")] * 10))
    (ink.checkpoints / "step-final.npz").write_bytes(b"copied by hand")
    assert "stopped at step 30/100" in CliRunner().invoke(main, ["runs"]).output
    result = CliRunner().invoke(main, ["runs", ink.path.name, "--json"])
    assert result.exit_code == 0, result.output
    steps = json.loads(result.output, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))["steps"]
    assert [(s["step"], s["loss"]) for s in steps] == [(10, 1.0), (20, 1.0), (30, None)]
    assert "loss nan" in CliRunner().invoke(main, ["runs", ink.path.name]).output


def test_runs_that_cannot_be_read_or_resumed_are_listed_as_unreadable(library):
    """One bad run folder never hides the others: a config.json that cannot be read (here a
    folder; a permission error is the same) or whose settings `--resume` would refuse."""
    cannot = library.runs_dir / "cannot-20261127-050000-15"
    (cannot / "config.json").mkdir(parents=True)
    edited = RunDirectory(library.runs_dir / "fresh-20261127-030000-13")
    saved = json.loads(edited.config_path.read_text())
    saved["config"]["steps"] = "many"
    edited.config_path.write_text(json.dumps(saved))
    runs = json.loads(CliRunner().invoke(main, ["runs", "--json"]).output)
    status = {r["run"]: (r["status"], r.get("error", "")) for r in runs}
    assert status["cannot-20261127-050000-15"] == ("unreadable", (
        f"{cannot / 'config.json'}: cannot be read (Is a directory); check that it is a file you may read, "
        "or start a new run"))
    assert status["fresh-20261127-030000-13"][0] == "unreadable"
    assert "invalid settings (--steps 'many' must be a whole number)" in status["fresh-20261127-030000-13"][1]
    assert status["ink-20261127-020000-12"][0] == "stopped"
    unreadable = next(r for r in runs if r["run"] == "cannot-20261127-050000-15")
    keys = ("name", "token", "trainer", "base_model", "steps", "step", "previews")
    assert {key: unreadable[key] for key in keys} == dict.fromkeys(keys)
    assert next(r for r in runs if r["run"] == "ink-20261127-020000-12")["base_model"] == "sd-1"
    resumed = CliRunner().invoke(main, ["train", "--resume", str(cannot)])
    assert resumed.exit_code == 1 and resumed.output.count("\n") == 1 and "cannot be read (Is a directory)" in resumed.output


def test_a_run_with_damaged_files_still_lists_its_steps(library):
    """A checkpoint or the run's concept copy that cannot be read costs the losses (a warning
    says which file), not the list of steps to pick from."""
    ink = RunDirectory(library.runs_dir / "ink-20261127-020000-12")
    latest = ink.checkpoint_path(20)
    with np.load(latest) as data:
        arrays = dict(data)
    arrays["meta"] = np.frombuffer(b"[1, 2, 3]", dtype=np.uint8)  # JSON, but not the object it should be
    np.savez(latest, **arrays)
    result = CliRunner().invoke(main, ["runs", ink.path.name])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith(f"Warning: losses not shown: {latest}: unreadable checkpoint (")
    assert "  step     20  loss ?  checkpoints/step-0000020.npz" in result.stdout.splitlines()
    with pytest.raises(TrainingError, match="unreadable checkpoint .*delete it to resume from an earlier one"):
        ink.load_checkpoint()  # what --resume reads it with: one line, not a TypeError
    done = RunDirectory(library.runs_dir / "done-20261127-010000-11")
    done.concept_path.write_bytes(done.concept_path.read_bytes()[:100])
    result = CliRunner().invoke(main, ["runs", done.path.name])
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"Warning: losses not shown: the run's copy of its concept ({done.concept_path}) cannot "
                             "be read; the library's copy is a file of its own, and the checkpoints still import\n")
    assert "  step      5  loss ?  checkpoints/step-0000005.npz  concept.safetensors  previews/step-0000005.png" \
        in result.stdout.splitlines()


def test_run_json_is_strict_and_its_paths_absolute(library, monkeypatch):
    """A NaN in a hand-edited config.json is null, never a bare NaN or a traceback; a run named by
    a relative path gets absolute paths, the same from any folder."""
    done = RunDirectory(library.runs_dir / "done-20261127-010000-11")
    saved = json.loads(done.config_path.read_text())
    saved["config"]["future_setting"] = float("nan")
    done.config_path.write_text(json.dumps(saved))
    monkeypatch.chdir(library.runs_dir)
    result = CliRunner().invoke(main, ["runs", done.path.name, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert shown["config"]["future_setting"] is None
    assert shown["path"] == str(done.path) and shown["steps"][0]["checkpoint"] == str(done.checkpoint_path(5))


def test_runs_in_an_empty_library(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "empty"))
    result = CliRunner().invoke(main, ["runs"])
    assert result.exit_code == 0
    assert result.output == f"No training runs in {tmp_path / 'empty' / 'runs'}\n"


def test_resume_takes_a_run_name_from_the_list(library):
    """The name reaches the run folder: the finished run and the stopped one (whose images are
    not the ones it started with) are refused for what they are, not as unknown folders."""
    runner = CliRunner()
    done = runner.invoke(main, ["train", "--resume", "done-20261127-010000-11"])
    assert done.exit_code == 1
    assert done.output == (f"Error: run {library.runs_dir / 'done-20261127-010000-11'} already finished "
                           "(concept.safetensors exists); nothing to resume\n")
    ink = runner.invoke(main, ["train", "--resume", "ink-20261127-020000-12"])
    assert ink.exit_code == 1 and "changed since run" in ink.output and ink.output.count("\n") == 1
    devices = runner.invoke(main, ["train", "--resume", "ink-20261127-020000-12", "--devices", "2"])
    assert devices.exit_code == 2 and devices.output == (
        "Error: --devices 2: only the jax trainer spreads over devices; this run trains with tensorflow, which keeps "
        "to one device: drop --devices\n")
    unknown = runner.invoke(main, ["train", "--resume", "no-such-run"])
    assert unknown.exit_code == 1
    assert unknown.output == ("Error: no-such-run is not a training run folder (no config.json); "
                              "give a run folder or a run name from `conceptlib runs`\n")


def test_resume_of_a_run_whose_settings_were_edited_wrongly(library):
    """A hand-edited config.json with a mistyped or out-of-range setting is one line (exit 1)."""
    path = library.runs_dir / "fresh-20261127-030000-13" / "config.json"
    saved = json.loads(path.read_text())
    for steps, reason in (("many", "--steps 'many' must be a whole number"), (0, "--steps 0 must be at least 1")):
        saved["config"]["steps"] = steps
        path.write_text(json.dumps(saved))
        result = CliRunner().invoke(main, ["train", "--resume", "fresh-20261127-030000-13"])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: {path}: invalid settings (") and reason in result.output
        assert result.output.endswith("); undo the edit or start a new run\n") and result.output.count("\n") == 1


def test_runs_remove_deletes_a_run_folder_and_nothing_else(library):
    runner = CliRunner()
    concepts = sorted(p.name for p in library.concepts_dir.glob("*")) if library.concepts_dir.exists() else []
    ink = library.runs_dir / "ink-20261127-020000-12"
    declined = runner.invoke(main, ["runs", "ink-20261127-020000-12", "--remove"], input="n\n")
    assert declined.exit_code == 1 and ink.is_dir()
    assert "Remove run ink-20261127-020000-12  ink (<ink>)" in declined.output and "stopped at step 20/100" in declined.output
    accepted = runner.invoke(main, ["runs", "ink-20261127-020000-12", "--remove"], input="y\n")
    assert accepted.exit_code == 0, accepted.output
    assert accepted.output.endswith("Removed run ink-20261127-020000-12\n") and not ink.exists()
    # A finished run (by path) and an unreadable one (how a user clears it) go too.
    done = library.runs_dir / "done-20261127-010000-11"
    assert runner.invoke(main, ["runs", str(done), "--remove", "-y"]).exit_code == 0 and not done.exists()
    assert runner.invoke(main, ["runs", "broken-20261127-040000-14", "--remove", "-y"]).exit_code == 0
    assert [r["run"] for r in json.loads(runner.invoke(main, ["runs", "--json"]).output)] == ["fresh-20261127-030000-13"]
    assert (library.runs_dir / "not-a-run").is_dir()
    assert (sorted(p.name for p in library.concepts_dir.glob("*")) if library.concepts_dir.exists() else []) == concepts


def test_runs_remove_refuses_what_is_not_one_of_the_librarys_runs(library, tmp_path):
    elsewhere = tmp_path / "my-run"  # a --run-dir run outside the library
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text("{}")
    (library.runs_dir / "linked").symlink_to(elsewhere)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    runner = CliRunner()
    for name, code, needle in (
        (str(elsewhere), 1, f"Error: {elsewhere}: not in the library's runs folder "),
        ("linked", 1, f"Error: {library.runs_dir / 'linked'}: not in the library's runs folder "),
        ("not-a-run", 1, "Error: not-a-run: not a training run (no folder of that name or path holding config.json)"),
        ("no-such-run", 1, "Error: no-such-run: not a training run"),
    ):
        result = runner.invoke(main, ["runs", name, "--remove", "-y"])
        assert result.exit_code == code and result.output.startswith(needle), result.output
        assert result.output.count("\n") == 1
    usage = runner.invoke(main, ["runs", "--remove", "-y"])
    assert usage.exit_code == 2 and "--remove takes one RUN" in usage.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_runs_reads_no_model_library(library):
    """A real process: `conceptlib runs` imports neither TensorFlow, Keras, JAX nor numpy."""
    code, imported, process = cli_imports(["runs"], dict(os.environ, CONCEPTLIB_HOME=str(library.root)))
    assert (code, imported) == (0, []), process.stderr
    assert "stopped at step 20/100" in process.stdout


def test_a_run_being_trained_is_listed_as_such_and_cannot_be_resumed_twice(library, monkeypatch):
    """While a process trains a run (holds its lock, as `conceptlib train` does from start to
    finish), `runs` says so and a second `--resume` of it is refused, leaving it untouched."""
    import conceptlib_tensorflow

    def no_models(*args, **kwargs):
        raise AssertionError("the second resume went on to build the models")

    monkeypatch.setattr(conceptlib_tensorflow, "build_models", no_models)
    run = RunDirectory(library.runs_dir / "fresh-20261127-030000-13")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom conceptlib.runs import RunDirectory\n"
         f"with RunDirectory({str(run.path)!r}).hold():\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run.is_training()
        listed = {r["run"]: r for r in json.loads(CliRunner().invoke(main, ["runs", "--json"]).output)}
        assert (listed[run.path.name]["status"], listed[run.path.name]["step"]) == ("running", 0)
        line = CliRunner().invoke(main, ["runs"]).output.splitlines()[2]
        assert line.endswith(": training now (last checkpoint: none yet)")
        before = sorted((p.name, p.stat().st_mtime_ns) for p in run.path.rglob("*"))
        again = CliRunner().invoke(main, ["train", "--resume", run.path.name])
        assert again.exit_code == 1
        assert again.output == (f"Error: run {run.path} is being trained by another process right now; "
                                "wait for it to finish, or stop it first\n")
        removed = CliRunner().invoke(main, ["runs", run.path.name, "--remove", "-y"])
        assert (removed.exit_code, removed.output) == (1, again.output)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in run.path.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    assert not run.is_training()  # the lock goes with the process
