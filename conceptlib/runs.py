"""Training runs on disk: a run's folder (settings, checkpoints, previews, lock), finding a run
by folder or name, and what `conceptlib runs` lists. Standard library only until a checkpoint is
read (numpy): listing runs imports neither numpy nor any model library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from conceptlib.errors import TrainingError

if TYPE_CHECKING:
    from conceptlib.training import TrainingConfig


@dataclass
class Checkpoint:
    """Everything needed to continue a run bit-identically: the next step, the vectors, the
    optimizer's variables (in the trainer's order) and the loss history so far."""

    step: int
    vectors: "object"  # np.ndarray (num_vectors, dim)
    optimizer: list = field(default_factory=list)  # list of np.ndarray
    losses: list[float] = field(default_factory=list)


class RunDirectory:
    """A training run's folder: config.json, checkpoints/, previews/, concept.safetensors."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def previews(self) -> Path:
        return self.path / "previews"

    @property
    def concept_path(self) -> Path:
        return self.path / "concept.safetensors"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def exists(self) -> bool:
        return self.config_path.is_file()

    @contextlib.contextmanager
    def hold(self):
        """Hold the run's lock while training it, so that two processes never train the same run
        (e.g. two `--resume` of it at once): the second gets a TrainingError."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TrainingError(
                    f"run {self.path} is being trained by another process right now; wait for it to "
                    "finish, or stop it first"
                ) from None
            yield
        finally:
            os.close(fd)  # releases the lock

    def is_training(self) -> bool:
        """True while a process trains this run (holds ``hold``'s lock)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @property
    def init_path(self) -> Path:
        """The concept the run started from (--init-from), kept so a resume never depends on
        the library or the file it came from."""
        return self.path / "init.safetensors"

    def create(self, config: TrainingConfig, extra: dict, start=None) -> None:
        """Write the run's settings (and ``start``, the Concept it starts from, if any)."""
        from conceptlib.files import atomic_write_bytes, write_concept

        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        if start is not None:
            write_concept(start, self.init_path)
        data = {"config": config.to_dict(), **extra}
        atomic_write_bytes(self.config_path, json.dumps(data, indent=2).encode())

    def record(self, settings: dict, **extra) -> None:
        """Update config.json with what a trainer settled as the run started: ``settings`` into
        the run's settings (e.g. the batch size an override chose), ``extra`` beside them (the
        trainer's own, e.g. ``jax={"variants": 8}``), so a resume draws the same batches."""
        from conceptlib.files import atomic_write_bytes

        data = self.read()
        data["config"].update(settings)
        data.update(extra)
        atomic_write_bytes(self.config_path, json.dumps(data, indent=2).encode())

    def load_init(self):
        """The Concept the run started from (TrainingError if its file is gone or damaged)."""
        from conceptlib.errors import ConceptlibError
        from conceptlib.files import read_concept

        try:
            return read_concept(self.init_path)
        except ConceptlibError as exc:
            raise TrainingError(
                f"the vectors this run started from are unreadable ({exc}); start a new run"
            ) from None

    def read(self) -> dict:
        """config.json: a dict whose "config" holds the run's settings (TrainingError if not)."""
        try:
            data = json.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise TrainingError(
                f"{self.path} is not a training run folder (no config.json); give a run folder or a run "
                "name from `conceptlib runs`"
            ) from None
        except ValueError as exc:
            raise TrainingError(f"{self.config_path}: corrupt ({exc}); start a new run") from None
        except OSError as exc:
            raise TrainingError(f"{self.config_path}: cannot be read ({exc.strerror or exc}); check that it is a "
                                "file you may read, or start a new run") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise TrainingError(f"{self.config_path}: corrupt (no \"config\" settings); start a new run")
        return data

    def read_config(self) -> TrainingConfig:
        """The run's settings as a validated TrainingConfig. The settings were valid when the run
        started, so a missing, mistyped or out-of-range one means config.json was damaged or
        edited: a TrainingError naming it, not a traceback or a command-line usage error."""
        from conceptlib.errors import ConceptlibError
        from conceptlib.training import TrainingConfig

        settings = self.read()["config"]
        required = [f.name for f in dataclasses.fields(TrainingConfig) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING]
        missing = [key for key in required if key not in settings]
        if missing:
            raise TrainingError(f"{self.config_path}: corrupt (no {', '.join(missing)} in its settings); start a new run")
        try:
            return TrainingConfig.from_dict(settings).validate()
        except (ConceptlibError, TypeError, ValueError) as exc:
            raise TrainingError(f"{self.config_path}: invalid settings ({exc}); undo the edit or start a new run") from None

    @property
    def write_fix(self) -> str:
        """What to do when the run cannot write into its folder (a full disk, say)."""
        return f"free some space there or make {self.path} writable"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}.npz"

    def preview_path(self, step: int) -> Path:
        return self.previews / f"step-{step:07d}.png"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("step-*.npz")) if self.checkpoints.is_dir() else []
        found = [path for path in found if path.stem.removeprefix("step-").isdigit()]  # not a stray step-final.npz
        return found[-1] if found else None

    def save_checkpoint(self, checkpoint: Checkpoint) -> Path:
        import numpy as np

        from conceptlib.files import atomic_write_bytes

        arrays = {"vectors": np.asarray(checkpoint.vectors, dtype=np.float32)}
        for index, value in enumerate(checkpoint.optimizer):
            arrays[f"optimizer_{index:04d}"] = np.asarray(value)
        arrays["meta"] = np.frombuffer(
            json.dumps({"step": checkpoint.step, "losses": checkpoint.losses, "optimizer": len(checkpoint.optimizer)}).encode(),
            dtype=np.uint8,
        )
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return atomic_write_bytes(self.checkpoint_path(checkpoint.step), buffer.getvalue(), fix=self.write_fix)

    def load_checkpoint(
        self, path: Path | None = None, *, fix: str = "delete it to resume from an earlier one"
    ) -> Checkpoint | None:
        """Checkpoint ``path`` (default: the latest), or None where there is none; an unreadable
        one is a TrainingError that ends with ``fix``."""
        import numpy as np

        path = path or self.latest_checkpoint()
        if path is None:
            return None
        if Path(path).is_file() and not zipfile.is_zipfile(path):
            # np.load would try it as a pickle and answer with numpy's allow_pickle advice.
            raise TrainingError(f"{path}: unreadable checkpoint (not an .npz archive); {fix}")
        try:
            with np.load(path) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                return Checkpoint(
                    step=int(meta["step"]),
                    vectors=data["vectors"].copy(),
                    optimizer=[data[f"optimizer_{i:04d}"].copy() for i in range(int(meta["optimizer"]))],
                    losses=[float(x) for x in meta["losses"]],
                )
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise TrainingError(f"{path}: unreadable checkpoint ({exc}); {fix}") from None


