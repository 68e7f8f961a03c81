"""Template packs: the built-in packs, rendering with tokens and captions, the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conceptlib.cli import main
from conceptlib.errors import PluginError
from conceptlib.plugins import get_template_pack
from conceptlib.templates import TemplatePack, builtin_packs, coerce_packs


def test_builtin_packs_are_object_style_group():
    packs = {pack.name: pack for pack in builtin_packs()}
    assert set(packs) == {"object", "style", "group"}
    # The keras.io example's first prompts, with our placeholder.
    assert packs["object"].templates[0] == "a photo of a {token}"
    assert packs["group"].templates[0] == "a photo of a group of {token}"
    assert len(packs["object"].templates) == len(packs["group"].templates) == 27
    for pack in packs.values():
        assert all("{token}" in t for t in pack.templates)


def test_render_token_caption_and_caption_with_placeholder():
    pack = get_template_pack("object")
    assert pack.render(0, "<cat-doll>") == "a photo of a <cat-doll>"
    # Index wraps around the list.
    assert pack.render(len(pack.templates), "<x>") == "a photo of a <x>"
    assert pack.render(0, "<x>", "on a red chair") == "a photo of a <x>, on a red chair"
    assert pack.render(5, "<x>", "my {token} at the beach") == "my <x> at the beach"
    assert get_template_pack("style").render(0, "<s>", "a castle") == "a castle, in the style of <s>"


def test_pack_validation_errors_are_one_line():
    with pytest.raises(PluginError, match="lacks the {token} placeholder"):
        TemplatePack("bad", "", ("a photo of a thing",))
    with pytest.raises(PluginError, match="needs both"):
        TemplatePack("bad", "", ("a {token}",), caption_templates=("{token} only",))
    with pytest.raises(PluginError, match="no templates"):
        TemplatePack("bad", "", ())


def test_coerce_accepts_dicts_callables_and_lists():
    packs = coerce_packs(lambda: {"mine": ["a {token} toy", "the {token}"]}, source="demo:ep")
    assert [p.name for p in packs] == ["mine"]
    assert packs[0].templates == ("a {token} toy", "the {token}") and packs[0].source == "demo:ep"
    with pytest.raises(PluginError, match="expected TemplatePack"):
        coerce_packs([1, 2], source="demo:ep")


def test_cli_templates_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(main, ["templates", "list"])
    assert listed.exit_code == 0, listed.output
    names = [line.split()[0] for line in listed.output.splitlines()]
    assert {"object", "style", "group"} <= set(names)

    shown = runner.invoke(main, ["templates", "show", "group"])
    assert shown.exit_code == 0
    assert "a photo of a group of {token}" in shown.output.splitlines()

    as_json = runner.invoke(main, ["templates", "show", "style", "--json"])
    data = json.loads(as_json.output)
    assert data["name"] == "style" and data["templates"][0] == "a painting in the style of {token}"


def test_cli_templates_show_unknown_pack():
    result = CliRunner().invoke(main, ["templates", "show", "nope"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Error: unknown template pack 'nope'; installed: group, object, style")
