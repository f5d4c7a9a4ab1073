"""Every kohya sd-scripts option is read, noted or refused with a reason by ``train --config``.

The option list below is kohya's own argparse set for the SD1/SD2/SDXL trainers, taken from
kohya-ss/sd-scripts at commit 48d368fa557731ad0488c07304dfeba8c07910eb (2026-02-16): the
``add_argument`` calls of train_network.py ``setup_parser`` and the helpers it calls
(library/train_util.py add_sd_models_arguments / add_dataset_arguments / add_training_arguments /
add_masked_loss_arguments / add_optimizer_arguments / add_sd_saving_arguments, library/utils.py
add_logging_arguments, library/sai_model_spec.py, library/deepspeed_utils.py, library/config_util.py,
library/custom_train_functions.py, library/sdxl_train_util.add_sdxl_training_arguments), plus the
options train_db.py, fine_tune.py, train_textual_inversion.py and sdxl_train.py add.
Each entry is ``name: (kind, kohya's default)``; kind ``flag`` is ``action="store_true"``.

The two GUI configs are written the way kohya_ss (bmaltais/kohya_ss, kohya_gui/lora_gui.py
``train_model`` -> ``config_toml_data``, commit 45088f04) writes them: older GUIs wrote every key
with "" / 0 / false for what is not used; current ones drop those but keep ``[]`` lists, write
``text_encoder_lr`` as one value per text encoder, and add their own keys (``epoch``,
``noise_offset_type``, ``wandb_run_name``).
"""

from __future__ import annotations

import io
from contextlib import redirect_stderr

import pytest
from train_inputs import read_kohya_table, write_kohya_toml

from sdadapt.cli.train import KOHYA_IGNORED, _method_options
from sdadapt.jobs import TrainOptions

