"""Ctrl-C that is never lost: a KeyboardInterrupt raised inside a garbage-collector callback is
swallowed by Python ("Exception ignored in ..."), and jax registers such a callback (TensorFlow
2.21 imports jax, so it is there on either Keras backend). During keras-cv's model builds the
collector runs so often that a Ctrl-C lands in that callback more often than not, and training
went on. ``reliable_ctrl_c`` sends such a Ctrl-C again once the callback has returned.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading

# How long after a Ctrl-C that landed in a collector callback it is sent again: the callback
# (jax's frees device buffers) has returned by then.
_RESEND_AFTER_S = 0.05


@contextlib.contextmanager
def reliable_ctrl_c():
    """Within the block, Ctrl-C raises KeyboardInterrupt as usual, including when it arrives while
    a garbage-collector callback runs. Does nothing outside the main thread, or where SIGINT is
    ignored or handled by someone else (e.g. a background job, or an embedding application)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, _on_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def ctrl_c_deferred():
    """Within the block, a Ctrl-C waits: its KeyboardInterrupt is raised once the block has run to
    its end, so a change made in several steps (a model's table, then its tokenizer) is never left
    half made. Does nothing outside the main thread, or where SIGINT is handled by someone else."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous not in (
        signal.default_int_handler, _on_ctrl_c
    ):
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _on_ctrl_c(signum, frame):
    if _in_collector_callback(frame):
        threading.Timer(_RESEND_AFTER_S, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    raise KeyboardInterrupt


def _in_collector_callback(frame) -> bool:
    """Whether ``frame`` is, or is called from, one of ``gc.callbacks``."""
    codes = {getattr(getattr(callback, "__func__", callback), "__code__", None) for callback in gc.callbacks}
    codes.discard(None)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False
