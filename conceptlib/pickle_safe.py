"""Read and write PyTorch tensor pickles (.pt / .bin) without torch and without running code.

Reading: ``load_tensor_pickle`` accepts both containers ``torch.save`` writes:

* the zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one raw record ``<archive>/data/<key>``
  per storage, and a ``byteorder`` record;
* the legacy format (``_use_new_zipfile_serialization=False``): magic number, protocol version and
  system info pickles, the object pickle, the list of storage keys, then each storage as an int64
  element count followed by its raw bytes.

The object pickle is read by a restricted unpickler (the same idea as AUTOMATIC1111's
modules/safe.py and torch's ``weights_only`` unpickler): ``find_class`` resolves only the few
globals a tensor dictionary needs, each to conceptlib's own stand-in, and refuses every other
global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) with UnsafePickleError before
anything is called. Tensors come back as numpy arrays.

Writing: ``dump_tensor_pickle`` emits the zip format by hand (the opcodes torch itself emits), so
exported ``.pt``/``.bin`` files load in ``torch.load(..., weights_only=True)`` without conceptlib
needing torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from conceptlib.errors import ConceptFileError, UnsafePickleError

# torch storage class name -> (numpy dtype string, element size)
_STORAGE_DTYPES = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "UntypedStorage": ("uint8", 1),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_MAX_STORAGE_BYTES = 2 * 1024**3


class _Callable:
    """Base of the stand-ins handed to the unpickler: no __dict__, so BUILD cannot alter them."""

    __slots__ = ()


class _StorageType(_Callable):
    __slots__ = ("name", "dtype", "itemsize")

    def __init__(self, name: str):
        self.name = name
        self.dtype, self.itemsize = _STORAGE_DTYPES[name]

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"torch.{self.name} may only appear in a storage reference")


class _Storage:
    """A storage referenced by the pickle; its bytes are attached once read from the container."""

    __slots__ = ("type", "key", "numel", "data")

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.type, self.key, self.numel, self.data = storage_type, key, numel, None


class _Tensor:
    """A tensor rebuilt from (storage, offset, size, stride); materialised after loading."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        ints = lambda v: isinstance(v, (tuple, list)) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
        if type(offset) is not int or offset < 0 or not ints(size) or not ints(stride) or len(size) != len(stride):
            raise pickle.UnpicklingError("malformed tensor size/stride")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class _RebuildTensorV2(_Callable):
    __slots__ = ()

    def __call__(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        return _Tensor(storage, offset, size, stride)


class _RebuildTensor(_Callable):
    __slots__ = ()

    def __call__(self, storage, offset, size, stride):
        return _Tensor(storage, offset, size, stride)


class _RebuildParameter(_Callable):
    __slots__ = ()

    def __call__(self, data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, _Tensor):
            raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
        return data


class _OrderedDict(_Callable):
    __slots__ = ()

    def __call__(self, *args):
        return collections.OrderedDict(*args)


class _LatinEncode(_Callable):
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes``."""

    __slots__ = ()

    def __call__(self, text, encoding="latin1"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
        return text.encode("latin1")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensorV2(),
    ("torch._utils", "_rebuild_tensor"): _RebuildTensor(),
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    ("torch._utils", "_rebuild_parameter_with_state"): _RebuildParameter(),
    ("collections", "OrderedDict"): _OrderedDict(),
    ("_codecs", "encode"): _LatinEncode(),
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
_ALLOWED[("torch.storage", "UntypedStorage")] = _ALLOWED[("torch", "UntypedStorage")]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path, storages: dict[str, _Storage]):
        super().__init__(file)
        self._source = source
        self._storages = storages

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._source}: refused to load: the pickle asks for {module}.{name}, which a tensor "
                "file never needs (it may be malicious); nothing was executed. Get the embedding as "
                ".safetensors instead"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError("malformed storage reference")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(storage_type, key, numel)
        return storage


def load_tensor_pickle(path: str | os.PathLike) -> Any:
    """Load a ``torch.save`` file (zip or legacy) as plain Python objects with numpy arrays for
    tensors, without torch and without executing any code from the file.

    Raises UnsafePickleError for any global beyond a tensor dictionary's, and ConceptFileError
    for truncated, corrupt or unsupported files.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConceptFileError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ConceptFileError(f"{path}: is a folder, expected a .pt/.bin file") from None
    except PermissionError:
        raise ConceptFileError(f"{path}: permission denied; make the file readable") from None
    if not raw:
        raise ConceptFileError(f"{path}: file is empty; re-download or re-export it")
    try:
        if raw[:4] == b"PK\x03\x04" or zipfile.is_zipfile(io.BytesIO(raw)):
            obj = _load_zip(raw, path)
        elif raw[:1] == b"\x80":
            obj = _load_legacy(raw, path)
        else:
            raise ConceptFileError(f"{path}: not a PyTorch file (neither a torch zip archive nor a pickle)")
    except (UnsafePickleError, ConceptFileError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile, RecursionError, MemoryError, OverflowError) as exc:
        raise ConceptFileError(
            f"{path}: corrupt or truncated PyTorch file ({type(exc).__name__}: {str(exc)[:120]}); re-download or re-export it"
        ) from None
    return obj


def _load_zip(raw: bytes, path: Path) -> Any:
    archive = zipfile.ZipFile(io.BytesIO(raw))
    names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(names) != 1:
        raise ConceptFileError(f"{path}: a zip file but not a PyTorch archive (no <name>/data.pkl); not a torch.save file")
    prefix = names[0][: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(io.BytesIO(archive.read(names[0])), path, storages).load()
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    for key, storage in storages.items():
        info = archive.getinfo(f"{prefix}data/{key}")
        need = storage.numel * storage.type.itemsize
        if info.file_size < need or info.file_size > _MAX_STORAGE_BYTES:
            raise ConceptFileError(f"{path}: storage {key} holds {info.file_size} bytes, expected {need}; the file is corrupt")
        storage.data = archive.read(info)[:need]
    return _materialise(obj, byteorder)


def _load_legacy(raw: bytes, path: Path) -> Any:
    stream = io.BytesIO(raw)
    no_storages: dict[str, _Storage] = {}
    magic = _RestrictedUnpickler(stream, path, no_storages).load()
    if magic != _LEGACY_MAGIC:
        raise ConceptFileError(f"{path}: a pickle but not a torch.save file (no torch magic number)")
    protocol = _RestrictedUnpickler(stream, path, no_storages).load()
    if protocol != _LEGACY_PROTOCOL:
        raise ConceptFileError(f"{path}: unsupported legacy torch protocol {protocol!r}")
    sys_info = _RestrictedUnpickler(stream, path, no_storages).load()
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    storages: dict[str, _Storage] = {}
    obj = _RestrictedUnpickler(stream, path, storages).load()
    keys = _RestrictedUnpickler(stream, path, no_storages).load()
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise ConceptFileError(f"{path}: storage list does not match the tensors; the file is corrupt")
    order = "<" if little else ">"
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack(order + "q", stream.read(8))
        nbytes = numel * storage.type.itemsize
        if numel < storage.numel or nbytes > _MAX_STORAGE_BYTES:
            raise ConceptFileError(f"{path}: storage {key} holds {numel} elements, expected {storage.numel}; the file is corrupt")
        data = stream.read(nbytes)
        if len(data) < nbytes:
            raise ConceptFileError(f"{path}: file truncated inside storage {key}; re-download or re-export it")
        storage.data = data
    return _materialise(obj, "little" if little else "big")


def _materialise(obj: Any, byteorder: str) -> Any:
    """Replace every _Tensor in ``obj`` (dicts, lists, tuples) by a numpy array (copied)."""
    if isinstance(obj, _Tensor):
        return _to_numpy(obj, byteorder)
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
        for key, value in obj.items():
            out[key] = _materialise(value, byteorder)
        return out
    if isinstance(obj, list):
        return [_materialise(v, byteorder) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, byteorder) for v in obj)
    if isinstance(obj, (_Storage, _Callable)):
        raise pickle.UnpicklingError("a bare storage or torch global outside a tensor")
    return obj


def _to_numpy(tensor: _Tensor, byteorder: str):
    import numpy as np

    storage = tensor.storage
    if storage.data is None:
        raise pickle.UnpicklingError(f"storage {storage.key} has no data")
    kind = storage.type.dtype
    if kind == "bfloat16":
        flat = np.frombuffer(storage.data, dtype=("<" if byteorder == "little" else ">") + "u2")
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    else:
        dtype = np.dtype(kind).newbyteorder("<" if byteorder == "little" else ">")
        flat = np.frombuffer(storage.data, dtype=dtype)
    # Bounds check before as_strided, which would otherwise read past the buffer.
    if any(s == 0 for s in tensor.size):
        return np.zeros(tensor.size, dtype=flat.dtype.newbyteorder("="))
    last = tensor.offset + sum((n - 1) * st for n, st in zip(tensor.size, tensor.stride))
    if last >= flat.size:
        raise pickle.UnpicklingError(f"tensor of size {tensor.size} reaches past its storage ({flat.size} elements)")
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :],
        shape=tensor.size,
        strides=tuple(st * flat.itemsize for st in tensor.stride),
        writeable=False,
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True)


