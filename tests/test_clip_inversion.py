"""CLIP inversion: unCLIP noise augmentation vs diffusers, the three injection sites, files, the toy method."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sdadapt.formats.files import WeightFileError, write_safetensors
from sdadapt.inversion import (
    ImageVectors,
    NoImageConditioningError,
    image_conditioning,
    image_variation_conditioning,
    learn_image_vectors,
    load_image_vectors,
    noise_image_embeddings,
    sample_image_vectors,
    save_image_vectors,
    unclip_image_conditioning,
)
from sdadapt.inversion.clip import (
    clip_invert,
    generate_with_vectors,
    sinusoidal_embedding,
)
from sdadapt.toy import DEFAULT_WEIGHTS, load_toy
from sdadapt.training import diffusion
from docs_pages import run_block

needs_toy = pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="toy weights not built")
AC = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float()


def _tiny_unet(**changes):
    from tiny_models import _unet

    return _unet(0, **changes)


# ------------------------------------------------------------------------------ unCLIP math
def test_sinusoid_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 3, 250, 999])
    want = get_timestep_embedding(t, 16, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(sinusoidal_embedding(t, 16), want, atol=1e-6)


@pytest.mark.parametrize("level", [0, 300, 999])
def test_noise_image_embeddings_matches_the_unclip_pipeline(level):
    """Against diffusers' own StableUnCLIPImg2ImgPipeline.noise_image_embeddings (normaliser + cosine noising)."""
    from diffusers import DDPMScheduler, StableUnCLIPImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    g = torch.Generator().manual_seed(0)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=16)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, 16, generator=g))
        normalizer.std.copy_(torch.rand(1, 16, generator=g) + 0.5)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    fake = SimpleNamespace(image_normalizer=normalizer, image_noising_scheduler=scheduler)
    e, noise = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    with torch.no_grad():
        want = StableUnCLIPImg2ImgPipeline.noise_image_embeddings(fake, e.clone(), level, noise=noise.clone())
    ours_ac = diffusion.alphas_cumprod_of(diffusion.noise_schedule("cosine")).float()
    got = noise_image_embeddings(e, level, noise=noise, alphas_cumprod=ours_ac, mean=normalizer.mean.detach(),
                                 std=normalizer.std.detach())
    assert got.shape == (3, 32)
    assert torch.allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------ the sites
def test_unclip_unet_learns_a_vector_and_samples_with_text():
    unet = _tiny_unet(class_embed_type="projection", projection_class_embeddings_input_dim=32)
    text = lambda prompts: torch.ones(len(prompts), 5, 32) * torch.tensor([len(p) / 10 for p in prompts])[:, None, None]
    cond = unclip_image_conditioning(unet, text=text, noise_level=100)
    assert cond.site == "class-labels" and cond.dim == 16 and cond.max_vectors == 1
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    vectors, losses = learn_image_vectors(cond, latents, alphas_cumprod=AC, captions=["a", "bb", "ccc"], steps=12,
                                          learning_rate=0.05, batch_size=2)
    assert vectors.shape == (1, 16) and vectors.abs().sum() > 0 and len(losses) == 12
    # the UNet was frozen while the vector trained, and its flags are restored
    assert all(p.grad is None for p in unet.parameters()) and all(p.requires_grad for p in unet.parameters())
    # what reaches the UNet is the pipeline's class_labels: (B, 2D), the level's sinusoid in the second half
    labels = cond.image_input(vectors[None].expand(2, 1, 16), generator=torch.Generator().manual_seed(0))
    assert labels.shape == (2, 32) and torch.allclose(labels[:, 16:], sinusoidal_embedding(torch.tensor([100, 100]), 16))
    x = sample_image_vectors(cond, vectors, torch.randn(2, 4, 8, 8), alphas_cumprod=AC, prompts=["x", "y"], steps=3)
    assert x.shape == (2, 4, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="num_vectors=1"):
        learn_image_vectors(cond, latents, alphas_cumprod=AC, num_vectors=2, steps=1)


def test_image_variation_unet_takes_several_vector_tokens_and_no_text():
    unet = _tiny_unet(cross_attention_dim=16)
    cond = image_variation_conditioning(unet)
    assert cond.site == "cross-attention" and cond.dim == 16 and cond.max_vectors is None
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    init = torch.randn(3, 16)
    vectors, _ = learn_image_vectors(cond, latents, alphas_cumprod=AC, num_vectors=3, init=init, steps=5, learning_rate=0.05)
    assert vectors.shape == (3, 16) and not torch.equal(vectors, init)
    x = sample_image_vectors(cond, vectors, torch.randn(1, 4, 8, 8), alphas_cumprod=AC, steps=2)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="takes no text"):
        learn_image_vectors(cond, latents, alphas_cumprod=AC, captions=["a dog", "a cat"], steps=1)


