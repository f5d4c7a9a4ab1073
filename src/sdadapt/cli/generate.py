"""``python -m sdadapt generate``: images from a model with LoRA files and embeddings applied."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ..sampler_tables import (  # (torch-free: --help and usage errors import no torch)
    HIRES_UPSCALER_LABELS,
    HIRES_UPSCALERS,
    INPAINTING_FILL_LABELS,
    KARRAS_SAMPLERS,
    RESIZE_MODE_LABELS,
    SCHEDULE_LABELS,
    SCHEDULE_SAMPLERS,
    VAE_ENCODE_METHODS,
    canonical_choice,
    canonical_schedule,
    sampler_choices,
    sampler_schedule_from_label,
)
from .option_rules import only_with
from .options import (
    add_clip_stats_option,
    add_image_save_options,
    add_output_options,
    positive_int,
    progress_bar,
    width_height,
)

__all__ = ["register"]


def _sampler(text: str) -> str:
    """``--sampler``'s value, checked now (argparse says ``argument --sampler: ...`` and what is taken)."""
    try:
        sampler_schedule_from_label(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _a1111_choice(option: str, labels: dict[str, str]) -> Callable[[str], str]:
    """An argparse ``type`` for ``option``: its own name, or A1111's label as its UI and infotext spell it
    (``--hires-upscaler "Latent (bicubic antialiased)"``), as the name (:func:`canonical_choice`)."""

    def read(text: str) -> str:
        try:
            return canonical_choice(option, text, labels)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    read.__name__ = option.lstrip("-").replace("-", "_")
    return read


def _upscaler(option: str, labels: dict[str, str]) -> Callable[[str], str]:
    """An argparse ``type`` for an upscaler option: :func:`_a1111_choice`'s names, or a model file's path (an
    ESRGAN upscaler: checked and loaded by the run, :func:`sdadapt.sd_upscale.pixel_upscaler`)."""
    choice = _a1111_choice(option, labels)

    def read(text: str) -> str:
        import os

        if os.path.splitext(text)[1].lower() in (".pth", ".pt", ".safetensors", ".ckpt", ".bin") \
                or os.path.isfile(text):
            return text
        try:
            return choice(text)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc}; or an ESRGAN model file (.pth / .safetensors)") from None

    read.__name__ = option.lstrip("-").replace("-", "_")
    return read


