"""The restricted unpickler: real torch.save files load without torch; malicious pickles never run.

torch is used here only to write files the way other tools do (and to load our exports).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conceptlib.errors import ConceptFileError, UnsafePickleError
from conceptlib.pickle_safe import dump_tensor_pickle, load_tensor_pickle

torch = pytest.importorskip("torch")

FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def _save(obj, path, zip_format):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return path


@FORMATS
def test_a1111_embedding_round_trip(tmp_path, zip_format):
    vec = torch.randn(3, 768)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(vec)},  # A1111 trains a Parameter
        "name": "dolly",
        "step": 1500,
        "sd_checkpoint": "7460a6fa",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    loaded = load_tensor_pickle(_save(data, tmp_path / "dolly.pt", zip_format))
    assert loaded["string_to_token"] == {"*": 265}
    assert loaded["name"] == "dolly" and loaded["step"] == 1500
    assert loaded["sd_checkpoint_name"] == "v1-5-pruned-emaonly"
    param = loaded["string_to_param"]["*"]
    assert isinstance(param, np.ndarray) and param.dtype == np.float32
    np.testing.assert_array_equal(param, vec.numpy())


@FORMATS
def test_dtypes_views_and_ordered_dicts(tmp_path, zip_format):
    base = torch.randn(4, 1024)
    data = {
        "view": base[2],  # a view into a bigger storage: offset 2048
        "transposed": base.T,  # non-contiguous strides
        "half": base.half()[1],
        "bf16": base.bfloat16()[:2],
        "double": base.double()[3],
        "long": torch.arange(5),
        "nested": collections_ordered({"a": base[0]}),
        "list": [1, 2.5, None, True, "x"],
    }
    loaded = load_tensor_pickle(_save(data, tmp_path / "t.bin", zip_format))
    np.testing.assert_array_equal(loaded["view"], base[2].numpy())
    np.testing.assert_array_equal(loaded["transposed"], base.T.numpy())
    np.testing.assert_array_equal(loaded["half"], base.half()[1].numpy())
    np.testing.assert_array_equal(loaded["bf16"], base.bfloat16()[:2].float().numpy())
    np.testing.assert_array_equal(loaded["double"], base.double()[3].numpy())
    np.testing.assert_array_equal(loaded["long"], np.arange(5))
    np.testing.assert_array_equal(loaded["nested"]["a"], base[0].numpy())
    assert loaded["list"] == [1, 2.5, None, True, "x"]


def collections_ordered(d):
    import collections

    return collections.OrderedDict(d)


def test_our_writer_loads_in_torch_weights_only(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32)
    obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x", "step": None,
           "f": 0.5, "big": 2**40, "neg": -7, "flag": False, "nested": {}}
    path = tmp_path / "x.pt"
    path.write_bytes(dump_tensor_pickle(obj, archive_name="x"))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert loaded["string_to_token"] == {"*": 265}
    assert (loaded["name"], loaded["step"], loaded["f"], loaded["big"], loaded["neg"], loaded["flag"]) == ("x", None, 0.5, 2**40, -7, False)
    tensor = loaded["string_to_param"]["*"]
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (2, 768)
    np.testing.assert_array_equal(tensor.numpy(), vectors)
    # mmap loading needs torch's storage alignment rules too.
    np.testing.assert_array_equal(torch.load(path, weights_only=True, mmap=True)["string_to_param"]["*"].numpy(), vectors)
    # ...and our own reader reads it back.
    np.testing.assert_array_equal(load_tensor_pickle(path)["string_to_param"]["*"], vectors)


# -- malicious corpus --------------------------------------------------------------------------


class _Reduce:
    """Pickles as ``func(*args)``: what an attacker's __reduce__ produces."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(canary):
    touch = f"open({str(canary)!r}, 'w').close()"
    return {
        "os.system": _Reduce(os.system, (f"touch {canary}",)),
        "builtins.eval": _Reduce(builtins.eval, (touch,)),
        "builtins.exec": _Reduce(builtins.exec, (touch,)),
        "subprocess.Popen": _Reduce(subprocess.Popen, (["touch", str(canary)],)),
        "builtins.__import__": _Reduce(builtins.__import__, ("os",)),
        "builtins.getattr": _Reduce(getattr, (_Reduce(builtins.__import__, ("os",)), "system")),
        # Nested: a tensor dictionary whose value is a reduce whose argument is another reduce.
        "nested": {"string_to_param": {"*": _Reduce(print, (_Reduce(os.system, (f"touch {canary}",)),))}},
    }


