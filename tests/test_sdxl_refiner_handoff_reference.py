"""``generate --refiner``: the SDXL base, then the refiner on its latents, as diffusers' "ensemble of experts".

- D huggingface/diffusers 0.42.1 (the installed package, imported and run):
  src/diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py:1171-1183 (``denoising_end``: the
  timesteps ``ts >= discrete_timestep_cutoff = int(round(T - denoising_end * T))``);
  pipeline_stable_diffusion_xl_img2img.py:649-686 (``get_timesteps`` with ``denoising_start``: the timesteps below
  the cutoff, +1 on an even count for a 2nd-order scheduler) and :1282 (``add_noise = False``: the latents as given).
- A AUTOMATIC1111/stable-diffusion-webui modules/sd_samplers_common.py ``apply_refiner``: the switch inside one
  sampler run at the first call whose timestep ``t`` has ``(999 - t) / 1000 >= refiner_switch_at``.
Tiny models: tests/tiny_checkpoints' SDXL base, the refiner layout of test_sdxl_refiner_reference sharing its VAE.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from test_sdxl_refiner_reference import _open_clip_g, _unet

SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(tiny SDXL base, tiny refiner on the base's VAE)."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import SD_SCHEDULE, DiffusersSystem
    from sdadapt.jobs.models import load_system

    base = load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("handoff") / "xl.safetensors")), device="cpu")
    tokenizer = CLIPTokenizer.load(None, max_length=77, pad="!").to_transformers()
    tokenizer.add_special_tokens({"pad_token": "!"})
    refiner = DiffusersSystem(_unet(3), base.vae, None, None, dict(SD_SCHEDULE),
                              text_encoder_2=_open_clip_g(vocab=49408, positions=77), tokenizer_2=tokenizer)
    return base, refiner.requires_grad_(False).eval()


def _scheduler(sampler: str):
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return diffusers.EulerDiscreteScheduler(**SCHEDULE)


def _diffusers_ensemble(base, refiner, sampler: str, *, steps: int, switch_at: float, seed: int, guidance: float,
                        size: int, negative: str = "", aesthetic_score: float = 6.0) -> torch.Tensor:
    """D's two pipelines, output_type="latent" both: base with denoising_end, refiner with denoising_start."""
    first = diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=_scheduler(sampler), force_zeros_for_empty_prompt=True)
    second = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=refiner.text_encoder_2, tokenizer=None,
        tokenizer_2=refiner.tokenizer_2, unet=refiner.unet, scheduler=_scheduler(sampler),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
    handed = first("a photo", negative_prompt=negative or None,  # (None: the zeroed empty negative, as sdadapt)
                   num_inference_steps=steps, denoising_end=switch_at,
                   guidance_scale=guidance, height=size, width=size, generator=torch.Generator().manual_seed(seed),
                   output_type="latent").images
    return second("a photo", negative_prompt=negative, image=handed, num_inference_steps=steps,
                  denoising_start=switch_at, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                  aesthetic_score=aesthetic_score, output_type="latent").images


