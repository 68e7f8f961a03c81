"""The library commands: list/show/remove/rename/path/import/export, through click's CliRunner and
real `conceptlib` processes; bad input is one line, an exit code, and an unchanged library."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conceptlib.cli import main
from helpers import cli_imports
from conceptlib.concept import Concept
from conceptlib.files import write_concept
from conceptlib.library import ConceptLibrary

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("CONCEPTLIB_HOME", str(root))
    return root


@pytest.fixture
def library(home):
    library = ConceptLibrary(home)
    rng = np.random.default_rng(1)
    library.add(Concept("cat-doll", "<cat-doll>", rng.standard_normal((2, 768)).astype(np.float32),
                        {"trainer": "tensorflow", "preview": "iVBORw0KGgo" * 50, "loss_history": json.dumps([0.5] * 300)}))
    library.add(Concept("oil-style", "<oil-style>", rng.standard_normal((1, 1024)).astype(np.float32)))
    return library


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def snapshot(root: Path) -> dict[str, bytes]:
    folder = root / "concepts"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*"))} if folder.exists() else {}


def assert_one_line_error(result, code=1, needle=""):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert result.stdout == ""


# -- happy paths -----------------------------------------------------------------------------------


def test_list_empty_and_table(home):
    result = run("list")
    assert result.exit_code == 0 and "No concepts" in result.output
    assert json.loads(run("list", "--json").output) == []


def test_list(library):
    table = run("list").output.splitlines()
    assert table[0].split()[:5] == ["NAME", "TOKEN", "VECTORS", "DIM", "BASE"]
    assert table[1].split()[:6] == ["cat-doll", "<cat-doll>", "2", "768", "sd-1", "tensorflow"]
    assert table[2].split()[:5] == ["oil-style", "<oil-style>", "1", "1024", "sd-2"]
    rows = json.loads(run("list", "--json").output)
    assert [r["name"] for r in rows] == ["cat-doll", "oil-style"]
    assert {k: rows[0][k] for k in ("name", "token", "num_vectors", "dim", "base_model")} == {
        "name": "cat-doll", "token": "<cat-doll>", "num_vectors": 2, "dim": 768, "base_model": "sd-1"}
    for row in rows:  # where each file is, for scripts that copy or sync them
        path = library.path_for(row["name"])
        assert (row["path"], row["size_bytes"]) == (str(path), path.stat().st_size)


def test_list_filters_by_pattern_and_base_model(library):
    def names(*args):
        result = run("list", *args, "--json")
        assert result.exit_code == 0, result.output
        return [row["name"] for row in json.loads(result.stdout)]

    assert names() == ["cat-doll", "oil-style"]
    assert names("DOLL") == ["cat-doll"]  # name or token, case-insensitive
    assert names("<oil") == ["oil-style"]
    assert names("*-style") == ["oil-style"]  # a wildcard pattern matches the whole name or token
    assert names("*-st") == []
    library.add(Concept("v2-style", "<style-[v2]>", np.ones((1, 768), np.float32)))
    assert names("<style-[v2]>") == ["v2-style"]  # a token that is itself a wildcard pattern
    assert names("*-[v]2*") == []
    library.remove("v2-style")
    assert names("--base-model", "sd-2") == ["oil-style"]
    assert names("--model", "sd-2") == ["oil-style"]  # the name generate and weights use, too
    assert names("doll", "--base-model", "sd-2") == []
    table = run("list", "nothing-like-this")
    assert table.exit_code == 0 and table.stdout.startswith("None of the 2 concepts in ")
    assert run("list", "--base-model", "sd-3").exit_code == 2


def test_list_table_lines_up_wide_characters(library):
    import unicodedata

    library.add(Concept("neko", "<猫>", np.ones((1, 768), np.float32)))
    lines = run("list").stdout.splitlines()

    def column_of(line, text):  # in terminal columns: a CJK character takes two
        before = line[: line.index(text)]
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in before)

    assert len({column_of(line, line.split()[2]) for line in lines}) == 1, lines  # the VECTORS column


def test_list_by_tag_matches_whole_tags(library):
    assert run("describe", "cat-doll", "--tags", "Doll, plush toy").exit_code == 0
    assert run("describe", "oil-style", "--tags", "style, dollhouse").exit_code == 0

    def names(*args):
        return [row["name"] for row in json.loads(run("list", *args, "--json").stdout)]

    assert names("--tag", "doll") == ["cat-doll"]  # not 'dollhouse'
    assert names("--tag", "PLUSH TOY") == ["cat-doll"]
    assert names("--tag", "doll", "--tag", "style") == []  # every tag given
    assert names("--tag", "style", "--base-model", "sd-2") == ["oil-style"]


def test_describe_sets_modelspec_keys_for_sharing(library):
    before = library.get("cat-doll")
    result = run("describe", "<cat-doll>", "--author", "Jo Doe", "--license", "CC-BY-4.0", "--category", "Object",
                 "--tags", "doll, plush", "--usage-hint", "works best at weight 0.8", "--title", "  Cat doll v2 ")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[:3] == ["title:       Cat doll v2", "description: (not set)", "author:      Jo Doe"]
    after = library.get("cat-doll")
    np.testing.assert_array_equal(after.vectors, before.vectors)
    metadata = after.metadata
    assert {key: metadata[f"modelspec.{key}"] for key in ("title", "author", "license", "category", "tags", "usage_hint")} == {
        "title": "Cat doll v2", "author": "Jo Doe", "license": "CC-BY-4.0", "category": "Object",
        "tags": "doll, plush", "usage_hint": "works best at weight 0.8"}
    assert metadata["trainer"] == "tensorflow" and metadata["loss_history"] == before.metadata["loss_history"]
    # The description may span lines, and come from stdin; an empty value removes a key, an empty
    # title gives back the default (the name).
    result = run("describe", "cat-doll", "--description", "-", "--license", "", "--title", "",
                 input="A plush **cat doll**.\nTrained on 5 photos.\n")
    assert result.exit_code == 0, result.output
    metadata = library.header("cat-doll").metadata
    assert metadata["modelspec.description"] == "A plush **cat doll**.\nTrained on 5 photos."
    assert "modelspec.license" not in metadata and metadata["modelspec.title"] == "cat-doll"
    assert "license:     (not set)" in result.stdout
    # Without options it only prints.
    assert run("describe", "cat-doll").stdout == result.stdout
    assert library.header("cat-doll").metadata == metadata
    # Tags in one form; none at all removes the key.
    assert run("describe", "cat-doll", "--tags", " toy,, plush ,").exit_code == 0
    assert library.header("cat-doll").metadata["modelspec.tags"] == "toy, plush"
    assert run("describe", "cat-doll", "--tags", " a ,, B , A, b ,c").exit_code == 0  # each tag once, any case
    assert library.header("cat-doll").metadata["modelspec.tags"] == "a, B, c"
    assert run("describe", "cat-doll", "--tags", ",,, ,").exit_code == 0
    assert "modelspec.tags" not in library.header("cat-doll").metadata


def test_described_keys_travel_with_exports(library, tmp_path):
    from conceptlib.files import read_file_header

    run("describe", "cat-doll", "--author", "Jo Doe", "--tags", "doll")
    for fmt, out in (("kohya", "k.safetensors"), ("diffusers", "d.safetensors")):
        assert run("export", "cat-doll", "--format", fmt, "--out", str(tmp_path / out)).exit_code == 0
        metadata = read_file_header(tmp_path / out).metadata
        assert metadata["modelspec.author"] == "Jo Doe" and metadata["modelspec.tags"] == "doll", fmt
        assert metadata["modelspec.thumbnail"].startswith("data:image/png;base64,iVBORw0KGgo")
        # ComfyUI's model previews read kohya's cover images.
        assert json.loads(metadata["ssmd_cover_images"]) == [library.get("cat-doll").metadata["preview"]]


def test_describe_refuses_bad_values_and_changes_nothing(library):
    before = snapshot(library.root)
    assert_one_line_error(run("describe", "nope", "--author", "x"), 1, "nope")
    for args in (["--author", "two\nlines"], ["--title", "x" * 600], ["--description", "x" * 20000],
                 ["--author", "caf\udce9"], ["--title", "line\u2028separator"]):
        result = run("describe", "cat-doll", *args)
        assert_one_line_error(result, 2, f"Error: {args[0]}: ")  # conceptlib's check: no click Usage block
    # Terminal escapes (and NUL through stdin) would reach everyone who shows the concept.
    for args, given in ((["--title", "\x1b[31mred\x1b[0m"], None), (["--description", "-"], "x\0y")):
        result = run("describe", "cat-doll", *args, input=given)
        assert_one_line_error(result, 2, f"Error: {args[0]}: holds the control character U+00")
    result = CliRunner().invoke(main, ["describe", "cat-doll", "--description", "-"], input=b"caf\xe9\n")
    assert_one_line_error(result, 2, "--description: the text on standard input is not UTF-8")
    result = run("rename", "cat-doll", "new-name", "--token", "<caf\udce9>")
    assert_one_line_error(result, 2, "is not UTF-8 text")
    assert snapshot(library.root) == before
    # The limit counts the description as stored: without the newline `echo` adds.
    assert run("describe", "cat-doll", "--description", "-", input="d" * 16384 + "\n").exit_code == 0


def test_describe_thumbnail_sets_the_preview_pickers_and_exports_show(library, tmp_path):
    from PIL import Image

    from conceptlib.files import read_file_header

    photo = tmp_path / "best-render.jpg"
    exif = Image.Image().getexif()
    exif[0x0112] = 6  # stored sideways, as phones do: viewers show it 200 wide, 300 high
    Image.new("RGB", (300, 200), (10, 200, 30)).save(photo, exif=exif)
    before = library.get("oil-style")
    result = run("describe", "oil-style", "--thumbnail", str(photo))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "thumbnail:   a 85x128 PNG"
    after = library.get("oil-style")
    np.testing.assert_array_equal(after.vectors, before.vectors)
    assert after.metadata["modelspec.thumbnail"] == "data:image/png;base64," + after.metadata["preview"]
    assert after.metadata["preview_source"] == "chosen"
    assert run("show", "oil-style", "--preview", str(tmp_path / "shown.png")).exit_code == 0
    with Image.open(tmp_path / "shown.png") as shown:
        assert shown.size == (85, 128) and shown.getpixel((40, 60)) == (10, 200, 30)
    # Exports carry it: the ModelSpec thumbnail, and AUTOMATIC1111's embedding image is that picture.
    assert run("export", "oil-style", "--format", "kohya", "--out", str(tmp_path / "k.safetensors")).exit_code == 0
    exported = read_file_header(tmp_path / "k.safetensors").metadata
    assert exported["modelspec.thumbnail"] == after.metadata["modelspec.thumbnail"]
    assert run("export", "oil-style", "--format", "a1111", "--out", str(tmp_path / "oil.png")).exit_code == 0
    with Image.open(tmp_path / "oil.png") as card:
        assert card.convert("RGB").getpixel((card.width // 2, card.height // 2)) == (10, 200, 30)
    # An empty value removes it (and the thumbnail pickers read).
    result = run("describe", "oil-style", "--thumbnail", "")
    assert result.exit_code == 0 and result.stdout.splitlines()[-1] == "thumbnail:   (not set)"
    metadata = library.header("oil-style").metadata
    assert not {"preview", "preview_source", "modelspec.thumbnail", "ssmd_cover_images"} & set(metadata)


def test_describe_thumbnail_refuses_what_is_not_a_picture(library, tmp_path):
    before = snapshot(library.root)
    (tmp_path / "notes.png").write_text("not a picture")
    assert_one_line_error(run("describe", "cat-doll", "--thumbnail", str(tmp_path / "notes.png")), 1,
                          "notes.png: cannot read this image (UnidentifiedImageError); give a PNG, JPEG or WebP picture")
    assert_one_line_error(run("describe", "cat-doll", "--thumbnail", str(tmp_path / "gone.png")), 1,
                          "gone.png: not a file; give a PNG, JPEG or WebP picture")
    assert_one_line_error(run("describe", "nope", "--thumbnail", str(tmp_path / "notes.png")), 1, "notes.png")
    assert snapshot(library.root) == before


def test_mix_puts_vectors_one_after_another_or_sums_them(library, tmp_path):
    from safetensors.numpy import save_file

    cat = library.get("cat-doll").vectors
    rng = np.random.default_rng(4)
    other = rng.standard_normal((1, 768)).astype(np.float32)
    save_file({"<dl-style>": other}, str(tmp_path / "dl.safetensors"))  # a downloaded file works as a source
    result = run("mix", "cat-doll", f"{tmp_path / 'dl.safetensors'}*0.5", "--name", "cat-ink")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Added cat-ink (<cat-ink>, 3x768): cat-doll + 0.5 x dl-style, one after another\n"
    mixed = library.get("<cat-ink>")
    np.testing.assert_array_equal(mixed.vectors, np.concatenate([cat, 0.5 * other]))
    sources = json.loads(mixed.metadata["mixed_from"])
    assert [(s["name"], s["weight"]) for s in sources] == [("cat-doll", 1.0), ("dl-style", 0.5)]
    assert mixed.metadata["mix_mode"] == "concat"
    # --sum: row by row; a one-vector source is added to every row.
    result = run("mix", "<cat-doll>*0.7", f"{tmp_path / 'dl.safetensors'}*0.3", "--sum", "--token", "<blend>")
    assert result.stdout == ("Added blend (<blend>, 2x768): 0.7 x cat-doll + 0.3 x dl-style, summed (dl-style: its one "
                             "vector added to each of the 2 rows)\n")
    np.testing.assert_allclose(library.get("blend").vectors, 0.7 * cat + 0.3 * other, rtol=1e-6)
    assert library.get("cat-doll").metadata["trainer"] == "tensorflow"  # sources unchanged


def test_mix_refuses_what_cannot_be_mixed_and_changes_nothing(library, tmp_path):
    from safetensors.numpy import save_file

    save_file({"<three>": np.ones((3, 768), np.float32)}, str(tmp_path / "three.safetensors"))
    (tmp_path / "two").mkdir()
    for token in ("<a>", "<b>"):
        save_file({token: np.ones((1, 768), np.float32)}, str(tmp_path / "two" / f"{token[1]}.safetensors"))
    before = snapshot(library.root)
    for args, code, needle in (
        (["cat-doll", "oil-style", "--name", "x"], 1, "cannot mix vectors of different widths (cat-doll 768 (sd-1), oil-style 1024 (sd-2))"),
        (["cat-doll", str(tmp_path / "three.safetensors"), "--sum", "--name", "x"], 1, "cat-doll 2, three 3 vectors"),
        (["cat-doll", "nope", "--name", "x"], 1, "nope"),
        (["cat-doll", "cat-doll", "--name", "cat-doll"], 1, "cat-doll"),
        (["cat-doll", "--name", "fresh", "--token", "<cat-doll>"], 1, "<cat-doll>"),
        (["cat-doll"] * 38 + ["--name", "long"], 1, "the mix has 76 vectors, more than a prompt's 75"),
        (["cat-doll"], 2, "give --name and/or --token"),
        (["cat-doll", "--token", "style"], 2, "ordinary word of the CLIP vocabulary"),
        (["*2", "--name", "x"], 2, "*2: a weight with no SOURCE before it; write NAME*2"),
        (["cat-doll*abc", "--name", "x"], 2, "'abc' after '*' is not a weight; write SOURCE*WEIGHT with a number, e.g. cat-doll*0.5"),
        (["cat-doll*0.5*2", "--name", "x"], 2, "it has two weights; give one per SOURCE, e.g. cat-doll*2"),
        (["cat-doll*1e39", "--name", "x"], 2, "weight 1e39 is beyond float32's range"),
        (["cat-doll*1e38", "cat-doll*1e38", "--sum", "--name", "x"], 1, "the weights make the mix overflow float32"),
        ([str(tmp_path / "two"), "--name", "x"], 1, "holds 2 concepts; mix takes one per SOURCE"),
    ):
        assert_one_line_error(run("mix", *args), code, needle)
    assert snapshot(library.root) == before


def test_default_names_from_non_ascii_tokens_keep_their_letters(library):
    """As import names files: accents folded, and a token of no ASCII letter gets a name of its
    own (before, every CJK token became 'concept', and the second one collided)."""
    assert run("mix", "cat-doll", "--token", "<ärger-mix>").stdout.startswith("Added arger-mix ")
    first, second = run("mix", "cat-doll", "--token", "<日本>"), run("mix", "oil-style", "--token", "<中文>")
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    names = {h.token: h.name for h in library.list()}
    assert names["<日本>"].startswith("concept-") and names["<中文>"].startswith("concept-")
    assert names["<日本>"] != names["<中文>"]
    assert_one_line_error(run("rename", "cat-doll", "Ärger"), 2, "e.g. 'arger'")


def test_mix_takes_a_source_whole_when_it_names_a_concept(library):
    """A token may hold '*': the concept it names wins over reading '*2' as a weight."""
    assert run("mix", "cat-doll", "--name", "star", "--token", "qq*2").exit_code == 0
    again = run("mix", "qq*2", "--name", "again")
    assert again.exit_code == 0, again.output
    assert "Added again (<again>, 2x768): star, one after another" in again.stdout
    np.testing.assert_array_equal(library.get("again").vectors, library.get("star").vectors)
    weighted = run("mix", "qq*2*3", "--name", "tripled")
    assert weighted.exit_code == 0 and "3 x star" in weighted.stdout
    np.testing.assert_allclose(library.get("tripled").vectors, 3 * library.get("star").vectors)


def test_list_searches_titles_descriptions_categories_and_tags(library):
    run("describe", "oil-style", "--description", "Thick impasto brushwork", "--tags", "painting, texture")
    run("describe", "cat-doll", "--category", "Toy", "--title", "Plush kitten")
    run("describe", "oil-style", "--author", "Ada Brush", "--license", "CC-BY-4.0")

    def names(pattern):
        return [row["name"] for row in json.loads(run("list", pattern, "--json").stdout)]

    assert names("impasto") == ["oil-style"] and names("TEXTURE") == ["oil-style"]
    assert names("kitten") == ["cat-doll"] and names("toy") == ["cat-doll"]
    assert names("plush*") == ["cat-doll"]  # a wildcard matches one field whole: the title
    assert names("ada") == ["oil-style"] and names("cc-by*") == ["oil-style"]  # who made it, on what terms
    rows = json.loads(run("list", "--json").stdout)
    assert rows[1]["description"] == "Thick impasto brushwork" and rows[0]["title"] == "Plush kitten"
    assert (rows[1]["author"], rows[1]["license"]) == ("Ada Brush", "CC-BY-4.0") and "author" not in rows[0]


def test_list_warns_about_broken_files(library):
    (library.root / "concepts" / "broken.safetensors").write_bytes(b"junk")
    result = run("list", "--json")
    assert result.exit_code == 0
    assert [r["name"] for r in json.loads(result.stdout)] == ["cat-doll", "oil-style"]
    assert "Warning: skipped" in result.stderr and "broken.safetensors" in result.stderr


def test_show(library):
    concept = library.get("cat-doll")
    info = json.loads(run("show", "cat-doll", "--json").output)
    assert {k: info[k] for k in ("name", "token", "num_vectors", "dim", "base_model")} == {
        "name": "cat-doll", "token": "<cat-doll>", "num_vectors": 2, "dim": 768, "base_model": "sd-1"}
    np.testing.assert_allclose(info["norms"], np.linalg.norm(concept.vectors, axis=1), rtol=1e-5)
    assert info["metadata"] == dict(sorted(concept.metadata.items()))
    assert info["metadata"]["preview"] == "iVBORw0KGgo" * 50
    assert info["in_library"] is True and info["path"] == str(library.path_for("cat-doll"))
    text = run("show", "<cat-doll>").output  # by token too
    assert "name:        cat-doll" in text and "<base64 PNG" in text and "modelspec.architecture" in text
    assert f"{np.linalg.norm(concept.vectors[0]):.4f}" in text


def test_show_a_file_from_another_tool_without_importing_it(library, tmp_path, monkeypatch):
    vectors = torch.randn(2, 768)
    path = tmp_path / "downloads" / "mydoll.pt"
    path.parent.mkdir()
    # An AUTOMATIC1111 embedding as its textual-inversion code saves one.
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "mydoll", "step": 500}, path)
    before = snapshot(library.root)
    result = run("show", str(path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == ["name:        mydoll", "token:       mydoll", "vectors:     2 x 768 float32 (sd-1)"]
    norms = np.linalg.norm(vectors.numpy().astype(np.float64), axis=1)
    assert lines[3] == f"norms:       {norms[0]:.4f}, {norms[1]:.4f}"
    assert lines[4] == f"path:        {path} ({path.stat().st_size} bytes; not in the library: `conceptlib import` adds it)"
    assert "  a1111.step     500" in lines
    info = json.loads(run("show", str(path), "--json").stdout)
    assert info["in_library"] is False and info["metadata"]["source_format"] == "a1111"
    np.testing.assert_allclose(info["norms"], norms, rtol=1e-6)
    assert snapshot(library.root) == before  # nothing imported
    assert_one_line_error(run("show", str(tmp_path / "missing.pt")), 1, "missing.pt: no such file or folder")
    several = tmp_path / "several"
    several.mkdir()
    for token in ("<a>", "<b>"):
        write_concept(Concept(token[1], token, np.ones((1, 768), np.float32)), several / f"{token[1]}.safetensors")
    assert_one_line_error(run("show", str(several)), 1, "a folder of 2 concept file(s) (e.g. a.safetensors), not one concept's")
    # diffusers' learned_embeds beside other concept files: several concepts, as import reads it,
    # not that one under the folder's name.
    write_concept(Concept("x", "<dl>", np.ones((1, 768), np.float32)), several / "learned_embeds.safetensors")
    for command in (["show", str(several)], ["export", str(several), "--format", "a1111", "--out", str(tmp_path / "x.pt")]):
        assert_one_line_error(run(*command), 1, "a folder of 3 concept file(s) (e.g. a.safetensors), not one concept's")
    assert not (tmp_path / "x.pt").exists()
    # A library concept wins over a file of the same name in the current folder.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "oil-style").write_bytes(b"not a concept")
    assert run("show", "oil-style").stdout.startswith("name:        oil-style")


def test_show_of_a_library_file_or_an_imported_download_says_it_is_in_the_library(library, tmp_path):
    own = json.loads(run("show", str(library.path_for("cat-doll")), "--json").stdout)
    assert own["in_library"] is True and own["name"] == "cat-doll"
    download = tmp_path / "learned_embeds.safetensors"
    write_concept(Concept("x", "<dl-doll>", np.full((1, 768), 0.5, np.float32),
                          {"modelspec.title": "DL Doll", "modelspec.tags": "doll, toy"}), download)
    assert run("import", str(download), "--name", "dl-doll").exit_code == 0
    text = run("show", str(download)).stdout
    assert f"({download.stat().st_size} bytes; already in the library as dl-doll (<dl-doll>))" in text
    info = json.loads(run("show", str(download), "--json").stdout)
    assert info["in_library"] is False and info["library_name"] == "dl-doll"
    # The same descriptive keys as `list --json` (which the docs promise).
    listed = next(row for row in json.loads(run("list", "--json").stdout) if row["name"] == "dl-doll")
    assert set(listed) <= set(info) and (info["title"], info["tags"]) == ("DL Doll", "doll, toy")


def test_show_of_a_file_whose_token_import_would_refuse_says_which_to_give(library, tmp_path):
    from safetensors.numpy import save_file

    save_file({"emb_params": np.ones((1, 768), np.float32)}, str(tmp_path / "star.safetensors"))
    shown = run("show", str(tmp_path / "star.safetensors")).stdout
    assert "not in the library: `conceptlib import` adds it with --token '<star>')" in shown
    assert run("import", str(tmp_path / "star.safetensors"), "--token", "<star>").exit_code == 0


def test_show_writes_the_preview_image(library, tmp_path):
    import base64
    import io

    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 40)).save(picture, format="PNG")
    rng = np.random.default_rng(2)
    library.add(Concept("robot", "<robot>", rng.standard_normal((1, 768)).astype(np.float32),
                        {"preview": base64.b64encode(picture.getvalue()).decode()}))
    out = tmp_path / "previews" / "robot.png"
    result = run("show", "<robot>", "--preview", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("name:        robot")
    assert result.stderr.strip() == f"Wrote the preview of robot to {out}"
    assert out.read_bytes() == picture.getvalue()
    with Image.open(out) as image:
        assert image.size == (96, 64) and image.getpixel((5, 5)) == (200, 30, 40)

    before = snapshot(library.root)
    assert_one_line_error(run("show", "robot", "--preview", str(out)), 1,
                          "the file exists; choose another name, or pass --force to replace it")
    out.write_bytes(b"someone's picture")
    assert run("show", "robot", "--preview", str(out), "--force").exit_code == 0
    assert out.read_bytes() == picture.getvalue()
    assert_one_line_error(run("show", "robot", "--preview", str(tmp_path / "robot.jpg")), 2, "give a file name ending in .png")
    assert_one_line_error(run("show", "oil-style", "--preview", str(tmp_path / "oil.png")), 1,
                          "oil-style has no preview image")
    assert_one_line_error(run("show", "cat-doll", "--preview", str(tmp_path / "cat.png")), 1,
                          "its preview metadata is not a base64 PNG")
    assert not (tmp_path / "oil.png").exists() and not (tmp_path / "cat.png").exists()
    assert snapshot(library.root) == before
    # A file from another tool may carry only a ModelSpec thumbnail: that is its preview.
    thumbnail = "data:image/png;base64," + base64.b64encode(picture.getvalue()).decode()
    write_concept(Concept("pick", "<pick>", np.ones((1, 768), np.float32), {"modelspec.thumbnail": thumbnail}),
                  library.concepts_dir / "pick.safetensors")
    header_only = library.header("pick").metadata
    assert not header_only.get("preview")
    assert run("show", "pick", "--preview", str(tmp_path / "pick.png")).exit_code == 0
    assert (tmp_path / "pick.png").read_bytes() == picture.getvalue()


def test_remove_several_checks_every_name_first(library):
    before = snapshot(library.root)
    assert_one_line_error(run("remove", "cat-doll", "nope", "-y"), 1, "no concept named or with token 'nope'")
    # A typo gets the concept it probably meant.
    assert_one_line_error(run("show", "catt-doll"), 1, f"Error: no concept named or with token 'catt-doll' in "
                                                      f"{library.root}; did you mean 'cat-doll'? (see `conceptlib list`)")
    assert_one_line_error(run("show", "<oil-styl>"), 1, "did you mean '<oil-style>'?")
    assert_one_line_error(run("remove", "cat-doll", "<oil-style>", "-y"), 2, "remove it by name: conceptlib remove oil-style")
    result = run("remove", "cat-doll", "oil-style", input="n\n")
    assert "Remove 2 concepts: cat-doll (<cat-doll>), oil-style (<oil-style>)? [y/N]" in result.stderr
    assert result.exit_code == 1 and snapshot(library.root) == before
    result = run("remove", "cat-doll", "oil-style", "-y")
    assert result.exit_code == 0
    assert result.stdout == "Removed cat-doll (<cat-doll>)\nRemoved oil-style (<oil-style>)\n"
    assert ConceptLibrary(library.root).list() == []


def test_a_rename_that_changes_nothing_says_so(library):
    result = run("rename", "cat-doll", "cat-doll")
    assert result.exit_code == 0
    assert result.stdout == "Nothing to change: cat-doll (<cat-doll>) already has that name and token\n"
    assert run("rename", "<cat-doll>", "cat-doll", "--token", "<cat-doll>").stdout.startswith("Nothing to change")


def test_remove_asks(library):
    before = snapshot(library.root)
    result = run("remove", "cat-doll", input="n\n")
    assert result.exit_code == 1 and snapshot(library.root) == before
    assert result.stderr.endswith("Error: cat-doll not removed: not confirmed; answer y, or pass -y to go ahead "
                                  "without asking\n")
    result = run("remove", "cat-doll", input="")  # no terminal, no answer (a script): one line, not 'Aborted!'
    assert result.exit_code == 1 and snapshot(library.root) == before
    assert result.stderr.splitlines()[-1] == ("Error: cat-doll not removed: not confirmed; answer y, or pass -y to go "
                                             "ahead without asking")
    result = run("remove", "cat-doll", input="y\n")
    assert result.exit_code == 0 and "Removed cat-doll" in result.output
    assert run("remove", "-y", "oil-style").exit_code == 0
    assert ConceptLibrary(library.root).list() == []


def test_rename_and_path(library):
    result = run("rename", "cat-doll", "doll", "--token", "<doll>")
    assert result.exit_code == 0, result.output
    assert ConceptLibrary(library.root).header("doll").token == "<doll>"
    assert run("path").output.strip() == str(library.root)
    assert run("path", "doll").output.strip() == str(library.root / "concepts" / "doll.safetensors")


def _foreign_folder(folder: Path) -> Path:
    folder.mkdir()
    safetensors_torch.save_file({"<a>": torch.randn(1, 768)}, folder / "a.safetensors")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)}, "name": "bdoll", "step": 10,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, folder / "bdoll.pt", _use_new_zipfile_serialization=False)
    safetensors_torch.save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, folder / "xl.safetensors")
    (folder / "readme.txt").write_text("hi")
    return folder


def test_import_folder_reports_each(home, tmp_path):
    folder = _foreign_folder(tmp_path / "in")
    result = run("import", str(folder))
    # The valid files are imported; the SDXL file is a concept file that failed, so exit 1.
    assert result.exit_code == 1, result.output
    out, err = result.stdout, result.stderr  # data on stdout, the reasons on stderr
    assert "Imported a (<a>, 1x768)" in out and "Imported bdoll (bdoll, 2x768)" in out and "Skipped" not in out
    assert "xl.safetensors: an SDXL embedding" in err and "readme.txt: not a concept file" in err
    assert out.strip().endswith("2 imported, 2 skipped")
    assert err.strip().splitlines()[-1] == "Error: 1 of 3 concept files could not be imported; see the reasons above"
    assert [h.name for h in ConceptLibrary(home).list()] == ["a", "bdoll"]
    # Again (e.g. an embeddings folder synced later): what is already there, bit for bit, is no
    # failure; only the SDXL file fails again. The library is unchanged.
    before = snapshot(home)
    result = run("import", str(folder))
    assert result.exit_code == 1, result.output
    assert f"Already in the library: a (<a>) holds the vectors of {folder / 'a.safetensors'}" in result.stdout
    assert f"Already in the library: bdoll (bdoll) holds the vectors of {folder / 'bdoll.pt'}" in result.stdout
    assert result.stdout.strip().endswith("0 imported, 2 already in the library, 2 skipped")
    assert result.stderr.strip().splitlines()[-1] == "Error: 1 of 3 concept files could not be imported; see the reasons above"
    assert snapshot(home) == before
    # Other vectors under the same names: collisions, and the hints offer --name/--token only for
    # importing a file by itself (refused for several).
    (folder / "xl.safetensors").unlink()
    safetensors_torch.save_file({"<a>": torch.randn(1, 768)}, folder / "a.safetensors")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)}, "name": "bdoll"},
               folder / "bdoll.pt")
    result = run("import", str(folder))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: nothing imported")
    skipped = [line for line in result.stderr.splitlines() if "already exists" in line]
    assert len(skipped) == 2 and all("import this file by itself with --name NEW" in line for line in skipped)
    assert "(--name)" not in result.output and "(--token)" not in result.output
    assert snapshot(home) == before


def test_folder_import_collisions_name_every_clash_and_an_option_that_works(home, tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "bulk"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for stem in ("dup-a", "dup-b"):  # two downloads of one token, other vectors
        save_file({"<dup>": rng.standard_normal((1, 768)).astype(np.float32)}, str(folder / f"{stem}.safetensors"))
    ConceptLibrary(home).add(Concept("kohya-dog", "kdog", rng.standard_normal((1, 768)).astype(np.float32)))
    save_file({"<kdog>": rng.standard_normal((1, 768)).astype(np.float32)}, str(folder / "kdog.safetensors"))
    result = run("import", str(folder))
    assert result.exit_code == 1
    skipped = sorted(line for line in result.stderr.splitlines() if line.startswith("Skipped"))
    assert skipped[0].endswith("dup-b.safetensors: a concept named 'dup' already exists; remove it first, or import "
                               "this file by itself with --name NEW --token NEW (its token '<dup>' is concept 'dup''s too)")
    assert skipped[1].endswith("kdog.safetensors: name 'kdog' is the token of concept 'kohya-dog', and commands take "
                               "a name or a token alike; choose another name (import this file by itself with --name "
                               "NEW or --token NEW)")
    # Following the hint works.
    assert run("import", str(folder / "dup-b.safetensors"), "--name", "dup-2", "--token", "<dup-2>").exit_code == 0
    assert run("import", str(folder / "kdog.safetensors"), "--name", "kdog-2").exit_code == 0


def test_an_export_of_the_library_read_back_under_another_token_is_already_there(library, tmp_path):
    """A tool's folder synced from the library, imported again, calls a concept otherwise (A1111:
    the file name): same name and the very same vectors are the same concept, not a clash that
    asks to remove a good one."""
    from safetensors.numpy import save_file

    folder = tmp_path / "cat-doll"
    folder.mkdir()
    save_file({"cat-dolly": library.get("cat-doll").vectors}, str(folder / "learned_embeds.safetensors"))
    before = snapshot(library.root)
    result = run("import", str(folder))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Already in the library: cat-doll (<cat-doll>) holds the vectors of {folder}"
    assert snapshot(library.root) == before
    save_file({"cat-dolly": np.zeros((2, 768), np.float32)}, str(folder / "learned_embeds.safetensors"))
    assert_one_line_error(run("import", str(folder)), 1, "a concept named 'cat-doll' already exists")


def test_importing_the_same_file_again_changes_nothing_and_succeeds(home, tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    safetensors_torch.save_file({"<x-doll>": torch.randn(2, 768)}, path)
    assert run("import", str(path)).exit_code == 0
    before = snapshot(home)
    result = run("import", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"Already in the library: x-doll (<x-doll>) holds the vectors of {path}"
    assert snapshot(home) == before
    result = run("import", str(path), "--name", "x-doll-2")  # --name is not dropped without a word
    assert result.stdout.strip() == (f"Already in the library: x-doll (<x-doll>) holds the vectors of {path}; "
                                     "--name x-doll-2 not used (to rename it: conceptlib rename x-doll x-doll-2)")
    assert snapshot(home) == before


def test_import_single_file_with_name_and_token(home, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<x>": torch.randn(768)}, path)
    result = run("import", str(path), "--name", "my-x", "--token", "<my-x>")
    assert result.exit_code == 0, result.output
    header = ConceptLibrary(home).header("my-x")
    assert header.token == "<my-x>" and header.metadata["source_format"] == "diffusers"


def _flip_last_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))


@pytest.mark.parametrize("fmt,out_name,check", [
    ("conceptlib", "c.safetensors", lambda p: list(safetensors_torch.load_file(p)) == ["<cat-doll>"]),
    ("diffusers", "learned_embeds.safetensors", lambda p: list(safetensors_torch.load_file(p)) == ["<cat-doll>"]),
    ("a1111", "cat-doll.pt", lambda p: tuple(torch.load(p, weights_only=True)["string_to_param"]["*"].shape) == (2, 768)),
    ("kohya", "k.safetensors", lambda p: list(safetensors_torch.load_file(p)) == ["emb_params"]),
    ("sd-concepts", "sdc", lambda p: list(torch.load(p / "learned_embeds.bin", weights_only=True)) == ["<cat-doll>"]),
])
def test_export_formats(library, tmp_path, fmt, out_name, check):
    out = tmp_path / out_name
    result = run("export", "cat-doll", "--format", fmt, "--out", str(out))
    assert result.exit_code == 0, result.output
    assert check(out)
    # The same export again (a script run twice) finds it done, as an export of several does.
    again = run("export", "cat-doll", "--format", fmt, "--out", str(out))
    written = out / "learned_embeds.bin" if fmt == "sd-concepts" else out
    assert again.exit_code == 0 and again.stdout == (
        f"Unchanged cat-doll: {out} already holds this export\n"), again.output
    # A file that differs is kept unless --force.
    _flip_last_byte(written)
    refused = run("export", "cat-doll", "--format", fmt, "--out", str(out))
    assert_one_line_error(refused, 1, "--force")
    assert run("export", "cat-doll", "--format", fmt, "--out", str(out), "--force").exit_code == 0
    assert check(out)
    _flip_last_byte(written)
    assert run("export", "cat-doll", "--format", fmt, "--out", str(out), "--overwrite").exit_code == 0  # convert's name
    assert check(out)


@pytest.mark.parametrize("fmt,files", [
    ("a1111", ["cat-doll.pt", "oil-style.pt"]),
    ("kohya", ["cat-doll.safetensors", "oil-style.safetensors"]),
    # Fixed file names: one subfolder per concept, which diffusers' load_textual_inversion takes.
    ("diffusers", ["cat-doll/learned_embeds.safetensors", "oil-style/learned_embeds.safetensors"]),
    ("sd-concepts", [f"{name}/{file}" for name in ("cat-doll", "oil-style")
                     for file in ("README.md", "learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt")]),
])
def test_export_all_into_another_tools_folder(library, tmp_path, fmt, files):
    folder = tmp_path / "webui" / "embeddings"
    result = run("export", "--all", "--format", fmt, "--out", str(folder))
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == files
    assert result.stdout.strip().splitlines()[-1] == f"2 concepts exported to {folder}"
    # A tool's folder serves one base model: the mix is said, and how to keep them apart.
    assert result.stderr.strip().splitlines()[-1] == (
        "Note: these are 1 sd-1 and 1 sd-2 concepts in one folder; a tool uses only those of the model it runs "
        "(export each base model to its own folder with --all --base-model MODEL)")
    one_model = run("export", "--all", "--base-model", "sd-1", "--format", fmt, "--out", str(tmp_path / "sd1"))
    assert one_model.exit_code == 0 and "Note: these are" not in one_model.stderr
    # Each file reads back as its concept.
    from conceptlib.formats import load_any

    exported = {c.token: c for c in load_any(folder)}
    for name in ("cat-doll", "oil-style"):
        original = library.get(name)
        np.testing.assert_array_equal(exported[original.token].vectors, original.vectors)


def test_export_with_preview_writes_the_card_picture_webuis_show(library, tmp_path):
    import base64

    from PIL import Image

    from conceptlib.formats import load_any

    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "render.png")
    assert run("describe", "oil-style", "--thumbnail", str(tmp_path / "render.png")).exit_code == 0
    folder = tmp_path / "webui" / "embeddings"
    result = run("export", "--all", "--format", "a1111", "--out", str(folder), "--with-preview")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in folder.iterdir()) == ["cat-doll.pt", "oil-style.preview.png", "oil-style.pt"]
    assert (folder / "oil-style.preview.png").read_bytes() == base64.b64decode(library.get("oil-style").metadata["preview"])
    assert f"  with its preview {folder / 'oil-style.preview.png'}" in result.stdout
    assert "Note: cat-doll has no preview to write" in result.stderr  # its stored preview is not a readable PNG
    # Read back, each is its own concept again, and the card is the preview of the file it belongs to.
    back = {c.token: c for c in load_any(folder)}
    assert sorted(back) == ["<cat-doll>", "<oil-style>"]
    assert back["<oil-style>"].metadata["preview"] and "preview" not in back["<cat-doll>"].metadata
    # An existing card is someone's file too: refused without --force, before anything is written.
    (folder / "oil-style.pt").unlink()
    assert_one_line_error(run("export", "oil-style", "--format", "a1111", "--out", str(folder), "--with-preview"), 1,
                          "oil-style.preview.png: already exists, so nothing was exported")
    assert not (folder / "oil-style.pt").exists()
    result = run("export", "oil-style", "--format", "kohya", "--out", str(tmp_path / "k" / "oil.safetensors"), "--with-preview")
    assert result.exit_code == 0 and (tmp_path / "k" / "oil.preview.png").is_file(), result.output
    for args in (["--format", "diffusers"], ["--format", "a1111", "--out", str(tmp_path / "oil.png")]):
        assert_one_line_error(run("export", "oil-style", *args, "--with-preview"), 2, "--with-preview: only a1111, kohya")


def test_exporting_all_again_into_a_tools_folder_passes_over_unchanged_files(library, tmp_path):
    """The sync workflow: `export --all` into AUTOMATIC1111's folder after adding a concept used to
    refuse everything (every earlier file 'already exists'), leaving only --force."""
    formats = ("a1111", "kohya", "diffusers", "sd-concepts", "conceptlib")
    for fmt in formats:
        assert run("export", "--all", "--format", fmt, "--out", str(tmp_path / fmt)).exit_code == 0
    library.add(Concept("new-one", "<new-one>", np.full((1, 768), 0.25, np.float32)))
    for fmt in formats:
        folder = tmp_path / fmt
        before = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
        result = run("export", "--all", "--format", fmt, "--out", str(folder))
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[-1] == f"1 concept exported to {folder} (2 already there, unchanged)"
        assert "new-one" in result.stdout and all(p.stat().st_mtime_ns == t for p, t in before.items())
    # A concept changed since (describe): its file differs, and is not replaced without --force.
    assert run("describe", "cat-doll", "--title", "Cat doll v2").exit_code == 0
    assert_one_line_error(run("export", "--all", "--format", "kohya", "--out", str(tmp_path / "kohya")), 1,
                          "cat-doll.safetensors: already exists and differs from this export, so nothing was exported")


def test_export_several_checks_everything_before_writing(library, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "oil-style.pt").write_bytes(b"someone else's file")
    # cat-doll's file would be new, but oil-style's exists: nothing is written.
    assert_one_line_error(run("export", "cat-doll", "oil-style", "--format", "a1111", "--out", str(folder)), 1,
                          "oil-style.pt: already exists and differs from this export, so nothing was exported")
    assert sorted(p.name for p in folder.iterdir()) == ["oil-style.pt"]
    assert_one_line_error(run("export", "cat-doll", "missing", "--format", "a1111", "--out", str(folder)), 1, "missing")
    assert sorted(p.name for p in folder.iterdir()) == ["oil-style.pt"]
    result = run("export", "cat-doll", "<oil-style>", "cat-doll", "--format", "a1111", "--out", str(folder), "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("Exported ") == 2  # a concept named twice (by name and token) is written once
    assert (folder / "oil-style.pt").read_bytes() != b"someone else's file"
    # Usage errors: several concepts need a folder; NAMEs and --all exclude each other.
    assert_one_line_error(run("export", "--all", "--format", "a1111", "--out", str(folder / "oil-style.pt")), 2,
                          "needs a folder")
    assert_one_line_error(run("export", "cat-doll", "--all", "--format", "a1111"), 2, "not both")
    assert_one_line_error(run("export", "--format", "a1111"), 2, "missing NAME")


# -- bad input: one line, exit code, library unchanged ---------------------------------------------


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir()
    good = folder / "good.safetensors"
    safetensors_torch.save_file({"<g>": torch.randn(2, 768)}, good)
    files = {}

    def add(name, needle, write):
        path = folder / name
        write(path)
        files[name] = (path, needle)

    add("truncated.safetensors", "truncated", lambda p: p.write_bytes(good.read_bytes()[:-9]))
    add("corrupt.pt", "PyTorch", lambda p: p.write_bytes(b"\x80\x02garbage" * 10))
    add("rank.safetensors", "rank 3", lambda p: safetensors_torch.save_file({"<r>": torch.randn(1, 1, 768)}, p))
    add("nan.bin", "NaN or Inf", lambda p: torch.save({"<n>": torch.full((768,), float("nan"))}, p))
    add("dim.safetensors", "640", lambda p: safetensors_torch.save_file({"<d>": torch.randn(1, 640)}, p))
    add("dup.safetensors", "already", lambda p: safetensors_torch.save_file({"<cat-doll>": torch.randn(1, 768)}, p))
    add("cat-doll.pt", "already exists", lambda p: torch.save(
        {"string_to_param": {"*": torch.randn(1, 768)}, "string_to_token": {"*": 265}}, p))
    add("evil.pt", "refused", lambda p: p.write_bytes(_evil_pickle(folder / "canary")))
    add("dangling.safetensors", "no such file", lambda p: p.symlink_to(folder / "missing"))
    add("sdxl.safetensors", "SDXL", lambda p: safetensors_torch.save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, p))
    good.unlink()
    return files


def _evil_pickle(canary: Path) -> bytes:
    import io
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"string_to_param": {"*": Evil()}}, protocol=2))
    return buffer.getvalue()


def test_bad_files_one_by_one(library, tmp_path):
    files = _bad_files(tmp_path / "bad")
    before = snapshot(library.root)
    for name, (path, needle) in files.items():
        assert_one_line_error(run("import", str(path)), 1, needle)
        assert snapshot(library.root) == before, name
    assert not (tmp_path / "bad" / "canary").exists()


def test_bad_folder_imports_nothing(library, tmp_path):
    _bad_files(tmp_path / "bad")
    before = snapshot(library.root)
    result = run("import", str(tmp_path / "bad"))
    assert result.exit_code == 1
    assert result.stderr.count("Skipped") == 10 and "0 imported" in result.stdout
    assert snapshot(library.root) == before
    assert not (tmp_path / "bad" / "canary").exists()


def test_bad_arguments(library, tmp_path):
    before = snapshot(library.root)
    (tmp_path / "empty").mkdir()
    safetensors_torch.save_file({"<q>": torch.randn(1, 768)}, tmp_path / "q.safetensors")
    for args, code, needle in [
        (["import", str(tmp_path / "empty")], 1, "no concept files"),
        (["import", str(tmp_path / "nope")], 1, "no such file"),
        (["import", str(tmp_path / "q.safetensors"), "--name", "../escape"], 2, "--name: invalid concept name"),
        (["import", str(tmp_path / "q.safetensors"), "--name", "a/b"], 2, "--name: invalid concept name"),
        (["import", str(tmp_path / "q.safetensors"), "--token", "<Upper>"], 2, "--token: invalid token"),
        (["import", str(tmp_path / "q.safetensors"), "--token", "a b"], 2, "--token: invalid token"),
        (["import", str(tmp_path / "q.safetensors"), "--name", "q2", "--token", "<cat-doll>"], 1, "already used"),
        # Not a library name; an existing file is read as a concept file (as import would), and refused.
        (["show", "../../../../../../etc/passwd"], 1, "etc/passwd: unknown file type"),
        (["show", "missing"], 1, "no concept"),
        (["remove", "-y", "../cat-doll"], 1, "no concept"),
        (["remove", "-y", "<cat-doll>"], 2, "remove it by name"),
        (["rename", "cat-doll", "../x"], 2, "NEW: invalid concept name"),
        (["rename", "cat-doll", "new", "--token", "<Doll>"], 2, "--token: invalid token"),
        (["rename", "cat-doll", "oil-style"], 1, "already exists; choose another new name"),
        (["rename", "cat-doll", "new", "--token", "<oil-style>"], 1, "already used by concept 'oil-style'; choose another --token"),
        (["rename", "<nope>", "new"], 1, "no concept"),
        (["export", "missing", "--format", "a1111", "--out", str(tmp_path / "x.pt")], 1, "no concept"),
    ]:
        assert_one_line_error(run(*args), code, needle)
        assert snapshot(library.root) == before, args
    assert not (tmp_path / "escape.safetensors").exists() and not (library.root / "escape.safetensors").exists()


def test_usage_errors_exit_2(library, tmp_path):
    _foreign_folder(tmp_path / "in")
    before = snapshot(library.root)
    assert_one_line_error(run("export", "cat-doll"), 2, "missing --format: one of conceptlib, diffusers, a1111, "
                                                        "sd-concepts, kohya (e.g. --format a1111 for AUTOMATIC1111")
    bad = run("export", "cat-doll", "--format", "ckpt")
    assert bad.exit_code == 2
    assert bad.output.splitlines()[-1] == ("Error: Invalid value for '--format': 'ckpt' is not one of "
                                           "'conceptlib', 'diffusers', 'a1111', 'sd-concepts', 'kohya'.")
    nothing = run("import")
    assert nothing.exit_code == 2 and nothing.output.splitlines()[-1] == "Error: Missing argument 'PATH...'."
    assert_one_line_error(run("import", str(tmp_path / "in"), "--name", "x"), 2, "one at a time")
    assert snapshot(library.root) == before


# -- real processes --------------------------------------------------------------------------------


def test_ctrl_c_at_a_prompt_interrupts_and_changes_nothing(library):
    """A real process asking whether to remove a concept gets Ctrl-C (SIGINT to its process group,
    as a terminal sends it): exit 130 and "Interrupted", as for a training run, not click's
    "Aborted!" and 1; the concept is still there."""
    import signal

    before = snapshot(library.root)
    exe = shutil.which("conceptlib")
    process = subprocess.Popen([exe, "remove", "cat-doll"], env=dict(os.environ, CONCEPTLIB_HOME=str(library.root)),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        asked = b""
        while b"[y/N]" not in asked:  # the prompt, waiting for an answer that never comes
            chunk = os.read(process.stderr.fileno(), 256)
            assert chunk, f"the process ended before asking: {asked!r}"
            asked += chunk
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    assert (asked + stderr).decode().splitlines()[-1] == "Interrupted"
    assert snapshot(library.root) == before


def _conceptlib(*args, home, cwd=None):
    exe = shutil.which("conceptlib")
    cmd = [exe] if exe else [sys.executable, "-c", "from conceptlib.cli import main; main()"]
    env = dict(os.environ, CONCEPTLIB_HOME=str(home))
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_real_process_round_trip(home, tmp_path):
    folder = _foreign_folder(tmp_path / "in")
    result = _conceptlib("import", str(folder / "a.safetensors"), str(folder / "bdoll.pt"), home=home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("2 imported, 0 skipped")
    rows = json.loads(_conceptlib("list", "--json", home=home).stdout)
    assert [(r["name"], r["token"], r["num_vectors"], r["dim"], r["base_model"]) for r in rows] == [
        ("a", "<a>", 1, 768, "sd-1"), ("bdoll", "bdoll", 2, 768, "sd-1")]
    out = tmp_path / "bdoll.pt"
    assert _conceptlib("export", "bdoll", "--format", "a1111", "--out", str(out), home=home).returncode == 0
    assert tuple(torch.load(out, weights_only=True)["string_to_param"]["*"].shape) == (2, 768)
    bad = _conceptlib("show", "nope", home=home)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: ")
    assert _conceptlib("export", "bdoll", home=home).returncode == 2


@pytest.mark.parametrize("args,numpy_ok", [
    (["list"], False),
    (["list", "--json"], False),
    (["show", "cat-doll"], False),
    (["show", "cat-doll", "--json"], False),
    (["path"], False),
    (["import", "{folder}/a.safetensors", "{folder}/bdoll.pt"], True),
    (["export", "cat-doll", "--format", "a1111", "--out", "{out}"], True),
    (["export", "cat-doll", "--format", "diffusers", "--out", "{out}.safetensors"], True),
    (["describe", "cat-doll", "--author", "me"], True),
    (["mix", "cat-doll", "{folder}/bdoll.pt*0.5", "--name", "mixed"], True),
])
def test_library_commands_never_import_tensorflow(library, tmp_path, args, numpy_ok):
    folder = _foreign_folder(tmp_path / "in")
    args = [a.format(folder=folder, out=tmp_path / "out.pt") for a in args]
    env = dict(os.environ, CONCEPTLIB_HOME=str(library.root))
    code, imported, process = cli_imports(args, env)
    assert code == 0, process.stderr
    heavy = [module for module in imported if module != "numpy"]
    assert heavy == [], f"{args} imported {heavy}"
    if not numpy_ok:
        assert "numpy" not in imported, f"{args} imported numpy; listing/showing must read headers only"


# -- audit fixes: broken library files, write failures, file modes, --out, CLIP words, several paths ---


def _offsets_file(path: Path, offsets) -> Path:
    header = json.dumps({"<a>": {"dtype": "F32", "shape": [1, 768], "data_offsets": offsets}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(3072))
    return path


@pytest.mark.parametrize("offsets", [[0, "x"], [None, 3072], [3072, 0], [0, 99999]])
def test_a_malformed_file_in_the_library_is_skipped_reported_and_removable(library, tmp_path, offsets):
    broken = _offsets_file(library.root / "concepts" / "broken.safetensors", offsets)
    result = run("list")
    assert result.exit_code == 0 and "cat-doll" in result.stdout and "broken" not in result.stdout
    assert result.stderr.startswith(f"Warning: skipped {broken}: ") and result.stderr.count("\n") == 1
    for command in (["show", "broken"], ["rename", "broken", "fixed"], ["export", "broken", "--format", "a1111"]):
        # The fix is the library's, not the reader's "re-download it".
        assert_one_line_error(run(*command), 1, "(library concept broken: `conceptlib remove broken` deletes the "
                                                "file; then import or train the concept again)")
    assert_one_line_error(run("import", str(_offsets_file(tmp_path / "x.safetensors", offsets))), 1, "x.safetensors")
    # Everything else still works beside it.
    assert run("show", "<cat-doll>").exit_code == 0
    assert run("rename", "oil-style", "oil").exit_code == 0
    safetensors_torch.save_file({"<q>": torch.randn(1, 768)}, tmp_path / "q.safetensors")
    assert run("import", str(tmp_path / "q.safetensors")).exit_code == 0
    # remove is how the user repairs the library.
    assert run("remove", "broken", input="n\n").exit_code == 1 and broken.exists()
    result = run("remove", "broken", "-y")
    assert result.exit_code == 0 and result.stdout == "Removed broken (unreadable file)\n"
    assert not broken.exists() and run("list").stderr == ""


def test_write_failures_are_one_line_and_change_nothing(library, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    before = snapshot(library.root)
    for args, needle in [
        (["--format", "a1111", "--out", str(tmp_path / "afile" / "x.pt")], f"{tmp_path / 'afile'} is a file, not a folder; choose another --out"),
        (["--format", "a1111", "--out", str(tmp_path / "afile" / "sub") + "/"], "is a file, not a folder; choose another --out"),
        (["--format", "sd-concepts", "--out", str(tmp_path / "afile" / "sub")], "is a file, not a folder; choose another --out"),
        (["--format", "a1111", "--out", "/proc/conceptlib-test.pt"], "cannot write /proc/conceptlib-test.pt: nothing can be created in /proc"),
    ]:
        assert_one_line_error(run("export", "cat-doll", *args), 1, needle)
    # /sys refuses new files (permission denied, or a read-only file system in some containers).
    assert_one_line_error(run("export", "cat-doll", "--format", "a1111", "--out", "/sys/conceptlib-test.pt"), 1,
                          "cannot write /sys/conceptlib-test.pt: ")
    assert "; choose another --out" in run("export", "cat-doll", "--format", "a1111", "--out", "/sys/conceptlib-test.pt").stderr
    assert (tmp_path / "afile").read_text() == "x" and snapshot(library.root) == before
    safetensors_torch.save_file({"<q>": torch.randn(1, 768)}, tmp_path / "q.safetensors")
    # CONCEPTLIB_HOME a file, its concepts folder a file, or somewhere nothing can be created.
    home_file = tmp_path / "afile"
    monkeypatch.setenv("CONCEPTLIB_HOME", str(home_file))
    assert_one_line_error(run("import", str(tmp_path / "q.safetensors")), 1,
                          f"cannot write {home_file / '.lock'}: {home_file} is a file, not a folder; make {home_file} a writable folder")
    (tmp_path / "h2").mkdir()
    (tmp_path / "h2" / "concepts").write_text("x")
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "h2"))
    assert_one_line_error(run("import", str(tmp_path / "q.safetensors")), 1, "concepts is not a folder")
    monkeypatch.setenv("CONCEPTLIB_HOME", "/proc/conceptlib-test")
    assert_one_line_error(run("import", str(tmp_path / "q.safetensors")), 1, "or set CONCEPTLIB_HOME to one")
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "h2" / "concepts").read_text() == "x"


def test_exported_files_are_readable_by_other_accounts(library, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "perm.pt"
        assert run("export", "cat-doll", "--format", "a1111", "--out", str(out)).exit_code == 0
        assert os.stat(out).st_mode & 0o777 == 0o644
        assert os.stat(library.root / "concepts" / "cat-doll.safetensors").st_mode & 0o777 == 0o644
        # --force over a file shared with the group keeps its mode.
        os.chmod(out, 0o664)
        assert run("export", "cat-doll", "--format", "a1111", "--out", str(out), "--force").exit_code == 0
        assert os.stat(out).st_mode & 0o777 == 0o664
        assert run("export", "cat-doll", "--format", "sd-concepts", "--out", str(tmp_path / "sdc")).exit_code == 0
        assert {os.stat(p).st_mode & 0o777 for p in (tmp_path / "sdc").iterdir()} == {0o644}
    finally:
        os.umask(old)


@pytest.mark.parametrize("fmt,out,expected", [
    ("a1111", "a.safetensors", ".pt"),
    ("a1111", "a.bin", ".pt"),
    ("kohya", "k.pt", ".safetensors"),
    ("diffusers", "out.pt", ".safetensors or .bin"),
    ("conceptlib", "c.bin", ".safetensors"),
    ("conceptlib", "noext", ".safetensors"),
])
def test_export_refuses_an_extension_its_tools_would_misread(library, tmp_path, fmt, out, expected):
    result = run("export", "cat-doll", "--format", fmt, "--out", str(tmp_path / out))
    assert_one_line_error(result, 2, f"{fmt} files must end in {expected}")
    assert list(tmp_path.iterdir()) == [library.root]


def test_remove_takes_what_list_skips_and_path_needs_a_name(library):
    shutil.copy(library.path_for("cat-doll"), library.concepts_dir / "Cat Doll (1).safetensors")
    assert "or remove it (conceptlib remove 'Cat Doll (1)')" in run("list").stderr
    result = run("remove", "Cat Doll (1)", input="y\n")
    assert result.exit_code == 0 and result.stdout.endswith("Removed Cat Doll (1).safetensors\n")
    assert run("list").stderr == ""
    assert_one_line_error(run("path", ""), 1, "no concept named or with token ''")


def test_a_suggested_command_runs_as_pasted_even_with_an_apostrophe(library):
    """Downloads are named "Jo's Doll.safetensors": the command `list` suggests is quoted for the
    shell (it used to be 'Jo's Doll', an unterminated quote)."""
    import re
    import shlex

    shutil.copy(library.path_for("cat-doll"), library.concepts_dir / "Jo's Doll.safetensors")
    warning = run("list").stderr
    suggested = re.search(r"\((conceptlib remove .*)\)$", warning.strip()).group(1)
    assert suggested == "conceptlib remove " + shlex.quote("Jo's Doll")
    result = run(*shlex.split(suggested)[1:], "-y")
    assert result.exit_code == 0 and result.stdout == "Removed Jo's Doll.safetensors\n"
    assert run("list").stderr == ""


def test_a_capitalised_token_that_lowercases_to_a_word_gets_a_bracketed_suggestion(library):
    result = run("rename", "cat-doll", "kitty", "--token", "Cat")
    assert_one_line_error(result, 2, "'cat' is an ordinary word of the CLIP vocabulary; use e.g. --token '<cat>'")
    assert run("rename", "cat-doll", "kitty", "--token", "<cat>").exit_code == 0


@pytest.mark.parametrize("command", ["list", "show", "remove", "rename", "import", "export"])
def test_every_help_example_is_a_valid_command_line(library, tmp_path, monkeypatch, command):
    """The examples in --help parse (no usage error, exit 2) and run; the files they name may be
    missing here (exit 1, one line)."""
    import shlex

    monkeypatch.setenv("HOME", str(tmp_path))  # '~/...' in an example stays in the test's folder
    monkeypatch.chdir(tmp_path)
    text = run(command, "--help").stdout
    examples = text.split("Example", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    assert examples and all(line.strip().startswith(f"conceptlib {command}") for line in examples)
    for line in examples:
        result = run(*shlex.split(line.strip())[1:])
        assert result.exit_code in (0, 1), (line, result.output)
        if result.exit_code == 1:
            assert_one_line_error(result, 1)


def test_export_says_the_prompt_word_and_warns_of_an_ordinary_word(library, tmp_path):
    """AUTOMATIC1111 calls an embedding file by its name, ComfyUI by embedding:NAME (diffusers: by
    its token), for a1111 files and for our own and kohya's .safetensors alike. Only AUTOMATIC1111
    takes an ordinary word for the concept."""
    library.add(Concept("cat", "<my-cat>", np.ones((1, 768), np.float32)))
    result = run("export", "cat-doll", "--format", "a1111", "--out", str(tmp_path) + "/")
    assert result.stdout.endswith(f"to {tmp_path / 'cat-doll.pt'}; AUTOMATIC1111 prompts call it 'cat-doll' (its file "
                                  "name; ComfyUI: embedding:cat-doll)\n")
    result = run("export", "cat", "--format", "a1111", "--out", str(tmp_path) + "/")
    assert ("AUTOMATIC1111 prompts call it 'cat' (its file name; ComfyUI: embedding:cat), which is also an ordinary "
            "word, so every 'cat' in an AUTOMATIC1111 prompt would mean the concept" in result.stdout
            and result.stdout.endswith("choose another word with --out WORD.pt\n"))
    result = run("export", "cat", "--format", "a1111", "--out", str(tmp_path / "card.png"))
    assert result.stdout == f"Exported cat (<my-cat>) as a1111 to {tmp_path / 'card.png'}\n"  # an image's word is the token
    assert result.stderr == ("Note: cat has no preview, so its embedding image is a plain grey card (give it one: "
                             "conceptlib describe cat --thumbnail IMAGE)\n")
    for fmt in ("conceptlib", "kohya"):
        result = run("export", "cat", "--format", fmt, "--out", str(tmp_path / fmt) + "/")
        assert result.stdout.endswith("choose another word with --out WORD.safetensors\n"), result.stdout
    result = run("export", "cat", "--format", "conceptlib", "--out", str(tmp_path / "<my-cat>.safetensors"))
    assert result.stdout == f"Exported cat (<my-cat>) as conceptlib to {tmp_path / '<my-cat>.safetensors'}\n"
    result = run("export", "cat", "--format", "diffusers", "--out", str(tmp_path / "d"))
    assert "call it" not in result.stdout  # diffusers reads the token
    # With several concepts --out is a folder: the fix offered is a command that exports it alone.
    result = run("export", "--all", "--format", "a1111", "--out", str(tmp_path / "all"))
    line = next(line for line in result.stdout.splitlines() if line.startswith("Exported cat "))
    assert line.endswith(f"would mean the concept: rename the file: mv {tmp_path / 'all' / 'cat.pt'} "
                         f"{tmp_path / 'all' / 'cat-ti.pt'}")


def test_export_all_says_which_library_files_it_left_out(library, tmp_path):
    (library.concepts_dir / "broken.safetensors").write_bytes(b"not a concept")
    result = run("export", "--all", "--format", "conceptlib", "--out", str(tmp_path / "out"))
    assert result.stderr.startswith(f"Warning: skipped {library.concepts_dir / 'broken.safetensors'}: ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat-doll.safetensors", "oil-style.safetensors"]
    # The others are exported, but a script syncing a folder learns that it is not whole: exit 1.
    assert result.exit_code == 1 and result.stdout.endswith(f"2 concepts exported to {tmp_path / 'out'}\n")
    assert result.stderr.splitlines()[-1] == ("Error: 1 file in the library could not be read (the warnings above) and "
                                              "was not exported; fix or remove it, then export again")


@pytest.mark.parametrize("args", [
    ["cat-doll", "--format", "conceptlib", "--out", "{concepts}/oil-style.safetensors", "--force"],
    ["cat-doll", "--format", "kohya", "--out", "{concepts}/cat-doll.safetensors", "--force"],
    ["cat-doll", "--format", "conceptlib", "--out", "{concepts}/copy.safetensors"],
    ["cat-doll", "--format", "sd-concepts", "--out", "{concepts}/cat-doll-folder"],
    ["--all", "--format", "conceptlib", "--out", "{concepts}", "--force"],
    ["cat-doll", "--format", "a1111", "--out", "{concepts}/../concepts/"],
])
def test_export_never_writes_into_the_library(library, args):
    # A file exported there would become a second concept with the same token, or replace one.
    concepts = library.concepts_dir.resolve()
    before = snapshot(library.root)
    result = run("export", *[arg.format(concepts=concepts) for arg in args])
    assert_one_line_error(result, 2, f"is in the library's concepts folder {concepts}")
    assert snapshot(library.root) == before


def test_export_into_a_folder(library, tmp_path, monkeypatch):
    # A trailing '/' means a folder, made if missing; an existing folder gets the default file name.
    result = run("export", "cat-doll", "--format", "a1111", "--out", str(tmp_path / "missing") + "/")
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "missing" / "cat-doll.pt", weights_only=True)["name"] == "cat-doll"
    assert run("export", "cat-doll", "--format", "kohya", "--out", str(tmp_path / "deep" / "a" / "b") + "/").exit_code == 0
    assert list(safetensors_torch.load_file(tmp_path / "deep" / "a" / "b" / "cat-doll.safetensors")) == ["emb_params"]
    (tmp_path / "existing.pt").mkdir()
    assert run("export", "cat-doll", "--format", "diffusers", "--out", str(tmp_path / "existing.pt")).exit_code == 0
    assert list(safetensors_torch.load_file(tmp_path / "existing.pt" / "learned_embeds.safetensors")) == ["<cat-doll>"]
    assert run("export", "cat-doll", "--format", "diffusers", "--out", str(tmp_path / "x.bin")).exit_code == 0
    assert list(torch.load(tmp_path / "x.bin", weights_only=True)) == ["<cat-doll>"]
    # sd-concepts without --out makes ./NAME/ and never replaces any of its files unasked.
    monkeypatch.chdir(tmp_path)
    assert run("export", "cat-doll", "--format", "sd-concepts").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "cat-doll").iterdir()) == [
        "README.md", "learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt"]
    (tmp_path / "cat-doll" / "learned_embeds.bin").unlink()
    (tmp_path / "cat-doll" / "token_identifier.txt").write_text("mine")
    assert_one_line_error(run("export", "cat-doll", "--format", "sd-concepts"), 1, "token_identifier.txt: already exists")
    assert (tmp_path / "cat-doll" / "token_identifier.txt").read_text() == "mine"
    assert run("export", "cat-doll", "--format", "sd-concepts", "--force").exit_code == 0
    assert (tmp_path / "cat-doll" / "token_identifier.txt").read_text() == "<cat-doll>"


