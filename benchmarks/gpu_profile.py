"""Where the jax trainer's step spends its GPU time: a profiler trace of a few steps, summarised.

    export PYTHONPATH=/tmp/site:$PWD KERAS_BACKEND=jax
    python3 benchmarks/gpu_profile.py --batch 32 --out $OUT            # default kernels
    python3 benchmarks/gpu_profile.py --batch 32 --kernels none,default --out $OUT

For each kernel set: the step (the trainer's own ``make_train_step`` on randomly initialised
SD 1.x weights, bf16, flash self-attention, random latents) is compiled and timed (median of
``--repeats`` steps), then ``--trace-steps`` steps run under ``jax.profiler.trace``. The trace's
GPU events are summed per kernel name and per XLA instruction, per step, and grouped into
categories (convolution, matmul, attention, XLA fusions, copies). One JSON line per kernel set:

  {"kind": "profile", "kernels", "batch_size", "ms_per_step", "gpu_busy_ms_per_step",
   "categories": {category: ms per step}, "top_kernels": [[name, ms per step, calls per step], ...],
   "top_ops": [[hlo op, ms per step, category], ...]}

``top_layers`` adds the time up per keras layer type and pass (``fwd``/``bwd``), from the HLO's
op_name metadata; run with ``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` so that every kernel is
attributed to its own XLA instruction rather than to a command buffer.

With ``--out DIR`` the optimised HLO of each step (``hlo-<kernels>.txt.gz``, to read what a fusion
computes) and the full per-op table (``ops-<kernels>.tsv``) are written there.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_entry_points import source_paths  # noqa: E402

CATEGORIES = (  # first match wins; kernel names are lower-cased
    ("attention", ("flash", "fmha", "cudnn_generated_fort_native_sdpa", "sdpa", "cudnn::fusion")),
    # not "conv" alone: XLA's "loop_convert_..." fusions are elementwise
    ("convolution", ("implicit_gemm", "xmma_fprop", "xmma_dgrad", "xmma_wgrad", "conv2d", "convolution", "cudnn-conv")),
    ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas", "triton_gemm", "__triton_gemm")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset")),
    ("reduction", ("reduce", "input_")),
    ("elementwise", ("loop_", "fusion", "triton", "wrapped_")),
)


def category(name: str) -> str:
    lower = name.lower()
    for label, needles in CATEGORIES:
        if any(n in lower for n in needles):
            return label
    return "other"


def random_device_data(batch: int, resolution: int, vocab: int):
    import jax.numpy as jnp
    import numpy as np

    from conceptlib_jax.step import DeviceData, schedule_arguments

    rng = np.random.default_rng(0)
    side = resolution // 8
    variants = 16
    mean = jnp.asarray(rng.standard_normal((variants, side, side, 4)), jnp.float32)
    std = jnp.asarray(np.abs(rng.standard_normal((variants, side, side, 4))) * 0.1, jnp.float32)
    prompts = np.full((2, 4, 77), 49407, np.int32)
    prompts[:, :, 0] = 49406
    prompts[:, :, 1:4] = [320, 1125, vocab]
    return DeviceData(mean, std, jnp.asarray(np.arange(variants) % 2, jnp.int32), jnp.int32(variants),
                      jnp.asarray(prompts), jnp.asarray([4, 4], jnp.int32), schedule_arguments(1e-3, 1000))


def gpu_events(xplane_path: str, seen: list):
    """(kernel name, hlo op, duration ns) for every event on a GPU plane of the trace; the
    planes and lines looked at are appended to ``seen`` (to debug an empty summary)."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    for plane in data.planes:
        if "gpu" not in plane.name.lower():
            continue
        for line in plane.lines:
            seen.append(f"{plane.name}/{line.name}")
            if "stream" not in line.name.lower():
                continue
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op") or stats.get("tf_op") or ""
                yield event.name, str(op), float(event.duration_ns)


def op_layers(hlo_text: str) -> dict:
    """XLA instruction name -> (``fwd``/``bwd``, the keras layer path it comes from), from the
    optimised HLO's op_name metadata ("transpose(jvp(...))" marks the backward pass); layer
    numbers are dropped so the same layer type adds up."""
    import re

    layers = {}
    for match in re.finditer(r'^\s*(?:ROOT )?%(\S+) = [^\n]*?op_name="([^"]+)"', hlo_text, re.M):
        name, op_name = match.groups()
        direction = "bwd" if "transpose(" in op_name else "fwd"
        path = re.sub(r"(transpose|jvp|jit|vmap)\(([^()]*)\)", r"\2", op_name)
        path = re.sub(r"(transpose|jvp|jit|vmap)\(([^()]*)\)", r"\2", path)
        parts = [re.sub(r"_\d+$", "", part) for part in path.split("/")[1:] if part]
        layers[name.replace(".", "_")] = (direction, "/".join(parts[:-1][-3:]) or "/".join(parts))
    return layers


