"""The one package that touches keras-cv internals.

Nothing here imports keras at module import time: Keras fixes its backend at its first import,
so callers (the CLI) choose the backend first; ``keras_module()`` imports it on demand.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

DEFAULT_BACKEND = "tensorflow"


def set_default_backend(backend: str | None = None) -> str:
    """Set ``KERAS_BACKEND`` before keras is imported: an existing environment value wins, then
    ``backend``, then TensorFlow (the reference backend). Returns the backend in effect."""
    os.environ.setdefault("KERAS_BACKEND", backend or DEFAULT_BACKEND)
    quiet_tensorflow_logs(os.environ["KERAS_BACKEND"])
    return os.environ["KERAS_BACKEND"]


def quiet_tensorflow_logs(backend: str) -> None:
    """Before TensorFlow is imported: no INFO/WARNING lines from its C++ side. On the JAX backend
    keras-cv may import TensorFlow (``sd_modules`` avoids it where it can) but runs nothing on it,
    so its oneDNN notice is turned off with oneDNN itself; on the TensorFlow backend oneDNN stays
    on, as it is TensorFlow's fast CPU path (``import_tensorflow_quietly`` keeps its notice out of
    stderr). The user's settings win."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax":
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


# What TensorFlow's C++ side prints at its first import, before its log settings apply (so even
# at TF_CPP_MIN_LOG_LEVEL=2): an absl warning line and the oneDNN notice.
TENSORFLOW_IMPORT_NOTICES = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (if it is not yet) without the notices it prints at its import; every
    other line it writes is kept. TF_CPP_MIN_LOG_LEVEL=0 (all logs wanted) keeps them too."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0":
        return
    with native_stderr_without(TENSORFLOW_IMPORT_NOTICES):
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass  # keras' own import says what is missing


@contextlib.contextmanager
def native_stderr_without(notices):
    """Route file descriptor 2 (where C++ code writes, bypassing ``sys.stderr``) to a temporary
    file for the block, then write back every line that holds none of ``notices``."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured if not any(notice.encode() in line for notice in notices)]
            if kept:
                os.write(2, b"".join(kept))


JAX_CACHE_ENV = "CONCEPTLIB_JAX_CACHE"


def jax_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The folder of JAX's persistent compilation cache (and the jax trainer's step cache in it):
    ``path``, else ``$CONCEPTLIB_JAX_CACHE``, else conceptlib's user cache folder (e.g.
    ``~/.cache/conceptlib/jax``); None when it is "off". Imports no jax (``conceptlib cache``)."""
    path = os.fspath(path) if path else os.environ.get(JAX_CACHE_ENV)
    if path and path.lower() == "off":
        return None
    if not path:
        import platformdirs

        return platformdirs.user_cache_path("conceptlib") / "jax"
    # As CONCEPTLIB_HOME is: '~' expanded, and absolute (not another cache in every folder).
    return Path(path).expanduser().absolute()


def enable_jax_compilation_cache(path: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at ``jax_cache_dir(path)``, so the next process
    skips XLA compiles it already did (on a GPU the UNet's take tens of seconds). Returns the
    folder, or None when the variable is "off". Call it before the first compile; it imports jax."""
    import jax

    folder = jax_cache_dir(path)
    if folder is None:
        return None
    path = str(folder)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def ignore_one_pixel_attention_warning() -> None:
    """At 64 px the UNet's deepest attention sees one pixel, and Keras warns about a softmax over
    an axis of size 1 on every call: harmless (keras-cv's own numbers), but noise for users."""
    import warnings

    warnings.filterwarnings("ignore", message="You are using a softmax over axis")


def keras_module():
    """Import and return keras (after making sure a backend is chosen; on the TensorFlow
    backend TensorFlow is imported first, without its import notices)."""
    if set_default_backend() == "tensorflow":
        import_tensorflow_quietly()
    import keras

    return keras
