"""AUTOMATIC1111's infotext read back: ``generate --infotext IMAGE.png`` takes an image's "parameters" text (A1111's,
or the one ``generate`` writes, :mod:`sdadapt.jobs.infotext`) as its options — A1111's "PNG Info" / "Send to
txt2img".

:func:`parse_infotext` is A1111's ``parse_generation_parameters`` (v1.10 ``modules/infotext_utils.py``) without the
defaults it fills for its UI: the prompt lines, the ``Negative prompt:`` lines, and the last line's ``Key: value``
fields (a line with fewer than three is still prompt), JSON-quoted values unquoted, a ``WxH`` value as ``Key-1`` /
``Key-2``, an empty value dropped (A1111's parse fails on it and skips the field). :func:`infotext_options` maps the fields to :func:`sdadapt.jobs.generate.run_generate`'s options and says
which it did not take: the ones that only name files (Model hash, Lora hashes...: give the files) and the settings
sdadapt has no option for (their image would differ).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["INFORMATIONAL_FIELDS", "infotext_options", "parse_infotext", "read_infotext"]

_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # (A1111's re_param)
_SIZE = re.compile(r"^(\d+)x(\d+)$")  # (A1111's re_imagesize)

#: fields that name the files the run used and set nothing (``--model``, ``--vae``, ``--lora-dir``... give those
#: files; the hashes are for checking), and the writer's version
INFORMATIONAL_FIELDS: frozenset[str] = frozenset({
    "Model", "Model hash", "VAE", "VAE hash", "Lora hashes", "TI hashes", "Version", "Refiner", "Hires checkpoint",
    "Init image hash", "User", "Hypernet", "Hypernet hash", "Hypernet strength"})
_MODEL_FILES = frozenset({"Model", "Model hash", "VAE", "VAE hash", "Refiner", "Hires checkpoint"})

_RNG = {"CPU": "a1111-cpu", "NV": "a1111-nv", "GPU": "a1111"}
_HIRES_REFINER = {"first pass": "first", "both passes": "both", "second pass": "second"}
#: the A1111 samplers that write "Eta DDIM" (its timestep samplers with an eta: CompVisSampler.initialize)
_ETA_DDIM_SAMPLERS = ("DDIM", "DDIM CFG++")


def parse_infotext(text: str) -> dict[str, str]:
    """A1111's ``parse_generation_parameters`` of an infotext (module docstring): ``{"Prompt": ..., "Negative prompt":
    ..., field: value}``, values as text (``Size: 512x768`` -> ``Size-1: 512``, ``Size-2: 768``)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    fields: dict[str, str] = {}
    for key, value in _PARAM.findall(last):
        if not value:  # (A1111's v[0] raises on an empty value: "Error parsing", the field dropped)
            continue
        if value[:1] == '"' and value[-1:] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value)
        if size is not None:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
        else:
            fields[key] = value
    if "Hypernet" in fields:  # (A1111's: an infotext from before extra networks names it in a field, not a tag)
        prompt += f"<hypernet:{fields['Hypernet']}:{fields.get('Hypernet strength', '1.0')}>"
    _restore_old_hires_fix(fields)
    return {"Prompt": prompt, "Negative prompt": negative, **fields}


def _restore_old_hires_fix(fields: dict[str, str]) -> None:
    """A1111's ``restore_old_hires_fix_params`` (in place): an infotext of the old hires fix (before v1.0, "First pass
    size: WxH", ``0x0`` for its default) made a first pass of that size and a hires pass to "Size"; as the hires fix
    of now: "Size" the first pass, "Hires resize" the final size. ``0x0``: A1111's
    ``old_hires_fix_first_pass_dimensions``, the 512² area at the final aspect, sides rounded up to 64."""
    try:
        first_w, first_h = int(fields["First pass size-1"]), int(fields["First pass size-2"])
        width, height = int(fields.get("Size-1", 512)), int(fields.get("Size-2", 512))
    except (KeyError, ValueError):
        return
    if first_w == 0 or first_h == 0:
        scale = math.sqrt(512 * 512 / (width * height)) if width and height else 1.0
        first_w, first_h = math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64
    del fields["First pass size-1"], fields["First pass size-2"]
    fields["Size-1"], fields["Size-2"] = str(first_w), str(first_h)
    fields["Hires resize-1"], fields["Hires resize-2"] = str(width), str(height)