KOHYA_OPTIONS = {
    # train_network.py:setup_parser
    "cpu_offload_checkpointing": ("flag", None), "no_metadata": ("flag", None),
    "save_model_as": ("str", 'safetensors'), "unet_lr": ("float", None), "text_encoder_lr": ("float", None),
    "fp8_base_unet": ("flag", None), "network_weights": ("str", None), "network_module": ("str", None),
    "network_dim": ("int", None), "network_alpha": ("float", 1), "network_dropout": ("float", None),
    "network_args": ("str", None), "network_train_unet_only": ("flag", None),
    "network_train_text_encoder_only": ("flag", None), "training_comment": ("str", None),
    "dim_from_weights": ("flag", None), "scale_weight_norms": ("float", None), "base_weights": ("str", None),
    "base_weights_multiplier": ("float", None), "no_half_vae": ("flag", None),
    "skip_until_initial_step": ("flag", None), "initial_epoch": ("int", None), "initial_step": ("int", None),
    "validation_seed": ("int", None), "validation_split": ("float", 0.0), "validate_every_n_steps": ("int", None),
    "validate_every_n_epochs": ("int", None), "max_validation_steps": ("int", None),
    # library/train_util.py:add_sd_models_arguments
    "v2": ("flag", None), "v_parameterization": ("flag", None), "pretrained_model_name_or_path": ("str", None),
    "tokenizer_cache_dir": ("str", None),
    # library/train_util.py:add_optimizer_arguments
    "optimizer_type": ("str", ''), "use_8bit_adam": ("flag", None), "use_lion_optimizer": ("flag", None),
    "learning_rate": ("float", 2e-06), "max_grad_norm": ("float", 1.0), "optimizer_args": ("str", None),
    "lr_scheduler_type": ("str", ''), "lr_scheduler_args": ("str", None), "lr_scheduler": ("str", 'constant'),
    "lr_warmup_steps": ("float", 0), "lr_decay_steps": ("float", 0), "lr_scheduler_num_cycles": ("int", 1),
    "lr_scheduler_power": ("float", 1), "fused_backward_pass": ("flag", None),
    "lr_scheduler_timescale": ("int", None), "lr_scheduler_min_lr_ratio": ("float", None),
    # library/train_util.py:add_training_arguments
    "output_dir": ("str", None), "output_name": ("str", None), "huggingface_repo_id": ("str", None),
    "huggingface_repo_type": ("str", None), "huggingface_path_in_repo": ("str", None),
    "huggingface_token": ("str", None), "huggingface_repo_visibility": ("str", None),
    "save_state_to_huggingface": ("flag", None), "resume_from_huggingface": ("flag", None),
    "async_upload": ("flag", None), "save_precision": ("str", None), "save_every_n_epochs": ("int", None),
    "save_every_n_steps": ("int", None), "save_n_epoch_ratio": ("int", None), "save_last_n_epochs": ("int", None),
    "save_last_n_epochs_state": ("int", None), "save_last_n_steps": ("int", None),
    "save_last_n_steps_state": ("int", None), "save_state": ("flag", None),
    "save_state_on_train_end": ("flag", None), "resume": ("str", None), "train_batch_size": ("int", 1),
    "max_token_length": ("int", None), "mem_eff_attn": ("flag", None), "torch_compile": ("flag", None),
    "dynamo_backend": ("str", 'inductor'), "xformers": ("flag", None), "sdpa": ("flag", None), "vae": ("str", None),
    "max_train_steps": ("int", 1600), "max_train_epochs": ("int", None), "max_data_loader_n_workers": ("int", 8),
    "persistent_data_loader_workers": ("flag", None), "seed": ("int", None),
    "gradient_checkpointing": ("flag", None), "gradient_accumulation_steps": ("int", 1),
    "mixed_precision": ("str", 'no'), "full_fp16": ("flag", None), "full_bf16": ("flag", None),
    "fp8_base": ("flag", None), "ddp_timeout": ("int", None), "ddp_gradient_as_bucket_view": ("flag", None),
    "ddp_static_graph": ("flag", None), "clip_skip": ("int", None), "logging_dir": ("str", None),
    "log_with": ("str", None), "log_prefix": ("str", None), "log_tracker_name": ("str", None),
    "wandb_run_name": ("str", None), "log_tracker_config": ("str", None), "wandb_api_key": ("str", None),
    "log_config": ("flag", None), "noise_offset": ("float", None), "noise_offset_random_strength": ("flag", None),
    "multires_noise_iterations": ("int", None), "ip_noise_gamma": ("float", None),
    "ip_noise_gamma_random_strength": ("flag", None), "multires_noise_discount": ("float", 0.3),
    "adaptive_noise_scale": ("float", None), "zero_terminal_snr": ("flag", None), "min_timestep": ("int", None),
    "max_timestep": ("int", None), "loss_type": ("str", 'l2'), "huber_schedule": ("str", 'snr'),
    "huber_c": ("float", 0.1), "huber_scale": ("float", 1.0), "lowram": ("flag", None), "highvram": ("flag", None),
    "sample_every_n_steps": ("int", None), "sample_at_first": ("flag", None), "sample_every_n_epochs": ("int", None),
    "sample_prompts": ("str", None), "sample_sampler": ("str", 'ddim'), "config_file": ("str", None),
    "output_config": ("flag", None), "prior_loss_weight": ("float", 1.0),
    # library/train_util.py:add_masked_loss_arguments
    "conditioning_data_dir": ("str", None), "masked_loss": ("flag", None),
    # library/train_util.py:add_dataset_arguments
    "train_data_dir": ("str", None), "cache_info": ("flag", None), "shuffle_caption": ("flag", None),
    "caption_separator": ("str", ','), "caption_extension": ("str", '.caption'), "caption_extention": ("str", None),
    "keep_tokens": ("int", 0), "keep_tokens_separator": ("str", ''), "secondary_separator": ("str", None),
    "enable_wildcard": ("flag", None), "caption_prefix": ("str", None), "caption_suffix": ("str", None),
    "color_aug": ("flag", None), "flip_aug": ("flag", None), "face_crop_aug_range": ("str", None),
    "random_crop": ("flag", None), "debug_dataset": ("flag", None), "resolution": ("str", None),
    "cache_latents": ("flag", None), "vae_batch_size": ("int", 1), "cache_latents_to_disk": ("flag", None),
    "skip_cache_check": ("flag", None), "enable_bucket": ("flag", None), "min_bucket_reso": ("int", 256),
    "max_bucket_reso": ("int", 1024), "bucket_reso_steps": ("int", 64), "bucket_no_upscale": ("flag", None),
    "resize_interpolation": ("str", None), "token_warmup_min": ("int", 1), "token_warmup_step": ("float", 0),
    "alpha_mask": ("flag", None), "dataset_class": ("str", None), "caption_dropout_rate": ("float", 0.0),
    "caption_dropout_every_n_epochs": ("int", 0), "caption_tag_dropout_rate": ("float", 0.0),
    "reg_data_dir": ("str", None), "in_json": ("str", None), "dataset_repeats": ("int", 1),
    # library/utils.py:add_logging_arguments
    "console_log_level": ("str", None), "console_log_file": ("str", None), "console_log_simple": ("flag", None),
    # library/sai_model_spec.py:add_model_spec_arguments
    "metadata_title": ("str", None), "metadata_author": ("str", None), "metadata_description": ("str", None),
    "metadata_license": ("str", None), "metadata_tags": ("str", None), "metadata_usage_hint": ("str", None),
    "metadata_thumbnail": ("str", None), "metadata_merged_from": ("str", None),
    "metadata_trigger_phrase": ("str", None), "metadata_preprocessor": ("str", None),
    "metadata_is_negative_embedding": ("str", None),
    # library/deepspeed_utils.py:add_deepspeed_arguments
    "deepspeed": ("flag", None), "zero_stage": ("int", 2), "offload_optimizer_device": ("str", None),
    "offload_optimizer_nvme_path": ("str", None), "offload_param_device": ("str", None),
    "offload_param_nvme_path": ("str", None), "zero3_init_flag": ("flag", None),
    "zero3_save_16bit_model": ("flag", None), "fp16_master_weights_and_gradients": ("flag", None),
    # library/config_util.py:add_config_arguments
    "dataset_config": ("str", None),
    # library/custom_train_functions.py:add_custom_train_arguments
    "min_snr_gamma": ("float", None), "scale_v_pred_loss_like_noise_pred": ("flag", None),
    "v_pred_like_loss": ("float", None), "debiased_estimation_loss": ("flag", None),
    "weighted_captions": ("flag", False),
    # library/sdxl_train_util.py:add_sdxl_training_arguments
    "disable_mmap_load_safetensors": ("flag", None), "cache_text_encoder_outputs": ("flag", None),
    "cache_text_encoder_outputs_to_disk": ("flag", None),
    # train_db.py:setup_parser
    "learning_rate_te": ("float", None), "no_token_padding": ("flag", None),
    "stop_text_encoder_training": ("int", None),
    # library/train_util.py:add_sd_saving_arguments
    "use_safetensors": ("flag", None),
    # fine_tune.py:setup_parser
    "diffusers_xformers": ("flag", None), "train_text_encoder": ("flag", None),
    # train_textual_inversion.py:setup_parser
    "weights": ("str", None), "num_vectors_per_token": ("int", 1), "token_string": ("str", None),
    "init_word": ("str", None), "use_object_template": ("flag", None), "use_style_template": ("flag", None),
    # sdxl_train.py:setup_parser
    "learning_rate_te1": ("float", None), "learning_rate_te2": ("float", None), "block_lr": ("str", None),
    "fused_optimizer_groups": ("int", None),
}

