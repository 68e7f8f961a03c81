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
    with pytest.raises(PluginError, match="no caption template holds {caption}"):
        TemplatePack("bad", "", ("a {token}",), caption_templates=("{token} only",))
    with pytest.raises(PluginError, match="caption template 'just {caption}' lacks the {token} placeholder"):
        TemplatePack("bad", "", ("a {token}",), caption_templates=("a {token}, {caption}", "just {caption}"))
    with pytest.raises(PluginError, match="no templates"):
        TemplatePack("bad", "", ())
    # {caption} in a plain template would reach the prompt literally for an image without one.
    with pytest.raises(PluginError, match=r"template 'a \{token\}, \{caption\}' holds \{caption\}.*caption_templates"):
        TemplatePack("bad", "", ("a {token}, {caption}",))
    with pytest.raises(PluginError, match=r"template 1 is not a string \(int\)"):
        TemplatePack("bad", "", ("a {token}", 1))
    with pytest.raises(PluginError, match="its templates are one string; give a list of strings"):
        TemplatePack("bad", "", "a photo of a {token}")


def test_a_pack_without_caption_templates_ignores_captions():
    """A plugin's dict pack (a style, say) trains captioned images on its own templates too,
    never on a hidden object-style 'a photo of a {token}, {caption}'."""
    (pack,) = coerce_packs({"ink": ["an ink drawing in the style of {token}"]}, source="demo:ep")
    assert pack.caption_templates == ()
    assert pack.count("a castle") == 1
    assert pack.render(0, "<s>", "a castle") == "an ink drawing in the style of <s>"


def test_coerce_accepts_dicts_callables_and_lists():
    packs = coerce_packs(lambda: {"mine": ["a {token} toy", "the {token}"]}, source="demo:ep")
    assert [p.name for p in packs] == ["mine"]
    assert packs[0].templates == ("a {token} toy", "the {token}") and packs[0].source == "demo:ep"
    with pytest.raises(PluginError, match="expected TemplatePack"):
        coerce_packs([1, 2], source="demo:ep")


@pytest.mark.parametrize("given, message", [
    (42, "demo:ep: gave int, expected TemplatePack objects or a dict"),
    (lambda: None, "demo:ep: gave NoneType, expected TemplatePack objects"),
    ("a {token}", "demo:ep: gave str, expected TemplatePack objects"),
    ({"mine": "a photo of a {token}"}, "template pack 'mine': its templates are one string"),
    ({"mine": ["a {token}", 7]}, "template pack 'mine': template 7 is not a string (int)"),
    ([TemplatePack("dup", "", ("a {token}",)), TemplatePack("dup", "", ("the {token}",))],
     "demo:ep: gave two packs named 'dup'; rename one"),
])
def test_coerce_refuses_what_is_not_packs_in_one_line(given, message):
    with pytest.raises(PluginError) as caught:
        coerce_packs(given, source="demo:ep")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


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


# -- template files (AUTOMATIC1111's syntax works as it is) -----------------------------------------

A1111_SUBJECT_FILEWORDS = """a photo of a [name], [filewords]
a rendering of a [name], [filewords]

a cropped photo of the [name], [filewords]
"""


def test_an_automatic1111_template_file_is_a_pack(tmp_path):
    path = tmp_path / "subject_filewords.txt"
    path.write_text(A1111_SUBJECT_FILEWORDS)
    pack = get_template_pack(str(path))
    assert pack.name == "file:subject_filewords.txt" and pack.source == str(path)
    # Without a caption: every line, the [filewords] part left out; blank lines skipped.
    assert pack.templates == ("a photo of a {token}", "a rendering of a {token}", "a cropped photo of the {token}")
    assert pack.count(None) == 3 and pack.count("on a chair") == 3
    assert pack.render(1, "<x>") == "a rendering of a <x>"
    assert pack.render(1, "<x>", "on a red chair") == "a rendering of a <x>, on a red chair"


def test_a_template_file_mixing_lines_uses_every_line_for_captioned_images(tmp_path):
    """As AUTOMATIC1111 does: a captioned image draws from every line, its caption where a line
    holds [filewords]; an image without one, every line with the placeholder left out."""
    path = tmp_path / "mixed.txt"
    path.write_text("a photo of a [name], [filewords]\nart by [name]\n")
    pack = get_template_pack(str(path))
    assert pack.count("on a chair") == 2 and pack.count(None) == 2
    assert [pack.render(i, "<x>", "on a chair") for i in range(2)] == ["a photo of a <x>, on a chair", "art by <x>"]
    assert [pack.render(i, "<x>") for i in range(2)] == ["a photo of a <x>", "art by <x>"]


