"""ConceptLibrary: location, add/get/list/remove/rename, uniqueness, the index cache, and safety
between processes (concurrent writers, SIGKILL mid-write)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conceptlib.concept import Concept
from conceptlib.errors import CollisionError, ConceptError, ConceptFileError, LibraryError, NotFoundError
from conceptlib.files import WriteError, read_concept, read_header, write_concept
from conceptlib.library import ConceptLibrary, NameTakenError, TokenTakenError


def make(name, token=None, n=1, dim=768, seed=0, **metadata):
    rng = np.random.default_rng(seed)
    return Concept(name, token or f"<{name}>", rng.standard_normal((n, dim)).astype(np.float32), metadata)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every concept file's bytes: 'library unchanged' means this is equal before and after."""
    folder = root / "concepts"
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*"))} if folder.exists() else {}


@pytest.fixture
def library(tmp_path):
    return ConceptLibrary(tmp_path / "lib")


def test_location_from_env_and_platformdirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "home"))
    assert ConceptLibrary().root == tmp_path / "home"
    monkeypatch.delenv("CONCEPTLIB_HOME")
    import platformdirs

    assert ConceptLibrary().root == Path(platformdirs.user_data_path("conceptlib"))
    assert ConceptLibrary(tmp_path).runs_dir == tmp_path / "runs"


def test_the_suite_keeps_the_library_the_jax_cache_and_keras_home_in_tmp(isolated_home, monkeypatch):
    """conftest's isolated_home: the defaults a test forgets to redirect, with or without the
    conceptlib variables, and in a child process, are under the session's tmp folder."""
    from conceptlib.kerascv import jax_cache_dir
    from conceptlib.kerascv.tokenizer import keras_cache_dirs

    probe = ("import os; from conceptlib.library import ConceptLibrary; from conceptlib.kerascv import jax_cache_dir; "
             "print(ConceptLibrary().root); print(jax_cache_dir()); print(os.environ['KERAS_HOME'])")
    child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    expected = [isolated_home / "data" / "conceptlib", isolated_home / "cache" / "conceptlib" / "jax",
                isolated_home / "keras"]
    assert [Path(line) for line in child.stdout.splitlines()] == expected
    assert keras_cache_dirs()[0] == isolated_home / "keras" / "datasets"
    monkeypatch.delenv("CONCEPTLIB_HOME")
    monkeypatch.delenv("CONCEPTLIB_JAX_CACHE")
    assert [ConceptLibrary().root, jax_cache_dir()] == expected[:2]


def test_add_get_list_remove(library):
    assert library.list() == []
    header = library.add(make("cat-doll", n=2, trainer="tensorflow", custom_key="kept"))
    assert header.path == library.root / "concepts" / "cat-doll.safetensors"
    assert (header.name, header.token, header.num_vectors, header.dim, header.base_model) == ("cat-doll", "<cat-doll>", 2, 768, "sd-1")
    library.add(make("oil-style", dim=1024, seed=1))
    assert [h.name for h in library.list()] == ["cat-doll", "oil-style"]
    by_name, by_token = library.get("cat-doll"), library.get("<cat-doll>")
    np.testing.assert_array_equal(by_name.vectors, make("cat-doll", n=2).vectors)
    np.testing.assert_array_equal(by_token.vectors, by_name.vectors)
    assert by_name.metadata["custom_key"] == "kept"
    assert library.header("<oil-style>").base_model == "sd-2"
    assert library.find_token("<oil-style>").name == "oil-style"
    assert library.find_token("<nope>") is None
    assert "cat-doll" in library and "<nope>" not in library
    library.remove("cat-doll")
    assert [h.name for h in library.list()] == ["oil-style"]
    with pytest.raises(NotFoundError, match="cat-doll"):
        library.get("cat-doll")
    with pytest.raises(NotFoundError):
        library.remove("cat-doll")
    # A token is not removed (by name only), and the error says whose it is, not "did you mean" itself.
    with pytest.raises(NotFoundError) as info:
        library.remove("<oil-style>")
    assert str(info.value) == "'<oil-style>' is the token of concept 'oil-style'; remove it by name: remove('oil-style')"
    with pytest.raises(NotFoundError) as info:
        library.get("oil-styl")
    assert "did you mean 'oil-style'?" in str(info.value)
    assert [h.name for h in library.list()] == ["oil-style"]


