"""The ``jax`` trainer: conceptlib's textual inversion on the Keras 3 JAX backend.

Same algorithm and options as the TensorFlow trainer (the loss is
``conceptlib.kerascv.textual_inversion``'s, the optimizer its ``make_optimizer``); what differs is
how the work is laid out for a GPU (see ``conceptlib_jax.step``):

- bf16 compute with fp32 vectors and fp32 optimizer state (``precision="bf16"``, the default on
  GPU; ``"fp32"`` everywhere else and for the equivalence tests);
- the UNet's attention through ``keras.ops.dot_product_attention`` (conceptlib.kerascv.attention),
  cuDNN flash for self-attention on GPU;
- the VAE runs once per augmented image variant before training, not in the step: each image
  gets ``variants`` random crops (80-100 % of the area, as the reference), each cached flipped and
  unflipped when flipping is on, and a step draws from them. This is the one deliberate
  difference from the TensorFlow trainer, which draws a fresh crop every step;
- data parallel over several devices (``devices``) through keras.distribution.DataParallel;
- a cache of the exported step (``conceptlib_jax.exported``): the first run of a configuration
  (on one device or several) with weight files traces the step on keras-cv's models and exports
  it next to the compilation cache; later runs read the weights straight from the files and
  never build (or import) keras-cv's models, unless they render previews: then the models are
  built in a background thread once the first step runs. The new vectors are padded to a power
  of two of rows (``vector_rows``), so 3 and 4 vectors share a step;
- previews: once the first step runs, a background thread compiles the preview sampler for the
  run's preview shapes (``ready_for_previews``); each preview then renders in another background
  thread (``SerialWorker``) from a copy of that step's vectors, so training never waits for one.

Options come from the constructor or, for ``conceptlib train --trainer jax``, from environment
variables: CONCEPTLIB_JAX_PRECISION (bf16|fp32|auto), CONCEPTLIB_JAX_FLASH (on|off|auto),
CONCEPTLIB_JAX_DEVICES (all|N), CONCEPTLIB_JAX_BATCH_SIZE (auto|N: overrides --batch-size),
CONCEPTLIB_JAX_VARIANTS (crops per image), CONCEPTLIB_JAX_CACHE (a folder for JAX's persistent
compilation cache, or "off"), CONCEPTLIB_JAX_KERNELS (comma-separated UNet rewrites, each the same
function as keras-cv's on the same weights: ``conv`` explicit-padding convolutions, ``groupnorm``
float32-stat group norm without reshapes, ``qkv`` fused q/k/v projections, ``crosspad``
cross-attention padded to 128 keys for cuDNN; ``none`` for keras-cv's own layers; default
DEFAULT_KERNELS), CONCEPTLIB_JAX_VAE_CHUNK (images per VAE call when caching latents),
CONCEPTLIB_JAX_BACKGROUND_COMPILE (on|off: compile the step while the VAE encodes the images),
CONCEPTLIB_JAX_EXPORT (on|off: the step cache; it needs the compilation cache and weight files),
CONCEPTLIB_JAX_REPORT (a file to write the run's report to as JSON: settings, per-phase timings
and peak memory; for benchmarks).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from concurrent.futures import Future

from conceptlib_jax import __version__

# The models last built in this process, keyed by what they depend on; training never writes a
# model variable, so runs with the same settings (a notebook, benchmarks, tests) share one build,
# and other settings replace it (each set is GBs). One build at a time: a second caller waits for
# the first and reuses its models.
_MODELS: dict = {}
_BUILD_LOCK = threading.Lock()

# Memory per sample of the training step at 512 px, bf16, flash self-attention (GiB), and the
# extra for the materialised 4096 x 4096 attention scores without flash. From H100 runs of the
# KerasCV step (batch 32: 26 GiB, batch 64: 47 GiB with flash; without flash batch 32 ran out).
_GIB = 1 << 30
_PER_SAMPLE_512 = 0.70
_NO_FLASH_EXTRA_512 = 2.0
_MAX_AUTO_BATCH = 64
KERNELS = ("conv", "groupnorm", "qkv", "crosspad")
DEFAULT_KERNELS = ("conv", "groupnorm", "qkv", "crosspad")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CONCEPTLIB_JAX_{name}", default).strip().lower()


def _count(value, what: str, *, minimum: int = 1, auto: bool = False):
    """``value`` as a whole number >= ``minimum`` (or "auto" where allowed), else one TrainingError
    line naming ``what`` (the option or environment variable it came from)."""
    text = str(value).strip().lower()
    if auto and text == "auto":
        return "auto"
    if not (text.isascii() and text.isdigit() and int(text) >= minimum):
        from conceptlib.errors import TrainingError

        expected = f"a whole number of at least {minimum}" + (" or auto" if auto else "")
        raise TrainingError(f"{what}={value!r}: use {expected}")
    return int(text)


def on_gpu() -> bool:
    import jax

    return jax.devices()[0].platform == "gpu"


def resolve_devices(devices):
    """The jax devices to train on: ``"all"``/None = every local device, N = the first N."""
    import jax

    local = jax.local_devices()
    if devices in (None, "all", "auto"):
        return local
    count = int(devices)
    if not 1 <= count <= len(local):
        from conceptlib.errors import TrainingError

        raise TrainingError(f"--devices {count}: this machine has {len(local)} {local[0].platform} device(s); "
                            f"use --devices all or at most {len(local)}")
    return local[:count]


def devices_for_batch(devices, batch_size: int, requested) -> tuple[list, str | None]:
    """The devices a batch of ``batch_size`` splits over, and a note for the user when that is
    fewer than ``devices``. With ``requested`` "all" (the default) a batch that does not split
    uses as many devices as divide it; an explicit count that does not divide it is an error."""
    if batch_size % len(devices) == 0:
        return list(devices), None
    if requested not in (None, "all", "auto"):
        from conceptlib.errors import TrainingError

        raise TrainingError(
            f"--batch-size {batch_size} does not split over {len(devices)} devices; use a multiple of {len(devices)}"
        )
    usable = max(n for n in range(1, len(devices) + 1) if batch_size % n == 0)
    return list(devices[:usable]), (
        f"batch {batch_size} does not split over {len(devices)} devices: training on {usable} "
        f"(a --batch-size that is a multiple of {len(devices)} uses them all)"
    )


def auto_batch_size(resolution: int, precision: str, flash: bool, devices) -> int:
    """The batch size that fits the free memory of the devices (a multiple of the device count),
    or 1 where the backend reports no memory (CPU)."""
    stats = devices[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit:
        return 1 * len(devices)
    free = (limit - stats.get("bytes_in_use", 0)) * 0.85
    scale = (resolution / 512) ** 2
    per_sample = _PER_SAMPLE_512 * scale * (2 if precision == "fp32" else 1)
    if not flash:
        per_sample += _NO_FLASH_EXTRA_512 * scale * scale
    per_device = int(free // (per_sample * _GIB))
    per_device = max(1, min(_MAX_AUTO_BATCH, per_device))
    if per_device >= 8:
        per_device -= per_device % 8
    return per_device * len(devices)


def parse_kernels(value) -> tuple:
    """``"conv,qkv"`` / ``["conv"]`` / ``"none"`` / ``"default"`` -> a tuple of KERNELS names."""
    if value is None or value == "default":
        return DEFAULT_KERNELS
    if isinstance(value, str):
        value = [] if value.strip().lower() in ("", "none", "off") else value.split(",")
    names = tuple(v.strip().lower() for v in value if v.strip())
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        from conceptlib.errors import TrainingError

        raise TrainingError(f"jax trainer kernels {','.join(unknown)!r}: use some of {','.join(KERNELS)} or none")
    return names


def peak_memory_gib():
    """The first device's peak memory so far (GiB), or None where the backend reports none."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return round(peak / _GIB, 3) if peak is not None else None


