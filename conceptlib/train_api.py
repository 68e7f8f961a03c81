"""``conceptlib.train``: `conceptlib train` for Python callers (notebooks, scripts)."""

from __future__ import annotations

import dataclasses
import os
import sys

from conceptlib.errors import UsageError

# Set by train() itself, or from its own arguments.
_NOT_SETTINGS = {"images", "name", "token", "init", "learning_rate", "lr_steps", "trainer", "describe"}


# The parameters train() names itself (besides ``images``), for the unknown-setting message.
_NAMED = ("name", "token", "init", "learning_rate", "trainer", "library", "progress")


def train(images, *, name: str | None = None, token: str | None = None, init=None, learning_rate="5e-3",
          trainer: str = "auto", library=None, progress: bool = True, **settings):
    """Learn a new token from the pictures in ``images`` (a folder, or one image file) and add it
    to the library, as `conceptlib train` does; returns the new ``Concept`` (ready for
    ``conceptlib.apply``).

    ``name``/``token``: give one or both (``token`` defaults to ``"<name>"``, ``name`` to a slug of
    the token). ``init``: the words to start from (``"toy cat"`` or ``["toy", "cat"]``).
    ``learning_rate``: a rate, or AUTOMATIC1111's stepped rates (``"0.05:10, 0.005"``).
    ``trainer="auto"``: the trainer of the Keras backend this process already imported, else
    ``jax`` where JAX can use an NVIDIA GPU, else ``tensorflow``. ``library``: a
    ``ConceptLibrary`` or its folder (default: ``$CONCEPTLIB_HOME``). ``progress``: print the run folder, the
    stages and a progress line per step on stderr, as the CLI does. ``settings``: the other options of
    `conceptlib train` by their Python names (``steps=2000, resolution=512, batch_size=4,
    num_vectors=2, weights="DIR", preview_every=250, ...``: the fields of
    ``conceptlib.training.TrainingConfig``) and the description keys of `conceptlib describe`
    (``author=``, ``license=``, ``title=``, ...).

    Every check (images, name and token free, settings, weights) runs before any model is built;
    a bad value raises a ``ConceptlibError`` with a one-line message. Ctrl-C stops the run
    (``KeyboardInterrupt``) after printing how to resume it (``conceptlib train --resume RUN``).
    """
    from conceptlib.concept import slug_from_token
    from conceptlib.files import DESCRIPTIVE_KEYS
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, training_config
    from conceptlib.training import train as run_training

    if name is None and token is None:
        raise UsageError("give name= and/or token=, e.g. conceptlib.train('photos/', token='<cat-doll>', init='cat')")
    token = token if token is not None else f"<{name}>"
    name = name if name is not None else slug_from_token(token)
    describe = {DESCRIPTIVE_KEYS[key]: settings.pop(key) for key in list(settings) if key in DESCRIPTIVE_KEYS}
    known = {field.name for field in dataclasses.fields(TrainingConfig)} - _NOT_SETTINGS
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for conceptlib.train; "
            f"it takes {', '.join(sorted(known | set(DESCRIPTIVE_KEYS) | set(_NAMED)))}"
        )
    config = training_config(
        images, name=name, token=token, init=init, learning_rate=learning_rate, trainer=_trainer(trainer),
        describe={key: value for key, value in describe.items() if value}, **settings,
    )
    if library is None or isinstance(library, (str, os.PathLike)):
        library = ConceptLibrary(library)
    # As the CLI: progress=False is -q (no progress, no run-folder line), warnings and notes stay.
    header, _job = run_training(config, library=library, progress=progress, announce=True)
    return library.get(header.name)


def _trainer(trainer: str) -> str:
    """``auto``: a process that already imported keras keeps its backend, so its trainer is the
    one that can run here (the CLI decides before keras is imported)."""
    if trainer != "auto" or "keras" not in sys.modules:
        return trainer
    import keras

    return {"tensorflow": "tensorflow", "jax": "jax"}.get(keras.backend.backend(), trainer)
