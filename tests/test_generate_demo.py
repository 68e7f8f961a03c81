"""scripts/demo.sh, the README's main job, as a real process: without DEMO_DIR it deletes the ~4 GB
of random weights it writes (at the end, and when stopped), keeps the small results and says
where they are; with DEMO_DIR it keeps everything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from helpers import interrupt_when_ready

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"


def _env(tmp_path, **extra):
    env = dict(os.environ, TMPDIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    for name in ("DEMO_DIR", "KERAS_BACKEND", "CONCEPTLIB_WEIGHTS", "CONCEPTLIB_HOME"):
        if name not in extra:
            env.pop(name, None)
    return env


def _interrupt_while_writing_weights(tmp_path, env, work_glob, written):
    """Start the demo, Ctrl-C it once it has written the file ``written`` of the random weights,
    and return (exit code, stderr, its work folder)."""
    marker, code, _, stderr = interrupt_when_ready(
        ["bash", str(DEMO)], env, lambda: next(iter(tmp_path.glob(f"{work_glob}/weights/{written}")), None),
        f"writing {written}",
    )
    return code, stderr, marker.parent.parent


def test_stopped_demo_deletes_its_random_weights_and_keeps_the_rest(tmp_path):
    # The text encoder's file (~500 MB) is written; the other parts are being written.
    code, stderr, work = _interrupt_while_writing_weights(tmp_path, _env(tmp_path), "conceptlib-demo-*", "kcv_encoder.h5")
    assert code == 130, stderr[-2000:]
    assert work.parent == tmp_path and not (work / "weights").exists()
    assert sorted(p.name for p in (work / "images").glob("*.png"))  # step 1's results are kept
    last = stderr.strip().splitlines()[-1]
    assert last == (f"Demo stopped (exit 130); deleted its random weights. What it made so far is in {work} "
                    f"(delete it with: rm -rf {work})")


def test_stopped_demo_with_demo_dir_keeps_everything(tmp_path):
    work = tmp_path / "my demo"
    code, stderr, found = _interrupt_while_writing_weights(tmp_path, _env(tmp_path, DEMO_DIR=str(work)), "my demo",
                                                           "RANDOM-WEIGHTS.txt")
    assert found == work and code != 0
    assert (work / "weights" / "RANDOM-WEIGHTS.txt").exists() and any((work / "images").glob("*.png"))
    assert "Demo stopped" not in stderr
    assert [p.name for p in tmp_path.iterdir()] == ["my demo"]  # no temporary folder made


@pytest.mark.slow
@pytest.mark.demo  # not in the default run (CI's time budget); `python3 -m pytest -m demo` runs it
def test_demo_runs_the_main_job_and_leaves_only_small_results(tmp_path):
    """The whole demo once (~3 min on 2 CPU cores): it succeeds, the random weights are gone, the
    run folder, library and images are kept, and the last lines say where and how to delete them."""
    result = subprocess.run(["bash", str(DEMO)], env=_env(tmp_path), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    (work,) = tmp_path.glob("conceptlib-demo-*")
    assert not (work / "weights").exists()
    assert (work / "run" / "config.json").exists()
    assert list((work / "library" / "concepts").glob("toy-robot.safetensors"))
    assert len(list((work / "generated").glob("*.png"))) == 2  # one image and its contact sheet
    size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    assert size < 50 * 2**20, f"{size} bytes left in {work}"
    lines = result.stdout.strip().splitlines()
    assert lines[-4:] == [
        f"Done. Run folder (config, checkpoints, preview): {work}/run",
        f"Library: {work}/library   Generated images: {work}/generated",
        f"Deleted the random weights (~4 GB, {work}/weights); the results above stay in {work}.",
        f"Delete them with: rm -rf {work}",
    ]
    assert "Demo stopped" not in result.stderr
    # TensorFlow's import notices (printed whatever TF_CPP_MIN_LOG_LEVEL says) are left out.
    assert "oneDNN" not in result.stderr and "absl::InitializeLog" not in result.stderr