def build_models(base_model, resolution, weights, *, precision="fp32", decoder=False, distribution=None,
                 cache=True):
    """A FastTextualInversion over keras-cv's models, the text encoder and UNet in the compute
    dtype (``bfloat16`` variables for bf16: the frozen weights are only ever read in bf16), the
    VAE in float32. Built once per process for the same arguments (``cache=False``: new models
    of the caller's own, neither taken from nor kept in the cache)."""
    with _BUILD_LOCK:
        return _build_models(base_model, resolution, weights, precision=precision, decoder=decoder,
                             distribution=distribution, cache=cache)


def _build_models(base_model, resolution, weights, *, precision, decoder, distribution, cache):
    import contextlib

    import keras

    from conceptlib.kerascv import models
    from conceptlib_jax.step import fast_textual_inversion_class

    key = (base_model, resolution, precision, tuple(sorted((k, str(v)) for k, v in (weights or {}).items())))
    cached = _MODELS.get(key) if cache else None
    if cached is not None and (cached.decoder is not None or not decoder):
        return cached
    scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
    with scope:
        if cached is None:
            if cache:
                _MODELS.clear()  # before building: never two sets at once
            policy = keras.config.dtype_policy()
            keras.config.set_dtype_policy("bfloat16" if precision == "bf16" else "float32")
            try:
                text_encoder = models.build_text_encoder(base_model, weights)
                diffusion_model = models.build_diffusion_model(base_model, resolution, weights)
            finally:
                keras.config.set_dtype_policy(policy)
            image_encoder = models.build_image_encoder(resolution, weights)
        else:
            text_encoder, diffusion_model = cached.text_encoder, cached.diffusion_model
            image_encoder = cached.image_encoder
        dec = models.build_decoder(base_model, resolution, weights) if decoder else None
    ti = fast_textual_inversion_class()(text_encoder, diffusion_model, image_encoder, dec)
    ti.image_encoder = image_encoder
    if cache:
        _MODELS[key] = ti
    return ti


# XLA flags the trainer adds unless XLA_FLAGS already sets them (benchmarks/RESULTS.md, one H100):
# - Triton GEMM autotuning made the first compile of the 512 px step 11-34 s longer, for no
#   faster step (cuBLAS: 161.6 vs 162.3 ms at batch 32);
# - LLVM and ptxas on up to 16 threads (XLA's default is one) cut that compile from 47.6-52.5 s
#   to 44.0-44.7 s, with the same step time.
DEFAULT_XLA_FLAGS = (
    "--xla_gpu_enable_triton_gemm=false",
    f"--xla_gpu_force_compilation_parallelism={min(os.cpu_count() or 1, 16)}",
)


def apply_default_xla_flags() -> str:
    """Add DEFAULT_XLA_FLAGS to $XLA_FLAGS (a flag the user set wins). Takes effect only if no jax
    backend has started in this process yet (the CLI starts none before the trainer runs)."""
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in DEFAULT_XLA_FLAGS:
        if flag.split("=")[0] not in flags:
            flags = f"{flags} {flag}".strip()
    os.environ["XLA_FLAGS"] = flags
    return flags