def test_a_template_file_without_filewords_ignores_captions(tmp_path):
    path = tmp_path / "style.txt"
    path.write_text("a painting, art by {token}\na drawing in the style of [name]\n")
    pack = get_template_pack(str(path))
    assert pack.caption_templates == ()
    assert pack.count("a castle") == 2
    assert pack.render(0, "<s>", "a castle") == "a painting, art by <s>"
    shown = CliRunner().invoke(main, ["templates", "show", str(path)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.splitlines()[1:] == ["a painting, art by {token}", "a drawing in the style of {token}",
                                             "# captions are not used by this pack"]


def test_a_template_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Windows editors may start UTF-8 with U+FEFF; it must not become tokens of the first prompt."""
    path = tmp_path / "bom.txt"
    path.write_bytes("a photo of a [name]\na [name], [filewords]\n".encode("utf-8-sig"))
    pack = get_template_pack(str(path))
    assert pack.templates == ("a photo of a {token}", "a {token}")
    assert pack.render(0, "<x>") == "a photo of a <x>"


def test_template_file_errors_are_one_line(tmp_path):
    from conceptlib.errors import TrainingError

    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a [name]\npicture\n")
    with pytest.raises(TrainingError, match=r"bad.txt, line 2 \('picture'\): no \[name\] or \{token\}"):
        get_template_pack(str(bad))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(TrainingError, match="holds no templates"):
        get_template_pack(str(tmp_path / "empty.txt"))
    with pytest.raises(TrainingError, match="does not exist"):
        get_template_pack(str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("une photo de [name] \xe9t\xe9".encode("latin-1"))
    with pytest.raises(TrainingError, match="save it as UTF-8 text"):
        get_template_pack(str(tmp_path / "latin1.txt"))


def test_training_with_a_template_file_records_its_name_only(tmp_path, monkeypatch):
    """prepare() resolves the file (so --resume works from anywhere) and the concept's metadata
    names the file, not the folders it lies in."""
    import numpy as np
    from PIL import Image

    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, prepare

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(images / "a.png")
    (images / "a.txt").write_text("on a red chair")
    (tmp_path / "mine.txt").write_text(A1111_SUBJECT_FILEWORDS)
    monkeypatch.chdir(tmp_path)
    config = TrainingConfig(images=str(images), name="x", token="<x>", template="mine.txt", weights="random",
                            resolution=64)
    job = prepare(config, library=ConceptLibrary(tmp_path / "home"))
    assert job.pack.name == "file:mine.txt"
    assert job.config.template == str(tmp_path / "mine.txt")
    assert job.config.training_summary()["template"] == "file:mine.txt"
    assert job.pack.render(0, "<x>", job.images[0].caption) == "a photo of a <x>, on a red chair"


def test_resume_trains_with_the_template_file_as_the_run_started(tmp_path, capsys):
    """The run keeps the file's text: a resumed run uses the same prompts as an uninterrupted one,
    even after the file was edited or deleted, and says so."""
    import numpy as np
    from PIL import Image

    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, _announce, prepare

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(images / "a.png")
    template = tmp_path / "mine.txt"
    template.write_text("a photo of a [name]\nart by [name]\n")
    library = ConceptLibrary(tmp_path / "home")
    config = TrainingConfig(images=str(images), name="x", token="<x>", template=str(template), weights="random",
                            resolution=64)
    run = prepare(config, library=library).run_dir.path
    resumed = prepare(None, library=library, resume=run)
    assert resumed.pack.templates == ("a photo of a {token}", "art by {token}") and resumed.notes == []
    template.write_text("a sculpture of [name]\n")
    resumed = prepare(None, library=library, resume=run)
    assert resumed.pack.templates == ("a photo of a {token}", "art by {token}")
    assert resumed.notes == [f"Note: the template file {template} has changed since the run started; resuming with "
                             "the templates it had then (start a new run to use the file as it is now)"]
    template.unlink()
    resumed = prepare(None, library=library, resume=run)
    assert resumed.pack.templates == ("a photo of a {token}", "art by {token}") and "is gone" in resumed.notes[0]
    _announce(resumed)
    assert "is gone since the run started" in capsys.readouterr().err
