"""``python -m sdadapt clip-invert`` and ``generate --image-vectors`` on a tiny random SD 2.1 unCLIP
diffusers folder (unet with class_embed_type="projection", vae, text_encoder, tokenizer, scheduler,
image_encoder, feature_extractor, image_normalizer, image_noising_scheduler, as
``StableUnCLIPImg2ImgPipeline.save_pretrained`` lays them out): the commands write exactly what the
library functions (``clip_invert``, ``generate_with_vectors``) return for the same seed, and refuse
what they cannot do with one ``error:`` line.

Guidance default: diffusers' ``StableUnCLIPImg2ImgPipeline.__call__`` ``guidance_scale: float = 10``
(huggingface/diffusers v0.42.1 ``pipelines/stable_diffusion/pipeline_stable_unclip_img2img.py:633``;
``pipeline_stable_unclip.py:654`` ``10.0``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_clip_vision import save_clip_image_encoder, save_clip_image_processor

from sdadapt.cli import main
from sdadapt.images import decode_png, load_image_folder, to_uint8, write_png
from sdadapt.inversion import (
    ImageVectors,
    clip_invert,
    generate_with_vectors,
    load_image_vectors,
    save_image_vectors,
)
from sdadapt.inversion.clip_job import DEFAULT_GUIDANCE, default_guidance
from sdadapt.jobs.models import load_system

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

D = 16  # the image-embedding width (projection_dim); the UNet's class embedding takes 2D


def _unclip_folder(root, *, projection: bool = True):
    """A tiny random SD 2.1 unCLIP diffusers folder (16-px images, v-prediction as SD 2.1 unCLIP);
    ``projection=False``: a plain SD folder (its UNet takes no image embedding)."""
    from embedding_models import tiny_tokenizer
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    torch.manual_seed(0)
    extra = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 2 * D} if projection else {}
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, **extra,
    ).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    ).save_pretrained(root / "vae")
    vocab = tiny_tokenizer(root / "tokenizer").get_vocab()
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=12, eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
    )).save_pretrained(root / "text_encoder")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction").save_pretrained(root / "scheduler")
    index = {"_class_name": "StableUnCLIPImg2ImgPipeline" if projection else "StableDiffusionPipeline"}
    if projection:
        save_clip_image_encoder(root, projection_dim=D)
        save_clip_image_processor(root)
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=D)
        with torch.no_grad():
            normalizer.mean.copy_(torch.randn(1, D) * 0.1)
            normalizer.std.copy_(torch.rand(1, D) + 0.5)
        normalizer.save_pretrained(root / "image_normalizer")
        diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(root / "image_noising_scheduler")
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    return _unclip_folder(tmp_path_factory.mktemp("unclip") / "sd21-unclip")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three 20x24 images (resized and cropped to the model's 16 px) with captions."""
    folder = tmp_path_factory.mktemp("concept")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        write_png(folder / f"img{i}.png", torch.rand(3, 20, 24, generator=g) * 2 - 1)
        (folder / f"img{i}.txt").write_text(f"a photo {i}")
    return folder


@pytest.fixture(scope="module")
def learnt(unclip, images, tmp_path_factory):
    """``clip-invert`` run once: (file, its exit code)."""
    out = tmp_path_factory.mktemp("out") / "concept.safetensors"
    code = main(["clip-invert", "--model", str(unclip), "--images", str(images), "--captions", "--steps", "3",
                 "--batch-size", "2", "--noise-level", "100", "--seed", "5", "--lr", "0.1", "-q", "-o", str(out)])
    return out, code


def test_clip_invert_writes_what_clip_invert_returns(unclip, images, learnt, capsys):
    """Bit-identical to the library on the same images (read as the command reads them), captions and seed."""
    out, code = learnt
    assert code == 0
    system = load_system(str(unclip))
    pictures, captions = load_image_folder(images, size=system.image_size)
    assert captions == ["a photo 0", "a photo 1", "a photo 2"] and pictures.shape == (3, 3, 16, 16)
    want = clip_invert(system, pictures, captions=captions, steps=3, batch_size=2, noise_level=100, seed=5,
                       learning_rate=0.1)
    got = load_image_vectors(out)
    assert got.vectors.shape == (1, D) and got.site == "class-labels" and got.noise_level == 100
    assert torch.equal(got.vectors, want.vectors)
    assert got.info["init"] == "images" and got.info["model"] == "sd21-unclip" and got.info["captions"] == "files"
    assert got.info["final_loss"] == want.info["final_loss"]


