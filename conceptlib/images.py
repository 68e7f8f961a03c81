"""Training images: find, check, hash, caption, load and augment them (PIL + numpy only).

Captions come, per image, from the first of: ``<stem>.txt`` beside it (AUTOMATIC1111, kohya),
``<stem>.caption`` (kohya's default caption extension), or the folder's ``metadata.jsonl`` /
``metadata.csv`` (Hugging Face's ImageFolder layout, as diffusers' training scripts read it: a
``file_name`` column and a ``text`` or ``caption`` column).

Augmentation (random square crop of 80-100 % of the area, resize, horizontal flip) is a pure
function of a numpy Generator, so a run's data is reproducible from its seed and step.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from conceptlib.errors import ConceptlibError, TrainingError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIN_SIDE = 64  # the smallest training resolution
CROP_AREA = (0.8, 1.0)  # keras.io example: RandomCropAndResize(crop_area_factor=(0.8, 1.0))


CAPTION_EXTENSIONS = (".txt", ".caption")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_CAPTION_COLUMNS = ("text", "caption")


@dataclass(frozen=True)
class TrainingImage:
    """One checked training image and its optional caption; ``caption_source`` says where the
    caption came from (a file, or a metadata file's line) for messages."""

    path: Path
    width: int
    height: int
    sha256: str
    caption: str | None
    caption_source: str | None = None


def find_images(source: str | Path) -> list[TrainingImage]:
    """The training images in a folder (or one image file), checked and sorted by name.

    Raises TrainingError (one line) if there are none, or one is unreadable or smaller than
    MIN_SIDE pixels on a side.
    """
    source = Path(source)
    if source.is_file():
        if source.suffix.lower() not in EXTENSIONS:
            raise TrainingError(f"{source}: not a training picture (expected {', '.join(sorted(EXTENSIONS))}); "
                                "give a picture or a folder of them")
        paths = [source]
    elif source.is_dir():
        # Hidden files are not pictures of the concept: macOS leaves "._photo.jpg" metadata files
        # beside copied photos, and they carry the photo's extension.
        paths = sorted(
            p for p in source.iterdir()
            if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
        )
        if not paths:
            raise TrainingError(
                f"no images in {source}: put a few .png/.jpg/.webp pictures of the concept there"
            )
    else:
        raise TrainingError(f"{source}: no such folder; give the folder holding the training images")
    listed = folder_captions(source, paths) if source.is_dir() else {}
    images = []
    for path in paths:
        with opened_image(path, TrainingError, "replace or remove it") as image:
            data = path.read_bytes()
            image.load()
            width, height = upright_size(image)
        if min(width, height) < MIN_SIDE:
            raise TrainingError(
                f"{path}: image is {width}x{height}, smaller than {MIN_SIDE} px on a side; "
                "use a larger picture or remove it"
            )
        caption, caption_source = _sidecar_caption(path) or listed.get(path.name, (None, None))
        images.append(
            TrainingImage(path, width, height, hashlib.sha256(data).hexdigest(), caption, caption_source)
        )
    return images


def _clean(text: str) -> str | None:
    return " ".join(text.split()) or None


def _sidecar_caption(path: Path) -> tuple[str | None, str] | None:
    """(caption, its file) from ``<stem>.txt`` or ``<stem>.caption``, or None without one."""
    for extension in CAPTION_EXTENSIONS:
        caption_path = path.with_suffix(extension)
        if caption_path.is_file():
            try:
                return _clean(caption_path.read_text(encoding="utf-8")), str(caption_path)
            except UnicodeDecodeError as exc:
                raise TrainingError(
                    f"{caption_path}: the caption is not UTF-8 text (byte {exc.start}); save it as UTF-8"
                ) from None
    return None


def folder_captions(folder: Path, images: list[Path]) -> dict[str, tuple[str | None, str]]:
    """Image file name -> (caption, where it was read) from the folder's metadata.jsonl or
    metadata.csv. A row naming a file that is not one of ``images``, a malformed row or a row
    without a caption column is a TrainingError naming the file and line."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if not found:
        return {}
    if len(found) > 1:
        raise TrainingError(f"{folder} holds both {found[0].name} and {found[1].name}; keep one of them")
    path = found[0]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrainingError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    rows = _jsonl_rows(path, text) if path.suffix == ".jsonl" else _csv_rows(path, text)
    names = {image.name for image in images}
    captions: dict[str, tuple[str | None, str]] = {}
    first_line: dict[str, int] = {}
    for line, row in rows:
        where = f"{path} line {line}"
        name = row.get("file_name")
        column = next((c for c in _CAPTION_COLUMNS if c in row), None)
        if not isinstance(name, str) or column is None or not isinstance(row[column], str):
            raise TrainingError(
                f"{where}: needs a file_name and a text (or caption) value, as Hugging Face's ImageFolder "
                f"metadata has them; it has {', '.join(sorted(row)) or 'nothing'}"
            )
        name = name.replace("\\", "/")
        if name not in names:
            raise TrainingError(
                f"{where}: {name!r} is not one of the images in {folder}; fix the name or remove the line"
            )
        if name in first_line:
            raise TrainingError(f"{where}: {name!r} is captioned twice (also on line {first_line[name]}); keep one")
        first_line[name] = line
        captions[name] = (_clean(row[column]), where)
    return captions


def _jsonl_rows(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise TrainingError(f"{path} line {number}: not a JSON object ({exc.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise TrainingError(f"{path} line {number}: not a JSON object; write one object per line")
        yield number, row


def _csv_rows(path: Path, text: str):
    reader = csv.DictReader(text.splitlines())
    try:
        for row in reader:
            yield reader.line_num, {key: value for key, value in row.items() if key is not None}
    except csv.Error as exc:
        raise TrainingError(f"{path} line {reader.line_num}: {exc}; fix the line") from None


def upright_size(image) -> tuple[int, int]:
    """(width, height) of ``image`` as viewers show it: its EXIF orientation applied."""
    orientation = image.getexif().get(0x0112, 1)  # 5-8: rotated by 90 or 270 degrees
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else image.size


def load_rgb(path: Path, short_side: int):
    """The image, upright as viewers show it (EXIF orientation applied: phone photos are often
    stored sideways), as a uint8 (H, W, 3) array resized so its short side is ``short_side``."""
    import numpy as np
    from PIL import Image, ImageOps

    with _quiet_about_large_pictures(), Image.open(path) as image:
        image = as_rgb(ImageOps.exif_transpose(image))
        scale = short_side / min(image.size)
        size = (max(short_side, round(image.width * scale)), max(short_side, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8)


def augment(array, resolution: int, rng, *, flip: bool = True):
    """A random square crop (80-100 % of the short side's square area, random position), resized
    to ``resolution`` and randomly flipped; float32 in [-1, 1]."""
    import numpy as np
    from PIL import Image

    height, width = array.shape[:2]
    short = min(height, width)
    area = rng.uniform(*CROP_AREA)
    side = max(1, int(round(short * area**0.5)))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(array[top : top + side, left : left + side])
    crop = crop.resize((resolution, resolution), Image.Resampling.BICUBIC)
    out = np.asarray(crop, dtype=np.float32) / 127.5 - 1.0
    if flip and rng.random() < 0.5:
        out = out[:, ::-1, :]
    return np.ascontiguousarray(out)


def thumbnail_png(array, size: int = 128) -> bytes:
    """A PNG thumbnail (longest side ``size``) of a uint8 (H, W, 3) array."""
    from PIL import Image

    return _thumbnail(Image.fromarray(array), size)


def _thumbnail(image, size: int) -> bytes:
    import io

    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


# Pictures inside concept files (cover images, AUTOMATIC1111's embedding images) are thumbnails or
# small renders; decoding costs memory by pixels, and a few KB of PNG can declare 13000x13000.
MAX_EMBEDDED_PIXELS = 16_000_000


def thumbnail_png_of_bytes(data: bytes, size: int = 128) -> bytes | None:
    """A PNG thumbnail of the picture file content ``data`` (PNG, JPEG, WebP, ...), or None if it
    is not one PIL can read (a picture another tool embedded: optional, never an error)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with _quiet_about_large_pictures(), Image.open(io.BytesIO(data)) as image:
            # A cover picture in a stranger's file: a few KB may declare a huge one (skipped).
            if image.width * image.height > MAX_EMBEDDED_PIXELS:
                return None
            return _thumbnail(as_rgb(image), size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def picture_thumbnail_png(path: Path, size: int = 128) -> bytes:
    """A PNG thumbnail (longest side ``size``, upright as viewers show it) of the picture at
    ``path``, for a concept's preview. Raises ConceptFileError (one line) if it is not a picture."""
    from PIL import ImageOps

    from conceptlib.errors import ConceptFileError

    path = Path(path)
    fix = "give a PNG, JPEG or WebP picture"
    if not path.is_file():
        raise ConceptFileError(f"{path}: not a file; {fix}")
    with opened_image(path, ConceptFileError, fix) as image:
        picture = as_rgb(ImageOps.exif_transpose(image))
    return _thumbnail(picture, size)


@contextlib.contextmanager
def opened_image(path: Path, error: type[ConceptlibError], fix: str):
    """``PIL.Image.open(path)``, where a file that is not an image, a damaged one or a
    decompression bomb (here or in the with-block) is one ``error`` line ending in ``fix``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _quiet_about_large_pictures(), Image.open(path) as image:
            yield image
    except Image.DecompressionBombError as exc:
        raise error(f"{path}: {exc}; downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # PIL's own words say why (a truncated file, an unsupported mode); the path is said already.
        reason = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
        detail = type(exc).__name__ if isinstance(exc, UnidentifiedImageError) or not reason else \
            f"{type(exc).__name__}: {reason[:100]}"
        raise error(f"{path}: cannot read this image ({detail}); {fix}") from None


@contextlib.contextmanager
def _quiet_about_large_pictures():
    """PIL warns (on stderr, with its source line) about pictures between 89 and 179 megapixels; a
    100 MP camera photo is a fine training picture, scaled down on loading. Larger ones still raise
    DecompressionBombError."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def as_rgb(image):
    """``image.convert("RGB")``, except that 16- and 32-bit greyscale (16-bit PNGs and TIFFs) is
    first scaled to 8 bits: PIL's convert clips it, turning most such pictures white."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def grid(images, columns: int | None = None):
    """Tile uint8 (N, H, W, 3) images into one (rows*H, columns*W, 3) array."""
    import math

    import numpy as np

    images = np.asarray(images, dtype=np.uint8)
    count, height, width, channels = images.shape
    columns = columns or min(count, 4)
    rows = math.ceil(count / columns)
    out = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        out[row * height : (row + 1) * height, col * width : (col + 1) * width] = image
    return out


def save_png(array, path: Path, **write) -> Path:
    """``array`` (uint8 (H, W, 3)) as a PNG file at ``path``, atomically (``write``: the keyword
    arguments of ``atomic_write_bytes``, e.g. its ``fix``)."""
    import io

    from PIL import Image

    from conceptlib.files import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return atomic_write_bytes(Path(path), buffer.getvalue(), **write)
