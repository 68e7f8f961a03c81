"""`conceptlib generate` and `conceptlib weights`: refusals in-process (CliRunner, no model
built), and one end-to-end run as a real subprocess at 64 px with `weights init-random` weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conceptlib import Concept
from conceptlib.cli import main
from conceptlib.library import ConceptLibrary


def _concept(name, token, num_vectors, dim, seed):
    rng = np.random.default_rng(seed)
    return Concept(name, token, rng.normal(0.0, 0.05, size=(num_vectors, dim)).astype(np.float32))


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCEPTLIB_WEIGHTS", raising=False)
    library = ConceptLibrary()
    library.add(_concept("cat-doll", "<cat-doll>", 2, 768, 1))
    library.add(_concept("wide-doll", "<wide-doll>", 1, 1024, 2))
    return tmp_path


def test_generate_refuses_concepts_of_the_other_width(home):
    result = CliRunner().invoke(main, ["generate", "a <wide-doll> in a field", "--model", "sd-1", "--weights", str(home)])
    assert result.exit_code == 1
    assert "1024-wide" in result.output and "768-wide" in result.output and "--model sd-2" in result.output
    result = CliRunner().invoke(main, ["generate", "a <cat-doll>", "--negative", "<wide-doll>", "--weights", str(home)])
    assert result.exit_code == 1 and "mixes concepts for sd-1 and sd-2" in result.output


def test_generate_says_where_it_looked_for_weights(home):
    empty = home / "empty-weights"
    empty.mkdir()
    result = CliRunner().invoke(main, ["generate", "a <cat-doll>", "--weights", str(empty), "--offline"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: sd-1 text_encoder, diffusion_model, decoder weights (kcv_encoder.h5, "
                                    "kcv_diffusion_model.h5, kcv_decoder.h5) not found in")
    assert str(empty) in result.output and len(result.output.strip().splitlines()) == 1


def test_generate_size_must_be_a_multiple_of_64(home):
    result = CliRunner().invoke(main, ["generate", "a cat", "--size", "100"])
    assert result.exit_code == 2 and "--size 100" in result.output
    result = CliRunner().invoke(main, ["generate", "a cat", "--size", "4096"])
    assert result.exit_code == 2 and "--size 4096 is not a multiple of 64 from 64 to 2048" in result.output


def _generate(home, *args):
    """generate with an empty weights folder and --offline: a check that is missing lets the run
    through to the weights lookup, which then fails with another message."""
    empty = home / "empty-weights"
    empty.mkdir(exist_ok=True)
    return CliRunner().invoke(main, ["generate", *args, "--weights", str(empty), "--offline"])


def _one_line_error(result, code):
    assert result.exit_code == code, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error: "), result.output
    return result.output


def test_generate_refuses_bad_numbers_before_anything_else(home):
    for value in ("nan", "inf", "-inf", "-2"):
        assert f"--guidance {float(value)} is not a finite number of at least 0" in _one_line_error(
            _generate(home, "a cat", "--guidance", value), 2
        )
    # Seeds are uint32 for keras' random ops: -1 or 2**32 would wrap or crash after the build.
    for value in ("-1", str(2**32)):
        result = _generate(home, "a cat", "--seed", value)
        assert result.exit_code == 2 and "0<=x<=4294967295" in result.output
    assert "not found in" in _generate(home, "a cat", "--seed", str(2**32 - 1)).output  # the limit itself is fine


def test_generate_refuses_an_empty_prompt(home):
    for prompt in ("", "   "):
        output = _one_line_error(_generate(home, prompt, "--negative", "blurry"), 2)
        assert "PROMPT is empty" in output


def test_generate_refuses_unknown_concept_tokens(home):
    output = _one_line_error(_generate(home, "a <cat-dol> on a table"), 1)
    assert "'<cat-dol>' in PROMPT is not a concept token" in output and "did you mean <cat-doll>?" in output
    output = _one_line_error(_generate(home, "a <cat-doll>", "--negative", "<ugly-style>"), 1)
    assert "'<ugly-style>' in --negative" in output and "conceptlib import" in output
    # A known token that contains a bracketed word is not mistaken for an unknown one.
    ConceptLibrary().add(_concept("doll-style", "<doll>-style", 1, 768, 3))
    assert "not found in" in _generate(home, "a cat, <doll>-style").output


def _embedding_file(path, token, dim=768, seed=4):
    """A diffusers learned_embeds.safetensors, as its textual-inversion script writes it."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({token: _concept("x", token, 1, dim, seed).vectors}, str(path))
    return path


