"""Benchmark the concept library: prints ONE JSON line.

* ``list_warm_s``: wall seconds of ``conceptlib list`` as a process over 10,000 concepts,
  warm (index built by an earlier run, files in the page cache); median of 5 runs.
* ``list_cold_index_s``: the first ``conceptlib list`` (no index yet: reads every header).
* ``import_s``: ``conceptlib import FOLDER`` as a process, 1,000 files (half diffusers
  learned_embeds-style .safetensors, half AUTOMATIC1111 .pt zip pickles) into an empty library.

Concept files carry realistic metadata (training settings, loss history, a ~9 KB base64 preview).

    python benchmarks/library.py [--concepts 10000] [--files 1000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from conceptlib.concept import Concept
from conceptlib.files import concept_metadata
from conceptlib.pickle_safe import dump_tensor_pickle


def _metadata(i: int, rng) -> dict[str, str]:
    return {
        "init_tokens": json.dumps(["doll"]),
        "trainer": "tensorflow",
        "trainer_version": "0.1.0",
        "training": json.dumps({"steps": 3000, "batch_size": 1, "learning_rate": 0.005, "resolution": 512,
                                "template_pack": "builtin:object", "seed": i, "num_vectors": 1}),
        "final_loss": "0.1234",
        "loss_history": json.dumps([round(float(x), 4) for x in rng.random(100)]),
        "image_sha256": json.dumps([f"{i:064x}"] * 5),
        "preview": base64.b64encode(rng.bytes(9000)).decode(),
    }


def _run(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=1_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # The installed console script, exactly what a user runs.
    script = shutil.which("conceptlib")
    cli = [script] if script else [sys.executable, "-c", "from conceptlib.cli import main; main()"]
    work = Path(tempfile.mkdtemp(prefix="conceptlib-bench-"))
    try:
        home = work / "lib"
        concepts = home / "concepts"
        concepts.mkdir(parents=True)
        for i in range(args.concepts):
            concept = Concept(f"concept-{i:05d}", f"<concept-{i:05d}>", rng.standard_normal((1, 768), dtype=np.float32),
                              _metadata(i, rng))
            # Setup only: plain writes (the library's fsync'd writes would just slow the setup).
            (concepts / f"{concept.name}.safetensors").write_bytes(
                save({concept.token: concept.vectors}, metadata=concept_metadata(concept)))
        env = dict(os.environ, CONCEPTLIB_HOME=str(home), TF_CPP_MIN_LOG_LEVEL="2")
        cold = _run(cli + ["list"], env)
        warm = statistics.median(_run(cli + ["list"], env) for _ in range(5))
        warm_json = statistics.median(_run(cli + ["list", "--json"], env) for _ in range(3))

        folder = work / "incoming"
        folder.mkdir()
        for i in range(args.files):
            vectors = rng.standard_normal((2, 768), dtype=np.float32)
            if i % 2:
                (folder / f"style-{i:04d}.pt").write_bytes(dump_tensor_pickle(
                    {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": f"style-{i:04d}",
                     "step": 1000, "sd_checkpoint": None, "sd_checkpoint_name": None}))
            else:
                (folder / f"thing-{i:04d}.safetensors").write_bytes(save({f"<thing-{i:04d}>": vectors}))
        import_env = dict(env, CONCEPTLIB_HOME=str(work / "import-lib"))
        imported = _run(cli + ["import", str(folder)], import_env)
        count = len(list((work / "import-lib" / "concepts").glob("*.safetensors")))
        if count != args.files:
            raise SystemExit(f"import stored {count} of {args.files} files")
        print(json.dumps({
            "benchmark": "library",
            "concepts": args.concepts,
            "list_warm_s": round(warm, 4),
            "list_json_warm_s": round(warm_json, 4),
            "list_cold_index_s": round(cold, 4),
            "import_files": args.files,
            "import_s": round(imported, 4),
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        }))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
