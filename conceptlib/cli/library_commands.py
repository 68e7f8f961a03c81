"""Library management commands (issue 2): list, show, remove, rename, describe, mix, path,
import (export is in export_command).

None of these import TensorFlow. ``list``, ``path`` and ``remove`` read only file headers
(``list`` also checks each new or changed file's few KB of vectors for NaN/Inf, once); ``show``
also reads the vectors for their norms (without numpy); ``rename`` rewrites the file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
from pathlib import Path

import click

from conceptlib.cli import confirm, main, printable
from conceptlib.errors import ConceptError, ConceptFileError, ConceptlibError, LibraryError, NotFoundError, UsageError
from conceptlib.cli.describe_options import describe_options, described
from conceptlib.files import DESCRIPTIVE_KEYS, LISTED_DESCRIPTIONS
from conceptlib.formats.readers import FILE_SUFFIXES, IMAGE_SUFFIXES


def _library():
    from conceptlib.library import ConceptLibrary

    return ConceptLibrary()


def refuse_empty_tags(tags: tuple[str, ...]) -> None:
    """--tag '' (list, export --all) would match only untagged concepts: a usage error."""
    if any(not tag.strip() for tag in tags):
        raise UsageError("--tag: give a tag (e.g. --tag anime); an empty one would match only untagged concepts")


def _listed(row: dict, pattern: str | None, base_model: str | None, tags: tuple[str, ...] = ()) -> bool:
    if base_model and row.get("base_model") != base_model:
        return False
    if tags:
        own = {tag.strip().lower() for tag in str(row.get("tags", "")).split(",")}
        if not all(tag.strip().lower() in own for tag in tags):
            return False
    if not pattern:
        return True
    import fnmatch

    pattern = pattern.lower()
    fields = tuple(str(row.get(key, "")).lower() for key in ("name", "token") + LISTED_DESCRIPTIONS)
    if any(char in pattern for char in "*?["):
        # A token such as '<style-[v2]>' is itself a pattern that does not match it: exact first.
        return any(field == pattern or fnmatch.fnmatchcase(field, pattern) for field in fields)
    return any(pattern in field for field in fields)


def _warn_problems(library) -> None:
    for problem in library.problems:
        click.echo(printable(f"Warning: skipped {problem.path}: {_strip_path(problem.message, problem.path)}"), err=True)


@main.command("list")
@click.argument("pattern", required=False)
@click.option("--base-model", "--model", "base_model", type=click.Choice(["sd-1", "sd-2"]), help="Only the concepts for this base model.")
@click.option("--tag", "tags", multiple=True, metavar="TAG",
              help="Only the concepts with this tag (`describe --tags`; whole tags, any case; repeat for all of several).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_command(pattern: str | None, base_model: str | None, tags: tuple[str, ...], as_json: bool) -> None:
    """List the concepts in the library; PATTERN keeps those whose name, token, title, description,
    author, license, category or tags (`conceptlib describe`) contain it (case-insensitive; *, ? and [...] make it a
    wildcard pattern that must match one of them whole).

    \b
    Examples:
      conceptlib list
      conceptlib list style --base-model sd-1
      conceptlib list --tag anime
      conceptlib list --json"""
    refuse_empty_tags(tags)
    library = _library()
    everything = library.summaries()
    _warn_problems(library)
    rows = [row for row in everything if _listed(row, pattern, base_model, tags)]
    if as_json:
        for row in rows:  # where each file is, for scripts that copy or sync them
            path = library.path_for(row["name"])
            row["path"] = str(path)
            try:
                row["size_bytes"] = path.stat().st_size
            except OSError:  # removed since it was listed
                row["size_bytes"] = None
        click.echo(json.dumps(rows))  # ASCII (\u escapes): valid UTF-8 JSON whatever the locale
        return
    if not everything:
        click.echo(f"No concepts in {library.root}. Add one with `conceptlib import PATH` or `conceptlib train`.")
        return
    if not rows:
        click.echo(f"None of the {len(everything)} concepts in {library.root} match.")
        return
    columns = [("NAME", "name"), ("TOKEN", "token"), ("VECTORS", "num_vectors"), ("DIM", "dim"),
               ("BASE", "base_model"), ("TRAINER", "trainer"), ("CREATED", "created_at")]
    table = [[title for title, _ in columns]] + [[str(row.get(key, "")) for _, key in columns] for row in rows]
    table = [[printable(cell) for cell in line] for line in table]
    widths = [max(_display_width(line[i]) for line in table) for i in range(len(columns))]
    out = "\n".join("  ".join(cell + " " * (w - _display_width(cell)) for cell, w in zip(line, widths)).rstrip()
                    for line in table)
    click.echo(out)


def _display_width(text: str) -> int:
    """Terminal columns ``text`` takes: CJK and other wide characters take two, combining marks none."""
    import unicodedata

    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


@main.command("show")
@click.argument("ref", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--preview", "preview_out", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.png",
              help="Also write the concept's preview image (a render from training, the first training image, or a describe --thumbnail) to FILE.png.")
@click.option("--nearest", type=click.IntRange(0, 100), default=0, metavar="K",
              help="Also list the K vocabulary words closest to each vector (cosine similarity in the text "
                   "encoder's token table; needs its weight file, never downloads).")
@click.option("--weights", "weights_dir", type=click.Path(file_okay=False, path_type=str), metavar="DIR",
              help="Folder with the text encoder's weights for --nearest (else $CONCEPTLIB_WEIGHTS or the Keras cache).")
@click.option("--force", "--overwrite", "force", is_flag=True, help="With --preview: replace an existing FILE.png.")
def show_command(ref: str, as_json: bool, preview_out: Path | None, nearest: int, weights_dir: str | None,
                 force: bool) -> None:
    """Show everything in a concept's header and its vector norms: a library concept (NAME or
    token), or any concept file or folder `import` reads, without importing it.

    \b
    Examples:
      conceptlib show cat-doll
      conceptlib show ~/Downloads/learned_embeds.safetensors --json"""
    from conceptlib.errors import NotFoundError
    from conceptlib.files import non_finite_vectors, vector_norms
    from conceptlib.library import non_finite_message

    library = _library()
    try:
        header = library.header(ref)
    except NotFoundError:
        if not os.path.exists(ref):
            refuse_missing_path(ref)
            raise
        header = _library_file_header(library, Path(ref))
        if header is None:
            _show_file(library, Path(ref), as_json, preview_out, nearest, weights_dir, force)
            return
    if preview_out is not None:
        _write_preview(header.name, header.path, header.metadata, preview_out, force)
    try:
        norms = vector_norms(header.path)
    except ConceptFileError as exc:
        from conceptlib.library import UnreadableConceptError

        raise UnreadableConceptError(exc, header.name) from None
    bad = non_finite_vectors(norms)
    if bad:
        click.echo(f"Warning: {non_finite_message(header.path, header.name, bad)}", err=True)
    info = header.summary()
    # JSON has no NaN: a vector holding NaN or Inf has the norm null.
    try:
        size = header.path.stat().st_size
    except FileNotFoundError:
        raise NotFoundError(f"concept {header.name!r} was removed (or renamed) just now by another process; "
                            "see `conceptlib list`") from None
    info.update({"in_library": True, "path": str(header.path), "size_bytes": size,
                 "norms": [None if i in bad else n for i, n in enumerate(norms)],
                 "metadata": dict(sorted(header.metadata.items()))})
    if nearest:
        from conceptlib.files import read_concept

        info["nearest"] = _nearest_words(read_concept(header.path).vectors, header.base_model, nearest, weights_dir)
    _print_info(info, as_json, where=f"{info['size_bytes']} bytes")


def _nearest_words(vectors, base_model: str, count: int, weights_dir: str | None) -> list:
    """``nearest_words`` against the local text encoder of ``base_model`` (never downloaded)."""
    from conceptlib.errors import WeightsError
    from conceptlib.kerascv.tokenizer import find_vocab_path
    from conceptlib.nearest_words import nearest_words, token_table
    from conceptlib.weights import find_local_weights, is_random, keras_cache_dirs, weight_filename, weights_folder

    found = find_local_weights(base_model, weights_dir, parts=("text_encoder",))
    if "text_encoder" not in found:
        given = weights_folder(weights_dir)
        searched = [given] if weights_dir is not None else [*filter(None, [given]), *keras_cache_dirs()]
        raise WeightsError(
            f"--nearest compares with the {base_model} text encoder's token table, and its weights "
            f"({weight_filename(base_model, 'text_encoder')}) are not in {', '.join(map(str, searched))}; "
            "pass --weights DIR (a folder of keras-cv weight files)"
        )
    tokenizer = _clip_tokenizer(find_vocab_path(download=False))
    if tokenizer is None:
        raise WeightsError("--nearest needs the CLIP vocabulary to name the tokens, and it cannot be read; see the README")
    if is_random(found["text_encoder"].parent):
        click.echo("Note: these weights are random (`weights init-random`): the nearest words mean nothing", err=True)
    return nearest_words(vectors, token_table(found["text_encoder"]), tokenizer, count)


def refuse_missing_path(ref: str) -> None:
    """For a REF that names no library concept and no existing file: if it looks like a path (a
    folder separator, a concept-file extension), say so rather than "no concept named ..."."""
    if os.sep in ref or Path(ref).suffix.lower() in FILE_SUFFIXES + IMAGE_SUFFIXES:
        raise ConceptFileError(f"{ref}: no such file or folder (nor a library concept of that name); "
                               "check the path") from None


def _edited_concept(library, ref: str, command: str):
    """The header of the library concept ``ref`` names (its name, its token, or its own file in
    the library); a file outside the library is refused with how to bring it in."""
    try:
        return library.header(ref)
    except NotFoundError:
        if not os.path.exists(ref):
            raise
        header = _library_file_header(library, Path(ref))
        if header is not None:
            return header
        raise ConceptError(f"{ref}: {command} changes concepts in the library, and this file is not one of them; "
                           f"import it first: conceptlib import {shlex.quote(ref)}") from None


def _library_file_header(library, path: Path):
    """The library concept whose own file ``path`` is (reached by its path), or None."""
    from conceptlib.errors import ConceptlibError

    try:
        inside = path.resolve().parent == library.concepts_dir.resolve()
        return library.header(path.stem) if inside and path.suffix == ".safetensors" else None
    except (OSError, ConceptlibError):
        return None


def _show_file(library, path: Path, as_json: bool, preview_out: Path | None, nearest: int = 0,
               weights_dir: str | None = None, force: bool = False) -> None:
    """`show FILE`: a file or folder of any format `import` reads (import refuses non-finite
    vectors, so every norm is a number), shown as the library would hold it, with the same keys
    as a library concept's."""
    import numpy as np

    from conceptlib.files import summary_fields
    from conceptlib.formats import load_source

    concept = load_source(path)
    if preview_out is not None:
        _write_preview(concept.name, path, concept.metadata, preview_out, force)
    norms = np.linalg.norm(concept.vectors.astype(np.float64), axis=1)
    info = summary_fields(concept.name, concept.token, concept.num_vectors, concept.dim, concept.metadata)
    info.update({
        "in_library": False, "path": str(path.absolute()),
        "size_bytes": path.stat().st_size if path.is_file() else None,
        "norms": [float(n) for n in norms], "metadata": dict(sorted(concept.metadata.items())),
    })
    same = _identical_in_library(library, concept)
    if same is not None:
        info["library_name"] = same.name
    if nearest:
        info["nearest"] = _nearest_words(concept.vectors, concept.base_model, nearest, weights_dir)
    size = f"{info['size_bytes']} bytes; " if info["size_bytes"] is not None else ""
    where = (f"already in the library as {same.name} ({same.token})" if same is not None
             else f"not in the library: `conceptlib import` adds it{_token_to_give(concept.token)}")
    _print_info(info, as_json, where=size + where)


