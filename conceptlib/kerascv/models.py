"""Build keras-cv's Stable Diffusion models without keras-cv's own downloads.

Every part is constructed with ``download_weights=False`` and then loaded from files resolved by
``conceptlib.weights`` (``weights`` = ``resolve_weights(...)``'s dict), or left randomly
initialised (``weights=None``) for tests and smoke runs.

``build_stable_diffusion`` returns a real ``keras_cv.models.StableDiffusion`` /
``StableDiffusionV2`` (a subclass whose lazy properties build parts through this module instead of
downloading), so everything written for keras-cv's classes works on it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from conceptlib.errors import WeightsError
from conceptlib.kerascv.sd_modules import stable_diffusion_module
from conceptlib.weights import PARTS, validate_base_model

MAX_PROMPT_LENGTH = 77


def _load(model, part: str, weights) -> None:
    if weights is None:
        return
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
    else:
        try:
            path = Path(weights[part])
        except KeyError:
            raise WeightsError(
                f"no {part} weights among the resolved files ({', '.join(sorted(weights)) or 'none'}); "
                f"resolve them with resolve_weights(base_model, parts=[..., {part!r}])"
            ) from None
    from conceptlib.weights import check_weight_file, replacement_advice

    check_weight_file(path)
    try:
        with _assignments_cast_on_host():
            model.load_weights(str(path))
    except Exception as exc:  # h5py OSError, Keras ValueError on a layout/shape mismatch
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"{path}: could not load {part} weights ({detail[:200]}); the file is corrupt or belongs "
            f"to another model: {replacement_advice(path)}"
        ) from None


@contextlib.contextmanager
def _assignments_cast_on_host():
    """While loading weights on the JAX backend, cast each float32 array from the file to its
    variable's dtype (bfloat16 for bf16 models) with numpy before it is assigned. Keras otherwise
    casts on the device with ``astype``, and JAX compiles one small program per distinct weight
    shape (~100 for the UNet: seconds of compilation on a GPU before the first step)."""
    import keras

    if keras.backend.backend() != "jax":
        yield
        return
    import numpy as np
    from keras.src.backend import Variable

    from conceptlib.weights import numpy_dtype

    def assign(variable, value):
        if isinstance(value, np.ndarray):
            dtype = numpy_dtype(variable.dtype)
            if value.dtype != dtype:
                value = value.astype(dtype)
        return original(variable, value)

    original = Variable.assign
    Variable.assign = assign
    try:
        yield
    finally:
        Variable.assign = original


@contextlib.contextmanager
def _initialisers_skipped(weights):
    """While building a model whose every weight is about to be loaded from ``weights``, give new
    variables zeros instead of running their random initialisers. On the JAX backend each distinct
    weight shape otherwise compiles its own RNG program (~20 s for the UNet), only for the values
    to be overwritten by ``load_weights``. With ``weights=None`` (random weights) nothing changes."""
    if weights is None:
        yield
        return
    import numpy as np
    from keras.src.backend import Variable  # the active backend's class: each overrides the method

    from conceptlib.weights import numpy_dtype

    def zeros(variable, initializer):
        dtype = numpy_dtype(variable._dtype)
        variable._initialize(variable._convert_to_tensor(np.zeros(variable._shape, dtype=dtype)))

    original = Variable._initialize_with_initializer
    Variable._initialize_with_initializer = zeros
    try:
        yield
    finally:
        Variable._initialize_with_initializer = original


def build_text_encoder(base_model: str, weights=None):
    """keras-cv's TextEncoder (sd-1, 768-d) or TextEncoderV2 (sd-2, 1024-d)."""
    validate_base_model(base_model)
    module = stable_diffusion_module("text_encoder")
    cls = module.TextEncoder if base_model == "sd-1" else module.TextEncoderV2
    with _initialisers_skipped(weights):
        model = cls(MAX_PROMPT_LENGTH, download_weights=False)
    _load(model, "text_encoder", weights)
    return model


def _check_size(img_size: int) -> int:
    img_size = int(img_size)
    if img_size < 64 or img_size % 64:
        raise WeightsError(f"image size {img_size} is not a positive multiple of 64; use e.g. 512")
    return img_size


