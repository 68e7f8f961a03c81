"""Plugin discovery through entry points (contract 4).

Two groups:

- ``conceptlib.trainers``: ``name = "module:Class"``; the class implements
  conceptlib.training.Trainer. Loading it must be cheap (no TensorFlow/JAX import).
- ``conceptlib.template_packs``: ``name = "module:object"``; the object is a TemplatePack, a list
  of them, a callable returning those, or a dict ``{pack_name: [template, ...]}``.

A plugin that fails to load is recorded with its error and reported by ``conceptlib plugins``;
it never stops the CLI or the other plugins.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata

from conceptlib.errors import PluginError

TRAINERS = "conceptlib.trainers"
TEMPLATE_PACKS = "conceptlib.template_packs"
# Loaded first, so a third-party plugin can never take a built-in trainer's or pack's name.
BUILTIN_DISTRIBUTIONS = ("conceptlib", "conceptlib-tensorflow", "conceptlib-jax")
# What a trainer's ``backend`` may be: the KERAS_BACKEND names.
KERAS_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")


@dataclass(frozen=True)
class PluginInfo:
    """One entry point: where it comes from and whether it loaded."""

    group: str
    name: str
    value: str
    distribution: str
    version: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Registry:
    """The loaded plugins of one process."""

    trainers: dict[str, type] = field(default_factory=dict)
    template_packs: dict = field(default_factory=dict)  # name -> TemplatePack
    infos: list[PluginInfo] = field(default_factory=list)
    trainer_sources: dict[str, str] = field(default_factory=dict)  # name -> "distribution:entry point"
    keras_imported_by: str | None = None  # the entry point that imported keras, if one did

    @property
    def broken(self) -> list[PluginInfo]:
        return [info for info in self.infos if not info.ok]


_registry: Registry | None = None


def _entry_points(group: str):
    def order(ep):
        return (_dist(ep)[0] not in BUILTIN_DISTRIBUTIONS, ep.name)

    return sorted(metadata.entry_points(group=group), key=order)


def _dist(ep) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version or "?"


def one_line(exc: BaseException) -> str:
    """``exc`` as "Type: message", its first line only."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0] if text else type(exc).__name__


def discover(refresh: bool = False) -> Registry:
    """Load every trainer and template-pack entry point once per process (``refresh`` reloads).
    Built-in plugins load first; a later plugin reusing a taken name is reported, not loaded."""
    global _registry
    if _registry is not None and not refresh:
        return _registry
    registry = Registry()
    for group, load in ((TRAINERS, _load_trainer), (TEMPLATE_PACKS, _load_template_packs)):
        for ep in _entry_points(group):
            dist, version = _dist(ep)
            had_keras = "keras" in sys.modules
            error = None
            try:
                load(registry, ep, f"{dist}:{ep.name}")
            except (Exception, SystemExit) as exc:  # a broken plugin is reported, never fatal
                error = one_line(exc)
            if not had_keras and "keras" in sys.modules and registry.keras_imported_by is None:
                registry.keras_imported_by = f"{dist}:{ep.name}"
            registry.infos.append(PluginInfo(group, ep.name, ep.value, dist, version, error))
    _registry = registry
    return registry


def _load_trainer(registry: Registry, ep, source: str) -> None:
    cls = ep.load()
    if not isinstance(cls, type):
        raise PluginError(f"{ep.value} is a {type(cls).__name__}, not a Trainer class")
    missing = [attr for attr in ("name", "version", "backend", "run") if not hasattr(cls, attr)]
    if missing:
        raise PluginError(f"{ep.value} is not a Trainer (missing {', '.join(missing)})")
    if cls.backend not in KERAS_BACKENDS:
        raise PluginError(f"{ep.value}: backend {cls.backend!r} is not a KERAS_BACKEND name "
                          f"({', '.join(KERAS_BACKENDS)})")
    if ep.name in registry.trainers:
        raise PluginError(f"trainer name {ep.name!r} is already taken by {registry.trainer_sources[ep.name]}; "
                          "rename this entry point")
    registry.trainers[ep.name] = cls
    registry.trainer_sources[ep.name] = source


