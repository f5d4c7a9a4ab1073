"""A kohya ``--config`` file trains with kohya's defaults for the options it leaves out.

kohya sd-scripts (48d368fa) defaults, from its argparse (tests/test_kohya_config_coverage.py
``KOHYA_OPTIONS``, taken from library/train_util.py ``add_*_arguments``, custom_train_functions.py,
train_network.py) and networks/lora.py ``create_network``::

    if network_dim is None: network_dim = 4
    if network_alpha is None: network_alpha = 1.0        # (train_network.py's argparse default is 1 too)
    if conv_dim is not None and conv_alpha is None: conv_alpha = 1.0

and train_network.py ``if args.seed is None: args.seed = random.randint(0, 2**32)`` (recorded as
``ss_seed``); lora.py ``prepare_optimizer_params``: ``text_encoder_lr`` / ``unet_lr`` None -> ``learning_rate``.
"""

from __future__ import annotations

import json

from test_kohya_config_coverage import KOHYA_OPTIONS, _train_options
from train_inputs import kohya_config_names, write_kohya_toml

from sdadapt.cli.kohya_defaults import is_kohya_config
from sdadapt.jobs import TrainOptions

#: kohya name -> sdadapt TrainOptions field, for the options whose kohya default is checked against kohya's table
_FIELDS = {"lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps", "min_snr_gamma": "min_snr_gamma",
           "train_batch_size": "batch_size", "caption_extension": "caption_extension", "enable_bucket": "enable_bucket",
           "prior_loss_weight": "prior_weight", "max_grad_norm": "max_grad_norm", "mixed_precision": "mixed_precision",
           "lr_scheduler_num_cycles": "lr_scheduler_num_cycles", "lr_scheduler_power": "lr_scheduler_power",
           "gradient_accumulation_steps": "gradient_accumulation_steps", "noise_offset": "noise_offset",
           "multires_noise_iterations": "multires_noise_iterations", "multires_noise_discount": "multires_noise_discount",
           "ip_noise_gamma": "ip_noise_gamma", "loss_type": "loss_type", "huber_c": "huber_c",
           "huber_schedule": "huber_schedule", "huber_scale": "huber_scale", "keep_tokens": "keep_tokens",
           "caption_dropout_rate": "caption_dropout_rate", "caption_tag_dropout_rate": "caption_tag_dropout_rate",
           "caption_dropout_every_n_epochs": "caption_dropout_every_n_epochs", "token_warmup_min": "token_warmup_min",
           "token_warmup_step": "token_warmup_step", "caption_separator": "caption_separator",
           "keep_tokens_separator": "keep_tokens_separator", "shuffle_caption": "shuffle_caption",
           "flip_aug": "flip_aug", "color_aug": "color_aug", "random_crop": "random_crop",
           "debiased_estimation_loss": "debiased_estimation_loss", "zero_terminal_snr": "zero_terminal_snr",
           "noise_offset_random_strength": "noise_offset_random_strength", "full_bf16": "full_bf16",
           "scale_v_pred_loss_like_noise_pred": "scale_v_pred_loss_like_noise_pred", "weighted_captions": "weighted_captions",
           "gradient_checkpointing": "gradient_checkpointing", "sample_sampler": "sample_sampler",
           "dynamo_backend": "dynamo_backend", "max_timestep": "max_timestep", "min_timestep": "min_timestep",
           "text_encoder_lr": "text_encoder_lr", "unet_lr": "unet_lr", "dataset_repeats": "repeats"}
#: kohya's None / unset flag means "off": sdadapt's value for off
_OFF = {"min_snr_gamma": 0, "noise_offset": 0, "multires_noise_iterations": 0, "ip_noise_gamma": 0,
        "max_token_length": 75, "clip_skip": 1}

MINIMAL = {"pretrained_model_name_or_path": "/models/v1-5.safetensors", "train_data_dir": "/data/img",
           "output_dir": "/data/out", "output_name": "mine", "network_dim": 16, "learning_rate": 1e-4,
           "max_train_steps": 800}


