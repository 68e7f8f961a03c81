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
    tall = torch.randn(768, 3)
    data = {
        "view": base[2],  # a view into a bigger storage: offset 2048
        "transposed": tall.T,  # non-contiguous strides
        "half": base.half()[1],
        "bf16": base.bfloat16()[:2],
        "double": base.double()[3],
        "long": torch.arange(5),
        "nested": collections_ordered({"a": base[0]}),
        "list": [1, 2.5, None, True, "x"],
    }
    loaded = load_tensor_pickle(_save(data, tmp_path / "t.bin", zip_format))
    np.testing.assert_array_equal(loaded["view"], base[2].numpy())
    np.testing.assert_array_equal(loaded["transposed"], tall.T.numpy())
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
    # mmap loading maps each record where it lies: torch aligns them to 64 bytes, and so do we.
    mapped = torch.load(path, weights_only=True, mmap=True)["string_to_param"]["*"]
    assert mapped.untyped_storage().data_ptr() % 64 == 0
    np.testing.assert_array_equal(mapped.numpy(), vectors)
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


def test_no_file_can_change_how_later_files_are_read(tmp_path):
    """BUILD with slot state on a shared stand-in (FloatStorage's dtype) or on a checked tensor is
    refused, so a crafted file cannot corrupt the files loaded after it in the same process."""
    retune = (b"\x80\x02ctorch\nFloatStorage\nN}X\x05\x00\x00\x00dtypeX\x05\x00\x00\x00uint8s"
              b"X\x08\x00\x00\x00itemsizeK\x01s\x86b0}X\x01\x00\x00\x00aK\x01s.")
    (tmp_path / "retune.pt").write_bytes(_torch_zip(retune))
    with pytest.raises(ConceptFileError, match="the pickle tries to change _StorageType.dtype"):
        load_tensor_pickle(tmp_path / "retune.pt")
    vec = torch.randn(2, 768)
    np.testing.assert_array_equal(load_tensor_pickle(_save({"<v>": vec}, tmp_path / "v.pt", True))["<v>"], vec.numpy())
    # A tensor rebuilt as usual, then BUILD (None, {'size': (200000, 768)}): it keeps the size it was checked with.
    good = _save({"<v>": torch.randn(768)}, tmp_path / "good.pt", True)
    resize = b"N}X\x04\x00\x00\x00sizeJ@\r\x03\x00M\x00\x03\x86s\x86b"
    grown = _rewrite_zip(good, tmp_path / "grown.pt",
                         lambda n, b: [(n, _after_last_reduce(b, resize) if n.endswith("data.pkl") else b)])
    with pytest.raises(ConceptFileError, match="the pickle tries to change _Tensor.size"):
        load_tensor_pickle(grown)


def _after_last_reduce(pickled: bytes, extra: bytes) -> bytes:
    import pickletools

    position = [pos for op, _, pos in pickletools.genops(pickled) if op.name == "REDUCE"][-1] + 1
    return pickled[:position] + extra + pickled[position:]


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as record:
            for _ in range(40):
                record.write(b"\0" * (1 << 20))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ConceptFileError, match="has a 42 MB data.pkl record, where a textual-inversion embedding"):
        load_tensor_pickle(bomb)
    # A legacy-format file holds its storages inline, so it is mapped, not read: a row of a large
    # storage loads (the bytes around it stay on disk), and garbage is a corrupt file.
    matrix = torch.randn(12000, 768)  # 37 MB of storage
    big = _save({"<row>": matrix[11999]}, tmp_path / "row.bin", False)
    assert big.stat().st_size > 32 * 1024 * 1024
    np.testing.assert_array_equal(load_tensor_pickle(big)["<row>"], matrix[11999].numpy())
    huge = tmp_path / "huge.pt"
    with open(huge, "wb") as handle:
        handle.write(b"\x80\x02")
        handle.truncate(40 * 1024 * 1024)
    with pytest.raises(ConceptFileError, match="corrupt or truncated PyTorch file"):
        load_tensor_pickle(huge)


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


