"""EDM defaults answered by the library, not by the jobs: an EDM model's (Playground v2.5) guidance default and its own
σ grid asked for by name, for a Python user of ``sdadapt.sampling.generate`` / ``DiffusersSystem.sample`` /
``sdadapt.inversion.invert_image`` — the numbers the CLI jobs already took (tests/test_edm_options.py,
tests/test_w2_walkthrough.py), now from one place each (``sampling.default_guidance``, ``samplers.edm.edm_own_grid``).

- P the Playground v2.5 model card (playgroundai/playground-v2.5-1024px-aesthetic, commit aba2c6d "Notes"):
  ``guidance_scale=3.0`` for its default EDMDPMSolverMultistepScheduler, ``5.0`` for EDMEulerScheduler.
- D huggingface/diffusers schedulers/scheduling_edm_dpmsolver_multistep.py: the class docstring calls it "an EDM
  formulation of the DPM++ 2M Karras scheduler"; its ``sigma_schedule`` config ("karras" / "exponential") is the grid.
Tiny Playground-like system: tests/test_playground_edm.py.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import test_playground_edm

from sdadapt.samplers.edm import check_edm_request, edm_own_grid
from sdadapt.samplers.schedules import ScheduleOptions
from sdadapt.sampling import SD_GUIDANCE, default_guidance, generate

files, system = test_playground_edm.files, test_playground_edm.system
KW = {"seed": 3, "steps": 3, "height": 16, "width": 16, "output": "latents"}


# ------------------------------------------------------------------------------------------- guidance default
def test_default_guidance_answers_per_system_and_sampler(system):
    """EDM: the card's (P) per scheduler, the model's own without a sampler; the toy its sample's 2; a non-EDM
    DiffusersSystem (whose sample now defaults to None) and a bare System protocol system SD's 7.5."""
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.toy.system import ToySystem

    assert default_guidance(system, "dpmsolver++") == 3.0 and default_guidance(system, "dpmsolver++_sde") == 3.0
    assert default_guidance(system, "euler") == 5.0 and default_guidance(system, "Euler") == 5.0
    assert default_guidance(system) == 3.0  # (its own scheduler: dpmsolver++)
    with pytest.raises(ValueError, match="'ddim' has no EDM form"):
        default_guidance(system, "ddim")
    exponential_euler = copy.copy(system)
    exponential_euler.scheduler_config = {**system.scheduler_config, "_class_name": "EDMEulerScheduler"}
    assert default_guidance(exponential_euler) == 5.0  # (a folder whose own scheduler is Euler)
    plain = object.__new__(DiffusersSystem)
    plain.edm = None
    assert inspect.signature(DiffusersSystem.sample).parameters["guidance"].default is None
    assert default_guidance(plain, "euler") == SD_GUIDANCE == 7.5
    assert inspect.signature(ToySystem.sample).parameters["guidance"].default == 2.0
    assert default_guidance(object.__new__(ToySystem), "ddim") == 2.0

    class Protocol:
        def sample(self, prompts, *, guidance: float = 7.5): ...

    assert default_guidance(Protocol()) == 7.5


@pytest.mark.parametrize("sampler, card", [("dpmsolver++", 3.0), ("euler", 5.0)])
def test_generate_without_guidance_is_the_model_cards_scale_bit_for_bit(system, sampler, card):
    """``generate(guidance=None)`` and ``DiffusersSystem.sample()`` without a scale = the card's scale given (P),
    latents bit for bit, and not the SD 7.5 the library used before."""
    default = generate(system, ["a red cube"], sampler=sampler, **KW)
    assert torch.equal(default, generate(system, ["a red cube"], sampler=sampler, guidance=card, **KW))
    assert torch.equal(default, system.sample(["a red cube"], sampler=sampler, **KW))
    assert not torch.equal(default, generate(system, ["a red cube"], sampler=sampler, guidance=7.5, **KW))


