"""`conceptlib train`, `conceptlib runs`, `conceptlib plugins`, `conceptlib templates` (issue 4).

`train` picks the trainer plugin first and sets KERAS_BACKEND from it before anything imports
keras; every check (images, name/token, vocabulary, init words, template pack, weights) runs
before any model is built.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import click

from conceptlib.cli import confirm, main
from conceptlib.cli.describe_options import describe_options, described
from conceptlib.errors import UsageError


@main.command()
@click.argument("images", required=False, type=click.Path(file_okay=True, dir_okay=True, path_type=str))
@click.option("--name", "-n", help="Library name (a slug); default: from the token. (In `generate`, -n is --num-images.)")
@click.option("--token", "-t", help="The word prompts will use, e.g. '<cat-doll>'; default: '<NAME>'.")
@click.option("--init", "-i", "init", multiple=True, metavar="WORD[S]",
              help="Start from these words' embeddings, spread over the vectors (e.g. 'cat' or 'toy cat'); "
              "may be repeated. Default: random vectors.")
@click.option("--init-from", metavar="CONCEPT",
              help="Start from an existing concept's vectors instead: a library name or token, or a concept file "
              "in any format `import` reads (to train a concept further, or refine a downloaded one).")
@click.option("--weights", "-w", type=click.Path(file_okay=False, path_type=str), metavar="DIR|random",
              help="Folder with keras-cv weight files (else $CONCEPTLIB_WEIGHTS, the Keras cache, or download); "
              "'random' = random weights in memory, for smoke runs only.")
@click.option("--base-model", "--model", "base_model", type=click.Choice(["sd-1", "sd-2"]),
              help="Stable Diffusion 1.x or 2.x.  [default: sd-1, or the --init-from concept's]")
@click.option("--trainer", default="auto", show_default=True,
              help="Trainer plugin (see `conceptlib plugins`); auto = jax where there is an NVIDIA GPU and JAX's "
              "CUDA build is installed (pip install -U \"jax[cuda12]\"), else tensorflow.")
@click.option("--template", default="object", show_default=True, metavar="PACK|FILE",
              help="Template pack (see `conceptlib templates list`), or a text file of templates, one per line, "
              "with [name]/{token} and [filewords]/{caption} (AUTOMATIC1111's template files work as they are).")
@click.option("--resolution", "-r", type=int, default=512, show_default=True, help="Training size in pixels (multiple of 64).")
@click.option("--steps", "-s", type=int, default=1000, show_default=True, help="Training steps.")
@click.option("--batch-size", "-b", type=int, default=1, show_default=True,
              help="Images per step. jax: split over the GPUs (see --devices); $CONCEPTLIB_JAX_BATCH_SIZE overrides it.")
@click.option("--grad-accum", "--gradient-accumulation-steps", "grad_accum", type=int, default=1, show_default=True,
              help="Batches whose gradients are averaged into each update: the update of --batch-size x N images "
              "in the memory of --batch-size.")
@click.option("--num-vectors", type=int,
              help="Embedding vectors the token stands for.  [default: 1, or as many as the --init-from concept has]")
@click.option("--lr", "learning_rate", default="5e-3", show_default=True, metavar="RATE|RATE:STEP,...",
              help="Peak learning rate; or stepped rates as in AUTOMATIC1111, e.g. '0.05:10, 0.005:200, 0.001' "
              "(each rate until that step, the last to the end).")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]),
              help="Cosine decay to 0 over the run, or a constant learning rate.  [default: cosine; stepped for a "
              "stepped --lr]")
@click.option("--warmup-steps", type=int, default=0, show_default=True,
              help="Steps rising linearly from 0 to --lr before the cosine decay (cosine schedule only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same data and noise, same vectors (on CPU).")
@click.option("--no-flip", is_flag=True, help="Do not flip images horizontally (e.g. for text or asymmetric logos).")
@click.option("--checkpoint-every", type=int, default=100, show_default=True, help="Steps between checkpoints (0: none; an interrupted run then restarts from step 0).")
@click.option("--preview-every", type=int, default=0, show_default=True,
              help="Steps between preview grids written to the run folder (0: none).")
@click.option("--preview-steps", type=int, default=10, show_default=True, help="Denoising steps per preview.")
@click.option("--preview-prompt", metavar="TEXT",
              help="The previews' prompt, holding the token (e.g. 'a watercolor painting of <cat-doll>'); "
              "default: the template pack's first template.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=str), help="Run folder (default: in the library's runs/).")
@click.option("--resume", type=click.Path(file_okay=False, path_type=str), metavar="RUN",
              help="Continue an interrupted run (its folder, or its name in `conceptlib runs`) from its last "
              "checkpoint, with the settings it started with: only --devices and -q may be given with it.")
@click.option("--devices", metavar="all|N",
              help="jax trainer only: train data-parallel on all local GPUs (the default; fewer if the batch size "
              "does not split over them) or the first N (N must divide the batch size).")
@click.option("--quiet", "-q", is_flag=True, help="No progress or stage output.")
@describe_options
def train(images, name, token, init, init_from, weights, base_model, trainer, template, resolution, steps, batch_size,
          grad_accum, num_vectors, learning_rate, lr_schedule, warmup_steps, seed, no_flip, checkpoint_every,
          preview_every, preview_steps, preview_prompt, run_dir, resume, devices, quiet, **description):
    """Learn a new token from the pictures in IMAGES and add it to the library.

    Example: conceptlib train photos/ --name cat-doll --token '<cat-doll>' --init 'toy cat'

    --title, --description, --author, ... describe the concept for sharing, as `conceptlib
    describe` does afterwards (kohya's --metadata_* options).
    """
    from conceptlib.training import train as run_training
    from conceptlib.training import training_config

    if resume is None:
        if not images:
            raise UsageError("missing IMAGES: give the folder holding the training pictures (or --resume RUN)")
        if name is None and token is None:
            raise UsageError("give --name and/or --token, e.g. --name cat-doll --token '<cat-doll>'")
        name, token = _name_and_token(name, token)
        if preview_prompt is not None and not preview_every:
            raise UsageError("--preview-prompt needs previews: add --preview-every N")
        config = training_config(
            images, name=name, token=token, base_model=base_model, weights=weights,
            trainer=trainer, template=template, init=init, init_from=init_from, num_vectors=num_vectors,
            resolution=resolution, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
            learning_rate=learning_rate, lr_schedule=lr_schedule, warmup_steps=warmup_steps, seed=seed, flip=not no_flip,
            checkpoint_every=checkpoint_every, preview_every=preview_every, preview_steps=preview_steps,
            preview_prompt=preview_prompt, run_dir=run_dir,
            describe={key: value for key, value in described(description).items() if value is not None},
        )
    else:
        _refuse_settings_with_resume(click.get_current_context(), resume)
        config = None
    if devices is not None:
        settings = config if config is not None else _resumed_settings(resume)
        _use_devices(devices, settings.trainer, settings.batch_size, resumed=config is None)
    try:
        header, job = run_training(config, resume=resume, progress=not quiet, announce=True)
    except KeyboardInterrupt:
        sys.exit(130)  # training.train has said how to resume
    click.echo(f"Added {header.name} ({header.token}) to the library: {header.path}")
    if not quiet:
        _say_what_next(job, header)


def _say_what_next(job, header) -> None:
    """Where the run's files are and what to do with the concept (stderr: stdout stays the
    result line for scripts)."""
    import shlex

    from conceptlib.training import RANDOM_WEIGHTS

    run = job.run_dir
    previews = len(list(run.previews.glob("step-*.png"))) if run.previews.is_dir() else 0
    shown = f"{previews} preview(s) in {run.previews}; " if previews else ""
    click.echo(f"Run folder {run.path}: {shown}`conceptlib runs {run.path.name}` lists its checkpoints, to add an "
               "earlier step instead if the last one overfits", err=True)
    share = f"conceptlib export {header.name} --format a1111 --out DIR (or diffusers, kohya, ...)"
    weights = job.config.weights
    if weights == RANDOM_WEIGHTS:  # in memory only: nothing to generate with
        click.echo(f"Share it: {share}", err=True)
        return
    where = f" --weights {shlex.quote(weights)}" if weights else ""
    model = f" --model {job.config.base_model}" if job.config.base_model != "sd-1" else ""
    prompt = shlex.quote(f"a photo of {header.token}")
    click.echo(f"Try it: conceptlib generate {prompt}{where}{model}; share it: {share}", err=True)


# What --resume may be given besides the run: how it runs, not what it trains.
_RESUME_OPTIONS = ("resume", "devices", "quiet")


def _refuse_settings_with_resume(ctx, resume: str) -> None:
    """A resumed run trains with the settings it started with (so it ends with the same vectors
    as an uninterrupted run); IMAGES or a setting given with --resume would be silently ignored,
    so it is a usage error instead."""
    from click.core import ParameterSource

    given = [
        param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
        for param in ctx.command.params
        if param.name not in _RESUME_OPTIONS and ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE
    ]
    if given:
        raise UsageError(
            f"--resume {resume} continues the run with the settings it started with; {', '.join(given)} "
            f"cannot change them: drop {'it' if len(given) == 1 else 'them'}, or start a new run"
        )


def _name_and_token(name: str | None, token: str | None) -> tuple[str, str]:
    """--name and --token, each defaulting to one made from the other; an invalid value is a
    usage error that names the option it came from (also when it was made from the other)."""
    from conceptlib.concept import slug_from_token, validate_name, validate_token
    from conceptlib.errors import ConceptError

    checks = []
    if name is not None:
        checks.append((validate_name, name, "--name"))
    if token is not None:
        checks.append((validate_token, token, "--token"))
    else:
        token = f"<{name}>"
        checks.append((validate_token, token, "--token (not given, so made from --name)"))
    name = name if name is not None else slug_from_token(token)
    for validate, value, label in checks:
        try:
            validate(value)
        except ConceptError as exc:
            raise UsageError(f"{label}: {exc}") from None
    return name, token


def _resumed_settings(resume: str):
    """The settings of run ``resume`` (its trainer and batch size decide --devices)."""
    from conceptlib.library import ConceptLibrary
    from conceptlib.runs import find_run

    return find_run(resume, ConceptLibrary()).read_config()


def _use_devices(devices: str, trainer: str, batch_size: int, *, resumed: bool = False) -> None:
    if trainer != "jax":
        fix = (f"this run trains with {trainer}, which keeps to one device: drop --devices" if resumed
               else "add --trainer jax")
        raise UsageError(f"--devices {devices}: only the jax trainer spreads over devices; {fix}")
    if devices != "all" and not (devices.isascii() and devices.isdigit() and int(devices) > 0):
        raise UsageError(f"--devices {devices!r}: use 'all' or a positive number of devices, e.g. --devices 2")
    override = os.environ.get("CONCEPTLIB_JAX_BATCH_SIZE", "").strip()
    source = "--batch-size"
    if override.isascii() and override.isdigit() and int(override) > 0:  # the jax trainer's override of --batch-size
        batch_size, source = int(override), "$CONCEPTLIB_JAX_BATCH_SIZE"
    if devices != "all" and batch_size % int(devices):
        raise UsageError(
            f"--devices {devices}: the batch of {batch_size} does not split over {devices} devices; "
            f"use a {source} that is a multiple of {devices}"
        )
    os.environ["CONCEPTLIB_JAX_DEVICES"] = devices  # read by the jax trainer when it starts


@main.command()
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--remove", is_flag=True, help="Delete run RUN's folder (its checkpoints and previews; the "
              "concept it added to the library stays).")
@click.option("-y", "--yes", is_flag=True, help="With --remove: don't ask for confirmation.")
def runs(run, as_json, remove, yes):
    """List the training runs in the library's runs folder, oldest first: finished, or where an
    interrupted one stopped and how to resume it (runs given --run-dir elsewhere are not listed).

    With RUN (a run folder, or its name in the list): that run's checkpoints and previews, step
    by step with the mean loss since the step before, to pick one to import as a concept.
    `conceptlib runs RUN --remove` deletes it.
    """
    from conceptlib.library import ConceptLibrary
    from conceptlib.runs import run_summaries

    library = ConceptLibrary()
    if remove:
        if run is None or as_json:
            raise UsageError("--remove takes one RUN (a name from `conceptlib runs`) and no --json")
        _remove_run(library, run, yes)
        return
    if run is not None:
        _show_run(library, run, as_json)
        return
    summaries = run_summaries(library)
    if as_json:
        click.echo(json.dumps(_json_safe(summaries), indent=2, allow_nan=False))
        return
    if not summaries:
        click.echo(f"No training runs in {library.runs_dir}")
        return
    for summary in summaries:
        click.echo(_run_line(summary))


def _remove_run(library, name: str, yes: bool) -> None:
    from conceptlib.runs import remove_run, removable_run, run_summary

    run = removable_run(name, library)
    line = _run_line(run_summary(run))
    if not yes:
        confirm(f"Remove run {line}?", refused=f"run {run.path.name} not removed")
    remove_run(run)
    click.echo(f"Removed run {run.path.name}")


def _show_run(library, name: str, as_json: bool) -> None:
    from conceptlib.errors import TrainingError
    from conceptlib.runs import listed_run, run_steps, run_summary

    run = listed_run(name, library)
    summary = run_summary(run)
    if summary["status"] == "unreadable":
        raise TrainingError(summary["error"])
    problems: list[str] = []
    steps = run_steps(run, problems)
    for problem in problems:
        click.echo(f"Warning: {problem}", err=True)
    config = run.read()["config"]
    if as_json:
        # A diverged run's mean loss is NaN, which JSON cannot hold: null, as `show --json` does for norms.
        click.echo(json.dumps(_json_safe(dict(summary, config=config, steps=steps)), indent=2, allow_nan=False))
        return
    in_runs_folder = run.path.resolve().parent == Path(library.runs_dir).resolve()
    click.echo(_run_line(summary, None if in_runs_folder else str(run.path)))
    click.echo(_settings_line(config))
    for entry in steps:
        loss = f"loss {entry['loss']:.4f}" if entry["loss"] is not None else "loss ?"
        files = [os.path.relpath(entry[key], run.path) for key in ("checkpoint", "concept", "preview") if entry[key]]
        click.echo(f"  step {entry['step']:>6}  {loss}  " + "  ".join(files))
    checkpoints = [entry["checkpoint"] for entry in steps if entry["checkpoint"]]
    if checkpoints:
        click.echo(f"Import a step as a concept: conceptlib import {checkpoints[-1]}")


def _json_safe(value):
    """``value`` with NaN/Infinity (which a hand-edited config.json may hold) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _settings_line(config: dict) -> str:
    """What a run trains with, to compare runs: base model, steps, batch, learning rate, size,
    vectors, template and seed (from its config.json)."""
    from conceptlib.training import format_learning_rate

    batch = f"batch {config.get('batch_size', 1)}"
    if config.get("grad_accum", 1) > 1:
        batch += f" x {config['grad_accum']} accumulated"
    if config.get("lr_steps"):
        rate = f"lr {format_learning_rate(config['lr_steps'])}"
    else:
        rate = f"lr {config.get('learning_rate', 0):g} {config.get('lr_schedule', 'cosine')}"
        if config.get("warmup_steps"):
            rate += f" (warmup {config['warmup_steps']})"
    template = str(config.get("template", ""))
    parts = [config.get("base_model") or "sd-1", f"{config.get('steps')} steps", batch, rate, f"{config.get('resolution')} px",
             f"{config.get('num_vectors') or 1} vector(s)", f"template {Path(template).name}", f"seed {config.get('seed', 0)}"]
    return "  settings: " + ", ".join(parts)


