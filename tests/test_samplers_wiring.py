"""Every registered sampler (:data:`sdadapt.samplers.SAMPLERS`) through ``generate``, the
``DiffusersSystem``, the toy, the CLI, kohya configs and prompt files.

Generic over the registry: a sampler added to ``samplers/__init__.py`` is tested here with no edit.
The diffusers reference is kohya's ``get_my_scheduler`` (library/train_util.py): the scheduler class
of the name with the class's defaults plus SD's betas (and ``prediction_type="v_prediction"`` for a
v model), run as a diffusers pipeline runs it with ``generator=torch.Generator().manual_seed(seed)``:
the start noise from the generator, then each ``step(..., generator=g)`` from the same generator.
"""

from __future__ import annotations

import inspect
import json

import diffusers
import pytest
import torch

from sdadapt import samplers
from sdadapt.samplers.labels import (
    A1111_DISPLAY,
    A1111_LABELS,
    A1111_MISSING,
    sampler_from_label,
)
from sdadapt.sampling import SamplePrompt, generate, parse_sample_prompts

#: kohya's get_my_scheduler: name -> (diffusers class, extra config)
KOHYA_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}), "pndm": ("PNDMScheduler", {}), "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    # (diffusers >= 0.29 refuses dpmsolver with its default final_sigmas_type="zero": kohya's dpmsolver fails there)
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),  # (not kohya's: diffusers' class defaults likewise)
}
#: (sampler, karras) for every registered sampler, and the Karras variant where it has one
CASES = [(name, False) for name in samplers.SAMPLERS] + [(name, True) for name in samplers.KARRAS_SAMPLERS]
PROMPT, SEED, STEPS, SCALE = "a photo", 3, 4, 4.0  # (4: pndm's fewest; Heun runs 2n - 1 model calls)
SIZE = 16  # (pixels: an 8 x 8 latent; what is tested is the wiring, not the size: a quarter of 32 x 32's UNet work)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random SD1-layout DiffusersSystem, v-prediction (tests/test_cli_train.py's folder)."""
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe"))


def _by_protocol(system, name, karras, *, seed=SEED):
    """Latents sampled the long way: start noise from the seeded CPU generator, the sampler drawing
    its noise from the same generator after it, through ``samplers.sample_latents``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *system.latent_shape(SIZE, SIZE), generator=g)
    cond = system.condition(system.tokenize([PROMPT]))
    uncond = system.condition(system.tokenize([""]))
    return samplers.sample_latents(system.denoiser(), x, cond, sampler=name, alphas_cumprod=system.alphas_cumprod,
                                   num_steps=STEPS, uncond=uncond, guidance_scale=SCALE, karras=karras,
                                   prediction_type=system.prediction_type, generator=g)


@pytest.mark.parametrize("name, karras", CASES)
def test_generate_on_a_diffusers_system_is_sample_latents_then_decode(tiny_sd, name, karras):
    ours = generate(tiny_sd, [PROMPT], seed=SEED, steps=STEPS, guidance=SCALE, sampler=name, karras=karras, height=SIZE,
                    width=SIZE)
    want = tiny_sd.decode_latents(_by_protocol(tiny_sd, name, karras))
    assert ours.shape == (1, 3, SIZE, SIZE) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, want, rtol=0, atol=0)  # the same computation, bit for bit


@pytest.mark.parametrize("name, karras", [c for c in CASES if c[0] in KOHYA_SCHEDULERS])
def test_the_system_samples_as_a_diffusers_pipeline_with_kohyas_scheduler(tiny_sd, name, karras):
    """The same tiny UNet under diffusers' own scheduler loop (what StableDiffusionPipeline does with
    ``generator=torch.Generator().manual_seed(seed)``): init_noise_sigma, scale_model_input, the
    (float) timesteps the UNet sees, CFG on the [uncond, cond] batch, the ancestral noise's generator.
    float32 UNet and diffusers' float32 scheduler arithmetic vs the sampler's float64 σ grid: 3e-5 of the
    result's scale (measured ≤ 9.4e-6 over 1, 4, 10, 25 steps, Karras σ included; docs/samplers.md)."""
    cls, extra = KOHYA_SCHEDULERS[name]
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": "v_prediction", **extra, **({"use_karras_sigmas": True} if karras else {})}
    scheduler = getattr(diffusers, cls)(**config)  # (kohya also sets Heun's clip_sample; sdadapt's heun does not)
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn(1, *tiny_sd.latent_shape(SIZE, SIZE), generator=g)
    both = torch.cat([tiny_sd.condition(tiny_sd.tokenize([""])), tiny_sd.condition(tiny_sd.tokenize([PROMPT]))])
    scheduler.set_timesteps(STEPS)
    latents = latents * scheduler.init_noise_sigma
    extra_step = {"generator": g} if "generator" in inspect.signature(scheduler.step).parameters else {}  # (as the pipeline)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out_u, out_c = tiny_sd.unet(x_in, t, both).sample.chunk(2)
            latents = scheduler.step(out_u + SCALE * (out_c - out_u), t, latents, **extra_step).prev_sample
    with torch.no_grad():
        ours = _by_protocol(tiny_sd, name, karras)
    assert ours.shape == latents.shape
    assert float((ours - latents).abs().max() / latents.abs().max()) < 3e-5