#: options refused when set (each with its own reason): they would change what is trained, or cannot be done here
REFUSED = {"no_metadata", "huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
           "huggingface_token", "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface",
           "async_upload", "output_config", "debug_dataset",
           "dataset_class", "deepspeed",
           "fused_optimizer_groups"}

#: a value other than kohya's default for each kind, and for options whose value has a form
_PROBE = {"flag": True, "int": 2, "float": 0.5, "str": "x"}
_PROBE_VALUES = {"network_args": ["conv_dim=4"], "optimizer_args": ["weight_decay=0.1"], "lr_scheduler_args": ["lr_end=1e-6"],
                 "resolution": "768,512", "caption_separator": ";", "text_encoder_lr": 1e-5, "save_model_as": "ckpt",
                 "optimizer_type": "Adafactor", "lr_scheduler": "linear", "mixed_precision": "bf16",
                 "sample_sampler": "euler", "loss_type": "huber", "huber_schedule": "constant", "log_with": "tensorboard",
                 "save_precision": "bf16", "dynamo_backend": "eager", "keep_tokens_separator": "|||",
                 "face_crop_aug_range": "2.0,4.0"}


def _outcome(tmp_path, name: str, value):
    """``("read", ...)``, ``("noted", ...)`` or ``("refused", message)`` for one key."""
    try:
        options, chosen, notes = read_kohya_table(tmp_path / f"{name}.toml", {name: value})
    except ValueError as exc:  # (InputError is one)
        return "refused", str(exc)
    if options or chosen:
        return "read", (options, chosen, notes)
    if any(name in note for note in notes):
        return "noted", notes
    return "dropped", (options, chosen, notes)


def test_the_option_list_is_kohyas_whole_set():
    """The list is the full argparse set (not a hand-picked few): 200-odd names, the known corners there."""
    assert len(KOHYA_OPTIONS) > 200
    for name in ("pretrained_model_name_or_path", "network_args", "huber_c", "metadata_trigger_phrase", "zero_stage",
                 "cache_text_encoder_outputs_to_disk", "learning_rate_te1", "caption_extention", "validate_every_n_steps"):
        assert name in KOHYA_OPTIONS


