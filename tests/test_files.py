"""Contract 1: the concept file (one F32 tensor keyed by the token, string metadata, ModelSpec)."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from conceptlib.concept import Concept
from conceptlib.errors import ConceptError, ConceptFileError
from conceptlib.files import (
    WriteError,
    atomic_write_bytes,
    non_finite_vectors,
    read_concept,
    read_header,
    vector_norms,
    write_concept,
)


def concept(n=2, dim=768, **metadata):
    vectors = np.arange(n * dim, dtype=np.float32).reshape(n, dim) / 1000
    return Concept("cat-doll", "<cat-doll>", vectors, metadata)


def test_layout_and_metadata(tmp_path):
    training = json.dumps({"steps": 10, "batch_size": 1, "learning_rate": 0.005, "resolution": 512,
                           "template_pack": "builtin:object", "seed": 0, "num_vectors": 2})
    path = write_concept(concept(training=training, somebody_elses_key="kept"), tmp_path / "c.safetensors")
    tensors = load_file(path)
    assert list(tensors) == ["<cat-doll>"]
    assert tensors["<cat-doll>"].dtype == np.float32 and tensors["<cat-doll>"].shape == (2, 768)
    meta = read_header(path).metadata
    assert all(isinstance(v, str) for v in meta.values())
    assert {k: meta[k] for k in ("format", "name", "token", "num_vectors", "dim", "base_model")} == {
        "format": "conceptlib/1", "name": "cat-doll", "token": "<cat-doll>", "num_vectors": "2", "dim": "768",
        "base_model": "sd-1"}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.trigger_phrase"] == "<cat-doll>" and meta["modelspec.title"] == "cat-doll"
    assert meta["modelspec.sai_model_spec"] and meta["modelspec.date"] and meta["created_at"]
    assert json.loads(meta["training"])["steps"] == 10
    assert meta["somebody_elses_key"] == "kept"
    # Unknown keys survive a read/rewrite cycle.
    again = write_concept(read_concept(path), tmp_path / "again.safetensors")
    assert read_header(again).metadata["somebody_elses_key"] == "kept"
    assert read_header(again).metadata["created_at"] == meta["created_at"]


def test_modelspec_keys_model_pickers_read(tmp_path):
    """The spec's resolution and prediction type (keras-cv's SD 1.x and 2.x base: 512 px, epsilon),
    and the preview as its thumbnail; a value an imported file brought is kept."""
    meta = read_header(write_concept(concept(preview="iVBORw0KGgo="), tmp_path / "c.safetensors")).metadata
    assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.thumbnail"] == "data:image/png;base64,iVBORw0KGgo="
    assert json.loads(meta["ssmd_cover_images"]) == ["iVBORw0KGgo="]  # ComfyUI's model previews
    meta = read_header(write_concept(concept(**{"modelspec.resolution": "768x768"}), tmp_path / "d.safetensors")).metadata
    assert meta["modelspec.resolution"] == "768x768" and not {"modelspec.thumbnail", "ssmd_cover_images"} & set(meta)


def test_sd2(tmp_path):
    header = read_header(write_concept(concept(n=1, dim=1024), tmp_path / "c.safetensors"))
    assert (header.dim, header.base_model) == (1024, "sd-2")
    assert header.metadata["modelspec.architecture"] == "stable-diffusion-v2-512/textual-inversion"


def test_an_imported_files_architecture_of_the_same_family_is_kept_whole(tmp_path):
    """kohya's SD 2.x 768-v embedding (the same text encoder as 2.x base) keeps its architecture,
    resolution and prediction type; one that names another model than its vectors' width is
    replaced with all three."""
    v768 = {"modelspec.architecture": "stable-diffusion-v2-768-v/textual-inversion",
            "modelspec.resolution": "768x768", "modelspec.prediction_type": "v"}
    meta = read_header(write_concept(concept(n=1, dim=1024, **v768), tmp_path / "v.safetensors")).metadata
    assert {key: meta[key] for key in v768} == v768
    bare = {"modelspec.architecture": v768["modelspec.architecture"]}  # its own defaults then
    meta = read_header(write_concept(concept(n=1, dim=1024, **bare), tmp_path / "b.safetensors")).metadata
    assert {key: meta[key] for key in v768} == v768
    meta = read_header(write_concept(concept(n=1, dim=768, **v768), tmp_path / "w.safetensors")).metadata
    assert (meta["modelspec.architecture"], meta["modelspec.resolution"], meta["modelspec.prediction_type"]) == (
        "stable-diffusion-v1/textual-inversion", "512x512", "epsilon")


def test_header_read_needs_no_numpy(tmp_path):
    path = write_concept(concept(), tmp_path / "c.safetensors")
    code = (f"import sys; from conceptlib.files import read_header; h = read_header({str(path)!r}); "
            "assert h.token == '<cat-doll>' and h.num_vectors == 2; assert 'numpy' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("vectors,needle", [
    (np.zeros((1, 1, 768)), "rank 3"),
    (np.zeros((1, 512)), "512"),
    (np.full((1, 768), np.nan), "NaN"),
    (np.full((2, 768), np.inf), "NaN"),
    (np.zeros((0, 768)), "0 vectors"),
])
def test_invalid_vectors(vectors, needle):
    with pytest.raises(ConceptError, match=needle):
        Concept("x", "<x>", vectors)


def test_damaged_files(tmp_path):
    path = write_concept(concept(), tmp_path / "c.safetensors")
    raw = path.read_bytes()
    for name, data, needle in [
        ("cut.safetensors", raw[:-1], "truncated"),
        ("head.safetensors", raw[:30], "truncated"),
        ("tiny.safetensors", raw[:3], "empty or truncated"),
        ("junk.safetensors", b"\xff" * 64, "not a safetensors file"),
        ("two.safetensors", save({"a": np.zeros((1, 768), np.float32), "b": np.zeros((1, 768), np.float32)}), "exactly one"),
        ("f16.safetensors", save({"<h>": np.zeros((1, 768), np.float16)}), "F16"),
    ]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConceptFileError, match=needle) as info:
            read_concept(tmp_path / name)
        assert "\n" not in str(info.value)


def _raw_safetensors(path, entry, data_bytes=3072):
    header = json.dumps({"<a>": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_bytes))
    return path


@pytest.mark.parametrize("offsets,needle", [
    ([0, "x"], "bad data_offsets"),
    ([None, 3072], "bad data_offsets"),
    ([3072, 0], "bad data_offsets"),
    ([0, 3072.0], "bad data_offsets"),
    ([True, 3072], "bad data_offsets"),
    ([-8, 3072], "bad data_offsets"),
    ([0], "bad data_offsets"),
    ("0-3072", "bad data_offsets"),
    ([0, 99999], "truncated"),
])
def test_malformed_data_offsets_are_one_line_errors(tmp_path, offsets, needle):
    path = _raw_safetensors(tmp_path / "bad.safetensors", {"dtype": "F32", "shape": [1, 768], "data_offsets": offsets})
    for read in (read_header, read_concept, vector_norms):
        with pytest.raises(ConceptFileError, match=needle) as info:
            read(path)
        assert "\n" not in str(info.value) and "re-download or re-export" in str(info.value)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1, "768"], "data_offsets": [0, 3072]},
    {"dtype": 7, "shape": [1, 768], "data_offsets": [0, 3072]},
    {"dtype": "F32", "data_offsets": [0, 3072]},
    ["F32", [1, 768], [0, 3072]],
])
def test_malformed_dtype_or_shape(tmp_path, entry):
    path = _raw_safetensors(tmp_path / "bad.safetensors", entry)
    with pytest.raises(ConceptFileError, match="corrupt safetensors entry for tensor '<a>'"):
        read_header(path)


def test_vector_norms_read_the_file_and_flag_nan(tmp_path):
    vectors = np.arange(2 * 768, dtype=np.float32).reshape(2, 768) / 1000
    path = write_concept(Concept("a", "<a>", vectors), tmp_path / "a.safetensors")
    np.testing.assert_allclose(vector_norms(path), np.linalg.norm(vectors, axis=1), rtol=1e-6)
    assert non_finite_vectors(vector_norms(path)) == []
    vectors[1, 5] = np.inf
    (tmp_path / "inf.safetensors").write_bytes(save({"<a>": vectors}))
    assert non_finite_vectors(vector_norms(tmp_path / "inf.safetensors")) == [1]
    # A data range that does not match the shape is corrupt, not a short list of norms.
    short = _raw_safetensors(tmp_path / "short.safetensors", {"dtype": "F32", "shape": [2, 768], "data_offsets": [0, 3072]})
    with pytest.raises(ConceptFileError, match="3072 data bytes for shape"):
        vector_norms(short)


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_umask_mode(tmp_path, mask, mode):
    with umask(mask):
        path = atomic_write_bytes(tmp_path / "new.bin", b"data")
        concept_path = write_concept(concept(), tmp_path / "c.safetensors")
    assert os.stat(path).st_mode & 0o777 == mode
    assert os.stat(concept_path).st_mode & 0o777 == mode


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "shared.pt"
    path.write_bytes(b"old")
    os.chmod(path, 0o664)
    with umask(0o077):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.stat(path).st_mode & 0o777 == 0o664


def test_write_failures_are_one_line_write_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    for target, reason in [
        (tmp_path / "afile" / "x.pt", f"{tmp_path / 'afile'} is a file, not a folder"),
        (tmp_path / "afile" / "deeper" / "x.pt", f"{tmp_path / 'afile'} is a file, not a folder"),
        (Path("/proc/conceptlib-test.pt"), "nothing can be created in /proc"),
    ]:
        with pytest.raises(WriteError) as info:
            atomic_write_bytes(target, b"data", fix="write elsewhere")
        assert str(info.value) == f"cannot write {target}: {reason}; write elsewhere"
        assert isinstance(info.value, OSError)  # callers that caught the OSError still do
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
