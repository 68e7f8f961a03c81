"""The jax trainer's step takes what varies between runs as arguments, not constants: the
learning-rate schedule's numbers (``ScheduleFromArguments``) and the data padded to power-of-two
row counts (``bucket``), and the new vectors padded likewise (``vector_rows``). So one compiled
(and exported) step serves any ``--steps``, ``--learning-rate``, ``--warmup-steps``, number of
images and, within a power of two, ``--num-vectors``; these tests check that it still computes
exactly what the reference does.

The reference is ``make_optimizer``'s keras Adam with keras' CosineDecay, as the TensorFlow
trainer uses it; the jax side needs a process whose Keras backend is jax, so the comparisons run
in a worker subprocess (this file run as a script) and the tests assert on its report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conceptlib_jax.step import bucket

CASES = {
    # name: (schedule, learning rate, steps, warmup steps[, stepped rates])
    "cosine": ("cosine", 5e-3, 6, 0),
    "cosine-warmup": ("cosine", 2e-3, 7, 3),
    "constant": ("constant", 1e-3, 6, 0),
    "stepped": ("stepped", 5e-2, 7, 0, [[5e-2, 2], [1e-2, 5], [2e-3, None]]),
    "stepped-other": ("stepped", 3e-2, 6, 0, [[3e-2, 4], [1e-3, 9]]),
}
# --lr '0.05:2, 0.01:5, 0.002' as AUTOMATIC1111 reads it: 0.05 for the first 2 updates, 0.01
# until step 5, then 0.002.
STEPPED_RATES = [0.05, 0.05, 0.01, 0.01, 0.01, 0.002, 0.002, 0.002]


def _run_worker(out, backend: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("schedule") / "report.json", "jax")


def _keras_backend_here() -> str | None:
    """The Keras backend of this (the pytest) process if something already imported keras, as
    the whole suite does while collecting; None otherwise. Importing it here would fix the
    process's backend for every later test, so it is only looked at, never imported."""
    keras = sys.modules.get("keras")
    return keras.backend.backend() if keras is not None else None


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_stepped_learning_rate_applies_each_rate_for_its_steps(report, backend, tmp_path):
    """Adam's update for a constant gradient is the learning rate itself (bias-corrected m / sqrt(v)
    is 1): each update's size shows the rate each trainer's optimizer applied."""
    if backend == "jax":
        rates = report["applied_rates"]
    elif _keras_backend_here() == "tensorflow":
        rates = _applied_rates()  # eight optimizer.apply on a 1x4 variable: no process needed
    else:
        rates = _run_worker(tmp_path / "tf.json", "tensorflow")["applied_rates"]
    assert rates == pytest.approx(STEPPED_RATES, rel=1e-4)  # float32 Adam


def test_bucket_is_the_next_power_of_two():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 80, 128, 129)] == [1, 2, 4, 4, 8, 8, 16, 128, 128, 256]


@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_from_arguments_trains_exactly_like_make_optimizer(report, case):
    """Vectors and Adam's state after every step (past the end of the decay too) are bit-identical
    to the keras schedule object's, and the optimizer's variables are the same list, so
    checkpoints of both are interchangeable."""
    result = report["cases"][case]
    assert result["variables"] == result["reference_variables"]
    assert result["steps_compared"] == CASES[case][2] + 2
    assert result["max_abs_difference"] == 0.0


def test_one_compiled_step_serves_other_steps_and_learning_rates(report):
    # Both cosine cases ran through ONE jitted function: the schedule is its argument; so did
    # both stepped ones (their rates and steps are fixed-size arguments).
    assert report["cosine_compilations"] == 1
    assert report["stepped_compilations"] == 1


def test_padded_vector_rows_update_the_real_rows_exactly_as_unpadded(report):
    """3 vectors trained as 4 rows (the 4th never in a prompt: zero gradient): after every step
    the 3 real rows and their Adam state equal an unpadded optimizer's, with weight decay and the
    global-norm clip active; the padding row stays zero."""
    padded = report["padded_vectors"]
    assert padded["rows"] == [3, 4] and padded["clipped_steps"] > 0
    assert padded["max_abs_difference"] == 0.0
    assert padded["padding_row_max_abs"] == 0.0


