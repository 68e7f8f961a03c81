"""ConceptLibrary: the on-disk collection of concepts (contract 2).

Layout under the library root ($CONCEPTLIB_HOME, else platformdirs' user data dir)::

    concepts/<name>.safetensors   one concept file each (contract 1); the file name is the name
    runs/                         training run folders (owned by the trainers)
    .lock                         flock()ed around every mutation, between processes
    .index.json                   a cache of the concept files' headers, never the source of truth

The index makes listing 10,000 concepts cheap: each entry is validated against the file's
(inode, mtime_ns, size) and re-read from the file when stale (its header, and its few KB of
vectors once, to flag NaN/Inf); a missing or corrupt index is simply rebuilt. It keeps only what
``conceptlib list`` shows; the rest of the metadata (preview
thumbnail, loss history, ...) is read from the file header on first access of ``header.metadata``.

Nothing here imports numpy or TensorFlow except ``get`` (which loads vectors).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shlex
import stat as stat_module
import threading
from pathlib import Path
from typing import Iterator

from conceptlib.concept import FORMAT, MAX_VECTORS, Concept, slug_from_token, suggested_token, validate_name, validate_token
from conceptlib.errors import (
    CollisionError,
    ConceptError,
    ConceptFileError,
    LibraryError,
    NotFoundError,
)
from conceptlib.files import (
    DESCRIPTIVE_KEYS,
    LISTED_DESCRIPTIONS,
    SUFFIX,
    ConceptHeader,
    WriteError,
    _fsync_dir,
    cleaned_metadata,
    non_finite_vectors,
    read_concept,
    read_header,
    summary_fields,
    vector_norms,
    write_concept,
    write_failure_reason,
)

# 3: entries also record files whose vectors hold NaN or Inf (version 2 listed them as usable).
# 5: entries also hold the author and license (`list` shows and searches them).
INDEX_VERSION = 5
_ENTRY_FIELDS = {"key", "name", "token", "num_vectors", "dim", "metadata"}
# The metadata keys ConceptHeader.summary() shows; the rest is read from the file when used.
# What `list` shows and searches without opening each file (the ModelSpec asks tools that list
# models to make their descriptions searchable).
_INDEXED_KEYS = ("trainer", "created_at") + tuple(DESCRIPTIVE_KEYS[option] for option in LISTED_DESCRIPTIONS)


def default_root() -> Path:
    """$CONCEPTLIB_HOME if set, else platformdirs' per-user data folder for conceptlib."""
    env = os.environ.get("CONCEPTLIB_HOME")
    if env:
        # Absolute: a relative value would name another library in every working directory.
        return Path(env).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_data_path("conceptlib"))


class _IndexedHeader(ConceptHeader):
    """A ConceptHeader built from the index: ``metadata`` is read from the file header the first
    time it is used; ``summary()`` needs only what the index holds."""

    def __init__(self, path, name, token, num_vectors, dim, metadata=None, *, indexed=None):
        # Same signature as ConceptHeader (so dataclasses.replace works) plus the index's part.
        object.__setattr__(self, "_indexed", dict(metadata if metadata is not None else indexed or {}))
        object.__setattr__(self, "_full", metadata)
        super().__init__(path=path, name=name, token=token, num_vectors=num_vectors, dim=dim, metadata=None)

    @property
    def metadata(self) -> dict[str, str]:  # type: ignore[override]
        if self._full is None:
            try:
                full = read_header(self.path).metadata
            except ConceptFileError:
                full = dict(self._indexed)  # the file changed or vanished since listing
            object.__setattr__(self, "_full", full)
        return self._full

    @metadata.setter
    def metadata(self, value) -> None:
        if value is not None:
            object.__setattr__(self, "_full", value)

    def summary(self) -> dict:
        return ConceptHeader(
            path=self.path, name=self.name, token=self.token, num_vectors=self.num_vectors, dim=self.dim,
            metadata=self._indexed,
        ).summary()


class NameTakenError(CollisionError):
    """The library already holds a concept with this name (``.name``)."""

    def __init__(self, name: str, fix: str | None = None):
        fix = fix or "choose another name (--name) or remove it first"
        super().__init__(f"a concept named {name!r} already exists; {fix}")
        self.name = name


class TokenTakenError(CollisionError):
    """Another concept (``.owner``) already uses this token (``.token``)."""

    def __init__(self, token: str, owner: str, fix: str | None = None):
        fix = fix or "choose another token (--token)"
        super().__init__(f"token {token!r} is already used by concept {owner!r}; {fix}")
        self.token = token
        self.owner = owner