def build_diffusion_model(base_model: str, img_size: int, weights=None):
    """keras-cv's DiffusionModel (sd-1) or DiffusionModelV2 (sd-2) for ``img_size`` pixels."""
    validate_base_model(base_model)
    img_size = _check_size(img_size)
    module = stable_diffusion_module("diffusion_model")
    cls = module.DiffusionModel if base_model == "sd-1" else module.DiffusionModelV2
    with _initialisers_skipped(weights):
        model = cls(img_size, img_size, MAX_PROMPT_LENGTH, download_weights=False)
    _load(model, "diffusion_model", weights)
    return model


def build_decoder(base_model: str, img_size: int, weights=None):
    """keras-cv's VAE Decoder (shared by sd-1 and sd-2) for ``img_size`` pixels."""
    validate_base_model(base_model)
    img_size = _check_size(img_size)
    Decoder = stable_diffusion_module("decoder").Decoder
    with _initialisers_skipped(weights):
        model = Decoder(img_size, img_size, download_weights=False)
    _load(model, "decoder", weights)
    return model


def build_image_encoder(img_size: int | None = None, weights=None):
    """keras-cv's VAE ImageEncoder (any image size; returns the scaled posterior mean only)."""
    ImageEncoder = stable_diffusion_module("image_encoder").ImageEncoder
    with _initialisers_skipped(weights):
        model = ImageEncoder(download_weights=False)
    _load(model, "image_encoder", weights)
    return model


def build_part(base_model: str, part: str, img_size: int = 512, weights=None):
    """Build one of ``conceptlib.weights.PARTS`` by name."""
    if part == "text_encoder":
        return build_text_encoder(base_model, weights)
    if part == "diffusion_model":
        return build_diffusion_model(base_model, img_size, weights)
    if part == "decoder":
        return build_decoder(base_model, img_size, weights)
    if part == "image_encoder":
        return build_image_encoder(img_size, weights)
    raise WeightsError(f"unknown model part {part!r}; use one of {', '.join(PARTS)}")


