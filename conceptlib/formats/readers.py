"""Read concepts from our files and other tools' files (never importing torch or TensorFlow)."""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from conceptlib.concept import FORMAT, Concept, slug_from_token
from conceptlib.errors import ConceptError, ConceptFileError, UnsupportedFormatError, UsageError
from conceptlib.files import read_file_header
from conceptlib.library import is_valid_name

PICKLE_SUFFIXES = (".pt", ".bin", ".pth")
FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# Files the diffusers / sd-concepts-library layouts keep next to the embedding.
_FOLDER_EMBEDDINGS = ("learned_embeds.safetensors", "learned_embeds.bin")
# Library names derived from these file names would say nothing about the concept.
_GENERIC_STEMS = {"learned_embeds", "emb_params", "embedding", "embeddings"}
_SDXL_KEYS = {"clip_l", "clip_g"}
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "bf16"}


@dataclass(frozen=True)
class Source:
    """One importable unit: a concept file, or a folder holding learned_embeds.* (sd-concepts)."""

    path: Path

    @property
    def is_folder(self) -> bool:
        return self.path.is_dir()


@dataclass(frozen=True)
class Skipped:
    """A path inside an imported folder that is not a concept, and why."""

    path: Path
    reason: str


def discover(path: str | os.PathLike) -> tuple[list[Source], list[Skipped]]:
    """The importable units under ``path`` (a file, a concept folder, or a folder of them), plus
    the entries that were skipped and why. Raises ConceptFileError if ``path`` is unusable."""
    path = Path(path)
    if not path.exists():
        raise ConceptFileError(f"{path}: no such file or folder; check the path")
    if path.is_file():
        return [Source(path)], []
    if _is_concept_folder(path):
        return [Source(path)], []
    try:
        entries = sorted(path.iterdir())
    except PermissionError:
        raise ConceptFileError(f"{path}: permission denied; make the folder readable") from None
    sources: list[Source] = []
    skipped: list[Skipped] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_concept_folder(entry):
                sources.append(Source(entry))
            else:
                skipped.append(Skipped(entry, "a folder without learned_embeds.safetensors/.bin"))
        elif entry.suffix.lower() in FILE_SUFFIXES:
            sources.append(Source(entry))
        elif entry.name not in ("token_identifier.txt", "type_of_concept.txt"):
            skipped.append(Skipped(entry, f"not a concept file (expected {', '.join(FILE_SUFFIXES)})"))
    if not sources:
        raise ConceptFileError(
            f"{path}: no concept files in this folder (looked for {', '.join(FILE_SUFFIXES)} files and "
            "sd-concepts-library folders); point at a file or a folder that holds some"
        )
    return sources, skipped


def load_any(path: str | os.PathLike, *, token: str | None = None, name: str | None = None) -> list[Concept]:
    """Every concept in ``path`` (our file, a foreign file, a concept folder or a folder of files).

    ``token``/``name`` override the token and library name; they need a single concept.
    Raises on the first file that cannot be read.
    """
    sources, _ = discover(path)
    if len(sources) > 1 and (token or name):
        raise UsageError(f"--token/--name apply to a single concept, but {path} holds {len(sources)}; import them one at a time")
    return [load_source(source, token=token, name=name) for source in sources]


def load_source(source: Source | str | os.PathLike, *, token: str | None = None, name: str | None = None) -> Concept:
    """Read one importable unit (see ``discover``) as a Concept, validated."""
    path = source.path if isinstance(source, Source) else Path(source)
    if path.is_dir():
        return _load_folder(path, token=token, name=name)
    if path.suffix.lower() == ".safetensors":
        return _load_safetensors(path, token=token, name=name)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path, token=token, name=name)
    raise UnsupportedFormatError(f"{path}: unknown file type {path.suffix!r}; expected {', '.join(FILE_SUFFIXES)}")


# -- folders --------------------------------------------------------------------------------------

def _is_concept_folder(path: Path) -> bool:
    """learned_embeds.* and no other concept files (else it is a folder of concept files)."""
    try:
        names = {p.name for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES and not p.name.startswith(".")}
    except OSError:
        return False
    return bool(names) and names <= set(_FOLDER_EMBEDDINGS)


def _load_folder(path: Path, *, token: str | None, name: str | None) -> Concept:
    """diffusers' output folder / an sd-concepts-library repo: learned_embeds.* plus optional
    token_identifier.txt and type_of_concept.txt."""
    embeds = next((path / f for f in _FOLDER_EMBEDDINGS if (path / f).is_file()), None)
    if embeds is None:
        raise ConceptFileError(f"{path}: no learned_embeds.safetensors or learned_embeds.bin in this folder")
    identifier = _read_text(path / "token_identifier.txt")
    concept_type = _read_text(path / "type_of_concept.txt")
    concept = load_source(Source(embeds), token=token or (identifier and _token_from_text(identifier)), name=name or _folder_slug(path))
    metadata = dict(concept.metadata)
    metadata["source_format"] = "sd-concepts" if identifier or concept_type else metadata.get("source_format", "diffusers")
    if concept_type:
        metadata["type_of_concept"] = concept_type
    return Concept(concept.name, concept.token, concept.vectors, metadata)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConceptFileError(f"{path}: cannot read ({exc}); fix or delete the file") from None


def _folder_slug(path: Path) -> str:
    return slug_from_token(path.resolve().name)


# -- safetensors ---------------------------------------------------------------------------------