def _kohya_value(name: str):
    kind, default = KOHYA_OPTIONS[name]
    if default is None:
        return False if kind == "flag" else _OFF.get(name)
    return default


def test_a_minimal_kohya_lora_config_takes_kohyas_defaults_for_the_rest(tmp_path, monkeypatch):
    options, said = _train_options(tmp_path, monkeypatch, "lora", MINIMAL)
    assert options.config_defaults == "kohya"
    for kohya, name in _FIELDS.items():
        got = getattr(options, name)
        if name == "sample_sampler" and got is None:  # (not given: kohya's ddim at the run, an EDM model's own)
            from sdadapt.jobs.train import DEFAULT_SAMPLE_SAMPLER as got
        assert got == _kohya_value(kohya), (kohya, got, KOHYA_OPTIONS[kohya])
    assert options.max_token_length == 75 and options.clip_skip is None  # (kohya's None: not given, the last layer)
    assert (options.steps, options.learning_rate, options.optimizer) == (800, 1e-4, "adamw")  # (the given ones)
    assert options.method_options == {"rank": 16, "alpha": _kohya_value("network_alpha")}
    assert options.prior is None  # (not the toy: no class images without class_prompt / reg_data_dir anyway)
    assert 0 <= options.seed < 2**32 and f"seed {options.seed} (random" in said


def test_what_the_minimal_config_leaves_out_further_is_kohyas_too(tmp_path, monkeypatch):
    """No dim, no LR, no steps: networks/lora.py's dim 4, argparse's 2e-6 and 1600; with epochs no steps."""
    table = {k: v for k, v in MINIMAL.items() if k not in ("network_dim", "learning_rate", "max_train_steps")}
    options, _ = _train_options(tmp_path, monkeypatch, "lora", table)
    assert options.method_options == {"rank": 4, "alpha": 1.0}
    assert options.learning_rate == KOHYA_OPTIONS["learning_rate"][1] == 2e-6
    assert options.steps == KOHYA_OPTIONS["max_train_steps"][1] == 1600
    options, _ = _train_options(tmp_path, monkeypatch, "lora", {**table, "max_train_epochs": 3})
    assert (options.steps, options.epochs) == (None, 3)


def test_kohyas_text_encoder_rate_and_conv_alpha(tmp_path, monkeypatch):
    """unet_lr alone: kohya's text encoders train at learning_rate; conv_dim alone: conv_alpha 1 (lora.py)."""
    table = {**MINIMAL, "unet_lr": 3e-4, "network_args": ["conv_dim=8"]}
    options, said = _train_options(tmp_path, monkeypatch, "lora", table)
    assert (options.unet_lr, options.text_encoder_lr) == (3e-4, 1e-4)
    assert options.method_options == {"rank": 16, "alpha": 1.0, "conv_rank": 8, "conv_alpha": 1.0}
    options, _ = _train_options(tmp_path, monkeypatch, "loha", {**table, "network_alpha": 8})
    assert options.method_options["conv_alpha"] == 8  # (LyCORIS: the network alpha)
    assert "text_encoder_lr = learning_rate 0.0001" in said


def test_flags_given_on_the_command_line_win(tmp_path, monkeypatch):
    import sdadapt.jobs
    from sdadapt.cli import build_parser

    seen = {}
    monkeypatch.setattr(sdadapt.jobs, "run_train", lambda method, options, **kw: seen.setdefault("options", options))
    config = tmp_path / "k.toml"
    write_kohya_toml(config, MINIMAL)
    args = build_parser().parse_args(["train", "lora", "--config", str(config), "--lr-scheduler", "cosine",
                                      "--batch-size", "2", "--seed", "7", "--network-alpha", "8", "--bucket",
                                      "--min-snr-gamma", "5", "--quiet"])
    try:
        args.run(args)
    except TypeError:  # (the fake run returns no result to print)
        pass
    options = seen["options"]
    assert (options.lr_scheduler, options.batch_size, options.seed, options.min_snr_gamma) == ("cosine", 2, 7, 5)
    assert options.method_options["alpha"] == 8.0 and options.enable_bucket
    assert (options.min_bucket_reso, options.max_bucket_reso, options.bucket_reso_steps) == (256, 1024, 64)
    assert options.lr_warmup_steps == 0 and options.caption_extension == ".caption"  # (not given: kohya's)


