"""``generate --skip-early-cfg / --ngms / --ngms-all-steps`` end to end: the toy model (the System protocol path) and a
tiny diffusers SD model (``DiffusersSystem.sample``: its prompt plan, the hires pass), the images and the infotext.
A run where every call skips the negative prompt is the prompt alone — guidance 1, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdadapt.jobs import run_generate


def _png(path):
    image = Image.open(path)
    return np.asarray(image), image.text["parameters"]


def test_the_toy_skipping_every_call_is_guidance_1_and_the_infotext_says_so(tmp_path):
    run = {"prompt": "a red circle", "negative": "blue", "steps": 6, "seed": 3, "sampler": "Euler",
           "schedule": "automatic"}
    run_generate(out=tmp_path / "skip.png", skip_early_cfg=1.0, **run)
    run_generate(out=tmp_path / "alone.png", guidance=1.0, **run)
    run_generate(out=tmp_path / "plain.png", **run)
    skip, text = _png(tmp_path / "skip.png")
    assert np.array_equal(skip, _png(tmp_path / "alone.png")[0])
    assert not np.array_equal(skip, _png(tmp_path / "plain.png")[0])
    assert ", Skip Early CFG: 1, Version: " in text and "NGMS" not in text
    run_generate(out=tmp_path / "ngms.png", ngms=1e4, ngms_all_steps=True, **run)  # (every σ is below 1e4)
    ngms, text = _png(tmp_path / "ngms.png")
    assert np.array_equal(ngms, skip) and ", NGMS: 10000, NGMS all steps: True, Version: " in text


def test_the_toy_skips_a_prompt_plans_calls_too(tmp_path):
    """A scheduled prompt runs through the System protocol's prompt plan: every call skipped is the prompt alone."""
    run = {"prompt": "a [red:blue:0.5] circle", "negative": "green", "steps": 4, "seed": 5, "sampler": "Heun",
           "schedule": "automatic"}
    run_generate(out=tmp_path / "skip.png", skip_early_cfg=1.0, **run)
    run_generate(out=tmp_path / "alone.png", guidance=1.0, **run)
    run_generate(out=tmp_path / "half.png", skip_early_cfg=0.5, **run)
    skip, half = _png(tmp_path / "skip.png")[0], _png(tmp_path / "half.png")[0]
    assert np.array_equal(skip, _png(tmp_path / "alone.png")[0]) and not np.array_equal(skip, half)


def test_a_rule_that_never_skips_writes_nothing(tmp_path):
    """A1111 writes the setting once a call skipped: NGMS below the grid's last σ skips nothing."""
    run = {"prompt": "a red circle", "steps": 5, "seed": 1, "sampler": "Euler a", "schedule": "karras"}
    run_generate(out=tmp_path / "a.png", ngms=1e-4, **run)
    run_generate(out=tmp_path / "b.png", **run)
    (a, text), (b, _) = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    assert np.array_equal(a, b) and "NGMS" not in text


def test_the_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="--ngms compares each model call's σ.*give euler a --schedule"):
        run_generate(prompt="a", out=tmp_path / "a.png", sampler="euler", ngms=1.0)
    with pytest.raises(ValueError, match="--ngms-all-steps.*--ngms SIGMA"):
        run_generate(prompt="a", out=tmp_path / "a.png", ngms_all_steps=True)
    with pytest.raises(ValueError, match=r"--skip-early-cfg / --ngms:.*\[0, 1\]"):
        run_generate(prompt="a", out=tmp_path / "a.png", skip_early_cfg=1.5)
    with pytest.raises(ValueError, match="--hires-sampler ddpm: --ngms"):
        run_generate(prompt="a", out=tmp_path / "a.png", sampler="euler", schedule="automatic", ngms=1.0,
                     hires_scale=2.0, hires_sampler="ddpm")
    assert not list(tmp_path.iterdir())


# ---- a diffusers model: DiffusersSystem.sample, its prompt plan and the hires pass ---------------------------------
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_sdxl_refiner_handoff_reference import pair  # noqa: E402, F401  (the tiny SDXL base + refiner)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("uncond_skip"), prediction_type="epsilon")


