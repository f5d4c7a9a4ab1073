"""``--min-timestep`` / ``--max-timestep`` and the timestep draw's tables against the model's own T (its scheduler's
``num_train_timesteps``), not 1000.

kohya's train step: ``max_timestep = noise_scheduler.config.num_train_timesteps`` when not given
(sd-scripts@48d368fa library/train_util.py:6089-6090); diffusers' ``generate_timestep_weights(args, num_timesteps)``
with the scheduler's ``num_train_timesteps`` and its ``timestep_bias_end > num_timesteps`` refusal; OneTrainer's
``_get_timestep_discrete(model.noise_scheduler.config['num_train_timesteps'], ...)``
(modules/modelSetup/BaseStableDiffusionSetup.py:170-176). A tiny SD pipeline whose scheduler has T = 500 shows it.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_train import _images, _tiny_pipeline
from test_timestep_distribution import _args, _bias, _diffusers_weights

from sdadapt.cli import main
from sdadapt.jobs import TrainOptions
from sdadapt.timestep_tables import TimestepSampling
from sdadapt.training import timestep_distribution as TD
from sdadapt.training.step import StepConfig, timestep_bounds

pytest.importorskip("diffusers")

T = 500


@pytest.fixture(scope="module")
def pipe500(tmp_path_factory):
    root = _tiny_pipeline(tmp_path_factory.mktemp("t500") / "pipe", prediction_type="epsilon")
    config = root / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": T}))
    return root


def _train(pipe, tmp_path, capsys, *extra):
    images = _images(tmp_path / "imgs", n=2)
    out = tmp_path / "o.safetensors"
    code = main(["train", "lora", "--model", str(pipe), "--images", str(images), "--steps", "1", "--resolution", "32",
                 "--seed", "1", *extra, "-o", str(out)])
    err = capsys.readouterr().err
    return code, err, out


def test_a_range_past_the_models_timesteps_is_refused_naming_the_option_and_T(pipe500, tmp_path, capsys):
    code, err, out = _train(pipe500, tmp_path, capsys, "--max-timestep", "800")
    last = err.strip().splitlines()[-1]
    assert code != 0 and not out.exists()
    assert "--max-timestep 800" in last and f"has {T} training timesteps" in last and str(pipe500) in last, last
    assert "caching latents" not in err  # (refused after the load, before any latent is made)


def test_a_bias_range_past_T_is_refused_before_caching(pipe500, tmp_path, capsys):
    code, err, _ = _train(pipe500, tmp_path, capsys, "--timestep-bias-strategy", "range", "--timestep-bias-begin", "100")
    last = err.strip().splitlines()[-1]  # (diffusers' default end 1000 > T: its own refusal)
    assert code != 0 and "--timestep-bias-end" in last and f"{T} training timesteps" in last, last
    assert last.startswith(f"error: --model {pipe500}: "), last  # (the load's check: before the latents, not the step's)


def test_min_timestep_alone_trains_up_to_the_models_T(pipe500, tmp_path, capsys):
    code, err, out = _train(pipe500, tmp_path, capsys, "--min-timestep", "300")
    assert code == 0 and out.exists(), err
    assert TrainOptions(images=".", min_timestep=300).timestep_range(T) == (300, T)
    assert TrainOptions(images=".", max_timestep=200).timestep_range(T) == (0, 200)
    assert TrainOptions(images=".").timestep_range(T) is None


def test_a_model_of_more_than_1000_timesteps_takes_a_range_past_1000():
    from sdadapt.jobs.train import _check_timesteps

    options = TrainOptions(images=".", min_timestep=1200, max_timestep=1800)  # (refused before: "<= 1000")
    _check_timesteps(options, 2000)
    with pytest.raises(ValueError, match=r"--max-timestep 1800: the model has 1000 training timesteps"):
        _check_timesteps(options, 1000)
    with pytest.raises(ValueError, match="need 0 <= min < max"):
        TrainOptions(images=".", min_timestep=601, max_timestep=600)


def test_min_equal_to_max_trains_at_that_one_timestep_as_kohya():
    """kohya's ``get_timesteps(min, max)`` with ``min == max`` gives ``max`` for every sample (its validation passes
    use it): the range is ``[max, max + 1)``; the step draws only that timestep, the validation's fixed ones too."""
    from sdadapt.jobs.train import _check_timesteps
    from sdadapt.training.step import TrainState, prepare_batch
    from sdadapt.training.validation import validation_timesteps

    options = TrainOptions(images=".", min_timestep=600, max_timestep=600)
    assert options.timestep_range(1000) == (600, 601)
    config = StepConfig(timestep_range=options.timestep_range(1000))
    ac = torch.linspace(0.999, 0.01, 1000)
    for step in range(3):
        batch = prepare_batch({"latents": torch.randn(4, 4, 2, 2), "cond": None}, state=TrainState(seed=step),
                              config=config, alphas_cumprod=ac)
        assert batch["t"].tolist() == [600] * 4
    assert timestep_bounds(config, 1000) == (600, 601)
    assert validation_timesteps(*timestep_bounds(config, 1000)) == [600] * 4
    _check_timesteps(options, 1000)
    with pytest.raises(ValueError, match="--max-timestep 601: the model has 500 training timesteps"):
        _check_timesteps(options, T)  # (600 is not a timestep of a 500-step model)


@pytest.mark.parametrize("strategy, portion", [("later", 0.25), ("earlier", 0.5), ("none", 0.25)])
def test_the_bias_table_is_sized_to_T(strategy, portion):
    sampling = _bias(strategy, 3.0, portion=portion)
    ours = TD.timestep_weights(sampling, T)
    assert ours.shape == (T,)
    assert torch.equal(ours, _diffusers_weights(_args(strategy, 3.0, portion=portion), T))
    t = TD.draw_timesteps(sampling, 4096, T, generator=torch.Generator().manual_seed(0))
    assert int(t.max()) < T and int(t.min()) >= 0


@pytest.mark.parametrize("distribution", ["sigmoid", "cos_map", "logit_normal", "uniform"])
def test_onetrainer_draws_stay_inside_T(distribution):
    sampling = TimestepSampling(distribution=distribution, shift=3.0 if distribution == "uniform" else 1.0)
    t = TD.draw_timesteps(sampling, 4096, T, low=100, generator=torch.Generator().manual_seed(0))
    assert 0 <= int(t.min()) and int(t.max()) < T
    if distribution in ("sigmoid", "cos_map"):  # (the table: zero below low, T entries)
        weights = TD.timestep_weights(sampling, T, low=100)
        assert weights.shape == (T,) and not bool(weights[:100].any()) and bool((weights[100:] > 0).all())


def test_the_step_names_the_options_and_T_for_a_range_past_it():
    with pytest.raises(ValueError, match=r"--min-timestep / --max-timestep\): the model has 500 training timesteps"):
        timestep_bounds(StepConfig(timestep_range=(0, 800)), T)
    assert timestep_bounds(StepConfig(timestep_range=(300, 500)), T) == (300, 500)
    assert timestep_bounds(StepConfig(), T) == (0, T)
