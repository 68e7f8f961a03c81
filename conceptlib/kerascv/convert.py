"""Convert a diffusers Stable Diffusion 1.x or 2.x pipeline folder into a keras-cv weights folder.

A diffusers pipeline folder (what ``StableDiffusionPipeline.save_pretrained`` writes and the Hub
hosts) holds ``model_index.json`` and one subfolder per model: ``text_encoder/`` (a transformers
``CLIPTextModel``), ``unet/`` (``UNet2DConditionModel``) and ``vae/`` (``AutoencoderKL``), each a
``config.json`` and a ``.safetensors`` file in PyTorch's layout. ``convert_pipeline`` maps every
tensor onto keras-cv's ``TextEncoder``, ``DiffusionModel``, ``Decoder`` and ``ImageEncoder``
(transposing Linear ``(out, in)`` to Dense ``(in, out)`` and conv ``OIHW`` to ``HWIO``) and writes
keras-cv's own files (``kcv_encoder.h5``, ...), so ``--weights DIR`` reads them like downloaded ones.
SD 2.x (2.0/2.1 base and their fine-tunes: an OpenCLIP text encoder, a 1024-wide context) goes onto
keras-cv's ``TextEncoderV2`` and ``DiffusionModelV2`` the same way; v-prediction (768-v) models are
refused, since keras-cv samples and conceptlib trains epsilon-prediction UNets only.

The source may also be an original (LDM/CompVis) single-file SD 1.x or 2.x checkpoint in
safetensors format (``v1-5-pruned-emaonly.safetensors``, ``v2-1_512-ema-pruned.safetensors``, the
files AUTOMATIC1111 and ComfyUI load):
``inspect_single_file`` finds each tensor the same plans need under its LDM name (``ldm_name``),
so both sources go through the same mapping onto keras-cv.

Everything that can be checked without a model is checked first (``inspect_pipeline``: the
folder, the configs, every tensor's name and shape, the destination, the free disk space); then
each part is built once, filled, and saved. Files are written into a temporary folder beside
``DIR`` and renamed into place at the end, so a failure leaves ``DIR`` as it was. Tensors are read
with safetensors' numpy API, one at a time: no torch. Importing this module imports no keras.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from conceptlib.errors import WeightsError
from conceptlib.weights import MANIFEST, RANDOM_MARKER, weight_filename

NOTE = "CONVERTED-FROM.txt"
# keras-cv's image encoder multiplies the latent mean by this constant and its decoder divides by
# it: a VAE trained with another scaling factor (SDXL's 0.13025) would be mis-scaled.
SD1_VAE_SCALING = 0.18215
# Tensors a diffusers folder may hold that keras-cv has no weight for (buffers, not parameters).
_IGNORED_KEYS = {"embeddings.position_ids"}
# transformers < 5 saves CLIPTextModel's tensors under "text_model." (the Hub's SD 1.x files),
# transformers >= 5 without it: keys are compared without the prefix.
_TEXT_PREFIX = "text_model."
# (file stem, keras-cv parts made from it)
_SUBFOLDERS = {
    "text_encoder": ("model", ("text_encoder",)),  # tensor names without _TEXT_PREFIX
    "unet": ("diffusion_pytorch_model", ("diffusion_model",)),
    "vae": ("diffusion_pytorch_model", ("decoder", "image_encoder")),
}
_PART_SUBFOLDER = {part: sub for sub, (_, parts) in _SUBFOLDERS.items() for part in parts}
_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}


# --- what each keras-cv weight is made from -------------------------------------------------
#
# A plan is a list of entries (torch keys, torch shape, keras path). The keys are the tensor's
# name in the diffusers file (the first that exists; later ones are older names of the same
# tensor). The keras path starts with a layer class name and its index among the model's layers
# of that class (in model.layers order, which follows the data flow), then attributes and list
# indices down to the variable.


@dataclass
class _Plan:
    entries: list = field(default_factory=list)

    def linear(self, key, out, inn, path, *, bias=True, old=None):
        keys = (key,) if old is None else (key, old)
        self.entries.append((tuple(f"{k}.weight" for k in keys), (out, inn), path + ("kernel",)))
        if bias:
            self.entries.append((tuple(f"{k}.bias" for k in keys), (out,), path + ("bias",)))

    def conv(self, key, out, inn, size, path):
        self.entries.append(((f"{key}.weight",), (out, inn, size, size), path + ("conv2d", "kernel")))
        self.entries.append(((f"{key}.bias",), (out,), path + ("conv2d", "bias")))

    def norm(self, key, channels, path):
        self.entries.append(((f"{key}.weight",), (channels,), path + ("gamma",)))
        self.entries.append(((f"{key}.bias",), (channels,), path + ("beta",)))

    def embedding(self, key, rows, width, path):
        self.entries.append(((f"{key}.weight",), (rows, width), path + ("embeddings",)))


def _text_encoder_plan(width: int = 768, layers: int = 12) -> _Plan:
    """SD 1.x: CLIP ViT-L/14's 12 layers of 768; SD 2.x: OpenCLIP ViT-H/14's first 23 layers of
    1024 (SD 2.x conditions on the penultimate layer, so diffusers' and keras-cv's models stop there)."""
    plan = _Plan()
    plan.embedding("embeddings.token_embedding", 49408, width, ("CLIPEmbedding", 0, "token_embedding"))
    plan.embedding("embeddings.position_embedding", 77, width, ("CLIPEmbedding", 0, "position_embedding"))
    for index in range(layers):
        key, path = f"encoder.layers.{index}", ("CLIPEncoderLayer", index)
        plan.norm(f"{key}.layer_norm1", width, path + ("layer_norm1",))
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            plan.linear(f"{key}.self_attn.{name}", width, width, path + ("clip_attn", name))
        plan.norm(f"{key}.layer_norm2", width, path + ("layer_norm2",))
        plan.linear(f"{key}.mlp.fc1", 4 * width, width, path + ("fc1",))
        plan.linear(f"{key}.mlp.fc2", width, 4 * width, path + ("fc2",))
    plan.norm("final_layer_norm", width, ("LayerNormalization", 0))
    return plan


def _unet_resnet(plan, key, cin, cout, index):
    path = ("ResBlock", index)
    plan.norm(f"{key}.norm1", cin, path + ("entry_flow", 0))
    plan.conv(f"{key}.conv1", cout, cin, 3, path + ("entry_flow", 2))
    plan.linear(f"{key}.time_emb_proj", cout, 1280, path + ("embedding_flow", 1))
    plan.norm(f"{key}.norm2", cout, path + ("exit_flow", 0))
    plan.conv(f"{key}.conv2", cout, cout, 3, path + ("exit_flow", 2))
    if cin != cout:
        plan.conv(f"{key}.conv_shortcut", cout, cin, 1, path + ("residual_projection",))


def _unet_transformer(plan, key, channels, index, context, linear):
    path = ("SpatialTransformer", index)
    block, tkey = path + ("transformer_block",), f"{key}.transformer_blocks.0"

    def project(name, keras_name):
        # SD 1.x projects in and out with 1x1 convolutions, SD 2.x with Linear/Dense layers.
        if linear:
            plan.linear(f"{key}.{name}", channels, channels, path + (keras_name,))
        else:
            plan.conv(f"{key}.{name}", channels, channels, 1, path + (keras_name,))

    plan.norm(f"{key}.norm", channels, path + ("norm",))
    project("proj_in", "proj1")
    for number in (1, 2, 3):
        plan.norm(f"{tkey}.norm{number}", channels, block + (f"norm{number}",))
    for attn, kv_width in (("attn1", channels), ("attn2", context)):
        plan.linear(f"{tkey}.{attn}.to_q", channels, channels, block + (attn, "to_q"), bias=False)
        plan.linear(f"{tkey}.{attn}.to_k", channels, kv_width, block + (attn, "to_k"), bias=False)
        plan.linear(f"{tkey}.{attn}.to_v", channels, kv_width, block + (attn, "to_v"), bias=False)
        plan.linear(f"{tkey}.{attn}.to_out.0", channels, channels, block + (attn, "out_proj"))
    # GEGLU: one Linear to 2 x 4c (value half, then gate half, as keras-cv splits it).
    plan.linear(f"{tkey}.ff.net.0.proj", 8 * channels, channels, block + ("geglu", "dense"))
    plan.linear(f"{tkey}.ff.net.2", channels, 4 * channels, block + ("dense",))
    project("proj_out", "proj2")


def _unet_plan(context: int = 768, linear: bool = False) -> _Plan:
    """SD 1.x (``context`` 768, conv projections) or SD 2.x (1024, ``linear`` projections): the
    same blocks; the heads (8 of 40.. vs 5.. of 64) do not change any weight's shape."""
    plan = _Plan()
    widths = (320, 640, 1280, 1280)
    plan.linear("time_embedding.linear_1", 1280, 320, ("Dense", 0))
    plan.linear("time_embedding.linear_2", 1280, 1280, ("Dense", 1))
    plan.conv("conv_in", 320, 4, 3, ("PaddedConv2D", 0))
    resnets = transformers = 0
    skips, cin = [320], 320
    for block, width in enumerate(widths):
        for layer in range(2):
            _unet_resnet(plan, f"down_blocks.{block}.resnets.{layer}", cin, width, resnets)
            resnets, cin = resnets + 1, width
            if block < 3:
                _unet_transformer(plan, f"down_blocks.{block}.attentions.{layer}", width, transformers, context, linear)
                transformers += 1
            skips.append(width)
        if block < 3:
            plan.conv(f"down_blocks.{block}.downsamplers.0.conv", width, width, 3, ("PaddedConv2D", block + 1))
            skips.append(width)
    _unet_resnet(plan, "mid_block.resnets.0", 1280, 1280, resnets)
    _unet_transformer(plan, "mid_block.attentions.0", 1280, transformers, context, linear)
    _unet_resnet(plan, "mid_block.resnets.1", 1280, 1280, resnets + 1)
    resnets, transformers = resnets + 2, transformers + 1
    for block, width in enumerate(reversed(widths)):
        for layer in range(3):
            # The up path concatenates the skip connection after the hidden state, as both do.
            _unet_resnet(plan, f"up_blocks.{block}.resnets.{layer}", cin + skips.pop(), width, resnets)
            resnets, cin = resnets + 1, width
            if block > 0:
                _unet_transformer(plan, f"up_blocks.{block}.attentions.{layer}", width, transformers, context, linear)
                transformers += 1
        if block < 3:
            plan.conv(f"up_blocks.{block}.upsamplers.0.conv", width, width, 3, ("Upsample", block, "conv"))
    plan.norm("conv_norm_out", 320, ("GroupNormalization", 0))
    plan.conv("conv_out", 4, 320, 3, ("PaddedConv2D", 4))
    return plan