@pytest.mark.parametrize("name", sorted(KOHYA_OPTIONS))
def test_every_kohya_option_is_read_noted_or_refused_never_unknown(tmp_path, name):
    """Set to a value other than kohya's default, an option is read (lands in the options), noted (a
    note names it), or refused with its own reason; never the generic unknown-option error, and
    never dropped without a word."""
    kind, _ = KOHYA_OPTIONS[name]
    outcome, detail = _outcome(tmp_path, name, _PROBE_VALUES.get(name, _PROBE[kind]))
    assert outcome != "dropped", f"{name}: silently dropped ({detail})"
    if outcome == "refused":
        assert "unknown option" not in detail, detail
        assert name in detail and len(detail) > len(name) + 40, f"{name}: refused without a reason: {detail}"
        assert name in REFUSED, f"{name} is refused but not listed in REFUSED: {detail}"
    else:
        assert name not in REFUSED, f"{name} is listed as refused but was {outcome}: {detail}"


@pytest.mark.parametrize("name", sorted(KOHYA_OPTIONS))
def test_every_kohya_option_at_its_off_value_loads(tmp_path, name):
    """GUIs write every key, most at kohya's default or "" / false: those never stop a run."""
    kind, default = KOHYA_OPTIONS[name]
    value = {"flag": False, "str": ""}.get(kind, default) if default is None or kind == "flag" else default
    if value is None:
        value = 0  # (an int/float option off: the GUI writes 0)
    outcome, detail = _outcome(tmp_path, name, value)
    assert outcome != "refused", f"{name} = {value!r}: {detail}"


def test_ignored_notes_give_a_reason():
    assert all(len(reason) > 15 for reason in KOHYA_IGNORED.values()), [k for k, v in KOHYA_IGNORED.items() if len(v) <= 15]


#: an older kohya_ss GUI's LoRA config (SD1.5): every key written, "" / 0 / false for what is not used
GUI_LORA = {
    "adaptive_noise_scale": 0, "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True,
    "cache_latents_to_disk": False, "caption_dropout_every_n_epochs": 0, "caption_dropout_rate": 0,
    "caption_extension": ".txt", "clip_skip": 2, "color_aug": False, "dynamo_backend": "no", "enable_bucket": True,
    "epoch": 10, "flip_aug": False, "full_bf16": False, "full_fp16": False, "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False, "huber_c": 0.1, "huber_schedule": "snr", "huggingface_repo_id": "",
    "huggingface_token": "", "ip_noise_gamma": 0, "ip_noise_gamma_random_strength": False, "keep_tokens": 1,
    "learning_rate": 0.0001, "logging_dir": "/data/log", "loss_type": "l2", "lr_scheduler": "cosine",
    "lr_scheduler_args": [], "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_warmup_steps": 0,
    "max_bucket_reso": 2048, "max_data_loader_n_workers": 0, "max_grad_norm": 1, "max_timestep": 1000,
    "max_token_length": 75, "max_train_epochs": 0, "max_train_steps": 1600, "mem_eff_attn": False,
    "min_bucket_reso": 256, "min_snr_gamma": 0, "min_timestep": 0, "mixed_precision": "fp16",
    "multires_noise_discount": 0.3, "multires_noise_iterations": 0, "network_alpha": 1, "network_args": [],
    "network_dim": 8, "network_dropout": 0, "network_module": "networks.lora", "noise_offset": 0,
    "noise_offset_random_strength": False, "noise_offset_type": "Original", "optimizer_args": [],
    "optimizer_type": "AdamW8bit", "output_dir": "/data/out", "output_name": "mylora",
    "persistent_data_loader_workers": False, "pretrained_model_name_or_path": "/models/v1-5-pruned.safetensors",
    "prior_loss_weight": 1, "random_crop": False, "reg_data_dir": "", "resolution": "512,512", "resume": "",
    "sample_every_n_epochs": 0, "sample_every_n_steps": 0, "sample_prompts": "", "sample_sampler": "euler_a",
    "save_every_n_epochs": 1, "save_every_n_steps": 0, "save_last_n_steps_state": 0,
    "save_model_as": "safetensors", "save_precision": "fp16", "save_state": False, "save_state_on_train_end": False,
    "scale_v_pred_loss_like_noise_pred": False, "scale_weight_norms": 0, "seed": 1234, "shuffle_caption": True,
    "stop_text_encoder_training": 0, "text_encoder_lr": 5e-05, "train_batch_size": 2, "train_data_dir": "/data/img",
    "training_comment": "", "unet_lr": 0.0001, "v2": False, "v_parameterization": False, "v_pred_like_loss": 0,
    "vae": "", "vae_batch_size": 0, "wandb_api_key": "", "wandb_run_name": "", "weighted_captions": False,
    "xformers": True, "lowram": False, "log_with": "", "fp8_base": False, "debiased_estimation_loss": False,
    "masked_loss": False, "network_train_unet_only": False, "network_train_text_encoder_only": False,
    "network_weights": "", "dim_from_weights": False, "huber_scale": 1, "no_half_vae": False,
}

