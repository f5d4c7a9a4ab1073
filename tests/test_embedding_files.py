"""Embedding files: A1111 / kohya / diffusers round trips, unsafe pickles, inspect, diffusers interop."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
from embedding_models import ids_of, tiny_clip_text, tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdadapt
from sdadapt.embeddings import Embedding, inject_embedding
from sdadapt.formats import WeightFileError
from sdadapt.formats.detect import describe_file
from sdadapt.formats.embeddings import (
    A1111_TOKEN,
    embedding_from_state,
    from_a1111,
    load_embedding,
    save_embedding,
    to_a1111,
    to_diffusers,
    to_kohya,
)
from sdadapt.formats.files import read_safetensors

FORMS = [("a1111", ".pt"), ("a1111", ".safetensors"), ("a1111", ".bin"), ("kohya", ".safetensors"), ("kohya", ".pt"),
         ("diffusers", ".safetensors"), ("diffusers", ".bin")]
#: forms that carry step and metadata (kohya and diffusers pickles hold the tensors only, as those tools write them)
CARRIES_FIELDS = {("a1111", ".pt"), ("a1111", ".bin"), ("a1111", ".safetensors"), ("kohya", ".safetensors"), ("diffusers", ".safetensors")}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _raw(path: Path):
    """What is in the file, container by container (tensors compared with their dtype)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    with open(path, "rb") as handle:
        return torch.load(handle, weights_only=True), {}


def _same_raw(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_raw(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same_raw(x, y) for x, y in zip(a, b))
    return a == b


@st.composite
def embeddings(draw):
    sdxl = draw(st.booleans())
    k = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if sdxl:
        vectors = {"clip_l": torch.randn(k, draw(st.integers(1, 12)), generator=g).to(dtype),
                   "clip_g": torch.randn(k, draw(st.integers(1, 12)), generator=g).to(dtype)}
    else:
        dim = draw(st.integers(1, 16))
        one_d = k == 1 and draw(st.booleans())  # old diffusers concept files: a (dim,) tensor
        value = torch.randn(k, dim, generator=g).to(dtype)
        vectors = {"text_encoder": value[0] if one_d else value}
    step = draw(st.one_of(st.none(), st.integers(0, 10**6)))
    metadata = draw(st.dictionaries(st.sampled_from(["sd_checkpoint", "sd_checkpoint_name", "note"]),
                                    st.text("abcdef0123", min_size=1, max_size=8), max_size=3))
    return Embedding("trigger", vectors, step=step, metadata=metadata)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(embedding=embeddings(), form=st.sampled_from(FORMS))
def test_every_file_form_round_trips_exactly(embedding, form):
    fmt, suffix = form
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{embedding.name}{suffix}"
        save_embedding(path, embedding, format=fmt)
        back = load_embedding(path)
        # Embedding -> file -> Embedding: name, vectors (dtype and bits), step and metadata
        assert back.name == embedding.name and back.vectors.keys() == embedding.vectors.keys()
        for key, value in embedding.vectors.items():
            assert back.vectors[key].dtype == value.dtype and torch.equal(back.vectors[key], value)
        if form in CARRIES_FIELDS and not (embedding.is_sdxl and suffix != ".safetensors"):  # SDXL pickles: tensors only
            assert back.step == embedding.step
            assert all(back.metadata.get(k) == v for k, v in embedding.metadata.items())
        # file -> Embedding -> file: the same container, bit for bit (a kohya file keeps its own date)
        again = Path(tmp) / "again" / path.name
        again.parent.mkdir()
        save_embedding(again, back, format=fmt)
        assert _same_raw(_raw(path), _raw(again))


def test_the_a1111_dict_is_what_a1111_writes_and_reads_back():
    e = Embedding("style", {"text_encoder": torch.randn(2, 8)}, step=500, metadata={"sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5"})
    data = to_a1111(e)
    assert set(data) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["string_to_token"] == {"*": A1111_TOKEN} and data["name"] == "style" and data["step"] == 500
    assert data["string_to_param"]["*"] is e.vectors["text_encoder"]
    assert from_a1111(data, name="style").equal(e)
    no_extra = to_a1111(Embedding("s", {"text_encoder": torch.ones(1, 2)}))
    assert no_extra["sd_checkpoint"] is None and "sdadapt_metadata" not in no_extra
    tensors, meta = to_kohya(e)
    assert list(tensors) == ["emb_params"] and meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    # (kohya's sai_model_spec: Stability-AI's implementation for every textual-inversion file, SD1 too)
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert to_kohya(Embedding("x", {"text_encoder": torch.ones(1, 1024)}))[1]["modelspec.architecture"].startswith("stable-diffusion-v2")
    sdxl = Embedding("x", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)})
    assert set(to_kohya(sdxl)[0]) == {"clip_l", "clip_g"} and to_kohya(sdxl)[1]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert list(to_diffusers(e)[0]) == ["style"] and to_diffusers(e)[1]["format"] == "pt"