def _schedule(text: str) -> str:
    """``--schedule``'s value, checked now (a name or A1111 label: "exponential", "Align Your Steps")."""
    try:
        canonical_schedule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _height_width(text: str) -> tuple[int, int]:
    """``--seed-resize-from WxH`` -> ``(height, width)`` (:func:`.options.width_height` reversed)."""
    width, height = width_height(text)
    return height, width


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..dynamic_thresholding import parse_dynamic_thresholding
    from ..errors import InputError
    from ..jobs import run_generate
    from ..soft_inpainting import parse_soft_inpainting

    if args.dtype != "keep":  # (the shared output option: it casts written weight files, and this writes PNGs)
        raise InputError(f"--dtype {args.dtype}: generate writes 8-bit images and runs the model in float32; --dtype casts "
                         "the tensors of written weight files, so leave it out")
    if args.image_vectors is not None:
        return _cmd_generate_image_vectors(args)
    if args.infotext is not None:
        _take_infotext(args)
    if args.prompt is None and args.prompts_file is None:
        raise InputError("--prompt is required: what to draw (--prompt '' for none)")

    def log(line: str) -> None:
        if not args.quiet or line.startswith("warning:"):
            print(line, file=sys.stderr)

    style_table = None
    if args.styles_file or args.style:  # (A1111's saved styles: sdadapt.prompt_styles)
        from ..prompt_styles import find_styles, read_styles

        if not args.styles_file:
            raise InputError(f"--style {args.style[0]}: give the styles file it is in (--styles-file styles.csv)")
        style_table = read_styles(args.styles_file)
    img2img_alt = _img2img_alt(args)  # (before the options: it puts the script's overrides in args)
    options = dict(  # noqa: C408 - run_generate's keywords, as its call reads
        styles=find_styles(args.style, style_table) if style_table is not None else (),
        model=args.model, prompt=args.prompt or "", negative=args.negative, comments=args.comments, loras=args.lora,
        embeddings=args.embedding, embeddings_dir=args.embeddings_dir,
        hypernetworks=args.hypernetwork, custom_diffusions=args.custom_diffusion,
        seed=args.seed, steps=args.steps, guidance=args.guidance, guidance_rescale=args.guidance_rescale,
        guidance_rescale_space=args.guidance_rescale_space, pag_scale=args.pag_scale,
        pag_adaptive_scale=args.pag_adaptive_scale, pag_layers=args.pag_layers, sag_scale=args.sag_scale,
        sag_blur_sigma=args.sag_blur_sigma, dynamic_thresholding=_setting_of_words(
            args.dynamic_thresholding, "--dynamic-thresholding", parse_dynamic_thresholding),
        freeu=args.freeu, freeu_version=args.freeu_version, freeu_window=args.freeu_window,
        sampler=args.sampler, karras=args.karras,
        schedule=args.schedule, noise=args.noise, subseed=args.subseed, subseed_strength=args.subseed_strength,
        seed_resize_from=args.seed_resize_from, ensd=args.ensd, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
        rho=args.rho, beta_alpha=args.beta_alpha, beta_beta=args.beta_beta, old_karras_sigmas=args.old_karras_sigmas,
        always_discard_next_to_last_sigma=args.always_discard_next_to_last_sigma,
        sgm_noise_multiplier=args.sgm_noise_multiplier,
        skip_early_cfg=args.skip_early_cfg, ngms=args.ngms, ngms_all_steps=args.ngms_all_steps,
        pad_conds=args.pad_conds, pad_conds_v0=args.pad_conds_v0, eta=args.eta, eta_ddim=args.eta_ddim,
        noise_multiplier=args.noise_multiplier, extra_noise=args.extra_noise, sigma_churn=args.sigma_churn,
        sigma_tmin=args.sigma_tmin, sigma_tmax=args.sigma_tmax, sigma_noise=args.sigma_noise,
        emphasis=args.emphasis, noise_schedule=args.noise_schedule,
        downcast_alphas_cumprod=args.downcast_alphas_cumprod,
        old_prompt_editing_timelines=args.old_prompt_editing_timelines, tiling=args.tiling,
        a1111_upsampling=args.a1111_upsampling, vae_tiling=args.vae_tiling,
        token_merging_ratio=args.token_merging_ratio, token_merging_ratio_hr=args.token_merging_ratio_hr,
        hypertile_unet=args.hypertile_unet, hypertile_unet_second_pass=args.hypertile_unet_second_pass,
        hypertile_vae=args.hypertile_vae,
        width=args.width,
        height=args.height, count=args.count, out=args.out, overwrite=args.overwrite, jpeg_quality=args.jpeg_quality,
        webp_lossless=args.webp_lossless, image_format=args.image_format, tokenizer=args.tokenizer,
        prediction_type=args.prediction_type, clip_skip=args.clip_skip, max_token_length=args.max_token_length,
        clip_stats=args.clip_stats, aesthetic_score=args.aesthetic_score, negative_aesthetic_score=args.negative_aesthetic_score,
        refiner=args.refiner, refiner_switch_at=args.refiner_switch_at, refiner_hires_pass=args.refiner_hires_pass,
        refiner_switch_by_steps=args.refiner_switch_by_steps, refiner_empty_negative=args.refiner_empty_negative,
        vae=args.vae, device=args.device,
        aesthetic=args.aesthetic, aesthetic_steps=args.aesthetic_steps, aesthetic_lr=args.aesthetic_lr,
        aesthetic_weight=args.aesthetic_weight, aesthetic_slerp=args.aesthetic_slerp, aesthetic_clip=args.aesthetic_clip,
        aesthetic_text=args.aesthetic_text, aesthetic_text_angle=args.aesthetic_text_angle,
        aesthetic_text_negative=args.aesthetic_text_negative, lora_dir=args.lora_dir, hypernetwork_dir=args.hypernetwork_dir,
        lbw_presets=args.lbw_presets,
        init_image=args.init_image, img2img_alt=img2img_alt, color_correction=args.color_correction,
        hires_scale=args.hires_scale,
        denoising_strength=0.75 if args.denoising_strength is None else args.denoising_strength,
        hires_width=args.hires_width, hires_height=args.hires_height, hires_steps=args.hires_steps,
        hires_denoising=args.hires_denoising, hires_upscaler=args.hires_upscaler,
        resize_mode=args.resize_mode, vae_encode=args.vae_encode, img2img_fix_steps=args.img2img_fix_steps,
        hires_prompt=args.hires_prompt,
        hires_negative=args.hires_negative, hires_sampler=args.hires_sampler, hires_schedule=args.hires_schedule,
        hires_guidance=args.hires_guidance, hires_checkpoint=args.hires_checkpoint,
        mask=args.mask, mask_blur=args.mask_blur, invert_mask=args.invert_mask, inpainting_fill=args.inpainting_fill,
        inpainting_mask_weight=args.inpainting_mask_weight, inpaint_full_res=args.inpaint_full_res,
        inpaint_full_res_padding=args.inpaint_full_res_padding,
        soft_inpainting=_setting_of_words(args.soft_inpainting, "--soft-inpainting", parse_soft_inpainting),
        sd_upscale=args.sd_upscale, sd_upscale_overlap=args.sd_upscale_overlap,
        sd_upscale_upscaler=args.sd_upscale_upscaler, loopback=args.loopback,
        loopback_final_denoising=args.loopback_final_denoising, loopback_curve=args.loopback_curve,
        outpaint=args.outpaint, outpaint_directions=args.outpaint_directions,
        outpaint_mask_blur=4 if args.outpaint_mask_blur is None else args.outpaint_mask_blur,
        outpaint_fill=args.outpaint_fill,
    )
    axes = [args.xyz_x, args.xyz_y, args.xyz_z]
    grid_options = [option for option, given in (
        ("--xyz-no-legend", not args.xyz_legend), ("--xyz-keep-random-seeds", args.xyz_keep_random_seeds),
        ("--xyz-vary-seeds", args.xyz_vary_seeds), ("--xyz-sub-grids", args.xyz_sub_grids)) if given]
    if grid_options and not any(axis is not None for axis in axes):  # (allowed at parsing for --infotext's axes)
        raise InputError(f"{grid_options[0]} only applies with --xyz-x, --xyz-y or --xyz-z, and --infotext "
                         f"{args.infotext} has no X/Y/Z axes: add one, or leave {grid_options[0]} out")
    scripts = [option for option, given in (("--xyz-x/-y/-z", any(axis is not None for axis in axes)),
                                            ("--prompts-file", args.prompts_file is not None),
                                            ("--outpaint-mk2", args.outpaint_mk2 is not None),
                                            ("--inpaint-sketch", args.inpaint_sketch is not None),
                                            ("--img2img-alt", args.img2img_alt),
                                            ("--prompt-matrix", args.prompt_matrix)) if given]
    if len(scripts) > 1:
        raise InputError(f"{scripts[0]} and {scripts[1]} are two of A1111's scripts, which runs one at a time; leave "
                         "one out")
    if args.grid:  # (A1111's batch grid, of one run's --count images)
        import os

        from ..errors import OutputExistsError

        folder = args.init_image is not None and os.path.isdir(args.init_image)
        if args.count < 2 or scripts or folder or any(option is not None for option in (
                args.loopback, args.sd_upscale, args.outpaint, args.outpaint_mk2)):
            raise InputError("--grid is the grid of one run's --count N images (N 2 or more); the X/Y/Z plot and the "
                             "prompt matrix make their own, the other scripts and a folder of init images none: "
                             "leave it out")
        if os.path.exists(args.out) and not args.overwrite:
            raise OutputExistsError(f"{args.out}: already exists (the --grid); pass --overwrite to replace it")
    if args.inpaint_sketch is not None:  # (A1111's "Inpaint sketch" tab: sdadapt.jobs.generate_inpaint_sketch)
        from ..jobs.generate_inpaint_sketch import run_inpaint_sketch

        result = run_inpaint_sketch(args.inpaint_sketch, mask_transparency=args.mask_transparency,
                                    progress=progress_bar(args, "generate", unit="image") if _many_images(args)
                                    else None, log=log, **options)
        for file in result["files"]:
            print(f"wrote {file}")
        return 0
    if args.outpaint_mk2 is not None:  # (A1111's "Outpainting mk2": sdadapt.jobs.generate_outpaint_mk2)
        from ..jobs.generate_outpaint_mk2 import run_outpainting_mk2

        result = run_outpainting_mk2(pixels=args.outpaint_mk2, directions=args.outpaint_directions,
                                     blur=8 if args.outpaint_mask_blur is None else args.outpaint_mask_blur,
                                     noise_q=args.outpaint_falloff, color_variation=args.outpaint_color_variation,
                                     progress=progress_bar(args, "generate", unit="run"), log=log, **options)
        for file in result["files"]:
            print(f"wrote {file}")
        return 0
    if args.prompt_matrix:  # (A1111's "Prompt matrix": sdadapt.jobs.generate_prompt_matrix)
        from ..jobs.generate_prompt_matrix import run_prompt_matrix

        result = run_prompt_matrix(at_start=args.prompt_matrix_at_start,
                                   different_seeds=args.prompt_matrix_different_seeds,
                                   negative_matrix=args.prompt_matrix_negative, join=args.prompt_matrix_join,
                                   margin=args.grid_margin, font=args.grid_font,
                                   progress=progress_bar(args, "generate", unit="image"), log=log, **options)
        for file in result["files"]:
            print(f"wrote {file}")
        return 0
    if any(axis is not None for axis in axes):  # (A1111's "X/Y/Z plot": sdadapt.jobs.generate_xyz)
        from ..jobs.generate_xyz import run_xyz_plot

        result = run_xyz_plot(axes, style_table=style_table, legend=args.xyz_legend,
                              keep_random_seeds=args.xyz_keep_random_seeds,
                              vary_seeds=args.xyz_vary_seeds or (), sub_grids=args.xyz_sub_grids,
                              margin=args.grid_margin, font=args.grid_font,
                              progress=progress_bar(args, "generate", unit="cell"), log=log, **options)
        for file in result["files"]:
            print(f"wrote {file}")
        return 0
    if args.prompts_file is not None:  # (A1111's "Prompts from file or textbox": sdadapt.jobs.generate_prompt_lines)
        from ..jobs.generate_prompt_lines import read_prompts_file, run_prompt_lines

        result = run_prompt_lines(read_prompts_file(args.prompts_file, log=log), style_table=style_table,
                                  iterate_seed=args.prompts_file_iterate_seed, same_seed=args.prompts_file_same_seed,
                                  insert=args.prompts_file_insert, source=args.prompts_file,
                                  progress=progress_bar(args, "generate", unit="line"),
                                  log=log, **options)
        for file in result["files"]:
            print(f"wrote {file}")
        return 0
    result = run_generate(**options, progress=progress_bar(args, "generate", unit="image") if _many_images(args)
                          else None, log=log)
    if args.grid:  # (A1111's batch grid: sdadapt.jobs.generate_grid)
        from ..jobs.generate_grid import write_batch_grid

        print(f"wrote {write_batch_grid(result, args.out, given=options)}")
    drawn = args.seed == -1 or args.subseed == -1  # (A1111's random seed: the one drawn, to make the image again)
    from ..jobs.generate import image_seed

    for i, file in enumerate(result["files"]):
        seed_i = image_seed(result["seed"], i, subseed_strength=args.subseed_strength if args.noise else 0.0)
        seeds = f"--seed {seed_i}" + ("" if result["subseed"] is None else f" --subseed {result['subseed'] + i}")
        print(f"wrote {file} ({seeds})" if drawn else f"wrote {file}")
    return 0



def _many_images(args: argparse.Namespace) -> bool:
    """Whether the run makes more than one image (a progress bar then): ``--count``, the img2img scripts' loops and
    tiles, a folder of init images."""
    import os

    return (args.count > 1 or args.loopback is not None or args.sd_upscale is not None or args.outpaint is not None
            or (args.init_image is not None and os.path.isdir(args.init_image)))


def _setting_of_words(value: object, flag: str, parse) -> object:
    """A ``KEY=VALUE`` option's words (``value``: a list; or the setting ``--infotext`` read, or ``None`` off) as its
    setting, by ``parse`` (:func:`sdadapt.dynamic_thresholding.parse_dynamic_thresholding`,
    :func:`sdadapt.soft_inpainting.parse_soft_inpainting`).

    Raises:
        InputError: words ``parse`` refuses, named by ``flag``.
    """
    if value is None or not isinstance(value, list):
        return value
    from ..errors import InputError

    try:
        return parse(value)
    except ValueError as exc:
        raise InputError(f"{flag}: {exc}") from None


def _img2img_alt(args: argparse.Namespace):
    """``--img2img-alt``'s :class:`~sdadapt.inversion.euler_noise.Img2ImgAlternative` (``None`` without it), with
    A1111's script's overrides put in ``args`` where not given: sampler Euler, steps = decode steps (50 when neither
    is given), strength 1; the prompt and negative are the decode texts unless ``--decode-prompt`` /
    ``--decode-negative`` are given."""
    from ..errors import InputError

    if not args.img2img_alt:
        return None
    from ..inversion.euler_noise import Img2ImgAlternative

    args.steps = args.steps or args.decode_steps or 50
    args.sampler = args.sampler or "euler"
    args.denoising_strength = 1.0 if args.denoising_strength is None else args.denoising_strength
    try:
        return Img2ImgAlternative(
            decode_prompt=(args.prompt or "") if args.decode_prompt is None else args.decode_prompt,
            decode_negative=args.negative if args.decode_negative is None else args.decode_negative,
            decode_steps=args.decode_steps or args.steps, decode_guidance=args.decode_guidance,
            randomness=args.randomness, sigma_adjustment=args.sigma_adjustment)
    except ValueError as exc:
        raise InputError(f"--img2img-alt: {exc}") from None


