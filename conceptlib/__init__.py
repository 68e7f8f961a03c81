"""conceptlib: textual-inversion concepts for Stable Diffusion on KerasCV.

Importing conceptlib never imports TensorFlow, JAX or Keras; ``apply`` and ``train`` import them
on first use.
"""

from conceptlib.concept import Concept
from conceptlib.errors import ConceptlibError
from conceptlib.library import ConceptLibrary
from conceptlib.train_api import train

__version__ = "0.1.0"

__all__ = ["Concept", "ConceptLibrary", "ConceptlibError", "applied", "apply", "train", "unload", "__version__"]


def apply(sd, concepts, *, library=None):
    """Apply concepts (library names, tokens, file paths or Concept objects) to a KerasCV
    StableDiffusion / StableDiffusionV2 in one step. Returns a handle with ``.unload()``;
    also usable as a context manager; ``conceptlib.unload(sd)`` unloads without it. See
    conceptlib.kerascv.apply."""
    from conceptlib.kerascv.apply import apply as _apply

    return _apply(sd, concepts, library=library)


def unload(sd, tokens=None):
    """Unload concepts from ``sd`` without their handle: all of them, or those with ``tokens``
    (one token or a list). Returns the tokens unloaded. See conceptlib.kerascv.apply."""
    from conceptlib.kerascv.apply import unload as _unload

    return _unload(sd, tokens)


def applied(sd):
    """The AppliedConcepts handles loaded into ``sd`` now, oldest first."""
    from conceptlib.kerascv.apply import applied as _applied

    return _applied(sd)
