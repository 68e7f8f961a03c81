"""Read and write concept files (contract 1): one float32 tensor keyed by the token, plus metadata.

Header reads parse the safetensors header directly (8-byte length + JSON) so that listing and
showing never load tensors, numpy or TensorFlow.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import math
import os
import re
import stat
import struct
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from conceptlib.concept import DIMS, FORMAT, Concept, BASE_MODEL_BY_DIM
from conceptlib.errors import ConceptError, ConceptFileError

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

MODELSPEC_ARCHITECTURE = {
    "sd-1": "stable-diffusion-v1/textual-inversion",
    "sd-2": "stable-diffusion-v2-512/textual-inversion",
}
# Each base model's family in ModelSpec: an imported file's own architecture of the same family
# (e.g. kohya's stable-diffusion-v2-768-v, the same text encoder) is kept with its resolution and
# prediction type; one of another family is replaced, since the vectors' width decides.
_MODELSPEC_FAMILY = {"sd-1": "stable-diffusion-v1", "sd-2": "stable-diffusion-v2"}
# The ModelSpec keys a user describes a concept with (`conceptlib describe`), by option name.
DESCRIPTIVE_KEYS = {
    "title": "modelspec.title",
    "description": "modelspec.description",
    "author": "modelspec.author",
    "license": "modelspec.license",
    "usage_hint": "modelspec.usage_hint",
    "category": "modelspec.category",
    "tags": "modelspec.tags",
}
# Those `list --json` carries (and `list PATTERN` searches) when a concept has them.
LISTED_DESCRIPTIONS = ("title", "description", "author", "license", "category", "tags")
# A description may be long (markdown, as the ModelSpec suggests); every other value is one line.
DESCRIPTION_LIMIT = 16384
LINE_LIMIT = 512
# C0/C1 control characters (Unicode's Cc) but tab, newline and carriage return: terminal escapes
# and the like, which neither `describe` nor an imported file may put into a description.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def is_iso_date(text: str) -> bool:
    try:
        _dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def cleaned_metadata(metadata: dict) -> dict:
    """``metadata`` held to what conceptlib itself writes, for what came from someone else's file
    (the library stores it so, exports share it so): the description keys (``DESCRIPTIVE_KEYS``)
    without control characters (they would reach everyone the concept is shared with, in its
    model card and embedding image), one-line keys on one line, each cut to `describe`'s limit
    (marked with an ellipsis); a ``created_at`` that is no date left out (the library dates the
    concept on arrival instead)."""
    cleaned = dict(metadata)
    if "created_at" in cleaned and not is_iso_date(cleaned["created_at"]):
        del cleaned["created_at"]
    for key in DESCRIPTIVE_KEYS.values():
        value = cleaned.get(key)
        if not isinstance(value, str):
            continue
        value = CONTROL_CHARACTERS.sub("", value)
        limit = DESCRIPTION_LIMIT
        if key != DESCRIPTIVE_KEYS["description"]:
            value, limit = " ".join(value.split()), LINE_LIMIT
        cleaned[key] = value if len(value) <= limit else value[: limit - 1] + "\u2026"
    return cleaned


class WriteError(ConceptFileError, OSError):
    """A file could not be written: ``cannot write PATH: reason; how to fix``.

    Also an OSError, so callers that already handled the OSError of a failed write still do.
    """

    def __init__(self, path: str | os.PathLike, reason: str, fix: str):
        super().__init__(f"cannot write {path}: {reason}; {fix}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    # Byte range of the tensor's data, counted from the end of the header (validated).
    data_offsets: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class FileHeader:
    """What a safetensors header says, without the tensor data."""

    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]
    # File offset where the tensor data starts (8-byte length + header).
    data_start: int = 0


@dataclass(frozen=True)
class ConceptHeader:
    """A concept file's identity and metadata, read from its header alone."""

    path: Path
    name: str
    token: str
    num_vectors: int
    dim: int
    metadata: dict[str, str]

    @property
    def base_model(self) -> str:
        return BASE_MODEL_BY_DIM.get(self.dim, "unknown")

    def summary(self) -> dict:
        """The fields `conceptlib list --json` prints."""
        return summary_fields(self.name, self.token, self.num_vectors, self.dim, self.metadata)


def summary_fields(name: str, token: str, num_vectors: int, dim: int, metadata: dict) -> dict:
    """What `conceptlib list --json` prints for a concept (its descriptive keys when it has them)."""
    return {
        "name": name,
        "token": token,
        "num_vectors": num_vectors,
        "dim": dim,
        "base_model": BASE_MODEL_BY_DIM.get(dim, "unknown"),
        "trainer": metadata.get("trainer", ""),
        "created_at": metadata.get("created_at", ""),
        **{option: metadata[DESCRIPTIVE_KEYS[option]] for option in LISTED_DESCRIPTIONS
           if DESCRIPTIVE_KEYS[option] in metadata},
    }


def read_file_header(path: str | os.PathLike) -> FileHeader:
    """Parse a safetensors file's header; raise ConceptFileError if it is not one."""
    path = Path(path)
    with _opened(path) as handle:
        return _file_header_from(handle, path)