@dataclasses.dataclass(frozen=True)
class Problem:
    """A file in the library's concepts folder that is not a usable concept (listing skips it)."""

    path: Path
    message: str


class ConceptLibrary:
    """The local concept library. Names (file-system slugs) and tokens are unique within it.

    Every mutation runs under an inter-process lock and writes atomically, so concurrent
    processes lose nothing and a process killed mid-write leaves the library readable.
    """

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser().absolute() if root is not None else default_root()
        self.concepts_dir = self.root / "concepts"
        self._lock_path = self.root / ".lock"
        self._index_path = self.root / ".index.json"
        self._thread_lock = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._lock_owner: int | None = None  # the thread holding the lock
        # While this object holds the lock nobody else can change the library, so the token
        # table is kept in memory (importing 1,000 files must not rescan 1,000 times).
        self._held_headers: dict[str, ConceptHeader] | None = None
        #: Files skipped by the last ``list()`` (corrupt, foreign, badly named), with the reason.
        self.problems: list[Problem] = []

    def __repr__(self) -> str:
        return f"ConceptLibrary({str(self.root)!r})"

    @property
    def runs_dir(self) -> Path:
        """Where training run folders live by default."""
        return self.root / "runs"

    def path_for(self, name: str) -> Path:
        """The file a concept named ``name`` is (or would be) stored in."""
        return self.concepts_dir / f"{validate_name(name)}{SUFFIX}"

    # -- locking -------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the library's inter-process lock (re-entrant within this object)."""
        with self._thread_lock:
            if self._lock_depth == 0:
                with self._writing(self._lock_path):
                    self.root.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
                self._lock_owner = threading.get_ident()
                self._held_headers = None
                self._remove_stale_temp_files()
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    self._held_headers = None
                    self._lock_owner = None
                    fd, self._lock_fd = self._lock_fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    # -- reading ---------------------------------------------------------------------------

    def list(self) -> list[ConceptHeader]:
        """All concepts' headers, sorted by name (header reads only; cached in the index).

        Files that are not usable concepts are skipped and recorded in ``self.problems``.
        """
        found, self.problems = self._scan()
        return [
            _IndexedHeader(Path(path), e["name"], e["token"], e["num_vectors"], e["dim"], indexed=e["metadata"])
            for path, e in found
        ]

    def summaries(self) -> list[dict]:
        """``[header.summary() for header in self.list()]``, straight from the index (what
        `conceptlib list` prints; no header objects, so 10,000 concepts list fast)."""
        found, self.problems = self._scan()
        return [summary_fields(e["name"], e["token"], e["num_vectors"], e["dim"], e["metadata"]) for _, e in found]

    def header(self, ref: str) -> ConceptHeader:
        """The header of the concept whose name or token is ``ref``; NotFoundError otherwise."""
        if is_valid_name(ref):
            path = self.concepts_dir / f"{ref}{SUFFIX}"
            if self._is_file(path):
                try:
                    return _with_name(read_header(path), ref)
                except ConceptFileError as exc:
                    raise UnreadableConceptError(exc, ref) from None
        found = self.find_token(ref)
        if found is None:
            raise NotFoundError(self._not_found_message(ref))
        return found

    def get(self, ref: str) -> Concept:
        """Load the concept whose name or token is ``ref`` (vectors included)."""
        header = self.header(ref)
        concept = _read_library_file(header.path, header.name)
        if concept.name != header.name:
            concept = Concept(header.name, concept.token, concept.vectors, concept.metadata)
        return concept

    def find_token(self, token: str) -> ConceptHeader | None:
        """The header of the concept whose token is ``token``, or None."""
        # Only the thread holding the lock may use (and fill) the held table: for another thread
        # the library can change at any moment, and the table with it.
        if self._lock_owner != threading.get_ident():
            headers = self.list()
        elif self._held_headers is not None:
            headers = list(self._held_headers.values())
        else:
            headers = self.list()
            self._held_headers = {h.name: h for h in headers}
        for header in headers:
            if header.token == token:
                return header
        return None

    def __contains__(self, ref: str) -> bool:
        try:
            self.header(ref)
        except NotFoundError:
            return False
        return True

    def check_available(self, name: str, token: str) -> None:
        """Raise (ConceptError/CollisionError) unless a concept with this name and token can be added."""
        self._check_available(name, token, replacing=None)

    # -- mutating ----------------------------------------------------------------------------

    def add(self, concept: Concept, *, overwrite: bool = False) -> ConceptHeader:
        """Store ``concept`` as <root>/concepts/<name>.safetensors, atomically and under the lock.

        With ``overwrite`` an existing concept of the same name is replaced; a token used by a
        different concept is always a CollisionError. The concept is checked as it is now (its
        vectors may have changed since it was made), and its metadata stored cleaned
        (``files.cleaned_metadata``: it may come from a stranger's file).
        """
        concept = Concept(concept.name, concept.token, concept.vectors, cleaned_metadata(concept.metadata))
        with self.lock():
            self._check_available(concept.name, concept.token, replacing=concept.name if overwrite else None)
            target = self.path_for(concept.name)
            with self._writing(target):
                path = write_concept(concept, target)
            header = _with_name(read_header(path), concept.name)
            if self._held_headers is not None:
                self._held_headers[header.name] = header
            return header

    def file_entry(self, name: str) -> Path | None:
        """The concepts folder's entry ``name``.safetensors, whatever it is (a concept, a corrupt or
        badly named file, a broken link, a FIFO, ...; not a folder), or None. Only plain file
        names count: nothing outside the concepts folder can be reached."""
        if not name or name.startswith(".") or "/" in name or os.sep in name or "\0" in name:
            return None
        path = self.concepts_dir / f"{name}{SUFFIX}"
        with self._reading():
            return path if os.path.lexists(path) and not path.is_dir() else None

    def remove(self, name: str) -> None:
        """Delete the concept called ``name`` (NotFoundError if there is none). The file is not
        read, so a corrupt concept file can be removed too, and so can any other entry the listing
        skips (``file_entry``)."""
        with self.lock():
            path = self.file_entry(name)
            if path is None:
                owner = self.find_token(name)
                if owner is not None:  # by name only: a token is no file name, and removing is for good
                    raise NotFoundError(f"{name!r} is the token of concept {owner.name!r}; remove it by name: "
                                        f"remove({owner.name!r})")
                raise NotFoundError(self._not_found_message(name))
            with self._writing(path):
                os.unlink(path)
            _fsync_dir(path.parent)
            self._held_headers = None

    def rename(self, old: str, new: str, token: str | None = None) -> ConceptHeader:
        """Rename concept ``old`` (its name or token) to ``new`` (and optionally give it a new token)."""
        with self.lock():
            old = self._name_of(old)
            old_path = self._existing_path(old)
            validate_name(new)
            # With a new token, a file whose own token is now refused can still be renamed.
            concept = _read_library_file(old_path, old, token=validate_token(token) if token is not None else None)
            new_token = concept.token
            if new == old and new_token == read_header(old_path).token:
                return _with_name(read_header(old_path), old)
            self._check_available(new, new_token, replacing=old,
                                  name_fix=f"choose another new name or remove {new!r} first",
                                  token_fix="choose another --token")
            metadata = dict(concept.metadata)
            if metadata.get("modelspec.title") in (None, old, concept.name):
                metadata["modelspec.title"] = new
            renamed = Concept(new, new_token, concept.vectors, metadata)
            new_path = self.path_for(new)
            with self._writing(new_path):
                if new_path != old_path:
                    # Move first (atomic), then rewrite in place (atomic): a crash in between leaves the
                    # concept under its new name with its old metadata, never two files with one token.
                    os.rename(old_path, new_path)
                    _fsync_dir(new_path.parent)
                try:
                    write_concept(renamed, new_path)
                except BaseException:
                    if new_path != old_path:
                        os.rename(new_path, old_path)  # a failed rewrite leaves the library as it was
                    raise
            self._held_headers = None
            return _with_name(read_header(new_path), new)

    def describe(self, ref: str, changes: dict[str, str | None]) -> ConceptHeader:
        """Set (or, with None, remove) descriptive metadata keys of concept ``ref`` (its name or
        token), e.g. ``{"modelspec.author": "me"}``; the file is rewritten atomically with its
        vectors and every other key as they were. Removing ``modelspec.title`` gives back the
        default title, the concept's name."""
        with self.lock():
            name = self._name_of(ref)
            path = self._existing_path(name)
            concept = _read_library_file(path, name)
            metadata = dict(concept.metadata)
            for key, value in changes.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            with self._writing(path):
                write_concept(Concept(name, concept.token, concept.vectors, metadata), path)
            self._held_headers = None
            return _with_name(read_header(path), name)

    # -- internals ----------------------------------------------------------------------------

    def _name_of(self, ref: str) -> str:
        """The name of the concept whose name or token is ``ref`` (a name is taken as it is, so
        a concept whose file is corrupt can still be named)."""
        if is_valid_name(ref) and self._is_file(self.concepts_dir / f"{ref}{SUFFIX}"):
            return ref
        found = self.find_token(ref)
        if found is None:
            raise NotFoundError(self._not_found_message(ref))
        return found.name

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """Turn a failed write under the library root into one WriteError that says what to do."""
        try:
            yield
        except WriteError as exc:
            raise WriteError(exc.path, exc.reason, self._write_fix(exc.__cause__ or exc.__context__)) from None
        except OSError as exc:
            raise WriteError(path, write_failure_reason(path, exc), self._write_fix(exc)) from None

    def _write_fix(self, exc) -> str:
        code = getattr(exc, "errno", None)
        if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return f"free some space on the disk of {self.root}, or set CONCEPTLIB_HOME to a folder on another one"
        if code == errno.EROFS:
            return f"{self.root} is on a read-only file system; set CONCEPTLIB_HOME to a folder on a writable one"
        return f"make {self.root} a writable folder, or set CONCEPTLIB_HOME to one"

    def _existing_path(self, name: str) -> Path:
        if not is_valid_name(name):
            raise NotFoundError(self._not_found_message(name))
        path = self.concepts_dir / f"{name}{SUFFIX}"
        if not self._is_file(path):
            raise NotFoundError(self._not_found_message(name))
        return path

    def _is_file(self, path: Path) -> bool:
        with self._reading():
            return path.is_file()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Turn a library folder that cannot be read (permissions) into one LibraryError."""
        try:
            yield
        except PermissionError:
            raise LibraryError(f"cannot read the library folder {self.concepts_dir}: permission denied; make it "
                               "readable (and searchable) for you, or set CONCEPTLIB_HOME to another folder") from None

    def _not_found_message(self, ref: str) -> str:
        import difflib

        try:
            known = [ref for header in self.list() for ref in (header.name, header.token)]
        except LibraryError:
            known = []
        close = difflib.get_close_matches(ref, [known_ref for known_ref in known if known_ref != ref], n=1,
                                          cutoff=0.75) if ref else []
        hint = f"did you mean {close[0]!r}? (see `conceptlib list`)" if close else "see `conceptlib list`"
        return f"no concept named or with token {ref!r} in {self.root}; {hint}"

    def _check_available(self, name: str, token: str, *, replacing: str | None, name_fix: str | None = None,
                         token_fix: str | None = None) -> None:
        validate_name(name)
        validate_token(token)
        owner = self.find_token(token)
        token_taken = owner is not None and owner.name != replacing
        in_the_way = self.concepts_dir / f"{name}{SUFFIX}"
        if name != replacing and in_the_way.is_dir():
            raise LibraryError(f"{in_the_way} is a folder, not a concept; move it out of the concepts folder, or "
                               "choose another name")
        if name != replacing and in_the_way.exists():
            if token_taken:  # say both at once, not one per attempt
                name_fix = (f"{name_fix or 'choose another name (--name)'}, and another token (--token), since "
                            f"concept {owner.name!r} has token {token!r}")
            raise NameTakenError(name, name_fix)
        if token_taken:
            raise TokenTakenError(token, owner.name, token_fix)
        # Commands take a name or a token alike (show REF, rename REF, ...): a name that is another
        # concept's token, or a token that is another concept's name, would hide one of the two.
        other = self.find_token(name)
        if other is not None and other.name not in (name, replacing):
            raise CollisionError(f"name {name!r} is the token of concept {other.name!r}, and commands take a "
                                 "name or a token alike; choose another name")
        if token not in (name, replacing) and is_valid_name(token) and (self.concepts_dir / f"{token}{SUFFIX}").exists():
            raise CollisionError(f"token {token!r} is the name of concept {token!r}, and commands take a name or "
                                 "a token alike; choose another token")

    def _remove_stale_temp_files(self) -> None:
        # Called on taking the lock: no other process is writing now, so temp files are
        # leftovers of a killed writer. Index temp files are written without the lock (by
        # listing): only those of processes that are gone.
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(self.root)):
                match = re.fullmatch(r"\.index\.(\d+)\.\d+\.tmp", entry.name)
                if match and not _process_alive(int(match[1])):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        try:
            entries = list(os.scandir(self.concepts_dir))
        except OSError:
            return  # no concepts folder yet (or not a folder: listing says so)
        for entry in entries:
            if entry.name.startswith(".tmp-"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    def _scan(self) -> tuple[list[tuple[str, dict]], list[Problem]]:
        """(path, index entry) for each usable concept file sorted by name, and the problems;
        index entries are re-read from the file when its (inode, mtime_ns, size) changed."""
        try:
            with self._reading():
                entries = list(os.scandir(self.concepts_dir))
        except FileNotFoundError:
            return [], []
        except NotADirectoryError:
            # The first of concepts/ and the folders above it that exists as something else.
            blocker = next((p for p in (self.concepts_dir, *self.concepts_dir.parents) if p.exists() and not p.is_dir()),
                           self.concepts_dir)
            raise LibraryError(f"{blocker} is not a folder; move it away or set CONCEPTLIB_HOME") from None
        old_index = self._load_index()
        new_index: dict[str, dict] = {}
        changed = False
        found: list[tuple[str, dict]] = []
        problems: list[Problem] = []
        for entry in entries:
            file_name = entry.name
            if file_name.startswith("."):  # ours in progress (atomic writes), or the system's
                continue
            if not file_name.endswith(SUFFIX):
                # Copied in by hand (an A1111 .pt, a diffusers .bin): said, never read.
                problems.append(Problem(Path(entry.path), f"{entry.path}: not a library file (the library keeps "
                                                          f"NAME{SUFFIX} files); {_BRING_IN_INSTEAD}"))
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:
                if not os.path.lexists(entry.path):
                    continue  # removed while listing
                problems.append(Problem(Path(entry.path), f"{entry.path}: a link to a file that does not exist; "
                                                          f"remove it (conceptlib remove {shlex.quote(file_name[: -len(SUFFIX)])})"))
                continue
            except OSError:
                continue
            if stat_module.S_ISDIR(stat.st_mode):
                problems.append(Problem(Path(entry.path), f"{entry.path}: a folder, not a concept file; move it out "
                                                          "of the concepts folder"))
                continue
            if not stat_module.S_ISREG(stat.st_mode):
                # Never opened: reading a FIFO would wait forever.
                problems.append(Problem(Path(entry.path), f"{entry.path}: not a regular file; remove it (conceptlib "
                                                          f"remove '{file_name[: -len(SUFFIX)]}')"))
                continue
            key = [stat.st_ino, stat.st_mtime_ns, stat.st_size]
            cached = old_index.get(file_name)
            # A skipped file's line is made anew each time (such files are few and cheap to
            # check), so it gives this version's reason and fix, not the one cached earlier.
            if not _is_current(cached, key) or "error" in cached:
                fresh = _index_entry(Path(entry.path), key)
                if "error" in fresh and not os.path.lexists(entry.path):
                    continue  # removed (or renamed) while listing
                changed = changed or fresh != cached
                cached = fresh
            new_index[file_name] = cached
            if "error" in cached:
                problems.append(Problem(Path(entry.path), cached["error"]))
            else:
                found.append((entry.path, cached))
        if changed or len(new_index) != len(old_index):
            self._save_index(new_index)
        found.sort(key=lambda item: item[1]["name"])
        found = _without_duplicate_tokens(found, problems)
        problems.sort(key=lambda p: p.path.name)
        return found, problems

    def _load_index(self) -> dict[str, dict]:
        try:
            with open(self._index_path, "rb") as handle:
                data = json.loads(handle.read())
            if data.get("version") == INDEX_VERSION and isinstance(data.get("files"), dict):
                return data["files"]
        except (OSError, ValueError, AttributeError):
            pass
        return {}

    def _save_index(self, files: dict[str, dict]) -> None:
        data = json.dumps({"version": INDEX_VERSION, "files": files}, separators=(",", ":")).encode()
        tmp = self._index_path.with_name(f".index.{os.getpid()}.{threading.get_ident()}.tmp")
        # Best effort and without the lock: os.replace makes it atomic, and every entry is
        # re-validated against its file before use, so a lost or stale index costs only time.
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self._index_path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _is_current(entry, key: list[int]) -> bool:
    """A well-formed index entry made from the file as it is now."""
    if not isinstance(entry, dict) or entry.get("key") != key:
        return False
    return isinstance(entry.get("error"), str) or (
        _ENTRY_FIELDS.issubset(entry) and isinstance(entry["metadata"], dict)
        and all(isinstance(entry[k], str) for k in ("name", "token"))
        and all(type(entry[k]) is int for k in ("num_vectors", "dim"))
    )


class UnreadableConceptError(ConceptFileError):
    """A library concept's own file cannot be read: the fix is the library's (remove, import again),
    not the reader's "re-download it"."""

    def __init__(self, cause: ConceptFileError, name: str):
        self.reason = str(cause)
        super().__init__(f"{self.reason} (library concept {name}: `conceptlib remove {name}` deletes the file; "
                         "then import or train the concept again)")


