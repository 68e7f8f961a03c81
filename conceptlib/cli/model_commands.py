"""Model commands (issue 3): ``generate`` and the ``weights`` group.

Keras fixes its backend at its first import, so each command calls ``set_default_backend()``
(an existing KERAS_BACKEND wins, else JAX for ``generate`` where JAX can use an NVIDIA GPU, else
TensorFlow) before anything imports keras.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import re
import secrets
import shlex
import sys
from pathlib import Path

import click

from conceptlib.cli import main
from conceptlib.cli.convert_command import convert_command
from conceptlib.errors import ApplyError, UsageError

_MODELS = click.Choice(["sd-1", "sd-2"])


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].strip("-") or "image"


def _save_new(picture, path: Path, info) -> Path:
    """Save ``picture`` as a PNG at ``path``, or at ``path`` with -1, -2, ... added: never over an
    existing file, not even one another process creates meanwhile (the file is created exclusively)."""
    for index in range(10_000):
        candidate = path if index == 0 else path.with_name(f"{path.stem}-{index}{path.suffix}")
        try:
            handle = open(candidate, "xb")
        except FileExistsError:
            continue
        with handle:
            picture.save(handle, format="PNG", pnginfo=info)
        return candidate
    raise UsageError(f"too many files named like {path} already; pass another --out folder")


def concepts_in_prompts(library, *texts: str):
    """Library headers whose tokens occur in any of ``texts`` (as the tokenizer would match them)."""
    from conceptlib.kerascv.tokenizer import find_tokens

    headers = library.list()
    by_token = {header.token: header for header in headers}
    found: list = []
    for text in texts:
        for token in find_tokens(text or "", by_token):
            if by_token[token] not in found:
                found.append(by_token[token])
    return found


def _pick_base_model(model: str | None, headers) -> str:
    widths = {header.base_model for header in headers}
    if model is None:
        if len(widths) > 1:
            names = ", ".join(f"{h.name} ({h.base_model})" for h in headers)
            raise ApplyError(f"the prompt mixes concepts for sd-1 and sd-2 ({names}); use concepts of one base model")
        model = widths.pop() if widths else "sd-1"
    from conceptlib.concept import DIMS

    for header in headers:
        if header.dim != DIMS[model]:
            raise ApplyError(
                f"concept {header.name!r} ({header.token}) has {header.dim}-wide vectors ({header.base_model}) "
                f"but --model {model} takes {DIMS[model]}-wide ones; pass --model {header.base_model} or "
                "remove its token from the prompt"
            )
    return model


def contact_sheet(images, columns: int | None = None):
    """One PIL image holding ``images`` (PIL images of equal size) in a grid."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    gap = 4
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet.paste(image, (column * (width + gap), row * (height + gap)))
    return sheet


# What a prompt word that is meant as a concept token looks like: '<cat-doll>'. Such a word that
# is no library token is a typo or a concept not imported; keras-cv would silently spell it out.
_TOKEN_LIKE = re.compile(r"<[^\s<>|]+>")


