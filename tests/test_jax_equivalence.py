"""The JAX trainer computes the TensorFlow trainer's loss and gradient; the fused attention path
computes keras-cv's attention.

Keras fixes its backend per process, so each backend runs this file as a worker subprocess
(``python tests/test_jax_equivalence.py BACKEND OUT.npz WEIGHTS_DIR``) on the same weights and
batch, and the test compares the .npz files. One model build per backend, at 64 px, fp32.

The weights are the session's ``weights init-random`` files (conftest's random_weights), so both
processes load identical values and run no random initialisers; every 1-D variable (biases, norm
gammas and betas, which those files hold at 0, 1 and 0) is then set to deterministic non-trivial
values (helpers.deterministic_weights), so the bias adds and norm scales are really compared.

- TensorFlow: the reference path (TextualInversion.loss under tf.GradientTape, as the
  TensorFlow trainer's step does: VAE posterior sample, concat-table text encoding, keras-cv's
  own attention).
- JAX: the JAX trainer's path (posterior moments computed once, FastTextualInversion's
  select-based lookup, the fused attention patch, jax.value_and_grad w.r.t. the new rows), plus
  the UNet's output with and without the fused attention on the same inputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RES = 64
BATCH = 2
NUM_NEW = 2
SEED = 1234


def _batch(vocab: int, dim: int):
    rng = np.random.default_rng(SEED)
    ids = np.full((BATCH, 77), 49407, dtype=np.int32)
    ids[:, 0] = 49406
    ids[0, 1:6] = [320, 1125, 539, vocab, vocab + 1]  # "a photo of <new0> <new1>"
    ids[1, 1:5] = [320, vocab + 1, 2368, vocab]  # the new ids in another order
    latent = RES // 8
    return {
        "images": rng.uniform(-1, 1, (BATCH, RES, RES, 3)).astype(np.float32),
        "token_ids": ids,
        "posterior_noise": rng.standard_normal((BATCH, latent, latent, 4), dtype=np.float32),
        "noise": rng.standard_normal((BATCH, latent, latent, 4), dtype=np.float32),
        "timesteps": np.asarray([17, 803], dtype=np.int32),
        "new_rows": (0.02 * rng.standard_normal((NUM_NEW, dim))).astype(np.float32),
    }


def worker(backend: str, out: str, weights_dir: str) -> None:
    from helpers import deterministic_weights

    from conceptlib.kerascv import models
    from conceptlib.weights import resolve_weights

    files = resolve_weights("sd-1", weights_dir, ["text_encoder", "diffusion_model", "image_encoder"], download=False)
    text_encoder = models.build_text_encoder("sd-1", files)
    diffusion_model = models.build_diffusion_model("sd-1", RES, files)
    image_encoder = models.build_image_encoder(RES, files)
    deterministic_weights([text_encoder, diffusion_model, image_encoder], SEED, only_1d=True)
    results = {}
    if backend == "tensorflow":
        import tensorflow as tf

        from conceptlib.kerascv.textual_inversion import TextualInversion

        from conceptlib_tensorflow import loss_and_grad

        ti = TextualInversion(text_encoder, diffusion_model, image_encoder)
        batch = _batch(ti.vocab_size, ti.dim)
        # What the TensorFlow trainer's step (conceptlib_tensorflow.make_train_step) differentiates;
        # with 2 parts, its gradient accumulation (--grad-accum 2: two batches of 1).
        rows = tf.constant(batch.pop("new_rows"))
        for prefix, parts in (("", 1), ("accum_", 2)):
            loss, grad = loss_and_grad(ti, rows, ti.frozen_state(), batch, parts)
            results[prefix + "loss"], results[prefix + "grad"] = np.asarray(loss), np.asarray(grad)
    else:
        import jax
        import jax.numpy as jnp

        from conceptlib.kerascv.attention import fused_attention
        from conceptlib.kerascv.textual_inversion import VAE_SCALE
        from conceptlib_jax.step import accumulated, fast_textual_inversion_class, loss_and_grad_fn
        from conceptlib_jax.step import posterior_moments_fn, step_state

        ti = fast_textual_inversion_class()(text_encoder, diffusion_model, image_encoder)
        batch = _batch(ti.vocab_size, ti.dim)
        state = ti.frozen_state()
        mean, std = posterior_moments_fn(ti)(state["vae"], batch["images"])
        latents = (mean + std * batch["posterior_noise"]) * VAE_SCALE
        unet_inputs = [
            np.asarray(latents), np.random.default_rng(7).standard_normal((BATCH, 320)).astype(np.float32),
            np.random.default_rng(8).standard_normal((BATCH, 77, 768)).astype(np.float32),
        ]
        results["unet_keras_cv"] = np.asarray(diffusion_model(unet_inputs))
        with fused_attention(diffusion_model, flash=False) as patch:
            results["unet_fused"] = np.asarray(diffusion_model(unet_inputs))
            value_and_grad = jax.jit(loss_and_grad_fn(ti))
            loss, grad = value_and_grad(
                jnp.asarray(batch["new_rows"]), step_state(state), latents,
                batch["noise"], batch["timesteps"], batch["token_ids"],
            )
            # The trainer pads the new rows to vector_rows(n): rows never in a prompt (here with
            # values, to show they cannot leak) must change nothing. The loss sees the rows only
            # through the text encoding, so that is where it is checked (a UNet compile less):
            # the same encoding, and the same pull-back of a cotangent onto the real rows, none
            # onto the padding.
            padding = np.random.default_rng(9).standard_normal((2, ti.dim)).astype(np.float32)
            encode = jax.jit(lambda rows: ti.encode_text(rows, step_state(state), jnp.asarray(batch["token_ids"])))
            cotangent = jnp.asarray(np.random.default_rng(10).standard_normal((BATCH, 77, ti.dim)).astype(np.float32))
            for prefix, rows in (("", batch["new_rows"]), ("padded_", np.concatenate([batch["new_rows"], padding]))):
                encoding, pull_back = jax.vjp(encode, jnp.asarray(rows))
                results[prefix + "encoding"] = np.asarray(encoding)
                results[prefix + "encoding_grad"] = np.asarray(pull_back(cotangent)[0])
            # The JAX trainer's gradient accumulation, two parts of 1.
            accum_loss, accum_grad = jax.jit(accumulated(loss_and_grad_fn(ti), 2))(
                jnp.asarray(batch["new_rows"]), step_state(state), latents,
                batch["noise"], batch["timesteps"], batch["token_ids"],
            )
            results["accum_loss"], results["accum_grad"] = np.asarray(accum_loss), np.asarray(accum_grad)
            results["patched_layers"] = np.asarray(len(patch.layers))
            results["plain_calls"] = np.asarray(patch.plain_calls)
        results["unet_restored"] = np.asarray(diffusion_model(unet_inputs))
        results["loss"] = np.asarray(loss)
        results["grad"] = np.asarray(grad)
    np.savez(out, **results)


def _run_worker(backend: str, out: Path, weights: Path) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, __file__, backend, str(out), str(weights)], env=env, capture_output=True, text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"{backend} worker failed:\n{proc.stderr[-4000:]}"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def results(tmp_path_factory, random_weights):
    folder = tmp_path_factory.mktemp("jax-equivalence")
    weights, _ = random_weights
    # Sequential, not parallel: each worker holds a full SD model (~7 GB) on a shared machine.
    return {backend: _run_worker(backend, folder / f"{backend}.npz", weights) for backend in ("tensorflow", "jax")}


@pytest.mark.slow
def test_jax_loss_equals_tensorflow_loss(results):
    tf_loss, jax_loss = float(results["tensorflow"]["loss"]), float(results["jax"]["loss"])
    assert np.isfinite(tf_loss) and tf_loss > 0
    np.testing.assert_allclose(jax_loss, tf_loss, rtol=1e-4)


@pytest.mark.slow
def test_jax_gradient_on_new_rows_equals_tensorflow(results):
    tf_grad, jax_grad = results["tensorflow"]["grad"], results["jax"]["grad"]
    assert tf_grad.shape == jax_grad.shape == (NUM_NEW, 768)
    # Both new rows are used by the batch, so both must get a real gradient.
    assert np.all(np.linalg.norm(tf_grad, axis=1) > 0)
    np.testing.assert_allclose(jax_grad, tf_grad, rtol=1e-3, atol=1e-4 * np.abs(tf_grad).max())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_gradient_accumulation_gives_the_whole_batchs_loss_and_gradient(results, backend):
    """Two parts of 1 (--grad-accum 2), averaged, are the batch of 2 at once: each trainer's
    accumulation against the TensorFlow trainer's whole batch."""
    reference, accumulated = results["tensorflow"], results[backend]
    np.testing.assert_allclose(float(accumulated["accum_loss"]), float(reference["loss"]), rtol=1e-4)
    tf_grad = reference["grad"]
    np.testing.assert_allclose(accumulated["accum_grad"], tf_grad, rtol=1e-3, atol=1e-4 * np.abs(tf_grad).max())