class JaxTrainer:
    """The ``jax`` trainer (conceptlib.training.Trainer)."""

    name = "jax"
    version = __version__
    backend = "jax"

    def __init__(
        self,
        *,
        precision: str | None = None,
        flash: str | bool | None = None,
        devices=None,
        batch_size: int | str | None = None,
        variants: int | None = None,
        steps_per_call: int = 1,
        compilation_cache: str | None = None,
        kernels=None,
        vae_chunk: int | None = None,
        background_compile: bool | None = None,
        export: bool | None = None,
    ):
        # Checked here, before a run folder exists: a bad value is one line, not a traceback after
        # the models were built.
        self.precision = precision or _env("PRECISION", "auto")
        self.flash = flash if flash is not None else _env("FLASH", "auto")
        self.devices = devices if devices is not None else _env("DEVICES", "all")
        if self.devices not in ("all", "auto"):
            self.devices = _count(self.devices, "--devices (CONCEPTLIB_JAX_DEVICES)")
            resolve_devices(self.devices)  # more devices than the machine has
        self.batch_size = batch_size if batch_size is not None else (_env("BATCH_SIZE", "") or None)
        if self.batch_size is not None:
            self.batch_size = _count(self.batch_size, "CONCEPTLIB_JAX_BATCH_SIZE", auto=True)
        self.variants = _count(variants if variants is not None else _env("VARIANTS", "8"), "CONCEPTLIB_JAX_VARIANTS")
        self._variants_asked = variants is not None or "CONCEPTLIB_JAX_VARIANTS" in os.environ
        self.steps_per_call = int(steps_per_call)
        if export is None:
            export = _env("EXPORT", "on") in ("on", "1", "true")
        self.export = bool(export)
        self.compilation_cache = compilation_cache
        self.kernels = parse_kernels(kernels if kernels is not None else os.environ.get("CONCEPTLIB_JAX_KERNELS"))
        self.vae_chunk = _count(vae_chunk if vae_chunk is not None else _env("VAE_CHUNK", "0"), "CONCEPTLIB_JAX_VAE_CHUNK",
                                minimum=0) or None
        if background_compile is None:
            background_compile = _env("BACKGROUND_COMPILE", "on") in ("on", "1", "true")
        self.background_compile = bool(background_compile)
        self.report: dict = {}  # what ran: precision, flash, devices, batch, timings (for benchmarks)

    # --- settings -----------------------------------------------------------------------------

    def _settings(self):
        gpu = on_gpu()
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if gpu else "fp32"
        if precision not in ("bf16", "fp32"):
            from conceptlib.errors import TrainingError

            raise TrainingError(f"jax trainer precision {precision!r}: use bf16, fp32 or auto")
        flash = self.flash
        if isinstance(flash, str):
            flash = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}.get(flash, gpu)
        return precision, bool(flash) and gpu, gpu

    # --- data ---------------------------------------------------------------------------------

    def host_data(self, job):
        """The host side of the training data: every image's crops (``variants`` of them, plus
        their mirror images when flipping) as float32 (N, R, R, 3), which image each crop is, and
        the prompt table and each image's template count. A pure function of the seed. The last
        three are padded to ``bucket`` sizes (the crops are not: the VAE encodes only real ones)."""
        import numpy as np

        from conceptlib.images import augment, load_rgb
        from conceptlib_jax.step import bucket

        config = job.config
        crops, image_of = [], []
        for index, image in enumerate(job.images):
            array = load_rgb(image.path, config.resolution)
            rng = np.random.default_rng([config.seed, 4, index])
            for _ in range(self.variants):
                crop = augment(array, config.resolution, rng, flip=False)
                crops.append(crop)
                image_of.append(index)
                if config.flip:
                    crops.append(np.ascontiguousarray(crop[:, ::-1, :]))
                    image_of.append(index)
        pack = job.pack
        prompt_lists = []
        for image in job.images:
            prompt_lists.append(
                [job.prompt_ids(pack.render(j, config.token, image.caption)) for j in range(pack.count(image.caption))]
            )
        width = bucket(max(len(p) for p in prompt_lists))
        counts = [len(p) for p in prompt_lists]
        prompt_lists += [prompt_lists[-1]] * (bucket(len(prompt_lists)) - len(prompt_lists))
        counts += [counts[-1]] * (len(prompt_lists) - len(counts))
        prompts = np.asarray([p + [p[-1]] * (width - len(p)) for p in prompt_lists], dtype=np.int32)
        image_of += [0] * (bucket(len(image_of)) - len(image_of))  # rows never drawn
        return (np.stack(crops).astype(np.float32), np.asarray(image_of, np.int32), prompts,
                np.asarray(counts, np.int32))

    def data_shapes(self, host, resolution: int) -> dict:
        """``DeviceData.tree()`` as jax.ShapeDtypeStructs (to compile the step before the VAE ran)."""
        import jax
        import jax.numpy as jnp

        from conceptlib_jax.step import schedule_arguments

        crops, image_of, prompts, counts = host
        side = resolution // 8
        latent = jax.ShapeDtypeStruct((len(image_of), side, side, 4), jnp.float32)
        schedule = {name: jax.ShapeDtypeStruct(value.shape, jnp.float32)
                    for name, value in schedule_arguments(1.0, 1).items()}
        return {
            "mean": latent, "std": latent,
            "image_of": jax.ShapeDtypeStruct(image_of.shape, jnp.int32),
            "variant_count": jax.ShapeDtypeStruct((), jnp.int32),
            "prompts": jax.ShapeDtypeStruct(prompts.shape, jnp.int32),
            "prompt_count": jax.ShapeDtypeStruct(counts.shape, jnp.int32),
            "schedule": schedule,
        }

    def latent_data(self, job, moments, vae_state, *, host=None):
        """Each crop of ``host_data`` through the VAE posterior once (``moments(vae_state,
        images) -> (mean, std)``, a fixed number of images per call): a DeviceData of the
        posterior (mean, std) of every variant (zero rows up to the padded count), the prompt
        table and the schedule's numbers."""
        import jax.numpy as jnp
        import numpy as np

        from conceptlib_jax.step import DeviceData, schedule_arguments

        crops, image_of, prompts, counts = host if host is not None else self.host_data(job)
        chunk = self._vae_chunk(job.config.resolution, len(crops))
        means, stds = [], []
        for start in range(0, len(crops), chunk):
            part = crops[start : start + chunk]
            if len(part) < chunk:  # one compiled shape
                part = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
            mean, std = moments(vae_state, part)
            means.append(mean)
            stds.append(std)
        count, padding = len(crops), ((0, len(image_of) - len(crops)), (0, 0), (0, 0), (0, 0))
        mean = jnp.pad(jnp.concatenate(means)[:count], padding)
        std = jnp.pad(jnp.concatenate(stds)[:count], padding)
        config = job.config
        return DeviceData(
            mean, std, jnp.asarray(image_of), jnp.int32(count), jnp.asarray(prompts), jnp.asarray(counts),
            schedule_arguments(config.learning_rate, config.steps, config.warmup_steps, config.lr_steps),
        )

    # --- run ----------------------------------------------------------------------------------

    def _step_cache(self, job, cache_dir):
        """The StepCache to use, or None: it needs weight files, one step per call and a
        compilation cache folder (CONCEPTLIB_JAX_EXPORT=off turns it off)."""
        from conceptlib_jax.exported import StepCache

        if not self.export or not cache_dir or job.weights is None or self.steps_per_call != 1:
            return None
        return StepCache(os.path.join(cache_dir, "conceptlib-steps"))

    def _cache_settings(self, job, precision, flash, host, devices: int) -> dict:
        """What the exported functions depend on besides code, versions and device. Not the
        learning rate, step count, warmup or the number of images: those are step arguments;
        nor the exact number of vectors: the rows are padded (``vector_rows``)."""
        config = job.config
        crops, image_of, prompts, counts = host
        return {
            "base_model": config.base_model, "resolution": config.resolution, "precision": precision,
            "flash": flash, "kernels": list(self.kernels), "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "vector_rows": vector_rows(config.num_vectors), "vae_chunk": self._vae_chunk(config.resolution, len(crops)),
            "variant_rows": len(image_of), "prompt_table": list(prompts.shape),
            "optimizer": [config.lr_schedule, config.weight_decay, config.clip_norm], "devices": devices,
        }

    def _vae_chunk(self, resolution: int, count: int) -> int:
        # Small VAE calls: at 512 px one image's encoder activations are GBs in float32, and
        # training at batch 1 must fit in 8 GiB. Bounded by the padded count, not the count, so
        # the VAE function's shape too stays the same for any number of images.
        from conceptlib_jax.step import bucket

        chunk = self.vae_chunk or max(1, (256 * 256 * 4) // (resolution * resolution))
        return min(chunk, bucket(count))

    def run(self, job):
        import jax
        import numpy as np

        from conceptlib.errors import TrainingError, WeightsError
        from conceptlib.kerascv import enable_jax_compilation_cache, ignore_one_pixel_attention_warning
        from conceptlib.plugins import has_nvidia_gpu
        from conceptlib.training import TrainingResult
        from conceptlib_jax.exported import entry_key, read_weights

        timings = {"start": time.perf_counter()}
        config = job.config
        ignore_one_pixel_attention_warning()
        xla_flags = apply_default_xla_flags()
        cache_dir = enable_jax_compilation_cache(self.compilation_cache)
        precision, flash, gpu = self._settings()
        if not gpu and has_nvidia_gpu():
            job.stage(
                "WARNING: this machine has an NVIDIA GPU but JAX does not see it (a jaxlib without CUDA): "
                "training on the CPU, slowly; install JAX's CUDA support: pip install -U \"jax[cuda12]\""
            )
        devices, distribution, replicated = self._placement(job, precision, flash)
        host = self.host_data(job)
        step_cache = self._step_cache(job, cache_dir)
        key = entry_key(self._cache_settings(job, precision, flash, host, len(devices))) if step_cache else None
        entry = step_cache.load(key) if step_cache else None
        self.report = {
            "precision": precision, "flash": flash, "devices": len(devices),
            "device": str(devices[0].device_kind), "batch_size": config.batch_size, "grad_accum": config.grad_accum,
            "compilation_cache": cache_dir, "kernels": ",".join(self.kernels) or "none", "xla_flags": xla_flags,
            "step_cache": "off" if step_cache is None else ("hit" if entry is not None else "miss"),
        }

        models = {}

        def build(decoder=False, cache=True):
            return build_models(
                config.base_model, config.resolution, job.weights,
                precision=precision, decoder=decoder, distribution=distribution, cache=cache,
            )

        def build_for_previews():
            # A step-cache hit trained without models. The previews' own (uncached, so nothing else
            # ever sees them) get the rewrites a traced run's previews have: flash attention keeps
            # the 4096 x 4096 attention scores per head out of memory at 512 px.
            ti = build(decoder=True, cache=False)
            self.report["preview_patched_convs"] = len(self._install_rewrites(ti, flash, []).convs)
            return ti

        def get_models(decoder=False):
            building = models.pop("building", None)
            if building is not None:
                models["ti"] = building.result()
            if "ti" not in models or (decoder and models["ti"].decoder is None):
                models["ti"] = build(decoder)
            return models["ti"]

        where = f"{config.batch_size} x {config.resolution} px on {_devices_text(devices)}"
        if config.grad_accum > 1:
            where += f", {config.grad_accum} batches per update"
        early_compile = None
        if entry is not None:
            job.stage(f"reading the weights and compiling the cached training step for {where} ({step_cache.folder})")
            if self.background_compile:
                # The exported step's input shapes are known: compile it while the weights are read.
                early_compile = in_background(_compile_exported, entry.step, replicated, timings)
            try:
                state = jax.device_put(read_weights(entry.state_leaves, job.weights), replicated)
                # Replicated like the traced run's VAE variables (built in the distribution's
                # scope): the exported function expects its weights on every device.
                vae_state = jax.device_put(read_weights(entry.vae_leaves, job.weights), replicated)
                token_table = np.asarray(state[entry.token_leaf])
            except WeightsError as exc:
                # Files of another layout than the cached run's: build the models, whose own
                # loading reports a truly broken file, and export the step again.
                entry = early_compile = None  # (that compile finishes unused)
                self.report["step_cache"] = f"miss ({exc})"
        if entry is None:
            job.stage(f"building the {config.base_model} models")
            ti = get_models(decoder=job.wants_previews)
            token_table = ti.token_table()
        timings["models_built"] = time.perf_counter()
        peaks = {"models_built": peak_memory_gib()}
        if int(token_table.shape[0]) != job.vocab_size:
            raise TrainingError(
                f"the text encoder has {token_table.shape[0]} tokens but the tokenizer {job.vocab_size}; "
                "the weights do not belong to this base model"
            )

        num_vectors = config.num_vectors
        carry, optimizer, rate = self._initial_carry(job, token_table)
        base_key = jax.random.key(config.seed)
        shapes = self.data_shapes(host, config.resolution)
        if replicated is not None:
            shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), shapes)

        patches = []
        renderer = None  # the previews' worker thread, closed however the run ends
        try:
            step_for = None  # steps_per_call -> the traced step function (traced runs only)
            if entry is None:
                traced = self._trace(ti, optimizer, rate, job, flash, carry, base_key, replicated, patches)
                step_for, moments_fn, state, vae_state, carry, base_key = traced
                step_fn = step_for(self.steps_per_call)
                if step_cache is not None:
                    entry = self._export(ti, step_fn, moments_fn, carry, state, vae_state, shapes, base_key, host, job)
                    if entry is not None:
                        try:
                            step_cache.store(key, entry)
                            self.report["step_cache"] = "stored"
                        except OSError as exc:  # a full disk or a concurrent run: train anyway
                            self.report["step_cache"] = f"not stored: {exc}"
            elif replicated is not None:
                carry, base_key = jax.device_put((carry, base_key), replicated)
            if entry is not None:
                # Cold or warm, a cached configuration runs the deserialized functions.
                state = jax.tree.leaves(state)
                vae_state = jax.tree.leaves(vae_state)
                base_key = jax.random.key_data(base_key)
                step = jax.jit(entry.step.call, donate_argnums=(0,))
                moments = jax.jit(entry.moments.call)
            else:
                step = jax.jit(step_fn, donate_argnums=(0,))
                moments = jax.jit(moments_fn)

            def compile_step():
                return _timed_compile(step, (carry, state, shapes, base_key), timings)

            timings["step_ready"] = time.perf_counter()  # traced and exported, or read from the cache
            if self.report["step_cache"] != "hit":  # a hit said so when it read the weights
                job.stage(_compile_message(self.report["step_cache"], where, cache_dir))
            background = early_compile
            if self.background_compile and background is None:
                # XLA compiles (GIL released) while the VAE encodes the crops.
                background = in_background(compile_step)
            job.stage(f"encoding {len(job.images)} image(s) with the VAE")
            data = self.latent_data(job, moments, vae_state, host=host)
            del host
            data_tree = data.tree()
            if replicated is not None:
                data_tree = jax.device_put(data_tree, replicated)
            timings["latents_ready"] = time.perf_counter()
            peaks["latents_ready"] = peak_memory_gib()
            compiled = background.result() if background is not None else compile_step()
            timings["compiled"] = time.perf_counter()
            self.report.update({
                "latent_variants": int(data.mean.shape[0]), "step_memory_gib": _step_memory_gib(compiled),
                "background_compile": self.background_compile,
            })
            if patches:  # traced this run: what the attention rewrite did
                attention = patches[0]
                self.report.update({
                    "flash_layers": attention.flash_calls, "plain_attention_layers": attention.plain_calls,
                    "flash_refused": attention.flash_refused, "cross_pad_layers": attention.cross_pad_calls,
                })
            peaks["compiled"] = peak_memory_gib()

            def current():
                # Checkpoints hold the real rows only, as the TensorFlow trainer's do.
                rows_now, opt_now, _ = carry
                real = [np.asarray(v)[:num_vectors] if v.shape == rows_now.shape else np.asarray(v) for v in opt_now]
                return np.asarray(rows_now, np.float32)[:num_vectors], real

            job.checkpoint_fn = current

            renderer = SerialWorker()

            def render(rows, token_ids, noise, requested):
                images = get_models(decoder=True).sample(rows, token_ids, noise, num_steps=config.preview_steps)
                # From the request to the images (waiting for the warm-up included); training
                # went on meanwhile.
                self.report.setdefault("preview_seconds", []).append(round(time.perf_counter() - requested, 3))
                return images

            def preview(token_ids, noise):
                # A copy made now: the next step donates the carry (a slice of all the rows is the
                # carry's own buffer).
                rows = jax.numpy.array(carry[0][:num_vectors], copy=True)
                return renderer.submit(render, rows, token_ids, noise, time.perf_counter())

            if job.wants_previews:
                job.preview_fn = preview

            def due(done):
                every_c, every_p = config.checkpoint_every, config.preview_every
                return (every_c and done % every_c == 0) or (every_p and done % every_p == 0)

            # Report a step's loss only after the next step is queued (the device never waits
            # for the host), except where a checkpoint/preview must see that step's vectors.
            pending = None
            warming_previews = False
            index = job.start_step
            per_call = self.steps_per_call
            single = None
            while index < config.steps:
                run_now, fn = steps_this_call(index, config.steps, per_call, due), compiled
                if run_now != per_call:
                    if single is None:  # only traced runs call several steps at once
                        single = jax.jit(step_for(1), donate_argnums=(0,))
                    fn = single
                carry, losses = fn(carry, state, data_tree, base_key)
                if job.wants_previews and not warming_previews:
                    # Previews need the models (a step-cache hit has none) and a compiled sampler
                    # (~25-40 s on a GPU): get both on the host while the device trains, rather
                    # than pausing at the first preview. It renders a copy of the vectors, made
                    # before the next step donates the carry (a slice of all the rows would be the
                    # carry's own buffer).
                    warming_previews = True
                    self.report["preview_warmup"] = "sampler" if "ti" in models else "models and sampler"
                    models["building"] = in_background(
                        ready_for_previews, models.get("ti"), jax.numpy.array(carry[0][:num_vectors], copy=True), job,
                        build_for_previews,
                    )
                if pending is not None:
                    self._report(job, *pending)
                pending = (index, losses)
                index += run_now
                if index == job.start_step + run_now or due(index):
                    self._report(job, *pending)
                    pending = None
                    if "first_step" not in timings:
                        timings["first_step"] = time.perf_counter()
                        peaks["first_step"] = peak_memory_gib()
            if pending is not None:
                self._report(job, *pending)
            final_preview = job.final_preview(preview)
            if "ti" in models:
                self.report["sampler_traces"] = models["ti"].sampler_traces
        finally:
            for patch in patches:
                patch.restore()
            if renderer is not None:
                renderer.close()
        timings["done"] = time.perf_counter()
        peaks["done"] = peak_memory_gib()
        self._finish_report(job, timings, peaks)
        vectors = np.asarray(carry[0], dtype=np.float32)[:num_vectors]
        return TrainingResult(vectors, list(job.losses), final_preview)

    def _placement(self, job, precision: str, flash: bool):
        """``(devices, distribution, replicated)``: the devices to train on, once the batch size
        is settled (``job.config.batch_size``, chosen from free memory for "auto"); with several,
        keras' DataParallel distribution and the sharding that puts an array on all of them."""
        import jax
        import keras

        config = job.config
        devices = resolve_devices(self.devices)
        self._settle_data_settings(job, precision, flash, devices)
        devices, note = devices_for_batch(devices, config.batch_size, self.devices)
        if note:
            job.stage(note)
        if len(devices) == 1:
            return devices, None, None
        distribution = keras.distribution.DataParallel(devices=[f"{d.platform}:{d.id}" for d in devices])
        # Weights, data, carry and key live on every device; only each batch is split.
        replicated = jax.sharding.NamedSharding(distribution.device_mesh.backend_mesh, jax.sharding.PartitionSpec())
        return devices, distribution, replicated

    def _settle_data_settings(self, job, precision: str, flash: bool, devices) -> None:
        """The batch size (CONCEPTLIB_JAX_BATCH_SIZE, or 'auto' from free memory, override
        --batch-size) and crops per image (CONCEPTLIB_JAX_VARIANTS) decide which samples each step
        draws. A new run records them in its config.json; a resumed run takes the recorded ones,
        so it ends with the vectors of an uninterrupted run (an override asking otherwise is said
        and ignored)."""
        config = job.config
        if job.resume:
            recorded = job.run_dir.read().get("jax", {}).get("variants", self.variants)
            for name, asked, kept in (("BATCH_SIZE", self.batch_size, config.batch_size),
                                      ("VARIANTS", self.variants if self._variants_asked else None, recorded)):
                if asked is not None and asked != kept:
                    job.stage(f"CONCEPTLIB_JAX_{name}={asked} ignored: a resumed run keeps the {kept} it started with, "
                              "to draw the same batches")
            self.variants = recorded
            return
        requested = self.batch_size if self.batch_size is not None else config.batch_size
        if requested == "auto":
            config.batch_size = auto_batch_size(config.resolution, precision, flash, devices)
        else:
            config.batch_size = int(requested)
        job.run_dir.record({"batch_size": config.batch_size}, jax={"variants": self.variants})

    def _finish_report(self, job, timings: dict, peaks: dict) -> None:
        """Add the run's phase timings and memory peaks to ``self.report``; write it to
        $CONCEPTLIB_JAX_REPORT when that is set (benchmarks read it)."""
        self.report["peak_memory_gib_after"] = peaks
        self.report["timings"] = {k: round(v - timings["start"], 3) for k, v in timings.items()}
        self.report["longest_step_gap_s"] = round(job.longest_step_gap, 3)
        # keras-cv's Stable Diffusion modules load without it on this backend (kerascv.sd_modules).
        self.report["tensorflow_imported"] = "tensorflow" in sys.modules
        if "prepared" in job.timings:  # conceptlib.training.prepare's checks, before this trainer
            self.report["timings"]["job_prepared"] = round(job.timings["prepared"] - timings["start"], 3)
        job.timings.update({f"jax_{k}": v for k, v in timings.items()})
        report_path = os.environ.get("CONCEPTLIB_JAX_REPORT")
        if report_path:
            import json

            with open(report_path, "w") as handle:
                json.dump(self.report, handle, default=str)

    @staticmethod
    def _initial_carry(job, token_table):
        """``((rows, optimizer values, step), optimizer, rate)`` to start the step from: the run's
        initial vectors, or its checkpoint's vectors and optimizer state when it resumes."""
        import jax
        import keras

        from conceptlib.errors import TrainingError
        from conceptlib_jax.step import step_optimizer

        # The step trains vector_rows(n) rows; the ones past n are never in a prompt, so they get
        # zero gradients and leave the real rows' updates unchanged (tests/test_jax_schedule.py).
        initial = pad_rows(job.initial_vectors(token_table), vector_rows(job.config.num_vectors))
        rows_var = keras.Variable(initial, dtype="float32", name="concept_vectors")
        optimizer, rate = step_optimizer(job.config)
        optimizer.build([rows_var])
        # Copies: the step donates its carry, and the keras variables must keep valid buffers.
        rows = jax.numpy.array(rows_var.value, copy=True)
        opt_values = [jax.numpy.array(v.value, copy=True) for v in optimizer.variables]
        checkpoint = job.load_checkpoint()
        if checkpoint is not None:
            if len(checkpoint.optimizer) != len(opt_values):
                raise TrainingError("the checkpoint's optimizer state does not match this trainer; start a new run")
            rows = jax.numpy.asarray(pad_rows(checkpoint.vectors, rows.shape[0]), "float32")
            opt_values = [
                jax.numpy.asarray(pad_rows(v, o.shape[0]) if o.shape == rows.shape else v, dtype=o.dtype)
                for v, o in zip(checkpoint.optimizer, opt_values)
            ]
        return (rows, opt_values, jax.numpy.int32(job.start_step)), optimizer, rate

    def _trace(self, ti, optimizer, rate, job, flash, carry, base_key, replicated, patches):
        """Install the UNet rewrites (appended to ``patches``, restored by the caller) and return
        ``steps_per_call -> step function`` and the VAE function (not jitted) with their
        arguments, replicated over the devices with several of them."""
        import jax

        from conceptlib_jax.step import posterior_moments, step_state, train_step_fn

        config = job.config
        state = ti.frozen_state()
        vae_state = state["vae"]
        state = step_state(state)
        if replicated is not None:
            state, carry, base_key = jax.device_put((state, carry, base_key), replicated)

        kernel_patch = self._install_rewrites(ti, flash, patches)
        self.report.update({
            "patched_convs": len(kernel_patch.convs), "patched_groupnorms": len(kernel_patch.norms),
        })

        def step_for(steps_per_call):
            return train_step_fn(
                ti, optimizer, config.batch_size, rate=rate, steps_per_call=steps_per_call,
                mesh=replicated.mesh if replicated is not None else None, parts=config.grad_accum,
            )

        return step_for, posterior_moments(ti), state, vae_state, carry, base_key

    def _install_rewrites(self, ti, flash, patches):
        """The fused attention and the kernel rewrites (``self.kernels``) on ``ti``'s UNet, each
        appended to ``patches`` (for the caller to restore); returns the kernel patch."""
        from conceptlib.kerascv.attention import fused_attention
        from conceptlib_jax.kernels import fast_kernels

        kernels = self.kernels
        patches.append(fused_attention(
            ti.diffusion_model, flash=flash, cross_pad="crosspad" in kernels, fuse_qkv="qkv" in kernels,
        ))
        kernel_patch = fast_kernels(ti.diffusion_model, conv="conv" in kernels, groupnorm="groupnorm" in kernels)
        patches.append(kernel_patch)
        return kernel_patch

    def _export(self, ti, step_fn, moments_fn, carry, state, vae_state, shapes, base_key, host, job):
        """Export the traced functions (see conceptlib_jax.exported); None, with the reason in the
        report, when jax refuses to export them."""
        import jax

        from conceptlib_jax.exported import StepEntry, export, flat_moments, flat_step, weight_leaves

        leaves, treedef = jax.tree.flatten(state)
        images = jax.ShapeDtypeStruct((self._vae_chunk(job.config.resolution, len(host[0])),) + host[0].shape[1:], host[0].dtype)
        try:
            exported_step = export(flat_step(step_fn, treedef), carry, leaves, shapes, jax.random.key_data(base_key))
            vae_leaves, vae_treedef = jax.tree.flatten(vae_state)
            exported_moments = export(flat_moments(moments_fn, vae_treedef), vae_leaves, images)
        except Exception as exc:  # e.g. a custom call jax.export does not allow
            self.report["step_cache"] = f"not exported: {str(exc).splitlines()[0][:200]}"
            return None
        variables = ti.frozen_variables()
        vae_variables = variables.pop("vae")
        token_leaf = [id(v) for v in jax.tree.leaves(variables)].index(id(variables["token_table"]))
        entry = StepEntry(
            exported_step, exported_moments,
            weight_leaves(ti, variables, job.weights), weight_leaves(ti, vae_variables, job.weights),
            token_leaf,
        )
        return entry.roundtrip()

    @staticmethod
    def _report(job, first: int, losses) -> None:
        for offset, loss in enumerate(_host(losses)):
            job.step_done(first + offset, float(loss))