def _print_info(info: dict, as_json: bool, *, where: str) -> None:
    if as_json:
        click.echo(json.dumps(info, allow_nan=False))
        return
    lines = [
        f"name:        {info['name']}",
        f"token:       {info['token']}",
        f"vectors:     {info['num_vectors']} x {info['dim']} float32 ({info['base_model']})",
        f"norms:       {', '.join('NaN/Inf' if n is None else f'{n:.4f}' for n in info['norms'])}",
        f"path:        {info['path']} ({where})",
    ]
    for index, words in enumerate(info.get("nearest", [])):
        label = "nearest:" if index == 0 else ""
        listed = ", ".join(f"{w['word']} {w['similarity']:.3f}" for w in words)
        lines.append(f"{label:<13}vector {index}: {listed}")
    lines.append("metadata:")
    width = max((len(k) for k in info["metadata"]), default=0)
    for key, value in info["metadata"].items():
        if key in ("preview", "modelspec.thumbnail"):
            value = f"<base64 PNG, {len(value)} characters>"
        elif key == "ssmd_cover_images":
            value = f"<base64 pictures, {len(value)} characters>"
        value = " ".join(value.split("\n"))  # a multi-line description stays on its row
        if len(value) > 120:
            value = value[:117] + "..."
        lines.append(f"  {key.ljust(width)}  {value}")
    click.echo(printable("\n".join(lines)))


