"""Does XLA compile several programs at once in one process? One JSON line.

Issue 5's first-run target is bounded by the step's XLA compile (31-60 s on one H100), most of it
single-threaded HLO passes. If compiles running in parallel threads overlap, a step cut into
pieces (each jitted on its own) could compile in a fraction of the time; if they serialize, it
cannot. This compiles the jax trainer's exported step (``step.bin`` of a step-cache entry, written
by a first ``conceptlib train --trainer jax`` run) with the persistent cache off: once alone (the
first also fills XLA's in-process autotuning results), once alone again, then ``--threads`` copies
at once. Run it with the trainer's XLA_FLAGS for comparable numbers.

    python3 benchmarks/gpu_compile_threads.py PATH/TO/conceptlib-steps/KEY/step.bin --threads 4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", help="step.bin of a step-cache entry")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    import jax
    from jax import export as jax_export

    jax.config.update("jax_enable_compilation_cache", False)
    with open(args.step, "rb") as handle:
        exported = jax_export.deserialize(bytearray(handle.read()))
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals]
    call_args, call_kwargs = jax.tree_util.tree_unflatten(exported.in_tree, specs)

    def compile_once(_=None) -> float:
        start = time.perf_counter()
        # A new function each time: jax would otherwise return its in-memory executable.
        jax.jit(lambda *a, **k: exported.call(*a, **k)).lower(*call_args, **call_kwargs).compile()
        return time.perf_counter() - start

    first = compile_once()
    alone = compile_once()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.threads) as pool:
        each = list(pool.map(compile_once, range(args.threads)))
    together = time.perf_counter() - start
    print(json.dumps({
        "benchmark": "gpu_compile_threads",
        "device": str(jax.devices()[0].device_kind),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "first_compile_s": round(first, 2),
        "compile_alone_s": round(alone, 2),
        "threads": args.threads,
        "together_wall_s": round(together, 2),
        "together_each_s": [round(x, 2) for x in each],
        "overlap": round(args.threads * alone / together, 2),
    }))


if __name__ == "__main__":
    main()
