"""`conceptlib cache` / `cache info` / `cache clear`: the JAX compilation and step cache folder that
the jax trainer and `generate` use, its size, and clearing it without touching anything else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conceptlib.cli import main
from helpers import cli_imports


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """$CONCEPTLIB_JAX_CACHE set to a folder (not created) in tmp_path; home and library elsewhere."""
    folder = tmp_path / "jax-cache"
    monkeypatch.setenv("CONCEPTLIB_JAX_CACHE", str(folder))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "library"))
    return folder


def run(*args, input=None):
    return CliRunner().invoke(main, ["cache", *args], input=input, catch_exceptions=False)


def _fill(folder: Path) -> dict[str, bytes]:
    """Files as JAX's compilation cache and the jax trainer's step cache write them."""
    files = {
        "jit_train_step-3f2a9c": b"x" * 1500,
        "jit_train_step-3f2a9c-atime": b"12345678",
        "conceptlib-steps/sd-1-512-b1/step.bin": b"y" * 2000,
        "conceptlib-steps/sd-1-512-b1/meta.json": b"{}",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _one_line_error(result, needle):
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert needle in result.stderr, result.stderr
    return result.stderr


def test_cache_prints_the_folder_its_size_and_file_count(cache):
    _fill(cache)
    expected = [f"JAX cache: {cache} (from $CONCEPTLIB_JAX_CACHE)", "Size: 3.5 KB in 4 files"]
    for args in ([], ["info"]):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines() == expected


def test_cache_folder_that_does_not_exist_is_empty_and_stays_absent(cache):
    result = run("info")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1] == "Size: empty (the folder does not exist yet)"
    result = run("clear", "-y")
    assert result.exit_code == 0 and result.stdout == f"Nothing to clear: {cache} (from $CONCEPTLIB_JAX_CACHE) is empty\n"
    assert not cache.exists()
    cache.mkdir()
    assert run("info").stdout.splitlines()[1] == "Size: empty"


def test_default_folder_is_the_one_the_jax_trainer_and_generate_use(tmp_path, monkeypatch):
    """Without the variable: conceptlib's folder in the user cache dir, the same folder that
    enable_jax_compilation_cache (jax trainer, generate) gives JAX, checked in a real process."""
    monkeypatch.delenv("CONCEPTLIB_JAX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "conceptlib" / "jax"
    result = run()
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == f"JAX cache: {expected}"
    probe = ("import jax; from conceptlib.kerascv import enable_jax_compilation_cache as e; p = e(); "
             "print(p, jax.config.jax_compilation_cache_dir)")
    used = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert used.returncode == 0, used.stderr
    assert used.stdout.split() == [str(expected), str(expected)]


def test_clear_asks_then_deletes_the_contents_only(cache):
    files = _fill(cache)
    result = run("clear", input="n\n")
    assert result.exit_code == 1 and result.stderr.endswith(
        "Error: nothing deleted: not confirmed; answer y, or pass -y to go ahead without asking\n")
    assert f"Delete 4 files (3.5 KB) in {cache} (from $CONCEPTLIB_JAX_CACHE)? [y/N]" in result.stderr
    assert all((cache / name).read_bytes() == data for name, data in files.items())
    result = run("clear", input="y\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Cleared {cache} (from $CONCEPTLIB_JAX_CACHE): deleted 4 files (3.5 KB)\n"
    assert cache.is_dir() and list(cache.iterdir()) == []  # the folder stays: JAX writes into it next time
    _fill(cache)
    assert run("clear", "-y").exit_code == 0 and list(cache.iterdir()) == []


def test_clear_never_deletes_anything_outside_the_folder(cache, tmp_path):
    outside = tmp_path / "precious"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "keep.txt").write_text("keep")
    (outside / "file.txt").write_text("keep too")
    _fill(cache)
    (cache / "link-to-folder").symlink_to(outside / "sub", target_is_directory=True)
    (cache / "link-to-file").symlink_to(outside / "file.txt")
    (cache / "conceptlib-steps" / "nested-link").symlink_to(outside)
    result = run("clear", "-y")
    assert result.exit_code == 0, result.output
    assert list(cache.iterdir()) == []
    assert (outside / "sub" / "keep.txt").read_text() == "keep" and (outside / "file.txt").read_text() == "keep too"


def test_clear_refuses_when_the_cache_is_off(cache, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_JAX_CACHE", "off")
    result = run()
    assert result.exit_code == 0
    assert result.stdout == "JAX cache: off ($CONCEPTLIB_JAX_CACHE=off): nothing is cached, every run compiles\n"
    _one_line_error(run("clear", "-y"), "$CONCEPTLIB_JAX_CACHE is off, so there is no cache folder to clear; unset it")


@pytest.mark.parametrize("holds", ["home", "library"])
def test_clear_refuses_a_folder_that_is_or_holds_home_or_the_library(cache, tmp_path, monkeypatch, holds):
    precious = tmp_path / "above" / holds
    monkeypatch.setenv("HOME" if holds == "home" else "CONCEPTLIB_HOME", str(precious))
    (precious / "data").mkdir(parents=True)
    (precious / "data" / "file").write_text("keep")
    for folder in (tmp_path / "above", precious):
        monkeypatch.setenv("CONCEPTLIB_JAX_CACHE", str(folder))
        what = "is or holds your home folder" if holds == "home" else "is, holds or is inside the concept library"
        _one_line_error(run("clear", "-y"), f"the JAX cache {folder} (from $CONCEPTLIB_JAX_CACHE) {what}")
        assert (precious / "data" / "file").read_text() == "keep"


def test_clear_refuses_a_folder_inside_the_library(cache, tmp_path, monkeypatch):
    library = tmp_path / "library"
    monkeypatch.setenv("CONCEPTLIB_HOME", str(library))
    concept_file = library / "concepts" / "cat-doll.safetensors"
    concept_file.parent.mkdir(parents=True)
    concept_file.write_bytes(b"a concept")
    for folder in (library / "concepts", library / "runs" / "cache"):
        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("CONCEPTLIB_JAX_CACHE", str(folder))
        _one_line_error(run("clear", "-y"), f"the JAX cache {folder} (from $CONCEPTLIB_JAX_CACHE) is, holds or is "
                                            "inside the concept library")
    assert concept_file.read_bytes() == b"a concept"


def test_a_cache_path_that_is_a_file_is_an_error(cache):
    cache.write_text("not a folder")
    for args in (["info"], ["clear", "-y"]):
        _one_line_error(run(*args), f"the JAX cache {cache} (from $CONCEPTLIB_JAX_CACHE) is a file, not a folder")
    assert cache.read_text() == "not a folder"


@pytest.mark.parametrize("args", [["cache"], ["cache", "info"], ["cache", "clear", "-y"]])
def test_cache_commands_never_import_tensorflow_jax_or_numpy(cache, args):
    _fill(cache)
    code, imported, process = cli_imports(args, dict(os.environ))
    assert (code, imported) == (0, []), f"{args}: exit {code}, imported {imported}: {process.stderr}"


def test_the_cache_variable_is_expanded_and_made_absolute(tmp_path, monkeypatch):
    """'~/jaxc' is the folder in the home folder (it was a literal '~' folder, reported empty),
    and a relative value is not another cache in every working folder."""
    from conceptlib.kerascv import jax_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CONCEPTLIB_JAX_CACHE", "~/jaxc")
    assert jax_cache_dir() == tmp_path / "home" / "jaxc"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONCEPTLIB_JAX_CACHE", "rel")
    assert jax_cache_dir() == tmp_path / "rel"


def test_a_cache_folder_that_cannot_be_read_is_one_line(cache, monkeypatch):
    """Not 'empty' (info) nor a traceback (clear); simulated, as root reads everything."""
    _fill(cache)
    real = os.walk

    def walk(top, onerror=None, **kwargs):
        error = PermissionError(13, "Permission denied", str(Path(top) / "locked"))
        if onerror is not None:
            onerror(error)
        yield from real(top, **kwargs)

    monkeypatch.setattr(os, "walk", walk)
    for args in (["info"], ["clear", "-y"]):
        result = run(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: cannot read {cache / 'locked'} in the JAX cache (Permission denied); make it readable, or "
            "delete it yourself")
    assert any(cache.iterdir())  # nothing was deleted
