"""GPU sweep of the jax trainer: several configurations in ONE process, one JSON line each.

    export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax
    python3 benchmarks/gpu_sweep.py                      # the default sweep (see CONFIGS)
    python3 benchmarks/gpu_sweep.py --configs b32-bf16-flash,b64-bf16-flash --steps 20
    python3 benchmarks/gpu_sweep.py --cli 2              # + `conceptlib train` time to first step (cold, warm)
    python3 benchmarks/gpu_sweep.py --breakdown 32       # + forward vs forward+backward timings
    python3 benchmarks/gpu_sweep.py --cli 1 --cli-batch 128 --cli-steps 20 --cli-args "--devices all" --configs ""

Each configuration runs the real pipeline (conceptlib.training.prepare -> JaxTrainer.run) on
generated images with randomly initialised weights (speed does not depend on weight values).
The models are built once per precision and reused, so only the first line's time to first step
includes the model build; every line reports its own compile time.

A configuration name is dash-separated: ``b<N>`` or ``bauto`` (batch size, global), ``bf16`` /
``fp32``, ``flash`` / ``noflash``, optionally ``ga<K>`` (gradient accumulation: K batches per
update, so K x N samples per step), ``spc<K>`` (K steps per jitted call, lax.scan),
``k<list>`` the UNet rewrites joined by ``+`` (``kconv+groupnorm+qkv+crosspad``, ``knone``;
default: the trainer's DEFAULT_KERNELS), ``nobg`` (no background compile), ``sd2`` (Stable
Diffusion 2.x's models instead of 1.x's), and process presets
(PRESETS: ``xlhs``, ``xat0``, ``xat2``, ``xnotriton``, ``xnocmdbuf``, ``mem8g``, ...) that set
XLA_FLAGS / XLA_PYTHON_CLIENT_MEM_FRACTION: configurations with presets run in a child process
per distinct preset set (XLA reads its flags once per process), their lines forwarded here.

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

# Process presets: environment for a child process. XLA_FLAGS values are joined.
PRESETS = {
    "xlhs": {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=true"},
    "xat0": {"XLA_FLAGS": "--xla_gpu_autotune_level=0"},
    "xat1": {"XLA_FLAGS": "--xla_gpu_autotune_level=1"},
    "xat2": {"XLA_FLAGS": "--xla_gpu_autotune_level=2"},
    "xnotriton": {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"},
    "xnocmdbuf": {"XLA_FLAGS": "--xla_gpu_enable_command_buffer="},
    "xnoexhaust": {"XLA_FLAGS": "--xla_gpu_exhaustive_tiling_search=false"},
    # The fusion autotuner (native vs Triton block-level emitters for ~350 fusions of the step).
    "xnofusat": {"XLA_FLAGS": "--xla_gpu_experimental_enable_fusion_autotuner=false"},
    # cuDNN kernels for layer norm, and convolutions / GEMMs fused with their elementwise neighbours.
    "xcudnnln": {"XLA_FLAGS": "--xla_gpu_enable_cudnn_layer_norm=true"},
    "xconvfus": {"XLA_FLAGS": "--xla_gpu_experimental_enable_conv_fusion=true"},
    "xcudnngemm": {"XLA_FLAGS": "--xla_gpu_cudnn_gemm_fusion_level=2"},
    # cuBLASLt GEMMs, which take bias adds (and GELU) into their epilogue.
    "xcublaslt": {"XLA_FLAGS": "--xla_gpu_enable_cublaslt=true"},
    # LLVM/ptxas on 16 threads instead of one: a shorter first compile, the same kernels?
    "xpar16": {"XLA_FLAGS": "--xla_gpu_force_compilation_parallelism=16"},
    # The allocator may use 8 GiB of the 80 GB card: batch 1 at 512 px must run under it.
    "mem8g": {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.1", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
    "noprealloc": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
}


def config_presets(name: str) -> tuple:
    return tuple(sorted(part for part in name.split("-") if part in PRESETS))


def preset_env(presets) -> dict:
    env = {}
    for preset in presets:
        for key, value in PRESETS[preset].items():
            if key == "XLA_FLAGS" and env.get(key):
                value = env[key] + " " + value
            env[key] = value
    if "XLA_FLAGS" in env and os.environ.get("XLA_FLAGS"):
        env["XLA_FLAGS"] = os.environ["XLA_FLAGS"] + " " + env["XLA_FLAGS"]
    return env


def parse_config(name: str) -> dict:
    opts = {"name": name, "batch_size": 1, "grad_accum": 1, "precision": "bf16", "flash": "on", "steps_per_call": 1,
            "kernels": None, "background_compile": True, "base_model": "sd-1"}
    for part in name.split("-"):
        if part == "bauto":
            opts["batch_size"] = "auto"
        elif part.startswith("b") and part[1:].isdigit():
            opts["batch_size"] = int(part[1:])
        elif part in ("bf16", "fp32"):
            opts["precision"] = part
        elif part in ("flash", "noflash"):
            opts["flash"] = "on" if part == "flash" else "off"
        elif part.startswith("ga") and part[2:].isdigit():
            opts["grad_accum"] = int(part[2:])
        elif part.startswith("spc") and part[3:].isdigit():
            opts["steps_per_call"] = int(part[3:])
        elif part.startswith("k") and len(part) > 1:
            opts["kernels"] = part[1:].replace("+", ",")
        elif part == "nobg":
            opts["background_compile"] = False
        elif part == "sd2":
            opts["base_model"] = "sd-2"
        elif part in PRESETS:
            pass  # applied to the process (see main)
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
        trainer="jax", init=["cat"], resolution=args.resolution, steps=args.steps, base_model=opts["base_model"],
        batch_size=1 if opts["batch_size"] == "auto" else opts["batch_size"], grad_accum=opts["grad_accum"],
        checkpoint_every=0, preview_every=0, run_dir=str(tmp / f"run-{index}"),
    )
    job = prepare(config, library=ConceptLibrary(tmp / "library"))
    job.progress.enabled = False
    trainer = JaxTrainer(
        precision=opts["precision"], flash=opts["flash"], batch_size=opts["batch_size"],
        steps_per_call=opts["steps_per_call"], variants=args.variants, devices=args.devices,
        kernels=opts["kernels"], background_compile=opts["background_compile"],
    )
    started = time.perf_counter()
    result = trainer.run(job)
    report = trainer.report
    timings = report.pop("timings")
    first_chunk = opts["steps_per_call"]
    timed_steps = args.steps - first_chunk
    ms = (job.timings["last_step"] - job.timings["first_step"]) / max(1, timed_steps) * 1000
    batch = job.config.samples_per_step
    line = {
        "kind": "config",
        "config": opts["name"],
        "resolution": args.resolution,
        "batch_size": job.config.batch_size,
        "grad_accum": job.config.grad_accum,
        "steps": args.steps,
        "ms_per_step": round(ms, 2),
        "samples_per_s": round(batch * 1000 / ms, 2),
        "first_step_s": round(job.timings["first_step"] - started, 2),
        "build_s": timings.get("models_built"),
        "latents_s": round(timings["latents_ready"] - timings["models_built"], 2),
        "compile_s": round(timings.get("compile_seconds", 0.0), 2),
        "compile_wait_after_latents_s": round(timings["compiled"] - timings["latents_ready"], 2),
        "presets": {k: v for k, v in os.environ.items() if k.startswith("XLA_")},
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
    report = tmp / f"cli-report-{run}.json"
    images, steps, more = tmp / "images", args.cli_steps, []
    if args.cli_vary:
        # The first run trains 3 vectors (4 rows); later runs another concept of the same shapes:
        # 3 images instead of 4 (48 crops, padded to 64 rows like 64), 4 vectors, more steps,
        # another learning rate and a warmup: the step cache must still hit.
        more = ["--num-vectors", "3"]
        if run:
            images = make_images(tmp / f"images-{run}", count=3)
            steps += 5 * run
            more = ["--num-vectors", "4", "--lr", str(0.005 / (run + 1)), "--warmup-steps", str(run)]
    env = dict(os.environ, CONCEPTLIB_HOME=str(tmp / "cli-home"), KERAS_BACKEND="jax", CONCEPTLIB_JAX_REPORT=str(report))
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    cmd = [
        sys.executable, "-m", "conceptlib.cli", "train", str(images), "--name", f"cli-bench-{run}",
        "--token", f"<cli-bench-{run}>", "--init", "cat", "--weights", args.cli_weights, "--trainer", "jax",
        "--resolution", str(args.resolution), "--steps", str(steps), "--batch-size", str(args.cli_batch),
        "--checkpoint-every", "0", "--run-dir", str(tmp / f"cli-run-{run}"), *more, *args.cli_args.split(),
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, tail = None, []
    for line in proc.stderr:
        tail.append(line.rstrip())
        if first is None and "step 1/" in line:
            first = time.perf_counter() - started
    proc.wait()
    if args.cli_log:
        Path(args.cli_log).mkdir(parents=True, exist_ok=True)
        (Path(args.cli_log) / f"cli-{run + 1}.stderr").write_text("\n".join(tail) + "\n")
    trainer_report = json.loads(report.read_text()) if report.is_file() else {}
    phases = trainer_report.get("timings", {})
    rate = {}
    if steps > 1 and "first_step" in phases and "done" in phases:
        per_step = (phases["done"] - phases["first_step"]) / (steps - 1)
        batch = trainer_report.get("batch_size", args.cli_batch)
        accumulate = trainer_report.get("grad_accum", 1)  # --grad-accum: batches per step
        rate = {"ms_per_step": round(per_step * 1000, 2), "samples_per_s": round(batch * accumulate / per_step, 2),
                "devices": trainer_report.get("devices"), "trainer_batch_size": batch, "grad_accum": accumulate}
    return {
        "kind": "cli", "run": run + 1, "command": " ".join(cmd[1:4]) + " ...", "resolution": args.resolution,
        "batch_size": args.cli_batch, "steps": steps, "options": more, "images": len(list(images.glob("*.png"))),
        "weights": args.cli_weights, "returncode": proc.returncode,
        "time_to_first_step_s": round(first, 2) if first else None,
        "total_s": round(time.perf_counter() - started, 2),
        # seconds from the trainer's start (after imports, tokenizer, weight lookup) to each phase
        "trainer_phases_s": phases,
        # the jax trainer's cache of exported steps: "stored" (this run traced and exported the
        # step), "hit" (no keras-cv models built), "off", or why it was not exported
        "step_cache": trainer_report.get("step_cache"),
        "preview_warmup": trainer_report.get("preview_warmup"),  # built / compiled in the background
        "sampler_traces": trainer_report.get("sampler_traces"),
        # convolutions rewritten on the preview models a step-cache hit builds (None: not built)
        "preview_patched_convs": trainer_report.get("preview_patched_convs"),
        "peak_memory_gib_after": trainer_report.get("peak_memory_gib_after"),  # process peaks by phase
        "preview_seconds": trainer_report.get("preview_seconds"),  # request to images, training going on
        "longest_step_gap_s": trainer_report.get("longest_step_gap_s"),  # the longest stall between steps
        "previews": sorted(p.name for p in (tmp / f"cli-run-{run}" / "previews").glob("*.png")),
        **rate,
        "compilation_cache": env.get("CONCEPTLIB_JAX_CACHE", "default (user cache dir)"),
        "stderr_tail": tail[-6:] if proc.returncode else tail[-2:],
    }


def run_child(args, argv, group, presets) -> None:
    """Run ``group`` in a fresh process with the presets' environment; forward its lines."""
    remaining = args.budget_s - (time.perf_counter() - STARTED)
    if remaining < 60:
        for name in group:
            print(json.dumps({"kind": "skipped", "config": name, "reason": "--budget-s reached"}), flush=True)
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    cleaned, skip = [], False
    for item in argv:  # drop our own --configs/--budget-s/--cli/--breakdown: the child gets its own
        if skip:
            skip = False
            continue
        if item in ("--configs", "--budget-s", "--cli", "--breakdown"):
            skip = True
            continue
        if item.split("=")[0] in ("--configs", "--budget-s", "--cli", "--breakdown"):
            continue
        cleaned.append(item)
    cmd = [sys.executable, __file__, *cleaned, "--child", "--configs", ",".join(group),
           "--budget-s", str(int(remaining - 20))]
    env = dict(os.environ, **preset_env(presets))
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=max(30, remaining - 10))
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = exc.stdout or "", exc.stderr or "", "timeout"
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    for line in out.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    if code != 0:
        print(json.dumps({"kind": "child", "configs": group, "presets": list(presets), "returncode": code,
                          "stderr_tail": err.splitlines()[-8:]}), flush=True)


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
    parser.add_argument("--cli-weights", default="random", metavar="DIR",
                        help="--weights for the `conceptlib train` runs: a folder of weight files (as users have), "
                        "or 'random' (in memory)")
    parser.add_argument("--cli-batch", type=int, default=1)
    parser.add_argument("--cli-vary", action="store_true",
                        help="the first run trains 3 vectors; later runs another concept: 3 images, 4 vectors, more steps, "
                        "other learning rate, warmup")
    parser.add_argument("--cli-log", default="", metavar="DIR",
                        help="write each `conceptlib train` run's whole stderr to DIR/cli-N.stderr")
    parser.add_argument("--cli-args", default="", help="more `conceptlib train` options, e.g. '--devices all'")
    parser.add_argument("--budget-s", type=float, default=520, help="start nothing new after this many seconds")
    parser.add_argument("--config-estimate-s", type=float, default=100,
                        help="seconds a configuration is assumed to take before one has run (compile ~80 s on H100)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
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
        if not args.child:
            for presets in dict.fromkeys(config_presets(n) for n in names if config_presets(n)):
                group = [n for n in names if config_presets(n) == presets]
                run_child(args, argv, group, presets)
            names = [n for n in names if not config_presets(n)]
        longest = args.config_estimate_s
        for index, name in enumerate(names):
            # Start a configuration only if one as long as the longest so far still fits.
            if time.perf_counter() - STARTED + longest > args.budget_s:
                print(json.dumps({"kind": "skipped", "config": name, "reason": "--budget-s reached"}), flush=True)
                continue
            started = time.perf_counter()
            try:
                line = run_config(parse_config(name), args, tmp, index)
                longest = max(longest if index else 0, time.perf_counter() - started)
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