def test_legacy_and_third_party_layouts_load(tmp_path):
    # an old diffusers concept-library file: {token: (dim,)}, named learned_embeds.bin -> the token names it
    torch.save({"<cat-toy>": torch.arange(6.0)}, tmp_path / "learned_embeds.bin")
    e = load_embedding(tmp_path / "learned_embeds.bin")
    assert e.name == "<cat-toy>" and e.vectors["text_encoder"].shape == (1, 6)
    assert torch.equal(e.vectors["text_encoder"][0], torch.arange(6.0))
    # A1111 uses the file stem as the trigger, whatever the name field says
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(3, 4, dtype=torch.float16)}, "name": "old",
                "step": 7, "sd_checkpoint": None, "sd_checkpoint_name": None}, tmp_path / "renamed.pt")
    e = load_embedding(tmp_path / "renamed.pt")
    assert e.name == "renamed" and e.step == 7 and e.vectors["text_encoder"].dtype == torch.float16
    with pytest.raises(WeightFileError, match="exactly one tensor"):
        embedding_from_state({"string_to_param": {"*": torch.ones(1, 2), "x": torch.ones(1, 2)}}, name="a")
    # the original textual-inversion code's files (EmbeddingManager.save): string_to_param an nn.ParameterDict,
    # which A1111 reads (its load_from_file unwraps _parameters)
    vectors = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})},
               tmp_path / "ldm-style.pt")
    e = load_embedding(tmp_path / "ldm-style.pt")
    assert e.name == "ldm-style" and torch.equal(e.vectors["text_encoder"], vectors)
    assert type(e.vectors["text_encoder"]) is torch.Tensor and not e.vectors["text_encoder"].requires_grad
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors), "x": torch.nn.Parameter(
        vectors)})}, tmp_path / "two.pt")
    with pytest.raises(WeightFileError, match="exactly one tensor, it holds 2"):
        load_embedding(tmp_path / "two.pt")
    with pytest.raises(WeightFileError, match="not a textual-inversion embedding"):
        embedding_from_state({"a": torch.ones(1), "b": torch.ones(1)}, name="a", source="two.safetensors")


def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}, "name": "evil"}, path)
    with pytest.raises(WeightFileError) as info:
        load_embedding(path)
    assert "tries to run code" in str(info.value) and "evil.pt" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_errors_name_the_fix(tmp_path):
    e = Embedding("x", {"text_encoder": torch.ones(1, 4)})
    with pytest.raises(ValueError, match="unknown embedding format 'comfy'"):
        save_embedding(tmp_path / "x.pt", e, format="comfy")
    with pytest.raises(ValueError, match=r"\.safetensors or \.bin"):
        save_embedding(tmp_path / "x.pt", e, format="diffusers")
    with pytest.raises(WeightFileError, match="NaN"):
        save_embedding(tmp_path / "x.safetensors", Embedding("x", {"text_encoder": torch.full((1, 4), float("nan"))}))
    assert not (tmp_path / "x.safetensors").exists()
    sdadapt.formats.save_kohya(tmp_path / "lora.safetensors", {"unet": {"down_blocks.0.attentions.0.proj_in.lora_down.weight": torch.ones(1, 4),
                                                                        "down_blocks.0.attentions.0.proj_in.lora_up.weight": torch.ones(4, 1)}})
    with pytest.raises(WeightFileError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "lora.safetensors")


@pytest.mark.parametrize("fmt, suffix, writer", [("a1111", ".pt", "A1111"), ("kohya", ".safetensors", "kohya"),
                                                 ("diffusers", ".bin", "diffusers")])
