"""GPU sweep of the jax trainer: several configurations in ONE process, one JSON line each.

    export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax
    python3 benchmarks/gpu_sweep.py                      # the default sweep (see CONFIGS)
    python3 benchmarks/gpu_sweep.py --configs b32-bf16-flash,b64-bf16-flash --steps 20
    python3 benchmarks/gpu_sweep.py --cli 2              # + `conceptlib train` time to first step (cold, warm)
    python3 benchmarks/gpu_sweep.py --breakdown 32       # + forward vs forward+backward timings

Each configuration runs the real pipeline (conceptlib.training.prepare -> JaxTrainer.run) on
generated images with randomly initialised weights (speed does not depend on weight values).
The models are built once per precision and reused, so only the first line's time to first step
includes the model build; every line reports its own compile time.

A configuration name is dash-separated: ``b<N>`` or ``bauto`` (batch size, global), ``bf16`` /
``fp32``, ``flash`` / ``noflash``, optionally ``spc<K>`` (K steps per jitted call, lax.scan).

Lines (all times in seconds unless named _ms):
  {"kind": "config", "config", "batch_size", "precision", "flash", "ms_per_step", "samples_per_s",
   "first_step_s" (run start -> first step done), "build_s", "latents_s", "compile_s",
   "step_memory_gib" (XLA's estimate for the step: arguments + temporaries + outputs),
   "peak_memory_gib" (process peak so far: valid per config only for the first, see --configs),
   "flash_layers", "plain_attention_layers", "flash_refused", "device", ...}
  {"kind": "breakdown", "batch_size", "flash", "unet_fwd_ms", "loss_fwd_ms", "loss_grad_ms",
   "text_grad_ms", "step_ms"}
  {"kind": "cli", "time_to_first_step_s", "returncode", ...}

The process runs without pip-installed conceptlib/plugins (the GPU machine): it puts the source
folders on sys.path and registers their entry points through a generated .dist-info folder (see
benchmarks/gpu_entry_points.py), for itself and for the `conceptlib train` subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_entry_points import source_paths  # noqa: E402

CONFIGS = (
    # batch-1 first: the process's peak memory is then exactly batch 1's (target <= 8 GiB).
    "b1-bf16-flash",
    "b1-fp32-flash",
    "b16-bf16-flash",
    "b32-bf16-flash",
    "b64-bf16-flash",
    "b32-bf16-noflash",
    "b32-bf16-flash-spc4",
)

GIB = 1024**3


def parse_config(name: str) -> dict:
    opts = {"name": name, "batch_size": 1, "precision": "bf16", "flash": "on", "steps_per_call": 1}
    for part in name.split("-"):
        if part == "bauto":
            opts["batch_size"] = "auto"
        elif part.startswith("b") and part[1:].isdigit():
            opts["batch_size"] = int(part[1:])
        elif part in ("bf16", "fp32"):
            opts["precision"] = part
        elif part in ("flash", "noflash"):
            opts["flash"] = "on" if part == "flash" else "off"
        elif part.startswith("spc") and part[3:].isdigit():
            opts["steps_per_call"] = int(part[3:])
        else:
            raise SystemExit(f"unknown config part {part!r} in {name!r}")
    return opts


def make_images(folder: Path, count: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray((rng.random((576, 640, 3)) * 255).astype("uint8")).save(folder / f"image-{index}.png")
    return folder


def device_info():
    import jax

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    return {
        "device": f"{device.platform}:{getattr(device, 'device_kind', '?')} x{len(jax.local_devices())}",
        "peak_memory_gib": round(stats["peak_bytes_in_use"] / GIB, 2) if "peak_bytes_in_use" in stats else None,
    }


def run_config(opts: dict, args, tmp: Path, index: int) -> dict:
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, prepare
    from conceptlib_jax import JaxTrainer

    config = TrainingConfig(
        images=str(tmp / "images"), name=f"bench-{index}", token=f"<bench-{index}>", weights="random",
        trainer="jax", init=["cat"], resolution=args.resolution, steps=args.steps,
        batch_size=1 if opts["batch_size"] == "auto" else opts["batch_size"],
        checkpoint_every=0, preview_every=0, run_dir=str(tmp / f"run-{index}"),
    )
    job = prepare(config, library=ConceptLibrary(tmp / "library"))
    job.progress.enabled = False
    trainer = JaxTrainer(
        precision=opts["precision"], flash=opts["flash"], batch_size=opts["batch_size"],
        steps_per_call=opts["steps_per_call"], variants=args.variants, devices=args.devices,
    )
    started = time.perf_counter()
    result = trainer.run(job)
    report = trainer.report
    timings = report.pop("timings")
    first_chunk = opts["steps_per_call"]
    timed_steps = args.steps - first_chunk
    ms = (job.timings["last_step"] - job.timings["first_step"]) / max(1, timed_steps) * 1000
    batch = job.config.batch_size
    line = {
        "kind": "config",
        "config": opts["name"],
        "resolution": args.resolution,
        "batch_size": batch,
        "steps": args.steps,
        "ms_per_step": round(ms, 2),
        "samples_per_s": round(batch * 1000 / ms, 2),
        "first_step_s": round(job.timings["first_step"] - started, 2),
        "build_s": timings.get("models_built"),
        "latents_s": round(timings["latents_ready"] - timings["models_built"], 2),
        "compile_s": round(timings["compiled"] - timings["latents_ready"], 2),
        "final_loss": round(float(result.losses[-1]), 5),
        **{k: v for k, v in report.items() if k != "batch_size"},
        **device_info(),
    }
    if index == 0:
        line["process_start_to_first_step_s"] = round(job.timings["first_step"] - STARTED, 2)
    return line


def breakdown(batch: int, args, flash: bool) -> dict:
    """Forward-only vs forward+backward timings of the pieces of one step (bf16)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from conceptlib.kerascv.attention import fused_attention
    from conceptlib_jax.step import loss_and_grad_fn, step_state
    from conceptlib_jax.trainer import build_models

    ti = build_models("sd-1", args.resolution, None, precision="bf16")
    state = step_state(ti.frozen_state())
    rng = np.random.default_rng(0)
    side = args.resolution // 8
    latents = jnp.asarray(rng.standard_normal((batch, side, side, 4)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((batch, side, side, 4)), jnp.float32)
    timesteps = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    ids = np.full((batch, 77), 49407, np.int32)
    ids[:, 0], ids[:, 1:4] = 49406, [320, 1125, ti.vocab_size]
    ids = jnp.asarray(ids)
    rows = jnp.asarray(rng.standard_normal((1, ti.dim)) * 0.01, jnp.float32)
    context = jnp.asarray(rng.standard_normal((batch, 77, ti.dim)), jnp.bfloat16)
    t_emb = jnp.asarray(rng.standard_normal((batch, 320)), jnp.float32)

    def unet_fwd(state, latents, t_emb, context):
        out, _ = ti.diffusion_model.stateless_call(*state["unet"], [latents, t_emb, context])
        return out

    def text_grad(rows, state, ids):
        return jax.grad(lambda r: jnp.mean(ti.encode_text(r, state, ids).astype(jnp.float32) ** 2))(rows)

    def timed(fn, *fn_args, repeats=5):
        compiled = jax.jit(fn)
        jax.block_until_ready(compiled(*fn_args))
        jax.block_until_ready(compiled(*fn_args))
        start = time.perf_counter()
        for _ in range(repeats):
            out = compiled(*fn_args)
        jax.block_until_ready(out)
        return round((time.perf_counter() - start) / repeats * 1000, 2)

    line = {"kind": "breakdown", "resolution": args.resolution, "batch_size": batch, "flash": flash}
    with fused_attention(ti.diffusion_model, flash=flash) as patch:
        line["unet_fwd_ms"] = timed(unet_fwd, state, latents, t_emb, context)
        line["loss_fwd_ms"] = timed(ti.loss_from_latents, rows, state, latents, noise, timesteps, ids)
        line["loss_grad_ms"] = timed(loss_and_grad_fn(ti), rows, state, latents, noise, timesteps, ids)
        line["text_grad_ms"] = timed(text_grad, rows, state, ids)
        line["flash_refused"] = patch.flash_refused
    line["samples_per_s_grad_only"] = round(batch * 1000 / line["loss_grad_ms"], 1)
    line.update(device_info())
    return line


def cli_first_step(args, tmp: Path, extra_path: list[str], run: int) -> dict:
    """`conceptlib train --trainer jax` as a fresh process: seconds from launch to the first
    step's progress line (and the whole run)."""
    env = dict(os.environ, CONCEPTLIB_HOME=str(tmp / "cli-home"), KERAS_BACKEND="jax")
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [
        sys.executable, "-m", "conceptlib.cli", "train", str(tmp / "images"), "--name", f"cli-bench-{run}",
        "--token", f"<cli-bench-{run}>", "--init", "cat", "--weights", "random", "--trainer", "jax",
        "--resolution", str(args.resolution), "--steps", str(args.cli_steps), "--batch-size", str(args.cli_batch),
        "--checkpoint-every", "0", "--run-dir", str(tmp / f"cli-run-{run}"),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, tail = None, []
    for line in proc.stderr:
        tail.append(line.rstrip())
        if first is None and "step 1/" in line:
            first = time.perf_counter() - started
    proc.wait()
    return {
        "kind": "cli", "run": run + 1, "command": " ".join(cmd[1:4]) + " ...", "resolution": args.resolution,
        "batch_size": args.cli_batch, "steps": args.cli_steps, "returncode": proc.returncode,
        "time_to_first_step_s": round(first, 2) if first else None,
        "total_s": round(time.perf_counter() - started, 2),
        "compilation_cache": env.get("CONCEPTLIB_JAX_CACHE", "default (user cache dir)"),
        "stderr_tail": tail[-6:] if proc.returncode else tail[-2:],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", type=int, default=8,
                        help="crops per image (the trainer's default 8: the CLI run's compiled step is then reused)")
    parser.add_argument("--devices", default="all")
    parser.add_argument("--breakdown", default="", help="comma-separated batch sizes for the breakdown lines")
    parser.add_argument("--cli", type=int, default=0, metavar="N",
                        help="first run `conceptlib train` N times (1st: cold compile cache, 2nd: warm) and time each to its first step")
    parser.add_argument("--cli-steps", type=int, default=3)
    parser.add_argument("--cli-batch", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=560, help="start nothing new after this many seconds")
    args = parser.parse_args(argv)

    extra_path = source_paths(Path(tempfile.mkdtemp(prefix="conceptlib-ep-")))
    for path in reversed(extra_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory(prefix="conceptlib-sweep-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images")
        for run in range(args.cli):  # first, so the cold run is not helped by this process
            line = cli_first_step(args, tmp, extra_path, run)
            print(json.dumps(line), flush=True)
        names = [c for c in args.configs.split(",") if c]
        for index, name in enumerate(names):
            if time.perf_counter() - STARTED > args.budget_s:
                print(json.dumps({"kind": "skipped", "config": name, "reason": "--budget-s reached"}), flush=True)
                continue
            try:
                line = run_config(parse_config(name), args, tmp, index)
            except Exception as exc:  # e.g. out of memory: report and go on
                line = {"kind": "config", "config": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            print(json.dumps(line), flush=True)
        for batch in [int(b) for b in args.breakdown.split(",") if b]:
            for flash in (True, False):
                if time.perf_counter() - STARTED > args.budget_s:
                    print(json.dumps({"kind": "skipped", "breakdown": batch, "flash": flash}), flush=True)
                    continue
                try:
                    line = breakdown(batch, args, flash)
                except Exception as exc:
                    line = {"kind": "breakdown", "batch_size": batch, "flash": flash,
                            "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
