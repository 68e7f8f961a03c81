"""The CLIP BPE vocabulary, found locally before any download, and an offline SimpleTokenizer.

keras-cv's ``SimpleTokenizer()`` calls ``keras.utils.get_file`` for the vocabulary, which needs
the network unless the file already sits in the Keras cache. We look in that cache ourselves, at
``$CONCEPTLIB_CLIP_VOCAB``, and in installed packages that ship the same file (open_clip), and
pass the path to ``SimpleTokenizer(bpe_path=...)``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from conceptlib.errors import VocabularyError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# keras-cv's own source and hash (keras_cv/src/models/stable_diffusion/clip_tokenizer.py).
VOCAB_URL = "https://github.com/openai/CLIP/blob/main/clip/bpe_simple_vocab_16e6.txt.gz?raw=true"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
ENV_VAR = "CONCEPTLIB_CLIP_VOCAB"
# Installed packages known to ship the identical vocabulary next to their modules.
VOCAB_PACKAGES = ("open_clip", "clip")


def keras_cache_dirs() -> list[Path]:
    """Where ``keras.utils.get_file`` keeps downloads ("datasets" under the Keras home), computed
    without importing keras: ``$KERAS_HOME`` or ``~/.keras``, and ``/tmp/.keras`` which Keras uses
    when the home folder is not writable."""
    if "KERAS_HOME" in os.environ:
        homes = [Path(os.environ["KERAS_HOME"]).expanduser()]
    else:
        homes = [Path("~").expanduser() / ".keras"]
    homes.append(Path("/tmp/.keras"))
    seen: list[Path] = []
    for home in homes:
        datasets = home / "datasets"
        if datasets not in seen:
            seen.append(datasets)
    return seen


def _package_vocab_paths() -> list[Path]:
    paths = []
    for package in VOCAB_PACKAGES:
        try:
            # find_spec does not execute the package (open_clip imports torchvision on import).
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None:
            continue
        for location in spec.submodule_search_locations or []:
            paths.append(Path(location) / VOCAB_FILE)
    return paths


def candidate_vocab_paths() -> list[tuple[str, Path]]:
    """Every place looked at, in order, as (description, path)."""
    candidates: list[tuple[str, Path]] = []
    if os.environ.get(ENV_VAR):
        candidates.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR]).expanduser()))
    for directory in keras_cache_dirs():
        candidates.append(("Keras cache", directory / VOCAB_FILE))
    for path in _package_vocab_paths():
        candidates.append(("installed package", path))
    return candidates


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def find_vocab_path(*, download: bool = False) -> Path:
    """Return the path of the CLIP BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``).

    Looks at ``$CONCEPTLIB_CLIP_VOCAB``, the Keras cache, then installed packages that ship the
    file. With ``download=True`` it falls back to keras-cv's own URL and hash. Raises
    VocabularyError naming every place it looked.
    """
    candidates = candidate_vocab_paths()
    env_value = os.environ.get(ENV_VAR)
    if env_value:
        path = candidates[0][1]
        if not path.is_file() or not _is_gzip(path):
            raise VocabularyError(
                f"${ENV_VAR} points to {path}, which is not a gzip file; set it to the path of "
                f"{VOCAB_FILE} or unset it"
            )
        return path
    for _, path in candidates:
        if path.is_file() and _is_gzip(path):
            return path
    if download:
        return _download()
    looked = "; ".join(f"{label}: {path}" for label, path in candidates)
    raise VocabularyError(
        f"the CLIP vocabulary {VOCAB_FILE} was not found (looked in {looked}); set ${ENV_VAR} to "
        f"its path, copy it into the Keras cache ({keras_cache_dirs()[0]}), or install a package "
        "that ships it (pip install open-clip-torch)"
    )


def _download() -> Path:
    from conceptlib.kerascv import keras_module

    keras = keras_module()
    try:
        path = keras.utils.get_file(VOCAB_FILE, VOCAB_URL, file_hash=VOCAB_SHA256)
    except Exception as exc:  # get_file raises bare Exception subclasses for network failures
        raise VocabularyError(
            f"could not download the CLIP vocabulary from {VOCAB_URL} ({exc}); set ${ENV_VAR} to a "
            f"local copy of {VOCAB_FILE} or install open-clip-torch"
        ) from None
    return Path(path)


def vocab_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_vocab(tokenizer_cls, path: Path):
    """``tokenizer_cls(path)``, with an unreadable vocabulary as one-line VocabularyError."""
    try:
        return tokenizer_cls(str(path))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise VocabularyError(
            f"{path}: not a readable CLIP vocabulary ({exc}); replace it with a fresh copy of "
            f"{VOCAB_FILE} or set ${ENV_VAR}"
        ) from None


def make_tokenizer(*, download: bool = True):
    """A keras-cv ``SimpleTokenizer`` built from the locally found vocabulary (no network when
    the vocabulary is found locally; a download with keras-cv's URL and hash otherwise)."""
    path = find_vocab_path(download=download)
    from conceptlib.kerascv.sd_modules import stable_diffusion_module

    return _read_vocab(stable_diffusion_module("clip_tokenizer").SimpleTokenizer, path)


def make_clip_tokenizer(*, download: bool = True):
    """A ``conceptlib.clip_bpe.ClipTokenizer`` (same ids as keras-cv's ``SimpleTokenizer``, but
    pure Python: no keras-cv or TensorFlow import) from the same vocabulary as
    ``make_tokenizer``. Only a download, when the vocabulary is not found locally, imports keras."""
    from conceptlib.clip_bpe import ClipTokenizer

    return _read_vocab(ClipTokenizer, find_vocab_path(download=download))


def added_tokens_pattern(tokens) -> str:
    """Regex alternatives for tokens added to the tokenizer, tried before CLIP's own pattern.

    Longest first: alternation takes the first alternative that matches, so '<cat>' must not
    shadow '<cat>-style'. A token ending in a letter or digit matches only where a word ends, as
    other tools match whole CLIP tokens: 'mydoll' is not found in 'mydollhouse'.
    """
    import regex as re

    def alternative(token: str) -> str:
        return re.escape(token) + (r"(?![\p{L}\p{N}])" if token[-1].isalnum() else "")

    return "|".join(alternative(token) for token in sorted(tokens, key=len, reverse=True))


# CLIP's run of punctuation; in an applied tokenizer it must stop where an added token starts.
_PUNCTUATION_RUN = r"[^\s\p{L}\p{N}]+"


def applied_pattern(tokens, concept_tokens=None) -> str:
    """The split pattern of a tokenizer with ``tokens`` added: the tokens (longest first), then
    CLIP's own pattern, whose punctuation run stops before a concept token so that '(<cat-doll>)'
    or 'photo,<cat-doll>' finds the token as '<cat-doll>' does (the run would otherwise swallow its
    '<'). ``concept_tokens`` (default: ``tokens``) are the tokens that stop the run; CLIP's own
    '<|startoftext|>'/'<|endoftext|>' are left out so plain prompts split exactly as in keras-cv."""
    from conceptlib.clip_bpe import PATTERN

    added = added_tokens_pattern(tokens)
    stops = added_tokens_pattern(tokens if concept_tokens is None else concept_tokens)
    clip = PATTERN
    if stops:
        assert _PUNCTUATION_RUN in PATTERN, "CLIP's pattern changed; update _PUNCTUATION_RUN"
        clip = PATTERN.replace(_PUNCTUATION_RUN, r"(?:(?!" + stops + r")[^\s\p{L}\p{N}])+")
    return added + "|" + clip if added else clip


def find_tokens(text: str, tokens) -> list[str]:
    """The members of ``tokens`` that keras-cv's tokenizer would match in ``text`` if they were
    added to it, in order of first appearance (same cleaning, lowercasing and longest-first
    matching as the applied tokenizer). Needs no vocabulary and no TensorFlow."""
    import regex as re

    from conceptlib.clip_bpe import clean

    tokens = {token for token in tokens if token}
    if not text or not tokens:
        return []
    cleaned = clean(text)
    pattern = re.compile(applied_pattern(tokens), re.IGNORECASE)
    found: list[str] = []
    for piece in pattern.findall(cleaned):
        if piece in tokens and piece not in found:
            found.append(piece)
    return found
