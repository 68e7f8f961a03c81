"""`conceptlib weights convert` for Stable Diffusion 2.x base models (2.0/2.1 base, 512 px,
epsilon prediction): a diffusers pipeline folder and an original single-file checkpoint onto
keras-cv's TextEncoderV2 and DiffusionModelV2.

As in tests/test_weights_convert.py (SD 1.x), the real diffusers/transformers classes are built
from the Hub's SD 2.1-base configs with random weights and saved with ``save_pretrained``; the
real CLI converts the folder, keras-cv's V2 models load it through conceptlib's own path, and
their outputs are compared with torch's. keras-cv's V2 text encoder uses the tanh approximation
of GELU where OpenCLIP uses the exact one (its UNet the same two choices as SD 1.x), so the tight
comparison runs torch with keras-cv's choices and the unchanged models are compared more loosely.
The VAE is SD 1.x's (same plan, compared there). The single file is written in the original
layout, OpenCLIP's fused q/k/v included, and proven genuine with diffusers' own single-file loader.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conceptlib import weights as W
from conceptlib.kerascv import convert as C
from helpers import convert_in_a_process, in_child
from torch_reference import (
    TEXT_CONFIG_SD2, UNET_CONFIG_SD2, VAE_CONFIG, assert_close, assert_single_file_genuine, keras_outputs,
    randomise, seeded_inputs, save_pipeline, unet_outputs,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

# The norm whose spread tells SD 2.x v-prediction files apart (see conceptlib.kerascv.convert): a
# base model's is small; randomise() would give it ~0.1, above the 0.09 threshold.
PROBE = "up_blocks.3.attentions.2.transformer_blocks.0.norm1.bias"


def _torch_pipeline(folder: Path) -> dict:
    """Write a random SD 2.1-base pipeline folder; return torch's outputs, one model at a time."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.activations import ACT2FN

    generator, _, inputs = seeded_inputs(1024)
    ids = inputs["ids"]
    out = {"inputs": inputs}
    with torch.no_grad():
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG_SD2)).eval()
        randomise(text_encoder, generator)
        out["text_exact"] = text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        mlps = [module for module in text_encoder.modules() if type(module).__name__ == "CLIPMLP"]
        assert len(mlps) == 23
        exact = [mlp.activation_fn for mlp in mlps]
        for mlp in mlps:  # keras-cv's TextEncoderV2: keras' gelu, the tanh approximation
            mlp.activation_fn = ACT2FN["gelu_pytorch_tanh"]
        out["text"] = text_encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
        for mlp, activation in zip(mlps, exact):
            mlp.activation_fn = activation

        unet = UNet2DConditionModel(**UNET_CONFIG_SD2).eval()
        randomise(unet, generator)
        dict(unet.named_parameters())[PROBE].mul_(0.3)
        out.update(unet_outputs(unet, inputs))

        vae = AutoencoderKL(**VAE_CONFIG).eval()
        randomise(vae, generator)
        save_pipeline(folder, text_encoder, unet, vae, prediction_type="epsilon")
    del unet, vae, text_encoder
    gc.collect()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("convert-sd2")
    src, dest = root / "sd21-base-diffusers", root / "keras-weights"
    reference = in_child(_torch_pipeline, src)
    result = convert_in_a_process(src, dest)
    assert result.returncode == 0, result.stderr[-3000:]
    yield {"src": src, "dest": dest, "stdout": result.stdout, "stderr": result.stderr, **reference}
    shutil.rmtree(root, ignore_errors=True)  # ~10 GB


@pytest.fixture(scope="module")
def keras_out(converted):
    """keras-cv's V2 outputs for the same inputs, its models loaded from the converted folder
    (in a process of their own, as torch's were)."""
    return in_child(keras_outputs, "sd-2", converted["dest"], converted["inputs"], ("text_encoder", "diffusion_model"))


