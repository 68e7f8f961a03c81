"""keras-cv's Stable Diffusion modules, on the JAX backend imported without TensorFlow.

``import keras_cv`` imports TensorFlow even on the JAX backend, where nothing runs on it: its
backend config asks TensorFlow which Keras it uses, and its package ``__init__`` files import every
model and layer it has. On the GPU machine that is 7.7 s of TensorFlow and 6.2 s of keras-cv
before the jax trainer can build a model. The Stable Diffusion modules themselves need only Keras.

So ``stable_diffusion_module`` loads them, on the JAX backend and while keras_cv is not imported
yet, from keras-cv's own files under stand-ins for the parent packages (the package ``__init__``
files skipped, the backend config answering "Keras 3" without asking TensorFlow), then takes the
stand-ins out of ``sys.modules``. A later ``import keras_cv`` imports the whole package as usual
and reuses the modules already loaded (``_BindLoadedSubmodules`` attaches them to their real
packages), so ``keras_cv.models.StableDiffusion`` is still the class of the models built here.
Any other keras-cv version than the one this was checked on, any other backend, or any failure
takes the usual ``import keras_cv``.

While a module loads this way (milliseconds, under ``_LOCK``), another thread that imports
keras_cv itself, not through this module, would see the stand-ins: conceptlib's own code always
comes here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types
from pathlib import Path

PACKAGE = "keras_cv.src.models.stable_diffusion"
# The keras-cv versions whose package layout the stand-ins were written for.
CHECKED_VERSIONS = ("0.9.0",)
_LOCK = threading.Lock()
# The packages whose __init__ the stand-ins skip.
_STAND_INS = ("keras_cv", "keras_cv.src", "keras_cv.src.backend", "keras_cv.src.models", PACKAGE)


def stable_diffusion_module(name: str) -> types.ModuleType:
    """keras-cv's ``keras_cv.src.models.stable_diffusion.<name>`` module (``diffusion_model``,
    ``text_encoder``, ``stable_diffusion``, ...), with the backend already chosen."""
    from conceptlib.kerascv import keras_module

    full = f"{PACKAGE}.{name}"
    # One thread at a time, from the first import of keras (and TensorFlow) to the check for a
    # loaded module: the stand-ins are process-wide, and a module another thread is still loading
    # must not be returned half done (the jax trainer builds preview models in a background thread).
    with _LOCK:
        keras = keras_module()
        if full in sys.modules:
            return sys.modules[full]
        if keras.config.backend() == "jax" and "keras_cv" not in sys.modules and _version() in CHECKED_VERSIONS:
            before = set(sys.modules)
            try:
                return _import_without_tensorflow(full, keras)
            except Exception:  # the whole package then, as if this had not been tried
                for added in set(sys.modules) - before:
                    if added.startswith("keras_cv"):
                        del sys.modules[added]
        import keras_cv  # noqa: F401  (the whole package; it imports TensorFlow)

        return importlib.import_module(full)


def tensorflow_skipped() -> bool:
    """True when keras-cv's modules were loaded without TensorFlow in this process."""
    return "tensorflow" not in sys.modules and any(name.startswith(PACKAGE + ".") for name in sys.modules)


@functools.lru_cache(maxsize=None)
def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keras-cv")
    except PackageNotFoundError:
        return None


def _import_without_tensorflow(full: str, keras) -> types.ModuleType:
    spec = importlib.util.find_spec("keras_cv")  # finds the package without running its __init__
    root = Path(spec.origin).parent / "src"
    placed = []

    def stand_in(name, folder=None, **attributes):
        module = types.ModuleType(name)
        if folder is not None:
            module.__path__ = [str(folder)]
        module.__dict__.update(attributes)
        sys.modules[name] = module
        placed.append(name)
        return module

    if not any(isinstance(finder, _BindLoadedSubmodules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BindLoadedSubmodules())
    try:
        stand_in("keras_cv", root.parent)
        stand_in("keras_cv.src", root)
        config = stand_in("keras_cv.src.backend.config", keras_3=lambda: True, backend=keras.config.backend)
        # What keras-cv's backend package sets up on Keras 3, minus its TensorFlow ops.
        keras.backend.name_scope = keras.name_scope
        backend = stand_in("keras_cv.src.backend", root / "backend", keras=keras, config=config,
                           supports_ragged=lambda: False)
        stand_in("keras_cv.src.models", root / "models")
        stand_in(PACKAGE, root / "models" / "stable_diffusion")
        backend.ops = importlib.import_module("keras_cv.src.backend.ops")
        backend.random = importlib.import_module("keras_cv.src.backend.random")
        return importlib.import_module(full)
    finally:
        for name in placed:
            sys.modules.pop(name, None)



class _BindLoadedSubmodules:
    """A ``sys.meta_path`` finder for the packages the stand-ins replaced: when one of them is
    imported for real (a later ``import keras_cv``), the submodules already loaded become its
    attributes before its ``__init__`` runs, as Python binds the submodules it loads itself
    (``keras_cv.src.models.stable_diffusion.text_encoder`` then works as usual)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _STAND_INS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_init = spec.loader.exec_module

        def exec_module(module):
            prefix = name + "."
            for child, loaded in list(sys.modules.items()):
                if child.startswith(prefix) and "." not in child[len(prefix):]:
                    setattr(module, child[len(prefix):], loaded)
            run_init(module)

        spec.loader.exec_module = exec_module
        return spec
