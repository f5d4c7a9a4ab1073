"""EDM (Playground v2.5) options: min-SNR given vs default, kohya's timestep range on the σ grid, hypernetwork training
through the EDM branch, refusals before the load (a .ckpt too), the model card's guidance default.

- K kohya-ss/sd-scripts library/train_util.py ``get_noise_noisy_latents_and_timesteps``: ``timesteps =
  torch.randint(min_timestep, max_timestep, (b_size,))`` of the DDPM schedule (timestep 0: the least noise).
- D huggingface/diffusers examples/dreambooth/train_dreambooth_lora_sdxl.py (``--do_edm_style_training``): an index
  ``randint(0, T)`` into ``EDMEulerScheduler.timesteps`` (index 0: σ_max); 990-991: min-SNR refused with EDM.
  schedulers/scheduling_edm_euler.py (installed, run): the σ grid and ``timesteps`` (c_noise).
- P the Playground v2.5 model card (playgroundai/playground-v2.5-1024px-aesthetic, commit aba2c6d "Notes"):
  ``guidance_scale=3.0`` for its default EDMDPMSolverMultistepScheduler, ``5.0`` for EDMEulerScheduler.
Tiny Playground-like single file and system: tests/test_playground_edm.py; diffusers' EDM training step:
tests/test_edm_training.py ``_diffusers_step``.
"""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import test_edm_training
import test_playground_edm
from test_playground_edm import CONFIG

from sdadapt.jobs.train import (
    DEFAULT_MIN_SNR_GAMMA,
    TrainOptions,
    _edm_options,
    run_train,
)
from sdadapt.samplers.edm import EDMSchedule
from sdadapt.training.edm import (
    edm_default_guidance,
    edm_index_range,
    edm_training_sigmas,
)
from sdadapt.training.step import StepConfig, TrainState, prepare_batch, timestep_bounds

T = 1000
files, system = test_playground_edm.files, test_playground_edm.system


@pytest.fixture
def no_load(monkeypatch):
    """``load_system`` that fails the test: what is refused must be refused before the (slow) load."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("sdadapt.jobs.train.load_system", load)
    monkeypatch.setattr("sdadapt.jobs.generate.load_system", load)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from caption_images import two_captioned_images

    return two_captioned_images(tmp_path_factory.mktemp("edm-options") / "images")


# ------------------------------------------------------------------------------------------ (1) min-SNR γ
def test_min_snr_gamma_given_is_refused_and_only_the_default_is_switched_off(files, images, tmp_path, no_load,
                                                                               capsys):
    notes: list[str] = []
    kept = _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images)), notes)
    assert kept.min_snr_gamma == 0.0 and "min-SNR weighting" in notes[0]
    for gamma in (DEFAULT_MIN_SNR_GAMMA, 3.0):  # (the default's value given is a value given: refused as D does)
        with pytest.raises(ValueError, match=f"EDM-formulation.*min_snr_gamma={gamma}.*--min-snr-gamma"):
            _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images), min_snr_gamma=gamma), [])
    assert _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images), min_snr_gamma=0.0),
                        []).min_snr_gamma == 0.0
    from sdadapt.cli import main

    # the command line's flag, and a config file's key, are given too (refused before the load: no_load)
    assert main(["train", "lora", "--images", str(images), "--model", str(files[0]), "--steps", "1", "--min-snr-gamma",
                 "5", "-q", "-o", str(tmp_path / "x.safetensors")]) != 0
    assert "min_snr_gamma=5" in (err := capsys.readouterr().err) and "(--min-snr-gamma)" in err
    config = tmp_path / "run.toml"
    config.write_text(f"model = '{files[0]}'\nimages = '{images}'\nmin_snr_gamma = 5\n")
    assert main(["train", "lora", "--config", str(config), "--steps", "1", "-q", "-o", str(tmp_path / "y.safetensors")]) != 0
    assert "min_snr_gamma=5" in (err := capsys.readouterr().err) and "(--min-snr-gamma)" in err
    assert main(["train", "lora", "--images", str(images), "--model", str(files[0]), "--steps", "1", "--min-snr-gamma",
                 "0", "--network-dim", "1", "-q", "-o", str(tmp_path / "z.safetensors")]) != 0  # (0: off, trains: loads)
    assert "the model was loaded" in capsys.readouterr().err


def test_min_snr_gamma_not_given_is_five_on_a_ddpm_model(images, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "toy.safetensors"
    run_train("lora", images=str(images), model="toy", out=str(out), steps=1, resolution=(32, 32),
              save_state_on_train_end=True)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_min_snr_gamma"] == "5.0"
    step = json.loads((tmp_path / "toy-state" / "state.json").read_text())["config"]
    assert step["min_snr_gamma"] == DEFAULT_MIN_SNR_GAMMA


# ------------------------------------------------------------------------------- (2) kohya's timestep range
def _kohya_sigmas(low: int, high: int, config: dict) -> torch.Tensor:
    """The σ a kohya range [low, high) means on D's grid: kohya's timestep t (K: randint(min, max); 0 the least
    noise) is the grid point with as much noise from the clean end, D's index T − 1 − t (its timesteps, c_noise,
    grow with σ as DDPM's do with t); D never draws index T (σ_min)."""
    scheduler = diffusers.EDMEulerScheduler.from_config(config)
    grid = scheduler.sigmas[:T]  # (D's draw: randint(0, T) into this)
    return torch.stack([grid[T - 1 - t] for t in range(low, high)])