#: a current kohya_ss GUI's SDXL LoRA config: "", false and 0 dropped, [] kept, text_encoder_lr per encoder
GUI_SDXL = {
    "bucket_no_upscale": True, "bucket_reso_steps": 64, "cache_latents": True, "cache_latents_to_disk": True,
    "cache_text_encoder_outputs": True, "caption_extension": ".txt", "clip_skip": 1, "dynamo_backend": "no",
    "enable_bucket": True, "epoch": 10, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
    "huber_c": 0.1, "huber_scale": 1, "huber_schedule": "snr", "learning_rate": 0.0003, "loss_type": "l2",
    "lr_scheduler": "constant_with_warmup", "lr_scheduler_args": [], "lr_scheduler_num_cycles": 10,
    "lr_scheduler_power": 1, "lr_warmup_steps": 160, "max_bucket_reso": 2048, "max_data_loader_n_workers": 0,
    "max_grad_norm": 1, "max_timestep": 1000, "max_token_length": 150, "max_train_steps": 1600,
    "min_bucket_reso": 256, "min_snr_gamma": 5, "mixed_precision": "bf16", "network_alpha": 16,
    "network_args": ["conv_dim=8", "conv_alpha=4"], "network_dim": 32, "network_module": "networks.lora",
    "network_train_unet_only": True, "no_half_vae": True, "noise_offset": 0.0357, "noise_offset_type": "Original",
    "optimizer_args": ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
    "optimizer_type": "Adafactor", "output_dir": "/data/out", "output_name": "mysdxl",
    "persistent_data_loader_workers": 1, "pretrained_model_name_or_path": "/models/sd_xl_base_1.0.safetensors",
    "prior_loss_weight": 1, "resolution": "1024,1024", "sample_every_n_epochs": 1, "sample_sampler": "euler",
    "save_every_n_epochs": 1, "save_last_n_epochs": 3, "save_model_as": "safetensors", "save_precision": "bf16",
    "sdpa": True, "seed": 42, "shuffle_caption": False, "text_encoder_lr": [0.0001, 0.0001], "train_batch_size": 2,
    "train_data_dir": "/data/img", "training_comment": "trigger: ohwx", "unet_lr": 0.0003, "vae_batch_size": 4,
    "wandb_run_name": "mysdxl", "metadata_author": "me", "metadata_trigger_phrase": "ohwx",
    "ip_noise_gamma": 0.05, "huggingface_repo_visibility": "",
}


def _train_options(tmp_path, monkeypatch, method: str, table: dict) -> tuple[TrainOptions, str]:
    """Run ``python -m sdadapt train METHOD --config FILE`` up to the training call: the options it
    would train with, and what it said on stderr."""
    import sdadapt.jobs
    from sdadapt.cli import build_parser

    seen = {}

    def fake_run_train(method_name, options, **kw):
        seen["options"] = options
        raise _Stop

    monkeypatch.setattr(sdadapt.jobs, "run_train", fake_run_train)
    config = tmp_path / f"config_{method}.toml"
    write_kohya_toml(config, table)
    args = build_parser().parse_args(["train", method, "--config", str(config)])
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(_Stop):
        args.run(args)
    return seen["options"], err.getvalue()


class _Stop(Exception):
    pass


def test_an_older_gui_lora_config_loads_with_kohyas_meaning(tmp_path, monkeypatch):
    """"" / 0 / false read as not given (as sd-scripts does), the rest as kohya means it."""
    options, said = _train_options(tmp_path, monkeypatch, "lora", GUI_LORA)
    assert str(options.out) == "/data/out/mylora.safetensors" and str(options.images) == "/data/img"
    assert options.steps == 1600 and options.epochs is None  # (max_train_epochs = 0: not given)
    assert options.resume is None and options.reg_data_dir is None and options.sample_prompts is None
    assert options.save_every_n_epochs == 1 and options.save_every_n_steps is None
    assert options.scale_weight_norms is None and options.text_encoder_steps is None
    assert options.min_snr_gamma == 0 and options.noise_offset == 0 and options.clip_skip == 2 and options.keep_tokens == 1
    assert (options.learning_rate, options.unet_lr, options.text_encoder_lr) == (1e-4, 1e-4, 5e-5)
    assert options.optimizer == "AdamW8bit" and options.mixed_precision == "fp16" and options.seed == 1234
    assert options.resolution == (512, 512) and options.batch_size == 2 and options.shuffle_caption
    assert options.method_options == {"rank": 8, "alpha": 1.0, "dropout": 0.0, "text_encoder": True, "unet": True,
                                      "dim_from_weights": False}
    import torch

    assert options.dtype == torch.float16
    for key in ("epoch", "noise_offset_type", "xformers", "cache_latents", "logging_dir", "network_module",
                "save_model_as"):
        assert f"config: ignored {key} (" in said, key
    assert options.sample_sampler == "euler_a" and "sample_sampler" not in said  # (kohya's names are read as themselves)


