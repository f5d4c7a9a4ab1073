"""``python -m sdadapt demo`` and ``python -m sdadapt train METHOD``: training from the shell.

``train`` takes kohya-like flags and a TOML config (``--config train.toml``: keys are the flag
names with underscores, kohya's own names are read too; flags given on the command line win).
Every option is checked before the model loads or the first step runs. Method-specific options
(``--network-dim`` for the LoRA family, ``--text-encoder`` for fine-tuning, each method's
registered :class:`sdadapt.methods.MethodOption` s) are added from the method registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
from pathlib import Path
from typing import Any

from ..plurals import plural
from ..sampler_tables import SAMPLER_ALIASES, SAMPLERS, canonical_sampler  # (torch-free, as the parser must be)
from ..timestep_tables import BIAS_STRATEGIES, DISTRIBUTIONS  # (torch-free)
from ..network_args import check_lycoris_args, drop_lycoris_ignored, parse_network_args
from .options import BooleanFlag, add_output_options, numbers, positive_int, progress_bar, torch_dtype

__all__ = ["register", "read_config", "parse_network_args", "steps_or_share", "kohya_network_args_text", "KOHYA_KEYS",
           "KOHYA_IGNORED"]

#: an option the command line did not give (the TOML file or the default then decides)
_UNSET: Any = type("_Unset", (), {"__repr__": lambda self: "<unset>"})()

#: each method's default step count as ``train --help`` says it (the registry's ``Method.steps``, read without importing
#: the methods: tests/test_cli_train.py checks they agree)
STEP_DEFAULTS_HELP = "600; dreambooth 1000; textual-inversion, dreamartist, custom-diffusion 400"

#: kohya sd-scripts config names -> sdadapt's (TOML keys)
KOHYA_KEYS = {
    "pretrained_model_name_or_path": "model",
    "train_data_dir": "images",
    "max_train_steps": "steps",
    "max_train_epochs": "epochs",
    "train_batch_size": "batch_size",
    "optimizer_type": "optimizer",
    "prior_loss_weight": "prior_weight",
    "save_precision": "dtype",
    "dataset_repeats": "repeats",
    "class_tokens": "prompt",
    "token_string": "token",
    "num_vectors_per_token": "vectors",
    "weights": "init_weights",
    "network_dim": "rank",
    "network_alpha": "alpha",
    "stop_text_encoder_training": "text_encoder_steps",
    "conv_dim": "conv_rank",
    "network_dropout": "dropout",
    "output_name": "output_name",
    "output_dir": "output_dir",
    "caption_extention": "caption_extension",  # (kohya's old misspelling, still read by sd-scripts)
    "learning_rate_te": "text_encoder_lr",  # (train_db.py / fine_tune.py)
}
#: kohya options that change nothing here (sdadapt always does it, or picks it itself)
KOHYA_IGNORED = {
    "cache_latents": "latents are always cached (per bucket)",
    "xformers": "torch picks the attention kernel (--sdpa-backends measure times them)",
    "sdpa": "torch picks the attention kernel (--sdpa-backends measure times them)",
    "mem_eff_attn": "torch picks the attention kernel (--sdpa-backends efficient,math asks for it)",
    "max_data_loader_n_workers": "images are read once, before training",
    "persistent_data_loader_workers": "images are read once, before training",
    "save_model_as": "sdadapt writes .safetensors (hypernetworks: .pt)",
    "logging_dir": "the CSV log and TensorBoard events go beside the output",
    "log_prefix": "the CSV log and TensorBoard events go beside the output",
    "network_module": "the method decides the network (lora, locon, loha, lokr, dora, ia3, diag-oft, boft, dylora; "
                      "networks.dylora must be trained with `train dylora`)",
    "lowram": "where the weights are loaded first (memory only)",
    "highvram": "where the latents are kept (memory only)",
    "vae_batch_size": "latents are encoded bucket by bucket before training",
    "v2": "SD2 is told from the checkpoint's keys",
    "wandb_api_key": "the CSV log and TensorBoard events go beside the output",
    "log_tracker_name": "the CSV log and TensorBoard events go beside the output",
    "save_last_n_steps_state": "sdadapt keeps one resumable state, OUT-state/, replaced at each save: no older state "
                               "is left to remove",
    "save_last_n_epochs_state": "sdadapt keeps one resumable state, OUT-state/, replaced at each save: no older state "
                                "is left to remove",
    "no_half_vae": "the VAE always encodes in float32 here (loaded in float32, run outside the training autocast)",
    "mem_eff_save": "not there: sdadapt writes with safetensors' save_file, which holds about one more copy of the "
                    "saved weights in host memory while writing",
    "console_log_level": "sdadapt writes its report lines to stderr (--quiet silences them)",
    "console_log_file": "sdadapt writes its report lines to stderr (--quiet silences them)",
    "console_log_simple": "sdadapt writes its report lines to stderr (--quiet silences them)",
    "ddp_gradient_as_bucket_view": "under torchrun sdadapt averages the gradients itself, one all-reduce per bucket "
                                   "after the last accumulated backward (no DistributedDataParallel wrapper)",
    "ddp_static_graph": "under torchrun sdadapt averages the gradients itself, one all-reduce per bucket after the "
                        "last accumulated backward (no DistributedDataParallel wrapper)",
    "cpu_offload_checkpointing": "memory only (kohya's Flux/SD3 scripts move checkpointed activations to the CPU); "
                                 "here --gradient-checkpointing / --gradient-checkpointing-fraction",
    "tokenizer_cache_dir": "sdadapt downloads no tokenizer: --tokenizer DIR, or the shipped CLIP vocabulary",
    "wandb_run_name": "the CSV log and TensorBoard events go beside the output",
    "log_tracker_config": "the CSV log and TensorBoard events go beside the output",
    "log_config": "the options are recorded in the output's ss_* metadata and OUT-state/",
    "config_file": "the --config file is this one",
    "skip_cache_check": "each latent .npz file (cache_latents_to_disk) is checked as it is read, at no extra cost",
    "cache_info": "image sizes are read from the file headers: no cache info file",
    "disable_mmap_load_safetensors": "how the checkpoint file is read (the same weights either way)",
    "diffusers_xformers": "torch picks the attention kernel (--sdpa-backends measure times them)",
    "use_safetensors": "sdadapt writes .safetensors",
    "no_token_padding": ("no effect in sd-scripts today: train_db.py sets a flag its dataset no longer reads, so "
                         "captions are padded to the CLIP window there as here"),
    **{name: "DeepSpeed only (deepspeed = true is refused: data parallel here is torchrun's, docs/train.md#several-gpus-torchrun-accelerate-launch)"
       for name in ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                    "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                    "fp16_master_weights_and_gradients")},
    **{f"metadata_{name}": "not written: sdadapt writes modelspec title, author, description, license and tags "
       "(--metadata-*), and the trigger words in ss_tag_frequency" for name in (
           "usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor", "is_negative_embedding")},
    # keys the kohya_ss GUI writes that sd-scripts itself does not read
    "epoch": "a kohya_ss GUI field; sd-scripts reads max_train_epochs / max_train_steps (read here too)",
    "noise_offset_type": "a kohya_ss GUI field choosing which noise keys it writes; noise_offset, adaptive_noise_scale "
                         "and multires_noise_* are read themselves",
    # keys LoRA Easy Training Scripts' backend copies from its GUI into the config (sd-scripts ignores them)
    **{name: "a LoRA Easy Training Scripts GUI field (sd-scripts does not read it)" for name in (
        "save_toml", "save_toml_location", "tag_occurrence", "tag_file_location", "easy_name")},
}
#: kohya options refused when on (off, as kohya configs write them: nothing to do)
_REFUSED_WHEN_ON = {
    **{name: "sdadapt uploads nothing (no network access during training): upload the output yourself, e.g. with "
       "huggingface-cli upload" for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo",
                                             "huggingface_token", "huggingface_repo_visibility",
                                             "save_state_to_huggingface", "async_upload")},
    "resume_from_huggingface": ("sdadapt downloads nothing during training: download the state folder yourself and "
                                "pass it as --resume DIR"),
    "no_metadata": ("sdadapt always writes kohya's ss_* metadata and the modelspec keys (resume checks, merges and "
                    "other tools read them); remove them from the file after training if you must"),
    "output_config": "sdadapt does not write the config back (and kohya would train nothing): leave it out",
    "debug_dataset": "sdadapt has no dataset viewer (kohya shows the images and trains nothing): leave it out",
    "dataset_class": ("sdadapt reads kohya's folder layout, dataset TOML (dataset_config) and in_json, not a "
                      "dataset class"),
    "deepspeed": ("python -m sdadapt train runs without DeepSpeed (several GPUs: torchrun --nproc-per-node N -m sdadapt "
                  "train ..., docs/train.md#several-gpus-torchrun-accelerate-launch); leave it out"),
    "fused_optimizer_groups": ("not there: use fused_backward_pass (--fused-backward-pass: full/dreambooth step each "
                               "weight inside backward, no model-sized gradient buffer)"),
    "train_inpainting": "sdadapt trains text-to-image models, not inpainting ones",
}
#: kohya's ``store_true`` options read here that are no TrainOptions field (read, noted or refused by read_config):
#: a quoted ``"true"`` / ``"false"`` is that bool (:func:`_typed_value`), as their field's type does for the others
_KOHYA_ONLY_FLAGS = frozenset({
    "network_train_unet_only", "network_train_text_encoder_only", "train_text_encoder", "v_parameterization",
    "use_8bit_adam", "use_lion_optimizer", "use_object_template", "use_style_template",
    "cache_latents", "no_metadata",
    "save_state_to_huggingface", "resume_from_huggingface", "async_upload", "output_config", "debug_dataset",
    "deepspeed", "train_inpainting", "cpu_offload_checkpointing", "no_half_vae", "v2", "mem_eff_attn", "xformers",
    "sdpa", "persistent_data_loader_workers", "ddp_gradient_as_bucket_view", "ddp_static_graph", "log_config",
    "lowram", "highvram", "cache_info", "skip_cache_check", "console_log_simple", "zero3_init_flag",
    "zero3_save_16bit_model", "fp16_master_weights_and_gradients", "disable_mmap_load_safetensors",
    "no_token_padding", "use_safetensors", "diffusers_xformers"})
#: kohya's numeric options read here that are no TrainOptions field
_KOHYA_ONLY_NUMBERS: dict[str, type] = {
    "learning_rate_te1": float, "learning_rate_te2": float, "save_last_n_epochs_state": int,
    "save_last_n_steps_state": int, "max_data_loader_n_workers": int, "vae_batch_size": int,
    "zero_stage": int, "fused_optimizer_groups": int}
#: options whose 0 means "off" to kohya's GUIs (sd-scripts' default None; sd-scripts skips a 0 or cannot run with it):
#: 0 reads as not given. (Not save_last_n_*: there kohya's 0 keeps only the newest save, refused here.)
_ZERO_IS_UNSET = frozenset({"steps", "epochs", "save_every_n_steps", "save_every_n_epochs", "sample_every_n_steps",
                            "sample_every_n_epochs", "save_n_epoch_ratio", "max_timestep", "scale_weight_norms",
                            "clip_skip", "lr_scheduler_timescale", "ddp_timeout"})
_DTYPES = {"float": "fp32", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16",
           "bfloat16": "bf16", "keep": "keep"}


def _score_table(before: dict, after: dict) -> str:
    names = {"concept_accuracy": "held-out concept accuracy", "image_image": "image-image similarity",
             "image_text": "image-text similarity", "prior_accuracy": "prior (held-in) accuracy"}
    lines = [f"{'score':<28}{'before':>8}{'after':>8}"]
    for key, label in names.items():
        lines.append(f"{label:<28}{before[key]:>8.3f}{after[key]:>8.3f}")
    return "\n".join(lines)


class _TextEncoderLRs(argparse.Action):
    """``--text-encoder-lr A [B]`` (or ``A,B``): ``A`` is ``text_encoder_lr``; ``B`` is
    ``text_encoder_2_lr``, the second (SDXL) encoder's (kohya's list form, but kohya's SD1/SDXL
    networks train both encoders at ``A``: a kohya TOML list is read as kohya's, :func:`read_config`)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        values = [value for group in values for value in group]  # (each word: comma-separated numbers)
        if len(values) > 2:
            parser.error(f"{option_string}: one learning rate, or two (the first and the second text encoder's), "
                         f"got {len(values)}")
        namespace.text_encoder_lr = values[0]
        if len(values) == 2:
            namespace.text_encoder_2_lr = values[1]


