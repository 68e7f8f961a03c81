"""`conceptlib weights convert`: a diffusers SD 1.x pipeline folder -> keras-cv weights folder.

Real weights cannot be downloaded here, so the heavy test builds the real diffusers/transformers
classes (CLIPTextModel of openai/clip-vit-large-patch14, UNet2DConditionModel and AutoencoderKL
of SD 1.5, configs below) with random weights (every norm's scale and shift randomised too),
writes them with ``save_pretrained`` as the Hub holds them, converts the folder with the real
CLI, builds keras-cv's models through conceptlib's own loading path (``--weights DIR``) and
compares each part's outputs with torch's on the same inputs. A swapped, untransposed or
misplaced tensor changes outputs by O(1); the tolerances are ~1e-4 of each output's scale.
Every full-size model is built in a process of its own (``helpers.in_child``, the CLI), so the
test process, which runs the whole suite, never holds one.

keras-cv's SD 1.x differs from diffusers in two documented details that are not weights: its
GEGLU uses the tanh approximation of GELU, and its GroupNorms use eps 1e-5 where diffusers' VAE
and transformer norms use 1e-6. The tight comparison runs torch with keras-cv's choices; the
outputs of the unchanged diffusers models are compared too, with a looser bound.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conceptlib.cli import main
from conceptlib.kerascv import convert as C
from conceptlib import weights as W
from helpers import convert_in_a_process, in_child
from torch_reference import (
    TEXT_CONFIG, TEXT_CONFIG_SD2, UNET_CONFIG, VAE_CONFIG, KerasCvChoices, assert_close, assert_single_file_genuine, h5_weights,
    keras_outputs, randomise, save_pipeline, seeded_inputs, unet_outputs,
)

# diffusers and transformers (imported in the fixture) must never reach for the Hub: every model
# here is built from its config.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# The first tensors of SD 1.5's vae file carry diffusers' pre-0.14 attention names (query, key,
# value, proj_attn); the fixture renames the decoder's to them so both spellings are converted.
OLD_VAE_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _torch_pipeline(folder: Path) -> dict:
    """Write a random SD 1.5 pipeline folder with diffusers' save_pretrained; return torch's
    outputs for the inputs, computed one model at a time (the UNet alone is 3.4 GB)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    generator, rng, inputs = seeded_inputs(768)
    inputs["image"] = rng.uniform(-1, 1, (1, 3, 64, 64)).astype(np.float32)
    ids = inputs["ids"]
    out = {"inputs": inputs}
    with torch.no_grad():
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
        randomise(text_encoder, generator)
        out["text"] = text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()

        unet = UNet2DConditionModel(**UNET_CONFIG).eval()
        randomise(unet, generator)
        out.update(unet_outputs(unet, inputs))

        vae = AutoencoderKL(**VAE_CONFIG).eval()
        randomise(vae, generator)
        z = torch.from_numpy(inputs["latent"])
        image = torch.from_numpy(inputs["image"])
        out["decoder_diffusers"] = vae.decode(z / 0.18215).sample.numpy()
        posterior = vae.encode(image).latent_dist
        out["mean_diffusers"] = (posterior.mean * 0.18215).numpy()
        with KerasCvChoices(vae):
            out["decoder"] = vae.decode(z / 0.18215).sample.numpy()
            posterior = vae.encode(image).latent_dist
            out["mean"] = (posterior.mean * 0.18215).numpy()
            out["logvar"] = posterior.logvar.numpy()

        save_pipeline(folder, text_encoder, unet, vae)
    del unet, vae, text_encoder
    gc.collect()
    _rename_decoder_attention(folder / "vae" / "diffusion_pytorch_model.safetensors")
    return out


