"""Other tools' files: read them as those tools write them, export files those tools load.

torch/safetensors.torch are used only the way diffusers, AUTOMATIC1111, kohya and the
sd-concepts-library write and read their files.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from conceptlib.concept import Concept
from conceptlib.errors import ConceptFileError, ConceptlibError, UnsafePickleError, UnsupportedFormatError, UsageError
from conceptlib.files import read_concept, read_file_header, write_concept
from conceptlib.formats import EXPORT_FORMATS, Source, discover, export, load_any, load_source

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

ZIP = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


def a1111_save(path, vec, zip_format=True):
    """What AUTOMATIC1111's Embedding.save writes."""
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": path.stem,
        "step": 1999,
        "sd_checkpoint": "6ce0161689",
        "sd_checkpoint_name": "v1-5-pruned-emaonly",
    }
    torch.save(data, path, _use_new_zipfile_serialization=zip_format)
    return path


def one(path, **kw) -> Concept:
    concepts = load_any(path, **kw)
    assert len(concepts) == 1
    return concepts[0]


# -- reading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(768,), (1, 768), (4, 768), (2, 1024)])
def test_diffusers_safetensors(tmp_path, shape):
    vec = torch.randn(*shape)
    path = tmp_path / "learned_embeds.safetensors"
    safetensors_torch.save_file({"<cat-toy>": vec}, path, metadata={"format": "pt"})
    concept = one(path)
    assert (concept.name, concept.token) == ("cat-toy", "<cat-toy>")
    np.testing.assert_array_equal(concept.vectors, vec.reshape(-1, shape[-1]).numpy())
    assert concept.metadata["source_format"] == "diffusers"


@ZIP
@pytest.mark.parametrize("shape", [(768,), (3, 768)])
def test_diffusers_bin(tmp_path, zip_format, shape):
    vec = torch.randn(*shape)
    path = tmp_path / "learned_embeds.bin"
    torch.save({"<Cat-Toy>": vec}, path, _use_new_zipfile_serialization=zip_format)
    concept = one(path)
    # KerasCV lowercases prompts, so the token is stored lowercase.
    assert concept.token == "<cat-toy>" and concept.name == "cat-toy"
    np.testing.assert_array_equal(concept.vectors, vec.reshape(-1, 768).numpy())
    assert one(path, token="<mine>", name="mine").token == "<mine>"


@ZIP
def test_sd_concepts_library_folder(tmp_path, zip_format):
    folder = tmp_path / "midjourney-style"
    folder.mkdir()
    vec = torch.randn(768)
    torch.save({"<midjourney-style>": vec}, folder / "learned_embeds.bin", _use_new_zipfile_serialization=zip_format)
    (folder / "token_identifier.txt").write_text("<midjourney-style>")
    (folder / "type_of_concept.txt").write_text("style")
    (folder / "README.md").write_text("# a concept")
    concept = one(folder)
    assert (concept.name, concept.token) == ("midjourney-style", "<midjourney-style>")
    assert concept.metadata["type_of_concept"] == "style"
    assert concept.metadata["source_format"] == "sd-concepts"
    np.testing.assert_array_equal(concept.vectors[0], vec.numpy())
    assert "preview" not in concept.metadata
    # token_identifier.txt wins over the key inside the file (the library's repos say so).
    (folder / "token_identifier.txt").write_text("<mj>")
    assert one(folder).token == "<mj>"
    # The repos' concept_images/ (their training pictures) give the preview: the first readable one.
    from PIL import Image

    (folder / "concept_images").mkdir()
    (folder / "concept_images" / "0.jpeg").write_text("not a picture")
    Image.new("RGB", (300, 200), (0, 90, 200)).save(folder / "concept_images" / "1.jpeg")
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "concept_images" / "2.jpeg")
    import base64
    import io

    with Image.open(io.BytesIO(base64.b64decode(one(folder).metadata["preview"]))) as preview:
        assert preview.size == (128, 85) and preview.getpixel((60, 40))[2] > 150


@ZIP
def test_a1111_pt(tmp_path, zip_format):
    vec = torch.randn(5, 768, requires_grad=True)
    path = a1111_save(tmp_path / "Dolly Style.pt", vec, zip_format)
    concept = one(path)
    # AUTOMATIC1111 uses the file name as the prompt word.
    assert (concept.name, concept.token) == ("dolly-style", "dolly-style")
    np.testing.assert_array_equal(concept.vectors, vec.detach().numpy())
    assert concept.metadata["a1111.step"] == "1999"
    assert concept.metadata["a1111.sd_checkpoint_name"] == "v1-5-pruned-emaonly"
    assert concept.metadata["source_format"] == "a1111"
    assert one(path, token="<dolly>").token == "<dolly>"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_kohya_emb_params(tmp_path, suffix):
    vec = torch.randn(3, 1024)
    path = tmp_path / f"mystyle{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file({"emb_params": vec}, path, metadata={"ss_network_module": "textual_inversion"})
    else:
        torch.save({"emb_params": vec}, path)
    concept = one(path)
    assert (concept.name, concept.token, concept.base_model) == ("mystyle", "mystyle", "sd-2")
    np.testing.assert_array_equal(concept.vectors, vec.numpy())
    assert one(path, token="<my-style>", name="my-style").token == "<my-style>"
    assert "created_at" not in concept.metadata  # no date in the file: the import time, set on adding


def test_an_imported_file_keeps_the_date_it_was_made(tmp_path):
    from safetensors.numpy import save_file

    vectors = np.ones((1, 768), np.float32)
    save_file({"emb_params": vectors}, str(tmp_path / "dated.safetensors"), metadata={"modelspec.date": "2023-05-01T10:00:00"})
    save_file({"emb_params": vectors}, str(tmp_path / "junk.safetensors"), metadata={"modelspec.date": "last spring"})
    assert one(tmp_path / "dated.safetensors").metadata["created_at"] == "2023-05-01T10:00:00"
    assert "created_at" not in one(tmp_path / "junk.safetensors").metadata


def test_a1111_dictionary_flattened_into_safetensors_is_named_after_its_file(tmp_path):
    """Converters write A1111's .pt as {'string_to_param.*': vectors}: the file name is the prompt
    word (the key once became every such file's token, so the second file collided)."""
    from safetensors.numpy import save_file

    for stem, seed in (("ink-style", 1), ("bad-hands", 2)):
        vectors = np.random.default_rng(seed).normal(size=(2, 768)).astype(np.float32)
        save_file({"string_to_param.*": vectors}, str(tmp_path / f"{stem}.safetensors"))
        concept = one(tmp_path / f"{stem}.safetensors")
        assert (concept.name, concept.token, concept.metadata["source_format"]) == (stem, stem, "a1111")
        np.testing.assert_array_equal(concept.vectors, vectors)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_safetensors(tmp_path, dtype):
    vec = torch.randn(2, 768).to(getattr(torch, dtype))
    path = tmp_path / "half.safetensors"
    safetensors_torch.save_file({"<half>": vec}, path)
    concept = one(path)
    assert concept.vectors.dtype == np.float32
    np.testing.assert_array_equal(concept.vectors, vec.float().numpy())


def test_our_own_files(tmp_path):
    original = Concept("cat-doll", "<cat-doll>", np.ones((2, 768), np.float32), {"trainer": "tensorflow", "x": "y"})
    path = write_concept(original, tmp_path / "whatever.safetensors")
    concept = one(path)
    assert (concept.name, concept.token) == ("cat-doll", "<cat-doll>")
    assert concept.metadata["x"] == "y" and concept.metadata["trainer"] == "tensorflow"
    assert "source_format" not in concept.metadata


