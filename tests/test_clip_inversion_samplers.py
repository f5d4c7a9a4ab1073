"""CLIP-inversion sampling through the shared samplers (``sample_image_vectors(sampler=...)``).

* ``ddim``: bit-identical to the private DDIM + CFG loop ``sample_image_vectors`` ran before (a frozen copy
  below, ``_old_sample_image_vectors``), on a tiny unCLIP UNet (class-labels site, noise level > 0) and on the
  toy image model (its own DDIM settings ``final_alpha_cumprod=1``, ``clip_sample=1``).
* other samplers: equal to ``sdadapt.samplers.sample_latents`` run by hand on the same model with the image
  conditioning built by hand (the vectors noised as unCLIP's with the same generator, which then draws the
  ancestral noise).
* ``generate --image-vectors --sampler/--karras/--schedule`` reach it.
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.cli import main
from sdadapt.images import decode_png, to_uint8
from sdadapt.inversion import (
    ImageVectors,
    image_conditioning,
    sample_image_vectors,
    save_image_vectors,
    unclip_image_conditioning,
)
from sdadapt.inversion.clip import generate_with_vectors, noise_image_embeddings
from sdadapt.samplers import sample_latents
from sdadapt.training import diffusion

D = 16
AC = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float()


def _text(prompts):  # prompts -> (B, 5, 32): distinct states per prompt
    return torch.stack([torch.full((5, 32), float(len(p) + 1)) for p in prompts]) / 10


@pytest.fixture(scope="module")
def unclip():
    pytest.importorskip("diffusers")
    from tiny_models import _unet

    unet = _unet(0, class_embed_type="projection", projection_class_embeddings_input_dim=2 * D)
    g = torch.Generator().manual_seed(1)
    normalizer = (torch.randn(1, D, generator=g), torch.rand(1, D, generator=g) + 0.5)
    return unclip_image_conditioning(unet, text=_text, noise_level=300, image_normalizer=normalizer)


@pytest.fixture(scope="module")
def toy():
    from sdadapt.jobs.models import load_system

    return load_system("toy-image")


@torch.no_grad()
def _old_sample_image_vectors(conditioning, vectors, x_T, *, alphas_cumprod, prompts=None, negative="", guidance=2.0,
                              steps=25, prediction_type="epsilon", generator=None):
    """Frozen copy of sample_image_vectors before it took ``sampler=`` (its own DDIM + CFG call)."""
    b = x_T.shape[0]
    if vectors is not None:
        vectors = vectors.to(x_T)[None].expand(b, *vectors.shape)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    cond = conditioning.condition(vectors, conditioning.text_states(prompts, b), batch=b, like=x_T, generator=generator)
    uncond = conditioning.condition(None, conditioning.text_states([negative] * b if conditioning.text else None, b),
                                    batch=b, like=x_T)
    if cond["image"] is not None and uncond["image"] is not None and cond["image"].shape != uncond["image"].shape:
        uncond["image"] = cond["image"].new_zeros(cond["image"].shape)
    return diffusion.ddim_sample(conditioning.model, x_T, cond, alphas_cumprod=alphas_cumprod, num_steps=steps,
                                 uncond=uncond, guidance_scale=guidance, prediction_type=prediction_type,
                                 **dict(conditioning.sampler))


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_ddim_is_bit_identical_to_the_old_loop(unclip, toy):
    v = _noise((1, D), 3) * 2
    x = _noise((2, 4, 8, 8), 4)
    args = {"alphas_cumprod": AC, "prompts": ["a photo", "a cat"], "negative": "blur", "guidance": 4.0, "steps": 4,
            "prediction_type": "v_prediction"}
    got = sample_image_vectors(unclip, v, x, generator=torch.Generator().manual_seed(9), **args)
    want = _old_sample_image_vectors(unclip, v, x, generator=torch.Generator().manual_seed(9), **args)
    assert torch.equal(got, want)
    assert torch.equal(sample_image_vectors(unclip, v, x, sampler="DDIM", **args), _old_sample_image_vectors(unclip, v, x, **args))
    # the toy: its DDIM settings (set_alpha_to_one, clip_sample) still reach ddim
    c = image_conditioning(toy)
    assert dict(c.sampler) == {"final_alpha_cumprod": 1.0, "clip_sample": 1.0}
    tv, tx = _noise((1, c.dim), 5), _noise((2, 12, 16, 16), 1)
    targs = {"alphas_cumprod": toy.alphas_cumprod, "prompts": ["a red circle", "a cross"], "negative": "x", "guidance": 3.0,
             "steps": 5}
    assert torch.equal(sample_image_vectors(c, tv, tx, **targs), _old_sample_image_vectors(c, tv, tx, **targs))
    assert torch.equal(generate_with_vectors(toy, tv, prompt="a circle", count=2, steps=3, seed=2),
                       toy.decode_latents(_old_sample_image_vectors(
                           c, tv, _noise((2, 12, 16, 16), 2), alphas_cumprod=toy.alphas_cumprod, prompts=["a circle"] * 2,
                           guidance=2.0, steps=3, generator=_seeded_after(2, (2, 12, 16, 16)))))


def _seeded_after(seed, shape):
    """A generator seeded with ``seed`` after it drew the start noise ``shape`` (generate_with_vectors' order)."""
    g = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=g)
    return g


@pytest.mark.parametrize("sampler,karras,schedule", [("euler", False, None), ("dpmsolver++", True, None),
                                                     ("euler_a", False, None), ("dpmsolver++", False, "exponential")])