def test_a_current_gui_sdxl_config_loads_with_kohyas_meaning(tmp_path, monkeypatch):
    prompts = tmp_path / "sample" / "prompt.txt"  # (the GUI writes its prompt box here, output_dir/sample/prompt.txt)
    prompts.parent.mkdir()
    prompts.write_text("ohwx, a photo of a dog --n blurry --w 1024 --h 1024 --d 5 --l 7 --s 28\n", encoding="utf-8")
    options, said = _train_options(tmp_path, monkeypatch, "lora", {**GUI_SDXL, "sample_prompts": str(prompts)})
    assert options.text_encoder_lr == 1e-4  # (one value per text encoder, both the same)
    assert options.cache_text_encoder_outputs and options.gradient_checkpointing and options.max_token_length == 150
    assert options.optimizer == "Adafactor" and list(options.optimizer_args) == [
        "scale_parameter=False", "relative_step=False", "warmup_init=False"]
    assert options.lr_scheduler == "constant_with_warmup" and options.lr_warmup_steps == 160
    assert options.lr_scheduler_args in ((), [])
    assert options.noise_offset == pytest.approx(0.0357) and options.ip_noise_gamma == pytest.approx(0.05)
    assert options.resolution == (1024, 1024) and options.save_last_n_epochs == 3
    assert options.method_options["text_encoder"] is False and options.method_options["conv_rank"] == 8
    assert options.metadata_author == "me" and options.training_comment == "trigger: ohwx"
    for key in ("epoch", "noise_offset_type", "wandb_run_name", "no_half_vae", "sdpa",
                "persistent_data_loader_workers", "metadata_trigger_phrase", "vae_batch_size"):
        assert f"config: ignored {key} (" in said, key
    assert options.cache_latents_to_disk  # (read: the latents go to kohya's .npz files, tests/test_disk_latent_cache.py)


@pytest.mark.parametrize("table, words", [
    ({"text_encoder_lr": [1e-4, 5e-5, 1e-5]}, "at most two"),  # (two: one per encoder, tests/test_text_encoder_lrs.py)
    ({"learning_rate_te": 1e-5, "learning_rate_te1": 2e-5}, "twice"),
    ({"use_8bit_adam": True, "optimizer_type": "Adafactor"}, "give one of the two"),
])
def test_settings_that_would_train_something_else_are_refused(tmp_path, table, words):
    with pytest.raises(ValueError, match=words):
        read_kohya_table(tmp_path / "c.toml", table)


def test_kohyas_old_spellings_are_read(tmp_path):
    options, _, _ = read_kohya_table(tmp_path / "c.toml", {
        "use_8bit_adam": True, "caption_extention": ".caption", "learning_rate_te": 2e-5, "learning_rate_te1": 2e-5,
        "sample_sampler": "k_euler", "sample_prompts": "p.txt"})
    assert options == {"optimizer": "AdamW8bit", "caption_extension": ".caption", "text_encoder_lr": 2e-5,
                       "text_encoder_2_lr": "learning_rate",  # (learning_rate_te1 alone: sdxl_train.py's te2 default)
                       "sample_sampler": "k_euler", "sample_prompts": "p.txt"}


