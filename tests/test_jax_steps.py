"""Small pure parts of the jax trainer: how it splits a run into calls when one call runs several
steps (``JaxTrainer(steps_per_call=N)``, used by the GPU benchmarks: a checkpoint or preview must
see the vectors of its own step, so no call may run past a due step), its default XLA flags, and
the devices a batch splits over."""

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
    # The user's choice wins; the other defaults are still added.
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true --xla_gpu_force_compilation_parallelism=2")
    assert apply_default_xla_flags() == "--xla_gpu_enable_triton_gemm=true --xla_gpu_force_compilation_parallelism=2"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    expected = "--xla_gpu_enable_triton_gemm=true " + DEFAULT_XLA_FLAGS[1]
    assert apply_default_xla_flags() == expected
    import os

    assert os.environ["XLA_FLAGS"] == expected
    assert DEFAULT_XLA_FLAGS[1] == f"--xla_gpu_force_compilation_parallelism={min(os.cpu_count() or 1, 16)}"


def test_in_background_returns_the_value_or_raises_in_the_caller():
    from conceptlib_jax.trainer import in_background

    assert in_background(lambda a, b: a + b, 2, 3).result() == 5

    def broken():
        raise ValueError("weights file is corrupt")

    job = in_background(broken)
    with pytest.raises(ValueError, match="corrupt"):
        job.result()


def test_serial_worker_runs_one_function_at_a_time_in_order_and_returns_futures():
    import threading

    from conceptlib_jax.trainer import SerialWorker

    gate, order = threading.Event(), []

    def work(name):
        gate.wait(timeout=60)
        order.append(name)
        if name == "broken":
            raise ValueError("sampler failed")
        return name.upper()

    worker = SerialWorker()
    futures = [worker.submit(work, name) for name in ("a", "broken", "c")]
    assert not any(future.done() for future in futures)  # submit returned before any ran
    gate.set()
    assert futures[2].result(timeout=60) == "C" and futures[0].result() == "A"
    with pytest.raises(ValueError, match="sampler failed"):
        futures[1].result()
    assert order == ["a", "broken", "c"]
    # Closed, the thread ends once what was submitted has run (the trainer closes it after a run).
    last = worker.submit(work, "d")
    worker.close()
    worker._thread.join(timeout=60)
    assert last.result() == "D" and not worker._thread.is_alive()


def test_a_batch_that_does_not_split_uses_as_many_devices_as_divide_it():
    from conceptlib.errors import TrainingError
    from conceptlib_jax.trainer import devices_for_batch

    gpus = ["gpu:0", "gpu:1", "gpu:2", "gpu:3"]
    assert devices_for_batch(gpus, 8, "all") == (gpus, None)
    # The default (all devices) with the default --batch-size 1 on a multi-GPU machine trains.
    devices, note = devices_for_batch(gpus, 1, "all")
    assert devices == ["gpu:0"]
    assert note == "batch 1 does not split over 4 devices: training on 1 (a --batch-size that is a multiple of 4 uses them all)"
    assert devices_for_batch(gpus, 6, None)[0] == ["gpu:0", "gpu:1", "gpu:2"]
    assert devices_for_batch(gpus[:3], 4, "all")[0] == ["gpu:0", "gpu:1"]
    # A count the user asked for is kept or refused, never changed behind their back.
    assert devices_for_batch(gpus[:2], 4, "2") == (gpus[:2], None)
    with pytest.raises(TrainingError, match=r"--batch-size 3 does not split over 2 devices; use a multiple of 2"):
        devices_for_batch(gpus[:2], 3, "2")


_PLACEMENT_SCRIPT = """
import json
from types import SimpleNamespace
from jax.sharding import PartitionSpec
from conceptlib_jax.trainer import JaxTrainer

notes = []
out = {}
recorded = []
for batch in (4, 3):
    run_dir = SimpleNamespace(record=lambda settings, **extra: recorded.append((settings, extra)))
    job = SimpleNamespace(config=SimpleNamespace(batch_size=batch, resolution=64), stage=notes.append, resume=False,
                          run_dir=run_dir)
    devices, distribution, replicated = JaxTrainer(devices="all")._placement(job, "fp32", False)
    out[batch] = {
        "devices": [str(d) for d in devices],
        "distribution": None if distribution is None else [str(d) for d in distribution.device_mesh.devices.ravel()],
        "replicated": None if replicated is None else [replicated.spec == PartitionSpec(), len(replicated.device_set)],
    }
out["notes"] = notes
out["recorded"] = recorded
print(json.dumps(out))
"""


def test_placement_spreads_a_batch_over_the_devices_that_divide_it():
    """The trainer's device placement on two CPU host devices (a subprocess: the device count is
    fixed when jax starts): a batch of 4 is data-parallel over both, with weights replicated on
    both; a batch of 3 trains on one, says so, and has no distribution."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", _PLACEMENT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # Weights replicated (an empty PartitionSpec) over both devices.
    assert out["4"] == {"devices": ["cpu:0", "cpu:1"], "distribution": ["cpu:0", "cpu:1"], "replicated": [True, 2]}
    assert out["3"] == {"devices": ["cpu:0"], "distribution": None, "replicated": None}
    assert out["notes"] == ["batch 3 does not split over 2 devices: training on 1 (a --batch-size that is a multiple of 2 uses them all)"]
    # Each new run records the batch size it settled on (for --resume).
    assert out["recorded"] == [[{"batch_size": 4}, {"jax": {"variants": 8}}], [{"batch_size": 3}, {"jax": {"variants": 8}}]]


def test_prompt_table_uses_every_template_for_a_pack_that_ignores_captions(tmp_path, clip_tokenizer):
    """A template file without [filewords] has no caption templates: a captioned image's prompts
    are the pack's templates (as the TensorFlow trainer's job.batch renders them), not none."""
    import numpy as np
    from PIL import Image

    from conceptlib.images import find_images
    from conceptlib.templates import pack_from_file
    from conceptlib.training import RunDirectory, TrainingConfig, TrainingJob
    from conceptlib_jax.trainer import JaxTrainer

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(images / f"{name}.png")
    (images / "a.txt").write_text("on a red chair")
    (tmp_path / "t.txt").write_text("a painting by [name]\na drawing by [name]\nart by [name]\n")
    config = TrainingConfig(images=str(images), name="x", token="<x>", resolution=64, num_vectors=1).validate()
    job = TrainingJob(config, None, pack_from_file(tmp_path / "t.txt"), find_images(images), clip_tokenizer, [],
                      None, RunDirectory(tmp_path / "run"), None, False)
    _, _, prompts, counts = JaxTrainer(variants=1).host_data(job)
    assert list(counts) == [3, 3]
    np.testing.assert_array_equal(prompts[0, :3], prompts[1, :3])  # the caption changed nothing