def read_infotext(path: str | os.PathLike) -> str:
    """The infotext of ``path``: a PNG's ``parameters`` text chunk (A1111's and ``generate``'s), a JPEG's or WebP's
    EXIF ``UserComment`` (where A1111 writes it in those formats: :func:`sdadapt.image_exif.exif_user_comment`), or
    a text file's contents (A1111's "PNG Info" copied out).

    Raises:
        ValueError: an image without the infotext, or a file that is none of these, naming it.
    """
    from ..image_exif import exif_user_comment, image_kind
    from ..images import read_png_text

    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(12)
    kind = image_kind(head)
    if kind is not None:
        text = read_png_text(path).get("parameters") if kind == "png" else exif_user_comment(path.read_bytes())
        if not text:
            where = "'parameters' text" if kind == "png" else "EXIF UserComment"
            raise ValueError(f"{path}: this {kind.upper()} has no {where} (A1111's infotext); it was not written by "
                             "A1111 or generate, or its metadata was stripped")
        return text
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: neither a PNG nor a UTF-8 text file; give the PNG A1111 wrote, or its "
                         "'parameters' text saved as a .txt") from None


def _take_choice(fields: Mapping[str, str], field: str, option: str, flag: str, labels: Mapping[str, str],
                 options: dict[str, object], taken: set[str]) -> None:
    """``options[option]``: the name of ``fields[field]`` (an A1111 label or a name, :func:`canonical_choice`), if it
    is one of sdadapt's; else left for the fields not taken."""
    from ..sampler_tables import canonical_choice

    if field in fields:
        try:
            options[option] = canonical_choice(flag, fields[field], dict(labels))
        except ValueError:
            return
        taken.add(field)


def _take_upscaler_file(fields: Mapping[str, str], field: str, option: str, folder: str | os.PathLike | None,
                        options: dict[str, object], taken: set[str]) -> None:
    """``options[option]``: the ESRGAN model file under ``folder`` that A1111 names ``fields[field]``
    (:func:`sdadapt.esrgan.upscaler_in_folder`), when the field is not taken yet and there is one."""
    if field not in fields or field in taken or folder is None:
        return
    from ..esrgan import upscaler_in_folder

    found = upscaler_in_folder(fields[field], folder)
    if found is not None:
        options[option] = str(found)
        taken.add(field)


def _a1111_version(text: object) -> tuple | None:
    """A1111's ``parse_version`` of an infotext's Version (``modules/infotext_versions.py``: ``v1.6.0-2-gabc`` read
    as ``v1.6.0-2``) as a sortable key ``((major, minor, patch), rank, n)`` — rank −1 a pre-release (``-RC``), 0 the
    release, 1 a build past it (``-225``, packaging's post-release) — or ``None`` where packaging would not parse it
    (Forge's ``f2.0.1v1.10.1-...``)."""
    if text is None:
        return None
    text = str(text).strip()
    cut = re.match(r"([^-]+-[^-]+)-.*", text)
    if cut:
        text = cut.group(1)
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:-(\d+)|-?(rc|a|b|alpha|beta|c|pre|preview)(\d*))?", text,
                     flags=re.IGNORECASE)
    if m is None:
        return None
    core = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    if m.group(4) is not None:
        return core, 1, int(m.group(4))
    if m.group(5) is not None:
        return core, -1, int(m.group(6) or 0)
    return core, 0, 0


def _from_a1111(fields: Mapping[str, str]) -> bool:
    """Whether an infotext is A1111's (or a fork's) rather than sdadapt's, which writes no Schedule type on a sampler's
    own diffusers grid: its Version does not name sdadapt (A1111 before 1.9 wrote no Schedule type, and its paste reads
    none as "Automatic": ``get_sampler_and_scheduler``'s ``schedulers[0]``)."""
    return not str(fields.get("Version", "")).strip().lower().startswith("sdadapt")