def _load_template_packs(registry: Registry, ep, source: str) -> None:
    from conceptlib.templates import coerce_packs

    packs = coerce_packs(ep.load(), source=source)
    taken = [f"{pack.name!r} (taken by {registry.template_packs[pack.name].source})"
             for pack in packs if pack.name in registry.template_packs]
    if taken:
        raise PluginError(f"template pack name {', '.join(taken)} already in use; rename it in this plugin")
    for pack in packs:
        registry.template_packs[pack.name] = pack


def _unknown(kind: str, name: str, known, broken: list[PluginInfo]) -> PluginError:
    hint = f"installed: {', '.join(sorted(known)) or 'none'}"
    failed = [info for info in broken if info.name == name]
    if failed:
        return PluginError(f"{kind} plugin {name!r} failed to load ({failed[0].error}); run `conceptlib plugins`")
    if broken:  # a pack's name is not its entry point's: it may be in one of these
        names = ", ".join(f"{info.distribution}:{info.name}" for info in broken)
        hint += f"; {len(broken)} {kind} plugin(s) failed to load ({names})"
    return PluginError(f"unknown {kind} {name!r}; {hint} (see `conceptlib plugins`)")


def get_trainer(name: str):
    """The Trainer class registered as ``name``; PluginError if unknown or broken."""
    registry = discover()
    if name not in registry.trainers:
        broken = [info for info in registry.broken if info.group == TRAINERS]
        raise _unknown("trainer", name, registry.trainers, broken)
    return registry.trainers[name]


def get_template_pack(name: str):
    """The TemplatePack registered as ``name``, else the templates in file ``name`` (a path that
    exists or ends in .txt: ``templates.pack_from_file``); PluginError if neither."""
    import os

    registry = discover()
    if name in registry.template_packs:
        return registry.template_packs[name]
    if name.lower().endswith(".txt") or os.path.isfile(name):
        from conceptlib.templates import pack_from_file

        return pack_from_file(name)
    broken = [info for info in registry.broken if info.group == TEMPLATE_PACKS]
    raise _unknown("template pack", name, registry.template_packs, broken)


def has_nvidia_gpu() -> bool:
    """Whether this machine has an NVIDIA GPU, judged without importing any framework."""
    import os
    import shutil

    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def jax_cuda_installed() -> bool:
    """Whether JAX's CUDA support is installed (``pip install "jax[cuda12]"``: its plugin
    packages, or an old jaxlib built with CUDA), judged without importing JAX."""
    import importlib.util
    import pkgutil
    import re
    from importlib.metadata import PackageNotFoundError, version

    if any(re.fullmatch(r"jax_cuda\d+_plugin", module.name) for module in pkgutil.iter_modules()):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        if any(module.name.startswith("xla_cuda") for module in pkgutil.iter_modules(spec.submodule_search_locations)):
            return True
    try:
        return "cuda" in version("jaxlib")
    except PackageNotFoundError:
        return False


def jax_gpu_available() -> bool:
    """An NVIDIA GPU and a JAX that can use it: only the JAX backend runs KerasCV on the GPU
    (the pinned TensorFlow is the CPU build)."""
    return has_nvidia_gpu() and jax_cuda_installed()


def auto_trainer_reason() -> tuple[str, str]:
    """(the trainer `--trainer auto` picks here, why: what was found, and what to install for the
    GPU path when it is missing), for `conceptlib plugins`."""
    trainer = default_trainer()
    if trainer == "jax":
        return trainer, "an NVIDIA GPU and JAX's CUDA build are here"
    if not has_nvidia_gpu():
        return trainer, "no NVIDIA GPU found (no /dev/nvidiactl, no nvidia-smi): training runs on the CPU"
    if not jax_cuda_installed():
        return trainer, ("an NVIDIA GPU is here but JAX's CUDA build is not installed, so training runs on the "
                         "CPU; for the GPU: pip install -U \"jax[cuda12]\" (or \"jax[cuda13]\")")
    return trainer, "the jax trainer plugin is not installed (see Failed to load, or pip install plugins/conceptlib-jax)"


def default_trainer() -> str:
    """The trainer `--trainer auto` means: the JAX trainer where JAX can use an NVIDIA GPU, else
    the TensorFlow reference trainer (faster than JAX on a CPU)."""
    if jax_gpu_available() and "jax" in discover().trainers:
        return "jax"
    return "tensorflow"