@contextlib.contextmanager
def _opened(path: Path):
    """``open(path, "rb")``, a file that cannot be opened a ConceptFileError saying why."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ConceptFileError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ConceptFileError(f"{path}: is a folder, expected a .safetensors file") from None
    except PermissionError:
        raise ConceptFileError(f"{path}: permission denied; make the file readable") from None
    with handle:
        yield handle


def _file_header_from(handle, path: Path) -> FileHeader:
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ConceptFileError(f"{path}: file is empty or truncated ({len(prefix)} bytes); re-download or re-export it")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise ConceptFileError(f"{path}: not a safetensors file (header length {length} is implausible)")
    raw = handle.read(length)
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if len(raw) < length:
        raise ConceptFileError(f"{path}: header truncated ({len(raw)} of {length} bytes); the file is incomplete, re-download or re-export it")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConceptFileError(f"{path}: not a safetensors file (header is not valid JSON: {exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConceptFileError(f"{path}: corrupt safetensors metadata (values must be strings)")
    data_size = size - 8 - length
    tensors = tuple(_tensor_info(path, key, info, data_size) for key, info in header.items())
    return FileHeader(path=path, tensors=tensors, metadata=dict(metadata), data_start=8 + length)


def _tensor_info(path: Path, key: str, info, data_size: int) -> TensorInfo:
    """One header entry, validated: a dtype string, a shape of non-negative integers, and
    data_offsets [start, end] with 0 <= start <= end inside the file."""
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except (KeyError, TypeError):
        raise ConceptFileError(f"{path}: corrupt safetensors entry for tensor {key!r} (missing dtype, shape or data_offsets); "
                               "re-download or re-export it") from None
    if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise ConceptFileError(f"{path}: corrupt safetensors entry for tensor {key!r} (bad dtype or shape); "
                               "re-download or re-export it")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ConceptFileError(f"{path}: corrupt safetensors entry for tensor {key!r} (bad data_offsets {offsets!r}); "
                               "re-download or re-export it")
    if offsets[1] > data_size:
        raise ConceptFileError(
            f"{path}: file truncated (tensor {key!r} ends at byte {offsets[1]} of the data, the file holds "
            f"{max(data_size, 0)}); re-download or re-export it"
        )
    return TensorInfo(key=key, dtype=dtype, shape=tuple(shape), data_offsets=(offsets[0], offsets[1]))


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _concept_header_from(file_header: FileHeader) -> ConceptHeader:
    path = file_header.path
    if len(file_header.tensors) != 1:
        keys = ", ".join(t.key for t in file_header.tensors) or "none"
        raise ConceptFileError(f"{path}: a concept file holds exactly one tensor, this one holds {len(file_header.tensors)} ({keys})")
    tensor = file_header.tensors[0]
    if len(tensor.shape) != 2 or tensor.shape[1] not in DIMS.values():
        raise ConceptFileError(f"{path}: tensor {tensor.key!r} has shape {list(tensor.shape)}; expected [num_vectors, 768|1024]")
    if tensor.dtype != "F32":
        raise ConceptFileError(f"{path}: tensor {tensor.key!r} is {tensor.dtype}; concept files store F32")
    metadata = file_header.metadata
    name = metadata.get("name") or path.stem
    return ConceptHeader(
        path=path,
        name=name,
        token=tensor.key,
        num_vectors=tensor.shape[0],
        dim=tensor.shape[1],
        metadata=metadata,
    )


def read_header(path: str | os.PathLike) -> ConceptHeader:
    """Read a concept file's header (identity + metadata) without loading its vectors."""
    return _concept_header_from(read_file_header(path))


class NotARegularFile(ValueError):
    """``read_small_file``: the path is a pipe, device or folder (never read)."""


class FileTooLarge(ValueError):
    """``read_small_file``: the file holds more than the limit (read no further)."""


def read_small_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the small regular file ``path`` (at most ``limit``), from a stranger's folder:
    opened without waiting, so a FIFO cannot hang the command. NotARegularFile or FileTooLarge
    when it is not such a file; OSError as ``open`` raises it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile("not a regular file (a pipe, device or folder)")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(f"more than {limit} bytes")
    return data


def vector_norms(path: str | os.PathLike) -> list[float]:
    """The L2 norm of each vector of a concept file, read without numpy (a few KB); a vector
    holding NaN or Inf gives a non-finite norm (see ``non_finite_vectors``)."""
    from array import array

    path = Path(path)
    with _opened(path) as handle:  # one open file: a concurrent rewrite cannot mix two versions
        file_header = _file_header_from(handle, path)
        header = _concept_header_from(file_header)
        start, end = file_header.tensors[0].data_offsets
        expected = header.num_vectors * header.dim * 4
        if end - start != expected:
            raise ConceptFileError(
                f"{header.path}: corrupt safetensors entry for tensor {header.token!r} ({end - start} data bytes for "
                f"shape [{header.num_vectors}, {header.dim}], expected {expected}); re-download or re-export it"
            )
        values = array("f")
        handle.seek(file_header.data_start + start)
        values.frombytes(handle.read(expected))
    if sys.byteorder != "little":
        values.byteswap()
    dim = header.dim
    return [_norm(values[i * dim:(i + 1) * dim]) for i in range(header.num_vectors)]


