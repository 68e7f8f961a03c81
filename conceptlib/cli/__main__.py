"""`python -m conceptlib.cli` runs the CLI (used where no console script is installed)."""

from conceptlib.cli import main

main()