def _write_preview(name: str, path: Path, metadata: dict, out: Path, force: bool = False) -> None:
    """Write the PNG in the ``preview`` metadata (else the ModelSpec thumbnail) of concept ``name``
    (file ``path``) to ``out`` (over an existing file only with ``force``)."""
    from conceptlib.files import atomic_write_bytes
    from conceptlib.formats.writers import preview_base64, preview_png

    if not preview_base64(metadata):
        raise ConceptError(
            f"{name} has no preview image (a library concept gets one with `conceptlib describe NAME --thumbnail IMAGE`)"
        )
    data = preview_png(metadata)
    if data is None:
        raise ConceptFileError(f"{path}: its preview metadata is not a base64 PNG; the file was edited or damaged")
    if out.suffix.lower() != ".png":
        raise UsageError(f"--preview {out}: the preview is a PNG; give a file name ending in .png")
    if out.exists() and not force:
        raise ConceptFileError(f"--preview {out}: the file exists; choose another name, or pass --force to replace it")
    atomic_write_bytes(out, data, fix="choose another --preview file")
    click.echo(f"Wrote the preview of {name} to {out}", err=True)


@main.command("remove")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("-y", "--yes", is_flag=True, help="Don't ask for confirmation.")
def remove_command(names: tuple[str, ...], yes: bool) -> None:
    """Remove concepts from the library (also one whose file is corrupt: give that one alone).

    \b
    Examples:
      conceptlib remove cat-doll -y
      conceptlib remove old-style old-doll"""
    library = _library()
    names = tuple(dict.fromkeys(names))
    if len(names) > 1:
        _remove_several(library, names, yes)
        return
    name = names[0]
    try:
        header = library.header(name)
    except NotFoundError:
        stray = library.file_entry(name)
        if stray is None:
            raise
        # What `list` warns about and skips: a badly named file, a broken link, a FIFO, ...
        if not yes:
            confirm(f"Remove {stray} (not a usable concept file)?", refused=f"{stray.name} not removed")
        library.remove(name)
        click.echo(f"Removed {stray.name}")
        return
    except ConceptFileError as exc:
        # The file NAME exists but cannot be read: removing it is how the user repairs the library.
        if not yes:
            path = library.path_for(name)
            confirm(f"Remove the unreadable concept file {path} ({_strip_path(getattr(exc, 'reason', str(exc)), path)})?",
                    refused=f"{name} not removed")
        library.remove(name)
        click.echo(f"Removed {name} (unreadable file)")
        return
    if header.name != name:
        raise UsageError(f"{name!r} is the token of concept {header.name!r}; remove it by name: conceptlib remove {header.name}")
    if not yes:
        confirm(f"Remove concept {header.name!r} (token {header.token})?", refused=f"{header.name} not removed")
    library.remove(header.name)
    click.echo(f"Removed {header.name} ({header.token})")