def test_add_checks_the_concept_as_it_is_now(library):
    """A Concept's vectors can change after it was made: add() checks them again, so a NaN never
    reaches the library and a wrong width is a ConceptError, not a KeyError."""
    before = snapshot(library.root)
    diverged = make("diverged")
    diverged.vectors[0, 0] = np.nan
    with pytest.raises(ConceptError, match="vector 0 contains NaN or Inf"):
        library.add(diverged)
    narrow = make("narrow")
    narrow.vectors = np.ones((2, 5), np.float32)
    with pytest.raises(ConceptError, match="vector width 5 is not 768"):
        library.add(narrow)
    assert snapshot(library.root) == before


def test_names_and_tokens_are_unique(library):
    library.add(make("cat-doll"))
    before = snapshot(library.root)
    with pytest.raises(CollisionError, match="named 'cat-doll'"):
        library.add(make("cat-doll", token="<other>"))
    with pytest.raises(CollisionError, match="token '<cat-doll>' is already used"):
        library.add(make("other", token="<cat-doll>"))
    with pytest.raises(CollisionError):
        library.check_available("x", "<cat-doll>")
    library.check_available("x", "<x>")
    assert snapshot(library.root) == before
    # overwrite replaces the same name, never steals another concept's token.
    library.add(make("cat-doll", n=3), overwrite=True)
    assert library.header("cat-doll").num_vectors == 3
    library.add(make("b"))
    with pytest.raises(CollisionError):
        library.add(make("cat-doll", token="<b>"), overwrite=True)


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", ".hidden", "UPPER", "", "x" * 65])
def test_names_that_escape_the_library_are_refused(library, bad, tmp_path):
    library.add(make("ok"))
    before = snapshot(library.root)
    with pytest.raises(ConceptError):
        library.check_available(bad, "<t>")
    with pytest.raises((ConceptError, NotFoundError)):
        library.rename("ok", bad)
    with pytest.raises(NotFoundError):
        library.remove(bad)
    assert snapshot(library.root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]


def test_rename(library):
    library.add(make("a", preview="x" * 2000))
    library.add(make("b"))
    header = library.rename("a", "c", token="<c>")
    assert (header.name, header.token) == ("c", "<c>")
    concept = library.get("c")
    assert concept.metadata["name"] == "c" and concept.metadata["modelspec.trigger_phrase"] == "<c>"
    assert concept.metadata["preview"] == "x" * 2000
    assert [h.name for h in library.list()] == ["b", "c"]
    before = snapshot(library.root)
    with pytest.raises(CollisionError):
        library.rename("c", "b")
    with pytest.raises(CollisionError):
        library.rename("c", "d", token="<b>")
    with pytest.raises(NotFoundError):
        library.rename("zzz", "y")
    assert snapshot(library.root) == before
    assert library.rename("c", "c", token="<cc>").token == "<cc>"


def test_a_rename_whose_rewrite_fails_leaves_the_library_as_it_was(library, monkeypatch):
    import conceptlib.library as library_module

    library.add(make("a", preview="x"))
    before = snapshot(library.root)

    def failing_write(concept, path):
        raise WriteError(path, "the disk is full", "free some space")

    monkeypatch.setattr(library_module, "write_concept", failing_write)
    with pytest.raises(WriteError):
        library.rename("a", "b", token="<b>")
    assert snapshot(library.root) == before


