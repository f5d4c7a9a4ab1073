"""Review of b21 (commits 1b36c2f..7b6684e): ``--inpainting-fill latent-noise`` under ``--vae-encode sample``.

A1111's latent-noise fill is ``create_random_tensors`` of the seeds — the same draw as the start noise
(``modules/processing.py`` ``StableDiffusionProcessingImg2Img.init``: ``self.init_latent * self.mask +
create_random_tensors(...) * self.nmask``, then ``sample``: ``x = self.rng.next()``, both the seed's first draw),
so the masked area starts from ``(1 + σ)·n``. sdadapt's mean encoding keeps that (the fill is the unit noise of
``manual_seed(seed)``, the start noise). Under ``--vae-encode sample`` the seed's generator first draws the VAE
posterior's ε and then the start noise: the fill must be that start noise (the generator's next draw), not a fresh
``manual_seed(seed)`` draw, which is ε itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_vae_sample import _init_png, _spy, system, tiny_sd  # noqa: F401


@pytest.mark.parametrize("method", ["mean", "sample"])
def test_latent_noise_fill_is_the_start_noise_under_either_encoding(tiny_sd, system, tmp_path, monkeypatch,  # noqa: F811
                                                                   method):
    from PIL import Image

    from sdadapt.jobs import run_generate

    size = system.image_size
    image = _init_png(tmp_path / "init.png", size)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size // 2] = 255  # (the top half repainted; no blur: the latent mask is 0 / 1)
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    seen = _spy(monkeypatch)
    run_generate(model=str(tiny_sd), prompt="a photo", out=str(tmp_path / "out.png"), seed=4, steps=4, sampler="euler",
                 init_image=str(image), mask=str(tmp_path / "mask.png"), mask_blur=0, inpainting_fill="latent-noise",
                 denoising_strength=0.5, vae_encode=method, device="cpu")
    x_start, init = seen[0]
    h = init.shape[-2]
    top = slice(0, h // 2 - 1)  # (rows surely inside the repainted half at latent size)
    assert torch.equal(init[..., top, :], x_start[..., top, :].to(init))  # (fill = start noise, as A1111)
    bottom = slice(h // 2 + 1, h)  # (the kept half: the encoded image, not noise)
    assert not torch.allclose(init[..., bottom, :], x_start[..., bottom, :].to(init))


# ----------------------------------------------------------------------------- kohya latent files: what the square
# buckets of tests/test_disk_latent_cache.py cannot tell (an axis swap; the SDXL suffix)
@pytest.mark.parametrize("bucket", [(32, 48), (48, 32), (64, 40), (40, 64), (32, 32)])  # (h, w)
@pytest.mark.parametrize("size", [(30, 50), (50, 30), (33, 33), (768, 1024), (1024, 768), (32, 48)])  # (h, w)
def test_crop_ltrb_is_kohyas_on_non_square_buckets(bucket, size):
    from test_disk_latent_cache import _kohya_crop_ltrb

    from sdadapt.training.kohya_latent_files import crop_ltrb

    ours = crop_ltrb(bucket, size)
    theirs = _kohya_crop_ltrb((bucket[1], bucket[0]), (size[1], size[0]))  # (kohya's (W, H) arguments)
    assert ours == theirs and [type(v) for v in ours] == [type(v) for v in theirs]  # (the same numbers, same types)


@pytest.mark.parametrize("sdxl", [False, True])
def test_an_sdxl_model_writes_sdxl_files_and_an_sd_model_sd_files(tmp_path, sdxl):
    """kohya's suffix: sdxl_train*.py build ``SdSdxlLatentsCachingStrategy(False, ...)`` (``_sdxl.npz``), the SD 1/2
    scripts ``(True, ...)`` (``_sd.npz``; library/strategy_sd.py); the image file's (W, H) in the name."""
    from tiny_systems import tiny_diffusers_system

    from sdadapt.images import write_png
    from sdadapt.training.data import Dataset, encode_buckets, find_images, plan_dataset
    from sdadapt.training.kohya_latent_files import KohyaLatentFiles

    system = tiny_diffusers_system(tmp_path / "model", max_token_length=75, sdxl=sdxl)
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_png(folder / "a.png", torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    (folder / "a.txt").write_text("a photo")
    records, _ = find_images(folder)
    plan_dataset(records, resolution=16, buckets=False)
    disk = KohyaLatentFiles(system)
    encode_buckets(Dataset(records), system.encode_images, latents_of=disk)
    assert disk.sdxl is sdxl
    assert [p.name for p in folder.glob("*.npz")] == [f"a_0040x0024_{'sdxl' if sdxl else 'sd'}.npz"]
