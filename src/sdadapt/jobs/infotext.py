"""AUTOMATIC1111's "parameters" text (its *infotext*) for the PNGs ``generate`` writes.

A1111 keeps, in a ``parameters`` PNG text chunk of every image, the prompt, ``Negative prompt: ...`` and one line
of ``Key: value`` fields; its PNG Info tab, "Send to txt2img", civitai's image pages and ComfyUI's A1111
importers read it back. This module writes the same text for a ``generate`` run, following A1111 (read at
v1.10, ``modules/processing.py`` ``create_infotext``; ``modules/infotext_utils.py`` ``quote`` and
``parse_generation_parameters``, commit 036500223de0):

* the fields in ``create_infotext``'s order: Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash,
  Model, VAE hash, VAE, Variation seed, Variation seed strength, Seed resize from, Denoising strength,
  Conditional mask weight, Clip skip, ENSD, RNG, then ``p.extra_generation_params`` in the order A1111's
  processing adds them (the txt2img hires fix's ``init``, img2img's ``init`` mask fields, then the networks'
  ``Lora hashes`` / ``TI hashes``, then the refiner's), then Version; a field A1111 leaves out (``None``) is
  left out here;
* each value through A1111's ``quote``: JSON-quoted (``ensure_ascii=False``) when its text has ``,``, ``:`` or a
  newline; numbers as A1111's UI hands them over (a whole float such as CFG 7.0 or hires scale 2.0 as ``7`` /
  ``2``, since A1111's sliders reach Python through JSON; others as Python's ``repr``: ``7.5``, ``0.35``);
* the text: ``PROMPT[\\nNegative prompt: NEGATIVE]\\nFIELDS``, stripped.

Hashes as A1111 computes them: "Model hash" the checkpoint file's sha256, first 10 hex digits
(``sd_models.CheckpointInfo.shorthash``), "Model" its file name without the extension (``name_for_extra``);
"VAE hash" / "VAE" the same 10 digits and the file's base name (``sd_vae.get_loaded_vae_hash/name``); "Lora
hashes" ``NAME: HASH`` with HASH the file's ``sshs_model_hash`` metadata or else its sha256 over the bytes after the
safetensors header (sha256 of the whole file for other formats), 12 digits (``extra_networks_lora.activate``,
``networks.NetworkOnDisk.set_hash``); "TI hashes" ``NAME: HASH`` with the embedding file's sha256, 12 digits
(``textual_inversion.Embedding.set_hash``); "Refiner" ``NAME [HASH10]`` (``CheckpointInfo.short_title``).
A diffusers folder gets its name and no hash (A1111 loads no folders). Each file is hashed once per run; a
run in the same process reuses it while the file's size and modification time are unchanged (A1111 keeps
its hashes in ``cache.json`` by modification time). The sha256 costs one read of the file (about 1.5 GiB/s
on one core here: 1.3 s for a 2 GB checkpoint; docs/samplers.md).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..dynamic_thresholding import dynamic_thresholding_fields
from ..freeu import FREEU_FIELDS, FREEU_VERSION_FIELD, FREEU_WINDOW_FIELDS
from ..guidance_rescale import GUIDANCE_RESCALE_FIELD, RESCALE_CFG_FIELDS, as_guidance_rescale
from ..perturbed_attention import PAG_ADAPTIVE_FIELD, PAG_FIELDS, PAG_LAYERS_FIELD
from ..prompt_schedule import OLD_TIMELINES_FIELD
from ..sampler_tables import HIRES_UPSCALER_LABELS  # (its one home; re-exported here, where it always was)
from ..self_attention_guidance import SAG_FIELDS
from ..loopback import LOOPBACK_FIELDS
from ..sd_upscale import SD_UPSCALE_FIELDS
from ..soft_inpainting import soft_inpainting_fields
from ..tiling import TILING_FIELD
from ..token_merging import TOKEN_MERGING_FIELD, TOKEN_MERGING_HR_FIELD

__all__ = ["HIRES_UPSCALER_LABELS", "NOISE_FIELD", "VAE_ENCODE_FIELD", "VAE_TILING_FIELD", "InfotextRun", "a1111_number", "file_sha256",
           "format_infotext", "option_network_tags", "quote", "run_infotext"]

#: sampler names here whose A1111 sampler has ``uses_ensd`` (``sd_samplers_kdiffusion.samplers_k_diffusion``;
#: ``sd_samplers_common.is_sampler_using_eta_noise_seed_delta``): the ones whose infotext has ENSD
_USES_ENSD: frozenset[str] = frozenset({"euler_a", "dpm_2_a", "dpmpp_2s_a", "dpm_fast", "dpm_adaptive"})
#: sampler names here whose A1111 sampler has ``brownian_noise`` (its Brownian tree seeded by the image seeds): without
#: ``--noise`` sdadapt's tree is not A1111's, while every other sampler draws A1111's "CPU" numbers (start noise and
#: sampler noise from ``torch.Generator().manual_seed(seed)``, each pass afresh: tests/test_refiner_infotext.py; img2img
#: and every inpainting fill, whose "latent noise" is a fresh generator's first draw as A1111's create_random_tensors,
#: and an EDM model's euler / dpmsolver++, which draw nothing after the start noise: tests/test_infotext_gaps.py). An
#: EDM model's dpmsolver++_sde draws its step noise from the generator where A1111's "DPM++ 2M SDE" samples a tree.
_BROWNIAN: frozenset[str] = frozenset({"dpmpp_sde", "dpmsolver++_sde", "dpmsolver++_3m_sde", "dpmsolver++_sde_heun"})
#: ``--refiner-hires-pass`` -> A1111's "Hires refiner" (``hires_fix_refiner_pass``; "second pass" is not written)
_HIRES_REFINER: dict[str, str] = {"first": "first pass", "both": "both passes"}
#: ``--inpainting-fill`` -> A1111's "Masked content" ("original" is its default and not written)
_MASKED_CONTENT: dict[str, str] = {"fill": "fill", "latent-noise": "latent noise", "latent-nothing": "latent nothing"}
#: the field that names ``--vae-encode sample`` (sdadapt's own: A1111's "VAE Encoder" is its setting
#: ``sd_vae_encode_method``, "Full" or "TAESD" — which network encodes, not mean or sample —, read back by A1111
#: into that setting; its "Full" draws an unseeded posterior sample, so neither value says what sdadapt ran)
VAE_ENCODE_FIELD = "VAE encode"
#: sdadapt's field for ``--vae-tiling`` (the VAE's tiles change the image at their seams): "VAE tiling: True"
VAE_TILING_FIELD = "VAE tiling"
#: the field that names ``--noise`` in a ``--vae-encode sample`` run (sdadapt's own; no A1111 setting or field is
#: named so — its reader keeps it unapplied): there ``--noise a1111-cpu`` and sdadapt's generator both write ``RNG: CPU`` but draw differently
#: (A1111's order: the start noise first, the posterior ε apart; sdadapt's: diffusers' order, the ε before or between
#: the start and sampler noise), so the text would not tell them apart otherwise
NOISE_FIELD = "Noise"

_HASHES: dict[tuple[str, int, int, str], str] = {}  # (file, size, mtime_ns, kind) -> hex sha256


def a1111_number(value: float | int) -> int | float:
    """A number as A1111's UI holds it: a whole float (7.0) is the int JSON made of it (7), others unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def quote(value: object) -> str:
    """A1111's ``infotext_utils.quote``: ``str(value)``, JSON-quoted (non-ASCII kept) when it holds ``,``, ``:``
    or a newline."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_infotext(prompt: str, negative: str, fields: Mapping[str, object]) -> str:
    """A1111's ``create_infotext`` text: ``prompt``, ``"\\nNegative prompt: " + negative`` when ``negative`` is
    not empty, then the ``fields`` (in order; ``None`` left out; a field whose value is its own key written
    bare) joined by ``", "``, each value through :func:`quote` (a float through :func:`a1111_number`)."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            value = a1111_number(value)
        parts.append(key if key == value else f"{key}: {quote(value)}")
    negative_text = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{negative_text}\n{', '.join(parts)}".strip()


