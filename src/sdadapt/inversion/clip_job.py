"""The jobs behind ``python -m sdadapt clip-invert`` and ``generate --image-vectors``.

Thin wrappers over :mod:`.clip` (no math of their own): :func:`run_clip_invert` reads an image
folder at the model's size (as ``train`` reads its folders: shorter side resized, centre cropped),
runs :func:`~.clip.clip_invert` and writes :func:`~.clip.save_image_vectors`' file atomically;
:func:`run_generate_image_vectors` reads such a file and writes one PNG per seed from
:func:`~.clip.generate_with_vectors`. Both return plain dicts. Progress goes through
``progress(done, total, info)``.

Models: whatever :func:`sdadapt.jobs.load_system` loads whose UNet takes an image embedding —
a diffusers SD 2.1 unCLIP folder (``stable-diffusion-2-1-unclip``: its ``image_encoder/``,
``image_normalizer/`` and ``image_noising_scheduler/`` are used as the pipelines use them), the
toy image variant ``toy-image`` or the toy ``toy`` — and a lambdalabs image-variation folder
(``sd-image-variations-diffusers``, no text encoder: :func:`~.variation.load_image_variation`; its
vectors are the whole condition, so a prompt, captions or a negative prompt are refused there).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..formats.files import check_input_file, check_output_file
from .core import Progress

__all__ = ["run_clip_invert", "run_generate_image_vectors", "default_guidance", "DEFAULT_GUIDANCE"]

#: classifier-free guidance per image-input site when ``--guidance`` is not given: SD unCLIP 10
#: (diffusers' ``StableUnCLIPImg2ImgPipeline`` / ``StableUnCLIPPipeline`` ``guidance_scale=10``),
#: image variation 7.5 (``StableDiffusionImageVariationPipeline``), the toys 2 (``generate``'s toy default)
DEFAULT_GUIDANCE: dict[str, float] = {"class-labels": 10.0, "cross-attention": 7.5, "time-embedding": 2.0,
                                      "time-embedding+token": 2.0}


def default_guidance(site: str) -> float:
    """The guidance scale :func:`run_generate_image_vectors` uses for vectors of ``site`` (:data:`DEFAULT_GUIDANCE`)."""
    if site not in DEFAULT_GUIDANCE:
        raise ValueError(f"unknown image-input site {site!r}; one of {', '.join(DEFAULT_GUIDANCE)}")
    return DEFAULT_GUIDANCE[site]


def _load(model: str, device: str, clip_stats: str | Path | None = None):
    """``load_system``'s model, or an image-variation folder (:func:`~.variation.load_image_variation`)."""
    from ..jobs.models import load_system, resolve_device
    from .variation import is_image_variation_folder, load_image_variation

    if is_image_variation_folder(model):
        if clip_stats is not None:  # (the error the unCLIP loaders give any other model)
            raise ValueError(f"{model}: --clip-stats is for SD 2.1 unCLIP models (an image-variation model takes the "
                             "CLIP image embedding as it is, with no normaliser or noise augmentation)")
        return load_image_variation(model, device=resolve_device(device))
    return load_system(model, device=resolve_device(device), clip_stats=clip_stats)


def _refuse_text(system, *, what: str) -> None:
    """An image-variation model takes no text: refuse ``what`` (the prompt options given) by name."""
    from .variation import ImageVariationSystem

    if isinstance(system, ImageVariationSystem):
        raise ValueError(f"{what}: an image-variation model ({Path(system.source).name}) takes no text — the image "
                         "vectors are the whole condition and the unconditional input is zeros, as "
                         "StableDiffusionImageVariationPipeline's; leave it out")


