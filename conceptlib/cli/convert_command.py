"""``conceptlib weights convert SRC DIR``: a diffusers Stable Diffusion 1.x/2.x pipeline folder, or an
original single-file SD 1.x/2.x ``.safetensors`` checkpoint, into a keras-cv weights folder that
``--weights DIR`` reads.

Added to the ``weights`` group by ``conceptlib.cli.model_commands``. The folder, configs, tensor names and shapes and the destination are checked before
keras is imported and any model is built.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import click


@click.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--variant", default=None, metavar="NAME",
              help="Read the NAME variant files (e.g. fp16: model.fp16.safetensors). Default: the plain files, or "
                   "the only variant there is.")
@click.option("--overwrite", "--force", "overwrite", is_flag=True, help="Replace DIRECTORY if an earlier `weights convert` wrote it.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the folder at the end.")
def convert_command(src: Path, directory: Path, variant: str | None, overwrite: bool, quiet: bool) -> None:
    """Convert SRC, a Stable Diffusion 1.x or 2.x model, into DIRECTORY, a keras-cv weights folder
    for --weights / $CONCEPTLIB_WEIGHTS. SRC is either a diffusers pipeline folder (model_index.json,
    text_encoder/, unet/, vae/ with .safetensors files, as save_pretrained writes and the Hub
    hosts) or a single-file checkpoint in the original layout as AUTOMATIC1111, ComfyUI and
    civitai use it (e.g. v1-5-pruned-emaonly.safetensors, v2-1_512-ema-pruned.safetensors; its
    model.diffusion_model.* UNet is used, not model_ema.* copies). .ckpt pickles are refused: use
    the .safetensors version. SD 2.x means the base (512, epsilon-prediction) models keras-cv's
    StableDiffusionV2 runs; 768-v (v-prediction) models are refused.

    DIRECTORY must be new or empty (or, with --overwrite, an earlier conversion); it receives all
    four parts or, on any error, nothing. Needs about 4.3 GB of disk (SD 2.x: 5.2 GB) and 5.5 GB
    (6.5 GB) of memory.
    """
    from conceptlib.kerascv.convert import check_destination, convert_pipeline, converted_bytes, inspect_pipeline

    start = time.monotonic()

    def report(message: str) -> None:
        if not quiet:
            elapsed = int(time.monotonic() - start)
            click.echo(f"[{elapsed // 60}:{elapsed % 60:02d}] {message}", err=True)

    if not src.exists():  # the plainest mistake first, before the destination's
        inspect_pipeline(src)
    check_destination(directory, overwrite=overwrite, needed_bytes=converted_bytes())
    info = inspect_pipeline(src, variant=variant)
    if info.source_format == "ldm-single-file":
        unused = f"; its {info.ema_tensors_ignored} model_ema.* tensors are not used" if info.ema_tensors_ignored else ""
        report(f"{src}: a single-file {info.base_model} checkpoint (UNet from model.diffusion_model.*{unused}); converting")
    else:
        report(f"{src}: a diffusers {info.base_model} pipeline ({info.pipeline_class or 'no class name'}); converting")

    from conceptlib.kerascv import set_default_backend

    set_default_backend()
    # keras-cv prints its license notice on stdout; stdout carries only the folder.
    with contextlib.redirect_stdout(sys.stderr):
        folder = convert_pipeline(src, directory, variant=variant, overwrite=overwrite, report=report, info=info)
    also = " and --base-model sd-2 (generate: --model sd-2)" if info.base_model == "sd-2" else ""
    report(f"done: use it with --weights {folder} (or CONCEPTLIB_WEIGHTS={folder}){also}")
    click.echo(str(folder))