def file_sha256(path: str | os.PathLike, *, after_header: bool = False) -> str:
    """Hex sha256 of a file, read once per (file, size, modification time) in this process. ``after_header``:
    of the bytes after a safetensors header (A1111's ``addnet_hash_safetensors``, kohya's ``sshs_model_hash``)."""
    file = Path(path).resolve()
    stat = file.stat()
    key = (str(file), stat.st_size, stat.st_mtime_ns, "addnet" if after_header else "sha256")
    if key not in _HASHES:
        from ..merge.sources import sha256_of

        start = 0
        if after_header:
            with open(file, "rb") as handle:
                head = handle.read(8)
            if len(head) < 8:
                raise ValueError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            start = 8 + struct.unpack("<Q", head)[0]
        _HASHES[key] = sha256_of(file, start=start)
    return _HASHES[key]


def _lora_hash(path: Path) -> str | None:
    """A1111's LoRA short hash (12 digits) of ``path``; ``None`` for a folder (A1111 lists it with no hash)."""
    if path.is_dir():
        return None
    if path.suffix.lower() == ".safetensors":
        from ..formats.files import read_safetensors_header

        stored = read_safetensors_header(path)[1].get("sshs_model_hash")
        return (stored or file_sha256(path, after_header=True))[:12]
    return file_sha256(path)[:12]


def _aesthetic_fields(settings: Mapping[str, object]) -> dict[str, object]:
    """The A1111 aesthetic-gradients extension's fields in its order (aesthetic_clip.py ``set_aesthetic_params``,
    called by scripts/aesthetic.py ``process`` with ``float(aesthetic_lr)``, ``float(aesthetic_weight)``,
    ``int(aesthetic_steps)``): the learning rate and weight as Python prints a float (``0.0001``, ``1.0``), the steps,
    the embedding's name (its file name without ``.pt``: the extension's dropdown key), slerp and "text negative" as
    ``True`` / ``False``, the text as given (empty: written empty), the slerp angle."""
    return {
        "Aesthetic LR": repr(float(settings["lr"])), "Aesthetic weight": repr(float(settings["weight"])),
        "Aesthetic steps": int(settings["steps"]), "Aesthetic embedding": Path(str(settings["embedding"])).stem,
        "Aesthetic slerp": bool(settings.get("slerp", False)), "Aesthetic text": str(settings.get("text") or ""),
        "Aesthetic text negative": bool(settings.get("text_negative", False)),
        "Aesthetic slerp angle": float(settings.get("slerp_angle", 0.1))}


def _option_spec(item: object) -> tuple[Path, float]:
    """A ``--lora`` / ``--hypernetwork`` entry: ``(file, scale)``, or a bare file at 1.0 (the options' default)."""
    if isinstance(item, tuple):
        return Path(item[0]), float(item[1])
    return Path(item), 1.0  # type: ignore[arg-type]


def _network_name(path: Path) -> str | None:
    """The name A1111 looks a network file up by (its stem: ``networks.list_available_networks``,
    ``hypernetwork.list_hypernetworks``); ``None`` when no tag can name it: a folder (a peft adapter; A1111 loads
    no folders) or a stem holding ``:`` / ``>`` / ``=`` / a newline, which A1111's tag parser would cut
    (``extra_networks.re_extra_net`` ``<(\\w+):([^>]+)>``, split at ``:``; an item with one ``=`` is a named
    argument)."""
    if path.is_dir() or any(mark in path.stem for mark in (":", ">", "=", "\n")) or not path.stem:
        return None
    return path.stem


def option_network_tags(loras: Sequence[object] = (), hypernetworks: Sequence[object] = ()) -> str:
    """The prompt tags that name the ``--lora`` / ``--hypernetwork`` options of a run (each entry ``FILE`` or
    ``(FILE, SCALE)``): ``<lora:STEM:SCALE>`` for each LoRA-family file (LyCORIS too: A1111 >= 1.5 reads them
    as ``lora``, ``lyco`` being an alias), then ``<hypernet:STEM:STRENGTH>``, in the order given, joined with no
    separator; SCALE as Python prints the float (``0.8``, ``1.0``), as A1111's own "Add network to prompt"
    writes a network it applies without a tag (extensions-builtin/Lora/extra_networks_lora.py ``activate``,
    modules/extra_networks_hypernet.py ``activate``: ``f"<hypernet:{name}:{multiplier}>"``), which reads back
    to the same float. A file no tag can name (:func:`_network_name`) is left out. The infotext puts these in
    front of the prompt (:class:`InfotextRun`)."""
    tags = []
    for kind, items in (("lora", loras), ("hypernet", hypernetworks)):
        for item in items:
            path, scale = _option_spec(item)
            name = _network_name(path)
            if name is not None:
                tags.append(f"<{kind}:{name}:{scale!r}>")
    return "".join(tags)