# -- older AUTOMATIC1111 files: string_to_param as a torch.nn.ParameterDict -----------------------


@FORMATS
def test_parameter_dict_loads_as_a_dict_of_its_parameters(tmp_path, zip_format):
    """torch 1.11-era AUTOMATIC1111 saved string_to_param as a ParameterDict (a Module); A1111
    reads it through ``_parameters``. The pickle needs ParameterDict (NEWOBJ + BUILD) and set."""
    vec = torch.randn(2, 768)
    data = {"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}),
            "name": "olddoll", "step": 3000}
    loaded = load_tensor_pickle(_save(data, tmp_path / "olddoll.pt", zip_format))
    params = loaded["string_to_param"]
    assert type(params) is dict and list(params) == ["*"]
    np.testing.assert_array_equal(params["*"], vec.numpy())
    assert (loaded["name"], loaded["step"]) == ("olddoll", 3000)


def test_parameter_dict_and_set_cannot_be_abused(tmp_path):
    # ParameterDict called with an argument, BUILD with a state that is not a module's, and set
    # fed something other than a list: each is a corrupt-file error, never a call into Python.
    payloads = {
        "call": b"\x80\x02ctorch.nn.modules.container\nParameterDict\nX\x01\x00\x00\x00x\x85R.",
        "state": b"\x80\x02ctorch.nn.modules.container\nParameterDict\n)\x81X\x01\x00\x00\x00xb.",
        "set": b"\x80\x02c__builtin__\nset\nX\x02\x00\x00\x00ab\x85R.",
        "bare-class": b"\x80\x02ctorch.nn.modules.container\nParameterDict\n.",
    }
    for name, raw in payloads.items():
        (tmp_path / f"{name}.pt").write_bytes(_torch_zip(raw))
        with pytest.raises(ConceptFileError) as info:
            load_tensor_pickle(tmp_path / f"{name}.pt")
        assert not isinstance(info.value, UnsafePickleError), name
        assert "corrupt" in str(info.value), name
    # Other torch.nn classes stay refused.
    (tmp_path / "linear.pt").write_bytes(_torch_zip(b"\x80\x02ctorch.nn.modules.linear\nLinear\n)\x81."))
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_tensor_pickle(tmp_path / "linear.pt")


# -- sizes are checked before anything is read -----------------------------------------------------


@FORMATS
def test_tensors_larger_than_any_embedding_are_refused_unread(tmp_path, zip_format):
    """A stride-0 view saves one 768-value storage but claims 200000 rows (a 4.6 KB file)."""
    cases = {
        "rows": (torch.randn(768).expand(200000, 768),
                 "shape [200000, 768]: 200000 vectors, but a textual-inversion embedding has 1 to 75"),
        "wide": (torch.randn(1).expand(10**7), "vectors of 10000000 values"),
        "rank": (torch.randn(768).expand(2, 2, 768), "(rank 3)"),
    }
    for name, (tensor, needle) in cases.items():
        path = _save({"<e>": tensor}, tmp_path / f"{name}.bin", zip_format)
        assert path.stat().st_size < 10_000
        with pytest.raises(ConceptFileError) as info:
            load_tensor_pickle(path)
        message = str(info.value)
        assert needle in message and "is not one" in message and "\n" not in message, message
    # Many embedding-sized tensors together are refused as well (eight views of one storage).
    views = {f"k{i}": torch.randn(768).expand(75, 768) for i in range(8)}
    with pytest.raises(ConceptFileError, match=r"holds more than 384000 values in \d+\+ tensors"):
        load_tensor_pickle(_save(views, tmp_path / "many.bin", zip_format))


