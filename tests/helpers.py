"""Helpers shared by test files. Importable both under pytest and from the worker scripts the tests
start as subprocesses (``python tests/test_x.py``): either way tests/ is on sys.path."""

from __future__ import annotations


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
    return None