def test_index_is_a_cache_never_the_truth(library):
    library.add(make("a", preview="p" * 5000, trainer="tf"))
    library.add(make("b"))
    assert [h.name for h in library.list()] == ["a", "b"]
    index = library.root / ".index.json"
    assert index.exists()
    # Long values stay out of the index but load from the file on access.
    assert "p" * 5000 not in index.read_text()
    header = ConceptLibrary(library.root).list()[0]
    assert header.summary()["trainer"] == "tf"
    assert ConceptLibrary(library.root).summaries() == [h.summary() for h in library.list()]
    assert library.summaries()[0] == read_header(header.path).summary() | {"name": "a"}
    assert header.metadata["preview"] == "p" * 5000
    # A file changed behind the index's back (same size!) is re-read.
    write_concept(make("a", token="<a2>", preview="q" * 5000, trainer="tf"), library.root / "concepts" / "a.safetensors")
    assert ConceptLibrary(library.root).header("a").token == "<a2>"
    assert [h.token for h in ConceptLibrary(library.root).list()] == ["<a2>", "<b>"]
    # Corrupt or foreign index: rebuilt silently.
    for garbage in (b"{not json", b"[]", json.dumps({"version": 1, "files": {"a.safetensors": {"key": 1}}}).encode()):
        index.write_bytes(garbage)
        assert [h.token for h in ConceptLibrary(library.root).list()] == ["<a2>", "<b>"]
    # A file added or removed without the library is noticed.
    write_concept(make("c"), library.root / "concepts" / "c.safetensors")
    (library.root / "concepts" / "b.safetensors").unlink()
    assert [h.name for h in ConceptLibrary(library.root).list()] == ["a", "c"]


def test_broken_files_in_the_library_are_reported_not_fatal(library):
    library.add(make("good"))
    folder = library.root / "concepts"
    (folder / "broken.safetensors").write_bytes(b"\x10\x00")
    (folder / "Bad Name.safetensors").write_bytes((folder / "good.safetensors").read_bytes())
    (folder / ".tmp-abc.safetensors").write_bytes(b"partial")  # hidden: a write in progress, passed over
    (folder / "notes.txt").write_text("not a concept")
    assert [h.name for h in library.list()] == ["good"]
    assert sorted(p.path.name for p in library.problems) == ["Bad Name.safetensors", "broken.safetensors", "notes.txt"]
    assert all("\n" not in p.message for p in library.problems)


def test_another_tools_file_copied_into_the_concepts_folder_is_said_not_listed(library, tmp_path):
    """`conceptlib path` shows the folder, and people copy downloads into it: a kohya .safetensors
    (whose tensor key 'emb_params' is no token) or an A1111 .pt is reported with how to add it,
    never listed (it used to be, as the concept 'emb_params')."""
    from safetensors.numpy import save_file

    library.add(make("good"))
    folder = library.root / "concepts"
    save_file({"emb_params": np.ones((2, 768), np.float32)}, str(folder / "badhands.safetensors"))
    (folder / "dreamy.pt").write_bytes(b"PK\x03\x04 a torch zip")
    assert [h.name for h in library.list()] == ["good"]
    messages = {p.path.name: p.message for p in library.problems}
    assert messages == {
        "badhands.safetensors": f"{folder / 'badhands.safetensors'}: not a conceptlib file (another tool's embedding, "
                                "copied in by hand?); move it out of the concepts folder, then add it with conceptlib "
                                "import FILE",
        "dreamy.pt": f"{folder / 'dreamy.pt'}: not a library file (the library keeps NAME.safetensors files); move it "
                     "out of the concepts folder, then add it with conceptlib import FILE",
    }
    library.remove("badhands")  # as for any file the listing skips
    assert library.list() != [] and [p.path.name for p in library.problems] == ["dreamy.pt"]


def test_a_name_never_hides_a_token_and_both_collisions_are_said_at_once(library):
    library.add(make("qqq", token="my-doll"))
    library.add(make("aaa"))
    before = snapshot(library.root)
    with pytest.raises(CollisionError, match="name 'my-doll' is the token of concept 'qqq'"):
        library.rename("aaa", "my-doll")
    with pytest.raises(CollisionError, match="token 'qqq' is the name of concept 'qqq'"):
        library.add(make("bbb", token="qqq"))
    with pytest.raises(NameTakenError, match="choose another name \\(--name\\), and another token \\(--token\\), "
                                             "since concept 'qqq' has token 'my-doll'"):
        library.add(make("aaa", token="my-doll"))
    assert snapshot(library.root) == before
    assert library.add(make("ink", token="ink")).token == "ink"  # its own name as its token is fine