def _run_line(run: dict, resume_as: str | None = None) -> str:
    """One run's line; ``resume_as``: how `--resume` names it (default: its name in the runs folder)."""
    if run["status"] == "unreadable":
        return f"{run['run']}  unreadable: {run['error']}"
    what = f"{run['run']}  {run['name']} ({run['token']}), {run['trainer']}, started {run['started']}"
    previews = f", {run['previews']} preview(s)" if run["previews"] else ""
    if run["status"] == "finished":
        return f"{what}: finished, {run['steps']} steps{previews}"
    if run["status"] == "running":
        checkpoint = f"step {run['step']}/{run['steps']}" if run["step"] else "none yet"
        return f"{what}: training now (last checkpoint: {checkpoint}){previews}"
    resume = f"conceptlib train --resume {resume_as or run['run']}"
    if run["status"] == "stopped":
        return f"{what}: stopped at step {run['step']}/{run['steps']}{previews}; continue with {resume}"
    return f"{what}: stopped before its first checkpoint; {resume} starts it over"


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List installed trainer and template-pack plugins (and which trainer `--trainer auto` picks
    here, and why), and any that failed to load."""
    from conceptlib.plugins import TRAINERS, auto_trainer_reason, discover

    registry = discover()
    auto, why = auto_trainer_reason()
    if as_json:
        payload = {
            "trainers": {
                name: {"backend": cls.backend, "version": str(getattr(cls, "version", "?"))}
                for name, cls in registry.trainers.items()
            },
            "auto_trainer": {"trainer": auto, "why": why},
            "template_packs": sorted(registry.template_packs),
            "entry_points": [info.__dict__ for info in registry.infos],
        }
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo("Trainers:")
    for info in [i for i in registry.infos if i.group == TRAINERS]:
        if info.ok:
            cls = registry.trainers[info.name]
            click.echo(f"  {info.name:<14} backend={cls.backend:<11} {info.distribution} {info.version}")
    click.echo(f"  --trainer auto picks {auto}: {why}")
    click.echo("Template packs:")
    for pack in registry.template_packs.values():
        click.echo(f"  {pack.name:<14} {len(pack.templates):>3} templates  ({pack.source})")
    if registry.broken:
        click.echo("Failed to load:")
        for info in registry.broken:
            click.echo(f"  {info.group} {info.name} = {info.value} ({info.distribution} {info.version}): {info.error}")


@main.group(invoke_without_command=True)
@click.pass_context
def templates(ctx):
    """Template packs: the prompts a concept is trained with (alone: `templates list`)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(templates_list)


@templates.command("list")
def templates_list():
    """List the template packs (and template-pack plugins that failed to load)."""
    from conceptlib.plugins import TEMPLATE_PACKS, discover

    registry = discover()
    for pack in registry.template_packs.values():
        click.echo(f"{pack.name:<12} {len(pack.templates):>3}  {pack.description}")
    for info in registry.broken:
        if info.group == TEMPLATE_PACKS:
            click.echo(f"failed to load: {info.distribution}:{info.name} ({info.error}); see `conceptlib plugins`")


@templates.command("show")
@click.argument("name", metavar="NAME|FILE")
@click.option("--json", "as_json", is_flag=True, help="Print the pack as one JSON object.")
def templates_show(name, as_json):
    """Print the templates of pack NAME, or how template file FILE is read."""
    from conceptlib.plugins import get_template_pack

    pack = get_template_pack(name)
    if as_json:
        click.echo(json.dumps(pack.to_dict(), indent=2))
        return
    click.echo(f"# {pack.name}: {pack.description} ({pack.source})")
    for template in pack.templates:
        click.echo(template)
    if not pack.caption_templates:
        click.echo("# captions are not used by this pack")
        return
    click.echo("# for images with a caption:")
    for template in pack.caption_templates:
        click.echo(template)
