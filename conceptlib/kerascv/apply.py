"""Apply any number of concepts to a keras-cv StableDiffusion / StableDiffusionV2 (contract 3).

How it works, and why it is fast: the text encoder is never rebuilt. Its token-embedding variable
is swapped for a new, larger one (the original table with every concept's vectors appended, one
resize for all concepts) and the tokenizer gets the new tokens. Each concept's token is one
tokenizer entry; a multi-vector concept's extra rows get ids without text, and the token's id is
expanded into all of its ids after tokenizing, so the user types the token once.

What a model holds is always the original table and tokenizer plus every loaded concept, rebuilt
from the original on each apply and unload: handles unload in any order, one token at a time if
need be (``unload(sd, tokens)``), and old tables are freed (the original and the current one stay;
a third exists while the next is built). When the last concept goes,
the original variable object and tokenizer state are put back, untouched, so encodings are
bit-identical. Compiled predict functions captured the old variable, so they are dropped on every
swap.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from conceptlib.concept import DIMS, Concept, suggested_token
from conceptlib.errors import ApplyError, ConceptError, ConceptFileError, PromptTooLongError
from conceptlib.interrupts import ctrl_c_deferred

MAX_PROMPT_LENGTH = 77
_CONCEPT_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")
# Placeholder vocabulary entries for the 2nd..nth vector of a multi-vector concept. They hold ids
# (and decode to something readable) but are not special tokens, so no text ever tokenizes to them.
_EXTRA_VECTOR = "{token}#{index}"
_PAD_ENTRY = "<|conceptlib-pad-{index}|>"


# -- resolving what the caller passed ------------------------------------------------------------


def _load_path(path: Path) -> list[Concept]:
    if not path.exists():
        raise ConceptFileError(f"{path}: no such file; check the path")
    from conceptlib.formats import load_any

    return list(load_any(path))


def _is_header(item) -> bool:
    return hasattr(item, "path") and hasattr(item, "token")


def resolve_concepts(concepts, library=None) -> list[Concept]:
    """Turn library names, tokens, file paths, ConceptHeaders and Concept objects into Concepts.

    A string is an existing file, else a library name or token, else a folder or path (tokens
    may contain '/', e.g. '<style/oil>'). ``library`` is a ConceptLibrary or its root folder."""
    return _resolve_with_sources(concepts, library)[0]


def _resolve_with_sources(concepts, library=None) -> tuple[list[Concept], list[str]]:
    """resolve_concepts, and where each concept came from: "library", "file" or "object"."""
    if isinstance(concepts, (str, os.PathLike, Concept)) or _is_header(concepts):
        concepts = [concepts]
    try:
        concepts = list(concepts)
    except TypeError:
        raise ApplyError(
            f"cannot apply {concepts!r} ({type(concepts).__name__}); pass a list of library names, "
            "tokens, file paths or conceptlib.Concept objects"
        ) from None
    if isinstance(library, (str, os.PathLike)):
        from conceptlib.library import ConceptLibrary

        library = ConceptLibrary(library)
    elif library is not None and not hasattr(library, "list"):
        raise ApplyError(f"library={library!r}: pass a ConceptLibrary or its folder (or leave it out for the default)")
    resolved: list[Concept] = []
    sources: list[str] = []
    by_ref = None
    for item in concepts:
        before = len(resolved)
        source = "file"
        if isinstance(item, Concept):
            resolved.append(_checked_again(item))
            source = "object"
        elif isinstance(item, os.PathLike):
            resolved.extend(_load_path(Path(item)))
        elif isinstance(item, str):
            try:
                path = Path(item).expanduser()
            except RuntimeError:  # '~cat', a valid token, names no user's home
                path = Path(item)
            if _path_says(path.is_file):
                resolved.extend(_load_path(path))
            else:
                if library is None:
                    from conceptlib.library import ConceptLibrary

                    library = ConceptLibrary()
                if by_ref is None:
                    # One listing for all lookups (header reads only), not one scan per reference.
                    by_ref = {}
                    for header in library.list():
                        by_ref.setdefault(header.token, header)
                        by_ref[header.name] = header
                header = by_ref.get(item)
                if header is None and (_path_says(path.exists) or os.sep in item or item.endswith(_CONCEPT_SUFFIXES)):
                    resolved.extend(_load_path(path))  # a folder, or a path that is not there
                elif header is None:
                    resolved.append(library.get(item))  # raises NotFoundError with A's message
                    source = "library"
                else:
                    from conceptlib.files import read_concept

                    concept = read_concept(header.path)
                    if concept.name != header.name:
                        concept = Concept(header.name, concept.token, concept.vectors, concept.metadata)
                    resolved.append(concept)
                    source = "library"
        elif _is_header(item):  # a ConceptHeader
            from conceptlib.files import read_concept

            resolved.append(read_concept(item.path))
            source = "library"
        else:
            raise ApplyError(
                f"cannot apply {item!r} ({type(item).__name__}); pass library names, tokens, "
                "file paths or conceptlib.Concept objects"
            )
        sources.extend([source] * (len(resolved) - before))
    return resolved, sources


def _path_says(check) -> bool:
    """``check()`` (a path's is_file or exists), False where the text cannot be a path at all (too
    long for a file name): it may still be a token."""
    try:
        return check()
    except OSError:
        return False


def _checked_again(concept: Concept) -> Concept:
    """A Concept object as the caller holds it now: its fields may have been changed since it was
    made (a dataclass is mutable), so they are validated again, as a new Concept."""
    try:
        return Concept(concept.name, concept.token, concept.vectors, concept.metadata)
    except ConceptError as exc:
        raise ApplyError(f"cannot apply {concept.name!r}: {exc}") from None


# -- the model's pieces --------------------------------------------------------------------------


def token_embedding_layer(text_encoder):
    """The keras Embedding layer holding the text encoder's token table (found, not indexed)."""
    for layer in text_encoder._flatten_layers(include_self=False):
        inner = getattr(layer, "token_embedding", None)
        if inner is not None and hasattr(inner, "_embeddings"):
            return inner
    raise ApplyError(
        f"text encoder {text_encoder.name!r} has no CLIPEmbedding token table; conceptlib applies "
        "concepts to keras-cv's TextEncoder/TextEncoderV2 only"
    )