def test_sd_concepts_into_a_folder_of_other_files_makes_a_concept_folder_inside(library, tmp_path):
    """--out ~/Downloads must not scatter README.md and three more files among the user's own
    (and the --force a refusal suggested would have replaced their README.md)."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "README.md").write_text("mine")
    for out in (str(downloads), str(tmp_path / "fresh") + "/"):
        assert run("export", "cat-doll", "--format", "sd-concepts", "--out", out).exit_code == 0
        assert list(torch.load(Path(out) / "cat-doll" / "learned_embeds.bin", weights_only=True)) == ["<cat-doll>"]
    assert (downloads / "README.md").read_text() == "mine"
    assert sorted(p.name for p in downloads.iterdir()) == ["README.md", "cat-doll"]
    # An earlier export's own folder is the concept folder: replaced with --force, as before.
    earlier = downloads / "cat-doll"
    assert run("export", "cat-doll", "--format", "sd-concepts", "--out", str(earlier), "--force").exit_code == 0
    assert sorted(p.name for p in earlier.iterdir()) == [
        "README.md", "learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt"]


def test_export_converts_a_downloaded_file_without_importing_it(library, tmp_path):
    download = _a1111(tmp_path / "Cool Style.pt")
    before = snapshot(library.root)
    out = tmp_path / "converted"
    result = run("export", str(download), "--format", "diffusers", "--out", str(out) + "/")
    assert result.exit_code == 0, result.output
    saved = safetensors_torch.load_file(out / "learned_embeds.safetensors")
    original = torch.load(download, weights_only=True)["string_to_param"]["*"]
    assert list(saved) == ["cool-style"] and torch.equal(saved["cool-style"], original)
    assert snapshot(library.root) == before  # nothing imported
    assert_one_line_error(run("export", str(tmp_path / "missing.pt"), "--format", "a1111"), 1, "missing.pt")


def test_export_review_cases_file_refs_previews_and_missing_paths(library, tmp_path):
    # Two downloads named alike would replace each other: refused, nothing written.
    for sub in ("a", "b"):
        (tmp_path / "dl" / sub).mkdir(parents=True)
        _a1111(tmp_path / "dl" / sub / "thing.pt")
    out = tmp_path / "two"
    result = run("export", str(tmp_path / "dl/a/thing.pt"), str(tmp_path / "dl/b/thing.pt"), "--format", "kohya",
                 "--out", str(out))
    assert_one_line_error(result, 2, "two of these are concepts named alike")
    assert not out.exists()
    # A folder synced without previews gets them on a later --with-preview, the rest unchanged.
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "render.png")
    assert run("describe", "oil-style", "--thumbnail", str(tmp_path / "render.png")).exit_code == 0
    sync = tmp_path / "sync"
    assert run("export", "--all", "--format", "a1111", "--out", str(sync)).exit_code == 0
    result = run("export", "--all", "--format", "a1111", "--out", str(sync), "--with-preview")
    assert result.exit_code == 0, result.output
    assert f"Unchanged oil-style; wrote its preview {sync / 'oil-style.preview.png'}" in result.stdout
    (sync / "oil-style.preview.png").write_bytes(b"someone's picture")
    result = run("export", "--all", "--format", "a1111", "--out", str(sync), "--with-preview")
    assert_one_line_error(result, 1, "oil-style.preview.png: already exists and differs from this export")
    # A path that is not there says so, as show does.
    assert_one_line_error(run("export", str(tmp_path / "missing file.pt"), "--format", "a1111"), 1,
                          "missing file.pt: no such file or folder (nor a library concept of that name); check the path")


def test_remove_several_removes_nothing_if_another_process_changed_one_meanwhile(library, monkeypatch):
    """Fault injection: the other process removes a concept while the question is on screen."""
    import conceptlib.cli.library_commands as commands

    def answer_while_another_process_removes(question, refused):
        ConceptLibrary(library.root).remove("oil-style")

    monkeypatch.setattr(commands, "confirm", answer_while_another_process_removes)
    result = run("remove", "cat-doll", "oil-style")
    assert_one_line_error(result, 1, "concept 'oil-style' was removed or changed by another process just now, so "
                                     "nothing was removed")
    assert [h.name for h in ConceptLibrary(library.root).list()] == ["cat-doll"]


def test_remove_a_name_twice_and_an_empty_tag(library):
    result = run("remove", "cat-doll", "cat-doll", "-y")
    assert result.exit_code == 0 and result.stdout == "Removed cat-doll (<cat-doll>)\n"
    assert_one_line_error(run("list", "--tag", " "), 2, "--tag: give a tag (e.g. --tag anime)")


def test_several_concepts_to_a_file_name_is_a_usage_error(library, tmp_path):
    result = run("export", "cat-doll", "oil-style", "--format", "a1111", "--out", str(tmp_path / "file.pt"))
    assert_one_line_error(result, 2, f"several concepts go into a folder, and this names a file; give a folder "
                                     f"(e.g. --out {tmp_path / 'file'}/)")
    assert list(tmp_path.iterdir()) == [library.root]


def _a1111(path: Path) -> Path:
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)}, "name": path.stem}, path)
    return path


def test_import_refuses_a_clip_word_token(library, tmp_path):
    legacy = _a1111(tmp_path / "legacy.pt")
    before = snapshot(library.root)
    assert_one_line_error(run("import", str(legacy)), 1,
                          "token 'legacy' is an ordinary word of the CLIP vocabulary")
    assert "pass --token '<legacy>'" in run("import", str(legacy)).stderr
    safetensors_torch.save_file({"<q>": torch.randn(1, 768)}, tmp_path / "q.safetensors")
    assert_one_line_error(run("import", str(tmp_path / "q.safetensors"), "--token", "cat"), 2,
                          "--token 'cat': token 'cat' is an ordinary word")
    assert_one_line_error(run("rename", "cat-doll", "doll", "--token", "dolly"), 2, "use e.g. --token '<dolly>'")
    assert snapshot(library.root) == before
    result = run("import", str(legacy), "--token", "<legacy>")
    assert result.exit_code == 0 and ConceptLibrary(library.root).header("legacy").token == "<legacy>"
    # Among several files, the hint is to import that one by itself.
    folder = tmp_path / "several"
    folder.mkdir()
    _a1111(folder / "style.pt")
    _a1111(folder / "mystyle.pt")
    result = run("import", str(folder))
    assert result.exit_code == 1
    assert f"Skipped {folder / 'style.pt'}: token 'style' is an ordinary word" in result.stderr
    assert "import this file by itself with --token '<style>'" in result.stderr
    assert "Imported mystyle (mystyle, 2x768)" in result.stdout


def test_without_a_local_vocabulary_import_skips_the_word_check(library, tmp_path, monkeypatch):
    from conceptlib.kerascv import tokenizer

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(tokenizer, "VOCAB_PACKAGES", ())
    if any(path.is_file() for _, path in tokenizer.candidate_vocab_paths()):
        pytest.skip("a CLIP vocabulary is in /tmp/.keras on this machine")
    result = run("import", str(_a1111(tmp_path / "legacy.pt")))
    assert result.exit_code == 0 and "Imported legacy (legacy, 2x768)" in result.stdout


def test_import_several_paths(library, tmp_path):
    folder = _foreign_folder(tmp_path / "in")
    single = _a1111(tmp_path / "single-doll.pt")
    result = run("import", str(folder / "a.safetensors"), str(single), str(folder / "bdoll.pt"))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("3 imported, 0 skipped")
    assert [h.name for h in ConceptLibrary(library.root).list()] == ["a", "bdoll", "cat-doll", "oil-style", "single-doll"]
    # A missing path or a failing file among several: the others are imported, each failure is
    # one line, then the summary, and exit 1.
    before = snapshot(library.root)
    other = _a1111(tmp_path / "other-doll.pt")
    result = run("import", str(tmp_path / "nope.pt"), str(other), str(folder / "xl.safetensors"))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [f"Imported other-doll (other-doll, 2x768) from {other}", "1 imported, 2 skipped"]
    errors = result.stderr.splitlines()
    assert errors[0] == f"Skipped {tmp_path / 'nope.pt'}: no such file or folder; check the path"
    assert errors[1].startswith(f"Skipped {folder / 'xl.safetensors'}: an SDXL embedding")
    assert errors[2:] == ["Error: 2 of 3 concept files could not be imported; see the reasons above"]
    assert set(snapshot(library.root)) == set(before) | {"other-doll.safetensors"}
    # --name/--token name one concept: refused (exit 2) for several paths.
    assert_one_line_error(run("import", str(single), str(other), "--name", "x"), 2, "one at a time")


def test_rename_by_token(library):
    result = run("rename", "<cat-doll>", "doll")
    assert result.exit_code == 0 and result.stdout == "Renamed cat-doll -> doll (<cat-doll>)\n"  # names, old and new
    assert ConceptLibrary(library.root).header("doll").token == "<cat-doll>"
    result = run("rename", "<cat-doll>", "oil-style")
    assert_one_line_error(result, 1, "a concept named 'oil-style' already exists; choose another new name")
    assert "--name" not in result.stderr


def test_nan_concept_show_json_is_valid_and_list_flags_it(library):
    vectors = torch.ones(2, 768)
    vectors[0, 1] = float("nan")
    path = library.root / "concepts" / "nan.safetensors"
    safetensors_torch.save_file({"<nan>": vectors}, path, metadata={"format": "conceptlib/1"})  # a library file
    result = run("show", "nan", "--json")
    assert result.exit_code == 0

    def refuse(constant):
        raise ValueError(f"invalid JSON constant {constant}")

    info = json.loads(result.stdout, parse_constant=refuse)
    assert info["norms"] == [None, pytest.approx(768 ** 0.5)]
    assert "vector 0 holds NaN or Inf" in result.stderr
    text = run("show", "nan")
    assert "norms:       NaN/Inf, 27.7128" in text.stdout and text.stderr.startswith("Warning: ")
    listed = run("list", "--json")
    assert [r["name"] for r in json.loads(listed.stdout)] == ["cat-doll", "oil-style"]
    assert f"Warning: skipped {path}: vector 0 holds NaN or Inf" in listed.stderr
    assert run("remove", "nan", "-y").exit_code == 0 and not path.exists()


def test_a_clip_vocabulary_set_but_missing_is_an_error_not_a_skipped_check(library, tmp_path, monkeypatch):
    """Without any vocabulary the CLIP-word check is skipped (import never downloads it); one set
    on purpose in $CONCEPTLIB_CLIP_VOCAB but missing is said, as train and generate say it."""
    from safetensors.numpy import save_file

    save_file({"style": np.ones((1, 768), np.float32)}, str(tmp_path / "style.safetensors"))
    monkeypatch.setenv("CONCEPTLIB_CLIP_VOCAB", str(tmp_path / "nowhere.txt.gz"))
    before = snapshot(library.root)
    assert_one_line_error(run("import", str(tmp_path / "style.safetensors")), 1,
                          f"$CONCEPTLIB_CLIP_VOCAB points to {tmp_path / 'nowhere.txt.gz'}, which is not a gzip file")
    assert_one_line_error(run("mix", "cat-doll", "--name", "dog2", "--token", "dog"), 1, "CONCEPTLIB_CLIP_VOCAB")
    assert snapshot(library.root) == before
    # Export only prints a CLIP-word warning: it goes on (all files written), and says it could not check.
    exported = run("export", "cat-doll", "oil-style", "--format", "conceptlib", "--out", str(tmp_path / "out") + "/")
    assert exported.exit_code == 0, exported.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat-doll.safetensors", "oil-style.safetensors"]
    assert exported.stderr.count("not checked against the CLIP vocabulary") == 2


def test_output_in_a_locale_that_is_not_utf8(library, home):
    """Scripts in an ISO-8859-1 locale: --json stays valid (ASCII) JSON, and text with characters
    the locale lacks is escaped instead of ending in UnicodeEncodeError."""
    run("describe", "cat-doll", "--title", "Caf\u00e9 \u2615")
    env = dict(os.environ, CONCEPTLIB_HOME=str(home), PYTHONIOENCODING="latin-1")
    exe = [shutil.which("conceptlib")]
    listed = subprocess.run(exe + ["list", "--json"], env=env, capture_output=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert max(listed.stdout) < 128  # pure ASCII: the same bytes in every encoding
    assert json.loads(listed.stdout)[0]["title"] == "Caf\u00e9 \u2615"
    shown = subprocess.run(exe + ["show", "cat-doll"], env=env, capture_output=True, timeout=120)
    assert shown.returncode == 0 and b"Traceback" not in shown.stderr, shown.stderr
    assert "Caf\u00e9 \\u2615".encode("latin-1") in shown.stdout


def test_an_output_that_cannot_be_written_is_one_line(home):
    """`conceptlib path > /dev/full`: the disk of the output is full."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([shutil.which("conceptlib"), "list", "--json"], stdout=full, stderr=subprocess.PIPE,
                                text=True, env=dict(os.environ, CONCEPTLIB_HOME=str(home)), timeout=120)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: cannot write the output: No space left on device; free some space or write it elsewhere"]


