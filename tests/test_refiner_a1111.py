"""``generate --refiner`` where A1111 uses its refiner: img2img, the hires fix's passes, prompt schedules, embeddings,
LoRAs; and the multistep samplers against diffusers' two pipelines.

- A AUTOMATIC1111/stable-diffusion-webui (read, transcribed where a test says so):
  modules/sd_samplers_common.py ``apply_refiner`` (switch at the first denoiser call whose timestep, the σ's nearest
  index, has ``(999 - t) / 1000 >= refiner_switch_at``; with the hires fix, ``opts.hires_fix_refiner_pass``: "first
  pass" never switches in the hires pass, "second pass" never in the first; then ``p.setup_conds()`` re-encodes the
  prompts with the refiner and ``CFGDenoiser.step`` runs on); modules/sd_samplers_cfg_denoiser.py ``forward``
  (``apply_refiner`` on every call; ``reconstruct_multicond_batch(cond, self.step)``); modules/processing.py
  ``StableDiffusionProcessingTxt2Img.sample`` (``current = shared.sd_model.sd_checkpoint_info`` after the first
  pass: ``sample_hr_pass`` runs on the model loaded then) and ``setup_conds`` in the hires pass (``calculate_hr_conds``
  again); modules/shared_options.py ``hires_fix_refiner_pass`` default "second pass"; modules/sd_models.py
  ``load_model`` (``load_textual_inversion_embeddings(force_reload=True)``, "as they may or may not fit the model"),
  modules/textual_inversion/textual_inversion.py (an SDXL embedding's shape is ``clip_g`` + ``clip_l`` widths; it is
  registered only where ``get_expected_shape()`` — the model's encoders' widths together, sd_models_xl
  ``encode_embedding_init_text`` — equals it); extensions-builtin/Lora/networks.py ``network_apply_weights`` (a
  loaded network changes each layer whose A1111 name is one of its keys; a weight of another shape raises, is
  counted as an error and the layer left as it is).
- D huggingface/diffusers 0.42.1 (the installed package, imported and run):
  pipeline_stable_diffusion_xl_img2img.py ``denoising_end`` with ``strength`` (the strength's timesteps, then those
  ``>= round(T - f·T)``) and ``denoising_start`` (``add_noise=False``).
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from test_sdxl_refiner_handoff_reference import _diffusers_ensemble, _scheduler, pair, pair_files  # noqa: F401

SWITCH = 0.8


def _xl_img2img(system, refiner: bool, sampler: str):
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=system.vae, text_encoder=None, text_encoder_2=system.text_encoder_2, tokenizer=None,
            tokenizer_2=system.tokenizer_2, unet=system.unet, scheduler=_scheduler(sampler),
            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
            tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet,
            scheduler=_scheduler(sampler), requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler", ["ddim"])
def test_img2img_with_the_refiner_equals_diffusers_img2img_then_refiner(pair, sampler):
    """img2img at strength 0.5 with the refiner at 0.8 = D's XL img2img (strength 0.5, ``denoising_end`` 0.8) then
    D's refiner (``denoising_start`` 0.8) on its latents; within 1e-4. A1111 switches by the timestep on the
    shortened grid the same way (its img2img runs the same denoiser): the refiner takes the calls below 200."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.sampling import generate

    base, refiner = pair
    init = torch.randn(1, 4, 16 // base.vae_factor, 16 // base.vae_factor, generator=torch.Generator().manual_seed(9))
    handoff = RefinerHandoff(base, refiner, switch_at=SWITCH)
    ours = generate(base, ["a photo"], seed=3, steps=16, guidance=3.0, sampler=sampler, height=16, width=16,
                    init_latents=init, denoising_strength=0.5, output="latents", refiner=handoff)
    handed = _xl_img2img(base, False, sampler)(
        "a photo", image=init, strength=0.5, num_inference_steps=16, denoising_end=SWITCH, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(3), output_type="latent").images
    theirs = _xl_img2img(refiner, True, sampler)(
        "a photo", negative_prompt="", image=handed, num_inference_steps=16, denoising_start=SWITCH,
        guidance_scale=3.0, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    scheduler = _scheduler(sampler)
    scheduler.set_timesteps(16)
    run = [float(t) for t in scheduler.timesteps[-8:]]  # (D's strength rule: the last int(0.5 * 16) steps)
    assert handoff.calls == {"base": sum(t >= 200 for t in run), "refiner": sum(t < 200 for t in run)}
    assert 0 < handoff.calls["refiner"] < 8
    alone = generate(base, ["a photo"], seed=3, steps=16, guidance=3.0, sampler=sampler, height=16, width=16,
                     init_latents=init, denoising_strength=0.5, output="latents")
    assert (alone - theirs).abs().max() > 1e-3



def test_img2img_on_a1111s_grid_switches_where_a1111_does(pair):
    """Euler on A's Karras grid, img2img at 0.6 over 10 steps (A's ``t_enc = int(0.6 · 10) = 6``: the calls at
    ``sigmas[10 - 6 - 1:]`` but the last), refiner at 0.8: the calls each model takes = the transcription of A's
    img2img denoiser calls through ``apply_refiner`` (each σ's nearest model index ``t``; the refiner from the first
    with ``(999 - t) / 1000 >= 0.8``; k-diffusion's ``get_sigmas_karras`` on the model's σ range, rho 7)."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.sampling import generate

    base, refiner = pair
    model_sigmas = ((1 - base.alphas_cumprod.double()) / base.alphas_cumprod.double()).sqrt()
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    lo, hi = float(model_sigmas[0]) ** (1 / 7), float(model_sigmas[-1]) ** (1 / 7)
    sigmas = torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])
    calls, loaded = {"base": 0, "refiner": 0}, "base"
    for sigma in sigmas[10 - 6 - 1:-1]:
        t = int(torch.argmin((model_sigmas - sigma).abs()))
        loaded = "refiner" if (999 - t) / 1000 >= 0.8 else loaded
        calls[loaded] += 1
    init = torch.randn(1, 4, 16 // base.vae_factor, 16 // base.vae_factor, generator=torch.Generator().manual_seed(9))
    handoff = RefinerHandoff(base, refiner, switch_at=0.8)
    generate(base, ["a photo"], seed=3, steps=10, guidance=3.0, sampler="euler", schedule="karras", height=16,
             width=16, init_latents=init, denoising_strength=0.6, output="latents", refiner=handoff)
    assert handoff.calls == calls and calls["base"] > 0 and calls["refiner"] > 0


def _a1111_switches(mode: str, *, is_hr_pass: bool, ratio: float, switch_at: float) -> bool:
    """A's ``apply_refiner`` gate for one call of a txt2img run with the hires fix (the refiner not loaded yet)."""
    if ratio < switch_at:
        return False
    if mode == "first pass" and is_hr_pass:
        return False
    if mode == "second pass" and not is_hr_pass:
        return False
    return True


def _a1111_hires_calls(mode: str, first: list[float], second: list[float], switch_at: float) -> list[dict]:
    """A's model calls of a txt2img run with the hires fix and the refiner, per pass and model: the refiner once
    loaded stays loaded (``apply_refiner`` returns False when the refiner is ``shared.sd_model``), into the hires pass
    (``sample`` keeps ``current`` for ``sample_hr_pass``). ``first`` / ``second``: each pass's call timesteps."""
    passes, loaded = [], "base"
    for is_hr_pass, timesteps in ((False, first), (True, second)):
        calls = {"base": 0, "refiner": 0}
        for t in timesteps:
            if loaded == "base" and _a1111_switches(mode, is_hr_pass=is_hr_pass, ratio=(999 - t) / 1000,
                                                     switch_at=switch_at):
                loaded = "refiner"
            calls[loaded] += 1
        passes.append(calls)
    return passes


@pytest.mark.parametrize("mode", ["second", "first", "both"])
def test_the_hires_pass_the_refiner_works_in_is_a1111s_setting(pair, mode, monkeypatch):
    """DDIM 8 steps at 16 x 16, hires 32 x 32 at 0.5 (A's fixed 8 steps: the last 8 of a 16-step grid), refiner at
    0.7: each pass's model calls = the transcription of A's gate (``second``: the first pass all the base's, the
    hires pass split by its timesteps; ``first`` / ``both``: the first pass switches, so the whole hires pass is the
    refiner's). The hires pass's latents are the base then the refiner on the upscaled latents (second), or the
    refiner alone (first/both) — checked by running that pass again by hand."""
    import sdadapt.sampling
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    runs, real = [], sdadapt.sampling.generate
    handoff = RefinerHandoff(base, refiner, switch_at=0.7)

    def record(system, prompts, **kw):
        before = dict(handoff.calls)
        steps = [0]

        def count(done, calls):
            steps[0] += 1

        out = real(system, prompts, **{**kw, "output": "latents", "before_model_call": count})
        split = {k: handoff.calls[k] - before[k] for k in before}
        runs.append((kw, out, split if "refiner" in kw else {"base": steps[0], "refiner": 0}))
        return out if kw.get("output") == "latents" else system.decode_latents(out)

    monkeypatch.setattr(sdadapt.sampling, "generate", record)
    options = {"seed": 5, "steps": 8, "guidance": 3.0, "sampler": "ddim", "negative": "", "height": 16, "width": 16}
    sample_image(base, ["a photo"], options, hires=HiresRequest((32, 32), denoising=0.5), refiner=handoff,
                 refiner_hires_pass=mode)
    first = [float(t) for t in _timesteps(8)]
    second = [float(t) for t in _timesteps(16)[-8:]]
    want = _a1111_hires_calls(f"{mode} pass" if mode != "both" else "both passes", first, second, 0.7)
    assert [split for _, _, split in runs] == want
    assert want[1] == ({"base": 3, "refiner": 5} if mode == "second" else {"base": 0, "refiner": 8})
    (first_kw, _, _), (second_kw, ours, _) = runs
    assert ("refiner" in first_kw) == (mode != "second")
    again = real(base, ["a photo"], **{**second_kw, "output": "latents",
                                      "refiner": RefinerHandoff(base, refiner, switch_at=0.7)})
    if mode == "second":
        torch.testing.assert_close(ours, again, rtol=0, atol=0)
    else:
        whole = RefinerHandoff(base, refiner, switch_at=0.7).taken_over()
        alone = real(base, ["a photo"], **{**second_kw, "output": "latents", "refiner": whole})
        torch.testing.assert_close(ours, alone, rtol=0, atol=0)
        assert whole.calls == {"base": 0, "refiner": 8} and (alone - again).abs().max() > 1e-4


def _timesteps(steps: int):
    scheduler = _scheduler("ddim")
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def test_a_prompt_schedule_runs_on_across_the_switch_with_the_refiners_encoder(pair):
    """``a [cat:dog:0.5]`` over 10 DDIM steps, the refiner at 0.3 (it takes the calls below 700: the 4th on):
    A's schedule is ``[[5, 'a cat'], [10, 'a dog']]`` read at ``CFGDenoiser.step`` (0-based, running on across the
    switch), so calls 0-5 say "a cat" and 6-9 "a dog", and after the switch each text is the refiner's encoding
    (``p.setup_conds()``). The reference: the sampler run by hand over a model that picks the model and text per
    call by that transcription."""
    from sdadapt import samplers
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.training.diffusion import guided

    base, refiner = pair
    plan = plan_prompt("a [cat:dog:0.5]", "", steps=10)
    handoff = RefinerHandoff(base, refiner, switch_at=0.3)
    ours = base.sample(["x"], seed=2, steps=10, guidance=3.0, sampler="ddim", height=16, width=16, plan=plan,
                       output="latents", refiner=handoff)
    assert handoff.calls == {"base": 3, "refiner": 7}

    def conditioned(system, text):
        time_ids = system._size_time_ids(1, 16, 16)
        cond = system._prompt_condition([text], time_ids, breaks=True)
        return guided(system.denoiser(), cond, system._uncond("", cond, 1, time_ids, breaks=True), 3.0)

    models = {(name, text): conditioned(system, text) for name, system in (("base", base), ("refiner", refiner))
              for text in ("a cat", "a dog")}
    step = [0]

    def by_hand(x, t, _c):
        model = "base" if float(t.flatten()[0]) >= 700 else "refiner"
        text = "a cat" if step[0] <= 5 else "a dog"  # (A: reconstruct_cond_batch at CFGDenoiser.step)
        step[0] += 1
        return models[model, text](x, t, None)

    x = torch.randn(1, *base.latent_shape(16, 16), generator=torch.Generator().manual_seed(2))
    want = samplers.sample_latents(by_hand, x, None, sampler="ddim", alphas_cumprod=base.alphas_cumprod, num_steps=10,
                                   prediction_type=base.prediction_type, generator=torch.Generator().manual_seed(2))
    assert step[0] == 10
    assert torch.allclose(ours, want, atol=1e-5), (ours - want).abs().max()


def test_real_sdxl_base_lora_layers_never_fit_the_real_refiner():
    """A's LoRA stays loaded when the refiner is: it changes each refiner layer whose A1111 name is one of the
    network's keys, and a weight of another shape raises there and is skipped (numel-equal ones would be reshaped).
    On the real configs (Stability's sd_xl_base / sd_xl_refiner yaml as diffusers' UNet configs, built on the meta
    device): 308 Linear/Conv2d names are in both UNets, none of the same shape or element count — so an SDXL base
    LoRA's UNet part changes nothing on the refiner, and its text-encoder parts are named for the base's encoders
    (A's ``0_`` CLIP-L, ``1_`` OpenCLIP-G) where the refiner's OpenCLIP-G is ``0_model_transformer_...``. sdadapt's
    LoRAs (files and tags) act on the base only: A's outcome. (The diffusers names stand for A's: both UNets have
    2 layers per block, so one index rule maps both to LDM names.)"""
    common = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256)
    with torch.device("meta"):
        base = diffusers.UNet2DConditionModel(
            **common, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            projection_class_embeddings_input_dim=2816)
        refiner = diffusers.UNet2DConditionModel(
            **common, block_out_channels=(384, 768, 1536, 1536),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), cross_attention_dim=1280,
            projection_class_embeddings_input_dim=2560)

    def layers(unet):
        return {name: module.weight.shape for name, module in unet.named_modules()
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}

    ours, theirs = layers(base), layers(refiner)
    shared = [name for name in ours if name in theirs]
    assert len(shared) == 308
    assert [name for name in shared if ours[name].numel() == theirs[name].numel()] == []