def test_the_toy_runs_every_sampler_through_the_protocol(tmp_path):
    """The toy's ``sample`` is its own DDIM; any other sampler goes through ``generate``'s protocol path
    (its denoiser takes the samplers' fractional timesteps), equal to sample_latents + decode."""
    from _fast_s1 import one_level_toy

    toy = one_level_toy(seed=0).eval()  # (the toy system with a one-level UNet: its time embedding, a ninth of the ops)
    t = torch.tensor([10.0, 10.5])
    with torch.no_grad():  # a fractional timestep is its own point on the time embedding, not a rounded one
        x, cond = torch.randn(2, 12, 16, 16), toy.condition(["a red circle"] * 2)
        a, b = toy.denoiser()(x, t, cond), toy.denoiser()(x, t.floor(), cond)
    assert not torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    for name, karras in [(name, False) for name in samplers.SAMPLERS] + [(samplers.KARRAS_SAMPLERS[-1], True)]:
        ours = generate(toy, ["a red circle"], seed=1, steps=STEPS, sampler=name, karras=karras)
        assert ours.shape == (1, 3, 32, 32) and torch.isfinite(ours).all(), name
        if name == "ddim":
            continue
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 12, 16, 16, generator=g)
        latents = samplers.sample_latents(toy.denoiser(), x, toy.condition(["a red circle"]), sampler=name,
                                          alphas_cumprod=toy.alphas_cumprod, num_steps=STEPS, uncond=toy.condition([""]),
                                          guidance_scale=2.0, karras=karras, generator=g)
        torch.testing.assert_close(ours, toy.decode_latents(latents), rtol=0, atol=0, msg=name)


def test_unknown_samplers_and_karras_without_karras_sigmas_are_refused(tiny_sd):
    with pytest.raises(ValueError, match="sampler must be one of ddim"):
        generate(tiny_sd, [PROMPT], sampler="euler_cfg_pp")
    plain = [n for n in samplers.SAMPLERS if n not in samplers.KARRAS_SAMPLERS]
    for name in plain:
        with pytest.raises(ValueError, match="no Karras noise levels"):
            generate(tiny_sd, [PROMPT], sampler=name, karras=True)


# A1111 labels -------------------------------------------------------------------------------------