def checkpoint_concept(path: str | Path, *, name: str | None = None, token: str | None = None):
    """The vectors of training checkpoint ``path`` (RUN/checkpoints/step-N.npz) as a Concept with
    the metadata of one trained to step N: named ``NAME-stepN`` with token ``<TOKEN-stepN>``
    unless ``name``/``token`` are given. The preview is that step's preview grid, if the run
    rendered one. A picked checkpoint is how an earlier, less overfitted state of a run is kept."""
    import numpy as np

    from conceptlib.concept import Concept
    from conceptlib.errors import ConceptError, ConceptFileError, UnsupportedFormatError
    from conceptlib.training import trained_metadata

    path = Path(path)
    run = RunDirectory(path.parent.parent)
    if path.parent.name != "checkpoints" or not run.config_path.is_file():
        raise UnsupportedFormatError(
            f"{path}: an .npz file that is not a conceptlib training checkpoint (RUN/checkpoints/step-N.npz); "
            "import concept files (.safetensors, .pt, .bin) instead"
        )
    try:
        checkpoint = run.load_checkpoint(path, fix=f"import another step's checkpoint from {path.parent}")
        saved = run.read()
        config = run.read_config()
    except TrainingError as exc:
        raise ConceptFileError(str(exc)) from None
    step = checkpoint.step
    name = name or f"{config.name}-step{step}"
    token = token or (f"{config.token[:-1]}-step{step}>" if config.token.endswith(">") else f"{config.token}-step{step}")
    init_concept = run.load_init() if config.init_from else None
    preview = _preview_of_step(run, step)
    metadata = trained_metadata(
        config, checkpoint.losses, init_tokens=saved.get("init_tokens", []), init_concept=init_concept,
        image_sha256=saved.get("image_sha256", []), random_weights=bool(saved.get("random_weights")),
        preview=preview, preview_source="generated", trainer_version=str(saved.get("trainer_version", "?")),
    )
    metadata["checkpoint_of"] = json.dumps({"run": str(run.path.resolve()), "step": step})
    try:
        return Concept(name, token, np.asarray(checkpoint.vectors, dtype=np.float32), metadata)
    except ConceptError as exc:
        raise ConceptFileError(f"{path}: {exc}; give another --name/--token") from None


