"""Training: the Trainer protocol, TrainingConfig, the job, progress, and prepare/train/finish
(run folders and checkpoints: conceptlib.runs).

The core does everything that does not depend on a backend, so every trainer plugin behaves
the same: checks (before any model is built), the data (augmented images, prompts, noise and
timesteps, a pure function of the seed and the step), checkpoints, previews, progress, and
adding the finished concept to the library. A trainer plugin only builds the models and runs
the optimisation steps::

    class MyTrainer:
        name = "mine"; version = "1.0"; backend = "jax"   # KERAS_BACKEND to use
        def run(self, job: TrainingJob) -> TrainingResult: ...

Nothing here imports keras, TensorFlow or JAX at module import time.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import re
import sys
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from conceptlib.errors import CollisionError, ConceptlibError, PluginError, TrainingError, UsageError
# Run folders live in conceptlib.runs; these names are part of the training API too.
from conceptlib.runs import Checkpoint, RunDirectory, default_run_dir, find_run, run_summaries  # noqa: F401

LR_SCHEDULES = ("cosine", "constant", "stepped")
# ``TrainingConfig.weights`` value for models randomly initialised in memory (no files): for
# benchmarks and smoke runs; the concept is marked random_weights=true.
RANDOM_WEIGHTS = "random"
MAX_LOSS_HISTORY = 200  # points kept in the concept's metadata


@runtime_checkable
class Trainer(Protocol):
    """A training backend, registered under the ``conceptlib.trainers`` entry-point group.

    ``backend`` is the KERAS_BACKEND it needs (the CLI sets it before anything imports keras).
    ``run`` must: build the models for ``job.config`` (weights from ``job.weights``), start from
    ``job.initial_vectors(table)`` or ``job.load_checkpoint()``, and for each step in
    ``range(job.start_step, job.config.steps)`` train on ``job.batch(step)`` and then call
    ``job.step_done(step, loss)`` (which reports progress and, when due, saves a checkpoint and
    renders a preview through ``job.checkpoint_fn``/``job.preview_fn``), and return a
    TrainingResult whose preview is ``job.final_preview(render)`` (it reuses the last step's
    preview when one was rendered). ``job.stage(message)`` tells the user what happens before the
    first step (building models, compiling). Importing the class must be cheap: heavy imports
    happen inside ``run``.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    backend: ClassVar[str]

    def run(self, job: "TrainingJob") -> "TrainingResult": ...


# The largest --resolution (and generate --size): SD 1.x/2.x make sense up to about 1024 px.
MAX_RESOLUTION = 2048


