"""Training previews (``TextualInversion.sample``) compiled as one function give the images of the
op-by-op loop they replaced, on both backends.

Real keras-cv text encoder, UNet and decoder (random weights, 64 px), built once per backend in a
worker subprocess (this file run as a script: Keras fixes its backend per process). The worker
runs the reference loop below (``sample`` before it was compiled, op by op) and the compiled
``sample`` on the same inputs, and reports the arrays; the tests compare them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

STEPS = 2  # denoising steps: enough for the loop to carry its latent from one step to the next
BIAS_SHIFT = 0.25


@pytest.fixture(scope="module", params=["tensorflow", "jax"])
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"preview-{request.param}") / "report.npz"
    env = dict(os.environ, KERAS_BACKEND=request.param, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__, request.param, str(out)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{request.param} worker failed:\n{proc.stderr[-4000:]}"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_compiled_preview_equals_the_op_by_op_loop(report):
    reference, compiled = report["reference_decoded"], report["decoded"]
    assert reference.shape == compiled.shape == (2, 64, 64, 3)
    assert np.all(np.isfinite(reference)) and np.abs(reference).max() > 0.1
    # Float tolerance: the compiled graph may fuse and order the convolutions' sums differently.
    np.testing.assert_allclose(compiled, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    images, reference_images = report["images"], report["reference_images"]
    assert images.dtype == np.uint8 and images.shape == (2, 64, 64, 3)
    # uint8 rounding may flip where the float lands on a boundary, by one level at most.
    assert np.abs(images.astype(int) - reference_images.astype(int)).max() <= 1
    assert np.mean(images != reference_images) < 0.01


def test_repeated_previews_reuse_the_compiled_function(report):
    assert bool(report["same_function"])
    # Other vectors, same function: the vectors are an argument, not traced in as constants...
    assert np.abs(report["decoded_other_rows"] - report["decoded"]).max() > 1e-3
    # ...and so are the weights: shifting the decoder's last bias shifts the images by as much.
    np.testing.assert_allclose(
        report["decoded_bias_shifted"], report["decoded_other_rows"] + BIAS_SHIFT, rtol=0, atol=1e-4
    )


# ------------------------------------------------------------------------------------------------
# Worker: python tests/test_train_preview.py BACKEND OUT.npz


def _reference_decoded(ti, new_rows, token_ids, latent_noise, *, num_steps, guidance=7.5):
    """``TextualInversion.sample`` as it was before it was compiled (op by op, eager), up to the
    decoder's float output."""
    from keras import ops
    from keras_cv.src.models.stable_diffusion.constants import _ALPHAS_CUMPROD

    from conceptlib.kerascv.textual_inversion import (
        END_OF_TEXT, MAX_LENGTH, START_OF_TEXT, TRAIN_TIMESTEPS, timestep_embedding,
    )

    state = {
        "token_table": ti._token_table.value,
        "position_table": ti._position_table.value,
        "text": ti._values(ti.text_tail),
    }
    batch = int(token_ids.shape[0])
    unconditional = np.full((1, MAX_LENGTH), END_OF_TEXT, dtype=np.int32)
    unconditional[0, 0] = START_OF_TEXT
    context = ti.encode_text(new_rows, state, ops.convert_to_tensor(token_ids, "int32"))
    uncond = ops.repeat(ti.encode_text(new_rows, state, unconditional), batch, axis=0)
    ratio = (TRAIN_TIMESTEPS - 1) / (num_steps - 1) if num_steps > 1 else TRAIN_TIMESTEPS
    timesteps = (np.arange(0, num_steps) * ratio).round().astype(np.int64)
    alphas = [_ALPHAS_CUMPROD[t] for t in timesteps]
    alphas_prev = [1.0] + alphas[:-1]
    latent = ops.convert_to_tensor(latent_noise, "float32")
    for index, timestep in list(enumerate(timesteps))[::-1]:
        t_emb = timestep_embedding(np.full((batch,), timestep, dtype=np.int32))
        both = ti.diffusion_model(
            [ops.concatenate([latent, latent]), ops.concatenate([t_emb, t_emb]), ops.concatenate([uncond, context])],
            training=False,
        )
        eps_uncond, eps_cond = both[:batch], both[batch:]
        eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        a_t, a_prev = alphas[index], alphas_prev[index]
        pred_x0 = (latent - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        latent = eps * math.sqrt(1.0 - a_prev) + math.sqrt(a_prev) * pred_x0
    return np.asarray(ops.convert_to_numpy(ti.decoder(latent, training=False)))


def _to_uint8(decoded):
    return np.clip((decoded + 1) / 2 * 255, 0, 255).astype(np.uint8)


def _worker(out: str) -> None:
    import warnings

    from keras import ops

    from conceptlib.kerascv import models
    from conceptlib.kerascv.textual_inversion import TextualInversion

    warnings.filterwarnings("ignore", message="You are using a softmax over axis")
    ti = TextualInversion(
        models.build_text_encoder("sd-1"), models.build_diffusion_model("sd-1", 64), None,
        models.build_decoder("sd-1", 64),
    )
    rng = np.random.default_rng(0)
    # A prompt holding both new vectors (ids vocab_size, vocab_size + 1) between ordinary tokens.
    new = ti.new_ids(2)
    ids = np.full((2, 77), 49407, dtype=np.int32)
    ids[:, :6] = [49406, 320, 1125, new[0], new[1], 539]
    rows = (ti.token_table()[[1125, 539]] + rng.standard_normal((2, 768)) * 0.01).astype(np.float32)
    other_rows = rows[::-1].copy()
    noise = rng.standard_normal((2, 8, 8, 4), dtype=np.float32)

    report = {"reference_decoded": _reference_decoded(ti, rows, ids, noise, num_steps=STEPS)}
    report["reference_images"] = _to_uint8(report["reference_decoded"])
    report["images"] = ti.sample(rows, ids, noise, num_steps=STEPS)
    function = ti._compiled_sampler()
    report["decoded"] = ti.sample_decoded(rows, ids, noise, num_steps=STEPS)
    report["decoded_other_rows"] = ti.sample_decoded(other_rows, ids, noise, num_steps=STEPS)
    bias = ti.decoder.layers[-1].trainable_variables[-1]  # the output convolution's bias
    assert tuple(bias.shape) == (3,)
    bias.assign(ops.convert_to_numpy(bias) + BIAS_SHIFT)
    report["decoded_bias_shifted"] = ti.sample_decoded(other_rows, ids, noise, num_steps=STEPS)
    report["same_function"] = np.asarray(ti._compiled_sampler() is function)
    np.savez(out, **report)


if __name__ == "__main__":
    os.environ["KERAS_BACKEND"] = sys.argv[1]
    _worker(sys.argv[2])
