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
# The Hub's license field takes only its own ids; any other license is `license: other` with
# license_name (and license_link for a URL). The ids concepts are usually shared under:
_HUB_LICENSES = (
    "apache-2.0", "mit", "openrail", "openrail++", "creativeml-openrail-m", "bigscience-openrail-m",
    "cc0-1.0", "cc-by-2.0", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0",
    "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "cc-by-nc-nd-4.0",
    "gpl-3.0", "agpl-3.0", "lgpl-3.0", "bsd-3-clause", "unlicense", "wtfpl",
)
# Spellings people write for them (after lowercasing and turning runs of spaces and _ into -).
_LICENSE_SPELLINGS = {
    "creativeml-open-rail-m": "creativeml-openrail-m", "creativeml-openrail-m-license": "creativeml-openrail-m",
    "openrail-m": "creativeml-openrail-m", "open-rail-m": "creativeml-openrail-m", "cc0": "cc0-1.0",
    "public-domain": "cc0-1.0", "apache": "apache-2.0", "apache-2": "apache-2.0", "gpl-3": "gpl-3.0",
    "gplv3": "gpl-3.0", "mit-license": "mit",
}
_NOT_SLUG = re.compile(r"[^a-z0-9.+-]+")


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
        front += _license_fields(license_name)
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
        f'image = pipe("{_EXAMPLE_PROMPTS[concept_type(metadata)].format(token=concept.token)}").images[0]',
        "```", "",
        "With conceptlib (KerasCV), AUTOMATIC1111, ComfyUI or InvokeAI: `conceptlib import` this folder, then",
        "`conceptlib export` the concept in the tool's own format (`--format a1111`, `kohya`, ...).",
    ]
    about = _about(metadata, user_tags)
    if about:
        lines += ["", "## About", "", *about]
    lines += ["", carried_metadata_comment(concept)]
    return "\n".join(lines) + "\n"


_CARRIED = re.compile(r"<!-- conceptlib (\{.*?\}) -->")


def carried_metadata_comment(concept: Concept) -> str:
    """An HTML comment (the Hub does not show it) with what `conceptlib import` reads back from
    the card: the description keys, created_at, base model (``writers.a1111_extra``), so a shared
    folder comes back as it left. ASCII JSON, its '--' (only in strings) escaped: a comment may
    not hold one."""
    from conceptlib.formats.writers import a1111_extra

    carried = json.dumps(a1111_extra(concept), ensure_ascii=True, separators=(",", ":"))
    return f"<!-- conceptlib {carried.replace('--', '-' + chr(92) + 'u002d')} -->"


def carried_metadata(card: str) -> dict:
    """What ``carried_metadata_comment`` put into a model card's text, {} if none (or damaged)."""
    found = _CARRIED.search(card)
    try:
        carried = json.loads(found.group(1)) if found else {}
    except ValueError:
        return {}
    return carried if isinstance(carried, dict) else {}


_EXAMPLE_PROMPTS = {"object": "a photo of {token}", "style": "a painting in the style of {token}"}


def concept_type(metadata: dict) -> str:
    """sd-concepts' ``type_of_concept``: "style" or "object". An imported one as it came, else
    "style" for a concept trained with the style templates or described with category Style."""
    given = metadata.get("type_of_concept", "").strip().lower()
    if given in _EXAMPLE_PROMPTS:
        return given
    try:
        template = json.loads(metadata.get("training") or "{}").get("template")
    except (ValueError, AttributeError):
        template = None
    if template == "style" or metadata.get("modelspec.category", "").strip().lower() == "style":
        return "style"
    return "object"


def _license_fields(license_name: str) -> list[str]:
    """The card's license lines: the Hub's id when ``license_name`` is (a spelling of) one, else
    ``license: other`` with the name, and the link when it is one."""
    slug = _NOT_SLUG.sub("-", license_name.lower().replace("_", "-")).strip("-")
    slug = _LICENSE_SPELLINGS.get(slug, slug)
    if slug in _HUB_LICENSES:
        return [f"license: {slug}"]
    if re.match(r"https?://", license_name):
        return ["license: other", f"license_link: {json.dumps(license_name)}"]
    return ["license: other", f"license_name: {json.dumps(slug or 'custom')}"]


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
