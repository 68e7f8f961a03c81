"""Training throughput of a trainer plugin: prints ONE JSON line.

    python benchmarks/train_throughput.py --trainer tensorflow --resolution 128 --batch-size 1 --steps 6

Runs the real `conceptlib.training` pipeline (checks, data, trainer plugin) on a few generated
images in a temporary library, with randomly initialised weights unless --weights DIR is given
(throughput does not depend on the weight values). Reports:

  ms_per_step         mean wall time of steps 2..S (the first step includes tracing/compilation)
  samples_per_s       batch_size * grad_accum * 1000 / ms_per_step
  time_to_first_step_s  from the start of the run (before keras is imported) to the end of step 1
  peak_memory_gib     peak host RSS, and peak device memory where the backend reports it
  device              what the steps ran on
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path


def _make_images(folder: Path, count: int = 4) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        array = (rng.random((160, 192, 3)) * 255).astype("uint8")
        Image.fromarray(array).save(folder / f"image-{index}.png")


def _device(backend: str) -> tuple[str, float | None]:
    """(device description, peak device memory in GiB or None)."""
    gib = 1024**3
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        peak = None
        try:
            stats = device.memory_stats() or {}
            peak = stats.get("peak_bytes_in_use")
        except Exception:  # CPU devices have no memory stats
            pass
        count = len(jax.devices())
        if device.platform == "cpu":
            return f"cpu:{platform.processor() or platform.machine()} ({os.cpu_count()} cores, jax)", None
        name = getattr(device, "device_kind", device.platform)
        return f"{device.platform}:{name}" + (f" x{count}" if count > 1 else ""), (peak / gib if peak else None)
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
            return f"gpu:{details.get('device_name', 'GPU')}", peak / gib
    return f"cpu:{platform.processor() or platform.machine()} ({os.cpu_count()} cores)", None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="tensorflow")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per update (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--base-model", default="sd-1", choices=["sd-1", "sd-2"])
    parser.add_argument("--weights", default="random", help="weights folder, or 'random' (in memory)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is timed separately)")

    started = time.perf_counter()
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, prepare

    with tempfile.TemporaryDirectory(prefix="conceptlib-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        _make_images(tmp / "images")
        config = TrainingConfig(
            images=str(tmp / "images"), name="bench", token="<bench>", base_model=args.base_model,
            weights=args.weights, trainer=args.trainer, init=["cat"], num_vectors=args.num_vectors,
            resolution=args.resolution, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
            checkpoint_every=0, preview_every=0, run_dir=str(tmp / "run"),
        )
        job = prepare(config, library=ConceptLibrary(tmp / "library"))
        job.progress.enabled = False
        trainer = job.trainer_cls()
        result = trainer.run(job)
        backend = job.trainer_cls.backend
        device, device_peak = _device(backend)
    timings = job.timings
    # job.timings holds perf_counter stamps: end of the first step and of the last step.
    ms_per_step = (timings["last_step"] - timings["first_step"]) / (args.steps - 1) * 1000
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(json.dumps({
        "trainer": args.trainer,
        "backend": backend,
        "base_model": args.base_model,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "steps": args.steps,
        "ms_per_step": round(ms_per_step, 1),
        "samples_per_s": round(args.batch_size * args.grad_accum * 1000 / ms_per_step, 3),
        "time_to_first_step_s": round(timings["first_step"] - started, 1),
        "peak_host_rss_gib": round(rss_gib, 2),
        "peak_device_memory_gib": round(device_peak, 2) if device_peak is not None else None,
        "device": device,
        "final_loss": round(float(result.losses[-1]), 5),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