#: generate's option defaults (:func:`register`): an option still at its default takes ``--infotext``'s value
_DEFAULTS: dict[str, object] = {}


def _take_infotext(args: argparse.Namespace) -> None:
    """``--infotext FILE``: its fields as the options not given (still at their defaults), said on stderr with the
    fields not taken (:mod:`sdadapt.jobs.infotext_read`)."""
    from ..errors import InputError
    from ..jobs.infotext_read import infotext_options, parse_infotext, read_infotext

    try:
        options, not_taken = infotext_options(parse_infotext(read_infotext(args.infotext)),
                                              img2img=args.init_image is not None, inpaint=args.mask is not None,
                                              refiner=args.refiner is not None, sd_upscale=args.sd_upscale is not None,
                                              loopback=args.loopback is not None, upscaler_dir=args.upscaler_dir,
                                              model=args.model)
    except (OSError, ValueError) as exc:
        raise InputError(f"--infotext {args.infotext}: {exc}") from None
    given = []
    for option, value in options.items():
        if getattr(args, option) == _DEFAULTS.get(option):
            setattr(args, option, value)
        else:
            given.append(option)
    if not args.quiet:
        print(f"--infotext {args.infotext}: {len(options) - len(given)} settings taken"
              + (f" (given on the command line instead: {', '.join(given)})" if given else ""), file=sys.stderr)
        for line in not_taken:
            print(f"--infotext: not taken: {line}", file=sys.stderr)


#: what ``generate --image-vectors`` takes besides the output options: the rest is refused (it samples with
#: :func:`sdadapt.inversion.generate_with_vectors`, at the model's size, the prompt as plain text)
_IMAGE_VECTOR_OPTIONS = ("image_vectors", "model", "prompt", "negative", "seed", "steps", "guidance", "count", "device",
                         "clip_stats", "help", "sampler", "karras", "schedule",
                         # (A1111's noise and σ settings: the same sample_latents call as without --image-vectors)
                         "noise", "subseed", "subseed_strength", "seed_resize_from", "ensd", "sigma_min", "sigma_max",
                         "rho", "beta_alpha", "beta_beta", "old_karras_sigmas", "jpeg_quality", "webp_lossless")
_IMAGE_VECTOR_MESSAGE = ("{option} does not apply with --image-vectors (CLIP-inversion vectors are sampled at "
                         "the model's size from --prompt, --negative, --seed, --steps, --guidance, --count, --sampler, "
                         "--karras, --schedule and A1111's noise and σ settings (--noise, --subseed, --sigma-min, ...); "
                         "docs/clip-inversion.md): leave {option} out")