def test_text_from_a_strangers_file_cannot_drive_the_terminal(library, tmp_path):
    """Metadata keys and values, listed columns and error lines show control characters as
    escapes: a description must not clear the screen or retitle the terminal."""
    from safetensors.numpy import save_file

    path = tmp_path / "evil.safetensors"
    save_file({"<evil>": np.ones((1, 768), np.float32)}, str(path),
              metadata={"modelspec.description": "hi \x1b]0;PWNED\x07\x1b[2J", "trainer": "kohya\x1b[31m",
                        "evil\x1b[5mkey": "x"})
    shown = run("show", str(path))
    assert "\x1b" not in shown.output and "\x07" not in shown.output
    assert "hi \\x1b]0;PWNED\\x07\\x1b[2J" in shown.stdout and "evil\\x1b[5mkey" in shown.stdout
    assert run("import", str(path)).exit_code == 0
    listed = run("list")
    assert "kohya\\x1b[31m" in listed.stdout and "\x1b" not in listed.output
    weird = tmp_path / "bad\x1b[2Jname.safetensors"
    weird.write_bytes(b"junk")
    failed = run("show", str(weird))
    assert failed.exit_code == 1 and "\x1b" not in failed.stderr and "bad\\x1b[2Jname" in failed.stderr


def test_a_strangers_descriptions_are_stored_and_shared_as_describe_would_accept_them(library, tmp_path):
    """show FILE shows what the file holds (escaped); import stores the descriptions without control
    characters, on one line where describe wants one, within describe's limits, and drops a
    created_at that is no date: so nothing of it reaches the model card or embedding image the
    user shares."""
    import torch

    path = tmp_path / "liar.pt"
    torch.save({"string_to_param": {"*": torch.ones(1, 768)}, "name": "liar",
                "conceptlib": {"token": "<liar>", "created_at": "not a date", "modelspec.title": "T\x1b[31mred\nline",
                               "modelspec.description": "para\n\x07" + "x" * 20000}}, path)
    assert "T\\x1b[31mred" in run("show", str(path)).stdout
    assert run("import", str(path)).exit_code == 0
    meta = library.get("liar").metadata
    assert meta["modelspec.title"] == "T[31mred line" and meta["created_at"] != "not a date"
    description = meta["modelspec.description"]
    assert description.startswith("para\nxxx") and len(description) == 16384 and description.endswith("\u2026")
    assert run("export", "liar", "--format", "sd-concepts", "--out", str(tmp_path / "card")).exit_code == 0
    assert run("export", "liar", "--format", "a1111", "--out", str(tmp_path / "liar.png")).exit_code == 0
    card = (tmp_path / "card" / "README.md").read_text()
    assert "\x1b" not in card and "\x07" not in card and "# T[31mred line" in card
    from conceptlib.formats import load_any

    assert load_any(tmp_path / "liar.png")[0].metadata["modelspec.title"] == "T[31mred line"


