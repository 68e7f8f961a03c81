"""conceptlib's fast trainer: textual inversion on the Keras 3 JAX backend.

Importing this module is cheap; JAX, Keras and keras-cv are imported inside ``JaxTrainer.run``,
after the CLI has set ``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from conceptlib_jax.trainer import JaxTrainer  # noqa: E402

__all__ = ["JaxTrainer", "__version__"]