def _vae_resnet(plan, key, cin, cout, index):
    path = ("ResnetBlock", index)
    plan.norm(f"{key}.norm1", cin, path + ("norm1",))
    plan.conv(f"{key}.conv1", cout, cin, 3, path + ("conv1",))
    plan.norm(f"{key}.norm2", cout, path + ("norm2",))
    plan.conv(f"{key}.conv2", cout, cout, 3, path + ("conv2",))
    if cin != cout:
        plan.conv(f"{key}.conv_shortcut", cout, cin, 1, path + ("residual_projection",))


def _vae_attention(plan, key, channels):
    # diffusers >= 0.14 names these to_q/to_k/to_v/to_out.0 (Linear); older files (SD 1.5's own
    # vae) query/key/value/proj_attn. keras-cv uses 1x1 convolutions.
    path = ("AttentionBlock", 0)
    plan.norm(f"{key}.group_norm", channels, path + ("norm",))
    for new, old, target in (("to_q", "query", "q"), ("to_k", "key", "k"), ("to_v", "value", "v"),
                             ("to_out.0", "proj_attn", "proj_out")):
        plan.linear(f"{key}.{new}", channels, channels, path + (target, "conv2d"), old=f"{key}.{old}")


def _decoder_plan() -> _Plan:
    plan = _Plan()
    plan.conv("post_quant_conv", 4, 4, 1, ("PaddedConv2D", 0))
    plan.conv("decoder.conv_in", 512, 4, 3, ("PaddedConv2D", 1))
    _vae_resnet(plan, "decoder.mid_block.resnets.0", 512, 512, 0)
    _vae_attention(plan, "decoder.mid_block.attentions.0", 512)
    _vae_resnet(plan, "decoder.mid_block.resnets.1", 512, 512, 1)
    resnets, cin = 2, 512
    for block, width in enumerate((512, 512, 256, 128)):
        for layer in range(3):
            _vae_resnet(plan, f"decoder.up_blocks.{block}.resnets.{layer}", cin, width, resnets)
            resnets, cin = resnets + 1, width
        if block < 3:
            plan.conv(f"decoder.up_blocks.{block}.upsamplers.0.conv", width, width, 3, ("PaddedConv2D", block + 2))
    plan.norm("decoder.conv_norm_out", 128, ("GroupNormalization", 0))
    plan.conv("decoder.conv_out", 3, 128, 3, ("PaddedConv2D", 5))
    return plan