def test_padded_data_draws_the_same_batches(report):
    """Padding rows (variants never drawn, repeated prompts) changes no drawn batch."""
    assert report["padded_rows"] == [8, 4, 16]  # variants 6 -> 8, images 3 -> 4, templates 9 -> 16
    assert report["batch_differences"] == [0.0, 0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Worker: python tests/test_jax_schedule.py OUT.json (KERAS_BACKEND=jax)


def _adam_runs(case, fn_cache):
    import types

    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from conceptlib.kerascv.textual_inversion import make_optimizer
    from conceptlib_jax.step import schedule_arguments, step_optimizer

    schedule, learning_rate, steps, warmup, *stepped = CASES[case]
    lr_steps = stepped[0] if stepped else None
    config = types.SimpleNamespace(
        learning_rate=learning_rate, steps=steps, lr_schedule=schedule, warmup_steps=warmup,
        weight_decay=0.004, clip_norm=10.0, lr_steps=lr_steps,
    )
    rng = np.random.default_rng(7)
    start = rng.standard_normal((2, 16)).astype(np.float32)
    grads = [rng.standard_normal((2, 16)).astype(np.float32) * 3 for _ in range(steps + 2)]

    reference = make_optimizer(learning_rate, steps, schedule=schedule, warmup_steps=warmup, lr_steps=lr_steps)
    reference.build([keras.Variable(start)])

    @jax.jit
    def reference_step(opt_values, rows, grad):
        (rows,), opt_values = reference.stateless_apply(opt_values, [grad], [rows])
        return opt_values, rows

    optimizer, rate = step_optimizer(config)
    optimizer.build([keras.Variable(start)])
    if schedule not in fn_cache:

        @jax.jit
        def candidate_step(opt_values, rows, grad, values):
            if rate is not None:
                rate.bind(values)
            (rows,), opt_values = optimizer.stateless_apply(opt_values, [grad], [rows])
            return opt_values, rows

        fn_cache[schedule] = (candidate_step, optimizer, rate)
    candidate_step, traced_optimizer, traced_rate = fn_cache[schedule]
    values = schedule_arguments(learning_rate, steps, warmup, lr_steps)

    ref_opt = [jnp.asarray(v.value) for v in reference.variables]
    opt = [jnp.asarray(v.value) for v in optimizer.variables]
    ref_rows = rows = jnp.asarray(start)
    worst = 0.0
    for grad in grads:
        ref_opt, ref_rows = reference_step(ref_opt, ref_rows, grad)
        opt, rows = candidate_step(opt, rows, grad, values)
        pairs = [(ref_rows, rows)] + list(zip(ref_opt, opt))
        worst = max([worst] + [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                               for a, b in pairs])
    return {
        "max_abs_difference": worst, "steps_compared": len(grads),
        "variables": _variable_kinds(optimizer), "reference_variables": _variable_kinds(reference),
    }


def _padded_vector_rows():
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    from conceptlib.kerascv.textual_inversion import make_optimizer
    from conceptlib_jax.trainer import pad_rows, vector_rows

    rows = [3, vector_rows(3)]
    rng = np.random.default_rng(5)
    start = rng.standard_normal((3, 16)).astype(np.float32)
    # Large enough for the global-norm clip (10) to act on some steps, small on others.
    grads = [rng.standard_normal((3, 16)).astype(np.float32) * scale for scale in (4, 0.1, 3, 0.2, 5, 0.1)]

    def run(count):
        optimizer = make_optimizer(5e-3, 6, weight_decay=0.004, clip_norm=10.0)
        optimizer.build([keras.Variable(pad_rows(start, count))])

        @jax.jit
        def step(opt_values, values, grad):
            (values,), opt_values = optimizer.stateless_apply(opt_values, [grad], [values])
            return opt_values, values

        opt, values, history = [jnp.asarray(v.value) for v in optimizer.variables], jnp.asarray(pad_rows(start, count)), []
        for grad in grads:
            opt, values = step(opt, values, jnp.asarray(pad_rows(grad, count)))
            history.append([np.asarray(values)] + [np.asarray(v) for v in opt])
        return history

    plain, padded = run(rows[0]), run(rows[1])
    worst = padding = 0.0
    for a_step, b_step in zip(plain, padded):
        for a, b in zip(a_step, b_step):
            if b.shape != a.shape:  # the rows and Adam's moments: compare the real rows
                padding = max(padding, float(np.max(np.abs(b[3:]))))
                b = b[:3]
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    clipped = sum(float(np.linalg.norm(g)) > 10.0 for g in grads)
    return {"rows": rows, "max_abs_difference": worst, "padding_row_max_abs": padding, "clipped_steps": clipped}


def _variable_kinds(optimizer):
    """["iteration", "learning_rate", "momentum", "velocity"]-like: the variables without the
    names' per-instance numbering."""
    kinds = []
    for variable in optimizer.variables:
        name = variable.path.split("/")[-1]
        kinds.append(next((k for k in ("momentum", "velocity") if name.endswith(k)), name))
    return kinds


def _padded_batches():
    import jax
    import numpy as np

    from conceptlib_jax.step import sample_batch

    rng = np.random.default_rng(3)
    variants, images, templates = 6, 3, 9
    mean = rng.standard_normal((variants, 4, 4, 4)).astype(np.float32)
    std = np.abs(rng.standard_normal((variants, 4, 4, 4))).astype(np.float32)
    image_of = np.arange(variants, dtype=np.int32) % images
    prompts = rng.integers(0, 49408, (images, templates, 77)).astype(np.int32)
    counts = np.asarray([9, 5, 7], np.int32)
    plain = {"mean": mean, "std": std, "image_of": image_of, "variant_count": np.int32(variants),
             "prompts": prompts, "prompt_count": counts}
    rows = [bucket(variants), bucket(images), bucket(templates)]
    pad = rows[0] - variants
    padded = {
        "mean": np.concatenate([mean, np.zeros((pad,) + mean.shape[1:], np.float32)]),
        "std": np.concatenate([std, np.zeros((pad,) + std.shape[1:], np.float32)]),
        "image_of": np.concatenate([image_of, np.zeros(pad, np.int32)]),
        "variant_count": np.int32(variants),
        "prompts": np.pad(prompts, ((0, rows[1] - images), (0, rows[2] - templates), (0, 0)), mode="edge"),
        "prompt_count": np.concatenate([counts, counts[-1:]]),
    }
    key = jax.random.key(11)
    a = jax.jit(lambda d: sample_batch(key, d, 5))(plain)
    b = jax.jit(lambda d: sample_batch(key, d, 5))(padded)
    return rows, [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b)]


