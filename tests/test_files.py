"""Contract 1: the concept file (one F32 tensor keyed by the token, string metadata, ModelSpec)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save

from conceptlib.concept import Concept
from conceptlib.errors import ConceptError, ConceptFileError
from conceptlib.files import read_concept, read_header, write_concept


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


def test_sd2(tmp_path):
    header = read_header(write_concept(concept(n=1, dim=1024), tmp_path / "c.safetensors"))
    assert (header.dim, header.base_model) == (1024, "sd-2")
    assert header.metadata["modelspec.architecture"] == "stable-diffusion-v2-512/textual-inversion"


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