def _check_unknown_tokens(library, prompt: str, negative: str | None, extra_tokens=()) -> None:
    import difflib

    from conceptlib.clip_bpe import clean

    known = sorted([header.token for header in library.list()] + list(extra_tokens), key=len, reverse=True)
    for where, text in (("PROMPT", prompt), ("--negative", negative)):
        text = clean(text or "")
        for token in known:  # longest first: '<cat>' inside a token '<cat>-style' is no word of its own
            text = text.replace(token, " ")
        for word in _TOKEN_LIKE.findall(text):
                close = difflib.get_close_matches(word, known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise ApplyError(
                    f"{word!r} in {where} is not a concept token of the library; {hint}see `conceptlib list` "
                    "for the tokens, or import the concept first (`conceptlib import FILE`)"
                )


def file_concepts(library, paths, prompt: str, negative: str | None) -> list:
    """The concepts of ``generate --concept FILE`` (any format ``import`` reads), checked before
    any model is built: each token must be in PROMPT or --negative, be no CLIP word, and belong to
    no library concept nor another FILE."""
    from conceptlib.cli.library_commands import clip_word_problem, is_clip_word
    from conceptlib.formats import load_source
    from conceptlib.kerascv.tokenizer import find_tokens

    concepts: list = []
    for path in paths:
        concept = load_source(path)
        token = concept.token
        if is_clip_word(token):
            raise ApplyError(f"{path}: {clip_word_problem(token)}; import it with --token {shlex.quote(f'<{token}>')} and use that")
        in_library = library.find_token(token)
        owner = in_library or next((c for c in concepts if c.token == token), None)
        if owner is not None:
            raise ApplyError(
                f"{path}: its token {token} is also that of concept {owner.name!r}"
                f"{' in the library' if in_library else ''}; apply one of them, or import the file with another --token"
            )
        if not any(find_tokens(text or "", {token: None}) for text in (prompt, negative)):
            raise ApplyError(
                f"{path}: its token {token} is in neither PROMPT nor --negative, so it would change nothing; "
                f"write it in the prompt, e.g. \"a photo of {token}\""
            )
        concepts.append(concept)
    return concepts


def _check_prompt_lengths(headers, prompt: str, negative: str | None) -> None:
    """Refuse, before any model is built, a prompt that will not fit the text encoder's 77 tokens
    with every concept token expanded to all its vectors (as ``apply`` encodes it)."""
    from conceptlib.clip_bpe import END_OF_TEXT, START_OF_TEXT, clean
    from conceptlib.errors import PromptTooLongError, VocabularyError
    from conceptlib.kerascv.apply import MAX_PROMPT_LENGTH, _tokenizer_pattern, _vocab_entry
    from conceptlib.kerascv.tokenizer import make_clip_tokenizer

    try:
        # No download here: that would import keras before the backend is chosen. Without a
        # local vocabulary the text encoder's own check runs later.
        tokenizer = make_clip_tokenizer(download=False)
    except VocabularyError:
        return
    vectors = {header.token: header.num_vectors for header in headers}
    pattern = _tokenizer_pattern([START_OF_TEXT, END_OF_TEXT, *vectors]) if vectors else tokenizer.pattern
    for which, text in (("prompt", prompt), ("negative prompt", negative)):
        if not text:
            continue
        length, grown = 2, 0
        for piece in pattern.findall(clean(text)):
            if piece in vectors:
                length += vectors[piece]
                grown += vectors[piece] - 1
            else:
                length += len(tokenizer.bpe(_vocab_entry(tokenizer, piece)).split(" "))
        if length > MAX_PROMPT_LENGTH:
            over = length - MAX_PROMPT_LENGTH
            because = f" ({grown} of them from multi-vector concepts)" if grown else ""
            raise PromptTooLongError(
                f"{which} {text[:40] + '...' if len(text) > 40 else text!r} is {length} tokens{because}; the "
                f"text encoder takes {MAX_PROMPT_LENGTH} including start and end: shorten it by "
                f"{over} token{'s' if over > 1 else ''}"
            )


def _check_out_dir(out_dir: Path) -> None:
    """Refuse an --out folder that cannot be created or written now, not after the images."""
    import os

    existing = out_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out_dir}: {existing} is a file, not a folder; pass another --out folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out_dir}: {existing} is not writable; pass a folder you can write to")


@main.command("generate")
@click.argument("prompt")
@click.option("--negative", default=None, help="Negative prompt (may contain concept tokens too).")
@click.option("-n", "--num-images", "num_images", default=3, show_default=True, type=click.IntRange(1, 64),
              help="How many images. (In `train`, -n is --name.)")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000), help="Diffusion steps.")
@click.option("--seed", default=None, type=click.IntRange(0, 2**32 - 1),
              help="Random seed, 0 to 2**32-1 (printed and stored in the PNGs if not given).")
@click.option("--size", default=512, show_default=True, type=int, help="Image width and height (multiple of 64).")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale (0 or more; 1: none).")
@click.option("--weights", "weights_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of keras-cv weight files (default: $CONCEPTLIB_WEIGHTS, then the Keras cache, then download).")
@click.option("--model", "--base-model", "model", default=None, type=_MODELS,
              help="Base model (default: that of the concepts in the prompt, else sd-1).")