def test_inspect_reports_the_trigger_vectors_widths_and_writer(tmp_path, fmt, suffix, writer):
    save_embedding(tmp_path / f"mystyle{suffix}", Embedding("mystyle", {"text_encoder": torch.ones(4, 768)}, step=3), format=fmt)
    info = describe_file(tmp_path / f"mystyle{suffix}")
    assert info["kind"] == "embedding" and info["name"] == "mystyle" and info["vectors"] == 4
    assert info["dims"] == {"text_encoder": 768} and info["encoders"] == ["text_encoder"] and writer in info["written_by"]
    save_embedding(tmp_path / "xl.safetensors", Embedding("xl", {"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}), format="kohya")
    info = describe_file(tmp_path / "xl.safetensors")
    assert info["dims"] == {"clip_l": 768, "clip_g": 1280} and info["vectors"] == 2 and "sdadapt" in info["written_by"]
    sdadapt.formats.write_safetensors(tmp_path / "scalar.safetensors", {"x": torch.zeros(())})  # one tensor, no embedding
    assert "vectors" not in describe_file(tmp_path / "scalar.safetensors")


# ------------------------------------------------------------------------------ diffusers interop
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    )
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16,), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=8)
    tokenizer, text_encoder = tiny_tokenizer(folder / "tokenizer"), tiny_clip_text()

    def make():
        return diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=copy.deepcopy(text_encoder), tokenizer=copy.deepcopy(tokenizer), unet=unet,
            scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    return make


def _sdadapt_states(pipe_factory, embedding: Embedding, prompt: str) -> torch.Tensor:
    pipe = pipe_factory()  # fresh copies of the encoder and tokenizer
    handle = inject_embedding(pipe.text_encoder, pipe.tokenizer, embedding)
    with torch.no_grad():
        return pipe.text_encoder(ids_of(pipe.tokenizer, [handle.expand(prompt)]))[0]


def _diffusers_states(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("fmt, suffix, token", [("a1111", ".pt", None), ("diffusers", ".safetensors", None),
                                                ("kohya", ".safetensors", "sksword")])
def test_sdadapt_files_load_in_diffusers_to_the_same_text_states(tiny_pipe, tmp_path, fmt, suffix, token):
    embedding = Embedding("sksword", {"text_encoder": torch.randn(3, 32, generator=torch.Generator().manual_seed(1))})
    path = save_embedding(tmp_path / f"sksword{suffix}", embedding, format=fmt)
    pipe = tiny_pipe()
    pipe.load_textual_inversion(str(path), token=token)  # A1111/diffusers files name the token themselves
    prompt = "a sksword on a table"
    theirs, ours = _diffusers_states(pipe, prompt), _sdadapt_states(tiny_pipe, load_embedding(path), prompt)
    assert not torch.allclose(theirs, _diffusers_states(tiny_pipe(), prompt))  # the embedding matters
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_a_diffusers_training_file_loads_into_sdadapt_identically(tiny_pipe, tmp_path, suffix):
    """diffusers' examples/textual_inversion/textual_inversion.py ``save_progress``, step by step."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    pipe = tiny_pipe()
    placeholder_tokens = ["<cat-toy>", "<cat-toy>_1"]
    pipe.tokenizer.add_tokens(placeholder_tokens)
    ids = pipe.tokenizer.convert_tokens_to_ids(placeholder_tokens)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    with torch.no_grad():  # "training" wrote these rows
        pipe.text_encoder.get_input_embeddings().weight[min(ids): max(ids) + 1] = torch.randn(2, 32)
    learned_embeds = pipe.text_encoder.get_input_embeddings().weight[min(ids): max(ids) + 1]
    learned_embeds_dict = {"<cat-toy>": learned_embeds.detach().cpu()}
    path = tmp_path / f"learned_embeds{suffix}"
    if suffix == ".safetensors":
        safetensors_torch.save_file(learned_embeds_dict, path, metadata={"format": "pt"})
    else:
        torch.save(learned_embeds_dict, path)
    loaded = load_embedding(path)
    assert loaded.name == "<cat-toy>" and torch.equal(loaded.vectors["text_encoder"], learned_embeds.detach())
    theirs = tiny_pipe()
    theirs.load_textual_inversion(str(path))
    prompt = "a <cat-toy> in the snow"
    torch.testing.assert_close(_sdadapt_states(tiny_pipe, loaded, prompt), _diffusers_states(theirs, prompt), rtol=0, atol=0)
