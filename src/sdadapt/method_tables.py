"""The training methods' names and ``train`` options, without torch.

``python -m sdadapt train`` and ``demo`` build their parsers from these (the method names, each method's
:class:`MethodOption` s, the optimiser and LR-schedule names), so ``--help`` and usage errors import no torch
(tests/test_cli_startup.py). This is their one home: :mod:`sdadapt.methods` registers each built-in method with
``options=METHOD_OPTIONS[name]`` and re-exports :class:`MethodOption` and the ``*_OPTIONS`` tuples;
:data:`OPTIMIZERS` is :data:`sdadapt.methods.optimizers.OPTIMIZERS`, :data:`LR_SCHEDULES`
:data:`sdadapt.methods.fit.SCHEDULES`, :data:`EXTRA_SCHEDULES` :data:`sdadapt.training.lr_schedules.EXTRA_SCHEDULES`.
A method registered at run time (:func:`sdadapt.methods.register_method`) is not here; the command line reads
the registry itself once :mod:`sdadapt.methods` is imported (:func:`sdadapt.cli.train`'s ``_methods``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CUSTOM_DIFFUSION_OPTIONS",
    "DORA_OPTIONS",
    "DREAMARTIST_OPTIONS",
    "DYLORA_OPTIONS",
    "EMBEDDING_OPTIONS",
    "EXTRA_SCHEDULES",
    "FULL_OPTIONS",
    "HYPERNETWORK_OPTIONS",
    "IA3_OPTIONS",
    "LOKR_OPTIONS",
    "LORA_OPTIONS",
    "LR_SCHEDULES",
    "METHOD_OPTIONS",
    "OFT_OPTIONS",
    "OPTIMIZERS",
    "MethodOption",
]


@dataclass(frozen=True)
class MethodOption:
    """An option of some methods' ``prepare``: a ``train`` flag, a TOML config key, a keyword.

    ``python -m sdadapt train METHOD`` adds one flag per option name over all methods (``flags``,
    default ``--name-with-dashes``), passes the value as ``prepare(system, name=value)`` when the
    user gives it, and refuses it for a method that does not declare it. In a ``--config`` TOML
    file the key is ``name``.

    Attributes:
        name: the ``prepare`` keyword and the TOML key (``snake_case``).
        type: converts the command-line text (``int``, ``float``, ``str``; ``bool`` makes an
            on/off ``--flag`` / ``--no-flag``).
        help: the ``--help`` text.
        flags: the option strings (e.g. ``("--network-dim", "--rank")``).
        metavar: the value's name in ``--help``.
        many: the option takes one or more values (``--base-weights A B``; a TOML list), each through
            ``type``; ``prepare`` gets a list.
    """

    name: str
    type: Callable[[str], Any] = str
    help: str = ""
    flags: tuple[str, ...] = ()
    metavar: str | None = None
    many: bool = False

    @property
    def option_strings(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.name.replace("_", "-"),)

#: the LoRA family's network options (kohya's --network_dim, --network_alpha, conv_dim/conv_alpha ...)
LORA_OPTIONS = (
    MethodOption("rank", int, "network rank (kohya --network_dim; default: the method's)", ("--network-dim", "--rank"), "R"),
    MethodOption("alpha", float, "network alpha: scale = alpha / rank (kohya --network_alpha; default: = rank)",
                 ("--network-alpha", "--alpha"), "A"),
    MethodOption("conv_rank", int, "rank of the 3x3 convolutions (kohya conv_dim; LoCon targets them; default: none, "
                 "locon: rank/2)", ("--conv-dim", "--conv-rank"), "R"),
    MethodOption("conv_alpha", float, "alpha of the 3x3 convolutions (kohya conv_alpha; default: = conv rank)",
                 ("--conv-alpha",), "A"),
    MethodOption("text_encoder", bool, "train the text encoder(s) too (LoRA family: on by default, --no-text-encoder "
                 "is kohya's --network_train_unet_only; dreambooth: on for the first half of the steps, see "
                 "--text-encoder-steps; full: off by default)", ("--text-encoder",)),
    MethodOption("targets", str, "UNet layers: kohya (transformer blocks, the default), attention (q/k/v/out only), "
                 "locon (every block layer incl. ResNets), or a LyCORIS preset (network_args preset=...): full, "
                 "full-lin, attn-mlp, attn-only, unet-only, unet-transformer-only, unet-convblock-only (UNet and "
                 "text-encoder layers as LyCORIS)", ("--network-targets",), "PRESET"),
    # kohya's block-wise network_args (sdadapt.methods.lora_blocks) and LyCORIS-style config args
    MethodOption("down_lr_weight", str, "kohya block lr weights of the 12 down blocks (SDXL: 9 input blocks): a comma "
                 "list or a preset cosine, sine, linear, reverse_linear, zeros with optional +N", (), "W,W,...|PRESET"),
    MethodOption("mid_lr_weight", str, "kohya block lr weight of the mid block (SDXL: 3 middle blocks), comma list",
                 (), "W[,W,W]"),
    MethodOption("up_lr_weight", str, "kohya block lr weights of the 12 up blocks (SDXL: 9 output blocks), as "
                 "--down-lr-weight", (), "W,W,...|PRESET"),
    MethodOption("block_lr_zero_threshold", float, "block lr weights not above this become 0: those blocks get no "
                 "modules (kohya's; default 0)", (), "X"),
    MethodOption("block_dims", str, "kohya ranks per block: 25 comma-separated ints (12 down, 1 mid, 12 up; SDXL 23); "
                 "0 = no modules in that block", (), "R,R,..."),
    MethodOption("block_alphas", str, "kohya alphas per block (25, SDXL 23; default: --network-alpha, else each "
                 "block's rank)", (), "A,A,..."),
    MethodOption("conv_block_dims", str, "kohya ranks of the 3x3 convolutions per block (25, SDXL 23; adds the "
                 "convolutions)", (), "R,R,..."),
    MethodOption("conv_block_alphas", str, "kohya alphas of the 3x3 convolutions per block (default: --conv-alpha, "
                 "else each block's conv rank)", (), "A,A,..."),
    MethodOption("dropout", float, "neuron dropout of the adapters' hidden units (kohya --network_dropout, LyCORIS "
                 "dropout; default 0)", ("--network-dropout",), "P"),
    MethodOption("rank_dropout", float, "drop each rank of the adapters with probability P per step (kohya/LyCORIS "
                 "rank_dropout)", (), "P"),
    MethodOption("module_dropout", float, "skip each adapter module with probability P per step (kohya/LyCORIS "
                 "module_dropout)", (), "P"),
    MethodOption("use_tucker", bool, "Tucker core for the 3x3 convolutions (LyCORIS use_tucker / use_cp)", ()),
    MethodOption("init", str, "LoRA / LoCon / DoRA: the down factor's start, kaiming (kohya's, default) or gaussian "
                 "(peft's N(0, 1/r), diffusers' DreamBooth LoRA scripts); network_args init=gaussian", ("--lora-init",),
                 "KIND"),
    MethodOption("train_norm", bool, "also train offsets of the GroupNorm/LayerNorm layers inside the adapted UNet "
                 "blocks (LyCORIS train_norm; w_norm/b_norm in the file)", ()),
    # kohya's --network_weights / --dim_from_weights (sdadapt.methods.network_weights)
    MethodOption("network_weights", str, "start the adapters from this LoRA/LyCORIS file (kohya --network_weights): "
                 "its family, ranks and alphas must be the options' (else --dim-from-weights)", ("--network-weights",),
                 "FILE"),
    MethodOption("dim_from_weights", bool, "with --network-weights: take the modules, family, ranks and alphas from "
                 "the file instead of --network-dim etc. (kohya --dim_from_weights)", ("--dim-from-weights",)),
    # LoRA+ (sdadapt.methods.loraplus): kohya network_args, and top-level keys in kohya configs before 2024-04
    MethodOption("loraplus_lr_ratio", float, "LoRA+: the lora_up (B) factors learn at R x the learning rate "
                 "(kohya network_args loraplus_lr_ratio; the paper: 16)", ("--loraplus-lr-ratio",), "R"),
    MethodOption("loraplus_unet_lr_ratio", float, "LoRA+ ratio of the UNet's up factors (default: --loraplus-lr-ratio)",
                 ("--loraplus-unet-lr-ratio",), "R"),
    MethodOption("loraplus_text_encoder_lr_ratio", float, "LoRA+ ratio of the text encoders' up factors (default: "
                 "--loraplus-lr-ratio)", ("--loraplus-text-encoder-lr-ratio",), "R"),
    MethodOption("unet", bool, "adapt the UNet (default on; --no-unet is kohya's --network_train_text_encoder_only: "
                 "the text encoder(s) only)", ("--unet",)),
    # kohya's --base_weights (sdadapt.methods.base_weights)
    MethodOption("base_weights", str, "LoRA files merged into the model before training (kohya --base_weights); the "
                 "file written holds only what this run learns", ("--base-weights",), "FILE", many=True),
    MethodOption("base_weights_multiplier", float, "the --base-weights files' multipliers, in order (missing ones: 1.0)",
                 ("--base-weights-multiplier",), "M", many=True),
)
#: LoKr's options: the LoRA family's + LyCORIS' Kronecker split (network_args factor, decompose_both)
LOKR_OPTIONS = LORA_OPTIONS + (
    MethodOption("factor", int, "LoKr: the Kronecker split size of each dimension (LyCORIS factor; -1, the default: "
                 "the most square split)", ("--lokr-factor",), "F"),
    MethodOption("decompose_both", bool, "LoKr: also split the first Kronecker factor into a low-rank pair (LyCORIS "
                 "decompose_both)", ("--decompose-both",)),
)
#: DyLoRA's options (kohya's networks.dylora create_network: network_dim/alpha, conv_dim = network_dim, unit, LoRA+)
DYLORA_OPTIONS = tuple(o for o in LORA_OPTIONS if o.name in (
    "rank", "alpha", "conv_rank", "conv_alpha", "text_encoder", "unet", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "network_weights")) + (
    MethodOption("unit", int, "DyLoRA: rows trained per step; the file can be cut to any multiple of it (kohya "
                 "network_args unit; default 1; --network-dim must be a multiple)", ("--dylora-unit",), "N"),
)
#: (IA)³'s options: the LoRA family's that apply to a vector per layer + LyCORIS' train_on_input
IA3_OPTIONS = tuple(o for o in LORA_OPTIONS if o.name in ("text_encoder", "targets", "module_dropout", "unet",
                                                          "network_weights")) + (
    MethodOption("train_on_input", bool, "(IA)³: scale every layer's inputs (--train-on-input) or outputs "
                 "(--no-train-on-input); default: with the ia3 preset feed-forward output layers on their inputs, the "
                 "rest (and every layer of another preset) on outputs, as LyCORIS",
                 ("--train-on-input",)),
)
#: OFT's options: network_dim / conv_dim as LyCORIS' OFT block size, the preset, + LyCORIS' constraint and rescaled
OFT_OPTIONS = tuple(o for o in LORA_OPTIONS if o.name in ("rank", "conv_rank", "text_encoder", "targets", "module_dropout",
                                                          "unet", "network_weights")) + (
    MethodOption("constraint", float, "Diag-OFT / BOFT: COFT, each layer's ‖Q‖ <= constraint × its output width "
                 "(LyCORIS constraint, written as the layer's alpha; default 0: none)", (), "C"),
    MethodOption("rescaled", bool, "Diag-OFT / BOFT: also train a scale per output row (LyCORIS rescaled)", ()),
)
#: full fine-tuning's and DreamBooth's options
FULL_OPTIONS = (MethodOption("text_encoder", bool, "train the text encoder(s) too (LoRA family: on by default, "
                              "--no-text-encoder is kohya's --network_train_unet_only; dreambooth: on for the first half "
                              "of the steps, see --text-encoder-steps; full: off by default)", ("--text-encoder",)),
                 MethodOption("block_lr", str, "SDXL: the UNet's learning rate per block, 23 comma-separated values "
                              "(kohya sdxl_train.py --block_lr; 0 freezes a block)", ("--block-lr",), "LR,LR,..."))
#: textual inversion's options (``train textual-inversion --token "<sks>" --init-word WORD --vectors K``); DreamArtist shares them
EMBEDDING_OPTIONS = (
    MethodOption("token", str, "the trigger word the captions use (textual inversion, DreamArtist), e.g. '<sks>'", ("--token",), "WORD"),
    MethodOption("init_word", str, "start the vectors from this word's token embeddings (default: the trigger's own row "
                 "when the vocabulary has it, else random)", ("--init-word",), "WORD"),
    MethodOption("vectors", int, "vectors per trigger word: it becomes this many tokens (default 1)", ("--vectors",), "K"),
    MethodOption("norm_weight", float, "textual inversion: weight of the norm penalty keeping the vectors at the "
                 "vocabulary's scale (default 0: off)", ("--norm-weight",), "W"),
    MethodOption("init_weights", str, "textual inversion, DreamArtist: start the vectors from this embedding file "
                 "(kohya's --weights: A1111 .pt/.safetensors, kohya emb_params, diffusers, SDXL clip_l + clip_g; its "
                 "vector count must be --vectors; DreamArtist: FILE and the FILE-neg beside it, --negative-vectors); "
                 "--init-word is then unused", ("--init-weights",), "FILE"),
)


DREAMARTIST_OPTIONS = EMBEDDING_OPTIONS[:3] + EMBEDDING_OPTIONS[4:5] + (
    MethodOption("negative_vectors", int, "DreamArtist: vectors of the negative embedding (default: = --vectors)",
                 ("--negative-vectors",), "K"),
    MethodOption("negative_init_word", str, "DreamArtist: start the negative embedding from this word's token embeddings "
                 "(the extension's 'Initialization text (negative)'; default: --init-word)", ("--negative-init-word",), "WORD"),
    MethodOption("cfg_scale", str, "DreamArtist: training CFG scale (default 3), the low end with "
                 "--cfg-high; or the extension's dynamic 'low-high:type' (e.g. 1.5-3.5:cos)", ("--cfg-scale",), "S"),
    MethodOption("cfg_high", float, "DreamArtist: dynamic CFG from --cfg-scale (t=0) to this (t=T)", ("--cfg-high",), "S"),
    MethodOption("cfg_schedule", str, "DreamArtist: dynamic CFG shape ln, cos or cos2 (default ln)", ("--cfg-schedule",), "TYPE"),
    MethodOption("neg_lr_weight", float, "DreamArtist: the negative embedding's learning rate relative to the positive's",
                 ("--neg-lr-weight",), "W"),
    MethodOption("rec_weight", float, "DreamArtist: weight of the reconstruction loss through the decoder (default 0: off)",
                 ("--rec-weight",), "W"),
)
#: Custom Diffusion's options: the modifier token (+ init word) and whether Q/out train too
CUSTOM_DIFFUSION_OPTIONS = EMBEDDING_OPTIONS[:2] + (
    MethodOption("train_q_out", bool, "Custom Diffusion: also train the cross-attention to_q and to_out (diffusers' "
                 "--freeze_model crossattn; default: K/V only)", ("--train-q-out",)),
    MethodOption("token_lr_scale", float, "Custom Diffusion: the modifier token's learning rate relative to the weights' "
                 "(default 10; 1 is diffusers' one rate for both)", ("--token-lr-scale",), "X"),
)

#: DoRA's options: the LoRA family's + the magnitude's axis (LyCORIS' network_args wd_on_output)
DORA_OPTIONS = LORA_OPTIONS + (
    MethodOption("wd_on_output", bool, "DoRA: normalise each output row (default, LyCORIS since 2025-04, peft, "
                 "diffusers); --no-wd-on-output: each input column, the axis A1111 and InvokeAI apply",
                 ("--wd-on-output",)),
)
#: the hypernetwork's creation settings (A1111's "Create hypernetwork" fields) and the file to continue training
HYPERNETWORK_OPTIONS = (
    MethodOption("layer_structure", str, "hypernetwork: the MLP's width multipliers, first and last 1 (A1111's "
                 "'Modules layer structure'; default '1, 2, 1')", ("--layer-structure",), "LIST"),
    MethodOption("activation", str, "hypernetwork: the activation after each hidden Linear, A1111's names (linear, "
                 "relu, leakyrelu, elu, swish, tanh, sigmoid, prelu, ...; default relu)", ("--activation",), "NAME"),
    MethodOption("layer_norm", bool, "hypernetwork: a LayerNorm after every Linear (A1111's 'Add layer normalization'; "
                 "default on)", ("--layer-norm",)),
    MethodOption("weight_init", str, "hypernetwork: Normal, XavierUniform, XavierNormal, KaimingUniform or KaimingNormal "
                 "(default Normal)", ("--weight-init",), "NAME"),
    MethodOption("dropout_structure", str, "hypernetwork: a dropout probability per layer-structure entry, first and "
                 "last 0 (A1111's 'Dropout structure', e.g. '0, 0.3, 0'; default no dropout)", ("--dropout-structure",),
                 "LIST"),
    MethodOption("activate_output", bool, "hypernetwork: the activation after the last Linear too (default off)",
                 ("--activate-output",)),
    MethodOption("hypernetwork_file", str, "hypernetwork: continue training this A1111 .pt (or .safetensors twin): its "
                 "settings and weights, its step counted on (the settings above are then the file's)",
                 ("--hypernetwork-file",), "FILE"),
)

#: each built-in method's ``train`` options, in :data:`sdadapt.methods.METHODS`' order (``sorted`` for the
#: ``train METHOD`` / ``demo --method`` choices); :mod:`sdadapt.methods` registers each with these
METHOD_OPTIONS: dict[str, tuple[MethodOption, ...]] = {
    "lora": LORA_OPTIONS, "locon": LORA_OPTIONS, "loha": LORA_OPTIONS, "lokr": LOKR_OPTIONS, "glora": LORA_OPTIONS,
    "dora": DORA_OPTIONS, "dylora": DYLORA_OPTIONS, "ia3": IA3_OPTIONS, "diag-oft": OFT_OPTIONS, "boft": OFT_OPTIONS,
    "full": FULL_OPTIONS, "dreambooth": FULL_OPTIONS, "hypernetwork": HYPERNETWORK_OPTIONS,
    "textual-inversion": EMBEDDING_OPTIONS, "dreamartist": DREAMARTIST_OPTIONS,
    "clip-inversion": EMBEDDING_OPTIONS[:1], "custom-diffusion": CUSTOM_DIFFUSION_OPTIONS,
}

#: optimiser names (kohya's spellings are accepted case-insensitively by :func:`sdadapt.methods.optimizers.make_optimizer`)
OPTIMIZERS = ("adamw", "adamw8bit", "adamw-bf16", "adafactor", "lion", "lion-bf16", "sgd-nesterov", "prodigy",
              "dadapt-adam", "dadapt-lion", "dadapt-adam-preprint", "adamw-schedulefree",
              "sgd-schedulefree")
#: the LR schedules of :mod:`sdadapt.training.lr_schedules` (kohya's/diffusers' names beyond torch's own)
EXTRA_SCHEDULES = ("piecewise_constant", "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")
#: LR schedules (``constant_with_warmup`` is kohya's/diffusers' name for ``warmup``; the last four:
#: :data:`EXTRA_SCHEDULES`)
LR_SCHEDULES = ("constant", "constant_with_warmup", "warmup", "cosine", "cosine_with_restarts", "linear", "polynomial",
                *EXTRA_SCHEDULES)