@click.option("--offline", is_flag=True,
              help="Never download weights; fail if they are not found locally. (The CLIP vocabulary is still "
              "downloaded if it is not found locally.)")
@click.option("--out", "out_dir", default="conceptlib-images", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Folder for the PNGs.")
@click.option("--concept", "concept_paths", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Also apply the concept in FILE (any format `import` reads) without adding it to the library, "
                   "e.g. to try a downloaded embedding first; repeatable. Its token must be in the prompt or --negative.")
def generate_command(prompt, negative, num_images, steps, seed, size, guidance, weights_dir, model, offline, out_dir,
                     concept_paths):
    """Generate images for PROMPT, applying every library concept whose token it contains (and
    each --concept FILE).

    Writes one PNG per image and a contact sheet, and prints their paths. Runs on the JAX backend
    where JAX can use an NVIDIA GPU, else on TensorFlow (CPU); a set KERAS_BACKEND wins.
    """
    from conceptlib.training import MAX_RESOLUTION

    if size < 64 or size % 64 or size > MAX_RESOLUTION:
        raise UsageError(f"--size {size} is not a multiple of 64 from 64 to {MAX_RESOLUTION}; use e.g. 512")
    if not prompt.strip():
        raise UsageError("PROMPT is empty; say what to draw, e.g. conceptlib generate \"a photo of <cat-doll>\"")
    if not math.isfinite(guidance) or guidance < 0:
        # Other tools' ranges start at 0 (ComfyUI) or 1 (AUTOMATIC1111): a negative scale is a typo.
        raise UsageError(f"--guidance {guidance} is not a finite number of at least 0; use e.g. 7.5")
    _check_out_dir(out_dir)
    from conceptlib.library import ConceptLibrary

    library = ConceptLibrary()
    from_files = file_concepts(library, concept_paths, prompt, negative)
    headers = concepts_in_prompts(library, prompt, negative or "")
    _check_unknown_tokens(library, prompt, negative, [concept.token for concept in from_files])
    base_model = _pick_base_model(model, headers + from_files)
    _check_prompt_lengths(headers + from_files, prompt, negative)

    from conceptlib.weights import random_folders, resolve_weights

    with contextlib.redirect_stdout(sys.stderr):  # keras' download progress
        weights = resolve_weights(
            base_model, weights_dir, parts=("text_encoder", "diffusion_model", "decoder"), download=not offline
        )
    random_dirs = random_folders(weights)
    if random_dirs:
        where = " and ".join(str(folder) for folder in random_dirs)
        click.echo(f"Warning: {base_model} weights in {where} are RANDOM; images will be noise", err=True)
    if seed is None:
        seed = secrets.randbelow(2**31)
        click.echo(f"Seed: {seed}", err=True)

    from conceptlib.kerascv import enable_jax_compilation_cache, ignore_one_pixel_attention_warning, set_default_backend
    from conceptlib.plugins import jax_gpu_available

    # The pinned TensorFlow is the CPU build: on a GPU only the JAX backend is fast.
    if set_default_backend("jax" if jax_gpu_available() else None) == "jax":
        # The same cache as the jax trainer's: a later generate skips the UNet's compile.
        enable_jax_compilation_cache()
    ignore_one_pixel_attention_warning()
    from conceptlib.kerascv.apply import apply
    from conceptlib.kerascv.models import build_stable_diffusion

    # keras-cv prints a license notice and progress bars on stdout; stdout is for the paths.
    with contextlib.redirect_stdout(sys.stderr):
        sd = build_stable_diffusion(base_model, size, weights)
        concepts = [library.get(header.name) for header in headers] + from_files
        applied = apply(sd, concepts, library) if concepts else None
        try:
            images = sd.text_to_image(
                prompt,
                negative_prompt=negative or None,
                batch_size=num_images,
                num_steps=steps,
                unconditional_guidance_scale=guidance,
                seed=seed,
            )
        finally:
            if applied is not None:
                applied.unload()

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    settings = {
        "prompt": prompt, "negative": negative, "seed": seed, "steps": steps, "size": size,
        "guidance": guidance, "base_model": base_model, "concepts": [h.name for h in headers],
        "concept_files": [str(path) for path in concept_paths], "random_weights": bool(random_dirs),
        # keras-cv draws the whole batch's noise from the seed: an image is reproduced by the
        # seed with the same batch size, at its position in the batch.
        "num_images": len(images),
    }

    def png_info(index: int | None):
        info = PngInfo()
        batch = {} if index is None else {"index": index}
        info.add_text("conceptlib", json.dumps(dict(settings, **batch), ensure_ascii=False))
        position = "" if index is None else f", Batch pos: {index}"
        info.add_text("parameters", f"{prompt}\nNegative prompt: {negative or ''}\nSteps: {steps}, Seed: {seed}, "
                                    f"CFG scale: {guidance}, Size: {size}x{size}, Batch size: {len(images)}{position}")
        return info

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{_slug(prompt)}-{seed}"
    pictures = [Image.fromarray(array) for array in images]
    paths = [_save_new(picture, out_dir / f"{stem}-{index}.png", png_info(index))
             for index, picture in enumerate(pictures)]
    sheet_path = _save_new(contact_sheet(pictures), out_dir / f"{stem}-sheet.png", png_info(None))
    for path in paths + [sheet_path]:
        click.echo(str(path))


@main.group("weights")
def weights_group() -> None:
    """Stable Diffusion weights: where they come from, random ones for smoke runs."""


@weights_group.command("init-random")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "--base-model", "model", default="sd-1", show_default=True, type=_MODELS, help="Base model.")
def init_random_command(directory: Path, model: str) -> None:
    """Write RANDOMLY initialised weights into DIRECTORY (for --weights), for smoke runs and tests.

    Images generated with them are noise. The folder is marked with RANDOM-WEIGHTS.txt, so
    DIRECTORY must be new, empty, or a folder init-random wrote before.
    """
    from conceptlib.kerascv import set_default_backend

    set_default_backend()
    from conceptlib.weights import write_random_weights

    with contextlib.redirect_stdout(sys.stderr):
        folder = write_random_weights(directory, model)
    click.echo(str(folder))