# -- writing -----------------------------------------------------------------------------------

class _Writer:
    """Emits protocol-2 pickle opcodes for dicts/str/int/float/bool/None and float32 tensors,
    exactly the shapes torch.save produces for a tensor dictionary."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")
        self.storages: list[bytes] = []

    def dump(self, obj) -> None:
        import numpy as np

        out = self.out
        if obj is None:
            out += b"N"
        elif obj is True:
            out += b"\x88"
        elif obj is False:
            out += b"\x89"
        elif isinstance(obj, int):
            if -(2**31) <= obj < 2**31:
                out += b"J" + struct.pack("<i", obj)
            else:
                data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
                out += b"\x8a" + bytes([len(data)]) + data
        elif isinstance(obj, float):
            out += b"G" + struct.pack(">d", obj)
        elif isinstance(obj, str):
            data = obj.encode("utf-8")
            out += b"X" + struct.pack("<I", len(data)) + data
        elif isinstance(obj, dict):
            out += b"}"
            if obj:
                out += b"("
                for key, value in obj.items():
                    self.dump(key)
                    self.dump(value)
                out += b"u"
        elif isinstance(obj, np.ndarray):
            self._tensor(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} into a tensor pickle")

    def _tensor(self, array) -> None:
        import numpy as np

        array = np.ascontiguousarray(array, dtype="<f4")
        key = str(len(self.storages))
        self.storages.append(array.tobytes())
        strides = []
        acc = 1
        for n in reversed(array.shape):
            strides.insert(0, acc)
            acc *= n
        out = self.out
        # torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())
        out += b"ctorch._utils\n_rebuild_tensor_v2\n("
        out += b"("
        self.dump("storage")
        out += b"ctorch\nFloatStorage\n"
        self.dump(key)
        self.dump("cpu")
        self.dump(int(array.size))
        out += b"tQ"
        self.dump(0)
        self._tuple(array.shape)
        self._tuple(strides)
        out += b"\x89ccollections\nOrderedDict\n)R"
        out += b"tR"

    def _tuple(self, values) -> None:
        self.out += b"("
        for value in values:
            self.dump(int(value))
        self.out += b"t"


def dump_tensor_pickle(obj: dict, archive_name: str = "archive") -> bytes:
    """Serialise ``obj`` (a dict of str/int/float/bool/None/dicts and numpy arrays, saved as
    float32 tensors) in torch's zip format, loadable by ``torch.load(weights_only=True)``."""
    writer = _Writer()
    writer.dump(obj)
    writer.out += b"."
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        def record(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(f"{archive_name}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, data)

        # Only the records AUTOMATIC1111's safe loader accepts (<dir>/data.pkl, <dir>/data/<n>,
        # <dir>/version); torch reads a missing byteorder record as little-endian.
        record("data.pkl", bytes(writer.out))
        for key, data in enumerate(writer.storages):
            record(f"data/{key}", data)
        record("version", b"3\n")
    return buffer.getvalue()