def _ensure_text_encoder(sd, base_model: str):
    if getattr(sd, "_text_encoder", None) is None:
        if hasattr(sd, "conceptlib_weights"):  # built by conceptlib: its property never downloads
            return sd.text_encoder
        # A plain keras-cv instance would download on first access: build through our weights
        # resolution instead (--weights / $CONCEPTLIB_WEIGHTS, the Keras cache, then download).
        from conceptlib.kerascv.models import build_text_encoder
        from conceptlib.weights import resolve_weights

        encoder = build_text_encoder(base_model, resolve_weights(base_model, parts=("text_encoder",)))
        if getattr(sd, "jit_compile", False):
            encoder.compile(jit_compile=True)
        sd._text_encoder = encoder
    return sd._text_encoder


def _ensure_tokenizer(sd):
    if getattr(sd, "_tokenizer", None) is None:
        from conceptlib.kerascv.tokenizer import make_tokenizer

        sd._tokenizer = make_tokenizer()
    return sd._tokenizer


def reset_compiled_functions(model) -> None:
    """Drop ``model``'s traced predict/train/test functions so the next call retraces with the
    current variables (a traced tf.function or jax.jit keeps using the variables it captured)."""
    for attribute in ("predict_function", "train_function", "test_function"):
        if hasattr(model, attribute):
            setattr(model, attribute, None)
    if hasattr(model, "_jax_state"):
        model._jax_state = None


def _swap_variable(layer, old, new) -> None:
    """Make ``new`` the layer's ``_embeddings`` in every place keras looks it up."""
    from keras.src.utils import tracking

    replaced = False
    for store in (layer._trainable_variables, layer._non_trainable_variables):
        for index, variable in enumerate(store):
            if variable is old:
                store[index] = new
                replaced = True
    if not replaced:
        raise ApplyError(f"layer {layer.name!r} does not track its embeddings variable; cannot apply concepts")
    with tracking.DotNotTrackScope():
        layer._embeddings = new


# -- the tokenizer step ---------------------------------------------------------------------------