def test_other_samplers_are_sample_latents_on_the_conditioned_model(unclip, sampler, karras, schedule):
    """sample_image_vectors(sampler=S) == sample_latents(S) on the UNet with the unCLIP class labels built by hand:
    the vectors noised at the level (unclip's image_input with a generator seeded 9), which then draws the
    ancestral noise; the unconditional branch (negative text, zeros of (B, 2D))."""
    v = _noise((1, D), 3) * 2
    x = _noise((2, 4, 8, 8), 4)
    prompts, negative = ["a photo", "a cat"], "blur"
    got = sample_image_vectors(unclip, v, x, alphas_cumprod=AC, prompts=prompts, negative=negative, guidance=4.0,
                               steps=4, prediction_type="v_prediction", generator=torch.Generator().manual_seed(9),
                               sampler=sampler, karras=karras, schedule=schedule)
    g = torch.Generator().manual_seed(9)
    e = v.expand(2, D)
    mean, std = unclip.normalizer
    level_noise = torch.randn(e.shape, generator=g)
    labels = noise_image_embeddings(e, 300, noise=level_noise, alphas_cumprod=unclip.noise_alphas_cumprod, mean=mean,
                                    std=std)  # (2, 2D): checked against the pipeline in test_clip_inversion_reference
    unet = unclip.modules[0]

    def model(x_t, t, c):  # the pipeline's UNet call
        return unet(x_t, t, encoder_hidden_states=c["context"], class_labels=c["image"]).sample

    with torch.no_grad():
        want = sample_latents(model, x, {"context": _text(prompts), "image": labels}, sampler=sampler, alphas_cumprod=AC,
                              num_steps=4, uncond={"context": _text([negative] * 2), "image": torch.zeros(2, 2 * D)},
                              guidance_scale=4.0, prediction_type="v_prediction", karras=karras, schedule=schedule,
                              generator=g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    ddim = sample_image_vectors(unclip, v, x, alphas_cumprod=AC, prompts=prompts, negative=negative, guidance=4.0,
                                steps=4, prediction_type="v_prediction", generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(got, ddim, atol=1e-3)  # (the sampler mattered)


def test_toy_ddim_settings_stay_with_ddim(toy):
    """The toy's final_alpha_cumprod / clip_sample are DDIM's: another sampler runs without them (a sampler that
    took them would fail on the unknown option) and equals sample_latents on the toy's own model."""
    c = image_conditioning(toy)
    v, x = _noise((1, c.dim), 5), _noise((1, 12, 16, 16), 1)
    got = sample_image_vectors(c, v, x, alphas_cumprod=toy.alphas_cumprod, prompts=["a red circle"], steps=3,
                               sampler="heun")
    cond = c.condition(v[None], c.text_states(["a red circle"], 1), batch=1, like=x)
    uncond = c.condition(None, c.text_states([""], 1), batch=1, like=x)
    with torch.no_grad():
        want = sample_latents(c.model, x, cond, sampler="heun", alphas_cumprod=toy.alphas_cumprod, num_steps=3,
                              uncond=uncond, guidance_scale=2.0)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="Karras"):
        sample_image_vectors(c, v, x, alphas_cumprod=toy.alphas_cumprod, steps=1, karras=True)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_image_vectors(c, v, x, alphas_cumprod=toy.alphas_cumprod, steps=1, sampler="bogus")


def test_generate_image_vectors_cli_passes_the_sampler(toy, tmp_path, monkeypatch, capsys):
    import sdadapt.samplers as samplers_module

    c = image_conditioning(toy)
    vectors = tmp_path / "v.safetensors"
    learnt = ImageVectors(vectors=_noise((1, c.dim), 6), site=c.site)
    save_image_vectors(vectors, learnt)
    seen = []
    real = samplers_module.sample_latents

    def spy(*args, **kwargs):
        seen.append({k: kwargs[k] for k in ("sampler", "karras", "schedule")})
        return real(*args, **kwargs)

    monkeypatch.setattr(samplers_module, "sample_latents", spy)
    png = tmp_path / "a.png"
    base = ["generate", "--model", "toy-image", "--image-vectors", str(vectors), "--prompt", "a circle", "--seed", "4",
            "--steps", "3", "-q"]
    assert main([*base, "--sampler", "DPM++ 2M Karras", "-o", str(png)]) == 0
    assert seen == [{"sampler": "dpmsolver++", "karras": False, "schedule": "karras"}]
    image = generate_with_vectors(toy, learnt, prompt="a circle", count=1, seed=4, steps=3, guidance=2.0,
                                  sampler="dpmsolver++", schedule="karras")[0]
    assert (decode_png(png.read_bytes()) == to_uint8(image)).all()
    assert main([*base, "--sampler", "euler", "--schedule", "exponential", "-o", str(tmp_path / "b.png")]) == 0
    assert seen[-1] == {"sampler": "euler", "karras": False, "schedule": "exponential"}
    assert main([*base, "-o", str(tmp_path / "c.png")]) == 0
    assert seen[-1] == {"sampler": "ddim", "karras": False, "schedule": None}
    assert (decode_png((tmp_path / "c.png").read_bytes()) != decode_png(png.read_bytes())).any()
    capsys.readouterr()
    try:
        code = main([*base, "--karras", "-o", str(tmp_path / "d.png")])  # ddim has no Karras σ
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "--karras" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()
