"""apply()/unload() on real keras-cv StableDiffusion / StableDiffusionV2 text encoders (random
weights): encodings match a hand-built embedding table run through the encoder's layers by hand,
concepts don't disturb each other or plain prompts, unload is bit-identical, validation happens
before any change."""

from __future__ import annotations

import numpy as np
import pytest

from conceptlib import Concept
from conceptlib.errors import ApplyError, ConceptlibError, NotFoundError, PromptTooLongError
from conceptlib.kerascv.apply import apply, token_embedding_layer
from conceptlib.kerascv.models import build_stable_diffusion
from conceptlib.kerascv.tokenizer import make_tokenizer

PROMPT_A = "a photo of <cat-doll> on a table"
PLAIN = ["a photo of a cat on a table", "", "an oil painting of a harbour at dusk, trending"]


def _concept(name, token, num_vectors, dim, seed):
    rng = np.random.default_rng(seed)
    return Concept(name, token, rng.normal(0.0, 0.05, size=(num_vectors, dim)).astype(np.float32))


@pytest.fixture(scope="module")
def sd1():
    sd = build_stable_diffusion("sd-1", 128)
    sd.text_encoder  # noqa: B018  (built once for the module; only the text encoder is needed)
    return sd


@pytest.fixture(autouse=True)
def nothing_left_applied(request):
    """Each test leaves the shared model as it found it; one that fails half-way is cleaned up
    here, so the tests after it do not fail for its leftovers."""
    yield
    if "sd1" in request.fixturenames:
        from conceptlib.kerascv.apply import unload

        sd = request.getfixturevalue("sd1")
        assert unload(sd) == [], "the test left concepts applied"


@pytest.fixture(scope="module")
def plain_tokenizer():
    return make_tokenizer()


def table_of(sd):
    return np.array(token_embedding_layer(sd.text_encoder).embeddings)


def encode_by_hand(text_encoder, table, ids, end_of_text):
    """The text encoder's forward pass, run layer by layer on an explicit embedding table."""
    import keras

    ids = list(ids) + [end_of_text] * (77 - len(ids))
    embedding = next(l for l in text_encoder.layers if hasattr(l, "token_embedding"))
    positions = np.array(embedding.position_embedding.embeddings)
    x = keras.ops.convert_to_tensor((table[np.array(ids)] + positions[:77])[None])
    after = text_encoder.layers[text_encoder.layers.index(embedding) + 1 :]
    for layer in after:
        x = layer(x)
    return np.array(x)


def reference_ids(plain_tokenizer, before, concept_ids, after):
    return plain_tokenizer.encode(before)[:-1] + list(concept_ids) + plain_tokenizer.encode(after)[1:]


CAT = _concept("cat-doll", "<cat-doll>", 1, 768, seed=1)
STYLE = _concept("oil-style", "<oil-style>", 3, 768, seed=2)