@dataclass
class TrainingConfig:
    """Every setting of a training run (written to the run folder as config.json)."""

    images: str
    name: str
    token: str
    base_model: str | None = None  # sd-1 or sd-2; None: sd-1, or the init_from concept's
    weights: str | None = None
    trainer: str = "tensorflow"
    template: str = "object"
    init: list[str] = field(default_factory=list)  # init words; empty = random init
    # Start from this concept's vectors instead (a library name or token, or a concept file).
    init_from: str | None = None
    num_vectors: int | None = None  # None: 1, or as many as the init_from concept has
    resolution: int = 512
    steps: int = 1000
    batch_size: int = 1
    # Batches whose gradients are averaged into one update: the update of a batch of
    # batch_size * grad_accum samples with the memory of batch_size.
    grad_accum: int = 1
    learning_rate: float = 5e-3
    lr_schedule: str = "cosine"  # or "constant", or "stepped" (lr_steps)
    # "stepped": [[rate, until_step], ..., [rate, None]] (parse_learning_rate); learning_rate is its first rate
    lr_steps: list | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.004
    clip_norm: float = 10.0
    seed: int = 0
    flip: bool = True
    checkpoint_every: int = 100  # 0 = only at the end
    preview_every: int = 0  # 0 = no previews during training
    preview_steps: int = 10  # denoising steps of a preview
    preview_prompt: str | None = None  # holds the token; None: the template pack's first template
    run_dir: str | None = None
    # ModelSpec description keys for the finished concept, e.g. {"modelspec.author": "me"}.
    describe: dict = field(default_factory=dict)

    def validate(self) -> "TrainingConfig":
        """Raise UsageError (one line) for a setting of the wrong type or out of range."""
        from conceptlib.concept import validate_name, validate_token

        self._check_types()
        validate_name(self.name)
        validate_token(self.token)
        if self.base_model not in (None, "sd-1", "sd-2"):
            raise UsageError(f"unknown base model {self.base_model!r}; use sd-1 or sd-2")
        if self.resolution < 64 or self.resolution % 64 or self.resolution > MAX_RESOLUTION:
            raise UsageError(f"--resolution {self.resolution} is not a multiple of 64 from 64 to {MAX_RESOLUTION}; "
                             "use e.g. 512")
        if self.init and self.init_from:
            raise UsageError(
                f"--init {' '.join(self.init)} and --init-from {self.init_from} both give the starting vectors; use one"
            )
        for option, value, low in (
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--grad-accum", self.grad_accum, 1),
            ("--num-vectors", 1 if self.num_vectors is None else self.num_vectors, 1),
            ("--checkpoint-every", self.checkpoint_every, 0),
            ("--preview-every", self.preview_every, 0),
            ("--warmup-steps", self.warmup_steps, 0),
            ("--preview-steps", self.preview_steps, 1),
        ):
            if value < low:
                raise UsageError(f"{option} {value} must be at least {low}")
        # Far beyond any machine: refused now, not by an out-of-memory error after the models load.
        for option, value, high in (("--batch-size", self.batch_size, 1024), ("--grad-accum", self.grad_accum, 1024),
                                    ("--preview-steps", self.preview_steps, 1000)):
            if value > high:
                raise UsageError(f"{option} {value} is more than {high}, the most conceptlib takes")
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise UsageError(f"--warmup-steps {self.warmup_steps} leaves no step of the {self.steps}-step run after "
                             "the warm-up; use fewer warm-up steps")
        if self.num_vectors is not None and self.num_vectors > 75:
            raise UsageError(f"--num-vectors {self.num_vectors} is too many; a prompt holds at most 75 tokens")
        if not self.learning_rate > 0:
            raise UsageError(f"--lr {self.learning_rate} must be positive, e.g. 5e-3")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"unknown --lr-schedule {self.lr_schedule!r}; use {' or '.join(LR_SCHEDULES)}")
        self._validate_lr_steps()
        if self.warmup_steps and self.lr_schedule != "cosine":
            # Both trainers warm up only into the cosine decay; a silently ignored option is worse.
            raise UsageError(
                f"--warmup-steps {self.warmup_steps} works with the cosine schedule only; "
                "drop it or use --lr-schedule cosine"
            )
        if self.preview_prompt is not None and self.token not in self.preview_prompt.lower():
            raise UsageError(
                f"--preview-prompt {self.preview_prompt!r} does not contain the token {self.token}; "
                f"e.g. 'a watercolor painting of {self.token}'"
            )
        if not 0 <= self.seed < 2**32:
            raise UsageError(f"--seed {self.seed} must be between 0 and 2**32 - 1")
        from conceptlib.files import DESCRIPTIVE_KEYS

        unknown = sorted(set(self.describe) - set(DESCRIPTIVE_KEYS.values()))
        if unknown:
            raise UsageError(f"describe: {unknown[0]!r} is not one of {', '.join(DESCRIPTIVE_KEYS.values())}")
        return self

    def _check_types(self) -> None:
        """Python callers (and hand-edited config.json files) can pass anything: 2.5 steps or
        flip='no' must be refused here, not fail inside the trainer after the models are built."""
        def refuse(name: str, value, what: str):
            option = {"learning_rate": "--lr", "flip": "flip"}.get(name, f"--{name.replace('_', '-')}")
            raise UsageError(f"{option} {value!r} must be {what}")

        for name in ("resolution", "steps", "batch_size", "grad_accum", "warmup_steps", "seed", "checkpoint_every",
                     "preview_every", "preview_steps", "num_vectors"):
            value = getattr(self, name)
            if type(value) is not int and not (name == "num_vectors" and value is None):
                refuse(name, value, "a whole number")
        for name in ("learning_rate", "weight_decay", "clip_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                refuse(name, value, "a finite number, not negative")
        for name in ("images", "name", "token", "trainer", "template", "base_model", "weights", "init_from",
                     "preview_prompt", "run_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name not in ("images", "name", "token", "trainer",
                                                                                   "template")):
                refuse(name, value, "text")
        if not isinstance(self.flip, bool):
            refuse("flip", self.flip, "True or False")
        if not isinstance(self.init, list) or not all(isinstance(word, str) for word in self.init):
            refuse("init", self.init, "words (text)")
        if not isinstance(self.describe, dict) or not all(isinstance(v, str) for v in self.describe.values()):
            raise UsageError(f"description values {self.describe!r} must be text")

    def _validate_lr_steps(self) -> None:
        from conceptlib.kerascv.textual_inversion import MAX_LR_PIECES  # imports no keras

        if (self.lr_schedule == "stepped") != bool(self.lr_steps):
            raise UsageError("a stepped learning rate needs its steps: give --lr as 'RATE:STEP, ..., RATE'")
        if not self.lr_steps:
            return
        if len(self.lr_steps) > MAX_LR_PIECES:
            raise UsageError(f"--lr has {len(self.lr_steps)} rates; at most {MAX_LR_PIECES} are supported")
        last = self.lr_steps[-1][1]
        if last is not None and last < self.steps:
            text = format_learning_rate(self.lr_steps)
            raise UsageError(
                f"--lr {text!r} ends at step {last} but --steps is {self.steps}; add a last rate for the "
                f"remaining steps (e.g. '{text}, {self.lr_steps[-1][0]:g}') or use --steps {last}"
            )

    @property
    def samples_per_step(self) -> int:
        """Training samples behind one update: ``batch_size`` per pass, ``grad_accum`` passes."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def training_summary(self) -> dict:
        """The settings recorded in the concept's ``training`` metadata."""
        keys = (
            "steps", "batch_size", "grad_accum", "learning_rate", "lr_schedule", "lr_steps", "warmup_steps", "weight_decay",
            "clip_norm", "resolution", "template", "seed", "num_vectors", "flip", "base_model",
        )
        summary = {k: getattr(self, k) for k in keys}
        if Path(summary["template"]).is_absolute():
            # A template file (prepare made its path absolute): its name only, not the trainer's
            # folders, goes into files people share.
            summary["template"] = f"file:{Path(summary['template']).name}"
        return summary


def parse_learning_rate(text: str) -> tuple[float, list | None]:
    """``--lr``: a rate (``5e-3``), or AUTOMATIC1111's stepped rates ``"0.05:10, 0.005:200, 0.001"``
    (each rate until that step, the last one to the end; a step of -1 also means the end).
    Returns ``(first rate, lr_steps or None)``; raises UsageError naming the bad piece."""
    pieces = [piece.strip() for piece in str(text).split(",")]
    if len(pieces) == 1 and ":" not in pieces[0]:
        return _rate(pieces[0], text), None
    steps: list = []
    for index, piece in enumerate(pieces):
        rate_text, _, until_text = piece.partition(":")
        until = None
        if until_text.strip() and until_text.strip() != "-1":
            try:
                until = int(until_text)
            except ValueError:
                raise UsageError(f"--lr {text!r}: {piece!r} is not RATE:STEP (STEP a whole number)") from None
            previous = steps[-1][1] if steps else 0
            if until <= previous:
                raise UsageError(f"--lr {text!r}: step {until} must come after step {previous}; list the rates in order"
                                 if steps else f"--lr {text!r}: a rate's last step must be at least 1, not {until}")
        if until is None and index != len(pieces) - 1:
            raise UsageError(f"--lr {text!r}: only the last rate may go to the end; give {piece!r} a step (RATE:STEP)")
        steps.append([_rate(rate_text.strip(), text), until])
    return steps[0][0], steps


