"""Apply any number of concepts to a keras-cv StableDiffusion / StableDiffusionV2 (contract 3).

How it works, and why it is fast: the text encoder is never rebuilt. Its token-embedding variable
is swapped for a new, larger one (the original table with every concept's vectors appended, one
resize for all concepts) and the tokenizer gets the new tokens. Each concept's token is one
tokenizer entry; a multi-vector concept's extra rows get ids without text, and the token's id is
expanded into all of its ids after tokenizing, so the user types the token once. ``unload()`` puts
the original variable object and tokenizer state back, untouched, so encodings are bit-identical.
Compiled predict functions captured the old variable, so they are dropped on every swap.
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass
from pathlib import Path

from conceptlib.concept import DIMS, Concept
from conceptlib.errors import ApplyError, ConceptError, ConceptFileError, PromptTooLongError

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
    by_ref = None
    for item in concepts:
        if isinstance(item, Concept):
            resolved.append(_checked_again(item))
        elif isinstance(item, os.PathLike):
            resolved.extend(_load_path(Path(item)))
        elif isinstance(item, str):
            try:
                path = Path(item).expanduser()
            except RuntimeError:  # '~cat', a valid token, names no user's home
                path = Path(item)
            if _path_says(path.is_file):
                resolved.extend(_load_path(path))
                continue
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
            else:
                from conceptlib.files import read_concept

                concept = read_concept(header.path)
                if concept.name != header.name:
                    concept = Concept(header.name, concept.token, concept.vectors, concept.metadata)
                resolved.append(concept)
        elif _is_header(item):  # a ConceptHeader
            from conceptlib.files import read_concept

            resolved.append(read_concept(item.path))
        else:
            raise ApplyError(
                f"cannot apply {item!r} ({type(item).__name__}); pass library names, tokens, "
                "file paths or conceptlib.Concept objects"
            )
    return resolved


def _handles(sd) -> list:
    """The loaded handles of ``sd``, in the order they were applied."""
    return sd.__dict__.setdefault("_conceptlib_handles", [])


def _later_handles(handle) -> list:
    handles = _handles(handle.sd)
    return handles[handles.index(handle) + 1:] if handle in handles else []


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
    """SimpleTokenizer.encode, then each multi-vector token's id expanded into all of its ids."""
    ids = type(tokenizer).encode(tokenizer, text)
    expansions = tokenizer._conceptlib_expansions
    if expansions:
        expanded = []
        for token_id in ids:
            expanded.extend(expansions.get(token_id, (token_id,)))
        ids = expanded
    if len(ids) > MAX_PROMPT_LENGTH:
        grown = len(ids) - len(type(tokenizer).encode(tokenizer, text)) if expansions else 0
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
    return "".join(tokenizer.byte_encoder[byte] for byte in token.encode("utf-8"))


# -- the handle -----------------------------------------------------------------------------------


@dataclass
class _Saved:
    variable: object
    tokenizer_state: dict
    encode_attribute: object  # the tokenizer's instance-level encode before apply, or None
    expansions: object


class AppliedConcepts:
    """Concepts applied to one StableDiffusion instance. ``unload()`` (or leaving the ``with``
    block) restores the text encoder and tokenizer exactly as they were."""

    def __init__(self, sd, concepts, token_ids, saved: _Saved, layer, new_variable):
        self.sd = sd
        self.concepts: list[Concept] = concepts
        #: token -> the embedding-table ids its vectors occupy, in order.
        self.token_ids: dict[str, tuple[int, ...]] = token_ids
        self._saved = saved
        self._layer = layer
        self._variable = new_variable
        self.loaded = True

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
        """Restore the original token table and tokenizer (idempotent)."""
        if not self.loaded:
            return
        if self._layer._embeddings is not self._variable:
            raise ApplyError(
                f"cannot unload {', '.join(self.tokens[:3])}{'...' if len(self.tokens) > 3 else ''}: "
                "concepts applied later to the same model are still loaded; unload those first"
            )
        tokenizer = self.sd._tokenizer
        _swap_variable(self._layer, self._variable, self._saved.variable)
        for name, value in self._saved.tokenizer_state.items():
            setattr(tokenizer, name, value)
        tokenizer._conceptlib_expansions = self._saved.expansions
        if self._saved.encode_attribute is None:
            tokenizer.__dict__.pop("encode", None)
        else:
            tokenizer.encode = self._saved.encode_attribute
        reset_compiled_functions(self.sd._text_encoder)
        self._variable = None
        self.loaded = False
        if self in _handles(self.sd):
            _handles(self.sd).remove(self)

    def __enter__(self) -> "AppliedConcepts":
        self._check_loaded()
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        # Leaving the block restores the model, however it is left: handles applied later inside
        # the block (and not unloaded there) are unloaded first, then this one.
        for later in reversed(_later_handles(self)):
            later.unload()
        self.unload()

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "unloaded"
        return f"<AppliedConcepts {state}: {', '.join(self.tokens)}>"


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


