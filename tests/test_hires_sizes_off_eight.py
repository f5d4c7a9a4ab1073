"""A hires size that is no multiple of 8 (A1111's 512 x 760 at ``--hires-scale 1.5``: 768 x 1140) runs as A1111's
``sample_hr_pass`` runs it (AUTOMATIC1111/stable-diffusion-webui ``modules/processing.py`` at 0027ce1f6e58): the first
pass enlarged to ``hr_upscale_to`` — a latent upscaler interpolates to ``hr_upscale_to // opt_f``, a pixel upscaler
resizes the image to exactly ``hr_upscale_to`` and the VAE encoder floors it — then ``truncate // 2`` cropped, the
fresh ImageRNG drawn at the latents' shape, so the image written is rounded down (768 x 1136). SDXL's size
conditioning stays ``hr_upscale_to`` (``calculate_hr_conds``). Refused before."""

from __future__ import annotations

import random

import pytest
import tiny_sd_fixtures
import torch

from sdadapt.cli import main
from sdadapt.jobs.generate_hires import (
    HiresRequest,
    check_hires_request,
    hires_pass_size,
    hires_size,
    hires_upscale_size,
    sample_image,
)
from tests.test_hires_a1111_crop import (
    _A1111_LATENT_MODES,
    _a1111_target_resolution,
    _a1111_truncate,
    _run,
)

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd


def _request(width, height, *, scale=None, rx=None, ry=None, upscaler="latent", steps=0):
    sides = {"scale": scale, "hires_height": ry, "hires_width": rx}
    return check_hires_request(HiresRequest(hires_size(height, width, **sides), denoising=0.5, upscaler=upscaler,
                                            steps=steps, upscale_to=hires_upscale_size(height, width, **sides)))


def _a1111_latent_hw(width, height, *, scale=2.0, rx=0, ry=0, opt_f=8):
    """The hires latents' (h, w) in A1111's latent branch: ``hr_upscale_to // opt_f``, cropped by ``truncate``."""
    up_x, up_y, t_x, t_y = _a1111_target_resolution(width, height, scale, rx, ry, opt_f)
    return up_y // opt_f - t_y, up_x // opt_f - t_x


def test_the_pass_size_is_a1111s_latent_shape_times_8_on_random_requests():
    """Random first passes (multiples of 8), scales in 0.05 steps and one- or two-sided resizes of any size:
    ``hires_pass_size`` is A1111's hires latent shape × 8, the request's own size when it is a multiple of 8."""
    rng = random.Random(1)
    off = 0
    for _ in range(400):
        width, height = 8 * rng.randint(8, 128), 8 * rng.randint(8, 128)
        kind = rng.choice(["scale", "x", "y", "both"])
        scale = rng.randint(20, 50) * 0.05 if kind == "scale" else None
        rx = rng.randint(64, 2000) if kind in ("x", "both") else None
        ry = rng.randint(64, 2000) if kind in ("y", "both") else None
        request = _request(width, height, scale=scale, rx=rx, ry=ry)
        h, w = _a1111_latent_hw(width, height, scale=scale or 2.0, rx=rx or 0, ry=ry or 0)
        assert hires_pass_size(request) == (8 * h, 8 * w)
        if request.size[0] % 8 == 0 and request.size[1] % 8 == 0:
            assert hires_pass_size(request) == request.size
        off += request.size != hires_pass_size(request)
    assert off > 200
    assert hires_pass_size(_request(512, 760, scale=1.5)) == (1136, 768)  # (768 x 1140 asked)


@pytest.mark.parametrize("upscaler", list(_A1111_LATENT_MODES))
@pytest.mark.parametrize("width, height, scale, rx, ry", [(40, 56, 1.5, None, None), (48, 40, None, 70, 61),
                                                          (64, 48, None, 101, None)])
