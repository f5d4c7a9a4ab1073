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

from ..method_tables import (  # (torch-free, for the command line's parsers: their one home, re-exported here)
    CUSTOM_DIFFUSION_OPTIONS,
    DREAMARTIST_OPTIONS,
    DYLORA_OPTIONS,
    EMBEDDING_OPTIONS,
    IA3_OPTIONS,
    LOKR_OPTIONS,
    LORA_OPTIONS,
    METHOD_OPTIONS,
    OFT_OPTIONS,
    MethodOption,
)
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
    "EMBEDDING_OPTIONS",
    "DREAMARTIST_OPTIONS",
    "CUSTOM_DIFFUSION_OPTIONS",
    "METHOD_OPTIONS",
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
class Method:
    """One training method: ``prepare(system) -> Adaptation`` plus its defaults.

    ``prior`` says whether it regularises with *class images* (DreamBooth's prior preservation,
    kohya's "reg images": what the unadapted model makes for a class prompt, trained on alongside
    the instance images): ``"off"`` only when asked, ``"auto"`` whenever class prompts are known
    (always on the toy model; with ``--class-prompt`` on a user's model), ``"required"`` always
    (an error without class prompts) unless turned off by name (``--no-prior``: kohya's ``train_db.py`` without
    ``reg_data_dir``, diffusers' ``train_dreambooth.py`` without ``--with_prior_preservation``).
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


register_method(Method("lora", "LoRA r8 on the UNet transformer blocks and the text encoder (kohya file)", prepare_lora, 3e-3, 600, "auto", options=METHOD_OPTIONS["lora"]))
register_method(Method("locon", "LoRA + conv LoRA on every UNet block layer (kohya LoCon file)", prepare_locon, 3e-3, 600, "auto", options=METHOD_OPTIONS["locon"]))
register_method(Method("loha", "LoHa r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_loha, 3e-3, 600, "auto", options=METHOD_OPTIONS["loha"]))
register_method(Method("lokr", "LoKr r4 on the UNet transformer blocks and the text encoder (LyCORIS file)", prepare_lokr, 3e-3, 600, "auto", options=METHOD_OPTIONS["lokr"]))
register_method(Method("glora", "GLoRA r4 (W·a1·a2 + b1·b2) on the UNet transformer blocks and the text encoder "
                       "(LyCORIS file)", prepare_glora, 3e-3, 600, "auto", options=METHOD_OPTIONS["glora"]))
register_method(Method("dora", "DoRA (LoRA r8 + magnitude) on the UNet transformer blocks and the text encoder", prepare_dora, 3e-3, 600, "auto", options=METHOD_OPTIONS["dora"]))
register_method(Method("dylora", "DyLoRA r8 (kohya networks.dylora: a random slice of unit rows trains per step; "
                       "the file cuts to any multiple of unit) on the UNet transformer blocks and the text encoder",
                       prepare_dylora, 3e-3, 600, "auto", options=METHOD_OPTIONS["dylora"]))
# lr 1e-1: tuned on the toy like every default here (LoRA 3e-3); on SD LyCORIS' 5e-3 to 1e-2 (docs/lycoris.md)
register_method(Method("ia3", "(IA)³ vectors on LyCORIS' ia3 preset layers: attention K/V and feed-forward outputs "
                       "(LyCORIS file)", prepare_ia3, 1e-1, 600, "auto", options=METHOD_OPTIONS["ia3"]))
register_method(Method("diag-oft", "Diag-OFT: block-diagonal orthogonal rotations of LyCORIS' full preset layers' "
                       "output rows (LyCORIS file; --network-dim is the block size)", prepare_diag_oft, 3e-3, 600, "auto",
                       options=METHOD_OPTIONS["diag-oft"]))
register_method(Method("boft", "BOFT: butterfly orthogonal rotations of LyCORIS' full preset layers' output rows "
                       "(LyCORIS file; --network-dim is the even block size)", prepare_boft, 3e-3, 600, "auto",
                       options=METHOD_OPTIONS["boft"]))
register_method(Method("full", "native fine-tune of the whole UNet", prepare_full, 2e-4, 600, options=METHOD_OPTIONS["full"]))
register_method(Method("dreambooth", "fine-tune of the UNet + the text encoder (first half of the steps) with prior "
                       "preservation", prepare_dreambooth, 1e-3, 1000, "required", options=METHOD_OPTIONS["dreambooth"]))
register_method(Method("hypernetwork", "A1111 hypernetwork (1,2,1 relu+LayerNorm K/V MLPs on every attention context width; .pt)",
                       prepare_hypernetwork, 3e-2, 600, "auto", file_suffix=".pt", options=METHOD_OPTIONS["hypernetwork"]))
register_method(Method("textual-inversion", "textual inversion: new token vectors for the trigger word (--token), nothing else trains",
                       prepare_textual_inversion, 1e-2, 400, options=METHOD_OPTIONS["textual-inversion"], trigger=True,
                       other_suffixes=(".pt",)))
register_method(Method("dreamartist", "DreamArtist: positive + negative embeddings trained through CFG (<name>.pt + <name>-neg.pt)",
                       prepare_dreamartist, 1e-2, 400, file_suffix=".pt", options=METHOD_OPTIONS["dreamartist"], trigger=True,
                       companion_files=negative_files))
register_method(Method("clip-inversion", "CLIP inversion: one vector in the image-embedding space, bound to the trigger word "
                       "(toy; best on the toy-image variant)", prepare_clip_inversion, 5e-2, 600,
                       options=METHOD_OPTIONS["clip-inversion"], trigger=True))
register_method(Method("custom-diffusion", "Custom Diffusion: cross-attention K/V + a modifier token (--token), class images "
                       "(diffusers file + <name>-token file)", prepare_custom_diffusion, 3e-3, 400, "auto",
                       options=METHOD_OPTIONS["custom-diffusion"], trigger=True, companion_files=companion_token_files,
                       other_suffixes=(".bin",)))