def _expanding_encode(tokenizer, text):
    """The tokenizer's encode as it was before apply (keras-cv's, or a wrapper someone installed),
    then each multi-vector token's id expanded into all of its ids."""
    ids = tokenizer._conceptlib_base_encode(text)
    expansions = tokenizer._conceptlib_expansions
    if expansions:
        expanded = []
        for token_id in ids:
            expanded.extend(expansions.get(token_id, (token_id,)))
        ids = expanded
    if len(ids) > MAX_PROMPT_LENGTH:
        grown = len(ids) - len(tokenizer._conceptlib_base_encode(text)) if expansions else 0
        because = f" ({grown} of them from multi-vector concepts)" if grown else ""
        raise PromptTooLongError(
            f"prompt {text[:40] + '...' if len(text) > 40 else text!r} is {len(ids)} tokens{because}; "
            f"the text encoder takes {MAX_PROMPT_LENGTH} including start and end: shorten it by "
            f"{len(ids) - MAX_PROMPT_LENGTH} token{'s' if len(ids) - MAX_PROMPT_LENGTH > 1 else ''}"
        )
    return ids


_TOKENIZER_STATE = ("vocab", "encoder", "decoder", "special_tokens", "cache", "pat")


_CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _tokenizer_pattern(special_tokens):
    import regex as re

    from conceptlib.kerascv.tokenizer import applied_pattern

    concept_tokens = [token for token in special_tokens if token not in _CLIP_SPECIALS]
    return re.compile(applied_pattern(special_tokens, concept_tokens), re.IGNORECASE)


def _vocab_entry(tokenizer, token: str) -> str:
    """``token`` as the tokenizer's vocabulary spells it: keras-cv maps each matched piece's
    UTF-8 bytes to unicode before looking it up, so '<café>' is looked up as '<cafÃ©>'."""
    return _byte_encoded(tokenizer.byte_encoder, token)


def _byte_encoded(byte_encoder, text: str) -> str:
    return "".join(byte_encoder[byte] for byte in text.encode("utf-8"))


# -- what a model holds ---------------------------------------------------------------------------


@dataclass
class _Original:
    """The text encoder's table and the tokenizer as they were before any concept: put back
    object for object when the last concept is unloaded, so encodings are bit-identical."""

    text_encoder: object
    layer: object
    variable: object
    input_dim: int
    tokenizer_state: dict
    encode_attribute: object  # the tokenizer's instance-level encode before apply, or None


@dataclass
class _ModelConcepts:
    """Per StableDiffusion instance: its original state and the handles loaded now, in order.

    The applied state is always rebuilt from the original plus every loaded concept, so handles
    unload in any order and only the original and the current table are kept."""

    original: _Original | None = None
    handles: list = field(default_factory=list)
    applied_count: int = 0  # handles ever applied: orders them for ``with`` blocks
    token_ids: dict = field(default_factory=dict)  # every loaded token's ids now


# Token tables extended by one model's concepts: another StableDiffusion sharing the text encoder
# must not take the extended table for the original.
_EXTENDED_BY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_concepts(sd) -> _ModelConcepts:
    return sd.__dict__.setdefault("_conceptlib_applied", _ModelConcepts())


@dataclass
class _Installation:
    """Everything the model gets for a list of concepts, computed before anything changes."""

    variable: object
    input_dim: int
    tokenizer_state: dict
    expansions: dict
    token_ids: dict