def test_sample_prompt_files_in_kohyas_three_formats_read_the_same(tmp_path):
    """kohya's train_util.load_prompts: ``.txt`` lines; ``.json`` a list of lines or tables; ``.toml``
    ``[prompt]`` defaults merged under each ``[[prompt.subset]]`` (``dict(**data["prompt"], **subset)``).
    Table keys: prompt, negative_prompt, width, height, seed, scale (CFG), sample_steps."""
    from sdadapt.sampling import SamplePrompt, parse_sample_prompts

    want = [SamplePrompt("a dog", negative="blurry", width=512, height=768, seed=3, guidance=7.5, steps=28),
            SamplePrompt("a cat", negative="blurry", width=512, height=512, seed=4, guidance=7.5, steps=28)]
    (tmp_path / "p.txt").write_text("# kohya prompts\na dog --n blurry --w 512 --h 768 --d 3 --l 7.5 --s 28\n\n"
                                    "a cat --n blurry --w 512 --h 512 --d 4 --l 7.5 --s 28\n", encoding="utf-8")
    (tmp_path / "p.json").write_text(
        '["a dog --n blurry --w 512 --h 768 --d 3 --l 7.5 --s 28", {"prompt": "a cat", "negative_prompt": "blurry", '
        '"width": 512, "height": 512, "seed": 4, "scale": 7.5, "sample_steps": 28}]', encoding="utf-8")
    (tmp_path / "p.toml").write_text(
        '[prompt]\nnegative_prompt = "blurry"\nwidth = 512\nheight = 512\nscale = 7.5\nsample_steps = 28\n\n'
        '[[prompt.subset]]\nprompt = "a dog"\nheight = 768\nseed = 3\n\n[[prompt.subset]]\nprompt = "a cat"\nseed = 4\n',
        encoding="utf-8")
    for name in ("p.txt", "p.json", "p.toml"):
        assert parse_sample_prompts(tmp_path / name) == want, name


@pytest.mark.parametrize("name, text, words", [
    ("a.json", '{"prompt": "a dog"}', "a list of prompts"),
    ("b.json", '[{"prompt": "a dog", "sample_sampler": "euler_cfg_pp"}]', "sample_sampler 'euler_cfg_pp' is not a sampler"),
    ("b2.json", '[{"prompt": "a dog", "controlnet_image": "c.png"}]', "'controlnet_image' is not read"),
    ("c.json", '[{"negative_prompt": "x"}]', "no prompt"),
    ("d.json", '[{"prompt": "a dog", "width": "wide"}]', "width must be a whole number"),
    ("e.toml", 'prompt = "a dog"\n', "[[prompt.subset]]"),
    ("f.json", "[]", "no prompts in the file"),
    ("g.json", "[1, 2", "not valid JSON"),
])
def test_bad_json_and_toml_prompt_files_say_what_is_wrong(tmp_path, name, text, words):
    from sdadapt.sampling import parse_sample_prompts

    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=__import__("re").escape(words)):
        parse_sample_prompts(tmp_path / name)


def test_an_empty_gui_prompt_file_means_no_samples(tmp_path, monkeypatch):
    """The kohya_ss GUI always writes ``sample_prompts = OUTPUT/sample/prompt.txt``, empty when its prompt
    box is; kohya then samples nothing (its load_prompts returns no prompts). Here too, with a note."""
    prompts = tmp_path / "prompt.txt"
    prompts.write_text("\n# nothing\n", encoding="utf-8")
    options, said = _train_options(tmp_path, monkeypatch, "lora", {
        **GUI_SDXL, "sample_prompts": str(prompts), "sample_sampler": "euler_a", "sample_at_first": True})
    assert options.sample_prompts is None and options.sample_every_n_epochs is None and not options.sample_at_first
    assert "ignored sample_prompts, sample_every_n_epochs, sample_at_first, sample_sampler (" in said


def test_an_older_gui_lora_config_trains_and_writes_kohyas_metadata(three_shapes, tmp_path, capsys):
    """The whole GUI config through ``python -m sdadapt train lora --config`` on the toy model (the
    model, size and step count changed to fit it): it trains, and the file records the GUI's values."""
    from safetensors import safe_open

    from sdadapt.cli import main

    (tmp_path / "out").mkdir()
    config = tmp_path / "gui.toml"
    write_kohya_toml(config, {**GUI_LORA, "train_data_dir": str(three_shapes), "output_dir": str(tmp_path / "out"),
                              "pretrained_model_name_or_path": "toy", "resolution": "32,32", "max_train_steps": 2,
                              "mixed_precision": "no", "clip_skip": 1, "bucket_reso_steps": 8, "min_bucket_reso": 16,
                              "max_bucket_reso": 64})
    assert main(["train", "lora", "--config", str(config), "--no-prior"]) == 0
    said = capsys.readouterr().err
    assert "config: ignored v2" not in said and "config: ignored full_fp16" not in said  # (off: no note)
    with safe_open(str(tmp_path / "out" / "mylora.safetensors"), "pt") as file:
        meta = file.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_optimizer"], meta["ss_seed"]) == (
        "8", "1", "bitsandbytes.optim.adamw.AdamW8bit", "1234")
    assert (float(meta["ss_text_encoder_lr"]), float(meta["ss_unet_lr"]), meta["ss_keep_tokens"]) == (5e-5, 1e-4, "1")


