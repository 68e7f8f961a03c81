"""Ctrl-C interrupts a command even when it lands in a garbage-collector callback (jax has one,
and TensorFlow imports jax), which would otherwise swallow the KeyboardInterrupt. Each case is a
real process sent a real SIGINT while a callback of its own is running Python code."""

from __future__ import annotations

import signal
import sys

from helpers import interrupt_when_ready

_SCRIPT = """
import gc, os, sys, time
from conceptlib.interrupts import reliable_ctrl_c

entered, guarded = sys.argv[1], sys.argv[2] == "guarded"

def busy_callback(phase, info):
    if phase == "start" and not os.path.exists(entered):
        open(entered, "w").close()
        start = time.monotonic()
        while time.monotonic() - start < 3:  # Python code: where the SIGINT is handled
            pass

def work():
    try:
        gc.collect()
        time.sleep(3)  # the collection is over: a Ctrl-C sent again lands here
        print("went on")
    except KeyboardInterrupt:
        print("interrupted")

gc.callbacks.append(busy_callback)
if guarded:
    with reliable_ctrl_c():
        work()
else:
    work()
"""


def _interrupt_inside_the_callback(tmp_path, mode: str):
    entered = tmp_path / f"entered-{mode}"
    _, _, out, err = interrupt_when_ready([sys.executable, "-c", _SCRIPT, str(entered), mode], None, entered.exists,
                                          "its callback")
    return out.strip(), err


def test_a_ctrl_c_inside_a_collector_callback_still_interrupts(tmp_path):
    out, err = _interrupt_inside_the_callback(tmp_path, "guarded")
    assert out == "interrupted", err


def test_without_it_python_swallows_that_ctrl_c(tmp_path):
    # What the guard is for: Python reports the KeyboardInterrupt as ignored and goes on.
    out, err = _interrupt_inside_the_callback(tmp_path, "plain")
    assert out == "went on" and "Exception ignored" in err and "KeyboardInterrupt" in err


def test_the_guard_leaves_an_ignored_or_foreign_sigint_handler_alone():
    from conceptlib.interrupts import reliable_ctrl_c

    def foreign(signum, frame):
        pass

    previous = signal.signal(signal.SIGINT, foreign)
    try:
        with reliable_ctrl_c():
            assert signal.getsignal(signal.SIGINT) is foreign
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with reliable_ctrl_c():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