@pytest.mark.parametrize("command, args, param, value", [
    (["train"], ["images", "--model", "sd-2"], "base_model", "sd-2"),
    (["list"], ["--model", "sd-2"], "base_model", "sd-2"),
    (["generate"], ["a cat", "--base-model", "sd-2"], "model", "sd-2"),
    (["weights", "where"], ["--base-model", "sd-2"], "model", "sd-2"),
    (["weights", "init-random"], ["folder", "--base-model", "sd-2"], "model", "sd-2"),
    (["export"], ["cat-doll", "--format", "a1111", "--overwrite"], "force", True),
    (["weights", "convert"], ["source", "folder", "--force"], "overwrite", True),
])
def test_an_option_answers_to_the_name_another_command_gives_it(command, args, param, value):
    """--base-model / --model and --force / --overwrite each name one thing; every command that
    takes it takes both names, so a name learnt from one command works in the others."""
    group = main
    for name in command:
        group = group.commands[name]
    context = group.make_context(" ".join(command), list(args))
    assert context.params[param] == value


def test_a_training_photo_preview_stays_out_of_exports_unless_asked_for(library, tmp_path):
    """Trained without --preview-every, a concept keeps its first training image as its preview:
    one of the user's photos (a person, a child). Sharing the concept must not publish it
    unnoticed: exports leave it out and say so; --keep-training-photo keeps it."""
    import base64
    import io

    from PIL import Image

    from conceptlib.files import read_concept
    from conceptlib.formats import load_source

    picture = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(picture, format="PNG")
    photo = base64.b64encode(picture.getvalue()).decode("ascii")
    library.add(Concept("portrait", "<portrait>", np.ones((1, 768), np.float32),
                        {"preview": photo, "preview_source": "training-image"}))
    assert read_concept(library.path_for("portrait")).metadata["modelspec.thumbnail"].endswith(photo)

    note = ("Note: portrait's preview is one of its training images, so it is left out of the export "
            "(--keep-training-photo exports it; conceptlib describe portrait --thumbnail IMAGE gives the concept another)")
    for fmt, out, written in (("conceptlib", "c/", "c/portrait.safetensors"), ("kohya", "k/", "k/portrait.safetensors"),
                              ("sd-concepts", "s/", "s/portrait"), ("a1111", "card.png", "card.png")):
        result = run("export", "portrait", "--format", fmt, "--out", f"{tmp_path}/{out}")
        assert result.exit_code == 0, result.output
        assert result.stderr.splitlines()[0] == note
        exported = load_source(tmp_path / written)
        assert photo not in str(exported.metadata), fmt
    assert not (tmp_path / "s" / "portrait" / "preview.png").exists()
    with Image.open(tmp_path / "card.png") as card:  # the embedding image's picture is not the photo either
        assert card.convert("RGB").getpixel((card.width // 2, card.height // 2)) != (200, 40, 40)
    result = run("export", "--all", "--format", "a1111", "--out", str(tmp_path / "all"), "--with-preview")
    assert result.exit_code == 0 and note in result.stderr and not (tmp_path / "all" / "portrait.preview.png").exists()

    kept = run("export", "portrait", "--format", "kohya", "--out", str(tmp_path / "kept") + "/", "--keep-training-photo")
    assert kept.exit_code == 0 and "Note" not in kept.stderr
    assert load_source(tmp_path / "kept" / "portrait.safetensors").metadata["modelspec.thumbnail"].endswith(photo)
    # A preview the user chose, or a rendered one, is exported as before.
    run("describe", "portrait", "--thumbnail", str(_png_file(tmp_path / "chosen.png")))
    chosen = run("export", "portrait", "--format", "kohya", "--out", str(tmp_path / "chosen") + "/")
    assert chosen.exit_code == 0 and "Note" not in chosen.stderr
    assert "modelspec.thumbnail" in load_source(tmp_path / "chosen" / "portrait.safetensors").metadata


def _png_file(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (32, 24), (20, 120, 200)).save(path)
    return path


@pytest.mark.parametrize("given, fmt", [("A1111", "a1111"), ("ComfyUI", "a1111"), ("InvokeAI", "a1111"),
                                        ("automatic1111", "a1111"), ("Diffusers", "diffusers"), ("KOHYA", "kohya")])
def test_format_takes_any_case_and_the_tools_names(library, tmp_path, given, fmt):
    """The README names ComfyUI and InvokeAI as targets, so users try those names: they load
    AUTOMATIC1111's files."""
    result = run("export", "cat-doll", "--format", given, "--out", str(tmp_path) + "/")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Exported cat-doll (<cat-doll>) as {fmt} to ")


def test_describe_and_rename_of_a_file_say_to_import_it_first(library, tmp_path):
    """show, export and mix read files; describe and rename change library concepts, so a file
    outside the library is refused with the import that brings it in (the library's own file is
    its concept)."""
    file = tmp_path / "my style.safetensors"
    write_concept(Concept("x", "<x>", np.ones((1, 768), np.float32)), file)
    for args in (["describe", str(file), "--author", "Jo"], ["rename", str(file), "mine"]):
        result = run(*args)
        assert_one_line_error(result, 1, f"Error: {file}: {args[0]} changes concepts in the library, and this file is "
                                         f"not one of them; import it first: conceptlib import '{file}'")
    own = library.path_for("cat-doll")
    assert run("describe", str(own), "--author", "Jo").exit_code == 0
    assert library.header("cat-doll").metadata["modelspec.author"] == "Jo"


def test_an_a1111_file_comes_back_under_its_own_name_its_prompt_word(library, tmp_path):
    """AUTOMATIC1111 calls an embedding by its file name: 'Bad Hands v2' in saved prompts. Imported,
    it is named bad-hands-v2 (a library name); exported back to A1111 or kohya it gets its own file
    name again, unless its token changed since. Two exports that would share a file are refused."""
    import safetensors.torch

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768)}, str(downloads / "Bad Hands v2.safetensors"))
    _a1111(downloads / "my style c.pt")
    assert run("import", str(downloads)).exit_code == 0
    assert {h.name: h.token for h in library.list()}["bad-hands-v2"] == "bad-hands-v2"

    out = tmp_path / "embeddings"
    result = run("export", "bad-hands-v2", "my-style-c", "--format", "a1111", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["Bad Hands v2.pt", "my style c.pt"]
    assert "AUTOMATIC1111 prompts call it 'Bad Hands v2'" in result.stdout
    assert run("export", "bad-hands-v2", "--format", "kohya", "--out", f"{tmp_path}/k/").exit_code == 0
    assert (tmp_path / "k" / "Bad Hands v2.safetensors").is_file()

    assert run("rename", "my-style-c", "my-style-c", "--token", "<my-style>").exit_code == 0
    again = run("export", "my-style-c", "--format", "a1111", "--out", f"{tmp_path}/renamed/")
    assert again.exit_code == 0 and (tmp_path / "renamed" / "my-style-c.pt").is_file()

    # Two concepts whose files would be one where file names ignore case: refused, nothing written.
    assert run("import", str(_a1111(downloads / "Straße.pt")), "--name", "street").exit_code == 0  # token straße
    library.add(Concept("strasse", "<strasse>", np.ones((1, 768), np.float32)))
    clash = run("export", "street", "strasse", "--format", "a1111", "--out", f"{tmp_path}/clash/")
    assert_one_line_error(clash, 2, f"Error: street and strasse would both be written to {tmp_path / 'clash' / 'strasse.pt'}")
    assert not (tmp_path / "clash").exists()


def test_export_all_chooses_by_base_model_and_tag_as_list_does(library, tmp_path):
    """A tool's embeddings folder holds one base model's concepts: --all takes list's filters."""
    result = run("export", "--all", "--model", "sd-2", "--format", "a1111", "--out", str(tmp_path / "sd2"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "sd2").iterdir()) == ["oil-style.pt"]
    run("describe", "cat-doll", "--tags", "toy, Cute")
    result = run("export", "--all", "--tag", "cute", "--format", "kohya", "--out", str(tmp_path / "cute"))
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "cute").iterdir()) == ["cat-doll.safetensors"]
    none = run("export", "--all", "--tag", "cute", "--base-model", "sd-2", "--format", "kohya", "--out", str(tmp_path / "n"))
    assert_one_line_error(none, 1, "none of the 2 concepts in the library has --base-model sd-2 and --tag cute: nothing "
                                   "to export; see conceptlib list")
    assert_one_line_error(run("export", "cat-doll", "--tag", "toy", "--format", "kohya"), 2,
                          "--tag chooses among --all; add --all, or drop --tag and name the concepts")
    assert not (tmp_path / "n").exists()


