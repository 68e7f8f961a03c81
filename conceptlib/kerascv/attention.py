"""A fused attention path for KerasCV's Stable Diffusion UNet.

KerasCV's ``CrossAttention`` (used by ``DiffusionModel`` and ``DiffusionModelV2``) materialises
the full ``(batch, heads, query, key)`` score tensor through two ``td_dot`` calls and a softmax:
at 512 px that is 4096 x 4096 scores per head for every self-attention layer. ``fused_attention``
makes the CrossAttention layers of ONE model instance compute the same function with
``keras.ops.dot_product_attention`` on the same weights (``to_q``/``to_k``/``to_v``/``out_proj``),
optionally with cuDNN flash attention for the self-attention layers.

cuDNN flash refuses the 77-token cross-attention ("Unsupported sequence length Q 4096, KV 77"),
and ``flash_attention=None`` (auto) picks cuDNN on GPU and fails the same way, so cross-attention
always runs the plain path (``flash_attention=False``) and only self-attention may use flash.

Nothing global is patched: the swap sets an instance attribute ``call`` on each attention layer
of the given model and ``restore()`` deletes it again, so other models (and other code using
keras-cv) are untouched. Keras' ``Layer.__call__`` looks ``self.call`` up on the instance.

Usage::

    with fused_attention(diffusion_model, flash=on_gpu) as patch:
        ...  # trace / jit / run the model here
    # or: patch = fused_attention(model, flash=True); ...; patch.restore()

Tracing must happen while the patch is active (a jitted function keeps what it traced).
"""

from __future__ import annotations

__all__ = ["AttentionPatch", "InstanceCallPatch", "fused_attention", "attention_layers", "flash_available"]


def attention_layers(model) -> list:
    """Every keras-cv Stable Diffusion ``CrossAttention`` layer inside ``model`` (any depth)."""
    from conceptlib.kerascv.sd_modules import stable_diffusion_module

    CrossAttention = stable_diffusion_module("diffusion_model").CrossAttention

    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, CrossAttention)]


def flash_available() -> bool:
    """True when flash attention can be requested: the JAX backend on a CUDA GPU."""
    import keras

    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.devices()[0].platform == "gpu"


class InstanceCallPatch:
    """Replacement ``call``s set as instance attributes on some layers of ONE model, and removed
    again by ``restore()`` (also a context manager). Subclasses list ``self.layers`` and build
    each layer's call in ``make_call(layer)``."""

    layers: list

    def make_call(self, layer):
        raise NotImplementedError

    def install(self):
        if self._active:
            return self
        for layer in self.layers:
            if "call" in vars(layer):
                raise RuntimeError(
                    f"layer {layer.name} already has an instance-level call; "
                    "restore the earlier patch before installing another"
                )
        for layer in self.layers:
            layer.call = self.make_call(layer)
        self._active = True
        return self

    def restore(self) -> None:
        """Give every patched layer back its class's own ``call``."""
        if not getattr(self, "_active", False):
            return
        for layer in self.layers:
            vars(layer).pop("call", None)
        self._active = False

    @property
    def active(self) -> bool:
        return getattr(self, "_active", False)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


class AttentionPatch(InstanceCallPatch):
    """The fused call installed on a model's attention layers; undo with ``restore()``.

    ``flash_calls`` / ``plain_calls`` count the traced calls that took each path (a jitted step
    traces each layer once), so benchmarks can report what actually ran.
    """

    def __init__(self, model, *, flash: bool = False, cross_pad: bool = False, fuse_qkv: bool = False):
        self.model = model
        self.flash = bool(flash)
        self.cross_pad = bool(cross_pad)
        self.fuse_qkv = bool(fuse_qkv)
        self.cross_pad_calls = 0
        self.layers = attention_layers(model)
        self.flash_calls = 0
        self.plain_calls = 0
        self.flash_refused: list[str] = []
        self._active = False

    def make_call(self, layer):
        return _make_fused_call(layer, self)