def _remove_several(library, names: tuple[str, ...], yes: bool) -> None:
    """Every NAME is checked before the first is removed: a refusal removes nothing."""
    headers = []
    for name in names:
        try:
            header = library.header(name)
        except ConceptFileError:
            raise ConceptFileError(f"{library.path_for(name)}: cannot be read; remove it alone (conceptlib remove "
                                   f"{name}), so nothing else was removed") from None
        except NotFoundError as exc:
            hint = f" (remove that file alone: conceptlib remove {shlex.quote(name)})" if library.file_entry(name) else ""
            raise NotFoundError(f"{exc}{hint}; nothing was removed") from None
        if header.name != name:
            raise UsageError(f"{name!r} is the token of concept {header.name!r}; remove it by name: "
                             f"conceptlib remove {header.name}")
        headers.append(header)
    if not yes:
        listed = ", ".join(f"{h.name} ({h.token})" for h in headers)
        confirm(f"Remove {len(headers)} concepts: {listed}?", refused="nothing removed")
    with library.lock():
        for header in headers:  # again, under the lock: another process may have changed them
            try:
                now = library.header(header.name)
            except ConceptlibError:
                now = None
            if now is None or now.token != header.token:
                raise LibraryError(f"concept {header.name!r} was removed or changed by another process just now, so "
                                   "nothing was removed; see `conceptlib list` and try again")
        for header in headers:
            library.remove(header.name)
            click.echo(f"Removed {header.name} ({header.token})")