@pytest.mark.parametrize("prompt", ["a cat", "a [cat:dog:2] AND a hat:0.5"])
def test_diffusers_runs_skip_in_both_passes(tiny_sd, tmp_path, prompt):
    """Every call skipped in the first pass and the hires pass is guidance 1 for one prompt (with ``AND`` the first
    sub-prompt's output stands in for the negative's at scale 1, A1111's rule: tests/test_uncond_skip.py, so not
    guidance 1); NGMS on odd calls only changes the image."""
    run = {"model": str(tiny_sd), "prompt": prompt, "negative": "blurry", "steps": 4, "seed": 2,
           "sampler": "DPM++ 2M", "schedule": "karras", "width": 32, "height": 32, "hires_scale": 1.5,
           "hires_denoising": 0.6}
    run_generate(out=tmp_path / "skip.png", skip_early_cfg=1.0, **run)
    run_generate(out=tmp_path / "alone.png", guidance=1.0, **run)
    run_generate(out=tmp_path / "odd.png", ngms=100.0, **run)
    run_generate(out=tmp_path / "plain.png", **run)
    skip, text = _png(tmp_path / "skip.png")
    (alone, _), (odd, odd_text), (plain, _) = (_png(tmp_path / f"{n}.png") for n in ("alone", "odd", "plain"))
    assert np.array_equal(skip, alone) == ("AND" not in prompt) and "Skip Early CFG: 1" in text
    assert not np.array_equal(skip, plain)
    assert not np.array_equal(odd, plain) and not np.array_equal(odd, alone) and "NGMS: 100" in odd_text


def test_diffusers_sample_takes_the_rule_and_refuses_ngms_off_a1111s_grids(tiny_sd):
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.uncond_skip import UncondSkip

    system = DiffusersSystem.from_folder(tiny_sd)
    run = {"seed": 1, "steps": 3, "sampler": "heun", "schedule": "automatic", "height": 32, "width": 32,
           "output": "latents", "negative": "x"}
    for plan in (None, plan_prompt("a [cat:dog:2]", "x", steps=3)):  # (plain guidance; a prompt plan's)
        seen = []
        skipped = system.sample(["a cat"], uncond_skip=UncondSkip(skip_early=0.5, seen=seen.append), plan=plan, **run)
        assert len(seen) == 4  # (heun, 3 steps: A1111 expects 6 calls, and calls 0..3 are <= 0.5 of them)
        assert not torch.equal(skipped, system.sample(["a cat"], plan=plan, **run))
    with pytest.raises(ValueError, match="NGMS.*A1111's grids only; euler runs diffusers' grid"):
        system.sample(["a cat"], sampler="euler", seed=1, steps=3, height=32, width=32, output="latents",
                      uncond_skip=UncondSkip(ngms=1.0))


def test_the_refiner_handoff_skips_on_the_runs_call_count(pair):
    """SDXL base + refiner: both sides' guidance skip by the run's call count (the handoff sets it), so a run whose
    every call skips is guidance 1 across the switch, and NGMS sees every call of both models."""
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.sampling import generate
    from sdadapt.uncond_skip import UncondSkip

    base, refiner = pair
    run = {"seed": 3, "steps": 6, "sampler": "euler", "schedule": "karras", "height": 16, "width": 16,
           "output": "latents", "negative": "x"}

    def sample(**options):
        handoff = RefinerHandoff(base, refiner, switch_at=0.5)
        return generate(base, ["a photo"], refiner=handoff, **run, **options), handoff

    seen = []
    skipped, handoff = sample(guidance=3.0, uncond_skip=UncondSkip(ngms=1e4, ngms_all_steps=True, seen=seen.append))
    assert handoff.calls["base"] > 0 and handoff.calls["refiner"] > 0 and len(seen) == 6
    odd = []  # (NGMS on the run's odd calls 1, 3, 5 — not each model's own count, which starts again at the switch)
    sample(guidance=3.0, uncond_skip=UncondSkip(ngms=1e4, seen=odd.append))
    assert handoff.calls == {"base": 3, "refiner": 3} and len(odd) == 3
    alone, _ = sample(guidance=1.0)
    assert torch.equal(skipped, alone)
    assert not torch.equal(skipped, sample(guidance=3.0)[0])


def test_the_refiner_pads_with_its_own_empty_prompt(pair, monkeypatch):
    """Pad conds across a refiner handoff: each model pads with its own states of "" (A1111's shared.sd_model's
    cond_stage_model_empty_prompt switches with the model), for a prompt plan and for plain guidance alike."""
    from sdadapt.cond_padding import CondPadding
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.jobs.generate_refiner import RefinerHandoff
    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.sampling import generate

    base, refiner = pair
    asked, real = [], DiffusersSystem.empty_prompt_states

    def spied(self, time_ids=None):
        asked.append(self)
        return real(self, time_ids)

    monkeypatch.setattr(DiffusersSystem, "empty_prompt_states", spied)
    run = {"seed": 3, "steps": 4, "sampler": "euler", "schedule": "karras", "height": 16, "width": 16,
           "output": "latents", "negative": "x", "guidance": 3.0}
    for plan in (plan_prompt("a photo BREAK at night", "x", steps=4), None):
        asked.clear()
        padded = []
        latents = generate(base, ["a photo BREAK at night" if plan else "a photo"], plan=plan,
                           refiner=RefinerHandoff(base, refiner, switch_at=0.5),
                           pad_conds=CondPadding(seen=padded.append), **run)
        assert torch.isfinite(latents).all()
        assert base in asked and refiner in asked and set(padded) == ({"Pad conds"} if plan else set())
