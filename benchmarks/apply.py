"""Seconds to apply 1, 100 and 1,000 concepts to a StableDiffusion instance on CPU.

Prints ONE JSON line. ``apply_s`` is for Concept objects already in memory; ``apply_library_s``
for library names (header listing + reading each concept file); ``unload_s`` for the matching
unload. Each number is the best of --repeats runs; ``apply_first_call_s`` is the first run of
each count (the very first includes one-time warm-up). The text encoder is random (weights can't be
downloaded here), which does not change the cost: apply never runs the encoder.

    python benchmarks/apply.py [--model sd-1|sd-2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["sd-1", "sd-2"], default="sd-1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--counts", default="1,100,1000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    import numpy as np

    from conceptlib import Concept
    from conceptlib.concept import DIMS
    from conceptlib.kerascv.apply import apply
    from conceptlib.kerascv.models import build_stable_diffusion
    from conceptlib.library import ConceptLibrary

    dim = DIMS[args.model]
    rng = np.random.default_rng(0)
    concepts = [
        Concept(f"c{i:04d}", f"<c{i:04d}>", rng.normal(0, 0.05, size=(1 + i % 4, dim)).astype(np.float32))
        for i in range(max(counts))
    ]
    sd = build_stable_diffusion(args.model, 512)
    sd.text_encoder  # noqa: B018  build outside the timing
    sd.tokenizer  # noqa: B018
    sd.encode_text("warm up")  # a traced predict function exists, as in real use

    with tempfile.TemporaryDirectory() as tmp:
        library = ConceptLibrary(tmp)
        for concept in concepts:
            library.add(concept)
        library.list()  # the header index exists, as in a library that has been used before

        apply_s, library_s, unload_s, first_s = {}, {}, {}, {}
        for count in counts:
            best_apply = best_library = best_unload = float("inf")
            names = [c.name for c in concepts[:count]]
            for repeat in range(args.repeats):
                start = time.perf_counter()
                applied = apply(sd, concepts[:count])
                best_apply = min(best_apply, time.perf_counter() - start)
                if repeat == 0:
                    first_s[str(count)] = round(time.perf_counter() - start, 4)
                start = time.perf_counter()
                applied.unload()
                best_unload = min(best_unload, time.perf_counter() - start)

                start = time.perf_counter()
                applied = apply(sd, names, library=library)
                best_library = min(best_library, time.perf_counter() - start)
                applied.unload()
            apply_s[str(count)] = round(best_apply, 4)
            library_s[str(count)] = round(best_library, 4)
            unload_s[str(count)] = round(best_unload, 4)

    # The model still works after all of that.
    with apply(sd, concepts[:3]):
        sd.encode_text("a <c0001> next to <c0002>")

    import keras

    print(json.dumps({
        "benchmark": "apply",
        "model": args.model,
        "backend": keras.backend.backend(),
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "vectors_per_concept": "1-4 (cycling)",
        "apply_s": apply_s,
        "apply_first_call_s": first_s,
        "apply_library_s": library_s,
        "unload_s": unload_s,
    }))


if __name__ == "__main__":
    main()