@pytest.mark.parametrize("container", ["safetensors", "pt"])
def test_sdxl_is_refused_with_the_reason(tmp_path, container):
    tensors = {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}
    path = tmp_path / f"sdxl.{container}"
    if container == "safetensors":
        safetensors_torch.save_file(tensors, path)
    else:
        torch.save(tensors, path)
    with pytest.raises(UnsupportedFormatError, match="SDXL.*KerasCV has no SDXL"):
        load_any(path)


def test_folder_of_many(tmp_path):
    safetensors_torch.save_file({"<a>": torch.randn(1, 768)}, tmp_path / "a.safetensors")
    a1111_save(tmp_path / "b.pt", torch.randn(2, 768))
    torch.save({"<c>": torch.randn(768)}, tmp_path / "learned_embeds.bin")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    sources, skipped = discover(tmp_path)
    assert sorted(s.path.name for s in sources) == ["a.safetensors", "b.pt", "learned_embeds.bin"]
    assert sorted(s.path.name for s in skipped) == ["notes.txt", "sub"]
    assert sorted(c.token for c in load_any(tmp_path)) == ["<a>", "<c>", "b"]
    with pytest.raises(UsageError):
        load_any(tmp_path, token="<x>")


# -- bad input -------------------------------------------------------------------------------------


def _good_safetensors(path, shape=(2, 768), key="<t>"):
    safetensors_torch.save_file({key: torch.randn(*shape)}, path)
    return path


