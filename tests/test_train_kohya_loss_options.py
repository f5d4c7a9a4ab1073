"""`train`'s kohya loss and noise options (``loss_type``, ``huber_c``, ``huber_schedule``,
``debiased_estimation_loss``, ``multires_noise_*``, ``ip_noise_gamma``, ``min/max_timestep``):
a kohya TOML that sets them trains with them (they reach the step, the file records them), bad
values are refused before the model loads, and ones that change nothing are reported."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from sdadapt.cli import main
from sdadapt.jobs.train import TrainOptions, _inactive_option_notes


def test_a_kohya_config_with_loss_and_noise_options_trains_with_them(red_circles, tmp_path, train_fit_calls):
    config = tmp_path / "kohya.toml"
    config.write_text("""
[training_arguments]
loss_type = "huber"
huber_c = 0.2
huber_schedule = "exponential"
debiased_estimation_loss = true
multires_noise_iterations = 3
multires_noise_discount = 0.25
ip_noise_gamma = 0.05
min_timestep = 100
max_timestep = 900
""")
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "2",
                 "--batch-size", "2", "--no-prior", "-o", str(out), "-q"]) == 0
    (step,) = [call.config.step for call in train_fit_calls]
    assert (step.loss, step.huber_c, step.huber_schedule, step.debiased_estimation) == ("huber", 0.2, "exponential", True)
    assert (step.pyramid_noise_iterations, step.pyramid_noise_discount, step.input_perturbation) == (3, 0.25, 0.05)
    assert step.timestep_range == (100, 900)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_loss_type"], meta["ss_huber_schedule"], meta["ss_huber_c"]) == ("huber", "exponential", "0.2")
    assert (meta["ss_debiased_estimation"], meta["ss_multires_noise_iterations"], meta["ss_ip_noise_gamma"]) == (
        "True", "3", "0.05")


def test_the_defaults_are_kohyas_and_train_as_before():
    options = TrainOptions(images=".")
    assert (options.loss_type, options.huber_c, options.huber_schedule, options.multires_noise_discount) == (
        "l2", 0.1, "snr", 0.3)
    assert options.timestep_range() is None
    assert TrainOptions(images=".", max_timestep=500).timestep_range() == (0, 500)


@pytest.mark.parametrize("flags, message", [
    (["--min-timestep", "900", "--max-timestep", "100"], "--min-timestep 900 / --max-timestep 100: need 0 <= min < max ("),
    # (past the model's T: refused once the model is loaded, before any latent is cached)
    (["--max-timestep", "1001"], "has 1000 training timesteps (its scheduler's num_train_timesteps), so need 0 <= min < max <= 1000"),
    (["--huber-c", "0"], "--huber-c must be > 0"),
    (["--multires-noise-discount", "1.5", "--multires-noise-iterations", "6"], "--multires-noise-discount must be in (0, 1]"),
    (["--ip-noise-gamma", "-0.1"], "--ip-noise-gamma must be >= 0"),
])
def test_bad_values_are_refused_before_the_model_loads(red_circles, tmp_path, capsys, flags, message):
    assert main(["train", "lora", "--images", str(red_circles), *flags, "-o", str(tmp_path / "x.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_options_that_change_nothing_are_reported():
    notes = _inactive_option_notes(TrainOptions(images=".", huber_c=0.3, multires_noise_discount=0.5))
    assert any("--huber-c 0.3: not used by --loss-type l2" in note for note in notes)
    assert any("--multires-noise-discount 0.5: not used without --multires-noise-iterations" in note for note in notes)
    assert not _inactive_option_notes(TrainOptions(images=".", loss_type="smooth_l1", huber_c=0.3,
                                                   multires_noise_iterations=2, multires_noise_discount=0.5))


def test_kohya_keys_that_change_nothing_here_are_noted_not_refused(tmp_path):
    """A kohya SD2 config says ``v2 = true`` (SD2 is told from the checkpoint's keys here) and often
    carries memory and tracker settings: each is a note, not an unknown-option error."""
    from sdadapt.cli.train import read_config

    config = tmp_path / "sd2.toml"
    config.write_text('v2 = true\nv_parameterization = true\nhighvram = true\nvae_batch_size = 4\n'
                      'log_tracker_name = "run"\nwandb_api_key = "k"\n')
    options, methods, notes = read_config(config, fields={"prediction_type"}, method_options=set())
    assert options == {"prediction_type": "v_prediction"} and methods == {}
    assert sorted(note.split(" (")[0] for note in notes) == [
        "ignored highvram", "ignored log_tracker_name", "ignored v2", "ignored vae_batch_size", "ignored wandb_api_key"]
