"""The backend-free parts of training: prompts to token ids, initial vectors, augmentation, the
per-step batches (a pure function of seed and step), run folders and checkpoints."""

from __future__ import annotations

import io
import re
import threading
from concurrent.futures import Future

import numpy as np
import pytest
from PIL import Image

from conceptlib.images import augment, find_images, grid
from conceptlib.kerascv.textual_inversion import END_OF_TEXT, MAX_LENGTH, START_OF_TEXT, encode_prompt, initial_rows
from conceptlib.plugins import get_template_pack
from conceptlib.errors import TrainingError
from conceptlib.training import Checkpoint, RunDirectory, TrainingConfig, TrainingJob


def _ids(tokenizer, text):
    """CLIP's ids of ``text`` without its start and end tokens."""
    return tokenizer.encode(text)[1:-1]


def test_encode_prompt_places_every_vector_of_the_token(clip_tokenizer):
    ids = encode_prompt(clip_tokenizer, "a photo of <x>, on <x> chair", "<x>", [49408, 49409])
    a_photo_of, comma_on, chair = (_ids(clip_tokenizer, text) for text in ("a photo of", ", on", "chair"))
    assert len(a_photo_of) == 3 and len(comma_on) == 2 and len(chair) == 1  # one CLIP token per word here
    assert ids[:10] == [START_OF_TEXT, *a_photo_of, 49408, 49409, *comma_on, 49408, 49409]
    assert ids[10:12] == [*chair, END_OF_TEXT]
    assert len(ids) == MAX_LENGTH and set(ids[12:]) == {END_OF_TEXT}


def test_encode_prompt_finds_a_bare_word_token_only_as_a_whole_word(clip_tokenizer):
    """'hoto' is not spliced into 'photo', nor 'mydoll' into 'mydollhouse' (as apply matches)."""
    ids = encode_prompt(clip_tokenizer, "a photo of hoto", "hoto", [49408])
    expected = [START_OF_TEXT, *_ids(clip_tokenizer, "a photo of"), 49408, END_OF_TEXT]
    assert ids[:len(expected)] == expected and ids.count(49408) == 1
    ids = encode_prompt(clip_tokenizer, "mydoll in a mydollhouse, (mydoll)", "mydoll", [49408, 49409])
    assert ids.count(49408) == 2 and ids.count(49409) == 2
    # "mydollhouse" stays CLIP's own pieces (several BPE tokens), between the two replaced words.
    middle = _ids(clip_tokenizer, " in a mydollhouse, (")
    assert len(middle) > 5
    expected = [START_OF_TEXT, 49408, 49409, *middle, 49408, 49409, *_ids(clip_tokenizer, ")"), END_OF_TEXT]
    assert ids[:len(expected)] == expected


def test_encode_prompt_too_long_says_by_how_much(clip_tokenizer):
    assert _ids(clip_tokenizer, " ".join(["w"] * 77)) == [_ids(clip_tokenizer, "w")[0]] * 77  # one token each
    with pytest.raises(ValueError, match="needs 80 tokens, 3 more than"):
        encode_prompt(clip_tokenizer, " ".join(["w"] * 77) + " <x>", "<x>", [49408])


def test_initial_rows_spread_init_words_over_vectors():
    table = np.arange(10 * 768, dtype=np.float32).reshape(10, 768)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(initial_rows(table, [3], 1, rng), table[[3]])
    # More vectors than words: each word covers a contiguous span.
    np.testing.assert_array_equal(initial_rows(table, [2, 5], 4, rng), table[[2, 2, 5, 5]])
    # Fewer vectors than words: each vector is the mean of a group.
    np.testing.assert_array_equal(initial_rows(table, [1, 2, 3], 2, rng), np.stack([table[[1, 2]].mean(0), table[3]]))
    random = initial_rows(table, [], 3, np.random.default_rng(1))
    assert random.shape == (3, 768) and random.dtype == np.float32
    np.testing.assert_array_equal(random, initial_rows(table, None, 3, np.random.default_rng(1)))