def test_text_only_models_get_a_clear_error():
    system = SimpleNamespace(unet=_tiny_unet())  # an SD text-to-image UNet, as a DiffusersSystem holds
    with pytest.raises(NoImageConditioningError) as info:
        image_conditioning(system)
    message = str(info.value)
    assert "toy-image" in message and "unCLIP" in message and "image-variation" in message
    with pytest.raises(NoImageConditioningError, match="class_embed_type"):
        unclip_image_conditioning(_tiny_unet())


def test_image_vectors_file_round_trip(tmp_path):
    v = ImageVectors(vectors=torch.randn(2, 16), site="cross-attention", noise_level=0, tokens=("sks",), info={"model": "m"})
    path = save_image_vectors(tmp_path / "v.safetensors", v, metadata={"note": "hi"})
    back = load_image_vectors(path)
    assert torch.equal(back.vectors, v.vectors) and back.site == v.site and back.tokens == ("sks",)
    assert back.info["model"] == "m" and back.info["note"] == "hi"
    write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(WeightFileError, match="not an sdadapt CLIP-inversion file"):
        load_image_vectors(tmp_path / "x.safetensors")


# ------------------------------------------------------------------------------ toy model
@pytest.fixture(scope="module")
def toy():
    from sdadapt.toy.image_variant import IMAGE_WEIGHTS

    return load_toy(IMAGE_WEIGHTS if IMAGE_WEIGHTS.is_file() else None)


@needs_toy
def test_toy_clip_invert_and_generate(toy):
    from sdadapt.toy.evaluate import concept_data

    images, _ = concept_data("purple", 4, seed=0)
    learnt = clip_invert(toy, images, steps=20, learning_rate=0.01)
    assert learnt.vectors.shape == (1, 64) and learnt.site.startswith("time-embedding") and learnt.info["init"] == "images"
    a = generate_with_vectors(toy, learnt, prompt="a circle", count=2, steps=5)
    b = generate_with_vectors(toy, learnt, prompt="a circle", count=2, steps=5)
    base = generate_with_vectors(toy, None, prompt="a circle", count=2, steps=5)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and not torch.equal(a, base)
    with pytest.raises(ValueError, match="num_vectors=1"):
        clip_invert(toy, images, num_vectors=2, steps=1)


@needs_toy
def test_clip_inversion_method_binds_words_and_removes_exactly(toy, tmp_path):
    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.toy.evaluate import concept_data

    ids = toy.tokenize(["a red circle", "a red cross"])
    before = toy.condition(ids)
    with pytest.raises(ValueError, match="trigger word"):
        METHODS["clip-inversion"].adapt(toy, seed=0)
    with pytest.raises(ValueError, match="not in the toy vocabulary"):
        METHODS["clip-inversion"].adapt(toy, seed=0, token="<sks>")
    adaptation = METHODS["clip-inversion"].adapt(toy, seed=0, token="cross")
    images, captions = concept_data("cross", 4, seed=0)
    fit(toy, adaptation, images, captions, config=FitConfig(steps=5, learning_rate=0.05))
    during = toy.condition(ids)["image_embeds"]
    assert torch.equal(during[0], before["image_embeds"][0])  # no concept word: untouched
    assert torch.allclose(during[1], adaptation.vector.detach()) and adaptation.vector.abs().sum() > 0
    saved = load_image_vectors(adaptation.save(tmp_path / "cross.safetensors"))
    assert saved.tokens == ("cross",) and saved.vectors.shape == (1, 64) and saved.info["base_model"] == "sd1"
    adaptation.remove()
    after = toy.condition(ids)
    assert all(torch.equal(after[k], before[k]) for k in before) and toy.image_tokens == []
    with pytest.raises(NoImageConditioningError, match="toy"):
        METHODS["clip-inversion"].prepare(SimpleNamespace(unet=_tiny_unet(), alphas_cumprod=AC))


@needs_toy
def test_docs_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_block("clip-inversion.md")
    assert namespace["vectors"].vectors.shape == (1, 64) and namespace["vectors"].site == "time-embedding+token"
    assert namespace["alone"].shape == namespace["mixed"].shape == (2, 3, 32, 32)


@needs_toy
def test_image_variant_recipe_runs_and_round_trips(tmp_path):
    """Two steps of the variant's fine-tune (the shipped file is 600): the token path exists, trains, saves, loads."""
    from sdadapt.toy import save_toy
    from sdadapt.toy.image_variant import add_image_token, finetune_image_variant

    system = add_image_token(load_toy())
    assert system.unet.config["image_token"] and torch.equal(system.unet.image_token_proj.weight, torch.eye(64) * 8)
    before = {k: v.clone() for k, v in system.unet.state_dict().items()}
    losses = finetune_image_variant(system, steps=2, batch=2)
    assert len(losses) == 2 and not torch.equal(system.unet.image_token_proj.weight, before["image_token_proj.weight"])
    save_toy(system, tmp_path / "v.safetensors")
    back = load_toy(tmp_path / "v.safetensors")
    assert back.unet.config.get("image_token") is True and image_conditioning(back).site == "time-embedding+token"
    assert image_conditioning(load_toy()).site == "time-embedding"