def test_a1111_labels_map_to_their_diffusers_scheduler():
    """diffusers' table of A1111 names (docs: api/schedulers/overview) for the labels whose sampler is here."""
    table = {"DPM++ 2M Karras": ("dpmsolver++", True), "DPM++ 2M": ("dpmsolver++", False),
             "Euler a": ("euler_a", False), "Euler": ("euler", False), "DPM2 a Karras": ("dpm_2_a", True),
             "DPM2": ("dpm_2", False), "LMS Karras": ("lms", True), "LMS": ("lms", False), "Heun": ("heun", False),
             "DDIM": ("ddim", False), "k_euler_a": ("euler_a", False), "ddim": ("ddim", False),
             "  euler   A ": ("euler_a", False), "k_dpm_2": ("dpm_2", False)}
    for label, (name, karras) in table.items():
        if name in samplers.SAMPLERS and (not karras or name in samplers.KARRAS_SAMPLERS):
            assert sampler_from_label(label) == (name, karras), label
        else:  # (a sampler not registered in this build)
            with pytest.raises(ValueError, match="not available|no Karras"):
                sampler_from_label(label)
    for name in samplers.SAMPLERS:  # every registry name and alias reads as itself
        assert sampler_from_label(name) == (name, False)
    for alias, name in samplers.SAMPLER_ALIASES.items():
        assert sampler_from_label(alias) == (name, False)
    for label, name in A1111_LABELS.items():  # every label maps to a registry name or says it is not here
        if label in samplers.SAMPLERS and name != label:  # ("unipc": the name wins; the label as A1111 writes it,
            # "UniPC", is A1111's sampler)
            assert sampler_from_label(label)[0] == label
            assert sampler_from_label(A1111_DISPLAY[label])[0] == name
        elif name in samplers.SAMPLERS:
            assert sampler_from_label(label)[0] == name
        else:
            with pytest.raises(ValueError, match="not available|no sampler here matches"):
                sampler_from_label(label)


@pytest.mark.parametrize("label", ["Euler CFG++ Karras", "Euler CFG++", "nonsense"])
def test_a1111_labels_without_a_sampler_here_say_why_and_what_is_taken(label):
    with pytest.raises(ValueError) as info:
        sampler_from_label(label)
    said = str(info.value)
    assert repr(label) in said and ", ".join(samplers.SAMPLERS) in said
    base = label.lower().removesuffix(" karras")
    if base in A1111_MISSING:
        assert A1111_MISSING[base] in said


def test_plms_maps_only_to_a_registered_plms():
    if "plms" in samplers.SAMPLERS:
        assert sampler_from_label("PLMS") == ("plms", False)
    else:
        with pytest.raises(ValueError, match="skip_prk_steps"):
            sampler_from_label("PLMS")


# the commands --------------------------------------------------------------------------------------

def test_generate_command_takes_names_labels_and_karras(tmp_path, capsys, monkeypatch):
    import sdadapt.jobs
    from sdadapt.cli import main

    seen = []
    monkeypatch.setattr(sdadapt.jobs, "run_generate", lambda **kw: seen.append(kw) or {"files": []})
    karras_one = samplers.KARRAS_SAMPLERS[0]
    for argv in (["--sampler", samplers.SAMPLERS[-1]], ["--sampler", karras_one, "--karras"], ["--sampler", "DDIM"]):
        assert main(["generate", "--prompt", "x", "-o", str(tmp_path / "a.png"), *argv]) == 0
    assert [(kw["sampler"], kw["karras"]) for kw in seen] == [
        (samplers.SAMPLERS[-1], False), (karras_one, True), ("DDIM", False)]
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "-o", str(tmp_path / "a.png"), "--sampler", "Euler CFG++"])
    err = capsys.readouterr().err
    assert "argument --sampler" in err and "Euler CFG++" in err and ", ".join(samplers.SAMPLERS) in err