def test_entries_the_listing_cannot_use_are_said_and_removable(library):
    library.add(make("aaa"))
    folder = library.concepts_dir
    shutil.copy(folder / "aaa.safetensors", folder / "copy.safetensors")  # the same token again
    write_concept(make("none"), folder / "many.safetensors")
    _set_vector_count(folder / "many.safetensors", 76)
    os.mkfifo(folder / "fifo.safetensors")  # opening it would wait forever
    (folder / "gone.safetensors").symlink_to(folder / "missing.safetensors")
    shutil.copy(folder / "aaa.safetensors", folder / "Bad Name.safetensors")
    assert [h.name for h in library.list()] == ["aaa"]
    problems = {p.path.name: p.message for p in library.problems}
    assert "its token '<aaa>' is also the token of concept 'aaa'" in problems["copy.safetensors"]
    assert "76 vectors, but a concept has 1 to 75" in problems["many.safetensors"]
    assert "not a regular file" in problems["fifo.safetensors"]
    assert "a link to a file that does not exist" in problems["gone.safetensors"]
    assert "or remove it (conceptlib remove 'Bad Name')" in problems["Bad Name.safetensors"]
    assert library.header("<aaa>").name == "aaa"
    for name in ("copy", "many", "fifo", "gone", "Bad Name"):
        library.remove(name)
    assert sorted(p.name for p in folder.iterdir()) == ["aaa.safetensors"]
    assert library.file_entry("../lib/concepts/aaa") is None and library.file_entry("") is None


def _set_vector_count(path: Path, count: int) -> None:
    """Rewrite a concept file's header to claim ``count`` vectors (with matching data)."""
    import json
    import struct

    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    (key,) = [k for k in header if k != "__metadata__"]
    header[key]["shape"] = [count, 768]
    header[key]["data_offsets"] = [0, count * 768 * 4]
    header["__metadata__"]["num_vectors"] = str(count)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"\0" * (count * 768 * 4))


def test_an_index_with_fields_of_the_wrong_type_is_rebuilt(library):
    library.add(make("aaa"))
    library.list()
    index = library.root / ".index.json"
    data = json.loads(index.read_text())
    data["files"]["aaa.safetensors"]["name"] = None
    index.write_text(json.dumps(data))
    assert [h.name for h in ConceptLibrary(library.root).list()] == ["aaa"]


def test_name_comes_from_the_file_name(library):
    # A file copied in by hand under another name is known by its file name.
    path = library.root / "concepts" / "copied.safetensors"
    write_concept(make("original"), path)
    assert library.header("copied").name == "copied"
    assert library.get("copied").name == "copied"
    assert library.list()[0].name == "copied"


def test_lock_is_reentrant_and_exclusive_between_processes(library):
    with library.lock():
        with library.lock():
            library.add(make("a"))
        code = textwrap.dedent(f"""
            import fcntl, os
            fd = os.open({str(library.root / '.lock')!r}, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("acquired")
            except BlockingIOError:
                print("blocked")
        """)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "blocked"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "acquired"


_ADDER = """
import sys, numpy as np
from conceptlib.concept import Concept
from conceptlib.errors import CollisionError
from conceptlib.library import ConceptLibrary
root, worker, count, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
library = ConceptLibrary(root)
for i in range(count):
    name = f"w{worker}-c{i}"
    token = "<shared>" if shared else f"<{name}>"
    vectors = np.full((2, 768), worker * 1000 + i, dtype=np.float32)
    try:
        library.add(Concept(name, token, vectors, {"worker": str(worker)}))
        print("added", name)
    except CollisionError:
        print("collision", name)
"""