def test_sdadapt_style_configs_keep_sdadapts_defaults(tmp_path, monkeypatch):
    options, said = _train_options(tmp_path, monkeypatch, "lora", {
        "model": "/models/v1-5.safetensors", "images": "/data/img", "out": "/data/out/x.safetensors", "rank": 16,
        "learning-rate": 1e-4, "steps": 800, "alpha": 4})
    defaults = TrainOptions(images="x")
    assert options.config_defaults == "sdadapt" and "kohya defaults" not in said
    for name in ("lr_scheduler", "lr_warmup_steps", "min_snr_gamma", "batch_size", "seed", "enable_bucket",
                 "caption_extension", "text_encoder_lr", "min_bucket_reso"):
        assert getattr(options, name) == getattr(defaults, name), name
    assert options.method_options == {"rank": 16, "alpha": 4.0}


def test_the_rule_telling_a_kohya_config(tmp_path):
    """sdadapt's own names (fields, method options, their flags: docs/train.md's example uses network_dim)
    keep sdadapt's defaults; one kohya-only key makes the file a kohya config."""
    from sdadapt.cli.train import _is_kohya_file

    fields, methods = kohya_config_names()
    config = tmp_path / "c.toml"

    def kohya(*keys) -> bool:
        config.write_text("".join(f"{key} = 1\n" for key in keys), encoding="utf-8")
        return _is_kohya_file(config, fields=fields, method_options=methods)

    assert not kohya("images", "steps", "rank", "learning-rate", "dataset_config", "network_dim", "network_alpha",
                     "conv_dim", "network_weights")
    for key in ("pretrained_model_name_or_path", "train_data_dir", "output_dir", "max_train_steps", "optimizer_type",
                "train_batch_size", "cache_latents", "network_module", "network_args", "max_train_epochs"):
        assert kohya("images", key), key
    assert is_kohya_config(["x"], own_names={"images"}) and not is_kohya_config(["images"], own_names={"images"})


def test_the_note_names_each_default_by_kohyas_name(tmp_path, monkeypatch):
    table = {k: v for k, v in MINIMAL.items() if k != "network_dim"}
    options, said = _train_options(tmp_path, monkeypatch, "lora", table)
    line = next(line for line in said.splitlines() if "kohya defaults" in line)
    assert line == (
        "config: kohya defaults for options the config leaves out: lr_scheduler constant, lr_warmup_steps 0, "
        "min_snr_gamma off, train_batch_size 1, enable_bucket off, caption_extension .caption, "
        f"seed {options.seed} (random, recorded in ss_seed and the state), network_dim 4, network_alpha 1 "
        "(give them in the config or as flags to change them)")


def _toy_config(tmp_path, images, **more) -> str:
    config = tmp_path / "kohya.toml"
    write_kohya_toml(config, {"pretrained_model_name_or_path": "toy", "train_data_dir": str(images),
                              "output_dir": str(tmp_path), "output_name": "toy_lora", "learning_rate": 1e-3,
                              "max_train_steps": 2, "resolution": "32,32", **more})
    return str(config)


