"""Read concepts from our files and other tools' files (never importing torch or TensorFlow)."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import struct
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from conceptlib.concept import DIMS, FORMAT, MAX_VECTORS, Concept, slug_from_token, suggested_token, validate_token
from conceptlib.errors import ConceptError, ConceptFileError, UnsupportedFormatError, UsageError
from conceptlib.files import (
    DESCRIPTIVE_KEYS, MAX_HEADER_BYTES, FileHeader, FileTooLarge, NotARegularFile, is_iso_date, read_file_header,
    read_small_file,
)
from conceptlib.formats import a1111_image
from conceptlib.formats.a1111_image import IMAGE_SUFFIXES
from conceptlib.library import is_valid_name

PICKLE_SUFFIXES = (".pt", ".bin", ".pth")
FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# kohya's --save_model_as ckpt: read when named, never picked from a folder (full model checkpoints
# are .ckpt files too).
NAMED_ONLY_SUFFIXES = (".ckpt",)
# What a folder import looks for (AUTOMATIC1111 also keeps embeddings inside images).
_LOOKED_FOR = f"{', '.join(FILE_SUFFIXES)} files, AUTOMATIC1111 embedding images ({', '.join(IMAGE_SUFFIXES)})"
# Files the diffusers / sd-concepts-library layouts keep next to the embedding.
_FOLDER_EMBEDDINGS = ("learned_embeds.safetensors", "learned_embeds.bin")
_FOLDER_TEXTS = ("token_identifier.txt", "type_of_concept.txt")
# diffusers' textual_inversion.py saves these every --save_steps beside the final learned_embeds.*
# (textual_inversion_sdxl.py also learned_embeds_2-steps-N.*, its second text encoder's).
_CHECKPOINT_RE = re.compile(r"^learned_embeds(?:_2)?-steps-(\d+)\.(safetensors|bin)$")
# diffusers' textual_inversion_sdxl.py writes its second text encoder's (CLIP-G) rows here, beside
# learned_embeds.* (CLIP-L, 768 wide: alone it would look like an SD 1.x concept), and every
# --save_steps into learned_embeds_2-steps-N.* (an unfinished run has only those).
_SDXL_SECOND_RE = re.compile(r"^learned_embeds_2(?:-steps-\d+)?\.(safetensors|bin)$")
_SDXL_OUTPUT = ("a diffusers SDXL textual-inversion output (learned_embeds.* for CLIP-L beside learned_embeds_2.* "
                "for CLIP-G); KerasCV has no SDXL, so conceptlib supports SD 1.x (768) and SD 2.x (1024) embeddings only")
_CHECKPOINTS = "learned_embeds-steps-*"
# A conceptlib training run folder (conceptlib.runs): config.json, checkpoints/step-N.npz, and
# concept.safetensors once finished; init.safetensors is what an --init-from run started from.
_RUN_CHECKPOINTS = "checkpoints"
# Library names derived from these file names would say nothing about the concept.
_GENERIC_STEMS = {"learned_embeds", "emb_params", "embedding", "embeddings"}
_SDXL_KEYS = {"clip_l", "clip_g"}
_FLUX_KEYS = {"clip_l", "t5"}
# Single keys that name no token: the file name is the prompt word (kohya, A1111's safetensors, and
# ComfyUI's text-encoder keys: clip_l for SD 1.x, as diffusers' pivotal-tuning scripts write, clip_h
# for SD 2.x).
_PIVOTAL_KEYS = ("clip_l", "clip_h")
# 'string_to_param.*' is AUTOMATIC1111's .pt dictionary flattened, as pt-to-safetensors converters write it.
_FILE_NAMED_KEYS = {"emb_params": "kohya", "*": "kohya", "string_to_param.*": "a1111",
                    **dict.fromkeys(_PIVOTAL_KEYS, "pivotal")}
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "bf16"}
_MAX_LENGTH = 64  # of a token and of a name (concept.py)
_NOT_REGULAR = ("not a regular file or folder (a device, pipe or socket); save the data to a "
                ".safetensors/.pt file first and import that file")


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
    """The importable units under ``path`` (a file, a concept folder, or a folder of them and of
    subfolders), plus the entries that were skipped and why. Training checkpoints
    (``learned_embeds-steps-N.*``) are never imported from a folder, only named by path.
    Raises ConceptFileError if ``path`` is unusable."""
    path = Path(path)
    if not path.exists():
        raise ConceptFileError(f"{path}: no such file or folder; check the path")
    if path.is_file():
        return [Source(path)], []
    if not path.is_dir():
        raise ConceptFileError(f"{path}: {_NOT_REGULAR}")
    sources: list[Source] = []
    skipped: list[Skipped] = []
    _discover_folder(path, sources, skipped, seen=set(), root=path.resolve())
    if not sources:
        checkpoints = [s for s in skipped if s.path in (path, path / _CHECKPOINTS, path / _RUN_CHECKPOINTS)]
        if checkpoints:
            raise ConceptFileError(f"{path}: {checkpoints[0].reason}")
        sdxl = [s for s in skipped if s.reason == _SDXL_OUTPUT]  # e.g. a folder holding one SDXL run
        if sdxl:
            raise ConceptFileError(f"{sdxl[0].path}: {sdxl[0].reason}")
        raise ConceptFileError(
            f"{path}: no concept files in this folder (looked for {_LOOKED_FOR} and "
            "sd-concepts-library folders); point at a file or a folder that holds some"
        )
    return sources, skipped


# Embeddings folders are sorted into a few levels of subfolders, never dozens.
_MAX_FOLDER_DEPTH = 32
_NOT_FOLLOWED = "; not followed"


def _discover_folder(folder: Path, sources: list[Source], skipped: list[Skipped], seen: set[Path], root: Path,
                     depth: int = 0) -> None:
    """Add what ``folder`` holds to ``sources``/``skipped``: itself if it is one concept folder,
    else its concept files, concept folders and (recursively) subfolders inside ``root``."""
    seen.add(folder.resolve())
    if (folder / "config.json").is_file() and (folder / _RUN_CHECKPOINTS).is_dir():
        _discover_run(folder, sources, skipped)
        return
    if _is_sdxl_output(folder):
        skipped.append(Skipped(folder, _SDXL_OUTPUT))
        return
    try:
        entries = sorted(folder.iterdir())
    except PermissionError:
        raise ConceptFileError(f"{folder}: permission denied; make the folder readable") from None
    for entry in entries:
        if _is_hidden_concept_file(entry):
            skipped.append(Skipped(entry, "a hidden file (its name starts with a dot); import it by its path to bring it in"))
    entries = [e for e in entries if not e.name.startswith(".")]
    checkpoints = [e for e in entries if _CHECKPOINT_RE.match(e.name) and e.is_file()]
    if checkpoints:
        skipped.append(Skipped(folder / _CHECKPOINTS, _checkpoints_reason(folder, checkpoints)))
    if _is_concept_folder(folder):
        sources.append(Source(folder))
        return
    for entry in entries:
        if entry in checkpoints:
            continue
        try:
            _discover_entry(entry, sources, skipped, seen, root, depth)
        except OSError as exc:  # e.g. a folder of another account's
            skipped.append(Skipped(entry, f"cannot be read ({exc.strerror or exc})"))


def _is_hidden_concept_file(entry: Path) -> bool:
    """A dot file with a concept file's suffix, other than macOS' resource forks (``._NAME``, which
    zip archives made on a Mac hold beside every file and which are never embeddings)."""
    return (entry.name.startswith(".") and not entry.name.startswith("._")
            and entry.suffix.lower() in FILE_SUFFIXES and entry.is_file())


def _discover_entry(entry: Path, sources: list[Source], skipped: list[Skipped], seen: set[Path], root: Path,
                    depth: int) -> None:
    """One entry of a folder being imported: a subfolder, a concept file or image, or a Skipped line."""
    if entry.is_symlink() and entry.is_file() and not _within(entry, root):
        skipped.append(Skipped(entry, f"a link to a file outside {root} ({entry.resolve()}){_NOT_FOLLOWED}"))
    elif entry.is_dir():
        _discover_subfolder(entry, sources, skipped, seen, root, depth + 1)
    elif entry.is_file() and entry.suffix.lower() in FILE_SUFFIXES:
        sources.append(Source(entry))
    elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
        _discover_image(entry, sources, skipped)
    elif entry.is_file() and entry.suffix.lower() in NAMED_ONLY_SUFFIXES:
        skipped.append(Skipped(entry, "a .ckpt file, usually a whole model, so not read in a folder import; if it is an "
                                      "embedding (kohya's --save_model_as ckpt), import it by its own path"))
    elif entry.is_file():
        if entry.name not in _FOLDER_TEXTS:
            skipped.append(Skipped(entry, f"not a concept file (expected {_LOOKED_FOR})"))
    elif not entry.exists():
        skipped.append(Skipped(entry, "a broken link (what it points to does not exist)"))
    else:
        skipped.append(Skipped(entry, _NOT_REGULAR))


def _discover_subfolder(folder: Path, sources: list[Source], skipped: list[Skipped], seen: set[Path], root: Path,
                        depth: int) -> None:
    """A subfolder (AUTOMATIC1111 embeddings folders are often sorted into some). One that holds
    no concept at all is reported as one line, not one line per file in it. Links out of the
    folder being imported are not followed (a shared folder's link could reach anything)."""
    resolved = folder.resolve()
    if resolved in seen:
        skipped.append(Skipped(folder, "a link to a folder that is already being imported"))
        return
    if not resolved.is_relative_to(root):
        skipped.append(Skipped(folder, f"a link to a folder outside {root} ({resolved}){_NOT_FOLLOWED}"))
        return
    if depth > _MAX_FOLDER_DEPTH:
        skipped.append(Skipped(folder, f"more than {_MAX_FOLDER_DEPTH} folders deep{_NOT_FOLLOWED}"))
        return
    found: list[Source] = []
    inner: list[Skipped] = []
    _discover_folder(folder, found, inner, seen, root, depth)
    if found:
        sources.extend(found)
        skipped.extend(inner)
    elif any(s.path in (folder, folder / _CHECKPOINTS, folder / _RUN_CHECKPOINTS) or s.reason.endswith(_NOT_FOLLOWED)
             for s in inner):  # said one by one: they tell why nothing was found
        skipped.extend(inner)
    else:
        skipped.append(Skipped(folder, f"a folder without concept files (looked for {_LOOKED_FOR})"))


def _discover_image(path: Path, sources: list[Source], skipped: list[Skipped]) -> None:
    """An image in an embeddings folder is a concept only if it carries an embedding; previews
    (``NAME.preview.png``) and other pictures are passed over, as AUTOMATIC1111 does."""
    if a1111_image.is_preview_name(path):
        if _previewed_file(path) is None:  # else it comes in as that file's preview
            skipped.append(Skipped(path, "a preview image (NAME.preview.png), not an embedding"))
        return
    try:
        holds_one = a1111_image.read(path) is not None
    except ConceptFileError:
        holds_one = True  # a damaged embedding image: loading it reports why
    if holds_one:
        sources.append(Source(path))
    else:
        skipped.append(Skipped(path, "an image without an embedding in it"))


def _discover_run(folder: Path, sources: list[Source], skipped: list[Skipped]) -> None:
    """A conceptlib training run: its final concept.safetensors; its checkpoints only by path."""
    final = folder / "concept.safetensors"
    if final.is_file():
        sources.append(Source(final))
    if (folder / "init.safetensors").is_file():
        skipped.append(Skipped(folder / "init.safetensors", "the concept this run started from (--init-from), not what it trained"))
    checkpoints = sorted((folder / _RUN_CHECKPOINTS).glob("step-*.npz"))
    if not checkpoints:
        if not final.is_file():
            skipped.append(Skipped(folder / _RUN_CHECKPOINTS, "a training run that stopped before its first checkpoint; "
                                   f"resume it with `conceptlib train --resume {folder}`"))
        return
    what = _checkpoints_counted("training", [int(c.stem.split("-")[-1]) for c in checkpoints])
    if final.is_file():
        reason = f"{what}; the run's final concept.safetensors is imported instead (to import a checkpoint, give its own path)"
    else:
        reason = (f"{what} of a training run that has not finished; import the checkpoint you want by its own path, "
                  f"e.g. {checkpoints[-1]}, or resume the run with `conceptlib train --resume {folder}`")
    skipped.append(Skipped(folder / _RUN_CHECKPOINTS, reason))


def _checkpoints_counted(kind: str, steps: list[int]) -> str:
    """E.g. "3 training checkpoints (steps 10, 20, 30)", at most six steps listed."""
    steps = sorted(steps)
    listed = ", ".join(map(str, steps[:6])) + (", ..." if len(steps) > 6 else "")
    return f"{len(steps)} {kind} checkpoint{'s' if len(steps) > 1 else ''} (steps {listed})"


def _checkpoints_reason(folder: Path, checkpoints: list[Path]) -> str:
    what = _checkpoints_counted("intermediate training", [int(_CHECKPOINT_RE.match(c.name).group(1)) for c in checkpoints])
    final = next((f for f in _FOLDER_EMBEDDINGS if (folder / f).is_file()), None)
    if final:
        return f"{what}; the final {final} is imported instead (to import a checkpoint, give its own path)"
    latest = max(checkpoints, key=lambda c: int(_CHECKPOINT_RE.match(c.name).group(1)))
    return (f"{what} but no final learned_embeds.safetensors/.bin (the training did not finish); "
            f"import the checkpoint you want by its own path, e.g. {latest}")


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
    if _is_sdxl_output(path) or (_is_diffusers_output_file(path.name) and _is_sdxl_output(path.parent)):
        raise UnsupportedFormatError(f"{path}: {'' if path.is_dir() else 'part of '}{_SDXL_OUTPUT}")
    if path.is_dir():
        return _load_folder(path, token=token, name=name)
    if path.exists() and not path.is_file():
        raise ConceptFileError(f"{path}: {_NOT_REGULAR}")
    checkpoint = _CHECKPOINT_RE.match(path.name)
    if checkpoint and not checkpoint.group(0).startswith("learned_embeds_2"):
        return _diffusers_checkpoint(path, int(checkpoint.group(1)), token=token, name=name)
    if path.suffix.lower() == ".safetensors":
        return _with_card_preview(_load_safetensors(path, token=token, name=name), path)
    if path.suffix.lower() in PICKLE_SUFFIXES + NAMED_ONLY_SUFFIXES:
        return _with_card_preview(_load_pickle(path, token=token, name=name), path)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _load_image(path, token=token, name=name)
    if path.suffix.lower() == ".npz":
        from conceptlib.runs import checkpoint_concept

        return checkpoint_concept(path, name=name, token=token)
    raise UnsupportedFormatError(
        f"{path}: unknown file type {path.suffix!r}; expected {', '.join(FILE_SUFFIXES + NAMED_ONLY_SUFFIXES + IMAGE_SUFFIXES)} "
        "(or a conceptlib training checkpoint, RUN/checkpoints/step-N.npz)"
    )


# AUTOMATIC1111's card pictures: NAME.preview.EXT beside the embedding file NAME.pt (or .safetensors).
_CARD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_CARD_OWNERS = (".pt", ".safetensors", ".bin")


def _card_picture(path: Path) -> Path | None:
    """The card picture AUTOMATIC1111 shows for embedding file ``path``, if there is one."""
    return next((card for suffix in _CARD_SUFFIXES if (card := path.with_name(f"{path.stem}.preview{suffix}")).is_file()),
                None)


def _previewed_file(card: Path) -> Path | None:
    """The embedding file whose card picture ``card`` (NAME.preview.png) is, if it is there."""
    stem = Path(card.stem).stem
    return next((owner for suffix in _CARD_OWNERS if (owner := card.with_name(stem + suffix)).is_file()), None)


def _with_card_preview(concept: Concept, path: Path) -> Concept:
    """``concept`` with its file's card picture as its preview when it has none of its own (a
    picture that cannot be read is passed over: the embedding is what is imported)."""
    import base64

    from conceptlib.images import picture_thumbnail_png

    card = None if concept.metadata.get("preview") else _card_picture(path)
    if card is None:
        return concept
    try:
        png = picture_thumbnail_png(card)
    except ConceptFileError:
        return concept
    metadata = dict(concept.metadata, preview=base64.b64encode(png).decode("ascii"))
    return Concept(concept.name, concept.token, concept.vectors, metadata)


# -- folders --------------------------------------------------------------------------------------

def _is_sdxl_output(folder: Path) -> bool:
    try:
        return folder.is_dir() and any(_SDXL_SECOND_RE.match(name) for name in os.listdir(folder))
    except OSError:
        return False


def _is_diffusers_output_file(name: str) -> bool:
    return name in _FOLDER_EMBEDDINGS or bool(_SDXL_SECOND_RE.match(name) or _CHECKPOINT_RE.match(name))


def _is_concept_folder(path: Path) -> bool:
    """learned_embeds.* and no other concept files than training checkpoints (else it is a folder
    of concept files)."""
    try:
        names = {p.name for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES and not p.name.startswith(".")}
    except OSError:
        return False
    finals = names & set(_FOLDER_EMBEDDINGS)
    return bool(finals) and all(n in finals or _CHECKPOINT_RE.match(n) for n in names)


def _load_folder(path: Path, *, token: str | None, name: str | None) -> Concept:
    """diffusers' output folder / an sd-concepts-library repo: learned_embeds.* plus optional
    token_identifier.txt and type_of_concept.txt (and, from diffusers, checkpoints: ignored)."""
    embeds = next((path / f for f in _FOLDER_EMBEDDINGS if (path / f).is_file()), None)
    if embeds is None or not _is_concept_folder(path):  # as import reads it: then several concepts
        sources, _ = discover(path)
        if sources:
            raise ConceptFileError(f"{path}: a folder of {len(sources)} concept file(s) (e.g. {sources[0].path.name}), "
                                   "not one concept's folder; give one of its files (import takes the whole folder)")
        raise ConceptFileError(f"{path}: no learned_embeds.safetensors or learned_embeds.bin in this folder")
    for part in (embeds, path / "token_identifier.txt", path / "type_of_concept.txt"):
        if os.path.lexists(part) and not _within(part, path):  # a shared folder's link to a private file
            raise ConceptFileError(f"{part}: a link to a file outside {path}; not read (copy the file into the folder "
                                   "if it belongs to the concept)")
    identifier = _read_text(path / "token_identifier.txt")
    concept_type = _read_text(path / "type_of_concept.txt")
    concept = load_source(Source(embeds), token=token or (identifier and _token_from_text(identifier)), name=name or _folder_slug(path))
    metadata = dict(concept.metadata)
    metadata["source_format"] = "sd-concepts" if identifier or concept_type else metadata.get("source_format", "diffusers")
    if concept_type:
        metadata["type_of_concept"] = concept_type
    if not metadata.get("preview"):
        metadata.update(_folder_preview(path))
    metadata.update(_model_card_metadata(path / "README.md"))
    return Concept(concept.name, concept.token, concept.vectors, metadata)


def _model_card_metadata(card: Path) -> dict[str, str]:
    """What an sd-concepts folder's model card says that its other files do not: the description
    keys a conceptlib export carried in it (``model_card.carried_metadata``), else the license of
    its front matter (the Hub's sd-concepts-library repos). A card that cannot be read is passed
    over: it is not the concept."""
    from conceptlib.formats.model_card import carried_metadata

    try:
        card_text = read_small_file(card, 1 << 18).decode("utf-8", "replace")
    except (OSError, NotARegularFile, FileTooLarge):
        return {}
    carried = carried_metadata(card_text)
    found = {key: _short(value, _MAX_DESCRIPTION) for key, value in carried.items()
             if key in A1111_EXTRA_KEYS and isinstance(value, str)}
    front = re.match(r"---\n(.*?)\n---", card_text, re.S)
    hub_license = re.search(r"^license:\s*([A-Za-z0-9.+-]+)\s*$", front.group(1), re.M) if front else None
    if hub_license and hub_license.group(1) != "other":
        found.setdefault("modelspec.license", hub_license.group(1))
    return found


def _diffusers_checkpoint(path: Path, step: int, *, token: str | None, name: str | None) -> Concept:
    """An intermediate checkpoint of diffusers' textual-inversion script (learned_embeds-steps-N.*
    beside the final learned_embeds.*), named as conceptlib's own checkpoints are, so it sits
    beside the final concept: FOLDER-stepN with token <TOKEN-stepN>, unless given."""
    loader = _load_safetensors if path.suffix.lower() == ".safetensors" else _load_pickle
    concept = loader(path, token=token, name=name or f"{_folder_slug(path.parent)}-step{step}")
    if token:
        return concept
    own = concept.token
    stepped = f"{own[:-1]}-step{step}>" if own.endswith(">") else f"{own}-step{step}"
    try:
        return Concept(concept.name, stepped, concept.vectors, concept.metadata)
    except ConceptError as exc:
        raise ConceptFileError(f"{path}: {exc} (import it with --token)") from None


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path``, its links followed, is inside ``folder`` (its links followed too)."""
    return path.resolve().is_relative_to(folder.resolve())


def _folder_preview(folder: Path) -> dict[str, str]:
    """The concept folder's picture as the concept's preview: the ``preview.png`` an sd-concepts
    export writes, else the first of the ``concept_images/`` an sd-concepts-library repository
    holds (its training pictures). Nothing if there is none or it cannot be read: the vectors are
    what matters."""
    import base64

    from conceptlib.images import EXTENSIONS, picture_thumbnail_png

    examples = folder / "concept_images"
    candidates = [folder / "preview.png"]
    if examples.is_dir():
        candidates += sorted(p for p in examples.iterdir() if p.suffix.lower() in EXTENSIONS and not p.name.startswith("."))
    for picture in candidates:
        # A link to a picture elsewhere would copy it into the concept, and into every export.
        if picture.is_file() and _within(picture, folder):
            try:
                return {"preview": base64.b64encode(picture_thumbnail_png(picture)).decode("ascii")}
            except ConceptFileError:
                continue
    return {}


def _read_text(path: Path, limit: int = 4096) -> str:
    """A concept folder's small text file (a token, a concept type), "" if there is none; a pipe,
    device or long file there is refused unread (``read_small_file``)."""
    try:
        data = read_small_file(path, limit)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ConceptFileError(f"{path}: cannot read ({exc.strerror or exc}); fix or delete the file") from None
    except NotARegularFile as exc:
        raise ConceptFileError(f"{path}: {exc}; replace it with a text file or delete it") from None
    except FileTooLarge as exc:
        raise ConceptFileError(f"{path}: {exc}, where it holds a word or two; fix or delete the file") from None
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ConceptFileError(f"{path}: cannot read ({exc}); fix or delete the file") from None


def _folder_slug(path: Path) -> str:
    return slug_from_token(path.resolve().name)


# -- safetensors ---------------------------------------------------------------------------------

def _load_safetensors(path: Path, *, token: str | None, name: str | None) -> Concept:
    kind = _sniff(path)
    if kind == "pytorch":
        raise UnsupportedFormatError(
            f"{path}: a PyTorch file (torch.save), not safetensors, despite its name; rename it to "
            f"{path.stem}.pt and import that"
        )
    if kind == "unknown":
        raise ConceptFileError(
            f"{path}: not a safetensors file (it does not start with a safetensors header); the download is "
            "damaged or is something else (an HTML error page?): re-download it"
        )
    header = read_file_header(path)  # validates framing, truncation, JSON
    keys = [t.key for t in header.tensors]
    _refuse_other_models(path, keys)
    if len(keys) != 1:
        _refuse_several_tokens(path, {t.key: t.shape for t in header.tensors})
        raise UnsupportedFormatError(
            f"{path}: holds {len(keys)} tensors ({', '.join(keys[:5]) or 'none'}{', ...' if len(keys) > 5 else ''}); "
            "a textual-inversion embedding holds exactly one (is this a model checkpoint or a LoRA?)"
        )
    key = keys[0]
    vectors = _read_safetensors_tensor(header)
    metadata = dict(header.metadata)
    if not metadata.get("preview"):
        metadata.update(_embedded_preview(metadata))
    if metadata.get("format") == FORMAT and key not in ("emb_params", "*"):
        # Our own file: it names itself.
        return _make(path, metadata.get("name"), key, vectors, metadata, token=token, name=name, fmt=None)
    if key in _FILE_NAMED_KEYS:
        # kohya-ss, A1111's safetensors variant, pivotal tuning: the file name is the trigger word.
        trigger = metadata.get("modelspec.trigger_phrase") or token_from_file_name(path.stem)
        metadata["source_format"] = _FILE_NAMED_KEYS[key]
        return _make(path, path.stem, trigger, vectors, metadata, token=token, name=name, fmt=_FILE_NAMED_KEYS[key])
    metadata["source_format"] = "diffusers"
    return _make(path, None, key, vectors, metadata, token=token, name=name, fmt="diffusers")


def _embedded_preview(metadata: dict) -> dict[str, str]:
    """A foreign file's own picture as the concept's preview: kohya's first cover image
    (``ssmd_cover_images``, as AUTOMATIC1111 and ComfyUI show it), else a ModelSpec thumbnail data
    URI. Nothing if there is none or it cannot be read."""
    import base64
    import binascii

    from conceptlib.images import thumbnail_png_of_bytes

    candidates = []
    try:
        covers = json.loads(metadata.get("ssmd_cover_images") or "[]")
        candidates += [c for c in covers if isinstance(c, str)] if isinstance(covers, list) else []
    except (ValueError, RecursionError):
        pass
    thumbnail = metadata.get("modelspec.thumbnail", "")
    if thumbnail.startswith("data:image/") and "base64," in thumbnail:
        candidates.append(thumbnail.partition("base64,")[2])
    for encoded in candidates:
        try:
            png = thumbnail_png_of_bytes(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
        if png is not None:
            return {"preview": base64.b64encode(png).decode("ascii")}
    return {}


def _read_safetensors_tensor(header: FileHeader):
    """The header's one tensor as float32 numpy, parsed directly (numpy's safetensors loader lacks
    BF16). ``read_file_header`` has validated its data_offsets against the file."""
    import numpy as np

    path, tensor = header.path, header.tensors[0]
    dtype = _SAFETENSORS_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise ConceptFileError(f"{path}: tensor {tensor.key!r} is {tensor.dtype}; embeddings are F32, F16 or BF16")
    elements = math.prod(tensor.shape)  # Python ints: numpy's product wraps around to 0
    if elements > MAX_VECTORS * max(DIMS.values()):
        # Refused from the header, unread: a mistaken model file can be gigabytes.
        raise ConceptFileError(f"{path}: tensor {tensor.key!r} has shape {list(tensor.shape)}, larger than any "
                               f"textual-inversion embedding (1 to {MAX_VECTORS} vectors of 768 or 1024), so this "
                               "file is not one")
    start, end = tensor.data_offsets
    with open(path, "rb") as handle:
        handle.seek(header.data_start + start)
        raw = handle.read(end - start)
    itemsize = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
    expected = itemsize * elements
    if len(raw) != expected:
        raise ConceptFileError(f"{path}: tensor {tensor.key!r} has {len(raw)} data bytes for shape {list(tensor.shape)} "
                               f"(expected {expected}); the file is corrupt, re-download or re-export it")
    if dtype == "bf16":
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=dtype)
    return array.reshape(tensor.shape).astype(np.float32)


def _sniff(path: Path) -> str | None:
    """What the first bytes say the file is: 'pytorch', 'safetensors' or 'unknown'; None when it
    is too short or unreadable to tell (the format's own reader then says what is wrong)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return None
    # A torch zip archive, or a legacy torch.save file (pickle protocol 2 + the magic number).
    if head[:4] in (b"PK\x03\x04", b"\x80\x02\x8a\x0a"):
        return "pytorch"
    if len(head) < 9:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    return "safetensors" if length <= MAX_HEADER_BYTES and head[8:9] == b"{" else "unknown"


# -- pickles ---------------------------------------------------------------------------------------

def _load_pickle(path: Path, *, token: str | None, name: str | None) -> Concept:
    from conceptlib.pickle_safe import load_tensor_pickle

    if _sniff(path) == "safetensors":
        raise UnsupportedFormatError(
            f"{path}: a safetensors file, not a PyTorch file, despite its name; rename it to "
            f"{path.stem}.safetensors and import that"
        )
    return _load_embedding_dict(path, load_tensor_pickle(path), "a PyTorch file", word=path.stem, token=token, name=name)


def _load_embedding_dict(path: Path, data, what: str, *, word: str, token: str | None, name: str | None) -> Concept:
    """A concept from the dictionary a .pt/.bin file (or an AUTOMATIC1111 embedding image) holds;
    ``word`` is AUTOMATIC1111's prompt word for it."""
    expected = "expected AUTOMATIC1111's string_to_param or diffusers' {token: tensor}"
    if _is_array(data):
        if token:  # as diffusers' load_textual_inversion takes one: the caller names its token
            return _make(path, path.stem, token, data, {"source_format": "tensor"}, token=token, name=name, fmt="tensor")
        suggestion = shlex.quote(f"<{slug_from_token(path.stem)}>")
        raise UnsupportedFormatError(
            f"{path}: holds a bare tensor of shape {list(data.shape)}, not a dictionary of embeddings, so its token is "
            f"unknown; import this file by itself with --token {suggestion}"
        )
    if not isinstance(data, dict):
        raise UnsupportedFormatError(f"{path}: holds a {type(data).__name__}, not a dictionary of embeddings; {expected}")
    _refuse_other_models(path, list(data))
    if "string_to_param" in data:
        return _load_a1111(path, data, word=word, token=token, name=name)
    if "emb_params" in data and _is_array(data["emb_params"]):
        return _make(path, path.stem, token_from_file_name(path.stem), data["emb_params"], {"source_format": "kohya"},
                     token=token, name=name, fmt="kohya")
    tensors = {k: v for k, v in data.items() if _is_array(v)}
    if len(data) == 1 and set(tensors) & set(_PIVOTAL_KEYS):
        (key, vectors), = tensors.items()
        return _make(path, path.stem, token_from_file_name(path.stem), vectors, {"source_format": "pivotal"},
                     token=token, name=name, fmt="pivotal")
    if len(data) == len(tensors) > 1:
        _refuse_several_tokens(path, {key: tuple(value.shape) for key, value in tensors.items()})
    if len(data) == 1 and len(tensors) == 1 and isinstance(next(iter(tensors)), str):
        key, vectors = next(iter(tensors.items()))
        return _make(path, None, key, vectors, {"source_format": "diffusers"}, token=token, name=name, fmt="diffusers")
    keys = ", ".join(_short(key) for key in list(data)[:5])
    raise UnsupportedFormatError(f"{path}: {what} but not a textual-inversion embedding (keys: {keys}); {expected}")


def _short(value, limit: int = 60) -> str:
    """``value`` as text of at most ``limit`` characters, whatever a pickle made it (reprlib
    never converts a huge int to all its digits, nor recurses deeply)."""
    import reprlib

    if isinstance(value, str):
        return value if len(value) <= limit else value[: limit - 3] + "..."
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<a {value.bit_length()}-bit number>"
    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    try:
        return short.repr(value)[:limit]
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _load_a1111(path: Path, data: dict, *, word: str, token: str | None, name: str | None) -> Concept:
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
        # Only what AUTOMATIC1111 writes there (text or a number), kept short: a pickle could give a
        # 20,000-digit number or a structure too deep to print.
        if isinstance(value, (str, float)) or (type(value) is int and value.bit_length() <= 64):
            metadata[f"a1111.{key}"] = _short(value, 256)
    # AUTOMATIC1111 uses the file name (an image: its data's name) as the word prompts contain.
    file_word = token_from_file_name(word) if word == path.stem else _token_from_text(word)
    own = data.get("conceptlib")
    if isinstance(own, dict):  # exported by conceptlib: its token and description come back
        metadata.update({key: _short(value, _MAX_DESCRIPTION) for key, value in own.items()
                         if key in A1111_EXTRA_KEYS and isinstance(value, str)})
        if isinstance(own.get("token"), str) and own["token"].strip():
            file_word = own["token"]
    return _make(path, word, file_word, vectors, metadata, token=token, name=name, fmt="a1111")


# What conceptlib keeps in an AUTOMATIC1111 file's "conceptlib" entry (writers.a1111_extra) besides
# the token, and the longest text taken from it.
A1111_EXTRA_KEYS = (*DESCRIPTIVE_KEYS.values(), "created_at", "base_model")
_MAX_DESCRIPTION = 20000


# -- images ----------------------------------------------------------------------------------------

def _load_image(path: Path, *, token: str | None, name: str | None) -> Concept:
    """An AUTOMATIC1111 embedding image; its picture becomes the concept's preview."""
    import base64

    from conceptlib.images import thumbnail_png

    found = a1111_image.read(path)
    if found is None:
        raise UnsupportedFormatError(
            f"{path}: an image without an embedding in it (no sd-ti-embedding text chunk, no data strips beside the "
            "picture); only AUTOMATIC1111's embedding images carry one: import the embedding's .pt/.safetensors file"
        )
    word = found.data.get("name")
    word = word if isinstance(word, str) and word.strip() else path.stem
    concept = _load_embedding_dict(path, found.data, "an embedding image", word=word, token=token, name=name)
    metadata = dict(concept.metadata)
    if metadata.get("source_format") == "a1111":
        metadata["source_format"] = "a1111-image"
    # A picture of one colour is the plain card an exporter draws for a concept without a
    # preview (conceptlib's grey one): no preview, or a round trip would invent one.
    if found.picture.size and found.picture.min() != found.picture.max():
        metadata["preview"] = base64.b64encode(thumbnail_png(found.picture)).decode("ascii")
    return Concept(concept.name, concept.token, concept.vectors, metadata)


# -- common ----------------------------------------------------------------------------------------

def _is_array(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _refuse_other_models(path: Path, keys) -> None:
    """SDXL and FLUX embeddings: one tensor per text encoder, for models KerasCV does not have."""
    for model, encoders in (("SDXL", _SDXL_KEYS), ("FLUX", _FLUX_KEYS)):
        if encoders <= set(keys):
            raise UnsupportedFormatError(
                f"{path}: a{'n' if model == 'SDXL' else ''} {model} embedding ({' + '.join(sorted(encoders))}, two text "
                f"encoders); KerasCV has no {model}, so conceptlib supports SD 1.x (768) and SD 2.x (1024) embeddings only"
            )


def _refuse_several_tokens(path: Path, shapes: dict) -> None:
    """A file of several token embeddings (every tensor (n, d) or (d,) with d an SD width)."""
    if len(shapes) > 1 and all(0 < len(shape) <= 2 and shape[-1] in DIMS.values() for shape in map(tuple, shapes.values())):
        keys = ", ".join(_short(str(key), 40) for key in list(shapes)[:5]) + (", ..." if len(shapes) > 5 else "")
        raise UnsupportedFormatError(
            f"{path}: holds {len(shapes)} token embeddings ({keys}); conceptlib, like AUTOMATIC1111 and diffusers, "
            "takes one token per file: save each token's tensor to a file of its own and import those"
        )


def _token_from_text(text: str) -> str:
    """A usable token from a file name, a file's key or token_identifier.txt: lowercase (KerasCV
    lowercases prompts), whitespace replaced by '-', in Unicode NFC form (what keyboards type;
    macOS stores file names decomposed). Never shortened: prompts must match what other tools use."""
    return re.sub(r"\s+", "-", unicodedata.normalize("NFC", text.strip()).lower())


def token_from_file_name(stem: str) -> str:
    """``_token_from_text`` of a file name without the brackets, braces and backslashes that are
    prompt syntax in AUTOMATIC1111, ComfyUI and compel (emphasis, escapes): 'Cool (v2) [final]'
    gives 'cool-v2-final', a token prompts can hold. Such a file's own name cannot be typed
    there either; a token read from inside a file is kept as it is."""
    cleaned = _token_from_text(re.sub(r"[()\[\]{}\\]+", "", stem))
    return cleaned or _token_from_text(stem)


def _refuse_long(path: Path, stem_name: str | None, derived_token: str, *, token, name) -> None:
    """A token or name longer than 64 characters would have to be cut short, and prompts written
    for other tools would then not match it; ask for explicit ones instead."""
    options = []
    if not token and len(derived_token) > _MAX_LENGTH:
        options.append("--token")
    if not name and stem_name and len(stem_name) > _MAX_LENGTH:
        options.append("--name")
    if options:
        fix = f"import it alone with {' and '.join(options)} to choose shorter ones"
        if len(path.stem) > _MAX_LENGTH:
            source, fix = f"the file name {path.stem[:24]!r}...", f"rename the file, or {fix}"
        else:
            source = f"{(derived_token if '--token' in options else stem_name)[:24]!r}..., taken from inside the file,"
        raise ConceptFileError(
            f"{path}: {source} has more than {_MAX_LENGTH} characters, the most a token or name may have; {fix}"
        )


def _make(path: Path, stem_name: str | None, file_token: str, vectors, metadata: dict, *, token, name, fmt) -> Concept:
    if _is_array(vectors) and vectors.dtype.kind != "f":
        raise ConceptFileError(f"{path}: the embedding holds {vectors.dtype} values, but embeddings are floating-point "
                               "(float32, float16 or bfloat16), so this file is not one")
    derived_token = _token_from_text(str(file_token))
    _refuse_long(path, stem_name, derived_token, token=token, name=name)
    final_token = token or derived_token
    if name:
        final_name = name
    elif stem_name and is_valid_name(stem_name) and stem_name not in _GENERIC_STEMS:
        final_name = stem_name
    elif stem_name and slug_from_token(stem_name) not in _GENERIC_STEMS:
        final_name = slug_from_token(stem_name)
    else:
        final_name = slug_from_token(final_token)
    metadata = {str(k): str(v) for k, v in metadata.items()}
    if fmt is not None:
        # A file name from another system may not be UTF-8 (metadata must be): escaped, not refused.
        metadata.setdefault("source_file", path.name.encode("utf-8", "backslashreplace").decode("utf-8"))
        if "created_at" not in metadata and is_iso_date(metadata.get("modelspec.date", "")):
            # When the concept was made (ModelSpec's date: kohya, other trainers), not when imported.
            metadata["created_at"] = metadata["modelspec.date"]
    if not token:
        try:
            validate_token(derived_token)
        except ConceptError as exc:  # the file's token: only --token can change it
            raise ConceptFileError(
                f"{path}: {exc} (import this file by itself with --token {shlex.quote(suggested_token(derived_token))})"
            ) from None
    try:
        return Concept(name=final_name, token=final_token, vectors=vectors, metadata=metadata)
    except ConceptError as exc:
        raise ConceptFileError(f"{path}: {exc}") from None