def test_invert_image_without_guidance_takes_the_cards_euler_scale(system):
    """``invert_image`` on an EDM model without a scale: the card's 5 for the Euler scheduler it runs (as
    ``invert`` the job), the same null embeddings as ``guidance=5`` given; ``invert_latents`` without ``edm``: 7.5."""
    from sdadapt.inversion.invert import invert_image, invert_latents

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    size = system.image_size
    try:
        system.image_size = 16
        runs = {g: invert_image(system, image, "a red cube", num_steps=2, inner_steps=1, guidance=g)
                for g in (None, 5.0, 7.5)}
    finally:
        system.image_size = size
    assert runs[None].guidance == 5.0
    assert torch.equal(runs[None].null_embeddings, runs[5.0].null_embeddings)
    assert not torch.equal(runs[None].null_embeddings, runs[7.5].null_embeddings)

    def model(x, t, cond):  # (a stand-in: the inversion's guidance default, no EDM)
        return 0.1 * x + cond.mean() * 0

    cond = torch.zeros(1, 2, 3)
    ddim = invert_latents(model, torch.zeros(1, 4, 2, 2), cond, cond, alphas_cumprod=torch.linspace(0.99, 0.01, 10),
                          num_steps=2, method="ddim")
    assert ddim.guidance == 7.5


# ------------------------------------------------------------------------------------------- the model's own grid
def test_the_own_grid_predicate():
    """Karras' grid asked by ``karras``, by name, by A1111's label or "Automatic" (A1111 resolves it to Karras for DPM++
    2M), with A1111's settings at defaults: the own grid of a Karras model; nothing asked, another grid, a moved
    setting, an unknown schedule: not."""
    for asked in ({"karras": True}, {"schedule": "karras"}, {"schedule": "Karras"}, {"schedule": "automatic"},
                  {"karras": True, "schedule": "karras"}, {"schedule": "karras", "schedule_options": ScheduleOptions()}):
        assert edm_own_grid("karras", sampler="dpmsolver++", **asked), asked
    assert edm_own_grid("karras", sampler="euler", karras=True)
    assert not edm_own_grid("karras", sampler="euler", schedule="automatic")  # (A1111's Automatic for Euler: uniform)
    assert edm_own_grid("karras", sampler="dpm++_2m", schedule="karras")  # (an alias read)
    for asked in ({}, {"schedule": "exponential"}, {"schedule": "uniform"}, {"schedule": "nonsense"},
                  {"karras": True, "schedule": "exponential"},
                  {"schedule": "karras", "schedule_options": ScheduleOptions(rho=5.0)}):
        assert not edm_own_grid("karras", sampler="dpmsolver++", **asked), asked
    assert edm_own_grid("exponential", sampler="dpmsolver++", schedule="Exponential")
    assert not edm_own_grid("exponential", sampler="dpmsolver++", karras=True)


def test_check_edm_request_takes_the_models_own_grid_only():
    from sdadapt.samplers.edm import EDMSchedule

    karras, exponential = EDMSchedule(), EDMSchedule(sigma_schedule="exponential")
    check_edm_request("dpmsolver++", karras=True, edm=karras)
    check_edm_request("euler", schedule="karras", edm=karras)
    check_edm_request("dpmsolver++_sde", schedule="exponential", edm=exponential)
    for name, option, edm, match in (
            ("dpmsolver++", {"karras": True}, None, "leave out karras"),  # (no schedule given: as before)
            ("dpmsolver++", {"schedule": "karras"}, None, "leave out a schedule"),
            ("dpmsolver++", {"schedule": "exponential"}, karras, "leave out a schedule \\(A1111's σ grids"),
            ("euler", {"karras": True}, exponential, "leave out karras \\(the EDM σ grid is Karras' ρ grid"),
            ("dpmsolver++", {"schedule": "karras", "schedule_options": ScheduleOptions(rho=5.0)}, karras,
             "leave out a schedule .*; schedule options$"),
            ("ddim", {"karras": True}, karras, "sampler 'ddim' has no EDM form")):
        with pytest.raises(ValueError, match=match):
            check_edm_request(name, edm=edm, **option)