def _installation(original: _Original, concepts: list, keras) -> _Installation:
    """The table, tokenizer state and ids for ``concepts`` on top of ``original`` (no mutation)."""
    import numpy as np

    state = original.tokenizer_state
    old_variable = original.variable
    table_rows = int(old_variable.shape[0])
    width = int(old_variable.shape[1])
    first_id = max(len(state["vocab"]), table_rows)

    vocab = list(state["vocab"])
    vocab.extend(_PAD_ENTRY.format(index=i) for i in range(len(vocab), first_id))
    token_ids: dict[str, tuple[int, ...]] = {}
    for concept in concepts:
        ids = tuple(range(len(vocab), len(vocab) + concept.num_vectors))
        vocab.append(_byte_encoded(state["byte_encoder"], concept.token))
        vocab.extend(
            _byte_encoded(state["byte_encoder"], _EXTRA_VECTOR.format(token=concept.token, index=i))
            for i in range(1, concept.num_vectors)
        )
        token_ids[concept.token] = ids
    rows = np.concatenate(
        [np.zeros((first_id - table_rows, width), np.float32)] + [concept.vectors for concept in concepts]
    ).astype(old_variable.dtype, copy=False)

    # Same path as the original ("clip_embedding/embedding/embeddings"), so the swapped-in
    # variable is indistinguishable to code that looks variables up by path.
    with contextlib.ExitStack() as scopes:
        for part in old_variable.path.split("/")[:-1]:
            scopes.enter_context(keras.name_scope(part))
        variable = keras.Variable(
            keras.ops.concatenate([old_variable.value, keras.ops.convert_to_tensor(rows)], axis=0),
            dtype=old_variable.dtype,
            trainable=old_variable.trainable,
            name=old_variable.name,
        )

    special_tokens = dict(state["special_tokens"])
    cache = dict(state["cache"])
    encoder = dict(state["encoder"])
    decoder = dict(state["decoder"])
    expansions: dict[int, tuple[int, ...]] = {}
    for index in range(len(state["vocab"]), len(vocab)):
        decoder[index] = vocab[index]
    # Only the tokens themselves go into the encoder: a placeholder ('<x>#1') there would take
    # the id of a concept whose token is spelled the same. They decode as a word of their own
    # (the '</w>' every CLIP word ends with), and the extra vectors' ids decode to nothing.
    for token, ids in token_ids.items():
        entry = vocab[ids[0]]
        encoder[entry] = ids[0]
        decoder[ids[0]] = entry + "</w>"
        for extra in ids[1:]:
            decoder[extra] = ""
        special_tokens[token] = token
        cache[entry] = entry
        if len(ids) > 1:
            expansions[ids[0]] = ids
    tokenizer_state = {
        "vocab": vocab, "encoder": encoder, "decoder": decoder, "special_tokens": special_tokens,
        "cache": cache, "pat": _tokenizer_pattern(special_tokens),
    }
    return _Installation(variable, len(vocab), tokenizer_state, expansions, token_ids)


def _set_table(original: _Original, variable, input_dim: int) -> None:
    _swap_variable(original.layer, original.layer._embeddings, variable)
    original.layer.input_dim = input_dim  # what get_config (a clone, a save) reports


def _install(sd, model: _ModelConcepts, installation: _Installation) -> None:
    """Give the model ``installation`` (nothing here can fail on bad input)."""
    original = model.original
    tokenizer = sd._tokenizer
    _set_table(original, installation.variable, installation.input_dim)
    for name, value in installation.tokenizer_state.items():
        setattr(tokenizer, name, value)
    tokenizer._conceptlib_expansions = installation.expansions
    tokenizer._conceptlib_base_encode = original.encode_attribute or types.MethodType(type(tokenizer).encode, tokenizer)
    tokenizer.encode = types.MethodType(_expanding_encode, tokenizer)
    reset_compiled_functions(sd._text_encoder)
    model.token_ids = installation.token_ids
    _EXTENDED_BY[original.layer] = weakref.ref(model)


def _restore(sd, model: _ModelConcepts) -> None:
    """Put the original table and tokenizer back, object for object (the table into the text
    encoder the concepts were applied to, even if ``sd`` holds another one now)."""
    original = model.original
    tokenizer = sd._tokenizer
    _set_table(original, original.variable, original.input_dim)
    reset_compiled_functions(original.text_encoder)
    _EXTENDED_BY.pop(original.layer, None)
    for name in _TOKENIZER_STATE:
        setattr(tokenizer, name, original.tokenizer_state[name])
    for name in ("_conceptlib_expansions", "_conceptlib_base_encode"):
        tokenizer.__dict__.pop(name, None)
    if original.encode_attribute is None:
        tokenizer.__dict__.pop("encode", None)
    else:
        tokenizer.encode = original.encode_attribute
    model.original = None


