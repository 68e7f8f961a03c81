"""`conceptlib train` refuses bad input with one line and exit 1 (2 for usage) BEFORE any model
is built, and leaves the library (and the runs folder) unchanged."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conceptlib.cli import main
from conceptlib.concept import Concept
from conceptlib.errors import TrainingError
from conceptlib.library import ConceptLibrary


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An isolated library holding one concept, and a trainer that fails if a model is built."""
    import conceptlib_tensorflow

    root = tmp_path / "home"
    monkeypatch.setenv("CONCEPTLIB_HOME", str(root))
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")  # restored after the test

    def no_models(*args, **kwargs):
        raise AssertionError("a model was built before the checks finished")

    monkeypatch.setattr(conceptlib_tensorflow, "build_models", no_models)
    library = ConceptLibrary(root)
    vectors = np.random.default_rng(0).standard_normal((1, 768)).astype(np.float32)
    library.add(Concept("taken", "<taken>", vectors))
    return library


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(2):
        Image.fromarray((rng.random((80, 96, 3)) * 255).astype("uint8")).save(folder / f"p{index}.png")
    return folder


def _snapshot(library):
    files = sorted(p.relative_to(library.root) for p in library.root.rglob("*") if p.is_file())
    return [(p, (library.root / p).read_bytes()) for p in files if not p.name.startswith(".")]


