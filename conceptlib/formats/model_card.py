"""The README.md an sd-concepts export carries: a Hugging Face model card, so the folder can be
uploaded to the Hub as it is (as the sd-concepts-library repos and diffusers' textual-inversion
script's outputs are) and says what the concept is, its trigger word and how to load it."""

from __future__ import annotations

import json
import re

from conceptlib.concept import Concept

_BASE_MODEL_NAMES = {"sd-1": "Stable Diffusion 1.x", "sd-2": "Stable Diffusion 2.x"}
# The Hub repository of each base model's usual pipeline (the card's base_model, which the Hub
# links and filters by, as diffusers' textual-inversion script writes it).
_BASE_MODEL_REPOS = {"sd-1": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd-2": "stabilityai/stable-diffusion-2-1-base"}
_TAGS = ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "textual-inversion")
# The Hub's license field takes its own ids (cc-by-4.0, creativeml-openrail-m, mit, ...).
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")


def model_card(concept: Concept, *, preview_file: str | None) -> str:
    """The model card's markdown (YAML front matter, then text) from the concept's ModelSpec
    description keys (`conceptlib describe`) and training metadata; ``preview_file``: the
    picture beside it to show, if any."""
    metadata = concept.metadata
    base = _BASE_MODEL_NAMES[concept.base_model]
    title = metadata.get("modelspec.title") or concept.name
    user_tags = [tag.strip() for tag in metadata.get("modelspec.tags", "").split(",") if tag.strip()]
    front = ["---"]
    license_name = metadata.get("modelspec.license", "").strip()
    if license_name:
        license_id = license_name.lower().replace(" ", "-")
        front.append(f"license: {license_id}" if _LICENSE_ID.match(license_id) else "license: other")
    repo = _BASE_MODEL_REPOS[concept.base_model]
    front.append(f"base_model: {repo}")
    front.append("tags:")
    front += [f"- {json.dumps(tag, ensure_ascii=False)}" for tag in dict.fromkeys([*_TAGS, *user_tags])]
    front.append("---")

    vectors = f"{concept.num_vectors} vector{'s' if concept.num_vectors != 1 else ''}"
    lines = [*front, "", f"# {title}", ""]
    if metadata.get("random_weights") == "true":
        lines += ["**Trained on randomly initialised weights (a smoke test): these vectors mean nothing.**", ""]
    lines.append(metadata.get("modelspec.description") or f"A textual-inversion concept for {base}.")
    lines += ["", f"Trigger word: `{concept.token}` ({vectors} of {concept.dim}, for {base})."]
    if metadata.get("modelspec.usage_hint"):
        lines += ["", metadata["modelspec.usage_hint"]]
    if preview_file:
        lines += ["", f"![{title}]({preview_file})"]
    lines += [
        "", "## Use it", "",
        "With diffusers (this folder, or the Hub repository it is uploaded to):", "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{repo}")',
        'pipe.load_textual_inversion("path/or/user/repo")',
        f'image = pipe("a photo of {concept.token}").images[0]',
        "```", "",
        "With conceptlib (KerasCV), AUTOMATIC1111, ComfyUI or InvokeAI: `conceptlib import` this folder, then",
        "`conceptlib export` the concept in the tool's own format (`--format a1111`, `kohya`, ...).",
    ]
    about = _about(metadata, user_tags)
    if about:
        lines += ["", "## About", "", *about]
    return "\n".join(lines) + "\n"


def _about(metadata: dict, user_tags: list[str]) -> list[str]:
    rows = []
    for key, label in (("modelspec.author", "Author"), ("modelspec.license", "License"),
                       ("modelspec.category", "Category")):
        if metadata.get(key):
            rows.append(f"- {label}: {metadata[key]}")
    if user_tags:
        rows.append(f"- Tags: {', '.join(user_tags)}")
    training = _training(metadata)
    if training:
        rows.append(f"- Trained with conceptlib ({metadata.get('trainer', 'unknown')} trainer): {training}")
    return rows


def checkpoint_step(metadata: dict) -> int | None:
    """The step of the training checkpoint a concept was imported from (``checkpoint_of``), else
    None: its ``training`` settings then give the run's planned steps, not the ones trained."""
    try:
        step = json.loads(metadata.get("checkpoint_of") or "{}").get("step")
        return int(step) if step is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _training(metadata: dict) -> str:
    try:
        settings = json.loads(metadata.get("training") or "{}")
    except ValueError:
        return ""
    if not isinstance(settings, dict) or "steps" not in settings:
        return ""
    step = checkpoint_step(metadata)
    parts = [f"{settings['steps']} steps" if step is None else f"step {step} of a planned {settings['steps']}"]
    for key, label in (("batch_size", "batch"), ("learning_rate", "learning rate"), ("resolution", "px")):
        if key in settings:
            parts.append(f"{settings[key]} {label}" if key == "resolution" else f"{label} {settings[key]}")
    if metadata.get("final_loss"):
        parts.append(f"final loss {metadata['final_loss']}")
    return ", ".join(parts)
