"""The jax trainer's step cache: a repeated run needs neither keras-cv's models nor TensorFlow.

Tracing the step needs keras-cv's models, and getting them is most of a warm start on the GPU
machine: importing keras-cv's modules (without TensorFlow on this backend, see
conceptlib.kerascv.sd_modules) and Keras' functional construction of the UNet (~14 s). Nothing after tracing needs them, because every frozen weight is an argument
of the step. So the first run of a configuration exports the traced step and the VAE posterior
function with ``jax.export`` (StableHLO, weights as arguments) into the compilation-cache folder,
together with the dataset of the legacy HDF5 weight file that each weight argument is read from.
A later run with the same configuration loads both functions, reads the weights from the files
with h5py and compiles them: a hit in JAX's persistent compilation cache. Both runs execute the
same deserialized functions, so they compute the same numbers.

The key covers everything the traced functions depend on: the source of the modules that define
them, the jax / jaxlib / keras / keras-cv versions, the device kind, and the run's shapes and
settings (``entry_key``), the device count among them. A multi-device step is exported with its
shardings (weights replicated, each batch split over the devices) and runs on as many devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

ENTRY_FORMAT = 1
# Every module whose code ends up in the traced step or the VAE function.
SOURCE_MODULES = (
    "conceptlib_jax.step",
    "conceptlib_jax.kernels",
    "conceptlib_jax.exported",
    "conceptlib.kerascv.textual_inversion",
    "conceptlib.kerascv.attention",
    "conceptlib.kerascv.models",
)
# cuDNN flash attention (forward and backward). jax.export refuses custom calls without a
# compatibility guarantee; an entry is only read back by the same jaxlib on the same device kind.
CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
# The weight files a step reads, by the part that owns the variable.
PARTS = ("text_encoder", "diffusion_model", "image_encoder")


def source_digest() -> str:
    """sha256 of the source files of ``SOURCE_MODULES`` (found without importing them)."""
    import importlib.util

    digest = hashlib.sha256()
    for name in SOURCE_MODULES:
        origin = importlib.util.find_spec(name).origin
        digest.update(name.encode() + b"\0" + Path(origin).read_bytes())
    return digest.hexdigest()


def entry_key(settings: dict) -> str:
    """The cache key of a run: ``settings`` (its shapes and options, JSON-serialisable) plus the
    code, library versions and device the traced functions depend on."""
    from importlib.metadata import version

    import jax

    device = jax.local_devices()[0]
    fields = dict(
        settings,
        format=ENTRY_FORMAT,
        source=source_digest(),
        versions={name: version(name) for name in ("jax", "jaxlib", "keras", "keras-cv")},
        platform=device.platform,
        device_kind=str(device.device_kind),
    )
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class WeightLeaf:
    """Where one weight argument comes from: ``part``'s weight file, dataset ``layer/weight``,
    cast to ``dtype``."""

    part: str
    layer: str
    weight: str
    dtype: str
    shape: tuple


def weight_leaves(ti, variables, weights: dict) -> list[WeightLeaf]:
    """A WeightLeaf for every leaf of ``variables`` (a pytree of the keras Variables of ``ti``'s
    models, e.g. ``ti.frozen_variables()["vae"]``), in tree order."""
    import jax

    from conceptlib.kerascv.models import legacy_h5_sources

    models = {"text_encoder": ti.text_encoder, "diffusion_model": ti.diffusion_model, "image_encoder": ti.image_encoder}
    sources = {part: legacy_h5_sources(models[part], weights[part]) for part in PARTS}
    leaves = []
    for variable in jax.tree.leaves(variables):
        for part in PARTS:
            source = sources[part].get(id(variable))
            if source is not None:
                break
        else:
            raise ValueError(f"variable {variable.path} is in none of the weight files")
        leaves.append(WeightLeaf(part, source[0], source[1], str(variable.dtype), tuple(variable.shape)))
    return leaves


def read_weights(leaves: list[WeightLeaf], weights: dict) -> list:
    """The host arrays of ``leaves`` (in order), each file opened once."""
    from conceptlib.weights import read_legacy_h5

    arrays: list = [None] * len(leaves)
    for part in PARTS:
        picks = [i for i, leaf in enumerate(leaves) if leaf.part == part]
        if not picks:
            continue
        values = read_legacy_h5(
            weights[part], [(leaves[i].layer, leaves[i].weight) for i in picks],
            dtypes=[leaves[i].dtype for i in picks], shapes=[leaves[i].shape for i in picks],
        )
        for i, value in zip(picks, values):
            arrays[i] = value
    return arrays


def flat_step(step_fn, state_treedef):
    """``step_fn(carry, state, data, key)`` as ``(carry, state_leaves, data, key_data)``: the
    frozen weights a flat list (as read from the files), the PRNG key its raw uint32 data."""
    import jax

    def step(carry, state_leaves, data, key_data):
        state = jax.tree_util.tree_unflatten(state_treedef, state_leaves)
        return step_fn(carry, state, data, jax.random.wrap_key_data(key_data))

    return step


def flat_moments(moments_fn, vae_treedef):
    """``moments_fn(vae_state, images)`` as ``(vae_leaves, images)``."""
    import jax

    def moments(vae_leaves, images):
        return moments_fn(jax.tree_util.tree_unflatten(vae_treedef, vae_leaves), images)

    return moments


def export(fn, *args):
    """``jax.export`` of ``fn`` for arguments shaped like ``args`` (arrays or ShapeDtypeStructs),
    with their shardings where they are spread over a mesh of devices."""
    import jax
    from jax import export as jax_export

    def spec(x):
        sharding = getattr(x, "sharding", None)
        named = isinstance(sharding, jax.sharding.NamedSharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if named else None)

    specs = jax.tree.map(spec, args)
    checks = [jax_export.DisabledSafetyCheck.custom_call(target) for target in CUDNN_TARGETS]
    return jax_export.export(jax.jit(fn), disabled_checks=checks)(*specs)


@dataclass
class StepEntry:
    """The exported step and VAE function of one configuration, and where their weights are."""

    step: object  # jax.export.Exported: (carry, state_leaves, data, key_data) -> (carry, losses)
    moments: object  # jax.export.Exported: (vae_leaves, images) -> (mean, std)
    state_leaves: list
    vae_leaves: list
    token_leaf: int  # which of state_leaves is the token-embedding table

    def roundtrip(self) -> "StepEntry":
        """The entry as ``StepCache.load`` would return it (serialized and read back), so a run
        that just exported compiles exactly what later runs will."""
        from jax import export as jax_export

        return StepEntry(
            jax_export.deserialize(self.step.serialize()), jax_export.deserialize(self.moments.serialize()),
            self.state_leaves, self.vae_leaves, self.token_leaf,
        )


class StepCache:
    """Entries in ``folder/<key>/``: step.bin, moments.bin (``Exported.serialize()``) and
    entry.json (the weight leaves). A missing, partial or unreadable entry reads as absent."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def load(self, key: str) -> StepEntry | None:
        from jax import export as jax_export

        path = self.folder / key
        try:
            meta = json.loads((path / "entry.json").read_text())
            if meta.get("format") != ENTRY_FORMAT:
                return None
            step = jax_export.deserialize(bytearray((path / "step.bin").read_bytes()))
            moments = jax_export.deserialize(bytearray((path / "moments.bin").read_bytes()))
            leaves = [[WeightLeaf(**dict(item, shape=tuple(item["shape"]))) for item in meta[name]]
                      for name in ("state_leaves", "vae_leaves")]
            return StepEntry(step, moments, *leaves, int(meta["token_leaf"]))
        except Exception:  # any damage (flatbuffers raises struct.error, ...): just a miss
            return None

    def store(self, key: str, entry: StepEntry) -> Path:
        """Write ``entry`` under ``key`` atomically (a concurrent run sees all of it or none)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / key
        tmp = self.folder / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            (tmp / "step.bin").write_bytes(entry.step.serialize())
            (tmp / "moments.bin").write_bytes(entry.moments.serialize())
            meta = {
                "format": ENTRY_FORMAT,
                "state_leaves": [asdict(leaf) for leaf in entry.state_leaves],
                "vae_leaves": [asdict(leaf) for leaf in entry.vae_leaves],
                "token_leaf": entry.token_leaf,
            }
            (tmp / "entry.json").write_text(json.dumps(meta))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final
