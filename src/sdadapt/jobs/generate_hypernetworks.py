"""``generate --hypernetwork FILE[:STRENGTH]``: A1111 hypernetworks read, checked against the model, injected.

A1111 chains the hypernetworks of a prompt's ``<hypernet:name:strength>`` tags in order; several
``--hypernetwork`` options chain the same way (:func:`sdadapt.inject_hypernetwork` with distinct
names). They are forward pre-hooks on the UNet's ``to_k``/``to_v`` (nothing is merged), applied
after any ``--lora`` merge, so a LoRA's K/V layers see the transformed context, as in A1111.

With ``--refiner`` each hypernetwork acts on the SDXL refiner as well (:func:`inject_refiner_hypernetwork`): A1111's
hypernetworks are global (``shared.loaded_hypernetworks``) and every attention forward of the loaded model calls
``apply_hypernetworks(shared.loaded_hypernetworks, context)`` (modules/sd_hijack_optimizations.py, each optimised
``CrossAttention`` forward; modules/hypernetworks/hypernetwork.py ``apply_single_hypernetwork``: the pair for
``context.shape[2]``, or nothing), so after the switch the refiner's cross-attention (its 1280-wide OpenCLIP-G context)
takes a file's 1280 pair, and its self-attention the pairs of its own widths (384, 768, 1536 on sd_xl_refiner_1.0).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WeightFileError

__all__ = ["inject_hypernetwork_option", "inject_refiner_hypernetwork", "read_hypernetwork_option"]

# the text-context width (cross-attention input) of each family; a hypernetwork's pair for it decides the family
_FAMILY_OF_TEXT_WIDTH = {768: "SD1", 1024: "SD2", 2048: "SDXL"}

_USE_INSTEAD = {
    "kohya-lora": "; it is a LoRA: use it with --lora FILE:SCALE",
    "lycoris": "; it is a LyCORIS file: use it with --lora FILE:SCALE",
    "kohya-oft": "; it is a kohya OFT (networks.oft): use it with --lora FILE:SCALE",
    "diffusers-lora": "; it is a LoRA: use it with --lora FILE:SCALE",
    "peft-lora": "; it is a peft LoRA: use it with --lora FILE:SCALE",
    "embedding": "; it is a textual-inversion embedding: use it with --embedding FILE",
    "checkpoint": "; it is a model, not an adapter: use it as --model",
    "custom-diffusion": "; it is a Custom Diffusion result: use it with --custom-diffusion FILE:SCALE",
    "aesthetic-embedding": "; it is an aesthetic embedding: use it with --aesthetic FILE",
}


def read_hypernetwork_option(path: Path, *, device: torch.device | str = "cpu"):
    """Load ``path`` as an A1111 hypernetwork (float32, as A1111 runs them) on ``device``.

    Returns:
        a :class:`~sdadapt.hypernetworks.Hypernetwork`.

    Raises:
        WeightFileError: unreadable, or another kind of file — the message says which kind
            (:func:`sdadapt.formats.detect.detect_kind`) and the option that takes it.
    """
    from ..formats.detect import detect_kind
    from ..formats.files import read_weights
    from ..hypernetworks import load_hypernetwork

    try:
        return load_hypernetwork(path, device=device)
    except WeightFileError as original:
        try:
            state, metadata = read_weights(path)
            kind = detect_kind(list(state), metadata)
        except WeightFileError:
            kind = None
        if kind is None or kind == "hypernetwork":
            raise WeightFileError(f"--hypernetwork {original}") from None
        raise WeightFileError(
            f"--hypernetwork {path}: this is {'an' if kind[:1] in 'aeiou' else 'a'} {kind} file, not an A1111 hypernetwork{_USE_INSTEAD.get(kind, '')}; "
            "run `python -m sdadapt inspect FILE` to see what it holds"
        ) from None


def _family(widths: list[int]) -> str:
    names = [_FAMILY_OF_TEXT_WIDTH[w] for w in widths if w in _FAMILY_OF_TEXT_WIDTH]
    return f" ({'/'.join(names)})" if names else ""


def inject_hypernetwork_option(system, hypernetwork, *, path: Path, strength: float, index: int):
    """Inject ``hypernetwork`` into ``system.unet`` at ``strength`` as ``generate_<index>``.

    Refused: a file for another family — it has widths this UNet lacks and no pair for the UNet's
    text-context width (an SD1 file's 768 on SD2's 1024: A1111 would run only its self-attention
    pairs there, silently); a file none of whose widths the UNet has.

    Returns:
        the :class:`~sdadapt.hypernetworks.HypernetworkHandle`.

    Raises:
        ValueError: the family mismatch (both widths named), no matching width, a bad strength.
    """
    from ..hypernetworks import context_widths, inject_hypernetwork

    unet = getattr(system, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise ValueError(f"--hypernetwork {path}: this model has no UNet to apply a hypernetwork to")
    layers = context_widths(unet)
    text = sorted({w for name, w in layers.items() if name.endswith("attn2.to_k")})
    own = [int(w) for w in hypernetwork.widths]
    foreign = [w for w in own if w not in set(layers.values())]
    if foreign and text and not set(text) & set(own):
        raise ValueError(
            f"--hypernetwork {path}: it was made for another model — its text-context pair is for width "
            f"{'/'.join(map(str, foreign))}{_family(foreign)} (its widths: {own}), this model's text context is "
            f"{'/'.join(map(str, text))}{_family(text)}; use a hypernetwork trained on this model's family"
        )
    try:
        return inject_hypernetwork(unet, hypernetwork, strength=strength, name=f"generate_{index}")
    except ValueError as exc:
        raise ValueError(f"--hypernetwork {path}: {exc}") from None


def inject_refiner_hypernetwork(refiner, hypernetwork, *, strength: float, index: int):
    """Inject ``hypernetwork`` (the one :func:`inject_hypernetwork_option` put on the base, shared: the same
    parameters) into the SDXL refiner's UNet at ``strength`` as ``generate_<index>``: every K/V projection whose
    input width it has a pair for, self- and cross-attention alike (A1111's ``apply_single_hypernetwork``: the pair
    of ``context.shape[2]``; module docstring). No family check: A1111 applies whatever fits the loaded model.

    Returns:
        the :class:`~sdadapt.hypernetworks.HypernetworkHandle`, or ``None`` when no layer of the refiner has one of
        the file's widths (A1111 then changes nothing there).
    """
    from ..hypernetworks import context_widths, inject_hypernetwork

    widths = set(context_widths(refiner.unet).values())
    if not widths & {int(w) for w in hypernetwork.widths}:
        return None
    return inject_hypernetwork(refiner.unet, hypernetwork, strength=strength, name=f"generate_{index}")