def _read_library_file(path: Path, name: str, **options) -> Concept:
    try:
        return read_concept(path, **options)
    except ConceptFileError as exc:
        raise UnreadableConceptError(exc, name) from None


# The fix for another tool's file copied into the concepts folder by hand.
_BRING_IN_INSTEAD = "move it out of the concepts folder, then add it with conceptlib import FILE"


def _index_entry(path: Path, key: list[int]) -> dict:
    name = path.name[: -len(SUFFIX)]
    if not is_valid_name(name):
        return {"key": key, "error": f"file name {path.name!r} is not a valid concept name; rename the file (e.g. to "
                                     f"{slug_from_token(name)}{SUFFIX}) or remove it (conceptlib remove {shlex.quote(name)})"}
    try:
        header = read_header(path)
    except ConceptFileError as exc:
        return {"key": key, "error": str(exc)}
    if header.metadata.get("format") != FORMAT:
        # Another tool's .safetensors copied in by hand: its tensor key ('emb_params') is no token.
        return {"key": key, "error": f"{path}: not a conceptlib file (another tool's embedding, copied in by hand?); "
                                     f"{_BRING_IN_INSTEAD}"}
    try:
        validate_token(header.token)
    except ConceptError as exc:
        fix = f"give it another token: conceptlib rename {name} {name} --token {shlex.quote(suggested_token(header.token))}"
        return {"key": key, "error": f"{path}: {exc} ({fix})"}
    if not 1 <= header.num_vectors <= MAX_VECTORS:
        return {"key": key, "error": f"{path}: holds {header.num_vectors} vectors, but a concept has 1 to {MAX_VECTORS}; "
                                     f"remove it (conceptlib remove {name})"}
    try:
        # Once per new or changed file (the index caches the result): a few KB, no numpy.
        bad = non_finite_vectors(vector_norms(path))
    except ConceptFileError as exc:
        return {"key": key, "error": str(exc)}
    if bad:
        return {"key": key, "error": non_finite_message(path, name, bad)}
    indexed = {k: header.metadata[k] for k in _INDEXED_KEYS if k in header.metadata}
    return {
        "key": key,
        "name": name,
        "token": header.token,
        "num_vectors": header.num_vectors,
        "dim": header.dim,
        "metadata": indexed,
    }


