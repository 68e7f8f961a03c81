"""The textual-inversion algorithm of the keras.io example, written with ``keras.ops`` so the
TensorFlow trainer (tf.GradientTape) and the JAX trainer (jax.value_and_grad) compute the same
loss from the same inputs.

The loss (per batch):

1. VAE posterior sample: the image encoder's ``layers[-2]`` gives mean and log-variance; the
   log-variance is clipped to [-30, 20]; ``latents = (mean + exp(logvar / 2) * eps) * 0.18215``.
2. Scaled-linear DDPM noise (beta 0.00085 -> 0.012, 1000 steps) added with keras-cv's
   ``NoiseScheduler.add_noise`` at uniformly drawn timesteps.
3. The text encoder runs on ``concat(frozen_table, new_rows)``: the prompt's placeholder
   positions hold ids ``vocab_size .. vocab_size + n - 1``, so only ``new_rows`` can receive
   gradient and no model variable is ever written.
4. The UNet predicts the noise from the noisy latents, the sinusoidal timestep embedding (320)
   and the text encoding; the loss is the mean squared error against the noise.

All randomness (posterior eps, noise, timesteps) is an input (see ``TextualInversion.loss``), so
the same batch gives the same loss on either backend, and runs are reproducible from a seed.

Nothing here imports keras at module import time; the backend must be chosen first.
"""

from __future__ import annotations

import math
import threading

VAE_SCALE = 0.18215
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
TIMESTEP_DIM = 320
MAX_LENGTH = 77
START_OF_TEXT, END_OF_TEXT = 49406, 49407
LATENT_CHANNELS = 4


def make_noise_scheduler():
    """keras-cv's NoiseScheduler with Stable Diffusion's scaled-linear training schedule."""
    from conceptlib.kerascv.sd_modules import stable_diffusion_module

    return stable_diffusion_module("noise_scheduler").NoiseScheduler(
        train_timesteps=TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
    )


def timestep_embedding(timesteps, dim: int = TIMESTEP_DIM, max_period: int = 10000):
    """Sinusoidal embedding (B,) int -> (B, dim) float32: [cos(t * f), sin(t * f)], the same as
    keras-cv's ``_get_timestep_embedding`` and the keras.io example, vectorized over the batch."""
    from keras import ops

    half = dim // 2
    freqs = ops.exp(-math.log(max_period) * ops.arange(0, half, dtype="float32") / half)
    args = ops.cast(ops.reshape(timesteps, (-1, 1)), "float32") * ops.reshape(freqs, (1, -1))
    return ops.concatenate([ops.cos(args), ops.sin(args)], axis=-1)


def encode_prompt(tokenizer, prompt: str, token: str, new_ids) -> list[int]:
    """Token ids (length 77, padded with end-of-text) for ``prompt``, with every occurrence of
    ``token`` replaced by ``new_ids`` (all of the concept's vectors, in order).

    A token that starts or ends with a letter or digit (a bare word such as ``mydoll``) is found
    only as a whole word there, as ``conceptlib.apply`` and other tools find it when generating:
    not inside ``mydollhouse``, and ``hoto`` not inside ``photo``.

    Raises ValueError if the prompt does not fit in 77 tokens (saying by how much).
    """
    import regex

    word = r"[\p{L}\p{N}]"
    token = token.lower()
    pattern = (f"(?<!{word})" if token[0].isalnum() else "") + regex.escape(token) + (f"(?!{word})" if token[-1].isalnum() else "")
    ids = [START_OF_TEXT]
    parts = regex.split(pattern, prompt.lower())
    for index, part in enumerate(parts):
        if index:
            ids.extend(int(i) for i in new_ids)
        if part.strip():
            ids.extend(tokenizer.encode(part)[1:-1])
    ids.append(END_OF_TEXT)
    if len(ids) > MAX_LENGTH:
        raise ValueError(
            f"prompt {prompt!r} needs {len(ids)} tokens, {len(ids) - MAX_LENGTH} more than the "
            f"text encoder's {MAX_LENGTH}"
        )
    return ids + [END_OF_TEXT] * (MAX_LENGTH - len(ids))


