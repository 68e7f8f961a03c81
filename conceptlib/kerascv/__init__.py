"""The one package that touches keras-cv internals.

Nothing here imports keras at module import time: Keras fixes its backend at its first import,
so callers (the CLI) choose the backend first; ``keras_module()`` imports it on demand.
"""

from __future__ import annotations

import os

DEFAULT_BACKEND = "tensorflow"


def set_default_backend(backend: str | None = None) -> str:
    """Set ``KERAS_BACKEND`` before keras is imported: an existing environment value wins, then
    ``backend``, then TensorFlow (the reference backend). Returns the backend in effect."""
    os.environ.setdefault("KERAS_BACKEND", backend or DEFAULT_BACKEND)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return os.environ["KERAS_BACKEND"]


def ignore_one_pixel_attention_warning() -> None:
    """At 64 px the UNet's deepest attention sees one pixel, and Keras warns about a softmax over
    an axis of size 1 on every call: harmless (keras-cv's own numbers), but noise for users."""
    import warnings

    warnings.filterwarnings("ignore", message="You are using a softmax over axis")


def keras_module():
    """Import and return keras (after making sure a backend is chosen)."""
    set_default_backend()
    import keras

    return keras