@pytest.mark.parametrize("concept", [CAT, STYLE], ids=["1-vector", "3-vector"])
def test_encoding_equals_encoder_on_hand_built_table(sd1, plain_tokenizer, concept):
    original = table_of(sd1)
    sd1.encode_text("warm up the compiled predict function")
    with apply(sd1, [concept]) as applied:
        assert sd1.text_encoder.predict_function is None  # the traced function held the old table
        got = sd1.encode_text(f"a photo of {concept.token} on a table")
        ids = applied.token_ids[concept.token]
    rows = original.shape[0]
    assert ids == tuple(range(rows, rows + concept.num_vectors))
    table = np.concatenate([original, concept.vectors])
    expected = encode_by_hand(
        sd1.text_encoder, table, reference_ids(plain_tokenizer, "a photo of", ids, "on a table"),
        plain_tokenizer.end_of_text,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The token changed the encoding (vs the tokens keras-cv would otherwise make of its text).
    assert not np.allclose(got, sd1.encode_text(f"a photo of {concept.token} on a table"), atol=1e-4)


def test_user_types_a_multi_vector_token_once(sd1, plain_tokenizer):
    with apply(sd1, [STYLE, CAT]) as applied:
        ids = sd1.tokenizer.encode("<oil-style> <cat-doll>")
        assert ids == [plain_tokenizer.start_of_text, *applied.token_ids["<oil-style>"],
                       *applied.token_ids["<cat-doll>"], plain_tokenizer.end_of_text]
        assert len(applied.token_ids["<oil-style>"]) == 3
        assert applied.encode("<oil-style>") == ids[:4] + [plain_tokenizer.end_of_text]
        assert applied.tokens == ["<oil-style>", "<cat-doll>"]


def test_two_concepts_together_equal_each_alone(sd1):
    alone = {}
    for concept in (CAT, STYLE):
        with apply(sd1, [concept]):
            alone[concept.token] = sd1.encode_text(f"a photo of {concept.token} on a table")
    with apply(sd1, [CAT, STYLE]):
        for token, encoding in alone.items():
            np.testing.assert_allclose(sd1.encode_text(f"a photo of {token} on a table"), encoding, rtol=0, atol=1e-6)


def test_plain_prompts_unchanged_while_applied_and_bit_identical_after_unload(sd1):
    original_table = table_of(sd1)
    variable = token_embedding_layer(sd1.text_encoder)._embeddings
    before = [sd1.encode_text(p) for p in PLAIN]
    applied = apply(sd1, [CAT, STYLE])
    for prompt, encoding in zip(PLAIN, before):
        np.testing.assert_allclose(sd1.encode_text(prompt), encoding, rtol=0, atol=1e-6)
    applied.unload()
    applied.unload()  # idempotent
    for prompt, encoding in zip(PLAIN, before):
        assert np.array_equal(sd1.encode_text(prompt), encoding)
    assert token_embedding_layer(sd1.text_encoder)._embeddings is variable
    assert np.array_equal(table_of(sd1), original_table)
    assert "<cat-doll>" not in sd1.tokenizer.encoder and len(sd1.tokenizer.vocab) == original_table.shape[0]
    # Applying again after unload gives the same encodings as the first time.
    with apply(sd1, [CAT]):
        first = sd1.encode_text(PROMPT_A)
    with apply(sd1, [CAT]):
        assert np.array_equal(sd1.encode_text(PROMPT_A), first)


def test_after_unload_the_token_is_plain_text_again(sd1, plain_tokenizer):
    with apply(sd1, [CAT]):
        pass
    assert sd1.tokenizer.encode(PROMPT_A) == plain_tokenizer.encode(PROMPT_A)


def test_a_bare_word_token_matches_only_as_a_whole_word(sd1, plain_tokenizer):
    """A token without brackets (e.g. from an AUTOMATIC1111 file name) is used where it is a
    word of its own, not at the start of a longer word, as AUTOMATIC1111 and ComfyUI match it."""
    bare = _concept("zorblax", "zorblax", 1, 768, seed=3)
    with apply(sd1, [bare]) as applied:
        (new_id,) = applied.token_ids["zorblax"]
        assert sd1.tokenizer.encode("a zorblax, on a table") == reference_ids(
            plain_tokenizer, "a", [new_id], ", on a table")
        assert sd1.tokenizer.encode("a zorblaxes on a table") == plain_tokenizer.encode("a zorblaxes on a table")


def test_prompt_too_long_after_expansion_says_by_how_much(sd1):
    wide = _concept("wide", "<wide>", 70, 768, seed=3)
    words = " ".join(["cat"] * 6)  # 1 + 70 + 6 + 1 = 78 tokens
    with apply(sd1, [wide]):
        with pytest.raises(PromptTooLongError) as info:
            sd1.encode_text(f"<wide> {words}")
        assert "78 tokens" in str(info.value) and str(info.value).endswith("shorten it by 1 token")
        assert "69 of them from multi-vector concepts" in str(info.value)
        sd1.encode_text(f"<wide> {' '.join(['cat'] * 5)}")  # exactly 77 fits


@pytest.mark.parametrize("before, after", [("(", ")"), ("a photo,", "."), ('"', '"'), ("[[", "]]:1.2")])
def test_a_token_right_after_punctuation_is_found(sd1, plain_tokenizer, before, after):
    """CLIP's pattern takes a run of punctuation at once: '(<' would swallow the token's '<'."""
    from conceptlib.kerascv.tokenizer import find_tokens

    cat = _concept("cat", "<cat>", 1, 768, seed=8)
    with apply(sd1, [CAT, cat]) as applied:
        got = sd1.tokenizer.encode(f"{before}<cat-doll>{after}")
        assert got == reference_ids(plain_tokenizer, before, applied.token_ids["<cat-doll>"], after)
        assert sd1.tokenizer.encode(f"{before}<cat>-doll") == reference_ids(
            plain_tokenizer, before, applied.token_ids["<cat>"], "-doll")
        for plain in ("(a cat), <|endoftext|>!", "<<<>>> ,,("):  # no concept token: keras-cv's split
            assert sd1.tokenizer.encode(plain) == plain_tokenizer.encode(plain)
    assert find_tokens(f"{before}<cat-doll>{after}", {"<cat-doll>", "<cat>"}) == ["<cat-doll>"]


@pytest.mark.parametrize("token", ["<café>", "<🐱>", "пёс"])
def test_a_non_ascii_token_is_found_and_decodes(sd1, plain_tokenizer, token):
    """keras-cv looks each piece up by its UTF-8 bytes mapped to unicode, not by its text."""
    concept = _concept("non-ascii", token, 2, 768, seed=9)
    with apply(sd1, [concept]) as applied:
        ids = applied.token_ids[token]
        assert sd1.tokenizer.encode(f"a {token} cat") == reference_ids(plain_tokenizer, "a", ids, "cat")
        assert sd1.tokenizer.decode(sd1.tokenizer.encode(f"a {token} cat")) == f"<|startoftext|>a {token} cat <|endoftext|>"
        with pytest.raises(ApplyError, match="is already applied to this model"):
            apply(sd1, [concept.renamed(name="again")])
    assert sd1.tokenizer.encode(f"a {token} cat") == plain_tokenizer.encode(f"a {token} cat")


def test_a_token_spelled_like_another_concepts_extra_vector_keeps_its_own_id(sd1):
    two = _concept("two", "<x>", 2, 768, seed=10)
    hash_one = _concept("hash-one", "<x>#1", 1, 768, seed=11)
    with apply(sd1, [hash_one, two]) as applied:
        assert sd1.tokenizer.encode("<x>#1")[1:-1] == list(applied.token_ids["<x>#1"])
        assert sd1.tokenizer.encode("<x>")[1:-1] == list(applied.token_ids["<x>"])
    with apply(sd1, [two]):
        with apply(sd1, [hash_one]) as later:
            assert sd1.tokenizer.encode("<x>#1")[1:-1] == list(later.token_ids["<x>#1"])


def test_width_is_checked_before_the_text_encoder_is_built_or_downloaded(tmp_path, monkeypatch):
    import keras
    import keras_cv

    def no_download(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    monkeypatch.setenv("CONCEPTLIB_WEIGHTS", str(tmp_path))  # empty: building would fail
    sd = keras_cv.models.StableDiffusionV2(img_height=128, img_width=128, jit_compile=False)
    with pytest.raises(ApplyError, match=r"768-wide vectors \(sd-1\) but this keras_cv.models.StableDiffusionV2's "
                       r"text encoder takes 1024-wide vectors \(sd-2\); apply it to a keras_cv.models.StableDiffusion "
                       r"\(sd-1\) instead, or use a concept trained for sd-2"):
        apply(sd, [CAT])
    assert sd._text_encoder is None


def test_single_header_none_library_folder_and_tokens_with_a_slash(sd1, tmp_path):
    from conceptlib.library import ConceptLibrary

    library = ConceptLibrary(tmp_path / "lib")
    header = library.add(_concept("style-oil", "<style/oil>", 1, 768, seed=12))
    with apply(sd1, header) as applied:
        assert applied.tokens == ["<style/oil>"]
    with apply(sd1, ["<style/oil>"], library=str(library.root)) as applied:
        assert applied.tokens == ["<style/oil>"]
    library.add(_concept("tilde-cat", "~cat", 1, 768, seed=13))
    with apply(sd1, ["~cat"], library=library) as applied:  # not taken for a home folder
        assert applied.tokens == ["~cat"]
    with pytest.raises(ApplyError, match=r"cannot apply None \(NoneType\); pass a list"):
        apply(sd1, None)
    with pytest.raises(ConceptlibError, match="no such file"):
        apply(sd1, [str(tmp_path / "missing" / "x.safetensors")], library=library)


def test_an_unloaded_handle_cannot_be_entered_again(sd1):
    applied = apply(sd1, [CAT])
    with applied:
        pass
    with pytest.raises(ApplyError, match="<cat-doll> was already unloaded; call conceptlib.apply"):
        with applied:
            raise AssertionError("the block must not run without the concepts")
    # Nor encode: it would give the ids of the plain words, not the concept's.
    with pytest.raises(ApplyError, match="already unloaded"):
        applied.encode("a photo of <cat-doll>")
    assert "<cat-doll>" not in sd1.tokenizer.encoder


def _assert_unchanged(sd, table_rows, vocab_size):
    assert token_embedding_layer(sd.text_encoder)._embeddings.shape[0] == table_rows
    assert len(sd.tokenizer.vocab) == vocab_size and "<cat-doll>" not in sd.tokenizer.encoder


@pytest.mark.parametrize(
    "concepts, message",
    [
        ([CAT, _concept("wide-one", "<wide-one>", 1, 1024, 4)], r"1024-wide vectors \(sd-2\).*768-wide vectors \(sd-1\)"),
        ([CAT, CAT.renamed(name="other")], r"token '<cat-doll>' is given twice"),
        ([CAT, _concept("cat", "cat", 1, 768, 5)], r"token 'cat' of concept 'cat' is already in the CLIP vocabulary"),
        ([CAT, _concept("sot", "<|startoftext|>", 1, 768, 5)], r"already in the CLIP vocabulary \(a word or special token\)"),
        ([CAT, 42], r"cannot apply 42"),
    ],
    ids=["width", "duplicate", "clip-word", "special", "junk"],
)
def test_bad_input_changes_nothing(sd1, concepts, message):
    rows, vocab = token_embedding_layer(sd1.text_encoder)._embeddings.shape[0], len(sd1.tokenizer.vocab)
    with pytest.raises(ApplyError, match=message):
        apply(sd1, concepts)
    _assert_unchanged(sd1, rows, vocab)


def test_a_token_already_applied_is_refused_and_handles_unload_in_any_order(sd1):
    outer = apply(sd1, [CAT])
    try:
        with pytest.raises(ApplyError, match=r"'<cat-doll>' of concept 'cat-doll' is already applied to this model; "
                           r"unload it first \(conceptlib.unload\(sd, \['<cat-doll>'\]\)"):
            apply(sd1, [CAT])
        inner = apply(sd1, [STYLE])
        with_both = sd1.encode_text("<cat-doll> <oil-style>")
        outer.unload()  # the older handle first: the newer one stays loaded, on the same vectors
        assert not outer.loaded and inner.loaded and "<cat-doll>" not in sd1.tokenizer.encoder
        with apply(sd1, [CAT]):
            np.testing.assert_allclose(sd1.encode_text("<cat-doll> <oil-style>"), with_both, rtol=0, atol=1e-6)
        assert inner.token_ids["<oil-style>"] == tuple(range(49408, 49411))  # moved down when CAT went
    finally:
        outer.unload()
        inner.unload()
    assert token_embedding_layer(sd1.text_encoder)._embeddings.shape[0] == 49408


def test_a_concept_object_changed_after_it_was_made_is_checked_again(sd1):
    """Concept is a mutable dataclass: apply validates what the object holds now, before anything
    changes (a bad token once left the model half-patched for good)."""
    rows, vocab = token_embedding_layer(sd1.text_encoder)._embeddings.shape[0], len(sd1.tokenizer.vocab)
    broken = [_concept("empty", "<empty>", 1, 768, 12) for _ in range(4)]
    broken[0].token = ""
    broken[1].token = "<Upper>"
    broken[2].vectors = np.full((1, 768), np.nan, np.float32)
    broken[3].vectors = np.zeros((0, 768), np.float32)
    for concept, needle in zip(broken, ("a non-empty string", "KerasCV lowercases", "NaN or Inf", "0 vectors")):
        with pytest.raises(ApplyError, match=f"cannot apply 'empty': .*{needle}"):
            apply(sd1, [STYLE, concept])
        _assert_unchanged(sd1, rows, vocab)
    with apply(sd1, [STYLE]) as applied:  # the model still takes concepts
        assert applied.tokens == ["<oil-style>"]


def test_leaving_the_block_unloads_what_was_applied_inside_it(sd1):
    """However the block ends, the model is as before it: a handle applied inside and not
    unloaded there goes first (it used to raise and leave both loaded)."""
    plain = sd1.encode_text("<cat-doll> <oil-style>")
    with apply(sd1, [CAT]) as outer:
        inner = apply(sd1, [STYLE])
    assert not outer.loaded and not inner.loaded
    assert "<cat-doll>" not in sd1.tokenizer.encoder and "<oil-style>" not in sd1.tokenizer.encoder
    np.testing.assert_array_equal(sd1.encode_text("<cat-doll> <oil-style>"), plain)


def test_an_error_in_the_block_reaches_the_caller_and_everything_is_unloaded(sd1):
    plain = sd1.encode_text("<cat-doll> <oil-style>")
    with pytest.raises(RuntimeError, match="boom"):
        with apply(sd1, [CAT]):
            apply(sd1, [STYLE])  # applied inside and not unloaded there
            raise RuntimeError("boom")
    assert "<cat-doll>" not in sd1.tokenizer.encoder and "<oil-style>" not in sd1.tokenizer.encoder
    np.testing.assert_array_equal(sd1.encode_text("<cat-doll> <oil-style>"), plain)


def test_odd_references_are_one_line_errors(sd1, tmp_path):
    with pytest.raises(NotFoundError):
        apply(sd1, ["x" * 300], library=tmp_path / "lib")  # too long for a file name: not an OSError
    with pytest.raises(ApplyError, match="library=42: pass a ConceptLibrary or its folder"):
        apply(sd1, ["cat-doll"], library=42)


def test_concepts_by_library_name_token_and_path(sd1, tmp_path):
    from conceptlib.files import write_concept
    from conceptlib.library import ConceptLibrary

    library = ConceptLibrary(tmp_path / "lib")
    library.add(CAT)
    library.add(STYLE)
    third = _concept("third", "<third>", 2, 768, seed=6)
    path = write_concept(third, tmp_path / "third.safetensors")
    with apply(sd1, ["cat-doll", "<oil-style>", str(path)], library=library) as applied:
        assert applied.tokens == ["<cat-doll>", "<oil-style>", "<third>"]
        np.testing.assert_array_equal(
            table_of(sd1)[list(applied.token_ids["<third>"])], third.vectors
        )
    with pytest.raises(NotFoundError):
        apply(sd1, ["no-such-concept"], library=library)


@pytest.mark.parametrize("during", ["apply", "unload"])
def test_ctrl_c_in_the_middle_of_a_change_waits_until_the_model_is_whole(sd1, monkeypatch, during):
    """A Ctrl-C that arrives after the new table is in place but before the tokenizer knows the
    token would leave a model that neither applies the concept nor unloads it. It is raised once
    the change is whole: applied (unload(sd) takes it out) or unloaded."""
    import os
    import signal

    import conceptlib
    import conceptlib.kerascv.apply as applying

    before = sd1.encode_text(PROMPT_A)
    variable = token_embedding_layer(sd1.text_encoder)._embeddings
    set_table = applying._set_table

    def ctrl_c_then_set_table(*args):
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode, before the table is set
        set_table(*args)

    handle = apply(sd1, [CAT]) if during == "unload" else None
    monkeypatch.setattr(applying, "_set_table", ctrl_c_then_set_table)
    with pytest.raises(KeyboardInterrupt):
        apply(sd1, [CAT]) if during == "apply" else handle.unload()
    monkeypatch.undo()
    if during == "apply":
        assert [each.tokens for each in conceptlib.applied(sd1)] == [["<cat-doll>"]]
        assert "<cat-doll>" in sd1.tokenizer.encoder and token_embedding_layer(sd1.text_encoder).input_dim == 49408 + CAT.num_vectors
        assert conceptlib.unload(sd1) == ["<cat-doll>"]
    assert conceptlib.applied(sd1) == [] and token_embedding_layer(sd1.text_encoder)._embeddings is variable
    assert "<cat-doll>" not in sd1.tokenizer.encoder
    np.testing.assert_array_equal(sd1.encode_text(PROMPT_A), before)


def test_a_lost_handle_is_unloaded_through_conceptlib_unload(sd1):
    """A notebook cell `conceptlib.apply(sd, [...])` run twice, its handle never kept: the model
    is not stuck (it used to be: apply again said "unload it first", with nothing to unload)."""
    import conceptlib

    assert conceptlib.apply is not apply and conceptlib.applied(sd1) == []
    variable = token_embedding_layer(sd1.text_encoder)._embeddings
    before = sd1.encode_text(PROMPT_A)
    conceptlib.apply(sd1, [CAT])
    with pytest.raises(ApplyError, match="already applied to this model"):
        conceptlib.apply(sd1, [CAT])  # the cell run again
    assert [handle.tokens for handle in conceptlib.applied(sd1)] == [["<cat-doll>"]]
    assert conceptlib.unload(sd1) == ["<cat-doll>"]
    assert conceptlib.applied(sd1) == [] and token_embedding_layer(sd1.text_encoder)._embeddings is variable
    np.testing.assert_array_equal(sd1.encode_text(PROMPT_A), before)
    with conceptlib.apply(sd1, [CAT]):
        assert "<cat-doll>" in sd1.tokenizer.encoder
    assert conceptlib.unload(sd1) == []  # nothing applied: nothing to do


def test_unload_by_token_takes_one_concept_out_of_a_handle(sd1):
    import conceptlib

    style_alone = None
    with apply(sd1, [STYLE]):
        style_alone = sd1.encode_text("an <oil-style> painting")
    handle = apply(sd1, [CAT, STYLE])
    try:
        with pytest.raises(ApplyError, match=r"'<nope>' is not applied to this model \(applied now: <cat-doll>, "
                           r"<oil-style>\); pass tokens of applied concepts"):
            conceptlib.unload(sd1, ["<oil-style>", "<nope>"])
        assert handle.tokens == ["<cat-doll>", "<oil-style>"]  # the refused call changed nothing
        assert conceptlib.unload(sd1, "<cat-doll>") == ["<cat-doll>"]
        assert handle.loaded and handle.tokens == ["<oil-style>"] and "<cat-doll>" not in sd1.tokenizer.encoder
        assert handle.token_ids == {"<oil-style>": (49408, 49409, 49410)}
        np.testing.assert_allclose(sd1.encode_text("an <oil-style> painting"), style_alone, rtol=0, atol=1e-6)
    finally:
        handle.unload()
    assert not handle.loaded and "<oil-style>" not in sd1.tokenizer.encoder


def test_applies_in_sequence_keep_two_tables_alive_at_most(sd1):
    """Each apply rebuilds the table from the original, so the tables of earlier applies are
    freed (each one used to be kept for unload: 145 MiB apiece for sd-1, on the GPU with JAX)."""
    import gc
    import weakref

    original = token_embedding_layer(sd1.text_encoder)._embeddings
    handles, tables = [], []
    for index in range(4):
        handles.append(apply(sd1, [_concept(f"c{index}", f"<c{index}>", 2, 768, seed=20 + index)]))
        tables.append(weakref.ref(token_embedding_layer(sd1.text_encoder)._embeddings))
    gc.collect()
    assert [table() is not None for table in tables] == [False, False, False, True]
    assert token_embedding_layer(sd1.text_encoder).input_dim == 49408 + 8  # what get_config reports
    for handle in handles:  # oldest first: any order works
        handle.unload()
    layer = token_embedding_layer(sd1.text_encoder)
    assert layer._embeddings is original and layer.input_dim == 49408


def test_a_with_block_unloads_only_what_was_applied_inside_it(sd1):
    before_block = apply(sd1, [STYLE])
    try:
        cat = apply(sd1, [CAT])
        with cat:  # a handle made before the block: `before_block` is not the block's to unload
            pass
        assert not cat.loaded and before_block.loaded
        with apply(sd1, [CAT]) as inside:
            inside.unload()
            later = apply(sd1, [_concept("later", "<later>", 1, 768, seed=30)])
        assert not later.loaded and before_block.loaded  # applied inside the block: unloaded with it
    finally:
        before_block.unload()
    assert len(sd1.tokenizer.vocab) == 49408


def test_nested_blocks_of_one_handle_unload_it_at_the_outermost_exit(sd1):
    handle = apply(sd1, [CAT])
    with handle:
        with handle:
            inner = apply(sd1, [STYLE])
        assert handle.loaded and not inner.loaded  # the inner exit took only what was applied inside it
    assert not handle.loaded and handle.token_ids == {}


def test_a_replaced_text_encoder_is_refused_before_building_and_unload_all_is_the_way_out(sd1, monkeypatch):
    from conceptlib.kerascv import apply as apply_module

    text_encoder = sd1._text_encoder
    handle = apply(sd1, [CAT])
    sd1._text_encoder = None
    monkeypatch.setattr(apply_module, "_ensure_text_encoder", lambda *a: pytest.fail("built a text encoder"))
    with pytest.raises(ApplyError, match="text encoder was replaced after concepts were applied to it; put back"):
        apply(sd1, [STYLE])
    monkeypatch.undo()
    assert apply_module.unload(sd1) == ["<cat-doll>"] and not handle.loaded
    assert "<cat-doll>" not in sd1.tokenizer.encoder
    sd1._text_encoder = text_encoder  # put back: it got its original table back too
    assert token_embedding_layer(text_encoder)._embeddings.shape[0] == 49408


def test_lora_enabled_after_apply_is_refused_on_unload_and_a_blocks_own_error_goes_through(plain_tokenizer):
    sd = build_stable_diffusion("sd-1", 128)
    with pytest.raises(RuntimeError, match="boom") as info:
        with apply(sd, [CAT]) as handle:
            token_embedding_layer(sd.text_encoder).enable_lora(2)
            raise RuntimeError("boom")
    assert info.value.__notes__ == ["conceptlib could not unload on leaving the block: the text encoder's token "
                                    "table was LoRA enabled after concepts were applied, so they cannot be taken out "
                                    "of it; build the text encoder again (and apply concepts before enable_lora() / "
                                    "quantize())"]
    assert handle.loaded
    with pytest.raises(ApplyError, match="token table was LoRA enabled after concepts were applied"):
        handle.unload()


def test_an_instance_sharing_the_text_encoder_cannot_take_the_extended_table_for_the_original(sd1):
    other = build_stable_diffusion("sd-1", 128)
    other._text_encoder = sd1.text_encoder
    with apply(sd1, [CAT]):
        with pytest.raises(ApplyError, match="holds concepts applied through another StableDiffusion"):
            apply(other, [STYLE])
    with apply(other, [STYLE]):  # once sd1's concepts are out, the table is the original again
        assert "<oil-style>" in other.tokenizer.encoder


def test_an_encode_wrapper_installed_before_apply_keeps_being_called(sd1):
    calls = []
    plain = sd1.tokenizer.encode

    def wrapper(text):
        calls.append(text)
        return plain(text)

    sd1.tokenizer.encode = wrapper
    try:
        with apply(sd1, [STYLE]) as handle:
            ids = sd1.tokenizer.encode("an <oil-style> painting")
            assert calls == ["an <oil-style> painting"] and len(ids) == 2 + 1 + 3 + 1
            assert handle.token_ids["<oil-style>"] == tuple(ids[2:5])
        assert sd1.tokenizer.encode is wrapper
    finally:
        del sd1.tokenizer.encode


def test_unload_takes_a_handle_and_refuses_other_things(sd1):
    import conceptlib

    handle = apply(sd1, [CAT, STYLE])
    with pytest.raises(ApplyError, match=r"unload\(sd, 5\): pass a token, a list of tokens, a handle, or nothing"):
        conceptlib.unload(sd1, 5)
    assert conceptlib.unload(sd1, handle) == ["<cat-doll>", "<oil-style>"] and not handle.loaded


def test_a_too_long_prompt_is_still_a_value_error(sd1):
    """keras-cv raises ValueError for a too-long prompt; code catching that keeps working."""
    with apply(sd1, [CAT]):
        with pytest.raises(ValueError, match="is 82 tokens"):
            sd1.encode_text(" ".join(["cat"] * 80))


def test_the_fix_offered_for_a_token_fits_where_the_concept_came_from(sd1, tmp_path):
    from conceptlib.files import write_concept
    from conceptlib.library import ConceptLibrary

    word = _concept("style", "style", 1, 768, seed=31)
    path = write_concept(word, tmp_path / "style.safetensors")
    with pytest.raises(ApplyError, match=r"conceptlib import FILE --token '<style-2>'.*\.renamed\(token='<style-2>'\)"):
        apply(sd1, [str(path)])
    with pytest.raises(ApplyError, match=r"pass concept\.renamed\(token='<style-2>'\)$"):
        apply(sd1, [word])
    library = ConceptLibrary(tmp_path / "lib")
    library.add(word)
    with pytest.raises(ApplyError, match=r"`conceptlib rename style NEW --token '<style-2>'`$"):
        apply(sd1, ["style"], library=library)


def test_a_lora_or_quantized_token_table_is_refused_before_any_change():
    import keras

    sd = build_stable_diffusion("sd-1", 128)
    layer = token_embedding_layer(sd.text_encoder)
    layer.enable_lora(4)
    variable, vocab = layer._embeddings, len(sd.tokenizer.vocab)
    with pytest.raises(ApplyError, match=r"token table is LoRA enabled; conceptlib extends a "
                       r"plain table: apply concepts before enable_lora\(\) / quantize\(\)"):
        apply(sd, [CAT])
    assert layer._embeddings is variable and len(sd.tokenizer.vocab) == vocab
    from conceptlib.kerascv.apply import _check_layer

    quantized = keras.layers.Embedding(8, 4)
    quantized.build()
    quantized.quantize("int8")
    with pytest.raises(ApplyError, match="is int8-quantized"):
        _check_layer(quantized)


def test_sd2_with_1024_wide_concepts(plain_tokenizer):
    sd2 = build_stable_diffusion("sd-2", 128)
    original = table_of(sd2)
    assert original.shape[1] == 1024
    wide = _concept("wide-doll", "<wide-doll>", 2, 1024, seed=7)
    plain_before = sd2.encode_text(PLAIN[0])
    with pytest.raises(ApplyError) as info:
        apply(sd2, [CAT])
    assert "768" in str(info.value) and "1024" in str(info.value) and "sd-2" in str(info.value)
    with apply(sd2, [wide]) as applied:
        got = sd2.encode_text("a photo of <wide-doll> on a table")
        ids = applied.token_ids["<wide-doll>"]
        np.testing.assert_allclose(sd2.encode_text(PLAIN[0]), plain_before, rtol=0, atol=1e-6)
    expected = encode_by_hand(
        sd2.text_encoder, np.concatenate([original, wide.vectors]),
        reference_ids(plain_tokenizer, "a photo of", ids, "on a table"), plain_tokenizer.end_of_text,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.array_equal(sd2.encode_text(PLAIN[0]), plain_before)


def test_not_yet_built_keras_cv_instance_builds_from_resolved_weights(tmp_path_factory, monkeypatch, plain_tokenizer):
    """A plain keras_cv StableDiffusion whose parts are not built: apply builds the text encoder
    from $CONCEPTLIB_WEIGHTS and the tokenizer from the local vocabulary, never downloading."""
    import keras
    import keras_cv

    from conceptlib.weights import write_random_weights

    folder = write_random_weights(tmp_path_factory.mktemp("te-weights"), "sd-1", parts=["text_encoder"])
    monkeypatch.setenv("CONCEPTLIB_WEIGHTS", str(folder))

    def no_download(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    sd = keras_cv.models.StableDiffusion(img_height=128, img_width=128, jit_compile=False)
    assert sd._text_encoder is None and sd._tokenizer is None
    with apply(sd, [CAT]) as applied:
        got = sd.encode_text(PROMPT_A)
        ids = applied.token_ids["<cat-doll>"]
    table = table_of(sd)
    expected = encode_by_hand(
        sd.text_encoder, np.concatenate([table, CAT.vectors]),
        reference_ids(plain_tokenizer, "a photo of", ids, "on a table"), plain_tokenizer.end_of_text,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The table came from the file, not from a fresh initialisation.
    import h5py

    with h5py.File(folder / "kcv_encoder.h5") as handle:
        stored = []
        handle.visititems(lambda name, obj: stored.append(np.asarray(obj)) if getattr(obj, "shape", None) == table.shape else None)
    assert any(np.array_equal(s, table) for s in stored)


_JAX_SCRIPT = r"""
import numpy as np
import keras
from conceptlib import Concept
from conceptlib.kerascv.apply import apply, token_embedding_layer
from conceptlib.kerascv.models import build_stable_diffusion
from conceptlib.kerascv.tokenizer import make_tokenizer

assert keras.backend.backend() == "jax"
sd = build_stable_diffusion("sd-1", 128, jit_compile=True)  # jax.jit predict function
plain = make_tokenizer()
base = sd.encode_text("a photo of a cat")
table = np.array(token_embedding_layer(sd.text_encoder).embeddings)
concept = Concept("x", "<x>", np.random.default_rng(0).normal(0, 0.05, (3, 768)).astype("float32"))
with apply(sd, [concept]) as applied:
    got = sd.encode_text("a <x> cat")
    assert np.array_equal(sd.encode_text("a photo of a cat"), base)
    ids = plain.encode("a")[:-1] + list(applied.token_ids["<x>"]) + plain.encode("cat")[1:]
ids = ids + [plain.end_of_text] * (77 - len(ids))
encoder = sd.text_encoder
embedding = next(l for l in encoder.layers if hasattr(l, "token_embedding"))
x = np.concatenate([table, concept.vectors])[np.array(ids)] + np.array(embedding.position_embedding.embeddings)
x = keras.ops.convert_to_tensor(x[None])
for layer in encoder.layers[encoder.layers.index(embedding) + 1:]:
    x = layer(x)
np.testing.assert_allclose(got, np.array(x), rtol=1e-5, atol=1e-5)
assert np.array_equal(sd.encode_text("a photo of a cat"), base)
with apply(sd, [concept]):
    assert np.array_equal(sd.encode_text("a <x> cat"), got)
print("ok")
"""


def test_jax_backend_jit_predict_function_sees_the_new_table():
    """Keras fixes its backend per process: run the JAX check in a subprocess."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _JAX_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