def _keep_only(sd, keep: dict) -> None:
    """Leave loaded only the concepts in ``keep`` (handle -> its concepts to keep), every other
    loaded handle unloaded, with one rebuild of the table (or the original put back). Everything
    is checked first."""
    model = _model_concepts(sd)
    remaining = [(handle, keep.get(handle, [])) for handle in model.handles]
    concepts = [concept for _, kept in remaining for concept in kept]
    if concepts and _text_encoder_replaced(sd, model):
        raise _replaced_error()  # unloading all still works: the original encoder gets its table back
    _check_layer(model.original.layer, since=True)
    if concepts:
        from conceptlib.kerascv import keras_module

        installation = _installation(model.original, concepts, keras_module())
    with ctrl_c_deferred():  # the change is whole, or not made
        if concepts:
            _install(sd, model, installation)
        else:
            _restore(sd, model)
        _settle(model, remaining)


def _settle(model: _ModelConcepts, remaining) -> None:
    """Handles after a rebuild: those keeping concepts get their ids now; the others are unloaded
    (they keep the concepts they held last, to say what they held, and no ids)."""
    for handle, kept in remaining:
        if kept:
            handle.concepts = list(kept)
            handle.token_ids = {c.token: model.token_ids[c.token] for c in kept}
        else:
            handle.loaded = False
            handle.token_ids = {}
    model.handles = [handle for handle, kept in remaining if kept]


def _text_encoder_replaced(sd, model: _ModelConcepts) -> bool:
    if model.original is None:
        return False
    text_encoder = getattr(sd, "_text_encoder", None)
    return text_encoder is None or token_embedding_layer(text_encoder) is not model.original.layer


def _replaced_error() -> ApplyError:
    return ApplyError(
        "this model's text encoder was replaced after concepts were applied to it; put back the text encoder "
        "they were applied to, or call conceptlib.unload(sd) (all of them) to start again"
    )


# -- the handle -----------------------------------------------------------------------------------


class AppliedConcepts:
    """Concepts applied to one StableDiffusion instance by one ``apply`` call. ``unload()`` (or
    leaving the ``with`` block) takes them out again; once every concept is unloaded the text
    encoder and tokenizer are exactly as they were."""

    def __init__(self, sd, concepts, order: int):
        self.sd = sd
        self.concepts: list[Concept] = concepts
        #: token -> the embedding-table ids its vectors occupy now, in order (they can move when
        #: concepts applied earlier are unloaded).
        self.token_ids: dict[str, tuple[int, ...]] = {}
        self.loaded = True
        self._order = order
        self._entered: list[int] = []

    @property
    def tokens(self) -> list[str]:
        return [concept.token for concept in self.concepts]

    def encode(self, prompt: str) -> list[int]:
        """Token ids of ``prompt`` as the text encoder will see them (multi-vector expanded)."""
        self._check_loaded()
        return self.sd.tokenizer.encode(prompt)

    def _check_loaded(self) -> None:
        if not self.loaded:
            raise ApplyError(
                f"{', '.join(self.tokens)} {'was' if len(self.tokens) == 1 else 'were'} already unloaded; "
                "call conceptlib.apply(sd, ...) again for a new handle"
            )

    def unload(self) -> None:
        """Take this handle's concepts out of the model (idempotent; any order). Concepts other
        handles applied stay loaded."""
        if not self.loaded:
            return
        model = _model_concepts(self.sd)
        _keep_only(self.sd, {h: h.concepts for h in model.handles if h is not self})

    def __enter__(self) -> "AppliedConcepts":
        self._check_loaded()
        self._entered.append(_model_concepts(self.sd).applied_count)
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Leaving the block restores the model as it was before the block, however it is left:
        # every handle applied inside the block and still loaded is unloaded, and this one too
        # when this is its outermost block (handles applied before the block stay).
        entered = self._entered.pop()
        outermost = not self._entered
        model = _model_concepts(self.sd)
        if not ((outermost and self.loaded) or any(h._order > entered for h in model.handles)):
            return
        keep = {h: h.concepts for h in model.handles if h._order <= entered and (h is not self or not outermost)}
        try:
            _keep_only(self.sd, keep)
        except ApplyError as error:
            if exc is None:
                raise
            # The block's own error goes through; the failed clean-up is said beside it.
            exc.add_note(f"conceptlib could not unload on leaving the block: {error}")

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "unloaded"
        return f"<AppliedConcepts {state}: {', '.join(self.tokens)}>"


