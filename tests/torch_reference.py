"""Torch references for the weight-conversion tests: the Hub's Stable Diffusion configs, random
diffusers/transformers models to convert, and the comparisons of keras-cv's outputs with theirs."""

from __future__ import annotations

import numpy as np


# openai/clip-vit-large-patch14's text model, as SD 1.x's text_encoder/config.json has it.
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
    pad_token_id=1, bos_token_id=0, eos_token_id=2,
)
# runwayml/stable-diffusion-v1-5 unet/config.json
UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# runwayml/stable-diffusion-v1-5 vae/config.json
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
)
SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
    set_alpha_to_one=False, steps_offset=1,
)
# SD 2.x base (stabilityai/stable-diffusion-2-1-base): OpenCLIP ViT-H/14's text tower up to its
# penultimate layer, as diffusers holds it (23 CLIP layers of 1024), and the UNet with heads of 64
# (diffusers' legacy attention_head_dim holds the head counts) and Linear projections.
TEXT_CONFIG_SD2 = dict(
    TEXT_CONFIG, hidden_size=1024, intermediate_size=4096, projection_dim=512, num_hidden_layers=23,
    num_attention_heads=16, hidden_act="gelu",
)
UNET_CONFIG_SD2 = dict(
    UNET_CONFIG, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, cross_attention_dim=1024,
)
TIMESTEP = 981


def seeded_inputs(context_width: int):
    """(torch generator for randomise, numpy generator, reference_inputs), all seeded with 0."""
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return torch.Generator().manual_seed(0), rng, reference_inputs(rng, context_width)


def reference_inputs(rng, context_width: int) -> dict:
    """Token ids of two prompts (8 tokens and a full 76, padded with <|endoftext|> as keras-cv
    pads), an 8x8 latent and a random text context for the UNet."""
    ids = np.full((2, 77), 49407, dtype=np.int64)
    ids[:, 0] = 49406
    ids[0, 1:9] = rng.integers(0, 49406, 8)
    ids[1, 1:77] = rng.integers(0, 49406, 76)
    return {
        "ids": ids,
        "latent": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        "context": rng.standard_normal((1, 77, context_width)).astype(np.float32),
    }


def unet_outputs(unet, inputs: dict) -> dict:
    """The UNet's noise prediction for ``inputs`` at TIMESTEP: unchanged ("unet_diffusers") and
    with keras-cv's choices ("unet")."""
    import torch

    args = (torch.from_numpy(inputs["latent"]), TIMESTEP, torch.from_numpy(inputs["context"]))
    with torch.no_grad():
        out = {"unet_diffusers": unet(*args).sample.numpy()}
        with KerasCvChoices(unet):
            out["unet"] = unet(*args).sample.numpy()
    return out


def save_pipeline(folder, text_encoder, unet, vae, **scheduler) -> None:
    """The three models as a StableDiffusionPipeline folder, written by diffusers' save_pretrained."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER_CONFIG, **scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


def randomise(module, generator) -> None:
    """Every parameter random, norms included (scale around 1, shift around 0), so a swapped
    scale/shift, bias or transposed square matrix changes the outputs."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim == 1:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel() if "embedding" not in name else 1
                param.copy_(torch.randn(param.shape, generator=generator) / np.sqrt(fan_in))


class KerasCvChoices:
    """Run diffusers with keras-cv's two non-weight choices (tanh GELU in GEGLU, GroupNorm eps
    1e-5) inside the block, so what is left to differ is the weights' mapping."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        import torch
        from diffusers.models import activations

        self.norms = [(m, m.eps) for m in self.model.modules() if isinstance(m, torch.nn.GroupNorm)]
        for module, _ in self.norms:
            module.eps = 1e-5
        self.gelu = activations.GEGLU.gelu
        activations.GEGLU.gelu = lambda _self, gate: torch.nn.functional.gelu(gate, approximate="tanh")
        return self

    def __exit__(self, *exc):
        from diffusers.models import activations

        for module, eps in self.norms:
            module.eps = eps
        activations.GEGLU.gelu = self.gelu


def assert_close(what: str, keras_out, torch_out, diffusers_out=None) -> None:
    """keras' output within 1e-4 of the output's scale of torch's run with keras-cv's choices, and
    within 2e-3 of the unchanged diffusers model's (GELU approximation and eps apart)."""
    scale = max(float(np.max(np.abs(torch_out))), 1.0)
    diff = float(np.max(np.abs(np.asarray(keras_out) - torch_out)))
    line = f"\n{what}: max |keras - torch| = {diff:.2e} (outputs up to {float(np.max(np.abs(torch_out))):.2f})"
    if diffusers_out is not None:
        exact = float(np.max(np.abs(np.asarray(keras_out) - diffusers_out)))
        line += f"; vs unchanged diffusers {exact:.2e}"
    print(line)
    assert diff <= 1e-4 * scale, line
    if diffusers_out is not None:
        assert exact <= 2e-3 * scale, line


