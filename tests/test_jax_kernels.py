"""The jax trainer's UNet rewrites compute keras-cv's function on the same weights.

Each rewrite (conceptlib_jax.kernels: explicit-padding convolutions, float32-stat group norm;
conceptlib.kerascv.attention: fused q/k/v projections, cross-attention padded to 128 keys and
masked) is installed on ONE keras-cv DiffusionModel (64 px, fp32, random weights) and its output,
and its gradient with respect to the text context (the path the new rows' gradient takes), are
compared with the unmodified model's. Keras fixes its backend per process, so a worker
subprocess (``python tests/test_jax_kernels.py OUT.npz``) runs on the JAX backend.
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
VARIANTS = {
    "conv": dict(conv=True),
    "groupnorm": dict(groupnorm=True),
    "qkv": dict(fuse_qkv=True),
    "crosspad": dict(cross_pad=True),
    "all": dict(conv=True, groupnorm=True, fuse_qkv=True, cross_pad=True),
}


def worker(out: str) -> None:
    import jax
    import jax.numpy as jnp

    from conceptlib.kerascv import models
    from conceptlib.kerascv.attention import fused_attention
    from conceptlib_jax.kernels import fast_kernels

    model = models.build_diffusion_model("sd-1", RES, None)
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((BATCH, RES // 8, RES // 8, 4)).astype(np.float32)
    t_emb = rng.standard_normal((BATCH, 320)).astype(np.float32)
    context = rng.standard_normal((BATCH, 77, 768)).astype(np.float32)
    weights = jnp.asarray(rng.standard_normal((BATCH, RES // 8, RES // 8, 4)).astype(np.float32))
    variables = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]

    def run():
        def f(ctx):
            out, _ = model.stateless_call(*variables, [latents, t_emb, ctx])
            return jnp.sum(out * weights), out

        (_, out), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(context))
        return np.asarray(out), np.asarray(grad)

    results = {}
    results["ref_out"], results["ref_grad"] = run()
    for name, opts in VARIANTS.items():
        attention = fused_attention(model, fuse_qkv=opts.get("fuse_qkv", False), cross_pad=opts.get("cross_pad", False))
        kernels = fast_kernels(model, conv=opts.get("conv", False), groupnorm=opts.get("groupnorm", False))
        try:
            results[f"{name}_out"], results[f"{name}_grad"] = run()
            results[f"{name}_counts"] = np.asarray(
                [len(kernels.convs), len(kernels.norms), attention.cross_pad_calls, attention.plain_calls]
            )
        finally:
            kernels.restore()
            attention.restore()
    results["restored_out"], _ = run()
    np.savez(out, **results)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax-kernels") / "out.npz"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"worker failed:\n{proc.stderr[-4000:]}"
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rewrite_matches_keras_cv(results, name):
    ref_out, ref_grad = results["ref_out"], results["ref_grad"]
    assert np.abs(ref_out).max() > 0 and np.abs(ref_grad).max() > 0
    np.testing.assert_allclose(results[f"{name}_out"], ref_out, rtol=1e-4, atol=1e-5 * np.abs(ref_out).max())
    np.testing.assert_allclose(results[f"{name}_grad"], ref_grad, rtol=1e-3, atol=1e-4 * np.abs(ref_grad).max())


@pytest.mark.slow
def test_rewrites_reach_every_layer(results):
    convs, norms, cross_pad, plain = results["all_counts"]
    assert convs > 50 and norms > 40  # every ResBlock/transformer conv and norm of the SD 1 UNet
    assert cross_pad == 16 and plain == 16  # 16 cross-attentions padded, 16 self-attentions plain on CPU
    assert list(results["conv_counts"][1:]) == [0, 0, 32]  # only what was asked for


@pytest.mark.slow
def test_restore_gives_back_keras_cv_layers(results):
    np.testing.assert_array_equal(results["restored_out"], results["ref_out"])


if __name__ == "__main__":
    worker(sys.argv[1])