@weights_group.command("where")
@click.option("--model", "--base-model", "model", default="sd-1", show_default=True, type=_MODELS, help="Base model.")
@click.option("--weights", "weights_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Folder of keras-cv weight files (default: $CONCEPTLIB_WEIGHTS), searched before the Keras cache.")
def where_command(model: str, weights_dir: Path | None) -> None:
    """Print which file each part would be loaded from, or the URL it would be downloaded from
    (nothing is downloaded; with a weights folder given, nothing ever would be: a part missing
    there is MISSING). Every damaged or missing file is listed with how to fix it; exit 1 if any is."""
    from conceptlib.errors import WeightsError
    from conceptlib.weights import (
        PARTS, WEIGHT_FILES, other_model_hint, check_weight_file, is_random, local_weight_files, weights_folder,
    )

    located = local_weight_files(model, weights_dir)
    given = weights_folder(weights_dir)
    bad = []
    for part in PARTS:
        path = located.get(part)
        if path is None and given is not None:  # a folder was given: nothing is downloaded then
            bad.append(part)
            click.echo(f"{part}\tMISSING: not in {given} (nor the Keras cache); a given weights folder is never "
                       "completed by a download")
            continue
        if path is None:
            click.echo(f"{part}\tnot found locally; would download {WEIGHT_FILES[model][part].url}")
            continue
        try:
            check_weight_file(path)
        except WeightsError as exc:
            bad.append(part)
            click.echo(f"{part}\tBAD: {exc}")
        else:
            click.echo(f"{part}\t{path}{'  (RANDOM)' if is_random({part: path}) else ''}")
    if bad:
        hint = other_model_hint(model, [given]) if given is not None else ""
        raise WeightsError(
            f"{len(bad)} of {len(PARTS)} weight files cannot be used ({', '.join(bad)}); fix each as its line above "
            f"says{hint}"
        )


weights_group.add_command(convert_command)
