"""Where Stable Diffusion weights come from: ``--weights DIR`` / ``$CONCEPTLIB_WEIGHTS``, else the
Keras cache, else a download with keras-cv's own URLs and hashes.

A weights folder is flat and uses keras-cv's own file names (``kcv_encoder.h5``, ...), so a Keras
cache folder (``~/.keras/datasets``) works as a weights folder as-is, and a folder written by
``write_random_weights`` is read exactly like real weights. Importing this module imports no keras.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from conceptlib.concept import DIMS
from conceptlib.errors import WeightsError

PARTS = ("text_encoder", "diffusion_model", "decoder", "image_encoder")
ENV_VAR = "CONCEPTLIB_WEIGHTS"
BASE_MODELS = tuple(DIMS)  # ("sd-1", "sd-2")
RANDOM_MARKER = "RANDOM-WEIGHTS.txt"
MANIFEST = "conceptlib-weights.json"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class WeightFile:
    """One keras-cv weight file: its URL and sha256 (as in keras-cv's sources) and cache name."""

    url: str
    sha256: str

    @property
    def filename(self) -> str:
        # keras.utils.get_file(origin=url) names the cached file after the URL's last segment.
        return self.url.rsplit("/", 1)[-1]


_HF_V1 = "https://huggingface.co/fchollet/stable-diffusion/resolve/main/"
_HF_V2 = "https://huggingface.co/ianstenbit/keras-sd2.1/resolve/main/"

# Copied from keras_cv/src/models/stable_diffusion/{text_encoder,diffusion_model,decoder,
# image_encoder}.py (keras-cv 0.9.0). SD 2.1 shares SD 1.x's VAE (decoder and image encoder).
_DECODER = WeightFile(_HF_V1 + "kcv_decoder.h5", "ad350a65cc8bc4a80c8103367e039a3329b4231c2469a1093869a345f55b1962")
_IMAGE_ENCODER = WeightFile(_HF_V1 + "vae_encoder.h5", "c60fb220a40d090e0f86a6ab4c312d113e115c87c40ff75d11ffcf380aab7ebb")
WEIGHT_FILES: dict[str, dict[str, WeightFile]] = {
    "sd-1": {
        "text_encoder": WeightFile(_HF_V1 + "kcv_encoder.h5", "4789e63e07c0e54d6a34a29b45ce81ece27060c499a709d556c7755b42bb0dc4"),
        "diffusion_model": WeightFile(
            _HF_V1 + "kcv_diffusion_model.h5", "8799ff9763de13d7f30a683d653018e114ed24a6a819667da4f5ee10f9e805fe"
        ),
        "decoder": _DECODER,
        "image_encoder": _IMAGE_ENCODER,
    },
    "sd-2": {
        "text_encoder": WeightFile(_HF_V2 + "text_encoder_v2_1.h5", "985002e68704e1c5c3549de332218e99c5b9b745db7171d5f31fcd9a6089f25b"),
        "diffusion_model": WeightFile(
            _HF_V2 + "diffusion_model_v2_1.h5", "c31730e91111f98fe0e2dbde4475d381b5287ebb9672b1821796146a25c5132d"
        ),
        "decoder": _DECODER,
        "image_encoder": _IMAGE_ENCODER,
    },
}


def validate_base_model(base_model: str) -> str:
    if base_model not in WEIGHT_FILES:
        raise WeightsError(f"unknown base model {base_model!r}; use one of {', '.join(BASE_MODELS)}")
    return base_model


def _validate_parts(parts) -> tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    for part in parts:
        if part not in PARTS:
            raise WeightsError(f"unknown model part {part!r}; use one of {', '.join(PARTS)}")
    return parts


def weight_filename(base_model: str, part: str) -> str:
    """keras-cv's cache file name for ``part`` of ``base_model`` (e.g. 'kcv_encoder.h5')."""
    return WEIGHT_FILES[validate_base_model(base_model)][part].filename


def keras_cache_dirs() -> list[Path]:
    """The Keras download cache folders, in the order keras would use them."""
    from conceptlib.kerascv.tokenizer import keras_cache_dirs as _dirs

    return _dirs()


def check_weight_file(path: Path) -> Path:
    """Cheap integrity check (exists, an HDF5 file whose superblock opens, not truncated);
    WeightsError otherwise. Damage inside the file is reported when the weights are loaded."""
    try:
        with open(path, "rb") as handle:
            signature = handle.read(len(HDF5_SIGNATURE))
    except FileNotFoundError:
        raise WeightsError(f"weights file {path} does not exist") from None
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({exc.strerror})") from None
    if signature != HDF5_SIGNATURE:
        raise WeightsError(f"weights file {path} is corrupt (not an HDF5 file); {replacement_advice(path)}")
    import h5py

    # Opening reads only the superblock, which records the file's full size: a truncated download
    # is caught here, before any model is built, not when its part is loaded minutes later.
    try:
        h5py.File(path, "r").close()
    except OSError as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"weights file {path} is truncated or corrupt ({detail}); {replacement_advice(path)}") from None
    return path