def _label_schedule(label: str) -> str | None:
    """The schedule an A1111 sampler label names (``"DPM++ 2M Karras"``: ``karras``), ``None`` for none or a label
    sdadapt does not read."""
    from ..sampler_tables import sampler_schedule_from_label

    try:
        return sampler_schedule_from_label(str(label))[1]
    except ValueError:
        return None


def _passes_not_reading_half_alphas(options: Mapping[str, object]) -> list[str]:
    """The passes' samplers (labels as the infotext gives them) of ``options`` that would not read a float16 ᾱ
    (:func:`sdadapt.samplers.check_downcast_run`): no schedule (diffusers' grid), A1111's timestep samplers..."""
    from ..sampler_tables import sampler_schedule_from_label
    from ..samplers import check_downcast_run

    passes = [(options.get("sampler"), options.get("schedule"))]
    if options.get("hires_sampler") is not None or "hires_scale" in options or "hires_width" in options:
        passes.append((options.get("hires_sampler") or options.get("sampler"),
                       options.get("hires_schedule") or options.get("schedule")))
    unread = []
    for label, schedule in passes:
        try:
            name, own = sampler_schedule_from_label(str(label if label is not None else "ddim"))
            check_downcast_run(name, schedule=schedule or own)
        except ValueError:
            unread.append(str(label if label is not None else "DDIM (no Sampler field)"))
    return unread


#: A1111's backcompat releases (``infotext_versions.py``: ``v160``, ``v170_tsnr``) as :func:`_a1111_version` keys
_V160, _V170_TSNR = ((1, 6, 0), 0, 0), ((1, 7, 0), 1, 225)


def _made_before(version: object, release: tuple) -> bool:
    """Whether an infotext's Version is before ``release`` (:func:`_a1111_version`'s key), as A1111's backcompat
    ("auto_backcompat", on by default) compares it: v1.6.0 turns "Old prompt editing timelines" on for a prompt with
    ``[`` and "Pad conds v0" on for Sampler DDIM / PLMS, v1.7.0-225 "Downcast alphas_cumprod" (those versions halved ᾱ
    with the model); a Version it cannot parse, nothing."""
    key = _a1111_version(version)
    return key is not None and key < release