def _without_duplicate_tokens(found: list[tuple[str, dict]], problems: list[Problem]) -> list[tuple[str, dict]]:
    """Tokens are unique in a library, but a file copied in by hand can repeat one: the first by
    name keeps it, each later one is a problem (its token would never reach it)."""
    owners: dict[str, str] = {}
    kept = []
    for path, entry in found:
        owner = owners.setdefault(entry["token"], entry["name"])
        if owner == entry["name"]:
            kept.append((path, entry))
            continue
        fix = f"conceptlib rename {entry['name']} {entry['name']} --token '<{entry['name']}>'"
        problems.append(Problem(Path(path), f"{path}: its token {entry['token']!r} is also the token of concept "
                                            f"{owner!r}; give it another ({fix})"))
    return kept


def non_finite_message(path: Path, name: str, bad: list[int]) -> str:
    """The problem line for a concept whose vectors ``bad`` hold NaN or Inf."""
    which = ", ".join(str(i) for i in bad)
    return (f"{path}: vector {which} holds NaN or Inf, so the concept cannot be used; retrain it or "
            f"remove it (conceptlib remove {name})")


def is_valid_name(ref: str) -> bool:
    """True if ``ref`` is a valid library name (see concept.validate_name)."""
    try:
        validate_name(ref)
    except ConceptError:
        return False
    return True


def _with_name(header: ConceptHeader, name: str) -> ConceptHeader:
    """The library's name for a file is its file name, whatever its metadata says."""
    return header if header.name == name else dataclasses.replace(header, name=name)