def _tag_name(tag: str) -> str:
    """The name a ``<lora:NAME:...>`` tag mentions (A1111's ``mentioned_name``)."""
    inner = tag.strip()[1:-1]
    return inner.split(":")[1] if inner.count(":") >= 1 else inner


def _hash_list(pairs: Sequence[tuple[str, str | None]], *, unique: bool = False) -> str | None:
    """A1111's ``"NAME: HASH, NAME: HASH"`` (``:`` and ``,`` taken out of names; no hash: not listed). ``unique``:
    each name once, where it first comes, with its last hash — the "Lora hashes" rule, a dict keyed by the cleaned
    name (``p.lora_hashes[name] = shorthash``, extensions-builtin/Lora/extra_networks_lora.py ``activate``, A1111
    v1.10), so a LoRA given twice is listed once; without it every pair is listed (the "TI hashes" rule: A1111
    joins each text encoder call's list onto the one before, :class:`InfotextRun`)."""
    items: dict[str, str] | list[tuple[str, str]] = {} if unique else []
    for name, short in pairs:
        if not short:
            continue
        clean = name.replace(":", "").replace(",", "")
        if unique:
            items[clean] = short  # type: ignore[index]
        else:
            items.append((clean, short))  # type: ignore[union-attr]
    listed = items.items() if isinstance(items, dict) else items
    return ", ".join(f"{name}: {short}" for name, short in listed) or None


def _first_position(ids: Sequence[int], part: Sequence[int]) -> int:
    """Where ``part`` first occurs in ``ids`` as a contiguous run; -1 where it does not."""
    n = len(part)
    return next((i for i in range(len(ids) - n + 1) if n and list(ids[i:i + n]) == list(part)), -1)


def _checkpoint(path: str | os.PathLike | None) -> tuple[str | None, str | None]:
    """``(name_for_extra, shorthash)`` of a model file (A1111's ``CheckpointInfo``), a folder's name and no
    hash, ``(None, None)`` for the toy / nothing."""
    if path is None or str(path) == "toy":
        return None, None
    file = Path(path)
    if file.is_dir():
        return file.resolve().name, None
    if not file.is_file():
        return None, None
    return file.stem, file_sha256(file)[:10]