def _spawn_adders(root, workers, count, shared):
    procs = [subprocess.Popen([sys.executable, "-c", _ADDER, str(root), str(w), str(count), "1" if shared else "0"],
                              stdout=subprocess.PIPE, text=True) for w in range(workers)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    return outputs


def test_concurrent_processes_lose_nothing(library):
    workers, count = 6, 8
    _spawn_adders(library.root, workers, count, shared=False)
    headers = library.list()
    assert library.problems == []
    assert len(headers) == workers * count
    for w in range(workers):
        for i in range(count):
            concept = library.get(f"w{w}-c{i}")
            assert concept.token == f"<w{w}-c{i}>"
            assert np.all(concept.vectors == w * 1000 + i)
    assert not list((library.root / "concepts").glob(".tmp-*"))


def test_concurrent_processes_same_token_exactly_one_wins(library):
    outputs = _spawn_adders(library.root, 4, 1, shared=True)
    assert sum(out.count("added") for out in outputs) == 1
    assert sum(out.count("collision") for out in outputs) == 3
    assert [h.token for h in library.list()] == ["<shared>"]


_KILLED_WRITER = """
import os, sys, time, numpy as np
from conceptlib.concept import Concept
from conceptlib.library import ConceptLibrary
library = ConceptLibrary(sys.argv[1])
real_fsync = os.fsync
def fsync_then_hang(fd):
    real_fsync(fd)
    print("mid-write", flush=True)
    time.sleep(60)
os.fsync = fsync_then_hang
library.add(Concept("victim", "<victim>", np.full((4, 768), 9, dtype=np.float32), {"preview": "z" * 100000}),
            overwrite=True)
"""


def test_sigkill_mid_write_leaves_a_readable_library(library):
    library.add(make("victim", n=1))
    library.add(make("bystander"))
    before = snapshot(library.root)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(library.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mid-write"
        temp_files = list((library.root / "concepts").glob(".tmp-*"))
        assert temp_files, "the child should be killed with its temp file written but not yet renamed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # Old contents intact, the half-done write invisible, the lock released by the kernel.
    assert snapshot(library.root) == before | {p.name: p.read_bytes() for p in temp_files}
    fresh = ConceptLibrary(library.root)
    assert [h.name for h in fresh.list()] == ["bystander", "victim"] and fresh.problems == []
    assert fresh.get("victim").num_vectors == 1
    fresh.add(make("after"))  # would hang if the dead process still held the lock
    assert not list((library.root / "concepts").glob(".tmp-*")), "leftover temp files are cleaned up under the lock"
    for header in fresh.list():
        read_concept(header.path)


def test_rename_by_token_and_collision_hints(library):
    library.add(make("a"))
    library.add(make("b"))
    header = library.rename("<a>", "c")
    assert (header.name, header.token) == ("c", "<a>")
    assert [h.name for h in library.list()] == ["b", "c"]
    before = snapshot(library.root)
    with pytest.raises(NameTakenError) as taken:
        library.rename("<a>", "b")
    # rename has no --name option: the hint speaks of the new name.
    assert taken.value.name == "b" and "choose another new name" in str(taken.value) and "--name" not in str(taken.value)
    with pytest.raises(TokenTakenError) as taken:
        library.rename("c", "d", token="<b>")
    assert (taken.value.token, taken.value.owner) == ("<b>", "b") and "choose another --token" in str(taken.value)
    # add() (import, train) keeps naming the options those commands have.
    with pytest.raises(NameTakenError, match=r"choose another name \(--name\)"):
        library.add(make("b", token="<new>"))
    assert snapshot(library.root) == before


def test_a_corrupt_concept_file_can_be_removed(library):
    library.add(make("good"))
    bad = library.root / "concepts" / "bad.safetensors"
    header = json.dumps({"<x>": {"dtype": "F32", "shape": [1, 768], "data_offsets": [3072, 0]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(3072))
    assert [h.name for h in library.list()] == ["good"]
    assert "bad data_offsets" in library.problems[0].message
    with pytest.raises(ConceptFileError, match="bad data_offsets"):
        library.header("bad")
    with pytest.raises(ConceptFileError, match="bad data_offsets"):
        library.rename("bad", "fixed")
    library.add(make("other"))  # the broken file does not block other work
    library.remove("bad")
    assert not bad.exists() and [h.name for h in library.list()] == ["good", "other"] and library.problems == []


def test_nan_vectors_are_a_problem_even_with_an_old_index(library):
    from safetensors.numpy import save_file

    library.add(make("good"))
    vectors = np.ones((2, 768), np.float32)
    vectors[1, 0] = np.nan
    save_file({"<nan>": vectors}, str(library.root / "concepts" / "nan.safetensors"), metadata={"format": "conceptlib/1"})
    assert [h.name for h in library.list()] == ["good"]
    assert [p.path.name for p in library.problems] == ["nan.safetensors"]
    assert "vector 1 holds NaN or Inf" in library.problems[0].message
    assert "conceptlib remove nan" in library.problems[0].message
    # An index written before NaN files were flagged (version 2) listed the file as usable.
    index = library.root / ".index.json"
    data = json.loads(index.read_text())
    data["version"] = 2
    data["files"]["nan.safetensors"] = dict(data["files"]["good.safetensors"], name="nan", token="<nan>",
                                            key=data["files"]["nan.safetensors"]["key"])
    index.write_text(json.dumps(data))
    assert [h.name for h in ConceptLibrary(library.root).list()] == ["good"]


def test_a_skipped_files_line_is_never_an_old_versions_cached_one(library):
    library.add(make("good"))
    bad = library.root / "concepts" / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert [h.name for h in library.list()] == ["good"]
    current = library.problems[0].message
    # The index holds the line an earlier version wrote for the unchanged file.
    index = library.root / ".index.json"
    data = json.loads(index.read_text())
    data["files"]["bad.safetensors"]["error"] = "an old reason without the fix"
    index.write_text(json.dumps(data))
    fresh = ConceptLibrary(library.root)
    assert [h.name for h in fresh.list()] == ["good"] and [p.message for p in fresh.problems] == [current]
    assert json.loads(index.read_text())["files"]["bad.safetensors"]["error"] == current
    # Nothing changed since: the index is not rewritten.
    before = index.stat().st_mtime_ns
    fresh.list()
    assert index.stat().st_mtime_ns == before


def test_unwritable_library_is_one_line_and_unchanged(tmp_path):
    (tmp_path / "afile").write_text("x")
    library = ConceptLibrary(tmp_path / "afile")
    with pytest.raises(WriteError) as info:
        library.add(make("a"))
    assert str(info.value) == (f"cannot write {tmp_path / 'afile' / '.lock'}: {tmp_path / 'afile'} is a file, not a folder; "
                               f"make {tmp_path / 'afile'} a writable folder, or set CONCEPTLIB_HOME to one")
    assert (tmp_path / "afile").read_text() == "x"
    root = tmp_path / "lib"
    root.mkdir()
    (root / "concepts").write_text("not a folder")
    with pytest.raises(LibraryError, match="is not a folder"):
        ConceptLibrary(root).add(make("a"))
    assert (root / "concepts").read_text() == "not a folder"
    with pytest.raises(WriteError, match="nothing can be created in /proc"):
        ConceptLibrary("/proc/conceptlib-test").add(make("a"))


def test_library_files_are_readable_by_others(library):
    old = os.umask(0o022)
    try:
        path = library.add(make("a")).path
        renamed = library.rename("a", "b", token="<b>").path
    finally:
        os.umask(old)
    assert not path.exists() and os.stat(renamed).st_mode & 0o777 == 0o644


def test_a_relative_library_folder_is_made_absolute(tmp_path, monkeypatch):
    """A relative CONCEPTLIB_HOME would be another library after every `cd`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONCEPTLIB_HOME", "rel-lib")
    assert ConceptLibrary().root == tmp_path / "rel-lib"
    assert ConceptLibrary("other").root == tmp_path / "other"


def test_a_concept_removed_while_listing_is_skipped_quietly(library, monkeypatch):
    """Readers take no lock: a file another process removes between the folder scan and the
    header read is gone, not a problem (nor a traceback)."""
    import conceptlib.files as files

    library.add(make("stays"))
    library.add(make("goes"))
    (library.root / ".index.json").unlink()  # so both files are read again
    real = files._file_header_from

    def removed_meanwhile(handle, path):
        if path.name == "goes.safetensors":
            path.unlink()
            raise files.ConceptFileError(f"{path}: no such file; check the path")
        return real(handle, path)

    monkeypatch.setattr(files, "_file_header_from", removed_meanwhile)
    assert [h.name for h in library.list()] == ["stays"] and library.problems == []


def test_norms_are_read_from_one_version_of_a_file_rewritten_meanwhile(library, monkeypatch):
    """A concurrent `describe` replaces the file (a longer header moves the data): the norms must
    come from the file whose header was read, never from the new file at the old offsets."""
    import conceptlib.files as files

    concept = make("doll", n=2)
    path = library.add(concept).path
    expected = [round(float(np.linalg.norm(v)), 4) for v in concept.vectors]
    real = files._file_header_from
    rewritten = []

    def described_meanwhile(handle, header_path):
        header = real(handle, header_path)
        if not rewritten:
            rewritten.append(True)
            library.describe("doll", {"modelspec.description": "x" * 3000})
        return header

    monkeypatch.setattr(files, "_file_header_from", described_meanwhile)
    assert [round(n, 4) for n in files.vector_norms(path)] == expected
    assert rewritten


def test_a_library_folder_that_cannot_be_read_is_one_line(library, monkeypatch):
    """E.g. a shared library of another account (chmod 700): every command's one line, no traceback
    (simulated: root reads everything)."""
    library.add(make("doll"))
    concepts = library.concepts_dir
    real_scandir, real_is_file = os.scandir, Path.is_file

    def scandir(path="."):
        if Path(path) == concepts:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def is_file(self):
        if self.parent == concepts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "is_file", is_file)
    message = (f"cannot read the library folder {concepts}: permission denied; make it readable (and searchable) "
               "for you, or set CONCEPTLIB_HOME to another folder")
    for action in (library.list, lambda: library.header("doll"), lambda: library.header("<doll>"),
                   lambda: library.rename("doll", "other"), lambda: library.add(make("new"))):
        with pytest.raises(LibraryError) as caught:
            action()
        assert str(caught.value) == message


def test_reader_threads_never_see_or_spoil_the_writers_token_table(library):
    """A ConceptLibrary shared between threads: readers looking up tokens while one thread holds
    the lock and writes get answers (no 'dictionary changed size'), and a taken token stays taken."""
    import threading

    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                library.find_token("<nope>")
            except Exception as exc:  # noqa: BLE001 - any exception here is the defect
                errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers:
        thread.start()
    duplicates = 0
    try:
        with library.lock():
            for i in range(60):
                library.add(make(f"a{i}", f"<t{i}>"))
                library.describe(f"a{i}", {"modelspec.author": "x"})
                try:
                    library.add(make(f"b{i}", f"<t{i}>"))
                    duplicates += 1
                except TokenTakenError:
                    pass
    finally:
        stop.set()
        for thread in readers:
            thread.join()
    assert errors == [] and duplicates == 0
    assert len(library.list()) == 60 and library.problems == []


def test_index_temp_files_of_killed_processes_are_removed(library):
    """Listing saves the index without the lock; a lister killed mid-save leaves its temp file,
    which the next write removes (a live process's is left alone)."""
    library.add(make("doll"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = library.root / f".index.{int(gone.stdout)}.1.tmp"
    alive = library.root / f".index.{os.getpid()}.2.tmp"
    dead.write_text("{}")
    alive.write_text("{}")
    library.add(make("other"))
    assert not dead.exists() and alive.exists()


def test_library_folder_conditions_get_the_fix_that_fits(tmp_path, monkeypatch):
    import errno

    import conceptlib.library as library_module

    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    with pytest.raises(LibraryError, match=f"^{a_file} is not a folder; move it away or set CONCEPTLIB_HOME$"):
        ConceptLibrary(a_file).list()
    library = ConceptLibrary(tmp_path / "lib")
    library.add(make("doll"))
    (library.concepts_dir / "d.safetensors").mkdir()
    library.list()
    assert [p.message for p in library.problems] == [
        f"{library.concepts_dir / 'd.safetensors'}: a folder, not a concept file; move it out of the concepts folder"]
    with pytest.raises(LibraryError, match="d.safetensors is a folder, not a concept; move it out of the concepts"):
        library.rename("doll", "d")
    (library.concepts_dir / "d.safetensors").rmdir()

    def full_disk(concept, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(library_module, "write_concept", full_disk)
    before = snapshot(library.root)
    with pytest.raises(WriteError) as caught:
        library.add(make("big"))
    assert str(caught.value).endswith(f"free some space on the disk of {library.root}, or set CONCEPTLIB_HOME to a "
                                      "folder on another one")
    assert snapshot(library.root) == before