def _cmd_generate_image_vectors(args: argparse.Namespace) -> int:
    """``generate --image-vectors FILE``: :func:`sdadapt.inversion.clip_job.run_generate_image_vectors`."""
    from ..errors import InputError
    from ..inversion.clip_job import run_generate_image_vectors

    for flag, value in (("--lora", args.lora), ("--embedding", args.embedding), ("--hypernetwork", args.hypernetwork),
                        ("--custom-diffusion", args.custom_diffusion)):
        if value:
            raise InputError(_IMAGE_VECTOR_MESSAGE.format(option=flag))
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: with --image-vectors give the seed (>= 0) to draw the image from")
    result = run_generate_image_vectors(
        args.image_vectors, out=args.out, model=args.model, prompt=args.prompt or "", negative=args.negative,
        count=args.count, seed=args.seed, steps=args.steps, guidance=args.guidance, device=args.device,
        clip_stats=args.clip_stats, overwrite=args.overwrite, progress=progress_bar(args, "generate", unit="image") if args.count > 1 else None,
        sampler=args.sampler, karras=args.karras, schedule=args.schedule, noise=args.noise, subseed=args.subseed,
        subseed_strength=args.subseed_strength, seed_resize_from=args.seed_resize_from, ensd=args.ensd,
        sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho, beta_alpha=args.beta_alpha,
        beta_beta=args.beta_beta, old_karras_sigmas=args.old_karras_sigmas, jpeg_quality=args.jpeg_quality,
        webp_lossless=args.webp_lossless,
    )
    for file in result["files"]:
        print(f"wrote {file}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``generate`` to a CLI."""
    generate = sub.add_parser(
        "generate",
        help="make images from a prompt on the toy model or a Stable Diffusion model, with LoRAs and embeddings",
        description="Make an image (PNG, JPEG or WebP) from a prompt (kohya's and A1111's samplers, classifier-free "
        "guidance) on the toy model, a diffusers folder or an SD1/SD2/SDXL single-file checkpoint, with LoRA-family files merged in at a strength "
        "(--lora FILE:0.8), A1111 hypernetworks (--hypernetwork FILE:0.7) and textual-inversion embeddings (their file "
        "names become trigger words).",
    )
    generate.add_argument("--model", default="toy", metavar="toy|PATH",
                          help="'toy' (built in, default), a diffusers folder or a .safetensors/.ckpt checkpoint")
    generate.add_argument("--infotext", default=None, metavar="PNG|TXT",
                          help="A1111's generation parameters (an image's 'parameters' text, A1111's or generate's, or "
                               "that text saved in a file) as the options not given: prompt, sampler, seed, size, "
                               "hires fix, A1111's noise... (docs/samplers.md, 'Reading an infotext back')")
    generate.add_argument("--upscaler-dir", default=None, metavar="DIR",
                          help="with --infotext: where the ESRGAN models its upscaler fields name are (A1111's "
                          "models/ESRGAN; 'Hires upscaler: 4x-UltraSharp' read as DIR/4x-UltraSharp.pth)")
    generate.add_argument("--prompt", default=None,
                          help="required (optional with --image-vectors, default empty): what to draw, in A1111's "
                          "prompt syntax (docs/prompts.md): emphasis (word:1.2), (word) "
                          "x1.1, [word] /1.1, \\( a literal bracket (Stable Diffusion models; the toy reads the plain "
                          "words); prompt editing [from:to:when], alternation [a|b], AND with :weight, BREAK; "
                          "<lora:NAME:MULT> and <hypernet:NAME:MULT> tags (with --lora-dir / --hypernetwork-dir)")
    generate.add_argument("--negative", default="",
                          help="negative prompt (default none; emphasis, prompt editing, alternation and BREAK as --prompt; "
                          "AND and <...> tags are text here, as in A1111)")
    generate.add_argument("--no-comments", dest="comments", action="store_false",
                          help="keep '#' in --prompt/--negative as text (default: A1111's \"Enable comments\": '#' and "
                          "the rest of its line are left out)")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                          help="a LoRA/LyCORIS file to merge in at SCALE (default 1); repeat for several")
    generate.add_argument("--lora-dir", default=None, metavar="DIR",
                          help="where the prompt's <lora:NAME:...> / <lyco:NAME:...> tags find NAME.safetensors|.pt|.ckpt "
                          "(searched recursively, A1111's --lora-dir; else a .safetensors whose ss_output_name is NAME); "
                          "a tag's LoRA adds to any --lora of the same file")
    generate.add_argument("--lbw-presets", default=None, metavar="FILE",
                          help="the LoRA Block Weight extension's preset file (lines NAME:w,w,...) for the tags' "
                          "lbw=NAME, added to its built-in presets (NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, "
                          "OUTALL, ALL0.5)")
    generate.add_argument("--hypernetwork-dir", default=None, metavar="DIR",
                          help="where the prompt's <hypernet:NAME:MULT> tags find NAME.pt|.safetensors (recursively)")
    generate.add_argument("--embedding", action="append", default=[], metavar="FILE",
                          help="a textual-inversion embedding; repeat for several")
    generate.add_argument("--embeddings-dir", default=None, metavar="DIR",
                          help="A1111's embeddings folder: the .pt/.bin/.safetensors embeddings under DIR whose file "
                          "names the prompt or negative prompt uses (e.g. EasyNegative) are loaded")
    generate.add_argument("--hypernetwork", action="append", default=[], metavar="FILE[:STRENGTH]",
                          help="an A1111 hypernetwork (.pt, or its .safetensors twin) at STRENGTH (default 1, "
                          "A1111's); repeat to chain several in order, as A1111's <hypernet:...> tags")
    generate.add_argument("--custom-diffusion", action="append", default=[], metavar="FILE[:SCALE]",
                          help="a Custom Diffusion result (train custom-diffusion / merge-custom-diffusion's file, "
                          "its -token files beside it, or diffusers' output folder) at SCALE (default 1); its "
                          "modifier token works in the prompt; repeat for several")
    generate.add_argument("--seed", type=int, default=0,
                          help="the noise seed (default 0); -1 draws one, as A1111, printed with the file name")
    generate.add_argument("--steps", type=positive_int, default=None, help="sampler steps (default 25)")
    generate.add_argument("--guidance", "--cfg", dest="guidance", type=float, default=None,
                          help="classifier-free guidance scale (default: the model's, SD 7.5, toy 2; an EDM model such as "
                          "Playground v2.5: 3 with dpmsolver++, 5 with euler, its model card's)")
    generate.add_argument("--guidance-rescale", "--cfg-rescale", dest="guidance_rescale", type=float, default=0.0,
                          metavar="PHI",
                          help="guidance rescale φ in [0, 1] against high-guidance over-exposure (Lin et al.; 0.7 "
                          "suggested for v-prediction / zero-terminal-SNR models; default 0, off): diffusers' "
                          "guidance_rescale on diffusers' grids, A1111's 'CFG Rescale' extension on A1111's "
                          "(docs/samplers.md)")
    generate.add_argument("--guidance-rescale-space", choices=("combined", "v"), default="combined",
                          help="where --guidance-rescale is taken: combined (default; where the guidance combines, "
                          "as diffusers and A1111's extension) or v (ComfyUI's / reForge's RescaleCFG: each branch "
                          "as the v it implies at σ; a σ sampler with --schedule, or a v model)")
    generate.add_argument("--pag-scale", type=float, default=0.0, metavar="F",
                          help="perturbed-attention guidance scale (Ahn et al. 2024; 3 the usual; default 0, off): "
                          "the guided result pushed away from the prompt's branch run with an identity self-attention "
                          "map — diffusers' PAG pipelines' pag_scale, Forge's / ComfyUI's PerturbedAttentionGuidance "
                          "(one more UNet branch per call; docs/samplers.md)")
    generate.add_argument("--pag-adaptive-scale", type=float, default=0.0, metavar="F",
                          help="diffusers' pag_adaptive_scale: the PAG scale at timestep t is max(scale − F·(1000 − t), "
                          "0) (SD.Next's 'PAG adaptive'; default 0: constant)")
    generate.add_argument("--pag-layers", nargs="+", default=None, metavar="PATTERN",
                          help="the self-attention layers PAG perturbs: diffusers' pag_applied_layers, regular "
                          "expressions searched in the UNet's module names (default: mid, the middle block's, as "
                          "diffusers, Forge and ComfyUI; e.g. down_blocks.2 up_blocks.0)")
    generate.add_argument("--sag-scale", type=float, default=0.0, metavar="F",
                          help="self-attention guidance scale (Hong et al.; default 0, off; 0.5 ComfyUI's / Forge's, "
                          "0.75 diffusers'): the regions the middle self-attention attends to most are blurred in x̂0, "
                          "renoised and run again, and the result pushed away from that (one more UNet call per step; "
                          "σ samplers or diffusers' grid; docs/samplers.md)")
    generate.add_argument("--sag-blur-sigma", type=float, default=2.0, metavar="F",
                          help="the SAG blur's σ in latent pixels (default 2, ComfyUI's / Forge's; diffusers' pipeline "
                          "fixes 1)")
    generate.add_argument("--dynamic-thresholding", "--cfg-fix", dest="dynamic_thresholding", nargs="+", default=None,
                          metavar=("MIMIC", "KEY=VALUE"),
                          help="dynamic thresholding, 'CFG Scale Fix' (mcmonkey's extension; A1111's, Forge's "
                          "built-in): a high --guidance renormalised to the spread of the MIMIC scale's, on each "
                          "branch's x̂0; then any option as KEY=VALUE: threshold_percentile (0-1), mimic_mode / "
                          "cfg_mode (Constant, 'Linear Down', 'Cosine Down', 'Power Up'...), mimic_scale_min, "
                          "cfg_scale_min, sched_val, separate_feature_channels (true/false), scaling_startpoint "
                          "(MEAN/ZERO), variability_measure (AD/STD), interpolate_phi, step_rule (calls: A1111's, "
                          "timesteps: Forge's). A1111 σ samplers with a schedule (docs/samplers.md)")
    generate.add_argument("--freeu", nargs="*", type=float, default=None, metavar="F",
                          help="FreeU (Si et al.): the decoder's backbone features amplified and its skip features' "
                          "lowest frequencies damped; alone Forge's defaults, or B1 B2 S1 S2 (SD1.5 1.5 1.6 0.9 0.2, "
                          "SDXL 1.3 1.4 0.9 0.2 are the paper's; docs/samplers.md)")
    generate.add_argument("--freeu-window", nargs=2, type=float, default=(0.0, 1.0), metavar=("START", "END"),
                          help="newer Forge's FreeU window: FreeU on the model calls whose A1111 sampling step / "
                          "(steps − 1) lies in [START, END], each pass (default 0 1: every call)")
    generate.add_argument("--freeu-version", choices=("v2", "diffusers"), default="v2",
                          help="v2 (default): ComfyUI's FreeU_V2, Forge's 'FreeU Integrated'; diffusers: "
                          "UNet2DConditionModel.enable_freeu")
    generate.add_argument("--sampler", type=_sampler, default=None, metavar="NAME",
                          help="default ddim (an EDM model such as Playground v2.5: dpmsolver++, its own scheduler); "
                          f"one of {', '.join(sampler_choices())}, or an A1111 label with ' Karras' "
                          "('DPM++ 2M Karras'); docs/samplers.md")
    generate.add_argument("--karras", action="store_true",
                          help="noise levels on Karras et al.'s grid (diffusers' use_karras_sigmas; A1111's 'Karras'), "
                          f"for {', '.join(KARRAS_SAMPLERS)}")
    generate.add_argument("--schedule", type=_schedule, default=None, metavar="NAME",
                          help="A1111's 'Schedule type', the noise-level grid: "
                          f"{', '.join(dict.fromkeys(SCHEDULE_LABELS.values()))} (A1111's labels or names such as "
                          "sgm_uniform; 'Automatic' is A1111's pick for the sampler); default: the sampler's diffusers "
                          f"grid. For {', '.join(SCHEDULE_SAMPLERS)}; --karras is --schedule karras (docs/samplers.md)")
    a1111 = generate.add_argument_group("A1111's noise and schedule settings (docs/samplers.md, 'Noise and seeds')")
    a1111.add_argument("--noise", choices=("a1111", "a1111-cpu"), default=None,
                       help="draw the start noise and the samplers' noise as AUTOMATIC1111 does for the seed: a1111 = "
                       "its default GPU/NV source (what an NVIDIA GPU draws, reproduced on any device), a1111-cpu = "
                       "its CPU source; default: sdadapt's CPU generator")
    a1111.add_argument("--subseed", type=int, default=None, metavar="N",
                       help="A1111's variation seed (with --noise; -1 draws one)")
    a1111.add_argument("--subseed-strength", type=float, default=0.0, metavar="S",
                       help="A1111's variation strength in [0, 1] (with --noise and --subseed)")
    a1111.add_argument("--seed-resize-from", type=_height_width, default=None, metavar="WxH",
                       help="A1111's 'Resize seed from width/height', e.g. 512x512 (with --noise)")
    a1111.add_argument("--ensd", type=int, default=0, metavar="N",
                       help="A1111's 'Eta noise seed delta' (with --noise; NovelAI-era setups use 31337)")
    a1111.add_argument("--sigma-min", type=float, default=0.0, metavar="SIGMA",
                       help="A1111's setting 'sigma min' for --schedule (0: the model's)")
    a1111.add_argument("--sigma-max", type=float, default=0.0, metavar="SIGMA",
                       help="A1111's setting 'sigma max' for --schedule (0: the model's)")
    a1111.add_argument("--rho", type=float, default=0.0, metavar="RHO",
                       help="A1111's setting 'sigma rho' for the Karras / Polyexponential schedules (0: 7 / 1)")
    a1111.add_argument("--beta-alpha", type=float, default=0.6, metavar="A", help="the Beta schedule's alpha (0.6)")
    a1111.add_argument("--beta-beta", type=float, default=0.6, metavar="B", help="the Beta schedule's beta (0.6)")
    a1111.add_argument("--old-karras-sigmas", action="store_true",
                       help="A1111's 'Use old karras scheduler sigmas (0.1 to 10)' for --schedule")
    a1111.add_argument("--always-discard-next-to-last-sigma", action="store_true",
                       help="A1111's 'Always discard next-to-last sigma' for --schedule: n + 1 steps less the "
                            "next-to-last σ on every sampler (DPM2, DPM2 a, DPM++ 3M SDE do it anyway)")
    a1111.add_argument("--sgm-noise-multiplier", action="store_true",
                       help="A1111's 'SGM noise multiplier' for --schedule: a txt2img run starts from noise·√(1 + σ²) "
                            "instead of noise·σ, as the official SDXL code does (only to reproduce such images)")
    a1111.add_argument("--skip-early-cfg", type=float, default=0.0, metavar="F",
                       help="A1111's 'Skip Early CFG': the first F (0-1) of each pass's model calls skip the negative "
                            "prompt (0: off)")
    a1111.add_argument("--ngms", type=float, default=0.0, metavar="SIGMA",
                       help="A1111's 'Negative Guidance minimum sigma': every other model call below SIGMA skips the "
                            "negative prompt (0: off; needs --schedule)")
    a1111.add_argument("--ngms-all-steps", action="store_true",
                       help="A1111's 'NGMS all steps': every call below --ngms skips it, not every other one")
    a1111.add_argument("--emphasis", default="Original", metavar="MODE",
                       help="A1111's 'Emphasis mode' for (word:1.2) / [word]: Original (default: weights, then the "
                            "mean restored), 'No norm' (weights only), Ignore (the weights not applied), None "
                            "(no syntax: brackets and BREAK are words of the prompt)")
    a1111.add_argument("--tiling", action="store_true",
                       help="A1111's 'Tiling': every convolution of the UNet and VAE pads circularly, so the image "
                            "tiles without a seam (seamless textures)")
    a1111.add_argument("--a1111-upsampling", action="store_true",
                       help="A1111's UNet at sizes it does not halve evenly (SD1's 520, SDXL's 1000): each upsampler's "
                            "output resized to its skip after its convolution, as A1111 (not before: diffusers, "
                            "ComfyUI, Forge); no change at sizes it halves evenly")
    a1111.add_argument("--vae-tiling", action="store_true",
                       help="the VAE decodes and encodes in overlapping tiles (diffusers' enable_vae_tiling): a large "
                            "image in the memory of one tile, its seams blended")
    a1111.add_argument("--token-merging-ratio", "--tome", dest="token_merging_ratio", type=float, default=0.0,
                       metavar="F",
                       help="A1111's 'Token merging ratio' (ToMe, tomesd as A1111 runs it): the share of the "
                            "full-resolution self-attention tokens merged, for speed (default 0, off; 0.5 usual)")
    a1111.add_argument("--token-merging-ratio-hr", type=float, default=None, metavar="F",
                       help="A1111's 'Token merging ratio for high-res pass' (default: --token-merging-ratio's)")
    a1111.add_argument("--hypertile-unet", action="store_true",
                       help="A1111's 'Hypertile U-Net': the UNet's self-attention on tiles (A1111's depth 3, tile "
                            "256, swap 3), for speed on large images")
    a1111.add_argument("--hypertile-unet-second-pass", action="store_true",
                       help="A1111's 'Hypertile U-Net second pass': tiled for the hires pass only")
    a1111.add_argument("--hypertile-vae", action="store_true",
                       help="A1111's 'Hypertile VAE': the VAE decoder's middle attention on tiles (tile 128, swap 3)")
    a1111.add_argument("--noise-schedule", default="default", metavar="NAME",
                       help="A1111's 'Noise schedule for sampling': default (the model's own; a checkpoint marked ztsnr "
                            "is on the next one already) or zero-terminal-snr (A1111's 'Zero Terminal SNR'): the "
                            "model's schedule rescaled so its last step is pure noise")
    a1111.add_argument("--downcast-alphas-cumprod", action="store_true",
                       help="A1111's 'Downcast model alphas_cumprod to fp16 before sampling' (reproducing old seeds: "
                            "every A1111 before v1.7.0-225 sampled so; --infotext turns it on for those): the σ "
                            "samplers read the model's σ table as A1111 does from a half ᾱ (with a --schedule)")
    a1111.add_argument("--old-prompt-editing-timelines", action="store_true",
                       help="A1111's 'Use old prompt editing timelines' (before 1.6): in [from:to:when] a when below 1 "
                            "is a fraction of the steps, any other a step number ([a:b:1.0]: step 1), the hires pass "
                            "planned as the first; --infotext turns it on for a prompt with [ made before v1.6.0")
    a1111.add_argument("--eta", type=float, default=None, metavar="F",
                       help="A1111's 'Eta for ancestral samplers' (default 1): the noise share of Euler a, DPM2 a, "
                            "DPM++ 2S a, DPM++ SDE, the 2M/3M SDEs (with --schedule), DPM fast/adaptive")
    a1111.add_argument("--eta-ddim", type=float, default=None, metavar="F",
                       help="A1111's 'Eta DDIM' (default 0): the noise of its own DDIM (--sampler DDIM --schedule "
                            "automatic) and DDIM CFG++")
    a1111.add_argument("--noise-multiplier", type=float, default=1.0, metavar="F",
                       help="A1111's 'Noise multiplier for img2img' (default 1): the start noise of an --init-image "
                            "run times F")
    a1111.add_argument("--extra-noise", type=float, default=0.0, metavar="F",
                       help="A1111's 'Extra noise multiplier for img2img and hires fix' (default 0): the start noise "
                            "times F added to the first sample of an --init-image run and of the hires pass")
    a1111.add_argument("--sigma-churn", type=float, default=0.0, metavar="F",
                       help="A1111's 'Sigma churn' (default 0: off) for Euler, Heun, DPM2 (with --schedule): "
                            "k-diffusion's churn, noise added before each step")
    a1111.add_argument("--sigma-tmin", type=float, default=0.0, metavar="F",
                       help="A1111's 'Sigma tmin' (default 0): churn only from this σ up")
    a1111.add_argument("--sigma-tmax", type=float, default=0.0, metavar="F",
                       help="A1111's 'Sigma tmax' (default 0: no limit): churn only up to this σ")
    a1111.add_argument("--sigma-noise", type=float, default=1.0, metavar="F",
                       help="A1111's 'Sigma noise' (default 1): the churn noise's scale")
    a1111.add_argument("--pad-conds", action="store_true",
                       help="A1111's 'Pad prompt/negative prompt': a prompt and negative of different chunk counts "
                            "padded with the empty prompt's states to one length (one model call for both)")
    a1111.add_argument("--pad-conds-v0", action="store_true",
                       help="A1111's 'Pad prompt/negative prompt (v0)': the negative's last token repeated (or cut) "
                            "to the prompt's length")
    generate.add_argument("--width", type=positive_int, default=None, help="default: the model's size")
    generate.add_argument("--height", type=positive_int, default=None, help="default: the model's size")
    img2img = generate.add_argument_group("img2img and hires fix (A1111's; docs/samplers.md, 'img2img and hires fix')")
    img2img.add_argument("--init-image", default=None, metavar="IMAGE",
                         help="img2img: start from this image, brought to --width x --height by --resize-mode "
                         "(Lanczos) and VAE-encoded; a folder: every image in it and its subfolders (A1111's img2img "
                         "batch), written under its own name into the --out folder")
    img2img.add_argument("--resize-mode", default="just", choices=tuple(RESIZE_MODE_LABELS),
                         type=_a1111_choice("--resize-mode", RESIZE_MODE_LABELS),
                         help="how --init-image is brought to the size (the name or A1111's label): A1111's 'Just "
                         "resize' (stretch, the default), "
                         "'Crop and resize' (cover, cut the centre), 'Resize and fill' (fit, pad with the edges), "
                         "'Just resize (latent upscale)' (latent: encoded at its own size, the latents stretched; not "
                         "with --mask); with "
                         "--inpaint-full-res only a blank mask's plain img2img and the overlay of a --mask of another "
                         "size use it, as in A1111")
    img2img.add_argument("--vae-encode", default="mean", choices=VAE_ENCODE_METHODS,
                         help="how the --init-image (and the pixel-lanczos hires pass's image) is VAE-encoded: 'mean' "
                         "(default) the posterior mean, the same for every seed; 'sample' a posterior sample drawn "
                         "from the seed's generator before its start noise, as diffusers' img2img pipelines (their "
                         "images for --seed; an inpainting model's masked image too, as diffusers' inpaint pipelines, "
                         "and the grey image of its txt2img and hires conditioning, drawn after the start noise, so "
                         "an inpainting model needs no --init-image for it); "
                         "A1111's setting 'sd_vae_encode_method' samples from an unseeded RNG "
                         "(docs/samplers.md, 'Encoding the init image')")
    img2img.add_argument("--img2img-fix-steps", action="store_true",
                         help="A1111's setting 'With img2img, do exactly the amount of steps the slider specifies': "
                         "--steps steps run (the grid is built for steps / strength); default: strength x steps")
    img2img.add_argument("--denoising-strength", type=float, default=None, metavar="S",
                         help="img2img denoising strength in [0, 1] (default 0.75, A1111's; 1 with --img2img-alt)")
    img2img.add_argument("--mask", default=None, metavar="IMAGE",
                         help="inpaint the --init-image: white = repaint, black = keep (an RGBA mask with transparency: "
                         "its alpha; any size, resized as A1111 resizes it); A1111's 'Inpaint whole picture', or 'Only "
                         "masked' with --inpaint-full-res (docs/samplers.md, 'Inpainting'); with a folder of init "
                         "images: one mask for all, or a folder of masks named as the images")
    img2img.add_argument("--mask-blur", type=float, default=None, metavar="PX",
                         help="Gaussian blur of the mask in pixels (default 4, A1111's)")
    img2img.add_argument("--inpaint-sketch", default=None, metavar="ORIGINAL",
                         help="A1111's 'Inpaint sketch': --init-image is ORIGINAL with colour strokes drawn on it; "
                         "what the strokes cover is repainted, starting from the strokes blended in (docs/samplers.md)")
    img2img.add_argument("--mask-transparency", type=float, default=0.0, metavar="PCT",
                         help="--inpaint-sketch: A1111's 'Mask transparency' (0 to 100, default 0)")
    img2img.add_argument("--invert-mask", action="store_true", help="repaint the black area (A1111's 'Inpaint not masked')")
    img2img.add_argument("--inpainting-fill", default="original", choices=tuple(INPAINTING_FILL_LABELS),
                         type=_a1111_choice("--inpainting-fill", INPAINTING_FILL_LABELS),
                         help="what the masked area starts as (A1111's 'Masked content', its labels too: 'latent "
                         "noise'; default original)")
    img2img.add_argument("--inpainting-mask-weight", type=float, default=1.0, metavar="W",
                         help="inpainting models: A1111's 'Inpainting conditioning mask strength' in [0, 1] (default 1; "
                         "img2img without --mask too, and the txt2img hires pass, where below 1 it conditions an "
                         "inpainting or unCLIP model on the upscaled first pass, as A1111)")
    img2img.add_argument("--inpaint-full-res", action="store_true",
                         help="A1111's 'Inpaint area: Only masked': inpaint the mask's region (plus the padding, grown "
                         "to the --width:--height aspect) at --width x --height and paste it back; the output keeps "
                         "the init image's size")
    img2img.add_argument("--inpaint-full-res-padding", type=int, default=None, metavar="PX",
                         help="A1111's 'Only masked padding, pixels' around the mask's region (default 32)")
    img2img.add_argument("--sd-upscale", type=float, default=None, metavar="SCALE",
                         help="A1111's 'SD upscale' script: --init-image enlarged SCALE times, cut into --width x "
                         "--height tiles, each run through img2img (seeds --seed + k), blended back over the overlaps; "
                         "writes the big image (docs/samplers.md)")
    img2img.add_argument("--sd-upscale-overlap", type=int, default=64, metavar="PX",
                         help="SD upscale: the tiles' overlap in pixels (default 64, A1111's)")
    img2img.add_argument("--sd-upscale-upscaler", default="lanczos", metavar="NAME|FILE",
                         help="SD upscale: how the image is enlarged before tiling: lanczos (default), nearest or none "
                         "(A1111's built-in upscalers, either spelling), or an ESRGAN model file (.pth / "
                         ".safetensors: R-ESRGAN 4x+, 4x-UltraSharp ...)")
    img2img.add_argument("--loopback", type=positive_int, default=None, metavar="N",
                         help="A1111's 'Loopback' script: img2img N times, each output the next run's --init-image, "
                         "the strength moving from --denoising-strength to --loopback-final-denoising; every loop's "
                         "image is written (docs/samplers.md)")
    img2img.add_argument("--loopback-final-denoising", type=float, default=0.5, metavar="S",
                         help="loopback: the last loop's denoising strength (default 0.5, A1111's)")
    img2img.add_argument("--loopback-curve", default="linear", metavar="CURVE",
                         help="loopback: how the strength moves — linear (default), aggressive (early), lazy (late); "
                         "A1111's labels too")
    img2img.add_argument("--outpaint", type=positive_int, default=None, metavar="PX",
                         help="A1111's 'Poor man's outpainting' script: --init-image on a canvas grown by PX pixels on "
                         "each side of --outpaint-directions, the tiles reaching past it inpainted (docs/samplers.md)")
    img2img.add_argument("--outpaint-mk2", type=positive_int, default=None, metavar="PX",
                         help="A1111's 'Outpainting mk2' script: --init-image grown by PX pixels one side of "
                         "--outpaint-directions at a time, each new border filled with noise matched to the image "
                         "and inpainted (docs/samplers.md)")
    img2img.add_argument("--outpaint-directions", nargs="+", default=["left", "right", "up", "down"],
                         choices=["left", "right", "up", "down"], metavar="SIDE",
                         help="outpainting: the sides to grow (default all four)")
    img2img.add_argument("--outpaint-mask-blur", type=int, default=None, metavar="PX",
                         help="outpainting: the script's mask blur (default 4, mk2's 8; the masks blur by twice it, "
                         "mk2's by four times, as A1111)")
    img2img.add_argument("--outpaint-falloff", type=float, default=1.0, metavar="Q",
                         help="outpainting mk2: the noise's 'Fall-off exponent' (0 to 4, default 1; lower: more "
                         "detail)")
    img2img.add_argument("--outpaint-color-variation", type=float, default=0.05, metavar="V",
                         help="outpainting mk2: the noise's 'Color variation' (0 to 1, default 0.05)")
    img2img.add_argument("--color-correction", action="store_true",
                         help="A1111's 'Apply color correction to img2img results to match original colors': each "
                         "image histogram-matched in CIELAB to the init image, its luminosity kept (needs "
                         "opencv-python-headless)")
    img2img.add_argument("--img2img-alt", action="store_true",
                         help="A1111's 'img2img alternative test' script: start from the --init-image's own noise, "
                         "found by Euler steps up the σ grid on --decode-prompt; its defaults are the script's "
                         "overrides: sampler euler, --steps = --decode-steps (50), --denoising-strength 1, --prompt "
                         "as the decode prompt (docs/null-text-inversion.md)")
    img2img.add_argument("--decode-prompt", default=None, metavar="TEXT",
                         help="--img2img-alt: the prompt the image is inverted with (the script's 'Original prompt'; "
                         "default --prompt); give --prompt as the edit")
    img2img.add_argument("--decode-negative", default=None, metavar="TEXT",
                         help="--img2img-alt: the negative prompt it is inverted with (default --negative)")
    img2img.add_argument("--decode-steps", type=positive_int, default=None, metavar="N",
                         help="--img2img-alt: the inversion's steps ('Decode steps'; default --steps, else 50, "
                         "A1111's, for both)")
    img2img.add_argument("--decode-guidance", type=float, default=1.0, metavar="F",
                         help="--img2img-alt: the inversion's CFG scale ('Decode CFG scale', default 1; the script "
                         "says 2 or lower)")
    img2img.add_argument("--randomness", type=float, default=0.0, metavar="R",
                         help="--img2img-alt: how much of the seed's own noise is blended in (0 to 1, default 0)")
    img2img.add_argument("--sigma-adjustment", action="store_true",
                         help="--img2img-alt: the script's 'Sigma adjustment for finding noise for image'")
    img2img.add_argument("--outpaint-fill", default="fill", choices=tuple(INPAINTING_FILL_LABELS),
                         type=_a1111_choice("--outpaint-fill", INPAINTING_FILL_LABELS),
                         help="outpainting: what the new border starts as (the script's 'Masked content'; default "
                         "fill, A1111's)")
    img2img.add_argument("--soft-inpainting", nargs="*", default=None, metavar="KEY=VALUE",
                         help="A1111's soft inpainting: the mask's grey levels kept (use a high --mask-blur), the "
                         "original blended in by them at each step, and composited back where the picture barely "
                         "changed; alone A1111's defaults, or any of schedule_bias (1), preservation_strength (0.5), "
                         "transition_contrast_boost (4), mask_influence (0), difference_threshold (0.5), "
                         "difference_contrast (2) as KEY=VALUE (docs/samplers.md)")
    img2img.add_argument("--hires-scale", type=float, default=None, metavar="F",
                         help="hires fix: a second pass at F times the size (A1111's 'Upscale by')")
    img2img.add_argument("--hires-width", type=positive_int, default=None, metavar="W",
                         help="hires fix: the second pass's width (alone: the height in proportion; with "
                              "--hires-height out of proportion: enlarged to cover both, then cropped, A1111's rule)")
    img2img.add_argument("--hires-height", type=positive_int, default=None, metavar="H",
                         help="hires fix: the second pass's height (alone: the width in proportion; with "
                              "--hires-width out of proportion: enlarged to cover both, then cropped, A1111's rule)")
    img2img.add_argument("--hires-steps", type=int, default=0, metavar="N",
                         help="hires fix: the second pass's steps (default 0: --steps)")
    img2img.add_argument("--hires-denoising", type=float, default=0.7, metavar="S",
                         help="hires fix: the second pass's denoising strength (default 0.7, A1111's)")
    img2img.add_argument("--hires-upscaler", default="latent", metavar="NAME|FILE",
                         type=_upscaler("--hires-upscaler", HIRES_UPSCALER_LABELS),
                         help="hires fix: how the first pass is enlarged: A1111's latent upscalers (interpolate the "
                         f"latents: {', '.join(u for u in HIRES_UPSCALERS if u.startswith('latent'))}), its pixel "
                         "ones (decode, enlarge, encode: pixel-lanczos, pixel-nearest, pixel-none) or an ESRGAN model "
                         "file (.pth / .safetensors: R-ESRGAN 4x+, 4x-UltraSharp ...; decode, the model, Lanczos to "
                         "the size, encode); A1111's names as its infotext writes them work too ('Latent (bicubic "
                         "antialiased)', 'Lanczos', 'None'); default latent")
    img2img.add_argument("--hires-prompt", default=None, metavar="TEXT",
                         help="hires fix: the second pass's prompt (A1111's 'Hires prompt'; default or empty: "
                              "--prompt)")
    img2img.add_argument("--hires-negative", default=None, metavar="TEXT",
                         help="hires fix: the second pass's negative prompt (A1111's 'Hires negative prompt'; "
                         "default or empty: --negative)")
    img2img.add_argument("--hires-guidance", type=float, default=None, metavar="F",
                         help="hires fix: the second pass's guidance scale (Forge's 'Hires CFG Scale'; default: "
                              "--guidance)")
    img2img.add_argument("--hires-checkpoint", default=None, metavar="MODEL",
                         help="hires fix: another model (file or folder) runs the second pass (A1111's 'Hires "
                              "checkpoint'); the run's LoRAs, hypernetworks and embeddings act on it too")
    img2img.add_argument("--hires-sampler", type=_sampler, default=None, metavar="NAME",
                         help="hires fix: the second pass's sampler (A1111's 'Hires sampling method'; default: "
                         "--sampler; one that starts from an image, docs/samplers.md)")
    img2img.add_argument("--hires-schedule", type=_schedule, default=None, metavar="NAME",
                         help="hires fix: the second pass's grid (A1111's 'Hires schedule type'; default: --schedule's)")
    generate.add_argument("--count", type=positive_int, default=1,
                          help="images (seeds SEED, SEED+1, ...; with --subseed-strength all SEED, as A1111; "
                          "OUT-00.png ...)")
    generate.add_argument("--grid", action="store_true",
                          help="with --count N: also the grid of the N images as OUT (A1111's batch grid: "
                          "round(sqrt(N)) rows, the first image's infotext); the images are OUT-00.png ...")
    generate.add_argument("--styles-file", action="append", default=[], metavar="CSV",
                          help="A1111's styles file (styles.csv: name, prompt, negative_prompt; a pattern with * "
                          "reads several), for --style; repeat for several files")
    generate.add_argument("--style", action="append", default=[], metavar="NAME",
                          help="a saved style of --styles-file merged into the prompts as A1111 does ({prompt} in "
                          "its text: the prompt there; else appended after ', '); repeat for several, in order")
    lines = generate.add_argument_group("A1111's \"Prompts from file or textbox\" (docs/prompts.md, 'A prompts file')")
    lines.add_argument("--prompts-file", default=None, metavar="FILE",
                       help="one run per line of FILE: a prompt, or A1111's line options (--prompt TEXT "
                       "--negative_prompt TEXT --seed N --steps N --cfg_scale F --sampler_name NAME --width PX "
                       "--height PX --n_iter N --batch_size N ...); the line's prompt goes before --prompt's; line k "
                       "writes OUT-kk.png (OUT-kk-ii.png for several images); the model is loaded once")
    lines.add_argument("--prompts-file-iterate-seed", action="store_true",
                       help="A1111's \"Iterate seed every line\": the seed moves by --count after each line")
    lines.add_argument("--prompts-file-same-seed", action="store_true",
                       help="A1111's \"Use same random seed for all lines\": --seed -1 drawn once for all lines")
    lines.add_argument("--prompts-file-insert", choices=("start", "end"), default="start",
                       help="A1111's \"Insert prompts at the\": a line's prompt before --prompt's (start, default) "
                       "or after it (end)")
    xyz = generate.add_argument_group("A1111's \"X/Y/Z plot\" (docs/samplers.md, 'X/Y/Z plot')")
    for axis in "xyz":
        xyz.add_argument(f"--xyz-{axis}", nargs=2, default=None, metavar=("TYPE", "VALUES"),
                         help=f"the grid's {axis.upper()} axis: an A1111 axis type (Seed, Steps, 'CFG Scale', "
                         "'Prompt S/R', Sampler, 'Checkpoint name', Size, ...) and its values as A1111 reads them "
                         "('10-30 (+10)', '5, 7.5', '0-1 [5]', 'cat, dog'); one run per cell, the grid written to "
                         "OUT, cell k to OUT-kk.png" if axis == "x" else f"the grid's {axis.upper()} axis (as "
                         "--xyz-x)")
    xyz.add_argument("--xyz-no-legend", dest="xyz_legend", action="store_false",
                     help="no labels around the grid (A1111's \"Draw legend\" off; the legend needs Pillow)")
    xyz.add_argument("--xyz-keep-random-seeds", action="store_true",
                     help="A1111's \"Keep -1 for seeds\": a seed -1 drawn per cell (default: once for all)")
    xyz.add_argument("--xyz-vary-seeds", nargs="+", choices=("x", "y", "z"), default=None, metavar="AXIS",
                     help="A1111's \"Vary seeds for X/Y/Z\": the seed moves along these axes (x y z)")
    xyz.add_argument("--xyz-sub-grids", action="store_true",
                     help="A1111's \"Include Sub Grids\": with a Z axis, each Z value's grid too (OUT-zNN.png)")
    matrix = generate.add_argument_group("A1111's \"Prompt matrix\" (docs/prompts.md, 'Prompt matrix')")
    matrix.add_argument("--prompt-matrix", action="store_true",
                        help="one image per combination of the prompt's parts 'base | part | part ...' (the base "
                        "always, each later part in or out), and their grid labelled with the parts; image i "
                        "written as OUT-ii.png, the grid as OUT")
    matrix.add_argument("--prompt-matrix-negative", action="store_true",
                        help="A1111's \"Select prompt: negative\": the combinations of --negative's parts instead")
    matrix.add_argument("--prompt-matrix-at-start", action="store_true",
                        help="A1111's \"Put variable parts at start of prompt\"")
    matrix.add_argument("--prompt-matrix-different-seeds", action="store_true",
                        help="A1111's \"Use different seed for each picture\": image i with seed SEED+i")
    matrix.add_argument("--prompt-matrix-join", choices=("comma", "space"), default="comma",
                        help="A1111's \"Select joining char\" between the parts (default comma: ', ')")
    grids = generate.add_argument_group("the grids of --xyz-x / --prompt-matrix (A1111's grid settings)")
    grids.add_argument("--grid-margin", type=int, default=0, metavar="PX",
                       help="A1111's \"Grid margins (px)\" between the cells of a labelled grid (default 0)")
    grids.add_argument("--grid-font", default=None, metavar="TTF",
                       help="a TrueType font for the grid's labels (A1111's \"Font for image grids\"; default "
                       "Pillow's)")
    generate.add_argument("--tokenizer", default=None, metavar="DIR", help="CLIP tokenizer for a single-file checkpoint")
    generate.add_argument("--vae", default=None, metavar="FILE|DIR",
                          help="a VAE that decodes the images instead of the model's (kohya's --vae): an LDM or diffusers "
                          "VAE file, a diffusers AutoencoderKL folder, or a full checkpoint's VAE")
    generate.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    generate.add_argument("--clip-skip", type=positive_int, default=1)
    add_clip_stats_option(generate, use="for an unCLIP-L single file's image conditioning (the init image's "
                          "embedding, --image-vectors learnt at a noise level > 0)", model_dest="model")
    generate.add_argument("--aesthetic-score", type=float, default=None, metavar="SCORE",
                          help="the SDXL refiner's aesthetic-score conditioning of the prompt (diffusers' option; default 6.0)")
    generate.add_argument("--refiner", default=None, metavar="MODEL",
                          help="a model that takes over from --model in the same sampler run (A1111's Refiner; "
                               "diffusers' denoising_end/denoising_start): the SDXL refiner after an SDXL base, or any "
                               "checkpoint of --model's latent space, which gets the run's LoRAs and embeddings too; "
                               "both models held at once")
    generate.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="F",
                          help="the fraction of the schedule the base runs before the refiner (default 0.8: the "
                               "timesteps >= round(1000 - 1000 F) are the base's, as diffusers cuts them)")
    generate.add_argument("--refiner-hires-pass", choices=("second", "first", "both"), default=None,
                          help="with --refiner and the hires fix: the pass the refiner works in (A1111's 'Hires fix: "
                               "which pass to enable refiner for'; default second); once it took over in the first "
                               "pass it runs the whole hires pass")
    generate.add_argument("--refiner-switch-by-steps", action="store_true",
                          help="with --refiner: switch at the first model call past F of the pass's sampling steps "
                               "(twice the steps for A1111's two-call samplers: Heun, DPM2, DPM++ SDE, ...) instead of "
                               "by timestep (A1111's setting 'Refiner switch by sampling steps')")
    generate.add_argument("--refiner-empty-negative", choices=("encoded", "zeros"), default="encoded",
                          help="the SDXL refiner's empty negative prompt: encoded (default, diffusers' refiner "
                               "pipeline) or zeros (A1111, which zeros it on the base and the refiner alike)")
    generate.add_argument("--negative-aesthetic-score", type=float, default=None, metavar="SCORE",
                          help="the SDXL refiner's aesthetic score of the negative prompt (diffusers' option; default 2.5)")
    generate.add_argument("--max-token-length", type=int, choices=(75, 150, 225), default=75,
                          help="75 (default): a longer prompt is laid out in A1111's 77-token chunks (cut at a comma up "
                          "to 20 tokens back, every token kept); 150 or 225: up to that many tokens in 75-token windows "
                          "joined as kohya's --max_token_length (Stable Diffusion models)")
    generate.add_argument("--device", default="auto")
    aesthetic = generate.add_argument_group(
        "aesthetic gradients",
        "personalise the text encoder toward an aesthetic embedding (python -m sdadapt aesthetic-embedding) for a few "
        "steps before sampling; the negative prompt uses the unmodified encoder (docs/aesthetic-gradients.md)")
    aesthetic.add_argument("--aesthetic", default=None, metavar="FILE",
                           help="an aesthetic embedding (.pt of the A1111 extension, or .safetensors)")
    aesthetic.add_argument("--aesthetic-steps", type=int, default=5, metavar="N",
                           help="Adam steps on the text encoder (default 5, A1111's; 0 = off)")
    aesthetic.add_argument("--aesthetic-lr", type=float, default=1e-4, metavar="LR", help="learning rate (default 1e-4)")
    aesthetic.add_argument("--aesthetic-weight", type=float, default=0.9, metavar="W",
                           help="mix of the personalised conditioning, 0..1 (default 0.9; 0 = the plain image)")
    aesthetic.add_argument("--aesthetic-slerp", action="store_true", help="mix by A1111's slerp instead of linearly")
    aesthetic.add_argument("--aesthetic-text", default=None, metavar="TEXT",
                           help="A1111's aesthetic text: turn the target slightly toward this phrase's CLIP features")
    aesthetic.add_argument("--aesthetic-text-angle", type=float, default=0.1, metavar="A",
                           help="how far toward the aesthetic text (A1111's \"Slerp angle\", 0..1; default 0.1)")
    aesthetic.add_argument("--aesthetic-text-negative", action="store_true",
                           help="turn the target away from the aesthetic text instead (A1111's \"Is negative text\")")
    aesthetic.add_argument("--aesthetic-clip", default=None, metavar="DIR",
                           help="the CLIP model (folder or checkpoint) with the text_projection; needed for Stable "
                           "Diffusion models (openai/clip-vit-large-patch14 for SD1), not for the toy")
    generate.add_argument("--image-vectors", default=None, metavar="FILE",
                          help="sample from CLIP-inversion vectors (python -m sdadapt clip-invert's file) mixed with "
                          "--prompt, on the model they were learnt for (SD 2.1 unCLIP: guidance default 10, as its "
                          "pipelines; an image-variation folder: no --prompt/--negative, guidance default 7.5; "
                          "docs/clip-inversion.md); --sampler/--karras/--schedule, --noise and the σ settings as "
                          "without it (default ddim), the prompt as plain text")
    single = [action.option_strings[-1] for action in generate._actions
              if action.option_strings and action.dest not in _IMAGE_VECTOR_OPTIONS
              and not isinstance(action, (argparse._AppendAction, argparse._CountAction))]
    only_with(generate, single, needs="no --image-vectors", when=lambda args: args.image_vectors is None,
              message=_IMAGE_VECTOR_MESSAGE)
    only_with(generate, ["--upscaler-dir"], needs="--infotext PNG|TXT", when=lambda args: args.infotext is not None)
    only_with(generate, ["--inpaint-full-res", "--soft-inpainting"], needs="--mask IMAGE",
              when=lambda args: args.mask is not None)
    only_with(generate, ["--outpaint-fill"], needs="--outpaint PX", when=lambda args: args.outpaint is not None)
    only_with(generate, ["--mask-transparency"], needs="--inpaint-sketch ORIGINAL",
              when=lambda args: args.inpaint_sketch is not None)
    only_with(generate, ["--outpaint-directions", "--outpaint-mask-blur"], needs="--outpaint PX or --outpaint-mk2 PX",
              when=lambda args: args.outpaint is not None or args.outpaint_mk2 is not None)
    only_with(generate, ["--outpaint-falloff", "--outpaint-color-variation"], needs="--outpaint-mk2 PX",
              when=lambda args: args.outpaint_mk2 is not None)
    only_with(generate, ["--sd-upscale", "--loopback", "--outpaint", "--outpaint-mk2", "--img2img-alt",
                         "--color-correction"],
              needs="--init-image IMAGE", when=lambda args: args.init_image is not None)
    only_with(generate, ["--decode-prompt", "--decode-negative", "--decode-steps", "--decode-guidance", "--randomness",
                         "--sigma-adjustment"], needs="--img2img-alt", when=lambda args: args.img2img_alt)
    def xyz_plot(args: argparse.Namespace) -> bool:
        return any(getattr(args, f"xyz_{axis}") is not None for axis in "xyz")

    only_with(generate, ["--xyz-no-legend", "--xyz-keep-random-seeds", "--xyz-vary-seeds", "--xyz-sub-grids"],
              needs="--xyz-x, --xyz-y or --xyz-z", when=lambda args: xyz_plot(args) or args.infotext is not None)
    only_with(generate, ["--prompt-matrix-negative", "--prompt-matrix-at-start", "--prompt-matrix-different-seeds",
                         "--prompt-matrix-join"], needs="--prompt-matrix", when=lambda args: args.prompt_matrix)
    only_with(generate, ["--grid-margin", "--grid-font"], needs="--xyz-x (-y, -z) or --prompt-matrix",
              when=lambda args: xyz_plot(args) or args.prompt_matrix or args.infotext is not None)
    only_with(generate, ["--prompts-file-iterate-seed", "--prompts-file-same-seed", "--prompts-file-insert"],
              needs="--prompts-file FILE", when=lambda args: args.prompts_file is not None)
    only_with(generate, ["--loopback-final-denoising", "--loopback-curve"], needs="--loopback N",
              when=lambda args: args.loopback is not None)
    only_with(generate, ["--sd-upscale-overlap", "--sd-upscale-upscaler"], needs="--sd-upscale SCALE",
              when=lambda args: args.sd_upscale is not None)
    only_with(generate, ["--subseed", "--subseed-strength", "--seed-resize-from", "--ensd"],
              needs="--noise a1111 (or a1111-cpu)", when=lambda args: args.noise is not None,
              message="{option} shapes A1111's noise, drawn only with --noise a1111 (or a1111-cpu): add --noise "
              "a1111, or leave {option} out")
    only_with(generate, ["--denoising-strength"], needs="--init-image IMAGE", when=lambda args: args.init_image is not None,
              message="{option} is img2img's strength and only applies with --init-image IMAGE (A1111's txt2img has "
              "none; the hires fix's is --hires-denoising): add --init-image IMAGE, or leave {option} out")
    only_with(generate, ["--resize-mode"], needs="--init-image IMAGE", when=lambda args: args.init_image is not None)
    only_with(generate, ["--guidance-rescale-space"], needs="--guidance-rescale PHI",
              when=lambda args: bool(args.guidance_rescale) or args.infotext is not None)
    only_with(generate, ["--pag-adaptive-scale", "--pag-layers"], needs="--pag-scale F",
              when=lambda args: bool(args.pag_scale) or args.infotext is not None)
    only_with(generate, ["--freeu-version", "--freeu-window"], needs="--freeu",
              when=lambda args: args.freeu is not None or args.infotext is not None)
    only_with(generate, ["--sag-blur-sigma"], needs="--sag-scale F",
              when=lambda args: bool(args.sag_scale) or args.infotext is not None)
    hires_size = "--hires-scale F or --hires-width/--hires-height"

    def wants_hires(args: argparse.Namespace) -> bool:
        return args.hires_scale is not None or args.hires_width is not None or args.hires_height is not None

    only_with(generate, ["--hires-steps", "--hires-denoising", "--hires-upscaler", "--hires-prompt", "--hires-negative",
                         "--hires-sampler", "--hires-schedule", "--hires-guidance", "--hires-checkpoint",
                         "--token-merging-ratio-hr",
                         "--hypertile-unet-second-pass"],
              needs=hires_size, when=wants_hires,
              message=f"{{option}} shapes the hires fix's second pass, which runs only with {hires_size}: add one, "
              "or leave {option} out")
    only_with(generate, ["--img2img-fix-steps"], needs=f"--init-image IMAGE or {hires_size}",
              when=lambda args: args.init_image is not None or wants_hires(args))
    only_with(generate, ["--inpaint-full-res-padding"], needs="--inpaint-full-res",
              when=lambda args: args.inpaint_full_res)
    only_with(generate, ["--aesthetic-steps", "--aesthetic-lr", "--aesthetic-weight", "--aesthetic-slerp",
                         "--aesthetic-text", "--aesthetic-clip"],
              needs="--aesthetic FILE", when=lambda args: args.aesthetic is not None)
    only_with(generate, ["--aesthetic-text-angle", "--aesthetic-text-negative"], needs="--aesthetic-text TEXT",
              when=lambda args: args.aesthetic_text is not None)
    group = add_output_options(generate, out_help="output image: .png, .jpg, .webp or .avif",
                               dtype_help="images; any other value is refused")
    add_image_save_options(group, folder="--init-image FOLDER")
    generate.set_defaults(run=_cmd_generate)
    _DEFAULTS.update({action.dest: action.default for action in generate._actions})