@pytest.mark.parametrize("tracker, becomes", [("wandb", "auto"), ("all", "tensorboard"), ("tensorboard", "tensorboard")])
def test_kohyas_trackers_log_here_with_a_note_for_wandb(tmp_path, tracker, becomes):
    options, _, notes = read_kohya_table(tmp_path / "c.toml", {"log_with": tracker})
    assert options == {"log_with": becomes}
    assert any("Weights & Biases" in note for note in notes) == (tracker != "tensorboard")


def test_kohyas_adafactor_schedule_goes_with_the_adafactor_optimiser_only(tmp_path):
    """kohya's get_scheduler_fix: ``adafactor`` asserts an Adafactor optimiser and hands the step size to
    its relative step; sdadapt's Adafactor with relative_step leaves the schedule unused too."""
    config = tmp_path / "c.toml"
    options, _, notes = read_kohya_table(config, {"optimizer_type": "Adafactor", "lr_scheduler": "adafactor"})
    assert options == {"optimizer": "Adafactor", "lr_scheduler": "constant"} and any("relative step" in n for n in notes)
    with pytest.raises(ValueError, match="optimizer_type = 'Adafactor'"):
        read_kohya_table(config, {"optimizer_type": "AdamW", "lr_scheduler": "adafactor"})


def test_lycoris_gui_network_args_at_their_off_values_pass_and_on_are_refused():
    """The kohya_ss GUI writes every LyCORIS arg (``use_scalar=False rank_dropout_scale=False
    bypass_mode=False train_norm=False factor=-1 decompose_both=False``): off they change nothing;
    ``factor`` / ``decompose_both`` are LoKr's options and ``preset`` chooses the targets
    (tests/test_lycoris_presets.py)."""
    from sdadapt.network_args import parse_network_args
    from sdadapt.errors import InputError

    methods = set(_method_options())
    gui = ["conv_dim=4", "conv_alpha=1", "use_tucker=False", "rank_dropout=0", "bypass_mode=False", "dora_wd=False",
           "module_dropout=0", "use_scalar=False", "rank_dropout_scale=False", "algo=lokr", "train_norm=False",
           "factor=-1", "decompose_both=False"]
    assert parse_network_args(gui, method_options=methods) == {
        "conv_rank": "4", "conv_alpha": "1", "use_tucker": "False", "rank_dropout": "0", "dora_wd": "False",
        "module_dropout": "0", "algo": "lokr", "factor": "-1", "decompose_both": "False"}
    for on in ("use_scalar=True", "bypass_mode=True"):
        with pytest.raises(InputError, match=on.split("=")[0]):
            parse_network_args([on], method_options=methods)
    # LyCORIS' norm modules: a LoRA-family option (tests/test_glora_norm.py)
    assert parse_network_args(["train_norm=True"], method_options=methods) == {"train_norm": "True"}
    assert parse_network_args(["preset=full"], method_options=methods) == {"targets": "full"}


def test_caption_separator_splits_the_tags_and_kohya_joins_them_with_a_comma(tmp_path, monkeypatch):
    """kohya's process_caption: ``tokens = [t.strip() for t in caption.split(caption_separator)]``,
    keep / shuffle / drop, then ``caption = ", ".join(fixed + flex + fixed_suffix)``; the
    ``secondary_separator`` becomes the ``caption_separator``. A top-level ``caption_separator`` is
    the fallback of every dataset-TOML subset too."""
    import random

    from sdadapt.jobs.train import _caption_options, _data_config_fallback

    options, _ = _train_options(tmp_path, monkeypatch, "lora", {
        "train_data_dir": "/data/img", "caption_separator": ";", "shuffle_caption": True, "keep_tokens": 1,
        "secondary_separator": "+++"})
    assert options.caption_separator == ";" and _data_config_fallback(options)["caption_separator"] == ";"
    captions = _caption_options(options, templates=(), total_steps=10)
    caption = "ohwx; red; round+++shiny; big"
    orders = set()
    for seed in range(8):  # kohya: split at ";", keep "ohwx", shuffle the rest, ", ".join, then "+++" -> ";"
        head, *rest = captions.apply(caption, random.Random(seed)).split(", ")
        assert head == "ohwx" and sorted(rest) == ["big", "red", "round;shiny"], rest
        orders.add(tuple(rest))
    assert len(orders) > 1  # (shuffled)
    with pytest.raises(ValueError, match="holds the tag separator ';'"):
        _train_options(tmp_path, monkeypatch, "lora", {"train_data_dir": "/data/img", "caption_separator": ";",
                                                       "keep_tokens_separator": "|;|"})