def test_augment_crops_resizes_flips_in_range():
    array = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    out = augment(array, 64, np.random.default_rng(3))
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out, augment(array, 64, np.random.default_rng(3)))
    flips = {bool(np.array_equal(augment(array, 64, np.random.default_rng(s), flip=False),
                                 augment(array, 64, np.random.default_rng(s)))) for s in range(12)}
    assert flips == {True, False}  # sometimes flipped, sometimes not


def test_grid_tiles_images():
    images = np.stack([np.full((8, 8, 3), i, np.uint8) for i in range(3)])
    tiled = grid(images, columns=2)
    assert tiled.shape == (16, 16, 3) and tiled[0, 8, 0] == 1 and tiled[8, 0, 0] == 2 and tiled[8, 8, 0] == 0


@pytest.fixture
def job(tmp_path, clip_tokenizer):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray((rng.random((70, 80 + index, 3)) * 255).astype("uint8")).save(folder / f"i{index}.png")
    (folder / "i1.txt").write_text("  on a   red chair \n")
    config = TrainingConfig(images=str(folder), name="x", token="<x>", resolution=64, batch_size=2,
                            num_vectors=2, seed=11).validate()
    images = find_images(folder)
    return TrainingJob(config, None, get_template_pack("object"), images, clip_tokenizer, [], None,
                       RunDirectory(tmp_path / "run"), None, False)


def test_captions_are_read_beside_images(job):
    assert [image.caption for image in job.images] == [None, "on a red chair", None]
    assert all(len(image.sha256) == 64 for image in job.images)


def _pictures(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", (80, 80), (200, 10, 10)).save(folder / name)
    return folder


def test_kohya_caption_files_and_txt_first(tmp_path):
    """kohya's default caption extension is .caption; a .txt beside the same image wins."""
    folder = _pictures(tmp_path / "photos", "a.png", "b.png", "c.png")
    (folder / "a.caption").write_text("kohya caption\n")
    (folder / "b.caption").write_text("ignored")
    (folder / "b.txt").write_text("the txt one")
    images = find_images(folder)
    assert [image.caption for image in images] == ["kohya caption", "the txt one", None]
    assert [image.caption_source for image in images] == [str(folder / "a.caption"), str(folder / "b.txt"), None]


def test_hugging_face_imagefolder_metadata_captions(tmp_path):
    """metadata.jsonl / metadata.csv (file_name + text or caption), as diffusers' scripts read
    Hugging Face ImageFolder datasets; an image's own caption file wins over its row."""
    folder = _pictures(tmp_path / "jsonl", "a.png", "b.png", "c.png")
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "  a doll  on a shelf "}\n\n'
        '{"file_name": "b.png", "caption": "from the caption column", "extra": 1}\n'
        '{"file_name": "c.png", "text": "overridden"}\n')
    (folder / "c.txt").write_text("own file")
    images = find_images(folder)
    assert [image.caption for image in images] == ["a doll on a shelf", "from the caption column", "own file"]
    assert images[0].caption_source == f"{folder / 'metadata.jsonl'} line 1"
    assert images[1].caption_source == f"{folder / 'metadata.jsonl'} line 3"
    folder = _pictures(tmp_path / "csv", "a.png", "b.png")
    (folder / "metadata.csv").write_text('file_name,text\na.png,"a doll, in a box"\n', encoding="utf-8")
    images = find_images(folder)
    assert [image.caption for image in images] == ["a doll, in a box", None]
    assert images[0].caption_source == f"{folder / 'metadata.csv'} line 2"


