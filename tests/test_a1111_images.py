"""AUTOMATIC1111 embedding images (.png/.webp): import what its training saves, export what it loads.

The images read here are made by ``a1111_image_file`` and the images written are checked by
``a1111_read``: both are written in this file from the format's description, independently of
conceptlib's code. AUTOMATIC1111 serialises its .pt dictionary (torch tensors as
``{"TORCHTENSOR": lists}``) to JSON; stores it base64-encoded in the PNG text chunk
``sd-ti-embedding``, and zlib-compressed (level 9) in two pixel strips beside the picture (left: the
low 4 bits of each byte, right: the high 4 bits, XORed with ``x % 255 & 15`` of the generator
``x -> (1664525 x + 1013904223) mod 2**32`` from 0; each strip separated from the picture by one
black column; its bytes repeated to fill height x 3 columns, padded first to a multiple of the
height, then of 3 x the height). The high 4 bits of each channel are decoration.
"""

from __future__ import annotations

import base64
import io
import json
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from conceptlib.cli import main
from conceptlib.concept import Concept
from conceptlib.formats import a1111_image, load_source
from conceptlib.library import ConceptLibrary

torch = pytest.importorskip("torch")

# From AUTOMATIC1111's own test of its generator (modules/textual_inversion/image_embedding.py).
A1111_FIRST_OUTPUTS = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79]
A1111_SUM_OF_NEXT_100000 = 12731374


def lcg_outputs(count: int) -> list[int]:
    state, out = 0, []
    for _ in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        out.append(state % 255)
    return out