def test_generate_image_vectors_equals_generate_with_vectors(unclip, learnt, tmp_path, capsys):
    """Image i = generate_with_vectors(count=1, seed=SEED+i) at guidance 10 (SD unCLIP's pipelines' default),
    PNG-rounded; the file's noise level (100) is used."""
    out, _ = learnt
    png = tmp_path / "cat.png"
    code = main(["generate", "--model", str(unclip), "--image-vectors", str(out), "--prompt", "a cat", "--seed", "3",
                 "--steps", "2", "--count", "2", "-q", "-o", str(png)])
    assert code == 0
    assert "cat-00.png" in capsys.readouterr().out
    system = load_system(str(unclip))
    vectors = load_image_vectors(out)
    for i in range(2):
        written = decode_png((tmp_path / f"cat-{i:02d}.png").read_bytes())
        want = generate_with_vectors(system, vectors, prompt="a cat", count=1, seed=3 + i, steps=2, guidance=10.0)[0]
        assert (written == to_uint8(want)).all()
    other = generate_with_vectors(system, vectors, prompt="a cat", count=1, seed=3, steps=2, guidance=2.0)[0]
    assert not (to_uint8(other) == decode_png((tmp_path / "cat-00.png").read_bytes())).all()  # the guidance mattered
    assert default_guidance("class-labels") == 10.0 and DEFAULT_GUIDANCE["cross-attention"] == 7.5
    assert main(["generate", "--model", str(unclip), "--image-vectors", str(out), "--prompt", "a cat", "--seed", "3",
                 "--steps", "2", "-q", "--webp-lossless", "-o", str(tmp_path / "cat.webp")]) == 0  # (as generate writes)
    from PIL import Image

    with Image.open(tmp_path / "cat.webp") as webp:
        assert (np.asarray(webp.convert("RGB")) == decode_png((tmp_path / "cat-00.png").read_bytes())).all()


