"""Write a concept in the layout another tool loads unchanged (no torch needed)."""

from __future__ import annotations

import os
from pathlib import Path

from conceptlib.concept import Concept
from conceptlib.errors import ConceptFileError, UsageError
from conceptlib.files import atomic_write_bytes, cleaned_metadata, concept_metadata, write_concept

EXPORT_FORMATS = ("conceptlib", "diffusers", "a1111", "sd-concepts", "kohya")
_SD_CONCEPTS_FILES = ("learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt")
_SD_CONCEPTS_PREVIEW = "preview.png"
# What AUTOMATIC1111 itself writes: the id of '*' in CLIP's vocabulary.
_A1111_STAR_TOKEN_ID = 265


def export(concept: Concept, fmt: str, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``concept`` in format ``fmt`` to ``out`` and return the path written.

    ``out`` is a file path, or an existing folder (then a conventional file name is used inside).
    For ``sd-concepts`` ``out`` is the concept folder to create. Existing files (for sd-concepts,
    any of its three) are kept unless ``overwrite``.

    * conceptlib: our file (contract 1).
    * diffusers: ``learned_embeds.safetensors``, one tensor keyed by the token, for
      ``pipeline.load_textual_inversion``; a ``.bin`` path gives the torch pickle ``{token: tensor}``.
    * a1111: ``<name>.pt``, a torch zip pickle with string_to_param {'*': tensor}; AUTOMATIC1111
      uses the file name as the prompt word (see ``a1111_prompt_word``). A concept imported from
      an A1111 file keeps that file's step and sd_checkpoint(_name). A ``.png`` path gives
      AUTOMATIC1111's embedding image instead: the concept's preview (else a grey card) carrying
      the same dictionary, named with the token.
    * sd-concepts: a folder with learned_embeds.bin, token_identifier.txt, type_of_concept.txt.
    * kohya: ``<name>.safetensors`` with one tensor ``emb_params`` (kohya-ss sd-scripts).
    """
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    concept = _shareable(concept)
    out = Path(out).expanduser()
    if fmt == "sd-concepts":
        return _export_sd_concepts(concept, out, overwrite)
    target = out / default_file(concept, fmt) if out.is_dir() else out
    _check_target(target, overwrite)
    if fmt == "conceptlib":
        return write_concept(concept, target)
    if fmt == "diffusers":
        tensors = {concept.token: _one_vector_flat(concept)}
        if target.suffix.lower() == ".bin":
            return atomic_write_bytes(target, _pickle(tensors, target))
        # A flat [dim] vector is not our (n, dim) layout: such a file must not claim our format.
        flat = ("format",) if concept.num_vectors == 1 else ()
        return atomic_write_bytes(target, _safetensors(tensors, concept, drop=flat))
    if fmt == "kohya":
        # Not our layout (the key is not the token), so the file must not claim our format;
        # modelspec.trigger_phrase still carries the token.
        return atomic_write_bytes(target, _safetensors({"emb_params": concept.vectors}, concept, drop=("format",)))
    if target.suffix.lower() == ".png":
        from conceptlib.formats import a1111_image

        return atomic_write_bytes(target, a1111_image.write(_a1111_dict(concept, target), _preview_pixels(concept)))
    return atomic_write_bytes(target, _pickle(_a1111_dict(concept, target), target))


def _shareable(concept: Concept) -> Concept:
    """``concept`` as it may leave this machine: its metadata cleaned (``cleaned_metadata``: a file
    imported before the library cleaned what it stores may hold terminal escapes), and a
    checkpoint's ``checkpoint_of`` naming its run by the folder's name, not by the absolute path
    the library keeps (which holds the user's home)."""
    import json

    metadata = cleaned_metadata(concept.metadata)
    try:
        record = json.loads(metadata.get("checkpoint_of") or "{}")
    except ValueError:
        record = None
    run = record.get("run") if isinstance(record, dict) else None
    if isinstance(run, str) and run != Path(run).name:
        metadata["checkpoint_of"] = json.dumps({**record, "run": Path(run).name})
    if metadata == concept.metadata:
        return concept
    return Concept(concept.name, concept.token, concept.vectors, metadata)


def a1111_prompt_word(concept: Concept, target: Path) -> str:
    """The word AUTOMATIC1111 prompts use for ``concept`` exported to ``target``: a ``.pt`` file's
    name (A1111 names embeddings after their files), an embedding image's stored name, which is
    the concept's token. The file's ``name`` field holds the same word, since diffusers'
    ``load_textual_inversion`` takes it as the token."""
    return concept.token if target.suffix.lower() == ".png" else target.stem


def _one_vector_flat(concept: Concept):
    """A single vector as shape [dim], as sd-concepts-library files store it: InvokeAI's installer
    reads a token-keyed tensor's width from its first dimension (diffusers loads either shape)."""
    return concept.vectors[0] if concept.num_vectors == 1 else concept.vectors


def _preview_pixels(concept: Concept):
    """The concept's preview thumbnail as uint8 pixels, or None when it has no readable one."""
    import io

    import numpy as np
    from PIL import Image, UnidentifiedImageError

    png = preview_png(concept.metadata)
    if png is None:
        return None
    try:
        with Image.open(io.BytesIO(png)) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, UnidentifiedImageError):
        return None


# Formats whose files go into AUTOMATIC1111's (and SD.Next's, ComfyUI's) embeddings folders, where
# a picture named like the file with ".preview.png" is the card the Extra Networks tab shows.
PREVIEW_FILE_FORMATS = ("a1111", "kohya", "conceptlib")


def preview_file_for(fmt: str, written: Path) -> Path | None:
    """Where ``export --with-preview`` puts the preview beside ``written`` (a file of format
    ``fmt``): ``NAME.preview.png``; None for formats and files that get none (diffusers'
    and sd-concepts' fixed names, an embedding image, which is its own picture)."""
    if fmt not in PREVIEW_FILE_FORMATS or written.suffix.lower() == ".png":
        return None
    return written.with_name(f"{written.stem}.preview.png")


def preview_base64(metadata: dict) -> str:
    """A concept's preview as base64 text: its ``preview``, else the payload of its ModelSpec
    thumbnail data URI (a file from another tool may hold that alone); '' when it has neither."""
    return metadata.get("preview") or metadata.get("modelspec.thumbnail", "").partition("base64,")[2]


def preview_png(metadata: dict) -> bytes | None:
    """The preview in a concept's ``metadata`` (``preview_base64``) as PNG bytes, or None when it
    has no readable one."""
    import base64
    import binascii

    try:
        data = base64.b64decode(preview_base64(metadata), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(b"\x89PNG\r\n\x1a\n") else None


def paths_in_folder(concept: Concept, fmt: str, folder: Path) -> tuple[Path, list[Path]]:
    """Where ``concept`` goes when several are exported into ``folder``: the ``out`` to pass to
    ``export`` and the files that writes. Formats whose files carry a fixed name (diffusers'
    learned_embeds.*, the sd-concepts folder) get a subfolder per concept."""
    if fmt == "sd-concepts":
        out = folder / concept.name
        return out, [out / name for name in sd_concepts_files(concept)]
    if fmt == "diffusers":
        out = folder / concept.name
        return out, [out / default_file(concept, fmt)]
    return folder, [folder / default_file(concept, fmt)]


def default_file(concept: Concept, fmt: str) -> str:
    """The file name an export of ``concept`` in ``fmt`` gets inside a folder. AUTOMATIC1111 and
    kohya call a file by its name, so a concept imported from such a file gets that file's name
    back (its prompt word there: 'Bad Hands v2', not the library name 'bad-hands-v2'), unless its
    token has changed since."""
    stem = _imported_file_word(concept) if fmt in ("a1111", "kohya") else None
    return {
        "conceptlib": f"{concept.name}.safetensors",
        "diffusers": "learned_embeds.safetensors",
        "a1111": f"{stem or concept.name}.pt",
        "kohya": f"{stem or concept.name}.safetensors",
    }[fmt]


# Sources whose prompt word is their file's name (an embedding image's is the name inside it).
_FILE_NAMED_SOURCES = ("a1111", "kohya", "pivotal")


def _imported_file_word(concept: Concept) -> str | None:
    """The name (without extension) of the AUTOMATIC1111/kohya file ``concept`` was imported from,
    while its token is still the one taken from that name; else None."""
    from conceptlib.formats.readers import token_from_file_name

    source = concept.metadata.get("source_file", "")
    stem = Path(source).stem
    if concept.metadata.get("source_format") not in _FILE_NAMED_SOURCES or not stem or stem.startswith("."):
        return None
    if os.sep in source or "\\" in stem or token_from_file_name(stem) != concept.token:
        return None
    return stem


def _a1111_dict(concept: Concept, target: Path) -> dict:
    """AUTOMATIC1111's fields: the prompt word as ``name``; the step from our training metadata
    (a training checkpoint's own step, not the run's planned steps: A1111 resumes training from
    it), else (a concept imported from an A1111 file) the step and checkpoint fields it was
    imported with, so a round trip keeps them."""
    import json

    from conceptlib.formats.model_card import checkpoint_step

    metadata = concept.metadata
    fields = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    if "training" in metadata:
        fields["step"] = checkpoint_step(metadata)
        if fields["step"] is None:
            try:
                fields["step"] = int(json.loads(metadata["training"]).get("steps"))
            except (ValueError, TypeError, AttributeError):
                pass
    else:
        for key in fields:
            fields[key] = metadata.get(f"a1111.{key}", fields[key])
        fields["step"] = _int_or_none(fields["step"])
    return {"string_to_token": {"*": _A1111_STAR_TOKEN_ID}, "string_to_param": {"*": concept.vectors},
            "name": a1111_prompt_word(concept, target), **fields, "conceptlib": a1111_extra(concept)}


def a1111_extra(concept: Concept) -> dict[str, str]:
    """What an AUTOMATIC1111 file cannot say in its own fields and conceptlib reads back on
    import: the token (A1111 calls the file by its name, which may be an ordinary word) and the
    description people share a concept with. A1111, ComfyUI, InvokeAI and diffusers pass over
    keys they do not know."""
    from conceptlib.formats.readers import A1111_EXTRA_KEYS

    return {"token": concept.token, **{key: concept.metadata[key] for key in A1111_EXTRA_KEYS if key in concept.metadata}}


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _export_sd_concepts(concept: Concept, folder: Path, overwrite: bool) -> Path:
    if folder.exists() and not folder.is_dir():
        raise ConceptFileError(f"{folder}: exists and is not a folder; sd-concepts export writes a folder, choose another --out")
    from conceptlib.formats.model_card import concept_type, model_card

    embeds = folder / "learned_embeds.bin"
    for name in sd_concepts_files(concept):
        _check_target(folder / name, overwrite)
    atomic_write_bytes(embeds, _pickle({concept.token: _one_vector_flat(concept)}, embeds))
    atomic_write_bytes(folder / "token_identifier.txt", concept.token.encode("utf-8"))
    atomic_write_bytes(folder / "type_of_concept.txt", concept_type(concept.metadata).encode("utf-8"))
    preview = preview_png(concept.metadata)
    if preview is not None:
        atomic_write_bytes(folder / _SD_CONCEPTS_PREVIEW, preview)
    card = model_card(concept, preview_file=_SD_CONCEPTS_PREVIEW if preview is not None else None)
    atomic_write_bytes(folder / "README.md", card.encode("utf-8"))
    return folder


def sd_concepts_files(concept: Concept) -> list[str]:
    """The files an sd-concepts export writes: the three the sd-concepts-library layout has, the
    Hub model card (README.md) and the concept's preview if it has one."""
    files = [*_SD_CONCEPTS_FILES, "README.md"]
    return files + [_SD_CONCEPTS_PREVIEW] if preview_png(concept.metadata) is not None else files


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise ConceptFileError(f"{target}: already exists; choose another --out or pass --force to replace it")


def _safetensors(tensors: dict, concept: Concept, drop: tuple[str, ...] = ()) -> bytes:
    from safetensors.numpy import save

    metadata = {k: v for k, v in concept_metadata(concept).items() if k not in drop}
    return save(tensors, metadata=metadata)


def _pickle(obj: dict, target: Path) -> bytes:
    from conceptlib.pickle_safe import dump_tensor_pickle

    return dump_tensor_pickle(obj, archive_name=_archive_name(target))


def _archive_name(target: Path) -> str:
    # torch.save names the zip's top folder after the file; any plain name loads.
    stem = "".join(c if c.isalnum() or c in "_-" else "_" for c in target.stem)
    return stem or "archive"