def _image_encoder_plan() -> _Plan:
    plan = _Plan()
    plan.conv("encoder.conv_in", 128, 3, 3, ("PaddedConv2D", 0))
    resnets, cin = 0, 128
    for block, width in enumerate((128, 256, 512, 512)):
        for layer in range(2):
            _vae_resnet(plan, f"encoder.down_blocks.{block}.resnets.{layer}", cin, width, resnets)
            resnets, cin = resnets + 1, width
        if block < 3:
            plan.conv(f"encoder.down_blocks.{block}.downsamplers.0.conv", width, width, 3, ("PaddedConv2D", block + 1))
    _vae_resnet(plan, "encoder.mid_block.resnets.0", 512, 512, resnets)
    _vae_attention(plan, "encoder.mid_block.attentions.0", 512)
    _vae_resnet(plan, "encoder.mid_block.resnets.1", 512, 512, resnets + 1)
    plan.norm("encoder.conv_norm_out", 512, ("GroupNormalization", 0))
    # Mean and log-variance (8 channels); keras-cv's ImageEncoder keeps the mean's 4.
    plan.conv("encoder.conv_out", 8, 512, 3, ("PaddedConv2D", 4))
    plan.conv("quant_conv", 8, 8, 1, ("PaddedConv2D", 5))
    return plan


def _plans(base_model: str) -> dict:
    """keras-cv part -> its plan builder, for ``base_model``'s keras-cv classes (sd-1: TextEncoder
    and DiffusionModel; sd-2: TextEncoderV2 and DiffusionModelV2; both share the VAE)."""
    sd2 = base_model == "sd-2"
    return {
        "text_encoder": (lambda: _text_encoder_plan(1024, 23)) if sd2 else _text_encoder_plan,
        "diffusion_model": (lambda: _unet_plan(1024, linear=True)) if sd2 else _unet_plan,
        "decoder": _decoder_plan,
        "image_encoder": _image_encoder_plan,
    }


_LABEL = {"sd-1": "SD 1.x", "sd-2": "SD 2.x"}


# --- reading the diffusers folder -----------------------------------------------------------


class _Tensors:
    """The tensors of one model subfolder (one or several safetensors shards), read lazily with
    safetensors' numpy API. ``shape``/``dtype`` read only the header."""

    def __init__(self, files: list[Path], strip_prefix: str = "", *, select=None, stored_name=None):
        from safetensors import safe_open

        self.files = files
        self._where: dict[str, tuple[Path, str]] = {}  # name (prefix stripped) -> file, name there
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        # select(stored) -> the name the plans use, or None for another part's tensor (single files
        # hold all parts); stored_name(name) -> the name in the file, for messages.
        self.stored_name = stored_name or (lambda key: key)
        for path in files:
            try:
                with safe_open(str(path), framework="np") as handle:
                    for stored in handle.keys():
                        if select is not None:
                            key = select(stored)
                            if key is None:
                                continue
                        else:
                            key = stored[len(strip_prefix):] if strip_prefix and stored.startswith(strip_prefix) else stored
                        piece = handle.get_slice(stored)
                        self._where[key] = (path, stored)
                        self._meta[key] = (tuple(piece.get_shape()), piece.get_dtype())
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise WeightsError(
                    f"{path} is not a readable safetensors file ({_first_line(exc)}); download it again"
                ) from None

    def keys(self):
        return self._where.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> str:
        return self._meta[key][1]

    def get(self, key: str):
        """The tensor as a float32 numpy array."""
        import numpy as np
        from safetensors import safe_open

        path, stored = self._where[key]
        if self.dtype(key) == "BF16":
            return _read_bf16(path, stored).astype(np.float32)
        try:
            with safe_open(str(path), framework="np") as handle:
                return handle.get_tensor(stored).astype(np.float32, copy=False)
        except Exception as exc:
            raise WeightsError(f"{path}: tensor {key} cannot be read ({_first_line(exc)}); download the file again") from None


def _read_bf16(path: Path, key: str):
    """One bfloat16 tensor of a safetensors file (numpy has no bfloat16, so safetensors' numpy API
    refuses it): the header gives its byte range, ml_dtypes its type."""
    import ml_dtypes
    import numpy as np

    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        info = json.loads(handle.read(length))[key]
        start, end = info["data_offsets"]
        handle.seek(8 + length + start)
        raw = handle.read(end - start)
    if len(raw) != end - start:
        raise WeightsError(f"{path} is truncated (tensor {key}); download it again")
    return np.frombuffer(raw, dtype=ml_dtypes.bfloat16).reshape(info["shape"])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# A pipeline's JSON files are a few KB (a sharded model's index, some hundred KB).
_MAX_JSON_BYTES = 16 * 1024 * 1024


def _read_json(path: Path, what: str) -> dict:
    from conceptlib.files import FileTooLarge, NotARegularFile, read_small_file

    try:
        data = read_small_file(path, _MAX_JSON_BYTES)
    except FileNotFoundError:
        raise WeightsError(f"{path} is missing; {what}") from None
    except OSError as exc:
        raise WeightsError(f"{path} cannot be read ({exc.strerror or exc}); download it again") from None
    except NotARegularFile:
        raise WeightsError(f"{path} is not a regular file (a pipe, device or folder); download it again") from None
    except FileTooLarge:
        raise WeightsError(f"{path} is larger than {_MAX_JSON_BYTES // 2**20} MB, which no pipeline's JSON is; "
                           "download it again") from None
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"{path} is not valid JSON ({_first_line(exc)}); download it again") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path} is not a JSON object; download it again")
    return value


def _weight_files(src: Path, sub: str, variant: str | None) -> list[Path]:
    """The safetensors file(s) of ``src/sub`` (a single file, or the shards an index names)."""
    folder = src / sub
    stem = _SUBFOLDERS[sub][0]
    if not folder.is_dir():
        raise WeightsError(f"{src} has no {sub}/ folder; it is not a complete diffusers Stable Diffusion pipeline folder")
    infix = f".{variant}" if variant else ""
    single = folder / f"{stem}{infix}.safetensors"
    if single.is_file():
        return [single]
    index = folder / (f"{stem}.safetensors.index{infix}.json")
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index} has no weight_map; download it again")
        names = list(weight_map.values())
        # Shard file names only: a path (../../x, /etc/x) would read files outside the folder.
        bad = next((n for n in names if not isinstance(n, str) or not re.fullmatch(r"[^/\\]+\.safetensors", n)
                    or n.startswith(".")), None)
        if bad is not None:
            raise WeightsError(f"{index} names a shard {str(bad)[:80]!r}, which is not a .safetensors file name in "
                               f"{folder}; download it again")
        shards = [folder / name for name in sorted(set(names))]
        for shard in shards:
            if not shard.is_file():
                raise WeightsError(f"{shard} (named in {index.name}) is missing; download it")
        return shards
    # Variants: model.fp16.safetensors, or shards model.fp16-00001-of-00002.safetensors named by
    # model.safetensors.index.fp16.json.
    variants = {p.name[len(stem) + 1:-len(".safetensors")] for p in folder.glob(f"{stem}.*.safetensors")}
    variants |= {p.name[len(f"{stem}.safetensors.index."):-len(".json")] for p in folder.glob(f"{stem}.safetensors.index.*.json")}
    variants = sorted(name for name in variants if not re.search(r"-\d+-of-\d+$", name))
    if variant is None and len(variants) == 1:
        return _weight_files(src, sub, variants[0])
    if variant is None and variants:
        raise WeightsError(
            f"{folder} holds only variant files ({', '.join(variants)}); pass --variant {variants[0]} (or another) to pick one"
        )
    pickles = sorted(p.name for p in folder.glob(f"{stem}*.bin"))
    if pickles:
        raise WeightsError(
            f"{folder} holds {pickles[0]}, a pickle, but no {single.name}; conceptlib reads .safetensors only: "
            "re-save the pipeline with diffusers' save_pretrained(..., safe_serialization=True)"
        )
    raise WeightsError(
        f"{single} is missing{f' (and no {variant} variant)' if variant else ''}; download the complete pipeline "
        f"folder (the {sub} weights)"
    )