@FORMATS
def test_a_row_of_a_big_storage_still_loads(tmp_path, zip_format):
    """diffusers' script saved ``weight[token_id]`` of a CPU text encoder: a view whose storage is
    the whole embedding matrix. Only the row is read."""
    matrix = torch.randn(2000, 768)
    path = _save({"<cpu-trained>": matrix[1999]}, tmp_path / "learned_embeds.bin", zip_format)
    np.testing.assert_array_equal(load_tensor_pickle(path)["<cpu-trained>"], matrix[1999].numpy())


def test_shared_references_are_converted_once(tmp_path):
    vec = torch.randn(768)
    shared = [vec] * 1000
    loaded = load_tensor_pickle(_save({"a": shared, "b": shared}, tmp_path / "shared.pt", True))
    assert loaded["a"] is loaded["b"] and len(loaded["a"]) == 1000
    assert all(v is loaded["a"][0] for v in loaded["a"])
    np.testing.assert_array_equal(loaded["a"][0], vec.numpy())


# -- container details -------------------------------------------------------------------------------


def _rewrite_zip(source, target, change):
    """Copy a torch zip, replacing each record by ``change(name, data)`` (a list of (name, data))."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            for new_name, data in change(name, old.read(name)):
                new.writestr(new_name, data)
    return target


def test_unknown_byteorder_and_two_pickles_are_corrupt_files(tmp_path):
    good = _save({"<x>": torch.randn(2, 768)}, tmp_path / "good.pt", True)
    sideways = _rewrite_zip(good, tmp_path / "sideways.pt",
                            lambda n, b: [(n, b"sideways" if n.endswith("/byteorder") else b)])
    with pytest.raises(ConceptFileError,
                       match=r"corrupt PyTorch file \(its byteorder record says 'sideways', expected 'little' or 'big'\); re-download"):
        load_tensor_pickle(sideways)
    two = _rewrite_zip(good, tmp_path / "two.pt",
                       lambda n, b: [(n, b), ("other/data.pkl", b)] if n.endswith("data.pkl") else [(n, b)])
    with pytest.raises(ConceptFileError, match="2 data.pkl records"):
        load_tensor_pickle(two)
    big = _rewrite_zip(good, tmp_path / "big.pt", lambda n, b: [(n, b"big" if n.endswith("/byteorder") else b)])
    assert load_tensor_pickle(big)["<x>"].shape == (2, 768)


def test_not_a_pytorch_file_says_how_to_fix(tmp_path):
    page = tmp_path / "embedding.pt"
    page.write_bytes(b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>")
    with pytest.raises(ConceptFileError) as info:
        load_tensor_pickle(page)
    assert str(info.value) == (f"{page}: not a PyTorch file (neither a torch zip archive nor a pickle); the download "
                               "is damaged or is something else, re-download it")


# -- hostile files built opcode by opcode (no torch needed to write them) ------------------------

def _text(value: str) -> bytes:
    raw = value.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


_REBUILD = b"ctorch._utils\n_rebuild_tensor_v2\n"


def _tensor_ops(key: str, numel: int, offset: int, size, stride) -> bytes:
    """``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`` as opcodes."""
    storage = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text(key) + _text("cpu") + _int(numel) + b"tQ"
    return (_REBUILD + b"(" + storage + _int(offset) + b"(" + b"".join(map(_int, size)) + b"t"
            + b"(" + b"".join(map(_int, stride)) + b"t" + b"\x89ccollections\nOrderedDict\n)R" + b"tR")


def _zip_file(path, pickled: bytes, storages: dict, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", pickled)
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def test_tensors_are_counted_as_they_are_made_whatever_the_containers_claim(tmp_path):
    """A pickle can BUILD an OrderedDict an attribute ``values`` of its own, so a walk through
    ``values()`` sees no tensors while ``items()`` holds 40 stride-0 (75, 1280) views of one
    float: 15 MB from a 3 KB file. They are counted as the pickle makes them."""
    first = _tensor_ops("0", 1, 0, (75, 1280), (0, 0))
    ops = b"\x80\x02}" + _text("string_to_param") + b"ccollections\nOrderedDict\n)R("
    ops += b"".join(_int(i) + first for i in range(40)) + b"u"
    ops += b"}" + _text("values") + b"ccollections\nOrderedDict\ns" + b"b" + b"s."
    path = _zip_file(tmp_path / "bypass.pt", ops, {"0": b"\0\0\0\0"})
    with pytest.raises(ConceptFileError, match=r"holds more than 384000 values in \d+\+ tensors"):
        load_tensor_pickle(path)
    # Fewer, so the count allows them: the attribute itself is refused.
    ops = b"\x80\x02}" + _text("string_to_param") + b"ccollections\nOrderedDict\n)R(" + _int(0) + first + b"u"
    ops += b"}" + _text("values") + b"ccollections\nOrderedDict\ns" + b"b" + b"s."
    with pytest.raises(ConceptFileError, match="a dictionary with attributes of its own"):
        load_tensor_pickle(_zip_file(tmp_path / "attrs.pt", ops, {"0": b"\0\0\0\0"}))


def test_storages_cannot_make_each_read_inflate_gigabytes(tmp_path):
    """A tensor near the end of a compressed storage record makes every read inflate all of it:
    storages beyond a whole token-embedding table, and compressed records that inflate far
    beyond their size, are refused before anything is inflated."""
    from conceptlib.pickle_safe import _MAX_STORAGE_ELEMENTS

    huge = _MAX_STORAGE_ELEMENTS + 1
    ops = b"\x80\x02}" + _text("<t>") + _tensor_ops("0", huge, huge - 1, (1,), (1,)) + b"s."
    with pytest.raises(ConceptFileError, match=f"has a storage of {huge} values, more than a whole token-embedding"):
        load_tensor_pickle(_zip_file(tmp_path / "huge.pt", ops, {"0": b""}))
    numel = 3 * 2**20  # 12 MB of zeros, deflated to a few KB
    ops = b"\x80\x02}" + _text("<t>") + _tensor_ops("0", numel, numel - 768, (768,), (1,)) + b"s."
    path = _zip_file(tmp_path / "deflated.pt", ops, {"0": bytes(4 * numel)}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    with pytest.raises(ConceptFileError, match="has a storage record that inflates .* where torch.save stores its records"):
        load_tensor_pickle(path)


@FORMATS
def test_a_pickle_of_more_opcodes_than_any_embedding_is_refused_unrun(tmp_path, zip_format):
    """One-byte EMPTY_SET opcodes each build a 200-byte set: 300 KB would take 70 MB (and 31 KB
    of deflated zip, 7 GB at the 32 MB record limit)."""
    ops = b"\x80\x04" + b"\x8f" * 300_000 + b"."
    path = tmp_path / "sets.pt"
    path.write_bytes(_torch_zip(ops) if zip_format else _torch_legacy(ops))
    with pytest.raises(ConceptFileError, match="has a pickle of more than 200000 opcodes"):
        load_tensor_pickle(path)


@pytest.mark.parametrize("damage", ["encrypted", "unknown-method", "bad-deflate"])
def test_damaged_zip_records_are_one_line(tmp_path, damage):
    """A corrupted download (bad deflate data) or a record zip cannot read: no traceback."""
    ops = b"\x80\x02}" + _text("<t>") + _tensor_ops("0", 768, 0, (768,), (1,)) + b"s."
    raw = bytearray(_zip_file(tmp_path / "ok.pt", ops, {"0": bytes(4 * 768)}).read_bytes())
    for signature, flags, method in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = raw.find(signature)
        if damage == "encrypted":
            struct.pack_into("<H", raw, at + flags, struct.unpack_from("<H", raw, at + flags)[0] | 1)
        else:
            struct.pack_into("<H", raw, at + method, 97 if damage == "unknown-method" else zipfile.ZIP_DEFLATED)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ConceptFileError) as info:
        load_tensor_pickle(bad)
    assert str(info.value).startswith(f"{bad}: corrupt or truncated PyTorch file (") and "\n" not in str(info.value)