def replacement_advice(path: Path) -> str:
    """How to replace a bad weight file: rewrite a folder `weights init-random` made, else get an
    intact copy (init-random refuses folders of real weights)."""
    folder = Path(path).parent
    if is_random(folder):
        return f"rewrite the folder with `conceptlib weights init-random {shlex.quote(str(folder))}`"
    return "delete it and download it again, or put an intact copy there"


def numpy_dtype(name: str):
    """The numpy dtype of a Keras dtype name ("bfloat16" is ml_dtypes' numpy extension type)."""
    import ml_dtypes
    import numpy as np

    return np.dtype(ml_dtypes.bfloat16) if str(name) == "bfloat16" else np.dtype(name)


def read_legacy_h5(path, datasets, *, dtypes=None, shapes=None) -> list:
    """The arrays at ``datasets`` (``(layer group, weight name)`` pairs, as
    ``conceptlib.kerascv.models.legacy_h5_sources`` gives them) of a legacy Keras HDF5 weights
    file, in that order, each cast on the host to ``dtypes[i]`` ("bfloat16", "float32", ...).
    Needs h5py only, no keras. WeightsError names the file and dataset that is missing or has
    another shape than ``shapes[i]``."""
    import h5py

    check_weight_file(Path(path))
    arrays = []
    try:
        with h5py.File(path, "r") as handle:
            for index, (layer, weight) in enumerate(datasets):
                try:
                    value = handle[layer][weight][()]
                except KeyError:
                    raise WeightsError(
                        f"weights file {path} has no weight {layer}/{weight}; it belongs to another "
                        f"model layout: {replacement_advice(path)}"
                    ) from None
                if shapes is not None and tuple(value.shape) != tuple(shapes[index]):
                    raise WeightsError(
                        f"weights file {path}: {layer}/{weight} has shape {tuple(value.shape)}, "
                        f"expected {tuple(shapes[index])}; the file belongs to another model"
                    )
                if dtypes is not None:
                    value = value.astype(numpy_dtype(dtypes[index]), copy=False)
                arrays.append(value)
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({exc}); delete it and re-download it") from None
    return arrays