def _rate(value: str, text: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise UsageError(f"--lr {text!r}: {value!r} is not a number; give e.g. 5e-3 or '0.05:10, 0.005'") from None
    if not rate > 0 or rate == float("inf"):
        raise UsageError(f"--lr {text!r}: the rate {value} must be a positive number, e.g. 5e-3")
    return rate


def training_config(images, *, name: str, token: str, init=(), learning_rate="5e-3", lr_schedule: str | None = None,
                    trainer: str = "auto", **settings) -> TrainingConfig:
    """A TrainingConfig from `conceptlib train`'s options, as the CLI and ``conceptlib.train`` take
    them: ``init`` words (strings split on spaces and commas), ``learning_rate`` a rate or
    AUTOMATIC1111's stepped rates (``parse_learning_rate``), the schedule "cosine" by default
    ("stepped" for stepped rates), ``trainer="auto"`` as ``plugins.default_trainer``; ``settings``
    are the other TrainingConfig fields. Raises UsageError (one line) for a bad value."""
    rate, lr_steps = parse_learning_rate(learning_rate)
    if lr_steps and lr_schedule:
        raise UsageError(f"--lr-schedule {lr_schedule}: a stepped --lr is its own schedule; drop --lr-schedule")
    if trainer == "auto":
        from conceptlib.plugins import default_trainer

        trainer = default_trainer()
    words = [init] if isinstance(init, str) else [] if init is None else list(init) if isinstance(init, (list, tuple)) else None
    if words is None or not all(isinstance(word, str) for word in words):
        raise UsageError(f"--init {init!r} must be words: a string such as 'toy cat', or a list of them")
    empty = next((value for value in words if not re.sub(r"[\s,]+", "", value)), None)
    if empty is not None:
        raise UsageError(f"--init {empty!r} holds no word; give words such as 'cat', or leave --init out for "
                         "random starting vectors")
    return TrainingConfig(
        images=str(images), name=name, token=token, trainer=trainer,
        init=[word for value in words for word in re.split(r"[\s,]+", value) if word],
        learning_rate=rate, lr_steps=lr_steps, lr_schedule="stepped" if lr_steps else (lr_schedule or "cosine"),
        **settings,
    )


def format_learning_rate(lr_steps) -> str:
    """``lr_steps`` back in ``--lr``'s syntax."""
    return ", ".join(f"{rate:g}:{until}" if until is not None else f"{rate:g}" for rate, until in lr_steps)


@dataclass
class TrainingResult:
    """What a trainer returns: the final vectors, the per-step losses, and an optional preview
    image (uint8 (H, W, 3)) generated with the final vectors."""

    vectors: "object"
    losses: list[float]
    preview: "object | None" = None


class Progress:
    """A one-line progress report on stderr: step, loss, steps/s and ETA. Rewrites the line on a
    terminal; elsewhere prints a line every ~10 % of the run (and the first and last step)."""

    def __init__(self, total: int, start: int = 0, stream=None, enabled: bool = True, started: float | None = None):
        self.total = total
        self.start = start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.first_step_at: float | None = None
        self.started = time.perf_counter() if started is None else started
        self._line_open = False  # a terminal's step line not ended by a newline yet
        self._every = max(1, (total - start) // 10)

    @property
    def tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def end_line(self) -> None:
        """End a terminal's open step line, so that what is printed next starts a line."""
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def stage(self, message: str) -> None:
        """One line saying what the run does now (e.g. building models, compiling), prefixed with
        the time since the run started: the minute before a first step should not be silent."""
        if not self.enabled:
            return
        # On a terminal the step line has no newline yet; a stage line must not overwrite it.
        prefix = "\n" if self._line_open else ""
        self._line_open = False
        elapsed = _format_seconds(time.perf_counter() - self.started)
        print(f"{prefix}[{elapsed}] {message}", file=self.stream, flush=True)

    def update(self, step: int, loss: float) -> None:
        now = time.perf_counter()
        done = step + 1
        if self.first_step_at is None:
            self.first_step_at = now
        timed = done - self.start - 1  # the first step includes tracing/compilation
        if timed > 0:
            per_step = (now - self.first_step_at) / timed
            eta = _format_seconds(per_step * (self.total - done))
            rate = f"{per_step:.2f} s/step"
        else:
            eta, rate = "?", "first step"
        line = f"step {done}/{self.total}  loss {loss:.4f}  {rate}  ETA {eta}"
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + line.ljust(70) + ("\n" if done == self.total else ""))
            self.stream.flush()
            self._line_open = done != self.total
        elif done == self.start + 1 or done == self.total or (done - self.start) % self._every == 0:
            print(line, file=self.stream, flush=True)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _rng(seed: int, *stream: int):
    import numpy as np

    return np.random.default_rng([seed, *stream])


# Distinct RNG streams derived from the seed (so e.g. adding previews never changes the data).
_STREAM_STEP, _STREAM_EPOCH, _STREAM_INIT, _STREAM_PREVIEW = 0, 1, 2, 3


class TrainingJob:
    """One prepared run: checked inputs, the run folder, the data, and the callbacks a trainer
    uses. Built by ``prepare`` (all checks happen there, before any model is built)."""

    def __init__(self, config, trainer_cls, pack, images, tokenizer, init_ids, weights, run_dir, library, resume):
        self.config: TrainingConfig = config
        self.trainer_cls = trainer_cls
        self.trainer = None  # the trainer_cls instance that runs the job (made by prepare)
        self.pack = pack
        self.images = images
        self.tokenizer = tokenizer
        self.init_ids: list[int] = init_ids
        self.init_concept = None  # the Concept whose vectors the run starts from (--init-from)
        self.weights = weights  # resolve_weights dict
        self.run_dir: RunDirectory = run_dir
        self.library = library
        self.resume = resume
        self.vocab_size = len(tokenizer.encoder)
        self.new_ids = list(range(self.vocab_size, self.vocab_size + config.num_vectors))
        self.start_step = 0
        self.notes: list[str] = []  # printed before the run starts (CLI: on stderr)
        self.losses: list[float] = []
        self.progress = Progress(config.steps)
        self.timings: dict[str, float] = {"prepared": time.perf_counter()}
        self.longest_step_gap = 0.0  # seconds
        self._arrays: dict[int, object] = {}
        # Callbacks the trainer sets so the job can ask for a checkpoint / preview when due.
        self.checkpoint_fn = None  # () -> (vectors, [optimizer variable values]) after the step
        # (token_ids, latent_noise) -> uint8 (B, R, R, 3), or a Future of them: a trainer that
        # renders in the background returns at once and training goes on.
        self.preview_fn = None
        self._last_preview: tuple[int, object] | None = None  # (step, images) step_done rendered
        self._pending_previews: list[tuple[int, Future]] = []  # (step, Future) in step order
        self._checkpoint: Checkpoint | None = None  # read and checked by prepare when resuming

    def release_trainer(self) -> None:
        """Drop the trainer's checkpoint and preview callbacks once its run is over, and what
        only they held: its models and optimizer state (GBs for the preview models), which a
        caller that keeps the returned job, or trains again in the same process, must not keep
        alive."""
        self.checkpoint_fn = None
        self.preview_fn = None
        # Models sit in reference cycles (closures, Keras' layer graph) that Python's cycle
        # collector may not visit for a long time: its thresholds count objects, not bytes.
        gc.collect()

    # --- data -------------------------------------------------------------------------------

    def _image(self, index: int):
        if index not in self._arrays:
            from conceptlib.images import load_rgb

            self._arrays[index] = load_rgb(self.images[index].path, self.config.resolution)
        return self._arrays[index]

    def _image_index(self, position: int) -> int:
        count = len(self.images)
        epoch, offset = divmod(position, count)
        return int(_rng(self.config.seed, _STREAM_EPOCH, epoch).permutation(count)[offset])

    def prompt_ids(self, prompt: str) -> list[int]:
        from conceptlib.kerascv.textual_inversion import encode_prompt

        try:
            ids = encode_prompt(self.tokenizer, prompt, self.config.token, self.new_ids)
        except ValueError as exc:
            raise TrainingError(f"{exc}; shorten the caption or template, or use fewer --num-vectors") from None
        if int(self.new_ids[0]) not in ids:
            raise TrainingError(token_inside_a_word(prompt, self.config.token))
        return ids

    def batch(self, step: int) -> dict:
        """The batch for ``step`` as numpy arrays (see TextualInversion.loss): a pure function of
        the seed and the step, so a resumed run sees exactly the data an uninterrupted one does.
        It holds ``config.samples_per_step`` samples: with ``grad_accum`` > 1 the trainer runs it
        in that many equal parts, so the data is that of one batch of all of them."""
        import numpy as np

        from conceptlib.images import augment

        config = self.config
        count = config.samples_per_step
        rng = _rng(config.seed, _STREAM_STEP, step)
        size, latent = config.resolution, config.resolution // 8
        images, ids = [], []
        for j in range(count):
            index = self._image_index(step * count + j)
            image = self.images[index]
            images.append(augment(self._image(index), size, rng, flip=config.flip))
            template = int(rng.integers(0, 1 << 30))
            ids.append(self.prompt_ids(self.pack.render(template, config.token, image.caption)))
        shape = (count, latent, latent, 4)
        return {
            "images": np.stack(images).astype(np.float32),
            "token_ids": np.asarray(ids, dtype=np.int32),
            "posterior_noise": rng.standard_normal(shape, dtype=np.float32),
            "noise": rng.standard_normal(shape, dtype=np.float32),
            "timesteps": rng.integers(0, 1000, size=(count,)).astype(np.int32),
        }

    def initial_vectors(self, table):
        """Starting vectors: the init_from concept's, or from the frozen token table (init words
        spread over the vectors, or seeded random vectors)."""
        from conceptlib.kerascv.textual_inversion import initial_rows

        if self.init_concept is not None:
            import numpy as np

            return np.array(self.init_concept.vectors, dtype=np.float32)
        return initial_rows(table, self.init_ids, self.config.num_vectors, _rng(self.config.seed, _STREAM_INIT))

    def preview_inputs(self, count: int = 2):
        """Token ids and start noise for previews (fixed for the run, so previews compare)."""
        import numpy as np

        config = self.config
        prompt = config.preview_prompt or self.pack.render(0, config.token)
        ids = np.asarray([self.prompt_ids(prompt)] * count, dtype=np.int32)
        latent = config.resolution // 8
        noise = _rng(config.seed, _STREAM_PREVIEW).standard_normal((count, latent, latent, 4), dtype=np.float32)
        return ids, noise

    # --- checkpoints, previews, progress ----------------------------------------------------

    def load_checkpoint(self) -> Checkpoint | None:
        """The latest checkpoint when resuming (sets ``start_step`` and the loss history)."""
        if not self.resume:
            return None
        checkpoint = self._checkpoint or self.run_dir.load_checkpoint()
        if checkpoint is not None:
            self.start_step = checkpoint.step
            self.losses = list(checkpoint.losses)
            self.progress = Progress(
                self.config.steps, start=checkpoint.step, stream=self.progress.stream,
                enabled=self.progress.enabled, started=self.progress.started,
            )
        return checkpoint

    def stage(self, message: str) -> None:
        """Tell the user what the trainer does before (or between) steps, e.g. "compiling the
        training step": one line on stderr with the time since the run started (unless quiet)."""
        self.progress.stage(message)

    def step_done(self, step: int, loss: float) -> None:
        """Record ``loss`` for ``step`` (0-based), report progress, and checkpoint/preview when due."""
        self._write_rendered_previews()
        loss = float(loss)
        now = time.perf_counter()
        if "first_step" not in self.timings:
            self.timings["first_step"] = now
        else:  # the longest stall between two steps (e.g. waiting for a preview), for benchmarks
            self.longest_step_gap = max(self.longest_step_gap, now - self.timings["last_step"])
        self.losses.append(loss)
        self.progress.update(step, loss)
        done = step + 1
        every = self.config.checkpoint_every
        if self.checkpoint_fn is not None and every and done % every == 0 and done < self.config.steps:
            vectors, optimizer = self.checkpoint_fn()
            self.run_dir.save_checkpoint(Checkpoint(done, vectors, list(optimizer), list(self.losses)))
        every = self.config.preview_every
        if self.preview_fn is not None and every and done % every == 0:
            self.stage(f"rendering the preview of step {done}")
            images = self.preview_fn(*self.preview_inputs())
            self._pending_previews.append((done, images))
            self._write_rendered_previews(wait=not isinstance(images, Future))
        self.timings["last_step"] = time.perf_counter()

    def _write_rendered_previews(self, wait: bool = False) -> None:
        """Write the previews whose images are ready, in step order; with ``wait``, all of them
        (a background render's error is raised here, in the training thread)."""
        while self._pending_previews:
            done, images = self._pending_previews[0]
            if isinstance(images, Future):
                if not (wait or images.done()):
                    return
                images = images.result()
            self._pending_previews.pop(0)
            self._last_preview = (done, images)
            self.write_preview(done, images)

    def final_preview(self, render=None):
        """The preview of the final vectors as one grid image (uint8 (H, W, 3)) for
        ``TrainingResult.preview``, or None when the run makes no previews.

        Call it after the last ``step_done``; it first waits for the previews still rendering in
        the background and writes them. When ``preview_every`` divides ``steps``, step_done has
        just rendered the final vectors' preview: its images are reused rather than rendered
        again. Otherwise ``render`` (default: ``preview_fn``), a ``(token_ids, latent_noise) ->
        uint8 (B, R, R, 3)`` function, renders them.
        """
        from conceptlib.images import grid

        if not self.wants_previews:
            return None
        self._write_rendered_previews(wait=True)
        if self._last_preview is not None and self._last_preview[0] == self.config.steps:
            images = self._last_preview[1]
        else:
            render = render or self.preview_fn
            if render is None:
                raise TrainingError("no preview renderer: set job.preview_fn or pass render to final_preview")
            self.stage("rendering the preview of the final vectors")
            images = render(*self.preview_inputs())
            if isinstance(images, Future):
                images = images.result()
        return grid(images)

    def write_preview(self, step: int, images) -> Path:
        from conceptlib.images import grid, save_png

        return save_png(grid(images), self.run_dir.preview_path(step), fix=self.run_dir.write_fix)

    @property
    def random_weights(self) -> bool:
        """True for in-memory random weights or files written by `weights init-random`."""
        from conceptlib.weights import is_random

        return self.weights is None or is_random(self.weights)

    @property
    def wants_previews(self) -> bool:
        return self.config.preview_every > 0


def _start_trainer(trainer_cls, name: str):
    """``trainer_cls()``: a trainer checks its options and environment as it starts; an error
    that is not a ConceptlibError (a plugin's bug or missing dependency) is one line."""
    try:
        return trainer_cls()
    except ConceptlibError:
        raise
    except Exception as exc:
        from conceptlib.plugins import one_line

        raise PluginError(f"trainer plugin {name!r} could not start ({one_line(exc)}); run `conceptlib plugins` "
                          "or ask the plugin's author") from None


def _ensure_backend(backend: str) -> None:
    """Make KERAS_BACKEND match the trainer before keras is imported (or fail clearly)."""
    current = os.environ.get("KERAS_BACKEND")
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            from conceptlib.plugins import discover

            culprit = discover().keras_imported_by
            why = (f" (plugin {culprit} imported keras when it loaded; a plugin must import it only when it "
                   "runs: uninstall or fix it)") if culprit else ""
            raise TrainingError(
                f"keras is already running on the {keras.backend.backend()!r} backend but this trainer "
                f"needs {backend!r}{why}; start a new process with KERAS_BACKEND={backend}"
            )
    elif current and current != backend:
        raise TrainingError(
            f"KERAS_BACKEND={current} but the trainer needs {backend!r}; unset KERAS_BACKEND or set it to {backend}"
        )
    os.environ["KERAS_BACKEND"] = backend
    from conceptlib.kerascv import quiet_tensorflow_logs

    quiet_tensorflow_logs(backend)


def tokenize_init(tokenizer, words: list[str]) -> list[int]:
    """The token ids of the init words (without start/end), or TrainingError if a word gives none."""
    ids: list[int] = []
    for word in words:
        word_ids = tokenizer.encode(word)[1:-1]
        if not word_ids:
            raise TrainingError(
                f"--init word {word!r} tokenizes to nothing; use an ordinary word such as 'cat' or 'painting'"
            )
        ids.extend(word_ids)
    return ids


def split_init_words(tokenizer, words: list[str]) -> list[str]:
    """The init words CLIP reads as several pieces, each as "word (piece + piece)": a misspelt or
    unknown word starts the vectors from meaningless fragments, so the user should see them."""
    split = []
    for word in words:
        pieces = [tokenizer.decode([i]).strip() for i in tokenizer.encode(word)[1:-1]]
        if len(pieces) > 1:
            split.append(f"{word!r} ({' + '.join(pieces)})")
    return split


def token_in_vocabulary(tokenizer, token: str) -> bool:
    """True if ``token`` is already one CLIP token (a concept must not shadow a real word). The
    vocabulary spells each word's UTF-8 bytes as unicode ('café' is 'cafÃ©'), as apply looks it up."""
    entry = "".join(tokenizer.byte_encoder[byte] for byte in token.lower().encode("utf-8"))
    return entry in tokenizer.encoder or f"{entry}</w>" in tokenizer.encoder


def prepare(config: TrainingConfig | None, *, library=None, resume: str | Path | None = None) -> TrainingJob:
    """Check everything and set up the run folder; no model is built here.

    With ``resume`` the run's own config.json is used (``config`` is ignored), and the training
    images must be unchanged. The cheap checks (names, images, vocabulary, prompts, checkpoint)
    come before the weights, which may be downloaded.
    """
    from conceptlib import plugins
    from conceptlib.images import find_images
    from conceptlib.library import ConceptLibrary

    library = library if library is not None else ConceptLibrary()
    extra: dict = {}
    if resume is None and config is None:
        raise UsageError("nothing to train: give a TrainingConfig or a run folder to resume")
    if resume is not None:
        run_dir = find_run(resume, library)
        saved = run_dir.read()
        config = run_dir.read_config()
        config.run_dir = str(run_dir.path)
        if run_dir.concept_path.exists():
            raise TrainingError(f"run {run_dir.path} already finished (concept.safetensors exists); nothing to resume")
    config.validate()
    trainer_cls = plugins.get_trainer(config.trainer)
    notes: list[str] = []
    if resume is not None and saved.get("template_text") is not None:
        pack = _saved_template_pack(config.template, saved["template_text"], notes)
    else:
        pack = plugins.get_template_pack(config.template)
    _ensure_backend(trainer_cls.backend)
    if resume is None:
        library.check_available(config.name, config.token)
        run_dir = _new_run_dir(config, library)
        start = _starting_concept(config, library) if config.init_from else None
    else:
        _check_resumable(run_dir, config, library)
        start = run_dir.load_init() if config.init_from else None
    if config.num_vectors is None:
        config.num_vectors = 1
    if config.base_model is None:
        config.base_model = "sd-1"
    images = find_images(config.images)
    hashes = [image.sha256 for image in images]
    if resume is not None and saved.get("image_sha256") and saved["image_sha256"] != hashes:
        raise TrainingError(
            f"the images in {config.images} changed since run {run_dir.path} started; restore them or start a new run"
        )
    captions = [image.caption for image in images]
    if resume is not None and isinstance(saved.get("captions"), list) and saved["captions"] != captions:
        changed = [image.path.name for image, before in zip(images, saved["captions"]) if image.caption != before]
        raise TrainingError(
            f"the captions of {len(changed)} image(s) changed since run {run_dir.path} started "
            f"({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}), so the rest of the run would train on "
            "other prompts; restore them or start a new run"
        )
    # Pure Python, same ids as keras-cv's SimpleTokenizer: tokenizing prompts must not import
    # keras-cv (and TensorFlow) before the trainer needs it.
    from conceptlib.kerascv.tokenizer import make_clip_tokenizer

    tokenizer = make_clip_tokenizer()
    if token_in_vocabulary(tokenizer, config.token):
        raise TrainingError(
            f"token {config.token!r} is already a word of the CLIP vocabulary; pick an unused one such as '<{config.name}>'"
        )
    init_ids = tokenize_init(tokenizer, config.init)
    job = TrainingJob(config, trainer_cls, pack, images, tokenizer, init_ids, None, run_dir, library, resume is not None)
    job.init_concept = start
    job.notes = notes
    # Every prompt must fit: render each template/caption once now rather than fail mid-run.
    if config.preview_prompt is not None:
        from conceptlib.kerascv.textual_inversion import encode_prompt

        try:
            ids = encode_prompt(tokenizer, config.preview_prompt, config.token, job.new_ids)
        except ValueError as exc:
            raise UsageError(f"--preview-prompt: {exc}; shorten it") from None
        if int(job.new_ids[0]) not in ids:
            raise UsageError(f"--preview-prompt: {token_inside_a_word(config.preview_prompt, config.token)}")
    for image in images:
        for index in range(pack.count(image.caption)):
            try:
                job.prompt_ids(pack.render(index, config.token, image.caption))
            except TrainingError as exc:
                source = f"{image.caption_source}: " if image.caption else f"template pack {pack.name!r}: "
                raise TrainingError(f"{source}{exc}") from None
    if resume is not None:
        job._checkpoint = _checked_checkpoint(run_dir, config)
    job.weights = _weights(config)
    job.trainer = _start_trainer(trainer_cls, config.trainer)  # its own checks before a run folder exists
    if resume is None:
        # Absolute paths, so `--resume` works from any working directory.
        config.images = str(Path(config.images).resolve())
        if pack.name.startswith("file:"):
            config.template = pack.source  # the file's absolute path
        if config.weights not in (None, RANDOM_WEIGHTS):
            config.weights = str(Path(config.weights).expanduser().resolve())
        config.run_dir = str(run_dir.path)
        extra = {
            "image_sha256": hashes, "captions": captions, "init_ids": init_ids,
            "init_tokens": _init_tokens(tokenizer, init_ids), "random_weights": job.random_weights,
            "trainer_version": str(getattr(trainer_cls, "version", "?")),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
        }
        if pack.text is not None:  # a template file: --resume trains with these lines, whatever the file becomes
            extra["template_text"] = pack.text
        try:
            run_dir.create(config, extra, start)
        except OSError as exc:
            raise TrainingError(
                f"cannot create the run folder {run_dir.path} ({exc.strerror or exc}); pick another --run-dir"
            ) from None
    return job


def _starting_concept(config: TrainingConfig, library):
    """The concept ``--init-from`` names (Concept refuses NaN/Inf vectors), checked against the
    run: the base model's width and --num-vectors (each taken from the concept when left out)."""
    import numpy as np

    from conceptlib.concept import DIMS, Concept
    from conceptlib.kerascv.apply import resolve_concepts

    ref = config.init_from
    concepts = resolve_concepts([ref], library)
    if len(concepts) != 1:
        raise TrainingError(f"--init-from {ref} holds {len(concepts)} concepts; give one (a library name or token, or one file)")
    concept = concepts[0]
    vectors = np.asarray(concept.vectors, dtype=np.float32)
    count, dim = vectors.shape
    model = next(base for base, width in DIMS.items() if width == dim)  # Concept refuses other widths
    if config.base_model is None:
        config.base_model = model
    elif config.base_model != model:
        raise TrainingError(
            f"--init-from {ref}: its vectors are {dim} wide ({model}), but {config.base_model} needs "
            f"{DIMS[config.base_model]}; train with --base-model {model}, or leave --base-model out"
        )
    if config.num_vectors is None:
        config.num_vectors = count
    elif config.num_vectors != count:
        raise UsageError(
            f"--num-vectors {config.num_vectors} does not match the {count} vector(s) of --init-from {ref}; "
            "leave --num-vectors out"
        )
    if count > 75:
        raise TrainingError(f"--init-from {ref} has {count} vectors; a prompt holds at most 75 tokens")
    with contextlib.suppress(RuntimeError):  # '~cat', a valid token, names no user's home
        if Path(ref).expanduser().is_file():
            config.init_from = str(Path(ref).expanduser().resolve())  # so the run's config.json says which file
    return Concept(concept.name, concept.token, vectors, concept.metadata)


def init_record(concept) -> dict:
    """What a concept trained --init-from another records about it (its ``init_from`` metadata)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(np.ascontiguousarray(concept.vectors, dtype="<f4").tobytes()).hexdigest()
    return {"name": concept.name, "token": concept.token, "vectors_sha256": digest}


def token_inside_a_word(prompt: str, token: str) -> str:
    """Why ``prompt`` holds no ``token`` although its text contains it: a bare token counts only as
    a whole word (as when generating), so training on that prompt would not train the concept."""
    return (f"prompt {prompt!r} has {token!r} only inside a longer word, where it is not the concept (a bare "
            f"token counts only as a whole word); make it a word of its own (e.g. '[name] dolls', not '[name]s'), "
            f"or use a token such as '<{token}>'")


def _new_run_dir(config: TrainingConfig, library) -> RunDirectory:
    """The (not yet created) folder of a new run: --run-dir, or a new folder in the runs folder.
    The library's own folders are refused (its root, its concepts folder or anything in it, the
    runs folder itself): the run's concept.safetensors and checkpoints must never mix with the
    library's files."""
    given = config.run_dir
    path = Path(given).expanduser().resolve() if given else default_run_dir(library, config.name).resolve()
    root, runs = Path(library.root).expanduser().resolve(), Path(library.runs_dir).expanduser().resolve()
    concepts = Path(library.concepts_dir).expanduser().resolve()
    if path in (root, runs, concepts) or concepts in path.parents:
        raise UsageError(
            f"--run-dir {given} is inside the concept library {root}; give a folder outside it, "
            f"a new folder in {runs}, or leave --run-dir out"
        )
    run_dir = RunDirectory(path)
    if run_dir.exists():
        raise TrainingError(f"{run_dir.path} already holds a run; resume it with --resume {run_dir.path} or pick another --run-dir")
    # Checked now, cheaply, not when the folder is made: that comes after the weights are found
    # (or downloaded), minutes later.
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), None)
    if existing is not None and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        why = "is not a folder" if not existing.is_dir() else "is not writable"
        raise TrainingError(f"cannot create the run folder {path}: {existing} {why}; pick another --run-dir")
    return run_dir


