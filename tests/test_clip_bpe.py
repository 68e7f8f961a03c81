"""conceptlib.clip_bpe.ClipTokenizer gives exactly keras-cv's SimpleTokenizer results (ids,
encoder, decode) from the same vocabulary file, and `prepare` uses it, so that preparing a run
imports neither keras-cv nor TensorFlow."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conceptlib.clip_bpe import ClipTokenizer
from conceptlib.errors import VocabularyError
from conceptlib.kerascv import tokenizer as tok

CORPUS = [
    # plain prompts
    "a photo of a cat",
    "A painting of a dog in the style of Van Gogh, trending on artstation",
    "an oil painting of a lighthouse at dusk",
    # punctuation and numbers
    "hello, world! how are you?? ... (fine) [ok] {yes} <no>",
    "3 cats and 42 dogs, 1999-12-31, 3.14159, 1,000,000 $5 50% #1 @home",
    "a;b:c/d\\e|f~g`h^i*j+k=l_m-n",
    "!!!???...---",
    # apostrophes
    "it's the cat's toy, don't touch, we're, they've, I'm, you'll, he'd",
    "IT'S DON'T WE'RE",
    "'s 't 're 've 'm 'll 'd",
    "rock 'n' roll o'clock",
    # unicode
    "café crème brûlée, naïve über Müller, Ærøskøbing, São Paulo",
    "a cat 🐱 with a hat 🎩 and a 👩‍👩‍👧 family ✨",
    "東京の猫 中文字符 한국어 고양이",
    "Ελληνικά Русский текст עברית العربية हिन्दी",
    "ﬁne ligatures ½ ² ⅷ Ⅻ ① ℃",
    "zero\u200bwidth and\u00a0nbsp and\ttabs",
    # HTML entities (unescaped twice, as keras-cv does)
    "&amp; &lt;tag&gt; &quot;quoted&quot; &#39;single&#39; &amp;amp; &nbsp;",
    "caf&eacute; &#233; &#x1F431; &copy; 2024",
    # whitespace
    "  lots   of\n\n  whitespace \t\r\n here  ",
    "\n\t ",
    # mixed case
    "MiXeD CaSe WoRdS LikE ThIs",
    "ALL CAPS PROMPT",
    # long words
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300,
    "xq" * 80,
    # empty and special tokens
    "",
    "<|startoftext|> a cat <|endoftext|>",
    "<|ENDOFTEXT|>",
    # concept tokens as prompts contain them
    "a photo of <cat-doll>",
    "<cat-doll> on a shelf next to <my_concept> and <x>",
    "<CAT-DOLL>, in the style of <style-v2>",
    "<cat-doll>'s hat",
]


def _random_strings(count: int, seed: int = 0) -> list[str]:
    """Seeded mixtures of letters, digits, punctuation, whitespace, accents, CJK and emoji."""
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"-_<>/&#()\t\n") + list(
        "éüßøñçà東京猫한😀🎨✨—’“”"
    )
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(alphabet, size=rng.integers(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def vocab_path():
    try:
        return tok.find_vocab_path()
    except VocabularyError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ours(vocab_path):
    return ClipTokenizer(vocab_path)


@pytest.fixture(scope="module")
def keras_cv_tokenizer(vocab_path):
    from keras_cv.models.stable_diffusion import SimpleTokenizer

    return SimpleTokenizer(bpe_path=str(vocab_path))


@pytest.mark.parametrize("text", CORPUS)
def test_same_ids_as_keras_cv(ours, keras_cv_tokenizer, text):
    assert ours.encode(text) == keras_cv_tokenizer.encode(text)


def test_same_ids_as_keras_cv_for_random_strings(ours, keras_cv_tokenizer):
    for text in _random_strings(300):
        assert ours.encode(text) == keras_cv_tokenizer.encode(text), repr(text)


def test_known_ids(ours):
    # "a photo of a cat" in CLIP's vocabulary (also what every SD 1.x pipeline feeds its encoder).
    assert ours.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ours.encode("") == [49406, 49407]


def test_same_encoder_decoder_and_special_ids(ours, keras_cv_tokenizer):
    assert len(ours.encoder) == len(keras_cv_tokenizer.encoder) == 49408
    assert ours.encoder == keras_cv_tokenizer.encoder
    assert ours.decoder == keras_cv_tokenizer.decoder
    assert ours.bpe_ranks == keras_cv_tokenizer.bpe_ranks
    assert (ours.start_of_text, ours.end_of_text) == (49406, 49407)
    assert (ours.start_of_text, ours.end_of_text) == (keras_cv_tokenizer.start_of_text, keras_cv_tokenizer.end_of_text)


def test_decode_matches_keras_cv_and_round_trips(ours, keras_cv_tokenizer):
    for text in CORPUS + _random_strings(100, seed=1):
        ids = ours.encode(text)
        assert ours.decode(ids) == keras_cv_tokenizer.decode(ids)
        # What the prompt means after cleaning comes back (pieces end with a space).
        body = ours.decode(ids[1:-1])
        assert ours.encode(body) == ids, repr(text)
    assert ours.decode(ours.encode("a photo of a cat")[1:-1]) == "a photo of a cat "
    assert ours.decode(np.array([2368], dtype=np.int64)) == "cat "
    # Single ids of a multi-byte character decode with replacement characters, as keras-cv's do.
    for token_id in ours.encode("🐱")[1:-1]:
        assert ours.decode([token_id]) == keras_cv_tokenizer.decode([token_id])


def test_bpe_is_cached(ours, keras_cv_tokenizer):
    word = "".join(ours.byte_encoder[b] for b in "unbelievability".encode())
    first = ours.bpe(word)
    assert first == keras_cv_tokenizer.bpe(word)
    assert ours.cache[word] == first
    assert ours.bpe(word) is first


def test_unreadable_vocabulary_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / tok.VOCAB_FILE
    bad.write_bytes(gzip.compress(b"header\n\xff\xfe not utf-8"))
    monkeypatch.setenv(tok.ENV_VAR, str(bad))
    with pytest.raises(VocabularyError, match="not a readable CLIP vocabulary") as info:
        tok.make_clip_tokenizer(download=False)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)
    bad.write_bytes(gzip.compress(b"#version: 0.2\na b\n" * 100)[:40])  # truncated gzip
    with pytest.raises(VocabularyError, match="not a readable CLIP vocabulary"):
        tok.make_clip_tokenizer(download=False)


def test_make_clip_tokenizer_uses_the_found_vocabulary(vocab_path, ours):
    made = tok.make_clip_tokenizer(download=False)
    assert isinstance(made, ClipTokenizer)
    assert made.encoder == ours.encoder


PREPARE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from conceptlib.library import ConceptLibrary
    from conceptlib.training import TrainingConfig, prepare

    images, home, out = sys.argv[1:4]
    config = TrainingConfig(images=images, name="doll", token="<cat-doll>", trainer="jax",
                            weights="random", init=["doll", "toy"], resolution=64, steps=2)
    job = prepare(config, library=ConceptLibrary(home))
    json.dump({
        "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("keras_cv", "tensorflow", "keras")),
        "tokenizer": type(job.tokenizer).__module__ + "." + type(job.tokenizer).__name__,
        "init_ids": job.init_ids,
        "prompt_ids": job.prompt_ids("a photo of <cat-doll>")[:8],
        "new_ids": list(job.new_ids),
        "vocab_size": job.vocab_size,
        "run_dir_exists": job.run_dir.path.is_dir(),
    }, open(out, "w"))
    """
)


def test_prepare_imports_neither_keras_cv_nor_tensorflow(tmp_path, keras_cv_tokenizer):
    pytest.importorskip("conceptlib_jax")
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray((rng.random((80, 96, 3)) * 255).astype("uint8")).save(images / f"p{index}.png")
    out = tmp_path / "out.json"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env["CONCEPTLIB_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-c", PREPARE_SCRIPT, str(images), str(tmp_path / "home"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    modules = report["modules"]
    assert not any(m == "keras_cv" or m.startswith("keras_cv.") for m in modules), modules
    assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in modules), modules
    assert report["tokenizer"] == "conceptlib.clip_bpe.ClipTokenizer"
    assert report["run_dir_exists"]
    # The job's ids are keras-cv's ids.
    assert report["vocab_size"] == len(keras_cv_tokenizer.encoder)
    assert report["init_ids"] == keras_cv_tokenizer.encode("doll")[1:-1] + keras_cv_tokenizer.encode("toy")[1:-1]
    photo = keras_cv_tokenizer.encode("a photo of")[:-1]
    assert report["prompt_ids"] == (photo + report["new_ids"] + [keras_cv_tokenizer.end_of_text] * 8)[:8]
