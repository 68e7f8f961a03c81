"""Library management commands (issue 2)."""
