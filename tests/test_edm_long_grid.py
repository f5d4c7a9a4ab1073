"""``generate`` on an EDM model (Playground v2.5) takes the grids the library runs: a hires pass of A1111's fixed steps
whose grid ``int(steps / strength)`` is longer than 1000 steps, and ``--steps`` above 1000 — EDM σ are continuous
(sdadapt.samplers.edm.edm_sigmas builds any length; sampling._img2img_request(edm=True) checks no grid length), while
a discrete-time model (the same weights as a plain SDXL file) is still refused before its first pass.
The tiny Playground-like model: tests/test_playground_edm.py's ``playground_files``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from test_playground_edm import playground_files

    return playground_files(tmp_path_factory.mktemp("pg_long"))  # (Playground-like, plain SDXL)


HIRES = {"steps": 1, "width": 16, "height": 16, "sampler": "dpmsolver++", "seed": 4, "guidance": 3.0,
         "hires_scale": 2.0, "hires_steps": 2,
         "hires_denoising": 0.001}  # (A1111's fixed-step grid: int(2 / 0.001) = 2000 steps, its last 2 run)


def test_edm_hires_grid_past_1000_steps_runs_as_the_library_runs_it(files, tmp_path):
    """The job's PNG is sample_image's hires request (the library's path) to the 8-bit level: the same
    2000-step grid, where the job used to refuse it before the first pass."""
    import numpy as np
    from PIL import Image

    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.images import to_uint8
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    out = tmp_path / "pg.png"
    run_generate(model=str(files[0]), prompt="a cube", negative="", out=out, **HIRES)
    written = np.asarray(Image.open(out).convert("RGB")).astype(int)
    system = DiffusersSystem.from_single_file(files[0])
    options = {"seed": 4, "steps": 1, "guidance": 3.0, "sampler": "dpmsolver++", "negative": "", "height": 16,
               "width": 16}
    ours = sample_image(system, ["a cube"], options, hires=HiresRequest((32, 32), steps=2, denoising=0.001))[0]
    assert written.shape == (32, 32, 3)
    assert np.abs(written - to_uint8(ours).astype(int)).max() <= 1
    from test_infotext import a1111_parse

    from sdadapt.images import read_png_text

    fields = a1111_parse(read_png_text(out)["parameters"])  # (the EDM DPM-Solver on Karras' ρ grid, A1111's names)
    assert (fields["Sampler"], fields["Schedule type"], fields["Hires steps"]) == ("DPM++ 2M", "Karras", "2")


def test_edm_grid_is_named_by_a1111s_schedule_label():
    """Karras' ρ grid -> "Karras", the log-linear one -> "Exponential", whatever --schedule / --karras said; a
    discrete model's settings pass through."""
    from types import SimpleNamespace

    from sdadapt.jobs.infotext import InfotextRun, _edm_grid

    def label(system, **kw):
        run = InfotextRun(prompt="p", negative="", sampler="dpmsolver++", steps=2, guidance=3.0, seed=1, width=8,
                          height=8, version="v", **_edm_grid(system, **kw))
        return run._fixed["Schedule type"]

    assert label(SimpleNamespace(edm=SimpleNamespace(sigma_schedule="karras")), schedule=None, karras=False) == "Karras"
    exponential = SimpleNamespace(edm=SimpleNamespace(sigma_schedule="exponential"))
    assert label(exponential, schedule=None, karras=False) == "Exponential"
    assert label(SimpleNamespace(), schedule=None, karras=False) is None
    assert label(SimpleNamespace(edm=None), schedule=None, karras=True) == "Karras"


def test_discrete_model_still_refuses_the_grid_it_cannot_build(files, tmp_path):
    """The same options on the plain SDXL file (1000 integer timesteps, DPM++ 2M on diffusers' grid): refused by
    option before the first pass, as before."""
    from sdadapt.jobs import run_generate

    with pytest.raises(ValueError, match=r"--hires-denoising 0.001 need a grid of 2000 steps"):
        run_generate(model=str(files[1]), prompt="a cube", out=tmp_path / "plain.png", **HIRES)
    assert not (tmp_path / "plain.png").exists()


def test_step_count_check_lets_edm_through_and_refuses_discrete(files):
    """``_check_step_counts`` directly: 1200 steps and a 2000-step fixed grid pass for the EDM system (no
    refusal), and both are refused for a discrete one with the model's 1000 timesteps."""
    from sdadapt.jobs.generate import _check_step_counts

    class Discrete:
        alphas_cumprod = torch.ones(1000)
        edm = None

    class Edm(Discrete):
        edm = object()

    step = [{"sampler": "dpmsolver++", "schedule": None, "karras": False, "steps": 1200, "steps_option": "--steps",
             "sampler_option": "--sampler"}]
    fixed = [{"sampler": "dpmsolver++", "schedule": None, "karras": False, "steps": 2, "strength": 0.001,
              "strength_option": "--hires-denoising", "steps_option": "--hires-steps", "sampler_option": "--sampler"}]
    _check_step_counts(Edm(), step_grids=step, fixed_grids=fixed)
    with pytest.raises(ValueError, match="--steps 1200: at most 1000"):
        _check_step_counts(Discrete(), step_grids=step)
    with pytest.raises(ValueError, match="grid of 2000 steps"):
        _check_step_counts(Discrete(), step_grids=[], fixed_grids=fixed)