def _embedding_file(folder, base, name="zorg"):
    from sdadapt.embeddings.embedding import Embedding
    from sdadapt.formats.embeddings import save_embedding

    widths = (base.text_encoder.get_input_embeddings().weight.shape[1],
              base.text_encoder_2.get_input_embeddings().weight.shape[1])
    g = torch.Generator().manual_seed(4)
    vectors = {"clip_l": torch.randn(1, widths[0], generator=g) * 3, "clip_g": torch.randn(1, widths[1], generator=g) * 3}
    return save_embedding(folder / f"{name}.safetensors", Embedding(name, vectors), format="kohya")


def test_generate_with_the_refiner_in_img2img_hires_schedules_and_embeddings(pair_files, tmp_path, capsys):
    """run_generate with the refiner and what was refused before: an embedding (the base's; the refiner reads its name
    as words, A's skip of an SDXL embedding on the 1280-wide refiner), a prompt schedule, img2img and the hires fix
    (each image = the same handoff run through the library's own path); aesthetic gradients / Custom Diffusion stay
    refused, as does --refiner-hires-pass without a hires fix."""
    from PIL import Image

    from sdadapt.jobs.generate import _inject_embedding_file, run_generate
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner
    from sdadapt.jobs.models import load_system

    base_file, refiner_file = pair_files
    base, refiner = load_system(str(base_file), device="cpu"), load_system(str(refiner_file), device="cpu")
    file = _embedding_file(tmp_path, base)
    kwargs = dict(model=str(base_file), refiner=str(refiner_file), refiner_switch_at=0.5, steps=4, width=16,
                  height=16, seed=3, sampler="euler", device="cpu")
    said: list[str] = []
    result = run_generate(prompt="a zorg photo", embeddings=[str(file)], out=tmp_path / "e.png", log=said.append,
                          **kwargs)
    assert result["embeddings"] == ["zorg"] and any("refiner: 2 model calls on the base, 2 on" in s for s in said)

    def pixels(path):
        return torch.tensor(list(Image.open(path).convert("RGB").getdata())).reshape(16, 16, 3)

    def eight(image):
        return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)

    plain = sample_base_then_refiner(base, refiner, ["a zorg photo"], switch_at=0.5, steps=4, seed=3, sampler="euler",
                                     height=16, width=16)[0]
    handle = _inject_embedding_file(base, file)
    assert handle.matched_by_ids  # (the texts reach both models as written)
    want = sample_base_then_refiner(base, refiner, ["a zorg photo"], switch_at=0.5, steps=4, seed=3, sampler="euler",
                                    height=16, width=16)[0]
    got = pixels(tmp_path / "e.png")
    assert (got.int() - eight(want).int()).abs().max() <= 1
    assert (eight(plain).int() - eight(want).int()).abs().max() > 1  # (the base did read the embedding)
    handle.remove()

    run_generate(prompt="a [cat:dog:0.5]", init_image=tmp_path / "e.png", denoising_strength=0.6,  # (refused before)
                 out=tmp_path / "i.png", **kwargs)
    said.clear()
    run_generate(prompt="a photo", hires_scale=2.0, hires_denoising=0.5, out=tmp_path / "h.png", log=said.append,
                 refiner_hires_pass="both", **kwargs)
    assert Image.open(tmp_path / "h.png").size == (32, 32)
    assert any("on the refiner" in s for s in said)
    with pytest.raises(ValueError, match="--refiner-hires-pass picks the hires-fix pass"):
        run_generate(prompt="a photo", out=tmp_path / "x.png", refiner_hires_pass="first", **kwargs)
    from sdadapt.cli import main

    args = ["generate", "--model", str(base_file), "--refiner", str(refiner_file), "--prompt", "a", "--device", "cpu",
            "-o", str(tmp_path / "x.png"), "--refiner-hires-pass", "first"]
    assert main(args) != 0 and "--refiner-hires-pass picks the hires-fix pass" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--refiner-hires-pass must be one of"):
        run_generate(prompt="a photo", out=tmp_path / "x.png", hires_scale=2.0, refiner_hires_pass="third",
                     **kwargs)
    (tmp_path / "style.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="--refiner: not with --aesthetic"):
        run_generate(prompt="a photo", out=tmp_path / "x.png", aesthetic=tmp_path / "style.pt",
                     aesthetic_clip=tmp_path, **kwargs)


_MULTISTEP = {
    "dpmsolver++": lambda: diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, algorithm_type="dpmsolver++"),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                       beta_end=0.012),
}


