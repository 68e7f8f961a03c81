"""Small pure parts of the jax trainer: how it splits a run into calls when one call runs several
steps (``JaxTrainer(steps_per_call=N)``, used by the GPU benchmarks: a checkpoint or preview must
see the vectors of its own step, so no call may run past a due step), and its default XLA flags."""

from __future__ import annotations

import pytest

from conceptlib_jax.trainer import steps_this_call


def _calls(steps, per_call, every, start=0):
    def due(done):
        return bool(every) and done % every == 0

    index, calls, seen = start, [], []
    while index < steps:
        count = steps_this_call(index, steps, per_call, due)
        calls.append(count)
        index += count
        seen.append(index)  # the step count after each call: where state can be observed
    return calls, seen


@pytest.mark.parametrize("steps,per_call,every", [(10, 4, 3), (12, 4, 4), (9, 2, 5), (7, 3, 0), (16, 8, 6)])
def test_every_due_step_ends_a_call(steps, per_call, every):
    calls, seen = _calls(steps, per_call, every)
    assert sum(calls) == steps
    due_steps = [d for d in range(1, steps + 1) if every and d % every == 0]
    assert set(due_steps) <= set(seen)
    assert all(count in (1, per_call) for count in calls)


def test_full_calls_where_nothing_is_due_inside():
    assert _calls(12, 4, 4)[0] == [4, 4, 4]  # checkpoints at the end of each call
    assert _calls(7, 3, 0)[0] == [3, 3, 1]  # the tail one step at a time
    assert _calls(10, 4, 0, start=5)[0] == [4, 1]  # a resumed run


def test_one_step_per_call_is_unchanged():
    assert _calls(5, 1, 2)[0] == [1] * 5


def test_default_xla_flags_are_added_unless_the_user_set_them(monkeypatch):
    from conceptlib_jax.trainer import DEFAULT_XLA_FLAGS, apply_default_xla_flags

    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert apply_default_xla_flags() == "--xla_dump_to=/tmp/x " + " ".join(DEFAULT_XLA_FLAGS)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    assert apply_default_xla_flags() == "--xla_gpu_enable_triton_gemm=true"  # the user's choice wins
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"


def test_in_background_returns_the_value_or_raises_in_the_caller():
    from conceptlib_jax.trainer import InBackground

    assert InBackground(lambda a, b=0: a + b, 2, b=3).result() == 5

    def broken():
        raise ValueError("weights file is corrupt")

    job = InBackground(broken)
    with pytest.raises(ValueError, match="corrupt"):
        job.result()
