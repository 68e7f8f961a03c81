"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

# The per-user locations conceptlib (and Keras) would otherwise use under the real home folder.
HOME_VARIABLES = ("XDG_DATA_HOME", "XDG_CACHE_HOME", "CONCEPTLIB_HOME", "CONCEPTLIB_JAX_CACHE", "KERAS_HOME")


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Point every HOME-dependent location at one session tmp folder, in ``os.environ`` so
    subprocesses (CLI runs, workers) inherit it: nothing a test forgets to redirect lands in the
    real ~/.local/share/conceptlib, ~/.cache/conceptlib or ~/.keras.

    - XDG_DATA_HOME / XDG_CACHE_HOME: platformdirs' user data and cache folders (the library's
      and the JAX cache's defaults), so a test that unsets the conceptlib variables to check a
      default still stays in tmp;
    - CONCEPTLIB_HOME / CONCEPTLIB_JAX_CACHE: the very folders those defaults give;
    - KERAS_HOME: Keras' keras.json and its download cache (``$KERAS_HOME/datasets``, where
      conceptlib also looks for weights and the CLIP vocabulary; the vocabulary is found in the
      installed open_clip package, which this does not change).

    Tests that check defaults set or unset these themselves with monkeypatch, which restores
    these values afterwards. HOME itself is left alone (tests that need another one set it).
    A process that imported keras before this ran (the pytest process, while collecting) keeps
    the Keras home it found then."""
    base = tmp_path_factory.mktemp("home")
    values = {
        "XDG_DATA_HOME": base / "data",
        "XDG_CACHE_HOME": base / "cache",
        "CONCEPTLIB_HOME": base / "data" / "conceptlib",
        "CONCEPTLIB_JAX_CACHE": base / "cache" / "conceptlib" / "jax",
        "KERAS_HOME": base / "keras",
    }
    saved = {name: os.environ.get(name) for name in HOME_VARIABLES}
    os.environ.update({name: str(path) for name, path in values.items()})
    yield base
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module", autouse=True)
def freed_memory_returned():
    """After each module (its fixtures torn down first), drop the trainers' kept models, collect,
    and hand freed heap back to the system. The suite runs in one process on a 23 GB machine:
    glibc keeps what Stable Diffusion's models freed in its arenas, fragmented, and the process
    grew module after module (19.6-20.5 GB during the weight-conversion tests at the end of the
    last full runs)."""
    yield
    import ctypes
    import gc

    for trainer in ("conceptlib_tensorflow", "conceptlib_jax.trainer"):
        if trainer in sys.modules:  # the models its last run built, kept for the next (GBs)
            sys.modules[trainer]._MODELS.clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
        pass


@pytest.fixture(scope="session")
def clip_tokenizer():
    """CLIP's real BPE tokenizer (conceptlib.clip_bpe: keras-cv's ids, no keras import) on the
    local vocabulary; never downloads: a missing vocabulary fails the tests that need it."""
    from conceptlib.clip_bpe import ClipTokenizer
    from conceptlib.kerascv.tokenizer import find_vocab_path

    return ClipTokenizer(find_vocab_path(download=False))


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """`conceptlib weights init-random` run once per test session as a real CLI process: every
    sd-1 part (~4 GB, ~25 s to write), shared by the end-to-end tests, which only read it. Yields
    (the folder, the finished process); the folder is deleted at the end."""
    folder = tmp_path_factory.mktemp("random-weights") / "weights"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("KERAS_BACKEND", None)
    cli = [sys.executable, "-c", "import sys; from conceptlib.cli import main; sys.exit(main())"]
    process = subprocess.run(cli + ["weights", "init-random", str(folder)], env=env, capture_output=True,
                             text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    yield folder, process
    shutil.rmtree(folder, ignore_errors=True)