def _applied_rates() -> list[float]:
    """The size of each of 8 updates of make_optimizer's stepped schedule for a constant gradient,
    without weight decay or clipping (any Keras backend)."""
    import keras
    import numpy as np

    from conceptlib.kerascv.textual_inversion import make_optimizer

    optimizer = make_optimizer(0.05, 8, schedule="stepped", lr_steps=CASES["stepped"][4], weight_decay=0, clip_norm=0)
    variable = keras.Variable(np.zeros((1, 4), np.float32))
    optimizer.build([variable])
    sizes = []
    for _ in range(len(STEPPED_RATES)):
        before = float(keras.ops.convert_to_numpy(variable)[0, 0])
        optimizer.apply([keras.ops.ones((1, 4))], [variable])
        sizes.append(before - float(keras.ops.convert_to_numpy(variable)[0, 0]))
    return sizes


def _worker(out_path: str) -> None:
    import keras

    if keras.backend.backend() != "jax":
        with open(out_path, "w") as handle:
            json.dump({"applied_rates": _applied_rates()}, handle)
        return
    fn_cache: dict = {}
    cases = {case: _adam_runs(case, fn_cache) for case in CASES}
    rows, differences = _padded_batches()
    report = {
        "cases": cases,
        "applied_rates": _applied_rates(),
        "cosine_compilations": fn_cache["cosine"][0]._cache_size(),
        "stepped_compilations": fn_cache["stepped"][0]._cache_size(),
        "padded_rows": rows,
        "padded_vectors": _padded_vector_rows(),
        "batch_differences": differences,
    }
    with open(out_path, "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(sys.argv[1])