def _message(line: str) -> None:
    """A line on stderr above the progress bar that is drawing (tqdm's ``write``, or the built-in
    bar's line cleared first and redrawn at its next update)."""
    from . import options

    for bar in list(options._OPEN):
        if bar._tqdm is not None:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
            return
        if bar._line_open:
            bar.stream.write("\r" + " " * bar._last_len + "\r")
            bar._line_open = False
            bar._last_draw = float("-inf")
    print(line, file=sys.stderr)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..jobs import run_demo

    if not args.quiet:
        print(f"teaching the toy model the held-out concept {args.concept!r} with {args.method} "
              f"from {plural(args.images, 'image')} (the model has never seen it)", file=sys.stderr)
    result = run_demo(method=args.method, concept=args.concept, images=args.images, steps=args.steps, prior=args.prior,
                      seed=args.seed, out=args.out, overwrite=args.overwrite, dtype=torch_dtype(args.dtype),
                      progress=progress_bar(args, args.method, unit="step"))
    print(_score_table(result["before"], result["after"]))
    print(f"prior images:      {result['prior_images'] or 'none (no prior preservation)'}")
    print(f"before/after grid: {result['files']['grid']}")
    print(f"adapter:           {result['files']['adapter']}")
    print(f"time:              {result['seconds']:.0f} s")
    return 0


# ----------------------------------------------------------------------------------- config
def _resolution(text: Any) -> tuple[int, int]:
    """``512``, ``"512"`` or ``"768,512"`` (WIDTH,HEIGHT, kohya's order) -> (height, width)."""
    if isinstance(text, int):
        return (text, text)
    if isinstance(text, (list, tuple)) and len(text) == 2:
        return (int(text[1]), int(text[0]))
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution must be SIZE or WIDTH,HEIGHT (e.g. 512 or 768,512), got {text!r}") from None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[1], values[0])
    raise argparse.ArgumentTypeError(f"resolution must be SIZE or WIDTH,HEIGHT (e.g. 512 or 768,512), got {text!r}")


def _load_toml(path: Path) -> dict:
    from ..training.dataset_config import read_config_table

    return read_config_table(path, flag="--config")  # (one TOML reader, --dataset-config's too)


def _dataset_toml_face_crop(path: object) -> bool:
    """Whether the kohya dataset TOML at ``path`` (``None`` / no such file: no) sets ``face_crop_aug_range``
    in ``[general]``, a ``[[datasets]]`` block or a subset."""
    from ..training.dataset_config import read_config_table

    if path is None or not Path(str(path)).is_file():
        return False
    table = read_config_table(Path(str(path)), flag="--dataset-config", allow_json=True)
    datasets = [d for d in table.get("datasets", []) if isinstance(d, dict)]
    tables = [table.get("general", {}), *datasets,
              *(s for d in datasets for s in d.get("subsets", []) if isinstance(s, dict))]
    return any(isinstance(t, dict) and t.get("face_crop_aug_range") not in (None, "", []) for t in tables)


def _dataset_toml_pixel_changes(path: object) -> list[str]:
    """``random_crop`` / ``color_aug`` where the kohya dataset TOML at ``path`` turns them on for some subset (a
    subset's own value, else its ``[[datasets]]`` block's, else ``[general]``'s: kohya's blueprint order); ``[]``
    for ``None`` / no such file."""
    from ..training.dataset_config import read_config_table

    if path is None or not Path(str(path)).is_file():
        return []
    table = read_config_table(Path(str(path)), flag="--dataset-config", allow_json=True)
    general = table.get("general", {}) if isinstance(table.get("general"), dict) else {}
    found: list[str] = []
    for block in (d for d in table.get("datasets", []) if isinstance(d, dict)):
        for subset in (s for s in block.get("subsets", []) if isinstance(s, dict)):
            for key in ("random_crop", "color_aug"):
                value = next((t[key] for t in (subset, block, general) if key in t), False)
                if (value is True or str(value).lower() == "true") and key not in found:
                    found.append(key)
    return found


def _check_cached_pixel_changes(file: Path, values: dict[str, Any]) -> None:
    """A kohya config's ``cache_latents = true`` with ``random_crop`` / ``color_aug`` (the file's, a flag's or a
    ``dataset_config`` subset's): refused, as kohya refuses it (sd-scripts@48d368fa train_network.py:581-584,
    train_db.py:113-115, fine_tune.py:117-119, sdxl_train.py:201-203: ``assert
    train_dataset_group.is_latent_cacheable()``, library/train_util.py:1099-1100, "when caching latents, either
    color_aug or random_crop cannot be used"). Without it sdadapt would encode the changed pixels at each step,
    which is not the run the file asks kohya for."""
    cached = _flat_config(file).get("cache_latents")
    if not (cached is True or str(cached).lower() == "true"):
        return
    changing = [key for key in ("random_crop", "color_aug") if values.get(key) is True]
    subsets = [key for key in _dataset_toml_pixel_changes(values.get("dataset_config")) if key not in changing]
    if changing or subsets:
        where = ", ".join([*changing, *(f"{key} (a subset of dataset_config {values['dataset_config']})" for key in subsets)])
        raise ValueError(f"--config {file}: cache_latents = true with {where}: kohya refuses caching latents when the "
                         "pixels change at each use (is_latent_cacheable: \"when caching latents, either color_aug or "
                         "random_crop cannot be used\"). Leave out cache_latents (sdadapt then encodes the augmented "
                         "images at each step) or random_crop / color_aug (to cache the latents, as kohya does)")


def _flat_config(path: Path) -> dict[str, Any]:
    """The ``--config`` TOML's keys and values, its tables (``[training_arguments]`` ...) flattened."""
    flat: dict[str, Any] = {}
    for key, value in _load_toml(path).items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


#: the config keys (sdadapt's names) that hold a path besides the options typed as paths
_CONFIG_PATHS = frozenset({"output_dir", "model", "logging_dir", "network_weights", "tokenizer", "base_weights"})


