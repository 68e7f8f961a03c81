"""Mix concepts into a new one (`conceptlib mix`), as AUTOMATIC1111's embedding mixers do: their
vectors one after another (what typing their tokens in a row gives the text encoder), or their
weighted sum (a blend). numpy only; no model is needed."""

from __future__ import annotations

import json
import re

from conceptlib.concept import MAX_VECTORS, Concept
from conceptlib.errors import ConceptError, UsageError

_FLOAT32_MAX = 3.4028234663852886e38
_WEIGHTED = re.compile(r"^(?P<ref>.+)\*(?P<weight>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)$")


def parse_source(text: str) -> tuple[str, float]:
    """``"cat-doll*0.5"`` -> ``("cat-doll", 0.5)``; without ``*WEIGHT`` the weight is 1."""
    match = _WEIGHTED.match(text)
    if match is None:
        return text, 1.0
    weight = float(match["weight"])
    if abs(weight) > _FLOAT32_MAX:
        raise UsageError(f"{text}: weight {match['weight']} is beyond float32's range (about 3.4e38); use a smaller one")
    return match["ref"], weight


def weight_problem(text: str) -> str | None:
    """For a SOURCE that names no concept: if it holds a '*' whose weight is not a number, what to
    write instead (tokens may hold '*', so this is asked only once the whole text named nothing)."""
    match = _WEIGHTED.match(text)
    inner = _WEIGHTED.match(match["ref"]) if match else None
    if inner:
        return (f"{text}: no concept of that name, and it has two weights; give one per SOURCE, "
                f"e.g. {inner['ref']}*{match['weight']}")
    ref, star, weight = text.rpartition("*")
    if not star or match:
        return None
    if not ref:
        return f"{text}: a weight with no SOURCE before it; write NAME*{weight or 'WEIGHT'}"
    return (f"{text}: no concept of that name, and {weight!r} after '*' is not a weight; write SOURCE*WEIGHT "
            f"with a number, e.g. {ref or 'NAME'}*0.5")


def mix(name: str, token: str, sources: list[tuple[Concept, float]], *, mode: str = "concat") -> Concept:
    """A new concept from ``sources`` (concept, weight): ``concat`` puts their weighted vectors one
    after another; ``sum`` adds them up (equal vector counts, or one vector added to every row).
    Raises ConceptError (one line) for sources that cannot be mixed."""
    import numpy as np

    if mode not in ("concat", "sum"):
        raise UsageError(f"unknown mix mode {mode!r}; use concat or sum")
    if not sources:
        raise UsageError("nothing to mix: give two or more concepts (or one, with a weight)")
    dims = {concept.dim for concept, _ in sources}
    if len(dims) > 1:
        widths = ", ".join(f"{concept.name} {concept.dim} ({concept.base_model})" for concept, _ in sources)
        raise ConceptError(f"cannot mix vectors of different widths ({widths}); mix concepts of one base model")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked below, as one line
        vectors = _combined([concept.vectors.astype(np.float32) * np.float32(weight) for concept, weight in sources],
                            sources, mode)
    if not np.isfinite(vectors).all():
        raise ConceptError("the weights make the mix overflow float32 (values beyond about 3.4e38); use smaller weights")
    if len(vectors) > MAX_VECTORS:
        raise ConceptError(
            f"the mix has {len(vectors)} vectors, more than a prompt's {MAX_VECTORS}; mix fewer or shorter concepts"
        )
    metadata = {
        "mixed_from": json.dumps([
            {"name": concept.name, "token": concept.token, "weight": weight, "num_vectors": concept.num_vectors}
            for concept, weight in sources
        ]),
        "mix_mode": mode,
    }
    return Concept(name, token, np.ascontiguousarray(vectors, dtype=np.float32), metadata)


def _combined(weighted: list, sources: list[tuple[Concept, float]], mode: str):
    """The weighted vectors one after another (concat) or added up row by row (sum)."""
    import numpy as np

    if mode == "concat":
        return np.concatenate(weighted)
    counts = {len(rows) for rows in weighted} - {1}
    if len(counts) > 1:
        shown = ", ".join(f"{concept.name} {concept.num_vectors}" for concept, _ in sources)
        raise ConceptError(
            f"--sum adds vectors row by row, but the concepts have {shown} vectors; mix concepts with the same "
            "number of vectors (or one vector), or concatenate them (without --sum)"
        )
    rows = counts.pop() if counts else 1
    return np.sum([np.broadcast_to(part, (rows, part.shape[1])) for part in weighted], axis=0)
