"""On the JAX backend keras-cv's Stable Diffusion modules load without TensorFlow
(``conceptlib.kerascv.sd_modules``), and a later ``import keras_cv`` still sees the same classes.

Keras fixes its backend per process and a module import is once per process, so each case runs
this file as a worker subprocess that prints one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _worker(case: str) -> None:
    from conceptlib.kerascv import models, sd_modules
    from conceptlib.kerascv.tokenizer import make_tokenizer

    if case == "unchecked-version":
        sd_modules.CHECKED_VERSIONS = ()
    if case == "failing":  # loads keras-cv's modules, then fails as a changed layout might
        real = sd_modules._import_without_tensorflow

        def failing(full, keras):
            real(full, keras)
            raise AttributeError("module 'keras_cv.src.backend' has no attribute 'something_new'")

        sd_modules._import_without_tensorflow = failing
    # Two threads at once (as the jax trainer's background model builds): each gets whole modules.
    import threading

    sys.setswitchinterval(1e-6)
    got = {}

    def load(name, attribute):
        got[name] = hasattr(sd_modules.stable_diffusion_module(name), attribute)

    threads = [threading.Thread(target=load, args=args)
               for args in (("stable_diffusion", "StableDiffusion"), ("text_encoder", "TextEncoder"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sys.setswitchinterval(0.005)
    encoder = models.build_text_encoder("sd-1")
    ids = make_tokenizer(download=False).encode("a photo of a cat")
    report = {"threads": got, "tensorflow_after_build": "tensorflow" in sys.modules,
              "skipped": sd_modules.tensorflow_skipped(),
              "ids": ids, "outputs": [list(o.shape) for o in encoder.outputs]}
    import keras_cv

    report.update({
        "tensorflow_after_import": "tensorflow" in sys.modules,
        "same_encoder_class": type(encoder) is keras_cv.models.stable_diffusion.TextEncoder,
        # The modules loaded before are the real packages' attributes, as after a plain import.
        "submodule_attribute": keras_cv.src.models.stable_diffusion.text_encoder.TextEncoder is type(encoder),
        "same_sd_class": keras_cv.models.StableDiffusion
        is sd_modules.stable_diffusion_module("stable_diffusion").StableDiffusion,
    })
    print(json.dumps(report))


def _run(case: str, backend: str) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, __file__, case], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_jax_backend_builds_keras_cv_models_without_tensorflow():
    report = _run("lite", "jax")
    assert not report["tensorflow_after_build"] and report["skipped"]
    assert report["ids"][:5] == [49406, 320, 1125, 539, 320]  # "<start> a photo of a"
    assert report["outputs"] == [[None, 77, 768]]
    # The whole package imported afterwards (by a user's code, say) reuses the loaded modules.
    assert report["tensorflow_after_import"]
    assert report["same_encoder_class"] and report["same_sd_class"] and report["submodule_attribute"]
    assert report["threads"] == {"stable_diffusion": True, "text_encoder": True}


@pytest.mark.parametrize("case,backend", [("unchecked-version", "jax"), ("failing", "jax"), ("lite", "tensorflow")])
def test_other_versions_backends_and_failures_import_the_whole_package(case, backend):
    report = _run(case, backend)
    assert report["tensorflow_after_build"] and not report["skipped"]
    assert report["same_encoder_class"] and report["same_sd_class"]


if __name__ == "__main__":
    _worker(sys.argv[1])
