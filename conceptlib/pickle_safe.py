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
anything is called. Tensors come back as numpy arrays; a ``torch.nn.ParameterDict`` (older
AUTOMATIC1111 embeddings) comes back as a plain dict of its parameters.

Only embedding-sized tensors are loaded: each tensor's shape is checked while unpickling, before
any storage is read, and only the bytes a tensor spans are read from its storage, so a small file
cannot make the loader allocate much more than its tensors hold.

Writing: ``dump_tensor_pickle`` emits the zip format by hand (the opcodes torch itself emits), so
exported ``.pt``/``.bin`` files load in ``torch.load(..., weights_only=True)`` without conceptlib
needing torch.
"""

from __future__ import annotations

import collections
import io
import lzma
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
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
# The largest tensor an embedding file holds: 75 vectors of SDXL's 1280 values (SDXL files must
# still load far enough to be recognised and refused by name).
_MAX_VECTORS = 75
_MAX_WIDTH = 1280
_MAX_TENSOR_ELEMENTS = _MAX_VECTORS * _MAX_WIDTH
# A view may skip elements of its storage (a strided slice), but not arbitrarily many.
_MAX_SPAN_ELEMENTS = 16 * _MAX_TENSOR_ELEMENTS
# SDXL files hold two tensors, every other embedding format one. Counted as the pickle makes
# them, so nothing a pickle does to its containers can hide one.
_MAX_TOTAL_ELEMENTS = 4 * _MAX_TENSOR_ELEMENTS
_MAX_TENSORS = 16
# A storage may be larger than its tensor (a view of one row of a whole token-embedding table,
# 49408 rows and the trained ones added, 1280 wide at most), never much larger than that. Only
# the rows a tensor spans are read.
_MAX_STORAGE_ELEMENTS = 2 * 49408 * _MAX_WIDTH
# The largest pickle record of a zip archive read (it is read whole before anything is checked),
# and the most opcodes a pickle may run (one opcode can build a 200-byte object); an embedding
# file's are a few KB and a few hundred.
_MAX_RECORD_BYTES = 4 * 1024 * 1024
_MAX_PICKLE_OPCODES = 200_000
# A compressed storage record larger than this must not be much smaller on disk: torch.save
# stores records uncompressed, and an embedding's floats barely compress.
_MAX_INFLATED_STORAGE_BYTES = 8 * 1024 * 1024


class _NotAnEmbedding(Exception):
    """A tensor (or all of them together) is larger than any embedding; the message says which."""


class _Frozen:
    """Base of every object the unpickler hands out or makes: no __dict__, and no attribute may
    be set once made. A pickle's BUILD opcode sets slots with setattr; without this, one file
    could retune a shared stand-in (a storage type's dtype) and so corrupt every file read after
    it, or resize a tensor after its size was checked."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"the pickle tries to change {type(self).__name__}.{name}, which a tensor "
                                     "file never does")

    def _set(self, **values) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)


class _Callable(_Frozen):
    """Base of the stand-ins ``find_class`` returns for the globals a tensor dictionary names."""

    __slots__ = ()


class _StorageType(_Callable):
    __slots__ = ("name", "dtype", "itemsize")

    def __init__(self, name: str):
        dtype, itemsize = _STORAGE_DTYPES[name]
        self._set(name=name, dtype=dtype, itemsize=itemsize)

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError(f"torch.{self.name} may only appear in a storage reference")


class _Storage(_Frozen):
    """A storage referenced by the pickle. The container attaches ``read(first, count)``, which
    returns the raw bytes of ``count`` elements starting at element ``first``."""

    __slots__ = ("type", "key", "numel", "read")

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self._set(type=storage_type, key=key, numel=numel, read=None)

    def attach(self, read) -> None:
        self._set(read=read)