def _error(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # (a usage error: argparse exits)
        code = exc.code
    return code, capsys.readouterr().err


def test_refusals(unclip, images, learnt, tmp_path, capsys):
    out, _ = learnt
    # a model without image conditioning: NoImageConditioningError's message, before any image is read
    plain = _unclip_folder(tmp_path / "plain", projection=False)
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    write_png(uncaptioned / "x.png", torch.zeros(3, 16, 16))  # (--captions would refuse it, after the model check)
    code, err = _error(["clip-invert", "--model", str(plain), "--images", str(uncaptioned), "--captions", "-o",
                        str(tmp_path / "a.safetensors")], capsys)
    assert code == 2 and "no image-embedding conditioning" in err and "class_embed_type='projection'" in err
    code, err = _error(["generate", "--model", str(plain), "--image-vectors", str(out), "--prompt", "", "-o",
                        str(tmp_path / "p.png")], capsys)
    assert code == 2 and "no image-embedding conditioning" in err
    # vectors of another site (the toy's) on the unCLIP model
    toy_file = tmp_path / "toy.safetensors"
    save_image_vectors(toy_file, ImageVectors(vectors=torch.zeros(1, 64), site="time-embedding"))
    code, err = _error(["generate", "--model", str(unclip), "--image-vectors", str(toy_file), "--prompt", "", "-o",
                        str(tmp_path / "t.png")], capsys)
    assert code == 2 and "learnt for the time-embedding site" in err and "class-labels" in err
    assert "toy.safetensors" in err and "use a model of the kind" in err
    assert not (tmp_path / "t.png").exists()
    # not a CLIP-inversion file / no file
    code, err = _error(["generate", "--model", str(unclip), "--image-vectors", str(unclip / "unet" /
                        "diffusion_pytorch_model.safetensors"), "--prompt", "", "-o", str(tmp_path / "t.png")], capsys)
    assert code == 3 and "not an sdadapt CLIP-inversion file" in err
    code, err = _error(["generate", "--image-vectors", str(tmp_path / "nope.safetensors"), "--prompt", "", "-o",
                        str(tmp_path / "t.png")], capsys)
    assert code == 3 and "nope.safetensors" in err
    # missing or empty image folder, existing output, --dtype fp16
    code, err = _error(["clip-invert", "--model", str(unclip), "--images", str(tmp_path / "none"), "-o",
                        str(tmp_path / "a.safetensors")], capsys)
    assert code == 2 and "not a folder of images" in err
    (tmp_path / "empty").mkdir()
    code, err = _error(["clip-invert", "--model", str(unclip), "--images", str(tmp_path / "empty"), "-o",
                        str(tmp_path / "a.safetensors")], capsys)
    assert code == 2 and "no images" in err
    code, err = _error(["clip-invert", "--model", str(unclip), "--images", str(images), "-o", str(out)], capsys)
    assert code == 8 and "--overwrite" in err
    code, err = _error(["clip-invert", "--images", str(images), "--dtype", "fp16", "-o", str(tmp_path / "a.safetensors")],
                       capsys)
    assert code == 2 and "float32" in err
    assert not (tmp_path / "a.safetensors").exists()
    # generate options that do not apply with --image-vectors (--sampler does: tests/test_clip_inversion_samplers.py)
    for extra in (["--height", "32"], ["--width", "32"], ["--lora", str(out)]):
        code, err = _error(["generate", "--model", str(unclip), "--image-vectors", str(out), "--prompt", "", *extra, "-o",
                            str(tmp_path / "t.png")], capsys)
        assert code == 2 and f"{extra[0]} does not apply with --image-vectors" in err
    # an image-variation folder (no text encoder) missing its parts' configs: refused before any weights load,
    # naming what is missing and the Python route (complete ones: tests/test_clip_inversion_variation.py)
    variation = tmp_path / "sd-image-variations"
    for part in ("unet", "vae", "image_encoder", "feature_extractor", "scheduler"):
        (variation / part).mkdir(parents=True)
    (variation / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImageVariationPipeline"}))
    code, err = _error(["clip-invert", "--model", str(variation), "--images", str(images), "-o",
                        str(tmp_path / "v.safetensors")], capsys)
    assert code == 3 and "image-variation folder" in err and "image_variation_conditioning" in err


def test_defaults_and_options_reach_the_library(unclip, images, learnt, tmp_path, monkeypatch, capsys):
    """What each option passes on (the library calls recorded; nothing trained or sampled)."""
    from sdadapt.inversion import clip as clip_module

    calls = []

    def fake_invert(system, pictures, **kwargs):
        calls.append(kwargs)
        return ImageVectors(vectors=torch.zeros(1, D), site="class-labels", info={"init": "zeros", "final_loss": "0"})

    def fake_generate(system, vectors, **kwargs):
        calls.append(kwargs)
        return torch.zeros(kwargs["count"], 3, 16, 16)

    monkeypatch.setattr(clip_module, "clip_invert", fake_invert)
    monkeypatch.setattr(clip_module, "generate_with_vectors", fake_generate)
    base = ["clip-invert", "--model", str(unclip), "--images", str(images), "-q", "--overwrite", "-o",
            str(tmp_path / "a.safetensors")]
    assert main(base) == 0
    assert main([*base, "--prompt", "a dog", "--steps", "7", "--lr", "0.5", "--batch-size", "3", "--vectors", "2",
                 "--init", "zeros", "--seed", "9"]) == 0
    (tmp_path / "b").mkdir()
    write_png(tmp_path / "b" / "x.png", torch.zeros(3, 16, 16))  # no caption file: --prompt for it
    assert main([*base[:4], str(tmp_path / "b"), *base[5:], "--captions", "--prompt", "a cat"]) == 0
    assert calls[0] == {"captions": None, "num_vectors": 1, "init": "auto", "steps": 300, "learning_rate": 0.05,
                        "batch_size": 4, "noise_level": 0, "seed": 0, "progress": None}
    assert calls[1] == {"captions": ["a dog"] * 3, "num_vectors": 2, "init": "zeros", "steps": 7, "learning_rate": 0.5,
                        "batch_size": 3, "noise_level": 0, "seed": 9, "progress": None}
    assert calls[2]["captions"] == ["a cat"]
    assert load_image_vectors(tmp_path / "a.safetensors").info["captions"] == "files"
    out, _ = learnt
    png = tmp_path / "g.png"
    assert main(["generate", "--model", str(unclip), "--image-vectors", str(out), "--prompt", "p", "-q", "-o", str(png)]) == 0
    assert main(["generate", "--model", str(unclip), "--image-vectors", str(out), "--prompt", "p", "--negative", "n",
                 "--guidance", "4", "--steps", "3", "--seed", "2", "--overwrite", "-q", "-o", str(png)]) == 0
    ddim = {"sampler": "ddim", "karras": False, "schedule": None,  # (the default sampler: test_clip_inversion_samplers.py)
            "schedule_options": None, "noise": None}  # (no A1111 noise or σ settings: tests/test_infotext_gaps.py)
    assert calls[3] == {"prompt": "p", "negative": "", "count": 1, "seed": 0, "steps": 25, "guidance": 10.0, **ddim}
    assert calls[4] == {"prompt": "p", "negative": "n", "count": 1, "seed": 2, "steps": 3, "guidance": 4.0, **ddim}
