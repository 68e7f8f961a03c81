"""cuDNN flash attention at the SD 1.x UNet's shapes, with the head size as it is and zero-padded.

Zero-padding q, k and v along the head dimension (keeping the 1/sqrt(head) scale) computes the
same attention: the padded columns add nothing to q.k and produce output columns that are sliced
off. It pays only if cuDNN runs the padded size with a faster kernel than the real one. One JSON
line per shape: forward + backward (gradients of q, k, v) ms, useful TFLOP/s.

    python3 benchmarks/gpu_attention.py --batch 32
"""

from __future__ import annotations

import argparse
import json
import time

# (tokens, heads, head size) of SD 1.x's self-attention at 512 px: 64x64, 32x32, 16x16 latents.
SHAPES = ((4096, 8, 40), (1024, 8, 80), (256, 8, 160))


def attention(q, k, v, *, pad_to: int, scale: float):
    import jax
    import jax.numpy as jnp

    head = q.shape[-1]
    if pad_to > head:
        widths = ((0, 0), (0, 0), (0, 0), (0, pad_to - head))
        q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    return out[..., :head]


def measure(batch: int, tokens: int, heads: int, head: int, pad_to: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, tokens, heads, head)
    q, k, v, cot = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    scale = head ** -0.5

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, pad_to=pad_to, scale=scale).astype(jnp.float32) * cot)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    reference = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla").astype(jnp.float32) * cot
    ), argnums=(0, 1, 2)))
    line = {"kind": "attention", "batch": batch, "tokens": tokens, "heads": heads, "head": head, "pad_to": pad_to}
    try:
        jax.block_until_ready(grad(q, k, v))
    except Exception as exc:  # cuDNN refuses some sizes
        line["error"] = str(exc).splitlines()[0][:200]
        return line
    if tokens <= 1024:  # the XLA reference materialises tokens^2 scores per head
        got, want = grad(q, k, v), reference(q, k, v)
        line["max_abs_diff_vs_xla"] = float(max(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) for a, b in zip(got, want)))
    started = time.perf_counter()
    for _ in range(repeats):
        out = grad(q, k, v)
    jax.block_until_ready(out)
    ms = (time.perf_counter() - started) * 1000 / repeats
    # forward 2 matmuls + backward 5 (recomputed scores, dV, dP, dQ, dK), 2*T*T*d FLOP each
    flop = 7 * 2 * batch * heads * tokens * tokens * head
    line.update(ms=round(ms, 3), useful_tflops=round(flop / ms / 1e9, 1))
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import jax

    device = jax.devices()[0]
    for tokens, heads, head in SHAPES:
        for pad_to in sorted({head, -(-head // 16) * 16, -(-head // 64) * 64, 128 if head < 128 else head}):
            line = measure(args.batch, tokens, heads, head, pad_to, args.repeats)
            line["device"] = str(device.device_kind)
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
