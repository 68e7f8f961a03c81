"""Other tools' files: read them as those tools write them, export files those tools load.

torch/safetensors.torch are used only the way diffusers, AUTOMATIC1111, kohya and the
sd-concepts-library write and read their files.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conceptlib.concept import Concept
from conceptlib.errors import ConceptFileError, ConceptlibError, UnsafePickleError, UnsupportedFormatError, UsageError
from conceptlib.files import read_concept, write_concept
from conceptlib.formats import EXPORT_FORMATS, discover, export, load_any

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

ZIP = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def a1111_save(path, vec, zip_format=True):
    """What AUTOMATIC1111's Embedding.save writes."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": path.stem,
        "step": 1999,
        "sd_checkpoint": "6ce0161689",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(data, path, _use_new_zipfile_serialization=zip_format)
    return path


def one(path, **kw) -> Concept:
    concepts = load_any(path, **kw)
    assert len(concepts) == 1
    return concepts[0]


# -- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(768,), (1, 768), (4, 768), (2, 1024)])
def test_diffusers_safetensors(tmp_path, shape):
    vec = torch.randn(*shape)
    path = tmp_path / "learned_embeds.safetensors"
    safetensors_torch.save_file({"<cat-toy>": vec}, path, metadata={"format": "pt"})
    concept = one(path)
    assert (concept.name, concept.token) == ("cat-toy", "<cat-toy>")
    np.testing.assert_array_equal(concept.vectors, vec.reshape(-1, shape[-1]).numpy())
    assert concept.metadata["source_format"] == "diffusers"


@ZIP
@pytest.mark.parametrize("shape", [(768,), (3, 768)])
def test_diffusers_bin(tmp_path, zip_format, shape):
    vec = torch.randn(*shape)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<Cat-Toy>": vec}, path, _use_new_zipfile_serialization=zip_format)
    concept = one(path)
    # KerasCV lowercases prompts, so the token is stored lowercase.
    assert concept.token == "<cat-toy>" and concept.name == "cat-toy"
    np.testing.assert_array_equal(concept.vectors, vec.reshape(-1, 768).numpy())
    assert one(path, token="<mine>", name="mine").token == "<mine>"


@ZIP
def test_sd_concepts_library_folder(tmp_path, zip_format):
    folder = tmp_path / "midjourney-style"
    folder.mkdir()
    vec = torch.randn(768)
    torch.save({"<midjourney-style>": vec}, folder / "learned_embeds.bin", _use_new_zipfile_serialization=zip_format)
    (folder / "token_identifier.txt").write_text("<midjourney-style>")
    (folder / "type_of_concept.txt").write_text("style")
    (folder / "README.md").write_text("# a concept")
    concept = one(folder)
    assert (concept.name, concept.token) == ("midjourney-style", "<midjourney-style>")
    assert concept.metadata["type_of_concept"] == "style"
    assert concept.metadata["source_format"] == "sd-concepts"
    np.testing.assert_array_equal(concept.vectors[0], vec.numpy())
    # token_identifier.txt wins over the key inside the file (the library's repos say so).
    (folder / "token_identifier.txt").write_text("<mj>")
    assert one(folder).token == "<mj>"


@ZIP
def test_a1111_pt(tmp_path, zip_format):
    vec = torch.randn(5, 768, requires_grad=True)
    path = a1111_save(tmp_path / "Dolly Style.pt", vec, zip_format)
    concept = one(path)
    # AUTOMATIC1111 uses the file name as the prompt word.
    assert (concept.name, concept.token) == ("dolly-style", "dolly-style")
    np.testing.assert_array_equal(concept.vectors, vec.detach().numpy())
    assert concept.metadata["a1111.step"] == "1999"
    assert concept.metadata["a1111.sd_checkpoint_name"] == "v1-5-pruned-emaonly"
    assert concept.metadata["source_format"] == "a1111"
    assert one(path, token="<dolly>").token == "<dolly>"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_kohya_emb_params(tmp_path, suffix):
    vec = torch.randn(3, 1024)
    path = tmp_path / f"mystyle{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file({"emb_params": vec}, path, metadata={"ss_network_module": "textual_inversion"})
    else:
        torch.save({"emb_params": vec}, path)
    concept = one(path)
    assert (concept.name, concept.token, concept.base_model) == ("mystyle", "mystyle", "sd-2")
    np.testing.assert_array_equal(concept.vectors, vec.numpy())
    assert one(path, token="<my-style>", name="my-style").token == "<my-style>"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors(tmp_path, dtype):
    vec = torch.randn(2, 768).to(getattr(torch, dtype))
    path = tmp_path / "half.safetensors"
    safetensors_torch.save_file({"<half>": vec}, path)
    concept = one(path)
    assert concept.vectors.dtype == np.float32
    np.testing.assert_array_equal(concept.vectors, vec.float().numpy())