def _preview_of_step(run: RunDirectory, step: int):
    """The preview grid the run rendered at ``step`` (uint8 (H, W, 3)), or None."""
    preview = run.preview_path(step)
    if not preview.is_file():
        return None
    import numpy as np
    from PIL import Image

    with Image.open(preview) as image:
        return np.asarray(image.convert("RGB"))


def find_run(resume: str | Path, library) -> RunDirectory:
    """The run folder ``resume`` names: a path, or the name of a folder in ``library.runs_dir``
    (as `conceptlib runs` lists them)."""
    path = Path(resume).expanduser()
    if not path.exists() and len(path.parts) == 1 and (Path(library.runs_dir) / path).is_dir():
        path = Path(library.runs_dir) / path
    # Absolute, so paths in messages and --json are the same from any folder (one that does not
    # exist is named as given).
    return RunDirectory(path.absolute() if path.exists() else path)


def run_summary(run: RunDirectory) -> dict:
    """What `conceptlib runs` shows of one run folder, read without loading a checkpoint:
    ``status`` is "finished" (its concept was added), "running" (a process trains it now;
    ``step``: its latest checkpoint, 0 without one), "stopped" (``step`` of ``steps`` done at its
    latest checkpoint; resumable), "no checkpoint" (stopped before its first checkpoint) or
    "unreadable" (its config.json; ``error`` says why)."""
    summary: dict = {"run": run.path.name, "path": str(run.path)}
    try:
        saved = run.read()
        run.read_config()  # settings `--resume` would refuse: not a run to offer resuming
    except TrainingError as exc:
        unknown = dict.fromkeys(("name", "token", "trainer", "base_model", "steps", "step", "previews"))
        return dict(summary, **unknown, status="unreadable", error=str(exc), started=_started(run, {}))
    config = saved["config"]
    summary.update(
        name=config.get("name"), token=config.get("token"), trainer=config.get("trainer"),
        base_model=config.get("base_model") or "sd-1", steps=config.get("steps"), started=_started(run, saved),
        previews=len(list(run.previews.glob("*.png"))) if run.previews.is_dir() else 0,
    )
    latest = run.latest_checkpoint()
    step = int(latest.stem.split("-")[-1]) if latest is not None else 0
    if run.concept_path.exists():
        summary.update(status="finished", step=config.get("steps"))
    elif run.is_training():
        summary.update(status="running", step=step)
    else:
        summary.update(status="stopped" if latest is not None else "no checkpoint", step=step)
    return summary


def run_steps(run: RunDirectory, problems: list | None = None) -> list[dict]:
    """The steps of ``run`` to pick a concept from, in order: each step that left a checkpoint or
    a preview grid, and the final step of a finished run. Each is ``step``, ``checkpoint``,
    ``preview`` and ``concept`` (paths, or None) and ``loss``: the mean loss of the steps since
    the previous one listed (None where the run kept none), from the finished concept's loss
    history or else the latest checkpoint's (a damaged one: no losses, and a line in ``problems``)."""
    found: dict[int, dict] = {}
    for key, folder, suffix in (("checkpoint", run.checkpoints, ".npz"), ("preview", run.previews, ".png")):
        for path in sorted(folder.glob(f"step-*{suffix}")) if folder.is_dir() else []:
            number = path.stem.removeprefix("step-")
            if number.isdigit():
                found.setdefault(int(number), {})[key] = str(path)
    finished = run.concept_path.is_file()
    if finished:
        found.setdefault(int(run.read()["config"]["steps"]), {})["concept"] = str(run.concept_path)
    losses = _losses_by_step(run, finished, [] if problems is None else problems)
    steps, previous = [], 0
    for step in sorted(found):
        window = [loss for done, loss in losses.items() if previous < done <= step]
        steps.append({"step": step, "loss": round(sum(window) / len(window), 6) if window else None,
                      "checkpoint": None, "preview": None, "concept": None, **found[step]})
        previous = step
    return steps