def initial_rows(table, init_ids, num_vectors: int, rng):
    """Starting vectors (num_vectors, dim) float32.

    With ``init_ids`` (the token ids of the init words) the ids are spread over the vectors in
    order: with more vectors than ids each id's row is repeated over a contiguous span; with
    fewer, each vector is the mean of a contiguous group of ids. Without, random normal vectors
    with the table's mean norm scale.
    """
    import numpy as np

    table = np.asarray(table, dtype=np.float32)
    dim = table.shape[1]
    if init_ids:
        ids = np.asarray(list(init_ids), dtype=np.int64)
        if len(ids) >= num_vectors:
            groups = np.array_split(ids, num_vectors)
        else:
            groups = [ids[[int(i * len(ids) / num_vectors)]] for i in range(num_vectors)]
        return np.stack([table[g].mean(axis=0) for g in groups]).astype(np.float32)
    scale = float(np.linalg.norm(table, axis=1).mean()) / math.sqrt(dim)
    return (rng.standard_normal((num_vectors, dim)) * scale).astype(np.float32)


# A stepped learning rate ("0.05:10, 0.005:200, 0.001", AUTOMATIC1111's syntax) has at most this
# many pieces: the jax trainer's compiled step takes them as fixed-size arguments.
MAX_LR_PIECES = 16
_NO_BOUNDARY = 1e30  # pads the boundaries: a step never passes it


def stepped_rate_numbers(lr_steps) -> tuple[list[float], list[float]]:
    """``(boundaries, values)``, each MAX_LR_PIECES float32 numbers, for ``lr_steps``
    (``[[rate, until_step or None], ...]``): update ``i`` (from 0) uses ``values[k]``, ``k`` the
    number of boundaries below ``i``, so a rate given "until step N" serves updates 0..N-1 of its
    span, as AUTOMATIC1111 counts."""
    rates = [float(rate) for rate, _ in lr_steps]
    boundaries = [float(until) - 1 for _, until in lr_steps[:-1]]
    pad = MAX_LR_PIECES - len(rates)
    return boundaries + [_NO_BOUNDARY] * (pad + 1), rates + rates[-1:] * pad


def stepped_rate(boundaries, values, iteration):
    """The stepped learning rate at optimizer ``iteration`` (``stepped_rate_numbers``' arrays;
    keras ops, so one function serves both backends and traced arguments)."""
    from keras import ops

    passed = ops.sum(ops.cast(ops.greater(ops.cast(iteration, "float32"), boundaries), "int32"))
    return ops.take(ops.convert_to_tensor(values, "float32"), passed)