def _check_resumable(run_dir: RunDirectory, config: TrainingConfig, library) -> None:
    """A resumed run's name, token, images and weights folder come from its config.json, not from
    the command line: say how to fix each with that in mind (--name, IMAGES, --weights are refused with it)."""
    from conceptlib.library import NameTakenError, TokenTakenError

    try:
        library.check_available(config.name, config.token)
    except NameTakenError as exc:
        raise NameTakenError(
            exc.name, f"run {run_dir.path} trains it; rename that concept (`conceptlib rename {exc.name} NEW`) "
            "or remove it, then resume"
        ) from None
    except TokenTakenError as exc:
        raise TokenTakenError(
            exc.token, exc.owner, f"run {run_dir.path} trains it; give that concept another token "
            f"(`conceptlib rename {exc.owner} {exc.owner} --token NEW`) or remove it, then resume"
        ) from None
    for key, path in (("images", config.images), ("weights", config.weights)):
        if path not in (None, RANDOM_WEIGHTS) and not Path(path).exists():
            raise TrainingError(
                f"the {key} of run {run_dir.path} were in {path}, which does not exist here; put them back "
                f"or set \"{key}\" in the \"config\" object of {run_dir.config_path} to where they are now"
            )


def _check_still_resumable(job: TrainingJob) -> None:
    """Once the run's lock is held: another process may have finished the run, or trained it
    further, between ``prepare``'s checks and now; continue from where it really is."""
    if job.run_dir.concept_path.exists():
        raise TrainingError(f"run {job.run_dir.path} already finished (concept.safetensors exists; another process "
                            "finished it just now); nothing to resume")
    job._checkpoint = _checked_checkpoint(job.run_dir, job.config)