def torch_state(model) -> dict:
    return {key: value.detach().float().numpy() for key, value in model.state_dict().items()}


def h5_weights(handle) -> list:
    """(name, dataset) of a legacy keras .h5 weights file, in the order keras loads them."""
    out = []
    for layer in handle.attrs["layer_names"]:
        group = handle[layer]
        out += [(f"{layer}/{weight}", group[weight]) for weight in group.attrs["weight_names"]]
    return out


def keras_outputs(base_model: str, weights_dir, inputs: dict, parts: tuple) -> dict:
    """keras-cv's outputs for ``inputs`` (as torch's: NCHW), each of ``parts`` built in turn
    through conceptlib's own loading path from ``weights_dir`` and dropped before the next:
    "text" (text_encoder), "unet" (diffusion_model), "decoder", "mean" and "logvar"
    (image_encoder)."""
    import gc

    from conceptlib import weights as W
    from conceptlib.kerascv import keras_module
    from conceptlib.kerascv.models import build_stable_diffusion

    sd = build_stable_diffusion(base_model, 64, W.resolve_weights(base_model, weights_dir, download=False))
    out = {}
    if "text_encoder" in parts:
        ids = inputs["ids"].astype(np.int32)
        positions = np.tile(np.arange(ids.shape[1], dtype=np.int32), (len(ids), 1))
        out["text"] = np.asarray(sd.text_encoder.predict_on_batch([ids, positions]))
        sd._text_encoder = None
    if "diffusion_model" in parts:
        latent = inputs["latent"].transpose(0, 2, 3, 1)
        t_embedding = np.asarray(sd._get_timestep_embedding(TIMESTEP, 1))  # keras-cv's own embedding
        eps = sd.diffusion_model.predict_on_batch([latent, t_embedding, inputs["context"]])
        out["unet"] = np.asarray(eps).transpose(0, 3, 1, 2)
        sd._diffusion_model = None
    if "decoder" in parts:
        image = sd.decoder.predict_on_batch(inputs["latent"].transpose(0, 2, 3, 1))
        out["decoder"] = np.asarray(image).transpose(0, 3, 1, 2)
        sd._decoder = None
    if "image_encoder" in parts:
        image = inputs["image"].transpose(0, 2, 3, 1)
        encoder = sd.image_encoder
        out["mean"] = np.asarray(encoder.predict_on_batch(image)).transpose(0, 3, 1, 2)
        moments = keras_module().Model(encoder.inputs, encoder.layers[-2].output)  # mean and log-variance
        out["logvar"] = np.asarray(moments.predict_on_batch(image))[..., 4:].transpose(0, 3, 1, 2)
    del sd
    gc.collect()
    return out


def assert_single_file_genuine(single_file, pipeline_folder, subfolders, renames=None) -> None:
    """diffusers' own single-file loader reads ``single_file`` back into the tensors of
    ``pipeline_folder`` (float16-rounded) for each of ``subfolders``: the file is a genuine
    original checkpoint, so conceptlib's names for that layout are right. ``renames`` maps a
    name fragment of the folder's files to today's (diffusers' pre-0.14 VAE attention names)."""
    import gc

    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from conceptlib.kerascv import convert as C

    pipe = StableDiffusionPipeline.from_single_file(
        str(single_file), config=str(pipeline_folder), local_files_only=True,
        tokenizer=None, safety_checker=None, feature_extractor=None)
    for sub in subfolders:
        loaded = torch_state(getattr(pipe, sub))
        # One original tensor at a time: the whole UNet again would be 3.4 GB more.
        with safe_open(str(pipeline_folder / sub / f"{C._SUBFOLDERS[sub][0]}.safetensors"), "np") as original:
            for name in original.keys():
                key = name
                for old, new in (renames or {}).items():
                    key = key.replace(old, new)
                key = key if key in loaded else key.removeprefix(C._TEXT_PREFIX)
                assert key in loaded, f"{sub}: diffusers did not load {key} from the single file"
                want = original.get_tensor(name).astype(np.float16).astype(np.float32)
                assert np.array_equal(loaded.pop(key), want), f"{sub}: {key} differs"
        assert set(loaded) <= {"text_model.embeddings.position_ids", "embeddings.position_ids"}, (sub, sorted(loaded)[:3])
        del loaded
    del pipe
    gc.collect()