@pytest.mark.parametrize("bounds", [(0, 1000), (0, 500), (300, 1000), (200, 201), (999, 1000), (10, 990)])
def test_timestep_range_draws_exactly_kohyas_timesteps_on_the_sigma_grid(bounds):
    schedule = EDMSchedule.from_config(CONFIG)
    config = StepConfig(edm=schedule, timestep_range=bounds)
    prepared = prepare_batch({"latents": torch.zeros(6000, 1, 1, 1)}, state=TrainState(seed=3), config=config,
                             alphas_cumprod=torch.ones(T))
    drawn = prepared["t"].unique()  # (c_noise = ¼·ln σ of the drawn indices)
    want = (0.25 * torch.log(_kohya_sigmas(*bounds, CONFIG))).unique()
    assert set(drawn.tolist()) <= set(want.tolist()) and len(drawn) >= 0.99 * len(want), (len(drawn), len(want))
    assert edm_index_range(bounds, T) == timestep_bounds(config, T) == (T - bounds[1], T - bounds[0])


def test_full_timestep_range_is_diffusers_own_draw_and_more_timesteps_mean_more_noise():
    schedule = EDMSchedule.from_config(CONFIG)
    x0 = torch.zeros(512, 1, 1, 1)
    plain = prepare_batch({"latents": x0}, state=TrainState(seed=9), config=StepConfig(edm=schedule),
                          alphas_cumprod=torch.ones(T))
    full = prepare_batch({"latents": x0}, state=TrainState(seed=9), config=StepConfig(edm=schedule, timestep_range=(0, T)),
                         alphas_cumprod=torch.ones(T))
    assert torch.equal(plain["t"], full["t"])  # (--min-timestep 0 --max-timestep 1000: the same draws as without)
    low = prepare_batch({"latents": x0}, state=TrainState(seed=9), config=StepConfig(edm=schedule, timestep_range=(0, 100)),
                        alphas_cumprod=torch.ones(T))
    high = prepare_batch({"latents": x0}, state=TrainState(seed=9),
                         config=StepConfig(edm=schedule, timestep_range=(900, 1000)), alphas_cumprod=torch.ones(T))
    sigmas = edm_training_sigmas(schedule, T)
    assert low["t"].max() <= 0.25 * torch.log(sigmas[900]) and high["t"].min() >= 0.25 * torch.log(sigmas[99])
    with pytest.raises(ValueError, match="0 <= min < max <= 50"):
        edm_index_range((0, 60), 50)


def test_timestep_range_trains_an_edm_model_and_validates_on_its_indices(files, images):
    options = _edm_options("lora", TrainOptions(model=str(files[0]), images=str(images), min_timestep=200,
                                                max_timestep=600), [])
    assert options.timestep_range() == (200, 600)
    from sdadapt.training.validation import validation_timesteps

    config = StepConfig(edm=EDMSchedule.from_config(CONFIG), timestep_range=options.timestep_range())
    assert validation_timesteps(*timestep_bounds(config, T)) == [480, 560, 640, 720]  # (indices [400, 800))