def _compile_exported(exported, sharding, timings):
    """Compile the deserialized step from its input shapes alone (every input on ``sharding``, or
    the default device): the same program, so the same executable, as from the real arrays."""
    import jax

    specs = [jax.ShapeDtypeStruct(aval.shape, aval.dtype, sharding=sharding) for aval in exported.in_avals]
    args, kwargs = jax.tree.unflatten(exported.in_tree, specs)
    return _timed_compile(jax.jit(exported.call, donate_argnums=(0,)), args, timings, **kwargs)


def _timed_compile(jitted, args, timings, **kwargs):
    """``jitted`` compiled for ``args``; its duration goes to ``timings["compile_seconds"]``
    (stored relative to ``timings["start"]``, as every other phase is)."""
    started = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    timings["compile_seconds"] = time.perf_counter() - started + timings["start"]
    return compiled


def ready_for_previews(ti, rows, job, build):
    """``ti`` (or ``build()``'s models when ``ti`` has no decoder) once its sampler has rendered
    one preview of ``rows``, discarded: compiled for the run's preview shapes, so the first real
    preview only runs it. Meant for a background thread while the device trains."""
    if ti is None or ti.decoder is None:
        ti = build()
    ti.sample(rows, *job.preview_inputs(), num_steps=job.config.preview_steps)
    return ti


