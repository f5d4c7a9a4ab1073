"""Training methods, by name: each builds an :class:`~sdadapt.methods.fit.Adaptation` on a system
(anything implementing the :class:`~sdadapt.methods.system.System` protocol).

``METHODS[name]`` is a :class:`Method` — how to prepare the adaptation, its default fitting
options, and whether it needs DreamBooth's prior images. The ``demo`` and ``train`` commands and
the quality benchmark iterate this registry, so a method added with :func:`register_method`
gets all three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .clip_inversion import ClipInversionAdaptation, prepare_clip_inversion
from .custom_diffusion import CustomDiffusion, companion_token_files, prepare_custom_diffusion
from .dylora import DyLoRAAdaptation, prepare_dylora
from .dreamartist import DreamArtist, negative_files, prepare_dreamartist, sample_dreamartist
from .finetune import FullAdaptation, class_images, prepare_dreambooth, prepare_full
from .fit import Adaptation, FitConfig, cuda_graph_clashes, fit
from .hypernetwork import HypernetworkAdaptation, prepare_hypernetwork
from .ia3 import prepare_ia3
from .oft import prepare_boft, prepare_diag_oft
from .lora import (
    AdapterAdaptation,
    prepare_dora,
    prepare_glora,
    prepare_locon,
    prepare_loha,
    prepare_lokr,
    prepare_lora,
)
from .system import System, check_system
from .textual_inversion import TextualInversion, prepare_textual_inversion, template_captions

__all__ = [
    "Method",
    "cuda_graph_clashes",
    "MethodOption",
    "LORA_OPTIONS",
    "LOKR_OPTIONS",
    "System",
    "check_system",
    "Prior",
    "METHODS",
    "register_method",
    "Adaptation",
    "AdapterAdaptation",
    "FullAdaptation",
    "FitConfig",
    "fit",
    "class_images",
    "prepare_lora",
    "prepare_locon",
    "prepare_full",
    "prepare_dreambooth",
    "prepare_loha",
    "prepare_lokr",
    "prepare_dora",
    "prepare_glora",
    "prepare_dylora",
    "DyLoRAAdaptation",
    "DYLORA_OPTIONS",
    "prepare_ia3",
    "IA3_OPTIONS",
    "prepare_diag_oft",
    "prepare_boft",
    "OFT_OPTIONS",
    "ClipInversionAdaptation",
    "prepare_clip_inversion",
    "HypernetworkAdaptation",
    "prepare_hypernetwork",
    "TextualInversion",
    "prepare_textual_inversion",
    "template_captions",
    "DreamArtist",
    "prepare_dreamartist",
    "sample_dreamartist",
    "CustomDiffusion",
    "prepare_custom_diffusion",
]


Prior = Literal["off", "auto", "required"]


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


@dataclass(frozen=True)
class Method:
    """One training method: ``prepare(system) -> Adaptation`` plus its defaults.

    ``prior`` says whether it regularises with *class images* (DreamBooth's prior preservation,
    kohya's "reg images": what the unadapted model makes for a class prompt, trained on alongside
    the instance images): ``"off"`` only when asked, ``"auto"`` whenever class prompts are known
    (always on the toy model; with ``--class-prompt`` on a user's model), ``"required"`` always
    (an error without class prompts).
    """

    name: str
    summary: str
    prepare: Callable[..., Adaptation]
    learning_rate: float
    steps: int
    prior: Prior = "off"
    file_suffix: str = ".safetensors"
    #: other suffixes ``save`` writes (textual inversion: ``.pt`` = A1111's dict); ``train -o`` accepts them too
    other_suffixes: tuple[str, ...] = ()
    #: options ``prepare`` takes as keywords (``train`` flags and TOML keys; see :class:`MethodOption`)
    options: tuple[MethodOption, ...] = ()
    #: the method learns a trigger word: ``prepare`` needs ``token=WORD``, the word the captions use
    #: (textual inversion, DreamArtist); ``demo`` and the quality benchmark pass the concept word
    trigger: bool = False
    #: the files ``save(path)`` writes beside ``path`` (DreamArtist's ``<name>-neg.pt``, Custom Diffusion's
    #: token embedding): ``train`` checks them before the first step and replaces them only with ``--overwrite``
    companion_files: Callable[[Path], tuple[Path, ...]] | None = None

    def outputs(self, path: Path) -> tuple[Path, ...]:
        """``path`` and the files saving there writes beside it."""
        path = Path(path)
        return (path, *(self.companion_files(path) if self.companion_files is not None else ()))

    def adapt(self, system, *, seed: int = 0, **options: Any) -> Adaptation:
        """``prepare(system, **options)`` with the adapters' random initialisation drawn from ``seed``.

        The global torch RNG is forked, so the caller's random state is left as it was and the
        same seed gives the same adapters (hence the same training run) every time.

        Raises:
            ValueError: an option this method does not declare (names the ones it has).
        """
        known = {o.name for o in self.options}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{self.name} has no option {', '.join(unknown)}; its options: {', '.join(sorted(known)) or 'none'}")
        if self.trigger and not options.get("token"):
            raise ValueError(f"{self.name} learns a trigger word: pass token=WORD (--token), the word the captions use, e.g. '<sks>'")
        check_system(system)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.prepare(system, **options)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    """Add (or replace) a method in :data:`METHODS`."""
    METHODS[method.name] = method


register_method(Method("lora", "LoRA r8 on the UNet transformer blocks and the text encoder (kohya file)", prepare_lora, 3e-3, 600, "auto", options=LORA_OPTIONS))
register_method(Method("locon", "LoRA + conv LoRA on every UNet block layer (kohya LoCon file)", prepare_locon, 3e-3, 600, "auto", options=LORA_OPTIONS))
register_method(Method("loha", "LoHa r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_loha, 3e-3, 600, "auto", options=LORA_OPTIONS))
#: LoKr's options: the LoRA family's + LyCORIS' Kronecker split (network_args factor, decompose_both)
LOKR_OPTIONS = LORA_OPTIONS + (
    MethodOption("factor", int, "LoKr: the Kronecker split size of each dimension (LyCORIS factor; -1, the default: "
                 "the most square split)", ("--lokr-factor",), "F"),
    MethodOption("decompose_both", bool, "LoKr: also split the first Kronecker factor into a low-rank pair (LyCORIS "
                 "decompose_both)", ("--decompose-both",)),
)
register_method(Method("lokr", "LoKr r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_lokr, 3e-3, 600, "auto", options=LOKR_OPTIONS))
register_method(Method("glora", "GLoRA r4 (W·a1·a2 + b1·b2) on the UNet transformer blocks and the text encoder "
                       "(LyCORIS file)", prepare_glora, 3e-3, 600, "auto", options=LORA_OPTIONS))
register_method(Method("dora", "DoRA (LoRA r8 + magnitude) on the UNet transformer blocks and the text encoder", prepare_dora, 3e-3, 600, "auto", options=LORA_OPTIONS))
#: DyLoRA's options (kohya's networks.dylora create_network: network_dim/alpha, conv_dim = network_dim, unit, LoRA+)
DYLORA_OPTIONS = tuple(o for o in LORA_OPTIONS if o.name in (
    "rank", "alpha", "conv_rank", "conv_alpha", "text_encoder", "unet", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "network_weights")) + (
    MethodOption("unit", int, "DyLoRA: rows trained per step; the file can be cut to any multiple of it (kohya "
                 "network_args unit; default 1; --network-dim must be a multiple)", ("--dylora-unit",), "N"),
)
register_method(Method("dylora", "DyLoRA r8 (kohya networks.dylora: a random slice of unit rows trains per step; "
                       "the file cuts to any multiple of unit) on the UNet transformer blocks and the text encoder",
                       prepare_dylora, 3e-3, 600, "auto", options=DYLORA_OPTIONS))
#: (IA)³'s options: the LoRA family's that apply to a vector per layer + LyCORIS' train_on_input
IA3_OPTIONS = tuple(o for o in LORA_OPTIONS if o.name in ("text_encoder", "targets", "module_dropout", "unet",
                                                          "network_weights")) + (
    MethodOption("train_on_input", bool, "(IA)³: scale every layer's inputs (--train-on-input) or outputs "
                 "(--no-train-on-input); default: with the ia3 preset feed-forward output layers on their inputs, the "
                 "rest (and every layer of another preset) on outputs, as LyCORIS",
                 ("--train-on-input",)),
)
# lr 1e-1: tuned on the toy like every default here (LoRA 3e-3); on SD LyCORIS' 5e-3 to 1e-2 (docs/lycoris.md)
register_method(Method("ia3", "(IA)³ vectors on LyCORIS' ia3 preset layers: attention K/V and feed-forward outputs "
                       "(LyCORIS file)", prepare_ia3, 1e-1, 600, "auto", options=IA3_OPTIONS))
#: OFT's options: network_dim / conv_dim as LyCORIS' OFT block size, the preset, + LyCORIS' constraint and rescaled
OFT_OPTIONS = tuple(o for o in LORA_OPTIONS if o.name in ("rank", "conv_rank", "text_encoder", "targets", "module_dropout",
                                                          "unet", "network_weights")) + (
    MethodOption("constraint", float, "Diag-OFT / BOFT: COFT, each layer's ‖Q‖ <= constraint × its output width "
                 "(LyCORIS constraint, written as the layer's alpha; default 0: none)", (), "C"),
    MethodOption("rescaled", bool, "Diag-OFT / BOFT: also train a scale per output row (LyCORIS rescaled)", ()),
)
register_method(Method("diag-oft", "Diag-OFT: block-diagonal orthogonal rotations of LyCORIS' full preset layers' "
                       "output rows (LyCORIS file; --network-dim is the block size)", prepare_diag_oft, 3e-3, 600, "auto",
                       options=OFT_OPTIONS))
register_method(Method("boft", "BOFT: butterfly orthogonal rotations of LyCORIS' full preset layers' output rows "
                       "(LyCORIS file; --network-dim is the even block size)", prepare_boft, 3e-3, 600, "auto",
                       options=OFT_OPTIONS))
_FULL_OPTIONS = (MethodOption("text_encoder", bool, "train the text encoder(s) too (LoRA family: on by default, "
                              "--no-text-encoder is kohya's --network_train_unet_only; dreambooth: on for the first half "
                              "of the steps, see --text-encoder-steps; full: off by default)", ("--text-encoder",)),
                 MethodOption("block_lr", str, "SDXL: the UNet's learning rate per block, 23 comma-separated values "
                              "(kohya sdxl_train.py --block_lr; 0 freezes a block)", ("--block-lr",), "LR,LR,..."))
register_method(Method("full", "native fine-tune of the whole UNet", prepare_full, 2e-4, 600, options=_FULL_OPTIONS))
register_method(Method("dreambooth", "fine-tune of the UNet + the text encoder (first half of the steps) with prior "
                       "preservation", prepare_dreambooth, 1e-3, 1000, "required", options=_FULL_OPTIONS))
register_method(Method("hypernetwork", "A1111 hypernetwork (1,2,1 relu+LayerNorm K/V MLPs on every attention context width; .pt)",
                       prepare_hypernetwork, 3e-2, 600, "auto", file_suffix=".pt"))
#: textual inversion's options (``train textual-inversion --token "<sks>" --init-word WORD --vectors K``); DreamArtist shares them
EMBEDDING_OPTIONS = (
    MethodOption("token", str, "the trigger word the captions use (textual inversion, DreamArtist), e.g. '<sks>'", ("--token",), "WORD"),
    MethodOption("init_word", str, "start the vectors from this word's token embeddings (default: the trigger's own row "
                 "when the vocabulary has it, else random)", ("--init-word",), "WORD"),
    MethodOption("vectors", int, "vectors per trigger word: it becomes this many tokens (default 1)", ("--vectors",), "K"),
    MethodOption("norm_weight", float, "textual inversion: weight of the norm penalty keeping the vectors at the "
                 "vocabulary's scale (default 0: off)", ("--norm-weight",), "W"),
    MethodOption("init_weights", str, "textual inversion: start the vectors from this embedding file (kohya's --weights: "
                 "A1111 .pt/.safetensors, kohya emb_params, diffusers, SDXL clip_l + clip_g; its vector count must be "
                 "--vectors); --init-word is then unused", ("--init-weights",), "FILE"),
)
DREAMARTIST_OPTIONS = EMBEDDING_OPTIONS[:3] + (
    MethodOption("negative_vectors", int, "DreamArtist: vectors of the negative embedding (default: = --vectors)",
                 ("--negative-vectors",), "K"),
    MethodOption("negative_init_word", str, "DreamArtist: start the negative embedding from this word's token embeddings "
                 "(the extension's 'Initialization text (negative)'; default: --init-word)", ("--negative-init-word",), "WORD"),
    MethodOption("cfg_scale", float, "DreamArtist: training CFG scale (default 3), the low end with --cfg-high", ("--cfg-scale",), "S"),
    MethodOption("cfg_high", float, "DreamArtist: dynamic CFG from --cfg-scale (t=0) to this (t=T)", ("--cfg-high",), "S"),
    MethodOption("cfg_schedule", str, "DreamArtist: dynamic CFG shape ln, cos or cos2 (default ln)", ("--cfg-schedule",), "TYPE"),
    MethodOption("neg_lr_weight", float, "DreamArtist: the negative embedding's learning rate relative to the positive's",
                 ("--neg-lr-weight",), "W"),
    MethodOption("rec_weight", float, "DreamArtist: weight of the reconstruction loss through the decoder (default 0: off)",
                 ("--rec-weight",), "W"),
)
register_method(Method("textual-inversion", "textual inversion: new token vectors for the trigger word (--token), nothing else trains",
                       prepare_textual_inversion, 1e-2, 400, options=EMBEDDING_OPTIONS, trigger=True,
                       other_suffixes=(".pt",)))
register_method(Method("dreamartist", "DreamArtist: positive + negative embeddings trained through CFG (<name>.pt + <name>-neg.pt)",
                       prepare_dreamartist, 1e-2, 400, file_suffix=".pt", options=DREAMARTIST_OPTIONS, trigger=True,
                       companion_files=negative_files))
register_method(Method("clip-inversion", "CLIP inversion: one vector in the image-embedding space, bound to the trigger word "
                       "(toy; best on the toy-image variant)", prepare_clip_inversion, 5e-2, 600,
                       options=EMBEDDING_OPTIONS[:1], trigger=True))
#: Custom Diffusion's options: the modifier token (+ init word) and whether Q/out train too
CUSTOM_DIFFUSION_OPTIONS = EMBEDDING_OPTIONS[:2] + (
    MethodOption("train_q_out", bool, "Custom Diffusion: also train the cross-attention to_q and to_out (diffusers' "
                 "--freeze_model crossattn; default: K/V only)", ("--train-q-out",)),
    MethodOption("token_lr_scale", float, "Custom Diffusion: the modifier token's learning rate relative to the weights' "
                 "(default 10; 1 is diffusers' one rate for both)", ("--token-lr-scale",), "X"),
)
register_method(Method("custom-diffusion", "Custom Diffusion: cross-attention K/V + a modifier token (--token), class images "
                       "(diffusers file + <name>-token file)", prepare_custom_diffusion, 3e-3, 400, "auto",
                       options=CUSTOM_DIFFUSION_OPTIONS, trigger=True, companion_files=companion_token_files,
                       other_suffixes=(".bin",)))
