"""The jitted textual-inversion step on the Keras 3 JAX backend.

The math is conceptlib.kerascv.textual_inversion's (``TextualInversion.loss_from_latents``, the
keras.io algorithm shared with the TensorFlow trainer); this module only arranges it for speed:

- every frozen weight is an ARGUMENT of the jitted step (closing over ~1B parameters makes XLA
  constant-fold them for minutes);
- the gradient is taken with respect to the new rows only (no weight gradients are computed);
- the VAE is not in the step: each augmented image's posterior (mean, std) is computed once and
  cached on the device; the step draws the posterior sample, the noise, the timesteps, the image
  variant and the prompt template on the device from a PRNG key, so a step needs no host data;
- the optimizer is the TensorFlow trainer's own keras optimizer (``make_optimizer``), applied
  with ``stateless_apply`` inside the jit;
- the carried state (new rows, optimizer state, key) is donated; several steps may run per call
  (``lax.scan``) to take dispatch off the host;
- what varies between runs of one configuration is an argument too, never a constant of the
  traced step: the learning-rate schedule's numbers (``ScheduleFromArguments``) and the data
  (padded to power-of-two sizes, ``bucket``), so one compiled (and exported) step serves every
  ``--steps`` / ``--learning-rate`` / ``--warmup-steps`` and every number of training images.

Nothing here imports jax or keras at module import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from conceptlib.kerascv import textual_inversion as ti_math


def fast_textual_inversion_class():
    """TextualInversion whose text lookup never builds the (vocab + n, dim) extended table.

    Same function as the reference ``encode_text`` (``take(concat(table, rows), ids)``), written
    as a select between the frozen table's row and the new row, so the backward pass scatters
    into the (n, dim) new rows only instead of a zero (vocab + n, dim) table gradient.
    """
    from keras import ops

    class FastTextualInversion(ti_math.TextualInversion):
        def encode_text(self, new_rows, state, token_ids):
            table = state["token_table"]
            vocab = int(table.shape[0])
            num_new = int(new_rows.shape[0])
            token_ids = ops.convert_to_tensor(token_ids, "int32")
            frozen = ops.take(table, ops.minimum(token_ids, vocab - 1), axis=0)
            new_index = ops.clip(token_ids - vocab, 0, num_new - 1)
            learned = ops.take(ops.cast(new_rows, table.dtype), new_index, axis=0)
            hidden = ops.where(ops.expand_dims(token_ids >= vocab, -1), learned, frozen)
            length = ops.shape(token_ids)[1]
            hidden = hidden + ops.expand_dims(state["position_table"][:length], 0)
            encoded, _ = self.text_tail.stateless_call(*state["text"], hidden)
            return encoded

    return FastTextualInversion


def step_state(state: dict) -> dict:
    """The part of ``TextualInversion.frozen_state()`` the step reads (no VAE)."""
    return {key: value for key, value in state.items() if key != "vae"}


def posterior_moments_fn(ti):
    """``posterior_moments(ti)`` jitted."""
    import jax

    return jax.jit(posterior_moments(ti))


def posterior_moments(ti):
    """``(vae_state, images) -> (mean, std)`` of the VAE posterior, log-variance clipped as in
    ``TextualInversion.encode_latents``; the step then samples ``(mean + std * eps) * 0.18215``."""
    from keras import ops

    def moments(vae_state, images):
        out, _ = ti.posterior.stateless_call(*vae_state, images)
        mean, logvar = ops.split(ops.cast(out, "float32"), 2, axis=-1)
        logvar = ops.clip(logvar, ti_math.LOGVAR_MIN, ti_math.LOGVAR_MAX)
        return mean, ops.exp(0.5 * logvar)

    return moments


def bucket(count: int) -> int:
    """The padded size of ``count`` rows: the next power of two. Data shapes (and so the
    compiled step) change only when the number of images crosses a power of two."""
    return 1 << max(0, int(count) - 1).bit_length()


@dataclass
class DeviceData:
    """The step's run arguments, resident on the device: the training data (one entry per
    augmented image variant; row counts padded, see ``bucket``) and the schedule's numbers.

    mean, std      (N, R/8, R/8, 4) float32: VAE posterior of each variant (rows >= count: zeros)
    image_of       (N,) int32: which training image a variant comes from
    variant_count  () int32: how many of the N rows are real variants (the step draws from those)
    prompts        (I, T, 77) int32: prompt token ids per image and template (padded by repeats)
    prompt_count   (I,) int32: how many of the T templates image i really has
    schedule       dict of float32 arrays: ``schedule_arguments`` (read by ``ScheduleFromArguments``)
    """

    mean: object
    std: object
    image_of: object
    variant_count: object
    prompts: object
    prompt_count: object
    schedule: dict

    def tree(self) -> dict:
        return {
            "mean": self.mean,
            "std": self.std,
            "image_of": self.image_of,
            "variant_count": self.variant_count,
            "prompts": self.prompts,
            "prompt_count": self.prompt_count,
            "schedule": dict(self.schedule),
        }


def schedule_arguments(learning_rate: float, steps: int, warmup_steps: int = 0, lr_steps=None) -> dict:
    """The numbers of ``make_optimizer``'s schedule as float32 step arguments: the cosine
    schedule's scalars and the stepped schedule's ``(MAX_LR_PIECES,)`` boundaries and values
    (``stepped_rate_numbers``; for a run without steps, one piece at ``learning_rate``)."""
    import numpy as np

    boundaries, values = ti_math.stepped_rate_numbers(lr_steps or [[learning_rate, None]])
    return {
        "learning_rate": np.float32(learning_rate),
        "decay_steps": np.float32(max(1, steps - warmup_steps)),
        "warmup_steps": np.float32(warmup_steps),
        "boundaries": np.asarray(boundaries, np.float32),
        "values": np.asarray(values, np.float32),
    }


class ScheduleFromArguments:
    """A keras learning-rate callable: ``make_optimizer``'s cosine schedule (with or without
    warmup), or its stepped one, at the optimizer's iteration, its numbers read from the step's
    ``schedule`` argument (``bind`` them while tracing), not baked into the compiled step.

    Without warmup the cosine is keras' warmup form with zero warmup steps, which computes the same
    numbers as ``CosineDecay(learning_rate, decay_steps)`` op for op (step - 0, decay + 0)."""

    def __init__(self, schedule: str = "cosine"):
        self.schedule = schedule
        self.values = None
        self.optimizer = None  # set by step_optimizer: the rate is read at its iteration

    def bind(self, values: dict) -> None:
        self.values = values

    def __call__(self):
        from keras.optimizers.schedules import CosineDecay

        if self.values is None:
            raise RuntimeError("ScheduleFromArguments is only defined inside the traced step")
        if self.schedule == "stepped":
            return ti_math.stepped_rate(self.values["boundaries"], self.values["values"], self.optimizer.iterations)
        schedule = CosineDecay(
            0.0, 1, warmup_target=self.values["learning_rate"], warmup_steps=self.values["warmup_steps"]
        )
        # Set after construction: CosineDecay checks decay_steps > 0 in Python, and this is traced.
        schedule.decay_steps = self.values["decay_steps"]
        return schedule(self.optimizer.iterations)


def step_optimizer(config):
    """``make_optimizer`` for ``config`` with nothing run-specific baked in: the cosine or stepped
    rate comes from the step's arguments (``ScheduleFromArguments``); a constant rate is already
    the optimizer's own ``learning_rate`` variable, i.e. part of the carried optimizer state.
    Returns ``(optimizer, rate)``, ``rate`` None for the constant schedule. The optimizer's
    variables are the same as ``make_optimizer``'s (checkpoints are interchangeable)."""
    from conceptlib.kerascv.textual_inversion import make_optimizer

    rate = ScheduleFromArguments(config.lr_schedule) if config.lr_schedule in ("cosine", "stepped") else None
    optimizer = make_optimizer(
        config.learning_rate, config.steps, schedule=config.lr_schedule, warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay, clip_norm=config.clip_norm, lr_steps=config.lr_steps, rate=rate,
    )
    if rate is not None:
        rate.optimizer = optimizer
    return optimizer, rate