# --- checking the configs -------------------------------------------------------------------

# (config key, value keras-cv's SD 1.x model has, value diffusers assumes when the key is absent)
_UNET_CONFIG = (
    ("in_channels", 4, 4),
    ("out_channels", 4, 4),
    ("block_out_channels", [320, 640, 1280, 1280], [320, 640, 1280, 1280]),
    ("layers_per_block", 2, 2),
    ("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], None),
    ("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, None),
    ("mid_block_type", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DCrossAttn"),
    ("attention_head_dim", 8, 8),
    ("num_attention_heads", None, None),
    ("use_linear_projection", False, False),
    ("norm_num_groups", 32, 32),
    ("act_fn", "silu", "silu"),
    ("flip_sin_to_cos", True, True),
    ("freq_shift", 0, 0),
    ("center_input_sample", False, False),
    ("class_embed_type", None, None),
    ("addition_embed_type", None, None),
    ("time_cond_proj_dim", None, None),
    ("only_cross_attention", False, False),
    ("dual_cross_attention", False, False),
    ("resnet_time_scale_shift", "default", "default"),
    ("transformer_layers_per_block", 1, 1),
    ("conv_in_kernel", 3, 3),
    ("conv_out_kernel", 3, 3),
    # Settings that change what the same weights compute.
    ("norm_eps", 1e-5, 1e-5),
    ("downsample_padding", 1, 1),
    ("mid_block_scale_factor", 1, 1),
    ("time_embedding_type", "positional", "positional"),
    ("time_embedding_act_fn", None, None),
    ("timestep_post_act", None, None),
    ("encoder_hid_dim", None, None),
    ("attention_type", "default", "default"),
    ("cross_attention_norm", None, None),
    ("resnet_out_scale_factor", 1.0, 1.0),
    ("resnet_skip_time_act", False, False),
)
# SD 2.x (2.0/2.1 base and their fine-tunes): the same UNet with heads of 64 (diffusers' legacy
# attention_head_dim holds the head counts), Linear projections and a 1024-wide context.
_UNET_CONFIG_SD2 = {"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
_TEXT_CONFIG = (
    ("hidden_size", 768, None),
    ("num_hidden_layers", 12, None),
    ("num_attention_heads", 12, None),
    ("intermediate_size", 3072, None),
    ("hidden_act", "quick_gelu", "quick_gelu"),
    ("layer_norm_eps", 1e-5, 1e-5),
    ("max_position_embeddings", 77, 77),
    ("vocab_size", 49408, 49408),
)
_TEXT_CONFIG_SD2 = {"hidden_size": 1024, "num_hidden_layers": 23, "num_attention_heads": 16,
                    "intermediate_size": 4096, "hidden_act": "gelu"}
_VAE_CONFIG = (
    ("in_channels", 3, 3),
    ("out_channels", 3, 3),
    ("latent_channels", 4, 4),
    ("block_out_channels", [128, 256, 512, 512], None),
    ("layers_per_block", 2, 1),
    ("norm_num_groups", 32, 32),
    ("act_fn", "silu", "silu"),
    ("down_block_types", ["DownEncoderBlock2D"] * 4, None),
    ("up_block_types", ["UpDecoderBlock2D"] * 4, None),
    ("scaling_factor", SD1_VAE_SCALING, SD1_VAE_SCALING),
    ("use_quant_conv", True, True),
    ("use_post_quant_conv", True, True),
    ("mid_block_add_attention", True, True),
    ("latents_mean", None, None),
    ("latents_std", None, None),
    ("shift_factor", None, None),
)


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def _expected(table, overrides: dict) -> list:
    return [(key, overrides.get(key, want), default) for key, want, default in table]


def _check_config(path: Path, config: dict, expected, what: str) -> None:
    heads = next((want for key, want, _ in expected if key == "attention_head_dim"), None)
    for key, want, default in expected:
        have = _norm(config.get(key, default))
        if key == "attention_head_dim" and isinstance(have, list) and have == [want] * len(have):
            continue
        # diffusers' num_attention_heads, when given, means what its legacy attention_head_dim does.
        if key == "num_attention_heads" and have is not None and have in (heads, [heads] * 4):
            continue
        if have != want:
            raise WeightsError(
                f"{path}: {key} is {json.dumps(have)}, keras-cv's {what} needs {json.dumps(want)}; "
                "this model has another architecture and cannot be converted"
            )


def _refuse_sdxl_index(src: Path, index: dict, unet: dict | None = None) -> None:
    cls = str(index.get("_class_name", ""))
    if "XL" in cls or "text_encoder_2" in index or (unet or {}).get("cross_attention_dim") == 2048:
        raise WeightsError(
            f"{src} is a Stable Diffusion XL pipeline ({cls or 'two text encoders'}); keras-cv has no SDXL model, "
            "so only Stable Diffusion 1.x and 2.x folders can be converted"
        )


def _base_model(src: Path, index: dict, unet: dict, text: dict) -> str:
    """'sd-1' or 'sd-2', or a WeightsError naming what the folder is instead."""
    _refuse_sdxl_index(src, index, unet)
    cross = unet.get("cross_attention_dim")
    if cross not in (768, 1024):
        raise WeightsError(
            f"{src / 'unet' / 'config.json'}: cross_attention_dim is {json.dumps(cross)}, Stable Diffusion 1.x has 768 "
            "and 2.x 1024; this is not an SD 1.x or 2.x pipeline and cannot be converted"
        )
    return "sd-1" if cross == 768 else "sd-2"


@dataclass
class PipelineInfo:
    """What ``inspect_pipeline`` found: the base model, each subfolder's files, and the keras-cv
    parts' plans (checked against the files' tensor names and shapes)."""

    src: Path
    base_model: str
    pipeline_class: str
    files: dict[str, list[Path]]
    tensors: dict[str, _Tensors]
    name_or_path: str | None = None
    diffusers_version: str | None = None
    # "diffusers" (a pipeline folder) or "ldm-single-file"; a single file's UNet is read from its
    # model.diffusion_model.* tensors, and this many model_ema.* copies are left unused.
    source_format: str = "diffusers"
    ema_tensors_ignored: int = 0


def converted_bytes(base_model: str = "sd-1") -> int:
    """About how many bytes the four keras-cv files of a conversion take (float32)."""
    return sum(4 * math.prod(shape) for build in _plans(base_model).values() for _, shape, _ in build().entries)


def inspect_pipeline(src: str | os.PathLike, *, variant: str | None = None) -> PipelineInfo:
    """Check that ``src`` is a diffusers Stable Diffusion 1.x or 2.x pipeline folder whose every tensor
    keras-cv needs is there with the right shape (reading only configs and safetensors headers:
    no keras, no model). WeightsError says what is wrong and how to fix it."""
    src = Path(src).expanduser()
    if not src.exists():
        raise WeightsError(
            f"{src} does not exist; pass a diffusers Stable Diffusion pipeline folder (with model_index.json) "
            "or an SD 1.x or 2.x single-file .safetensors checkpoint"
        )
    if not src.is_dir():
        if variant is not None:
            raise WeightsError(f"{src} is a single file: --variant {variant} applies to pipeline folders only; leave it out")
        return inspect_single_file(src)
    index = _read_json(
        src / "model_index.json",
        "this is not a diffusers pipeline folder: pass the folder StableDiffusionPipeline.save_pretrained "
        "wrote (model_index.json, text_encoder/, unet/, vae/)",
    )
    if "transformer" in index and "unet" not in index:
        raise WeightsError(
            f"{src} is a {index.get('_class_name', 'transformer-based')} pipeline (no unet); only Stable Diffusion "
            "1.x and 2.x folders can be converted"
        )
    _refuse_sdxl_index(src, index)  # before asking for missing parts of a folder that cannot be converted anyway
    configs = {}
    for sub in ("text_encoder", "unet", "vae"):
        if sub not in index and not (src / sub).is_dir():
            raise WeightsError(f"{src / 'model_index.json'} names no {sub}; only complete Stable Diffusion 1.x and 2.x "
                               "pipeline folders can be converted")
        if not (src / sub).is_dir():
            raise WeightsError(f"{src} has no {sub}/ folder; download the complete pipeline folder")
        configs[sub] = _read_json(src / sub / "config.json", "download the complete pipeline folder")
    base_model = _base_model(src, index, configs["unet"], configs["text_encoder"])
    scheduler = src / "scheduler" / "scheduler_config.json"
    prediction = _read_json(scheduler, "").get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    if prediction != "epsilon":
        raise WeightsError(
            f"{scheduler}: prediction_type is {json.dumps(prediction)}; keras-cv's sampler and conceptlib's trainer "
            "expect a UNet that predicts the noise (epsilon), so this model cannot be converted"
            + (" (SD 2.x 768-v models predict v: use an SD 2.x base model, e.g. stable-diffusion-2-1-base)"
               if base_model == "sd-2" else "")
        )
    sd2 = base_model == "sd-2"
    label = _LABEL[base_model]
    text_what = f"{label} text encoder ({'OpenCLIP ViT-H/14' if sd2 else 'CLIP ViT-L/14'})"
    _check_config(src / "text_encoder" / "config.json", configs["text_encoder"],
                  _expected(_TEXT_CONFIG, _TEXT_CONFIG_SD2 if sd2 else {}), text_what)
    _check_config(src / "unet" / "config.json", configs["unet"],
                  _expected(_UNET_CONFIG, _UNET_CONFIG_SD2 if sd2 else {}), f"{label} UNet")
    _check_config(src / "vae" / "config.json", configs["vae"], _VAE_CONFIG, f"{label} VAE")
    if base_model == "sd-2" and not scheduler.is_file():
        raise WeightsError(
            f"{scheduler} is missing: an SD 2.x UNet predicts the noise (2.x base) or v (768-v), and only its "
            "scheduler's config says which; download the complete pipeline folder"
        )

    files, tensors = {}, {}
    for sub in _SUBFOLDERS:
        files[sub] = _weight_files(src, sub, variant)
        tensors[sub] = _Tensors(files[sub], _TEXT_PREFIX if sub == "text_encoder" else "")
        _check_part(tensors[sub], sub, base_model)
    return PipelineInfo(
        src=src,
        base_model=base_model,
        pipeline_class=str(index.get("_class_name", "")),
        files=files,
        tensors=tensors,
        name_or_path=index.get("_name_or_path"),
        diffusers_version=index.get("_diffusers_version"),
    )


def _check_part(tensors: _Tensors, sub: str, base_model: str) -> None:
    """Every tensor the plans of ``sub``'s parts need is there with ``base_model``'s shape, and no other."""
    used: set[str] = set()
    plans = _plans(base_model)
    for part in _SUBFOLDERS[sub][1]:
        for keys, shape, _ in plans[part]().entries:
            used.add(_check_tensor(tensors, keys, shape, base_model))
    extra = sorted(tensors.stored_name(key) for key in set(tensors.keys()) - used - _IGNORED_KEYS)
    if extra:
        raise WeightsError(
            f"{tensors.files[0]} holds {len(extra)} tensor(s) an {_LABEL[base_model]} {sub} does not have ({extra[0]}, ...); "
            "it has another architecture (e.g. LoRA-merged or extra layers) and cannot be converted"
        )


# --- reading an original (LDM/CompVis) single-file checkpoint -------------------------------
#
# AUTOMATIC1111, ComfyUI, InvokeAI and civitai keep SD 1.x as one .safetensors file with the
# original training code's tensor names (model.diffusion_model.*, first_stage_model.*,
# cond_stage_model.transformer.*). Each tensor the plans name by its diffusers name is looked up
# under its LDM name: the reverse of diffusers' convert_ldm_unet_checkpoint /
# convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint (the table of diffusers'
# scripts/convert_diffusers_to_original_stable_diffusion.py), for the SD 1.x/2.x block layout only.

_LDM_PREFIX = {"text_encoder": "cond_stage_model.transformer.", "unet": "model.diffusion_model.", "vae": "first_stage_model."}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_prefixes() -> dict[str, list[tuple[str, str, dict]]]:
    """Per model: (diffusers prefix, LDM prefix, renames of the layer names below it)."""
    unet = [("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
            ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
            ("mid_block.attentions.0.", "middle_block.1.", {})]
    unet += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", _UNET_RESNET) for j in range(2)]
    vae = [(f"{coder}.conv_norm_out.", f"{coder}.norm_out.", {}) for coder in ("encoder", "decoder")]
    for coder in ("encoder", "decoder"):
        vae += [(f"{coder}.mid_block.resnets.{j}.", f"{coder}.mid.block_{j + 1}.", _VAE_RESNET) for j in range(2)]
        vae.append((f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1.", _VAE_ATTENTION))
    for i in range(4):
        for j in range(2):  # a level of the down path: 2 layers, then the downsampler (3 input_blocks)
            unet.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0.", _UNET_RESNET))
            unet.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.", {}))
        for j in range(3):
            unet.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0.", _UNET_RESNET))
            unet.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1.", {}))
            vae.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
            vae.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{3 - i}.block.{j}.", _VAE_RESNET))
        unet.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * i + 3}.0.op.", {}))
        # The up path's upsampler follows the level's last resnet (and attention, below level 0).
        unet.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", {}))
        vae.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", {}))
        vae.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{3 - i}.upsample.", {}))
    return {"unet": unet, "vae": vae}


_LDM_PREFIXES = _ldm_prefixes()


def ldm_name(sub: str, key: str) -> str:
    """The name in an original SD 1.x single-file checkpoint of the tensor diffusers calls ``key``
    in ``sub`` (text_encoder, unet or vae); text encoder keys without ``text_model.``."""
    if sub == "text_encoder":
        return f"{_LDM_PREFIX[sub]}{_TEXT_PREFIX}{key}"
    for new, old, renames in _LDM_PREFIXES[sub]:
        if key.startswith(new):
            rest = key[len(new):]
            for name, renamed in renames.items():
                if rest.startswith(name + "."):
                    rest = renamed + rest[len(name):]
                    break
            return f"{_LDM_PREFIX[sub]}{old}{rest}"
    return f"{_LDM_PREFIX[sub]}{key}"  # the VAE's quant convs and conv_in/conv_out keep their names


# SD 2.x single files keep the text encoder in OpenCLIP's own layout: q, k and v fused into one
# in_proj tensor per layer, and all 24 layers, of which SD 2.x uses the first 23 (the penultimate
# layer's output, then ln_final), as diffusers' convert_open_clip_checkpoint reads it.
_OPENCLIP_PREFIX = "cond_stage_model.model."
_OPENCLIP_UNUSED = re.compile(r"transformer\.resblocks\.23\.|text_projection$|logit_scale$|attn_mask$")
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _openclip_names(layers: int = 23) -> dict[str, tuple[str, int | None]]:
    """diffusers text-encoder name -> (OpenCLIP name, which third of a fused q/k/v tensor or None)."""
    names = {"embeddings.token_embedding.weight": ("token_embedding.weight", None),
             "embeddings.position_embedding.weight": ("positional_embedding", None),
             "final_layer_norm.weight": ("ln_final.weight", None), "final_layer_norm.bias": ("ln_final.bias", None)}
    for index in range(layers):
        new, old = f"encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            for name, renamed in _OPENCLIP_LAYER.items():
                names[f"{new}{name}.{kind}"] = (f"{old}{renamed}.{kind}", None)
            for third, name in enumerate(("q_proj", "k_proj", "v_proj")):
                names[f"{new}self_attn.{name}.{kind}"] = (f"{old}attn.in_proj_{kind}", third)
    return names


class _OpenClipTensors(_Tensors):
    """The SD 2.x text encoder of a single file under diffusers' names; q/k/v are thirds of the
    stored in_proj tensors. Tensors SD 2.x does not use are left out; unknown ones show as extra."""

    def __init__(self, path: Path):
        names = _openclip_names()
        super().__init__([path], select=lambda stored: _strip(stored, _OPENCLIP_PREFIX) if stored.startswith(_OPENCLIP_PREFIX) else None,
                         stored_name=lambda key: _OPENCLIP_PREFIX + names.get(key, (key, None))[0])
        stored = set(self._where)
        self._alias = {key: value for key, value in names.items() if value[0] in stored}
        mapped = {name for name, _ in names.values()}
        self._extra = {key for key in stored - mapped if not _OPENCLIP_UNUSED.search(key)}

    def keys(self):
        return set(self._alias) | self._extra

    def _stored(self, key: str) -> tuple[str, int | None]:
        return self._alias.get(key, (key, None))

    def shape(self, key: str) -> tuple[int, ...]:
        stored, third = self._stored(key)
        shape = self._meta[stored][0]
        return shape if third is None else (shape[0] // 3,) + shape[1:]

    def dtype(self, key: str) -> str:
        return self._meta[self._stored(key)[0]][1]

    def get(self, key: str):
        stored, third = self._stored(key)
        value = super().get(stored)
        if third is None:
            return value
        rows = value.shape[0] // 3
        return value[third * rows:(third + 1) * rows]


def _single_file_tensors(path: Path, sub: str, base_model: str) -> _Tensors:
    """``sub``'s tensors of the single file ``path``, under their diffusers names (tensors under
    the part's prefix that the model does not have keep their own name, so they show as extra)."""
    prefix = _LDM_PREFIX[sub]
    if sub == "text_encoder" and base_model == "sd-2":
        return _OpenClipTensors(path)
    if sub == "text_encoder":  # cond_stage_model.transformer.[text_model.]...
        return _Tensors([path], select=lambda stored: _strip(_strip(stored, prefix), _TEXT_PREFIX) if stored.startswith(prefix) else None,
                        stored_name=lambda key: ldm_name(sub, key))
    plans = _plans(base_model)
    names = {ldm_name(sub, keys[0]): keys[0] for part in _SUBFOLDERS[sub][1] for keys, _, _ in plans[part]().entries}
    return _Tensors([path], select=lambda stored: names.get(stored, stored) if stored.startswith(prefix) else None,
                    stored_name=lambda key: key if key.startswith(prefix) else ldm_name(sub, key))


def _strip(text: str, prefix: str) -> str:
    return text[len(prefix):] if text.startswith(prefix) else text


_PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


# ComfyUI's test for an SD 2.x v-prediction (768-v) file, which holds the same tensors as an
# epsilon (base) one: the spread of one late norm's bias (a single file has no config to say).
_V_PREDICTION_PROBE = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_V_PREDICTION_STD = 0.09


def inspect_single_file(src: Path) -> PipelineInfo:
    """Check that ``src`` is an original (LDM) Stable Diffusion 1.x or 2.x single-file checkpoint
    in safetensors format holding every tensor keras-cv needs (reading its header, and for SD 2.x
    one small tensor). A single file carries no config: other architectures are told apart by
    their tensors' names and shapes, SD 2.x v-prediction files as ComfyUI tells them apart, and
    the settings keras-cv's models have (epsilon prediction, VAE scaling 0.18215) are assumed."""
    if src.suffix.lower() in _PICKLES:
        raise WeightsError(
            f"{src} is a pickle checkpoint, which can run code when loaded and is not read by conceptlib; "
            "download the .safetensors version of this model instead (most model pages offer one)"
        )
    if src.suffix.lower() != ".safetensors":
        raise WeightsError(
            f"{src} is neither a diffusers pipeline folder nor a .safetensors checkpoint; pass the folder holding "
            "model_index.json, or a single-file SD 1.x or 2.x .safetensors checkpoint"
        )
    header = _Tensors([src])  # reads the header only
    keys = set(header.keys())

    def shape(key):
        return header.shape(key) if key in keys else None

    if any(key.startswith("conditioner.") for key in keys):
        raise WeightsError(
            f"{src} is a Stable Diffusion XL checkpoint (conditioner.* text encoders); keras-cv has no SDXL model, "
            "so only Stable Diffusion 1.x and 2.x checkpoints can be converted"
        )
    if not any(key.startswith(_LDM_PREFIX["unet"]) for key in keys):
        raise WeightsError(
            f"{src} holds no Stable Diffusion UNet (no model.diffusion_model.* tensors), so it is not a full "
            "checkpoint (a LoRA, VAE or embedding?); pass a whole SD 1.x or 2.x checkpoint"
        )
    to_k = shape("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    sd2 = any(key.startswith(_OPENCLIP_PREFIX) for key in keys) or bool(to_k and to_k[-1] == 1024)
    base_model = "sd-2" if sd2 else "sd-1"
    label = _LABEL[base_model]
    conv_in = shape("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in and len(conv_in) == 4 and conv_in[1] != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(conv_in[1], "not a text-to-image model")
        raise WeightsError(
            f"{src}: the UNet takes {conv_in[1]} input channels ({kind}), keras-cv's {label} UNet takes 4; "
            f"only text-to-image {label} checkpoints can be converted"
        )
    if "v_pred" in keys:  # the marker ComfyUI and kohya's scripts write into v-prediction models
        raise WeightsError(
            f"{src} is marked as a v-prediction model (its v_pred tensor); keras-cv's sampler and conceptlib's trainer "
            "expect a UNet that predicts the noise (epsilon), so it cannot be converted"
        )
    if sd2 and _V_PREDICTION_PROBE in keys and _spread(header, _V_PREDICTION_PROBE) > _V_PREDICTION_STD:
        raise WeightsError(
            f"{src} is an SD 2.x v-prediction model (768-v; told apart as ComfyUI does, by the spread of "
            f"{_V_PREDICTION_PROBE}); keras-cv's StableDiffusionV2 and conceptlib's trainer expect a UNet that "
            "predicts the noise (epsilon): use an SD 2.x base (512) model, e.g. v2-1_512-ema-pruned.safetensors"
        )
    tensors = {sub: _single_file_tensors(src, sub, base_model) for sub in _SUBFOLDERS}
    for sub in _SUBFOLDERS:
        _check_part(tensors[sub], sub, base_model)
    ema = sum(key.startswith("model_ema.") and key not in ("model_ema.decay", "model_ema.num_updates") for key in keys)
    return PipelineInfo(
        src=src,
        base_model=base_model,
        pipeline_class=f"single-file {label} checkpoint",
        files={sub: [src] for sub in _SUBFOLDERS},
        tensors=tensors,
        source_format="ldm-single-file",
        ema_tensors_ignored=ema,
    )


def _spread(tensors: _Tensors, key: str) -> float:
    """The population standard deviation of one (small) tensor."""
    import numpy as np

    return float(np.std(tensors.get(key)))


def _same_layout(shape: tuple, expected: tuple) -> bool:
    # A 1x1 convolution and a Linear hold the same numbers (old VAE attention files use either).
    if len(shape) == 4 and len(expected) == 2:
        return shape == expected + (1, 1)
    if len(shape) == 2 and len(expected) == 4:
        return shape + (1, 1) == expected
    return shape == expected


def _check_tensor(tensors: _Tensors, keys: tuple, expected: tuple, base_model: str) -> str:
    key = next((k for k in keys if k in tensors.keys()), None)
    where = tensors.files[0] if len(tensors.files) == 1 else tensors.files[0].parent
    if key is None:
        raise WeightsError(
            f"{where} has no tensor {tensors.stored_name(keys[0])}; the file is incomplete or not an {_LABEL[base_model]} model: "
            "download it again"
        )
    name = tensors.stored_name(key)
    if not _same_layout(tensors.shape(key), expected):
        raise WeightsError(
            f"{where}: tensor {name} has shape {list(tensors.shape(key))}, {_LABEL[base_model]} needs {list(expected)}; "
            "the file belongs to another model"
        )
    if tensors.dtype(key) not in _DTYPES:
        raise WeightsError(f"{where}: tensor {name} is {tensors.dtype(key)}; only float32/float16/bfloat16 files can be converted")
    return key


# --- the destination ------------------------------------------------------------------------


def converted_from(directory: str | os.PathLike) -> dict | None:
    """The ``converted_from`` record of a folder ``convert_pipeline`` wrote, else None."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    record = manifest.get("converted_from") if isinstance(manifest, dict) else None
    return record if isinstance(record, dict) and not (directory / RANDOM_MARKER).exists() else None


def check_destination(directory: str | os.PathLike, *, overwrite: bool = False, needed_bytes: int = 0) -> Path:
    """``directory`` must be new, empty, or (with ``overwrite``) a folder an earlier conversion
    wrote; its parent must have room for ``needed_bytes``. WeightsError otherwise."""
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise WeightsError(f"{directory} exists and is not a folder; pick another path for the converted weights")
    existing = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if existing:
        record = converted_from(directory)
        if record is None:
            raise WeightsError(
                f"{directory} already holds {existing[0]} (not written by `weights convert`); refusing to mix "
                "converted weights with other files: pick a new or empty folder"
            )
        if not overwrite:
            raise WeightsError(
                f"{directory} already holds weights converted from {record.get('source')}; pass --overwrite "
                "to replace them, or pick a new folder"
            )
    parent = _existing_ancestor(directory)
    if needed_bytes and shutil.disk_usage(parent).free < needed_bytes * 1.05:
        free = shutil.disk_usage(parent).free
        raise WeightsError(
            f"not enough disk space for the converted weights in {parent}: {needed_bytes / 1e9:.1f} GB needed, "
            f"{free / 1e9:.1f} GB free; free some space or pick a folder on another disk"
        )
    return directory


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


# --- converting -----------------------------------------------------------------------------


def _layer_groups(model) -> dict[str, list]:
    groups: dict[str, list] = {}
    for layer in model.layers:
        groups.setdefault(type(layer).__name__, []).append(layer)
    return groups


def _resolve(groups: dict, path: tuple):
    target = groups[path[0]][path[1]]
    for step in path[2:]:
        target = target[step] if isinstance(step, int) else getattr(target, step)
    return target


def _keras_value(array, variable_shape: tuple, attribute: str):
    """A torch-layout array in keras' layout: Linear (out, in) -> Dense (in, out), conv OIHW ->
    HWIO (a Linear into a 1x1 conv and back); embeddings and vectors unchanged."""
    if attribute == "kernel":
        array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
        if len(variable_shape) == 4 and array.ndim == 2:
            array = array.reshape((1, 1) + array.shape)
        elif len(variable_shape) == 2 and array.ndim == 4 and array.shape[:2] == (1, 1):
            array = array.reshape(array.shape[2:])
    return array


def _fill(model, plan: _Plan, tensors: _Tensors, part: str) -> None:
    """Assign every weight of ``model`` from ``tensors``; WeightsError if any is left over."""
    import numpy as np

    from conceptlib.weights import numpy_dtype

    groups = _layer_groups(model)
    assigned: set[int] = set()
    for keys, _, path in plan.entries:
        key = next(k for k in keys if k in tensors.keys())
        variable = _resolve(groups, path)
        value = _keras_value(tensors.get(key), tuple(variable.shape), path[-1])
        if tuple(value.shape) != tuple(variable.shape) or id(variable) in assigned:
            raise WeightsError(  # a bug in the plan, not in the user's file
                f"conceptlib cannot map {key} {list(value.shape)} onto keras-cv's {part} weight "
                f"{variable.path} {list(variable.shape)}; please report this"
            )
        variable.assign(np.ascontiguousarray(value, dtype=numpy_dtype(variable.dtype)))
        assigned.add(id(variable))
    left = [v.path for v in model.weights if id(v) not in assigned]
    if left:
        raise WeightsError(f"conceptlib left {len(left)} keras-cv {part} weight(s) unset ({left[0]}); please report this")


def convert_pipeline(
    src: str | os.PathLike,
    directory: str | os.PathLike,
    *,
    variant: str | None = None,
    overwrite: bool = False,
    report=None,
    info: PipelineInfo | None = None,
) -> Path:
    """Convert the diffusers SD 1.x/2.x pipeline folder (or single-file checkpoint) ``src`` into a
    keras-cv weights folder ``directory`` (text_encoder, diffusion_model, decoder and image_encoder, keras-cv's file
    names, plus a ``conceptlib-weights.json`` manifest and ``CONVERTED-FROM.txt`` saying where
    they came from). ``report(message)`` is called as each part is done. Returns the folder."""
    info = info or inspect_pipeline(src, variant=variant)
    directory = check_destination(directory, overwrite=overwrite, needed_bytes=converted_bytes(info.base_model))
    report = report or (lambda message: None)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        # Beside the destination (same file system), so the final rename is atomic.
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.converting-", dir=directory.parent))
    except OSError as exc:
        raise WeightsError(
            f"cannot write to {directory.parent} ({exc.strerror or exc}); pick another folder for the weights"
        ) from None
    try:
        manifest_files = _write_parts(info, staging, report)
        _write_manifest(info, staging, manifest_files, variant)
        _replace(staging, directory)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise WeightsError(
                f"cannot write the converted weights to {directory.parent} ({exc.strerror or _first_line(exc)}); "
                "free some space or pick another folder"
            ) from None
        raise
    return directory


def _write_parts(info: PipelineInfo, staging: Path, report) -> dict:
    from conceptlib.kerascv import models

    files = {}
    for part, build_plan in _plans(info.base_model).items():
        sub = _PART_SUBFOLDER[part]
        # Every variable is assigned from the file, so skip the random initialisers (seconds for
        # the UNet); _fill checks that none is left with the placeholder zeros.
        with models._initialisers_skipped(True):
            model = models.build_part(info.base_model, part, img_size=64, weights=None)
        _fill(model, build_plan(), info.tensors[sub], part)
        path = staging / weight_filename(info.base_model, part)
        models.save_legacy_h5_weights(model, path)
        del model
        files[path.name] = {
            "base_model": info.base_model if part in ("text_encoder", "diffusion_model") else "sd-1,sd-2",
            "part": part,
            "bytes": path.stat().st_size,
            "created_at": _now(),
            "source": [str(p.relative_to(info.src)) if p != info.src else p.name for p in info.files[sub]],
        }
        if info.source_format == "ldm-single-file":
            prefix = _OPENCLIP_PREFIX if sub == "text_encoder" and info.base_model == "sd-2" else _LDM_PREFIX[sub]
            files[path.name]["source_tensors"] = f"{prefix}*"
        report(f"{part}: {', '.join(files[path.name]['source'])} -> {path.name}")
    return files


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _write_manifest(info: PipelineInfo, staging: Path, files: dict, variant: str | None) -> None:
    from conceptlib import __version__

    record = {
        "source": str(info.src.resolve()),
        "format": info.source_format,
        "pipeline": info.pipeline_class,
        "name_or_path": info.name_or_path,
        "diffusers_version": info.diffusers_version,
        "variant": variant,
        "base_model": info.base_model,
        "converted_at": _now(),
        "converter": f"conceptlib {__version__} (weights convert)",
    }
    if info.source_format == "ldm-single-file":
        # As AUTOMATIC1111 and diffusers' from_single_file do by default.
        record["unet_weights"] = "model.diffusion_model.* (model_ema.* copies not used)"
        record["ema_tensors_ignored"] = info.ema_tensors_ignored
    manifest = {"format": "conceptlib-weights/1", "random": False, "converted_from": record, "files": files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    origin = info.name_or_path or record["source"]
    (staging / NOTE).write_text(
        f"These keras-cv Stable Diffusion weights ({info.base_model}) were converted by `conceptlib weights convert`\n"
        f"from the {'single-file checkpoint' if info.source_format == 'ldm-single-file' else 'diffusers pipeline folder'} "
        f"{record['source']}"
        f"{f' ({origin})' if origin != record['source'] else ''} on {record['converted_at']}.\n"
        "They are the same numbers in keras-cv's layout; the source's license applies to them.\n"
    )


def _replace(staging: Path, directory: Path) -> None:
    """Move the finished ``staging`` folder to ``directory`` (replacing an empty folder or an
    earlier conversion): ``directory`` holds either the old files or all of the new ones."""
    for path in staging.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    old = None
    if directory.exists():
        if any(directory.iterdir()):
            old = directory.with_name(f".{directory.name}.replaced-{os.getpid()}")
            os.rename(directory, old)
        else:
            directory.rmdir()
    os.rename(staging, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
