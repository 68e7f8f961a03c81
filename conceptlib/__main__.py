"""`python -m conceptlib` runs the CLI."""

from conceptlib.cli import main

main()