def _checked_checkpoint(run_dir: RunDirectory, config: TrainingConfig) -> Checkpoint | None:
    """The checkpoint a resumed run continues from, read and checked now, before any model is built."""
    from conceptlib.concept import DIMS

    path = run_dir.latest_checkpoint()
    checkpoint = run_dir.load_checkpoint(path)
    if checkpoint is None:
        return None
    shape = tuple(getattr(checkpoint.vectors, "shape", ()))
    expected = (config.num_vectors, DIMS[config.base_model])
    if shape != expected or not 0 < checkpoint.step < config.steps:
        raise TrainingError(
            f"{path}: checkpoint of step {checkpoint.step} with vectors {shape} does not fit this run "
            f"({config.steps} steps, vectors {expected}); delete it to resume from an earlier one"
        )
    return checkpoint


def _weights(config: TrainingConfig):
    """``resolve_weights`` for the run (None: random weights in memory)."""
    from conceptlib.weights import prefetch as prefetch_weights
    from conceptlib.weights import resolve_weights

    if config.weights == RANDOM_WEIGHTS:
        return None  # randomly initialised in memory: benchmarks and smoke runs only
    parts = ["text_encoder", "diffusion_model", "image_encoder"] + (["decoder"] if config.preview_every else [])
    weights = resolve_weights(config.base_model, config.weights, parts)
    prefetch_weights(weights)
    return weights