def sample_batch(key, data: dict, batch_size: int):
    """Draw one batch on the device: variant, template, posterior eps, noise, timesteps."""
    import jax
    import jax.numpy as jnp

    k_variant, k_template, k_eps, k_noise, k_time = jax.random.split(key, 5)
    variant = jax.random.randint(k_variant, (batch_size,), 0, data["variant_count"])
    image = data["image_of"][variant]
    count = data["prompt_count"][image]
    template = jnp.minimum(
        (jax.random.uniform(k_template, (batch_size,)) * count).astype(jnp.int32), count - 1
    )
    token_ids = data["prompts"][image, template]
    mean, std = data["mean"][variant], data["std"][variant]
    eps = jax.random.normal(k_eps, mean.shape, jnp.float32)
    latents = (mean + std * eps) * ti_math.VAE_SCALE
    noise = jax.random.normal(k_noise, mean.shape, jnp.float32)
    timesteps = jax.random.randint(k_time, (batch_size,), 0, ti_math.TRAIN_TIMESTEPS, jnp.int32)
    return latents, noise, timesteps, token_ids


def loss_and_grad_fn(ti):
    """``(new_rows, state, latents, noise, timesteps, token_ids) -> (loss, d loss / d new_rows)``,
    not jitted: the shared loss under ``jax.value_and_grad`` with respect to the new rows only."""
    import jax

    def loss(new_rows, state, latents, noise, timesteps, token_ids):
        return ti.loss_from_latents(new_rows, state, latents, noise, timesteps, token_ids)

    return jax.value_and_grad(loss)