def _rename_decoder_attention(path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    prefix = "decoder.mid_block.attentions.0."
    for key in [k for k in tensors if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for new, old in OLD_VAE_NAMES.items():
            if rest.startswith(new + "."):
                tensors[prefix + old + rest[len(new):]] = tensors.pop(key)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The torch outputs, the pipeline folder and its conversion (by the real CLI process)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("convert")
    src, dest = root / "sd15-diffusers", root / "keras-weights"
    start = time.monotonic()
    reference = in_child(_torch_pipeline, src)
    torch_seconds = time.monotonic() - start
    result = convert_in_a_process(src, dest)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"\ntorch models + save_pretrained: {torch_seconds:.0f} s; convert: {time.monotonic() - start - torch_seconds:.0f} s")
    yield {"src": src, "dest": dest, "stdout": result.stdout, "stderr": result.stderr, **reference}
    shutil.rmtree(root, ignore_errors=True)  # 8 GB; pytest would keep it for three runs


@pytest.fixture(scope="module")
def keras_out(converted):
    """keras-cv's outputs for the same inputs, its models loaded from the converted folder
    (in a process of their own, as torch's were)."""
    parts = ("text_encoder", "diffusion_model", "decoder", "image_encoder")
    return in_child(keras_outputs, "sd-1", converted["dest"], converted["inputs"], parts)


@pytest.mark.slow
def test_convert_writes_keras_cv_files_and_says_where_they_came_from(converted):
    dest = converted["dest"]
    assert converted["stdout"].strip() == str(dest)
    names = {W.weight_filename("sd-1", part) for part in W.PARTS}
    assert names <= {p.name for p in dest.iterdir()}
    assert sorted(p.name for p in dest.iterdir()) == sorted(names | {W.MANIFEST, C.NOTE})
    assert not list(dest.parent.glob(".*converting*")), "the staging folder is left behind"
    manifest = json.loads((dest / W.MANIFEST).read_text())
    assert manifest["random"] is False and not W.is_random(dest)
    record = manifest["converted_from"]
    assert record["source"] == str(converted["src"].resolve())
    assert record["pipeline"] == "StableDiffusionPipeline" and record["base_model"] == "sd-1"
    assert manifest["files"]["kcv_diffusion_model.h5"]["source"] == ["unet/diffusion_pytorch_model.safetensors"]
    assert str(converted["src"].resolve()) in (dest / C.NOTE).read_text()
    # `weights where` finds every part in it, none marked random.
    result = CliRunner().invoke(main, ["weights", "where", "--weights", str(dest)])
    assert result.exit_code == 0, result.output
    assert result.output.count(str(dest)) == 4 and "RANDOM" not in result.output


@pytest.mark.slow
def test_text_encoder_matches_transformers(converted, keras_out):
    assert_close("text encoder (last hidden state)", keras_out["text"], converted["text"])


@pytest.mark.slow
def test_diffusion_model_matches_diffusers_unet(converted, keras_out):
    assert_close("unet (noise prediction)", keras_out["unet"], converted["unet"], converted["unet_diffusers"])


@pytest.mark.slow
def test_decoder_matches_diffusers_vae_decode(converted, keras_out):
    assert_close("decoder (image)", keras_out["decoder"], converted["decoder"], converted["decoder_diffusers"])


@pytest.mark.slow
def test_image_encoder_matches_diffusers_vae_encode(converted, keras_out):
    assert_close("image encoder (mean x 0.18215)", keras_out["mean"], converted["mean"], converted["mean_diffusers"])
    assert_close("image encoder (log-variance)", keras_out["logvar"], converted["logvar"])


@pytest.mark.slow
def test_a_failed_conversion_leaves_nothing(converted, tmp_path, monkeypatch):
    from conceptlib.kerascv import models

    def disk_full(model, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models, "save_legacy_h5_weights", disk_full)
    dest = tmp_path / "weights"
    result = CliRunner().invoke(main, ["weights", "convert", str(converted["src"]), str(dest)])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and str(tmp_path) in result.output
    assert list(tmp_path.iterdir()) == []


# --- original (LDM) single-file checkpoints ----------------------------------------------------


@pytest.fixture(scope="module")
def single_file(converted):
    """The test pipeline as an original SD 1.x single-file checkpoint, the way A1111/civitai files
    are laid out: LDM names, VAE attention as 1x1 convs, float16 throughout, non-model entries
    (schedule buffers, EMA bookkeeping, position_ids) and EMA copies of three UNet tensors (set to
    other values, to show which copy is read). The LDM names come from conceptlib's table; the
    test proves them with diffusers' own single-file loader."""
    path = in_child(_write_single_file, converted["src"], converted["src"].parent / "sd15-single-file.safetensors")
    yield path
    path.unlink(missing_ok=True)


def _write_single_file(src: Path, path: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    tensors = {}
    for sub, (stem, _) in C._SUBFOLDERS.items():
        for key, value in load_file(str(src / sub / f"{stem}.safetensors")).items():
            key = key.removeprefix(C._TEXT_PREFIX)
            for new, old in OLD_VAE_NAMES.items():  # back to today's names (the fixture wrote old ones)
                key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
            if sub == "vae" and ".mid_block.attentions.0.to_" in key and value.ndim == 2:
                value = value.reshape(value.shape + (1, 1))
            tensors[C.ldm_name(sub, key)] = value.astype(np.float16) if value.dtype == np.float32 else value
    unet = C._LDM_PREFIX["unet"]
    for key in ("input_blocks.0.0.weight", "input_blocks.0.0.bias", "out.2.weight"):
        tensors["model_ema.diffusion_model" + key.replace(".", "")] = -tensors[unet + key]
    tensors.update({"model_ema.decay": np.array(0.9999, np.float32), "model_ema.num_updates": np.array(470000, np.int32),
                    "alphas_cumprod": np.linspace(1, 0.005, 1000, dtype=np.float32),
                    "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None]})
    save_file(tensors, str(path))
    del tensors
    gc.collect()
    return path


@pytest.mark.slow
def test_single_file_checkpoint_is_genuine_for_diffusers(converted, single_file):
    """diffusers' own single-file loader reads the file back into the original models' tensors
    (float16-rounded): the file is a genuine LDM checkpoint, so conceptlib's LDM names are right."""
    renames = {f".attentions.0.{old}.": f".attentions.0.{new}." for new, old in OLD_VAE_NAMES.items()}
    in_child(assert_single_file_genuine, single_file, converted["src"], ("text_encoder", "unet", "vae"), renames)


@pytest.mark.slow
def test_single_file_converts_to_the_same_keras_cv_files(converted, single_file, tmp_path):
    """Converting the single file gives, array for array, the folder conversion's keras-cv files
    (float16-rounded), which the tests above checked numerically against torch."""
    dest = tmp_path / "from-single-file"
    try:
        _convert_single_file_and_compare(converted, single_file, dest)
    finally:
        shutil.rmtree(dest, ignore_errors=True)  # 4.3 GB, even when a comparison fails


def _convert_single_file_and_compare(converted, single_file: Path, dest: Path) -> None:
    import h5py

    result = convert_in_a_process(single_file, dest)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(dest)
    assert "single-file sd-1 checkpoint" in result.stderr and "its 3 model_ema.* tensors are not used" in result.stderr
    manifest = json.loads((dest / W.MANIFEST).read_text())
    record = manifest["converted_from"]
    assert record["format"] == "ldm-single-file" and record["source"] == str(single_file.resolve())
    assert record["ema_tensors_ignored"] == 3 and "model.diffusion_model" in record["unet_weights"]
    assert manifest["files"]["kcv_diffusion_model.h5"]["source"] == [single_file.name]
    assert "single-file checkpoint" in (dest / C.NOTE).read_text()
    for part in W.PARTS:
        name = W.weight_filename("sd-1", part)
        with h5py.File(converted["dest"] / name, "r") as folder, h5py.File(dest / name, "r") as single:
            # keras' legacy loader pairs weights by position (layer names carry per-process
            # counters), so the files must hold the same arrays in the same order.
            expected, got = h5_weights(folder), h5_weights(single)
            assert len(got) == len(expected) > 0, part
            for (key, want), (_, have) in zip(expected, got):
                assert np.array_equal(have[()], want[()].astype(np.float16).astype(np.float32)), f"{part}: {key}"


@pytest.mark.slow
def test_refuses_an_earlier_conversion_without_overwrite(converted):
    dest = converted["dest"]
    result = CliRunner().invoke(main, ["weights", "convert", str(converted["src"]), str(dest)])
    assert result.exit_code == 1
    assert f"already holds weights converted from {converted['src'].resolve()}; pass --overwrite" in result.output


# --- cheap checks: every one fails before keras or any model is involved --------------------


@pytest.fixture()
def no_models(monkeypatch):
    from conceptlib.kerascv import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(models, "build_part", refuse)


def _configs(folder: Path, *, unet=None, text=None, index=None) -> Path:
    """A pipeline folder with SD 1.5's configs (overridden by the given dicts) and no weights."""
    folder.mkdir(parents=True, exist_ok=True)
    model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                   "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], **(index or {})}
    (folder / "model_index.json").write_text(json.dumps(model_index))
    for sub, config in (("text_encoder", {**TEXT_CONFIG, "architectures": ["CLIPTextModel"], **(text or {})}),
                        ("unet", {"_class_name": "UNet2DConditionModel", **UNET_CONFIG, **(unet or {})}),
                        ("vae", {"_class_name": "AutoencoderKL", **VAE_CONFIG})):
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(config))
    return folder


def _convert(*args):
    return CliRunner().invoke(main, ["weights", "convert", *map(str, args)])


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_missing_source(tmp_path, no_models):
    line = _one_line_error(_convert(tmp_path / "nope", tmp_path / "out"))
    assert f"{tmp_path / 'nope'} does not exist" in line and "model_index.json" in line
    assert not (tmp_path / "out").exists()


def test_not_a_diffusers_folder(tmp_path, no_models):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model.ckpt").write_bytes(b"x")
    line = _one_line_error(_convert(tmp_path / "src", tmp_path / "out"))
    assert f"{tmp_path / 'src' / 'model_index.json'} is missing" in line and "save_pretrained" in line
    (tmp_path / "src" / "notes.txt").write_text("x")
    line = _one_line_error(_convert(tmp_path / "src" / "notes.txt", tmp_path / "out"))
    assert "neither a diffusers pipeline folder nor a .safetensors checkpoint" in line
    assert not (tmp_path / "out").exists()


def test_other_models_folders_are_named(tmp_path, no_models):
    sd2 = {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
    # An SD 2.x UNet with an SD 1.x text encoder is no model keras-cv has.
    mixed = _configs(tmp_path / "mixed", unet=sd2)
    line = _one_line_error(_convert(mixed, tmp_path / "out"))
    assert "text_encoder/config.json: hidden_size is 768, keras-cv's SD 2.x text encoder (OpenCLIP ViT-H/14) needs 1024" in line
    wide = _configs(tmp_path / "wide", unet={"cross_attention_dim": 1280})
    assert "cross_attention_dim is 1280, Stable Diffusion 1.x has 768 and 2.x 1024" in _one_line_error(_convert(wide, tmp_path / "out"))
    xl = _configs(tmp_path / "xl", index={"_class_name": "StableDiffusionXLPipeline",
                                         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
    assert "Stable Diffusion XL" in _one_line_error(_convert(xl, tmp_path / "out"))
    shutil.rmtree(xl / "vae")  # an incomplete SDXL download: SDXL is the news, not the missing folder
    assert "Stable Diffusion XL" in _one_line_error(_convert(xl, tmp_path / "out"))
    inpaint = _configs(tmp_path / "inpaint", unet={"in_channels": 9})
    line = _one_line_error(_convert(inpaint, tmp_path / "out"))
    assert "in_channels is 9, keras-cv's SD 1.x UNet needs 4" in line
    for name, unet, text in (("v-pred", None, None), ("sd2-768-v", sd2, TEXT_CONFIG_SD2)):
        v_prediction = _configs(tmp_path / name, unet=unet, text=text)
        (v_prediction / "scheduler").mkdir()
        (v_prediction / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
        line = _one_line_error(_convert(v_prediction, tmp_path / "out"))
        assert 'prediction_type is "v_prediction"' in line and "epsilon" in line
        assert ("use an SD 2.x base model" in line) == (unet is not None), line
    assert not (tmp_path / "out").exists()


def test_sd2_folders_are_checked_as_sd2(tmp_path, no_models):
    """An SD 2.x base folder passes the config checks (and is then read as SD 2.x: its missing
    weights are named); an SD 2.x config that differs from keras-cv's V2 models is refused."""
    sd2 = {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
    src = _configs(tmp_path / "sd2", unet=sd2, text=TEXT_CONFIG_SD2)
    # Without its scheduler an SD 2.x folder cannot say whether it predicts the noise or v (768-v).
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert f"{src / 'scheduler' / 'scheduler_config.json'} is missing: an SD 2.x UNet predicts" in line
    (src / "scheduler").mkdir()
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "epsilon"}))
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert "model.safetensors is missing" in line and "text_encoder" in line
    heads = _configs(tmp_path / "heads", unet={**sd2, "attention_head_dim": 8}, text=TEXT_CONFIG_SD2)
    line = _one_line_error(_convert(heads, tmp_path / "out"))
    assert "attention_head_dim is 8, keras-cv's SD 2.x UNet needs [5, 10, 20, 20]" in line
    assert not (tmp_path / "out").exists()


def test_missing_part_files(tmp_path, no_models):
    src = _configs(tmp_path / "src")
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert f"{src / 'text_encoder' / 'model.safetensors'} is missing" in line
    (src / "text_encoder" / "pytorch_model.bin").write_bytes(b"x")
    (src / "text_encoder" / "model.bin").write_bytes(b"x")
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert "a pickle" in line and "safe_serialization=True" in line
    (src / "text_encoder" / "model.safetensors").write_bytes(b"<html>rate limited</html>")
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert f"{src / 'text_encoder' / 'model.safetensors'} is not a readable safetensors file" in line
    (src / "unet").rename(tmp_path / "unet-elsewhere")
    assert f"{src} has no unet/ folder" in _one_line_error(_convert(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wrong_tensor_shape_is_named(tmp_path, no_models):
    from safetensors.numpy import save_file

    src = _configs(tmp_path / "src")
    save_file({"text_model.embeddings.token_embedding.weight": np.zeros((10, 768), np.float16)},
              str(src / "text_encoder" / "model.safetensors"))
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert "tensor embeddings.token_embedding.weight has shape [10, 768], SD 1.x needs [49408, 768]" in line


def test_destination_holding_other_files_is_refused(tmp_path, no_models):
    src = _configs(tmp_path / "src")
    for name in (W.RANDOM_MARKER, "kcv_encoder.h5"):
        dest = tmp_path / f"dest-{name}"
        dest.mkdir()
        (dest / name).write_text("x")
        line = _one_line_error(_convert(src, dest))
        assert f"{dest} already holds {name} (not written by `weights convert`)" in line
        assert [p.name for p in dest.iterdir()] == [name]
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _one_line_error(_convert(src, tmp_path / "file"))


def test_a_disk_without_room_is_refused_before_converting(tmp_path, no_models, monkeypatch):
    src = _configs(tmp_path / "src")
    monkeypatch.setattr(C.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 10**9, 10**9))
    line = _one_line_error(_convert(src, tmp_path / "out"))
    assert "not enough disk space" in line and "4.3 GB needed, 1.0 GB free" in line
    assert not (tmp_path / "out").exists()


def _checkpoint(path: Path, shapes: dict) -> Path:
    """A .safetensors file with zero tensors of the given shapes (float16, as most are)."""
    from safetensors.numpy import save_file

    save_file({key: np.zeros(shape, np.float16) for key, shape in shapes.items()}, str(path))
    return path


def test_single_file_checkpoints_of_other_models_are_named(tmp_path, no_models):
    conv_in = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}
    to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    cases = [
        ("sdxl", {"conditioner.embedders.1.model.positional_embedding": (77, 1280), **conv_in},
         "is a Stable Diffusion XL checkpoint (conditioner.* text encoders)"),
        # SD 2.x files are read as SD 2.x: OpenCLIP's own names, SD 2.x's shapes.
        ("sd2", {"cond_stage_model.model.token_embedding.weight": (8, 1024), **conv_in},
         "tensor cond_stage_model.model.token_embedding.weight has shape [8, 1024], SD 2.x needs [49408, 1024]"),
        ("sd2-unet", {to_k: (320, 1024), **conv_in},
         "has no tensor cond_stage_model.model.token_embedding.weight; the file is incomplete or not an SD 2.x model"),
        ("inpainting", {"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)},
         "the UNet takes 9 input channels (an inpainting model), keras-cv's SD 1.x UNet takes 4"),
        ("v-prediction", {"v_pred": (0,), **conv_in}, "is marked as a v-prediction model"),
        ("lora", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)},
         "holds no Stable Diffusion UNet (no model.diffusion_model.* tensors)"),
        ("unet-only", conv_in,
         "has no tensor cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"),
        ("small-vocab", {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 768), **conv_in},
         "tensor cond_stage_model.transformer.text_model.embeddings.token_embedding.weight has shape [10, 768], "
         "SD 1.x needs [49408, 768]"),
    ]
    for name, shapes, message in cases:
        path = _checkpoint(tmp_path / f"{name}.safetensors", shapes)
        line = _one_line_error(_convert(path, tmp_path / "out"))
        assert message in line and str(path) in line, (name, line)
    # Older files name the text encoder's tensors without text_model.; the UNet's come next.
    path = _checkpoint(tmp_path / "old-clip.safetensors", {
        **{C.ldm_name("text_encoder", keys[0]).replace("text_model.", ""): shape
           for keys, shape, _ in C._text_encoder_plan().entries}, **conv_in})
    line = _one_line_error(_convert(path, tmp_path / "out"))
    assert "has no tensor model.diffusion_model.time_embed.0.weight" in line
    (tmp_path / "truncated.safetensors").write_bytes(b"<html>rate limited</html>")
    line = _one_line_error(_convert(tmp_path / "truncated.safetensors", tmp_path / "out"))
    assert "truncated.safetensors is not a readable safetensors file" in line
    line = _one_line_error(_convert(path, tmp_path / "out", "--variant", "fp16"))
    assert "--variant fp16 applies to pipeline folders only" in line
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoints_are_refused_unread(tmp_path, no_models):
    for name in ("v1-5-pruned-emaonly.ckpt", "model.pt", "model.pth"):
        path = tmp_path / name
        path.write_bytes(b"\x80\x02not really a pickle")
        line = _one_line_error(_convert(path, tmp_path / "out"))
        assert f"{path} is a pickle checkpoint" in line and "download the .safetensors version" in line
    assert not (tmp_path / "out").exists()


def test_ldm_names_of_sd1_tensors():
    """Spot checks against SD 1.5's v1-5-pruned-emaonly.safetensors key names; the slow tests prove
    the whole table with diffusers' own loader."""
    expected = {
        ("unet", "down_blocks.0.resnets.0.norm1.weight"): "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        ("unet", "down_blocks.1.attentions.1.proj_in.weight"): "model.diffusion_model.input_blocks.5.1.proj_in.weight",
        ("unet", "down_blocks.2.downsamplers.0.conv.bias"): "model.diffusion_model.input_blocks.9.0.op.bias",
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        ("unet", "mid_block.resnets.1.time_emb_proj.bias"): "model.diffusion_model.middle_block.2.emb_layers.1.bias",
        ("unet", "up_blocks.0.upsamplers.0.conv.weight"): "model.diffusion_model.output_blocks.2.1.conv.weight",
        ("unet", "up_blocks.1.upsamplers.0.conv.weight"): "model.diffusion_model.output_blocks.5.2.conv.weight",
        ("unet", "up_blocks.3.resnets.2.conv_shortcut.weight"): "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        ("unet", "conv_norm_out.weight"): "model.diffusion_model.out.0.weight",
        ("vae", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"): "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        ("vae", "decoder.up_blocks.0.resnets.1.conv2.weight"): "first_stage_model.decoder.up.3.block.1.conv2.weight",
        ("vae", "decoder.up_blocks.2.upsamplers.0.conv.bias"): "first_stage_model.decoder.up.1.upsample.conv.bias",
        ("vae", "decoder.mid_block.attentions.0.to_out.0.weight"): "first_stage_model.decoder.mid.attn_1.proj_out.weight",
        ("vae", "encoder.mid_block.attentions.0.group_norm.bias"): "first_stage_model.encoder.mid.attn_1.norm.bias",
        ("vae", "encoder.mid_block.resnets.1.norm2.weight"): "first_stage_model.encoder.mid.block_2.norm2.weight",
        ("vae", "post_quant_conv.weight"): "first_stage_model.post_quant_conv.weight",
        ("text_encoder", "encoder.layers.11.mlp.fc2.bias"): "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
    }
    assert {args: C.ldm_name(*args) for args in expected} == expected
    # Every tensor a part needs has its own LDM name.
    for sub, (_, parts) in C._SUBFOLDERS.items():
        keys = [entry[0][0] for part in parts for entry in C._plans("sd-1")[part]().entries]
        assert len({C.ldm_name(sub, key) for key in keys}) == len(keys), sub


def test_weight_files_variants_and_shards(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    # Only one variant: it is used; with --variant, the named one.
    assert C._weight_files(tmp_path, "unet", None) == [folder / "diffusion_pytorch_model.fp16.safetensors"]
    (folder / "diffusion_pytorch_model.ema.safetensors").write_bytes(b"")
    with pytest.raises(W.WeightsError, match="holds only variant files .ema, fp16.; pass --variant ema"):
        C._weight_files(tmp_path, "unet", None)
    assert C._weight_files(tmp_path, "unet", "ema") == [folder / "diffusion_pytorch_model.ema.safetensors"]
    with pytest.raises(W.WeightsError, match="diffusion_pytorch_model.bf16.safetensors is missing .and no bf16 variant"):
        C._weight_files(tmp_path, "unet", "bf16")
    (folder / "diffusion_pytorch_model.ema.safetensors").unlink()
    sharded = ["diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"]
    (folder / "diffusion_pytorch_model.fp16.safetensors").unlink()
    (folder / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(
        json.dumps({"weight_map": {"a": sharded[0], "b": sharded[1]}}))
    for name in sharded:
        (folder / name).write_bytes(b"")
    assert C._weight_files(tmp_path, "unet", None) == [folder / name for name in sharded]
    # The plain file wins over variants; a sharded file is its index's shards.
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    index = {"metadata": {}, "weight_map": {"a.weight": shards[1], "b.weight": shards[0], "c.weight": shards[1]}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(W.WeightsError, match=f"{shards[0]} .named in diffusion_pytorch_model.safetensors.index.json. is missing"):
        C._weight_files(tmp_path, "unet", None)
    for name in shards:
        (folder / name).write_bytes(b"")
    assert C._weight_files(tmp_path, "unet", None) == [folder / name for name in shards]
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert C._weight_files(tmp_path, "unet", None) == [folder / "diffusion_pytorch_model.safetensors"]


def test_tensor_reader_handles_prefixes_half_precision_and_bfloat16(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    value = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    save_file({"text_model.a": value.astype(np.float16), "b": value}, str(path))
    tensors = C._Tensors([path], strip_prefix="text_model.")
    assert sorted(tensors.keys()) == ["a", "b"] and tensors.shape("a") == (2, 3) and tensors.dtype("a") == "F16"
    assert tensors.get("a").dtype == np.float32 and np.array_equal(tensors.get("a"), value)
    # safetensors' numpy API cannot return bfloat16: write one by hand, as torch would.
    raw = value.astype(ml_dtypes.bfloat16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw)
    tensors = C._Tensors([tmp_path / "bf16.safetensors"])
    assert tensors.dtype("w") == "BF16" and np.array_equal(tensors.get("w"), value)


def test_layouts_become_keras_layouts():
    linear = np.arange(6, dtype=np.float32).reshape(3, 2)  # torch (out=3, in=2)
    assert np.array_equal(C._keras_value(linear, (2, 3), "kernel"), linear.T)
    assert np.array_equal(C._keras_value(linear, (1, 1, 2, 3), "kernel")[0, 0], linear.T)
    conv = np.arange(3 * 2 * 3 * 3, dtype=np.float32).reshape(3, 2, 3, 3)  # OIHW
    hwio = C._keras_value(conv, (3, 3, 2, 3), "kernel")
    assert hwio.shape == (3, 3, 2, 3) and hwio[1, 2, 0, 1] == conv[1, 0, 1, 2]
    embedding = np.zeros((5, 4), np.float32)
    assert C._keras_value(embedding, (5, 4), "embeddings").shape == (5, 4)


def test_replacing_an_earlier_conversion_is_all_or_nothing(tmp_path):
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "old.h5").write_text("old")
    staging = tmp_path / ".weights.converting-1"
    staging.mkdir()
    (staging / "new.h5").write_text("new")
    C._replace(staging, dest)
    assert [p.name for p in dest.iterdir()] == ["new.h5"] and sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_plans_cover_sd1_and_sd2_exactly():
    """Parameter counts of SD 1.x's and SD 2.x's text encoders, UNets and VAE (diffusers' own numbers)."""
    import math

    for base_model, text, unet in (("sd-1", 123_060_480, 859_520_964), ("sd-2", 340_387_840, 865_910_724)):
        plans = C._plans(base_model)
        counts = {part: sum(math.prod(shape) for _, shape, _ in build().entries) for part, build in plans.items()}
        assert counts["text_encoder"] == text and counts["diffusion_model"] == unet, base_model
        assert counts["decoder"] + counts["image_encoder"] == 83_653_863
    assert C.converted_bytes("sd-2") > C.converted_bytes("sd-1")


def test_openclip_names_of_sd2_text_encoder_tensors(tmp_path):
    """SD 2.x single files keep OpenCLIP's layout: q/k/v are the thirds of each layer's in_proj
    tensor, the 24th layer and the projection are not used, anything else is named as extra."""
    from safetensors.numpy import save_file

    prefix = "cond_stage_model.model."
    in_proj = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)  # q, k, v rows of a 2-wide model
    save_file({f"{prefix}transformer.resblocks.0.attn.in_proj_weight": in_proj,
               f"{prefix}transformer.resblocks.0.attn.in_proj_bias": np.arange(6, dtype=np.float32),
               f"{prefix}positional_embedding": np.ones((77, 2), np.float32),
               f"{prefix}transformer.resblocks.23.ln_1.weight": np.ones(2, np.float32),
               f"{prefix}text_projection": np.ones((2, 2), np.float32), f"{prefix}logit_scale": np.ones((), np.float32),
               f"{prefix}visual.proj": np.ones(2, np.float32), "model.diffusion_model.out.2.bias": np.ones(4, np.float32)},
              str(tmp_path / "sd2.safetensors"))
    tensors = C._OpenClipTensors(tmp_path / "sd2.safetensors")
    assert set(tensors.keys()) == {
        *(f"encoder.layers.0.self_attn.{name}_proj.{kind}" for name in "qkv" for kind in ("weight", "bias")),
        "embeddings.position_embedding.weight", "visual.proj"}
    assert tensors.shape("encoder.layers.0.self_attn.k_proj.weight") == (2, 2)
    assert np.array_equal(tensors.get("encoder.layers.0.self_attn.k_proj.weight"), in_proj[2:4])
    assert np.array_equal(tensors.get("encoder.layers.0.self_attn.v_proj.bias"), [4, 5])
    assert tensors.stored_name("encoder.layers.0.self_attn.q_proj.weight") == f"{prefix}transformer.resblocks.0.attn.in_proj_weight"
    assert tensors.stored_name("visual.proj") == f"{prefix}visual.proj"


def test_sd2_v_prediction_single_files_are_refused(tmp_path, no_models):
    """An SD 2.x 768-v file holds the same tensors as a base one; ComfyUI tells them apart by the
    spread of one norm's bias (above 0.09: v-prediction), and so does conceptlib."""
    from safetensors.numpy import save_file

    probe = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    rng = np.random.default_rng(0)
    for name, spread, refused in (("v", 0.15, True), ("base", 0.03, False)):
        path = tmp_path / f"{name}.safetensors"
        save_file({"cond_stage_model.model.token_embedding.weight": np.zeros((8, 1024), np.float16),
                   probe: (spread * rng.standard_normal(320)).astype(np.float16)}, str(path))
        line = _one_line_error(_convert(path, tmp_path / "out"))
        assert ("is an SD 2.x v-prediction model" in line) == refused, line
        if not refused:  # read on as an SD 2.x base model, whose other tensors are missing
            assert "SD 2.x needs [49408, 1024]" in line, line
    assert not (tmp_path / "out").exists()



def test_hostile_pipeline_files_are_one_line(tmp_path, no_models):
    """A downloaded pipeline folder may hold anything: a FIFO (would hang), JSON nested too deep
    to parse, shard names that reach outside the folder, or that are not names at all."""
    deep = _configs(tmp_path / "deep")
    (deep / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "model_index.json is not valid JSON (maximum recursion depth" in _one_line_error(_convert(deep, tmp_path / "o1"))
    fifo = _configs(tmp_path / "fifo")
    (fifo / "vae" / "config.json").unlink()
    os.mkfifo(fifo / "vae" / "config.json")
    assert f"{fifo / 'vae' / 'config.json'} is not a regular file" in _one_line_error(_convert(fifo, tmp_path / "o2"))
    for shard, shown in (("../../secret.safetensors", "'../../secret.safetensors'"), (["x"], "\"['x']\""),
                         ("/etc/passwd", "'/etc/passwd'")):
        src = _configs(tmp_path / f"shards-{len(shown)}")
        (src / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        line = _one_line_error(_convert(src, tmp_path / "o3"))
        assert f"names a shard {shown}, which is not a .safetensors file name in {src / 'text_encoder'}" in line
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
