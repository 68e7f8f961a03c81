"""``conceptlib cache``: where the JAX compilation/step cache is, how big it is, and clearing it.

The folder is the one the jax trainer and ``generate`` (on the JAX backend) use:
``$CONCEPTLIB_JAX_CACHE`` (a folder, or ``off``), else conceptlib's user cache folder. Nothing
here imports TensorFlow, JAX, Keras or numpy.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from conceptlib.cli import confirm, main
from conceptlib.errors import ConceptlibError
from conceptlib.kerascv import JAX_CACHE_ENV, jax_cache_dir


def _folder_label(folder: Path) -> str:
    return f"{folder} (from ${JAX_CACHE_ENV})" if os.environ.get(JAX_CACHE_ENV) else str(folder)


def _usage(folder: Path) -> tuple[int, int]:
    """(number of files, bytes) under ``folder``, links not followed (each counts as a file); a
    folder in it that cannot be read is an error, not an undercount."""
    count = size = 0

    def unreadable(exc: OSError):
        raise ConceptlibError(f"cannot read {exc.filename} in the JAX cache ({exc.strerror}); make it readable, or "
                              "delete it yourself")

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                size += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # deleted meanwhile (a JAX process writing the cache)
            count += 1
    return count, size


def _human(size: int) -> str:
    if size < 1000:
        return f"{size} byte{'' if size == 1 else 's'}"
    for power, unit in enumerate(("KB", "MB", "GB"), start=1):
        if size < 1000 ** (power + 1) or unit == "GB":
            return f"{size / 1000 ** power:.1f} {unit}"
    raise AssertionError("unreachable")


def _files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def _cache_folder() -> Path | None:
    """The cache folder, or None when the variable says off; an error if it is not a folder."""
    folder = jax_cache_dir()
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ConceptlibError(
            f"the JAX cache {_folder_label(folder)} is a file, not a folder; point ${JAX_CACHE_ENV} at a "
            "folder (or unset it for the default)"
        )
    return folder


@main.group("cache", invoke_without_command=True)
@click.pass_context
def cache_group(ctx) -> None:
    """The JAX compilation and training-step cache (jax trainer, generate on JAX): where it is, its
    size, clearing it. Deleting it is safe: the next run compiles again. Alone: `cache info`."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(info_command)


@cache_group.command("info")
def info_command() -> None:
    """Print the cache folder, its size and number of files."""
    folder = _cache_folder()
    if folder is None:
        click.echo(f"JAX cache: off (${JAX_CACHE_ENV}=off): nothing is cached, every run compiles")
        return
    click.echo(f"JAX cache: {_folder_label(folder)}")
    if not folder.exists():
        click.echo("Size: empty (the folder does not exist yet)")
        return
    count, size = _usage(folder)
    click.echo(f"Size: {_human(size)} in {_files(count)}" if count else "Size: empty")


@cache_group.command("clear")
@click.option("-y", "--yes", is_flag=True, help="Don't ask for confirmation.")
def clear_command(yes: bool) -> None:
    """Delete everything in the cache folder (the folder itself stays). The next jax training or
    generate compiles again."""
    folder = _cache_folder()
    if folder is None:
        raise ConceptlibError(
            f"${JAX_CACHE_ENV} is off, so there is no cache folder to clear; unset it (or set it to "
            "the folder) to clear that folder"
        )
    _refuse_unsafe(folder)
    try:
        entries = sorted(folder.iterdir()) if folder.exists() else []
    except OSError as exc:
        raise ConceptlibError(f"cannot read the JAX cache {_folder_label(folder)} ({exc.strerror}); make it "
                              "readable, or delete it yourself") from None
    if not entries:
        click.echo(f"Nothing to clear: {_folder_label(folder)} is empty")
        return
    count, size = _usage(folder)
    if not yes:
        confirm(f"Delete {_files(count)} ({_human(size)}) in {_folder_label(folder)}?", refused="nothing deleted")
    for entry in entries:
        _delete(entry)
    click.echo(f"Cleared {_folder_label(folder)}: deleted {_files(count)} ({_human(size)})")


def _refuse_unsafe(folder: Path) -> None:
    """A cache variable set by mistake to the home folder (or one above it), or to the library (or a
    folder above it or inside it), must not turn `cache clear` into deleting them."""
    from conceptlib.library import default_root

    target = folder.resolve()
    home, library = Path.home().resolve(), default_root().expanduser().resolve()
    for precious, what, inside in ((home, "your home folder", False), (library, "the concept library", True)):
        if target == precious or target in precious.parents or (inside and precious in target.parents):
            relation = "is, holds or is inside" if inside else "is or holds"
            raise ConceptlibError(
                f"the JAX cache {_folder_label(folder)} {relation} {what} ({precious}); refusing to clear it: "
                f"point ${JAX_CACHE_ENV} at a folder used only for the cache"
            )


def _delete(entry: Path) -> None:
    """Delete one entry of the cache folder; a link is removed, never followed."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    except OSError as exc:
        raise ConceptlibError(
            f"cannot delete {entry} ({exc.strerror or exc}); check its permissions, or delete it by hand"
        ) from None