@pytest.mark.parametrize("name, content, message", [
    ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{"file_name": "typo.png", "text": "y"}\n',
     "metadata.jsonl line 2: 'typo.png' is not one of the images in"),
    ("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png", "text": "y"}\n',
     "metadata.jsonl line 2: 'a.png' is captioned twice (also on line 1)"),
    ("metadata.jsonl", '{"file_name": "a.png", "text": "x"\n', "metadata.jsonl line 1: not a JSON object"),
    ("metadata.jsonl", '["a.png", "x"]\n', "metadata.jsonl line 1: not a JSON object; write one object per line"),
    ("metadata.jsonl", '{"file_name": "a.png", "label": 3}\n',
     "metadata.jsonl line 1: needs a file_name and a text (or caption) value, as Hugging Face's ImageFolder metadata "
     "has them; it has file_name, label"),
    ("metadata.csv", "image,text\na.png,x\n", "metadata.csv line 2: needs a file_name and a text (or caption) value"),
])
def test_bad_metadata_is_one_line_naming_the_file_and_line(tmp_path, name, content, message):
    folder = _pictures(tmp_path / "photos", "a.png")
    (folder / name).write_text(content)
    with pytest.raises(TrainingError) as info:
        find_images(folder)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_two_metadata_files_are_ambiguous(tmp_path):
    folder = _pictures(tmp_path / "photos", "a.png")
    (folder / "metadata.jsonl").write_text("")
    (folder / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(TrainingError, match="holds both metadata.jsonl and metadata.csv; keep one of them"):
        find_images(folder)


def test_hidden_files_are_not_training_images(tmp_path):
    """macOS leaves "._name.jpg" metadata files beside copied photos: skipped, not "unreadable"."""
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (80, 80), (200, 10, 10)).save(folder / "cat.jpg")
    (folder / "._cat.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    assert [image.path.name for image in find_images(folder)] == ["cat.jpg"]


def test_phone_photos_are_used_upright(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view), as
    phones write them: its size and pixels are those of the upright picture."""
    from conceptlib.images import load_rgb

    stored = np.zeros((64, 128, 3), np.uint8)  # 128 wide, 64 high as stored
    stored[:, :64] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    (image,) = find_images(path)
    assert (image.width, image.height) == (64, 128)
    upright = load_rgb(path, 64)
    assert upright.shape == (128, 64, 3)
    # Rotated clockwise, the stored left half is now the top half.
    assert upright[:48, :, 0].mean() > 200 and upright[80:, :, 0].mean() < 50


def test_sixteen_bit_greyscale_keeps_its_tones(tmp_path):
    """PIL's convert('RGB') clips 16-bit greyscale to white; it is scaled to 8 bits instead."""
    from conceptlib.images import load_rgb, picture_thumbnail_png

    gradient = np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (128, 1))
    path = tmp_path / "scan.png"
    Image.fromarray(gradient).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # really 16-bit on disk
    pixels = load_rgb(path, 128)
    assert pixels.shape == (128, 128, 3)
    assert pixels[:, 0].max() < 5 and pixels[:, -1].min() > 250 and 120 < pixels.mean() < 135
    with Image.open(io.BytesIO(picture_thumbnail_png(path))) as thumbnail:
        assert 120 < np.asarray(thumbnail).mean() < 135


def test_a_large_camera_photo_loads_without_pil_warnings(tmp_path, monkeypatch):
    """PIL warns about pictures between MAX_IMAGE_PIXELS (89 MP) and twice that; they are fine
    training pictures (scaled down on loading), so nothing is printed. Lowered here to stay small."""
    import warnings

    from PIL import Image as PILImage

    from conceptlib.images import load_rgb

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 64 * 64)
    Image.new("RGB", (80, 80), (10, 200, 10)).save(tmp_path / "big.png")  # 6400 px: warned, not refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (image,) = find_images(tmp_path)
        assert load_rgb(image.path, 64).shape == (64, 64, 3)


def test_a_single_file_must_be_a_training_picture(tmp_path):
    Image.new("RGB", (80, 80)).save(tmp_path / "anim.gif")
    with pytest.raises(TrainingError, match="anim.gif: not a training picture"):
        find_images(tmp_path / "anim.gif")