def _refused(library, args, message, exit_code=1):
    before = _snapshot(library)
    result = CliRunner().invoke(main, ["train", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == exit_code, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0]
    assert _snapshot(library) == before
    assert not (library.root / "runs").exists() or not any((library.root / "runs").iterdir())
    return lines[0]


def test_no_images_in_folder(home, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    _refused(home, [str(tmp_path / "empty"), "--name", "new", "--weights", "random"], "no images in")


def test_missing_folder(home, tmp_path):
    _refused(home, [str(tmp_path / "nowhere"), "--name", "new"], "no such folder")


def test_unreadable_image(home, images):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    line = _refused(home, [str(images), "--name", "new", "--weights", "random"], "cannot read this image")
    assert "broken.png" in line and "replace or remove it" in line
    (images / "broken.png").unlink()
    whole = (images / "p0.png").read_bytes()
    (images / "p0.png").write_bytes(whole[: len(whole) // 2])  # a download cut short: PIL says so
    line = _refused(home, [str(images), "--name", "new", "--weights", "random"], "p0.png: cannot read this image (")
    assert "truncated" in line and line.count(str(images / "p0.png")) == 1


def test_tiny_image(home, images):
    Image.new("RGB", (40, 300)).save(images / "tiny.png")
    line = _refused(home, [str(images), "--name", "new"], "is 40x300, smaller than 64 px")
    assert "tiny.png" in line


def test_caption_that_is_not_utf8(home, images):
    (images / "p0.txt").write_bytes("un chat sur une chaise ros\xe9e".encode("latin-1"))
    line = _refused(home, [str(images), "--name", "new", "--weights", "random"], "the caption is not UTF-8 text")
    assert "p0.txt" in line and "save it as UTF-8" in line


def test_image_over_pillows_pixel_limit(home, images, monkeypatch):
    """Pillow refuses images of more than twice MAX_IMAGE_PIXELS (a 200-megapixel phone photo):
    one line, not a traceback. The limit is lowered here rather than writing such a file."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    line = _refused(home, [str(images), "--name", "new", "--weights", "random"], "p0.png: Image size (7680 pixels)")
    assert line.endswith("; downscale it")


def test_name_already_in_library(home, images):
    # The whole sentence: the name alone ("taken") would match any error that mentions the concept.
    _refused(home, [str(images), "--name", "taken", "--token", "<fresh>"],
             "a concept named 'taken' already exists; choose another name (--name) or remove it first")


def test_token_already_in_library(home, images):
    _refused(home, [str(images), "--name", "fresh", "--token", "<taken>"],
             "token '<taken>' is already used by concept 'taken'; choose another token (--token)")
    assert "fresh" not in [h.name for h in home.list()]


def test_unknown_trainer(home, images):
    _refused(home, [str(images), "--name", "new", "--trainer", "pytorch"], "unknown trainer 'pytorch'; installed:")


def test_a_trainer_plugin_that_fails_to_start_is_one_line(home, images, monkeypatch):
    """A third-party trainer checking its environment in __init__ (which runs during the checks)
    the natural way, with a plain exception: one line naming it, nothing created."""
    from conceptlib.plugins import discover

    class NeedsTorch:
        name, version, backend = "needstorch", "1", "tensorflow"

        def __init__(self):
            raise RuntimeError("cannot find my config file")

        def run(self, job):
            raise AssertionError("never runs")

    monkeypatch.setitem(discover().trainers, "needstorch", NeedsTorch)
    _refused(home, [str(images), "--name", "new", "--weights", "random", "--trainer", "needstorch"],
             "trainer plugin 'needstorch' could not start (RuntimeError: cannot find my config file)")


def test_unknown_template_pack(home, images):
    _refused(home, [str(images), "--name", "new", "--template", "landscapes"], "unknown template pack 'landscapes'")


def test_bad_settings_are_usage_errors(home, images):
    _refused(home, [str(images), "--name", "new", "--resolution", "100"], "not a multiple of 64 from 64 to 2048", 2)
    _refused(home, [str(images), "--name", "new", "--steps", "0"], "--steps 0 must be at least 1", 2)
    _refused(home, [str(images), "--name", "new", "--grad-accum", "0"], "--grad-accum 0 must be at least 1", 2)
    _refused(home, [str(images)], "give --name and/or --token", 2)


def test_stepped_learning_rate_is_parsed_as_automatic1111_writes_it():
    from conceptlib.training import format_learning_rate, parse_learning_rate

    assert parse_learning_rate("5e-3") == (0.005, None)
    rate, steps = parse_learning_rate("0.05:10, 0.02:20,0.005:200, 0.001")
    assert rate == 0.05 and steps == [[0.05, 10], [0.02, 20], [0.005, 200], [0.001, None]]
    assert parse_learning_rate("0.01:100, 1e-4:-1")[1] == [[0.01, 100], [1e-4, None]]  # -1: to the end
    assert format_learning_rate(steps) == "0.05:10, 0.02:20, 0.005:200, 0.001"


def test_bad_stepped_learning_rates_are_usage_errors(home, images):
    base = [str(images), "--name", "new", "--steps", "100"]
    for lr, message in (
        ("abc", "'abc' is not a number; give e.g. 5e-3 or '0.05:10, 0.005'"),
        ("0", "the rate 0 must be a positive number"),
        ("0.05:ten, 0.01", "'0.05:ten' is not RATE:STEP"),
        ("0.05:50, 0.01:20, 0.001", "step 20 must come after step 50"),
        ("0.05, 0.01", "only the last rate may go to the end; give '0.05' a step"),
        ("0.05:10, 0.01:50", "ends at step 50 but --steps is 100; add a last rate for the remaining steps "
                             "(e.g. '0.05:10, 0.01:50, 0.01') or use --steps 50"),
        (",".join(f"0.01:{i}" for i in range(1, 18)) + ",0.001", "--lr has 18 rates; at most 16"),
    ):
        _refused(home, [*base, "--lr", lr], message, 2)
    _refused(home, [*base, "--lr", "0.05:10, 0.01", "--lr-schedule", "constant"],
             "--lr-schedule constant: a stepped --lr is its own schedule; drop --lr-schedule", 2)
    _refused(home, [*base, "--lr", "0.05:10, 0.01", "--warmup-steps", "5"], "works with the cosine schedule only", 2)


def test_a_template_file_that_cannot_be_used_is_one_line(home, images, tmp_path):
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a [name]\na photo\n")
    _refused(home, [str(images), "--name", "new", "--template", str(bad)],
             f"template file {bad}, line 2 ('a photo'): no [name] or {{token}}", 1)
    _refused(home, [str(images), "--name", "new", "--template", str(tmp_path / "missing.txt")], "does not exist", 1)
    # A bare token counts only as a whole word: '[name]s' would train prompts without the concept.
    plural = tmp_path / "plural.txt"
    plural.write_text("a photo of [name]s\n")
    _refused(home, [str(images), "--name", "new", "--token", "mydoll", "--template", str(plural)],
             "template pack 'file:plural.txt': prompt 'a photo of mydolls' has 'mydoll' only inside a longer word", 1)


def test_invalid_name_or_token_is_a_usage_error_naming_the_option(home, images):
    """As in `conceptlib import`: a --name/--token value that can never work is a wrong command
    line (exit 2), and the line says which option, also when the token was made from --name."""
    _refused(home, [str(images), "--name", "Bad Name"], "--name: invalid concept name 'Bad Name'", 2)
    _refused(home, [str(images), "--token", "<Cat>"], "--token: invalid token '<Cat>'", 2)
    long_name = "a" * 63  # a valid name, but '<' + name + '>' is longer than a token may be
    line = _refused(home, [str(images), "--name", long_name], "--token (not given, so made from --name)", 2)
    assert f"'<{long_name}>'" in line


def test_missing_weights_folder(home, images, tmp_path):
    _refused(home, [str(images), "--name", "new", "--weights", str(tmp_path / "no-weights")], "does not exist")


def test_token_that_is_already_a_clip_word(home, images):
    line = _refused(home, [str(images), "--name", "new", "--token", "cat", "--weights", "random"], "CLIP vocabulary")
    assert "'cat'" in line
    # The vocabulary spells words by their UTF-8 bytes: non-ASCII words are found too (apply refuses them).
    for word in ("café", "\U0001f496"):
        _refused(home, [str(images), "--name", "new", "--token", word, "--weights", "random"], "CLIP vocabulary")


def test_init_word_that_tokenizes_to_nothing(home, images):
    # "&nbsp;" is unescaped to a no-break space by CLIP's text cleaning, leaving no token.
    line = _refused(home, [str(images), "--name", "new", "--init", "&nbsp;", "--weights", "random"], "tokenizes to nothing")
    assert "&nbsp;" in line


def test_caption_too_long_for_the_text_encoder(home, images):
    (images / "p0.txt").write_text(" ".join(["word"] * 80))
    line = _refused(home, [str(images), "--name", "new", "--weights", "random"], "more than the text encoder's 77")
    assert line.startswith(f"Error: {images / 'p0.txt'}: prompt 'a photo of a <new>, word word")  # which file to fix
    assert "needs 88 tokens, 11 more than" in line  # start, 4 words, token, comma, 80 words, end


def test_metadata_caption_too_long_names_its_line(home, images):
    (images / "metadata.jsonl").write_text('{"file_name": "p1.png", "text": "%s"}\n' % " ".join(["word"] * 80))
    line = _refused(home, [str(images), "--name", "new", "--weights", "random"], "more than the text encoder's 77")
    assert line.startswith(f"Error: {images / 'metadata.jsonl'} line 1: prompt 'a photo of a <new>, word word")


def test_metadata_naming_a_missing_image(home, images):
    (images / "metadata.csv").write_text("file_name,text\np0.png,fine\np9.png,typo\n")
    _refused(home, [str(images), "--name", "new", "--weights", "random"],
             f"{images / 'metadata.csv'} line 3: 'p9.png' is not one of the images in {images}")


def test_too_many_vectors_for_the_template_pack_says_by_how_much(home, images):
    line = _refused(home, [str(images), "--name", "new", "--num-vectors", "72", "--template", "style", "--weights", "random"],
                    "template pack 'style': prompt 'a painting in the style of <new>' needs 80 tokens, 3 more than")
    assert "use fewer --num-vectors" in line


def test_vocabulary_checks_come_before_the_weights(home, images, tmp_path):
    """Weights may be a multi-GB download: a token, init word or prompt that can never work is
    refused first."""
    no_weights = ["--weights", str(tmp_path / "no-weights")]
    _refused(home, [str(images), "--name", "new", "--token", "cat", *no_weights], "already a word of the CLIP vocabulary")
    _refused(home, [str(images), "--name", "new", "--init", "&nbsp;", *no_weights], "tokenizes to nothing")
    _refused(home, [str(images), "--name", "new", "--num-vectors", "75", *no_weights], "more than the text encoder's 77")


def test_run_dir_inside_the_library_is_refused(home, images):
    """A run folder that is one of the library's own folders (or inside its concepts folder) would
    put the run's concept.safetensors and checkpoints among the library's own files. Another new
    folder in the library's root is only a folder, as the JAX train test's runs use."""
    for inside in (home.root, home.root / "concepts", home.root / "concepts" / "run", home.runs_dir):
        _refused(home, [str(images), "--name", "new", "--weights", "random", "--run-dir", str(inside)],
                 f"--run-dir {inside} is inside the concept library {home.root}; give a folder outside it", 2)


def test_another_new_folder_in_the_library_root_may_hold_a_run(home, images):
    from conceptlib.training import TrainingConfig, prepare

    config = TrainingConfig(images=str(images), name="new", token="<new>", weights="random",
                            run_dir=str(home.root / "my-runs" / "first"))
    job = prepare(config, library=home)
    assert job.run_dir.path == (home.root / "my-runs" / "first").resolve() and job.run_dir.exists()


def test_run_dir_that_cannot_be_created(home, images):
    # Said before the weights are looked for (a missing folder here), which may mean a download.
    line = _refused(home, [str(images), "--name", "new", "--weights", str(images / "no-weights"), "--run-dir",
                           str(images / "p0.png" / "run")],
                    f"cannot create the run folder {images / 'p0.png' / 'run'}: {images / 'p0.png'} is not a folder")
    assert line.endswith("; pick another --run-dir")


def test_resume_refuses_non_runs_and_finished_runs(home, tmp_path):
    _refused(home, ["--resume", str(tmp_path)], "is not a training run folder (no config.json)")
    from conceptlib.training import RunDirectory, TrainingConfig

    run = RunDirectory(tmp_path / "done")
    run.create(TrainingConfig(images=str(tmp_path), name="done", token="<done>"), {})
    run.concept_path.write_bytes(b"")
    _refused(home, ["--resume", str(run.path)], "already finished")


def test_resume_refuses_changed_images(home, images, tmp_path):
    from conceptlib.images import find_images
    from conceptlib.training import RunDirectory, TrainingConfig

    run = RunDirectory(tmp_path / "run")
    hashes = [image.sha256 for image in find_images(images)]
    run.create(TrainingConfig(images=str(images), name="again", token="<again>", weights="random"), {"image_sha256": hashes})
    Image.new("RGB", (90, 90), (1, 2, 3)).save(images / "p9.png")
    _refused(home, ["--resume", str(run.path)], "changed since run")


def test_resume_refuses_changed_captions(home, images, tmp_path):
    """The rest of the run would train on other prompts than an uninterrupted run: refused like
    changed images (a run from before captions were recorded is not checked)."""
    from conceptlib.training import TrainingConfig, prepare

    (images / "p0.txt").write_text("a red hat")
    job = prepare(TrainingConfig(images=str(images), name="cap", token="<cap>", weights="random",
                                 run_dir=str(tmp_path / "caprun")), library=home)
    assert job.run_dir.read()["captions"] == ["a red hat", None]
    (images / "p0.txt").write_text("a blue house")
    line = _refused(home, ["--resume", str(job.run_dir.path)], "the captions of 1 image(s) changed since run ")
    assert line.endswith("(p0.png), so the rest of the run would train on other prompts; restore them or start a new run")
    (images / "p0.txt").write_text("a red hat")
    assert prepare(None, library=home, resume=str(job.run_dir.path)).images[0].caption == "a red hat"


def test_warmup_needs_the_cosine_schedule(home, images):
    _refused(home, [str(images), "--name", "new", "--lr-schedule", "constant", "--warmup-steps", "10"],
             "--warmup-steps 10 works with the cosine schedule only; drop it or use --lr-schedule cosine", 2)


def test_devices_is_for_the_jax_trainer_and_takes_all_or_a_count(home, images):
    _refused(home, [str(images), "--name", "new", "--trainer", "tensorflow", "--devices", "2"], "only the jax trainer", 2)
    _refused(home, [str(images), "--name", "new", "--trainer", "jax", "--devices", "0"], "use 'all' or a positive number", 2)
    # Refused before the run folder exists, so the same command with a fitting batch can follow.
    _refused(home, [str(images), "--name", "new", "--trainer", "jax", "--devices", "2", "--batch-size", "3"],
             "--devices 2: the batch of 3 does not split over 2 devices; use a --batch-size that is a multiple of 2", 2)


def test_devices_is_checked_against_the_jax_batch_size_override(home, images, monkeypatch):
    """$CONCEPTLIB_JAX_BATCH_SIZE replaces --batch-size in the jax trainer, so --devices is checked
    against it, before any run folder exists."""
    monkeypatch.setenv("CONCEPTLIB_JAX_BATCH_SIZE", "3")
    _refused(home, [str(images), "--name", "new", "--trainer", "jax", "--devices", "2", "--batch-size", "4"],
             "--devices 2: the batch of 3 does not split over 2 devices; "
             "use a $CONCEPTLIB_JAX_BATCH_SIZE that is a multiple of 2", 2)


def test_devices_reaches_the_jax_trainer(home, images, monkeypatch):
    import os
    import types

    import conceptlib.training as training

    seen = {}

    def fake_train(config, **kwargs):
        seen.update(devices=os.environ.get("CONCEPTLIB_JAX_DEVICES"), trainer=config.trainer)
        return types.SimpleNamespace(name="new", token="<new>", path="somewhere"), None

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setenv("CONCEPTLIB_JAX_DEVICES", "all")  # restored after the test
    result = CliRunner().invoke(
        main, ["train", str(images), "--name", "new", "--trainer", "jax", "--devices", "2", "--batch-size", "4", "-q"]
    )
    assert result.exit_code == 0, result.output
    assert seen == {"devices": "2", "trainer": "jax"}


def test_resume_with_devices_uses_the_runs_trainer_and_batch(home, images, tmp_path, monkeypatch):
    import os
    import types

    import conceptlib.training as training
    from conceptlib.images import find_images
    from conceptlib.training import RunDirectory, TrainingConfig

    def run_folder(trainer, batch_size):
        run = RunDirectory(tmp_path / f"run-{trainer}-{batch_size}")
        config = TrainingConfig(images=str(images), name="again", token="<again>", weights="random",
                                trainer=trainer, batch_size=batch_size)
        run.create(config, {"image_sha256": [image.sha256 for image in find_images(images)]})
        return str(run.path)

    seen = {}

    def fake_train(config, **kwargs):
        seen.update(devices=os.environ.get("CONCEPTLIB_JAX_DEVICES"), resume=kwargs["resume"])
        return types.SimpleNamespace(name="again", token="<again>", path="somewhere"), None

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setenv("CONCEPTLIB_JAX_DEVICES", "all")  # restored after the test
    jax_run = run_folder("jax", 4)
    result = CliRunner().invoke(main, ["train", "--resume", jax_run, "--devices", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert seen == {"devices": "2", "resume": jax_run}
    _refused(home, ["--resume", run_folder("jax", 3), "--devices", "2"], "the batch of 3 does not split", 2)
    _refused(home, ["--resume", run_folder("tensorflow", 4), "--devices", "2"], "only the jax trainer", 2)


def _run(tmp_path, photos, folder="run", **settings):
    """A run folder as `conceptlib train` leaves it before its first checkpoint."""
    from conceptlib.images import find_images
    from conceptlib.training import RunDirectory, TrainingConfig

    run = RunDirectory(tmp_path / folder)
    config = {"images": str(photos), "name": "again", "token": "<again>", "weights": "random", **settings}
    run.create(TrainingConfig(**config), {"image_sha256": [image.sha256 for image in find_images(photos)]})
    return run


def test_resume_on_another_machine_says_how_to_point_the_run_at_its_files(home, images, tmp_path):
    """IMAGES and --weights are ignored with --resume, so the fix named is the run's config.json."""
    moved = _run(tmp_path, images, "moved", images=str(tmp_path / "old-photos"))
    line = _refused(home, ["--resume", str(moved.path)], f"the images of run {moved.path} were in {tmp_path / 'old-photos'}")
    assert line.endswith(f'put them back or set "images" in the "config" object of {moved.config_path} to where they are now')
    no_weights = _run(tmp_path, images, "weights", weights=str(tmp_path / "old-weights"))
    line = _refused(home, ["--resume", str(no_weights.path)], f"the weights of run {no_weights.path} were in")
    assert "--weights" not in line and f'set "weights" in the "config" object of {no_weights.config_path}' in line


def test_resume_when_the_library_took_the_runs_name_or_token(home, images, tmp_path):
    """--name/--token are ignored with --resume: the fix is renaming the concept in the way."""
    line = _refused(home, ["--resume", str(_run(tmp_path, images, "n", name="taken", token="<other>").path)],
                    "a concept named 'taken' already exists; run ")
    assert "conceptlib rename taken NEW" in line and "--name" not in line
    line = _refused(home, ["--resume", str(_run(tmp_path, images, "t", name="other", token="<taken>").path)],
                    "token '<taken>' is already used by concept 'taken'; run ")
    assert "conceptlib rename taken taken --token NEW" in line and "(--token)" not in line


def test_resume_checks_the_checkpoint_before_building_models(home, images, tmp_path):
    from conceptlib.training import Checkpoint

    truncated = _run(tmp_path, images, "truncated")
    path = truncated.save_checkpoint(Checkpoint(10, np.zeros((1, 768), np.float32), [np.int64(10)], [1.0] * 10))
    path.write_bytes(path.read_bytes()[:200])
    line = _refused(home, ["--resume", str(truncated.path)], f"{path}: unreadable checkpoint")
    assert line.endswith("delete it to resume from an earlier one")
    other = _run(tmp_path, images, "other", num_vectors=2)
    path = other.save_checkpoint(Checkpoint(10, np.zeros((1, 768), np.float32), [], [1.0] * 10))
    _refused(home, ["--resume", str(other.path)],
             f"{path}: checkpoint of step 10 with vectors (1, 768) does not fit this run (1000 steps, vectors (2, 768))")


def test_resume_looks_again_once_it_holds_the_runs_lock(home, images, tmp_path):
    """Another process may train the run further, or finish it, between the checks and the lock:
    the resume continues from the newest checkpoint, or stops with one line."""
    from conceptlib.training import Checkpoint, _check_still_resumable, prepare

    run = _run(tmp_path, images, "raced")
    run.save_checkpoint(Checkpoint(10, np.zeros((1, 768), np.float32), [np.int64(10)], [1.0] * 10))
    job = prepare(None, library=home, resume=str(run.path))
    assert job._checkpoint.step == 10
    run.save_checkpoint(Checkpoint(20, np.ones((1, 768), np.float32), [np.int64(20)], [1.0] * 20))
    with run.hold():
        _check_still_resumable(job)
    assert job._checkpoint.step == 20
    run.concept_path.write_bytes(b"written by the other process")
    with pytest.raises(TrainingError, match="already finished .*another process finished it just now"):
        _check_still_resumable(job)


def test_resume_of_a_damaged_config_is_one_line(home, images, tmp_path):
    for text, why in (('{"steps": 5}', 'corrupt (no "config" settings)'), ("[1, 2]", 'corrupt (no "config" settings)'),
                      ('{"config": {"name": "x"}}', "corrupt (no images, token in its settings)")):
        run = tmp_path / f"damaged-{len(text)}"
        run.mkdir()
        (run / "config.json").write_text(text)
        _refused(home, ["--resume", str(run)], f"{run / 'config.json'}: {why}; start a new run")
        _refused(home, ["--resume", str(run), "--devices", "2"], f"{run / 'config.json'}: {why}; start a new run")


def test_init_words_clip_reads_as_pieces_are_shown_before_the_models(home, images):
    """A misspelt --init word is not refused (CLIP splits every word into known pieces) but the
    user sees, before the long model build, what the vectors start from."""
    result = CliRunner().invoke(main, ["train", str(images), "--name", "new", "--weights", "random",
                                       "--init", "toy xyzzyqwerty teddybear"])
    assert isinstance(result.exception, AssertionError)  # the home fixture stops at the model build
    notes = [line for line in result.output.splitlines() if line.startswith("Note:")]
    assert notes == ["Note: CLIP has no single token for --init 'xyzzyqwerty' (xy + zzy + q + wer + ty), "
                     "'teddybear' (teddy + bear); the vectors start from those pieces (use a common word "
                     "instead if that is not what you meant)"]
    quiet = CliRunner().invoke(main, ["train", str(images), "--name", "new2", "--weights", "random", "-q",
                                      "--init", "xyzzyqwerty"])
    # -q silences the progress and the run-folder line, not warnings and notes.
    assert isinstance(quiet.exception, AssertionError) and "Note: CLIP has no single token" in quiet.output
    assert "run folder" not in quiet.output


def test_resume_refuses_settings_it_would_ignore(home, images):
    """A resumed run keeps the settings it started with; IMAGES or --steps with --resume are a usage
    error naming them, before the run folder is even read."""
    line = _refused(home, ["--resume", "some-run", "--steps", "5000"], "--resume some-run continues the run", 2)
    assert line.endswith("with the settings it started with; --steps cannot change them: drop it, or start a new run")
    line = _refused(home, [str(images), "--resume", "some-run", "--name", "x", "-q"], "continues the run", 2)
    assert "; IMAGES, --name cannot change them: drop them," in line


def test_preview_prompt_is_checked_before_any_model(home, images):
    base = [str(images), "--name", "doll", "--weights", "random", "--trainer", "tensorflow"]
    _refused(home, [*base, "--preview-prompt", "a painting of <doll>"], "--preview-prompt needs previews: add --preview-every N", 2)
    line = _refused(home, [*base, "--preview-every", "5", "--preview-prompt", "a painting of a doll"],
                    "--preview-prompt 'a painting of a doll' does not contain the token <doll>", 2)
    assert line.endswith("e.g. 'a watercolor painting of <doll>'")
    _refused(home, [*base, "--preview-every", "5", "--num-vectors", "3", "--preview-prompt", "<doll> " + "very " * 73],
             "--preview-prompt: prompt '<doll> very", 2)
    _refused(home, [str(images), "--name", "doll", "--token", "mydoll", "--weights", "random", "--trainer", "tensorflow",
                    "--preview-every", "5", "--preview-prompt", "a photo of mydollhouse"],
             "--preview-prompt: prompt 'a photo of mydollhouse' has 'mydoll' only inside a longer word", 2)


def test_preview_prompt_gives_the_previews_token_ids(home, images, tmp_path):
    from conceptlib.training import TrainingConfig, prepare

    config = TrainingConfig(images=str(images), name="doll", token="<doll>", weights="random", preview_every=5,
                            num_vectors=2, preview_prompt="A watercolor painting of <doll> on a shelf")
    job = prepare(config, library=home)
    ids, noise = job.preview_inputs()
    assert ids.shape == (2, 77) and noise.shape == (2, 64, 64, 4)
    assert ids.tolist() == [job.prompt_ids("a watercolor painting of <doll> on a shelf")] * 2
    assert job.new_ids[0] in ids[0] and job.new_ids[1] in ids[0]
    default = prepare(TrainingConfig(images=str(images), name="doll2", token="<doll2>", weights="random",
                                     preview_every=5), library=home)
    assert default.preview_inputs()[0][0].tolist() == default.prompt_ids(default.pack.render(0, "<doll2>"))


def test_description_options_reach_the_trained_concept(home, images, monkeypatch):
    """--author, --license, ... (kohya's --metadata_* options) go into the run's settings and from
    there into the concept's ModelSpec keys; like every setting they cannot change on --resume."""
    import conceptlib.training as training

    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        raise training.TrainingError("stopped after the settings were made")

    monkeypatch.setattr(training, "train", fake_train)
    result = CliRunner().invoke(main, ["train", str(images), "--name", "new", "--weights", "random", "--author", "Jo Doe",
                                       "--tags", "doll, plush", "--description", "-", "--title", ""],
                                input="A plush doll.\nSecond line.\n")
    assert result.exit_code == 1 and "stopped after the settings were made" in result.output
    describe = seen["config"].describe
    assert describe == {"modelspec.author": "Jo Doe", "modelspec.tags": "doll, plush",
                        "modelspec.description": "A plush doll.\nSecond line."}
    metadata = training.trained_metadata(
        seen["config"], [0.5], init_tokens=[], init_concept=None, image_sha256=[], random_weights=True,
        preview=None, preview_source="", trainer_version="test")
    assert metadata["modelspec.author"] == "Jo Doe" and metadata["modelspec.description"].endswith("Second line.")
    _refused(home, ["--resume", str(images), "--author", "x"], "--author cannot change them", exit_code=2)


@pytest.mark.parametrize("env, args, message", [
    ({"CONCEPTLIB_JAX_VARIANTS": "abc"}, [], "CONCEPTLIB_JAX_VARIANTS='abc': use a whole number of at least 1"),
    ({"CONCEPTLIB_JAX_BATCH_SIZE": "0"}, [], "CONCEPTLIB_JAX_BATCH_SIZE='0': use a whole number of at least 1 or auto"),
    ({}, ["--devices", "2", "-b", "2"], "--devices 2: this machine has 1 cpu device(s); use --devices all or at most 1"),
])
def test_bad_jax_trainer_settings_are_one_line_before_any_run_folder(home, images, env, args, message):
    """The trainer checks its settings when it is made, before the run folder exists (they used to
    fail with a traceback after the models were built, leaving a run to 'resume')."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "conceptlib.cli", "train", str(images), "--name", "new", "--trainer", "jax",
         "--weights", "random", "-r", "64", "--steps", "1", "-q", *args],
        capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": "jax", **env}, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [f"Error: {message}"]
    assert not (home.root / "runs").exists() or not any((home.root / "runs").iterdir())


def test_devices_must_be_a_plain_number(home, images):
    _refused(home, [str(images), "--name", "new", "--trainer", "jax", "--devices", "\u00b2"],
             "--devices '\u00b2': use 'all' or a positive number of devices", 2)


def test_an_empty_token_is_named_as_such(home, images):
    _refused(home, [str(images), "--token", ""], "--token: invalid token ''", 2)



class _Models:
    """Stands for a trainer's models: what its checkpoint and preview callbacks hold."""

    def __init__(self, num_vectors: int):
        self.vectors = np.zeros((num_vectors, 768), np.float32)

    def state(self):
        return self.vectors, []

    def render(self, token_ids, noise):
        return np.zeros((len(token_ids), 8, 8, 3), np.uint8)


class _QuickTrainer:
    """A trainer plugin that needs no model: it reports steps, checkpoints and previews through
    the job as real trainers do, and fails after ``fail_after`` steps if that is set."""

    name, version, backend = "quick", "1", "tensorflow"
    fail_after: int | None = None
    fail_with = TrainingError
    during = None  # called before the result is returned (e.g. to make the library refuse it)
    last_models = None  # a weak reference to the last run's _Models

    def run(self, job):
        from conceptlib.training import TrainingResult

        models = _Models(job.config.num_vectors)
        type(self).last_models = weakref.ref(models)
        vectors = models.vectors
        job.checkpoint_fn, job.preview_fn = models.state, models.render
        for step in range(job.start_step, job.config.steps):
            if step == self.fail_after:
                raise self.fail_with("cannot write the next checkpoint: no space left on device")
            job.step_done(step, 1.0)
        if self.during:
            self.during(job)
        return TrainingResult(vectors, list(job.losses), job.final_preview())


@pytest.fixture
def quick(monkeypatch):
    from conceptlib.plugins import discover

    monkeypatch.setitem(discover().trainers, "quick", _QuickTrainer)
    return _QuickTrainer


def test_a_run_stopped_by_an_error_says_how_to_continue(home, images, quick, monkeypatch, tmp_path):
    monkeypatch.setattr(quick, "fail_after", 3)
    run = tmp_path / "stopped"
    result = CliRunner().invoke(main, ["train", str(images), "--name", "fresh", "--weights", "random", "--trainer",
                                       "quick", "--steps", "6", "--checkpoint-every", "2", "--run-dir", str(run)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-2:] == [
        "Error: cannot write the next checkpoint: no space left on device",
        f"Once that is fixed, the run can go on. Continue from step-0000002.npz with: conceptlib train --resume {run}",
    ]
    assert result.stdout == ""


def test_a_finished_or_failed_run_lets_go_of_the_trainers_models(home, images, quick, monkeypatch):
    """A notebook keeps the job train() returns, or the traceback of a failed or interrupted run
    (sys.last_traceback: with it the job and the trainer's frames); neither may keep the trainer's
    models (GBs, on the GPU) alive."""
    from conceptlib.training import train, training_config

    def config(name):
        return training_config(images, name=name, token=f"<{name}>", weights="random", trainer="quick", steps=3,
                               checkpoint_every=1, preview_every=2)

    _, job = train(config("kept"), library=home, progress=False)
    gc.collect()
    assert (job.checkpoint_fn, job.preview_fn, quick.last_models()) == (None, None, None)
    assert home.get("kept").metadata["preview_source"] == "generated"  # the preview was rendered first

    monkeypatch.setattr(quick, "fail_after", 2)
    for error in (TrainingError, KeyboardInterrupt):
        monkeypatch.setattr(quick, "fail_with", error)
        with pytest.raises(error) as failed:
            train(config(f"failed-{error.__name__.lower()}"), library=home, progress=False)
        gc.collect()
        assert failed.tb is not None and quick.last_models() is None, error
        assert "no space left on device" in str(failed.value)


def test_the_end_of_a_run_says_where_things_are_and_what_next(home, images, quick, tmp_path):
    """stdout: the one result line for scripts; stderr: the run folder, its previews, and how to
    pick an earlier step, try and share the concept. -q keeps the result line only."""
    run = tmp_path / "done"
    args = ["train", str(images), "--name", "fresh", "--weights", "random", "--trainer", "quick", "--steps", "4",
            "--checkpoint-every", "2", "--preview-every", "3", "--run-dir", str(run)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Added fresh (<fresh>) to the library: {home.path_for('fresh')}\n"
    err = result.stderr.splitlines()
    # Step 4's preview is not due (every 3), so the thumbnail is rendered after the last step, said.
    assert any(line.endswith("rendering the preview of the final vectors") for line in err)
    assert err[-2] == (f"Run folder {run}: 1 preview(s) in {run / 'previews'}; `conceptlib runs done` lists its "
                       "checkpoints, to add an earlier step instead if the last one overfits")
    assert err[-1] == "Share it: conceptlib export fresh --format a1111 --out DIR (or diffusers, kohya, ...)"
    quiet = CliRunner().invoke(main, [*args[:3], "fresh2", *args[4:-1], str(tmp_path / "q"), "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout.startswith("Added fresh2") and "Run folder" not in quiet.stderr
    assert "WARNING: training with RANDOM weights" in quiet.stderr  # -q keeps warnings


def test_a_concept_the_library_refuses_at_the_end_says_how_to_add_it(home, images, quick, monkeypatch, tmp_path):
    """Trained, but its name was taken meanwhile: it stays in the run folder, and the line gives
    the import that adds it (with a new name only when the name is the problem)."""
    from conceptlib.concept import Concept

    taken = Concept("fresh", "<other>", np.ones((1, 768), np.float32))
    monkeypatch.setattr(quick, "during", staticmethod(lambda job: home.add(taken)))
    run = tmp_path / "taken"
    result = CliRunner().invoke(main, ["train", str(images), "--name", "fresh", "--weights", "random", "--trainer",
                                       "quick", "--steps", "2", "--run-dir", str(run), "-q"])
    assert result.exit_code == 1, (result.output, result.exception)
    line = result.stderr.splitlines()[-1]
    assert line.startswith("Error: a concept named 'fresh' already exists")
    assert line.endswith(f"(the trained concept is saved in the run folder; once that is fixed, add it with "
                         f"`conceptlib import {run / 'concept.safetensors'} --name NEW --token NEW`)")
    assert (run / "concept.safetensors").is_file()


def test_the_jax_trainers_batch_size_and_crops_are_recorded_and_a_resume_keeps_them(home, images, monkeypatch):
    """CONCEPTLIB_JAX_BATCH_SIZE (or 'auto') and CONCEPTLIB_JAX_VARIANTS decide which samples each
    step draws, but config.json kept the command line's --batch-size: a resume without the same
    variables trained on other batches. The settled values are recorded as the run starts, and a
    resume keeps them, saying so when an override asks otherwise."""
    from conceptlib.training import prepare, training_config
    from conceptlib_jax.trainer import JaxTrainer

    import conceptlib.training

    # prepare makes sure keras runs on the trainer's backend; this process's keras may already run
    # on TensorFlow (other tests), and nothing here needs keras.
    monkeypatch.setattr(conceptlib.training, "_ensure_backend", lambda backend: None)
    monkeypatch.setenv("CONCEPTLIB_JAX_BATCH_SIZE", "3")
    monkeypatch.setenv("CONCEPTLIB_JAX_VARIANTS", "2")
    job = prepare(training_config(images, name="batched", token="<batched>", weights="random", trainer="jax", steps=2),
                  library=home)
    JaxTrainer()._settle_data_settings(job, "fp32", False, devices=[])
    recorded = job.run_dir.read()
    assert (job.config.batch_size, recorded["config"]["batch_size"], recorded["jax"]) == (3, 3, {"variants": 2})
    assert job.run_dir.read_config().batch_size == 3  # what `conceptlib runs RUN` shows

    monkeypatch.setenv("CONCEPTLIB_JAX_BATCH_SIZE", "5")
    monkeypatch.setenv("CONCEPTLIB_JAX_VARIANTS", "4")
    resumed = prepare(None, library=home, resume=job.run_dir.path)
    said = []
    monkeypatch.setattr(resumed, "stage", said.append)
    trainer = JaxTrainer()
    trainer._settle_data_settings(resumed, "fp32", False, devices=[])
    assert (resumed.config.batch_size, trainer.variants) == (3, 2)
    assert said == [
        "CONCEPTLIB_JAX_BATCH_SIZE=5 ignored: a resumed run keeps the 3 it started with, to draw the same batches",
        "CONCEPTLIB_JAX_VARIANTS=4 ignored: a resumed run keeps the 2 it started with, to draw the same batches",
    ]
    monkeypatch.delenv("CONCEPTLIB_JAX_BATCH_SIZE")
    monkeypatch.delenv("CONCEPTLIB_JAX_VARIANTS")
    quiet = prepare(None, library=home, resume=job.run_dir.path)
    monkeypatch.setattr(quiet, "stage", said.append)
    JaxTrainer()._settle_data_settings(quiet, "fp32", False, devices=[])
    assert len(said) == 2 and quiet.config.batch_size == 3  # nothing asked otherwise: nothing said


@pytest.mark.parametrize("trainer", ["jax"])  # the TensorFlow trainer keeps every set (see its _MODELS)
def test_the_trainer_keeps_only_the_models_of_its_last_settings(monkeypatch, trainer):
    """A run's models stay for the next run with the same settings (a notebook trains again in
    seconds); other settings replace them instead of adding GBs of models per setting tried.
    Model building is replaced by stand-ins: the policy is what is tested here."""
    import weakref

    import conceptlib.kerascv.models as kerascv_models
    import conceptlib.kerascv.textual_inversion as textual_inversion
    import conceptlib_jax.step
    import conceptlib_jax.trainer
    import conceptlib_tensorflow

    class Part:
        pass

    class Models:
        def __init__(self, text_encoder, diffusion_model, image_encoder=None, decoder=None):
            self.text_encoder, self.diffusion_model, self.decoder = text_encoder, diffusion_model, decoder

    built = []
    for part in ("text_encoder", "diffusion_model", "image_encoder", "decoder"):
        monkeypatch.setattr(kerascv_models, f"build_{part}", lambda *args, part=part: built.append(part) or Part())
    monkeypatch.setattr(textual_inversion, "TextualInversion", Models)
    monkeypatch.setattr(conceptlib_jax.step, "fast_textual_inversion_class", lambda: Models)
    module = conceptlib_tensorflow if trainer == "tensorflow" else conceptlib_jax.trainer
    monkeypatch.setattr(module, "_MODELS", {})

    first = module.build_models("sd-1", 64, None)
    assert module.build_models("sd-1", 64, None) is first and len(built) == 3  # reused
    with_decoder = module.build_models("sd-1", 64, None, decoder=True)
    assert with_decoder.diffusion_model is first.diffusion_model and built[-1] == "decoder"  # only the decoder added
    gone = weakref.ref(first.diffusion_model)
    del first, with_decoder
    other = module.build_models("sd-1", 128, None)
    assert list(module._MODELS.values()) == [other]
    assert gone() is None  # the 64 px models were let go, not kept beside the new ones
