"""The `conceptlib` command: a thin click shell over the library API.

Each command group lives in its own module and registers itself on ``main``. Modules here
import nothing heavy at import time; TensorFlow/JAX/Keras are imported inside the commands that
need them, after the backend has been chosen.
"""

from __future__ import annotations

import sys

import click

from conceptlib import __version__
from conceptlib.errors import ConceptlibError


class _Group(click.Group):
    """Maps ConceptlibError to one line on stderr and its exit code (1, or 2 for usage), and
    makes sure Ctrl-C interrupts every command (``reliable_ctrl_c``)."""

    def invoke(self, ctx):
        from conceptlib.interrupts import reliable_ctrl_c

        try:
            with reliable_ctrl_c():
                return super().invoke(ctx)
        except ConceptlibError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(exc.exit_code)


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
