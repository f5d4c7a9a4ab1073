"""Review of the null-text loose ends (b20): negative-prompt inversion on the SDXL refiner.

The refiner's unconditional branch carries ``negative_aesthetic_score`` in its ``time_ids`` (diffusers
``StableDiffusionXLImg2ImgPipeline._get_add_time_ids``: ``add_neg_time_ids`` with ``negative_aesthetic_score``,
pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py), which ``DiffusersSystem.negative_condition``
now gives ``invert_image``. Negative-prompt inversion (Miyake et al. 2023) replaces the null condition by the
prompt's, so its guided step is the conditional one at any scale: the refiner's null ``time_ids`` must then be the
prompt's too, or the reconstruction is not guidance-1 DDIM from ``x_T``.
"""

from __future__ import annotations

import torch
from test_sdxl_refiner_handoff_reference import pair  # noqa: F401

from sdadapt.inversion import (
    invert_image,
    load_inversion,
    regenerate_image,
    sample_inversion,
    save_inversion,
)
from sdadapt.training import diffusion


def _image(size: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_refiner_negative_prompt_inversion_is_the_conditional_sampler(pair, tmp_path):  # noqa: F811
    _, refiner = pair
    assert refiner.is_refiner and not refiner.zero_empty_negative
    inv = invert_image(refiner, _image(refiner.image_size, 9), "a red cube", method="negative-prompt", num_steps=3,
                       guidance=7.5)
    # the null branch's time_ids are the prompt's (aesthetic score 6), not the negative's 2.5
    assert float(inv.cond["time_ids"][0, -1]) == refiner.aesthetic_score != refiner.negative_aesthetic_score
    assert torch.equal(inv.uncond["time_ids"], inv.cond["time_ids"])
    with torch.no_grad():
        model = refiner.denoiser()
        plain = diffusion.ddim_sample(model, inv.x_T, inv.cond, alphas_cumprod=refiner.alphas_cumprod, num_steps=3,
                                      prediction_type=refiner.prediction_type)
        rec = sample_inversion(model, inv)
    scale = float(plain.abs().max())
    torch.testing.assert_close(rec, plain, rtol=0, atol=1e-5 * scale)
    # and so from its file (the uncond's time_ids are saved with it)
    save_inversion(tmp_path / "npi.safetensors", inv)
    again = load_inversion(tmp_path / "npi.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(sample_inversion(model, again), plain, rtol=0, atol=1e-5 * scale)
        assert regenerate_image(refiner, again).shape == (1, 3, refiner.image_size, refiner.image_size)


def test_refiner_ddim_and_null_text_keep_the_samplers_null_branch_unless_started_from_npi(pair):  # noqa: F811
    """method="ddim" / null-text from the empty prompt keep the sampler's null branch (negative aesthetic score);
    null-text's init="negative-prompt" starts from NPI's condition, time_ids included."""
    _, refiner = pair
    image = _image(refiner.image_size, 10)
    ddim = invert_image(refiner, image, "a red cube", method="ddim", num_steps=2)
    assert float(ddim.uncond["time_ids"][0, -1]) == refiner.negative_aesthetic_score
    null = invert_image(refiner, image, "a red cube", num_steps=2, inner_steps=1)
    assert float(null.uncond["time_ids"][0, -1]) == refiner.negative_aesthetic_score
    started = invert_image(refiner, image, "a red cube", num_steps=2, inner_steps=1, init="negative-prompt")
    assert torch.equal(started.uncond["time_ids"], started.cond["time_ids"])
    assert torch.equal(started.uncond["text_embeds"], started.cond["text_embeds"])