def read_config(path: str | Path, *, fields: set[str], method_options: set[str]) -> tuple[dict, dict, list[str]]:
    """A TOML config -> ``(train options, method options, notes)``.

    Keys are sdadapt's option names (``batch_size``, ``network_dim`` ...; dashes work too) or
    kohya's (``max_train_steps``, ``train_batch_size``, ``network_args = ["conv_dim=4"]`` ...);
    tables (``[training_arguments]`` ...) are flattened. kohya options that change nothing here
    are listed in the notes; those that cannot be honoured are refused with the reason when set;
    unknown keys are an error that suggests the closest name. As sd-scripts reads GUI-written files:
    ``""`` and ``[]`` are not given, and so is ``0`` for the options in ``_ZERO_IS_UNSET``;
    ``text_encoder_lr = [a, b]`` (one per encoder) is ``text_encoder_lr = a`` for both encoders, as
    kohya's ``train_network.py`` hands SD1/SDXL networks the first value (``text_encoder_2_lr = b``
    trains the second at ``b``); ``learning_rate_te1`` / ``learning_rate_te2`` (``sdxl_train.py``) are
    ``text_encoder_lr`` / ``text_encoder_2_lr``, and ``learning_rate_te1`` alone gives ``text_encoder_2_lr``
    the string ``"learning_rate"`` (:data:`sdadapt.jobs.train.TE2_AT_LEARNING_RATE`: the second encoder at the
    run's ``learning_rate``, as ``sdxl_train.py``). tests/test_kohya_config_coverage.py
    checks kohya's whole option list against this.
    """
    import typing

    from ..jobs import TrainOptions

    file = Path(path)
    flat = _flat_config(file)
    if isinstance(flat.get("datasets"), list):  # (kohya's two files: --config_file and --dataset_config)
        raise ValueError(f"--config {file}: a kohya dataset config ([[datasets]] blocks), not training options: pass it "
                         f"as --dataset-config {file} (and the training options as flags or in a --config file)")
    hints = typing.get_type_hints(TrainOptions)
    typed_methods = {name: entry for name, entry in _method_options().items() if name in method_options}
    typed: dict[str, Any] = {}  # the file's values after the quoted-value conversion
    options: dict[str, Any] = {}
    methods: dict[str, Any] = {}
    notes: list[str] = []
    output_dir = output_name = None
    encoder_lrs: dict[str, float] = {}  # learning_rate_te1 / learning_rate_te2 (sdxl_train.py)
    adam8bit = lion = False
    for key, value in flat.items():
        name = key.replace("-", "_")
        name = KOHYA_KEYS.get(name, name)
        if (isinstance(value, str) and not value.strip() or value == [] or _zero(value) and name in _ZERO_IS_UNSET
                or _zero(value) and key == "stop_text_encoder_training"):
            continue  # (kohya's GUI writes "" / [] / 0 for an option not used; sd-scripts reads them as not given)
        if isinstance(value, str) and key.replace("-", "_") == "network_alpha":
            raise ValueError(_quoted_network_alpha(file, key, value))
        if isinstance(value, str):  # the one conversion of quoted values (seed = "1234", use_8bit_adam = "false")
            hint = (hints.get(name) if name in fields else _scalar_type(typed_methods[name][0]) if name in typed_methods
                    else _KOHYA_ONLY_TYPES.get(name))
            value = _typed_value(file, key, value, hint)
        if name in _CONFIG_PATHS or "Path" in str(hints.get(name, "")):  # (a Windows path refused, ~ the home folder)
            from ..config_paths import config_path

            if isinstance(value, str):
                value = config_path(value, where=f"--config {file}: {key}")
            elif isinstance(value, list):  # (base_weights = ['a.safetensors', ...])
                value = [config_path(item, where=f"--config {file}: {key}") if isinstance(item, str) else item
                         for item in value]
        typed[key] = value
        if name in KOHYA_IGNORED:
            if value is False or isinstance(value, (int, float)) and value == 0:
                continue  # (off: nothing to note)
            notes.append(f"ignored {key} ({KOHYA_IGNORED[name]})" if KOHYA_IGNORED[name] else f"ignored {key}")
            continue
        if name == "output_dir":
            output_dir = value
            continue
        if name == "output_name":
            output_name = value
            continue
        if name == "network_args":
            methods.update(parse_network_args(value if isinstance(value, list) else [value], method_options=method_options,
                                              source=f"--config {file}: network_args"))
            continue
        if name == "network_train_unet_only":
            methods["text_encoder"] = not value
            continue
        if name == "network_train_text_encoder_only":
            methods["unet"] = not value
            continue
        if name == "train_text_encoder" and "text_encoder" in method_options:  # (fine_tune.py / sdxl_train.py)
            methods["text_encoder"] = bool(value)
            continue
        if name == "use_8bit_adam":  # (kohya's old spelling of optimizer_type = "AdamW8bit")
            adam8bit = bool(value)
            continue
        if name == "use_lion_optimizer":  # (kohya's old spelling of optimizer_type = "Lion")
            lion = bool(value)
            continue
        if name in ("learning_rate_te1", "learning_rate_te2"):
            encoder_lrs[name] = value
            continue
        if name == "text_encoder_lr" and isinstance(value, list):  # kohya: one LR per text encoder
            value = _encoder_lr_list(file, key, value, notes)
        if name in ("use_object_template", "use_style_template"):  # kohya's textual-inversion caption templates
            if value:
                options["templates"] = "object" if name == "use_object_template" else "style"
                options["templates_replace_captions"] = True  # (kohya's: every caption a template, not only missing ones)
            continue
        if name == "v_parameterization":
            if value:
                options["prediction_type"] = "v_prediction"
            continue
        if name in _REFUSED_WHEN_ON:
            if isinstance(value, str) and value.strip().lower() in ("false", "none"):  # (older kohya_ss GUI files)
                notes.append(f"ignored {key} = {value!r} (read as off: the kohya_ss GUI's text for an unset field)")
                continue
            if value:
                raise ValueError(f"--config {file}: {key}: {_REFUSED_WHEN_ON[name]}")
            continue
        if name in method_options:
            methods[name] = value
        elif name in fields:
            options[name] = value
        else:
            close = difflib.get_close_matches(name, sorted(fields | method_options | set(KOHYA_KEYS)), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"--config {file}: unknown option {key!r}{hint}")
    _settle_kohya_values(file, options, notes, encoder_lrs=encoder_lrs, adam8bit=adam8bit, lion=lion)
    kohya_steps = [k for k in typed if k.replace("-", "_") in ("max_train_steps", "max_train_epochs")]
    if len(kohya_steps) == 2 and "steps" in options and "epochs" in options:  # (the kohya_ss GUI writes both)
        notes.append(f"ignored max_train_steps = {options.pop('steps')} (max_train_epochs = {options['epochs']} is "
                     "given, and kohya's scripts then count the steps from the epochs)")
    cached = [k for k, v in typed.items() if k.replace("-", "_") in ("cache_latents", "cache_latents_to_disk") and v is True]
    if options.get("face_crop_aug_range") not in (None, "", []) and cached:  # (kohya caches the plain crops: no faces)
        notes.append(f"ignored face_crop_aug_range ({cached[0]}: kohya caches each image's latents once and crops "
                     "around no face; leave cache_latents out to crop around the faces)")
        del options["face_crop_aug_range"]
    if cached and _dataset_toml_face_crop(options.get("dataset_config")):  # (can't be dropped from its subsets here)
        raise ValueError(f"--config {file}: {cached[0]} with a dataset_config ({options['dataset_config']}) whose "
                         "face_crop_aug_range is set: kohya caches each image's latents once and so crops around no "
                         "face, sdadapt crops around the faces at each use; leave out cache_latents (to crop around the "
                         "faces) or the dataset TOML's face_crop_aug_range (to train as kohya did)")
    if methods.get("unet") is False:  # kohya's network_train_text_encoder_only: its conv settings (GUIs write them) act on
        unused = [k for k in ("conv_rank", "conv_alpha") if methods.pop(k, None) is not None]  # UNet convs only
        if unused:
            notes.append(f"ignored {', '.join('conv_dim' if k == 'conv_rank' else k for k in unused)} "
                         "(network_train_text_encoder_only: no UNet convolution is adapted)")
    if output_name is not None or output_dir is not None:
        if "out" in options:
            raise ValueError(f"--config {file}: give out, or output_dir/output_name, not both")
        name = str(output_name or "last")  # (kohya appends the extension to any name: "v1.0a" is no suffix)
        own = name.lower().endswith((".safetensors", ".pt", ".ckpt", ".bin"))
        options["out"] = str(Path(str(output_dir or ".")) / (name if own else name + ".safetensors"))
    if "resolution" in options:
        options["resolution"] = _resolution(options["resolution"])
    if "dtype" in options:
        options["dtype"] = _DTYPES.get(str(options["dtype"]).lower(), options["dtype"])
    if "mixed_precision" in options and str(options["mixed_precision"]).lower() in ("none", "fp32"):
        options["mixed_precision"] = "no"
    return options, methods, notes


def _quoted_network_alpha(file: Path, key: str, value: str) -> str:
    """The refusal of ``network_alpha = "4"`` (a TOML string). sd-scripts does not convert a config's values
    (``train_util.read_config_from_file`` hands them to ``parser.parse_args(namespace=...)``, and argparse
    applies ``type=float`` only to what the command line gives: sd-scripts@48d368fa library/train_util.py:
    4759-4760), so the string reaches the network, whose ``alpha / lora_dim`` fails with a ``TypeError``
    (networks/lora.py:71-72; LyCORIS' LoConModule the same): kohya trains nothing and writes no
    ``ss_network_alpha`` to match."""
    number = value.strip()
    try:
        float(number)
    except ValueError:
        number = "4"
    return (f"--config {file}: {key} = {value!r} is a string; write it as a number without quotes ({key} = {number}): "
            "kohya's train_network.py stops on a quoted network_alpha (its LoRA modules divide it by the rank, "
            "networks/lora.py:72), so there is no kohya run to match")


def _encoder_lr_list(file: Path, key: str, value: list, notes: list[str]) -> float:
    """kohya's ``text_encoder_lr = [a]`` / ``[a, b]`` (``train_network.py``'s ``nargs="*"``, one per text
    encoder) -> ``a``, the rate of both encoders, as kohya trains them: ``train_network.py`` passes the list
    only to networks with ``prepare_optimizer_params_with_multiple_te_lrs`` (its SD3 / FLUX / Lumina ones)
    and hands every other network — the SD1/SDXL ``networks.lora`` and LyCORIS' ``lycoris.kohya``, all
    sdadapt trains — ``text_encoder_lr[0]``. A different ``b`` is noted (``text_encoder_2_lr`` /
    ``--text-encoder-2-lr`` trains the second encoder at its own rate). Raises ``ValueError`` for 3+
    values or non-numbers."""
    if len(value) > 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"--config {file}: {key} = {value}: give one learning rate per text encoder (at most two, "
                         "SDXL's first and second), as numbers")
    first = float(value[0])
    if len(value) == 2 and float(value[1]) != first:
        notes.append(f"{key} = {value}: both text encoders train at {value[0]:g}, as kohya's train_network.py trains "
                     "its SD1/SDXL networks (networks.lora, lycoris.kohya: the list's first value for every encoder); "
                     f"to train the second at {value[1]:g}, give text_encoder_2_lr = {value[1]:g} "
                     f"(--text-encoder-2-lr {value[1]:g})")
    return first


def _zero(value: Any) -> bool:
    """``0``, quoted too (``steps = "0"``): what kohya's GUIs write for the options in ``_ZERO_IS_UNSET``
    they leave unset."""
    if isinstance(value, str):
        try:
            return float(value) == 0
        except ValueError:
            return False
    return value == 0


def _settle_kohya_values(file: Path, options: dict, notes: list[str], *, encoder_lrs: dict[str, float],
                         adam8bit: bool, lion: bool = False) -> None:
    """kohya's values that need the whole file: per-encoder text-encoder LRs, an empty GUI prompt file,
    kohya's ``adafactor`` schedule, the ``wandb`` / ``all`` trackers, an unknown ``sample_sampler`` and
    ``use_8bit_adam`` / ``use_lion_optimizer``. Edits ``options`` and ``notes`` in place; raises ``ValueError`` for what cannot be honoured."""
    for name, field_name in (("learning_rate_te1", "text_encoder_lr"), ("learning_rate_te2", "text_encoder_2_lr")):
        if name not in encoder_lrs:
            continue  # (sdxl_train.py: an encoder without its own LR trains at learning_rate)
        try:
            rate = float(encoder_lrs[name])  # (a quoted "1e-5" too)
        except (TypeError, ValueError):
            raise ValueError(f"--config {file}: {name} = {encoder_lrs[name]!r} is not a number") from None
        if field_name in options and float(options[field_name]) != rate:
            raise ValueError(f"--config {file}: {name} = {encoder_lrs[name]} and {field_name} = {options[field_name]} "
                             "set one text encoder's learning rate twice; give one")
        options[field_name] = rate
    if "learning_rate_te1" in encoder_lrs and "learning_rate_te2" not in encoder_lrs and "text_encoder_2_lr" not in options:
        from ..jobs.train import TE2_AT_LEARNING_RATE

        options["text_encoder_2_lr"] = TE2_AT_LEARNING_RATE  # (sdxl_train.py: learning_rate_te2 or learning_rate)
        notes.append(f"learning_rate_te1 = {options['text_encoder_lr']:g} without learning_rate_te2: the second "
                     "text encoder (SDXL) trains at learning_rate, as sdxl_train.py")
    prompts = Path(str(options.get("sample_prompts", "")))
    if prompts.suffix.lower() == ".txt" and prompts.is_file() and not any(
            line.strip() and not line.strip().startswith("#") for line in prompts.read_text(encoding="utf-8").splitlines()):
        dropped = [name for name in ("sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first",
                                     "sample_sampler") if options.pop(name, None) is not None]
        notes.append(f"ignored {', '.join(dropped)} ({prompts} holds no prompt, as the kohya_ss GUI writes it when its "
                     "prompt box is empty: nothing is sampled, as in kohya)")
    schedule = str(options.get("lr_scheduler", "")).lower()
    if schedule == "adafactor" or schedule.startswith("adafactor:"):  # kohya's schedule of Adafactor's relative step
        if str(options.get("optimizer", "")).lower() != "adafactor":
            raise ValueError(f"--config {file}: lr_scheduler = {options['lr_scheduler']!r} is kohya's schedule for "
                             "optimizer_type = 'Adafactor' (kohya refuses it with other optimisers)")
        options["lr_scheduler"] = "constant"
        notes.append(f"lr_scheduler = {schedule!r}: Adafactor's relative step sets the step size (relative_step=True "
                     "unless optimizer_args say otherwise, as kohya's); read as constant")
    tracker = str(options.get("log_with", "")).lower()
    if tracker in ("wandb", "all"):  # kohya's trackers: tensorboard, wandb, all
        options["log_with"] = "tensorboard" if tracker == "all" else "auto"
        notes.append(f"log_with = {tracker!r}: no Weights & Biases run here (nothing leaves the machine); the CSV log "
                     "and TensorBoard events go beside the output")
    if "sample_sampler" in options:  # kohya's names are read as themselves; kohya samples an unknown one with DDIM
        try:
            canonical_sampler(options["sample_sampler"])
        except ValueError as exc:
            raise ValueError(f"--config {file}: sample_sampler = {options['sample_sampler']!r}: {exc} "
                             "(kohya would sample with ddim instead)") from None
    if adam8bit:
        if str(options.get("optimizer", "AdamW8bit")).lower().replace("_", "") != "adamw8bit":
            raise ValueError(f"--config {file}: use_8bit_adam with optimizer_type = {options['optimizer']!r}: give one "
                             "of the two (kohya refuses both too)")
        options["optimizer"] = "AdamW8bit"
    if lion:  # kohya's get_optimizer: use_lion_optimizer is optimizer_type = "Lion", refused beside another
        if adam8bit or str(options.get("optimizer", "Lion")).lower() != "lion":
            raise ValueError(f"--config {file}: use_lion_optimizer with "
                             f"{'use_8bit_adam' if adam8bit else 'optimizer_type = ' + repr(options['optimizer'])}: "
                             "give one of the two (kohya refuses both too)")
        options["optimizer"] = "Lion"


