"""Plugin discovery: the built-in trainer comes through its entry point; broken plugins are
reported, never fatal; nothing heavy is imported to list or look up plugins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

from conceptlib.plugins import TEMPLATE_PACKS, TRAINERS, discover, get_trainer
from conceptlib.training import Trainer


def test_tensorflow_trainer_is_discovered_through_its_entry_point():
    entry_points = {ep.name: ep for ep in metadata.entry_points(group=TRAINERS)}
    assert entry_points["tensorflow"].value == "conceptlib_tensorflow:TensorFlowTrainer"
    assert entry_points["tensorflow"].dist.metadata["Name"] == "conceptlib-tensorflow"
    cls = get_trainer("tensorflow")
    assert cls.__module__ == "conceptlib_tensorflow"
    assert cls.backend == "tensorflow" and cls.name == "tensorflow"
    assert isinstance(cls(), Trainer)


def test_builtin_template_packs_come_from_the_root_distribution_entry_point():
    (builtin,) = [ep for ep in metadata.entry_points(group=TEMPLATE_PACKS) if ep.name == "builtin"]
    assert builtin.value == "conceptlib.templates:builtin_packs"
    registry = discover()
    assert {"object", "style", "group"} <= set(registry.template_packs)
    assert registry.template_packs["object"].source == "conceptlib:builtin"


def _fake_distribution(root, name, entry_points: str, module_source: dict[str, str]):
    """A minimal installed distribution (dist-info + modules) on a folder put on PYTHONPATH."""
    dist_info = root / f"{name.replace('-', '_')}-0.0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for module, source in module_source.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))


def _run(args, pythonpath, **env):
    full_env = dict(os.environ, PYTHONPATH=str(pythonpath), TF_CPP_MIN_LOG_LEVEL="2", **env)
    return subprocess.run(
        [shutil.which("conceptlib"), *args], env=full_env, capture_output=True, text=True, timeout=120
    )


def test_broken_plugins_are_reported_and_the_cli_keeps_working(tmp_path):
    _fake_distribution(
        tmp_path,
        "conceptlib-broken",
        """
        [conceptlib.trainers]
        crashy = broken_trainer:Trainer
        notatrainer = broken_trainer:NOT_A_TRAINER
        [conceptlib.template_packs]
        badpack = broken_pack:PACKS
        goodpack = good_pack:PACKS
        """,
        {
            "broken_trainer": "raise ImportError('needs a library that is not installed')\n",
            "broken_pack": "PACKS = {'nope': ['no placeholder here']}\n",
            "good_pack": "PACKS = {'toys': ['a {token} toy', 'a plastic {token}']}\n",
        },
    )
    listed = _run(["plugins"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    out = listed.stdout
    assert "tensorflow" in out and "toys" in out  # the working plugins still load
    assert "Failed to load:" in out
    assert "crashy = broken_trainer:Trainer (conceptlib-broken 0.0.1): ImportError: needs a library" in out
    assert "badpack" in out and "lacks the {token} placeholder" in out

    as_json = json.loads(_run(["plugins", "--json"], tmp_path).stdout)
    errors = {e["name"]: e["error"] for e in as_json["entry_points"] if e["error"]}
    assert set(errors) == {"crashy", "notatrainer", "badpack"}
    assert as_json["trainers"]["tensorflow"]["backend"] == "tensorflow"

    # Asking for the broken trainer gives one line and exit 1, before anything else happens.
    train = _run(["train", str(tmp_path), "--name", "x", "--trainer", "crashy"], tmp_path)
    assert train.returncode == 1
    assert train.stderr.strip().splitlines() == [
        "Error: trainer plugin 'crashy' failed to load (ImportError: needs a library that is not "
        "installed); run `conceptlib plugins`"
    ]
    # A third-party template pack is usable by name.
    shown = _run(["templates", "show", "toys"], tmp_path)
    assert shown.returncode == 0 and "a plastic {token}" in shown.stdout


def test_builtin_trainers_and_packs_keep_their_names(tmp_path):
    """A plugin reusing a built-in name never replaces it, whatever its entry point is called
    (entry points load in name order; "aaa" sorts before conceptlib's "builtin")."""
    _fake_distribution(
        tmp_path,
        "conceptlib-thief",
        """
        [conceptlib.trainers]
        tensorflow = thief:Thief
        [conceptlib.template_packs]
        aaa = thief:PACKS
        """,
        {"thief": """
            PACKS = {"object": ["my hijacked {token}"]}
            class Thief:
                name, version, backend = "tensorflow", "1", "jax"
                def run(self, job): raise RuntimeError("the thief ran")
            """},
    )
    as_json = json.loads(_run(["plugins", "--json"], tmp_path).stdout)
    errors = {(e["distribution"], e["name"]): e["error"] for e in as_json["entry_points"] if e["error"]}
    assert errors == {
        ("conceptlib-thief", "tensorflow"): "PluginError: trainer name 'tensorflow' is already taken by "
                                            "conceptlib-tensorflow:tensorflow; rename this entry point",
        ("conceptlib-thief", "aaa"): "PluginError: template pack name 'object' (taken by conceptlib:builtin) "
                                     "already in use; rename it in this plugin",
    }
    assert as_json["trainers"]["tensorflow"]["backend"] == "tensorflow"
    assert {"object", "style", "group"} <= set(as_json["template_packs"])
    shown = _run(["templates", "show", "object"], tmp_path)
    assert "a photo of a {token}" in shown.stdout and "hijacked" not in shown.stdout


def test_plugins_that_break_the_rules_are_reported_not_fatal(tmp_path):
    _fake_distribution(
        tmp_path,
        "conceptlib-rulebreakers",
        """
        [conceptlib.trainers]
        nobackend = rules:NoBackend
        typo = rules:Typo
        noversion = rules:NoVersion
        instance = rules:INSTANCE
        [conceptlib.template_packs]
        empty = rules:EMPTY
        exits = exits:PACKS
        """,
        {
            "rules": """
                class NoBackend:
                    name, version, backend = "nobackend", "1", None
                    def run(self, job): pass
                class Typo(NoBackend):
                    backend = "pytorch"
                class NoVersion:
                    name, backend = "noversion", "tensorflow"
                    def run(self, job): pass
                INSTANCE = Typo()
                EMPTY = {"emptypack": []}
                """,
            "exits": "import argparse\nargparse.ArgumentParser().parse_args(['--bogus'])\n",
        },
    )
    listed = _run(["plugins"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    as_json = json.loads(_run(["plugins", "--json"], tmp_path).stdout)
    errors = {e["name"]: e["error"] for e in as_json["entry_points"] if e["error"]}
    assert errors == {
        "nobackend": "PluginError: rules:NoBackend: backend None is not a KERAS_BACKEND name "
                     "(tensorflow, jax, torch, numpy, openvino)",
        "typo": "PluginError: rules:Typo: backend 'pytorch' is not a KERAS_BACKEND name "
                "(tensorflow, jax, torch, numpy, openvino)",
        "noversion": "PluginError: rules:NoVersion is not a Trainer (missing version)",
        "instance": "PluginError: rules:INSTANCE is a Typo, not a Trainer class",
        "empty": "PluginError: template pack 'emptypack' has no templates; give it at least one",
        "exits": "SystemExit: 2",
    }
    # Bare `templates` lists the packs, and says which template-pack plugins failed to load.
    bare = _run(["templates"], tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.splitlines()[0].startswith("object ")
    assert ("failed to load: conceptlib-rulebreakers:empty (PluginError: template pack 'emptypack' has no "
            "templates; give it at least one); see `conceptlib plugins`") in bare.stdout.splitlines()
    # A pack's name is not its entry point's: asking for it points at the plugins that failed.
    unknown = _run(["templates", "show", "emptypack"], tmp_path)
    assert unknown.returncode == 1
    # (The exiting plugin's own argparse usage lines come first: its output is not hidden.)
    assert unknown.stderr.strip().splitlines()[-1:] == [
        "Error: unknown template pack 'emptypack'; installed: group, object, style; 2 template pack plugin(s) "
        "failed to load (conceptlib-rulebreakers:empty, conceptlib-rulebreakers:exits) (see `conceptlib plugins`)"
    ]


def test_a_plugin_that_imports_keras_when_loaded_is_named(tmp_path):
    """Loading it fixes keras' backend before `train` can choose one: the line names it."""
    _fake_distribution(
        tmp_path, "conceptlib-heavy", "[conceptlib.template_packs]\nheavy = heavy:PACKS\n",
        {"heavy": "import keras\nPACKS = {'heavy': ['a {token}']}\n"},
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    full_env = dict(env, PYTHONPATH=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="2", CONCEPTLIB_HOME=str(tmp_path / "home"))
    train = subprocess.run([shutil.which("conceptlib"), "train", str(tmp_path), "--name", "x", "--trainer", "jax"],
                           env=full_env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 1
    # (TensorFlow's own start-up lines on stderr come from the plugin's import, not from conceptlib.)
    assert [line for line in train.stderr.splitlines() if line.startswith("Error")] == [
        "Error: keras is already running on the 'tensorflow' backend but this trainer needs 'jax' (plugin "
        "conceptlib-heavy:heavy imported keras when it loaded; a plugin must import it only when it runs: "
        "uninstall or fix it); start a new process with KERAS_BACKEND=jax"
    ]
    assert not (tmp_path / "home").exists()


def test_listing_plugins_imports_no_keras_tensorflow_or_jax():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from conceptlib.cli import main\n"
        "for args in (['plugins'], ['templates', 'list'], ['templates', 'show', 'object']):\n"
        "    r = CliRunner().invoke(main, args); assert r.exit_code == 0, r.output\n"
        "from conceptlib.plugins import get_trainer\n"
        "get_trainer('tensorflow')\n"
        "heavy = sorted(m for m in ('keras', 'tensorflow', 'jax', 'keras_cv') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_auto_trainer_is_jax_on_a_gpu_machine_and_tensorflow_elsewhere(monkeypatch):
    import conceptlib.plugins as plugins

    monkeypatch.setattr(plugins, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(plugins, "jax_cuda_installed", lambda: True)
    assert plugins.default_trainer() == "jax"
    # A GPU, but a CPU-only jaxlib (e.g. plain `pip install jax`): JAX would train on the CPU,
    # slower than the TensorFlow reference there.
    monkeypatch.setattr(plugins, "jax_cuda_installed", lambda: False)
    assert plugins.default_trainer() == "tensorflow"
    monkeypatch.setattr(plugins, "jax_cuda_installed", lambda: True)
    monkeypatch.setattr(plugins, "has_nvidia_gpu", lambda: False)
    assert plugins.default_trainer() == "tensorflow"


@pytest.mark.parametrize("gpu, cuda, picked, why", [
    (True, True, "jax", "an NVIDIA GPU and JAX's CUDA build are here"),
    (True, False, "tensorflow", 'JAX\'s CUDA build is not installed, so training runs on the CPU; for the GPU: pip install -U "jax[cuda12]"'),
    (False, True, "tensorflow", "no NVIDIA GPU found"),
])
def test_plugins_says_which_trainer_auto_picks_and_why(monkeypatch, gpu, cuda, picked, why):
    """The question a user with a slow run asks first: is it on the GPU, and if not, what is missing."""
    from click.testing import CliRunner

    import conceptlib.plugins as plugins
    from conceptlib.cli import main

    monkeypatch.setattr(plugins, "has_nvidia_gpu", lambda: gpu)
    monkeypatch.setattr(plugins, "jax_cuda_installed", lambda: cuda)
    result = CliRunner().invoke(main, ["plugins"])
    line = next(line for line in result.output.splitlines() if "--trainer auto" in line)
    assert line.startswith(f"  --trainer auto picks {picked}: ") and why in line, line
    payload = json.loads(CliRunner().invoke(main, ["plugins", "--json"]).output)
    assert payload["auto_trainer"]["trainer"] == picked and why in payload["auto_trainer"]["why"]


def test_jax_cuda_support_is_found_from_installed_packages_without_importing_jax(tmp_path, monkeypatch):
    import sys

    import conceptlib.plugins as plugins

    assert plugins.jax_cuda_installed() is False  # this machine: jax and jaxlib for the CPU only
    # What `pip install "jax[cuda12]"` adds: the jax_cuda12_plugin package and the PJRT plugin
    # in the jax_plugins namespace.
    for folder in (tmp_path / "a" / "jax_cuda12_plugin", tmp_path / "b" / "jax_plugins" / "xla_cuda12"):
        folder.mkdir(parents=True)
        (folder / "__init__.py").write_text("")
    for root in ("a", "b"):
        monkeypatch.setattr(sys, "path", [str(tmp_path / root), *sys.path])
        assert plugins.jax_cuda_installed() is True
        monkeypatch.undo()