def test_generate_concept_files_are_checked_before_the_build(home):
    """--concept FILE joins the prompt's concepts without entering the library; what cannot work
    is one line before any model or weight is looked at."""
    ext = _embedding_file(home / "downloads" / "ext" / "learned_embeds.safetensors", "<ext-doll>")
    library_before = sorted(p.name for p in (home / "home" / "concepts").iterdir())
    # Accepted: the run goes on to the weights lookup (an empty folder here).
    assert "not found in" in _generate(home, "a <cat-doll> by a <ext-doll>", "--concept", str(ext)).output
    assert "not found in" in _generate(home, "a cat", "--negative", "<ext-doll>", "--concept", str(ext)).output
    wide = _embedding_file(home / "downloads" / "wide.safetensors", "<wide-ext>", dim=1024)
    assert "sd-2" in _generate(home, "a <wide-ext>", "--concept", str(wide)).output  # its base model picked
    for args, needle in (
        (["a <cat-doll>", "--concept", str(ext)], "its token <ext-doll> is in neither PROMPT nor --negative"),
        (["a <ext-doll>", "--concept", str(home / "gone.pt")], "gone.pt"),
        (["a <cat-doll> <wide-ext>", "--concept", str(wide)], "mixes concepts for sd-1 and sd-2"),
        (["a <cat-doll>", "--concept", str(_embedding_file(home / "d" / "cat.safetensors", "<cat-doll>"))],
         "its token <cat-doll> is also that of concept 'cat-doll' in the library"),
        (["a <ext-doll>", "--concept", str(ext), "--concept", str(ext.parent)], "its token <ext-doll> is also that of"),
    ):
        assert needle in _one_line_error(_generate(home, *args), 1), args
    assert sorted(p.name for p in (home / "home" / "concepts").iterdir()) == library_before


def test_generate_refuses_a_prompt_too_long_before_the_build(home):
    # 2 vectors for <cat-doll>: 74 words + 2 + start/end = 78 tokens.
    output = _one_line_error(_generate(home, "x " * 74 + "<cat-doll>"), 1)
    assert "is 78 tokens (1 of them from multi-vector concepts)" in output and "shorten it by 1 token" in output
    output = _one_line_error(_generate(home, "a cat", "--negative", "y " * 80), 1)
    assert "negative prompt 'y y y" in output and "is 82 tokens;" in output and "shorten it by 5 tokens" in output
    assert "not found in" in _generate(home, "x " * 73 + "<cat-doll>").output  # 77 fits


def test_generate_refuses_an_unusable_out_folder_before_the_build(home):
    a_file = home / "a-file"
    a_file.write_text("x")
    output = _one_line_error(_generate(home, "a cat", "--out", str(a_file / "images")), 2)
    assert f"{a_file} is a file, not a folder" in output and "--out" in output
    assert not (a_file.parent / "images").exists()


def test_generate_says_when_the_weights_folder_is_of_the_other_model(home):
    import h5py

    folder = home / "sd2-weights"
    folder.mkdir()
    h5py.File(folder / "text_encoder_v2_1.h5", "w").close()
    result = CliRunner().invoke(main, ["generate", "a cat", "--weights", str(folder), "--offline"])
    output = _one_line_error(result, 1)
    assert "kcv_decoder.h5) not found in" in output and f"({folder} holds sd-2 weights: use them with --base-model sd-2 in train, --model sd-2" in output