def test_our_own_files(tmp_path):
    original = Concept("cat-doll", "<cat-doll>", np.ones((2, 768), np.float32), {"trainer": "tensorflow", "x": "y"})
    path = write_concept(original, tmp_path / "whatever.safetensors")
    concept = one(path)
    assert (concept.name, concept.token) == ("cat-doll", "<cat-doll>")
    assert concept.metadata["x"] == "y" and concept.metadata["trainer"] == "tensorflow"
    assert "source_format" not in concept.metadata


@pytest.mark.parametrize("container", ["safetensors", "pt"])
def test_sdxl_is_refused_with_the_reason(tmp_path, container):
    tensors = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    path = tmp_path / f"sdxl.{container}"
    if container == "safetensors":
        safetensors_torch.save_file(tensors, path)
    else:
        torch.save(tensors, path)
    with pytest.raises(UnsupportedFormatError, match="SDXL.*KerasCV has no SDXL"):
        load_any(path)


def test_folder_of_many(tmp_path):
    safetensors_torch.save_file({"<a>": torch.randn(1, 768)}, tmp_path / "a.safetensors")
    a1111_save(tmp_path / "b.pt", torch.randn(2, 768))
    torch.save({"<c>": torch.randn(768)}, tmp_path / "learned_embeds.bin")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    sources, skipped = discover(tmp_path)
    assert sorted(s.path.name for s in sources) == ["a.safetensors", "b.pt", "learned_embeds.bin"]
    assert sorted(s.path.name for s in skipped) == ["notes.txt", "sub"]
    assert sorted(c.token for c in load_any(tmp_path)) == ["<a>", "<c>", "b"]
    with pytest.raises(UsageError):
        load_any(tmp_path, token="<x>")


# -- bad input -------------------------------------------------------------------------------------


def _good_safetensors(path, shape=(2, 768), key="<t>"):
    safetensors_torch.save_file({key: torch.randn(*shape)}, path)
    return path