def apply(sd, concepts, library=None) -> AppliedConcepts:
    """Apply ``concepts`` (library names, tokens, file paths or Concept objects) to ``sd``, a
    keras-cv StableDiffusion or StableDiffusionV2, built or not, in one step.

    Everything is validated first (vector width vs the text encoder, tokens already in the
    vocabulary, duplicates); on any error nothing is changed. Returns an AppliedConcepts handle
    (``.unload()``, context manager).
    """
    from conceptlib.kerascv.models import base_model_of

    base_model = base_model_of(sd)
    concepts = resolve_concepts(concepts, library)
    if not concepts:
        raise ApplyError("no concepts to apply; pass library names, tokens, file paths or Concept objects")

    # Validate everything before changing anything, and before building (or downloading) the
    # text encoder: the widths are known from the model class.
    _check_widths(sd, base_model, concepts, DIMS[base_model])
    seen: dict[str, Concept] = {}
    tokenizer = _ensure_tokenizer(sd)
    for concept in concepts:
        if concept.token in seen:
            raise ApplyError(
                f"token {concept.token!r} is given twice ({seen[concept.token].name!r} and {concept.name!r}); "
                "apply each concept once, or rename one with `conceptlib rename NAME NEW --token`"
            )
        seen[concept.token] = concept
        entry = _vocab_entry(tokenizer, concept.token)
        if entry in tokenizer.encoder or entry + "</w>" in tokenizer.encoder:
            raise ApplyError(
                f"token {concept.token!r} of concept {concept.name!r} is already in the tokenizer's vocabulary "
                "(a CLIP word, or a concept already applied to this model); unload it first or give the "
                "concept another token with `conceptlib rename NAME NEW --token '<new-token>'`"
            )
    text_encoder = _ensure_text_encoder(sd, base_model)
    layer = token_embedding_layer(text_encoder)
    width = int(layer.output_dim)
    _check_widths(sd, base_model, concepts, width)

    import numpy as np

    from conceptlib.kerascv import keras_module

    keras = keras_module()
    old_variable = layer._embeddings
    table_rows = int(old_variable.shape[0])
    first_id = max(len(tokenizer.vocab), table_rows)

    # Tokenizer entries and table rows for every vector, in one pass.
    new_vocab = list(tokenizer.vocab)
    new_vocab.extend(_PAD_ENTRY.format(index=i) for i in range(len(new_vocab), first_id))
    token_ids: dict[str, tuple[int, ...]] = {}
    for concept in concepts:
        ids = tuple(range(len(new_vocab), len(new_vocab) + concept.num_vectors))
        new_vocab.append(_vocab_entry(tokenizer, concept.token))
        new_vocab.extend(
            _vocab_entry(tokenizer, _EXTRA_VECTOR.format(token=concept.token, index=i))
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
        new_variable = keras.Variable(
            keras.ops.concatenate([old_variable.value, keras.ops.convert_to_tensor(rows)], axis=0),
            dtype=old_variable.dtype,
            trainable=old_variable.trainable,
            name=old_variable.name,
        )

    saved = _Saved(
        variable=old_variable,
        tokenizer_state={name: getattr(tokenizer, name) for name in _TOKENIZER_STATE},
        encode_attribute=tokenizer.__dict__.get("encode"),
        expansions=getattr(tokenizer, "_conceptlib_expansions", None),
    )
    special_tokens = dict(tokenizer.special_tokens)
    cache = dict(tokenizer.cache)
    encoder = dict(tokenizer.encoder)
    decoder = dict(tokenizer.decoder)
    expansions = dict(saved.expansions or {})
    for index in range(len(tokenizer.vocab), len(new_vocab)):
        decoder[index] = new_vocab[index]
    # Only the tokens themselves go into the encoder: a placeholder ('<x>#1') there would take
    # the id of a concept whose token is spelled the same.
    for token, ids in token_ids.items():
        entry = new_vocab[ids[0]]
        encoder[entry] = ids[0]
        special_tokens[token] = token
        cache[entry] = entry
        if len(ids) > 1:
            expansions[ids[0]] = ids

    pattern = _tokenizer_pattern(special_tokens)

    # Mutate: nothing below can fail on bad input.
    _swap_variable(layer, old_variable, new_variable)
    tokenizer.vocab = new_vocab
    tokenizer.encoder = encoder
    tokenizer.decoder = decoder
    tokenizer.special_tokens = special_tokens
    tokenizer.cache = cache
    tokenizer.pat = pattern
    tokenizer._conceptlib_expansions = expansions
    tokenizer.encode = types.MethodType(_expanding_encode, tokenizer)
    reset_compiled_functions(text_encoder)
    handle = AppliedConcepts(sd, concepts, token_ids, saved, layer, new_variable)
    _handles(sd).append(handle)
    return handle


def expand_prompt_ids(sd, prompt: str) -> list[int]:
    """The token ids ``sd`` feeds its text encoder for ``prompt`` (before padding to 77)."""
    return _ensure_tokenizer(sd).encode(prompt)