def _load_safetensors(path: Path, *, token: str | None, name: str | None) -> Concept:
    header = read_file_header(path)  # validates framing, truncation, JSON
    keys = [t.key for t in header.tensors]
    _refuse_sdxl(path, keys)
    if len(keys) != 1:
        raise UnsupportedFormatError(
            f"{path}: holds {len(keys)} tensors ({', '.join(keys[:5]) or 'none'}{', ...' if len(keys) > 5 else ''}); "
            "a textual-inversion embedding holds exactly one (is this a model checkpoint or a LoRA?)"
        )
    key = keys[0]
    vectors = _read_safetensors_tensor(path, key)
    metadata = dict(header.metadata)
    if metadata.get("format") == FORMAT and key not in ("emb_params", "*"):
        # Our own file: it names itself.
        return _make(path, metadata.get("name"), key, vectors, metadata, token=token, name=name, fmt=None)
    if key in ("emb_params", "*"):
        # kohya-ss (and A1111's safetensors variant): the file name is the trigger word.
        trigger = metadata.get("modelspec.trigger_phrase") or _token_from_text(path.stem)
        metadata["source_format"] = "kohya"
        return _make(path, path.stem, trigger, vectors, metadata, token=token, name=name, fmt="kohya")
    metadata["source_format"] = "diffusers"
    return _make(path, None, key, vectors, metadata, token=token, name=name, fmt="diffusers")


def _read_safetensors_tensor(path: Path, key: str):
    """One tensor as float32 numpy, parsed directly (numpy's safetensors loader lacks BF16)."""
    import numpy as np

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        info = json.loads(handle.read(length))[key]
        start, end = info["data_offsets"]
        handle.seek(8 + length + start)
        raw = handle.read(end - start)
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ConceptFileError(f"{path}: tensor {key!r} is {info['dtype']}; embeddings are F32, F16 or BF16")
    shape = tuple(info["shape"])
    if dtype == "bf16":
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=dtype)
    count = int(np.prod(shape)) if shape else 1
    if array.size != count:
        raise ConceptFileError(f"{path}: tensor {key!r} has {array.size} values for shape {list(shape)}; the file is corrupt")
    return array.reshape(shape).astype(np.float32)


# -- pickles ---------------------------------------------------------------------------------------

def _load_pickle(path: Path, *, token: str | None, name: str | None) -> Concept:
    from conceptlib.pickle_safe import load_tensor_pickle

    data = load_tensor_pickle(path)
    if not isinstance(data, dict):
        raise UnsupportedFormatError(f"{path}: holds a {type(data).__name__}, not a dictionary of embeddings")
    _refuse_sdxl(path, list(data))
    if "string_to_param" in data:
        return _load_a1111(path, data, token=token, name=name)
    if "emb_params" in data and _is_array(data["emb_params"]):
        return _make(path, path.stem, _token_from_text(path.stem), data["emb_params"], {"source_format": "kohya"},
                     token=token, name=name, fmt="kohya")
    tensors = {k: v for k, v in data.items() if _is_array(v)}
    if len(data) == 1 and len(tensors) == 1 and isinstance(next(iter(tensors)), str):
        key, vectors = next(iter(tensors.items()))
        return _make(path, None, key, vectors, {"source_format": "diffusers"}, token=token, name=name, fmt="diffusers")
    keys = ", ".join(map(str, list(data)[:5]))
    raise UnsupportedFormatError(
        f"{path}: a PyTorch file but not a textual-inversion embedding (keys: {keys}); expected "
        "AUTOMATIC1111's string_to_param or diffusers' {{token: tensor}}"
    )


def _load_a1111(path: Path, data: dict, *, token: str | None, name: str | None) -> Concept:
    params = data["string_to_param"]
    if not isinstance(params, dict) or len(params) != 1 or not _is_array(next(iter(params.values()))):
        raise UnsupportedFormatError(
            f"{path}: AUTOMATIC1111 embedding whose string_to_param holds {len(params) if isinstance(params, dict) else 'no'} "
            "tensors; expected exactly one ('*')"
        )
    vectors = next(iter(params.values()))
    metadata = {"source_format": "a1111"}
    for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        value = data.get(key)
        if value is not None:
            metadata[f"a1111.{key}"] = str(value)
    # AUTOMATIC1111 uses the file name as the word prompts contain.
    return _make(path, path.stem, _token_from_text(path.stem), vectors, metadata, token=token, name=name, fmt="a1111")


# -- common ----------------------------------------------------------------------------------------

def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _refuse_sdxl(path: Path, keys) -> None:
    if _SDXL_KEYS <= set(keys):
        raise UnsupportedFormatError(
            f"{path}: an SDXL embedding (clip_l + clip_g, two text encoders); KerasCV has no SDXL, so "
            "conceptlib supports SD 1.x (768) and SD 2.x (1024) embeddings only"
        )


def _token_from_text(text: str) -> str:
    """A usable token from a file name or token_identifier.txt: lowercase (KerasCV lowercases
    prompts), whitespace replaced by '-'."""
    return re.sub(r"\s+", "-", text.strip().lower())[:64]


def _make(path: Path, stem_name: str | None, file_token: str, vectors, metadata: dict, *, token, name, fmt) -> Concept:
    final_token = token or _token_from_text(str(file_token))
    if name:
        final_name = name
    elif stem_name and is_valid_name(stem_name) and stem_name not in _GENERIC_STEMS:
        final_name = stem_name
    elif stem_name and slug_from_token(stem_name) not in _GENERIC_STEMS | {"concept"}:
        final_name = slug_from_token(stem_name)
    else:
        final_name = slug_from_token(final_token)
    metadata = {str(k): str(v) for k, v in metadata.items()}
    if fmt is not None:
        metadata.setdefault("source_file", path.name)
    try:
        return Concept(name=final_name, token=final_token, vectors=vectors, metadata=metadata)
    except ConceptError as exc:
        raise ConceptFileError(f"{path}: {exc}") from None