def profile(ti, kernels: tuple, args, out: Path | None) -> dict:
    import jax

    from conceptlib.kerascv.attention import fused_attention
    from conceptlib.kerascv.textual_inversion import make_optimizer
    from conceptlib_jax.kernels import fast_kernels
    from conceptlib_jax.step import make_train_step, step_state

    import keras

    state = step_state(ti.frozen_state())
    data = random_device_data(args.batch, args.resolution, ti.vocab_size).tree()
    rows_var = keras.Variable(ti.token_table()[320:321], dtype="float32")
    optimizer = make_optimizer(1e-3, 1000)
    optimizer.build([rows_var])
    carry = (jax.numpy.array(rows_var.value, copy=True),
             [jax.numpy.array(v.value, copy=True) for v in optimizer.variables], jax.numpy.int32(0))
    key = jax.random.key(0)
    label = ",".join(kernels) or "none"
    attention = fused_attention(ti.diffusion_model, flash=True, cross_pad="crosspad" in kernels,
                                fuse_qkv="qkv" in kernels)
    patch = fast_kernels(ti.diffusion_model, conv="conv" in kernels, groupnorm="groupnorm" in kernels)
    try:
        started = time.perf_counter()
        compiled = make_train_step(ti, optimizer, args.batch).lower(carry, state, data, key).compile()
        compile_s = time.perf_counter() - started
    finally:
        attention.restore()
        patch.restore()
    hlo_text = compiled.as_text()
    layers = op_layers(hlo_text)
    file_label = label.replace(",", "_")
    if out is not None:
        with gzip.open(out / f"hlo-{file_label}.txt.gz", "wt") as handle:
            handle.write(hlo_text)
    for _ in range(3):
        carry, loss = compiled(carry, state, data, key)
    jax.block_until_ready(loss)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        carry, loss = compiled(carry, state, data, key)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - started)
    trace_dir = tempfile.mkdtemp(prefix="conceptlib-trace-")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.trace_steps):
            carry, loss = compiled(carry, state, data, key)
        jax.block_until_ready(loss)
    paths = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    by_op = collections.defaultdict(lambda: [0.0, ""])
    by_category = collections.defaultdict(float)
    by_layer = collections.defaultdict(lambda: collections.defaultdict(float))
    seen: list = []
    for name, op, ns in gpu_events(str(paths[-1]), seen):
        by_kernel[name][0] += ns
        by_kernel[name][1] += 1
        kind = category(name)
        by_op[op or name][0] += ns
        by_op[op or name][1] = kind
        by_category[kind] += ns
        direction, layer = layers.get(op.replace(".", "_"), ("?", op or name))
        by_layer[f"{direction} {layer}"][kind] += ns
    steps = args.trace_steps
    per_step = lambda ns: round(ns / steps / 1e6, 3)  # noqa: E731
    busy = sum(by_category.values())
    layer_rows = sorted(((sum(kinds.values()), layer, kinds) for layer, kinds in by_layer.items()), key=lambda r: -r[0])
    if out is not None:
        with open(out / f"ops-{file_label}.tsv", "w") as handle:
            handle.write("ms_per_step\tcategory\top\tdirection\tlayer\n")
            for op, (ns, kind) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
                direction, layer = layers.get(op.replace(".", "_"), ("?", ""))
                handle.write(f"{per_step(ns)}\t{kind}\t{op}\t{direction}\t{layer}\n")
    top_kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]
    top_ops = sorted(by_op.items(), key=lambda kv: -kv[1][0])[: args.top]
    return {
        "kind": "profile", "kernels": label, "batch_size": args.batch, "resolution": args.resolution,
        "ms_per_step": round(statistics.median(times) * 1000, 2),
        "samples_per_s": round(args.batch / statistics.median(times), 1),
        "gpu_busy_ms_per_step": per_step(busy), "compile_s": round(compile_s, 1),
        "categories": {k: per_step(v) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "kernel_launches_per_step": round(sum(c for _, c in by_kernel.values()) / steps),
        "top_kernels": [[name[:120], per_step(ns), round(calls / steps, 1)] for name, (ns, calls) in top_kernels],
        "top_ops": [[op[:80], per_step(ns), kind] for op, (ns, kind) in top_ops],
        "top_layers": [[layer[:100], per_step(total), {k: per_step(v) for k, v in kinds.items()}]
                       for total, layer, kinds in layer_rows[: args.top * 2]],
        "device": str(jax.devices()[0].device_kind),
        "trace_lines": seen[:12],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--kernels", default="default", help="kernel sets separated by ';' or ',' between 'none' and 'default'; "
                        "a set is '+'-joined names (conv+groupnorm), 'none' or 'default'")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    for path in reversed(source_paths(Path(tempfile.mkdtemp(prefix="conceptlib-ep-")))):
        sys.path.insert(0, path)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from conceptlib_jax.trainer import DEFAULT_KERNELS, build_models, parse_kernels

    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    ti = build_models("sd-1", args.resolution, None, precision="bf16")
    for spec in args.kernels.replace(";", ",").split(","):
        spec = spec.strip()
        kernels = DEFAULT_KERNELS if spec == "default" else parse_kernels(spec.replace("+", ","))
        try:
            line = profile(ti, kernels, args, out)
        except Exception as exc:  # report and go on with the next set
            line = {"kind": "profile", "kernels": spec, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