def _norm(values) -> float:
    if not all(math.isfinite(v) for v in values):
        return math.nan
    return round(math.sqrt(math.fsum(v * v for v in values)), 6)


def non_finite_vectors(norms: list[float]) -> list[int]:
    """Indices of the vectors whose norm is NaN or Inf (they hold NaN or Inf values)."""
    return [i for i, norm in enumerate(norms) if not math.isfinite(norm)]


def read_concept(path: str | os.PathLike, token: str | None = None) -> Concept:
    """Load a concept file written by conceptlib (or any single-tensor concept safetensors).
    ``token`` replaces the file's token (so a file whose token is refused can get a new one)."""
    header = read_header(path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(header.path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConceptFileError(f"{header.path}: corrupt safetensors file ({exc}); re-download or re-export it") from None
    try:
        return Concept(
            name=_name_or_stem(header),
            token=token or header.token,
            vectors=tensors[header.token],
            metadata=header.metadata,
        )
    except ConceptError as exc:
        raise ConceptFileError(f"{header.path}: {exc}") from None


def _name_or_stem(header: ConceptHeader) -> str:
    from conceptlib.concept import slug_from_token, validate_name

    try:
        return validate_name(header.name)
    except ConceptError:
        return slug_from_token(header.path.stem)


def concept_metadata(concept: Concept) -> dict[str, str]:
    """The metadata written for ``concept``: its own keys (unknown ones kept) with the identity
    and ModelSpec keys made consistent with its name, token and vectors."""
    metadata = dict(concept.metadata)
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    metadata.setdefault("created_at", now)
    architecture = metadata.get("modelspec.architecture", "")
    family = _MODELSPEC_FAMILY[concept.base_model]
    if not (architecture.startswith((family + "/", family + "-")) and architecture.endswith("/textual-inversion")):
        if architecture:  # it named another model, and so do these
            metadata.pop("modelspec.resolution", None)
            metadata.pop("modelspec.prediction_type", None)
        architecture = MODELSPEC_ARCHITECTURE[concept.base_model]
    metadata.update(
        {
            "format": FORMAT,
            "name": concept.name,
            "token": concept.token,
            "num_vectors": str(concept.num_vectors),
            "dim": str(concept.dim),
            "base_model": concept.base_model,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": architecture,
            "modelspec.implementation": "conceptlib",
            "modelspec.title": metadata.get("modelspec.title") or concept.name,
            "modelspec.trigger_phrase": concept.token,
            "modelspec.date": metadata.get("modelspec.date") or metadata["created_at"],
        }
    )
    # keras-cv's SD 1.x and 2.x (base) both generate at 512 px and predict the noise; a kept 2.x 768-v
    # architecture (kohya's) names its own.
    v_model = "-768-v/" in architecture
    metadata.setdefault("modelspec.resolution", "768x768" if v_model else "512x512")
    metadata.setdefault("modelspec.prediction_type", "v" if v_model else "epsilon")
    if metadata.get("preview"):
        # Where other tools look for it: model pickers read the spec's thumbnail key; ComfyUI's model
        # previews read kohya's cover images (AUTOMATIC1111 only for LoRAs: export --with-preview).
        metadata["modelspec.thumbnail"] = "data:image/png;base64," + metadata["preview"]
        metadata["ssmd_cover_images"] = json.dumps([metadata["preview"]])
    metadata.setdefault("init_tokens", "[]")
    return metadata


def write_concept(concept: Concept, path: str | os.PathLike) -> Path:
    """Write ``concept`` to ``path`` atomically (temp file, fsync, os.replace)."""
    from safetensors.numpy import save

    data = save({concept.token: concept.vectors}, metadata=concept_metadata(concept))
    return atomic_write_bytes(Path(path), data)


def atomic_write_bytes(path: Path, data: bytes, *, fix: str = "write it to a folder you can write to") -> Path:
    """Write ``data`` so that ``path`` is either its old content or the whole new content, even
    if the process is killed mid-write.

    The file gets the permissions a plain ``open(path, "wb")`` would give: an existing file keeps
    its mode, a new one gets ``0o666 & ~umask`` (other accounts' tools must be able to read
    exported files). A failure is a WriteError: ``cannot write PATH: reason; fix``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise WriteError(path, write_failure_reason(path, exc), fix) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _mode_for(path))
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise WriteError(path, write_failure_reason(path, exc), fix) from None
        raise
    _fsync_dir(path.parent)
    return path


def write_failure_reason(path: Path, exc: OSError) -> str:
    """Why writing ``path`` failed, in words a user can act on."""
    base = next((parent for parent in Path(path).parents if parent.exists()), Path("."))
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EISDIR:
        return "it is a folder"
    if exc.errno == errno.ENOENT:
        return f"nothing can be created in {base}"
    return (exc.strerror or str(exc)).lower()


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read from /proc where possible, since setting it to read it is racy)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
