"""conceptlib.train, the Python form of `conceptlib train`: what it refuses before any model is
built (the training itself runs in test_train_model's worker, through this same function)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import conceptlib
from conceptlib.errors import TrainingError, UsageError
from conceptlib.library import ConceptLibrary
from conceptlib.training import training_config


@pytest.fixture
def library(tmp_path):
    return ConceptLibrary(tmp_path / "home")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(folder / "a.png")
    return folder


def _unchanged(library) -> bool:
    return not library.root.exists() or not any(library.root.rglob("*.safetensors")) and not any(
        (library.root / "runs").glob("*"))


def test_it_needs_a_name_or_a_token(library, images):
    with pytest.raises(UsageError, match=r"give name= and/or token="):
        conceptlib.train(images, library=library)
    assert _unchanged(library)


def test_an_unknown_setting_is_named_with_the_ones_it_takes(library, images):
    with pytest.raises(UsageError, match=r"unknown setting stepz for conceptlib.train; it takes .*steps.*"):
        conceptlib.train(images, token="<cat-doll>", stepz=10, library=library)
    # The CLI's --lr is learning_rate here: the list names it (and the other named parameters).
    with pytest.raises(UsageError) as caught:
        conceptlib.train(images, token="<cat-doll>", lr="5e-3", library=library)
    listed = str(caught.value).split("it takes ")[1].split(", ")
    assert {"learning_rate", "init", "name", "token", "trainer", "library", "progress", "flip"} <= set(listed)
    assert _unchanged(library)


@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "--steps 0 must be at least 1"),
    ({"resolution": 100}, "--resolution 100 is not a multiple of 64 from 64 to 2048"),
    ({"resolution": 4096}, "--resolution 4096 is not a multiple of 64 from 64 to 2048"),
    ({"batch_size": 10**9}, "--batch-size 1000000000 is more than 1024, the most conceptlib takes"),
    ({"grad_accum": 2000}, "--grad-accum 2000 is more than 1024"),
    ({"preview_steps": 5000}, "--preview-steps 5000 is more than 1000"),
    ({"steps": 10, "warmup_steps": 10}, "--warmup-steps 10 leaves no step of the 10-step run"),
    ({"learning_rate": "0.05:10, fast"}, "'fast' is not a number"),
    ({"learning_rate": "0.05:10, 0.005", "lr_schedule": "constant"}, "a stepped --lr is its own schedule"),
    ({"token": "<Cat-Doll>"}, "KerasCV lowercases prompts"),
    ({"init": " , "}, "--init ' , ' holds no word; give words such as 'cat'"),
    ({"init": 123}, "--init 123 must be words"),
    ({"init": ["cat", 5]}, "--init \\['cat', 5\\] must be words"),
    ({"steps": 2.5}, "--steps 2.5 must be a whole number"),
    ({"resolution": "64"}, "--resolution '64' must be a whole number"),
    ({"steps": None}, "--steps None must be a whole number"),
    ({"weight_decay": -1}, "--weight-decay -1 must be a finite number, not negative"),
    ({"flip": "no"}, "flip 'no' must be True or False"),
    ({"author": 5}, "description values .* must be text"),
    ({"learning_rate": "0.05:0, 0.01"}, "a rate's last step must be at least 1, not 0"),
])
def test_bad_values_fail_before_any_model_is_built(library, images, settings, message):
    settings = {"token": "<cat-doll>", **settings}
    with pytest.raises(conceptlib.ConceptlibError, match=message):
        conceptlib.train(images, weights="random", library=library, progress=False, **settings)
    assert _unchanged(library)


def test_the_library_may_be_given_as_its_folder_and_is_exported(images, tmp_path):
    assert conceptlib.ConceptLibrary is ConceptLibrary and "ConceptLibrary" in conceptlib.__all__
    ConceptLibrary(tmp_path / "lib").add(conceptlib.Concept("taken", "<taken>", np.ones((1, 768), np.float32)))
    with pytest.raises(conceptlib.ConceptlibError, match="token '<taken>' is already used by concept 'taken'"):
        conceptlib.train(images, name="new", token="<taken>", weights="random", library=str(tmp_path / "lib"),
                         progress=False)


def test_missing_images_fail_before_any_model_is_built(library, tmp_path):
    with pytest.raises(TrainingError, match="no such folder"):
        conceptlib.train(tmp_path / "nowhere", name="cat-doll", weights="random", library=library, progress=False)
    assert _unchanged(library)


def test_options_map_as_the_cli_maps_them(images):
    config = training_config(images, name="cat-doll", token="<cat-doll>", init="toy cat, plush",
                             learning_rate="0.05:10, 0.005", trainer="tensorflow", steps=20)
    assert config.init == ["toy", "cat", "plush"]
    assert (config.learning_rate, config.lr_steps, config.lr_schedule) == (0.05, [[0.05, 10], [0.005, None]], "stepped")
    assert training_config(images, name="a", token="<a>", init=["toy cat"], learning_rate=0.01,
                           trainer="tensorflow").init == ["toy", "cat"]


def test_auto_picks_the_trainer_of_the_backend_keras_already_runs():
    """In a notebook keras is often imported first; its backend is fixed, so 'auto' must follow it."""
    code = "import keras\nfrom conceptlib.train_api import _trainer\nprint(_trainer('auto'), _trainer('tensorflow'))"
    process = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, KERAS_BACKEND="jax"),
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.split() == ["jax", "tensorflow"]


def test_with_progress_it_announces_the_run_folder_as_the_cli_does(library, images, monkeypatch):
    """A notebook user needs the run folder to resume; progress=True prints it (as `train` does)."""
    import conceptlib.training

    seen = {}

    def recorded(config, **options):
        seen.update(options, config=config)
        raise KeyboardInterrupt  # stop before any model is built

    monkeypatch.setattr(conceptlib.training, "train", recorded)
    for progress in (True, False):
        with pytest.raises(KeyboardInterrupt):
            conceptlib.train(images, token="<cat-doll>", library=library, progress=progress)
        assert (seen["progress"], seen["announce"]) == (progress, True)  # -q keeps warnings and notes
    assert seen["config"].token == "<cat-doll>" and seen["config"].name == "cat-doll"