def save_legacy_h5_weights(model, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights in the legacy Keras HDF5 layout keras-cv's files use (so
    ``model.load_weights('kcv_encoder.h5')`` reads them), atomically."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with h5py.File(tmp, "w") as handle:
            legacy_h5_format.save_weights_to_hdf5_group(handle, model)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def legacy_h5_sources(model, path: str | os.PathLike) -> dict[int, tuple[str, str]]:
    """Where keras' legacy HDF5 loader takes each of ``model``'s weights from in ``path``:
    ``{id(variable): (layer group, weight name)}``. The same pairing as
    ``keras.src.legacy.saving.legacy_h5_format.load_weights_from_hdf5_group`` (the loader
    ``model.load_weights`` runs on keras-cv's files): the i-th layer with weights takes the i-th
    saved layer group that has weights, its trainable then non-trainable weights in
    ``weight_names`` order. So a later process can read the weights with h5py alone
    (``conceptlib.weights.read_legacy_h5``) without building the model."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "r") as handle:
        group = handle["model_weights"] if "model_weights" in handle else handle
        top = group["top_level_model_weights"] if "top_level_model_weights" in group else None
        if top is not None and len(legacy_h5_format.load_attributes_from_hdf5_group(top, "weight_names")):
            raise WeightsError(f"{path}: weights of the model itself (not of a layer) are not supported here")
        saved = []
        for name in legacy_h5_format.load_attributes_from_hdf5_group(group, "layer_names"):
            names = legacy_h5_format.load_attributes_from_hdf5_group(group[name], "weight_names")
            if names:
                prefix = "model_weights/" if group is not handle else ""
                saved.append((prefix + name, names))
    layers = [layer for layer in model.layers if layer.trainable_weights + layer.non_trainable_weights]
    if len(layers) != len(saved):
        raise WeightsError(f"{path}: {len(saved)} saved layers with weights, the model has {len(layers)}")
    sources = {}
    for layer, (name, names) in zip(layers, saved):
        variables = layer.trainable_weights + layer.non_trainable_weights
        if len(variables) != len(names):
            raise WeightsError(f"{path}: layer {name} holds {len(names)} weights, the model's {len(variables)}")
        for variable, weight in zip(variables, names):
            sources[id(variable)] = (name, weight)
    return sources


_SD_CLASSES: dict[str, type] = {}


def _stable_diffusion_class(base_model: str) -> type:
    """A subclass of keras-cv's StableDiffusion[V2] whose lazily built parts come from this
    module (never keras-cv's downloads) and whose tokenizer is found offline."""
    if base_model in _SD_CLASSES:
        return _SD_CLASSES[base_model]
    module = stable_diffusion_module("stable_diffusion")
    base_cls = module.StableDiffusion if base_model == "sd-1" else module.StableDiffusionV2

    def _part(self, attribute: str, part: str):
        if getattr(self, attribute) is None:
            model = build_part(self.conceptlib_base_model, part, self.img_height, self.conceptlib_weights)
            if self.jit_compile:
                model.compile(jit_compile=True)
            setattr(self, attribute, model)
        return getattr(self, attribute)

    def tokenizer(self):
        if self._tokenizer is None:
            from conceptlib.kerascv.tokenizer import make_tokenizer

            self._tokenizer = make_tokenizer()
        return self._tokenizer

    namespace = {
        "__doc__": f"keras-cv {base_cls.__name__} whose parts are built by conceptlib (weights from "
        "conceptlib.weights, never keras-cv's downloads).",
        "__module__": __name__,
        "text_encoder": property(lambda self: _part(self, "_text_encoder", "text_encoder")),
        "diffusion_model": property(lambda self: _part(self, "_diffusion_model", "diffusion_model")),
        "decoder": property(lambda self: _part(self, "_decoder", "decoder")),
        "image_encoder": property(lambda self: _part(self, "_image_encoder", "image_encoder")),
        "tokenizer": property(tokenizer),
    }
    cls = type(f"Conceptlib{base_cls.__name__}", (base_cls,), namespace)
    _SD_CLASSES[base_model] = cls
    return cls


def build_stable_diffusion(base_model: str, img_size: int = 512, weights=None, *, jit_compile: bool = False):
    """A keras-cv ``StableDiffusion`` (sd-1) or ``StableDiffusionV2`` (sd-2) for square
    ``img_size`` images (a multiple of 64; keras-cv itself only allows multiples of 128).

    Parts are built on first use, as keras-cv does, but with ``download_weights=False`` and loaded
    from ``weights`` (a ``resolve_weights`` dict; ``None`` = random initialisation). The tokenizer
    uses the locally found CLIP vocabulary. ``jit_compile`` defaults to False because XLA is slower
    than plain tf.function on CPU.
    """
    validate_base_model(base_model)
    img_size = _check_size(img_size)
    cls = _stable_diffusion_class(base_model)
    import contextlib
    import sys

    # keras-cv prints its license notice on stdout; keep it, but off the CLI's stdout (paths).
    with contextlib.redirect_stdout(sys.stderr):
        sd = cls(img_height=img_size, img_width=img_size, jit_compile=jit_compile)
    # keras-cv rounds sizes to multiples of 128 (64 would become 0); the UNet works on any
    # multiple of 64, which keeps smoke tests small.
    sd.img_height = sd.img_width = img_size
    sd.conceptlib_base_model = base_model
    sd.conceptlib_weights = weights
    return sd


def base_model_of(sd) -> str:
    """'sd-2' for a StableDiffusionV2 instance, 'sd-1' for a StableDiffusion one."""
    module = stable_diffusion_module("stable_diffusion")
    if isinstance(sd, module.StableDiffusionV2):
        return "sd-2"
    if isinstance(sd, module.StableDiffusion):
        return "sd-1"
    from conceptlib.errors import ApplyError

    raise ApplyError(
        f"expected a keras_cv.models.StableDiffusion or StableDiffusionV2, got {type(sd).__name__}; "
        "build one with conceptlib.kerascv.models.build_stable_diffusion()"
    )
