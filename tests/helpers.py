"""Helpers shared by test files. Importable both under pytest and from the worker scripts the tests
start as subprocesses (``python tests/test_x.py``): either way tests/ is on sys.path."""

from __future__ import annotations


def in_child(fn, *args):
    """``fn(*args)`` in a fresh (spawned) Python process; its result comes back pickled, an
    exception it raises is raised here. For tests that hold full-size Stable Diffusion models:
    what such a model allocated stays in the heap of the process that built it (glibc keeps freed
    memory fragmented in its arenas), and the suite shares one 23 GB machine with its workers."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def convert_in_a_process(source, dest):
    """`conceptlib weights convert SOURCE DEST` as the real CLI process (its models stay out of
    the test process); the CompletedProcess, output as text."""
    import os
    import subprocess
    import sys

    from conceptlib import weights

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop(weights.ENV_VAR, None)
    return subprocess.run(
        [sys.executable, "-m", "conceptlib", "weights", "convert", str(source), str(dest)],
        capture_output=True, text=True, env=env, timeout=900,
    )


class Interrupted(Exception):
    """Raised inside a run that ``run_interrupted`` stops."""


def run_interrupted(job, after_step: int) -> int | None:
    """Run ``job``'s trainer, stopping it right after ``job.step_done`` of step ``after_step``
    (1-based; so that step's checkpoint, when due, is written), as a Ctrl-C there would.

    Returns ``after_step`` if the run stopped there, None if it finished first.
    """
    original = job.step_done

    def step_done(index, loss):
        original(index, loss)
        if index + 1 == after_step:
            raise Interrupted()

    job.step_done = step_done
    try:
        job.trainer_cls().run(job)
    except Interrupted:
        return after_step
    finally:
        del job.step_done  # the class's own method again
        job.release_trainer()  # as conceptlib.training.train does when a run stops
    return None


_IMPORT_PROBE = """
import json, sys
from conceptlib.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in ("tensorflow", "keras", "keras_cv", "jax", "torch", "numpy") if m in sys.modules)
print("PROBE", json.dumps({"imported": heavy, "code": code}), file=sys.stderr)
"""


def cli_imports(args, env=None):
    """Run ``conceptlib ARGS`` in a fresh Python process (``env``: its environment) and return
    ``(exit code, the heavy modules it imported, the process)``: which of tensorflow, keras,
    keras_cv, jax, torch and numpy were in ``sys.modules`` when the command ended."""
    import json
    import subprocess
    import sys

    process = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *args], env=env, capture_output=True,
                             text=True, timeout=120)
    last = process.stderr.strip().splitlines()[-1] if process.stderr.strip() else ""
    assert last.startswith("PROBE "), process.stderr
    probe = json.loads(last[len("PROBE "):])
    return probe["code"], probe["imported"], process


def interrupt_when_ready(cmd, env, ready, what: str):
    """Start ``cmd`` in a session of its own, send SIGINT to its process group (as a terminal's
    Ctrl-C does) once ``ready()`` returns something (polled; the test fails if the process ends
    first: ``what`` names what it should have reached), and return ``(what ready() returned,
    exit code, stdout, stderr)``."""
    import os
    import signal
    import subprocess
    import time

    import pytest

    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a bound for a hung process, not a speed requirement
        while not (found := ready()):
            if process.poll() is not None:
                pytest.fail(f"the process ended (exit {process.returncode}) before {what}: {process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the process did not reach {what}")
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return found, process.returncode, stdout, stderr


def deterministic_weights(models, seed: int, *, only_1d: bool = False) -> None:
    """Overwrite the variables of ``models`` (Keras models, in order) with values that depend only
    on ``seed``, the variable's position among all of them, and its shape, so two processes (two
    backends) hold identical weights without writing files.

    Kernels (2-D and up) get N(0, 1/fan-in); 1-D (and 0-D) variables get non-trivial values:
    norm scales (gamma) ``1 + 0.1·n``, everything else (beta, biases) ``0.1·n``. Keras' default
    initialisers (and ``weights init-random`` files) leave every bias and beta at 0 and every
    gamma at 1, which makes ``+ bias`` / ``* gamma`` / ``+ beta`` identities that a comparison
    cannot see. ``only_1d=True`` sets only those variables (cheap: a few million values) and
    keeps the kernels the model already has; a variable gets the same value either way."""
    import numpy as np

    index = 0
    for model in models:
        for variable in model.weights:
            shape = tuple(variable.shape)
            if only_1d and len(shape) >= 2:
                index += 1
                continue
            noise = np.random.default_rng([seed, index]).standard_normal(shape, dtype=np.float32)
            if len(shape) >= 2:
                value = noise / np.sqrt(float(np.prod(shape[:-1])))
            elif "gamma" in variable.path or "scale" in variable.path:
                value = 1.0 + 0.1 * noise
            else:
                value = 0.1 * noise
            variable.assign(value.astype(np.float32))
            index += 1


def trivial_1d_weights(models) -> list[str]:
    """The paths of the 1-D variables of ``models`` that are all 0 or all 1 (identities of a
    bias add or a norm's scale/shift): what ``deterministic_weights`` leaves none of."""
    import keras
    import numpy as np

    found = []
    for model in models:
        for variable in model.weights:
            if len(variable.shape) == 1:
                value = keras.ops.convert_to_numpy(variable.value)
                if np.all(value == 0) or np.all(value == 1):
                    found.append(variable.path)
    return found


def png_pixels(source):
    """The RGB pixels, as a uint8 (height, width, 3) array, of a PNG file (a path) or of PNG bytes;
    fails the test if it is not a PNG."""
    import io

    import numpy as np
    from PIL import Image

    data = source if isinstance(source, bytes) else open(source, "rb").read()
    assert data.startswith(b"\x89PNG"), f"not a PNG: {data[:16]!r}"
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def is_flat(pixels) -> bool:
    """True when an image is one colour everywhere (a blank or failed render)."""
    import numpy as np

    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) == 1
