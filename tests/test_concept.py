"""Token validation: a token must be something a prompt typed by a user can contain once keras-cv's
SimpleTokenizer has cleaned the prompt (HTML unescaped twice, whitespace collapsed, lowercased)."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from conceptlib.cli import main
from conceptlib.concept import Concept, suggested_token, validate_token
from conceptlib.errors import ConceptError
from conceptlib.library import ConceptLibrary

NFD_CAFE = unicodedata.normalize("NFD", "<café>")
NFC_CAFE = unicodedata.normalize("NFC", "<café>")


@pytest.mark.parametrize("token", ["<cat-doll>", "<a&b>", "x&y", "&", "<café>", "ö", "<&#x>", "&;"])
def test_tokens_prompts_can_contain_are_accepted(token):
    assert validate_token(token) == token


@pytest.mark.parametrize("token,needle", [
    ("<cat>\n", "use 1-64 characters without whitespace"),
    ("<caf\udce9>", "it is not UTF-8 text"),
])
def test_a_trailing_newline_or_text_that_is_not_utf8_is_refused(token, needle):
    with pytest.raises(ConceptError, match=needle):
        validate_token(token)


def test_a_name_with_a_trailing_newline_is_refused():
    from conceptlib.concept import validate_name

    with pytest.raises(ConceptError, match="invalid concept name"):
        validate_name("cat\n")


@pytest.mark.parametrize("name,needle", [
    ("Kitty", "e.g. 'kitty'"),
    ("<kitty>", "e.g. 'kitty'; a token? give it with --token '<kitty>'"),
    ("a" * 70, "'.' (70 here) (no '/'"),
    ("...", "e.g. 'cat-doll'"),
])
def test_an_invalid_name_is_told_a_name_close_to_it(name, needle):
    from conceptlib.concept import validate_name

    with pytest.raises(ConceptError) as info:
        validate_name(name)
    assert needle in str(info.value)


@pytest.mark.parametrize("token,becomes,use", [
    ("&amp;", "&", "&"),
    ("<a&amp;b>", "<a&b>", "<a&b>"),
    ("&lt;cat&gt;", "<cat>", "<cat>"),
    ("<x&#60;y>", "<x<y>", "<x<y>"),
    ("<x&#x3c;y>", "<x<y>", "<x<y>"),
    ("<a&lt>", "<a<>", "<a<>"),            # html.unescape also takes some entities without ';'
    ("&amp;lt;", "<", "<"),                # unescaped twice, as keras-cv does
    ("<a&nbsp;b>", "<a\xa0b>", "<a-b>"),   # the entity stands for whitespace
    ("&nbsp;", "\xa0", "-nbsp;"),          # only whitespace: the '&' goes instead
])
def test_a_token_with_an_html_entity_is_refused_with_a_token_to_use(token, becomes, use):
    with pytest.raises(ConceptError) as info:
        validate_token(token)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"invalid token {token!r}: it contains an HTML entity")
    assert f"becomes {becomes!r}" in message and message.endswith(f"; use {use!r}")
    assert validate_token(use) == use  # the advice itself is accepted


def test_a_token_not_in_nfc_form_is_refused_with_its_nfc_form():
    assert NFD_CAFE != NFC_CAFE and len(NFD_CAFE) == len(NFC_CAFE) + 1
    with pytest.raises(ConceptError) as info:
        validate_token(NFD_CAFE)
    message = str(info.value)
    # The two forms look alike on screen, so the message spells both out in escapes too.
    assert message.startswith(f"invalid token {NFD_CAFE!r} ({ascii(NFD_CAFE)}): it is not in Unicode NFC form")
    assert message.endswith(f"; use {NFC_CAFE!r} ({ascii(NFC_CAFE)})") and "\n" not in message
    # Capitals are reported first, with advice that fixes the form too.
    with pytest.raises(ConceptError, match="capitals") as info:
        validate_token(NFD_CAFE.upper())
    assert str(info.value).endswith(f"; use {NFC_CAFE!r}")


def test_suggested_tokens_are_valid():
    for text in ("<Cat Doll>", "&LT;x&GT;", NFD_CAFE.upper(), "a\tb&amp;c", "&nbsp;&nbsp;"):
        assert validate_token(suggested_token(text)) == suggested_token(text)


def test_a_concept_cannot_be_made_with_such_a_token():
    vectors = np.zeros((1, 768), np.float32)
    for token in ("<a&amp;b>", NFD_CAFE):
        with pytest.raises(ConceptError, match="invalid token"):
            Concept("doll", token, vectors)


def test_keras_cv_never_matches_the_refused_tokens_and_does_match_the_advice():
    """What the checks are for, measured with keras-cv's own SimpleTokenizer: a prompt typed with
    the refused token does not contain it once tokenized, one typed with the advice does."""
    from conceptlib.kerascv.tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    pairs = [("<a&amp;b>", "<a&b>"), ("&lt;doll&gt;", "<doll>"), ("<x&#60;y>", "<x<y>"), ("<a&lt>", "<a<>")]
    tokenizer.add_tokens([token for pair in pairs for token in pair])
    for refused, advice in pairs:
        assert tokenizer.encoder[refused] not in tokenizer.encode(f"a photo of {refused} on a table")
        assert tokenizer.encoder[advice] in tokenizer.encode(f"a photo of {advice} on a table")
    # keras-cv does not normalise Unicode: what a keyboard types (NFC) is other text than NFD, so
    # an NFD token never matches it. (Non-ASCII tokens work through apply: test_apply.py.)
    plain = make_tokenizer()
    assert plain.encode(f"a photo of {NFC_CAFE}") != plain.encode(f"a photo of {NFD_CAFE}")


# -- import: tokens derived from other tools' keys and file names -----------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    root = tmp_path / "home"
    monkeypatch.setenv("CONCEPTLIB_HOME", str(root))
    return root


def _vectors(seed):
    return np.random.default_rng(seed).standard_normal((1, 768)).astype(np.float32)


def test_import_skips_a_token_with_an_html_entity_and_composes_a_decomposed_file_name(home, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    save_file({"<a&amp;b>": _vectors(1)}, str(folder / "escaped.safetensors"))   # diffusers: the key is the token
    # kohya: the token is the file name, here decomposed (NFD) as macOS stores file names
    save_file({"emb_params": _vectors(2)}, str(folder / f"{NFD_CAFE}.safetensors"))
    save_file({"<good>": _vectors(3)}, str(folder / "good.safetensors"))
    result = CliRunner().invoke(main, ["import", str(folder)])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stdout.splitlines()
    escaped = [line for line in result.stderr.splitlines() if "escaped.safetensors" in line]
    assert escaped == [f"Skipped {folder / 'escaped.safetensors'}: invalid token '<a&amp;b>': it contains an "
                       "HTML entity, and KerasCV unescapes HTML in prompts, so '<a&amp;b>' typed in a prompt "
                       "becomes '<a&b>' and never matches; use '<a&b>' (import this file by itself with "
                       "--token '<a&b>')"]
    assert not any(line.startswith("Skipped") and NFD_CAFE in line for line in lines)
    assert lines[-1] == "2 imported, 1 skipped"
    assert result.stderr.strip().splitlines()[-1] == "Error: 1 of 3 concept files could not be imported; see the reasons above"
    # A token taken from a file name is composed (NFC), so what users type matches it.
    assert sorted(h.token for h in ConceptLibrary(home).list()) == sorted(["<good>", NFC_CAFE])

    # The advice works: imported one at a time with --token, and such a --token is a usage error.
    refused = CliRunner().invoke(main, ["import", str(folder / "escaped.safetensors"), "--token", "&lt;ab&gt;"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("Error: --token: invalid token '&lt;ab&gt;': it contains an HTML entity")
    assert sorted(h.token for h in ConceptLibrary(home).list()) == sorted(["<good>", NFC_CAFE])
    result = CliRunner().invoke(main, ["import", str(folder / "escaped.safetensors"), "--token", "<a&b>"])
    assert result.exit_code == 0, result.output
    assert sorted(h.token for h in ConceptLibrary(home).list()) == sorted(["<good>", "<a&b>", NFC_CAFE])


def test_a_library_concept_whose_token_is_now_refused_can_be_given_a_new_one(home):
    # A file written before tokens had to be NFC: listed as skipped with the fix, which works.
    (home / "concepts").mkdir(parents=True)
    metadata = {"format": "conceptlib/1", "name": "cafe", "token": NFD_CAFE, "base_model": "sd-1",
                "num_vectors": "1", "dim": "768"}
    save_file({NFD_CAFE: _vectors(4)}, str(home / "concepts" / "cafe.safetensors"), metadata=metadata)
    listed = CliRunner().invoke(main, ["list"])
    assert listed.exit_code == 0 and "No concepts" in listed.stdout
    assert listed.stderr.startswith("Warning: skipped ") and "not in Unicode NFC form" in listed.stderr
    assert listed.stderr.rstrip().endswith(f"(give it another token: conceptlib rename cafe cafe --token '{NFC_CAFE}')")

    renamed = CliRunner().invoke(main, ["rename", "cafe", "cafe", "--token", NFC_CAFE])
    assert renamed.exit_code == 0, renamed.output
    concept = ConceptLibrary(home).get("cafe")
    assert concept.token == NFC_CAFE
    np.testing.assert_array_equal(concept.vectors, _vectors(4))