def _name_value(ctx, param, value: str | None) -> str | None:
    """Click callback: an invalid concept name on the command line is a usage error (exit 2)."""
    from conceptlib.concept import validate_name

    return _usage_checked(param, value, validate_name)


def _token_value(ctx, param, value: str | None) -> str | None:
    """Click callback: an invalid --token, or one that is a CLIP word, is a usage error (exit 2)."""
    from conceptlib.concept import suggested_token, validate_token

    if value is not None and value != value.lower() and is_clip_word(suggested_token(value)):
        # Lowercasing alone would give a token that is refused next as a CLIP word.
        lower = suggested_token(value)
        raise UsageError(f"--token {value!r}: KerasCV lowercases prompts, so a token with capitals never matches, "
                         f"and {lower!r} is an ordinary word of the CLIP vocabulary; use e.g. --token '<{lower}>'")
    token = _usage_checked(param, value, validate_token)
    if token is not None and is_clip_word(token):
        raise UsageError(f"--token {token!r}: {clip_word_problem(token)}; use e.g. --token '<{token}>'")
    return token


def _usage_checked(param, value, validate):
    if value is None:
        return None
    try:
        return validate(value)
    except ConceptError as exc:
        raise UsageError(f"{_param_label(param)}: {exc}") from None


def _param_label(param) -> str:
    return param.opts[0] if param.param_type_name == "option" else param.human_readable_name


@main.command("rename")
@click.argument("old")
@click.argument("new", callback=_name_value)
@click.option("--token", default=None, callback=_token_value, help="Also give the concept a new token.")
def rename_command(old: str, new: str, token: str | None) -> None:
    """Rename concept OLD (its name or token) to NEW (and optionally change its token).

    \b
    Example:
      conceptlib rename cat-doll kitty --token '<kitty>'"""
    library = _library()
    before = _edited_concept(library, old, "rename")
    header = library.rename(before.name, new, token=token)
    if (before.name, before.token) == (header.name, header.token):
        click.echo(f"Nothing to change: {header.name} ({header.token}) already has that name and token")
        return
    click.echo(f"Renamed {before.name} -> {header.name} ({header.token})")


@main.command("mix")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE[*WEIGHT]...")
@click.option("--name", default=None, callback=_name_value, help="Library name of the mix (default: from --token).")
@click.option("--token", default=None, callback=_token_value, help="Its token (default: '<NAME>').")
@click.option("--sum", "as_sum", is_flag=True,
              help="Add the vectors up row by row (a blend) instead of putting them one after another.")