def test_run_generate_refuses_karras_for_a_sampler_without_it(tmp_path):
    from sdadapt.jobs import run_generate

    plain = next(n for n in samplers.SAMPLERS if n not in samplers.KARRAS_SAMPLERS)
    with pytest.raises(ValueError, match=f"--karras: sampler '{plain}' has no Karras"):
        run_generate(prompt="x", out=tmp_path / "a.png", sampler=plain, karras=True)
    with pytest.raises(ValueError, match="--sampler: .*'Euler CFG\\+\\+'"):
        run_generate(prompt="x", out=tmp_path / "a.png", sampler="Euler CFG++")
    with pytest.raises(ValueError, match="ddim_cfgpp has no Karras noise levels"):  # (A1111's DDIM CFG++: timesteps)
        run_generate(prompt="x", out=tmp_path / "a.png", sampler="DDIM CFG++ Karras")
    # euler_a has no Karras σ in diffusers; the refusal names A1111's Karras schedule type for it (only a σ sampler)
    with pytest.raises(ValueError, match=r"'euler_a' has no Karras.*\(--schedule karras\)$"):
        run_generate(prompt="x", out=tmp_path / "a.png", sampler="euler_a", karras=True)
    with pytest.raises(ValueError, match="'ddpm' has no Karras") as refused:
        run_generate(prompt="x", out=tmp_path / "a.png", sampler="ddpm", karras=True)
    assert "--schedule" not in str(refused.value)


def test_generate_command_writes_a_toy_image_with_a_label(tmp_path):
    from sdadapt.cli import main

    karras_one = samplers.KARRAS_SAMPLERS[0]
    out = tmp_path / "toy.png"
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--sampler", karras_one, "--karras",
                 "--steps", "3", "-o", str(out)]) == 0
    assert out.is_file()


def test_train_takes_every_sampler_name_and_alias():
    from sdadapt.cli import build_parser
    from sdadapt.jobs import TrainOptions

    parser = build_parser()  # (built once: parse_args leaves it as it was)
    for name in (*samplers.SAMPLERS, *samplers.SAMPLER_ALIASES):
        args = parser.parse_args(["train", "lora", "--images", "x", "--sample-sampler", name.upper()])
        assert args.sample_sampler == name  # (any case, as everywhere)
        TrainOptions(images="x", sample_sampler=name)
    with pytest.raises(ValueError, match="--sample-sampler: unknown sampler 'euler_cfg_pp'.*ddim"):
        TrainOptions(images="x", sample_sampler="euler_cfg_pp")


def test_a_kohya_config_reads_every_sampler_name_and_names_itself_for_an_unknown_one(tmp_path):
    """kohya's ``sample_sampler`` in a TOML is read as itself (kohya samples an unknown name with
    DDIM; sdadapt refuses it, naming the file, the key and the choices)."""
    from train_inputs import read_kohya_table

    for name in (*samplers.SAMPLERS, *samplers.SAMPLER_ALIASES):
        options, _, notes = read_kohya_table(tmp_path / "c.toml", {"sample_sampler": name, "sample_prompts": "p.txt"})
        assert options["sample_sampler"] == name and not any("sample_sampler" in note for note in notes)
    with pytest.raises(ValueError, match=r"c.toml: sample_sampler = 'Euler CFG\+\+': unknown sampler .*ddim, "):
        read_kohya_table(tmp_path / "c.toml", {"sample_sampler": "Euler CFG++"})


# prompt files --------------------------------------------------------------------------------------