class _Tensor(_Frozen):
    """A tensor rebuilt from (storage, offset, size, stride); materialised after loading."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        ints = lambda v: isinstance(v, (tuple, list)) and all(type(x) is int and x >= 0 for x in v)  # noqa: E731
        if type(offset) is not int or offset < 0 or not ints(size) or not ints(stride) or len(size) != len(stride):
            raise pickle.UnpicklingError("malformed tensor size/stride")
        self._set(storage=storage, offset=offset, size=tuple(size), stride=tuple(stride))
        _check_embedding_sized(self.size)
        if self.span > _MAX_SPAN_ELEMENTS:
            raise pickle.UnpicklingError(
                f"tensor of size {list(self.size)} has strides {list(self.stride)} that span far beyond it")
        if self.numel and offset + self.span > storage.numel:
            raise pickle.UnpicklingError(f"tensor of size {list(self.size)} at offset {offset} reaches past its "
                                         f"storage ({storage.numel} elements)")

    @property
    def numel(self) -> int:
        count = 1
        for n in self.size:
            count *= n
        return count

    @property
    def span(self) -> int:
        """How many storage elements the tensor reaches, from its offset on."""
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * st for n, st in zip(self.size, self.stride))


def _check_embedding_sized(size: tuple) -> None:
    """Refuse, before any storage is read, a tensor no embedding file holds."""
    shape = list(size)
    what = f"a tensor of shape {shape}"
    if len(size) > 2:
        raise _NotAnEmbedding(f"holds {what} (rank {len(size)}); a textual-inversion embedding is one (num_vectors, dim) matrix")
    if len(size) == 2 and size[0] > _MAX_VECTORS:
        raise _NotAnEmbedding(f"holds {what}: {size[0]} vectors, but a textual-inversion embedding has 1 to {_MAX_VECTORS}")
    if size and size[-1] > _MAX_WIDTH:
        raise _NotAnEmbedding(
            f"holds {what}: vectors of {size[-1]} values, but a textual-inversion embedding's are 768 or 1024 wide")


class _ParameterDict(dict):
    """``torch.nn.ParameterDict`` (how torch 1.11-era AUTOMATIC1111 stored string_to_param):
    the pickle rebuilds it with NEWOBJ and then BUILDs the module state, of which only
    ``_parameters`` is kept, as AUTOMATIC1111's ``getattr(param_dict, '_parameters', ...)`` does."""

    __slots__ = ()

    def __setstate__(self, state):
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if not isinstance(parameters, dict):
            raise pickle.UnpicklingError("ParameterDict state without a _parameters dictionary")
        self.clear()
        self.update(parameters)


class _Budget:
    """What one file's pickle has made so far: tensors and their values, counted as they are made
    (never handed to the pickle)."""

    def __init__(self):
        self.tensors = self.elements = 0

    def add(self, tensor: _Tensor) -> _Tensor:
        self.tensors += 1
        self.elements += tensor.numel
        if self.tensors > _MAX_TENSORS or self.elements > _MAX_TOTAL_ELEMENTS:
            raise _NotAnEmbedding(f"holds more than {min(self.elements, _MAX_TOTAL_ELEMENTS)} values in "
                                  f"{self.tensors}+ tensors; a textual-inversion embedding file holds one or two "
                                  "small tensors")
        return tensor


