"""The jax trainer's step cache (conceptlib_jax.exported) and the weight reading it relies on.

A warm run reads every frozen weight straight from keras-cv's legacy HDF5 files, without building
the model, at the dataset ``legacy_h5_sources`` recorded in the cold run: checked here on a real
keras-cv ImageEncoder's weight file. The end-to-end check (a second process hits the cache, never
imports keras-cv, and trains bit-identically) is in tests/test_jax_train.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conceptlib.errors import WeightsError


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    from conceptlib.kerascv.models import build_image_encoder, save_legacy_h5_weights

    model = build_image_encoder()
    path = save_legacy_h5_weights(model, tmp_path_factory.mktemp("weights") / "vae_encoder.h5")
    return model, path


def test_legacy_h5_sources_name_the_dataset_of_every_weight(encoder_file):
    from conceptlib.kerascv.models import legacy_h5_sources
    from conceptlib.weights import read_legacy_h5

    model, path = encoder_file
    sources = legacy_h5_sources(model, path)
    assert set(sources) == {id(v) for v in model.weights}
    ordered = [sources[id(v)] for v in model.weights]
    arrays = read_legacy_h5(path, ordered)
    for variable, array in zip(model.weights, arrays):
        np.testing.assert_array_equal(array, np.asarray(variable.numpy()), err_msg=variable.path)


def test_read_legacy_h5_casts_on_the_host_and_checks_shapes(encoder_file):
    import ml_dtypes

    from conceptlib.kerascv.models import legacy_h5_sources
    from conceptlib.weights import read_legacy_h5

    model, path = encoder_file
    variable = model.weights[0]
    source = legacy_h5_sources(model, path)[id(variable)]
    (value,) = read_legacy_h5(path, [source], dtypes=["bfloat16"], shapes=[tuple(variable.shape)])
    assert value.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(value, np.asarray(variable.numpy()).astype(ml_dtypes.bfloat16))

    with pytest.raises(WeightsError, match=r"has shape .* expected \(1, 2\); the file belongs to another model"):
        read_legacy_h5(path, [source], shapes=[(1, 2)])
    with pytest.raises(WeightsError, match=r"has no weight nowhere/kernel"):
        read_legacy_h5(path, [("nowhere", "kernel")])


def test_legacy_h5_sources_refuse_another_models_file(encoder_file, tmp_path):
    import keras

    from conceptlib.kerascv.models import legacy_h5_sources, save_legacy_h5_weights

    _, path = encoder_file
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    with pytest.raises(WeightsError, match="saved layers with weights, the model has 2"):
        legacy_h5_sources(other, path)
    # And the other way round: a small model's file read for its own layers works.
    small = save_legacy_h5_weights(other, tmp_path / "small.h5")
    assert len(legacy_h5_sources(other, small)) == 4


def test_read_legacy_h5_reports_a_corrupt_file(tmp_path):
    from conceptlib.weights import read_legacy_h5

    bad = tmp_path / "vae_encoder.h5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(WeightsError, match="is corrupt"):
        read_legacy_h5(bad, [("a", "b")])


# --- the cache of exported functions -------------------------------------------------------------


def _entry():
    import jax.numpy as jnp

    from conceptlib_jax.exported import StepEntry, WeightLeaf, export

    def step(carry, leaves, data, key_data):
        return carry * leaves[0] + data["x"].sum(), key_data

    def moments(leaves, images):
        return images.mean() * leaves[0], images.std()

    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    exported_step = export(step, jnp.ones(3), [jnp.ones(3)], {"x": x}, jnp.zeros(2, jnp.uint32))
    exported_moments = export(moments, [jnp.ones(())], x)
    leaves = [WeightLeaf("diffusion_model", "layer", "w", "bfloat16", (3,))]
    return StepEntry(exported_step, exported_moments, leaves, [WeightLeaf("image_encoder", "l", "k", "float32", ())], 0)


def test_step_cache_round_trip(tmp_path):
    import jax.numpy as jnp

    from conceptlib_jax.exported import StepCache

    cache = StepCache(tmp_path / "steps")
    assert cache.load("k1") is None
    cache.store("k1", _entry())
    loaded = cache.load("k1")
    assert loaded.state_leaves == _entry().state_leaves and loaded.token_leaf == 0
    assert loaded.vae_leaves[0].part == "image_encoder"
    out, key = loaded.step.call(jnp.full(3, 2.0), [jnp.full(3, 3.0)], {"x": jnp.ones((2, 3))}, jnp.ones(2, jnp.uint32))
    np.testing.assert_array_equal(out, np.full(3, 12.0))
    assert not list((tmp_path / "steps").glob(".tmp-*"))  # written atomically, nothing left over


def test_step_cache_treats_a_damaged_entry_as_absent(tmp_path):
    from conceptlib_jax.exported import StepCache

    cache = StepCache(tmp_path)
    folder = cache.store("k", _entry())
    (folder / "step.bin").write_bytes(b"garbage")
    assert cache.load("k") is None
    cache.store("k", _entry())
    meta = json.loads((folder / "entry.json").read_text())
    (folder / "entry.json").write_text(json.dumps(dict(meta, format=0)))
    assert cache.load("k") is None


def test_entry_key_follows_settings_and_code():
    from conceptlib_jax import exported

    base = {"resolution": 512, "batch_size": 32}
    assert exported.entry_key(base) == exported.entry_key(dict(base))
    assert exported.entry_key(base) != exported.entry_key(dict(base, batch_size=16))
    assert len(exported.source_digest()) == 64


def test_a_two_device_step_round_trips_with_its_shardings(tmp_path):
    """A data-parallel step (weights replicated, the batch split over a mesh) exported, stored,
    loaded and run on two devices (CPU host devices in a subprocess) gives the traced step's
    numbers, and keeps its shardings: replicated carry out, a 2-device module. As the trainer does
    on several devices too, it is also compiled in a background thread from the data's replicated
    shapes while the data is put on the devices, and that executable gives the same numbers."""
    import subprocess

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, __file__, "two-devices", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["devices"] == 2 and report["exported_devices"] == 2
    assert report["carry_replicated"] and report["max_abs_difference"] == 0.0
    assert report["background_compiled_difference"] == 0.0


def _two_device_worker(folder: str) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from conceptlib_jax.exported import StepCache, StepEntry, export
    from conceptlib_jax.trainer import in_background

    mesh = Mesh(np.asarray(jax.devices()[:2]), ("batch",))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("batch"))

    def step(carry, leaves, data, key_data):
        x = jax.lax.with_sharding_constraint(data["x"], split)
        grad = jax.grad(lambda c: jnp.mean((x @ (c * leaves[0])) ** 2))(carry)
        return carry - 0.1 * grad, jnp.sum(key_data)

    def moments(leaves, images):
        return images * leaves[0]

    rng = np.random.default_rng(0)
    carry, leaves, data, key = jax.device_put(
        (jnp.asarray(rng.standard_normal(3), jnp.float32), [jnp.asarray(rng.standard_normal(3), jnp.float32)],
         {"x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)}, jnp.arange(2, dtype=jnp.uint32)),
        replicated,
    )
    expected, _ = jax.jit(step)(carry, leaves, data, key)
    entry = StepEntry(export(step, carry, leaves, data, key), export(moments, [jnp.ones(())], jnp.ones(2)), [], [], 0)
    cache = StepCache(Path(folder) / "steps")
    cache.store("k", entry)
    loaded = cache.load("k")
    step_fn = jax.jit(loaded.step.call, donate_argnums=(0,))
    out, _ = step_fn(jax.device_put(jnp.array(carry), replicated), leaves, data, key)
    shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated), data)
    background = in_background(lambda: step_fn.lower(carry, leaves, shapes, key).compile())
    host_data = jax.tree.map(np.asarray, data)
    placed = jax.device_put(host_data, replicated)  # meanwhile, as the trainer's VAE latents
    again, _ = background.result()(jax.device_put(jnp.array(carry), replicated), leaves, placed, key)
    report = {
        "devices": len(jax.devices()), "exported_devices": loaded.step.nr_devices,
        "carry_replicated": out.sharding.is_equivalent_to(replicated, 1),
        "max_abs_difference": float(np.max(np.abs(np.asarray(out) - np.asarray(expected)))),
        "background_compiled_difference": float(np.max(np.abs(np.asarray(again) - np.asarray(expected)))),
    }
    (Path(folder) / "report.json").write_text(json.dumps(report))


if __name__ == "__main__" and sys.argv[1:2] == ["two-devices"]:
    _two_device_worker(sys.argv[2])