@pytest.mark.parametrize("sampler", sorted(_MULTISTEP))
def test_multistep_samplers_keep_their_history_across_the_switch_and_diffusers_restarts_it(pair, sampler,
                                                                                          monkeypatch):
    """The evidence behind keeping one solver (docs/train.md, "The SDXL refiner"): DPM++ 2M / UniPC, 10 steps, the
    refiner at 0.7. sdadapt's run = ONE diffusers scheduler stepped over the base's then the refiner's guided
    predictions (history kept, A's one k-diffusion run) within 1e-4; D's two pipelines restart the scheduler in the
    refiner (its first refiner step first order, no history) — a different result, a fifth to a quarter of what the
    refiner changes at all (measured max |diff|: dpmsolver++ 0.257 and unipc 0.338, vs 1.22 and 1.30 between the
    handoff and the base alone, on latents of max ~42)."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.training.diffusion import guided

    base, refiner = pair
    monkeypatch.setattr("test_sdxl_refiner_handoff_reference._scheduler", lambda name: _MULTISTEP[name]())
    ours = base.sample(["a photo"], seed=5, steps=10, guidance=3.0, sampler=sampler, height=16, width=16,
                       output="latents", refiner=RefinerHandoff(base, refiner, switch_at=0.7))

    def model_of(system):
        time_ids = system._size_time_ids(1, 16, 16)
        cond = system._prompt_condition(["a photo"], time_ids)
        return guided(system.denoiser(), cond, system._uncond("", cond, 1, time_ids), 3.0)

    one = _MULTISTEP[sampler]()  # (one scheduler, its history kept across the switch)
    one.set_timesteps(10)
    x = torch.randn(1, *base.latent_shape(16, 16), generator=torch.Generator().manual_seed(5)) * one.init_noise_sigma
    models = {"base": model_of(base), "refiner": model_of(refiner)}
    for t in one.timesteps:
        which = "base" if float(t) >= 300 else "refiner"
        x = one.step(models[which](one.scale_model_input(x, t), t.reshape(1), None), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-4), (ours - x).abs().max()
    restarted = _diffusers_ensemble(base, refiner, sampler, steps=10, switch_at=0.7, seed=5, guidance=3.0, size=16)
    alone = base.sample(["a photo"], seed=5, steps=10, guidance=3.0, sampler=sampler, height=16, width=16,
                        output="latents")
    gap, refined = float((ours - restarted).abs().max()), float((alone - ours).abs().max())
    print(f"{sampler}: one solver vs D's restart {gap:.3g}; refiner vs base alone {refined:.3g}; "
          f"latents max {float(ours.abs().max()):.3g}")
    assert 1e-3 < gap < refined


def test_after_the_refiner_took_over_the_pixel_upscaler_uses_its_vae(pair, monkeypatch):
    """A's pixel upscalers decode and encode with ``shared.sd_model`` (processing.py ``decode_latent_batch`` /
    ``images_tensor_to_samples``): the refiner once it took over in the first pass (``first``), the base while it did
    not (``second``); the final decode is the refiner's once it took a call. A refiner with its own VAE (the base's,
    its decoder's last conv shifted) tells them apart."""
    import copy

    from generate_recorder import record_generate
    from sdadapt.jobs.generate_hires import HiresRequest, lanczos_upscale_pixels, sample_image
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    own = copy.deepcopy(refiner)
    own.vae = copy.deepcopy(base.vae)
    with torch.no_grad():
        own.vae.decoder.conv_out.bias += 0.3
    runs = record_generate(monkeypatch)
    options = {"seed": 5, "steps": 4, "guidance": 3.0, "sampler": "ddim", "negative": "", "height": 16, "width": 16}
    starts = {}
    for mode in ("first", "second"):
        runs.clear()
        sample_image(base, ["a photo"], options, hires=HiresRequest((32, 32), denoising=0.5, upscaler="pixel-lanczos"),
                     refiner=RefinerHandoff(base, own, switch_at=0.5), refiner_hires_pass=mode)
        (_, first), (second_kw, _) = runs
        starts[mode] = (first, second_kw["init_latents"])
    for mode, system in (("first", own), ("second", base)):
        first, start = starts[mode]
        want = system.encode_images(lanczos_upscale_pixels(system.decode_latents(first), (32, 32)))
        torch.testing.assert_close(start, want.to(start.dtype), rtol=0, atol=1e-6)
    first, start = starts["first"]
    other = base.encode_images(lanczos_upscale_pixels(base.decode_latents(first), (32, 32)))
    assert (other - start).abs().max() > 1e-3
    monkeypatch.undo()  # (and the images A decodes at the end: the refiner's VAE once it took a call)
    kw = dict(seed=1, steps=4, sampler="ddim", height=16, width=16)
    images = base.sample(["a photo"], **kw, refiner=RefinerHandoff(base, own, switch_at=0.5))
    latents = base.sample(["a photo"], **kw, output="latents", refiner=RefinerHandoff(base, own, switch_at=0.5))
    torch.testing.assert_close(images, own.decode_latents(latents))
    assert (images - base.decode_latents(latents)).abs().max() > 1e-3


