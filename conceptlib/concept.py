"""The Concept value object: a named token and its learned embedding vectors."""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conceptlib.errors import ConceptError

if TYPE_CHECKING:
    import numpy as np

FORMAT = "conceptlib/1"

# Vector width of each base model's text encoder.
DIMS = {"sd-1": 768, "sd-2": 1024}
BASE_MODEL_BY_DIM = {dim: base for base, dim in DIMS.items()}
# The text encoder's 77 positions less the start and end tokens: the most a prompt can hold.
MAX_VECTORS = 75

# A name is a file-system-safe slug: it becomes "<name>.safetensors" inside the library.
_NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]|\.(?!\.)){0,63}")
# A token is what prompts contain. KerasCV's tokenizer lowercases prompts, so only lowercase
# tokens can ever match; whitespace would split the token into several words.
_TOKEN_RE = re.compile(r"[^\sA-Z]{1,64}")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid library name (a lowercase slug), else raise ConceptError."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name.endswith("."):
        example = _ascii_slug(name) if isinstance(name, str) else ""
        example = example if example not in ("", name) else "cat-doll"
        too_long = f" ({len(name)} here)" if isinstance(name, str) and len(name) > 64 else ""
        looks_like_a_token = (f"; a token? give it with --token {name!r}" if isinstance(name, str)
                              and name.startswith("<") and name.endswith(">") else "")
        raise ConceptError(
            f"invalid concept name {name!r}: use 1-64 lowercase letters, digits, '-', '_' or '.'{too_long} "
            f"(no '/', '..' or leading '.'), e.g. {example!r}{looks_like_a_token}"
        )
    return name


def validate_token(token: str) -> str:
    """Return ``token`` if prompts can contain it, else raise ConceptError naming a token to use.

    KerasCV's tokenizer HTML-unescapes a prompt (twice), collapses whitespace and lowercases it
    before it looks for tokens, so a token with capitals, whitespace or an HTML entity (``&amp;``,
    ``&lt;``, ``&#60;``) never matches what users type; nor does one not in Unicode NFC form (the
    composed characters keyboards type: ``é`` is one character, not ``e`` + a combining accent).
    """
    if not isinstance(token, str) or not token:
        raise ConceptError(f"invalid token {token!r}: a token must be a non-empty string like '<cat-doll>'")
    if token != token.lower():
        raise ConceptError(
            f"invalid token {token!r}: KerasCV lowercases prompts, so a token with capitals never "
            f"matches; use {suggested_token(token)!r}"
        )
    if not is_utf8(token):
        raise ConceptError(
            f"invalid token {ascii(token)}: it is not UTF-8 text (bytes from another encoding?), and concept "
            "files and prompts hold UTF-8; type it again in a UTF-8 terminal, e.g. '<cat-doll>'"
        )
    if not _TOKEN_RE.fullmatch(token):
        raise ConceptError(
            f"invalid token {token!r}: use 1-64 characters without whitespace, e.g. '<cat-doll>'"
        )
    control = next((c for c in token if _is_control(c)), None)
    if control is not None:
        raise ConceptError(
            f"invalid token {token!r}: it holds the control character U+{ord(control):04X}, which no prompt can "
            f"type (and which would drive the terminal it is shown in); use e.g. {suggested_token(token)!r}"
        )
    composed = unicodedata.normalize("NFC", token)
    if composed != token:
        raise ConceptError(
            f"invalid token {token!r} ({ascii(token)}): it is not in Unicode NFC form, so the same "
            f"text typed on a keyboard would not match it; use {composed!r} ({ascii(composed)})"
        )
    if html.unescape(token) != token:
        raise ConceptError(
            f"invalid token {token!r}: it contains an HTML entity, and KerasCV unescapes HTML in "
            f"prompts, so {token!r} typed in a prompt becomes {_unescaped(token)!r} and never matches; "
            f"use {suggested_token(token)!r}"
        )
    return token