def make_optimizer(
    learning_rate: float,
    steps: int,
    *,
    schedule: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.004,
    clip_norm: float = 10.0,
    lr_steps=None,
    rate=None,
):
    """The keras.io example's optimizer: Adam with (decoupled) weight decay, cosine decay over the
    run and global gradient-norm clipping. ``schedule="constant"`` keeps the rate fixed;
    ``"stepped"`` follows ``lr_steps`` (``stepped_rate``). ``rate`` (a keras learning-rate
    callable) replaces the cosine or stepped schedule by one computing the same rates another way
    (the jax trainer reads the schedule's numbers from its step's arguments)."""
    import keras

    if schedule == "stepped" and rate is None:
        boundaries, values = stepped_rate_numbers(lr_steps)
        # keras calls a callable rate with no argument: it reads the optimizer's own iteration.
        optimizer = _adam(lambda: stepped_rate(boundaries, values, optimizer.iterations), weight_decay, clip_norm)
        return optimizer
    if schedule == "cosine" and rate is None:
        decay_steps = max(1, steps - warmup_steps)
        if warmup_steps:
            rate = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps, warmup_target=learning_rate, warmup_steps=warmup_steps
            )
        else:
            rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
    elif schedule == "constant":
        rate = learning_rate
    elif schedule not in ("cosine", "stepped"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'cosine', 'constant' or 'stepped'")
    return _adam(rate, weight_decay, clip_norm)


def _adam(rate, weight_decay: float, clip_norm: float):
    import keras

    return keras.optimizers.Adam(
        learning_rate=rate,
        weight_decay=weight_decay or None,
        epsilon=1e-8,
        global_clipnorm=clip_norm or None,
    )


def _token_embedding_layer(text_encoder):
    for layer in text_encoder.layers:
        if hasattr(layer, "token_embedding") and hasattr(layer, "position_embedding"):
            return layer
    raise ValueError(f"{type(text_encoder).__name__} has no CLIPEmbedding layer; not a KerasCV text encoder")


class TextualInversion:
    """The frozen models of one run and the loss as a pure function of (new_rows, state, batch).

    ``state = ti.frozen_state()`` gathers every frozen weight (the token and position tables, and
    each model's variables); ``ti.loss(new_rows, state, batch)`` is side-effect free, so it can
    run under ``tf.GradientTape`` reading live variables, or under ``jax.value_and_grad`` /
    ``jax.jit`` with ``state`` passed as an argument.

    ``batch`` is a dict of arrays:
      images          (B, R, R, 3) float32 in [-1, 1]
      token_ids       (B, 77) int32, placeholder positions already hold the new ids
      posterior_noise (B, R/8, R/8, 4) float32  (eps of the VAE posterior sample)
      noise           (B, R/8, R/8, 4) float32  (the DDPM noise the UNet must predict)
      timesteps       (B,) int32 in [0, 1000)
    """

    def __init__(self, text_encoder, diffusion_model, image_encoder=None, decoder=None):
        import keras

        self.text_encoder = text_encoder
        self.diffusion_model = diffusion_model
        self.decoder = decoder
        embedding = _token_embedding_layer(text_encoder)
        self._token_table = embedding.token_embedding.embeddings
        self._position_table = embedding.position_embedding.embeddings
        self.vocab_size, self.dim = (int(s) for s in self._token_table.shape)
        # The encoder without its embedding layer: shares the layers (and weights) of the
        # original, so nothing is copied.
        self.text_tail = keras.Model(embedding.output, text_encoder.output, name="text_encoder_tail")
        self.posterior = None
        if image_encoder is not None:
            self.posterior = keras.Model(
                image_encoder.inputs, image_encoder.layers[-2].output, name="vae_posterior"
            )
        self.scheduler = make_noise_scheduler()
        self._sampler = None  # (key, compiled denoise + decode): see _compiled_sampler
        self.sampler_traces = 0  # how often the sampler was traced (each trace compiles)
        # One sampler call at a time: a preview waits for a background warm-up's compile and
        # reuses it instead of compiling the same function a second time.
        self._sampler_lock = threading.Lock()

    def new_ids(self, num_vectors: int) -> list[int]:
        """The ids the concept's vectors take in the extended table."""
        return list(range(self.vocab_size, self.vocab_size + num_vectors))

    def token_table(self):
        """The frozen token-embedding table as a numpy array (vocab_size, dim)."""
        from keras import ops

        return ops.convert_to_numpy(self._token_table)

    @staticmethod
    def _values(model):
        return (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    def frozen_variables(self) -> dict:
        """``frozen_state()``'s structure with the keras Variables themselves as its leaves (so a
        caller can tell which weight each leaf of the state is)."""
        def both(model):
            return list(model.trainable_variables), list(model.non_trainable_variables)

        variables = {
            "token_table": self._token_table,
            "position_table": self._position_table,
            "text": both(self.text_tail),
            "unet": both(self.diffusion_model),
        }
        if self.posterior is not None:
            variables["vae"] = both(self.posterior)
        return variables

    def frozen_state(self) -> dict:
        """Every frozen weight the loss reads, as a dict pytree of backend arrays."""
        state = {
            "token_table": self._token_table.value,
            "position_table": self._position_table.value,
            "text": self._values(self.text_tail),
            "unet": self._values(self.diffusion_model),
        }
        if self.posterior is not None:
            state["vae"] = self._values(self.posterior)
        return state

    # --- the pieces of the loss -------------------------------------------------------------

    def encode_text(self, new_rows, state, token_ids):
        """Text encoding (B, 77, dim) with the extended table ``concat(frozen, new_rows)``."""
        from keras import ops

        table = state["token_table"]
        table = ops.concatenate([table, ops.cast(new_rows, table.dtype)], axis=0)
        length = ops.shape(token_ids)[1]
        hidden = ops.take(table, token_ids, axis=0) + ops.expand_dims(state["position_table"][:length], 0)
        encoded, _ = self.text_tail.stateless_call(*state["text"], hidden)
        return encoded

    def encode_latents(self, state, images, posterior_noise):
        """VAE posterior sample x 0.18215 (the keras.io example's sample_from_encoder_outputs)."""
        from keras import ops

        if self.posterior is None:
            raise ValueError("TextualInversion was built without an image encoder")
        moments, _ = self.posterior.stateless_call(*state["vae"], images)
        mean, logvar = ops.split(moments, 2, axis=-1)
        logvar = ops.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
        return (mean + ops.exp(0.5 * logvar) * posterior_noise) * VAE_SCALE

    def loss_from_latents(self, new_rows, state, latents, noise, timesteps, token_ids):
        """MSE between the UNet's noise prediction and the noise (latents already encoded)."""
        from keras import ops

        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        context = self.encode_text(new_rows, state, token_ids)
        t_emb = timestep_embedding(timesteps)
        predicted, _ = self.diffusion_model.stateless_call(*state["unet"], [noisy, t_emb, context])
        return ops.mean(ops.square(ops.cast(predicted, "float32") - ops.cast(noise, "float32")))

    def loss(self, new_rows, state, batch):
        """The training loss for one batch; a pure function of its arguments."""
        latents = self.encode_latents(state, batch["images"], batch["posterior_noise"])
        return self.loss_from_latents(
            new_rows, state, latents, batch["noise"], batch["timesteps"], batch["token_ids"]
        )

    # --- previews ---------------------------------------------------------------------------

    def sample(self, new_rows, token_ids, latent_noise, *, num_steps: int = 10, guidance: float = 7.5):
        """Generate images (uint8, (B, R, R, 3)) for ``token_ids`` with the current vectors:
        keras-cv's DDIM loop (eta 0, classifier-free guidance) with the given start noise.
        Needs the decoder.

        The text encoding, the whole loop and the decoder run as ONE compiled function
        (``jax.jit`` / ``tf.function``) that takes every weight as an argument, compiled on the
        first call and kept on this object, so later previews only run it."""
        import numpy as np

        decoded = self.sample_decoded(new_rows, token_ids, latent_noise, num_steps=num_steps, guidance=guidance)
        return np.clip((decoded + 1) / 2 * 255, 0, 255).astype(np.uint8)

    def sample_decoded(self, new_rows, token_ids, latent_noise, *, num_steps: int = 10, guidance: float = 7.5):
        """``sample`` before the conversion to uint8: the decoder's float32 output (B, R, R, 3)."""
        import numpy as np
        from keras import ops

        if self.decoder is None:
            raise ValueError("TextualInversion was built without a decoder")
        embeddings, coefficients = ddim_schedule(num_steps)
        unconditional = np.full((1, MAX_LENGTH), END_OF_TEXT, dtype=np.int32)
        unconditional[0, 0] = START_OF_TEXT
        args = (
            new_rows,
            np.asarray(token_ids, dtype=np.int32),
            unconditional,
            np.asarray(latent_noise, dtype=np.float32),
            embeddings,
            coefficients,
            np.float32(guidance),
        )
        with self._sampler_lock:
            # Tensors, so tf.function traces once per shape rather than once per value.
            decoded = self._compiled_sampler()(*(ops.convert_to_tensor(a) for a in args))
        return np.asarray(ops.convert_to_numpy(decoded), dtype=np.float32)

    def _sample_state(self) -> dict:
        """The weights ``_denoise_and_decode`` reads."""
        return {
            "token_table": self._token_table.value,
            "position_table": self._position_table.value,
            "text": self._values(self.text_tail),
            "unet": self._values(self.diffusion_model),
            "decoder": self._values(self.decoder),
        }

    def _compiled_sampler(self):
        """``_denoise_and_decode`` compiled for the backend: ``(new_rows, token_ids,
        unconditional, noise, embeddings, coefficients, guidance) -> decoded``.

        Built once and reused while the models' layers keep the calls it traced: an attention or
        kernel patch (conceptlib.kerascv.attention, the jax trainer's) installed or restored
        since gives a new one.
        """
        import keras

        key = (keras.backend.backend(), _call_overrides(self.text_tail, self.diffusion_model, self.decoder))
        if self._sampler is not None and self._sampler[0] == key:
            return self._sampler[1]
        if key[0] == "jax":
            import jax

            # The weights are ARGUMENTS: closed over, XLA would constant-fold ~1B of them for minutes.
            # On CPU, XLA's algebraic simplifier folds PaddedConv2D's zero padding into the
            # convolution, and XLA:CPU runs padded 3x3 convolutions on the UNet's 1x1 and 2x2
            # levels ~30x slower than pad + valid conv (measured: the 64 px UNet 5.6 s jitted
            # against 1.1 s op by op; 1.0 s without the pass).
            options = {"xla_disable_hlo_passes": "algsimp"} if jax.default_backend() == "cpu" else None
            jitted = jax.jit(self._denoise_and_decode, compiler_options=options)

            def run(*args):
                return jitted(self._sample_state(), *args)

        elif key[0] == "tensorflow":
            import tensorflow as tf

            # Variables read inside a tf.function stay variable reads (nothing is folded).
            run = tf.function(lambda *args: self._denoise_and_decode(self._sample_state(), *args), autograph=False)
        else:
            def run(*args):
                return self._denoise_and_decode(self._sample_state(), *args)

        self._sampler = (key, run)
        return run

    def _denoise_and_decode(self, state, new_rows, token_ids, unconditional, latent, embeddings, coefficients, guidance):
        """The DDIM loop (see ``ddim_schedule``) and the decoder, a pure function of its arguments.

        Each step computes, in the order and dtypes of keras-cv's loop (a Python float times a
        tensor takes the tensor's dtype, hence the casts to eps's dtype)::

            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            pred_x0 = (latent - sqrt(1 - a_t) * eps) / sqrt(a_t)
            latent = eps * sqrt(1 - a_prev) + sqrt(a_prev) * pred_x0
        """
        from keras import ops

        self.sampler_traces += 1  # runs while jax.jit / tf.function trace, not per call
        batch = int(token_ids.shape[0])
        context = self.encode_text(new_rows, state, token_ids)
        uncond = ops.repeat(self.encode_text(new_rows, state, unconditional), batch, axis=0)
        context = ops.concatenate([uncond, context])

        def step(index, latent):
            t_emb = ops.expand_dims(ops.take(embeddings, index, axis=0), 0)
            t_emb = ops.broadcast_to(t_emb, (2 * batch, TIMESTEP_DIM))
            both, _ = self.diffusion_model.stateless_call(
                *state["unet"], [ops.concatenate([latent, latent]), t_emb, context], training=False
            )
            eps_uncond, eps_cond = both[:batch], both[batch:]
            sqrt_1m_at, sqrt_at, sqrt_1m_prev, sqrt_prev = (coefficients[index, i] for i in range(4))
            eps = eps_uncond + ops.cast(guidance, both.dtype) * (eps_cond - eps_uncond)
            pred_x0 = (latent - ops.cast(sqrt_1m_at, both.dtype) * eps) / sqrt_at
            latent = eps * ops.cast(sqrt_1m_prev, both.dtype) + sqrt_prev * pred_x0
            return ops.cast(latent, "float32")

        latent = ops.fori_loop(0, int(embeddings.shape[0]), step, ops.cast(latent, "float32"))
        decoded, _ = self.decoder.stateless_call(*state["decoder"], latent, training=False)
        return decoded


def ddim_schedule(num_steps: int):
    """The preview's DDIM schedule in loop order (noisiest step first), as float32 arrays: each
    step's timestep embedding (num_steps, 320) and coefficients (num_steps, 4)
    ``[sqrt(1 - a_t), sqrt(a_t), sqrt(1 - a_prev), sqrt(a_prev)]``, where ``a`` is keras-cv's
    ``_ALPHAS_CUMPROD`` at the step's timestep and at the previous one (1.0 before the first).
    The square roots are taken in float64, then rounded, as Python floats times tensors are."""
    import numpy as np
    from keras import ops

    from conceptlib.kerascv.sd_modules import stable_diffusion_module

    _ALPHAS_CUMPROD = stable_diffusion_module("constants")._ALPHAS_CUMPROD

    ratio = (TRAIN_TIMESTEPS - 1) / (num_steps - 1) if num_steps > 1 else TRAIN_TIMESTEPS
    timesteps = (np.arange(0, num_steps) * ratio).round().astype(np.int64)
    alphas = [_ALPHAS_CUMPROD[t] for t in timesteps]
    alphas_prev = [1.0] + alphas[:-1]
    coefficients = [
        [math.sqrt(1 - a_t), math.sqrt(a_t), math.sqrt(1.0 - a_prev), math.sqrt(a_prev)]
        for a_t, a_prev in zip(alphas, alphas_prev)
    ]
    embeddings = ops.convert_to_numpy(timestep_embedding(timesteps[::-1].astype(np.int32)))
    return np.asarray(embeddings, dtype=np.float32), np.asarray(coefficients[::-1], dtype=np.float32)


def _call_overrides(*models) -> tuple:
    """(layer id, call) for each layer of ``models`` whose ``call`` is replaced on the instance;
    holding the calls keeps their ids from being reused."""
    return tuple(
        (id(layer), vars(layer)["call"])
        for model in models
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if "call" in vars(layer)
    )