def mix_command(sources: tuple[str, ...], name: str | None, token: str | None, as_sum: bool) -> None:
    """Make a new concept from SOURCEs (library names or tokens, or files in any format `import`
    reads), each optionally scaled (`ink-style*0.5`): their vectors one after another, as typing
    their tokens in a row would give, or with --sum their weighted sum, as AUTOMATIC1111's
    embedding mixers do. The mix enters the library; the sources are unchanged."""
    from conceptlib.concept import slug_from_token
    from conceptlib.mixing import mix

    if name is None and token is None:
        raise UsageError("give --name and/or --token for the mix, e.g. --name ink-doll")
    token = token or f"<{name}>"
    name = name or slug_from_token(token)
    library = _library()
    weighted = [_mix_source(source, library) for source in sources]
    mixed = mix(name, token, weighted, mode="sum" if as_sum else "concat")
    header = library.add(mixed)
    parts = " + ".join(f"{weight:g} x {concept.name}" if weight != 1 else concept.name
                       for concept, weight in weighted)
    how = "summed" if as_sum else "one after another"
    spread = [concept.name for concept, _ in weighted if as_sum and concept.num_vectors == 1 < header.num_vectors]
    if spread:  # a one-vector source is added to every row: say so, it is easy to miss
        how += f" ({', '.join(spread)}: its one vector added to each of the {header.num_vectors} rows)"
    click.echo(f"Added {header.name} ({header.token}, {header.num_vectors}x{header.dim}): {parts}, {how}")


def _mix_source(source: str, library):
    """(concept, weight) of one mix SOURCE: the concept the whole text names (a token may hold
    '*'), else NAME*WEIGHT's."""
    from conceptlib.kerascv.apply import resolve_concepts
    from conceptlib.mixing import parse_source, weight_problem

    ref, weight = parse_source(source)
    attempts = [(source, 1.0)] + ([(ref, weight)] if ref != source else [])
    for ref, weight in attempts:
        try:
            found = resolve_concepts([ref], library)
        except ConceptlibError as exc:
            error = exc
            continue
        if len(found) != 1:
            raise ConceptError(f"{ref} holds {len(found)} concepts; mix takes one per SOURCE (name the files)")
        return found[0], weight
    problem = weight_problem(source)
    if problem is None:
        raise error
    raise UsageError(problem) from None


@main.command("describe")
@click.argument("ref", metavar="NAME")
@describe_options
@click.option("--thumbnail", default=None, metavar="IMAGE",
              help="Make the picture IMAGE (PNG, JPEG, WebP, ...; shrunk to 128 px) the concept's preview: the "
                   "thumbnail model pickers show, and the picture of `export --format a1111 --out X.png`.")
def describe_command(ref: str, thumbnail: str | None, **values: str | None) -> None:
    """Describe concept NAME (its name or token) for the people and tools you share it with: the
    Stability AI ModelSpec keys (modelspec.title, .description, .author, .license, .usage_hint,
    .category, .tags, .thumbnail) that model pickers such as kohya's and civitai's tools read. An
    empty value removes a key (an empty --title gives back the default, the name). Without options,
    prints them. `list PATTERN` searches the title, description, author, license, category and tags."""
    library = _library()
    changes = described(values)
    if thumbnail is not None:
        changes.update(_thumbnail_changes(thumbnail))
    name = _edited_concept(library, ref, "describe").name
    header = library.describe(name, changes) if changes else library.header(name)
    metadata = header.metadata
    width = max(len(option) for option in DESCRIPTIVE_KEYS) + 1
    for option, key in DESCRIPTIVE_KEYS.items():
        value = metadata.get(key)
        shown = "(not set)" if value is None else value.replace("\n", "\n" + " " * (width + 1))
        click.echo(f"{(option.replace('_', '-') + ':').ljust(width)} {shown}")
    click.echo(f"{'thumbnail:'.ljust(width)} {_thumbnail_shown(metadata)}")


def _thumbnail_changes(image: str) -> dict[str, str | None]:
    """The metadata changes for ``--thumbnail IMAGE``: the picture as the preview (from which the
    ModelSpec thumbnail and kohya's cover images are written again), or, for an empty IMAGE, none."""
    derived = {"modelspec.thumbnail": None, "ssmd_cover_images": None}  # written again from the preview
    if not image:
        return {"preview": None, "preview_source": None, **derived}
    import base64

    from conceptlib.images import picture_thumbnail_png

    png = picture_thumbnail_png(Path(image))
    return {"preview": base64.b64encode(png).decode("ascii"), "preview_source": "chosen", **derived}


def _thumbnail_shown(metadata: dict) -> str:
    """'a 128x96 PNG' for the concept's preview (read from the PNG's header), or '(not set)'."""
    import base64
    import binascii

    from conceptlib.formats.writers import preview_base64

    encoded = preview_base64(metadata)
    if not encoded:
        return "(not set)"
    try:
        head = base64.b64decode(encoded[:44])  # the signature and the IHDR chunk's size fields
    except (binascii.Error, ValueError):
        return "(set, not a PNG)"
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 24:
        return "(set, not a PNG)"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return f"a {width}x{height} PNG"