def test_batches_are_a_pure_function_of_seed_and_step(job):
    first = job.batch(4)
    again = job.batch(4)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert first["images"].shape == (2, 64, 64, 3)
    assert first["posterior_noise"].shape == first["noise"].shape == (2, 8, 8, 4)
    assert first["token_ids"].shape == (2, 77) and first["token_ids"].dtype == np.int32
    assert ((first["timesteps"] >= 0) & (first["timesteps"] < 1000)).all()
    # The token's two vectors are in every prompt.
    for row in first["token_ids"]:
        assert list(row).count(job.new_ids[0]) == 1 and list(row).count(job.new_ids[1]) == 1
    assert not np.array_equal(job.batch(5)["noise"], first["noise"])
    # Each epoch visits every image once: steps 0..2 with batch 2 cover 2 epochs of 3 images.
    seen = [job._image_index(p) for p in range(6)]
    assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]


def test_checkpoints_round_trip(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.create(TrainingConfig(images="i", name="x", token="<x>"), {"image_sha256": []})
    vectors = np.random.default_rng(0).standard_normal((2, 768)).astype(np.float32)
    optimizer = [np.int64(7), np.ones((2, 768), np.float32), np.zeros((2, 768), np.float32)]
    run.save_checkpoint(Checkpoint(5, vectors, optimizer, [1.0, 0.5]))
    run.save_checkpoint(Checkpoint(10, vectors * 2, optimizer, [1.0, 0.5, 0.25]))
    latest = run.load_checkpoint()
    assert latest.step == 10 and latest.losses == [1.0, 0.5, 0.25]
    np.testing.assert_array_equal(latest.vectors, vectors * 2)
    assert [np.asarray(a).tolist() for a in latest.optimizer] == [np.asarray(a).tolist() for a in optimizer]
    assert run.read()["config"]["name"] == "x"


def _drive(job, steps: int, preview_every: int) -> tuple[list[int], list[int]]:
    """Run ``job``'s step loop as a trainer does, with a renderer that counts its calls (each call's
    images are filled with its number); returns the calls and the final preview's pixel values."""
    job.config.steps, job.config.preview_every = steps, preview_every
    job.progress.enabled = False
    calls = []

    def render(token_ids, noise):
        assert token_ids.shape == (2, 77) and noise.shape == (2, 8, 8, 4)
        calls.append(len(calls) + 1)
        return np.full((2, 64, 64, 3), len(calls), np.uint8)

    job.preview_fn = render
    for index in range(steps):
        job.step_done(index, 0.5)
    final = job.final_preview(render)
    assert final.shape == (64, 128, 3) and final.dtype == np.uint8  # both images side by side
    return calls, sorted(np.unique(final).tolist())


def test_final_preview_reuses_the_preview_of_the_last_step(job):
    # preview_every divides steps: step 4's preview shows the final vectors; not rendered twice.
    calls, final = _drive(job, steps=4, preview_every=2)
    assert calls == [1, 2] and final == [2]
    assert sorted(p.name for p in job.run_dir.previews.iterdir()) == ["step-0000002.png", "step-0000004.png"]


def test_final_preview_renders_when_the_last_step_made_none(job):
    calls, final = _drive(job, steps=4, preview_every=3)
    assert calls == [1, 2] and final == [2]
    assert sorted(p.name for p in job.run_dir.previews.iterdir()) == ["step-0000003.png"]


def test_previews_rendered_in_the_background_are_written_in_step_order_while_training_goes_on(job):
    # A trainer may return a Future from preview_fn (the jax trainer renders in a background
    # thread): step_done does not wait for it and writes each preview once its images exist.
    job.config.steps, job.config.preview_every = 6, 2
    job.progress.enabled = False
    requested = []

    def render(token_ids, noise):
        requested.append(Future())
        return requested[-1]

    def images(value):
        return np.full((2, 64, 64, 3), value, np.uint8)

    def written():
        return sorted(p.name for p in job.run_dir.previews.glob("*.png"))

    job.preview_fn = render
    for index in range(4):  # steps 1-4: the previews of steps 2 and 4 requested, none rendered
        job.step_done(index, 0.5)
    assert len(requested) == 2 and written() == []
    requested[1].set_result(images(4))
    job.step_done(4, 0.5)
    assert written() == []  # step 4's preview waits for step 2's, so files appear in order
    requested[0].set_result(images(2))
    job.step_done(5, 0.5)  # step 6: writes steps 2 and 4, requests step 6's
    assert written() == ["step-0000002.png", "step-0000004.png"] and len(requested) == 3
    threading.Timer(0.2, requested[2].set_result, (images(6),)).start()
    final = job.final_preview(render)  # waits for step 6's preview and reuses it
    assert len(requested) == 3 and sorted(np.unique(final).tolist()) == [6]
    assert written() == ["step-0000002.png", "step-0000004.png", "step-0000006.png"]


def test_a_background_preview_that_failed_stops_the_run_at_the_next_step(job):
    job.config.steps, job.config.preview_every = 4, 1
    job.progress.enabled = False
    failed = Future()
    job.preview_fn = lambda token_ids, noise: failed
    job.step_done(0, 0.5)
    failed.set_exception(TrainingError("out of memory while rendering"))
    with pytest.raises(TrainingError, match="out of memory while rendering"):
        job.step_done(1, 0.5)


def test_final_preview_is_none_without_previews(job):
    job.config.preview_every = 0
    assert job.final_preview(lambda *args: pytest.fail("rendered without previews")) is None


class _Terminal:
    """A stream that says it is a terminal, as stderr is in an interactive shell."""

    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass

    def isatty(self):
        return True


def _untimed(text: str) -> str:
    """``text`` with each stage line's elapsed time ("[m:ss] " or "[h:mm:ss] ", which depends on
    how long the machine took) replaced by "[t] "."""
    return re.sub(r"(?m)^\[(?:\d+:)?\d+:\d\d\] ", "[t] ", text)


def test_stage_lines_tell_what_runs_before_the_first_step_and_never_overwrite_a_step_line():
    import io

    from conceptlib.training import Progress

    plain = io.StringIO()
    progress = Progress(3, stream=plain)
    progress.stage("compiling the training step")
    progress.update(0, 0.5)
    assert _untimed(plain.getvalue()).splitlines() == [
        "[t] compiling the training step", "step 1/3  loss 0.5000  first step  ETA ?",
    ]

    terminal = _Terminal()
    progress = Progress(3, stream=terminal)
    progress.stage("building the sd-1 models")
    progress.update(0, 0.5)  # "\r" + the line, kept open for the next step to overwrite
    progress.stage("rendering the preview of step 1")
    progress.update(1, 0.4)
    progress.update(2, 0.3)  # the last step ends its line
    progress.stage("done")
    lines = _untimed(terminal.text).split("\n")
    assert lines[0] == "[t] building the sd-1 models"
    assert lines[1].startswith("\rstep 1/3  loss 0.5000") and lines[2] == "[t] rendering the preview of step 1"
    assert lines[3].startswith("\rstep 2/3") and "\rstep 3/3  loss 0.3000" in lines[3]
    assert lines[4:] == ["[t] done", ""]

    quiet = io.StringIO()
    progress = Progress(3, stream=quiet, enabled=False)
    progress.stage("building the sd-1 models")
    assert quiet.getvalue() == ""

    # An error (or Ctrl-C) mid-run: the open step line is ended first, so its line starts a line.
    terminal = _Terminal()
    progress = Progress(3, stream=terminal)
    progress.update(0, 0.5)
    progress.end_line()
    progress.end_line()  # only once
    assert terminal.text.startswith("\rstep 1/3") and terminal.text.endswith("\n") and terminal.text.count("\n") == 1