def _check_network_module(method: str, network_module: object) -> None:
    """A kohya config's ``network_module = "networks.dylora"`` needs ``train dylora`` (and ``train dylora`` no other
    kohya network), so such a config never trains a plain LoRA in silence."""
    from ..errors import InputError

    module = str(network_module).strip() if network_module is not None else ""
    if module == "networks.dylora" and method != "dylora":
        raise InputError(f"network_module = networks.dylora (kohya's DyLoRA) but the method is {method}: train it with "
                         "`python -m sdadapt train dylora` (network_args unit=N is read there)")
    if method == "dylora" and module not in ("", "networks.dylora"):
        raise InputError(f"train dylora, but the config's network_module is {module}: use networks.dylora, or train "
                         "that network's method")


# ----------------------------------------------------------------------------------- train
def _methods() -> dict[str, tuple[Any, ...]]:
    """Every method's name -> its :class:`~sdadapt.method_tables.MethodOption` s, in registration order: the
    built-in methods' from :data:`sdadapt.method_tables.METHOD_OPTIONS` (torch-free, so that ``--help`` and usage
    errors import no torch), or, once :mod:`sdadapt.methods` is imported (a method added with
    :func:`~sdadapt.methods.register_method` needs it), its registry :data:`~sdadapt.methods.METHODS`."""
    from ..method_tables import METHOD_OPTIONS

    registry = sys.modules.get(f"{__name__.rsplit('.', 2)[0]}.methods")
    if registry is None or not hasattr(registry, "METHODS"):
        return dict(METHOD_OPTIONS)
    return {name: method.options for name, method in registry.METHODS.items()}


def _method_options():
    """Every method option by name: ``{name: (MethodOption, [methods that take it])}``."""
    options: dict[str, tuple[Any, list[str]]] = {}
    for method, method_options in _methods().items():
        for option in method_options:
            entry = options.setdefault(option.name, (option, []))
            entry[1].append(method)
    return options


def _scalar_type(option) -> type | None:
    """A method option's value type (int, float, bool; of each value of a ``many`` option, given one) for
    :func:`_typed_value`; ``None`` for another type (its strings stay for :func:`_convert`)."""
    return option.type if option.type in (int, float, bool) else None


def _convert(option, value: Any) -> Any:
    """A TOML/CLI value through the option's type (TOML already typed: bools and numbers pass); an
    option of ``many`` values gets a list (one value alone becomes a list of one)."""
    if getattr(option, "many", False):
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise ValueError(f"{option.option_strings[0]} needs at least one value")
        return [_convert(dataclasses.replace(option, many=False), v) for v in values]
    if option.type is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes", "on"):
                return True
            if value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{option.option_strings[0]} takes true or false, got {value!r}")
        return bool(value)
    try:
        return option.type(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option.option_strings[0]}: {value!r} is not a valid {getattr(option.type, '__name__', 'value')}") from None


_KOHYA_ONLY_TYPES: dict[str, Any] = {**dict.fromkeys(_KOHYA_ONLY_FLAGS, bool), **_KOHYA_ONLY_NUMBERS}


def _typed_value(file: Path, key: str, value: str, hint: Any) -> Any:
    """A config's number or boolean written as a string (``seed = "1234"``, ``learning_rate = "1e-4"``,
    ``flip_aug = "true"``, ``use_8bit_adam = "false"``, as some GUIs and hand edits write them) -> the
    option's type ``hint`` (a TrainOptions field's, or :data:`_KOHYA_ONLY_TYPES`' for kohya's own keys);
    other strings (``hint`` None or not a number/bool type) as they are, and a field that also takes
    words (``text_encoder_2_lr``) keeps a string that is no number. :func:`read_config` runs every
    value through it before anything reads it. Raises ``ValueError`` naming the key for a string that
    is not such a number."""
    import types
    import typing

    if hint is None:
        return value
    kinds = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else {hint}
    kinds.discard(type(None))
    text = value.strip()
    if str in kinds:  # (text_encoder_2_lr: a number, or a word such as "learning_rate", kept as it is)
        kinds.discard(str)
        try:
            float(text)
        except ValueError:
            return value
    if not kinds or not kinds <= {int, float, bool}:
        return value
    if kinds == {bool}:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise ValueError(f"--config {file}: {key} = {value!r} is not true or false")
        return text.lower() in ("true", "1", "yes", "on")
    try:
        try:
            number = int(text)  # (lr_warmup_steps = "100" or "1_000": a count; the float 100.0 would be a share)
        except ValueError:
            number = float(text)
            if int in kinds and float not in kinds:
                if number != int(number):
                    raise ValueError from None
                number = int(number)
    except (ValueError, OverflowError):
        kind = "an integer" if float not in kinds else "a number"
        raise ValueError(f"--config {file}: {key} = {value!r} is not {kind}; write it as {kind} "
                         f"without quotes (e.g. {key} = {1 if kind == 'an integer' else 0.0001})") from None
    return number


