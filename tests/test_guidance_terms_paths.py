"""PAG and SAG on every guidance path of ``sample_latents``: diffusers' grid, A1111's by branch on x̂0 and on ε,
DDIM CFG++'s kept negative, img2img, the inpainting blend, Skip Early CFG — at scale 0 the run without the term (its
branches batched in or run, then weighed 0), at a positive scale another run; SAG refused where it has no x̂0."""

from __future__ import annotations

import pytest
import tiny_sd_fixtures
import torch
from guidance_terms import branch_inputs, path_options

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd

pytest.importorskip("diffusers")

_PATHS = [("ddim", {}), ("euler", {"schedule": "karras"}), ("euler", {}), ("ddim_cfgpp", {}), ("plms", {}),
          ("unipc_a1111", {}), ("euler_a", {"schedule": "automatic", "inpaint": True}),
          ("dpmpp_2m", {"schedule": "karras", "img2img": True}), ("dpmpp_2m", {"schedule": "karras", "uncond_skip": True})]


def _term(system_, kind: str, scale: float):
    if kind == "pag":
        from sdadapt.perturbed_attention import PerturbedAttentionGuidance

        return "perturbed_attention", PerturbedAttentionGuidance(system_.unet, scale=scale)
    from sdadapt.self_attention_guidance import SelfAttentionGuidance

    return "self_attention_guidance", SelfAttentionGuidance(system_.unet, scale=scale,
                                                            alphas_cumprod=system_.alphas_cumprod)


@pytest.mark.parametrize("kind", ["pag", "sag"])
@pytest.mark.parametrize("sampler,options", _PATHS)
def test_every_sampler_path_takes_the_term_and_scale_0_is_none(system, kind, sampler, options):
    from sdadapt.samplers import sample_latents

    model, cond, uncond, x, _ = branch_inputs(system, seed=9, t=0)
    kwargs = path_options(options)

    def run(**term):
        return sample_latents(model, x, cond, sampler=sampler, alphas_cumprod=system.alphas_cumprod, num_steps=4,
                              uncond=uncond, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                              **term, **kwargs)

    plain = run()
    keyword, off = _term(system, kind, 0.0)
    with off:
        if kind == "sag" and sampler in ("ddim_cfgpp", "plms", "unipc_a1111"):
            with pytest.raises(ValueError, match="combines ε on timesteps"):
                run(**{keyword: off})
            return
        assert torch.allclose(run(**{keyword: off}), plain, atol=1e-5)
    keyword, on = _term(system, kind, 2.0)
    with on:
        assert (run(**{keyword: on}) - plain).abs().max() > 1e-2
    assert not any(m._forward_hooks for m in system.unet.modules())


def test_a_hires_run_takes_pag_sag_and_freeu_on_every_call_of_both_passes(tiny_sd, tmp_path, monkeypatch):
    """All three at once through ``generate``: every guided call of both passes adds PAG's and SAG's terms (x̂0, A1111's
    grid), FreeU changes the UNet's skips on every UNet call; the infotext lists the three in Forge's order."""
    from sdadapt import freeu, perturbed_attention, self_attention_guidance
    from sdadapt.jobs import run_generate

    seen: list[str] = []
    real_guide = perturbed_attention.PerturbedAttentionGuidance.guide
    real_term = self_attention_guidance.SelfAttentionGuidance.term_on_denoised
    real_filter = freeu.fourier_filter

    def guide(self, *args):
        seen.append("pag")
        return real_guide(self, *args)

    def term(self, *args, **kwargs):
        seen.append("sag")
        return real_term(self, *args, **kwargs)

    def filter_(*args):
        seen.append("freeu")
        return real_filter(*args)

    monkeypatch.setattr(perturbed_attention.PerturbedAttentionGuidance, "guide", guide)
    monkeypatch.setattr(self_attention_guidance.SelfAttentionGuidance, "term_on_denoised", term)
    monkeypatch.setattr(freeu, "fourier_filter", filter_)
    run_generate(model=str(tiny_sd), out=tmp_path / "a.png", prompt="a cat", negative="blurry", steps=3, seed=2,
                 sampler="Euler", schedule="karras", width=40, height=40, guidance=6.0, hires_scale=1.6,
                 hires_denoising=0.6, hires_steps=2, pag_scale=2.0, sag_scale=0.5, freeu=[1.1, 1.2, 0.9, 0.8])
    calls = 3 + 2  # (Euler: one guided call a step; the hires pass its 2 steps)
    assert seen.count("pag") == calls and seen.count("sag") == calls
    assert seen.count("freeu") >= calls * 2  # (each guided call's UNet passes, the degraded one too, change skips)
    pytest.importorskip("PIL")
    from PIL import Image

    text = Image.open(tmp_path / "a.png").text["parameters"]  # (Forge's script order: FreeU, SAG, PAG)
    assert ("freeu_enabled: True, freeu_b1: 1.1, freeu_b2: 1.2, freeu_s1: 0.9, freeu_s2: 0.8, sag_enabled: True, "
            "sag_scale: 0.5, sag_blur_sigma: 2, PerturbedAttentionGuidance_enabled: True, "
            "PerturbedAttentionGuidance_scale: 2") in text
