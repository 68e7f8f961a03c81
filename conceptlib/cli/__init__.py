"""The `conceptlib` command: a thin click shell over the library API.

Each command group lives in its own module and registers itself on ``main``. Modules here
import nothing heavy at import time; TensorFlow/JAX/Keras are imported inside the commands that
need them, after the backend has been chosen.
"""

from __future__ import annotations

import errno
import re
import sys

import click

from conceptlib import __version__
from conceptlib.errors import ConceptlibError


class _Group(click.Group):
    """Maps ConceptlibError to one line on stderr and its exit code (1, or 2 for usage), and
    makes sure Ctrl-C interrupts every command (``reliable_ctrl_c``), with the shell's exit code
    for it (130) rather than click's "Aborted!" and 1."""

    def invoke(self, ctx):
        from conceptlib.interrupts import reliable_ctrl_c

        _degrade_unencodable_output()
        try:
            with reliable_ctrl_c():
                return super().invoke(ctx)
        except ConceptlibError as exc:
            click.echo(f"Error: {printable(str(exc))}", err=True)
            for note in getattr(exc, "__notes__", ()):  # e.g. how to resume a run stopped by it
                click.echo(printable(note), err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("\nInterrupted", err=True)  # after whatever the line held (a prompt, progress)
            ctx.exit(130)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise
            where = exc.filename or "the output"
            click.echo(f"Error: cannot write {where}: {exc.strerror}; free some space or write it elsewhere", err=True)
            ctx.exit(1)


# C0/C1 control characters but tab, newline and carriage return, the bidirectional overrides, and
# the lone surrogates that stand for a file name's bytes that are not UTF-8.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\udc80-\udcff]")


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\x1b``): names, metadata and file
    names from a stranger's file must not drive the terminal (clear it, retitle it, hide text)."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)


def confirm(question: str, *, refused: str) -> None:
    """Ask ``question`` (y/N) on stderr; a no, or no answer at all (stdin closed, as in a script),
    stops the command with one line, ``refused`` and how to skip the question (exit 1). Ctrl-C at
    the prompt is an interrupt, as anywhere else (exit 130)."""
    try:
        answered_yes = click.confirm(question, err=True)
    except click.Abort as exc:  # end of input, or Ctrl-C at the prompt
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        click.echo("", err=True)
        answered_yes = False
    if not answered_yes:
        raise ConceptlibError(f"{refused}: not confirmed; answer y, or pass -y to go ahead without asking")


def _degrade_unencodable_output() -> None:
    """In a locale whose encoding is not UTF-8 (e.g. ISO-8859-1), a title or template the
    encoding lacks would end a command with UnicodeEncodeError: escape such characters instead."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if encoding and encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conceptlib")
def main() -> None:
    """Manage, share, apply and train textual-inversion concepts for Stable Diffusion on KerasCV."""


def _register() -> None:
    # Imported for their side effect of adding commands to `main`.
    from conceptlib.cli import cache_commands, export_command, library_commands  # noqa: F401

    for optional in ("conceptlib.cli.model_commands", "conceptlib.cli.train_commands"):
        try:
            __import__(optional)
        except ModuleNotFoundError as exc:
            if exc.name != optional:
                raise


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