# ------------------------------------------------------------------------- (3) hypernetwork through the EDM step
def test_hypernetwork_trains_through_the_edm_branch_as_diffusers_step(system, monkeypatch):
    """`fit` with a hypernetwork on the Playground system: its first loss and gradients are D's EDM training step
    (test_edm_training._diffusers_step) on the same x0, ε, σ index and UNet conditioning, hypernetwork in the UNet."""
    import sdadapt.training.edm as edm_module
    from sdadapt.methods.fit import FitConfig, fit
    from sdadapt.methods.hypernetwork import prepare_hypernetwork
    from sdadapt.training import validation

    seen: dict = {}
    real_inputs = edm_module.edm_inputs

    def spy_inputs(latents, noise, index, **kwargs):
        seen.setdefault("x0", (latents.detach().clone(), noise.detach().clone(), index.detach().clone()))
        return real_inputs(latents, noise, index, **kwargs)

    def spy_unet(module, args, kwargs):
        seen.setdefault("cond", {"context": kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None),
                                 **{k: v for k, v in (kwargs.get("added_cond_kwargs") or {}).items()}})

    monkeypatch.setattr(edm_module, "edm_inputs", spy_inputs)
    adaptation = prepare_hypernetwork(system, layer_structure=(1.0, 2.0, 1.0), activation="relu", layer_norm=False)
    grads: list[torch.Tensor | None] = []
    handles = [system.unet.register_forward_pre_hook(spy_unet, with_kwargs=True)]
    try:
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in adaptation.params:  # (A1111's fresh layers start near the identity: move them off it)
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        params = list(adaptation.params)
        before = [p.detach().clone() for p in params]
        grads = [None] * len(params)
        handles += [p.register_hook(lambda grad, i=i: grads.__setitem__(i, grad.detach().clone()))
                    for i, p in enumerate(params)]
        images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        bounds: list[tuple[int, int]] = []
        real_bounds = validation.validation_timesteps
        monkeypatch.setattr(validation, "validation_timesteps", lambda *a, **k: bounds.append(a) or real_bounds(*a, **k))
        losses = fit(system, adaptation, images, ["a red cube"], validation=(images, ["a red cube"]), config=FitConfig(
            steps=1, batch_size=1, learning_rate=1e-3, warmup_steps=0, schedule="constant", validate_every_n_steps=1,
            step=StepConfig(max_grad_norm=None, timestep_range=(200, 600))))
        # kohya's range [200, 600) on the σ grid: indices [400, 800), drawn and validated on (edm_index_range)
        assert bounds == [(400, 800)] and 400 <= int(seen["x0"][2]) < 800, (bounds, seen["x0"][2])
        for h in handles:
            h.remove()
        handles = []
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        latents, noise, index = seen["x0"]
        cond = {"context": seen["cond"]["context"], "text_embeds": seen["cond"]["text_embeds"],
                "time_ids": seen["cond"]["time_ids"]}
        want_loss, want = test_edm_training._diffusers_step(system, params, latents, noise, index, cond,
                                                            system.scheduler_config, diffusers.EDMEulerScheduler)
        assert abs(losses[0] - float(want_loss)) <= 1e-5 * float(want_loss), (losses[0], float(want_loss))
        assert max(float(t.abs().max()) for t in want) > 1e-6
        for ours, theirs in zip(grads, want, strict=True):
            assert ours is not None and torch.allclose(ours, theirs, atol=1e-6, rtol=1e-4), (ours - theirs).abs().max()
    finally:
        for h in handles:
            h.remove()
        adaptation.remove()


def test_custom_diffusion_and_dreamartist_are_refused_on_playground_by_name(system, files, images, tmp_path, no_load):
    """DreamArtist (its CFG schedule reads DDPM timesteps) before the load; Custom Diffusion by its SDXL refusal (it
    would train through the EDM branch: no model or loss of its own, as the hypernetwork above)."""
    from sdadapt.methods.custom_diffusion import prepare_custom_diffusion

    with pytest.raises(ValueError, match="not trained with dreamartist"):
        run_train("dreamartist", images=str(images), model=str(files[0]), out=str(tmp_path / "d.pt"), steps=1,
                  method_options={"token": "<x>"})
    with pytest.raises(ValueError, match="custom-diffusion supports one-text-encoder models"):
        prepare_custom_diffusion(system, token="<x>")


# ----------------------------------------------------------------------------- (4) told before the load
@pytest.fixture(scope="module")
def ckpt(files, tmp_path_factory):
    """The Playground file as a .ckpt (torch.save of {"state_dict": ...}, as the LDM checkpoints are)."""
    from safetensors.torch import load_file

    path = tmp_path_factory.mktemp("pg-ckpt") / "pg.ckpt"
    torch.save({"state_dict": load_file(files[0])}, path)
    return path


