"""`conceptlib export`: write library concepts in other tools' formats (one file, or several
into another tool's folder), with the checks that keep existing files. Imports no TensorFlow."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from conceptlib.cli import main
from conceptlib.cli.library_commands import _library, _listed, _warn_problems, refuse_empty_tags
from conceptlib.errors import ConceptError, ConceptFileError, UsageError
from conceptlib.files import write_failure_reason
from conceptlib.formats.writers import EXPORT_FORMATS, PREVIEW_FILE_FORMATS


# What each format's file must be called for its tool to pick the right loader: A1111, ComfyUI,
# diffusers and kohya choose torch.load or safetensors by the extension.
_EXPORT_SUFFIXES = {
    "conceptlib": (".safetensors",),
    "diffusers": (".safetensors", ".bin"),
    "a1111": (".pt", ".png"),
    "kohya": (".safetensors",),
}


# What users call the tools whose files a format is (ComfyUI, InvokeAI and SD.Next load A1111's).
_FORMAT_ALIASES = {"automatic1111": "a1111", "webui": "a1111", "comfyui": "a1111", "invokeai": "a1111",
                   "sdnext": "a1111", "sd-next": "a1111"}


class _FormatChoice(click.Choice):
    """--format: a format, in any case, or the name of a tool that loads it (``_FORMAT_ALIASES``)."""

    def convert(self, value, param, ctx):
        return super().convert(_FORMAT_ALIASES.get(str(value).lower(), value), param, ctx)


@main.command("export")
@click.argument("refs", metavar="NAME...", nargs=-1)
@click.option("--all", "export_all", is_flag=True, help="Export every concept in the library (into the --out folder).")
@click.option("--format", "fmt", type=_FormatChoice(EXPORT_FORMATS, case_sensitive=False), default=None,
              help="conceptlib | diffusers (learned_embeds.safetensors, or .bin) | a1111 (.pt, or an embedding image with "
                   "--out X.png) | sd-concepts (folder) | kohya (emb_params).")
@click.option("--out", type=click.Path(path_type=str), default=None,
              help="File to write, or a folder (existing, or given with a trailing '/'; the conventional file name is "
                   "used inside). Default: the current folder; for sd-concepts ./NAME/. Several concepts: a folder.")
@click.option("--force", "--overwrite", "force", is_flag=True, help="Replace existing files.")
@click.option("--with-preview", is_flag=True,
              help="Also write each concept's preview beside its file as NAME.preview.png: the card picture "
                   "AUTOMATIC1111's (and SD.Next's) Extra Networks tab shows (a1111, kohya, conceptlib).")
@click.option("--base-model", "--model", "base_model", type=click.Choice(["sd-1", "sd-2"]),
              help="With --all: only the concepts for this base model (a tool's folder holds one model's).")
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="With --all: only the concepts with this tag (as `list --tag`; repeat for all of several).")
@click.option("--keep-training-photo", is_flag=True,
              help="Export a preview that is one of the concept's training images (trained without --preview-every, "
                   "a concept keeps its first image as its preview). Left out by default: it is one of your photos.")
def export_command(refs: tuple[str, ...], export_all: bool, fmt: str, out: str | None, force: bool,
                   with_preview: bool, base_model: str | None, tags: tuple[str, ...],
                   keep_training_photo: bool) -> None:
    """Export concept NAME in another tool's format; several NAMEs or --all export into one folder
    (e.g. another tool's embeddings folder). NAME may also be a concept file or folder of any
    format `import` reads: it is converted without being imported.

    \b
    Examples:
      conceptlib export cat-doll --format a1111
      conceptlib export --all --format a1111 --out ~/stable-diffusion-webui/embeddings/
      conceptlib export --all --base-model sd-2 --format kohya --out ~/sd2-embeddings/
      conceptlib export 'Cool Style.pt' --format diffusers --out cool-style/"""
    if fmt is None:  # checked here: click lists the choices on five lines
        raise UsageError(f"missing --format: one of {', '.join(EXPORT_FORMATS)} (e.g. --format a1111 for "
                         "AUTOMATIC1111 and ComfyUI, --format diffusers for diffusers)")
    if export_all and refs:
        raise UsageError("give concept NAMEs or --all, not both")
    if not refs and not export_all:
        raise UsageError("missing NAME: give the concept to export (or several, or --all)")
    if (base_model or tags) and not export_all:
        option = "--base-model" if base_model else "--tag"
        raise UsageError(f"{option} chooses among --all; add --all, or drop {option} and name the concepts")
    refuse_empty_tags(tags)
    if with_preview and (fmt not in PREVIEW_FILE_FORMATS or (out or "").lower().endswith(".png")):
        raise UsageError(f"--with-preview: only {', '.join(PREVIEW_FILE_FORMATS)} files get a NAME.preview.png "
                         "beside them (an embedding image is its own picture); drop --with-preview")
    if len(refs) == 1 and not export_all:
        _export_one(refs[0], fmt, out, force, with_preview, keep_training_photo)
    else:
        _export_many(refs, fmt, out, force, with_preview, keep_training_photo, base_model, tags)


def _export_one(ref: str, fmt: str, out: str | None, force: bool, with_preview: bool, keep_photo: bool) -> None:
    from conceptlib.formats.writers import default_file, sd_concepts_files

    target, folder = _export_target(fmt, out)
    library = _library()
    concept = _concept_to_export(library, ref, keep_photo)
    if fmt == "sd-concepts":
        target = target / concept.name if folder else target or Path(concept.name)
        folder = False
        files = [target / name for name in sd_concepts_files(concept)]
    else:
        files = [target / default_file(concept, fmt)] if folder else [target]
    file = files[0]
    _refuse_library_folder(file, out, library)
    if not force and any(path.exists() for path in files) and not _differing_file(
        concept, fmt, target, folder, files, with_preview
    ):
        # The same export again (a script run twice): nothing to do, as for several concepts.
        preview = _preview_target(concept, fmt, file, True) if with_preview else None
        click.echo(f"Unchanged {concept.name}: {file if fmt != 'sd-concepts' else target} already holds this export")
        if preview is not None and not preview.exists():
            _write_preview_file(concept, preview)
        return
    preview = _preview_target(concept, fmt, file, force) if with_preview else None
    _say_exported(concept, fmt, _write_export(concept, fmt, target, folder, force))
    if with_preview:
        _write_preview_file(concept, preview)


def _note_mixed_base_models(concepts) -> None:
    """A tool's embeddings folder serves one base model: the others' files are skipped by
    AUTOMATIC1111 and rejected (shape mismatch) by ComfyUI, so a folder of several is said."""
    from collections import Counter

    counts = Counter(concept.base_model for concept in concepts)
    if len(counts) > 1:
        held = " and ".join(f"{count} {model}" for model, count in sorted(counts.items()))
        click.echo(f"Note: these are {held} concepts in one folder; a tool uses only those of the model it runs "
                   "(export each base model to its own folder with --all --base-model MODEL)", err=True)


def _say_exported(concept, fmt: str, written: Path, *, several: bool = False) -> None:
    """The line for one exported file; for a file whose prompt word in AUTOMATIC1111 is not the
    token (it calls a file by its name, ComfyUI by embedding:NAME), that word, and a warning when
    it is an ordinary CLIP word (which only AUTOMATIC1111 would take for the concept)."""
    from conceptlib.formats.writers import a1111_prompt_word, preview_png

    line = f"Exported {concept.name} ({concept.token}) as {fmt} to {written}"
    if written.suffix.lower() == ".png" and preview_png(concept.metadata) is None:
        click.echo(f"Note: {concept.name} has no preview, so its embedding image is a plain grey card (give it one: "
                   f"conceptlib describe {shlex.quote(concept.name)} --thumbnail IMAGE)", err=True)
    # AUTOMATIC1111, ComfyUI and kohya call an embedding file by its name; diffusers by the token.
    word = a1111_prompt_word(concept, written) if fmt in ("a1111", "conceptlib", "kohya") else concept.token
    if word != concept.token:
        line += f"; AUTOMATIC1111 prompts call it {word!r} (its file name; ComfyUI: embedding:{word})"
        if _is_clip_word_if_known(word):
            other = written.with_name(f"{word}-ti{written.suffix}")
            fix = (f"rename the file: mv {shlex.quote(str(written))} {shlex.quote(str(other))}" if several
                   else f"choose another word with --out WORD{written.suffix}")
            line += (f", which is also an ordinary word, so every {word!r} in an AUTOMATIC1111 prompt would mean "
                     f"the concept: {fix}")
    click.echo(line)


def _is_clip_word_if_known(word: str) -> bool:
    """``is_clip_word``, False (with a warning) when $CONCEPTLIB_CLIP_VOCAB cannot be read: the file
    is written already, and a warning must not stop the export of the rest."""
    from conceptlib.cli.library_commands import is_clip_word
    from conceptlib.errors import VocabularyError

    try:
        return is_clip_word(word)
    except VocabularyError as exc:
        click.echo(f"Warning: {word!r} not checked against the CLIP vocabulary: {exc}", err=True)
        return False


def _preview_target(concept, fmt: str, file: Path, force: bool) -> Path | None:
    """Where ``--with-preview`` writes ``concept``'s preview for its export ``file`` (None: it has
    no preview); an existing one is refused without ``force``, before anything is written."""
    from conceptlib.formats.writers import preview_file_for, preview_png

    path = preview_file_for(fmt, file)
    if path is None or preview_png(concept.metadata) is None:
        return None
    if path.exists() and not force:
        raise ConceptFileError(f"{path}: already exists, so nothing was exported; choose another --out or pass "
                               "--force to replace such files")
    return path


def _write_preview_file(concept, path: Path | None) -> None:
    from conceptlib.files import atomic_write_bytes
    from conceptlib.formats.writers import preview_png

    if path is None:
        click.echo(f"Note: {concept.name} has no preview to write (give it one: conceptlib describe {concept.name} "
                   "--thumbnail IMAGE)", err=True)
        return
    atomic_write_bytes(path, preview_png(concept.metadata), fix="choose another --out")
    click.echo(f"  with its preview {path}")


def _export_many(refs: tuple[str, ...], fmt: str, out: str | None, force: bool, with_preview: bool,
                 keep_photo: bool, base_model: str | None, tags: tuple[str, ...]) -> None:
    """Several concepts into one folder: every concept and every target is checked before the
    first file is written, so a refusal writes nothing."""
    from conceptlib.formats.writers import paths_in_folder

    folder = Path(out).expanduser() if out is not None else Path(".")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {out}: exporting several concepts needs a folder, and this is a file; "
                         "give a folder (it is created if missing)")
    if not folder.exists() and folder.suffix.lower() in (".safetensors", ".bin", ".pt", ".png"):
        raise UsageError(f"--out {out}: several concepts go into a folder, and this names a file; give a folder "
                         f"(e.g. --out {shlex.quote(str(folder.with_suffix('')) + '/')})")
    library = _library()
    _refuse_library_folder(folder, out, library)
    if refs:
        names = list(dict.fromkeys(refs))
    else:
        everything = library.summaries()
        _warn_problems(library)  # as `list` does: a file left out is said, not silently skipped
        names = [row["name"] for row in everything if _listed(row, None, base_model, tags)]
        if everything and not names:
            chosen = " and ".join(filter(None, [base_model and f"--base-model {base_model}",
                                                tags and " ".join(f"--tag {shlex.quote(t)}" for t in tags)]))
            raise ConceptError(f"none of the {len(everything)} concepts in the library has {chosen}: nothing to export; "
                               "see conceptlib list")
    if not names:
        raise ConceptError("the library is empty: nothing to export")
    concepts = list({concept.name: concept for concept in (_concept_to_export(library, n, keep_photo) for n in names)}.values())
    if len(concepts) < len({_same_concept_key(library, n) for n in names}):
        raise UsageError(f"{', '.join(names)}: two of these are concepts named alike (files named the same?), whose "
                         f"exports would replace each other in {folder}; export them one at a time with --out")
    plans = [(concept, *paths_in_folder(concept, fmt, folder)) for concept in concepts]
    owners = {}
    for concept, _, files in plans:
        # Case-insensitively: macOS' and Windows' file systems (and an A1111 folder on them) are.
        other = owners.setdefault(str(files[0]).casefold(), concept.name)
        if other != concept.name:
            raise UsageError(f"{other} and {concept.name} would both be written to {files[0]}; export one of them "
                             "by itself with --out")
    unchanged, previews_only = 0, []
    if not force:
        # Exporting into a tool's folder again (to sync it) passes over files that already hold
        # what would be written; any other existing file stops everything.
        kept = []
        for concept, target, files in plans:
            if not any(path.exists() for path in files):
                kept.append((concept, target, files))
                continue
            differs = _differing_file(concept, fmt, target, True, files, with_preview)
            if differs is not None:
                raise ConceptFileError(f"{differs}: already exists and differs from this export, so nothing was "
                                       "exported; choose another --out or pass --force to replace such files")
            unchanged += 1
            preview = _preview_target(concept, fmt, files[0], True) if with_preview else None
            if preview is not None and not preview.exists():  # a folder synced before without previews
                previews_only.append((concept, preview))
        plans = kept
    previews = [_preview_target(concept, fmt, files[0], force) if with_preview else None for concept, _, files in plans]
    for (concept, target, _), preview in zip(plans, previews):
        _say_exported(concept, fmt, _write_export(concept, fmt, target, True, force), several=True)
        if with_preview:
            _write_preview_file(concept, preview)
    for concept, preview in previews_only:
        from conceptlib.files import atomic_write_bytes
        from conceptlib.formats.writers import preview_png

        atomic_write_bytes(preview, preview_png(concept.metadata), fix="choose another --out")
        click.echo(f"Unchanged {concept.name}; wrote its preview {preview}")
    same = f" ({unchanged} already there, unchanged)" if unchanged else ""
    click.echo(f"{len(plans)} concept{'s' if len(plans) != 1 else ''} exported to {folder}{same}")
    _note_mixed_base_models(concepts)
    if not refs and library.problems:
        # The rest is exported; a script syncing a tool's folder must still learn that it is not whole.
        count = len(library.problems)
        raise ConceptError(f"{count} file{'s' if count != 1 else ''} in the library could not be read (the warnings "
                           f"above) and {'were' if count != 1 else 'was'} not exported; fix or remove "
                           f"{'them' if count != 1 else 'it'}, then export again")


def _differing_file(concept, fmt: str, target: Path, folder: bool, files: list[Path], with_preview: bool) -> Path | None:
    """The first of ``files`` (what exporting ``concept`` to ``target`` writes; ``folder``: into
    it), or the existing preview beside them, that does not hold exactly what that export would
    write, else None (safetensors compared by header and data: their metadata order varies
    between writes). The export is made again in a scratch folder, under the same names."""
    import tempfile

    from conceptlib.formats import export
    from conceptlib.formats.writers import preview_file_for, preview_png

    target, files = Path(os.path.abspath(target)), [Path(os.path.abspath(path)) for path in files]  # '.' has no name
    with tempfile.TemporaryDirectory() as scratch:
        again = Path(scratch) / target.name
        if folder:
            again.mkdir()
        export(concept, fmt, again, overwrite=False)
        fresh = [Path(scratch) / path.relative_to(target.parent) for path in files]
        differs = next((old for old, new in zip(files, fresh) if not (old.is_file() and _same_content(old, new))), None)
    if differs is not None:
        return differs
    preview = preview_file_for(fmt, files[0]) if with_preview else None
    data = preview_png(concept.metadata) if preview is not None else None
    if data is not None and preview.exists() and preview.read_bytes() != data:
        return preview
    return None


def _same_content(old: Path, new: Path) -> bool:
    if old.stat().st_size != new.stat().st_size:  # before reading: the old file may be anyone's, and big
        return False
    a, b = old.read_bytes(), new.read_bytes()
    if a == b:
        return True
    if new.suffix != ".safetensors" or len(a) < 8:
        return False
    import json
    import struct

    size = struct.unpack("<Q", b[:8])[0]
    if struct.unpack("<Q", a[:8])[0] != size or a[8 + size:] != b[8 + size:]:
        return False
    try:
        return json.loads(a[8:8 + size]) == json.loads(b[8:8 + size])
    except ValueError:
        return False


def _same_concept_key(library, ref: str):
    """What ``ref`` names: a library concept (by its name) or a file (by its resolved path)."""
    from conceptlib.errors import ConceptlibError

    try:
        return ("library", library.header(ref).name)
    except ConceptlibError:
        return ("file", str(Path(ref).resolve()))


def _concept_to_export(library, ref: str, keep_photo: bool):
    """Library concept ``ref`` (name or token), else the concept file or folder at that path: a
    download converts for another tool without being imported. A preview that is one of the
    training images is left out (said on stderr) unless ``keep_photo``."""
    from conceptlib.errors import NotFoundError

    from conceptlib.cli.library_commands import refuse_missing_path

    try:
        concept = library.get(ref)
    except NotFoundError:
        if not os.path.exists(ref):
            refuse_missing_path(ref)
            raise
        from conceptlib.formats import load_source

        concept = load_source(Path(ref))
    if keep_photo or concept.metadata.get("preview_source") != "training-image":
        return concept
    from conceptlib.concept import Concept

    click.echo(f"Note: {concept.name}'s preview is one of its training images, so it is left out of the export "
               f"(--keep-training-photo exports it; conceptlib describe {shlex.quote(concept.name)} --thumbnail IMAGE "
               "gives the concept another)", err=True)
    metadata = {key: value for key, value in concept.metadata.items() if key not in _PREVIEW_KEYS}
    return Concept(concept.name, concept.token, concept.vectors, metadata)


# Where a concept's metadata holds its preview (files.concept_metadata adds the last two).
_PREVIEW_KEYS = ("preview", "preview_source", "modelspec.thumbnail", "ssmd_cover_images")


def _refuse_library_folder(path: Path, out: str | None, library) -> None:
    """Exports are other tools' files: none may land in the library's concepts folder, where it
    would become a second concept with the same token, or replace one."""
    concepts = Path(library.concepts_dir).expanduser().resolve()
    resolved = path.expanduser().resolve()
    if resolved == concepts or concepts in resolved.parents:
        raise UsageError(f"--out {out or '.'}: that is in the library's concepts folder {concepts}, where an exported "
                         "file would become (or replace) a library concept; export to a folder outside the library")


def _write_export(concept, fmt: str, target: Path, folder: bool, force: bool) -> Path:
    from conceptlib.files import WriteError
    from conceptlib.formats import export

    try:
        if folder:
            target.mkdir(parents=True, exist_ok=True)
        return export(concept, fmt, target, overwrite=force)
    except WriteError as exc:
        raise WriteError(exc.path, exc.reason, "choose another --out") from None
    except OSError as exc:
        raise WriteError(target, write_failure_reason(target, exc), "choose another --out") from None


def _export_target(fmt: str, out: str | None) -> tuple[Path | None, bool]:
    """(--out as a path, whether it is a folder to write the conventional file name into). A file
    path must end in an extension its format's tools load (a usage error otherwise)."""
    if out is None:
        return (None, False) if fmt == "sd-concepts" else (Path("."), True)
    target = Path(out).expanduser()
    if fmt == "sd-concepts":
        # The concept folder itself, unless that would scatter its four files among others: a
        # folder given with a trailing '/', or one holding other files, gets OUT/NAME/ inside.
        holds_others = target.is_dir() and any(target.iterdir()) and not (target / "learned_embeds.bin").exists()
        return target, holds_others or out.endswith(("/", os.sep))
    if target.is_dir() or out.endswith(("/", os.sep)):
        return target, True
    suffixes = _EXPORT_SUFFIXES[fmt]
    if target.suffix.lower() not in suffixes:
        raise UsageError(
            f"--out {out}: {fmt} files must end in {' or '.join(suffixes)} (tools choose how to load a file by its "
            f"extension); use e.g. --out {shlex.quote(str(target.with_suffix(suffixes[0])))}, or a folder ending in '/'"
        )
    return target, False