def test_nearest_without_weights_names_the_folders_it_searched(library, tmp_path, monkeypatch):
    from conceptlib.weights import keras_cache_dirs

    monkeypatch.delenv("CONCEPTLIB_WEIGHTS", raising=False)
    result = run("show", "cat-doll", "--nearest", "3")
    assert_one_line_error(result, 1, f"(kcv_encoder.h5) are not in {', '.join(map(str, keras_cache_dirs()))}; pass "
                                     "--weights DIR")
    empty = tmp_path / "weights"
    empty.mkdir()
    result = run("show", "cat-doll", "--nearest", "3", "--weights", str(empty))
    assert_one_line_error(result, 1, f"(kcv_encoder.h5) are not in {empty}; pass --weights DIR")


def test_an_a1111_export_imports_back_whole_token_description_and_card(library, tmp_path, monkeypatch):
    """Shared as an AUTOMATIC1111 file (A1111 calls it 'kitty', its file name, an ordinary word),
    a concept comes back into another library with its token, its description and the card
    picture exported beside it, instead of being refused for a token that is a CLIP word."""
    from conceptlib.formats import load_source

    library.add(Concept("kitty", "<kitty>", np.ones((2, 768), np.float32)))
    assert run("describe", "kitty", "--author", "Jo Doe", "--license", "CC-BY-4.0", "--tags", "toy, cute",
               "--thumbnail", str(_png_file(tmp_path / "thumb.png"))).exit_code == 0
    shared = tmp_path / "embeddings"
    assert run("export", "kitty", "--format", "a1111", "--out", f"{shared}/", "--with-preview").exit_code == 0
    assert sorted(p.name for p in shared.iterdir()) == ["kitty.preview.png", "kitty.pt"]
    assert torch.load(shared / "kitty.pt", weights_only=True)["name"] == "kitty"  # A1111's word is unchanged

    other = ConceptLibrary(tmp_path / "friend")
    monkeypatch.setenv("CONCEPTLIB_HOME", str(other.root))
    result = run("import", str(shared))
    assert result.exit_code == 0, result.output
    assert "Skipped" not in result.output  # the card is the concept's preview, not a skipped picture
    header = other.header("kitty")
    assert header.token == "<kitty>"
    assert {k: header.metadata[k] for k in ("modelspec.author", "modelspec.license", "modelspec.tags")} == {
        "modelspec.author": "Jo Doe", "modelspec.license": "CC-BY-4.0", "modelspec.tags": "toy, cute"}
    assert header.metadata["preview"] and load_source(shared / "kitty.pt").metadata["preview"] == header.metadata["preview"]
