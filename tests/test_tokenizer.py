"""The CLIP vocabulary is found locally (env var, Keras cache, installed package) before any
download; make_tokenizer works offline; find_tokens matches like the applied tokenizer."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys

import pytest

from conceptlib.errors import VocabularyError
from conceptlib.kerascv import tokenizer as tok


@pytest.fixture()
def package_vocab():
    paths = [p for p in tok._package_vocab_paths() if p.is_file()]
    if not paths:
        pytest.skip("no installed package ships bpe_simple_vocab_16e6.txt.gz")
    return paths[0]


@pytest.fixture()
def isolated(monkeypatch, tmp_path):
    """An empty Keras home and no $CONCEPTLIB_CLIP_VOCAB."""
    monkeypatch.delenv(tok.ENV_VAR, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(tok, "keras_cache_dirs", lambda: [tmp_path / "keras-home" / "datasets"])
    return tmp_path


def test_finds_the_vocabulary_an_installed_package_ships(isolated, package_vocab):
    assert tok.find_vocab_path() == package_vocab


def test_keras_cache_comes_before_packages(isolated, package_vocab):
    cached = isolated / "keras-home" / "datasets" / tok.VOCAB_FILE
    cached.parent.mkdir(parents=True)
    shutil.copy(package_vocab, cached)
    assert tok.find_vocab_path() == cached


def test_env_var_comes_first(isolated, package_vocab, monkeypatch):
    mine = isolated / "my-vocab.txt.gz"
    shutil.copy(package_vocab, mine)
    monkeypatch.setenv(tok.ENV_VAR, str(mine))
    assert tok.find_vocab_path() == mine


def test_env_var_pointing_at_a_non_gzip_file_is_an_error(isolated, monkeypatch):
    bad = isolated / "vocab.txt"
    bad.write_text("not gzip")
    monkeypatch.setenv(tok.ENV_VAR, str(bad))
    with pytest.raises(VocabularyError, match=r"CONCEPTLIB_CLIP_VOCAB.*not a gzip file"):
        tok.find_vocab_path()


def test_nothing_found_names_every_option(isolated, monkeypatch):
    monkeypatch.setattr(tok, "_package_vocab_paths", lambda: [])
    with pytest.raises(VocabularyError) as info:
        tok.find_vocab_path()
    message = str(info.value)
    assert "\n" not in message
    for expected in ("CONCEPTLIB_CLIP_VOCAB", "Keras cache", str(isolated / "keras-home" / "datasets"), "open-clip-torch"):
        assert expected in message
    with pytest.raises(VocabularyError):
        tok.make_tokenizer(download=False)


def test_make_tokenizer_is_keras_cv_simple_tokenizer_offline(isolated, package_vocab, monkeypatch):
    import keras

    def no_network(*args, **kwargs):
        raise AssertionError("make_tokenizer tried to download")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    from keras_cv.models.stable_diffusion import SimpleTokenizer

    tokenizer = tok.make_tokenizer()
    assert isinstance(tokenizer, SimpleTokenizer)
    ids = tokenizer.encode("A photo of a CAT")
    assert ids[0] == tokenizer.start_of_text and ids[-1] == tokenizer.end_of_text
    assert tokenizer.decode(ids[1:-1]).split() == ["a", "photo", "of", "a", "cat"]
    # The vocabulary really is CLIP's: 49,408 entries, as the text encoder's table.
    assert len(tokenizer.vocab) == 49408


def test_a_corrupt_vocabulary_is_a_vocabulary_error(isolated, monkeypatch):
    bad = isolated / "vocab.txt.gz"
    bad.write_bytes(gzip.compress(b"")[:6])  # gzip magic, truncated stream
    monkeypatch.setenv(tok.ENV_VAR, str(bad))
    with pytest.raises(VocabularyError, match="not a readable CLIP vocabulary"):
        tok.make_tokenizer()


def test_find_tokens_matches_like_the_tokenizer():
    tokens = ["<cat>", "<cat>-style", "<dog>", "xyz"]
    assert tok.find_tokens("A <CAT>-style photo of a <cat> and <dog>", tokens) == ["<cat>-style", "<cat>", "<dog>"]
    assert tok.find_tokens("<dog>&lt;cat&gt;", tokens) == ["<dog>", "<cat>"]  # html unescaped, as keras-cv does
    assert tok.find_tokens("abcxyz", tokens) == []  # inside a word: the tokenizer would not match it
    assert tok.find_tokens("plain prompt", tokens) == []
    # A bare-word token (e.g. an AUTOMATIC1111 file name) only where its word ends, as A1111 and
    # ComfyUI match whole CLIP tokens: not at the start of a longer word.
    assert tok.find_tokens("a xyzzy", tokens) == []
    assert tok.find_tokens("a xyzzy, then xyz.", tokens) == ["xyz"]


def test_modules_import_no_keras_or_tensorflow():
    code = (
        "import sys, conceptlib.weights, conceptlib.kerascv.tokenizer, conceptlib.kerascv.models, "
        "conceptlib.kerascv.apply, conceptlib.cli.model_commands, conceptlib.cli\n"
        "heavy = [m for m in ('keras', 'tensorflow', 'jax', 'keras_cv') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