def finish(job: TrainingJob, result: TrainingResult, *, trainer_version: str):
    """Write the concept (run folder + library) with the full metadata of contract 1."""
    import numpy as np

    from conceptlib.concept import Concept
    from conceptlib.files import write_concept
    from conceptlib.images import load_rgb

    config = job.config
    if result.preview is not None:
        preview, source = np.asarray(result.preview, dtype=np.uint8), "generated"
    else:
        preview, source = load_rgb(job.images[0].path, 128), "training-image"
    metadata = trained_metadata(
        config, result.losses, init_tokens=_init_tokens(job.tokenizer, job.init_ids), init_concept=job.init_concept,
        image_sha256=[image.sha256 for image in job.images], random_weights=job.random_weights,
        preview=preview, preview_source=source, trainer_version=trainer_version,
    )
    concept = Concept(config.name, config.token, np.asarray(result.vectors, dtype=np.float32), metadata)
    write_concept(concept, job.run_dir.concept_path)
    try:
        return job.library.add(concept)
    except ConceptlibError as exc:
        taken = isinstance(exc, CollisionError)
        add = (f"conceptlib import {job.run_dir.concept_path} --name NEW --token NEW" if taken
               else f"conceptlib import {job.run_dir.concept_path}")
        raise TrainingError(f"{exc} (the trained concept is saved in the run folder; once that is fixed, add it "
                            f"with `{add}`)") from None