class _RebuildTensorV2(_Callable):
    __slots__ = ("budget",)

    def __init__(self, budget: _Budget):
        self._set(budget=budget)

    def __call__(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        return self.budget.add(_Tensor(storage, offset, size, stride))


class _RebuildTensor(_RebuildTensorV2):
    __slots__ = ()

    def __call__(self, storage, offset, size, stride):
        return self.budget.add(_Tensor(storage, offset, size, stride))


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


class _Set(_Callable):
    """``builtins.set``: a module's state pickles ``_non_persistent_buffers_set`` as set([])."""

    __slots__ = ()

    def __call__(self, items=()):
        if not isinstance(items, (list, tuple)):
            raise pickle.UnpicklingError("set built from something that is not a list")
        return set(items)


class _LatinEncode(_Callable):
    """``_codecs.encode``: how protocol-2 pickles spell ``bytes``."""

    __slots__ = ()

    def __call__(self, text, encoding="latin1"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
        return text.encode("latin1")


# The tensor rebuilders count against their file's _Budget: each unpickler makes its own.
_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensorV2,
    ("torch._utils", "_rebuild_tensor"): _RebuildTensor,
}
_ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    ("torch._utils", "_rebuild_parameter_with_state"): _RebuildParameter(),
    ("collections", "OrderedDict"): _OrderedDict(),
    ("_codecs", "encode"): _LatinEncode(),
    # A class, not a stand-in instance: NEWOBJ needs a type. It is a dict with __setstate__ only.
    ("torch.nn.modules.container", "ParameterDict"): _ParameterDict,
    # Protocol-2 pickles name builtins "__builtin__"; an overriding find_class sees that name unmapped.
    ("__builtin__", "set"): _Set(),
    ("builtins", "set"): _Set(),
}
_ALLOWED.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
_ALLOWED[("torch.storage", "UntypedStorage")] = _ALLOWED[("torch", "UntypedStorage")]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path, storages: dict[str, _Storage], budget: _Budget | None = None):
        super().__init__(file)
        self._source = source
        self._storages = storages
        budget = budget or _Budget()
        self._allowed = {**_ALLOWED, **{key: cls(budget) for key, cls in _REBUILDERS.items()}}

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"{self._source}: refused to load: the pickle asks for {module}.{name}, which a tensor "
                "file never needs (it may be malicious); nothing was executed. Get the embedding as "
                ".safetensors instead"
            ) from None

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and pid[1] is _ParameterDict:
            # The legacy format names a Module's class with its source code, which is only compared.
            return _ParameterDict
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError("malformed storage reference")
        if not 0 <= numel <= _MAX_STORAGE_ELEMENTS:
            raise _NotAnEmbedding(f"has a storage of {numel} values, more than a whole token-embedding table")
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
    for truncated, corrupt or unsupported files and for tensors larger than any embedding (those
    are refused before their data is read).
    """
    path = Path(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ConceptFileError(f"{path}: no such file; check the path") from None
    except IsADirectoryError:
        raise ConceptFileError(f"{path}: is a folder, expected a .pt/.bin file") from None
    except PermissionError:
        raise ConceptFileError(f"{path}: permission denied; make the file readable") from None
    with handle:
        return _load_open_pickle(handle, path)


def _load_open_pickle(handle, path: Path) -> Any:
    head = handle.read(4)
    if not head:
        raise ConceptFileError(f"{path}: file is empty; re-download or re-export it")
    handle.seek(0)
    try:
        if head == b"PK\x03\x04" or zipfile.is_zipfile(handle):
            obj, byteorder = _load_zip(handle, path)
        elif head[:1] == b"\x80":
            # Mapped, not read: a legacy file holds its storages inline, and a view's storage can be
            # a whole embedding matrix of which one row is read.
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as raw:
                obj, byteorder = _load_legacy(raw, path)
                return _materialise(obj, byteorder, {})
        else:
            raise ConceptFileError(f"{path}: not a PyTorch file (neither a torch zip archive nor a pickle); the download "
                                   "is damaged or is something else, re-download it")
        return _materialise(obj, byteorder, {})
    except (UnsafePickleError, ConceptFileError):
        raise
    except _NotAnEmbedding as exc:
        raise ConceptFileError(f"{path}: {exc}, so this file is not one (a model checkpoint?); nothing was loaded") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile, RecursionError, MemoryError, OverflowError,
            # zip records that are encrypted, compressed by an unsupported method, or damaged:
            RuntimeError, NotImplementedError, zlib.error, lzma.LZMAError, OSError) as exc:
        raise ConceptFileError(
            f"{path}: corrupt or truncated PyTorch file ({type(exc).__name__}: {str(exc)[:120]}); re-download or re-export it"
        ) from None


def _load_zip(handle, path: Path) -> tuple[Any, str]:
    archive = zipfile.ZipFile(handle)
    names = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if not names:
        raise ConceptFileError(f"{path}: a zip file but not a PyTorch archive (no <name>/data.pkl); not a torch.save file")
    if len(names) > 1:
        raise ConceptFileError(f"{path}: a zip file with {len(names)} data.pkl records ({', '.join(names[:3])}); "
                               "a torch.save file has one, so this one is corrupt; re-download or re-export it")
    prefix = names[0][: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    pickled = archive.getinfo(names[0])
    if pickled.file_size > _MAX_RECORD_BYTES:
        # Checked before reading: a few KB of deflated zeros can declare gigabytes.
        raise _NotAnEmbedding(f"has a {pickled.file_size / 1e6:.0f} MB data.pkl record, where a textual-inversion "
                              "embedding file's is a few KB")
    data = archive.read(pickled)
    _check_opcodes(io.BytesIO(data))
    obj = _RestrictedUnpickler(io.BytesIO(data), path, storages).load()
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
        byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise ConceptFileError(f"{path}: corrupt PyTorch file (its byteorder record says {byteorder[:40]!r}, "
                               "expected 'little' or 'big'); re-download or re-export it")
    for key, storage in storages.items():
        info = archive.getinfo(f"{prefix}data/{key}")
        need = storage.numel * storage.type.itemsize
        if info.file_size < need:
            raise ConceptFileError(f"{path}: storage {key} holds {info.file_size} bytes, expected {need}; the file is corrupt")
        if (info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_INFLATED_STORAGE_BYTES
                and info.file_size > 16 * info.compress_size):
            # Each read would inflate it from the start: a few KB could cost minutes.
            raise _NotAnEmbedding(f"has a storage record that inflates {info.compress_size} bytes to "
                                  f"{info.file_size}, where torch.save stores its records uncompressed")
        storage.attach(_zip_reader(archive, info, storage.type.itemsize))
    return obj, byteorder


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo, itemsize: int):
    def read(first: int, count: int) -> bytes:
        with archive.open(info) as member:
            member.seek(first * itemsize)
            return member.read(count * itemsize)

    return read


def _load_legacy(raw: mmap.mmap, path: Path) -> tuple[Any, str]:
    """``raw``: the file mapped; its pickles are read from it as from a file, its storages sliced."""
    stream = raw
    stream.seek(0)
    no_storages: dict[str, _Storage] = {}
    budget = _Budget()

    def unpickle(storages: dict[str, _Storage]):
        _check_opcodes(stream)
        return _RestrictedUnpickler(stream, path, storages, budget).load()

    magic = unpickle(no_storages)
    if magic != _LEGACY_MAGIC:
        raise ConceptFileError(f"{path}: a pickle but not a torch.save file (no torch magic number)")
    protocol = unpickle(no_storages)
    if protocol != _LEGACY_PROTOCOL:
        raise ConceptFileError(f"{path}: unsupported legacy torch protocol {protocol!r}")
    sys_info = unpickle(no_storages)
    little = not isinstance(sys_info, dict) or dict.get(sys_info, "little_endian", True)
    storages: dict[str, _Storage] = {}
    obj = unpickle(storages)
    keys = unpickle(no_storages)
    if not isinstance(keys, list) or set(keys) != set(storages):
        raise ConceptFileError(f"{path}: storage list does not match the tensors; the file is corrupt")
    order = "<" if little else ">"
    position = stream.tell()
    for key in keys:
        storage = storages[key]
        (numel,) = struct.unpack_from(order + "q", raw, position)
        position += 8
        nbytes = numel * storage.type.itemsize
        if numel < storage.numel:
            raise ConceptFileError(f"{path}: storage {key} holds {numel} elements, expected {storage.numel}; the file is corrupt")
        if position + nbytes > len(raw):
            raise ConceptFileError(f"{path}: file truncated inside storage {key}; re-download or re-export it")
        storage.attach(_bytes_reader(raw, position, storage.type.itemsize))
        position += nbytes
    return obj, "little" if little else "big"


def _bytes_reader(raw: bytes, start: int, itemsize: int):
    def read(first: int, count: int) -> bytes:
        return raw[start + first * itemsize : start + (first + count) * itemsize]

    return read


def _check_opcodes(stream) -> None:
    """Refuse, before unpickling, a pickle (from ``stream``'s position to its STOP) of more
    opcodes than any tensor dictionary has: each opcode may build an object of its own."""
    start = stream.tell()
    for count, _ in enumerate(pickletools.genops(stream), 1):
        if count > _MAX_PICKLE_OPCODES:
            raise _NotAnEmbedding(f"has a pickle of more than {_MAX_PICKLE_OPCODES} opcodes, where a "
                                  "textual-inversion embedding file's has a few hundred")
    stream.seek(start)


def _materialise(obj: Any, byteorder: str, memo: dict[int, Any]) -> Any:
    """Replace every _Tensor in ``obj`` (dicts, lists, tuples) by a numpy array (copied). Parts the
    pickle shares are converted once and stay shared, so repeated references cost nothing."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _Tensor):
        out = memo[id(obj)] = _to_numpy(obj, byteorder)
    elif isinstance(obj, dict):
        if getattr(obj, "__dict__", None):  # BUILD gave an OrderedDict attributes (its own items()?)
            raise pickle.UnpicklingError("a dictionary with attributes of its own, which torch.save never writes")
        out = memo[id(obj)] = collections.OrderedDict() if type(obj) is collections.OrderedDict else {}
        for key, value in dict.items(obj):
            out[key] = _materialise(value, byteorder, memo)
    elif isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(_materialise(v, byteorder, memo) for v in obj)
    elif isinstance(obj, tuple):
        out = memo[id(obj)] = tuple(_materialise(v, byteorder, memo) for v in obj)
    elif isinstance(obj, (_Storage, _Callable)) or obj is _ParameterDict:
        raise pickle.UnpicklingError("a bare storage or torch global outside a tensor")
    else:
        out = obj
    return out


def _to_numpy(tensor: _Tensor, byteorder: str):
    import numpy as np

    storage = tensor.storage
    if storage.read is None:
        raise pickle.UnpicklingError(f"storage {storage.key} has no data")
    if tensor.numel == 0:
        return np.zeros(tensor.size, dtype="float32" if storage.type.dtype == "bfloat16" else storage.type.dtype)
    # Bounds check before as_strided, which would otherwise read past the buffer.
    if tensor.offset + tensor.span > storage.numel:
        raise pickle.UnpicklingError(f"tensor of size {tensor.size} reaches past its storage ({storage.numel} elements)")
    data = storage.read(tensor.offset, tensor.span)
    prefix = "<" if byteorder == "little" else ">"
    if storage.type.dtype == "bfloat16":
        flat = (np.frombuffer(data, dtype=prefix + "u2").astype(np.uint32) << 16).view(np.float32)
    else:
        flat = np.frombuffer(data, dtype=np.dtype(storage.type.dtype).newbyteorder(prefix))
    if flat.size < tensor.span:
        raise pickle.UnpicklingError(f"storage {storage.key} ends inside a tensor")
    view = np.lib.stride_tricks.as_strided(
        flat,
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
            # As torch does: pad the local header's extra field so the data starts on a 64-byte
            # boundary, where torch.load(mmap=True) maps tensors (misaligned, they load slowly).
            data_start = archive.fp.tell() + 30 + len(info.filename.encode()) + 4
            info.extra = b"FB" + struct.pack("<H", -data_start % 64) + b"Z" * (-data_start % 64)
            archive.writestr(info, data)

        # Only the records AUTOMATIC1111's safe loader accepts (<dir>/data.pkl, <dir>/data/<n>,
        # <dir>/version); torch reads a missing byteorder record as little-endian.
        record("data.pkl", bytes(writer.out))
        for key, data in enumerate(writer.storages):
            record(f"data/{key}", data)
        record("version", b"3\n")
    return buffer.getvalue()
