"""Library management commands (issue 2): list, show, remove, rename, path, import, export.

None of these import TensorFlow; ``list``/``show``/``path``/``remove``/``rename`` don't even
import numpy (headers only).
"""

from __future__ import annotations

import json
import math
import struct
import sys

import click

from conceptlib.cli import main
from conceptlib.errors import ConceptlibError, UsageError
from conceptlib.formats.writers import EXPORT_FORMATS


def _library():
    from conceptlib.library import ConceptLibrary

    return ConceptLibrary()


def _warn_problems(library) -> None:
    for problem in library.problems:
        click.echo(f"Warning: skipped {problem.path}: {_strip_path(problem.message, problem.path)}", err=True)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_command(as_json: bool) -> None:
    """List the concepts in the library."""
    library = _library()
    rows = library.summaries()
    _warn_problems(library)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False))
        return
    if not rows:
        click.echo(f"No concepts in {library.root}. Add one with `conceptlib import PATH` or `conceptlib train`.")
        return
    columns = [("NAME", "name"), ("TOKEN", "token"), ("VECTORS", "num_vectors"), ("DIM", "dim"),
               ("BASE", "base_model"), ("TRAINER", "trainer"), ("CREATED", "created_at")]
    table = [[title for title, _ in columns]] + [[str(row.get(key, "")) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    out = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)
    click.echo(out)


@main.command("show")
@click.argument("ref", metavar="NAME")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_command(ref: str, as_json: bool) -> None:
    """Show everything in a concept's header (NAME or token) and its vector norms."""
    header = _library().header(ref)
    norms = _vector_norms(header.path, header.token)
    info = header.summary()
    info.update({"path": str(header.path), "size_bytes": header.path.stat().st_size, "norms": norms,
                 "metadata": dict(sorted(header.metadata.items()))})
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
        return
    lines = [
        f"name:        {info['name']}",
        f"token:       {info['token']}",
        f"vectors:     {info['num_vectors']} x {info['dim']} float32 ({info['base_model']})",
        f"norms:       {', '.join(f'{n:.4f}' for n in norms)}",
        f"path:        {info['path']} ({info['size_bytes']} bytes)",
        "metadata:",
    ]
    width = max((len(k) for k in info["metadata"]), default=0)
    for key, value in info["metadata"].items():
        if key == "preview":
            value = f"<base64 PNG, {len(value)} characters>"
        elif len(value) > 120:
            value = value[:117] + "..."
        lines.append(f"  {key.ljust(width)}  {value}")
    click.echo("\n".join(lines))


def _vector_norms(path, token: str) -> list[float]:
    """L2 norm of each vector, read straight from the file (no numpy needed for a few KB)."""
    from array import array

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        info = json.loads(handle.read(length))[token]
        start, end = info["data_offsets"]
        handle.seek(8 + length + start)
        values = array("f")
        values.frombytes(handle.read(end - start))
    if sys.byteorder != "little":
        values.byteswap()
    num, dim = info["shape"]
    return [round(math.sqrt(math.fsum(v * v for v in values[i * dim:(i + 1) * dim])), 6) for i in range(num)]


@main.command("remove")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="Don't ask for confirmation.")
def remove_command(name: str, yes: bool) -> None:
    """Remove a concept from the library."""
    library = _library()
    header = library.header(name)
    if header.name != name:
        raise UsageError(f"{name!r} is the token of concept {header.name!r}; remove it by name: conceptlib remove {header.name}")
    if not yes:
        click.confirm(f"Remove concept {header.name!r} (token {header.token})?", abort=True, err=True)
    library.remove(header.name)
    click.echo(f"Removed {header.name} ({header.token})")


@main.command("rename")
@click.argument("old")
@click.argument("new")
@click.option("--token", default=None, help="Also give the concept a new token.")
def rename_command(old: str, new: str, token: str | None) -> None:
    """Rename concept OLD to NEW (and optionally change its token)."""
    header = _library().rename(old, new, token=token)
    click.echo(f"Renamed {old} -> {header.name} ({header.token})")


@main.command("path")
@click.argument("name", required=False)
def path_command(name: str | None) -> None:
    """Print the library folder (or the file of concept NAME)."""
    library = _library()
    click.echo(str(library.header(name).path if name else library.root))


@main.command("import")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--name", default=None, help="Library name for the concept (single file only).")
@click.option("--token", default=None, help="Token prompts will use (single file only; default: from the file).")
def import_command(path: str, name: str | None, token: str | None) -> None:
    """Import a concept file, a concept folder, or a folder of them into the library.

    Reads conceptlib files, diffusers learned_embeds.safetensors/.bin, sd-concepts-library folders,
    AUTOMATIC1111 .pt (zip or legacy pickle; never executed) and single-tensor .safetensors (kohya).
    """
    from conceptlib.concept import validate_name, validate_token
    from conceptlib.formats import discover, load_source

    if name is not None:
        validate_name(name)
    if token is not None:
        validate_token(token)
    sources, skipped = discover(path)
    if len(sources) > 1 and (name or token):
        raise UsageError(f"--name/--token apply to a single concept, but {path} holds {len(sources)}; import them one at a time")
    library = _library()
    imported = 0
    if len(sources) == 1 and not skipped:
        # A single file: its failure is the command's error (one line, exit 1).
        with library.lock():
            header = library.add(load_source(sources[0], token=token, name=name))
        click.echo(f"Imported {header.name} ({header.token}, {header.num_vectors}x{header.dim}) from {sources[0].path}")
        return
    with library.lock():
        for source in sources:
            try:
                header = library.add(load_source(source, token=token, name=name))
            except ConceptlibError as exc:
                click.echo(f"Skipped {source.path}: {_strip_path(str(exc), source.path)}")
                continue
            imported += 1
            click.echo(f"Imported {header.name} ({header.token}, {header.num_vectors}x{header.dim}) from {source.path}")
    for entry in skipped:
        click.echo(f"Skipped {entry.path}: {entry.reason}")
    click.echo(f"{imported} imported, {len(sources) - imported + len(skipped)} skipped")
    if not imported:
        raise _NothingImported(f"nothing imported from {path}; see the reasons above")


class _NothingImported(ConceptlibError):
    pass


def _strip_path(message: str, path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


@main.command("export")
@click.argument("ref", metavar="NAME")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="conceptlib | diffusers (learned_embeds.safetensors, or .bin) | a1111 (.pt) | sd-concepts (folder) | kohya (emb_params).")
@click.option("--out", type=click.Path(path_type=str), default=".", show_default=True,
              help="File to write, or an existing folder (a conventional file name is used).")
@click.option("--force", is_flag=True, help="Replace an existing file.")
def export_command(ref: str, fmt: str, out: str, force: bool) -> None:
    """Export concept NAME in another tool's format."""
    from conceptlib.formats import export

    concept = _library().get(ref)
    written = export(concept, fmt, out, overwrite=force)
    click.echo(f"Exported {concept.name} ({concept.token}) as {fmt} to {written}")