@dataclass
class InfotextRun:
    """One ``generate`` run's A1111 infotext: what is the same for every image, hashed once
    (:meth:`for_image` gives image i's text).

    Args (keyword only; ``None`` / 0: not used, the field left out as A1111 leaves it out):
        prompt, negative: the texts as given (comments taken out, ``<lora:>`` tags and embedding names kept, as
            A1111's infotext keeps them). hires_prompt, hires_negative: the hires pass's (``None``: the first's).
        sampler: the sampler name here (:data:`sdadapt.samplers.SAMPLERS`), written as A1111's display name
            where it follows an A1111 sampler (:func:`sdadapt.samplers.labels.a1111_label`), else as is.
        schedule, karras, schedule_asked: the σ grid run (``resolve_schedule``'s) and whether ``automatic`` was
            asked; hires_sampler, hires_schedule: the hires pass's.
        steps, guidance, seed (image 0's; image i: ``seed + i``), width, height (the first pass's).
        model, vae, refiner: the paths given (files hashed once); loras, hypernetworks: the ``--lora`` /
            ``--hypernetwork`` options, each ``FILE`` (at 1.0) or ``(FILE, SCALE)``: written as prompt tags in front
            of the prompt (and of a Hires prompt), :func:`option_network_tags`, so that A1111 — and sdadapt's own
            tag path — reading the text back applies them, in the order the run applied them (options before the
            prompt's tags: a hypernetwork chain's order matters); a LoRA's hash listed under its file stem, before
            the prompt's tags;
        refiner_switch_at, refiner_by_steps, refiner_hires_pass: the refiner's settings; the Refiner fields are
            written once :attr:`refiner_took` (A1111's ``apply_refiner`` writes "Refiner" / "Refiner switch at" / "Hires
            refiner" when it switches: ``generate`` sets it when a handoff took a call, and it stays set for the
            run's later images as A1111's ``p.extra_generation_params`` do); "Refiner switch by sampling steps" with
            ``refiner_by_steps`` on every image (A1111 writes it at the first model call).
        aesthetic: the aesthetic-gradient settings (keys ``embedding`` (a path), ``lr``, ``weight``, ``steps``,
            ``slerp``, ``text``, ``text_negative``, ``slerp_angle``), written as the A1111 extension
            stable-diffusion-webui-aesthetic-gradients writes them (aesthetic_clip.py ``set_aesthetic_params``).
        tiling: ``--tiling``, written "Tiling: True" after "RNG" as A1111 writes it (nothing when off).
        vae_tiling: ``--vae-tiling``, written "VAE tiling: True" (:data:`VAE_TILING_FIELD`; nothing when off).
        hypertile: ``(UNet settings, VAE settings, second pass)`` of ``--hypertile-*``
            (:func:`sdadapt.hypertile.hypertile_fields`), or ``None``.
        token_merging: ``(first pass, hires pass)`` token merging ratios, written "Token merging ratio" / "Token
            merging ratio hr" (the latter with a hires pass) after "ENSD" when not 0, as A1111 writes them.
        guidance_rescale: ``--guidance-rescale`` (a :class:`~sdadapt.guidance_rescale.GuidanceRescale` or its φ): in
            the ``combined`` space written as "CFG Rescale: PHI" (the A1111 extension CFG_Rescale_webui's field,
            added in its ``process``: after the aesthetic fields), in ``v`` as reForge's RescaleCFG writes it
            (``rescale_cfg_enabled: True, rescale_cfg_version: Normal, rescale_cfg_multiplier: PHI``, added before
            each pass samples: before the schedule fields); nothing when off.
        perturbed_attention: ``(scale, adaptive scale, layers)`` of ``--pag-scale`` / ``--pag-adaptive-scale`` /
            ``--pag-layers``, or ``None``: written as Forge's built-in PAG writes it
            (``PerturbedAttentionGuidance_enabled: True, PerturbedAttentionGuidance_scale: S``, added before each pass
            samples, after reForge's RescaleCFG fields), then SD.Next's "PAG adaptive" when not 0 and sdadapt's "PAG
            layers" (space-separated) when not ``mid`` alone.
        self_attention_guidance: ``(scale, blur sigma)`` of ``--sag-scale`` / ``--sag-blur-sigma``, or ``None``:
            written as Forge's built-in SAG writes it (``sag_enabled: True, sag_scale: S, sag_blur_sigma: B``, before
            the PAG fields: Forge's script order).
        dynamic_thresholding: the run's :class:`~sdadapt.dynamic_thresholding.DynamicThresholding`, or ``None``:
            for ``step_rule="calls"`` written as A1111's extension sd-dynamic-thresholding writes it ("Dynamic
            thresholding enabled: True, Mimic scale: ..., Threshold percentile: 100.0", the schedules' fields when a
            mode is not Constant; added in its ``process_batch``: after "Lora hashes", before "TI hashes"), for
            ``"timesteps"`` as Forge's built-in writes it (``dynthres_enabled: True, dynthres_mimic_scale: ...``,
            every field; before the FreeU fields: Forge's script order).
        freeu: ``(b1, b2, s1, s2, version[, start, end])`` of ``--freeu`` / ``--freeu-version`` /
            ``--freeu-window``, or ``None``: written as Forge's "FreeU Integrated" writes it (``freeu_enabled: True,
            freeu_b1: ..., freeu_s2: ...``, then newer Forge's ``freeu_start`` / ``freeu_end`` when the window is not
            (0, 1); before the SAG fields), then "FreeU version: diffusers" for diffusers' version.
        tag_loras: ``(tag, file)`` of the ``<lora:>`` tags of the first pass; hires_tag_loras: the hires pass's
            (A1111's hires pass adds its networks to ``p.lora_hashes``), listed after; each name listed once,
            where it first comes.
        embeddings, negative_embeddings: ``(name, file)`` of the embeddings the prompt / negative prompt use, in the
            order each text first uses them; text_encoders: how many of A1111's hijacked text encoders list them
            (SDXL's base 2: CLIP-L and OpenCLIP-G each write the list again; 1 otherwise).
        subseed, subseed_strength, seed_resize_from ``(height, width)``, ensd, noise: A1111's seed settings.
        denoising_strength: img2img's (or the hires pass's). mask_*: the inpaint settings A1111 writes.
        emphasis: A1111's "Emphasis mode" when not Original and a text encoded has "(" or "[" (else ``None``).
        schedule_fields: A1111's schedule settings as its ``get_sigmas`` writes them ("Schedule min sigma", "Schedule
            max sigma", "Schedule rho", "Beta schedule alpha/beta": :meth:`ScheduleOptions.infotext_fields`), then
            "Eta" as its ``initialize`` writes it (not 1, a sampler that takes it).
        uncond_skip, uncond_skips: the run's :class:`~sdadapt.uncond_skip.UncondSkip` and the rules that skipped a call
            so far (its ``seen`` keys): "Skip Early CFG" / "NGMS" / "NGMS all steps" written from the first skipped call
            on, as A1111's ``CFGDenoiser`` adds them to ``p.extra_generation_params``, before the Refiner fields (an
            NGMS that first skips after the refiner took over comes after them in A1111's text).
        pads: the paddings a call took (:mod:`sdadapt.cond_padding`'s ``seen`` keys): "Pad conds: True" / "Pad conds
            v0: True" after the Refiner fields, as A1111 adds them after each pass.
        vae_encode: ``--vae-encode``; ``"sample"`` is written as ``VAE encode: sample`` (:data:`VAE_ENCODE_FIELD`)
            after the hires and inpaint fields, where A1111's ``init`` would add a field of its encoding; the
            default ``"mean"`` is left out, as A1111 leaves its defaults out. The value is the option's own name,
            so the text reads back as ``--vae-encode sample``. With ``noise`` a sampled run also writes ``Noise:
            <noise>`` (:data:`NOISE_FIELD`), read back as ``--noise <noise>``: there "RNG" alone cannot tell A1111's
            order from sdadapt's. Without ``noise`` "RNG: CPU" stays (:meth:`_rng`): the draws are the seed's CPU
            generator's in diffusers' order — A1111, which samples the posterior from an unseeded RNG, cannot
            reproduce such a run under any "RNG", and its CPU source is that generator; left out it would read GPU.
    """

    prompt: str
    negative: str = ""
    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 7.5
    seed: int = 0
    width: int = 0
    height: int = 0
    schedule: str | None = None
    schedule_asked: bool = False
    karras: bool = False
    model: str | os.PathLike | None = None
    vae: str | os.PathLike | None = None
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    denoising_strength: float | None = None
    inpainting_conditioning: float | None = None
    clip_skip: int = 1
    ensd: int = 0
    noise: str | None = None
    hires: Mapping[str, object] | None = None
    mask: Mapping[str, object] | None = None
    loras: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]] = ()
    tag_loras: Sequence[tuple[str, str | os.PathLike]] = ()
    hires_tag_loras: Sequence[tuple[str, str | os.PathLike]] = ()
    hypernetworks: Sequence[str | os.PathLike | tuple[str | os.PathLike, float]] = ()
    embeddings: Sequence[tuple[str, str | os.PathLike]] = ()
    negative_embeddings: Sequence[tuple[str, str | os.PathLike]] = ()
    text_encoders: int = 1
    refiner: str | os.PathLike | None = None
    refiner_switch_at: float = 0.8
    refiner_by_steps: bool = False
    refiner_hires_pass: str | None = None
    refiner_took: bool = False
    aesthetic: Mapping[str, object] | None = None
    guidance_rescale: object = None
    perturbed_attention: tuple | None = None
    self_attention_guidance: tuple | None = None
    dynamic_thresholding: object = None
    soft_inpainting: object = None
    sd_upscale: tuple | None = None
    loopback: tuple | None = None
    img2img_alt: Mapping[str, object] | None = None
    hires_checkpoint: str | os.PathLike | None = None
    freeu: tuple | None = None
    tiling: bool = False
    vae_tiling: bool = False
    token_merging: tuple[float, float] = (0.0, 0.0)
    hypertile: tuple | None = None
    vae_encode: str = "mean"
    schedule_fields: Mapping[str, object] = field(default_factory=dict)
    emphasis: str | None = None
    old_timelines: bool = False
    uncond_skip: object = None
    uncond_skips: frozenset[str] = frozenset()
    pads: frozenset[str] = frozenset()
    version: str | None = None
    _fixed: dict = field(default_factory=dict, init=False, repr=False)
    _option_tags: str = field(default="", init=False, repr=False)
    _refiner_fields: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        from ..samplers.labels import a1111_label
        from ..samplers.schedules import SCHEDULE_LABELS

        def label(name: str) -> str:
            return a1111_label(name) or name

        def schedule_label(name: str | None, sampler: str) -> str | None:
            if name is None:
                return "Karras" if self.karras else None
            if self.schedule_asked and name == "uniform":  # (A1111's "Automatic" that resolves to no scheduler)
                return "Automatic"
            return SCHEDULE_LABELS[name]

        self._option_tags = option_network_tags(self.loras, self.hypernetworks)
        model_name, model_hash = _checkpoint(self.model)
        vae_name, vae_hash = (None, None) if self.vae is None else _checkpoint(self.vae)
        if self.vae is not None and vae_name is not None and Path(self.vae).is_file():
            vae_name = Path(self.vae).name  # (A1111's VAE name keeps the extension: os.path.basename)
        first_schedule = schedule_label(self.schedule, self.sampler)
        fields: dict[str, object] = {
            "Steps": self.steps, "Sampler": label(self.sampler), "Schedule type": first_schedule,
            "CFG scale": float(self.guidance), "Seed": None, "Size": f"{self.width}x{self.height}",
            "Model hash": model_hash, "Model": model_name, "VAE hash": vae_hash, "VAE": vae_name,
            "Variation seed": None,
            "Variation seed strength": None if not self.subseed_strength else float(self.subseed_strength),
            "Seed resize from": (None if not self.seed_resize_from or min(self.seed_resize_from) <= 0
                                 else f"{self.seed_resize_from[1]}x{self.seed_resize_from[0]}"),
            "Denoising strength": None if self.denoising_strength is None else float(self.denoising_strength),
            "Conditional mask weight": (None if self.inpainting_conditioning is None
                                        else float(self.inpainting_conditioning)),
            "Clip skip": None if self.clip_skip <= 1 else self.clip_skip,
            "ENSD": self.ensd if self.ensd and self.sampler in _USES_ENSD else None,
            TOKEN_MERGING_FIELD: self.token_merging[0] or None,  # (A1111's create_infotext: after ENSD)
            TOKEN_MERGING_HR_FIELD: (self.token_merging[1] or None) if self.hires is not None else None,
            "RNG": self._rng(),
            TILING_FIELD: True if self.tiling else None,  # (A1111's create_infotext: after RNG)
        }
        if self.sd_upscale is not None:  # (the SD upscale script's run(): before process_images, the first extras)
            fields.update(zip(SD_UPSCALE_FIELDS, self.sd_upscale))
        if self.loopback is not None:  # (the Loopback script's run(): its own extra_generation_params, the first)
            fields.update(zip(LOOPBACK_FIELDS, self.loopback))
        if self.img2img_alt is not None:  # (the img2img alternative test's run(): its fields, before process_images)
            fields.update(self.img2img_alt)
        if self.aesthetic is not None:  # (the extension's process(): before p.init, so before the hires fields)
            fields.update(_aesthetic_fields(self.aesthetic))
        rescale = as_guidance_rescale(self.guidance_rescale)
        if rescale is not None and rescale.space == "combined":  # (the CFG Rescale extension's process(), as the
            fields[GUIDANCE_RESCALE_FIELD] = rescale.phi  # aesthetic one's)
        if self.hypertile is not None:  # (A1111's Hypertile script: process(), then before_hr's second pass)
            from ..hypertile import hypertile_fields

            fields.update(hypertile_fields(*self.hypertile, hires=self.hires is not None))
        if self.soft_inpainting is not None and self.mask is not None:  # (its process(): before p.init)
            fields.update(soft_inpainting_fields(self.soft_inpainting))
        if self.hires is not None:  # StableDiffusionProcessingTxt2Img.init's order
            hires = dict(self.hires)
            if self.hires_checkpoint is not None:  # (its short_title, "name [shorthash]")
                name, short = _checkpoint(self.hires_checkpoint)
                fields["Hires checkpoint"] = name if short is None else f"{name} [{short}]"
            hr_sampler = hires.get("sampler")
            fields["Hires sampler"] = (None if hr_sampler is None or hr_sampler == self.sampler
                                       else label(str(hr_sampler)))
            fields["Hires prompt"] = (None if hires.get("prompt") in (None, self.prompt)
                                      else self._option_tags + str(hires["prompt"]))
            fields["Hires negative prompt"] = (None if hires.get("negative") in (None, self.negative)
                                               else hires["negative"])
            # (Forge's, after the hires texts: written when given, A1111 has no such setting)
            fields["Hires CFG Scale"] = None if hires.get("guidance") is None else float(hires["guidance"])
            hr_schedule = (schedule_label(hires.get("schedule"), str(hr_sampler)) if hr_sampler is not None
                           else first_schedule)
            fields["Hires schedule type"] = hr_schedule if hr_schedule != first_schedule else None
            if hires.get("width") or hires.get("height"):
                fields["Hires resize"] = f"{hires.get('width') or 0}x{hires.get('height') or 0}"
            else:
                fields["Hires upscale"] = float(hires["scale"])
            fields["Hires steps"] = hires.get("steps") or None
            upscaler = hires.get("upscaler")  # (a name, or an ESRGAN model's EsrganUpscaler: its A1111 name)
            fields["Hires upscaler"] = getattr(upscaler, "name", None) or HIRES_UPSCALER_LABELS.get(str(upscaler),
                                                                                                  upscaler)
        if self.mask is not None:  # StableDiffusionProcessingImg2Img.init's order
            mask = dict(self.mask)
            fields["Mask mode"] = "Inpaint not masked" if mask.get("invert") else None
            blur = float(mask.get("blur") or 0)
            fields["Mask blur"] = blur if blur > 0 else None
            if mask.get("region"):
                fields["Inpaint area"] = "Only masked"
                fields["Masked area padding"] = mask.get("padding")
            if mask.get("applied"):
                fields["Masked content"] = _MASKED_CONTENT.get(str(mask.get("fill")))
        fields[VAE_ENCODE_FIELD] = None if self.vae_encode == "mean" else self.vae_encode
        fields[VAE_TILING_FIELD] = True if self.vae_tiling else None
        fields[NOISE_FIELD] = self.noise if self.vae_encode != "mean" and self.noise else None
        options = [_option_spec(item)[0] for item in self.loras]
        lora_pairs = [(name, _lora_hash(file)) for file in options if (name := _network_name(file)) is not None]
        lora_pairs += [(_tag_name(tag), _lora_hash(Path(file))) for tag, file in [*self.tag_loras,
                                                                                    *self.hires_tag_loras]]
        fields["Lora hashes"] = _hash_list(lora_pairs, unique=True)
        dt = self.dynamic_thresholding
        if dt is not None and dt.step_rule == "calls":  # (A1111's extension: process_batch, before setup_conds)
            fields.update(dynamic_thresholding_fields(dt))
        fields[OLD_TIMELINES_FIELD] = True if self.old_timelines else None  # (setup_conds: get_conds_with_caching)
        # (A1111's sd_hijack_clip.py forward: each text encoder call lists the embeddings its texts use, each once in
        # the order they come, and puts its list before the one already there; the negative prompt is encoded first,
        # then the prompt, each by every hijacked text encoder: SDXL's two give "P, P, N, N")
        ti = [(name, None if Path(file).is_dir() else file_sha256(file)[:12])
              for name, file in ([*self.embeddings] * self.text_encoders
                                 + [*self.negative_embeddings] * self.text_encoders)]
        fields["TI hashes"] = _hash_list(ti)
        fields["Emphasis"] = self.emphasis  # (sd_hijack_clip, as the texts are encoded)
        if rescale is not None and rescale.space == "v":  # (reForge's process_before_every_sampling)
            fields.update(zip(RESCALE_CFG_FIELDS, (True, "Normal", rescale.phi)))
        if dt is not None and dt.step_rule == "timesteps":  # (Forge's built-in: sorting priority 11, before FreeU)
            fields.update(dynamic_thresholding_fields(dt))
        if self.freeu is not None:  # (Forge's FreeU script: process_before_every_sampling, sorted before SAG's)
            fields.update(zip(FREEU_FIELDS, (True, *map(float, self.freeu[:4]))))
            window = tuple(map(float, self.freeu[5:7])) or (0.0, 1.0)
            if window != (0.0, 1.0):  # (newer Forge's window, after s2)
                fields.update(zip(FREEU_WINDOW_FIELDS, window))
            fields[FREEU_VERSION_FIELD] = self.freeu[4] if self.freeu[4] != "v2" else None
        if self.self_attention_guidance is not None:  # (Forge's SAG script: process_before_every_sampling)
            fields.update(zip(SAG_FIELDS, (True, *map(float, self.self_attention_guidance))))
        if self.perturbed_attention is not None:  # (Forge's process_before_every_sampling; SD.Next's adaptive)
            scale, adaptive, layers = self.perturbed_attention
            fields.update(zip(PAG_FIELDS, (True, float(scale))))
            fields[PAG_ADAPTIVE_FIELD] = float(adaptive) if adaptive else None
            fields[PAG_LAYERS_FIELD] = None if tuple(layers) == ("mid",) else " ".join(layers)
        fields.update(self.schedule_fields)  # (KDiffusionSampler.get_sigmas, as each pass starts)
        if self.refiner is not None:  # (sd_samplers_common.apply_refiner's order; written per image: for_image)
            if self.refiner_by_steps:
                fields["Refiner switch by sampling steps"] = True
            name, short = _checkpoint(self.refiner)
            self._refiner_fields = {
                "Hires refiner": None if self.hires is None else _HIRES_REFINER.get(str(self.refiner_hires_pass)),
                "Refiner": name if short is None else f"{name} [{short}]",
                "Refiner switch at": float(self.refiner_switch_at)}
        if self.version is None:
            from .. import __version__

            self.version = f"sdadapt {__version__}"
        fields["Version"] = self.version
        self._fixed = fields

    def _rng(self) -> str | None:
        """A1111's "RNG" (``randn_source``, written when not its default "GPU"): "CPU" for ``a1111-cpu`` and for no
        ``noise`` on a sampler without a Brownian tree (sdadapt's CPU generator draws A1111's CPU numbers there:
        :data:`_BROWNIAN`), "NV" for ``a1111-nv``; nothing for ``a1111`` (the GPU/NV numbers, A1111's default)."""
        noise = (self.noise or "").strip().lower()
        if noise:
            return {"a1111-cpu": "CPU", "a1111-nv": "NV"}.get(noise)
        samplers = {self.sampler, *([] if self.hires is None or not self.hires.get("sampler") else
                                    [str(self.hires["sampler"])])}
        return None if samplers & _BROWNIAN else "CPU"

    def for_image(self, i: int, *, denoising: float | None = None, fixed_subseed: bool = False) -> str:
        """Image ``i``'s infotext: its seed ``seed + i`` (``seed`` for every image when the variation strength is not
        0: A1111's ``all_seeds``, :func:`sdadapt.jobs.generate.image_seed`); its variation seed ``subseed + i``; the
        Refiner fields once :attr:`refiner_took`. ``fixed_subseed`` (A1111's Loopback: each image its own
        ``process_images``, ``p.seed`` moved on, ``p.subseed`` not): the seed ``seed + i`` whatever the variation
        strength, the variation seed ``subseed``; ``denoising``: the image's own "Denoising strength"."""
        from .generate import image_seed

        fields = dict(self._fixed)
        fields["Seed"] = image_seed(self.seed, i, subseed_strength=0.0 if fixed_subseed else self.subseed_strength)
        if self.subseed_strength and self.subseed is not None:
            fields["Variation seed"] = self.subseed + (0 if fixed_subseed else i)
        if denoising is not None:
            fields["Denoising strength"] = float(denoising)
        version = fields.pop("Version")  # (what A1111 adds while sampling: before its Version, in its order)
        if self.uncond_skip is not None:
            fields.update(self.uncond_skip.fields(self.uncond_skips))
        if self.refiner is not None and self.refiner_took:
            fields.update(self._refiner_fields)
        for key in ("Pad conds", "Pad conds v0"):  # (sd_samplers_common.add_infotext, after each pass)
            if key in self.pads:
                fields[key] = True
        fields["Version"] = version
        return format_infotext(self._option_tags + self.prompt, self.negative, fields)


