"""`conceptlib show --nearest K`: the vocabulary words closest to each vector, from the real
keras-cv text encoder's weight file (random weights, written by conceptlib itself), in a process
that never imports TensorFlow."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conceptlib.cli import main
from conceptlib.concept import Concept
from conceptlib.library import ConceptLibrary
from helpers import cli_imports


@pytest.fixture(scope="module")
def weights(random_weights):
    """The session's `weights init-random` folder (conftest; every sd-1 part, random): --nearest
    reads only its text encoder, kcv_encoder.h5. Shared by the whole session: read, never write."""
    folder, _ = random_weights
    return folder


@pytest.fixture
def concept_file(weights, tmp_path):
    """A concept whose vector 0 is the token 'cat' exactly and vector 1 three times 'painting'
    plus a little noise (cosine ignores the scale)."""
    from conceptlib.clip_bpe import ClipTokenizer
    from conceptlib.kerascv.tokenizer import find_vocab_path
    from conceptlib.nearest_words import token_table

    table = token_table(weights / "kcv_encoder.h5")
    encoder = ClipTokenizer(find_vocab_path()).encoder
    noise = np.random.default_rng(0).standard_normal(768) * 1e-3
    vectors = np.stack([table[encoder["cat</w>"]], 3 * table[encoder["painting</w>"]] + noise]).astype(np.float32)
    library = ConceptLibrary(tmp_path / "home")
    library.add(Concept("probe", "<probe>", vectors))
    return library.header("probe").path


def test_nearest_words_of_each_vector(weights, concept_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["show", "probe", "--nearest", "3", "--weights", str(weights), "--json"])
    assert result.exit_code == 0, result.output
    nearest = json.loads(result.stdout)["nearest"]
    assert [len(words) for words in nearest] == [3, 3]
    assert nearest[0][0]["word"] == "cat" and nearest[0][0]["token"] == "cat</w>"
    assert nearest[0][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert nearest[1][0]["word"] == "painting" and nearest[1][0]["similarity"] > 0.99
    for words in nearest:  # best first
        assert [w["similarity"] for w in words] == sorted((w["similarity"] for w in words), reverse=True)
    assert "random" in result.stderr  # random weights: the words mean nothing, and it says so

    text = CliRunner().invoke(main, ["show", str(concept_file), "--nearest", "2", "--weights", str(weights)])
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[5].startswith("nearest:     vector 0: cat 1.000, ")
    assert lines[6].startswith("             vector 1: painting ")


def test_nearest_words_read_the_weights_without_tensorflow(weights, concept_file, tmp_path):
    env = dict(os.environ, CONCEPTLIB_HOME=str(tmp_path / "home"))
    code, imported, process = cli_imports(["show", "probe", "--nearest", "1", "--weights", str(weights)], env)
    assert code == 0, process.stderr
    assert not {"tensorflow", "keras", "keras_cv", "jax", "torch"} & set(imported), imported


def test_nearest_words_without_weights_is_one_line(concept_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("CONCEPTLIB_WEIGHTS", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["show", "probe", "--nearest", "3", "--weights", str(empty)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --nearest compares with the sd-1 text encoder"), lines
    assert "kcv_encoder.h5" in lines[0] and "pass --weights DIR" in lines[0]
    assert CliRunner().invoke(main, ["show", "probe", "--nearest", "101"]).exit_code == 2
