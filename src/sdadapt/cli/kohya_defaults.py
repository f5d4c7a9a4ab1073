"""kohya's defaults for what a kohya config leaves out (``python -m sdadapt train --config``).

A ``--config`` TOML is a *kohya config* when one of its keys is not one of sdadapt's own option
names (a :class:`~sdadapt.jobs.TrainOptions` field such as ``images``, ``model``, ``steps``,
``batch_size``, ``optimizer``; a method option such as ``rank``, or one of its flags such as
``network_dim`` / ``network_alpha`` / ``conv_dim``): a kohya spelling such as
``pretrained_model_name_or_path`` (which kohya requires), ``train_data_dir``, ``output_dir``,
``max_train_steps``, ``train_batch_size``, ``optimizer_type``, ``network_module``, ``network_args``
or ``cache_latents`` (:func:`is_kohya_config`). Every option that changes
training and that such a file and the command line both leave out then takes kohya
sd-scripts' argparse default instead of sdadapt's (:func:`kohya_defaults`), so the file trains
here as it does in kohya; sdadapt-style TOMLs (sdadapt's own names only) keep sdadapt's defaults.

kohya's defaults (sd-scripts 48d368fa: library/train_util.py ``add_*_arguments``,
library/custom_train_functions.py, train_network.py, networks/lora.py ``create_network``), each
where sdadapt's own differs:

- ``lr_scheduler`` constant, ``lr_warmup_steps`` 0, ``min_snr_gamma`` off, ``train_batch_size`` 1,
  ``max_train_steps`` 1600 (unless ``max_train_epochs``), ``learning_rate`` 2e-6 (kohya's, low for
  a LoRA: kohya configs give it), ``enable_bucket`` off (every image scaled and centre-cropped to
  the resolution, as kohya's cached latents), ``caption_extension`` ``.caption``;
- ``text_encoder_lr``: with ``unet_lr`` given, the text encoders train at ``learning_rate`` (kohya's
  ``prepare_optimizer_params``), not at ``unet_lr`` (sdadapt's);
- ``seed``: kohya draws a random one; here too, and it is recorded in the ``ss_seed`` metadata and
  the ``--resume`` record (a resumed run takes it back), so the run can be repeated;
- LoRA family: ``network_dim`` 4 and ``network_alpha`` 1 (``networks/lora.py``; LyCORIS the same);
  ``conv_alpha``, when ``conv_dim`` is given without it: 1 for lora / locon (``networks/lora.py``),
  the network alpha for loha / lokr / dora (LyCORIS' ``create_network``);
- ``min_bucket_reso`` 256, ``max_bucket_reso`` 1024, ``bucket_reso_steps`` 64 when bucketing is on
  (not on the toy model: kohya's sizes are for Stable Diffusion images);
- no generated class images on the toy model, and none for dreambooth on any model (kohya has prior
  preservation only with ``reg_data_dir``: ``train_db.py`` / ``sdxl_train.py`` train without it);
- dreambooth on an SDXL model: no text encoder training (``sdxl_train.py`` trains them only with
  ``train_text_encoder``; ``train_db.py``, SD1/SD2, trains its encoder by default, as sdadapt).

The run-report line leaves out the dataset options a ``dataset_config`` TOML sets (its values win).

Kept as sdadapt's: ``resolution`` (kohya has none: the model's own), ``clip_skip``,
``max_token_length``, ``max_grad_norm``, ``mixed_precision``, the optimiser and the loss and noise
options (the same defaults in both).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from ..network_args import KOHYA_NETWORK_DEFAULTS, kohya_conv_alpha
from ..training.dataset_config import dataset_toml_has_reg, dataset_toml_keys

__all__ = ["KOHYA_NETWORK_DEFAULTS", "KOHYA_TRAIN_DEFAULTS", "is_kohya_config", "kohya_defaults"]

#: kohya's argparse defaults that differ from sdadapt's, by sdadapt's TrainOptions name: (value, kohya's name, shown as)
KOHYA_TRAIN_DEFAULTS: dict[str, tuple[Any, str, str]] = {
    "lr_scheduler": ("constant", "lr_scheduler", "constant"),
    "lr_warmup_steps": (0, "lr_warmup_steps", "0"),
    "min_snr_gamma": (0.0, "min_snr_gamma", "off"),
    "batch_size": (1, "train_batch_size", "1"),
    "learning_rate": (2e-6, "learning_rate", "2e-06"),
    "enable_bucket": (False, "enable_bucket", "off"),
    "caption_extension": (".caption", "caption_extension", ".caption"),
}
#: kohya's max_train_steps default
_KOHYA_STEPS = 1600
#: kohya's bucket sizes (add_dataset_arguments), by sdadapt's name
_KOHYA_BUCKETS = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64}
_TOY_MODELS = ("toy", "toy-image")


def is_kohya_config(keys: Any, *, own_names: set[str]) -> bool:
    """Whether a config with these (flattened) ``keys`` is a kohya config: one key, dashes read as
    underscores, is not in ``own_names`` (sdadapt's option names: the
    :class:`~sdadapt.jobs.TrainOptions` fields, the method options and their flags, underscored)."""
    return any(str(key).replace("-", "_") not in own_names for key in keys)


def kohya_defaults(*, method: str, values: Mapping[str, Any], methods: Mapping[str, Any], method_options: set[str],
                   seed: int | None = None, prior: str = "off") -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """kohya's defaults for the options neither a kohya config nor the command line gave.

    Args:
        method: the sdadapt method trained (``lora`` ...).
        values: the run's options given so far (the config's and the flags'), by TrainOptions name.
        methods: the method options given so far (``rank`` ...).
        method_options: the option names ``method`` takes.
        seed: the seed to use when ``seed`` is not given (a resumed run's recorded one); ``None``:
            a random one, as kohya's.
        prior: the method's class-image default (:attr:`sdadapt.methods.Method.prior`); ``"auto"``
            (generated class images on the toy model) is turned off on the toy model, as kohya's.

    Returns:
        ``(options, method options, note)``: what to add (never a given name), and the run-report
        line naming each by kohya's name (``None`` when nothing was added).
    """
    options: dict[str, Any] = {}
    added: dict[str, Any] = {}
    shown: list[str] = []
    in_dataset = dataset_toml_keys(values.get("dataset_config"))  # (what a dataset TOML sets wins: not shown)
    for name, (value, kohya, text) in KOHYA_TRAIN_DEFAULTS.items():
        if name not in values:
            options[name] = value
            if kohya not in in_dataset and name not in in_dataset:
                shown.append(f"{kohya} {text}")
    if "steps" not in values and "epochs" not in values:
        options["steps"] = _KOHYA_STEPS
        shown.append(f"max_train_steps {_KOHYA_STEPS}")
    if "unet_lr" in values and "text_encoder_lr" not in values:
        rate = values.get("learning_rate", options.get("learning_rate"))
        options["text_encoder_lr"] = rate
        shown.append(f"text_encoder_lr = learning_rate {rate:g}")
    if "seed" not in values:
        options["seed"] = secrets.randbelow(2**32) if seed is None else int(seed)
        shown.append(f"seed {options['seed']} (" + ("random, recorded in ss_seed and the state" if seed is None
                                                    else "the resumed run's") + ")")
    model = str(values.get("model", "toy"))
    if values.get("enable_bucket", options.get("enable_bucket")) and model not in _TOY_MODELS:
        for name, value in _KOHYA_BUCKETS.items():
            if name not in values:
                options[name] = value
                if name not in in_dataset:
                    shown.append(f"{name} {value}")
    if method == "dreambooth" and "text_encoder" in method_options and "text_encoder" not in methods:
        from ..jobs.model_size import model_is_sdxl

        if model_is_sdxl(model):  # (train_db.py trains SD1/SD2's encoder by default, sdxl_train.py none without it)
            added["text_encoder"] = False
            shown.append("train_text_encoder off (sdxl_train.py trains the text encoders only with it)")
    if method == "full" and "text_encoder" in method_options and "text_encoder" not in methods:
        added["text_encoder"] = False  # (fine_tune.py's and sdxl_train.py's default, and sdadapt's: said, so the
        # text-encoder LRs a GUI writes count as unused — with Prodigy / D-Adaptation no clash, as in kohya)
    dataset_config = values.get("dataset_config")  # (beside one kohya reads class images from its is_reg subsets only)
    class_images_given = (dataset_toml_has_reg(dataset_config) if dataset_config
                          else any(name in values for name in ("class_data_dir", "reg_data_dir")))
    if (prior == "auto" and model in _TOY_MODELS or prior == "required") and not class_images_given and not any(
            name in values for name in ("prior", "class_prompt", "class_images")):
        options["prior"] = False  # (dreambooth too: train_db.py / sdxl_train.py train it without prior preservation)
        shown.append("no class images (kohya: only with " + ("an is_reg subset in the dataset config)" if dataset_config
                                                             else "reg_data_dir)"))
    from_file = str(methods.get("dim_from_weights", False)).lower() in ("true", "1")  # (ranks and alphas: the file's)
    for name, (value, kohya) in KOHYA_NETWORK_DEFAULTS.items():
        if name in method_options and name not in methods and not from_file:
            added[name] = value
            shown.append(f"{kohya} {value:g}")
    if "conv_alpha" in method_options and "conv_rank" in methods and "conv_alpha" not in methods:
        alpha = kohya_conv_alpha(method, methods.get("alpha", added.get("alpha", 1.0)))
        added["conv_alpha"] = alpha
        shown.append(f"conv_alpha {alpha:g}")
    note = ("kohya defaults for options the config leaves out: " + ", ".join(shown)
            + " (give them in the config or as flags to change them)") if shown else None
    return options, added, note