def test_bad_inputs_are_one_line_errors(tmp_path):

    good = _good_safetensors(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[:-10])
    (tmp_path / "header-cut.safetensors").write_bytes(raw[:20])
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    (tmp_path / "empty.bin").write_bytes(b"")
    _good_safetensors(tmp_path / "rank3.safetensors", shape=(1, 2, 768))
    _good_safetensors(tmp_path / "dim512.safetensors", shape=(2, 512))
    safetensors_torch.save_file({"<n>": torch.tensor([[float("nan")] * 768])}, tmp_path / "nan.safetensors")
    torch.save({"<i>": torch.full((768,), float("inf"))}, tmp_path / "inf.bin")
    safetensors_torch.save_file({"a": torch.randn(768), "b": torch.randn(768)}, tmp_path / "two.safetensors")
    safetensors_torch.save_file({"<i>": torch.arange(768)}, tmp_path / "ints.safetensors")
    torch.save({"state_dict": {"a": torch.randn(3)}, "epoch": 3}, tmp_path / "checkpoint.pt")
    torch.save([torch.randn(768)], tmp_path / "list.pt")
    a1111_save(tmp_path / "toomany.pt", torch.randn(80, 768))
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "missing")
    expected = {
        "truncated.safetensors": "truncated",
        "header-cut.safetensors": "truncated",
        "garbage.safetensors": "not a safetensors file",
        "garbage.pt": "PyTorch",
        "empty.bin": "empty",
        "rank3.safetensors": "rank 3",
        "dim512.safetensors": "512",
        "nan.safetensors": "NaN or Inf",
        "inf.bin": "NaN or Inf",
        "two.safetensors": "exactly one",
        "ints.safetensors": "I64",
        "checkpoint.pt": "not a textual-inversion embedding",
        "list.pt": "not a dictionary",
        "toomany.pt": "80 vectors",
        "folder.pt": "no concept files",
        "dangling.safetensors": "no such file",
    }
    for name, needle in expected.items():
        with pytest.raises(ConceptlibError) as info:
            load_any(tmp_path / name)
        message = str(info.value)
        assert needle in message, (name, message)
        assert "\n" not in message and info.value.exit_code == 1
        assert not isinstance(info.value, UnsafePickleError), name


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptFileError, match="no concept files"):
        load_any(tmp_path / "empty")
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "a.txt").write_text("x")
    with pytest.raises(ConceptFileError, match="no concept files"):
        load_any(tmp_path / "only-text")
    with pytest.raises(ConceptFileError, match="no such file"):
        load_any(tmp_path / "nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = _good_safetensors(tmp_path / "locked.safetensors")
    path.chmod(0)
    with pytest.raises(ConceptFileError, match="permission denied"):
        load_any(path)


def test_malicious_pickle_in_a_folder_is_refused(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    torch.save({"<x>": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafePickleError, match="system"):
        load_any(tmp_path / "evil.bin")
    assert not canary.exists()


# -- writing: files the other tools load unchanged -----------------------------------------------


@pytest.fixture
def concept():
    rng = np.random.default_rng(3)
    return Concept("cat-doll", "<cat-doll>", rng.standard_normal((3, 768)).astype(np.float32),
                   {"training": '{"steps": 1200}', "type_of_concept": "object", "trainer": "tensorflow"})


def test_export_diffusers_safetensors(tmp_path, concept):
    path = export(concept, "diffusers", tmp_path)
    assert path.name == "learned_embeds.safetensors"
    # diffusers' load_textual_inversion: safetensors.torch.load_file, exactly one tensor keyed by the token.
    state = safetensors_torch.load_file(path)
    assert list(state) == ["<cat-doll>"]
    assert state["<cat-doll>"].dtype == torch.float32 and tuple(state["<cat-doll>"].shape) == (3, 768)
    np.testing.assert_array_equal(state["<cat-doll>"].numpy(), concept.vectors)
    back = one(path)
    assert back.token == concept.token
    np.testing.assert_array_equal(back.vectors, concept.vectors)


def test_export_diffusers_bin(tmp_path, concept):
    path = export(concept, "diffusers", tmp_path / "learned_embeds.bin")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == ["<cat-doll>"]
    np.testing.assert_array_equal(state["<cat-doll>"].numpy(), concept.vectors)
    np.testing.assert_array_equal(one(path).vectors, concept.vectors)


def test_export_a1111(tmp_path, concept):
    path = export(concept, "a1111", tmp_path)
    assert path.name == "cat-doll.pt"
    data = torch.load(path, map_location="cpu", weights_only=True)
    # AUTOMATIC1111's load_from_file reads exactly these.
    params = data["string_to_param"]
    assert len(params) == 1
    emb = next(iter(params.items()))[1]
    assert isinstance(emb, torch.Tensor) and emb.dtype == torch.float32 and tuple(emb.shape) == (3, 768)
    np.testing.assert_array_equal(emb.detach().numpy(), concept.vectors)
    assert data["string_to_token"] == {"*": 265}
    assert data["name"] == "cat-doll" and data["step"] == 1200
    assert "sd_checkpoint" in data and "sd_checkpoint_name" in data
    back = one(path)
    assert back.token == "cat-doll"  # the file name is A1111's prompt word
    np.testing.assert_array_equal(back.vectors, concept.vectors)


def _passes_a1111_safe_check(path) -> bool:
    """AUTOMATIC1111's modules/safe.py check_pt, restated: zip entries limited to <dir>/data.pkl,
    <dir>/data/<n>, <dir>/version, and the pickle's globals limited to its allowlist."""
    import pickletools
    import re
    import zipfile

    allowed_names = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
    allowed_globals = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                       "torch FloatStorage", "torch HalfStorage", "torch IntStorage", "torch LongStorage",
                       "torch DoubleStorage", "torch ByteStorage", "torch BFloat16Storage", "_codecs encode"}
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not all(allowed_names.match(n) for n in names):
            return False
        (pkl,) = [n for n in names if n.endswith("/data.pkl")]
        ops = list(pickletools.genops(archive.read(pkl)))
    return all(arg in allowed_globals for op, arg, _ in ops if op.name == "GLOBAL") and not any(
        op.name == "STACK_GLOBAL" for op, _, _ in ops)


def test_exported_pickles_pass_a1111_safe_loader(tmp_path, concept):
    assert _passes_a1111_safe_check(export(concept, "a1111", tmp_path))
    assert _passes_a1111_safe_check(export(concept, "sd-concepts", tmp_path / "sdc") / "learned_embeds.bin")
    assert _passes_a1111_safe_check(export(concept, "diffusers", tmp_path / "x.bin"))
    # The check is real: files torch itself writes today carry extra records A1111's check refuses.
    torch.save({"<x>": torch.zeros(768)}, tmp_path / "torch.bin")
    assert not _passes_a1111_safe_check(tmp_path / "torch.bin")


def test_export_sd_concepts(tmp_path, concept):
    single = Concept("toy", "<toy>", concept.vectors[:1], {"type_of_concept": "style"})
    folder = export(single, "sd-concepts", tmp_path / "toy")
    assert sorted(p.name for p in folder.iterdir()) == ["learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt"]
    state = torch.load(folder / "learned_embeds.bin", map_location="cpu", weights_only=True)
    assert list(state) == ["<toy>"] and tuple(state["<toy>"].shape) == (768,)
    assert (folder / "token_identifier.txt").read_text() == "<toy>"
    assert (folder / "type_of_concept.txt").read_text() == "style"
    back = one(folder)
    assert (back.name, back.token, back.metadata["type_of_concept"]) == ("toy", "<toy>", "style")
    np.testing.assert_array_equal(back.vectors, single.vectors)
    # Multi-vector concepts keep their (n, dim) shape.
    multi = export(concept, "sd-concepts", tmp_path / "multi")
    assert tuple(torch.load(multi / "learned_embeds.bin", weights_only=True)["<cat-doll>"].shape) == (3, 768)


def test_export_kohya(tmp_path, concept):
    path = export(concept, "kohya", tmp_path)
    state = safetensors_torch.load_file(path)
    assert list(state) == ["emb_params"]
    np.testing.assert_array_equal(state["emb_params"].numpy(), concept.vectors)
    # kohya names the trigger after the file; our export also records it as modelspec.trigger_phrase.
    assert one(path).token == "<cat-doll>"
    assert safetensors_torch.safe_open(path, "pt").metadata()["modelspec.trigger_phrase"] == "<cat-doll>"


def test_export_conceptlib_and_overwrite_rules(tmp_path, concept):
    path = export(concept, "conceptlib", tmp_path)
    assert read_concept(path).metadata["trainer"] == "tensorflow"
    with pytest.raises(ConceptFileError, match="already exists.*--force"):
        export(concept, "conceptlib", tmp_path)
    export(concept, "conceptlib", tmp_path, overwrite=True)
    with pytest.raises(UsageError):
        export(concept, "ckpt", tmp_path)
    assert set(EXPORT_FORMATS) == {"conceptlib", "diffusers", "a1111", "sd-concepts", "kohya"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_unreadable_file_as_root_too(tmp_path, monkeypatch, suffix):
    """Root ignores chmod, so simulate the kernel's EACCES for one path."""
    import builtins

    path = tmp_path / f"locked{suffix}"
    if suffix == ".pt":
        a1111_save(path, torch.randn(1, 768))
    else:
        _good_safetensors(path)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(ConceptFileError, match="permission denied; make the file readable"):
        load_any(path)