@pytest.mark.slow
def test_padded_new_rows_give_the_same_loss_and_gradient(results):
    """The loss depends on the new rows only through the text encoding: the same encoding and the
    same pull-back onto the real rows (none onto the padding) mean the same loss and gradient."""
    jax_results = results["jax"]
    np.testing.assert_array_equal(jax_results["padded_encoding"], jax_results["encoding"])
    assert jax_results["padded_encoding_grad"].shape == (NUM_NEW + 2, 768)
    assert np.all(np.linalg.norm(jax_results["encoding_grad"], axis=1) > 0)
    np.testing.assert_array_equal(jax_results["padded_encoding_grad"][:NUM_NEW], jax_results["encoding_grad"])
    assert not np.any(jax_results["padded_encoding_grad"][NUM_NEW:])


@pytest.mark.slow
def test_fused_attention_matches_keras_cv_attention(results):
    jax_results = results["jax"]
    assert int(jax_results["patched_layers"]) == 32  # 16 transformer blocks x (self + cross)
    assert int(jax_results["plain_calls"]) >= 32
    reference = jax_results["unet_keras_cv"]
    assert np.abs(reference).max() > 0
    np.testing.assert_allclose(jax_results["unet_fused"], reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())
    # restore() gives the layers back their own call: bit-identical to before.
    np.testing.assert_array_equal(jax_results["unet_restored"], reference)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