def weights_folder(weights_dir=None) -> Path | None:
    """The weights folder given (``weights_dir``, else ``$CONCEPTLIB_WEIGHTS``), or None."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return None


def resolve_weights(
    base_model: str,
    weights_dir: str | os.PathLike | None = None,
    parts=PARTS,
    *,
    download: bool = True,
) -> dict[str, Path]:
    """Return ``{part: path}`` for ``parts`` of ``base_model`` ('sd-1' or 'sd-2').

    Each part is looked for in ``weights_dir`` (else ``$CONCEPTLIB_WEIGHTS``), then in the Keras
    cache, then downloaded with keras-cv's URL and sha256. Nothing is downloaded with
    ``download=False``, nor when a weights folder was given: the user said where the weights are,
    and a part missing there is an error, not gigabytes fetched unasked. Raises WeightsError saying
    where it looked.
    """
    validate_base_model(base_model)
    parts = _validate_parts(parts)
    search = _search_dirs(weights_dir)
    given = weights_folder(weights_dir)
    resolved = find_local_weights(base_model, weights_dir, parts)
    missing = [part for part in parts if part not in resolved]
    if missing and (not download or given is not None):
        files = ", ".join(weight_filename(base_model, part) for part in missing)
        looked = ", ".join(str(folder) for folder in search)
        fix = (f"put keras-cv's {files} in {given}, or run `conceptlib weights init-random DIR` for random smoke-test "
               "weights" if given is not None else
               f"pass --weights DIR (or set ${ENV_VAR}) to a folder holding keras-cv's weight files, or run "
               "`conceptlib weights init-random DIR` for random smoke-test weights")
        raise WeightsError(f"{base_model} {', '.join(missing)} weights ({files}) not found in {looked}; {fix}"
                           f"{other_model_hint(base_model, search)}")
    for part in missing:
        resolved[part] = download_weight_file(base_model, part, looked_in=search)
    return resolved


def other_model_hint(base_model: str, folders) -> str:
    """A note when a searched folder holds the other base model's own files (a --weights folder
    of sd-2 weights used for an sd-1 prompt), so the user learns which --model they have."""
    for other in BASE_MODELS:
        if other == base_model:
            continue
        own = {weight_filename(other, part) for part in ("text_encoder", "diffusion_model")}
        for folder in folders:
            if any((Path(folder) / name).exists() for name in own):
                return (f" ({folder} holds {other} weights: use them with --base-model {other} in train, "
                        f"--model {other} in generate)")
    return ""


def find_local_weights(base_model: str, weights_dir: str | os.PathLike | None = None, parts=PARTS) -> dict[str, Path]:
    """``{part: path}`` for the ``parts`` found in ``weights_dir`` (else ``$CONCEPTLIB_WEIGHTS``)
    or the Keras cache, each checked; parts found nowhere are left out. Nothing is downloaded."""
    return {part: check_weight_file(path) for part, path in local_weight_files(base_model, weights_dir, parts).items()}


def local_weight_files(base_model: str, weights_dir: str | os.PathLike | None = None, parts=PARTS) -> dict[str, Path]:
    """Like ``find_local_weights`` but unchecked: the file each part would be loaded from, so a
    caller can check every one (``check_weight_file``) and report all the bad ones."""
    validate_base_model(base_model)
    found: dict[str, Path] = {}
    search = _search_dirs(weights_dir)
    for part in _validate_parts(parts):
        filename = weight_filename(base_model, part)
        for folder in search:
            candidate = folder / filename
            if candidate.exists():
                found[part] = candidate
                break
    return found


def _search_dirs(weights_dir) -> list[Path]:
    directory = weights_folder(weights_dir)
    source = "--weights" if weights_dir is not None else f"${ENV_VAR}"
    if directory is not None and directory.exists() and not directory.is_dir():
        raise WeightsError(f"weights folder {directory} (from {source}) is a file, not a folder; point {source} at the "
                           "folder holding keras-cv's weight files")
    if directory is not None and not directory.is_dir():
        folder = shlex.quote(str(directory))
        raise WeightsError(
            f"weights folder {directory} (from {source}) does not exist; check the path, or make it from a Stable "
            f"Diffusion model with `conceptlib weights convert MODEL {folder}` (a diffusers folder or .safetensors "
            f"checkpoint; `conceptlib weights init-random {folder}` writes random weights, to try the tools)"
        )
    if directory is not None and not os.access(directory, os.R_OK | os.X_OK):
        raise WeightsError(f"weights folder {directory} (from {source}) cannot be read (permission denied); make it "
                           f"readable for you, or point {source} at another folder")
    return ([directory] if directory is not None else []) + keras_cache_dirs()


def download_weight_file(base_model: str, part: str, *, looked_in=()) -> Path:
    """Download one part with keras-cv's URL and sha256 into the Keras cache."""
    spec = WEIGHT_FILES[validate_base_model(base_model)][part]
    from conceptlib.kerascv import keras_module

    keras = keras_module()
    try:
        path = keras.utils.get_file(origin=spec.url, file_hash=spec.sha256)
    except Exception as exc:  # network errors, hash mismatch: get_file raises several kinds
        looked = ", ".join(str(folder) for folder in looked_in) or "nowhere"
        raise WeightsError(
            f"{base_model} {part} weights ({spec.filename}) not found in {looked} and the download "
            f"from {spec.url} failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"pass --weights DIR (or set ${ENV_VAR}) to a folder holding keras-cv's weight files"
            f"{other_model_hint(base_model, looked_in)}"
        ) from None
    return Path(path)