def applied(sd) -> list[AppliedConcepts]:
    """The handles loaded into ``sd`` now, in the order they were applied."""
    return list(_model_concepts(sd).handles)


def unload(sd, tokens=None) -> list[str]:
    """Unload concepts from ``sd``: every concept (``tokens`` left out), or the concepts with
    these tokens (a token or a list of them), whichever call applied them. Returns the tokens
    unloaded. For when a handle was not kept (a notebook cell run again)."""
    model = _model_concepts(sd)
    loaded = {token: handle for handle in model.handles for token in handle.tokens}
    if tokens is None:
        tokens = list(loaded)
    elif isinstance(tokens, AppliedConcepts):
        tokens = tokens.tokens if tokens.loaded else []
    elif isinstance(tokens, str):
        tokens = [tokens]
    elif not isinstance(tokens, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in tokens):
        raise ApplyError(f"unload(sd, {tokens!r}): pass a token, a list of tokens, a handle, or nothing (all)")
    tokens = list(tokens)
    missing = [token for token in tokens if token not in loaded]
    if missing:
        now = ", ".join(loaded) if loaded else "none"
        raise ApplyError(
            f"{', '.join(repr(t) for t in missing)} {'is' if len(missing) == 1 else 'are'} not applied to "
            f"this model (applied now: {now}); pass tokens of applied concepts, or leave tokens out to unload all"
        )
    if tokens:
        gone = set(tokens)
        _keep_only(sd, {h: [c for c in h.concepts if c.token not in gone] for h in model.handles})
    return tokens


# -- apply ----------------------------------------------------------------------------------------


# The public keras-cv class of each base model (what users build; conceptlib's own are subclasses).
_KERAS_CV_CLASSES = {"sd-1": "StableDiffusion", "sd-2": "StableDiffusionV2"}


def _check_widths(sd, base_model: str, concepts, width: int) -> None:
    for concept in concepts:
        if concept.dim != width:
            other = {dim: base for base, dim in DIMS.items()}.get(concept.dim, "another model")
            fix = f"use a concept trained for {base_model}"
            if other in _KERAS_CV_CLASSES:
                fix = f"apply it to a keras_cv.models.{_KERAS_CV_CLASSES[other]} ({other}) instead, or {fix}"
            raise ApplyError(
                f"concept {concept.name!r} ({concept.token}) has {concept.dim}-wide vectors ({other}) but "
                f"this keras_cv.models.{_KERAS_CV_CLASSES[base_model]}'s text encoder takes {width}-wide vectors "
                f"({base_model}); {fix}"
            )


def _another_token_advice(concept: Concept, source: str) -> str:
    """How to give ``concept`` another token, for where it came from."""
    suggestion = "<" + suggested_token(concept.token.strip("<>") + "-2") + ">"
    if source == "library":
        return f"`conceptlib rename {concept.name} NEW --token {shlex.quote(suggestion)}`"
    if source == "file":
        return (f"`conceptlib import FILE --token {shlex.quote(suggestion)}` then apply it by name, or pass "
                f"the loaded Concept's .renamed(token={suggestion!r})")
    return f"pass concept.renamed(token={suggestion!r})"


def _check_tokens(model: _ModelConcepts, tokenizer, concepts, sources) -> None:
    clip_encoder = model.original.tokenizer_state["encoder"] if model.original else tokenizer.encoder
    loaded = {token for handle in model.handles for token in handle.tokens}
    seen: dict[str, Concept] = {}
    for concept, source in zip(concepts, sources):
        if concept.token in seen:
            raise ApplyError(
                f"token {concept.token!r} is given twice ({seen[concept.token].name!r} and {concept.name!r}); "
                f"apply each concept once, or give one another token: {_another_token_advice(concept, source)}"
            )
        seen[concept.token] = concept
        if concept.token in loaded:
            raise ApplyError(
                f"token {concept.token!r} of concept {concept.name!r} is already applied to this model; unload "
                f"it first (conceptlib.unload(sd, [{concept.token!r}]) or its handle's .unload()), or give the "
                f"concept another token: {_another_token_advice(concept, source)}"
            )
        entry = _vocab_entry(tokenizer, concept.token)
        if entry in clip_encoder or entry + "</w>" in clip_encoder:
            raise ApplyError(
                f"token {concept.token!r} of concept {concept.name!r} is already in the CLIP vocabulary (a word "
                f"or special token), so prompts could not tell them apart; give the concept another token: "
                f"{_another_token_advice(concept, source)}"
            )