def is_utf8(text: str) -> bool:
    """False for text that UTF-8 cannot encode: the lone surrogates Python makes of command-line
    arguments or file contents that are not UTF-8. No concept file can store such text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unescaped(text: str) -> str:
    # What keras-cv's SimpleTokenizer (basic_clean) does to a prompt first.
    return html.unescape(html.unescape(text))


def suggested_token(text: str) -> str:
    """A token prompts can contain, close to ``text``: NFC, lowercase, whitespace as '-', HTML
    entities replaced by what they stand for (or, where that is no valid token, their '&' by '-')."""
    fixed = _clean_token_text(text)
    if html.unescape(fixed) != fixed:
        unescaped = _clean_token_text(_unescaped(fixed))
        fixed = unescaped if unescaped and html.unescape(unescaped) == unescaped else fixed.replace("&", "-")
    return fixed[:64] or "<concept>"


def _clean_token_text(text: str) -> str:
    text = "".join(c for c in text if not _is_control(c))
    return re.sub(r"\s+", "-", unicodedata.normalize("NFC", text.strip().lower()))


def _is_control(character: str) -> bool:
    """A control character (terminal escapes among them) or a bidirectional override."""
    return (unicodedata.category(character) == "Cc" or "\u202a" <= character <= "\u202e"
            or "\u2066" <= character <= "\u2069")


def slug_from_token(token: str) -> str:
    """A default library name for a token (or a file or folder name): '<Cat Doll>' -> 'cat-doll';
    accents dropped ('<Ärger-ß>' -> 'arger-ss'), other non-ASCII characters left out; a name from
    a short hash of ``token`` when no ASCII letter or digit is left ('<日本>' -> 'concept-1a2b3c4d'),
    so different tokens never all get the same name."""
    import hashlib

    return _ascii_slug(token) or "concept-" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _ascii_slug(text: str) -> str:
    """``text`` as a library name of ASCII letters, digits and '-', '_', '.'; '' if none is left."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", text.casefold()).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9._-]+", "-", folded).strip("-._")
    slug = re.sub(r"\.{2,}", ".", slug)[:64].strip("-._")
    return slug if re.search(r"[a-z0-9]", slug) else ""


def validate_vectors(vectors, *, source: str = "concept") -> "np.ndarray":
    """Return ``vectors`` as a C-contiguous float32 array of shape (n, 768|1024), or raise.

    A 1-D vector of width 768/1024 is accepted as one vector (diffusers writes those).
    """
    import numpy as np

    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ConceptError(f"{source}: vectors are not numeric ({exc}); expected a (n, 768|1024) array") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ConceptError(
            f"{source}: vectors have rank {array.ndim} (shape {tuple(array.shape)}); "
            "expected a (num_vectors, dim) array"
        )
    num, dim = array.shape
    if dim not in BASE_MODEL_BY_DIM:
        made_for = ("this is SDXL's second text encoder (CLIP-G), and KerasCV has no SDXL" if dim == 1280 else
                    "this file was not made for a Stable Diffusion 1.x/2.x text encoder")
        raise ConceptError(f"{source}: vector width {dim} is not 768 (SD 1.x) or 1024 (SD 2.x); {made_for}")
    if num < 1 or num > MAX_VECTORS:
        raise ConceptError(f"{source}: {num} vectors; a concept needs 1 to {MAX_VECTORS} vectors")
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=1).argmax())
        raise ConceptError(
            f"{source}: vector {bad} contains NaN or Inf; the training that produced it diverged, "
            "retrain with a lower learning rate"
        )
    return np.ascontiguousarray(array)


@dataclass
class Concept:
    """A learned concept: ``token`` stands for ``vectors`` (num_vectors, dim) float32.

    ``metadata`` holds the file's string metadata as read or to be written, including keys
    conceptlib does not know (they are preserved on rewrite).
    """

    name: str
    token: str
    vectors: "np.ndarray"
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_name(self.name)
        validate_token(self.token)
        self.vectors = validate_vectors(self.vectors, source=f"concept {self.name!r}")
        self.metadata = {str(k): str(v) for k, v in (self.metadata or {}).items()}

    @property
    def num_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def base_model(self) -> str:
        """'sd-1' for 768-wide vectors, 'sd-2' for 1024-wide."""
        return BASE_MODEL_BY_DIM[self.dim]

    def renamed(self, name: str | None = None, token: str | None = None) -> "Concept":
        """A copy with a new name and/or token (metadata kept, identity keys updated on write)."""
        return Concept(
            name=name or self.name,
            token=token or self.token,
            vectors=self.vectors.copy(),
            metadata=dict(self.metadata),
        )