def prefetch(weights: dict[str, Path]) -> None:
    """Ask the OS to start reading the weight files into its page cache now (Linux
    ``posix_fadvise(WILLNEED)``, asynchronous): the GBs of a cold disk then arrive while Python
    imports TensorFlow and builds the models, not when the weights are loaded. No-op elsewhere."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in weights.values():
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # reported properly when the file is loaded
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def is_random(weights: dict[str, Path] | str | os.PathLike | None) -> bool:
    """True if the weights (a resolve_weights dict or a folder) were written by
    ``write_random_weights``."""
    if weights is None:
        return False
    if isinstance(weights, dict):
        return bool(random_folders(weights))
    return (Path(weights) / RANDOM_MARKER).exists()


def random_folders(weights: dict[str, Path]) -> list[Path]:
    """The folders (each once, in part order) that hold random parts of a resolve_weights dict:
    parts may come from several folders (``--weights DIR``, then the Keras cache)."""
    folders: list[Path] = []
    for path in weights.values():
        folder = Path(path).parent
        if folder not in folders and (folder / RANDOM_MARKER).exists():
            folders.append(folder)
    return folders


def write_random_weights(directory: str | os.PathLike, base_model: str = "sd-1", parts=PARTS) -> Path:
    """Write randomly initialised keras-cv weights for ``base_model`` into ``directory``, in the
    layout ``resolve_weights`` reads (keras-cv's file names, legacy Keras HDF5 like keras-cv's),
    marked random by ``RANDOM-WEIGHTS.txt`` and a ``conceptlib-weights.json`` manifest.

    For smoke runs and tests only: images generated with these weights are noise. Returns the
    folder.
    """
    validate_base_model(base_model)
    parts = _validate_parts(parts)
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise WeightsError(f"{directory} exists and is not a folder; pick another path for the weights")
    # The marker declares the whole folder random: written beside other files (real weights of
    # the other base model, a Keras cache) it would mislabel them, and a later init-random into
    # the now "random" folder would overwrite them. Only an empty or already-random folder is used.
    existing = sorted(directory.iterdir()) if directory.is_dir() else []
    if existing and not (directory / RANDOM_MARKER).exists():
        raise WeightsError(
            f"{directory} already holds {existing[0].name} and is not marked random; refusing to "
            "write random weights beside (or over) what may be real weights, pick an empty or new folder"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / RANDOM_MARKER).write_text(
            "These Stable Diffusion weights are RANDOMLY INITIALISED by `conceptlib weights init-random`.\n"
            "They exist for smoke runs and tests: images generated with them are noise, and concepts\n"
            "trained with them are meaningless. Use real keras-cv weights for real work.\n"
        )
    except OSError as exc:
        raise WeightsError(f"cannot write to {directory} ({exc.strerror or exc}); pick another folder for the weights") from None
    from conceptlib.kerascv import models

    manifest_path = directory / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    except ValueError:
        manifest = {}
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        manifest = {}  # a damaged leftover of an earlier run: written anew
    manifest.setdefault("files", {})
    manifest.update({"format": "conceptlib-weights/1", "random": True})
    for part in parts:
        model = models.build_part(base_model, part, img_size=128, weights=None)
        path = directory / weight_filename(base_model, part)
        models.save_legacy_h5_weights(model, path)
        manifest["files"][path.name] = {
            "base_model": base_model if part in ("text_encoder", "diffusion_model") else "sd-1,sd-2",
            "part": part,
            "bytes": path.stat().st_size,
            "created_at": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        del model
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory
