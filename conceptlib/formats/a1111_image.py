"""AUTOMATIC1111's embeddings inside images (its "embedding images", .png / .webp).

When it trains an embedding, AUTOMATIC1111 can save a picture that carries the embedding twice,
and it loads such pictures from its ``embeddings/`` folder like ``.pt`` files:

* a PNG text chunk ``sd-ti-embedding``: base64 of the JSON of its ``.pt`` dictionary
  (``string_to_param``, ``name``, ``step``, ...), each tensor written as ``{"TORCHTENSOR": lists}``;
* the same JSON, zlib-compressed, in the pixels, for sites that strip text chunks: the picture is
  framed by two data strips, each separated from it by one black column. The left strip holds the
  low 4 bits of each byte, the right strip the high 4 bits, in the low 4 bits of each channel,
  XORed with a fixed pseudo-random sequence; the high 4 bits of each channel are decoration.

Reading never runs code: the data is JSON. The prompt word is the data's ``name`` (else the file
name), as AUTOMATIC1111 does.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from conceptlib.errors import ConceptFileError

IMAGE_SUFFIXES = (".png", ".webp")
TEXT_KEY = "sd-ti-embedding"
_TENSOR_KEY = "TORCHTENSOR"
# 75 vectors x 1024 floats are ~2 MB of JSON; anything far larger is not an embedding.
_MAX_JSON_BYTES = 32 << 20
# The pseudo-random sequence: a linear congruential generator modulo 2**32, output ``state % 255``.
_LCG_A, _LCG_C = 1664525, 1013904223
# Written pictures are this tall (the data strips are as tall as the picture).
_PICTURE_SIZE = 512
_DECORATION = 0x30  # high 4 bits of the data strips' channels: a dark grey, never black


@dataclass(frozen=True)
class ImageEmbedding:
    """What an embedding image holds: the ``.pt``-style dictionary (tensors as float32 arrays)
    and the picture without its data strips (uint8 H x W x 3)."""

    data: dict
    picture: object


def is_preview_name(path: Path) -> bool:
    """``NAME.preview.png``: AUTOMATIC1111's preview of another file, never an embedding."""
    return Path(path.stem).suffix.lower() == ".preview"


def read(path: Path) -> ImageEmbedding | None:
    """The embedding stored in image ``path``, or None when the image holds none (any other
    picture). Raises ConceptFileError when the file is not a readable image or its embedding
    data is damaged."""
    import numpy as np

    pixels, text = _open(path)
    if pixels is None:
        return None
    strips = _data_strips(pixels)
    if text is not None:
        data = _decode_json(path, _b64decode(path, text), "its sd-ti-embedding text chunk")
    elif strips is not None:
        raw = _inflate(path, strips[0], strips[1])
        if raw is None:
            return None  # two dark columns in an ordinary picture, not data strips
        data = _decode_json(path, raw, "the data in its pixels")
    else:
        return None
    picture = strips[2] if strips is not None else pixels
    return ImageEmbedding(data, np.ascontiguousarray(picture))


def write(data: dict, picture) -> bytes:
    """The PNG bytes AUTOMATIC1111 loads as an embedding: ``picture`` (uint8 H x W x 3, or None
    for a plain grey card) scaled to 512 px, framed by the data strips, with the text chunk.
    Tensors in ``data`` are numpy arrays."""
    import numpy as np
    from PIL import Image, PngImagePlugin

    encoded = json.dumps(data, default=_tensor_json, separators=(",", ":")).encode("utf-8")
    picture = _scaled_picture(picture)
    packed = np.frombuffer(zlib.compress(encoded, 9), np.uint8)
    height = picture.shape[0]
    width = -(-packed.size // (height * 3))  # columns each strip needs
    cells = np.resize(packed, height * width * 3)  # repeats the bytes: zlib ignores what follows
    mask = _lcg_nibbles(cells.size)  # both strips are XORed with the same sequence
    low = ((cells & 0x0F) ^ mask) | _DECORATION
    high = ((cells >> 4) ^ mask) | _DECORATION
    black = np.zeros((height, 1, 3), np.uint8)
    framed = np.concatenate([low.reshape(height, width, 3), black, picture, black, high.reshape(height, width, 3)], 1)
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(encoded).decode("ascii"))
    out = io.BytesIO()
    Image.fromarray(framed.astype(np.uint8), "RGB").save(out, "PNG", pnginfo=info)
    return out.getvalue()


# -- reading ---------------------------------------------------------------------------------------

def _open(path: Path):
    """(RGB pixels, the sd-ti-embedding text or None); (None, None) for a picture too large to be
    an embedding image that has no embedding text (a photo)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from conceptlib.images import MAX_EMBEDDED_PIXELS

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, in one line
            with Image.open(path) as image:
                text = getattr(image, "text", {}).get(TEXT_KEY)  # text chunks: read without the pixels
                if image.width * image.height > MAX_EMBEDDED_PIXELS:
                    if text is None:
                        return None, None  # a big photo (an embedding image is small): not decoded
                    raise ConceptFileError(
                        f"{path}: a {image.width}x{image.height} picture, far larger than any embedding image "
                        "(AUTOMATIC1111's are well under 2000 px a side); not read"
                    )
                pixels = np.asarray(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError, SyntaxError) as exc:
        raise ConceptFileError(
            f"{path}: not a readable {path.suffix.lstrip('.').upper() or 'image'} image ({str(exc).splitlines()[0][:120]}); "
            "re-download it, or save the embedding as a .pt/.safetensors file and import that"
        ) from None
    return pixels, text


def _data_strips(pixels):
    """(left strip, right strip, picture) when the image has the frame layout, else None: the
    image cropped to what is not black, and its columns whose channels' low 4 bits are all 0
    (the two separators, and any such columns of the picture between them)."""
    import numpy as np

    lit = (pixels > 0).all(axis=2)
    columns, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    if columns.size == 0:
        return None
    cropped = pixels[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1] & 0x0F
    black = np.flatnonzero(cropped.sum(axis=(0, 2), dtype=np.int64) == 0)
    if black.size < 2 or black[0] == 0 or black[-1] == cropped.shape[1] - 1:
        return None
    picture = pixels[rows[0]:rows[-1] + 1, columns[0] + black[0] + 1:columns[0] + black[-1]]
    return cropped[:, :black[0]], cropped[:, black[-1] + 1:], picture


def _inflate(path: Path, low, high) -> bytes | None:
    """The JSON bytes the two strips hold, or None when they hold no zlib stream."""
    import numpy as np

    if low.shape != high.shape:
        return None
    mask = _lcg_nibbles(low.size).reshape(low.shape)
    packed = (((high ^ mask) << 4) | (low ^ mask)).astype(np.uint8).tobytes()
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(packed, _MAX_JSON_BYTES + 1)
    except zlib.error:
        return None
    if len(out) > _MAX_JSON_BYTES:
        raise ConceptFileError(f"{path}: the data in its pixels inflates to over {_MAX_JSON_BYTES >> 20} MB, "
                               "far more than an embedding; this is not an embedding image")
    return out if inflater.eof else None


def _b64decode(path: Path, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ConceptFileError(f"{path}: its sd-ti-embedding text chunk is not base64; the file is damaged, re-download it") from None


def _decode_json(path: Path, raw: bytes, where: str) -> dict:
    if len(raw) > _MAX_JSON_BYTES:
        raise ConceptFileError(f"{path}: {where} holds {len(raw)} bytes, far more than an embedding; "
                               "this is not an embedding image")
    try:
        data = json.loads(raw, object_hook=_tensor_from_json)
    except (ValueError, TypeError, RecursionError) as exc:
        raise ConceptFileError(
            f"{path}: {where} is not an AUTOMATIC1111 embedding ({str(exc).splitlines()[0][:120]}); "
            "the file is damaged, re-download it"
        ) from None
    if not isinstance(data, dict):
        raise ConceptFileError(f"{path}: {where} holds a JSON {type(data).__name__}, not an embedding dictionary")
    return data


def _tensor_from_json(obj: dict):
    import numpy as np

    if _TENSOR_KEY not in obj:
        return obj
    try:
        return np.asarray(obj[_TENSOR_KEY], dtype=np.float64).astype(np.float32)
    except (ValueError, TypeError):
        raise ValueError("a TORCHTENSOR value is not a rectangular array of numbers") from None


# -- writing ---------------------------------------------------------------------------------------

def _tensor_json(value):
    import numpy as np

    if isinstance(value, np.ndarray):
        return {_TENSOR_KEY: value.astype(np.float64).tolist()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _scaled_picture(picture):
    import numpy as np
    from PIL import Image

    if picture is None:
        return np.full((_PICTURE_SIZE, _PICTURE_SIZE, 3), 96, np.uint8)
    image = Image.fromarray(np.asarray(picture, np.uint8), "RGB")
    scale = _PICTURE_SIZE / max(image.size)
    size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


# -- the pseudo-random sequence ---------------------------------------------------------------------

def _lcg_nibbles(count: int):
    """The low 4 bits of the first ``count`` outputs of the sequence, as uint8. Computed in
    blocks: state[i + K] = A_K * state[i] + C_K (mod 2**32), so no Python loop runs per pixel."""
    import numpy as np

    block = 4096
    first = np.empty(block, np.uint64)
    state, a_k, c_k = 0, 1, 0
    for i in range(block):
        state = (_LCG_A * state + _LCG_C) % 2**32
        first[i] = state
        c_k = (_LCG_A * c_k + _LCG_C) % 2**32  # the state after i+1 steps from 0
        a_k = (a_k * _LCG_A) % 2**32
    blocks = [first]
    total = block
    while total < count:
        blocks.append((np.uint64(a_k) * blocks[-1] + np.uint64(c_k)) & np.uint64(0xFFFFFFFF))
        total += block
    states = np.concatenate(blocks)[:count]
    return ((states % np.uint64(255)) & np.uint64(0x0F)).astype(np.uint8)