@pytest.mark.parametrize("sampler, switch_at, score", [("ddim", 0.8, 6.0), ("euler", 0.5, 7.5)])
def test_base_then_refiner_equals_diffusers_ensemble_of_experts(pair, sampler, switch_at, score):
    """One sdadapt run = D's base (denoising_end) then refiner (denoising_start) on its latents; within 1e-4 on the
    latents. The refiner's share is real: the base alone on the whole grid differs by far more."""
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner

    base, refiner = pair
    options = dict(steps=8, seed=5, guidance=3.0)
    refiner.aesthetic_score = score
    try:
        ours = sample_base_then_refiner(base, refiner, ["a photo"], switch_at=switch_at, sampler=sampler, height=16,
                                        width=16, output="latents", **options)
    finally:
        refiner.aesthetic_score = 6.0
    theirs = _diffusers_ensemble(base, refiner, sampler, switch_at=switch_at, size=16, aesthetic_score=score,
                                 **options)
    assert ours.shape == theirs.shape == (1, 4, 16 // base.vae_factor, 16 // base.vae_factor)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    alone = base.sample(["a photo"], sampler=sampler, height=16, width=16, output="latents", **options)
    assert (alone - theirs).abs().max() > 1e-3


def test_a_timestep_at_the_cutoff_is_the_bases_as_diffusers_filter_keeps_it(pair):
    """DDIM's 10 leading steps are 901, 801, ..., 201, 101, 1; at 0.799 the cutoff is 201, which D's ``ts >= cutoff``
    keeps for the base: 8 base calls, 2 refiner calls (said in the log); the images are the refiner VAE's decode."""
    from sdadapt.jobs.generate_refiner import refiner_cutoff, sample_base_then_refiner

    base, refiner = pair
    scheduler = _scheduler("ddim")
    scheduler.set_timesteps(10)
    cutoff = int(round(scheduler.config.num_train_timesteps - 0.799 * scheduler.config.num_train_timesteps))  # D:1178
    assert cutoff == refiner_cutoff(0.799) == 201
    kept = len(list(filter(lambda ts: ts >= cutoff, scheduler.timesteps)))  # D:1182
    said: list[str] = []
    options = dict(switch_at=0.799, steps=10, seed=1, guidance=1.0, height=16, width=16)
    latents = sample_base_then_refiner(base, refiner, ["a"], output="latents", log=said.append, **options)
    images = sample_base_then_refiner(base, refiner, ["a"], **options)
    assert said[0].startswith(f"refiner: {kept} model calls on the base, {10 - kept} on the refiner") and kept == 8
    torch.testing.assert_close(images, refiner.decode_latents(latents))


def test_the_cut_is_diffusers_and_a1111s():
    """D's cutoff ``int(round(T - f*T))``; A1111's switch ``(999 - t) / 1000 >= f`` picks the same integer t for an
    ``f`` of three decimals (A1111's slider steps 0.01); between them (0.3333) A1111 switches one timestep later."""
    from sdadapt.jobs.generate_refiner import refiner_cutoff

    for f in (0.8, 0.5, 0.333, 0.01, 0.99, 0.795):
        cutoff = refiner_cutoff(f)
        assert cutoff == int(round(1000 - f * 1000))
        refined = [t for t in range(1000) if not t >= cutoff]
        a1111 = [t for t in range(1000) if not (999 - t) / 1000 < f]
        assert refined == a1111, f
    assert refiner_cutoff(0.3333) == 667 and [t for t in range(1000) if (999 - t) / 1000 >= 0.3333][-1] == 665
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--refiner-switch-at"):
            refiner_cutoff(bad)


def test_pairs_that_cannot_hand_over_are_refused(pair):
    from sdadapt.jobs.generate_refiner import check_refiner_pair

    base, refiner = pair
    check_refiner_pair(base, base)  # (an SDXL model as another's refiner: A1111's Refiner takes any checkpoint)
    with pytest.raises(ValueError, match="refiner itself"):
        check_refiner_pair(refiner, refiner)
    saved = refiner.scaling_factor
    refiner.scaling_factor = 0.18215
    try:
        with pytest.raises(ValueError, match="latent space"):
            check_refiner_pair(base, refiner)
    finally:
        refiner.scaling_factor = saved


@pytest.fixture(scope="module")
def pair_files(pair, tmp_path_factory):
    """(the base's file, the refiner's file as sdadapt writes it), the refiner on the base's VAE. The base's file is
    the one :func:`pair` loaded its base from (a second ``tiny_sdxl_file`` would write the same bytes again)."""
    from pathlib import Path

    root = tmp_path_factory.mktemp("handoff_files")
    base, refiner = pair
    return Path(base.source), refiner.save_model(root / "refiner.safetensors")


def test_generate_refiner_is_the_handoff_and_refuses_bad_requests(pair_files, tmp_path):
    from PIL import Image

    from sdadapt.cli import main
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner
    from sdadapt.jobs.models import load_system

    base_file, refiner_file = pair_files
    assert main(["generate", "--model", str(base_file), "--refiner", str(refiner_file), "--refiner-switch-at", "0.5",
                 "--prompt", "a photo", "--steps", "4", "--width", "16", "--height", "16", "--seed", "3",
                 "--sampler", "euler", "--aesthetic-score", "7", "--device", "cpu", "-o", str(tmp_path / "a.png"),
                 "-q"]) == 0
    base, refiner = load_system(str(base_file), device="cpu"), load_system(str(refiner_file), device="cpu")
    refiner.aesthetic_score = 7.0
    want = sample_base_then_refiner(base, refiner, ["a photo"], switch_at=0.5, steps=4, seed=3, sampler="euler",
                                    height=16, width=16)[0]
    want = ((want.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    got = torch.tensor(list(Image.open(tmp_path / "a.png").convert("RGB").getdata())).reshape(16, 16, 3)
    assert (got.int() - want.int()).abs().max() <= 1
    refiner.aesthetic_score = 6.0  # (the default, next)
    result = run_generate(model=str(base_file), refiner=str(refiner_file), refiner_switch_at=0.5, prompt="a photo",
                          steps=2, width=16, height=16, seed=3, count=2, device="cpu", out=tmp_path / "two.png")
    second = sample_base_then_refiner(base, refiner, ["a photo"], switch_at=0.5, steps=2, seed=4, height=16,
                                      width=16)[0]  # (image i: seed + i)
    second = ((second.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    got = torch.tensor(list(Image.open(result["files"][1]).convert("RGB").getdata())).reshape(16, 16, 3)
    assert len(result["files"]) == 2 and (got.int() - second.int()).abs().max() <= 1
    kwargs = dict(prompt="a photo", steps=2, width=16, height=16, device="cpu")
    with pytest.raises(ValueError, match="refiner-switch-at"):
        run_generate(model=str(base_file), refiner=str(refiner_file), refiner_switch_at=1.0, out=tmp_path / "b.png",
                     **kwargs)
    with pytest.raises(ValueError, match="--model is the SDXL refiner"):  # (the pair the other way round)
        run_generate(model=str(refiner_file), refiner=str(base_file), out=tmp_path / "b.png", **kwargs)
    (tmp_path / "cd.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is the SDXL refiner .*--custom-diffusion"):  # (was: an AttributeError)
        run_generate(model=str(refiner_file), custom_diffusions=[str(tmp_path / "cd.safetensors")],
                     out=tmp_path / "b.png", **kwargs)
    (tmp_path / "style.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="is the SDXL refiner .*--aesthetic needs"):  # (was: an AttributeError)
        run_generate(model=str(refiner_file), aesthetic=tmp_path / "style.pt", aesthetic_clip=tmp_path,
                     out=tmp_path / "b.png", **kwargs)