def test_a_prompts_sampler_is_read_from_ss_and_sample_sampler(tmp_path):
    """kohya's line_to_prompt_dict reads ``--ss NAME`` (any case: ``--SS``) into ``sample_sampler``; its
    tables take the key."""
    name = samplers.SAMPLERS[-1]
    alias, aliased = next(iter(samplers.SAMPLER_ALIASES.items()))
    (tmp_path / "p.txt").write_text(f"a dog --ss {name} --s 7\na cat\na cow --SS {alias.upper()}\n", encoding="utf-8")
    assert parse_sample_prompts(tmp_path / "p.txt") == [
        SamplePrompt("a dog", sampler=name, steps=7), SamplePrompt("a cat"), SamplePrompt("a cow", sampler=aliased)]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "a dog", "sample_sampler": name}, f"a cat --ss {name}"]),
                                     encoding="utf-8")
    assert [p.sampler for p in parse_sample_prompts(tmp_path / "p.json")] == [name, name]
    (tmp_path / "p.toml").write_text(f'[prompt]\nsample_sampler = "{name}"\n[[prompt.subset]]\nprompt = "a dog"\n'
                                     '[[prompt.subset]]\nprompt = "a cat"\nsample_sampler = "ddim"\n', encoding="utf-8")
    assert [p.sampler for p in parse_sample_prompts(tmp_path / "p.toml")] == [name, "ddim"]
    (tmp_path / "bad.txt").write_text("a dog\na cat --ss euler_cfg_pp\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:2: --ss 'euler_cfg_pp' is not a sampler here; use one of ddim"):
        parse_sample_prompts(tmp_path / "bad.txt")


def test_a_kohya_config_with_its_sampler_trains_and_samples_each_prompt_with_its_own(three_shapes, tmp_path,
                                                                                     monkeypatch):
    """``sample_sampler = "euler_a"`` (the kohya_ss GUI's default) in a kohya TOML, one prompt with
    ``--ss``: two steps on the toy, both samples written, each made with its sampler."""
    from train_inputs import write_kohya_toml

    import sdadapt.sampling
    from sdadapt.cli import main

    kohya_name = "euler_a" if "euler_a" in samplers.SAMPLERS else samplers.SAMPLERS[-1]
    used, real = [], sdadapt.sampling.generate

    def spy(*args, **kw):
        used.append(kw["sampler"])
        return real(*args, **kw)

    monkeypatch.setattr(sdadapt.sampling, "generate", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --d 1 --s 3\na red circle --ss ddim --s 3\n", encoding="utf-8")
    (tmp_path / "out").mkdir()
    config = tmp_path / "kohya.toml"
    write_kohya_toml(config, {"pretrained_model_name_or_path": "toy", "train_data_dir": str(three_shapes),
                              "output_dir": str(tmp_path / "out"), "output_name": "lora", "resolution": "32,32",
                              "max_train_steps": 2, "sample_prompts": str(prompts), "sample_sampler": kohya_name,
                              "sample_every_n_steps": 2,
                              "network_dim": 2, "learning_rate": 1e-4})
    assert main(["train", "lora", "--config", str(config), "--no-prior"]) == 0
    assert used == [kohya_name, "ddim"]
    assert len(list((tmp_path / "out").glob("*samples/step000002-0*.png"))) == 2


def test_the_python_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", '"ddim_cfgpp"')  # (A1111's timestep samplers' one)
    assert scope["images"].shape == (1, 3, 32, 32) and scope["latents"].shape == (1, 12, 16, 16)


def test_aesthetic_sample_passes_karras_to_generate():
    """``aesthetic_sample(..., sampler=, karras=)`` is ``generate``'s sampler: with no aesthetic steps,
    the same images as plain ``generate`` with Karras σ (and not those without)."""
    import sdadapt
    from sdadapt.aesthetic import aesthetic_embedding
    from sdadapt.toy.system import build_toy

    toy = build_toy(seed=0).eval()
    embedding = aesthetic_embedding(torch.rand(2, 3, 32, 32) * 2 - 1, toy.clip.encode_image)
    name = samplers.KARRAS_SAMPLERS[0]
    got = sdadapt.aesthetic_sample(toy, ["a ring"], embedding, aesthetic_steps=0, seed=1, steps=3, sampler=name,
                                   karras=True)
    assert torch.equal(got, generate(toy, ["a ring"], seed=1, steps=3, sampler=name, karras=True))
    assert not torch.equal(got, generate(toy, ["a ring"], seed=1, steps=3, sampler=name))