def test_bad_inputs_are_one_line_errors(tmp_path):

    good = _good_safetensors(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[:-10])
    (tmp_path / "header-cut.safetensors").write_bytes(raw[:20])
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    (tmp_path / "empty.bin").write_bytes(b"")
    _good_safetensors(tmp_path / "rank3.safetensors", shape=(1, 2, 768))
    _good_safetensors(tmp_path / "dim512.safetensors", shape=(2, 512))
    safetensors_torch.save_file({"<n>": torch.tensor([[float("nan")] * 768])}, tmp_path / "nan.safetensors")
    torch.save({"<i>": torch.full((768,), float("inf"))}, tmp_path / "inf.bin")
    safetensors_torch.save_file({"a": torch.randn(768), "b": torch.randn(768)}, tmp_path / "two.safetensors")
    safetensors_torch.save_file({"lora_up": torch.randn(4, 320), "lora_down": torch.randn(320, 4)},
                                tmp_path / "lora.safetensors")
    safetensors_torch.save_file({"<i>": torch.arange(768)}, tmp_path / "ints.safetensors")
    torch.save({"<i>": torch.arange(768).reshape(1, 768)}, tmp_path / "ints.bin")
    safetensors_torch.save_file({"<big>": torch.zeros(2000, 768)}, tmp_path / "big.safetensors")
    torch.save({"state_dict": {"a": torch.randn(3)}, "epoch": 3}, tmp_path / "checkpoint.pt")
    torch.save([torch.randn(768)], tmp_path / "list.pt")
    a1111_save(tmp_path / "toomany.pt", torch.randn(80, 768))
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "missing")
    expected = {
        "truncated.safetensors": "truncated",
        "header-cut.safetensors": "truncated",
        "garbage.safetensors": "not a safetensors file",
        "garbage.pt": "PyTorch",
        "empty.bin": "empty",
        "rank3.safetensors": "rank 3",
        "dim512.safetensors": "512",
        "nan.safetensors": "NaN or Inf",
        "inf.bin": "NaN or Inf",
        "two.safetensors": "holds 2 token embeddings (a, b)",
        "lora.safetensors": "exactly one (is this a model checkpoint or a LoRA?)",
        "ints.safetensors": "I64",
        "ints.bin": "the embedding holds int64 values, but embeddings are floating-point",
        "big.safetensors": "has shape [2000, 768], larger than any textual-inversion embedding",
        "checkpoint.pt": "not a textual-inversion embedding",
        "list.pt": "not a dictionary",
        "toomany.pt": "80 vectors",
        "folder.pt": "no concept files",
        "dangling.safetensors": "no such file",
    }
    for name, needle in expected.items():
        with pytest.raises(ConceptlibError) as info:
            load_any(tmp_path / name)
        message = str(info.value)
        assert needle in message, (name, message)
        assert "\n" not in message and info.value.exit_code == 1
        assert not isinstance(info.value, UnsafePickleError), name


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConceptFileError, match="no concept files"):
        load_any(tmp_path / "empty")
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "a.txt").write_text("x")
    with pytest.raises(ConceptFileError, match="no concept files"):
        load_any(tmp_path / "only-text")
    with pytest.raises(ConceptFileError, match="no such file"):
        load_any(tmp_path / "nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = _good_safetensors(tmp_path / "locked.safetensors")
    path.chmod(0)
    with pytest.raises(ConceptFileError, match="permission denied"):
        load_any(path)


def test_malicious_pickle_in_a_folder_is_refused(tmp_path):
    canary = tmp_path / "canary"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    torch.save({"<x>": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(UnsafePickleError, match="system"):
        load_any(tmp_path / "evil.bin")
    assert not canary.exists()


# -- writing: files the other tools load unchanged -----------------------------------------------


@pytest.fixture
def concept():
    rng = np.random.default_rng(3)
    return Concept("cat-doll", "<cat-doll>", rng.standard_normal((3, 768)).astype(np.float32),
                   {"training": '{"steps": 1200}', "type_of_concept": "object", "trainer": "tensorflow"})


def test_export_diffusers_safetensors(tmp_path, concept):
    path = export(concept, "diffusers", tmp_path)
    assert path.name == "learned_embeds.safetensors"
    # diffusers' load_textual_inversion: safetensors.torch.load_file, exactly one tensor keyed by the token.
    state = safetensors_torch.load_file(path)
    assert list(state) == ["<cat-doll>"]
    assert state["<cat-doll>"].dtype == torch.float32 and tuple(state["<cat-doll>"].shape) == (3, 768)
    np.testing.assert_array_equal(state["<cat-doll>"].numpy(), concept.vectors)
    back = one(path)
    assert back.token == concept.token
    np.testing.assert_array_equal(back.vectors, concept.vectors)


def test_a_single_vector_exports_flat_for_diffusers_and_invokeai(tmp_path, concept):
    """diffusers' script and sd-concepts-library files store one vector as shape [dim], and
    InvokeAI's installer reads a token-keyed tensor's width from its first dimension
    (``list(state_dict.values())[0].shape[0]``, which must be 768 or 1024)."""
    single = Concept("ink", "<ink>", concept.vectors[:1], concept.metadata)
    for out in ("learned_embeds.safetensors", "learned_embeds.BIN"):
        path = export(single, "diffusers", tmp_path / out)
        state = (safetensors_torch.load_file(path) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
        assert list(state.values())[0].shape[0] == 768, out
        np.testing.assert_array_equal(one(path).vectors, single.vectors)
    # Not our (n, dim) layout, so the file does not claim our format (a multi-vector one is ours).
    assert "format" not in read_file_header(tmp_path / "learned_embeds.safetensors").metadata
    assert read_file_header(export(concept, "diffusers", tmp_path / "many.safetensors")).metadata["format"] == "conceptlib/1"


def test_export_diffusers_bin(tmp_path, concept):
    path = export(concept, "diffusers", tmp_path / "learned_embeds.bin")
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert list(state) == ["<cat-doll>"]
    np.testing.assert_array_equal(state["<cat-doll>"].numpy(), concept.vectors)
    np.testing.assert_array_equal(one(path).vectors, concept.vectors)


def test_export_a1111(tmp_path, concept):
    path = export(concept, "a1111", tmp_path)
    assert path.name == "cat-doll.pt"
    data = torch.load(path, map_location="cpu", weights_only=True)
    # AUTOMATIC1111's load_from_file reads exactly these.
    params = data["string_to_param"]
    assert len(params) == 1
    emb = next(iter(params.items()))[1]
    assert isinstance(emb, torch.Tensor) and emb.dtype == torch.float32 and tuple(emb.shape) == (3, 768)
    np.testing.assert_array_equal(emb.detach().numpy(), concept.vectors)
    assert data["string_to_token"] == {"*": 265}
    assert data["name"] == "cat-doll" and data["step"] == 1200
    assert "sd_checkpoint" in data and "sd_checkpoint_name" in data
    assert data["conceptlib"]["token"] == "<cat-doll>"  # for conceptlib; the tools pass it over
    back = one(path)
    assert back.token == "<cat-doll>"  # its own token (A1111's prompt word is the file name)
    data.pop("conceptlib")
    torch.save(data, tmp_path / "plain.pt")  # as A1111 writes it: the file name is the token
    assert one(tmp_path / "plain.pt").token == "plain"
    np.testing.assert_array_equal(back.vectors, concept.vectors)


def _passes_a1111_safe_check(path) -> bool:
    """AUTOMATIC1111's modules/safe.py check_pt, restated: zip entries limited to <dir>/data.pkl,
    <dir>/data/<n>, <dir>/version, and the pickle's globals limited to its allowlist."""
    import pickletools
    import re
    import zipfile

    allowed_names = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
    allowed_globals = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_parameter",
                       "torch FloatStorage", "torch HalfStorage", "torch IntStorage", "torch LongStorage",
                       "torch DoubleStorage", "torch ByteStorage", "torch BFloat16Storage", "_codecs encode"}
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if not all(allowed_names.match(n) for n in names):
            return False
        (pkl,) = [n for n in names if n.endswith("/data.pkl")]
        ops = list(pickletools.genops(archive.read(pkl)))
    return all(arg in allowed_globals for op, arg, _ in ops if op.name == "GLOBAL") and not any(
        op.name == "STACK_GLOBAL" for op, _, _ in ops)


def test_exported_pickles_pass_a1111_safe_loader(tmp_path, concept):
    assert _passes_a1111_safe_check(export(concept, "a1111", tmp_path))
    assert _passes_a1111_safe_check(export(concept, "sd-concepts", tmp_path / "sdc") / "learned_embeds.bin")
    assert _passes_a1111_safe_check(export(concept, "diffusers", tmp_path / "x.bin"))
    # The check is real: files torch itself writes today carry extra records A1111's check refuses.
    torch.save({"<x>": torch.zeros(768)}, tmp_path / "torch.bin")
    assert not _passes_a1111_safe_check(tmp_path / "torch.bin")


def test_export_sd_concepts(tmp_path, concept):
    single = Concept("toy", "<toy>", concept.vectors[:1], {"type_of_concept": "style"})
    folder = export(single, "sd-concepts", tmp_path / "toy")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt"]
    state = torch.load(folder / "learned_embeds.bin", map_location="cpu", weights_only=True)
    assert list(state) == ["<toy>"] and tuple(state["<toy>"].shape) == (768,)
    assert (folder / "token_identifier.txt").read_text() == "<toy>"
    assert (folder / "type_of_concept.txt").read_text() == "style"
    back = one(folder)
    assert (back.name, back.token, back.metadata["type_of_concept"]) == ("toy", "<toy>", "style")
    np.testing.assert_array_equal(back.vectors, single.vectors)
    # Multi-vector concepts keep their (n, dim) shape.
    multi = export(concept, "sd-concepts", tmp_path / "multi")
    assert tuple(torch.load(multi / "learned_embeds.bin", weights_only=True)["<cat-doll>"].shape) == (3, 768)


def test_sd_concepts_export_is_a_hub_ready_repository_with_a_model_card(tmp_path, concept):
    """README.md is a Hugging Face model card (YAML front matter the Hub reads, the trigger word,
    how to load it) from the concept's description; its preview goes beside it, and comes back on
    import."""
    import base64
    import io

    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (32, 24), (1, 2, 3)).save(picture, format="PNG")
    described = Concept("toy", "<toy>", concept.vectors, {
        "modelspec.title": "Plush toy", "modelspec.description": "A *plush* toy.", "modelspec.license": "CC-BY-4.0",
        "modelspec.tags": "toy, plush: soft", "modelspec.author": "Jo Doe", "modelspec.usage_hint": "weight 0.8",
        "trainer": "jax", "training": json.dumps({"steps": 500, "batch_size": 4, "learning_rate": 0.005, "resolution": 512}),
        "final_loss": "0.1234", "preview": base64.b64encode(picture.getvalue()).decode("ascii"),
    })
    folder = export(described, "sd-concepts", tmp_path / "toy")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "learned_embeds.bin", "preview.png", "token_identifier.txt", "type_of_concept.txt"]
    assert (folder / "preview.png").read_bytes() == picture.getvalue()
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front.splitlines() == ["license: cc-by-4.0", "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5",
                                  "tags:", '- "stable-diffusion"', '- "stable-diffusion-diffusers"',
                                  '- "text-to-image"', '- "textual-inversion"', '- "toy"', '- "plush: soft"']
    for line in ("# Plush toy", "A *plush* toy.", "Trigger word: `<toy>` (3 vectors of 768, for Stable Diffusion 1.x).",
                 "weight 0.8", "![Plush toy](preview.png)", 'image = pipe("a photo of <toy>").images[0]',
                 'pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")',
                 "- Author: Jo Doe", "- Trained with conceptlib (jax trainer): 500 steps, batch 4, learning rate 0.005, "
                 "512 px, final loss 0.1234"):
        assert line in body.splitlines(), line
    back = one(folder)
    assert back.metadata["preview"] and back.metadata["source_format"] == "sd-concepts"
    # Without a description or preview the card still says what the concept is.
    plain = (export(concept, "sd-concepts", tmp_path / "plain") / "README.md").read_text()
    assert "A textual-inversion concept for Stable Diffusion 1.x." in plain and "license:" not in plain
    assert "randomly initialised" not in plain and "randomly initialised" in (export(
        Concept("r", "<r>", concept.vectors, {"random_weights": "true"}), "sd-concepts", tmp_path / "r") / "README.md").read_text()
    assert not (tmp_path / "plain" / "preview.png").exists()
    # A 1024-wide concept's card points the Hub and the snippet at an SD 2.x pipeline.
    wide = Concept("wide", "<wide>", np.ones((1, 1024), np.float32), {})
    wide_card = (export(wide, "sd-concepts", tmp_path / "wide") / "README.md").read_text()
    assert "base_model: stabilityai/stable-diffusion-2-1-base" in wide_card.splitlines()
    assert 'from_pretrained("stabilityai/stable-diffusion-2-1-base")' in wide_card


@pytest.mark.parametrize("license_name, lines", [
    ("CreativeML Open RAIL-M", ["license: creativeml-openrail-m"]),  # describe --help's own example
    ("cc by-nc 4.0", ["license: cc-by-nc-4.0"]),
    ("CC0", ["license: cc0-1.0"]),
    ("Proprietary, ask me", ["license: other", 'license_name: "proprietary-ask-me"']),
    ("https://example.com/terms", ["license: other", 'license_link: "https://example.com/terms"']),
])
def test_the_model_cards_license_is_a_hub_id_or_other(concept, tmp_path, license_name, lines):
    """The Hub accepts only its own license ids; any other license is `other` with its name or link."""
    described = Concept("toy", "<toy>", concept.vectors, {"modelspec.license": license_name})
    card = (export(described, "sd-concepts", tmp_path / "toy") / "README.md").read_text()
    front = card.split("---\n")[1].splitlines()
    assert front[:len(lines)] == lines and front[len(lines)].startswith("base_model: ")


def test_an_sd_concepts_export_comes_back_with_its_description(concept, tmp_path):
    """The model card carries the description keys and the creation date in a comment the Hub does
    not show; import reads them back (before, only the vectors and token came back). A Hub repo's
    card without that comment gives its front matter's license."""
    described = Concept("toy", "<toy>", concept.vectors, {
        "modelspec.title": "Plush -- toy", "modelspec.description": "Soft.\n\n<!-- not the end -->", "modelspec.author": "Jo",
        "modelspec.license": "CC-BY-4.0", "modelspec.usage_hint": "weight 0.8", "modelspec.category": "Object",
        "modelspec.tags": "toy, plush", "created_at": "2026-01-02T03:04:05+00:00"})
    back = one(export(described, "sd-concepts", tmp_path / "toy"))
    for key, value in described.metadata.items():
        assert back.metadata[key] == value, key
    hub = tmp_path / "hub-repo"
    hub.mkdir()
    repo = export(Concept("cat", "<cat-toy>", concept.vectors[:1]), "sd-concepts", hub / "cat")
    (repo / "README.md").write_text("---\nlicense: mit\ntags:\n- textual-inversion\n---\n# cat\n")
    assert one(repo).metadata["modelspec.license"] == "mit"


def test_exports_hold_descriptions_to_describes_rules(concept, tmp_path):
    """A library file stored before import cleaned descriptions may hold terminal escapes: what is
    shared never does."""
    dirty = Concept("toy", "<toy>", concept.vectors, {"modelspec.title": "a\x1b]0;x\x07b", "modelspec.author": "c\nd"})
    card = (export(dirty, "sd-concepts", tmp_path / "toy") / "README.md").read_text()
    assert "# a]0;xb" in card.splitlines() and "- Author: c d" in card.splitlines()
    shared = read_file_header(export(dirty, "kohya", tmp_path / "toy.safetensors")).metadata
    assert (shared["modelspec.title"], shared["modelspec.author"]) == ("a]0;xb", "c d")


@pytest.mark.parametrize("metadata, kind", [
    ({"training": json.dumps({"steps": 500, "template": "style"})}, "style"),
    ({"modelspec.category": "Style"}, "style"),
    ({"training": json.dumps({"steps": 500, "template": "object"})}, "object"),
    ({"type_of_concept": "object", "modelspec.category": "Style"}, "object"),  # as the imported folder said
    ({}, "object"),
])
def test_sd_concepts_type_follows_how_the_concept_was_trained_or_described(concept, tmp_path, metadata, kind):
    folder = export(Concept("ink", "<ink>", concept.vectors, metadata), "sd-concepts", tmp_path / "ink")
    assert (folder / "type_of_concept.txt").read_text() == kind
    prompt = {"style": "a painting in the style of <ink>", "object": "a photo of <ink>"}[kind]
    assert f'image = pipe("{prompt}").images[0]' in (folder / "README.md").read_text().splitlines()


def test_a_foreign_files_embedded_picture_becomes_the_preview(tmp_path):
    """kohya-family files (and civitai's) carry cover images, ModelSpec files a thumbnail data URI:
    either becomes the concept's preview; a damaged one is passed over, the import goes on."""
    import base64
    import io

    from PIL import Image
    from safetensors.numpy import save_file

    def encoded(color, fmt):
        buffer = io.BytesIO()
        Image.new("RGB", (256, 192), color).save(buffer, format=fmt)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    vectors = np.ones((1, 768), np.float32)
    save_file({"emb_params": vectors}, str(tmp_path / "covered.safetensors"),
              metadata={"ssmd_cover_images": json.dumps(["not base64!", encoded((250, 0, 0), "JPEG")])})
    save_file({"<thumb>": vectors}, str(tmp_path / "thumb.safetensors"),
              metadata={"modelspec.thumbnail": "data:image/png;base64," + encoded((0, 250, 0), "PNG")})
    save_file({"<bad>": vectors}, str(tmp_path / "bad.safetensors"), metadata={"ssmd_cover_images": "[1, {}]"})
    for name, color in (("covered", (250, 0, 0)), ("thumb", (0, 250, 0))):
        preview = base64.b64decode(one(tmp_path / f"{name}.safetensors").metadata["preview"])
        with Image.open(io.BytesIO(preview)) as image:
            assert image.format == "PNG" and image.size == (128, 96)
            assert all(abs(a - b) < 8 for a, b in zip(image.getpixel((60, 40)), color))
    assert "preview" not in one(tmp_path / "bad.safetensors").metadata


def test_export_kohya(tmp_path, concept):
    path = export(concept, "kohya", tmp_path)
    state = safetensors_torch.load_file(path)
    assert list(state) == ["emb_params"]
    np.testing.assert_array_equal(state["emb_params"].numpy(), concept.vectors)
    # kohya names the trigger after the file; our export also records it as modelspec.trigger_phrase.
    assert one(path).token == "<cat-doll>"
    assert safetensors_torch.safe_open(path, "pt").metadata()["modelspec.trigger_phrase"] == "<cat-doll>"


def test_export_conceptlib_and_overwrite_rules(tmp_path, concept):
    path = export(concept, "conceptlib", tmp_path)
    assert read_concept(path).metadata["trainer"] == "tensorflow"
    with pytest.raises(ConceptFileError, match="already exists.*--force"):
        export(concept, "conceptlib", tmp_path)
    export(concept, "conceptlib", tmp_path, overwrite=True)
    with pytest.raises(UsageError):
        export(concept, "ckpt", tmp_path)
    assert set(EXPORT_FORMATS) == {"conceptlib", "diffusers", "a1111", "sd-concepts", "kohya"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_unreadable_file_as_root_too(tmp_path, monkeypatch, suffix):
    """Root ignores chmod, so simulate the kernel's EACCES for one path."""
    import builtins

    path = tmp_path / f"locked{suffix}"
    if suffix == ".pt":
        a1111_save(path, torch.randn(1, 768))
    else:
        _good_safetensors(path)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(ConceptFileError, match="permission denied; make the file readable"):
        load_any(path)


# -- diffusers training output folders -----------------------------------------------------------


def _save_embeds(path, token, vec):
    """What diffusers' textual_inversion.py save_progress writes (safetensors, or torch.save with
    --no_safe_serialization)."""
    if path.suffix == ".safetensors":
        safetensors_torch.save_file({token: vec}, path, metadata={"format": "pt"})
    else:
        torch.save({token: vec}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_diffusers_output_folder_imports_the_final_file_only(tmp_path, suffix):
    run = tmp_path / "textual_inversion_cat"
    run.mkdir()
    for step in (500, 1000, 1500):
        _save_embeds(run / f"learned_embeds-steps-{step}{suffix}", "<cat-toy>", torch.randn(1, 768))
    final = torch.randn(1, 768)
    _save_embeds(run / f"learned_embeds{suffix}", "<cat-toy>", final)
    sources, skipped = discover(run)
    assert sources == [Source(run)]
    # One line for all checkpoints, saying what happened and how to get one.
    assert [s.path for s in skipped] == [run / "learned_embeds-steps-*"]
    assert skipped[0].reason == (f"3 intermediate training checkpoints (steps 500, 1000, 1500); the final "
                                 f"learned_embeds{suffix} is imported instead (to import a checkpoint, give its own path)")
    concept = one(run)
    assert concept.token == "<cat-toy>"
    np.testing.assert_array_equal(concept.vectors, final.numpy())
    # The same run folder inside a folder being imported: still one concept, the final one.
    (tmp_path / "other.safetensors").write_bytes(safetensors_torch.save({"<o>": torch.randn(1, 768)}))
    sources, skipped = discover(tmp_path)
    assert sorted(s.path.name for s in sources) == ["other.safetensors", "textual_inversion_cat"]
    assert [s.path for s in skipped] == [run / "learned_embeds-steps-*"]
    # A checkpoint given by its own path is imported, beside the final concept.
    checkpoint = one(run / f"learned_embeds-steps-1000{suffix}")
    assert (checkpoint.name, checkpoint.token) == (f"{concept.name}-step1000", "<cat-toy-step1000>")
    assert not np.array_equal(checkpoint.vectors, concept.vectors)


def test_checkpoints_beside_other_files_are_never_imported(tmp_path):
    _save_embeds(tmp_path / "learned_embeds-steps-100.safetensors", "<a>", torch.randn(1, 768))
    _save_embeds(tmp_path / "learned_embeds-steps-20.safetensors", "<a>", torch.randn(1, 768))
    # An unfinished run alone: nothing to import, and the error says which checkpoint is latest.
    with pytest.raises(ConceptFileError, match=r"2 intermediate training checkpoints \(steps 20, 100\) but no final "
                       r"learned_embeds.safetensors/.bin \(the training did not finish\); import the checkpoint you "
                       r"want by its own path, e.g. .*learned_embeds-steps-100.safetensors$"):
        discover(tmp_path)
    _save_embeds(tmp_path / "b.safetensors", "<b>", torch.randn(1, 768))
    sources, skipped = discover(tmp_path)
    assert [s.path.name for s in sources] == ["b.safetensors"]
    assert [s.path.name for s in skipped] == ["learned_embeds-steps-*"]


# -- folders: subfolders and special files ---------------------------------------------------------


def test_embeddings_folder_with_subfolders(tmp_path):
    """AUTOMATIC1111's embeddings/ folder is often sorted into subfolders."""
    root = tmp_path / "embeddings"
    (root / "characters" / "old").mkdir(parents=True)
    (root / "styles").mkdir()
    (root / "previews").mkdir()
    (root / "empty").mkdir()
    a1111_save(root / "characters" / "alice.pt", torch.randn(2, 768))
    a1111_save(root / "characters" / "old" / "bob.pt", torch.randn(1, 768))
    _good_safetensors(root / "styles" / "oil.safetensors", key="<oil>")
    (root / "previews" / "alice.preview.png").write_bytes(b"\x89PNG")
    concept_folder = root / "styles" / "midjourney-style"
    concept_folder.mkdir()
    torch.save({"<mj>": torch.randn(768)}, concept_folder / "learned_embeds.bin")
    (concept_folder / "token_identifier.txt").write_text("<mj>")
    (root / "loop").symlink_to(root)
    sources, skipped = discover(root)
    assert sorted(str(s.path.relative_to(root)) for s in sources) == [
        "characters/alice.pt", "characters/old/bob.pt", "styles/midjourney-style", "styles/oil.safetensors"]
    reasons = {str(s.path.relative_to(root)): s.reason for s in skipped}
    assert reasons == {
        "empty": "a folder without concept files (looked for .safetensors, .pt, .bin, .pth files, "
                 "AUTOMATIC1111 embedding images (.png, .webp))",
        "previews": "a folder without concept files (looked for .safetensors, .pt, .bin, .pth files, "
                 "AUTOMATIC1111 embedding images (.png, .webp))",
        "loop": "a link to a folder that is already being imported",
    }
    assert sorted(c.token for c in load_any(root)) == ["<mj>", "<oil>", "alice", "bob"]


def test_special_files_are_one_line_errors(tmp_path):
    fifo = tmp_path / "x.pt"
    os.mkfifo(fifo)
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    read_end, write_end = os.pipe()  # what `conceptlib import <(curl ...)` hands over: /dev/fd/N
    try:
        for path in (fifo, tmp_path / "zero.pt", "/dev/null", f"/dev/fd/{read_end}"):
            for call in (discover, load_any, load_source):
                with pytest.raises(ConceptFileError) as info:
                    call(path)
                assert str(info.value) == (f"{path}: not a regular file or folder (a device, pipe or socket); save the "
                                           "data to a .safetensors/.pt file first and import that file")
    finally:
        os.close(read_end)
        os.close(write_end)
    # In a folder they are skipped with that reason (and never opened: a FIFO would block).
    _good_safetensors(tmp_path / "good.safetensors")
    (tmp_path / "gone.pt").symlink_to(tmp_path / "missing.pt")
    sources, skipped = discover(tmp_path)
    assert [s.path.name for s in sources] == ["good.safetensors"]
    assert {s.path.name: s.reason.split(" (")[0] for s in skipped} == {
        "x.pt": "not a regular file or folder", "zero.pt": "not a regular file or folder", "gone.pt": "a broken link"}


def test_a_hidden_concept_file_in_a_folder_is_said(tmp_path):
    """A dot file with a concept suffix is not imported with its folder, but said; macOS' resource
    forks (._NAME, beside every file of a zip made on a Mac) and other dot files are passed over."""
    _good_safetensors(tmp_path / "good.safetensors")
    _good_safetensors(tmp_path / ".hidden.safetensors")
    (tmp_path / "._good.safetensors").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    sources, skipped = discover(tmp_path)
    assert [s.path.name for s in sources] == ["good.safetensors"]
    assert [(s.path.name, s.reason) for s in skipped] == [
        (".hidden.safetensors", "a hidden file (its name starts with a dot); import it by its path to bring it in")]
    assert [s.path.name for s in discover(tmp_path / ".hidden.safetensors")[0]] == [".hidden.safetensors"]


# -- corrupt and misnamed files --------------------------------------------------------------------


def _safetensors_with_offsets(path, offsets):
    """A safetensors file as other tools frame it (struct + JSON), with the given data_offsets."""
    header = json.dumps({"<a>": {"dtype": "F32", "shape": [1, 768], "data_offsets": offsets}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(3072))
    return path


@pytest.mark.parametrize("offsets", [[0, "x"], [None, 3072], [3072, 0], [0, 99999], [0, 100], [0.0, 3072.0], [0]],
                         ids=["string", "null", "reversed", "past-the-end", "too-short", "floats", "one-value"])
def test_bad_data_offsets_are_one_line_errors(tmp_path, offsets):
    path = _safetensors_with_offsets(tmp_path / "offs.safetensors", offsets)
    with pytest.raises(ConceptFileError) as info:
        load_any(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "re-download or re-export it" in message
    assert any(word in message for word in ("data_offsets", "truncated", "data bytes for shape")), message
    assert _safetensors_with_offsets(tmp_path / "ok.safetensors", [0, 3072]) and one(tmp_path / "ok.safetensors").token == "<a>"


def test_misnamed_and_garbage_files_say_how_to_fix(tmp_path):
    torch.save({"<x>": torch.randn(768)}, tmp_path / "zip.safetensors")
    torch.save({"<x>": torch.randn(768)}, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    _good_safetensors(tmp_path / "st.pt")
    (tmp_path / "garbage.safetensors").write_bytes(b"<!DOCTYPE html><html>Not Found</html>" * 20)
    torch.save(torch.randn(1, 768), tmp_path / "bare.pt")
    torch.save({5: torch.randn(768)}, tmp_path / "intkey.bin")
    torch.save({"<a>": torch.randn(768), "<b>": torch.randn(768)}, tmp_path / "twotok.bin")
    expected = {
        "zip.safetensors": "a PyTorch file (torch.save), not safetensors, despite its name; rename it to zip.pt and import that",
        "legacy.safetensors": "rename it to legacy.pt",
        "st.pt": "a safetensors file, not a PyTorch file, despite its name; rename it to st.safetensors and import that",
        "garbage.safetensors": "not a safetensors file (it does not start with a safetensors header); the download is "
                               "damaged or is something else (an HTML error page?): re-download it",
        "bare.pt": "holds a bare tensor of shape [1, 768], not a dictionary of embeddings, so its token is unknown; "
                   "import this file by itself with --token '<bare>'",
        "intkey.bin": "(keys: 5); expected AUTOMATIC1111's string_to_param or diffusers' {token: tensor}",
        "twotok.bin": "holds 2 token embeddings (<a>, <b>); conceptlib, like AUTOMATIC1111 and diffusers, takes one",
    }
    for name, needle in expected.items():
        with pytest.raises(ConceptFileError) as info:
            load_any(tmp_path / name)
        assert needle in str(info.value) and "{{" not in str(info.value), (name, str(info.value))
    # Given its token, a bare tensor is a concept (as diffusers' load_textual_inversion takes it).
    bare = load_source(tmp_path / "bare.pt", token="<bare>")
    assert (bare.name, bare.token, bare.vectors.shape, bare.metadata["source_format"]) == ("bare", "<bare>", (1, 768), "tensor")


def test_unknown_byteorder_is_a_corrupt_file_not_diverged_training(tmp_path):
    import zipfile

    good = a1111_save(tmp_path / "good.pt", torch.randn(1, 768))
    with zipfile.ZipFile(good) as old, zipfile.ZipFile(tmp_path / "weird.pt", "w") as new:
        for member in old.namelist():
            new.writestr(member, b"sideways" if member.endswith("/byteorder") else old.read(member))
    with pytest.raises(ConceptFileError) as info:
        load_any(tmp_path / "weird.pt")
    assert "byteorder record says 'sideways'" in str(info.value) and "diverged" not in str(info.value)


# -- older and oversized pickles -------------------------------------------------------------------


def test_a1111_parameter_dict_embedding_imports(tmp_path):
    """torch 1.11-era AUTOMATIC1111 embeddings, written exactly as the audit did."""
    vec = torch.randn(2, 768)
    path = tmp_path / "olddoll.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}),
                "name": "olddoll", "step": 3000}, path)
    concept = one(path)
    assert (concept.name, concept.token, concept.metadata["a1111.step"]) == ("olddoll", "olddoll", "3000")
    np.testing.assert_array_equal(concept.vectors, vec.numpy())


def test_expanded_tensor_is_refused_before_it_is_read(tmp_path):
    """4.6 KB on disk, 200000 x 768 once materialised."""
    path = tmp_path / "expand2.bin"
    torch.save({"<e>": torch.randn(768).expand(200000, 768)}, path)
    with pytest.raises(ConceptFileError) as info:
        load_any(path)
    assert str(info.value) == (f"{path}: holds a tensor of shape [200000, 768]: 200000 vectors, but a textual-inversion "
                               "embedding has 1 to 75, so this file is not one (a model checkpoint?); nothing was loaded")


# -- names and tokens derived from file names ------------------------------------------------------


def test_non_ascii_file_names_give_distinct_sensible_names(tmp_path):
    for stem in ("Ärger-ß", "日本語", "中文", "__"):
        a1111_save(tmp_path / f"{stem}.pt", torch.randn(1, 768))
    concepts = {c.metadata["source_file"]: c for c in load_any(tmp_path)}
    assert (concepts["Ärger-ß.pt"].name, concepts["Ärger-ß.pt"].token) == ("arger-ss", "ärger-ß")
    hashed = [concepts[f].name for f in ("日本語.pt", "中文.pt", "__.pt")]
    assert all(n.startswith("concept-") and len(n) == len("concept-") + 8 for n in hashed)
    assert len(set(hashed)) == 3
    assert one(tmp_path / "日本語.pt").name == hashed[0]  # stable: the same file gives the same name


def test_prompt_syntax_in_a_file_name_stays_out_of_its_token(tmp_path):
    """Brackets and braces are emphasis in AUTOMATIC1111, ComfyUI and compel prompts: a token taken
    from a file name leaves them out (so a prompt can hold it); other characters stay, and a token
    read from inside a file is kept whole."""
    import safetensors.torch

    a1111_save(tmp_path / "(my) emb [v2]!.pt", torch.randn(1, 768))
    safetensors.torch.save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "{cool} style.safetensors"))
    a1111_save(tmp_path / "emb@home#1.pt", torch.randn(1, 768))
    torch.save({"<(kept)>": torch.randn(768)}, tmp_path / "learned_embeds.bin")
    tokens = {c.metadata["source_file"]: c.token for c in load_any(tmp_path)}
    assert tokens == {"(my) emb [v2]!.pt": "my-emb-v2!", "{cool} style.safetensors": "cool-style",
                      "emb@home#1.pt": "emb@home#1", "learned_embeds.bin": "<(kept)>"}


def test_long_file_names_are_not_cut_into_tokens(tmp_path):
    stem = "a-very-long-embedding-name-downloaded-from-a-model-sharing-site-v2-final"
    assert len(stem) > 64
    path = a1111_save(tmp_path / f"{stem}.pt", torch.randn(1, 768))
    with pytest.raises(ConceptFileError) as info:
        load_any(path)
    assert str(info.value) == (f"{path}: the file name 'a-very-long-embedding-na'... has more than 64 characters, the most "
                               "a token or name may have; rename the file, or import it alone with --token and --name to choose "
                               "shorter ones")
    with pytest.raises(ConceptFileError, match="import it alone with --name to choose"):
        load_any(path, token="<long>")
    concept = one(path, token="<long>", name="long")
    assert (concept.name, concept.token) == ("long", "<long>")
    # A long key inside a diffusers file names the token, not the file.
    safetensors_torch.save_file({"<" + "x" * 70 + ">": torch.randn(1, 768)}, tmp_path / "learned_embeds.safetensors")
    with pytest.raises(ConceptFileError, match=r"'<xxxxxxxxxxxxxxxxxxxxxxx'\.\.\., taken from inside the file, has more than 64 .*import it alone with --token to"):
        load_any(tmp_path / "learned_embeds.safetensors")


# -- export details --------------------------------------------------------------------------------


def test_a1111_round_trip_keeps_a1111_fields(tmp_path):
    imported = one(a1111_save(tmp_path / "MyDoll.pt", torch.randn(2, 768)))
    assert imported.name == "mydoll" and "training" not in imported.metadata
    (tmp_path / "out").mkdir()
    path = export(imported, "a1111", tmp_path / "out")
    data = torch.load(path, map_location="cpu", weights_only=True)
    # The file gets its own name back, the word A1111 prompts use; the name field holds it too
    # (diffusers takes it as the token).
    assert (path.name, data["name"], data["step"], data["sd_checkpoint"], data["sd_checkpoint_name"]) == (
        "MyDoll.pt", "MyDoll", 1999, "6ce0161689", "v1-5-pruned-emaonly")
    again = one(path)
    assert again.token == imported.token == "mydoll"
    assert {k: again.metadata[k] for k in again.metadata if k.startswith("a1111.")} == {
        "a1111.name": "MyDoll", "a1111.step": "1999", "a1111.sd_checkpoint": "6ce0161689",
        "a1111.sd_checkpoint_name": "v1-5-pruned-emaonly"}
    # Renamed (or given another token) and exported again: no stale word from the first file.
    renamed = Concept("ink2", "<ink2>", imported.vectors, imported.metadata)
    assert torch.load(export(renamed, "a1111", tmp_path / "out"), weights_only=True)["name"] == "ink2"
    image = export(renamed, "a1111", tmp_path / "out" / "card.png")
    assert one(image).token == "<ink2>"  # an image is named with the token: the round trip keeps it
    np.testing.assert_array_equal(again.vectors, imported.vectors)


@pytest.mark.parametrize("existing", ["learned_embeds.bin", "token_identifier.txt", "type_of_concept.txt", "README.md"])
def test_sd_concepts_export_keeps_every_existing_file(tmp_path, concept, existing):
    folder = tmp_path / "cat-doll"
    folder.mkdir()
    (folder / existing).write_text("mine")
    with pytest.raises(ConceptFileError, match=f"{existing}: already exists; choose another --out or pass --force"):
        export(concept, "sd-concepts", folder)
    assert [p.name for p in folder.iterdir()] == [existing] and (folder / existing).read_text() == "mine"
    export(concept, "sd-concepts", folder, overwrite=True)
    assert (folder / "token_identifier.txt").read_text() == "<cat-doll>"


# -- hostile files from strangers ------------------------------------------------------------------


def test_pickled_values_that_cannot_be_printed_are_left_out(tmp_path):
    """A 20,000-digit number as AUTOMATIC1111's name (str() refuses it) is not kept; as a key of a
    dictionary that is no embedding, the message still says what the keys are."""
    path = tmp_path / "bignum.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}, "name": 10**20000, "step": 10**30}, path)
    concept = one(path)
    assert "a1111.name" not in concept.metadata and "a1111.step" not in concept.metadata
    torch.save({10**20000: "x", "y": "z"}, tmp_path / "bigkey.pt")
    with pytest.raises(UnsupportedFormatError, match=r"keys: <a 66439-bit number>, y\)"):
        load_any(tmp_path / "bigkey.pt")


@pytest.mark.parametrize("header, needle", [
    (b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "header is not valid JSON"),
    (json.dumps({"<t>": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}).encode(),
     "has shape [4294967296, 4294967296], larger than any textual-inversion embedding"),
])
def test_malformed_safetensors_headers_are_one_line(tmp_path, header, needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ConceptFileError) as info:
        load_any(path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_concept_folders_text_files_must_be_small_regular_files(tmp_path):
    """A FIFO would hang the import; a link to /dev/zero would read until memory runs out."""
    folder = tmp_path / "shared"
    folder.mkdir()
    safetensors_torch.save_file({"<s>": torch.randn(1, 768)}, folder / "learned_embeds.safetensors")
    os.mkfifo(folder / "token_identifier.txt")
    with pytest.raises(ConceptFileError, match="token_identifier.txt: not a regular file"):
        load_any(folder)
    (folder / "token_identifier.txt").unlink()
    (folder / "token_identifier.txt").symlink_to("/dev/zero")
    with pytest.raises(ConceptFileError, match="token_identifier.txt: a link to a file outside"):
        load_any(folder)
    (folder / "token_identifier.txt").unlink()
    (folder / "device").symlink_to("/dev/zero")  # inside the folder, but a device
    (folder / "token_identifier.txt").symlink_to(folder / "device")
    with pytest.raises(ConceptFileError, match="token_identifier.txt: a link to a file outside"):
        load_any(folder)
    (folder / "token_identifier.txt").unlink()
    (folder / "token_identifier.txt").write_text("<s>" + " " * 5000)
    with pytest.raises(ConceptFileError, match="more than 4096 bytes, where it holds a word or two"):
        load_any(folder)


def test_a_folder_import_stays_inside_the_folder(tmp_path):
    """A shared folder (a zip, a git clone) may hold links: a subfolder linked out of it is not
    followed, nor is a preview linked to a picture elsewhere; and nesting is bounded."""
    from PIL import Image

    private = tmp_path / "private"
    private.mkdir()
    safetensors_torch.save_file({"<secret>": torch.randn(1, 768)}, private / "secret.safetensors")
    Image.new("RGB", (8, 8), (200, 0, 0)).save(private / "photo.png")
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    safetensors_torch.save_file({"<mine>": torch.randn(1, 768)}, shared / "mine.safetensors")
    (shared / "sub" / "link").symlink_to(private)
    sources, skipped = discover(shared)
    assert [s.path.name for s in sources] == ["mine.safetensors"]
    assert [k.reason for k in skipped] == [f"a link to a folder outside {shared.resolve()} ({private.resolve()}); "
                                           "not followed"]
    (shared / "linked.safetensors").symlink_to(private / "secret.safetensors")  # a file link out
    sources, skipped = discover(shared)
    assert [s.path.name for s in sources] == ["mine.safetensors"]
    assert skipped[0].path.name == "linked.safetensors" and skipped[0].reason.endswith("; not followed")
    (shared / "linked.safetensors").unlink()
    concept_folder = shared / "style"
    concept_folder.mkdir()
    safetensors_torch.save_file({"<style>": torch.randn(1, 768)}, concept_folder / "learned_embeds.safetensors")
    (concept_folder / "preview.png").symlink_to(private / "photo.png")
    assert "preview" not in one(concept_folder).metadata
    # A token file linked to a private one (an API key, say) would become the token, and go into
    # every export: refused.
    (private / "key").write_text("hf_secret123")
    (concept_folder / "token_identifier.txt").symlink_to(private / "key")
    with pytest.raises(ConceptFileError, match="token_identifier.txt: a link to a file outside .*; not read"):
        load_any(concept_folder)
    deep = tmp_path / "deep"
    bottom = deep.joinpath(*["d"] * 40)
    bottom.mkdir(parents=True)
    safetensors_torch.save_file({"<deep>": torch.randn(1, 768)}, bottom / "deep.safetensors")
    with pytest.raises(ConceptFileError, match="no concept files in this folder"):
        discover(deep)


def test_tokens_with_control_characters_are_refused(tmp_path):
    """A token holding ESC (from a key, a file name or token_identifier.txt) can never be typed
    in a prompt, and would drive the terminal wherever it is printed."""
    path = tmp_path / "escape.safetensors"
    safetensors_torch.save_file({"<a\x1b[2jb>": torch.randn(1, 768)}, path)
    with pytest.raises(ConceptFileError, match=r"holds the control character U\+001B, which no prompt can type.*'<a\[2jb>'"):
        load_any(path)


def test_huge_pictures_are_never_decoded(tmp_path):
    """A 20-megapixel PNG of black is a few KB, and decoding it would take hundreds of MB. With an
    embedding text chunk it is refused; without one it is a photo (24 MP cameras are common),
    passed over in a folder like any picture without an embedding."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("sd-ti-embedding", "e30=")
    Image.new("L", (5000, 4000)).save(tmp_path / "huge.png", pnginfo=info)
    assert (tmp_path / "huge.png").stat().st_size < 200_000
    with pytest.raises(ConceptFileError, match="a 5000x4000 picture, far larger than any embedding image"):
        load_any(tmp_path / "huge.png")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    Image.new("L", (6000, 4000)).save(folder / "holiday.png")
    safetensors_torch.save_file({"<fine>": torch.randn(1, 768)}, folder / "fine.safetensors")
    sources, skipped = discover(folder)
    assert [s.path.name for s in sources] == ["fine.safetensors"]
    assert [(k.path.name, k.reason) for k in skipped] == [("holiday.png", "an image without an embedding in it")]


def test_a_file_name_that_is_not_utf8_is_escaped_in_metadata(tmp_path):
    """Unzipped from a Windows archive: the name's bytes are not UTF-8 (safetensors metadata must
    be); it is imported, its name escaped."""
    folder = tmp_path / "unzipped"
    folder.mkdir()
    safetensors_torch.save_file({"<cafe>": torch.randn(1, 768)}, folder / "tmp.safetensors")
    os.rename(folder / "tmp.safetensors", os.fsencode(folder) + b"/caf\xe9.safetensors")
    (concept,) = load_any(folder)
    assert concept.token == "<cafe>" and concept.metadata["source_file"] == "caf\\udce9.safetensors"


# -- other tools' less common files (audit of diffusers', ComfyUI's, A1111's and kohya's sources) --


def _sdxl_output(folder):
    """What diffusers' textual_inversion_sdxl.py writes: CLIP-L rows (768) in learned_embeds.*,
    CLIP-G rows (1280) in learned_embeds_2.*, and both every --save_steps."""
    folder.mkdir()
    for prefix, width in (("learned_embeds", 768), ("learned_embeds_2", 1280)):
        _save_embeds(folder / f"{prefix}.safetensors", "<xl-toy>", torch.randn(1, width))
        _save_embeds(folder / f"{prefix}-steps-500.safetensors", "<xl-toy>", torch.randn(1, width))
    return folder


def test_a_diffusers_sdxl_output_is_refused_whole_and_by_its_parts(tmp_path):
    run = _sdxl_output(tmp_path / "xl-run")
    for path in (run, run / "learned_embeds.safetensors", run / "learned_embeds-steps-500.safetensors"):
        with pytest.raises(ConceptlibError, match="diffusers SDXL textual-inversion output.*KerasCV has no SDXL"):
            load_any(path)
    # Inside a folder being imported: the other concepts come in, the SDXL output is one line.
    (tmp_path / "other.safetensors").write_bytes(safetensors_torch.save({"<o>": torch.randn(1, 768)}))
    sources, skipped = discover(tmp_path)
    assert [s.path.name for s in sources] == ["other.safetensors"]
    assert [s.path for s in skipped] == [run] and "SDXL" in skipped[0].reason
    # An unfinished SDXL run (checkpoints only) is refused too, and so is a folder holding only one.
    unfinished = tmp_path / "holder" / "xl-unfinished"
    unfinished.mkdir(parents=True)
    for prefix, width in (("learned_embeds", 768), ("learned_embeds_2", 1280)):
        _save_embeds(unfinished / f"{prefix}-steps-500.safetensors", "<xl-toy>", torch.randn(1, width))
    for path in (unfinished, unfinished / "learned_embeds-steps-500.safetensors", tmp_path / "holder"):
        with pytest.raises(ConceptlibError, match=f"{unfinished}.*: .*diffusers SDXL textual-inversion output"):
            load_any(path)
    # Its CLIP-G file alone says what 1280 wide means.
    lone = tmp_path / "lone"
    lone.mkdir()
    _save_embeds(lone / "clip-g.safetensors", "<xl>", torch.randn(1, 1280))
    with pytest.raises(ConceptFileError, match="width 1280 .*SDXL's second text encoder"):
        load_any(lone / "clip-g.safetensors")


@pytest.mark.parametrize("key,width,container", [("clip_l", 768, "safetensors"), ("clip_h", 1024, "pt")])
def test_a_text_encoder_keyed_file_is_named_by_its_file(tmp_path, key, width, container):
    """diffusers' pivotal-tuning scripts save {"clip_l": rows} for SD 1.5 (ComfyUI's key for SD 1.x;
    clip_h is its SD 2.x one): the key names the text encoder, not a token, so the file name is
    the word."""
    path = tmp_path / f"toy-bird_emb.{container}"
    vec = torch.randn(2, width)
    if container == "safetensors":
        safetensors_torch.save_file({key: vec}, path)
    else:
        torch.save({key: vec}, path)
    concept = one(path)
    assert (concept.name, concept.token) == ("toy-bird_emb", "toy-bird_emb")
    assert concept.metadata["source_format"] == "pivotal"
    np.testing.assert_array_equal(concept.vectors, vec.numpy())


def test_flux_and_several_token_files_say_what_they_are(tmp_path):
    flux = tmp_path / "flux.safetensors"
    safetensors_torch.save_file({"clip_l": torch.randn(1, 768), "t5": torch.randn(1, 4096)}, flux)
    with pytest.raises(UnsupportedFormatError, match="a FLUX embedding .*KerasCV has no FLUX"):
        load_any(flux)
    tokens = {"<a>": torch.randn(1, 768), "<b>": torch.randn(2, 768)}
    for path in (tmp_path / "two.safetensors", tmp_path / "two.bin"):
        if path.suffix == ".safetensors":
            safetensors_torch.save_file(tokens, path)
        else:
            torch.save(tokens, path)
        with pytest.raises(UnsupportedFormatError, match=r"holds 2 token embeddings \(<a>, <b>\); .* one token per file"):
            load_any(path)


def test_a_kohya_ckpt_is_read_when_named_and_passed_over_in_folders(tmp_path):
    """kohya's --save_model_as ckpt: torch.save({"emb_params": rows}, NAME.ckpt)."""
    path = tmp_path / "mychar.ckpt"
    torch.save({"emb_params": torch.randn(4, 768)}, path)
    concept = one(path)
    assert (concept.name, concept.token, concept.metadata["source_format"]) == ("mychar", "mychar", "kohya")
    _good_safetensors(tmp_path / "other.safetensors")
    sources, skipped = discover(tmp_path)
    assert [s.path.name for s in sources] == ["other.safetensors"]
    assert [s.path.name for s in skipped] == ["mychar.ckpt"]
    assert "import it by its own path" in skipped[0].reason


def test_a_training_checkpoints_a1111_export_and_card_give_its_own_step(tmp_path):
    from conceptlib.formats.model_card import model_card
    from conceptlib.pickle_safe import load_tensor_pickle

    metadata = {"training": json.dumps({"steps": 3000, "batch_size": 1}), "trainer": "jax",
                "checkpoint_of": json.dumps({"run": "/runs/cat", "step": 500})}
    concept = Concept("cat-step500", "<cat-step500>", np.ones((1, 768), np.float32), metadata)
    path = export(concept, "a1111", tmp_path / "cat-step500.pt")
    assert load_tensor_pickle(path)["step"] == 500  # A1111 resumes training from it
    assert "step 500 of a planned 3000" in model_card(concept, preview_file=None)
    finished = Concept("cat", "<cat>", np.ones((1, 768), np.float32), {"training": metadata["training"]})
    path = export(finished, "a1111", tmp_path / "cat.pt")
    assert load_tensor_pickle(path)["step"] == 3000


def test_a_diffusers_checkpoint_comes_in_beside_the_final_concept(tmp_path):
    """diffusers' script saves learned_embeds-steps-N beside the final learned_embeds: a folder
    import takes the final one; a checkpoint given by its path is FOLDER-stepN, <TOKEN-stepN>,
    as conceptlib's own checkpoints are, so it never collides with the final concept."""
    import safetensors.torch

    out = tmp_path / "train-out"
    out.mkdir()
    safetensors.torch.save_file({"<tr>": torch.randn(768)}, str(out / "learned_embeds.safetensors"))
    safetensors.torch.save_file({"<tr>": torch.randn(768)}, str(out / "learned_embeds-steps-500.safetensors"))
    torch.save({"<tr>": torch.randn(768)}, out / "learned_embeds-steps-1000.bin")
    assert [(c.name, c.token) for c in load_any(out)] == [("train-out", "<tr>")]
    step = one(out / "learned_embeds-steps-500.safetensors")
    assert (step.name, step.token, step.metadata["source_format"]) == ("train-out-step500", "<tr-step500>", "diffusers")
    assert (one(out / "learned_embeds-steps-1000.bin").name, one(out / "learned_embeds-steps-1000.bin").token) == (
        "train-out-step1000", "<tr-step1000>")
    given = load_source(out / "learned_embeds-steps-500.safetensors", token="<mine>", name="mine")
    assert (given.name, given.token) == ("mine", "<mine>")