def _check_layer(layer, *, since: bool = False) -> None:
    """Concepts grow the plain embedding table; a LoRA or quantized table has other parts."""
    changed = ("LoRA enabled" if getattr(layer, "lora_enabled", False)
               else f"{layer.quantization_mode}-quantized" if getattr(layer, "quantization_mode", None) else None)
    if changed and since:
        raise ApplyError(
            f"the text encoder's token table was {changed} after concepts were applied, so they cannot be taken "
            "out of it; build the text encoder again (and apply concepts before enable_lora() / quantize())"
        )
    if changed:
        raise ApplyError(
            f"the text encoder's token table is {changed}; conceptlib extends a plain table: "
            "apply concepts before enable_lora() / quantize(), or to a text encoder without them"
        )


def apply(sd, concepts, library=None) -> AppliedConcepts:
    """Apply ``concepts`` (library names, tokens, file paths or Concept objects) to ``sd``, a
    keras-cv StableDiffusion or StableDiffusionV2, built or not, in one step.

    Everything is validated first (vector width vs the text encoder, tokens already in the
    vocabulary or applied, duplicates); on any error nothing is changed. Returns an
    AppliedConcepts handle (``.unload()``, context manager); ``unload(sd)`` unloads without one.
    """
    from conceptlib.kerascv.models import base_model_of

    base_model = base_model_of(sd)
    concepts, sources = _resolve_with_sources(concepts, library)
    if not concepts:
        raise ApplyError("no concepts to apply; pass library names, tokens, file paths or Concept objects")

    # Validate everything before changing anything, and before building (or downloading) the
    # text encoder: the widths are known from the model class.
    _check_widths(sd, base_model, concepts, DIMS[base_model])
    model = _model_concepts(sd)
    tokenizer = _ensure_tokenizer(sd)
    _check_tokens(model, tokenizer, concepts, sources)
    if _text_encoder_replaced(sd, model):  # before building one: nothing is changed on an error
        raise _replaced_error()
    text_encoder = _ensure_text_encoder(sd, base_model)
    layer = token_embedding_layer(text_encoder)
    _check_layer(layer, since=model.original is not None)
    owner = _EXTENDED_BY.get(layer)
    if owner is not None and owner() is not model:
        raise ApplyError(
            "this text encoder holds concepts applied through another StableDiffusion instance that shares it; "
            "apply these there too, or give each instance its own text encoder"
        )
    _check_widths(sd, base_model, concepts, int(layer.output_dim))

    from conceptlib.kerascv import keras_module

    original = model.original or _Original(
        text_encoder=text_encoder,
        layer=layer,
        variable=layer._embeddings,
        input_dim=layer.input_dim,
        tokenizer_state={name: getattr(tokenizer, name) for name in (*_TOKENIZER_STATE, "byte_encoder")},
        encode_attribute=tokenizer.__dict__.get("encode"),
    )
    loaded = [concept for handle in model.handles for concept in handle.concepts]
    installation = _installation(original, loaded + concepts, keras_module())

    # Mutate: nothing below can fail on bad input, and a Ctrl-C waits until it is whole.
    with ctrl_c_deferred():
        model.original = original
        _install(sd, model, installation)
        model.applied_count += 1
        handle = AppliedConcepts(sd, concepts, model.applied_count)
        _settle(model, [(each, each.concepts) for each in (*model.handles, handle)])
    return handle


def expand_prompt_ids(sd, prompt: str) -> list[int]:
    """The token ids ``sd`` feeds its text encoder for ``prompt`` (before padding to 77)."""
    return _ensure_tokenizer(sd).encode(prompt)