def test_concepts_in_prompts_finds_tokens_in_prompt_and_negative(home):
    from conceptlib.cli.model_commands import concepts_in_prompts

    library = ConceptLibrary()
    assert [h.name for h in concepts_in_prompts(library, "a <CAT-DOLL>", "")] == ["cat-doll"]
    assert [h.name for h in concepts_in_prompts(library, "a cat", "no <wide-doll>")] == ["wide-doll"]
    assert concepts_in_prompts(library, "a cat-doll without brackets", None) == []


def test_weights_where_lists_each_part(home):
    from conceptlib.weights import write_random_weights

    folder = write_random_weights(home / "w", "sd-1", parts=["image_encoder"])
    result = CliRunner().invoke(main, ["weights", "where", "--weights", str(folder)])
    assert result.exit_code == 1, result.output  # a given folder is never completed by a download
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["text_encoder", "diffusion_model", "decoder", "image_encoder"]
    assert lines[0].startswith(f"text_encoder\tMISSING: not in {folder}")
    assert lines[3] == f"image_encoder\t{folder / 'vae_encoder.h5'}  (RANDOM)"


@pytest.mark.slow
def test_generate_end_to_end_with_init_random_weights(home, random_weights):
    """The real CLI in subprocesses: init-random wrote every sd-1 part (~4 GB; the session's
    shared run of it), generate builds the full model at 64 px, runs 1 step for 2 images and
    writes valid PNGs."""
    from PIL import Image

    env = dict(os.environ, CONCEPTLIB_HOME=str(home / "home"), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("KERAS_BACKEND", None)
    cli = [sys.executable, "-c", "import sys; from conceptlib.cli import main; sys.exit(main())"]
    weights, init = random_weights
    assert init.stdout.strip() == str(weights)
    _assert_no_tensorflow_notices(init.stderr)
    assert (weights / "RANDOM-WEIGHTS.txt").exists()
    assert {p.name for p in weights.glob("*.h5")} == {"kcv_encoder.h5", "kcv_diffusion_model.h5", "kcv_decoder.h5", "vae_encoder.h5"}

    out = home / "out"
    ext = _embedding_file(home / "downloads" / "learned_embeds.safetensors", "<ext-style>")
    result = subprocess.run(
        cli + ["generate", "a <cat-doll> on a table", "--negative", "blurry <ext-style>", "-n", "2", "--steps", "1",
               "--size", "64", "--seed", "7", "--weights", str(weights), "--out", str(out), "--concept", str(ext)],
        env=env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM" in result.stderr
    assert "softmax over axis" not in result.stderr  # at 64 px the deepest attention sees one pixel
    _assert_no_tensorflow_notices(result.stderr)
    paths = result.stdout.strip().splitlines()
    assert len(paths) == 3 and paths[-1].endswith("-sheet.png")
    for path in paths:
        with Image.open(path) as image:
            image.verify()
    for index, path in enumerate(paths[:2]):
        with Image.open(path) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            settings = json.loads(image.text["conceptlib"])
            assert settings["concepts"] == ["cat-doll"] and settings["concept_files"] == [str(ext)]
            # The whole batch's noise comes from the seed: what reproduces this image is stored.
            assert (settings["seed"], settings["num_images"], settings["index"]) == (7, 2, index)
            assert image.text["parameters"].endswith(f"Seed: 7, CFG scale: 7.5, Size: 64x64, Batch size: 2, "
                                                     f"Batch pos: {index}")
    assert {p.stem for p in (home / "home" / "concepts").iterdir()} == {"cat-doll", "wide-doll"}
    with Image.open(paths[2]) as sheet:
        assert sheet.size[0] > 64 and sheet.size[1] == 64

    # On the JAX backend (what generate uses on a GPU) the compiled functions go to the persistent
    # compilation cache, so the next generate does not compile them again.
    cache = home / "jax-cache"
    jax_env = dict(env, KERAS_BACKEND="jax", CONCEPTLIB_JAX_CACHE=str(cache))
    result = subprocess.run(
        cli + ["generate", "a <cat-doll>", "-n", "1", "--steps", "1", "--size", "64", "--seed", "7",
               "--weights", str(weights), "--out", str(home / "out-jax")],
        env=jax_env, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_no_tensorflow_notices(result.stderr)
    (path, _sheet) = result.stdout.strip().splitlines()
    with Image.open(path) as image:
        assert image.size == (64, 64)
    assert any(cache.iterdir()), "generate on the JAX backend wrote nothing to the compilation cache"


def _assert_no_tensorflow_notices(stderr: str) -> None:
    # TensorFlow's C++ side prints these at its import on either backend, whatever the log level.
    assert "oneDNN" not in stderr and "absl::InitializeLog" not in stderr, stderr[:500]


def test_native_stderr_without_drops_only_the_notices(capfd):
    from conceptlib.kerascv import TENSORFLOW_IMPORT_NOTICES, native_stderr_without

    with native_stderr_without(TENSORFLOW_IMPORT_NOTICES):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"a real error\n")
        os.write(2, b"I0000 00:00:17 9740 port.cc:153] oneDNN custom operations are on. You may see ...\n")
    assert capfd.readouterr().err == "a real error\n"
    # An exception in the block still gives stderr back, with what was written before it.
    with pytest.raises(RuntimeError), native_stderr_without(TENSORFLOW_IMPORT_NOTICES):
        os.write(2, b"before the failure\n")
        raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before the failure\nafter\n"


def test_generate_names_every_folder_of_random_weights(home, monkeypatch):
    """Parts come from --weights and then the Keras cache folders: the RANDOM warning names each
    folder that holds random parts, once. The text encoder file here is a stand-in (an HDF5 file
    without its weights), so the run stops with one line when the text encoder loads it, before
    the diffusion model is built."""
    import h5py

    from conceptlib import weights as W

    def folder(name, random, files):
        path = home / name
        path.mkdir()
        if random:
            (path / W.RANDOM_MARKER).write_text("random")
        for file in files:
            h5py.File(path / file, "w").close()
        return path

    mine = folder("mine", True, ["kcv_encoder.h5"])
    cache_random = folder("cache-random", True, ["kcv_decoder.h5", "vae_encoder.h5"])
    cache_real = folder("cache-real", False, ["kcv_diffusion_model.h5"])
    monkeypatch.setattr(W, "keras_cache_dirs", lambda: [cache_random, cache_real])
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    result = CliRunner().invoke(main, ["generate", "a cat", "--weights", str(mine), "--offline", "--size", "64",
                                       "--seed", "1", "--out", str(home / "out")])
    warnings = [line for line in result.stderr.splitlines() if "RANDOM" in line]
    assert warnings == [f"Warning: sd-1 weights in {mine} and {cache_random} are RANDOM; images will be noise"]
    assert result.exit_code == 1, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: {mine / 'kcv_encoder.h5'}: could not load text_encoder") and "Traceback" not in result.output
    assert not (home / "out").exists()


def test_generated_pictures_never_replace_a_file(tmp_path):
    """Named -1, -2, ... when taken, and created exclusively: two runs finishing in the same
    second into one folder keep both pictures."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from conceptlib.cli.model_commands import _save_new

    taken = tmp_path / "20261128-101010-a-cat-7-0.png"
    taken.write_bytes(b"someone's file")
    picture = Image.new("RGB", (4, 4), (9, 9, 9))
    first = _save_new(picture, taken, PngInfo())
    second = _save_new(picture, taken, PngInfo())
    assert (first.name, second.name) == ("20261128-101010-a-cat-7-0-1.png", "20261128-101010-a-cat-7-0-2.png")
    assert taken.read_bytes() == b"someone's file"
    with Image.open(first) as image:
        assert image.getpixel((0, 0)) == (9, 9, 9)


def test_init_random_rewrites_a_damaged_manifest_of_an_earlier_run(home):
    """A leftover manifest that is JSON but not an object (an earlier run killed, a hand edit)."""
    from conceptlib.weights import MANIFEST, RANDOM_MARKER, write_random_weights

    folder = home / "w"
    folder.mkdir()
    (folder / RANDOM_MARKER).write_text("random")
    (folder / MANIFEST).write_text("[]")
    write_random_weights(folder, "sd-1", parts=["image_encoder"])
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["random"] is True and "vae_encoder.h5" in json.dumps(manifest["files"])
