"""A1111's refiner options and the infotext of a ``generate`` run: "Refiner switch by sampling steps", the refiner's
zeroed empty negative prompt, hypernetworks on the refiner, and the infotext fields A1111 writes for them (Refiner
fields only once a call switched, RNG, the variation-seed rule, the aesthetic-gradients extension's fields).

- A AUTOMATIC1111/stable-diffusion-webui (read, transcribed where a test says so):
  modules/sd_samplers_common.py ``apply_refiner`` (``completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps``
  with ``opts.refiner_switch_by_sample_steps``; writes "Refiner switch by sampling steps" on every call, "Hires
  refiner" / "Refiner" / "Refiner switch at" only when it switches) and lines 13-18 ``SamplerData.total_steps``
  (``steps * 2`` for ``second_order`` samplers); modules/sd_samplers_cfg_denoiser.py ``forward`` (``self.step += 1``
  per call); modules/sd_samplers_kdiffusion.py (v1.10: ``second_order`` on DPM++ SDE, DPM++ 2S a, Heun, DPM2, DPM2 a,
  Restart); ``launch_sampling(t_enc + 1, ...)`` in ``sample_img2img``; modules/sd_models_xl.py
  ``get_learned_conditioning`` (``force_zero_negative_prompt = is_negative_prompt and all(x == '' for x in batch)``:
  the 'txt' embedders' outputs zeroed, the aesthetic-score embedder's kept); modules/processing.py
  ``process_images_inner`` (``all_seeds = [seed + (x if subseed_strength == 0 else 0) ...]``) and
  ``create_infotext`` (``"RNG": opts.randn_source if opts.randn_source != "GPU" else None``);
  modules/hypernetworks/hypernetwork.py ``apply_single_hypernetwork`` (the pair of ``context.shape[2]``).
- E AUTOMATIC1111/stable-diffusion-webui-aesthetic-gradients aesthetic_clip.py ``set_aesthetic_params`` and
  scripts/aesthetic.py ``process`` (``float(lr)``, ``float(weight)``, ``int(steps)``).
- D huggingface/diffusers (installed): StableDiffusionXLImg2ImgPipeline ``encode_prompt``
  (``zero_out_negative_prompt = negative_prompt is None and force_zeros_for_empty_prompt``) and
  ``_get_add_time_ids`` (``negative_aesthetic_score``).
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from test_infotext import a1111_parse
from test_sdxl_refiner_handoff_reference import pair, pair_files  # noqa: F401

# ---- A's switch by sampling steps, transcribed (sd_samplers_common.apply_refiner; SamplerData.total_steps)
_A1111_SECOND_ORDER_LABELS = {"DPM++ SDE", "DPM++ 2S a", "Heun", "DPM2", "DPM2 a", "Restart"}


def _a1111_calls_by_steps(label: str, steps: int, calls: int, switch_at: float) -> dict:
    """Each model's calls of one A run of ``calls`` denoiser calls launched with ``steps``: the refiner loaded at the
    first call whose ``step / total_steps >= switch_at`` and kept."""
    total = steps * 2 if label in _A1111_SECOND_ORDER_LABELS else steps
    out, loaded = {"base": 0, "refiner": 0}, "base"
    for step in range(calls):
        if loaded == "base" and not step / total < switch_at:
            loaded = "refiner"
        out[loaded] += 1
    return out


@pytest.mark.parametrize("sampler,label", [("euler", "Euler"), ("heun", "Heun"), ("dpmpp_2s_a", "DPM++ 2S a"),
                                           ("lms", "LMS")])
def test_switch_by_sampling_steps_is_a1111s_count(pair, sampler, label):
    """One- and two-call samplers, 5 steps, switch at 0.5 (and 0.3 for the two-call ones): each model's calls = the
    transcription of A's ``step / total_steps`` rule (the two-call samplers' last step makes one call: 9 calls of A's
    expected 10).
    On a two-call sampler the by-steps switch is not the timestep one (Heun at 0.5: the timestep cut gives the
    refiner the last 4 calls, A's count 4 of 9 too but at 0.3 the count gives it 6)."""
    from sdadapt.jobs.generate_refiner import A1111_SECOND_ORDER, RefinerHandoff, a1111_total_steps
    from sdadapt.samplers.labels import a1111_label

    assert {a1111_label(name) for name in A1111_SECOND_ORDER} == _A1111_SECOND_ORDER_LABELS
    assert a1111_total_steps(sampler, 5) == (10 if label in _A1111_SECOND_ORDER_LABELS else 5)
    base, refiner = pair

    def calls_of(switch_at, by_steps):
        handoff = RefinerHandoff(base, refiner, switch_at=switch_at, by_steps=by_steps)
        base.sample(["a photo"], seed=1, steps=5, guidance=3.0, sampler=sampler, height=16, width=16,
                    output="latents", refiner=handoff)
        return handoff.calls

    second_order, differ = label in _A1111_SECOND_ORDER_LABELS, False
    for switch_at in (0.3, 0.5, 0.7):
        calls = calls_of(switch_at, True)
        count = sum(calls.values())
        assert count == (9 if second_order else 5)  # (the last step: one call)
        assert calls == _a1111_calls_by_steps(label, 5, count, switch_at), (switch_at, calls)
        # (the timestep cut run only where it is asserted, up to the first switch it differs at)
        differ = differ or (second_order and calls != calls_of(switch_at, False))
    if second_order:  # (twice the steps: the count is not the timestep cut there)
        assert differ


def test_switch_by_steps_in_img2img_counts_the_shortened_run(pair):
    """Euler img2img at 0.6 over 10 steps: A launches ``t_enc + 1 = 7`` steps (``setup_img2img_steps``), so at
    switch 0.5 the refiner takes calls 4..6 (``4 / 7 >= 0.5``), not the calls past half of 10."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.sampling import generate

    base, refiner = pair
    side = 16 // base.vae_factor
    init = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(9))
    handoff = RefinerHandoff(base, refiner, switch_at=0.5, by_steps=True)
    generate(base, ["a photo"], seed=3, steps=10, guidance=3.0, sampler="euler", height=16, width=16,
             init_latents=init, denoising_strength=0.6, output="latents", refiner=handoff)
    assert handoff.calls == _a1111_calls_by_steps("Euler", 7, 7, 0.5) == {"base": 4, "refiner": 3}


# ---- the refiner's empty negative prompt
def _refiner_pipe(refiner, *, zeros: bool):
    return diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=refiner.vae, text_encoder=None, text_encoder_2=refiner.text_encoder_2, tokenizer=None,
        tokenizer_2=refiner.tokenizer_2, unet=refiner.unet, scheduler=diffusers.EulerDiscreteScheduler(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=zeros)


def test_the_refiners_empty_negative_is_diffusers_encoded_or_a1111s_zeros(pair):
    """Default: the refiner's unconditional branch = D's refiner pipeline's ``encode_prompt(negative_prompt="")``
    (its config's ``force_zeros_for_empty_prompt=False``) with the negative aesthetic score's time ids; with
    :attr:`zero_empty_negative` (``--refiner-empty-negative zeros``): all zeros but the time ids — A's
    ``force_zero_negative_prompt`` (the 'txt' embedder zeroed, the aesthetic embedder not), which is D's pipeline
    with ``force_zeros_for_empty_prompt=True`` and ``negative_prompt=None``. A non-empty negative is encoded either
    way; the base zeros an empty one as before."""
    base, refiner = pair
    time_ids = refiner._size_time_ids(1, 16, 16)
    assert refiner.zero_empty_negative is False and base.zero_empty_negative is True

    def uncond(negative):
        return refiner._guidance_inputs(refiner.denoiser(), ["a photo"], negative=negative, cond=None, plan=None,
                                        time_ids=time_ids, guidance=3.0)[2]

    def theirs(zeros, negative):
        pipe = _refiner_pipe(refiner, zeros=zeros)
        out = pipe.encode_prompt("a photo", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                 negative_prompt=negative)
        return out[1], out[3]  # (negative states, negative pooled)

    encoded, blurry = uncond(""), uncond("blurry")
    states, pooled = theirs(False, "")
    assert torch.allclose(encoded["context"], states, atol=1e-5) and torch.allclose(encoded["text_embeds"], pooled,
                                                                                      atol=1e-5)
    assert float(encoded["context"].abs().max()) > 0
    assert encoded["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 2.5]]
    refiner.zero_empty_negative = True
    try:
        zeroed = uncond("")
        states, pooled = theirs(True, None)
        assert float(states.abs().max()) == 0 == float(pooled.abs().max())
        assert torch.equal(zeroed["context"], torch.zeros_like(encoded["context"]))
        assert torch.equal(zeroed["text_embeds"], torch.zeros_like(encoded["text_embeds"]))
        assert zeroed["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 2.5]]  # (A's low aesthetic score kept)
        assert torch.equal(uncond("blurry")["context"], blurry["context"])  # (a negative given: encoded)
        assert float(blurry["context"].abs().max()) > 0
    finally:
        refiner.zero_empty_negative = False


# ---- generate: the options end to end, the hypernetwork on the refiner, the infotext
def _hypernetwork(widths, seed=4):
    import sdadapt

    config = sdadapt.HypernetworkConfig(layer_structure=(1, 2, 1), activation="relu", layer_norm=True)
    hn = sdadapt.Hypernetwork(list(widths), config, name="style")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return hn


def _pixels(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_generate_applies_a_hypernetwork_to_the_refiners_layers_of_its_widths(pair_files, tmp_path, monkeypatch):
    """A file with pairs for 128 (the tiny base's attention width) and 8 (the tiny refiner's text-context width, as
    an SDXL file's 1280 meets sd_xl_refiner's): generate hooks the base's 128-wide layers and exactly the refiner's
    layers whose K/V input width the file has (A's ``apply_single_hypernetwork`` per ``context.shape[2]``: here its
    cross-attention); the image = the handoff run with the same hypernetwork injected into both UNets by hand, and
    differs from the one with the base's alone. A file without a refiner width leaves the refiner as it is."""
    import sdadapt
    from sdadapt.hypernetworks import context_widths
    from sdadapt.images import to_uint8
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner
    from sdadapt.jobs.models import load_system

    base_file, refiner_file = pair_files
    hn = _hypernetwork([128, 8])
    file = sdadapt.save_hypernetwork(tmp_path / "style.safetensors", hn)
    said = []
    kwargs = dict(model=str(base_file), refiner=str(refiner_file), refiner_switch_at=0.5, steps=4, width=16, height=16,
                  seed=3, sampler="euler", device="cpu", prompt="a photo")
    from sdadapt.diffusers_system import DiffusersSystem

    decoded = []  # (the latents generate decodes: the hypernetwork's effect on the tiny refiner is about one 8-bit
    real_decode = DiffusersSystem.decode_latents  # level in the PNG, too little to tell a wrong strength by)

    def spy(self, latents, *args, **kw):
        decoded.append(latents.detach().clone())
        return real_decode(self, latents, *args, **kw)

    monkeypatch.setattr(DiffusersSystem, "decode_latents", spy)
    result = run_generate(hypernetworks=[f"{file}:0.7"], out=tmp_path / "h.png", log=said.append, **kwargs)
    monkeypatch.undo()
    base, refiner = load_system(str(base_file), device="cpu"), load_system(str(refiner_file), device="cpu")
    refiner_widths = context_widths(refiner.unet)  # (before any injection: the file's UNet)
    want_layers = sum(w in (128, 8) for w in refiner_widths.values())
    assert want_layers == sum(w == 8 for w in refiner_widths.values()) > 0
    assert result["hypernetworks"][0]["refiner_layers"] == want_layers
    assert any("on the refiner: " + f"{want_layers} layers" in line for line in said)

    loaded = sdadapt.load_hypernetwork(file)
    sdadapt.inject_hypernetwork(base.unet, loaded, strength=0.7, name="a")
    latents = dict(switch_at=0.5, steps=4, seed=3, sampler="euler", height=16, width=16, output="latents")
    base_only = sample_base_then_refiner(base, refiner, ["a photo"], **latents)
    handle = sdadapt.inject_hypernetwork(refiner.unet, loaded, strength=0.7, name="a")
    assert set(handle.layers) == {name for name, w in refiner_widths.items() if w == 8}
    both = sample_base_then_refiner(base, refiner, ["a photo"], **latents)
    assert float((both - base_only).abs().max()) > 1e-3  # (the refiner's layers did change its calls)
    written = _pixels(tmp_path / "h.png")
    assert abs(written - to_uint8(refiner.decode_latents(both)[0]).astype(int)).max() <= 1
    assert len(decoded) == 1 and float((decoded[0] - both).abs().max()) <= 1e-6 * float(both.abs().max())

    other = sdadapt.save_hypernetwork(tmp_path / "base_only.safetensors", _hypernetwork([128, 64]))
    result = run_generate(hypernetworks=[str(other)], out=tmp_path / "o.png", **kwargs)
    assert result["hypernetworks"][0]["refiner_layers"] == 0


def test_generate_refiner_options_and_their_infotext(pair_files, tmp_path):
    """End to end through run_generate, the infotext read back by A's parser (test_infotext's transcription):
    ``refiner_switch_by_steps`` writes "Refiner switch by sampling steps: True" and switches by A's count (the log's
    call counts); a switch no call reaches (0.99 by steps of 4 Euler steps: the last call's 3/4 < 0.99) writes no
    Refiner fields, as A writes them only in ``apply_refiner``'s switch; ``--refiner-empty-negative zeros`` = the handoff with the refiner's :attr:`zero_empty_negative`; the hires
    pass setting "both" is written as A's "Hires refiner: both passes"; no ``--noise`` on Euler: "RNG: CPU"."""
    from sdadapt.images import to_uint8
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner
    from sdadapt.jobs.models import load_system

    base_file, refiner_file = pair_files
    kwargs = dict(model=str(base_file), refiner=str(refiner_file), steps=4, width=16, height=16, seed=3,
                  sampler="euler", device="cpu", prompt="a photo")

    def fields(name):
        from sdadapt.images import read_png_text

        return a1111_parse(read_png_text(tmp_path / name)["parameters"])

    said = []
    run_generate(out=tmp_path / "s.png", refiner_switch_at=0.5, refiner_switch_by_steps=True, log=said.append,
                 **kwargs)
    assert any("refiner: 2 model calls on the base, 2 on the refiner (switch at 0.5 of the sampling steps)" in line
               for line in said)
    assert f"refiner {refiner_file}: takes over at 0.5 of the sampling steps" in said  # (said as it loads)
    got = fields("s.png")
    assert got["Refiner switch by sampling steps"] == "True" and got["Refiner switch at"] == "0.5"
    assert got["Refiner"] == "refiner [" + __import__("hashlib").sha256(refiner_file.read_bytes()).hexdigest()[:10] + "]"
    assert got["RNG"] == "CPU" and "Hires refiner" not in got
    from sdadapt.cli import main

    assert main(["generate", "--model", str(base_file), "--refiner", str(refiner_file), "--refiner-switch-at", "0.99",
                 "--refiner-switch-by-steps", "--steps", "4", "--width", "16", "--height", "16", "--seed", "3",
                 "--sampler", "euler", "--device", "cpu", "--prompt", "a photo", "-q", "-o",
                 str(tmp_path / "n.png")]) == 0
    got = fields("n.png")
    assert "Refiner" not in got and "Refiner switch at" not in got
    assert got["Refiner switch by sampling steps"] == "True"

    run_generate(out=tmp_path / "z.png", refiner_switch_at=0.5, refiner_empty_negative="zeros", **kwargs)
    base, refiner = load_system(str(base_file), device="cpu"), load_system(str(refiner_file), device="cpu")
    latents = dict(switch_at=0.5, steps=4, seed=3, sampler="euler", height=16, width=16, output="latents")
    encoded = sample_base_then_refiner(base, refiner, ["a photo"], **latents)
    refiner.zero_empty_negative = True
    zeroed = sample_base_then_refiner(base, refiner, ["a photo"], **latents)
    assert float((zeroed - encoded).abs().max()) > 1e-3
    assert abs(_pixels(tmp_path / "z.png") - to_uint8(refiner.decode_latents(zeroed)[0]).astype(int)).max() <= 1
    got = fields("z.png")
    assert "Refiner switch by sampling steps" not in got and got["Refiner switch at"] == "0.5"

    run_generate(out=tmp_path / "hb.png", refiner_switch_at=0.5, hires_scale=2.0, hires_denoising=0.5,
                 refiner_hires_pass="both", **kwargs)
    got = fields("hb.png")
    assert got["Hires refiner"] == "both passes"
    keys = list(got)
    assert keys.index("Hires upscale") < keys.index("Hires refiner") < keys.index("Refiner") < keys.index("Version")

    with pytest.raises(ValueError, match="--refiner-switch-by-steps counts"):
        run_generate(model=str(base_file), prompt="a", out=tmp_path / "x.png", refiner_switch_by_steps=True)
    with pytest.raises(ValueError, match="--refiner-empty-negative zeros: .* not the SDXL refiner"):
        run_generate(model=str(base_file), prompt="a", out=tmp_path / "x.png", refiner_empty_negative="zeros",
                     steps=1, width=16, height=16, device="cpu")
    with pytest.raises(ValueError, match="--refiner-empty-negative must be"):
        run_generate(out=tmp_path / "x.png", refiner_empty_negative="zero", **kwargs)


# ---- the infotext's own rules
def test_no_noise_option_draws_a1111s_cpu_numbers_so_rng_is_cpu(pair, tmp_path):
    """Without ``noise`` sdadapt's CPU generator draws what A1111's "CPU" source draws for the seed (start noise and
    Euler a's sampler noise: the same latents bit for bit), so the infotext says "RNG: CPU"; not on a Brownian-tree
    sampler (DPM++ SDE: A seeds its tree, sdadapt's default does not — the latents differ), nor with ``--noise a1111``
    (A's default GPU source, which A leaves out); ``a1111-cpu``: CPU."""
    from sdadapt.jobs.infotext import InfotextRun
    from sdadapt.samplers.a1111_noise import A1111Seeds

    base, _ = pair
    for sampler, same in (("euler_a", True), ("dpmpp_sde", False)):
        kw = dict(seed=5, steps=3, guidance=3.0, sampler=sampler, height=16, width=16, output="latents")
        equal = torch.equal(base.sample(["a"], **kw), base.sample(["a"], noise=A1111Seeds(source="cpu"), **kw))
        assert equal is same
        rng = a1111_parse(InfotextRun(prompt="a", sampler=sampler).for_image(0)).get("RNG")
        assert rng == ("CPU" if same else None)
    assert "RNG" not in a1111_parse(InfotextRun(prompt="a", sampler="euler", noise="a1111").for_image(0))
    assert a1111_parse(InfotextRun(prompt="a", sampler="dpmpp_sde", noise="a1111-cpu").for_image(0))["RNG"] == "CPU"
    hires = {"scale": 2.0, "sampler": "dpmpp_sde", "denoising": 0.5}
    assert "RNG" not in a1111_parse(InfotextRun(prompt="a", sampler="euler", hires=hires).for_image(0))


def test_variation_strength_keeps_the_seed_for_every_image():
    """A's ``all_seeds``: with a variation strength ≠ 0 every image has the seed, its variation seed ``subseed + i``;
    without, ``seed + i``."""
    from sdadapt.jobs.generate import image_seed
    from sdadapt.jobs.infotext import InfotextRun

    def a1111_all_seeds(seed, subseed_strength, n):  # (processing.process_images_inner, transcribed)
        return [int(seed) + (x if subseed_strength == 0 else 0) for x in range(n)]

    for strength in (0.0, 0.3):
        assert [image_seed(7, i, subseed_strength=strength) for i in range(3)] == a1111_all_seeds(7, strength, 3)
        run = InfotextRun(prompt="a", seed=7, subseed=20, subseed_strength=strength, noise="a1111")
        parsed = [a1111_parse(run.for_image(i)) for i in range(3)]
        assert [p["Seed"] for p in parsed] == [str(s) for s in a1111_all_seeds(7, strength, 3)]
        assert [p.get("Variation seed") for p in parsed] == ([None] * 3 if not strength else ["20", "21", "22"])


def test_aesthetic_gradient_fields_are_the_extensions(tmp_path):
    """``aesthetic``: E's eight fields, in its order, its values as its ``process`` hands them over (``float(lr)``
    printed by Python, ``int(steps)``, the embedding's file name without ``.pt``, booleans as ``True``/``False``, an
    empty text written empty — A's reader then drops it, as it drops the extension's own), before the hires fields (A1111 runs ``scripts.process`` before ``p.init``); read back
    by A's parser. Custom Diffusion and ``--max-token-length`` have no field anywhere in A or its extensions: none."""
    from sdadapt.jobs.infotext import InfotextRun

    settings = dict(embedding=tmp_path / "Belle.pt", lr=1e-4, weight=0.9, steps=15, slerp=False, text=None,
                    text_negative=False, slerp_angle=0.1)
    run = InfotextRun(prompt="a", sampler="euler", aesthetic=settings,
                      hires={"scale": 2.0, "denoising": 0.5, "upscaler": "latent"})
    text = run.for_image(0)
    parsed = a1111_parse(text)
    assert "Aesthetic slerp: False, Aesthetic text: , Aesthetic text negative: False" in text  # (E's empty text)
    want = {"Aesthetic LR": "0.0001", "Aesthetic weight": "0.9", "Aesthetic steps": "15",
            "Aesthetic embedding": "Belle", "Aesthetic slerp": "False",
            "Aesthetic text negative": "False", "Aesthetic slerp angle": "0.1"}  # (A's reader drops the empty text)
    assert {k: parsed[k] for k in want} == want and "Aesthetic text" not in parsed
    keys = list(parsed)
    assert keys[keys.index("Aesthetic LR"):keys.index("Aesthetic LR") + 7] == list(want)
    assert keys.index("Aesthetic slerp angle") < keys.index("Hires upscale")
    whole = a1111_parse(InfotextRun(prompt="a", aesthetic={**settings, "lr": 1.0, "weight": 1.0, "slerp": True,
                                                           "text": "oil, paint"}).for_image(0))
    assert (whole["Aesthetic LR"], whole["Aesthetic weight"], whole["Aesthetic slerp"],
            whole["Aesthetic text"]) == ("1.0", "1.0", "True", "oil, paint")
    assert not any(key.startswith("Aesthetic") for key in a1111_parse(InfotextRun(prompt="a").for_image(0)))


def test_the_refiners_calls_are_rescaled_too(pair, monkeypatch):
    """``guidance_rescale`` on a run with the SDXL refiner: every guided call, the base's and the refiner's, rescaled
    (A1111's CFG Rescale extension replaces ``combine_denoised`` for the whole run)."""
    from sdadapt import guidance_rescale
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    real, phis = guidance_rescale.rescale_guidance, []
    monkeypatch.setattr(guidance_rescale, "rescale_guidance",
                        lambda out, cond, phi: phis.append(phi) or real(out, cond, phi))
    handoff = RefinerHandoff(base, refiner, switch_at=0.5)
    base.sample(["a photo"], seed=1, steps=4, guidance=3.0, sampler="euler", schedule="karras", height=16, width=16,
                output="latents", refiner=handoff, guidance_rescale=0.7)
    assert handoff.taken and phis == [0.7] * 4


def test_a_rescale_in_v_resolves_for_each_model_of_a_refiner_run(pair):
    """``GuidanceRescale(phi, "v")`` with the refiner: on A1111's grid both models' x̂0 are taken to v at σ; on
    diffusers' grid an ε base (and refiner) is refused, naming why."""
    from sdadapt.guidance_rescale import GuidanceRescale
    from sdadapt.jobs.generate_refiner import RefinerHandoff

    base, refiner = pair
    in_v = GuidanceRescale(0.7, "v")
    run = dict(seed=1, steps=4, guidance=3.0, sampler="euler", height=16, width=16, output="latents")
    handoff = RefinerHandoff(base, refiner, switch_at=0.5)
    rescaled = base.sample(["a photo"], schedule="karras", refiner=handoff, guidance_rescale=in_v, **run)
    plain = base.sample(["a photo"], schedule="karras", refiner=RefinerHandoff(base, refiner, switch_at=0.5), **run)
    assert handoff.taken and not torch.equal(rescaled, plain)
    with pytest.raises(ValueError, match="the model predicts epsilon, not v"):
        base.sample(["a photo"], refiner=RefinerHandoff(base, refiner, switch_at=0.5), guidance_rescale=in_v, **run)
