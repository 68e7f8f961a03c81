"""The vocabulary words a concept's vectors are closest to, like AUTOMATIC1111's Embedding
Inspector: a quick look at what a trained or downloaded concept has become (a style concept near
"painting", a doll near "toy") or whether training moved it from its init words at all.

Closeness is the cosine similarity to each row of the text encoder's token embedding table, read
from keras-cv's text-encoder weight file with h5py: no TensorFlow, no model built.
"""

from __future__ import annotations

from pathlib import Path

from conceptlib.errors import WeightsError

_WORD_END = "</w>"


def token_table(path: Path):
    """The token embedding table (vocabulary, dim) float32 in keras-cv's text-encoder weights
    file ``path``: the first weight of the first layer that has weights, the pairing keras'
    legacy HDF5 loader uses (it loads keras-cv's files by layer order, not by name)."""
    import h5py
    import numpy as np

    from conceptlib.weights import check_weight_file, read_legacy_h5

    check_weight_file(Path(path))
    try:
        with h5py.File(path, "r") as handle:
            group = handle["model_weights"] if "model_weights" in handle else handle
            prefix = "model_weights/" if group is not handle else ""
            first = next(
                ((name, names[0]) for name in _attribute(group, "layer_names")
                 if (names := _attribute(group[name], "weight_names"))),
                None,
            )
    except OSError as exc:
        raise WeightsError(f"weights file {path} cannot be read ({exc}); delete it and re-download it") from None
    if first is None:
        raise WeightsError(f"weights file {path} holds no layer weights; it is not a keras-cv text encoder")
    (table,) = read_legacy_h5(path, [(prefix + first[0], first[1])])
    if table.ndim != 2 or table.shape[0] < 49408:
        raise WeightsError(f"weights file {path}: its first weight has shape {tuple(table.shape)}, not a token "
                           "table; it is not a keras-cv text encoder")
    return np.asarray(table, np.float32)


def _attribute(group, name: str) -> list[str]:
    """A string-list attribute as keras writes it: whole, or chunked into NAME0, NAME1, ... when
    it is larger than HDF5's attribute limit."""
    if name in group.attrs:
        values = list(group.attrs[name])
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def nearest_words(vectors, table, tokenizer, count: int) -> list[list[dict]]:
    """For each vector, the ``count`` vocabulary tokens of highest cosine similarity, best first:
    ``{"id", "token" (CLIP's own spelling), "word" (readable: a word-final token as the word, a
    piece that continues into the next token with a trailing '-'), "similarity"}``."""
    import numpy as np

    vectors = np.asarray(vectors, np.float64)
    if vectors.shape[1] != table.shape[1]:
        raise WeightsError(
            f"the concept's vectors are {vectors.shape[1]} wide but the text encoder's tokens {table.shape[1]}: "
            "the weights belong to the other base model"
        )
    unit_table = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = unit.astype(np.float32) @ unit_table.T
    count = max(1, min(int(count), table.shape[0]))
    result = []
    for row in similarity:
        best = np.argpartition(-row, count - 1)[:count]
        best = best[np.argsort(-row[best], kind="stable")]
        result.append([{"id": int(i), "token": tokenizer.decoder.get(int(i), "?"),
                        "word": _readable(tokenizer, int(i)), "similarity": round(float(row[i]), 4)} for i in best])
    return result


def _readable(tokenizer, token_id: int) -> str:
    token = tokenizer.decoder.get(token_id, "?")
    if token.startswith("<|"):
        return token  # <|startoftext|>, <|endoftext|>
    final = token.endswith(_WORD_END)
    text = token[: -len(_WORD_END)] if final else token
    raw = bytearray(tokenizer.byte_decoder.get(char, ord("?")) for char in text)
    return raw.decode("utf-8", errors="replace") + ("" if final else "-")
