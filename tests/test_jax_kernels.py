"""The jax trainer's UNet rewrites compute keras-cv's function on the same weights.

The rewrites (conceptlib_jax.kernels: explicit-padding convolutions, float32-stat group norm;
conceptlib.kerascv.attention: fused q/k/v projections, cross-attention padded to 128 keys and
masked), all together (the trainer's default), are installed on keras-cv's SD 1 DiffusionModel
(64 px, fp32, random weights) and its output, and its gradient with respect to the text context
(the path the new rows' gradient takes), are compared with the unmodified model's, each computed
under jax.jit as the trainer's step is. SD 2's DiffusionModelV2 (1024-d context, 5/10/20 heads of 64, Dense instead of 1x1-conv
projections around its transformers) is checked with all rewrites at once: one comparison covers
what differs, and each compile of a UNet costs ~30 s on CPU. Keras fixes its backend per process,
so a worker subprocess (``python tests/test_jax_kernels.py OUT.npz WEIGHTS_DIR``) runs on the JAX
backend and builds both models in turn, one at a time. It keeps a compilation cache in the test's
folder, so the model after ``restore()`` (the same program as the reference) is not compiled twice.

SD 1 is loaded from the session's ``weights init-random`` files (no random initialisers to run:
~20 s less on the JAX backend); SD 2 has no such files and is randomly initialised. Either way
every bias, norm gamma and beta is then set to deterministic non-trivial values: as initialised
(or written by init-random) they are 0, 1 and 0, and a rewrite that dropped a bias add or swapped
gamma and beta would compute the same function.
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
SEED = 5
# "all" (the trainer's default) checks every rewrite; a subset (CONCEPTLIB_JAX_KERNELS) needs no
# run of its own (each UNet compile costs ~30 s on CPU). The convolution and group-norm rewrites
# each replace one kind of layer whatever else is on. An attention layer projects (fused or not),
# then attends (cross-attention padded or not), one after the other: the fused and padded pieces
# are checked here, the unfused and unpadded ones by tests/test_jax_equivalence.py (the fused
# attention patch with both options off, against keras-cv and the TensorFlow trainer).
VARIANTS = {
    "all": dict(conv=True, groupnorm=True, fuse_qkv=True, cross_pad=True),
}
# Base model -> (key prefix, text context dim, the variants checked on it). The worker's results
# are "<prefix>_<ref|variant|restored>_<out|grad|counts>"; restoring is the same code on either
# model, so it is checked on SD 1 only.
MODELS = {
    "sd-1": ("sd1", 768, list(VARIANTS)),
    "sd-2": ("sd2", 1024, ["all"]),
}
CASES = [(base, name) for base, (_, _, names) in MODELS.items() for name in names]


def check_model(base_model: str, results: dict, weights_dir: str) -> None:
    """Build ``base_model``'s UNet (SD 1 from the files in ``weights_dir``), give its 1-D variables
    non-trivial values, run the reference and each of its variants (and, on SD 1, the model again
    after restoring); add the arrays to ``results``."""
    import jax
    import jax.numpy as jnp
    from helpers import deterministic_weights, trivial_1d_weights

    from conceptlib.kerascv import models
    from conceptlib.kerascv.attention import fused_attention
    from conceptlib.weights import resolve_weights
    from conceptlib_jax.kernels import fast_kernels

    prefix, dim, names = MODELS[base_model]
    files = resolve_weights(base_model, weights_dir, ["diffusion_model"], download=False) if base_model == "sd-1" else None
    model = models.build_diffusion_model(base_model, RES, files)
    deterministic_weights([model], SEED, only_1d=True)
    results[f"{prefix}_trivial_1d"] = np.asarray(len(trivial_1d_weights([model])))
    results[f"{prefix}_1d"] = np.asarray(sum(len(v.shape) == 1 for v in model.weights))
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((BATCH, RES // 8, RES // 8, 4)).astype(np.float32)
    t_emb = rng.standard_normal((BATCH, 320)).astype(np.float32)
    context = rng.standard_normal((BATCH, 77, dim)).astype(np.float32)
    weights = jnp.asarray(rng.standard_normal((BATCH, RES // 8, RES // 8, 4)).astype(np.float32))
    variables = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]

    def run():
        # Jitted as in the trainer's step (a rewrite must also trace), with the weights as
        # arguments: closed over, XLA would constant-fold them for minutes.
        def f(variables, ctx):
            out, _ = model.stateless_call(*variables, [latents, t_emb, ctx])
            return jnp.sum(out * weights), out

        (_, out), grad = jax.jit(jax.value_and_grad(f, argnums=1, has_aux=True))(variables, jnp.asarray(context))
        return np.asarray(out), np.asarray(grad)

    results[f"{prefix}_ref_out"], results[f"{prefix}_ref_grad"] = run()
    for name in names:
        opts = VARIANTS[name]
        attention = fused_attention(model, fuse_qkv=opts.get("fuse_qkv", False), cross_pad=opts.get("cross_pad", False))
        kernels = fast_kernels(model, conv=opts.get("conv", False), groupnorm=opts.get("groupnorm", False))
        try:
            results[f"{prefix}_{name}_out"], results[f"{prefix}_{name}_grad"] = run()
            results[f"{prefix}_{name}_counts"] = np.asarray(
                [len(kernels.convs), len(kernels.norms), attention.cross_pad_calls, attention.plain_calls]
            )
        finally:
            kernels.restore()
            attention.restore()
    if base_model == "sd-1":
        results[f"{prefix}_restored_out"], _ = run()
        nothing = fast_kernels(model, conv=False, groupnorm=False)  # only what is asked for
        results[f"{prefix}_nothing_counts"] = np.asarray([len(nothing.convs), len(nothing.norms)])
        nothing.restore()


def worker(out: str, weights_dir: str) -> None:
    import gc

    results: dict = {}
    for base_model in MODELS:
        check_model(base_model, results, weights_dir)
        gc.collect()  # the next UNet is built only once this one's ~3.4 GB are freed
    np.savez(out, **results)


@pytest.fixture(scope="module")
def results(tmp_path_factory, random_weights):
    out = tmp_path_factory.mktemp("jax-kernels") / "out.npz"
    weights, _ = random_weights
    env = dict(
        os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax-cache"),
    )
    proc = subprocess.run([sys.executable, __file__, str(out), str(weights)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.slow
@pytest.mark.parametrize("base_model, name", CASES)
def test_rewrite_matches_keras_cv(results, base_model, name):
    prefix = MODELS[base_model][0]
    # Every bias, gamma and beta holds a value that a dropped or swapped term would change.
    assert results[f"{prefix}_1d"] > 300 and results[f"{prefix}_trivial_1d"] == 0
    ref_out, ref_grad = results[f"{prefix}_ref_out"], results[f"{prefix}_ref_grad"]
    assert np.abs(ref_out).max() > 0 and np.abs(ref_grad).max() > 0
    assert ref_grad.shape == (BATCH, 77, MODELS[base_model][1])
    out, grad = results[f"{prefix}_{name}_out"], results[f"{prefix}_{name}_grad"]
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-3, atol=1e-4 * np.abs(ref_grad).max())


@pytest.mark.slow
def test_rewrites_reach_every_layer(results):
    convs, norms, cross_pad, plain = results["sd1_all_counts"]
    assert convs > 50 and norms > 40  # every ResBlock/transformer conv and norm of the SD 1 UNet
    assert cross_pad == 16 and plain == 16  # 16 cross-attentions padded, 16 self-attentions plain on CPU
    assert list(results["sd1_nothing_counts"]) == [0, 0]


@pytest.mark.slow
def test_rewrites_reach_every_layer_of_sd2(results):
    convs, norms, cross_pad, plain = results["sd2_all_counts"]
    sd1_convs, sd1_norms, _, _ = results["sd1_all_counts"]
    # Same ResBlocks and norms as SD 1; its 16 transformers project in and out with Dense layers
    # (fully_connected=True) where SD 1 has two 1x1 convolutions each.
    assert convs == sd1_convs - 2 * 16 and norms == sd1_norms
    assert cross_pad == 16 and plain == 16  # its 16 cross-attentions (1024-d keys) padded


@pytest.mark.slow
def test_restore_gives_back_keras_cv_layers(results):
    np.testing.assert_array_equal(results["sd1_restored_out"], results["sd1_ref_out"])


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
