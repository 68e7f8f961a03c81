"""`conceptlib train --init-from CONCEPT`: a run starts from an existing concept's vectors (a
library concept, or a file in another tool's format), keeps them in its run folder for a resume,
and refuses what cannot work before any model is built. The trained result is checked end to end
in tests/test_jax_train.py (a one-step run from the CLI run's concept)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from conceptlib.cli import main
from conceptlib.concept import Concept
from conceptlib.training import TrainingConfig, prepare
from test_train_checks import _refused, home, images  # noqa: F401 (fixtures)


def _vectors(count: int, dim: int = 768, seed: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)


def _config(images, **settings) -> TrainingConfig:
    return TrainingConfig(**{"images": str(images), "name": "more", "token": "<more>", "weights": "random", **settings})


def test_a_library_concept_gives_the_starting_vectors_and_their_count(home, images):
    source = home.add(Concept("three", "<three>", _vectors(3)))
    job = prepare(_config(images, init_from="<three>"), library=home)
    assert job.config.num_vectors == 3 and job.new_ids == list(range(49408, 49411))
    np.testing.assert_array_equal(job.initial_vectors(None), home.get("three").vectors)
    # Kept in the run folder: a resume needs neither the library concept nor its file.
    saved = json.loads(job.run_dir.config_path.read_text())["config"]
    assert saved["init_from"] == "<three>" and saved["num_vectors"] == 3 and saved["init"] == []
    source.path.unlink()
    resumed = prepare(None, library=home, resume=job.run_dir.path)
    assert resumed.init_concept.name == "three" and resumed.init_concept.token == "<three>"
    np.testing.assert_array_equal(resumed.initial_vectors(None), _vectors(3))


def test_a_file_in_another_tools_format_is_read_and_recorded_by_its_full_path(home, images, tmp_path, monkeypatch):
    # An A1111-style safetensors embedding ("emb_params"), as downloaded from a model site.
    save_file({"emb_params": _vectors(2)}, str(tmp_path / "ink-style.safetensors"))
    monkeypatch.chdir(tmp_path)
    job = prepare(_config(images, init_from="ink-style.safetensors", num_vectors=2), library=home)
    np.testing.assert_array_equal(job.initial_vectors(None), _vectors(2))
    assert job.config.init_from == str(tmp_path / "ink-style.safetensors")
    assert job.init_concept.token == "ink-style"  # A1111 reads the file name as the token


def test_the_base_model_comes_from_the_concept_when_not_given(home, images):
    home.add(Concept("wide", "<wide>", _vectors(2, 1024)))
    job = prepare(_config(images, init_from="wide"), library=home)
    assert job.config.base_model == "sd-2" and job.config.num_vectors == 2
    assert json.loads(job.run_dir.config_path.read_text())["config"]["base_model"] == "sd-2"
    assert prepare(_config(images, name="plain", token="<plain>"), library=home).config.base_model == "sd-1"


def test_the_cli_says_where_the_vectors_start(home, images, monkeypatch):
    """The announcement comes before the trainer builds its models (the fixture's stop)."""
    home.add(Concept("three", "<three>", _vectors(3)))
    result = CliRunner().invoke(main, ["train", str(images), "--name", "more", "--weights", "random",
                                       "--trainer", "tensorflow", "--init-from", "three"])
    assert isinstance(result.exception, AssertionError)  # the home fixture stops at the model build
    assert "Starting from the 3 vector(s) of three (<three>)" in result.stderr


def test_refusals_are_one_line_and_leave_the_library_unchanged(home, images, tmp_path):
    home.add(Concept("three", "<three>", _vectors(3)))
    base = [str(images), "--name", "more", "--weights", "random", "--trainer", "tensorflow"]
    _refused(home, [*base, "--init", "cat", "--init-from", "three"],
             "--init cat and --init-from three both give the starting vectors; use one", 2)
    line = _refused(home, [*base, "--init-from", "three", "--num-vectors", "2"],
                    "--num-vectors 2 does not match the 3 vector(s) of --init-from three", 2)
    assert line.endswith("leave --num-vectors out")
    _refused(home, [*base, "--init-from", "nowhere"], "nowhere")

    save_file({"<wide>": _vectors(1, 1024)}, str(tmp_path / "wide.safetensors"))
    line = _refused(home, [*base, "--init-from", str(tmp_path / "wide.safetensors"), "--base-model", "sd-1"],
                    "its vectors are 1024 wide (sd-2), but sd-1 needs 768; train with --base-model sd-2, or leave "
                    "--base-model out")
    save_file({"<odd>": _vectors(1, 512)}, str(tmp_path / "odd.safetensors"))
    _refused(home, [*base, "--init-from", str(tmp_path / "odd.safetensors")],
             "concept 'odd': vector width 512 is not 768 (SD 1.x) or 1024 (SD 2.x)")
    bad = _vectors(2)
    bad[1, 3] = np.inf
    save_file({"<bad>": bad}, str(tmp_path / "bad.safetensors"))
    _refused(home, [*base, "--init-from", str(tmp_path / "bad.safetensors")],
             "bad.safetensors: concept 'bad': vector 1 contains NaN or Inf")
    both = tmp_path / "both"
    both.mkdir()
    for name in ("one", "two"):
        save_file({f"<{name}>": _vectors(1)}, str(both / f"{name}.safetensors"))
    _refused(home, [*base, "--init-from", str(both)], f"--init-from {both} holds 2 concepts; give one")


def test_a_resume_whose_starting_vectors_are_gone_says_so(home, images, tmp_path):
    home.add(Concept("three", "<three>", _vectors(3)))
    job = prepare(_config(images, init_from="three", run_dir=str(tmp_path / "run")), library=home)
    job.run_dir.init_path.write_bytes(b"damaged")
    _refused(home, ["--resume", str(job.run_dir.path)], "the vectors this run started from are unreadable")


@pytest.mark.parametrize("option", ["--init-from", "--num-vectors"])
def test_resume_refuses_init_from_and_num_vectors(home, images, tmp_path, option):
    job = prepare(_config(images, run_dir=str(tmp_path / "run")), library=home)
    _refused(home, ["--resume", str(job.run_dir.path), option, "3"], f"{option} cannot change them", 2)
