"""Faster equivalents of two keras-cv UNet building blocks, installed per model instance.

- ``conv``: keras-cv's ``PaddedConv2D`` is ``ZeroPadding2D`` + ``Conv2D(padding="valid")``; the
  explicit pad can materialise a padded copy of every activation (forward and backward). The
  patched call runs ONE ``jax.lax.conv_general_dilated`` with explicit padding ``((p, p), (p, p))``
  on the same kernel and bias (explicit, not "same": "same" pads stride-2 convs asymmetrically).
- ``groupnorm``: keras' ``GroupNormalization`` casts the whole activation to float32, reshapes it
  into groups, takes two-pass moments and normalises in float32. The patched call reduces the
  bf16 activation per channel with float32 accumulation (sum and sum of squares in one pass over
  the NHWC tensor, no transpose/reshape of the big tensor), forms the per-(sample, channel) scale
  and shift in float32, and applies ``x * scale + shift`` in the compute dtype. In float32 it is
  the same function as keras'.

Like conceptlib.kerascv.attention, nothing global changes: ``install()`` sets an instance ``call``
on each matching layer of ONE model and ``restore()`` removes it. JAX backend only.
"""

from __future__ import annotations

__all__ = ["KernelPatch", "fast_kernels"]

from conceptlib.kerascv.attention import InstanceCallPatch


def _padded_convs(model) -> list:
    from conceptlib.kerascv.sd_modules import stable_diffusion_module

    PaddedConv2D = stable_diffusion_module("padded_conv2d").PaddedConv2D

    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, PaddedConv2D)]


def _group_norms(model) -> list:
    import keras

    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, keras.layers.GroupNormalization) and layer.axis in (-1, 3)]


class KernelPatch(InstanceCallPatch):
    """The fused conv / group-norm calls installed on one model; undo with ``restore()``."""

    def __init__(self, model, *, conv: bool = True, groupnorm: bool = True):
        self.model = model
        self.convs = _padded_convs(model) if conv else []
        self.norms = _group_norms(model) if groupnorm else []
        self.layers = self.convs + self.norms
        self._active = False

    def make_call(self, layer):
        return _conv_call(layer) if any(layer is conv for conv in self.convs) else _group_norm_call(layer)


def fast_kernels(model, *, conv: bool = True, groupnorm: bool = True) -> KernelPatch:
    """Install the fused conv and/or group-norm calls on ``model`` (see the module docstring)."""
    return KernelPatch(model, conv=conv, groupnorm=groupnorm).install()


def _conv_call(layer):
    import jax

    conv = layer.conv2d
    (top, bottom), (left, right) = layer.padding2d.padding
    strides = tuple(conv.strides)
    dilation = tuple(conv.dilation_rate)
    if conv.groups != 1 or conv.data_format != "channels_last":
        raise ValueError(f"{layer.name}: only channels_last, groups=1 convolutions are supported")

    def call(inputs):
        x = jax.numpy.asarray(inputs).astype(layer.compute_dtype)
        kernel = conv.kernel.value.astype(x.dtype)
        out = jax.lax.conv_general_dilated(
            x, kernel, window_strides=strides, padding=((top, bottom), (left, right)),
            rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if conv.use_bias:
            out = out + conv.bias.value.astype(out.dtype)
        return out

    return call


def _group_norm_call(layer):
    import jax.numpy as jnp

    groups, epsilon = layer.groups, layer.epsilon

    def call(inputs):
        x = jnp.asarray(inputs).astype(layer.compute_dtype)
        channels = x.shape[-1]
        axes = tuple(range(1, x.ndim - 1))
        count = 1
        for axis in axes:
            count *= x.shape[axis]
        count *= channels // groups
        # Per-channel sums with float32 accumulation: one read of the activation, no reshape of it.
        s1 = jnp.sum(x, axis=axes, dtype=jnp.float32)
        s2 = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)
        batch = x.shape[0]
        mean = s1.reshape(batch, groups, -1).sum(-1) / count
        var = jnp.maximum(s2.reshape(batch, groups, -1).sum(-1) / count - jnp.square(mean), 0.0)
        inv = jnp.repeat(jax_rsqrt(var + epsilon), channels // groups, axis=-1)  # (B, C)
        mean = jnp.repeat(mean, channels // groups, axis=-1)
        scale = inv
        if layer.scale:
            scale = scale * layer.gamma.value.astype(jnp.float32)
        shift = -mean * scale
        if layer.center:
            shift = shift + layer.beta.value.astype(jnp.float32)
        shape = (batch,) + (1,) * len(axes) + (channels,)
        if x.dtype == jnp.float32:
            return x * scale.reshape(shape) + shift.reshape(shape)
        return (x.astype(jnp.float32) * scale.reshape(shape) + shift.reshape(shape)).astype(x.dtype)

    return call


def jax_rsqrt(x):
    import jax

    return jax.lax.rsqrt(x)
