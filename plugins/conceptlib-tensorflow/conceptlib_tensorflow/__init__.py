"""conceptlib's reference trainer: textual inversion on the Keras 3 TensorFlow backend.

Importing this module is cheap; TensorFlow, Keras and keras-cv are imported inside ``run``, after
the CLI has set ``KERAS_BACKEND=tensorflow``.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Models built in this process, keyed by what they depend on. Training never writes a model
# variable (only the new vectors learn), so repeated runs in one process (tests, benchmarks) can
# share them. Unlike the jax trainer's, kept for every setting: dropping one set while another
# is built crashed a TensorFlow process (SIGSEGV in the CI run of 8b55418), not understood yet.
_MODELS: dict = {}


def build_models(base_model: str, resolution: int, weights, *, decoder: bool = False):
    """A TextualInversion over keras-cv's text encoder, UNet and VAE encoder (and decoder when
    previews are wanted), built once per process for the same arguments."""
    from conceptlib.kerascv import models
    from conceptlib.kerascv.textual_inversion import TextualInversion

    key = (base_model, resolution, tuple(sorted((k, str(v)) for k, v in (weights or {}).items())))
    cached = _MODELS.get(key)
    if cached is None or (decoder and cached.decoder is None):
        if cached is None:
            text_encoder = models.build_text_encoder(base_model, weights)
            diffusion_model = models.build_diffusion_model(base_model, resolution, weights)
            image_encoder = models.build_image_encoder(resolution, weights)
        else:
            text_encoder, diffusion_model = cached.text_encoder, cached.diffusion_model
            image_encoder = cached.image_encoder
        dec = models.build_decoder(base_model, resolution, weights) if decoder else None
        cached = TextualInversion(text_encoder, diffusion_model, image_encoder, dec)
        cached.image_encoder = image_encoder
        _MODELS[key] = cached
    return cached


def loss_and_grad(ti, rows, state, batch, parts: int = 1):
    """``(loss, d loss / d rows)`` for ``batch`` (``rows``: the new vectors as a tensor). With
    ``parts`` > 1 the batch runs as that many equal parts, one at a time, and their losses and
    gradients are averaged: the same numbers as the whole batch at once (the mean of equal
    parts' means is the mean), in the memory of one part."""
    import tensorflow as tf

    def one(part):
        with tf.GradientTape() as tape:
            tape.watch(rows)
            loss = ti.loss(rows, state, part)
        # tf.gather's gradient is IndexedSlices: densify it to add them up.
        return loss, tf.convert_to_tensor(tape.gradient(loss, rows))

    if parts == 1:
        return one(batch)
    split = {key: tf.reshape(value, [parts, -1, *value.shape[1:]]) for key, value in batch.items()}

    def add(i, loss_sum, grad_sum):
        loss, grad = one({key: value[i] for key, value in split.items()})
        return i + 1, loss_sum + loss, grad_sum + grad

    _, loss_sum, grad_sum = tf.while_loop(
        lambda i, *_: i < parts, add, (tf.constant(0), tf.zeros([], tf.float32), tf.zeros_like(rows))
    )
    return loss_sum / parts, grad_sum / parts


def make_train_step(ti, rows, optimizer, parts: int = 1):
    """A tf.function running one optimisation step on ``rows`` (a keras.Variable holding the new
    vectors) and returning the loss; ``parts``: gradient accumulation (``loss_and_grad``).
    Gradient flows only into ``rows``: every model weight is read, never written."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(batch):
        loss, grad = loss_and_grad(ti, rows.value, ti.frozen_state(), batch, parts)
        optimizer.apply_gradients([(grad, rows)])
        return loss

    return step


class TensorFlowTrainer:
    """The ``tensorflow`` trainer (conceptlib.training.Trainer)."""

    name = "tensorflow"
    version = __version__
    backend = "tensorflow"

    def run(self, job):
        import numpy as np

        from conceptlib.errors import TrainingError
        from conceptlib.kerascv import ignore_one_pixel_attention_warning, keras_module
        from conceptlib.kerascv.textual_inversion import make_optimizer
        from conceptlib.training import TrainingResult

        config = job.config
        job.stage(f"building the {config.base_model} models")
        keras = keras_module()  # TensorFlow imported without its import notices
        ignore_one_pixel_attention_warning()
        ti = build_models(config.base_model, config.resolution, job.weights, decoder=job.wants_previews)
        if ti.vocab_size != job.vocab_size:
            raise TrainingError(
                f"the text encoder has {ti.vocab_size} tokens but the tokenizer {job.vocab_size}; "
                "the weights do not belong to this base model"
            )
        rows = keras.Variable(job.initial_vectors(ti.token_table()), dtype="float32", name="concept_vectors")
        optimizer = make_optimizer(
            config.learning_rate,
            config.steps,
            schedule=config.lr_schedule,
            lr_steps=config.lr_steps,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            clip_norm=config.clip_norm,
        )
        optimizer.build([rows])
        checkpoint = job.load_checkpoint()
        if checkpoint is not None:
            rows.assign(checkpoint.vectors)
            if len(checkpoint.optimizer) != len(optimizer.variables):
                raise TrainingError("the checkpoint's optimizer state does not match this trainer; start a new run")
            for variable, value in zip(optimizer.variables, checkpoint.optimizer):
                variable.assign(value)
        job.checkpoint_fn = lambda: (
            np.asarray(rows.numpy()),
            [np.asarray(keras.ops.convert_to_numpy(v)) for v in optimizer.variables],
        )

        def preview(token_ids, noise):
            return ti.sample(rows.value, token_ids, noise, num_steps=config.preview_steps)

        if job.wants_previews:
            job.preview_fn = preview
        step = make_train_step(ti, rows, optimizer, config.grad_accum)
        job.stage("tracing the training step (the first step takes longer than the others)")
        for index in range(job.start_step, config.steps):
            loss = step(job.batch(index))
            job.step_done(index, float(loss))
        return TrainingResult(np.asarray(rows.numpy()), list(job.losses), job.final_preview(preview))
