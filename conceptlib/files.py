"""Read and write concept files (contract 1): one float32 tensor keyed by the token, plus metadata.

Header reads parse the safetensors header directly (8-byte length + JSON) so that listing and
showing never load tensors, numpy or TensorFlow.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import tempfile
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


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FileHeader:
    """What a safetensors header says, without the tensor data."""

    path: Path
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]


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
        return {
            "name": self.name,
            "token": self.token,
            "num_vectors": self.num_vectors,
            "dim": self.dim,
            "base_model": self.base_model,
            "trainer": self.metadata.get("trainer", ""),
            "created_at": self.metadata.get("created_at", ""),
        }


def read_file_header(path: str | os.PathLike) -> FileHeader:
    """Parse a safetensors file's header; raise ConceptFileError if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ConceptFileError(f"{path}: file is empty or truncated ({len(prefix)} bytes); re-download or re-export it")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES:
                raise ConceptFileError(f"{path}: not a safetensors file (header length {length} is implausible)")
            raw = handle.read(length)
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
    except FileNotFoundError:
        raise ConceptFileError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ConceptFileError(f"{path}: is a folder, expected a .safetensors file") from None
    except PermissionError:
        raise ConceptFileError(f"{path}: permission denied; make the file readable") from None
    if len(raw) < length:
        raise ConceptFileError(f"{path}: header truncated ({len(raw)} of {length} bytes); the file is incomplete, re-download or re-export it")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConceptFileError(f"{path}: not a safetensors file (header is not valid JSON: {exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ConceptFileError(f"{path}: corrupt safetensors metadata (values must be strings)")
    tensors = []
    data_end = 0
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConceptFileError(f"{path}: corrupt safetensors entry for tensor {key!r}") from None
        data_end = max(data_end, int(end))
        tensors.append(TensorInfo(key=key, dtype=dtype, shape=shape))
    if 8 + length + data_end > size:
        raise ConceptFileError(
            f"{path}: file truncated ({size} bytes, header promises {8 + length + data_end}); re-download or re-export it"
        )
    return FileHeader(path=path, tensors=tuple(tensors), metadata=dict(metadata))


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


def read_concept(path: str | os.PathLike) -> Concept:
    """Load a concept file written by conceptlib (or any single-tensor concept safetensors)."""
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
            token=header.token,
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
    metadata.update(
        {
            "format": FORMAT,
            "name": concept.name,
            "token": concept.token,
            "num_vectors": str(concept.num_vectors),
            "dim": str(concept.dim),
            "base_model": concept.base_model,
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": MODELSPEC_ARCHITECTURE[concept.base_model],
            "modelspec.implementation": "conceptlib",
            "modelspec.title": metadata.get("modelspec.title") or concept.name,
            "modelspec.trigger_phrase": concept.token,
            "modelspec.date": metadata.get("modelspec.date") or metadata["created_at"],
        }
    )
    metadata.setdefault("init_tokens", "[]")
    return metadata


def write_concept(concept: Concept, path: str | os.PathLike) -> Path:
    """Write ``concept`` to ``path`` atomically (temp file, fsync, os.replace)."""
    from safetensors.numpy import save

    data = save({concept.token: concept.vectors}, metadata=concept_metadata(concept))
    return atomic_write_bytes(Path(path), data)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` so that ``path`` is either its old content or the whole new content, even
    if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


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