@main.command("path")
@click.argument("name", required=False)
def path_command(name: str | None) -> None:
    """Print the library folder (or the file of concept NAME)."""
    library = _library()
    click.echo(str(library.header(name).path if name is not None else library.root))


@main.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str), metavar="PATH...")
@click.option("--name", default=None, callback=_name_value, help="Library name for the concept (a single file only).")
@click.option("--token", default=None, callback=_token_value,
              help="Token prompts will use (a single file only; default: from the file).")
def import_command(paths: tuple[str, ...], name: str | None, token: str | None) -> None:
    """Import concept files, concept folders, or folders of them into the library.

    Reads conceptlib files, diffusers learned_embeds.safetensors/.bin, sd-concepts-library folders,
    AUTOMATIC1111 .pt (zip or legacy pickle; never executed), embedding images (.png/.webp) and
    single-tensor .safetensors (kohya); a conceptlib training run folder gives its final concept,
    RUN/checkpoints/step-N.npz that step's. With several files, the valid ones are imported and
    each other one is reported; the exit code is 1 if any concept file failed.

    \b
    Examples:
      conceptlib import ~/Downloads/embeddings/
      conceptlib import learned_embeds.safetensors --name cat-toy --token '<cat-toy>'
    """
    items, skipped = _discover_all(paths)
    if (name or token) and len(items) > 1:
        where = f"{paths[0]} holds" if len(paths) == 1 else "these paths hold"
        raise UsageError(f"--name/--token apply to a single concept, but {where} {len(items)}; "
                         "import them one at a time")
    library = _library()
    if len(items) == 1 and not skipped:
        # A single file: its failure is the command's error (one line, exit 1).
        header, added = _import_one(library, items[0], name=name, token=token, several=False)
        line = _imported_line(header, added, items[0].path)
        if not added and name not in (None, header.name):
            # The concept is there under its first name (same token, same vectors): say so
            # instead of dropping --name without a word.
            line += f"; --name {name} not used (to rename it: conceptlib rename {header.name} {name})"
        click.echo(printable(line))
        return
    imported = present = 0
    with library.lock():
        for item in items:
            try:
                header, added = _import_one(library, item, name=name, token=token, several=True)
            except ConceptlibError as exc:
                click.echo(printable(f"Skipped {item.path}: {_strip_path(str(exc), item.path)}"), err=True)
                continue
            imported += added
            present += not added
            click.echo(printable(_imported_line(header, added, item.path)))
    for entry in skipped:
        click.echo(printable(f"Skipped {entry.path}: {entry.reason}"), err=True)
    failures = len(items) - imported - present
    already = f"{present} already in the library, " if present else ""
    click.echo(f"{imported} imported, {already}{failures + len(skipped)} skipped")
    if not imported and not present:
        raise _ImportFailed(f"nothing imported from {', '.join(paths)}; see the reasons above")
    if failures:
        raise _ImportFailed(f"{failures} of {len(items)} concept files could not be imported; see the reasons above")


@dataclasses.dataclass(frozen=True)
class _UnusablePath:
    """A PATH argument that could not be read (one of several); importing it re-raises ``error``."""

    path: Path
    error: ConceptlibError


def _discover_all(paths):
    """(the sources and unusable paths, in argument order; the entries skipped as not concepts).
    With one PATH an unusable path is the command's error; with several it is one failed item."""
    from conceptlib.formats import discover

    items, skipped = [], []
    for path in paths:
        try:
            found, passed_over = discover(path)
        except ConceptlibError as exc:
            if len(paths) == 1:
                raise
            items.append(_UnusablePath(Path(path), exc))
            continue
        items += found
        skipped += passed_over
    return items, skipped


def _imported_line(header, added: bool, path) -> str:
    if added:
        return f"Imported {header.name} ({header.token}, {header.num_vectors}x{header.dim}) from {path}"
    return f"Already in the library: {header.name} ({header.token}) holds the vectors of {path}"