class SerialWorker:
    """Runs the functions given to ``submit`` one after another in a daemon thread (an
    interrupted run exits without waiting for them); ``submit`` returns a Future at once.
    ``close`` lets the thread end once what was submitted has run (a process that trains again,
    a notebook, would otherwise keep one idle thread per run)."""

    def __init__(self):
        self._queue = queue.SimpleQueue()
        self._thread = None

    def submit(self, fn, *args) -> Future:
        future = Future()
        self._queue.put((future, fn, args))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="conceptlib-previews")
            self._thread.start()
        return future

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)

    def _run(self):
        while (item := self._queue.get()) is not None:
            _settle(*item)


def in_background(fn, *args) -> Future:
    """``fn(*args)`` in a daemon thread of its own (an interrupted run exits without waiting for
    it); the Future's ``result()`` waits for it and returns its value or raises its exception."""
    future = Future()
    threading.Thread(target=_settle, args=(future, fn, args), daemon=True, name="conceptlib-background").start()
    return future


def _settle(future: Future, fn, args) -> None:
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # re-raised in the caller's thread by future.result()
        future.set_exception(exc)


def _devices_text(devices) -> str:
    kind = devices[0].device_kind if devices[0].platform != "cpu" else "CPU"
    return f"{len(devices)} x {kind}" if len(devices) > 1 else kind