def run_clip_invert(
    images: str | Path,
    *,
    out: str | Path,
    model: str = "toy-image",
    captions: bool = False,
    prompt: str | None = None,
    num_vectors: int = 1,
    init: str = "auto",
    steps: int = 300,
    learning_rate: float = 5e-2,
    batch_size: int = 4,
    noise_level: int = 0,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    clip_stats: str | Path | None = None,
) -> dict:
    """Learn image-space vectors for the concept of the images in folder ``images`` and write them to ``out``.

    Args:
        images: a folder of .png/.jpg images (any size: brought to the model's by shorter-side resize
            and centre crop, as ``train`` reads folders).
        out: the ``.safetensors`` file (:func:`~.clip.save_image_vectors`; metadata ``model``, ``images``, ...).
        model: ``"toy-image"`` (default), ``"toy"``, a diffusers SD 2.1 unCLIP folder, an SD 2.1 unCLIP single
            file (Stability's ``sd21-unclip-h`` / ``-l``: :mod:`sdadapt.unclip`) or an image-variation folder
            (lambdalabs ``sd-image-variations-diffusers``; no ``prompt``/``captions``).
        captions: train with each image's ``NAME.txt`` / ``NAME.caption`` caption (``prompt`` for
            images without one, else an error naming them).
        prompt: one caption for every image (with ``captions``: for those without a caption file).
            Neither: the empty prompt (the vectors carry the whole concept; :func:`~.clip.clip_invert`).
        num_vectors, init, steps, learning_rate, batch_size, noise_level, seed: :func:`~.clip.clip_invert`'s.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        overwrite: replace an existing ``out`` (else refused before any work).
        clip_stats: an SD 2.1 unCLIP-L file's CLIP-embedding stats (karlo's ``ViT-L-14_stats.th``), which
            ``noise_level > 0`` needs there.

    Returns:
        ``{"file", "site", "vectors" (K, D), "init", "final_loss", "images", "seconds"}``.

    Raises:
        NoImageConditioningError: the model has no image-embedding input.
        ImageFolderError, ModelFolderError, OutputExistsError, ValueError.
    """
    from ..images import check_image_folder, load_image_folder
    from .clip import clip_invert, image_conditioning, save_image_vectors

    target = check_output_file(out, overwrite=overwrite)
    folder = check_image_folder(images)
    start = time.perf_counter()
    system = _load(model, device, clip_stats)
    if captions or prompt:
        _refuse_text(system, what="--captions" if captions else "--prompt")
    image_conditioning(system, noise_level=noise_level)  # no image input / no normaliser: refused before reading images
    pictures, texts = load_image_folder(folder, size=system.image_size,
                                        default_caption=prompt if captions else "")
    if captions:
        chosen: list[str] | None = texts
    elif prompt:
        chosen = [prompt] * pictures.shape[0]
    else:
        chosen = None
    learnt = clip_invert(system, pictures, captions=chosen, num_vectors=num_vectors, init=init, steps=steps,
                         learning_rate=learning_rate, batch_size=batch_size, noise_level=noise_level, seed=seed,
                         progress=progress)
    metadata = {"model": Path(model).name, "seed": str(seed), "batch_size": str(batch_size),
                "captions": "files" if captions else ("prompt" if prompt else "empty")}
    save_image_vectors(target, learnt, metadata=metadata)
    return {"file": str(target), "site": learnt.site, "vectors": tuple(learnt.vectors.shape), "init": learnt.info["init"],
            "final_loss": float(learnt.info["final_loss"]), "images": int(pictures.shape[0]),
            "seconds": time.perf_counter() - start}