def _import_one(library, source, *, name, token, several: bool):
    """Read ``source``, refuse a token that is a CLIP word, and add it to ``library``: (header,
    True), or (the existing header, False) when a concept with its token or name and exactly its
    vectors is already there (importing a folder again must not fail on what it imported before). With
    ``several`` the hints name no option that is refused for several files."""
    from conceptlib.formats import load_source
    from conceptlib.library import CollisionError, NameTakenError, TokenTakenError

    if isinstance(source, _UnusablePath):
        raise source.error
    alone = "import this file by itself with" if several else "pass"
    concept = load_source(source, token=token, name=name)
    if is_clip_word(concept.token):
        raise ConceptError(f"{source.path}: {clip_word_problem(concept.token)}; {alone} --token '<{concept.token}>'")
    try:
        return library.add(concept), True
    except CollisionError as exc:
        existing = _identical_in_library(library, concept)
        if existing is not None:
            return existing, False
        if not several:
            raise
        # The library's own hints name --name/--token, which several files do not take.
        if isinstance(exc, NameTakenError):
            owner = library.find_token(concept.token)
            if owner is not None:  # both at once, not one per attempt
                raise NameTakenError(exc.name, f"remove it first, or {alone} --name NEW --token NEW (its token "
                                               f"{concept.token!r} is concept {owner.name!r}'s too)") from None
            raise NameTakenError(exc.name, f"remove it first, or {alone} --name NEW") from None
        if isinstance(exc, TokenTakenError):
            raise TokenTakenError(exc.token, exc.owner, f"{alone} --token NEW") from None
        # A name that is another concept's token (or the reverse): commands take either.
        raise CollisionError(f"{exc} ({alone} --name NEW or --token NEW)") from None


def _identical_in_library(library, concept):
    """The header of the library concept with ``concept``'s token or name and bit-identical
    vectors, or None. By name too: an export of the library read back (diffusers keys a concept
    by the token, A1111 by the file name) may call the same concept otherwise."""
    import numpy as np

    for ref in (concept.token, concept.name):
        try:
            existing = library.get(ref)
        except ConceptlibError:
            continue
        if ref in (existing.token, existing.name) and np.array_equal(existing.vectors, concept.vectors):
            return library.header(existing.name)
    return None


def clip_word_problem(token: str) -> str:
    return (f"token {token!r} is an ordinary word of the CLIP vocabulary, so prompts would mean the word, "
            "not the concept (generate and train refuse it)")


def _token_to_give(token: str) -> str:
    """For `show FILE`: how to import a file whose own token import would refuse (an ordinary CLIP
    word), else ""."""
    try:
        refused = is_clip_word(token)
    except ConceptlibError:  # a vocabulary named but unreadable: show is no place to fail for it
        return ""
    return f" with --token {shlex.quote(f'<{token}>')}" if refused else ""


def is_clip_word(token: str) -> bool:
    """True if ``token`` is one CLIP token, as train and generate decide. False when no readable
    vocabulary is found locally (import never downloads it, so the check is skipped), unless
    $CONCEPTLIB_CLIP_VOCAB names one that cannot be read: that is a VocabularyError."""
    from conceptlib.errors import VocabularyError
    from conceptlib.kerascv.tokenizer import ENV_VAR as VOCAB_ENV_VAR
    from conceptlib.kerascv.tokenizer import find_vocab_path
    from conceptlib.training import token_in_vocabulary

    try:
        tokenizer = _clip_tokenizer(find_vocab_path(download=False))
    except VocabularyError:
        if os.environ.get(VOCAB_ENV_VAR):
            raise  # set on purpose but wrong: say so, as train and generate do
        return False
    return tokenizer is not None and token_in_vocabulary(tokenizer, token)


@functools.lru_cache(maxsize=2)
def _clip_tokenizer(path):
    """The pure-Python CLIP tokenizer (no TensorFlow) of the vocabulary at ``path``, or None if
    that file cannot be read."""
    from conceptlib.clip_bpe import ClipTokenizer

    try:
        return ClipTokenizer(path)
    except (OSError, EOFError, UnicodeDecodeError):
        return None


class _ImportFailed(ConceptlibError):
    pass


def _strip_path(message: str, path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message
