"""Fixtures shared by the end-to-end test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """`conceptlib weights init-random` run once per test session as a real CLI process: every
    sd-1 part (~4 GB, ~25 s to write), shared by the end-to-end tests, which only read it. Yields
    (the folder, the finished process); the folder is deleted at the end."""
    folder = tmp_path_factory.mktemp("random-weights") / "weights"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("KERAS_BACKEND", None)
    cli = [sys.executable, "-c", "import sys; from conceptlib.cli import main; sys.exit(main())"]
    process = subprocess.run(cli + ["weights", "init-random", str(folder)], env=env, capture_output=True,
                             text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-3000:]
    yield folder, process
    shutil.rmtree(folder, ignore_errors=True)
