"""The ModelSpec description options (--title, --description, --author, ...) that `describe` sets on
a library concept and `train` writes into the concept it makes, with their checks."""

from __future__ import annotations

import sys

import click

from conceptlib.concept import is_utf8
from conceptlib.errors import UsageError
from conceptlib.files import CONTROL_CHARACTERS, DESCRIPTION_LIMIT, DESCRIPTIVE_KEYS, LINE_LIMIT


def _description_value(ctx, param, value):
    """The checked value (a refusal is conceptlib's one-line usage error, exit 2, not click's
    Usage block: these are our checks, not the command line's shape)."""
    if value is None:
        return None
    option = param.opts[0]
    if param.name == "description" and value == "-":
        try:
            value = sys.stdin.read()
        except UnicodeDecodeError:
            raise UsageError(f"{option}: the text on standard input is not UTF-8; convert it (e.g. with iconv)") from None
    value = value.strip()
    if not is_utf8(value):
        raise UsageError(f"{option}: {ascii(value)[:80]} is not UTF-8 text (bytes from another encoding?); "
                                 "give it as UTF-8")
    limit = DESCRIPTION_LIMIT if param.name == "description" else LINE_LIMIT
    if param.name != "description" and len(value.splitlines()) > 1:  # also U+2028, U+0085, ...
        raise UsageError(f"{option}: must be one line (only --description may hold several)")
    control = CONTROL_CHARACTERS.search(value)
    if control is not None:
        raise UsageError(f"{option}: holds the control character U+{ord(control.group()):04X} (terminal escapes and the like "
                                 "would reach everyone who views it); remove it")
    if len(value) > limit:
        raise UsageError(f"{option}: {len(value)} characters; keep it to at most {limit}")
    if param.name == "tags":
        # One form for the tools that split them (list --tag, model pickers): ' a,, b ,A' is 'a, b'.
        tags = {}
        for tag in (tag.strip() for tag in value.split(",")):
            if tag:
                tags.setdefault(tag.casefold(), tag)
        value = ", ".join(tags.values())
    return value


def describe_options(command):
    """The seven ModelSpec description options (``DESCRIPTIVE_KEYS``), as `describe` and `train` take them."""
    helps = {
        "title": "Title shown by model pickers (default: the concept's name).",
        "description": "What the concept is and how to use it (markdown welcome; '-' reads it from stdin).",
        "author": "Your name, handle or profile link.",
        "license": "License name or link, e.g. CC-BY-4.0 or 'CreativeML Open RAIL-M'.",
        "usage_hint": "A short hint for users, e.g. 'use with a weight of 0.8'.",
        "category": "A category such as Person, Object or Style.",
        "tags": "Comma-separated tags.",
    }
    for option in reversed(DESCRIPTIVE_KEYS):
        command = click.option(f"--{option.replace('_', '-')}", option, default=None, metavar="TEXT",
                               callback=_description_value, help=helps[option])(command)
    return command


def described(values: dict) -> dict[str, str | None]:
    """The given description options (option name -> value, None where not given) as metadata
    changes: ``{"modelspec.author": "me"}``, an empty value as None (remove the key)."""
    return {DESCRIPTIVE_KEYS[option]: (value or None) for option, value in values.items()
            if option in DESCRIPTIVE_KEYS and value is not None}