def steps_or_share(text: str) -> float:
    """argparse type of ``--lr-warmup-steps`` / ``--lr-decay-steps``: a count, a share below 1, or a
    percentage ``"10%"`` (= 0.1, kohya's ``int_or_float``)."""
    value = text.strip()
    percent = value.endswith("%")
    try:
        number = float(value[:-1] if percent else value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps, a share below 1 or a percentage (10%), got {text!r}") from None
    if not math.isfinite(number) or number < 0 or (percent and number >= 100):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 0, a share below 1 or a percentage below 100%")
    return number / 100 if percent else number


def _is_kohya_file(path: Path, *, fields: set[str], method_options: set[str]) -> bool:
    """Whether the ``--config`` file is a kohya config (:func:`sdadapt.cli.kohya_defaults.is_kohya_config`;
    tables flattened as :func:`read_config` does)."""
    from .kohya_defaults import is_kohya_config

    keys = list(_flat_config(path))
    flags = {flag.lstrip("-").replace("-", "_") for option, _ in _method_options().values() for flag in option.option_strings}
    return is_kohya_config(keys, own_names=fields | method_options | flags)


def _check_kohya_step_shares(file: Path, values: dict, given: dict) -> None:
    """Refuse a kohya config's ``lr_warmup_steps`` / ``lr_decay_steps`` given as a float of 1 or
    more that the command line does not replace: kohya keeps a TOML value's type and reads any float
    as a share of the steps (``int(1.0 · N)``: all N steps; the kohya_ss GUI writes 1.0 for a 100 %
    warm-up), where sdadapt reads 1 or more as a count."""
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        value = values.get(name)
        if name not in given and isinstance(value, float) and value >= 1:
            raise ValueError(f"--config {file}: {name} = {value!r} is a float, which kohya reads as a share of the steps "
                             f"(int({value!r} · steps): {value:.0%} of them), not as {int(value)} steps; write an integer "
                             f"for a count ({name} = {int(value)}), or a share below 1 (e.g. 0.5)")


def _apply_kohya_defaults(method: str, values: dict, chosen: dict, *, method_options: dict) -> tuple[str, str | None]:
    """Add kohya's defaults to ``values`` / ``chosen`` (in place; :func:`sdadapt.cli.kohya_defaults.kohya_defaults`)
    -> ``(config_defaults, note)``. With ``--resume``: a run recorded without kohya's defaults (started
    before kohya configs took them) keeps sdadapt's, and a run with them takes back its recorded seed."""
    import json

    from ..jobs.train import _RUN_RECORD
    from ..methods import METHODS
    from .kohya_defaults import kohya_defaults

    seed = None
    if values.get("resume") is not None:
        try:
            record = json.loads((Path(values["resume"]) / _RUN_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None  # (not a state folder: the run's resume check says so)
        if isinstance(record, dict):
            if record.get("config_defaults", "sdadapt") != "kohya":
                return "sdadapt", (f"--resume {values['resume']}: the run started with sdadapt's defaults for the options "
                                   "the config leaves out (before kohya configs took kohya's): it continues with them")
            seed = record.get("seed")
    own = {name for name, (_, owners) in method_options.items() if method in owners}
    options, added, note = kohya_defaults(method=method, values=values, methods=chosen, method_options=own, seed=seed,
                                          prior=METHODS[method].prior)
    values.update(options)
    chosen.update(added)
    return "kohya", note


def _kohya_alpha_text(raw: Any) -> str | None:
    """``ss_network_alpha`` as kohya's ``train_network.py`` writes the alpha given (``str(args.network_alpha)``,
    sd-scripts@48d368fa ``train_network.py:1022,1223``): a command-line value through argparse's
    ``type=float`` (``"2"`` -> ``"2.0"``), a TOML number as TOML typed it (``read_config_from_file`` puts
    it in the namespace untouched: ``2`` -> ``"2"``, ``2.0`` -> ``"2.0"``); ``None`` when not given (or
    not a number: the option's own check names it)."""
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        return str(raw)
    try:
        return str(float(raw))
    except (TypeError, ValueError):
        return None


def kohya_network_args_text(items: list, *, dropout: Any = None, from_weights: bool = False) -> str:
    """``ss_network_args`` as kohya's ``train_network.py`` writes it for ``network_args`` ``items`` (sd-scripts@48d368fa
    train_network.py:664-677, 1203-1204): each ``KEY=VALUE`` split at its first ``=``, the value text as written
    (``"conv_alpha=1.0"`` -> ``"1.0"``; a later key replaces an earlier one), ``dropout`` (``--network_dropout``,
    ``None``: JSON null; a command-line text as argparse's float) added unless given there or the network comes
    from its weights (``--dim_from_weights``); ``""`` for no items (kohya writes no ``ss_network_args``)."""
    import json

    kwargs: dict[str, Any] = {}
    for item in items:
        key, _, value = str(item).partition("=")
        kwargs[key] = value
    if not kwargs:
        return ""
    if "dropout" not in kwargs and not from_weights:
        kwargs["dropout"] = float(dropout) if isinstance(dropout, str) else dropout
    return json.dumps(kwargs)


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from ..jobs import TrainOptions, run_train
    from ..training.data_parallel import is_main_process

    method_options = _method_options()
    fields = {f.name for f in dataclasses.fields(TrainOptions)} - {"method_options", "config_defaults", "network_alpha_text",
                                                                   "kohya_network_args"}
    given = {k: v for k, v in vars(args).items() if v is not _UNSET and k in fields}
    given_methods = {name: getattr(args, f"mo_{name}") for name in method_options
                     if getattr(args, f"mo_{name}", _UNSET) is not _UNSET}
    notes: list[str] = []
    values: dict[str, Any] = {}
    chosen: dict[str, Any] = {}
    kohya = False
    if args.config is not None:
        values, chosen, notes = read_config(args.config, fields=fields, method_options=set(method_options))  # (typed)
        _check_network_module(args.method, _flat_config(Path(args.config)).get("network_module"))
        kohya = _is_kohya_file(Path(args.config), fields=fields, method_options=set(method_options))
        if kohya:
            _check_kohya_step_shares(Path(args.config), values, given)
            if values.get("save_state") is True and values.get("save_state_on_train_end") is not True:
                values["save_state_on_train_end"] = True  # (kohya: args.save_state or args.save_state_on_train_end,
                # so also over a written save_state_on_train_end = false; a --no-save-state-on-train-end flag still wins)
                notes.append("save_state = true: the state is also saved after the last step, as kohya's "
                             "(continue with --resume OUT-state --steps MORE)")
    if not given.get("overwrite"):
        given.pop("overwrite", None)
    if given.get("dtype") == "keep" and "dtype" in values:
        given.pop("dtype")
    for flag, other in (("steps", "epochs"), ("epochs", "steps")):  # (a length flag replaces the file's other one)
        if given.get(flag) is not None and values.get(other) is not None and given.get(other) is None:
            notes.append(f"ignored the config's {other} {values.pop(other)} (--{flag} {given[flag]} is given"
                         + (", and kohya's scripts count the steps from the epochs" if flag == "epochs" else
                            "; kohya's scripts would train the file's epochs, which win over any step count there")
                         + ")")
    values.update(given)
    if kohya:  # (after the flags: a --random-crop given with the file's cache_latents counts too)
        _check_cached_pixel_changes(Path(args.config), values)
        if values.get("sample_prompts") is not None and not any(values.get(name) for name in (
                "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")):
            unused = [f"{name} {values.pop(name)}" for name in ("sample_prompts", "sample_sampler") if name in values]
            notes.append(f"ignored {', '.join(unused)} (no sample_every_n_steps, sample_every_n_epochs or "
                         "sample_at_first: kohya samples nothing then, and does not read the file; the kohya_ss GUI "
                         "writes the prompt file's path whatever its sampling settings)")
    if given.get("save_state") is True and "save_state_on_train_end" not in given:
        values["save_state_on_train_end"] = True  # kohya's --save_state: args.save_state or args.save_state_on_train_end
        # (train_network.py); without it a run with no periodic saves wrote no state at all
    if getattr(args, "network_args", None):
        chosen.update(parse_network_args(args.network_args, method_options=set(method_options), source="--network-args"))
    chosen.update(given_methods)
    check_lycoris_args(args.method, chosen)
    drop_lycoris_ignored(args.method, chosen, keep=set(given_methods), notes=notes)
    config_defaults = "sdadapt"
    alpha_text = _kohya_alpha_text(chosen.get("alpha"))
    network_args_text = None
    if kohya and args.method == "lora":  # (kohya's networks.lora: ss_network_args is the network_args as written)
        written = _flat_config(Path(args.config)).get("network_args") or []
        network_args_text = kohya_network_args_text(
            [*(written if isinstance(written, list) else [written]), *(getattr(args, "network_args", None) or [])],
            dropout=chosen.get("dropout"), from_weights=bool(chosen.get("dim_from_weights")))
    if kohya:  # a kohya config: kohya's defaults for what it and the flags leave out
        config_defaults, note = _apply_kohya_defaults(args.method, values, chosen, method_options=method_options)
        if note is not None:
            notes.append(note)
        if alpha_text is None and "alpha" in chosen:  # kohya's --network_alpha default, the int 1 (argparse does
            alpha_text = "1"  # not pass a default through type=float): str() writes "1"
    if values.get("images") is None and values.get("dataset_config") is None and values.get("in_json") is None \
            and values.get("concepts_list") is None:
        raise ValueError("no images: pass --images DIR or --dataset-config TOML (or images = 'DIR' / dataset_config = "
                         "'TOML' in the --config file)")
    for name, value in list(chosen.items()):
        option, owners = method_options[name]
        if args.method not in owners:
            raise ValueError(f"{option.option_strings[0]} is an option of {', '.join(sorted(owners))}, not {args.method}")
        chosen[name] = _convert(option, value)
    dtype = values.pop("dtype", "keep")
    if dtype not in ("keep", "fp32", "fp16", "bf16"):
        raise ValueError(f"dtype must be keep, fp32, fp16 or bf16, got {dtype!r}")
    main = is_main_process()  # under torchrun: rank 0 reports (the others train silently)
    quiet = bool(args.quiet) or not main
    options = TrainOptions(**values, method_options=chosen, dtype=torch_dtype(dtype), config_defaults=config_defaults,
                           network_alpha_text=alpha_text if "alpha" in chosen else None,
                           kohya_network_args=network_args_text)

    def log(line: str) -> None:
        if not quiet:
            _message(line)

    for note in notes:
        log(f"config: {note}")

    def bars(label: str, unit: str):
        return progress_bar(argparse.Namespace(quiet=quiet), label, unit=unit)

    # (kohya's bar shows avr_loss, the moving average of the batch losses: train_network.py:1513-1516)
    result = run_train(args.method, options, progress=progress_bar(argparse.Namespace(quiet=quiet), args.method, unit="step",
                                                                   info_name="avr_loss"),
                       bars=bars, log=log)
    if not main:
        return 0
    losses = result["losses"]
    prior = f" + {plural(result['prior_images'], 'class image')}" if result["prior_images"] else ""
    resumed = f" (resumed at step {result['resumed_from']})" if result["resumed_from"] is not None else ""
    if losses:
        head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
        trend = f"; loss {sum(head) / len(head):.4f} -> {sum(tail) / len(tail):.4f}"
    else:
        trend = ""
    print(f"trained {result['method']} on {plural(result['images'], 'image')}{prior} for {plural(result['steps'], 'step')} "
          f"({plural(result['epochs'], 'epoch')}){resumed} in {result['seconds']:.0f} s{trend}")
    print(f"wrote {result['file']}")
    # the files a method writes beside its output (MethodSpec.companion_files: DreamArtist's <name>-neg.pt, Custom
    # Diffusion's token files), named so a user copies them with it (walkthrough)
    from ..methods import METHODS

    for companion in (p for p in METHODS[result["method"]].outputs(Path(result["file"]))[1:] if p.is_file()):
        print(f"wrote {companion} (beside it: copy the two together)")
    if result["method"] == "textual-inversion":  # (the trigger word is the file name, not --token: A1111's rule)
        print(f"use:  generate --embedding {result['file']} with {Path(result['file']).stem!r} in the prompt (the file "
              "name is the trigger word, as in A1111)")
    if result.get("validation_losses"):  # kohya's validation loss of the held-out images (--validation-split)
        first, last = result["validation_losses"][0], result["validation_losses"][-1]
        print(f"validation loss ({plural(result['validation_images'], 'held-out image')}): {first[1]:.4f} at step "
              f"{first[0]} -> {last[1]:.4f} at step {last[0]}")
    if result.get("lora"):
        lora = result["lora"]
        print(f"wrote {lora['file']}: rank-{lora['rank']} LoRA of the change, {plural(lora['layers'], 'layer')}, largest relative "
              f"error ‖Δ − LoRA‖/‖Δ‖ = {lora['max_relative_error']:.3g} ({lora['worst_layer']})")
    if result.get("memory"):  # a CUDA run: the most a step allocated, the most the allocator held
        memory = result["memory"]
        print(f"GPU memory: {memory['peak_allocated_mib'] / 1024:.2f} GiB peak allocated, "
              f"{memory['reserved_mib'] / 1024:.2f} GiB reserved at most (the log: peak_allocated_mib, reserved_mib)")
    print(f"log:  {result['log']}" + (f" (TensorBoard: {result['tensorboard']})" if result["tensorboard"] else ""))
    if result["samples"]:
        print(f"samples: {plural(len(result['samples']), 'image')} in {Path(result['samples'][0]).parent}")
    if result["state"]:
        print(f"state: {result['state']} (continue with --resume)")
    return 0


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
    """Every ``train`` flag, default ``_UNSET`` (the TOML file, then :class:`sdadapt.jobs.TrainOptions`, decide)."""
    from ..method_tables import LR_SCHEDULES as SCHEDULES, OPTIMIZERS  # (torch-free)

    def add(group, *flags, **kw):
        kw.setdefault("default", _UNSET)
        group.add_argument(*flags, **kw)

    bool_flag = BooleanFlag
    train.add_argument("--config", default=None, metavar="TOML",
                       help="read options from a TOML file (sdadapt or kohya option names); flags given here win; a kohya config "
                       "(a key such as pretrained_model_name_or_path that is not sdadapt's) takes kohya's defaults for "
                       "the options it leaves out (the run report lists them)")
    data = train.add_argument_group("data (kohya folder layout: images + NAME.txt captions, N_name repeat folders)")
    add(data, "--images", "--train-data-dir", dest="images", metavar="DIR",
        help="folder of .png/.jpg images with NAME.txt captions; sub-folders N_name repeat their images N times per epoch")
    add(data, "--dataset-config", metavar="TOML",
        help="kohya's dataset TOML ([general], [[datasets]] blocks (each its resolution, batch size, buckets) with "
        "[[datasets.subsets]]: image_dir, num_repeats, "
        "class_tokens, is_reg, caption options per subset, or metadata_file); replaces --images and --reg-data-dir")
    add(data, "--in-json", metavar="FILE",
        help="kohya's fine-tuning metadata JSON (image key -> caption / tags; caption = caption,tags) for the images "
        "in --images")
    add(data, "--concepts-list", metavar="JSON",
        help="custom-diffusion: diffusers' --concepts_list, a JSON list of {instance_prompt, class_prompt, "
        "instance_data_dir, class_data_dir} (relative folders from the current one): each concept's images train on "
        "its instance_prompt, its class images (--class-images per concept, default 200) on its class_prompt, "
        "generated into class_data_dir where it holds fewer; replaces --images, --prompt, --class-prompt")
    add(data, "--prompt", "--class-tokens", dest="prompt", help="caption of images without a caption file")
    add(data, "--caption-extension", metavar="EXT", help="caption file suffix (default .txt; .caption is read too)")
    add(data, "--repeats", type=int, metavar="N", help="repeats of images directly in --images (default 1)")
    add(data, "--shuffle-caption", action=bool_flag, help="shuffle the comma-separated tags at each draw")
    add(data, "--keep-tokens", type=int, metavar="N", help="the first N tags never move (with --shuffle-caption)")
    add(data, "--caption-dropout-rate", type=float, metavar="P", help="train on the empty caption with probability P")
    add(data, "--caption-tag-dropout-rate", type=float, metavar="P", help="drop each movable tag with probability P")
    add(data, "--caption-dropout-every-n-epochs", type=int, metavar="N",
        help="every N-th epoch (N, 2N, ...) trains every image on the empty caption (kohya's; default 0: never)")
    add(data, "--caption-prefix", metavar="TEXT", help="put TEXT and a space before every caption (kohya's --caption_prefix)")
    add(data, "--caption-suffix", metavar="TEXT", help="put a space and TEXT after every caption (kohya's --caption_suffix)")
    add(data, "--enable-wildcard", action=bool_flag,
        help="kohya's wildcards: a caption file of several lines trains on one line drawn at each use; {a|b|c} becomes "
        "one of a, b, c drawn at each use ({{ and }} are literal braces)")
    add(data, "--keep-tokens-separator", metavar="TEXT",
        help="in a caption holding TEXT (e.g. '|||'), the tags before it never move or drop and the tags after a second "
        "one stay at the end (instead of --keep-tokens)")
    add(data, "--caption-separator", metavar="TEXT",
        help="the tag separator of the captions for shuffling, keeping and dropping tags (kohya's --caption_separator; "
        "default ',')")
    add(data, "--secondary-separator", metavar="TEXT",
        help="tags joined by TEXT (e.g. ';;;') move and drop as one tag; TEXT becomes the caption separator (a comma) after shuffling")
    add(data, "--token-warmup-min", type=int, metavar="N",
        help="with --token-warmup-step: the movable tags used at step 0 (default 1)")
    add(data, "--token-warmup-step", type=float, metavar="STEPS",
        help="the movable tags used grow from --token-warmup-min to all of them by this step (below 1: a share of "
        "the steps; default 0: all from the start)")
    add(data, "--weighted-captions", action=bool_flag,
        help="read A1111 emphasis in the captions, (word:1.2) / (word) / [word], and scale each token's text "
        "states by its weight (kohya's --weighted_captions; Stable Diffusion models)")
    add(data, "--caption-template", metavar="TEXT",
        help="trigger-word methods (--token): what a caption without the token becomes; {token} = the trigger word, "
        "{caption} = the image's caption (A1111's [name], [filewords] work too); default '{token}, {caption}'")
    add(data, "--templates", choices=("object", "style"),
        help="trigger-word methods: captions of images without one, the textual-inversion paper's 'object' templates "
        "('a photo of a {token}' ..., default) or 'style' ('a painting in the style of {token}' ...)")
    add(data, "--templates-replace-captions", action=bool_flag,
        help="trigger-word methods: every image (and class image) trains on one of the --templates captions drawn "
        "at each use, its own caption unused (kohya's use_object_template / use_style_template, which set this)")
    add(data, "--resolution", type=_resolution, metavar="SIZE|W,H",
        help="training resolution (default: the model's: SD1/SD2 512, SDXL 1024, toy 32)")
    add(data, "--enable-bucket", "--bucket", dest="enable_bucket", action=bool_flag,
        help="aspect-ratio bucketing (default on); --no-bucket scales and centre-crops every image to the square resolution")
    add(data, "--min-bucket-reso", type=int, metavar="PX", help="smallest bucket side (default resolution/2)")
    add(data, "--max-bucket-reso", type=int, metavar="PX", help="largest bucket side (default resolution x 2)")
    add(data, "--bucket-reso-steps", type=int, metavar="PX", help="bucket sides are multiples of this (default 64)")
    add(data, "--bucket-no-upscale", action=bool_flag, help="never enlarge an image: small images get their own bucket")
    add(data, "--flip-aug", action=bool_flag,
        help="also cache the mirrored images' latents (twice the latent memory) and train each use of an image on the "
        "mirrored one with probability 1/2 (kohya's --flip_aug)")
    add(data, "--resize-interpolation", choices=("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"),
        help="how images are scaled to their bucket, kohya's names and methods (lanczos, box: PIL's anti-aliased filters; "
        "nearest, bilinear/linear, bicubic/cubic, area: OpenCV's; computed in torch, within about one 8-bit level of "
        "kohya's); default: kohya's (area when the image shrinks both ways, else lanczos); with "
        "--dataset-config, the default of subsets without their own")
    add(data, "--alpha-mask", action=bool_flag,
        help="weight each image's loss by its alpha channel (transparent pixels train nothing; kohya's --alpha_mask); "
        "the mask follows the bucket crop and flips; with --dataset-config, the default of subsets without their "
        "own alpha_mask")
    add(data, "--masked-loss", action=bool_flag,
        help="with --conditioning-data-dir: weight each image's loss by the red channel of its mask image (kohya's "
        "--masked_loss)")
    add(data, "--conditioning-data-dir", metavar="DIR",
        help="mask images named as the training images (same size; red 255 = full loss, 0 = none), for --masked-loss")
    add(data, "--random-crop", action=bool_flag,
        help="crop a random bucket-sized window of each scaled image at each use instead of the centre (kohya's "
        "--random_crop); the latents are then encoded at every step, not cached")
    add(data, "--face-crop-aug-range", metavar="LO,HI",
        help="kohya's --face_crop_aug_range: without buckets (--no-bucket), an image named <name>_<cx>_<cy>_<w>_<h> "
        "(the face's centre and size, as kohya's tools/detect_face_rotate.py writes) is scaled so the face's larger "
        "side is 1/HI to 1/LO of the training size and cropped around it at each use (not cached)")
    add(data, "--color-aug", action=bool_flag,
        help="kohya's --color_aug: a third of the uses get a small hue rotation (up to 16 degrees) or gamma curve "
        "(0.95-1.05); the latents are then encoded at every step, not cached")
    add(data, "--cache-latents-to-disk", action=bool_flag,
        help="keep each image's VAE latents in a .npz file beside it, named and laid out as kohya sd-scripts' "
        "--cache_latents_to_disk writes them, and read them back on the next run instead of encoding (files kohya "
        "wrote are read too; a file of another size is encoded again and rewritten); not with --random-crop, "
        "--color-aug, --face-crop-aug-range, --resize-aug")
    add(data, "--resize-aug", action=bool_flag,
        help="custom-diffusion: Custom Diffusion's resize augmentation (diffusers' default, its --noaug turns it off): "
        "each use of a training image is rescaled to 1/3-1.4 of its size, padded or cut, its loss masked to the image "
        "and its caption prefixed ('a far away ', 'zoomed in ' ...); encoded at every step, not cached")

    model = train.add_argument_group("model")
    add(model, "--model", "--pretrained-model-name-or-path", dest="model", metavar="toy|PATH",
        help="'toy' (built in, the default), a diffusers folder, or an SD1/SD2/SDXL single-file checkpoint (.safetensors/.ckpt)")
    add(model, "--tokenizer", metavar="DIR", help="CLIP tokenizer for a single-file checkpoint (default: the shipped CLIP vocabulary)")
    add(model, "--vae", metavar="FILE|DIR",
        help="a VAE that replaces the model's for the latents and samples (kohya's --vae): an LDM VAE file such as "
        "vae-ft-mse-840000-ema-pruned.safetensors, a diffusers AutoencoderKL file or folder (sdxl-vae-fp16-fix), or a "
        "full checkpoint's VAE; Stable Diffusion models; recorded for --resume and in ss_vae_name")
    add(model, "--prediction-type", choices=("epsilon", "v_prediction"),
        help="what the UNet predicts (default: the model's; SD2-768-v files: v_prediction)")
    add(model, "--v-parameterization", dest="prediction_type", action="store_const", const="v_prediction",
        help="= --prediction-type v_prediction (kohya's flag)")
    add(model, "--clip-skip", type=int, metavar="N", help="condition on the N-th last text-encoder layer (SD1/SD2; default 1)")
    add(model, "--max-token-length", type=int, choices=(75, 150, 225),
        help="caption tokens kept: 75 (default, one CLIP window), 150 or 225 (kohya's --max_token_length: encoded in "
        "75-token windows whose states are joined; SD1/SD2/SDXL; samples use it too)")
    add(model, "--device", metavar="DEV", help="auto (default: cuda when present), cpu, cuda, cuda:N, mps")

    method = train.add_argument_group("method options (each method takes the ones its --help line names)")
    for name, (option, owners) in _method_options().items():
        kwargs: dict[str, Any] = {"dest": f"mo_{name}", "default": _UNSET,
                                  "help": f"{option.help} [{', '.join(sorted(owners))}]"}
        if option.type is bool:
            kwargs["action"] = bool_flag
        else:
            kwargs["metavar"] = option.metavar or name.upper()
            if option.many:
                kwargs["nargs"] = "+"
        method.add_argument(*option.option_strings, **kwargs)
    method.add_argument("--network-args", nargs="*", default=None, metavar="KEY=VALUE",
                        help="kohya's --network_args: conv_dim, conv_alpha, down_lr_weight, mid_lr_weight, up_lr_weight, "
                        "block_lr_zero_threshold, block_dims, block_alphas, conv_block_dims, conv_block_alphas, dropout, "
                        "rank_dropout, module_dropout, use_tucker/use_cp, loraplus_lr_ratio, loraplus_unet_lr_ratio, "
                        "loraplus_text_encoder_lr_ratio (LyCORIS algo/dora_wd must name the method); "
                        "each is also its own flag, e.g. --block-dims")

    optim = train.add_argument_group("optimisation")
    add(optim, "--steps", "--max-train-steps", dest="steps", type=int, metavar="N",
        help=f"optimiser steps (default: the method's: {STEP_DEFAULTS_HELP}); or --epochs")
    add(optim, "--epochs", "--max-train-epochs", dest="epochs", type=int, metavar="N",
        help="train N epochs (each image x its repeats once per epoch)")
    add(optim, "--batch-size", "--train-batch-size", dest="batch_size", type=int, metavar="N", help="default 4")
    add(optim, "--gradient-accumulation-steps", type=int, metavar="N", help="batches per optimiser step (default 1)")
    add(optim, "--lr", "--learning-rate", dest="learning_rate", type=float, metavar="LR", help="default: the method's")
    add(optim, "--unet-lr", type=float, metavar="LR", help="learning rate of the UNet's parameters (overrides --lr)")
    add(optim, "--text-encoder-lr", type=numbers, nargs="+", metavar="LR", action=_TextEncoderLRs,
        help="learning rate inside the text encoder(s) (default: --lr; 0 freezes them); two values (A B, or A,B): SDXL's "
        "first and second encoder each at its own (the second is --text-encoder-2-lr; kohya's --text_encoder_lr A B "
        "trains its SD1/SDXL networks at A for both)")
    add(optim, "--text-encoder-2-lr", type=float, metavar="LR",
        help="learning rate inside the second text encoder (SDXL; default: --text-encoder-lr; 0 freezes it alone; "
        "kohya's learning_rate_te2)")
    add(optim, "--optimizer", "--optimizer-type", dest="optimizer", metavar="NAME",
        help=f"{', '.join(OPTIMIZERS)} (default adamw; kohya's AdamW8bit etc. work), or as kohya's optimizer_type "
        "any torch.optim class (RAdam) or installed module.Class (came_pytorch.CAME), built Class(params, lr, **args)")
    add(optim, "--weight-decay", type=float, metavar="W",
        help="weight decay; default: the optimiser's (0.01 for the AdamW ones, 0 for Adafactor, Lion, SGDNesterov, Prodigy, DAdapt* and *ScheduleFree, as kohya's)")
    add(optim, "--optimizer-args", nargs="+", metavar="KEY=VALUE",
        help="extra optimiser arguments, as kohya's --optimizer_args (e.g. weight_decay=0.1 betas=0.9,0.99 eps=1e-6; "
        "values read as Python literals); each optimiser takes its own keys (an unknown one is refused, naming them); "
        "adafactor trains as kohya's: relative_step=True unless given (the LR then unused)")
    add(optim, "--scale-weight-norms", type=float, metavar="MAX",
        help="lora/locon/loha/lokr: after each step shrink every adapter whose weight-delta norm exceeds MAX onto it; "
        "diag-oft/boft: each layer's oft_blocks norm, as LyCORIS (kohya's max-norm regularisation, e.g. 1; default off)")
    add(optim, "--lr-scheduler", choices=SCHEDULES, help="default cosine")
    add(optim, "--lr-warmup-steps", type=steps_or_share, metavar="N",
        help="linear warm-up steps, or a fraction of the steps below 1 or as a percentage (0.1, 10%%; default: "
        "min(20, steps/10))")
    add(optim, "--lr-scheduler-num-cycles", type=int, metavar="N",
        help="cycles of cosine_with_restarts; half-waves of the cosine of cosine_with_min_lr and warmup_stable_decay "
        "(default 1)")
    add(optim, "--lr-decay-steps", type=steps_or_share, metavar="N",
        help="warmup_stable_decay: decay over the last N steps, or a fraction of the steps below 1 or as a percentage "
        "(default 0: no decay)")
    add(optim, "--lr-scheduler-min-lr-ratio", type=float, metavar="R",
        help="cosine_with_min_lr (needed) and warmup_stable_decay (default 0): the LR they end at, as a share of the LR")
    add(optim, "--lr-scheduler-timescale", type=int, metavar="N",
        help="inverse_sqrt: LR x 1/sqrt((step + N - warm-up)/N) after the warm-up (default: the warm-up steps, or 10000)")
    add(optim, "--lr-scheduler-power", type=float, metavar="P",
        help="exponent of --lr-scheduler polynomial: (LR - lr_end) x (1 - progress)^P + lr_end after the warm-up "
        "(default 1: linear; kohya's)")
    add(optim, "--lr-scheduler-args", nargs="+", metavar="KEY=VALUE",
        help="kohya's --lr_scheduler_args: num_cycles=C for cosine (waves; default 0.5, one half-wave); lr_end=X for "
        "polynomial (the LR it ends at; default 1e-7); min_lr=X for "
        "cosine_with_min_lr; warmup_type=T decay_type=T (linear, cosine, 1-sqrt) for warmup_stable_decay; "
        "step_rules=1:100,0.1:200,0.01 for piecewise_constant (factor 1 before step 100, 0.1 before 200, then 0.01); "
        "with --lr-scheduler-type: that class's arguments (e.g. T_max=1000 eta_min=1e-6)")
    add(optim, "--lr-scheduler-type", metavar="CLASS",
        help="kohya's --lr_scheduler_type: a torch.optim.lr_scheduler class in place of --lr-scheduler (StepLR, "
        "MultiStepLR, ConstantLR, LinearLR, ExponentialLR, PolynomialLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, "
        "OneCycleLR, β1 cycling included), or an installed module.Class (imported as kohya imports it; its LR "
        "alone), built from --lr-scheduler-args, stepped once per optimiser step; no warm-up. The LRs are the "
        "class's, bit for bit")
    add(optim, "--max-grad-norm", type=float, metavar="X", help="gradient clipping (default 1; 0 = off)")
    add(optim, "--mixed-precision", choices=("no", "fp16", "bf16"), help="autocast the forward pass (default no)")
    add(optim, "--min-snr-gamma", type=float, metavar="G", help="min-SNR loss weighting (default 5; 0 = off; an EDM "
        "model such as Playground v2.5: off, and a value given is refused)")
    add(optim, "--noise-offset", type=float, metavar="X", help="offset noise strength (e.g. 0.05; default 0)")
    add(optim, "--noise-offset-random-strength", action=bool_flag,
        help="with --noise-offset X: each batch's offset strength drawn uniformly in [0, X) (kohya's)")
    add(optim, "--adaptive-noise-scale", type=float, metavar="S",
        help="with --noise-offset: each latent channel's offset grows by S x |its mean|, clamped at 0 (kohya's; e.g. 0.01)")
    add(optim, "--zero-terminal-snr", action=bool_flag,
        help="train on the noise schedule rescaled to zero terminal SNR (Lin et al. 2023; kohya's): the last timestep is "
        "pure noise; for v-prediction models; samples keep the model's schedule")
    add(optim, "--loss-type", choices=("l2", "l1", "huber", "smooth_l1"),
        help="diffusion loss (default l2; kohya's names): huber / smooth_l1 with --huber-c and --huber-schedule")
    add(optim, "--huber-c", type=float, metavar="C", help="huber / smooth_l1 loss parameter (default 0.1)")
    add(optim, "--huber-schedule", choices=("snr", "exponential", "constant"),
        help="how --huber-c changes with the timestep (default snr, as kohya)")
    add(optim, "--huber-scale", type=float, metavar="S",
        help="multiplies the huber c of the constant and exponential schedules (default 1; kohya's)")
    add(optim, "--debiased-estimation-loss", action=bool_flag, help="weight the loss by 1/sqrt(SNR) (kohya's option)")
    add(optim, "--multires-noise-iterations", type=int, metavar="N",
        help="multi-resolution (pyramid) noise with N levels (kohya's; e.g. 6; default off)")
    add(optim, "--multires-noise-discount", type=float, metavar="D",
        help="weight of each coarser noise level (default 0.3)")
    add(optim, "--ip-noise-gamma", type=float, metavar="G", help="input perturbation noise strength (e.g. 0.1; default off)")
    add(optim, "--ip-noise-gamma-random-strength", action=bool_flag,
        help="with --ip-noise-gamma G: each batch's perturbation strength drawn uniformly in [0, G) (kohya's)")
    add(optim, "--scale-v-pred-loss-like-noise-pred", action=bool_flag,
        help="v-prediction models: each sample's loss x SNR/(SNR+1), the scale of an epsilon loss (kohya's)")
    add(optim, "--v-pred-like-loss", type=float, metavar="X",
        help="epsilon models: add X times a v-prediction-like loss, loss x (1 + X (SNR+1)/SNR) (kohya's; e.g. 0.1)")
    add(optim, "--min-timestep", type=int, metavar="T", help="train on timesteps >= T (default 0)")
    add(optim, "--max-timestep", type=int, metavar="T", help="train on timesteps < T (default: the model's "
        "num_train_timesteps, 1000 for SD/SDXL; 0 is the least noise, on an EDM model's σ grid too)")
    add(optim, "--timestep-bias-strategy", type=str.lower, choices=BIAS_STRATEGIES,
        help="diffusers' timestep bias (train_text_to_image_sdxl.py): earlier / later weight the first / last "
        "--timestep-bias-portion of the timesteps by --timestep-bias-multiplier, range those in [--timestep-bias-begin, "
        "--timestep-bias-end) (default none)")
    add(optim, "--timestep-bias-multiplier", type=float, metavar="M", help="weight of the biased timesteps (default 1)")
    add(optim, "--timestep-bias-begin", type=int, metavar="T", help="range strategy: first biased timestep (default 0)")
    add(optim, "--timestep-bias-end", type=int, metavar="T", help="range strategy: end of the biased timesteps, "
        "exclusive as diffusers' slice (default 1000)")
    add(optim, "--timestep-bias-portion", type=float, metavar="P",
        help="earlier / later: the share of the timesteps biased (default 0.25)")
    add(optim, "--timestep-distribution", type=str.lower, choices=DISTRIBUTIONS,
        help="OneTrainer's timestep distribution (default uniform, kohya's draw), shaped by --noising-weight, "
        "--noising-bias and --timestep-shift; --min/--max-timestep are its range")
    add(optim, "--noising-weight", type=float, metavar="W", help="OneTrainer's noising_weight (default 0)")
    add(optim, "--noising-bias", type=float, metavar="B", help="OneTrainer's noising_bias (default 0)")
    add(optim, "--timestep-shift", type=float, metavar="S",
        help="OneTrainer's timestep_shift: > 1 draws more noise, < 1 less (default 1)")
    add(optim, "--ema-decay", type=float, metavar="D", help="save the EMA of the weights (e.g. 0.999; default off)")
    add(optim, "--ema-save", choices=("weights", "beside"),
        help="full/dreambooth with --ema-decay: weights (default) saves the EMA as the model's weights; beside saves the "
        "raw weights with the EMA beside them (model_ema.* keys in an LDM file, unet_ema/ in a diffusers folder)")
    add(optim, "--text-encoder-steps", "--stop-text-encoder-training", dest="text_encoder_steps", type=int, metavar="N",
        help="train the text encoder for the first N steps only (kohya's --stop_text_encoder_training; default: every step)")
    add(optim, "--seed", type=int, help="default 0")
    add(optim, "--stop-on-nan", action=bool_flag, help="stop at the first NaN/inf loss, naming the step (default on)")
    add(optim, "--gradient-checkpointing", action=bool_flag,
        help="recompute the UNet blocks' activations in backward instead of keeping them: less memory, ~1 more forward")
    add(optim, "--gradient-checkpointing-fraction", type=float, metavar="F",
        help="checkpoint only this share (0-1] of the UNet blocks, those keeping the most activations (highest resolution "
        "first, transformers before resnets): memory between none and all, less recompute; implies --gradient-checkpointing")
    add(optim, "--fused-backward-pass", action=bool_flag,
        help="full/dreambooth: step the optimiser inside backward one block at a time, freeing the block's gradients at "
        "once (no model-sized gradient buffer); needs --max-grad-norm 0, no accumulation, no fp16")
    add(optim, "--sdpa-backends", metavar="measure|LIST",
        help="attention kernels: 'measure' times flash, memory-efficient, cuDNN and math attention on the first batch and "
        "trains under the fastest order; or a comma list tried in order, e.g. flash,math (default: torch's choice)")
    add(optim, "--half-precision-norms", action=bool_flag,
        help="with --mixed-precision bf16/fp16: GroupNorm and LayerNorm read and write that dtype (float32 statistics "
        "inside the kernels) instead of CUDA autocast's float32 copies: ~5 fewer kernels per norm and half their memory "
        "traffic, the normalised output rounded once more; most useful with --cuda-graph")
    add(optim, "--fused-lora-linear", action=bool_flag,
        help="LoRA on linear layers: each adapted layer runs as one autograd function, its delta added inside the base "
        "layer's matrix multiply (forward and backward): two kernels fewer per layer, one rounding fewer; layers with "
        "dropout, conv layers and other families keep their hooks; most useful with --cuda-graph")
    add(optim, "--cache-text-encoder-outputs", action=bool_flag,
        help="encode every caption once before training and train the UNet on the cached conditioning: the steps no "
        "longer run the text encoder (kohya's --cache_text_encoder_outputs); needs a UNet-only run (--no-text-encoder "
        "for the LoRA family) and fixed captions (no --shuffle-caption, tag dropout, token warm-up, wildcards)")
    add(optim, "--cache-text-encoder-outputs-to-disk", action=bool_flag,
        help="SDXL: --cache-text-encoder-outputs with each image's caption encoding kept in a <stem>_te_outputs.npz file "
        "beside it, named and laid out as kohya sd-scripts' --cache_text_encoder_outputs_to_disk writes it, and read back "
        "on the next run instead of encoding (kohya's files too; a file of another shape or caption, or cut short, is "
        "encoded again and rewritten)")
    add(optim, "--cuda-graph", action=bool_flag,
        help="replay each optimiser step (forward, backward, optimiser) as one CUDA graph per batch layout after 3 eager "
        "steps: far fewer kernel launches at small batches; AdamW, Adafactor, Lion, Prodigy, DAdapt or schedule-free optimisers, no fp16, no "
        "--fused-backward-pass (on a CPU: eager steps)")
    add(optim, "--ddp-timeout", type=int, metavar="MINUTES",
        help="under torchrun / accelerate launch: the process group's timeout, how long a process waits for the others "
        "at a collective (kohya's --ddp_timeout; default torch's, 10 minutes)")
    add(optim, "--torch-compile", action=bool_flag,
        help="torch.compile the UNet (with the adapters) and the text conditioning the step runs: the first steps "
        "compile, then fused kernels (kohya's --torch_compile)")
    add(optim, "--dynamo-backend", metavar="NAME",
        help="with --torch-compile: the torch.compile backend (default inductor; aot_eager, eager, cudagraphs, ...)")
    add(optim, "--full-bf16", action=bool_flag,
        help="full/dreambooth and the adapter methods with --mixed-precision bf16: keep the trained weights in bf16 "
        "(half the memory of fp32), written back with stochastic rounding (kohya's --full_bf16)")
    add(optim, "--full-fp16", action=bool_flag,
        help="adapter methods (lora, locon, loha, lokr, dora, ia3, diag-oft, boft, glora) with --mixed-precision fp16: "
        "keep the adapters' "
        "weights in fp16, the loss scaler unscaling fp16 gradients; updates computed in float32, rounded to nearest "
        "(kohya's --full_fp16)")
    add(optim, "--fp8-base", action=bool_flag,
        help="adapter methods with --mixed-precision bf16/fp16: store the frozen UNet's and text encoders' Linear/Conv "
        "weights in float8_e4m3fn, upcast by autocast op by op (about half the base's bf16 memory; kohya's --fp8_base)")
    add(optim, "--fp8-base-unet", action=bool_flag,
        help="as --fp8-base for the UNet only; the text encoders keep their dtype (kohya's --fp8_base_unet)")

    prior = train.add_argument_group("prior preservation (DreamBooth class images)")
    add(prior, "--class-prompt", help="the class your images belong to, e.g. 'a photo of a dog': the unadapted model's images "
        "of it are trained on alongside yours")
    add(prior, "--class-images", type=int, metavar="N", help="how many class images (default: 2 x your images)")
    add(prior, "--prior-weight", "--prior-loss-weight", dest="prior_weight", type=float, metavar="W",
        help="weight of the class images' loss (default 1)")
    add(prior, "--reg-data-dir", metavar="DIR",
        help="your own class images (kohya's reg folder: N_classname/ sub-folders, captions as --images) instead of "
        "generated ones, repeated to match the training images per epoch (kohya's balancing)")
    add(prior, "--class-data-dir", metavar="DIR",
        help="keep the generated class images in DIR (diffusers' --class_data_dir): the missing ones are made and "
        "written there as {index}-{sha1}.png, the next run reuses them; trains as without it, bit for bit")
    add(prior, "--prior", action=bool_flag, help="force prior preservation on/off (default: on with --class-prompt or "
        "--class-data-dir, on the toy model for the LoRA family and dreambooth)")

    save = train.add_argument_group("saving, resuming, samples and logs")
    add(save, "--save-every-n-steps", type=int, metavar="N", help="also save OUT-stepNNNNNN every N steps (+ the state)")
    add(save, "--save-every-n-epochs", type=int, metavar="N", help="also save OUT-epochNNNN every N epochs (+ the state)")
    add(save, "--save-state", action=bool_flag,
        help="write the resumable state OUT-state/ with each save (default on); given, also after the last step, as "
        "kohya's --save_state (--no-save-state-on-train-end: not)")
    add(save, "--resume", metavar="DIR", help="continue a run from its state folder (same method, model and settings)")
    add(save, "--initial-step", type=int, metavar="K",
        help="kohya's initial_step: a new run counted from step K (trains steps K+1..--steps; the LR schedule and the "
             "optimiser start fresh, as kohya's); not a resume")
    add(save, "--initial-epoch", type=int, metavar="N",
        help="kohya's initial_epoch: --initial-step at the start of epoch N (1: the first)")
    add(save, "--skip-until-initial-step", action=bool_flag,
        help="with --initial-step / --initial-epoch: train on the batches from that step on, as the run from step 0 "
             "would (default: from the first batches)")
    add(save, "--sample-prompts", metavar="FILE",
        help="prompts file in kohya's formats: .txt, one a line, --n NEG --w W --h H --d SEED --l CFG --s STEPS --ss SAMPLER; .json, a "
        "list of such lines or tables; .toml, [prompt] defaults + [[prompt.subset]] tables; images in OUT-samples/")
    add(save, "--sample-every-n-steps", type=int, metavar="N", help="sample every N steps (default: at the end)")
    add(save, "--sample-every-n-epochs", type=int, metavar="N", help="sample every N epochs")
    add(save, "--sample-sampler", type=str.lower, choices=(*SAMPLERS, *SAMPLER_ALIASES), metavar="NAME",
        help="default ddim (an EDM model such as Playground v2.5: its own scheduler, dpmsolver++; a sampler given "
        "with no EDM form, ddim too, is refused there); "
        f"the samplers {', '.join((*SAMPLERS, *SAMPLER_ALIASES))} (kohya's names; docs/samplers.md); a prompt's "
        "--ss NAME (sample_sampler in a table) overrides it")
    add(save, "--sample-steps", type=int, metavar="N", help="sampler steps of samples without --s (default 20)")
    add(save, "--log-with", choices=("auto", "csv", "tensorboard"),
        help="the CSV log OUT-log.csv is always written; auto (default) adds TensorBoard events when installed")
    add(save, "--training-comment", metavar="TEXT", help="stored as ss_training_comment")
    add(save, "--validation-split", type=float, metavar="S",
        help="hold out this share of each subset's images (kohya's seeded draw) and log their validation loss "
        "(CSV validation_*_loss columns, TensorBoard loss/validation/*); default 0: none")
    add(save, "--validation-seed", type=int, metavar="N",
        help="seed of the split and of the validation noise (default: --seed)")
    add(save, "--validate-every-n-steps", type=int, metavar="N",
        help="a validation pass every N optimiser steps (default: by epochs only)")
    add(save, "--validate-every-n-epochs", type=int, metavar="N",
        help="a validation pass at the end of every N-th epoch (default: every epoch)")
    add(save, "--max-validation-steps", type=int, metavar="N",
        help="score only the first N held-out batches a pass (default: all)")
    add(save, "--save-last-n-steps", type=int, metavar="N",
        help="with --save-every-n-steps: keep only the step saves of the last N steps, removing older ones this run "
        "wrote (kohya's; the final output always stays)")
    add(save, "--save-last-n-epochs", type=int, metavar="N",
        help="with --save-every-n-epochs / --save-n-epoch-ratio: keep only the last N epoch saves (kohya's)")
    add(save, "--save-n-epoch-ratio", type=int, metavar="N",
        help="save every floor(epochs / N) epochs (at least every epoch): about N epoch saves (kohya's; replaces "
        "--save-every-n-epochs)")
    add(save, "--save-state-on-train-end", action=bool_flag,
        help="also write the resumable state OUT-state/ after the last step (raise --steps and --resume to train on)")
    add(save, "--sample-at-first", action=bool_flag,
        help="with --sample-prompts: also sample before the first step (step000000-*.png: the untrained adaptation)")
    for field in ("title", "author", "description", "license", "tags"):
        add(save, f"--metadata-{field}", metavar="TEXT",
            help=f"written as modelspec.{field}" + (" (default: the output name)" if field == "title" else "")
            + (" (comma-separated)" if field == "tags" else ""))
    add(save, "--extract-lora", type=int, metavar="RANK",
        help="full/dreambooth: also write OUT-loraRANK.safetensors, the kohya LoRA of the change (tuned - base)")
    group = add_output_options(train, out_help="output file (default: <images folder>-<method>.safetensors; full/dreambooth: "
                               "an LDM .safetensors or a diffusers folder)", required=False,
                               dtype_help="float32, as trained")
    del group
    train.set_defaults(out=_UNSET)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` and ``train`` to a CLI."""
    methods = sorted(_methods())
    demo = sub.add_parser(
        "demo",
        help="teach the built-in toy model a concept it has never seen and show before/after scores and pictures",
        description="Teach the shipped toy text-to-image model a held-out concept from a handful of images, print "
        "before/after scores (held-out-concept accuracy, image-image and image-text similarity, prior accuracy), "
        "write a PNG grid and the adapter file. About a minute on a 2-core CPU; no downloads.",
    )
    demo.add_argument("--method", choices=methods, default="lora", help="the method to teach it with (default lora)")
    demo.add_argument("--concept", choices=["cross", "purple"], default="cross", help="held-out shape or colour to teach")
    demo.add_argument("--images", type=int, default=8, metavar="N",
                      help="how many training images of the concept the toy model draws (default 8; train --images "
                      "takes a folder)")
    demo.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the method's)")
    demo.add_argument("--prior", action=BooleanFlag, default=None,
                      help="regularise with the model's own images of held-in prompts (prior preservation; "
                      "default: the method's — on for the LoRA family and dreambooth)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the images, the training and the samples (default 0)")
    add_output_options(demo, out_help="output folder for before_after.png and CONCEPT-METHOD.safetensors "
                       "(default ./sdadapt-demo)", required=False, default="sdadapt-demo",
                       dtype_help="float32, as trained; applies to the adapter file")
    demo.set_defaults(run=_cmd_demo)

    train = sub.add_parser(
        "train",
        help="train a method on your own images (toy, diffusers folder, SD1/SD2/SDXL single file; kohya-like options)",
        description="Train METHOD on a folder of captioned images (kohya layout) on the toy model, a diffusers Stable "
        "Diffusion folder or an SD1/SD2/SDXL single-file checkpoint, with aspect-ratio buckets, and write the result "
        "(LoRA family: a kohya/LyCORIS .safetensors with kohya's ss_* metadata). Options come from flags and/or "
        "--config train.toml (flags win); everything is checked before the first step. Writes OUT, OUT-log.csv, and "
        "with the options OUT-stepN / OUT-samples/ / OUT-state/ (resume with --resume). See docs/train.md.",
    )
    train.add_argument("method", choices=methods)
    _add_train_arguments(train)
    train.set_defaults(run=_cmd_train)