def _losses_by_step(run: RunDirectory, finished: bool, problems: list) -> dict[int, float]:
    """Steps done -> loss: the finished concept's (possibly thinned) loss history, or every
    step's loss up to the latest checkpoint. A damaged file gives no losses (``problems`` gets a
    line saying which), so the steps can still be listed and picked."""
    from conceptlib.errors import ConceptlibError

    try:
        if finished:
            from conceptlib.files import read_header

            history = json.loads(read_header(run.concept_path).metadata.get("loss_history") or "[]")
            return {int(done): float(loss) for done, loss in history}
        checkpoint = run.load_checkpoint()
        return {index + 1: loss for index, loss in enumerate(checkpoint.losses)} if checkpoint else {}
    except (ConceptlibError, ValueError, TypeError) as exc:
        if finished:
            problems.append(f"losses not shown: the run's copy of its concept ({run.concept_path}) cannot be read; "
                            "the library's copy is a file of its own, and the checkpoints still import")
        else:
            problems.append(f"losses not shown: {exc}")
        return {}


def _started(run: RunDirectory, saved: dict) -> str:
    """When the run started: recorded in config.json (earlier runs: the file's modification time)."""
    started = saved.get("started")
    if isinstance(started, str):
        return started
    return _dt.datetime.fromtimestamp(run.config_path.stat().st_mtime).isoformat(timespec="seconds")


def run_summaries(library) -> list[dict]:
    """``run_summary`` of every run folder in ``library.runs_dir``, oldest first."""
    root = Path(library.runs_dir)
    folders = [RunDirectory(p) for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    summaries = [run_summary(run) for run in folders if run.config_path.exists()]
    summaries.sort(key=lambda summary: (summary.get("started", ""), summary["run"]))
    return summaries


def listed_run(name: str, library) -> RunDirectory:
    """``find_run(name)`` if it is a run folder (holds config.json, readable or not); else a
    TrainingError pointing to `conceptlib runs`."""
    run = find_run(name, library)
    if not run.config_path.is_file():
        raise TrainingError(
            f"{name}: not a training run (no folder of that name or path holding config.json); "
            "`conceptlib runs` lists the runs"
        )
    return run


def removable_run(name: str, library) -> RunDirectory:
    """The run folder ``name`` (a name from `conceptlib runs`, or a path) if it may be deleted: a
    folder holding config.json (readable or not) directly in ``library.runs_dir``, not a link out
    of it. Raises TrainingError otherwise; a run elsewhere (``--run-dir``) is the user's to delete."""
    run = listed_run(name, library)
    runs_dir = Path(library.runs_dir).resolve()
    if run.path.is_symlink() or run.path.resolve().parent != runs_dir:
        raise TrainingError(
            f"{run.path}: not in the library's runs folder {runs_dir}; conceptlib removes only runs it lists "
            "(delete that folder yourself)"
        )
    return run


def remove_run(run: RunDirectory) -> None:
    """Delete ``run``'s folder (checkpoints, previews, its copy of the concept; the library's
    concept stays), holding its lock so that a run being trained is refused, untouched."""
    import shutil

    with run.hold():
        try:
            shutil.rmtree(run.path)
        except OSError as exc:
            raise TrainingError(
                f"cannot remove run {run.path}: {exc.strerror or exc}; check its permissions and try again"
            ) from None


def default_run_dir(library, name: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(library.runs_dir) / f"{name}-{stamp}-{os.getpid()}"