def trained_metadata(
    config: TrainingConfig, losses, *, init_tokens: list[str], init_concept, image_sha256: list[str],
    random_weights: bool, preview, preview_source: str, trainer_version: str,
) -> dict[str, str]:
    """The training part of a concept's metadata (contract 1) after ``losses`` (one per step);
    ``preview`` is a uint8 (H, W, 3) image or None."""
    import numpy as np

    from conceptlib.images import thumbnail_png

    losses = [float(x) for x in losses]
    if len(losses) > MAX_LOSS_HISTORY:
        # Keep an evenly spaced summary (always the first and last step).
        picks = np.unique(np.linspace(0, len(losses) - 1, MAX_LOSS_HISTORY).round().astype(int))
        history = [[int(i) + 1, round(losses[i], 6)] for i in picks]
    else:
        history = [[i + 1, round(loss, 6)] for i, loss in enumerate(losses)]
    metadata = {
        "init_tokens": json.dumps(init_tokens),
        "init_words": json.dumps(config.init),
        **({"init_from": json.dumps(init_record(init_concept))} if init_concept is not None else {}),
        "trainer": config.trainer,
        "trainer_version": trainer_version,
        "training": json.dumps(config.training_summary(), sort_keys=True),
        "final_loss": f"{losses[-1]:.6f}" if losses else "",
        "loss_history": json.dumps(history),
        "image_sha256": json.dumps(image_sha256),
        "random_weights": "true" if random_weights else "false",
        "created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if preview is not None:
        metadata["preview"] = base64.b64encode(thumbnail_png(preview)).decode("ascii")
        metadata["preview_source"] = preview_source
    metadata.update({key: value for key, value in config.describe.items() if value})
    return metadata


def _init_tokens(tokenizer, init_ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]).strip() for i in init_ids]