def test_sd2_folder_becomes_keras_cv_v2_files(converted):
    dest = converted["dest"]
    assert converted["stdout"].strip() == str(dest)
    assert "a diffusers sd-2 pipeline" in converted["stderr"] and "--base-model sd-2" in converted["stderr"]
    names = {W.weight_filename("sd-2", part) for part in W.PARTS}
    assert sorted(p.name for p in dest.iterdir()) == sorted(names | {W.MANIFEST, C.NOTE})
    manifest = json.loads((dest / W.MANIFEST).read_text())
    assert manifest["converted_from"]["base_model"] == "sd-2"
    assert manifest["files"][W.weight_filename("sd-2", "text_encoder")]["base_model"] == "sd-2"


def test_sd2_text_encoder_matches_transformers(converted, keras_out):
    assert_close("sd-2 text encoder (penultimate layer, final norm)", keras_out["text"], converted["text"], converted["text_exact"])


def test_sd2_diffusion_model_matches_diffusers_unet(converted, keras_out):
    assert_close("sd-2 unet (noise prediction)", keras_out["unet"], converted["unet"], converted["unet_diffusers"])


# --- the original single-file layout -----------------------------------------------------------


def _openclip_tensors(text: dict) -> dict:
    """The text encoder's diffusers tensors in OpenCLIP's layout (q/k/v fused), plus what SD 2.x
    single files also hold and conversion must skip: the 24th layer, the projection, the scale."""
    names = C._openclip_names()
    out, fused = {}, {}
    for key, value in text.items():
        if key not in names:
            continue
        stored, third = names[key]
        if third is None:
            out[C._OPENCLIP_PREFIX + stored] = value
        else:
            fused.setdefault(stored, [None] * 3)[third] = value
    for stored, parts in fused.items():
        out[C._OPENCLIP_PREFIX + stored] = np.concatenate(parts, axis=0)
    for key in [k for k in out if ".resblocks.22." in k]:
        out[key.replace(".resblocks.22.", ".resblocks.23.")] = -out[key]
    out[C._OPENCLIP_PREFIX + "text_projection"] = np.eye(1024, dtype=np.float32)
    out[C._OPENCLIP_PREFIX + "logit_scale"] = np.array(4.6, np.float32)
    return out


def _write_single_file(src: Path, path: Path) -> Path:
    from safetensors.numpy import load_file, save_file

    tensors = {}
    for sub, (stem, _) in C._SUBFOLDERS.items():
        part = {key.removeprefix(C._TEXT_PREFIX): value for key, value in load_file(str(src / sub / f"{stem}.safetensors")).items()}
        if sub == "text_encoder":
            tensors.update(_openclip_tensors(part))
            continue
        for key, value in part.items():
            if sub == "vae" and ".mid_block.attentions.0.to_" in key and value.ndim == 2:
                value = value.reshape(value.shape + (1, 1))  # the original VAE's 1x1 conv attention
            tensors[C.ldm_name(sub, key)] = value
    tensors = {key: value.astype(np.float16) if value.dtype == np.float32 else value for key, value in tensors.items()}
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def single_file(converted):
    path = in_child(_write_single_file, converted["src"], converted["src"].parent / "v2-1_512-random.safetensors")
    yield path
    path.unlink(missing_ok=True)


def test_sd2_single_file_is_genuine_for_diffusers(converted, single_file):
    """diffusers' single-file loader reads the file back into the original models' tensors
    (float16-rounded): the OpenCLIP layout and the LDM names are what the original code wrote."""
    in_child(assert_single_file_genuine, single_file, converted["src"], ("text_encoder", "unet"))


def test_sd2_single_file_reads_as_the_folder(converted, single_file):
    """The single file gives every part the folder's tensors (float16-rounded), under the same
    names the plans (and so the folder conversion tested above) use."""
    folder = C.inspect_pipeline(converted["src"])
    single = C.inspect_pipeline(single_file)
    assert single.base_model == "sd-2" and single.pipeline_class == "single-file SD 2.x checkpoint"
    for sub, (_, parts) in C._SUBFOLDERS.items():
        for part in parts:
            for keys, _, _ in C._plans("sd-2")[part]().entries:
                key = next(k for k in keys if k in folder.tensors[sub].keys())
                want = folder.tensors[sub].get(key).astype(np.float16).astype(np.float32)
                have = single.tensors[sub].get(key)
                assert np.array_equal(have.reshape(want.shape), want), f"{sub}: {key}"