def _karras(model_sigmas, steps: int):
    """k-diffusion's ``get_sigmas_karras`` on the model's σ range, rho 7, a 0 appended (A's "Karras" schedule)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = float(model_sigmas[0]) ** (1 / 7), float(model_sigmas[-1]) ** (1 / 7)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])


def test_on_a1111s_grids_the_cut_is_a1111s_nearest_index(pair):
    """Euler on A's Karras grid, 25 steps, refiner at 0.5: A switches at the first call whose σ's nearest model index
    ``i`` has ``(999 - i) / 1000 >= 0.5`` — 13 refiner calls, where diffusers' ``t < 500`` on the fractional timestep
    would give 14 (the call at t ≈ 499.7 is the base's in A: its nearest index is 500). Without a schedule (diffusers'
    own grid) the cut stays diffusers' (the ensemble tests)."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    model_sigmas = ((1 - base.alphas_cumprod.double()) / base.alphas_cumprod.double()).sqrt()
    sigmas = _karras(model_sigmas, 25)
    indices = [int(torch.argmin((model_sigmas - sigma).abs())) for sigma in sigmas[:-1]]
    a1111 = sum((999 - i) / 1000 >= 0.5 for i in indices)
    handoff = RefinerHandoff(base, refiner, switch_at=0.5)
    kw = dict(seed=1, steps=25, guidance=3.0, sampler="euler", height=16, width=16, output="latents")
    base.sample(["a photo"], schedule="karras", refiner=handoff, **kw)
    assert handoff.calls == {"base": 25 - a1111, "refiner": a1111} and a1111 == 13