def infotext_options(fields: Mapping[str, str], *, img2img: bool = False, inpaint: bool = False,
                     refiner: bool = False, sd_upscale: bool = False, loopback: bool = False,
                     upscaler_dir: str | os.PathLike | None = None,
                     model: str | os.PathLike | None = None) -> tuple[dict[str, object], list[str]]:
    """``(options, not_taken)``: :func:`sdadapt.jobs.generate.run_generate` keywords of parsed infotext ``fields``
    (:func:`parse_infotext`) and the fields it did not take, each with why. ``img2img`` / ``inpaint`` / ``refiner``:
    the run has an init image / a mask / a refiner (their fields are taken only then: the infotext cannot give the
    images or the refiner's file); ``sd_upscale`` / ``loopback``: the run is an SD upscale / a loopback (A1111 writes
    neither the scale nor the number of loops). ``upscaler_dir``: where the ESRGAN models an upscaler field names
    are (A1111's ``models/ESRGAN``: "Hires upscaler: 4x-UltraSharp" taken as that folder's file). ``model``: the run's
    model: "Refiner" (without ``refiner``) and "Hires checkpoint" are taken as the checkpoints of those names beside it
    (:func:`sdadapt.jobs.models.checkpoint_by_name`, A1111's lookup), when there are such files.

    Raises:
        ValueError: a field whose value is not what A1111 writes there (a number that is not one), naming it.
    """
    from ..dynamic_thresholding import dynamic_thresholding_from_fields
    from ..freeu import FREEU_FIELDS, FREEU_VERSION_FIELD, FREEU_WINDOW_FIELDS
    from ..guidance_rescale import GUIDANCE_RESCALE_FIELDS_READ, RESCALE_CFG_FIELDS
    from ..hypertile import hypertile_options
    from ..perturbed_attention import (
        PAG_ADAPTIVE_FIELD,
        PAG_FIELDS,
        PAG_LAYERS_FIELD,
        PAG_SCALE_FIELD_READ,
    )
    from ..prompt_schedule import OLD_TIMELINES_FIELD
    from ..sampler_tables import (
        HIRES_UPSCALER_LABELS,
        INPAINTING_FILL_LABELS,
        NOISE_SCHEDULE_LABELS,
    )
    from ..samplers.schedules import canonical_schedule
    from ..samplers.sigma_space import DOWNCAST_FIELD
    from ..self_attention_guidance import SAG_FIELDS
    from ..soft_inpainting import soft_inpainting_from_fields

    options: dict[str, object] = {}
    taken: set[str] = set()

    def take(field: str, option: str, convert=str) -> None:
        if field in fields:
            try:
                options[option] = convert(fields[field])
            except ValueError:
                raise ValueError(f"infotext field {field}: {fields[field]!r} is not what A1111 writes there") from None
            taken.add(field)

    def flag(text: str) -> bool:
        return str(text).strip().lower() == "true"

    options["prompt"] = fields.get("Prompt", "")
    options["negative"] = fields.get("Negative prompt", "")
    taken.update({"Prompt", "Negative prompt"})
    take("Steps", "steps", int)
    take("Sampler", "sampler")
    take("Schedule type", "schedule", canonical_schedule)
    if "schedule" not in options and "Sampler" in fields and _from_a1111(fields) \
            and _label_schedule(fields["Sampler"]) is None:  # (A1111's paste: no Schedule type is its first, Automatic)
        options["schedule"] = "automatic"
    take("CFG scale", "guidance", float)
    take("Seed", "seed", int)
    take("Size-1", "width", int)
    take("Size-2", "height", int)
    take("Clip skip", "clip_skip", int)
    take("Variation seed", "subseed", int)
    take("Variation seed strength", "subseed_strength", float)
    if "Seed resize from-1" in fields:  # (A1111 writes WxH; the option is (height, width))
        options["seed_resize_from"] = (int(fields["Seed resize from-2"]), int(fields["Seed resize from-1"]))
        taken.update({"Seed resize from-1", "Seed resize from-2"})
    take("ENSD", "ensd", int)
    options["noise"] = _RNG.get(str(fields.get("RNG", "GPU")).strip(), "a1111")  # (no RNG: A1111's default GPU)
    taken.add("RNG")
    take("Noise", "noise")  # (generate's own, where RNG alone cannot tell: VAE encode sample)
    take("VAE encode", "vae_encode")
    take("Discard penultimate sigma", "always_discard_next_to_last_sigma", flag)
    take("SGM noise multiplier", "sgm_noise_multiplier", flag)
    take("Schedule min sigma", "sigma_min", float)
    take("Schedule max sigma", "sigma_max", float)
    take("Schedule rho", "rho", float)
    take("Beta schedule alpha", "beta_alpha", float)
    take("Beta schedule beta", "beta_beta", float)
    take("Eta", "eta", float)
    take("Sigma churn", "sigma_churn", float)
    take("Sigma tmin", "sigma_tmin", float)
    take("Sigma tmax", "sigma_tmax", float)
    take("Sigma noise", "sigma_noise", float)
    if "Eta DDIM" in fields and any(str(fields.get(field, "")).strip() in _ETA_DDIM_SAMPLERS
                                    for field in ("Sampler", "Hires sampler")):  # (the pass whose sampler wrote it)
        take("Eta DDIM", "eta_ddim", float)
    take("Emphasis", "emphasis")
    _take_choice(fields, "Noise Schedule", "noise_schedule", "--noise-schedule", NOISE_SCHEDULE_LABELS, options, taken)
    for key in GUIDANCE_RESCALE_FIELDS_READ:  # (A1111's CFG Rescale extension's, its older one, SD.Next's)
        if key in fields and "guidance_rescale" not in options:
            take(key, "guidance_rescale", float)
    enabled, version, multiplier = RESCALE_CFG_FIELDS  # (reForge's RescaleCFG: ComfyUI's, in v; not "Alternative")
    if (flag(fields.get(enabled, "")) and multiplier in fields and "guidance_rescale" not in options
            and str(fields.get(version, "Normal")).strip() == "Normal"):
        take(multiplier, "guidance_rescale", float)
        options["guidance_rescale_space"] = "v"
        taken.update(key for key in (enabled, version) if key in fields)
    pag_enabled, pag_scale = PAG_FIELDS  # (Forge's built-in PAG; SD.Next's "PAG scale" / "PAG adaptive")
    if flag(fields.get(pag_enabled, "")) and pag_scale in fields:
        take(pag_scale, "pag_scale", float)
        taken.add(pag_enabled)
    elif pag_enabled in fields and not flag(fields[pag_enabled]):  # (written off: nothing to take)
        taken.update(key for key in PAG_FIELDS if key in fields)
    if "pag_scale" not in options:
        take(PAG_SCALE_FIELD_READ, "pag_scale", float)
    take(PAG_ADAPTIVE_FIELD, "pag_adaptive_scale", float)
    take(PAG_LAYERS_FIELD, "pag_layers", str.split)
    if flag(fields.get(FREEU_FIELDS[0], "")) and all(key in fields for key in FREEU_FIELDS[1:]):  # (Forge's FreeU)
        try:
            options["freeu"] = [float(fields[key]) for key in FREEU_FIELDS[1:]]
        except ValueError:
            raise ValueError(f"infotext fields {', '.join(FREEU_FIELDS[1:])}: "
                             f"{[fields[key] for key in FREEU_FIELDS[1:]]} are not the numbers Forge writes there") from None
        taken.update(FREEU_FIELDS)
        take(FREEU_VERSION_FIELD, "freeu_version")
        # (newer Forge writes its step window too: FreeU on the calls whose sampling_step / (steps − 1) lies in it)
        if any(key in fields for key in FREEU_WINDOW_FIELDS):
            try:
                options["freeu_window"] = [float(fields.get(key, default))
                                           for key, default in zip(FREEU_WINDOW_FIELDS, ("0", "1"))]
            except ValueError:
                raise ValueError(f"infotext fields {', '.join(FREEU_WINDOW_FIELDS)}: "
                                 f"{[fields.get(key) for key in FREEU_WINDOW_FIELDS]} are not the numbers Forge "
                                 "writes there") from None
            taken.update(key for key in FREEU_WINDOW_FIELDS if key in fields)
    elif FREEU_FIELDS[0] in fields and not flag(fields[FREEU_FIELDS[0]]):  # (written off: nothing to take)
        taken.update(key for key in FREEU_FIELDS if key in fields)
    sag_enabled, sag_scale, sag_blur = SAG_FIELDS  # (Forge's built-in SAG)
    if flag(fields.get(sag_enabled, "")) and sag_scale in fields:
        take(sag_scale, "sag_scale", float)
        take(sag_blur, "sag_blur_sigma", float)
        taken.add(sag_enabled)
    elif sag_enabled in fields and not flag(fields[sag_enabled]):  # (written off: nothing to take)
        taken.update(key for key in SAG_FIELDS if key in fields)
    setting, dynthres_keys = dynamic_thresholding_from_fields(dict(fields))  # (A1111's extension's, Forge's)
    taken.update(dynthres_keys)
    if setting is not None:
        options["dynamic_thresholding"] = setting
    take("Tiling", "tiling", flag)
    take("VAE tiling", "vae_tiling", flag)
    tile_options, tile_fields = hypertile_options(dict(fields))
    options.update(tile_options)
    taken.update(tile_fields)
    take("Token merging ratio", "token_merging_ratio", float)
    take("Skip Early CFG", "skip_early_cfg", float)
    take("NGMS", "ngms", float)
    take("NGMS all steps", "ngms_all_steps", flag)
    take("Pad conds", "pad_conds", flag)
    take("Pad conds v0", "pad_conds_v0", flag)
    if ("pad_conds_v0" not in options and "pad_conds" not in options and fields.get("Sampler", "") in ("DDIM", "PLMS")
            and _made_before(fields.get("Version"), _V160)):
        options["pad_conds_v0"] = True  # (A1111's backcompat: its DDIM / PLMS padded so before v1.6.0)
    half_alphas = DOWNCAST_FIELD in fields and flag(fields[DOWNCAST_FIELD])
    if DOWNCAST_FIELD in fields and not half_alphas:  # (written off: nothing to take)
        taken.add(DOWNCAST_FIELD)
    take(OLD_TIMELINES_FIELD, "old_prompt_editing_timelines", flag)
    if ("old_prompt_editing_timelines" not in options and "[" in str(fields.get("Prompt", ""))
            and _made_before(fields.get("Version"), _V160)):
        options["old_prompt_editing_timelines"] = True  # (A1111's backcompat: its timelines before v1.6.0)
    by_version = DOWNCAST_FIELD not in fields and _made_before(fields.get("Version"), _V170_TSNR)
    hires = "Hires upscale" in fields or "Hires resize-1" in fields
    if hires or img2img:  # (sample_img2img's: a pass that starts from an image)
        take("Extra noise", "extra_noise", float)
    if hires:  # (A1111's txt2img hires fix: its Denoising strength is the hires pass's)
        take("Hires upscale", "hires_scale", float)
        take("Hires resize-1", "hires_width", int)
        take("Hires resize-2", "hires_height", int)
        take("Hires steps", "hires_steps", int)
        _take_choice(fields, "Hires upscaler", "hires_upscaler", "--hires-upscaler", HIRES_UPSCALER_LABELS, options,
                     taken)
        _take_upscaler_file(fields, "Hires upscaler", "hires_upscaler", upscaler_dir, options, taken)
        take("Hires sampler", "hires_sampler")
        take("Hires prompt", "hires_prompt")
        take("Hires negative prompt", "hires_negative")
        take("Hires CFG Scale", "hires_guidance", float)  # (Forge's hr_cfg)
        take("Token merging ratio hr", "token_merging_ratio_hr", float)
        take("Denoising strength", "hires_denoising", float)
    elif img2img:
        take("Denoising strength", "denoising_strength", float)
        take("Noise multiplier", "noise_multiplier", float)
    if inpaint:
        take("Mask blur", "mask_blur", float)
        _take_choice(fields, "Masked content", "inpainting_fill", "--inpainting-fill", INPAINTING_FILL_LABELS, options,
                     taken)
        take("Masked area padding", "inpaint_full_res_padding", int)
        take("Conditional mask weight", "inpainting_mask_weight", float)
        if "Mask mode" in fields:
            options["invert_mask"] = fields["Mask mode"] == "Inpaint not masked"
            taken.add("Mask mode")
        if "Inpaint area" in fields:
            options["inpaint_full_res"] = fields["Inpaint area"] == "Only masked"
            taken.add("Inpaint area")
        soft, soft_keys = soft_inpainting_from_fields(dict(fields))  # (A1111's built-in soft inpainting)
        taken.update(soft_keys)
        if soft is not None:
            options["soft_inpainting"] = soft
    if sd_upscale:  # (A1111's SD upscale script: the overlap and the upscaler, not the scale)
        take("SD upscale overlap", "sd_upscale_overlap", int)
        take("SD upscale upscaler", "sd_upscale_upscaler")
        if options.get("sd_upscale_upscaler", "").lower() not in ("lanczos", "nearest", "none"):
            del options["sd_upscale_upscaler"]
            taken.discard("SD upscale upscaler")
            _take_upscaler_file(fields, "SD upscale upscaler", "sd_upscale_upscaler", upscaler_dir, options, taken)
    if img2img and "Decode prompt" in fields:  # (A1111's img2img alternative test: every one of its fields)
        options["img2img_alt"] = True
        take("Decode prompt", "decode_prompt")
        take("Decode negative prompt", "decode_negative")
        take("Decode CFG scale", "decode_guidance", float)
        take("Decode steps", "decode_steps", lambda v: int(float(v)))
        take("Randomness", "randomness", float)
        take("Sigma Adjustment", "sigma_adjustment", flag)
    if loopback:  # (A1111's Loopback script: the final strength and the curve, not the loops)
        take("Final denoising strength", "loopback_final_denoising", float)
        take("Denoising curve", "loopback_curve")
    if model is not None:  # (A1111's paste sets the refiner and hires checkpoint boxes by name)
        from .models import checkpoint_by_name

        for field, option in (("Refiner", "refiner"), ("Hires checkpoint", "hires_checkpoint")):
            if field in fields and not (option == "refiner" and refiner):
                try:
                    options[option] = checkpoint_by_name(str(fields[field]).strip(), beside=model, option=field)
                except ValueError:
                    continue
                taken.add(field)
                refiner = refiner or option == "refiner"
    if refiner:
        take("Refiner switch at", "refiner_switch_at", float)
        take("Refiner switch by sampling steps", "refiner_switch_by_steps", flag)
        take("Hires refiner", "refiner_hires_pass", lambda v: _HIRES_REFINER[v.strip()])
    if hires:
        take("Hires schedule type", "hires_schedule", canonical_schedule)
    if fields.get("Script") == "X/Y/Z plot":  # (an X/Y/Z grid's: its axes again, with the seeds it drew for -1)
        for axis in "XYZ":
            if f"{axis} Type" in fields:
                values = fields.get(f"Fixed {axis} Values", fields.get(f"{axis} Values", ""))
                options[f"xyz_{axis.lower()}"] = [fields[f"{axis} Type"], values]
                taken.update({f"{axis} Type", f"{axis} Values", f"Fixed {axis} Values"})
        taken.add("Script")
    not_taken = []
    if half_alphas or by_version:  # (the field, or A1111's backcompat: its ᾱ was half before v1.7.0-225)
        unread = _passes_not_reading_half_alphas(options)
        if not unread:
            options["downcast_alphas_cumprod"] = True
            taken.add(DOWNCAST_FIELD)
        else:
            field = DOWNCAST_FIELD if half_alphas else f"Version: {fields.get('Version')}"
            not_taken.append(f"{field}: A1111 sampled on a half ᾱ (--downcast-alphas-cumprod), which "
                             f"{' and '.join(unread)} here does not read (A1111's σ samplers with a schedule do): the "
                             "image may differ")
    for field in fields:
        if field in taken or field in ("Version", "User", "Init image hash"):
            continue
        base = field[:-2] if field.endswith(("-1", "-2")) else field
        if base in _MODEL_FILES:
            reason = (f"{fields[field]} — the run's model files: give them (--model, --vae, --refiner, "
                      "--hires-checkpoint)")
        elif base in INFORMATIONAL_FIELDS:
            reason = "the run's networks and embeddings: give their folders (--lora-dir, --hypernetwork-dir, " \
                     "--embeddings-dir)"
        elif base in ("Denoising strength", "Noise multiplier", "Extra noise", "Randomness", "Sigma Adjustment") \
                or base.startswith(("Mask", "Masked", "Inpaint", "Conditional mask", "Soft inpainting", "Decode ")):
            reason = "needs the init image / mask: give --init-image (--mask)"
        elif base.startswith(("Refiner", "Hires refiner")):
            reason = "needs the refiner: give --refiner FILE"
        elif base.startswith("SD upscale"):
            reason = ("A1111's SD upscale does not write its scale: give --init-image and --sd-upscale SCALE, and "
                      "its overlap and upscaler are read")
        elif base in ("Final denoising strength", "Denoising curve"):
            reason = ("A1111's Loopback does not write its number of loops: give --init-image and --loopback N, and "
                      "its final strength and curve are read")
        elif base == "Eta DDIM":
            reason = (f"A1111's setting of its {' and '.join(_ETA_DDIM_SAMPLERS)}; not taken with Sampler "
                      f"{fields.get('Sampler', '(none)')!r}" + (f" and Hires sampler {fields['Hires sampler']!r}"
                                                                if "Hires sampler" in fields else ""))
        elif base in ("Hires upscaler", "SD upscale upscaler") and upscaler_dir is None:
            reason = (f"{fields[field]!r} is an upscaler model: give --upscaler-dir (A1111's models/ESRGAN folder) or "
                      "the model's file")
        elif base in ("Hires upscaler", "SD upscale upscaler", "Masked content"):
            reason = f"{fields[field]!r} is not one of sdadapt's: give another (the image will differ from A1111's)"
        else:
            reason = "sdadapt has no such setting: the image may differ from A1111's"
        if f"{base}: {reason}" not in not_taken:
            not_taken.append(f"{base}: {reason}")
    return options, not_taken