def run_generate_image_vectors(
    vectors: str | Path,
    *,
    out: str | Path,
    model: str = "toy-image",
    prompt: str = "",
    negative: str = "",
    count: int = 1,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    clip_stats: str | Path | None = None,
    sampler: str | None = None,
    karras: bool = False,
    schedule: str | None = None,
    noise: str | None = None,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from: tuple[int, int] | None = None,
    ensd: int = 0,
    sigma_min: float = 0.0,
    sigma_max: float = 0.0,
    rho: float = 0.0,
    beta_alpha: float = 0.6,
    beta_beta: float = 0.6,
    old_karras_sigmas: bool = False,
    jpeg_quality: int = 80,
    webp_lossless: bool = False,
) -> dict:
    """Images from a CLIP-inversion file (:func:`~.clip.load_image_vectors`) mixed with ``prompt``.

    Image ``i`` is :func:`~.clip.generate_with_vectors` with ``count=1, seed=seed + i`` (each image
    made again from its own seed, as ``generate``'s), at the noise level the file was learnt at.
    ``out``: ``X.png`` (or ``.jpg`` / ``.webp`` / ``.avif``, at ``jpeg_quality`` / ``webp_lossless`` as
    :func:`sdadapt.images.write_image` writes them); ``count > 1`` writes ``X-00.png``, ``X-01.png`` …. ``steps``
    default 25;
    ``guidance`` default per model (:data:`DEFAULT_GUIDANCE`: SD unCLIP 10, image variation 7.5, as
    their pipelines). The prompt is plain text (no A1111 emphasis or tags); an image-variation
    model takes none (``prompt`` and ``negative`` must be empty). ``clip_stats``: an SD 2.1 unCLIP-L single
    file's CLIP stats (karlo's ``ViT-L-14_stats.th``), which vectors learnt at a noise level > 0 need.
    ``sampler``: a name or A1111 label as ``generate --sampler`` takes (``"DPM++ 2M Karras"``; default ``ddim``);
    ``karras`` / ``schedule``: ``generate``'s ``--karras`` / ``--schedule`` (:func:`sdadapt.samplers.sample_latents`).
    ``noise`` (``"a1111"`` / ``"a1111-cpu"``), ``subseed``, ``subseed_strength``, ``seed_resize_from``, ``ensd`` and
    the σ settings ``sigma_min`` … ``old_karras_sigmas``: ``generate``'s options of those names, checked by the same
    rule (:func:`sdadapt.jobs.generate.run_generate`) and drawn as it draws them: image i from seed ``seed + i``
    (``seed`` for all with a variation strength, A1111's ``all_seeds``) and variation seed ``subseed + i``.

    Returns:
        ``{"files", "seed", "steps", "guidance", "site", "noise_level", "sampler", "schedule", "karras", "noise"}``.

    Raises:
        WeightFileError: not a CLIP-inversion file. ValueError: vectors of another site or width
        than the model's image input. NoImageConditioningError: the model has no image input.
    """
    from ..images import check_output_suffix, check_save_settings, numbered, write_image
    from .clip import generate_with_vectors, image_conditioning, load_image_vectors

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    sampler, karras, schedule = _sampler_grid(sampler, karras, schedule)  # (checked before the model loads)
    from ..jobs.generate import _a1111_noise_and_schedule, _image_seeds, image_seed

    seeds, schedule_options = _a1111_noise_and_schedule(
        noise=noise, subseed=subseed, subseed_strength=subseed_strength, seed_resize_from=seed_resize_from, ensd=ensd,
        seed=seed, schedule=schedule, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, beta_alpha=beta_alpha,
        beta_beta=beta_beta, old_karras_sigmas=old_karras_sigmas)
    target = Path(out)
    check_output_suffix(target)  # (PNG, JPEG, WebP or AVIF, as generate writes)
    check_save_settings(quality=jpeg_quality, lossless=webp_lossless)
    files = [target] if count == 1 else [numbered(target, i) for i in range(count)]
    for file in files:
        check_output_file(file, overwrite=overwrite, suffix=None)
    learnt = load_image_vectors(check_input_file(vectors, what="CLIP-inversion file"))
    system = _load(model, device, clip_stats)
    if prompt or negative:
        _refuse_text(system, what="--prompt " + repr(prompt) if prompt else "--negative " + repr(negative))
    site = image_conditioning(system, noise_level=learnt.noise_level).site  # no image input: refused here
    if learnt.site != site:
        raise ValueError(f"{vectors}: these vectors were learnt for the {learnt.site} site; this model's image input is "
                         f"{site}: use a model of the kind they were learnt on")
    steps = 25 if steps is None else steps
    guidance = default_guidance(site) if guidance is None else guidance
    for i, file in enumerate(files):
        image = generate_with_vectors(system, learnt, prompt=prompt, negative=negative, count=1,
                                      seed=image_seed(seed, i, subseed_strength=0.0 if seeds is None
                                                      else seeds.subseed_strength),
                                      steps=steps, guidance=guidance, sampler=sampler, karras=karras,
                                      schedule=schedule, schedule_options=schedule_options,
                                      noise=None if seeds is None else _image_seeds(seeds, i))[0]
        write_image(file, image, quality=jpeg_quality, lossless=webp_lossless)
        if progress is not None:
            progress(i + 1, count, file.name)
    return {"files": [str(f) for f in files], "seed": seed, "steps": steps, "guidance": guidance, "site": site,
            "noise_level": learnt.noise_level, "sampler": sampler, "schedule": schedule, "karras": karras,
            "noise": noise}


def _sampler_grid(sampler: str | None, karras: bool, schedule: str | None) -> tuple[str, bool, str | None]:
    """``(name, karras, schedule)`` from ``--sampler`` (a name or A1111 label, ``None``: ``ddim``), ``--karras`` and
    ``--schedule``, resolved as ``generate``'s (:func:`sdadapt.jobs.generate.run_generate`: a label's grid, then
    :func:`~sdadapt.samplers.resolve_schedule`), for :func:`~sdadapt.samplers.sample_latents`."""
    from ..samplers import check_karras, resolve_schedule
    from ..samplers.labels import sampler_schedule_from_label
    from ..samplers.schedules import canonical_schedule as schedule_name

    try:
        name, label_schedule = sampler_schedule_from_label("ddim" if sampler is None else sampler)
    except ValueError as exc:
        raise ValueError(f"--sampler: {exc}") from None
    if schedule is not None and label_schedule is not None and schedule_name(schedule) != label_schedule:
        raise ValueError(f"--schedule {schedule!r} and the sampler label's {label_schedule!r} grid disagree; give one")
    try:
        check_karras(name, karras)
    except ValueError as exc:
        raise ValueError(f"--karras: {exc}") from None
    try:
        resolved = resolve_schedule(name, schedule if schedule is not None else label_schedule, karras)
    except ValueError as exc:
        raise ValueError(f"--schedule: {exc}") from None
    return name, karras, resolved