def accumulated(value_and_grad, parts: int):
    """``value_and_grad(new_rows, state, *batch)`` run on ``parts`` equal parts of the batch one
    after another (``lax.scan``), their losses and gradients averaged: the whole batch's numbers
    (the mean of equal parts' means is the mean) in the memory of one part."""
    if parts == 1:
        return value_and_grad
    import jax
    import jax.numpy as jnp

    def run(new_rows, state, *batch):
        split = [x.reshape((parts, x.shape[0] // parts) + x.shape[1:]) for x in batch]

        def add(totals, part):
            loss, grad = value_and_grad(new_rows, state, *part)
            return (totals[0] + loss.astype(jnp.float32), totals[1] + grad.astype(new_rows.dtype)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros(new_rows.shape, new_rows.dtype))
        (loss, grad), _ = jax.lax.scan(add, zeros, split)
        return loss / parts, grad / parts

    return run


def make_train_step(ti, optimizer, batch_size: int, *, rate=None, steps_per_call: int = 1, mesh=None, parts: int = 1):
    """``train_step_fn(...)`` jitted, its carry donated."""
    import jax

    fn = train_step_fn(ti, optimizer, batch_size, rate=rate, steps_per_call=steps_per_call, mesh=mesh, parts=parts)
    return jax.jit(fn, donate_argnums=(0,))


def train_step_fn(ti, optimizer, batch_size: int, *, rate=None, steps_per_call: int = 1, mesh=None, parts: int = 1):
    """The training step, not jitted.

    ``step(carry, state, data, key) -> (carry, losses)`` where ``carry = (new_rows,
    optimizer_values, step_index)`` is donated, ``state = step_state(ti.frozen_state())``,
    ``data = DeviceData.tree()`` and ``key`` (the run's PRNG key) are arguments (never closed
    over), and ``losses`` has one float32 per step run (``steps_per_call`` of them). Step ``i``
    draws its batch from ``fold_in(key, i)``, so a resumed run sees the same batches as an
    uninterrupted one. ``mesh`` (a jax Mesh with a "batch" axis) spreads each batch over its
    devices: every device draws the whole batch (cheap, the same key), runs the loss and gradient
    on its slice under ``shard_map`` and the gradients are averaged (``pmean``); weights, data
    and the carry stay replicated. Per device, not partitioned by XLA, so custom calls such as
    cuDNN flash attention see their local shapes and the step stays exportable. ``rate`` is the
    optimizer's ScheduleFromArguments (``step_optimizer``), bound to ``data["schedule"]`` while
    tracing; None for an optimizer with its rate inside. ``parts`` > 1 (gradient accumulation)
    draws ``batch_size * parts`` samples per step and runs them ``batch_size`` at a time
    (``accumulated``).
    """
    import jax

    value_and_grad = loss_and_grad_fn(ti)
    if mesh is not None:
        value_and_grad = data_parallel(value_and_grad, mesh)
    value_and_grad = accumulated(value_and_grad, parts)

    def one_step(carry, state, data, key):
        new_rows, opt_values, index = carry
        sample = sample_batch(jax.random.fold_in(key, index), data, batch_size * parts)
        latents, noise, timesteps, token_ids = sample
        loss, grad = value_and_grad(new_rows, state, latents, noise, timesteps, token_ids)
        if rate is not None:
            rate.bind(data["schedule"])
        (new_rows,), opt_values = optimizer.stateless_apply(opt_values, [grad], [new_rows])
        return (new_rows, opt_values, index + 1), loss

    def step(carry, state, data, key):
        if steps_per_call == 1:
            carry, loss = one_step(carry, state, data, key)
            return carry, loss[None]
        return jax.lax.scan(lambda c, _: one_step(c, state, data, key), carry, None, length=steps_per_call)

    return step


def data_parallel(value_and_grad, mesh):
    """``value_and_grad(new_rows, state, *batch)`` run on each device of ``mesh`` for its slice
    of the batch (axis "batch"), the loss and gradient averaged over the devices. Every slice has
    the same size, so the average of the slices' mean losses is the batch's mean loss."""
    import jax
    from jax.sharding import PartitionSpec

    def local(new_rows, state, *batch):
        loss, grad = value_and_grad(new_rows, state, *batch)
        return jax.lax.pmean(loss, "batch"), jax.lax.pmean(grad, "batch")

    replicated, split = PartitionSpec(), PartitionSpec("batch")
    return jax.shard_map(
        local, mesh=mesh, in_specs=(replicated, replicated) + (split,) * 4, out_specs=(replicated, replicated),
        check_vma=False,  # the gradient is averaged explicitly above
    )