def a1111_payload(vectors, name="CatDoll", step=1500) -> dict:
    """The dictionary AUTOMATIC1111 saves (its .pt), with a torch tensor."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors)},
            "name": name, "step": step, "sd_checkpoint": "e1441589", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def a1111_image_file(path, data: dict, picture, *, text_chunk=True, strips=True, fmt="PNG"):
    payload = json.dumps(data, default=lambda t: {"TORCHTENSOR": t.detach().numpy().tolist()}).encode()
    height = picture.shape[0]
    image = picture
    if strips:
        packed = zlib.compress(payload, 9)
        size = len(packed) + height - len(packed) % height
        size += 3 * height - size % (3 * height)
        cells = np.array([packed[i % len(packed)] for i in range(size)], np.uint8)
        noise = np.array(lcg_outputs(size), np.uint8) & 15
        decoration = np.random.default_rng(5).integers(0, 16, (2, size), dtype=np.uint8) << 4
        low = ((cells & 15) ^ noise) | decoration[0]
        high = ((cells >> 4) ^ noise) | decoration[1]
        black = np.zeros((height, 1, 3), np.uint8)
        image = np.concatenate([low.reshape(height, -1, 3), black, picture, black, high.reshape(height, -1, 3)], 1)
    info = PngImagePlugin.PngInfo()
    if text_chunk:
        info.add_text("sd-ti-embedding", base64.b64encode(payload).decode())
    Image.fromarray(image).save(path, fmt, **({"pnginfo": info} if fmt == "PNG" else {"lossless": True}))
    return path


def _tensors(obj):
    return torch.tensor(obj["TORCHTENSOR"]) if "TORCHTENSOR" in obj else obj


def a1111_read(path) -> tuple[dict, dict, np.ndarray]:
    """(the text chunk's dictionary, the pixels' dictionary, the picture between the strips)."""
    image = Image.open(path)
    from_text = json.loads(base64.b64decode(image.text["sd-ti-embedding"]), object_hook=_tensors)
    pixels = np.asarray(image.convert("RGB"))
    lit = (pixels > 0).all(2)
    cols, rows = np.nonzero(lit.any(0))[0], np.nonzero(lit.any(1))[0]
    pixels = pixels[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    nibbles = pixels & 15
    dark = [x for x in range(nibbles.shape[1]) if nibbles[:, x].sum() == 0]
    low, high = nibbles[:, :dark[0]], nibbles[:, dark[-1] + 1:]
    noise = np.array(lcg_outputs(low.size), np.uint8).reshape(low.shape) & 15
    raw = (((high ^ noise) << 4) | (low ^ noise)).astype(np.uint8).tobytes()
    from_pixels = json.loads(zlib.decompress(raw), object_hook=_tensors)
    return from_text, from_pixels, pixels[:, dark[0] + 1:dark[-1]]


@pytest.fixture
def vectors():
    return (np.random.default_rng(3).standard_normal((2, 768)) * 0.02).astype(np.float32)


@pytest.fixture
def picture():
    return np.random.default_rng(4).integers(30, 256, (96, 128, 3), dtype=np.uint8)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCEPTLIB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_the_pixel_sequence_is_automatic1111s():
    outputs = lcg_outputs(100 + 100_000)
    assert outputs[:len(A1111_FIRST_OUTPUTS)] == A1111_FIRST_OUTPUTS
    assert sum(outputs[100:]) == A1111_SUM_OF_NEXT_100000
    np.testing.assert_array_equal(a1111_image._lcg_nibbles(len(outputs)), np.array(outputs, np.uint8) & 15)


@pytest.mark.parametrize("layout", ["text and strips", "strips only", "text only", "lossless webp"])
def test_imports_an_automatic1111_embedding_image(tmp_path, vectors, picture, layout):
    path = a1111_image_file(
        tmp_path / ("CatDoll-1500.webp" if layout == "lossless webp" else "CatDoll-1500.png"),
        a1111_payload(vectors), picture, text_chunk=layout in ("text and strips", "text only"),
        strips=layout != "text only", fmt="WEBP" if layout == "lossless webp" else "PNG",
    )
    concept = load_source(path)
    assert concept.token == "catdoll" and concept.name == "catdoll"  # the data's name, as A1111 reads it
    np.testing.assert_array_equal(concept.vectors, vectors)
    meta = concept.metadata
    assert meta["source_format"] == "a1111-image" and meta["source_file"] == path.name
    assert (meta["a1111.step"], meta["a1111.sd_checkpoint_name"]) == ("1500", "v1-5-pruned-emaonly")
    # The picture, without its data strips, is the preview (it is already thumbnail-sized).
    preview = np.asarray(Image.open(io.BytesIO(base64.b64decode(meta["preview"]))).convert("RGB"))
    np.testing.assert_array_equal(preview, picture)


def test_exported_image_is_what_automatic1111_reads(home, vectors, picture, tmp_path):
    thumbnail = io.BytesIO()
    Image.fromarray(picture).save(thumbnail, "PNG")
    ConceptLibrary(home).add(Concept("cat-doll", "<cat-doll>", vectors, {
        "preview": base64.b64encode(thumbnail.getvalue()).decode(), "training": json.dumps({"steps": 800})}))
    result = run("export", "cat-doll", "--format", "a1111", "--out", str(tmp_path / "cat-doll.png"))
    assert result.exit_code == 0, result.output
    from_text, from_pixels, shown = a1111_read(tmp_path / "cat-doll.png")
    for data in (from_text, from_pixels):
        (tensor,) = data["string_to_param"].values()
        np.testing.assert_array_equal(tensor.numpy().astype(np.float32), vectors)
        # An image's stored name is A1111's prompt word for it: the token.
        assert data["name"] == "<cat-doll>" and data["step"] == 800 and data["string_to_token"] == {"*": 265}
    assert shown.shape == (384, 512, 3)  # the preview, scaled to 512 px

    # and back: another library imports it (its preview now the exported picture)
    other = tmp_path / "other"
    result = CliRunner(env={"CONCEPTLIB_HOME": str(other)}).invoke(main, ["import", str(tmp_path / "cat-doll.png")])
    assert result.exit_code == 0, result.output
    back = ConceptLibrary(other).get("cat-doll")
    assert back.token == "<cat-doll>"
    np.testing.assert_array_equal(back.vectors, vectors)


def test_export_without_a_preview_writes_a_grey_card(home, vectors, tmp_path):
    ConceptLibrary(home).add(Concept("ink", "<ink>", vectors))
    assert run("export", "ink", "--format", "a1111", "--out", str(tmp_path / "ink.png")).exit_code == 0
    _, from_pixels, shown = a1111_read(tmp_path / "ink.png")
    assert shown.shape == (512, 512, 3) and (shown == 96).all()
    np.testing.assert_array_equal(from_pixels["string_to_param"]["*"].numpy().astype(np.float32), vectors)
    # Imported again, the card is no preview: the round trip does not invent one.
    back = load_source(tmp_path / "ink.png")
    assert "preview" not in back.metadata and back.token == "<ink>"
    np.testing.assert_array_equal(back.vectors, vectors)


def test_folder_import_passes_over_previews_and_pictures(home, tmp_path, vectors, picture):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    a1111_image_file(folder / "catdoll.png", a1111_payload(vectors), picture)
    a1111_image_file(folder / "catdoll.preview.png", a1111_payload(vectors, name="other"), picture)
    Image.fromarray(picture).save(folder / "photo.png")
    result = run("import", str(folder))
    assert result.exit_code == 0, result.output
    assert "Imported catdoll (catdoll, 2x768)" in result.output
    assert "catdoll.preview.png: a preview image" in result.output
    assert "photo.png: an image without an embedding in it" in result.output
    assert [c.name for c in ConceptLibrary(home).list()] == ["catdoll"]


def test_show_an_image_and_write_its_preview(home, tmp_path, vectors, picture):
    path = a1111_image_file(tmp_path / "catdoll.png", a1111_payload(vectors), picture)
    result = run("show", str(path), "--json", "--preview", str(tmp_path / "preview.png"))
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["token"], info["num_vectors"], info["in_library"]) == ("catdoll", 2, False)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "preview.png").convert("RGB")), picture)


def _bad_images(tmp_path, vectors, picture):
    def with_text(name, text):
        info = PngImagePlugin.PngInfo()
        info.add_text("sd-ti-embedding", text)
        Image.fromarray(picture).save(tmp_path / name, "PNG", pnginfo=info)
        return tmp_path / name

    good = a1111_image_file(tmp_path / "good.png", a1111_payload(vectors), picture)
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:300])
    Image.fromarray(picture).save(tmp_path / "photo.png")
    sdxl = {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}
    return [
        (tmp_path / "photo.png", "an image without an embedding in it"),
        (tmp_path / "truncated.png", "not a readable PNG image"),
        (with_text("garbled.png", "not-base64"), "its sd-ti-embedding text chunk is not base64"),
        (with_text("junk.png", base64.b64encode(b"not json").decode()),
         "its sd-ti-embedding text chunk is not an AUTOMATIC1111 embedding"),
        (with_text("ragged.png", base64.b64encode(b'{"string_to_param": {"*": {"TORCHTENSOR": [[1.0], [1.0, 2.0]]}}}').decode()),
         "not a rectangular array of numbers"),
        (a1111_image_file(tmp_path / "xl.png", sdxl, picture), "an SDXL embedding"),
        (a1111_image_file(tmp_path / "tiny.png", a1111_payload(vectors[:, :100]), picture), "100"),
    ]


def test_bad_images_are_one_line_errors_and_change_nothing(home, tmp_path, vectors, picture):
    ConceptLibrary(home).add(Concept("kept", "<kept>", vectors))
    before = sorted(p.name for p in (home / "concepts").iterdir())
    for path, needle in _bad_images(tmp_path, vectors, picture):
        result = run("import", str(path))
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (path, result.output)
        assert str(path) in lines[0] and needle in lines[0], lines[0]
    assert sorted(p.name for p in (home / "concepts").iterdir()) == before


def test_data_strips_that_inflate_too_far_are_refused(tmp_path, picture):
    """A zlib bomb in the pixels stops at the limit instead of filling memory."""
    bomb = zlib.compress(b"[" * ((32 << 20) + 10), 9)
    height = picture.shape[0]
    width = -(-len(bomb) // (3 * height))
    cells = np.resize(np.frombuffer(bomb, np.uint8), height * width * 3)
    noise = a1111_image._lcg_nibbles(cells.size)
    low = (((cells & 15) ^ noise) | 0x40).reshape(height, width, 3)
    high = (((cells >> 4) ^ noise) | 0x40).reshape(height, width, 3)
    black = np.zeros((height, 1, 3), np.uint8)
    Image.fromarray(np.concatenate([low, black, picture, black, high], 1)).save(tmp_path / "bomb.png")
    with pytest.raises(Exception, match="inflates to over 32 MB"):
        load_source(tmp_path / "bomb.png")


def test_image_export_and_import_run_without_tensorflow(tmp_path, vectors, picture):
    """Real processes: exporting and importing an embedding image imports no model library."""
    import os

    from helpers import cli_imports

    env = dict(os.environ, CONCEPTLIB_HOME=str(tmp_path / "home"))
    path = a1111_image_file(tmp_path / "catdoll.png", a1111_payload(vectors), picture)
    for args in (["import", str(path)], ["export", "catdoll", "--format", "a1111", "--out", str(tmp_path / "out.png")]):
        code, imported, process = cli_imports(args, env)
        assert code == 0, process.stderr
        assert not {"tensorflow", "keras", "keras_cv", "jax", "torch"} & set(imported), (args, imported)
    np.testing.assert_array_equal(load_source(tmp_path / "out.png").vectors, vectors)