def _spied(handoff) -> list[tuple[str, float]]:
    """The ``(model, timestep)`` of each call ``handoff``'s switched model makes, in order ("base" / "refiner")."""
    calls: list[tuple[str, float]] = []
    wrapped = handoff.switched

    def spying(base_model, refiner_model, **kw):
        def spy(name, fn):
            def run(x, t, c):
                calls.append((name, float(t.flatten()[0])))
                return fn(x, t, c)
            return run
        return wrapped(spy("base", base_model), spy("refiner", refiner_model), **kw)

    handoff.switched = spying
    return calls


def test_the_refiner_stays_once_it_took_over_as_a1111s_loaded_model(pair):
    """The Restart sampler (20 steps on Karras σ: from t ≈ 5 back up to t ≈ 594) climbs back up the σ grid after the
    switch at 0.8; A's refiner, once loaded, takes those calls
    too (``apply_refiner`` does nothing while the refiner is ``shared.sd_model``): the calls go base..., refiner...,
    never back, though some refiner calls are above the cut."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    handoff = RefinerHandoff(base, refiner, switch_at=0.8)
    order = _spied(handoff)
    base.sample(["a photo"], seed=1, steps=20, guidance=3.0, sampler="restart", schedule="karras", height=16,
                width=16, output="latents", refiner=handoff)
    names = [name for name, _ in order]
    first = names.index("refiner")
    assert set(names[:first]) == {"base"} and set(names[first:]) == {"refiner"}
    assert any(t >= handoff.cutoff for name, t in order[first:])  # (the climb: the refiner's by staying)


@pytest.mark.parametrize("sampler", ["plms", "ddim_cfgpp", "unipc_a1111"])
def test_a1111s_timestep_samplers_switch_at_their_timestep(pair, sampler):
    """A's timestep samplers hand ``apply_refiner`` their timesteps as "σ"; its denoiser has no σ table, so the
    timestep itself is the index: a call switches once ``(999 − int(t)) / 1000 >= refiner_switch_at`` (UniPC's
    fractional timesteps truncated). The calls the base and the refiner take follow that rule, in order."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    handoff = RefinerHandoff(base, refiner, switch_at=SWITCH)
    seen = _spied(handoff)
    base.sample(["a photo"], seed=1, steps=10, guidance=3.0, sampler=sampler, height=16, width=16,
                output="latents", refiner=handoff)
    first = next(i for i, (_, t) in enumerate(seen) if (999 - int(t)) / 1000 >= SWITCH)
    assert [name for name, _ in seen] == ["base"] * first + ["refiner"] * (len(seen) - first)
    assert 0 < first < len(seen)