def _torch_zip(pickle_bytes: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil/data.pkl", pickle_bytes)
        archive.writestr("evil/byteorder", "little")
        archive.writestr("evil/version", "3\n")
    return buffer.getvalue()


def _torch_legacy(pickle_bytes: bytes) -> bytes:
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}))
    return head + pickle_bytes + pickle.dumps([], protocol=2)


def _corpus(tmp_path, canary):
    """(id, path) for every payload x protocol x container, plus files written by torch.save."""
    files = []
    for name, payload in _payloads(canary).items():
        for protocol in (0, 2, 4):
            raw = pickle.dumps({"emb": payload}, protocol=protocol)
            for container, wrap in (("zip", _torch_zip), ("legacy", _torch_legacy)):
                path = tmp_path / f"{name}-p{protocol}-{container}.pt"
                path.write_bytes(wrap(raw))
                files.append(path)
        for zip_format in (True, False):
            path = tmp_path / f"{name}-torchsave-{'zip' if zip_format else 'legacy'}.bin"
            torch.save({"<x>": torch.zeros(768), "evil": payload}, path, _use_new_zipfile_serialization=zip_format)
            files.append(path)
    return files


def test_corpus_is_real(tmp_path):
    """Control: an ordinary unpickler does run these payloads (so the next test means something)."""
    canary = tmp_path / "canary"
    raw = pickle.dumps(_payloads(canary)["os.system"], protocol=2)
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.loads({raw!r})"], check=True)
    assert canary.exists()


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    canary = tmp_path / "canary"
    files = _corpus(tmp_path, canary)
    assert len(files) == 7 * (3 * 2 + 2)
    for path in files:
        with pytest.raises(UnsafePickleError) as info:
            load_tensor_pickle(path)
        message = str(info.value)
        assert "\n" not in message and "nothing was executed" in message
        assert not canary.exists(), f"{path.name} ran its payload"
    # The error names the global that was asked for.
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        load_tensor_pickle(tmp_path / "os.system-p2-zip.pt")
    with pytest.raises(UnsafePickleError, match=r"subprocess\.Popen"):
        load_tensor_pickle(tmp_path / "subprocess.Popen-p4-legacy.pt")


def test_allowed_globals_cannot_be_abused(tmp_path):
    """Allowed stand-ins cannot be mutated by BUILD, and storages need the persistent-load route."""
    # GLOBAL collections.OrderedDict, then BUILD {'__class__': ...} on the callable itself.
    raw = b"\x80\x02ccollections\nOrderedDict\n}X\x09\x00\x00\x00__class__K\x01sb."
    (tmp_path / "a.pt").write_bytes(_torch_zip(raw))
    with pytest.raises(ConceptFileError):
        load_tensor_pickle(tmp_path / "a.pt")
    # A storage type called directly instead of through a persistent id.
    raw = b"\x80\x02ctorch\nFloatStorage\n)R."
    (tmp_path / "b.pt").write_bytes(_torch_zip(raw))
    with pytest.raises(ConceptFileError):
        load_tensor_pickle(tmp_path / "b.pt")


@pytest.mark.parametrize("damage", ["empty", "truncated-zip", "truncated-legacy", "garbage", "short-storage"])
def test_corrupt_files_are_one_line_errors(tmp_path, damage):
    zip_path = _save({"<x>": torch.randn(2, 768)}, tmp_path / "z.bin", True)
    legacy_path = _save({"<x>": torch.randn(2, 768)}, tmp_path / "l.bin", False)
    bad = tmp_path / "bad.bin"
    if damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated-zip":
        bad.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    elif damage == "truncated-legacy":
        bad.write_bytes(legacy_path.read_bytes()[:-100])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        raw = legacy_path.read_bytes()
        # Lie about the storage's element count: claims more than the file holds.
        idx = len(raw) - 2 * 768 * 4 - 8
        bad.write_bytes(raw[:idx] + struct.pack("<q", 10**6) + raw[idx + 8:])
    with pytest.raises(ConceptFileError) as info:
        load_tensor_pickle(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    assert not isinstance(info.value, UnsafePickleError)


def test_loading_never_imports_torch(tmp_path):
    path = _save({"<x>": torch.randn(768)}, tmp_path / "x.bin", True)
    code = (
        "import sys; from conceptlib.pickle_safe import load_tensor_pickle; "
        f"d = load_tensor_pickle({str(path)!r}); assert d['<x>'].shape == (768,); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