def _compile_message(step_cache: str, where: str, cache_dir) -> str:
    """What the user waits for before the first step, by the step cache's state."""
    if step_cache == "stored":
        return (
            f"compiling the training step for {where}: the first run of a setting takes a minute "
            f"or two, later ones reuse it from {cache_dir}"
        )
    if cache_dir:
        return f"compiling the training step for {where} (the compilation cache is in {cache_dir})"
    return f"compiling the training step for {where} (no compilation cache: CONCEPTLIB_JAX_CACHE=off)"


def vector_rows(num_vectors: int) -> int:
    """How many rows the step trains for ``num_vectors`` vectors: the next power of two, so
    1, 2, 3-4, 5-8, ... vectors share one compiled (and cached) step."""
    from conceptlib_jax.step import bucket

    return bucket(num_vectors)


def pad_rows(values, rows: int):
    """``values`` (n, ...) with zero rows appended up to ``rows``."""
    import numpy as np

    values = np.asarray(values)
    return np.concatenate([values, np.zeros((rows - values.shape[0],) + values.shape[1:], values.dtype)])


def steps_this_call(index: int, steps: int, per_call: int, due) -> int:
    """How many steps the next call runs from step ``index`` (steps done so far): ``per_call``,
    or 1 at the run's tail and while a checkpoint or preview (``due(steps_done)``) falls inside
    the next call rather than at its end, so each one sees its own step's vectors."""
    if per_call > 1 and (steps - index < per_call or any(due(d) for d in range(index + 1, index + per_call))):
        return 1
    return per_call


def _step_memory_gib(compiled):
    """XLA's estimate of the step's device memory (arguments + temporaries + outputs - aliased)."""
    try:
        stats = compiled.memory_analysis()
        total = (
            stats.argument_size_in_bytes + stats.temp_size_in_bytes
            + stats.output_size_in_bytes - stats.alias_size_in_bytes
        )
        return round(total / _GIB, 3)
    except Exception:  # not every backend/version reports it
        return None


def _host(losses):
    import numpy as np

    return np.asarray(losses, dtype=np.float32).reshape(-1)
