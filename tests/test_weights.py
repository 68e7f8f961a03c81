"""Weights resolution: --weights DIR / $CONCEPTLIB_WEIGHTS, then the Keras cache, then keras-cv's
own download; clear errors that say where we looked; random weights written in the same layout."""

from __future__ import annotations

import inspect
import json
import os

import h5py
import numpy as np
import pytest

from conceptlib import weights as W
from conceptlib.errors import WeightsError


def _h5(path):
    """A small but real HDF5 file (resolution only checks that a file is HDF5)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle.create_dataset("x", data=np.arange(3))
    return path


@pytest.fixture()
def cache(monkeypatch, tmp_path):
    """An isolated Keras cache folder and no $CONCEPTLIB_WEIGHTS."""
    folder = tmp_path / "keras-cache" / "datasets"
    folder.mkdir(parents=True)
    monkeypatch.setattr(W, "keras_cache_dirs", lambda: [folder])
    monkeypatch.delenv(W.ENV_VAR, raising=False)
    return folder


def test_file_names_and_urls_are_keras_cvs_own():
    from keras_cv.src.models.stable_diffusion import decoder, diffusion_model, image_encoder, text_encoder

    source = "".join(inspect.getsource(m) for m in (decoder, diffusion_model, image_encoder, text_encoder))
    for base_model, parts in W.WEIGHT_FILES.items():
        assert set(parts) == set(W.PARTS)
        for spec in parts.values():
            assert spec.url in source and spec.sha256 in source
    assert W.weight_filename("sd-1", "text_encoder") == "kcv_encoder.h5"
    assert W.weight_filename("sd-2", "diffusion_model") == "diffusion_model_v2_1.h5"
    assert W.weight_filename("sd-2", "decoder") == W.weight_filename("sd-1", "decoder") == "kcv_decoder.h5"
    assert W.weight_filename("sd-1", "image_encoder") == "vae_encoder.h5"


def test_weights_dir_comes_before_the_keras_cache(cache, tmp_path):
    mine = tmp_path / "mine"
    for part in W.PARTS:
        _h5(cache / W.weight_filename("sd-1", part))
    _h5(mine / "kcv_encoder.h5")
    resolved = W.resolve_weights("sd-1", mine, download=False)
    assert resolved["text_encoder"] == mine / "kcv_encoder.h5"
    # Parts the folder lacks fall back to the cache.
    assert resolved["diffusion_model"] == cache / "kcv_diffusion_model.h5"
    assert set(resolved) == set(W.PARTS)


def test_env_var_is_the_default_weights_dir(cache, tmp_path, monkeypatch):
    mine = tmp_path / "env-weights"
    _h5(mine / "text_encoder_v2_1.h5")
    monkeypatch.setenv(W.ENV_VAR, str(mine))
    assert W.resolve_weights("sd-2", parts=["text_encoder"], download=False) == {
        "text_encoder": mine / "text_encoder_v2_1.h5"
    }


def test_a_keras_cache_works_as_is(cache):
    _h5(cache / "text_encoder_v2_1.h5")
    assert W.resolve_weights("sd-2", parts=("text_encoder",), download=False)["text_encoder"] == cache / "text_encoder_v2_1.h5"


def test_missing_weights_say_where_they_were_looked_for(cache, tmp_path):
    mine = tmp_path / "empty"
    mine.mkdir()
    with pytest.raises(WeightsError) as info:
        W.resolve_weights("sd-1", mine, parts=["diffusion_model"], download=False)
    message = str(info.value)
    assert "kcv_diffusion_model.h5" in message and str(mine) in message and str(cache) in message
    assert "init-random" in message and "\n" not in message


def test_weights_where_lists_local_files_and_what_would_be_downloaded(cache, tmp_path):
    from click.testing import CliRunner

    from conceptlib.cli import main

    mine = tmp_path / "mine"
    _h5(mine / "kcv_encoder.h5")
    _h5(cache / "kcv_decoder.h5")
    result = CliRunner().invoke(main, ["weights", "where"])  # no folder given: the rest downloads
    assert result.exit_code == 0, result.output
    spec = W.WEIGHT_FILES["sd-1"]
    assert result.output.splitlines() == [
        f"text_encoder\tnot found locally; would download {spec['text_encoder'].url}",
        f"diffusion_model\tnot found locally; would download {spec['diffusion_model'].url}",
        f"decoder\t{cache / 'kcv_decoder.h5'}",
        f"image_encoder\tnot found locally; would download {spec['image_encoder'].url}",
    ]
    # With a folder given, a missing part is missing: train and generate never download then.
    result = CliRunner().invoke(main, ["weights", "where", "--weights", str(mine)])
    assert result.exit_code == 1, result.output
    missing = f"not in {mine} (nor the Keras cache); a given weights folder is never completed by a download"
    assert result.stdout.splitlines() == [
        f"text_encoder\t{mine / 'kcv_encoder.h5'}",
        f"diffusion_model\tMISSING: {missing}",
        f"decoder\t{cache / 'kcv_decoder.h5'}",
        f"image_encoder\tMISSING: {missing}",
    ]
    # Nothing was downloaded.
    assert sorted(p.name for p in cache.iterdir()) == ["kcv_decoder.h5"]


def test_weights_where_names_the_other_model_a_folder_holds(cache, tmp_path):
    """`where --model sd-1` on a folder of sd-2 weights says so, as train and generate do."""
    from click.testing import CliRunner

    from conceptlib.cli import main

    sd2 = tmp_path / "sd2"
    for part in ("text_encoder", "diffusion_model"):
        _h5(sd2 / W.weight_filename("sd-2", part))
    result = CliRunner().invoke(main, ["weights", "where", "--weights", str(sd2)])
    assert result.exit_code == 1, result.output
    assert result.stderr.endswith(f"fix each as its line above says ({sd2} holds sd-2 weights: use them with "
                                  "--base-model sd-2 in train, --model sd-2 in generate)\n")
    # As sd-2 weights the folder holds two of the four parts, and no other model's hint.
    result = CliRunner().invoke(main, ["weights", "where", "--model", "sd-2", "--weights", str(sd2)])
    assert result.exit_code == 1, result.output
    missing = f"MISSING: not in {sd2} (nor the Keras cache); a given weights folder is never completed by a download"
    assert result.stdout.splitlines() == [
        f"text_encoder\t{sd2 / W.weight_filename('sd-2', 'text_encoder')}",
        f"diffusion_model\t{sd2 / W.weight_filename('sd-2', 'diffusion_model')}",
        f"decoder\t{missing}",
        f"image_encoder\t{missing}",
    ]
    assert result.stderr == ("Error: 2 of 4 weight files cannot be used (decoder, image_encoder); "
                             "fix each as its line above says\n")


def test_weights_where_lists_every_bad_file_then_fails(cache, tmp_path):
    """A bad file does not hide the parts after it: each line says which file is wrong and how to
    fix it, and the exit code (1) comes at the end."""
    from click.testing import CliRunner

    from conceptlib.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "kcv_encoder.h5").write_bytes(b"<html>rate limited</html>")  # an error page saved as the file
    _h5(mine / "kcv_diffusion_model.h5")
    whole = _h5(tmp_path / "whole.h5")
    (cache / "kcv_decoder.h5").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a cut-off download
    result = CliRunner().invoke(main, ["weights", "where", "--weights", str(mine)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(W.PARTS)
    assert lines[0].startswith(f"text_encoder\tBAD: weights file {mine / 'kcv_encoder.h5'} is corrupt (not an HDF5 file); ")
    assert lines[0].endswith("delete it and download it again, or put an intact copy there")
    assert lines[1] == f"diffusion_model\t{mine / 'kcv_diffusion_model.h5'}"
    assert lines[2].startswith(f"decoder\tBAD: weights file {cache / 'kcv_decoder.h5'} is truncated or corrupt (")
    assert lines[2].endswith("delete it and download it again, or put an intact copy there")
    assert lines[3].startswith(f"image_encoder\tMISSING: not in {mine}")
    assert result.stderr == ("Error: 3 of 4 weight files cannot be used (text_encoder, decoder, image_encoder); "
                             "fix each as its line above says\n")
    # Nothing was downloaded or changed.
    assert sorted(p.name for p in cache.iterdir()) == ["kcv_decoder.h5"]


def test_weights_where_tells_to_rewrite_a_damaged_random_folder(cache, tmp_path):
    from click.testing import CliRunner

    from conceptlib.cli import main

    mine = tmp_path / "random"
    mine.mkdir()
    (mine / W.RANDOM_MARKER).write_text("random")
    for part in W.PARTS:
        (mine / W.weight_filename("sd-1", part)).write_bytes(b"")  # e.g. a disk that filled up
    result = CliRunner().invoke(main, ["weights", "where", "--weights", str(mine)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all("\tBAD: weights file " in line for line in lines)
    assert all(line.endswith(f"rewrite the folder with `conceptlib weights init-random {mine}`") for line in lines)
    assert result.stderr.startswith("Error: 4 of 4 weight files cannot be used (")


def test_missing_weights_folder_is_an_error(cache, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"weights folder .*nope.* does not exist"):
        W.resolve_weights("sd-1", tmp_path / "nope")
    with pytest.raises(WeightsError, match=r"check the path, or make it from a Stable Diffusion model with "
                       r"`conceptlib weights convert MODEL '.*my weights'`"):
        W.resolve_weights("sd-1", tmp_path / "my weights")  # quoted: the command must paste
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("CONCEPTLIB_WEIGHTS", str(tmp_path / "a-file"))
    with pytest.raises(WeightsError, match=r"a-file \(from \$CONCEPTLIB_WEIGHTS\) is a file, not a folder"):
        W.resolve_weights("sd-1")
    (tmp_path / "locked").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root reads everything: simulated
    with pytest.raises(WeightsError, match=r"locked \(from --weights\) cannot be read \(permission denied\)"):
        W.resolve_weights("sd-1", tmp_path / "locked")


def test_unknown_base_model_or_part(cache):
    with pytest.raises(WeightsError, match="unknown base model 'sd-3'"):
        W.resolve_weights("sd-3")
    with pytest.raises(WeightsError, match="unknown model part 'vae'"):
        W.resolve_weights("sd-1", parts=["vae"])


def test_corrupt_file_is_reported_with_its_path(cache, tmp_path):
    mine = tmp_path / "w"
    mine.mkdir()
    (mine / "kcv_encoder.h5").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(WeightsError, match=r"kcv_encoder\.h5 is corrupt \(not an HDF5 file\)"):
        W.resolve_weights("sd-1", mine, parts=["text_encoder"])


def test_truncated_file_is_reported_before_any_model_is_built(cache, tmp_path):
    # A cut-off download keeps its HDF5 signature; its superblock still records the full size.
    whole = tmp_path / "whole.h5"
    with h5py.File(whole, "w") as handle:
        handle.create_dataset("x", data=np.zeros((200, 200)))
    mine = tmp_path / "w"
    mine.mkdir()
    (mine / "kcv_decoder.h5").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(WeightsError) as info:
        W.resolve_weights("sd-1", mine, parts=["decoder"], download=False)
    message = str(info.value)
    assert f"{mine / 'kcv_decoder.h5'} is truncated or corrupt" in message and "\n" not in message
    assert "download it again" in message and "init-random" not in message  # init-random refuses unmarked folders


def test_missing_weights_name_the_other_model_found_instead(cache, tmp_path):
    mine = _h5(tmp_path / "sd2" / "diffusion_model_v2_1.h5").parent
    with pytest.raises(WeightsError, match=rf"\({mine} holds sd-2 weights: use them with --base-model sd-2 in train, "
                                          r"--model sd-2 in generate\)$"):
        W.resolve_weights("sd-1", mine, parts=["diffusion_model"], download=False)


def test_a_given_weights_folder_never_leads_to_a_download(cache, tmp_path, monkeypatch):
    """Parts the folder lacks still come from the Keras cache, but a part found nowhere is an
    error naming the folder: the user said where the weights are, so nothing is downloaded."""
    import keras

    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: pytest.fail("downloaded"))
    mine = tmp_path / "mine"
    _h5(mine / "kcv_encoder.h5")
    _h5(cache / "kcv_decoder.h5")
    with pytest.raises(WeightsError) as info:
        W.resolve_weights("sd-1", mine, parts=["text_encoder", "decoder", "diffusion_model", "image_encoder"])
    assert str(info.value).startswith("sd-1 diffusion_model, image_encoder weights (kcv_diffusion_model.h5, "
                                      f"vae_encoder.h5) not found in {mine}, {cache}; put keras-cv's")
    monkeypatch.setenv(W.ENV_VAR, str(mine))
    with pytest.raises(WeightsError, match="put keras-cv's kcv_diffusion_model.h5 in"):
        W.resolve_weights("sd-1", parts=["diffusion_model"])


def test_download_uses_keras_cv_url_and_hash(cache, monkeypatch, tmp_path):
    import keras

    calls = []

    def fake_get_file(fname=None, origin=None, file_hash=None, **kwargs):
        calls.append((origin, file_hash))
        return str(_h5(cache / origin.rsplit("/", 1)[-1]))

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    resolved = W.resolve_weights("sd-2", parts=["text_encoder", "decoder"])
    assert calls == [
        (W.WEIGHT_FILES["sd-2"]["text_encoder"].url, W.WEIGHT_FILES["sd-2"]["text_encoder"].sha256),
        (W.WEIGHT_FILES["sd-2"]["decoder"].url, W.WEIGHT_FILES["sd-2"]["decoder"].sha256),
    ]
    assert resolved["decoder"] == cache / "kcv_decoder.h5"


def test_failed_download_says_where_it_looked(cache, monkeypatch):
    import keras

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsError) as info:
        W.resolve_weights("sd-1", parts=["image_encoder"])
    message = str(info.value)
    assert str(cache) in message and W.WEIGHT_FILES["sd-1"]["image_encoder"].url in message
    assert "name resolution" in message and "--weights" in message


# -- random weights ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    # The image encoder is the smallest part (137 MB); the CLI test of every part is test_generate.
    return W.write_random_weights(tmp_path_factory.mktemp("random-weights"), "sd-1", parts=["image_encoder"])


def test_random_weights_are_marked_and_listed(random_dir):
    assert (random_dir / W.RANDOM_MARKER).read_text().startswith("These Stable Diffusion weights are RANDOMLY")
    manifest = json.loads((random_dir / W.MANIFEST).read_text())
    assert manifest["random"] is True
    assert manifest["files"]["vae_encoder.h5"]["part"] == "image_encoder"
    assert manifest["files"]["vae_encoder.h5"]["bytes"] == (random_dir / "vae_encoder.h5").stat().st_size
    assert W.is_random(random_dir)
    assert W.is_random(W.resolve_weights("sd-1", random_dir, parts=["image_encoder"], download=False))


def test_random_weights_load_through_the_builders(random_dir):
    from conceptlib.kerascv import models

    resolved = W.resolve_weights("sd-1", random_dir, parts=["image_encoder"], download=False)
    loaded = models.build_image_encoder(weights=resolved)
    fresh = models.build_image_encoder()
    with h5py.File(resolved["image_encoder"]) as handle:
        names = [n.decode() if isinstance(n, bytes) else n for n in handle.attrs["layer_names"]]
        stored = [
            np.asarray(handle[name][w])
            for name in names
            for w in [x.decode() if isinstance(x, bytes) else x for x in handle[name].attrs["weight_names"]]
        ]
    assert len(stored) == len(loaded.weights) > 0
    for value, variable in zip(stored, loaded.weights):
        np.testing.assert_array_equal(value, variable.numpy())
    # And they are not just the initialiser's output.
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(loaded.weights, fresh.weights))


def test_building_from_weight_files_skips_the_random_initialisers(random_dir, monkeypatch):
    # Random initialisation is wasted work when every weight is loaded from a file (and slow on
    # JAX, where each weight shape compiles its own RNG program).
    from keras.src.backend import Variable  # the active backend's class: each overrides the method

    from conceptlib.kerascv import models

    calls = []
    original = Variable._initialize_with_initializer

    def counting(variable, initializer):
        calls.append(variable.path)
        return original(variable, initializer)

    monkeypatch.setattr(Variable, "_initialize_with_initializer", counting)
    resolved = W.resolve_weights("sd-1", random_dir, parts=["image_encoder"], download=False)
    loaded = models.build_image_encoder(weights=resolved)
    assert calls == [] and len(loaded.weights) > 0
    assert Variable._initialize_with_initializer is counting  # restored after the build
    models.build_image_encoder()
    assert len(calls) == len(loaded.weights)


def test_prefetch_asks_the_os_to_read_every_weight_file(random_dir, monkeypatch, tmp_path):
    import os

    advised = []

    def advise(fd, offset, length, advice):
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", advise)
    resolved = W.resolve_weights("sd-1", random_dir, parts=["image_encoder"], download=False)
    W.prefetch({**resolved, "decoder": tmp_path / "missing.h5"})  # a missing file is left to the loader
    assert advised == [(str(resolved["image_encoder"].resolve()), 0, 0, os.POSIX_FADV_WILLNEED)]


def test_truncated_weights_fail_to_load_with_a_clear_error(random_dir, tmp_path):
    from conceptlib.kerascv import models

    broken = tmp_path / "vae_encoder.h5"
    broken.write_bytes((random_dir / "vae_encoder.h5").read_bytes()[:4096])
    with pytest.raises(WeightsError) as info:
        models.build_image_encoder(weights={"image_encoder": broken})
    assert str(broken) in str(info.value) and "corrupt" in str(info.value)


def test_wrong_model_weights_fail_to_load_with_a_clear_error(random_dir):
    from conceptlib.kerascv import models

    with pytest.raises(WeightsError, match="could not load decoder weights"):
        models.build_decoder("sd-1", 64, weights={"decoder": random_dir / "vae_encoder.h5"})


def test_missing_part_in_a_weights_dict(random_dir):
    from conceptlib.kerascv import models

    with pytest.raises(WeightsError, match="no text_encoder weights among the resolved files"):
        models.build_text_encoder("sd-1", weights={"image_encoder": random_dir / "vae_encoder.h5"})


def test_random_weights_never_overwrite_unmarked_files(tmp_path):
    real = _h5(tmp_path / "real" / "vae_encoder.h5")
    before = real.read_bytes()
    with pytest.raises(WeightsError, match="not marked random; refusing to write random weights beside"):
        W.write_random_weights(tmp_path / "real", "sd-1", parts=["image_encoder"])
    assert real.read_bytes() == before


def test_random_weights_refuse_a_non_empty_unmarked_folder(tmp_path):
    # Real sd-2 weights: random sd-1 ones beside them would mark them RANDOM too, and a later
    # `init-random --model sd-2` into the then "random" folder would overwrite them.
    real = _h5(tmp_path / "cache" / "text_encoder_v2_1.h5")
    with pytest.raises(WeightsError, match="already holds text_encoder_v2_1.h5 and is not marked random"):
        W.write_random_weights(real.parent, "sd-1", parts=["image_encoder"])
    assert sorted(p.name for p in real.parent.iterdir()) == ["text_encoder_v2_1.h5"]
    assert not W.is_random(real.parent)


def test_random_weights_into_an_unusable_path_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(WeightsError, match=r"cannot write to .*a-file/w \(Not a directory\); pick another folder"):
        W.write_random_weights(tmp_path / "a-file" / "w", "sd-1", parts=["image_encoder"])