def test_a_playground_ckpt_is_told_from_its_pickle_without_loading(files, ckpt, tmp_path, images, no_load):
    from sdadapt.formats.edm import PLAYGROUND_SCHEDULER
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.model_size import model_default_sampler, model_edm_scheduler

    assert model_edm_scheduler(ckpt) == PLAYGROUND_SCHEDULER and model_default_sampler(ckpt) == "dpmsolver++"
    plain = tmp_path / "plain.ckpt"
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(files[1])}, plain)
    assert model_edm_scheduler(plain) is None and model_default_sampler(plain) == "ddim"
    with pytest.raises(ValueError, match="--sampler ddim on --model .*pg.ckpt"):
        run_generate(model=str(ckpt), prompt="a cube", sampler="ddim", out=str(tmp_path / "a.png"))
    with pytest.raises(ValueError, match="EDM-formulation.*--min-snr-gamma"):
        run_train("lora", images=str(images), model=str(ckpt), out=str(tmp_path / "x.safetensors"), steps=1,
                  min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="not trained with dreamartist"):
        run_train("dreamartist", images=str(images), model=str(ckpt), out=str(tmp_path / "d.pt"), steps=1,
                  method_options={"token": "<x>"})
    with pytest.raises(ValueError, match="sample images would use ddim"):
        prompts = tmp_path / "p.txt"
        prompts.write_text("a cube --ss ddim\n")
        run_train("lora", images=str(images), model=str(ckpt), out=str(tmp_path / "y.safetensors"), steps=1,
                  sample_prompts=str(prompts), sample_every_n_steps=1)


def test_an_unsafe_pickle_is_refused_before_the_load(tmp_path):
    import pickle

    from sdadapt.errors import UnsafeFileError
    from sdadapt.jobs.model_size import model_edm_scheduler

    class Attack:
        def __reduce__(self):
            return (eval, ("1",))

    path = tmp_path / "bad.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": Attack()}, protocol=2))
    with pytest.raises(UnsafeFileError, match="eval"):
        model_edm_scheduler(path)


# ------------------------------------------------------------------------------------ (5) guidance default
def test_guidance_default_is_the_model_cards_per_scheduler():
    assert edm_default_guidance("dpmsolver++") == 3.0 and edm_default_guidance("dpmsolver++_sde") == 3.0  # P
    assert edm_default_guidance("euler") == 5.0 and edm_default_guidance("Euler") == 5.0  # P (A1111 spelling read)
    with pytest.raises(ValueError, match="no EDM form"):
        edm_default_guidance("ddim")


def test_generate_without_guidance_samples_at_the_model_cards_scale_and_says_so(files, tmp_path):
    from PIL import Image

    from sdadapt.jobs.generate import run_generate

    common = {"model": str(files[0]), "prompt": "a cube", "seed": 2, "steps": 3, "width": 32, "height": 32}
    lines: list[str] = []
    run_generate(**common, out=str(tmp_path / "default.png"), log=lines.append)
    run_generate(**common, guidance=3.0, out=str(tmp_path / "three.png"))
    run_generate(**common, guidance=7.5, out=str(tmp_path / "sd.png"))
    pixels = {name: torch.tensor(list(Image.open(tmp_path / f"{name}.png").convert("RGB").getdata()))
              for name in ("default", "three", "sd")}
    assert torch.equal(pixels["default"], pixels["three"]) and not torch.equal(pixels["default"], pixels["sd"])
    assert any("guidance 3" in line and "model card" in line for line in lines), lines
    info = Image.open(tmp_path / "default.png").text["parameters"]
    assert "CFG scale: 3," in info, info
    lines = []
    run_generate(**common, sampler="euler", out=str(tmp_path / "euler.png"), log=lines.append)
    assert "CFG scale: 5," in Image.open(tmp_path / "euler.png").text["parameters"]


def test_train_samples_without_a_scale_use_the_model_cards(files, images, tmp_path, monkeypatch):
    """kohya's prompt lines without --l sample an EDM model at its card's scale (per sampler); --l wins. (The scale
    the EDM sampler is handed: the job passes no scale, the library's default_guidance answers.)"""
    from sdadapt.samplers import edm

    used: list[tuple[str, float | None]] = []
    real = edm.edm_sample_latents

    def spy(model, x_T, cond, **kwargs):
        used.append((kwargs.get("sampler"), kwargs.get("guidance_scale")))
        return real(model, x_T, cond, **kwargs)

    monkeypatch.setattr(edm, "edm_sample_latents", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cube --w 16 --h 16 --s 1\na cube --w 16 --h 16 --s 1 --ss euler\n"
                       "a cube --w 16 --h 16 --s 1 --l 7\n")
    run_train("lora", images=str(images), model=str(files[0]), out=str(tmp_path / "pg.safetensors"), steps=1,
              resolution=(64, 64), method_options={"rank": 1}, sample_prompts=str(prompts), sample_every_n_steps=1)
    assert used == [("dpmsolver++", 3.0), ("euler", 5.0), ("dpmsolver++", 7.0)], used
