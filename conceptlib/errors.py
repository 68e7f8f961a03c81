"""The ConceptlibError hierarchy.

Every error conceptlib raises on purpose is a ConceptlibError whose message is one line that says
what happened, which value, and how to fix it. The CLI prints that line and exits with
``exit_code``; anything else is a bug.
"""


class ConceptlibError(Exception):
    """Base class: a user-facing failure with a one-line, actionable message."""

    exit_code = 1


class UsageError(ConceptlibError):
    """The command line itself is wrong (exit code 2)."""

    exit_code = 2


class ConceptError(ConceptlibError):
    """A concept's name, token or vectors are invalid."""


class ConceptFileError(ConceptlibError):
    """A file could not be read or written as a concept (missing, truncated, corrupt, wrong shape)."""


class UnsafePickleError(ConceptFileError):
    """A pickle asked for something beyond a plain tensor dictionary; nothing was executed."""


class UnsupportedFormatError(ConceptFileError):
    """A file is in a format conceptlib cannot use (e.g. SDXL two-encoder embeddings)."""


class LibraryError(ConceptlibError):
    """The concept library refused an operation (nothing was changed)."""


class NotFoundError(LibraryError):
    """No concept with that name or token."""


class CollisionError(LibraryError):
    """A name or token is already taken."""


class ApplyError(ConceptlibError):
    """Concepts could not be applied to a Stable Diffusion model (nothing was changed)."""


class PromptTooLongError(ConceptlibError, ValueError):
    """A prompt exceeds the text encoder's 77 tokens after multi-vector expansion (a ValueError,
    as keras-cv's own too-long error is, so code that catches that keeps working)."""


class VocabularyError(ConceptlibError):
    """The CLIP BPE vocabulary could not be found locally or downloaded."""


class WeightsError(ConceptlibError):
    """Stable Diffusion weights are missing or corrupt."""


class PluginError(ConceptlibError):
    """A trainer or template-pack plugin is unknown or failed to load."""


class TrainingError(ConceptlibError):
    """Training could not start or continue (bad images, settings, run directory)."""