def fused_attention(model, *, flash: bool = False, cross_pad: bool = False, fuse_qkv: bool = False) -> AttentionPatch:
    """Make ``model``'s keras-cv attention layers use ``keras.ops.dot_product_attention``.

    Returns an installed :class:`AttentionPatch` (also a context manager that restores on exit).
    ``flash=True`` asks for flash attention (cuDNN, JAX backend on GPU) on self-attention only;
    keep it False on CPU. ``cross_pad=True`` (JAX backend) runs the 77-token cross-attention
    with its keys/values zero-padded to 128 and masked by ``key_value_seq_lengths`` through
    ``jax.nn.dot_product_attention`` (cuDNN when ``flash``, else XLA): cuDNN refuses KV 77 but
    takes a masked 128. ``fuse_qkv=True`` computes q, k, v (self-attention) or k, v
    (cross-attention) with ONE matmul on the concatenated kernels (same weights, concatenated in
    the traced function: a few MB, against activations of hundreds). Raises ValueError if the
    model has no keras-cv attention layers.
    """
    patch = AttentionPatch(model, flash=flash, cross_pad=cross_pad, fuse_qkv=fuse_qkv)
    if not patch.layers:
        raise ValueError(
            f"model {getattr(model, 'name', model)!r} has no keras-cv CrossAttention layers; "
            "pass a DiffusionModel or DiffusionModelV2"
        )
    return patch.install()


def _make_fused_call(layer, patch: AttentionPatch):
    from keras import ops

    num_heads, head_size, scale = layer.num_heads, layer.head_size, layer.scale

    def project(inputs, context, is_self):
        if patch.fuse_qkv and not any(d.use_bias for d in (layer.to_q, layer.to_k, layer.to_v)):
            dtype = layer.compute_dtype
            if is_self:
                kernel = ops.concatenate([ops.cast(d.kernel, dtype) for d in (layer.to_q, layer.to_k, layer.to_v)], 1)
                q, k, v = ops.split(ops.matmul(ops.cast(inputs, dtype), kernel), 3, axis=-1)
                return q, k, v
            kernel = ops.concatenate([ops.cast(d.kernel, dtype) for d in (layer.to_k, layer.to_v)], 1)
            k, v = ops.split(ops.matmul(ops.cast(context, dtype), kernel), 2, axis=-1)
            return layer.to_q(inputs), k, v
        return layer.to_q(inputs), layer.to_k(context), layer.to_v(context)

    def call(inputs, context=None):
        is_self = context is None
        if is_self:
            context = inputs
        q, k, v = project(inputs, context, is_self)
        q = ops.reshape(q, (-1, inputs.shape[1], num_heads, head_size))
        k = ops.reshape(k, (-1, context.shape[1], num_heads, head_size))
        v = ops.reshape(v, (-1, context.shape[1], num_heads, head_size))
        out = None
        if patch.flash and is_self:
            try:
                out = ops.dot_product_attention(q, k, v, scale=scale, flash_attention=True)
                patch.flash_calls += 1
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                # e.g. a head size cuDNN does not support: fall back for this layer only.
                patch.flash_refused.append(f"{layer.name}: {str(exc).splitlines()[0][:160]}")
        if out is None and patch.cross_pad and not is_self:
            try:
                out = _padded_cross_attention(q, k, v, scale, cudnn=patch.flash)
                patch.cross_pad_calls += 1
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
                patch.flash_refused.append(f"{layer.name} (cross, padded): {str(exc).splitlines()[0][:160]}")
        if out is None:
            # flash_attention=False, never None: "auto" picks cuDNN on GPU, which refuses KV 77.
            out = ops.dot_product_attention(q, k, v, scale=scale, flash_attention=False)
            patch.plain_calls += 1
        out = ops.reshape(out, (-1, inputs.shape[1], num_heads * head_size))
        return layer.out_proj(out)

    return call


def _padded_cross_attention(q, k, v, scale, *, cudnn: bool, multiple: int = 128):
    """Attention over keys/values zero-padded to a multiple of ``multiple`` tokens, the padding
    masked out by ``key_value_seq_lengths``: the same function as unpadded attention."""
    import jax
    import jax.numpy as jnp

    length = k.shape[1]
    padded = -(-length // multiple) * multiple
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    lengths = jnp.full((q.shape[0],), length, jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn" if cudnn else None
    )