def _edm_grid(system, *, schedule: str | None, karras: bool) -> dict[str, object]:
    """``schedule`` / ``karras`` as the infotext names the σ grid: an EDM model's (Playground v2.5,
    ``system.edm``: diffusers' EDM schedulers on Karras' ρ grid, or a log-linear one) by A1111's schedule label for
    that grid — "Karras" / "Exponential" — beside the sampler's A1111 name (the EDM DPM-Solver is DPM++ 2M's
    update, the Euler one Euler's). A1111 itself cannot run these models (``sd_models_config.
    guess_model_config_from_state_dict`` has no EDM case and loads them as plain SDXL), so no A1111 infotext of such
    a run exists to match; this is what its vocabulary says of the grid run (docs/samplers.md)."""
    edm = getattr(system, "edm", None)
    if edm is None:
        return {"schedule": schedule, "karras": karras}
    if getattr(edm, "sigma_schedule", "karras") == "karras":
        return {"schedule": None, "karras": True}
    return {"schedule": "exponential", "karras": False}


def run_infotext(system, *, texts: tuple[str, str, str | None, str | None], sampler: str, steps: int,
                 guidance: float | None, seed: int, width: int, height: int, schedule: str | None, karras: bool,
                 schedule_asked: str | None, model: str | os.PathLike, vae: str | os.PathLike | None,
                 subseed: int | None, subseed_strength: float, seed_resize_from: tuple[int, int] | None, ensd: int,
                 noise: str | None, clip_skip: int, init_image: object, denoising_strength: float, hires: object,
                 hires_options: Mapping[str, object], mask: object, inpainting: object, inpainting_model: bool,
                 mask_options: Mapping[str, object], loras: Sequence, tag_loras: Sequence,
                 embedding_files: Mapping[str, Path], tokenize, refiner: str | os.PathLike | None,
                 refiner_switch_at: float, refiner_by_steps: bool = False, refiner_hires_pass: str | None = None,
                 aesthetic: Mapping[str, object] | None = None, hires_tag_loras: Sequence = (),
                 hypernetworks: Sequence = (), vae_encode: str = "mean", uncond_skip: object = None,
                 schedule_options: object = None, eta: float | None = None, eta_ddim: float | None = None,
                 noise_multiplier: float = 1.0, extra_noise: float = 0.0, churn: object = None,
                 emphasis: str | None = None, old_timelines: bool = False, guidance_rescale: object = None,
                 perturbed_attention: tuple | None = None, self_attention_guidance: tuple | None = None,
                 dynamic_thresholding: object = None, freeu: tuple | None = None, tiling: bool = False,
                 vae_tiling: bool = False,
                 token_merging: tuple[float, float] = (0.0, 0.0), hypertile: tuple | None = None,
                 soft_inpainting: object = None, sd_upscale: tuple | None = None,
                 loopback: tuple | None = None, img2img_alt: Mapping[str, object] | None = None,
                 hires_checkpoint: str | os.PathLike | None = None) -> InfotextRun:
    """The :class:`InfotextRun` of a ``generate`` run from its options as :func:`sdadapt.jobs.generate.run_generate`
    holds them once the model is loaded (``texts``: prompt, negative, hires prompt, hires negative as given, tags
    kept; ``guidance`` ``None``: the model's default; ``tokenize``: the model's text -> token ids, to list the
    embeddings the texts use as A1111's ``used_embeddings``; ``hires``: the checked request or ``None``;
    ``inpainting``: :func:`sdadapt.jobs.generate_inpaint.inpaint_inputs`'s result; ``aesthetic``: the
    aesthetic-gradient settings, :class:`InfotextRun`'s; ``loras`` / ``hypernetworks``: the options' ``(file,
    scale)``; ``tag_loras`` / ``hires_tag_loras``: the passes' :class:`~sdadapt.jobs.generate_prompt_tags.TagLoRA`;
    ``vae_encode``: ``--vae-encode``; ``uncond_skip``: the run's :class:`~sdadapt.uncond_skip.UncondSkip`;
    ``schedule_options``: A1111's schedule settings (:class:`~sdadapt.samplers.schedules.ScheduleOptions`), written
    as A1111's ``get_sigmas`` writes them for the passes' grids; ``eta``: A1111's "Eta for ancestral samplers";
    ``noise_multiplier``: A1111's "Noise multiplier for img2img" (written for an ``init_image`` run when not 1);
    ``extra_noise``: its "Extra noise multiplier for img2img and hires fix" (written when a pass starts from an
    image and it is not 0); ``churn``: its "Sigma churn" settings (:class:`sdadapt.samplers.churn.SigmaChurn`,
    written when a pass runs Euler, Heun or DPM2); ``guidance_rescale``: ``--guidance-rescale`` ("CFG Rescale");
    ``perturbed_attention``: ``(scale, adaptive scale, layers)`` of ``--pag-scale`` (Forge's PAG fields) or ``None``;
    ``self_attention_guidance``: ``(scale, blur sigma)`` of ``--sag-scale`` (Forge's SAG fields) or ``None``;
    ``dynamic_thresholding``: the run's :class:`~sdadapt.dynamic_thresholding.DynamicThresholding` (A1111's
    extension's fields or Forge's, by its step rule) or ``None``;
    ``soft_inpainting``: the run's :class:`~sdadapt.soft_inpainting.SoftInpainting` (A1111's fields, with a mask) or
    ``None``; ``sd_upscale``: ``(overlap, upscaler's A1111 name)`` of ``--sd-upscale`` (A1111's script's fields) or
    ``None``; ``loopback``: ``(final strength, curve's A1111 label)`` of ``--loopback`` (its script's fields) or
    ``None``; ``img2img_alt``: the img2img alternative test's fields
    (:meth:`sdadapt.inversion.euler_noise.Img2ImgAlternative.infotext_fields`) or ``None``; ``hires_checkpoint``: the
    hires pass's model (A1111's "Hires checkpoint", written before the other hires fields) or ``None``;
    ``freeu``: ``(b1, b2, s1, s2, version[, start, end])`` of ``--freeu`` / ``--freeu-window`` (Forge's FreeU fields)
    or ``None``;
    ``emphasis``: A1111's "Emphasis mode" to write (``None``: not written); ``old_timelines``: "Old prompt editing
    timelines: True" written (A1111's old timelines, where they change a schedule))."""
    import torch

    from ..sampler_tables import (
        CHURN_SAMPLERS,
        DISCARD_NEXT_TO_LAST_SIGMA,
        ETA_SAMPLERS,
        canonical_sampler,
    )
    from ..samplers.schedules import ScheduleOptions, canonical_schedule
    from ..samplers.sigma_space import DOWNCAST_FIELD, model_sigmas
    from ..sampling import default_guidance

    prompt, negative, hires_prompt, hires_negative = texts
    if guidance is None:  # (the scale the run's sample took: the system's default for the sampler)
        guidance = default_guidance(system, sampler)

    def used(text: str | None) -> list[tuple[str, Path]]:  # (in the order the text first uses them, as A1111's
        ids = tokenize(text) if text else []  # used_embeddings dict fills)
        found = [(_first_position(ids, tokenize(name)), name, file) for name, file in embedding_files.items()]
        return [(name, file) for at, name, file in sorted(item for item in found if item[0] >= 0)]

    hires_fields = None
    if hires is not None:
        hires_fields = {**hires_options, "prompt": hires_prompt, "negative": hires_negative}
    automatic = schedule_asked is not None and canonical_schedule(schedule_asked) == "automatic"
    grids = [schedule, *([hires_options.get("schedule")] if hires is not None else [])]
    schedule_fields: dict[str, object] = {}
    alphas = getattr(system, "alphas_cumprod", None)
    if alphas is not None and alphas.dtype == torch.float16:  # (apply_alpha_schedule_override: downcast, then ZTSNR)
        schedule_fields[DOWNCAST_FIELD] = True
    if getattr(system, "zero_terminal_snr", False):  # (apply_alpha_schedule_override, as the sampling starts)
        schedule_fields["Noise Schedule"] = "Zero Terminal SNR"
    if init_image is not None and noise_multiplier != 1.0:  # (img2img's sample, before its sampler starts)
        schedule_fields["Noise multiplier"] = float(noise_multiplier)
    passes = [sampler, *([hires_options.get("sampler") or sampler] if hires is not None else [])]
    if (schedule_options is not None and schedule_options.always_discard_next_to_last_sigma
            and any(canonical_sampler(s) not in DISCARD_NEXT_TO_LAST_SIGMA for s in passes)):
        schedule_fields["Discard penultimate sigma"] = True  # (get_sigmas / get_timesteps, where the setting forced it)
    for grid in grids:  # (A1111's scheduler, none where Automatic is the sampler's own: its get_sigmas writes nothing)
        if grid not in (None, "automatic") and not (automatic and grid == "uniform") and getattr(system, "edm", None) is None:
            schedule_fields.update((schedule_options or ScheduleOptions()).infotext_fields(
                str(grid), model_sigmas(system.alphas_cumprod, torch.float32)))
    if getattr(schedule_options, "sgm_noise_multiplier", False) and init_image is None:  # (sample, after get_sigmas)
        schedule_fields["SGM noise multiplier"] = True
    if extra_noise and (init_image is not None or hires is not None):  # (sample_img2img, after get_sigmas)
        schedule_fields["Extra noise"] = float(extra_noise)
    if eta is not None and eta != 1.0 and any(canonical_sampler(s) in ETA_SAMPLERS for s in passes):
        schedule_fields["Eta"] = float(eta)  # (KDiffusionSampler.initialize, after get_sigmas)
    if eta_ddim:  # (CompVisSampler.initialize: its eta_infotext_field, when not its default 0)
        schedule_fields["Eta DDIM"] = float(eta_ddim)
    if churn is not None and any(canonical_sampler(s) in CHURN_SAMPLERS for s in passes):
        schedule_fields.update(churn.infotext_fields())  # (Sampler.initialize, after the eta)
    mask_fields = None
    if init_image is not None and mask is not None:
        region = getattr(inpainting, "region", None)
        mask_fields = {**mask_options, "applied": inpainting is not None, "region": region is not None}
    return InfotextRun(
        prompt=prompt, negative=negative or "", sampler=sampler, steps=steps, guidance=float(guidance), seed=seed,
        width=width, height=height, **_edm_grid(system, schedule=schedule, karras=karras),
        schedule_asked=automatic, schedule_fields=schedule_fields,
        model=model, vae=vae, subseed=subseed, subseed_strength=subseed_strength,
        seed_resize_from=seed_resize_from, ensd=ensd, noise=noise, clip_skip=clip_skip,
        denoising_strength=(denoising_strength if init_image is not None
                            else None if hires is None else float(hires_options["denoising"])),
        inpainting_conditioning=float(mask_options.get("weight", 1.0)) if inpainting_model else None,
        hires=hires_fields, mask=mask_fields, loras=list(loras), hypernetworks=list(hypernetworks),
        tag_loras=[(item.tag, item.file) for item in tag_loras],
        hires_tag_loras=[(item.tag, item.file) for item in hires_tag_loras],
        embeddings=used(prompt), negative_embeddings=used(negative),
        text_encoders=2 if getattr(system, "is_sdxl", False) and not getattr(system, "is_refiner", False) else 1,
        refiner=refiner,
        refiner_switch_at=refiner_switch_at, refiner_by_steps=refiner_by_steps, refiner_hires_pass=refiner_hires_pass,
        aesthetic=aesthetic, vae_encode=vae_encode, uncond_skip=uncond_skip, emphasis=emphasis,
        old_timelines=old_timelines, guidance_rescale=guidance_rescale, perturbed_attention=perturbed_attention,
        self_attention_guidance=self_attention_guidance, dynamic_thresholding=dynamic_thresholding, freeu=freeu,
        tiling=tiling, vae_tiling=vae_tiling, token_merging=tuple(map(float, token_merging)), hypertile=hypertile,
        soft_inpainting=soft_inpainting, sd_upscale=sd_upscale, loopback=loopback,
        img2img_alt=img2img_alt, hires_checkpoint=hires_checkpoint)