def test_a_toy_run_writes_kohyas_defaults_into_the_metadata_and_resumes_with_them(three_shapes, tmp_path, capsys):
    from safetensors import safe_open

    from sdadapt.cli import main

    config = _toy_config(tmp_path, three_shapes, save_state_on_train_end=True)
    assert main(["train", "lora", "--config", config]) == 0
    with safe_open(str(tmp_path / "toy_lora.safetensors"), "pt") as file:
        meta = file.metadata()
    record = json.loads((tmp_path / "toy_lora-state" / "run.json").read_text())
    assert (meta["ss_lr_scheduler"], meta["ss_min_snr_gamma"], meta["ss_lr_warmup_steps"]) == ("constant", "None", "0")
    assert (float(meta["ss_network_alpha"]), meta["ss_network_dim"], meta["ss_batch_size_per_device"]) == (1.0, "4", "1")
    assert meta["ss_enable_bucket"] == "False" and meta["ss_seed"] == str(record["seed"])
    assert record["config_defaults"] == "kohya" and record["batch_size"] == 1
    assert "class image" not in capsys.readouterr().out  # (kohya: no class images without reg_data_dir)
    # resumed with the same config and more steps: the recorded seed comes back, the run continues
    more = _toy_config(tmp_path, three_shapes, max_train_steps=3)
    assert main(["train", "lora", "--config", more, "--resume", str(tmp_path / "toy_lora-state"), "--overwrite"]) == 0
    said = capsys.readouterr()
    assert f"seed {record['seed']} (the resumed run's)" in said.err and "(resumed at step 2)" in said.out
    with safe_open(str(tmp_path / "toy_lora.safetensors"), "pt") as file:
        assert file.metadata()["ss_seed"] == str(record["seed"])
    # the same state resumed without the kohya config: refused, naming the cause
    assert main(["train", "lora", "--model", "toy", "--images", str(three_shapes), "--steps", "3", "--batch-size", "1",
                 "--seed", str(record["seed"]), "--network-dim", "4", "--network-alpha", "1", "--resume",
                 str(tmp_path / "toy_lora-state"), "-o", str(tmp_path / "toy_lora.safetensors"), "--overwrite"]) != 0
    assert "kohya's (now sdadapt's; resume with the same --config file)" in capsys.readouterr().err


def test_a_run_started_with_sdadapts_defaults_resumes_with_them_from_a_kohya_config(three_shapes, tmp_path, capsys):
    """An older run's record has no config_defaults: its kohya config resumes it with sdadapt's defaults."""
    from sdadapt.cli import main

    out = tmp_path / "toy_lora.safetensors"
    assert main(["train", "lora", "--model", "toy", "--images", str(three_shapes), "--steps", "2", "--lr", "1e-3",
                 "--resolution", "32", "-o", str(out), "--save-state-on-train-end", "--no-prior"]) == 0
    assert "config_defaults" not in json.loads((tmp_path / "toy_lora-state" / "run.json").read_text())
    config = _toy_config(tmp_path, three_shapes, max_train_steps=3, prior=False)
    assert main(["train", "lora", "--config", config, "--resume", str(tmp_path / "toy_lora-state"), "--overwrite"]) == 0
    said = capsys.readouterr().err
    assert "the run started with sdadapt's defaults" in said and "kohya defaults for options" not in said


def test_class_images_stay_off_only_where_the_method_makes_them_optional():
    """The toy model generates class images for the LoRA family (prior "auto"): a kohya config turns
    that off (kohya: class images only from reg_data_dir); so for dreambooth ("required") on any model,
    as kohya's train_db.py trains without them (tests/test_kohya_gui_configs.py)."""
    from sdadapt.cli.kohya_defaults import kohya_defaults

    for prior, want in (("auto", False), ("required", False), ("off", None)):
        options, _, _ = kohya_defaults(method="x", values={"model": "toy"}, methods={}, method_options=set(), prior=prior)
        assert options.get("prior") is want, prior
    options, _, _ = kohya_defaults(method="lora", values={"model": "toy", "reg_data_dir": "r"}, methods={},
                                   method_options=set(), prior="auto")
    assert "prior" not in options
    options, added, _ = kohya_defaults(method="lora", values={}, methods={"dim_from_weights": True},
                                       method_options={"rank", "alpha"}, seed=5)
    assert added == {} and options["seed"] == 5  # (the file's ranks and alphas; the resumed run's seed)