def test_latent_upscalers_start_from_a1111s_latents_at_the_rounded_size(monkeypatch, upscaler, width, height, scale,
                                                                         rx, ry):
    """40 x 56 at 1.5 -> 60 x 84 asked: A1111 interpolates to (10, 7) latents and writes 56 x 80; with both sides
    given it covers, then crops ``(up − size) // 8``; the second pass runs at that size from those latents."""
    first = torch.randn(1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(2))
    request = _request(width, height, scale=scale, rx=rx, ry=ry, upscaler=upscaler)
    assert request.size[0] % 8 or request.size[1] % 8
    calls = _run(monkeypatch, object(), first, request, (height, width))
    up_x, up_y, t_x, t_y = _a1111_target_resolution(width, height, scale or 2.0, rx or 0, ry or 0)
    mode, antialias = _A1111_LATENT_MODES[upscaler]
    theirs = _a1111_truncate(torch.nn.functional.interpolate(first, size=(up_y // 8, up_x // 8), mode=mode,
                                                             antialias=antialias), t_x, t_y)
    assert torch.equal(calls[-1]["init_latents"], theirs)
    assert (calls[-1]["height"], calls[-1]["width"]) == (8 * theirs.shape[-2], 8 * theirs.shape[-1])


# ------------------------------------------------------------------------------------ a tiny Stable Diffusion


def test_pixel_lanczos_encodes_the_odd_size_as_a1111s_vae_does(system, monkeypatch):
    """``pixel-lanczos`` with a real (tiny, factor 2) VAE: 52 x 40 at scale 1.25 asks 65 x 50; A1111 resizes the
    first pass to exactly 65 x 50 (its Lanczos chain, 8-bit), the VAE's strided convolutions floor 65 to 32 latent
    columns, and the pass runs at 64 x 50. Catches a resize to the rounded size, a pad or ceil in the encode."""
    pytest.importorskip("PIL.Image")
    from tests.test_hires_pixel_upscale_a1111 import _a1111_hires_input

    f = system.vae_factor
    request = _request(52, 40, scale=1.25, upscaler="pixel-lanczos")
    assert request.size == (50, 65) and hires_pass_size(request, factor=f) == (50, 64)
    first = torch.randn(1, 4, 40 // f, 52 // f, generator=torch.Generator().manual_seed(7))
    calls = _run(monkeypatch, system, first, request, (40, 52))
    with torch.no_grad():
        theirs = system.encode_images(_a1111_hires_input(system.decode_latents(first), 65, 50)).float()
    assert theirs.shape[-2:] == (25, 32)
    assert torch.equal(calls[-1]["init_latents"].float(), theirs)
    assert (calls[-1]["height"], calls[-1]["width"]) == (50, 64)


def test_cli_writes_a1111s_rounded_size_and_says_so(tiny_sd, tmp_path, capsys):
    """End to end: ``--hires-scale 1.3`` on 24 x 16 asks 31 x 20 on the factor-2 model; the PNG is 30 x 20 and the
    log names both sizes; the infotext keeps A1111's fields (the first pass's Size, the scale)."""
    from sdadapt.images import decode_png
    from sdadapt.jobs.infotext_read import parse_infotext, read_infotext

    out = tmp_path / "odd.png"
    assert main(["generate", "--model", str(tiny_sd), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
                 "--width", "24", "--height", "16", "--hires-scale", "1.3", "--hires-steps", "2",
                 "--hires-denoising", "0.5", "--seed", "4", "--out", str(out)]) == 0
    assert decode_png(out.read_bytes()).shape[:2] == (20, 30)
    assert "hires fix: 31x20, written 30x20 (A1111 rounds a side down to a multiple of 2)" in capsys.readouterr().err
    fields = parse_infotext(read_infotext(out))
    assert (fields["Size-1"], fields["Size-2"]) == ("24", "16") and float(fields["Hires upscale"]) == 1.3


def test_sdxl_is_told_the_size_asked_as_a1111s_calculate_hr_conds(tmp_path_factory):
    """``calculate_hr_conds`` conditions SDXL on ``hr_upscale_to`` (31 x 20 here), not the 30 x 20 it samples."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system

    system = load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("xl_off8") / "xl.safetensors")), device="cpu")
    f = system.vae_factor
    request = _request(24, 16, scale=1.3)
    height, width = hires_pass_size(request, factor=f)
    assert request.size == (20, 31) and (height, width) == (20, 30) and f == 2
    seen = []

    def hook(_module, args, kwargs):
        seen.append((tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].detach().clone()))

    handle = system.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        image = sample_image(system, ["a photo"], {"seed": 2, "steps": 2, "guidance": 2.0, "sampler": "euler",
                                                   "negative": "", "height": 16, "width": 24}, hires=request)
    finally:
        handle.remove()
    assert image.shape[-2:] == (20, 30)
    hires_calls = [ids for hw, ids in seen if hw == (height // f, width // f)]
    assert hires_calls
    for ids in hires_calls:
        assert torch.equal(ids.float(), torch.tensor([[20.0, 31.0, 0.0, 0.0, 20.0, 31.0]]).expand_as(ids))


def test_a_side_below_the_factor_is_refused_by_option():
    with pytest.raises(ValueError, match="at least 8 .*--hires-scale"):
        check_hires_request(HiresRequest((4, 64)))