def test_own_grid_from_python_is_the_image_without_it_and_other_grids_are_refused(system):
    """``generate`` / ``DiffusersSystem.sample`` on Playground (its own grid Karras'): ``karras=True``,
    ``schedule="karras"`` / "Karras" / "automatic" (DPM++ 2M), default schedule options: the latents without them,
    bit for bit; ``schedule="exponential"`` still refused with its message. A model whose own grid is the exponential
    one: the other way round."""
    plain = generate(system, ["a red cube"], sampler="dpmsolver++", **KW)
    for asked in ({"karras": True}, {"schedule": "karras"}, {"schedule": "Karras"}, {"schedule": "automatic"},
                  {"schedule": "karras", "schedule_options": ScheduleOptions()}):
        assert torch.equal(generate(system, ["a red cube"], sampler="dpmsolver++", **asked, **KW), plain), asked
    assert torch.equal(system.sample(["a red cube"], sampler="dpmsolver++", karras=True, **KW), plain)
    euler = system.sample(["a red cube"], sampler="euler", **KW)
    assert torch.equal(generate(system, ["a red cube"], sampler="euler", karras=True, **KW), euler)
    with pytest.raises(ValueError, match="leave out a schedule \\(A1111's σ grids are for the discrete-time SD"):
        generate(system, ["a red cube"], sampler="dpmsolver++", schedule="exponential", **KW)
    with pytest.raises(ValueError, match="leave out a schedule"):  # (A1111's Automatic for Euler is Uniform)
        system.sample(["a red cube"], sampler="euler", schedule="automatic", **KW)
    with pytest.raises(ValueError, match="leave out a schedule .*; schedule options$"):
        generate(system, ["a red cube"], sampler="dpmsolver++", schedule="karras",
                 schedule_options=ScheduleOptions(rho=5.0), **KW)

    other = copy.copy(system)  # (the same weights, a log-linear own grid: a folder's sigma_schedule "exponential")
    other.edm = dataclasses.replace(system.edm, sigma_schedule="exponential")
    own = generate(other, ["a red cube"], sampler="dpmsolver++", **KW)
    assert not torch.equal(own, plain)  # (the grid is another: the check below can tell them apart)
    assert torch.equal(generate(other, ["a red cube"], sampler="dpmsolver++", schedule="exponential", **KW), own)
    with pytest.raises(ValueError, match="leave out karras"):
        generate(other, ["a red cube"], sampler="dpmsolver++", karras=True, **KW)


def test_the_jobs_header_check_reads_the_same_rule(files, monkeypatch):
    """``generate``'s check before the load (``_is_edm_own_grid``) asks the library's predicate with the header's
    ``sigma_schedule``: the same answers, and a changed predicate changes the job's."""
    from sdadapt.jobs import generate as job
    from sdadapt.samplers import edm

    pg, plain = files
    assert job._is_edm_own_grid(pg, sampler="dpmsolver++", schedule="karras", karras=False, schedule_options=None)
    assert job._is_edm_own_grid(pg, sampler="euler", schedule=None, karras=True, schedule_options=None)
    assert not job._is_edm_own_grid(pg, sampler="dpmsolver++", schedule="exponential", karras=False,
                                    schedule_options=None)
    assert not job._is_edm_own_grid(pg, sampler="dpmsolver++", schedule="karras", karras=False,
                                    schedule_options=ScheduleOptions(rho=5.0))
    assert not job._is_edm_own_grid(plain, sampler="dpmsolver++", schedule="karras", karras=False,
                                    schedule_options=None)
    asked = []
    monkeypatch.setattr(edm, "edm_own_grid", lambda *a, **k: asked.append((a, k)) or False)
    assert not job._is_edm_own_grid(pg, sampler="dpmsolver++", schedule="karras", karras=False, schedule_options=None)
    assert asked == [(("karras",), {"sampler": "dpmsolver++", "karras": False, "schedule": "karras",
                                    "schedule_options": None})]