def _saved_template_pack(path: str, text: str, notes: list[str]):
    """The template file's pack as the run saved it when it started; a note if the file has
    changed (or gone) since."""
    from conceptlib.templates import pack_from_text

    try:
        current = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        current = None
    if current != text:
        notes.append(
            f"Note: the template file {path} {'is gone' if current is None else 'has changed'} since the run "
            "started; resuming with the templates it had then (start a new run to use the file as it is now)"
        )
    return pack_from_text(Path(path), text)


def _announce(job: TrainingJob, *, informational: bool = True) -> None:
    """The lines on stderr before a CLI run: random weights, the run folder (``informational``:
    not with -q), notes such as split --init words (warnings and notes always)."""
    if job.random_weights:
        print(
            "WARNING: training with RANDOM weights (from `conceptlib weights init-random`): this "
            "is a smoke run, the concept will be meaningless.",
            file=sys.stderr,
        )
    if informational:
        verb = "Resuming" if job.resume else "Training"
        print(
            f"{verb} {job.config.name} ({job.config.token}) with trainer {job.config.trainer} on "
            f"{len(job.images)} image(s); run folder {job.run_dir.path} (continue it with --resume)",
            file=sys.stderr,
            flush=True,
        )
    for note in job.notes:
        print(note, file=sys.stderr)
    start = job.init_concept
    if start is not None:
        print(f"Starting from the {len(start.vectors)} vector(s) of {start.name} ({start.token})", file=sys.stderr)
    split = split_init_words(job.tokenizer, job.config.init)
    if split:
        print(
            f"Note: CLIP has no single token for --init {', '.join(split)}; the vectors start from "
            "those pieces (use a common word instead if that is not what you meant)",
            file=sys.stderr,
        )


def train(
    config: TrainingConfig | None,
    *,
    library=None,
    resume: str | Path | None = None,
    progress: bool = True,
    announce: bool = False,
):
    """Prepare, run the trainer plugin, and add the concept to the library. Returns
    (ConceptHeader, TrainingJob). ``announce`` prints warnings and notes (random weights, split
    --init words) on stderr, and with ``progress`` also the run folder."""
    from conceptlib.interrupts import reliable_ctrl_c

    job = prepare(config, library=library, resume=resume)
    job.progress.enabled = progress
    # Held until the concept is in the library: nobody else may train (resume) this run meanwhile.
    with job.run_dir.hold():
        if job.resume:
            _check_still_resumable(job)
        if announce:
            _announce(job, informational=progress)
        trainer = job.trainer or job.trainer_cls()
        try:
            with reliable_ctrl_c():  # for Python callers too, not only the CLI
                result = trainer.run(job)
        except KeyboardInterrupt as exc:
            job.progress.end_line()
            print(f"Interrupted. {_continue_hint(job)}", file=sys.stderr)
            _clear_trainer_frames(exc)
            raise
        except ConceptlibError as exc:  # a full disk, weights gone: the run itself can go on
            job.progress.end_line()
            _clear_trainer_frames(exc)
            hint = f"Once that is fixed, the run can go on. {_continue_hint(job)}"
            exc.__notes__ = [*getattr(exc, "__notes__", []), hint]  # add_note(), which Python 3.10 lacks
            raise
        finally:
            job.release_trainer()
        header = finish(job, result, trainer_version=str(getattr(trainer, "version", "?")))
    return header, job


def _clear_trainer_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames ``exc`` passed through (the trainer's): a
    notebook keeps the last traceback, and with it the trainer's models, for as long as it runs.
    Kept only for these expected stops (Ctrl-C, ConceptlibError); a bug keeps its frames whole
    for debugging."""
    traceback.clear_frames(exc.__traceback__)  # skips the frames still running (this one's caller)


def _continue_hint(job: TrainingJob) -> str:
    last = job.run_dir.latest_checkpoint()
    where = f"from {last.name}" if last else "from the start (no checkpoint yet)"
    return f"Continue {where} with: conceptlib train --resume {job.run_dir.path}"
