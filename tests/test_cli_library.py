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
from conceptlib.concept import Concept
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
    text = run("show", "<cat-doll>").output  # by token too
    assert "name:        cat-doll" in text and "<base64 PNG" in text and "modelspec.architecture" in text
    assert f"{np.linalg.norm(concept.vectors[0]):.4f}" in text


def test_remove_asks(library):
    before = snapshot(library.root)
    result = run("remove", "cat-doll", input="n\n")
    assert result.exit_code == 1 and snapshot(library.root) == before
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
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)}, "name": "b", "step": 10,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, folder / "b.pt", _use_new_zipfile_serialization=False)
    safetensors_torch.save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, folder / "xl.safetensors")
    (folder / "readme.txt").write_text("hi")
    return folder


def test_import_folder_reports_each(home, tmp_path):
    folder = _foreign_folder(tmp_path / "in")
    result = run("import", str(folder))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Imported a (<a>, 1x768)" in out and "Imported b (b, 2x768)" in out
    assert "Skipped" in out and "xl.safetensors: an SDXL embedding" in out and "readme.txt: not a concept file" in out
    assert "2 imported, 2 skipped" in out
    assert [h.name for h in ConceptLibrary(home).list()] == ["a", "b"]
    # Again: everything is already there -> nothing imported -> exit 1, library unchanged.
    before = snapshot(home)
    result = run("import", str(folder))
    assert result.exit_code == 1
    assert "already exists" in result.output and result.stderr.strip().startswith("Error: nothing imported")
    assert snapshot(home) == before


def test_import_single_file_with_name_and_token(home, tmp_path):
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<x>": torch.randn(768)}, path)
    result = run("import", str(path), "--name", "my-x", "--token", "<my-x>")
    assert result.exit_code == 0, result.output
    header = ConceptLibrary(home).header("my-x")
    assert header.token == "<my-x>" and header.metadata["source_format"] == "diffusers"


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
    again = run("export", "cat-doll", "--format", fmt, "--out", str(out))
    if fmt != "sd-concepts":
        assert_one_line_error(again, 1, "--force")
        assert run("export", "cat-doll", "--format", fmt, "--out", str(out), "--force").exit_code == 0


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
    assert result.stdout.count("Skipped") == 10 and "0 imported" in result.stdout
    assert snapshot(library.root) == before
    assert not (tmp_path / "bad" / "canary").exists()


def test_bad_arguments(library, tmp_path):
    before = snapshot(library.root)
    (tmp_path / "empty").mkdir()
    safetensors_torch.save_file({"<q>": torch.randn(1, 768)}, tmp_path / "q.safetensors")
    for args, code, needle in [
        (["import", str(tmp_path / "empty")], 1, "no concept files"),
        (["import", str(tmp_path / "nope")], 1, "no such file"),
        (["import", str(tmp_path / "q.safetensors"), "--name", "../escape"], 1, "invalid concept name"),
        (["import", str(tmp_path / "q.safetensors"), "--name", "a/b"], 1, "invalid concept name"),
        (["import", str(tmp_path / "q.safetensors"), "--token", "<Upper>"], 1, "lowercases"),
        (["import", str(tmp_path / "q.safetensors"), "--name", "q2", "--token", "<cat-doll>"], 1, "already used"),
        (["show", "../../etc/passwd"], 1, "no concept"),
        (["show", "missing"], 1, "no concept"),
        (["remove", "-y", "../cat-doll"], 1, "no concept"),
        (["remove", "-y", "<cat-doll>"], 2, "remove it by name"),
        (["rename", "cat-doll", "../x"], 1, "invalid concept name"),
        (["rename", "cat-doll", "oil-style"], 1, "already exists"),
        (["rename", "cat-doll", "new", "--token", "<oil-style>"], 1, "already used"),
        (["export", "missing", "--format", "a1111", "--out", str(tmp_path / "x.pt")], 1, "no concept"),
    ]:
        assert_one_line_error(run(*args), code, needle)
        assert snapshot(library.root) == before, args
    assert not (tmp_path / "escape.safetensors").exists() and not (library.root / "escape.safetensors").exists()


def test_usage_errors_exit_2(library, tmp_path):
    _foreign_folder(tmp_path / "in")
    before = snapshot(library.root)
    assert run("export", "cat-doll").exit_code == 2  # --format missing
    assert run("export", "cat-doll", "--format", "ckpt").exit_code == 2
    assert run("import").exit_code == 2
    assert_one_line_error(run("import", str(tmp_path / "in"), "--name", "x"), 2, "one at a time")
    assert snapshot(library.root) == before


# -- real processes --------------------------------------------------------------------------------


def _conceptlib(*args, home, cwd=None):
    exe = shutil.which("conceptlib")
    cmd = [exe] if exe else [sys.executable, "-c", "from conceptlib.cli import main; main()"]
    env = dict(os.environ, CONCEPTLIB_HOME=str(home))
    return subprocess.run(cmd + list(args), env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_real_process_round_trip(home, tmp_path):
    folder = _foreign_folder(tmp_path / "in")
    result = _conceptlib("import", str(folder), home=home)
    assert result.returncode == 0, result.stderr
    rows = json.loads(_conceptlib("list", "--json", home=home).stdout)
    assert [(r["name"], r["token"], r["num_vectors"], r["dim"], r["base_model"]) for r in rows] == [
        ("a", "<a>", 1, 768, "sd-1"), ("b", "b", 2, 768, "sd-1")]
    out = tmp_path / "b.pt"
    assert _conceptlib("export", "b", "--format", "a1111", "--out", str(out), home=home).returncode == 0
    assert tuple(torch.load(out, weights_only=True)["string_to_param"]["*"].shape) == (2, 768)
    bad = _conceptlib("show", "nope", home=home)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("Error: ")
    assert _conceptlib("export", "b", home=home).returncode == 2


_PROBE = """
import sys
from conceptlib.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
import json
heavy = sorted(m for m in ("tensorflow", "keras", "keras_cv", "jax", "torch") if m in sys.modules)
print("PROBE", json.dumps({"heavy": heavy, "numpy": "numpy" in sys.modules, "code": code}), file=sys.stderr)
"""


@pytest.mark.parametrize("args,numpy_ok", [
    (["list"], False),
    (["list", "--json"], False),
    (["show", "cat-doll"], False),
    (["show", "cat-doll", "--json"], False),
    (["path"], False),
    (["import", "{folder}"], True),
    (["export", "cat-doll", "--format", "a1111", "--out", "{out}"], True),
    (["export", "cat-doll", "--format", "diffusers", "--out", "{out}.safetensors"], True),
])
def test_library_commands_never_import_tensorflow(library, tmp_path, args, numpy_ok):
    folder = _foreign_folder(tmp_path / "in")
    args = [a.format(folder=folder, out=tmp_path / "out.pt") for a in args]
    env = dict(os.environ, CONCEPTLIB_HOME=str(library.root))
    result = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True, timeout=120)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("PROBE "), result.stderr
    probe = json.loads(last[len("PROBE "):])
    assert probe["code"] == 0, result.stderr
    assert probe["heavy"] == [], f"{args} imported {probe['heavy']}"
    if not numpy_ok:
        assert not probe["numpy"], f"{args} imported numpy; listing/showing must read headers only"
