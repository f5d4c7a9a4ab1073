"""Aesthetic gradients on the command line: ``aesthetic-embedding`` writes what the library computes,
``generate --aesthetic`` samples with the personalised conditioning through the one sampling path
(``generate(cond=...)``): weight 0 is the plain image bit for bit, real files from the wild load,
and every refusal is one line with its class's exit code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from docs_pages import code_blocks
from png_pixels import pixels

import sdadapt
from sdadapt.aesthetic import (
    aesthetic_conditioning,
    aesthetic_embedding_from_folder,
    clip_image_preprocess,
)
from sdadapt.cli import main
from sdadapt.formats.files import read_safetensors
from sdadapt.images import read_image, write_png
from sdadapt.sampling import generate
from sdadapt.toy import load_toy
from sdadapt.toy.evaluate import concept_data

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "aesthetic"


def _real_fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"real fixture {path} is absent (needs the shared/fixtures folder beside the repo)")
    return path


@pytest.fixture(scope="module")
def toy():
    return load_toy()


@pytest.fixture(scope="module")
def blue_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blue")
    images, _ = concept_data("blue", 5, seed=0)
    for i, image in enumerate(images):
        write_png(folder / f"{i}.png", image)
    return folder


@pytest.fixture(scope="module")
def blue_file(blue_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "blue.pt"
    assert main(["aesthetic-embedding", str(blue_folder), "-o", str(out), "-q"]) == 0
    return out


def _png(path: Path) -> torch.Tensor:
    return read_image(path)


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what earlier calls (and model loaders) printed
    code = main(argv)
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------------- aesthetic-embedding
def test_the_command_writes_the_library_embedding(blue_folder, blue_file, tmp_path, toy, capsys):
    expected = aesthetic_embedding_from_folder(blue_folder, toy.clip.encode_image, size=32)  # (1, 64)
    got = torch.load(blue_file, weights_only=True)
    assert got.shape == (1, 64) and got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(sdadapt.load_aesthetic_embedding(blue_file), expected)
    # .safetensors by suffix, --dtype, metadata; refuses to overwrite without --overwrite
    out = tmp_path / "blue.safetensors"
    assert main(["aesthetic-embedding", str(blue_folder), "-o", str(out), "--dtype", "fp16"]) == 0
    assert "mean of 5 images" in capsys.readouterr().out
    tensors, metadata = read_safetensors(out)
    assert torch.equal(tensors["aesthetic_embedding"], expected.half())
    assert metadata["sdadapt_aesthetic_images"] == "5"
    code, err = _run(["aesthetic-embedding", str(blue_folder), "-o", str(out)], capsys)
    assert code == 8 and err.startswith("error: ") and err.count("\n") == 1 and "--overwrite" in err


def test_clip_folder_embeds_with_the_image_tower(blue_folder, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                         max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8),
        projection_dim=12,
    )
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    out = tmp_path / "clip.pt"
    assert main(["aesthetic-embedding", str(blue_folder), "--clip", str(tmp_path / "clip"), "-o", str(out), "-q"]) == 0
    pixels = clip_image_preprocess(torch.stack([read_image(f, size=32) for f in sorted(blue_folder.glob("*.png"))]))
    with torch.no_grad():
        features = model.vision_model(pixel_values=pixels).pooler_output  # (5, 16)
        naive = model.visual_projection(features).double().mean(0, keepdim=True)  # (1, 12)
    got = sdadapt.load_aesthetic_embedding(out)
    assert got.shape == (1, 12) and torch.allclose(got.double(), naive, atol=1e-5)
    # the projection of that folder is what generate --aesthetic-clip reads
    assert sdadapt.aesthetic.load_text_projection(tmp_path / "clip").shape == (12, 16)


def test_an_fp16_image_tower_folder_embeds_in_float32(blue_folder, tmp_path):
    """A CLIPVisionModelWithProjection saved in fp16 (as many copies of CLIP are): the embedding is its float32
    computation (transformers 5 loads the folder as fp16, where the tower's outputs are off by ~1e-3)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8, projection_dim=12)
    model = transformers.CLIPVisionModelWithProjection(config).half().eval()
    model.save_pretrained(tmp_path / "tower")
    out = tmp_path / "tower.pt"
    assert main(["aesthetic-embedding", str(blue_folder), "--clip", str(tmp_path / "tower"), "-o", str(out), "-q"]) == 0
    pixels = clip_image_preprocess(torch.stack([read_image(f, size=32) for f in sorted(blue_folder.glob("*.png"))]))
    with torch.no_grad():
        naive = model.float()(pixel_values=pixels.float()).image_embeds.double().mean(0, keepdim=True)  # (1, 12)
    got = sdadapt.load_aesthetic_embedding(out)
    assert got.shape == (1, 12) and torch.allclose(got.double(), naive, atol=1e-5), (got.double() - naive).abs().max()


def test_embedding_errors_are_one_line(blue_folder, tmp_path, capsys):
    cases = [
        (["aesthetic-embedding", str(tmp_path / "none"), "-o", str(tmp_path / "a.pt")], 2, "not a folder"),
        (["aesthetic-embedding", str(blue_folder), "-o", str(tmp_path / "a.bin")], 2, ".pt"),
        (["aesthetic-embedding", str(blue_folder), "--clip", str(tmp_path), "-o", str(tmp_path / "a.pt")], 3, "config.json"),
        (["aesthetic-embedding", str(blue_folder), "--model", str(tmp_path), "-o", str(tmp_path / "a.pt")], 2, "--clip DIR"),
    ]
    for argv, want, words in cases:
        code, err = _run(argv, capsys)
        assert code == want and err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "a.pt").exists()


# ----------------------------------------------------------------------------------- generate --aesthetic
def test_weight_zero_is_plain_generate_bit_for_bit_and_steps_change_the_image(blue_file, tmp_path, capsys):
    base = ["generate", "--prompt", "a circle", "--steps", "4", "--seed", "3", "-q"]
    assert main([*base, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "-o", str(tmp_path / "w0.png"), "--aesthetic", str(blue_file), "--aesthetic-weight", "0"]) == 0
    assert main([*base, "-o", str(tmp_path / "s0.png"), "--aesthetic", str(blue_file), "--aesthetic-steps", "0"]) == 0
    assert main([*base, "-o", str(tmp_path / "tuned.png"), "--aesthetic", str(blue_file), "--aesthetic-steps", "4",
                 "--aesthetic-lr", "3e-3"]) == 0
    plain = pixels(tmp_path / "plain.png")  # (the image: the PNG's infotext names the aesthetic options)
    assert pixels(tmp_path / "w0.png") == plain and pixels(tmp_path / "s0.png") == plain
    assert not torch.equal(_png(tmp_path / "tuned.png"), _png(tmp_path / "plain.png"))


def test_generate_with_cond_is_the_one_sampling_path(toy, blue_file):
    embedding = sdadapt.load_aesthetic_embedding(blue_file)
    cond = aesthetic_conditioning(toy, ["a ring"], embedding, aesthetic_steps=3, lr=3e-3)
    via_generate = generate(toy, ["a ring"], seed=1, steps=3, cond=cond)
    assert torch.equal(via_generate, toy.sample(["a ring"], seed=1, steps=3, cond=cond))
    assert torch.equal(sdadapt.aesthetic_sample(toy, ["a ring"], embedding, aesthetic_steps=3, lr=3e-3, seed=1, steps=3),
                       via_generate)
    # the plain conditioning passed in is plain sampling, for both samplers (Euler goes through the protocol)
    plain = toy.condition(toy.tokenize(["a ring"]))
    for sampler in ("ddim", "euler"):
        assert torch.equal(generate(toy, ["a ring"], seed=1, steps=3, sampler=sampler, cond=plain),
                           generate(toy, ["a ring"], seed=1, steps=3, sampler=sampler))
    assert not torch.equal(via_generate, generate(toy, ["a ring"], seed=1, steps=3))

    class NoCond:
        image_size = 32

        def sample(self, prompts, *, seed=0, steps=25, guidance=2.0, negative=""):
            raise AssertionError("not reached")

    with pytest.raises(TypeError, match="cond="):
        generate(NoCond(), ["a ring"], steps=2, cond=cond)


def test_generate_aesthetic_errors_are_one_line(blue_file, tmp_path, capsys):
    base = ["generate", "--prompt", "a circle", "--steps", "2", "-o", str(tmp_path / "x.png")]
    sd1_wide = FIXTURES / "sac_8plus.pt"  # (a real SD1 file when the shared fixtures are there; else one like it)
    if not sd1_wide.is_file():
        sd1_wide = tmp_path / "sd1_wide.pt"
        torch.save(torch.randn(768, generator=torch.Generator().manual_seed(0)), sd1_wide)
    cases = [
        ([*base, "--aesthetic", str(tmp_path / "missing.pt")], 3, "no such file"),
        ([*base, "--aesthetic", str(sd1_wide)], 3, "768 wide"),
        ([*base, "--aesthetic", str(blue_file), "--aesthetic-weight", "1.5"], 2, "weight"),
        ([*base, "--aesthetic", str(blue_file), "--aesthetic-steps", "-1"], 2, "steps"),
    ]
    for argv, want, words in cases:
        code, err = _run(argv, capsys)
        assert code == want and err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------- a Stable Diffusion folder
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    root = tmp_path_factory.mktemp("sd")
    pipe = _tiny_pipeline(root / "pipe")
    # a CLIP checkpoint holding only the text projection (768 x 32: the fixtures' width x the encoder's)
    from sdadapt.formats.files import write_safetensors

    (root / "clip").mkdir()
    write_safetensors(root / "clip" / "model.safetensors",
                      {"text_projection.weight": torch.randn(768, 32, generator=torch.Generator().manual_seed(0))}, {})
    return pipe, root / "clip"


@pytest.mark.parametrize("fixture", ["sac_8plus.pt", "aivazovsky.pt"])
def test_real_fixtures_personalise_a_stable_diffusion_model(sd_folder, fixture, tmp_path, capsys):
    pipe, clip = sd_folder
    # (a prompt within the tiny tokenizer's 10-token window: --aesthetic keeps one window, plain generate would lay a
    # longer one out in A1111's chunks)
    base = ["generate", "--model", str(pipe), "--prompt", "a photo", "--steps", "2", "--width", "32",
            "--height", "32", "-q"]
    aesthetic = ["--aesthetic", str(_real_fixture(fixture)), "--aesthetic-clip", str(clip)]
    assert main([*base, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*base, *aesthetic, "--aesthetic-weight", "0", "-o", str(tmp_path / "w0.png")]) == 0
    assert main([*base, *aesthetic, "--aesthetic-lr", "1e-2", "--aesthetic-slerp", "-o", str(tmp_path / "on.png")]) == 0
    assert pixels(tmp_path / "w0.png") == pixels(tmp_path / "plain.png")
    assert not torch.equal(_png(tmp_path / "on.png"), _png(tmp_path / "plain.png"))
    # without the CLIP projection: one line saying what to pass
    code, err = _run([*base, "--aesthetic", str(FIXTURES / fixture), "-o", str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--aesthetic-clip DIR" in err and err.count("\n") == 1


def test_docs_command_line_example_runs(blue_folder, tmp_path, monkeypatch, capsys):
    import shlex
    import shutil

    block = code_blocks("aesthetic-gradients.md", "bash")[0]
    shutil.copytree(blue_folder, tmp_path / "blue-images")
    monkeypatch.chdir(tmp_path)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "sdadapt"]
        assert main([*argv[3:], "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "blue.pt").is_file() and (tmp_path / "circle.png").is_file()


def test_aesthetic_text_angle_and_negative_reach_the_personalisation(toy, blue_file, tmp_path):
    """``--aesthetic-text-angle`` / ``--aesthetic-text-negative`` (A1111's "Slerp angle", "Is negative text") are the
    library's ``text_angle`` / ``text_negative``: the command's image is the library's, pixel for pixel."""
    from sdadapt.images import to_uint8

    base = ["generate", "--prompt", "a ring", "--steps", "3", "--seed", "1", "-q", "--aesthetic", str(blue_file),
            "--aesthetic-steps", "3", "--aesthetic-lr", "3e-3", "--aesthetic-text", "a red square"]
    assert main([*base, "-o", str(tmp_path / "default.png")]) == 0
    assert main([*base, "--aesthetic-text-angle", "0.6", "--aesthetic-text-negative", "-o", str(tmp_path / "away.png")]) == 0
    embedding = sdadapt.load_aesthetic_embedding(blue_file)
    for name, angle, negative in (("default", 0.1, False), ("away", 0.6, True)):
        want = sdadapt.aesthetic_sample(toy, ["a ring"], embedding, aesthetic_steps=3, lr=3e-3, text="a red square",
                                        text_angle=angle, text_negative=negative, seed=1, steps=3)
        assert (to_uint8(_png(tmp_path / f"{name}.png")) == to_uint8(want[0])).all(), name
    assert not torch.equal(_png(tmp_path / "away.png"), _png(tmp_path / "default.png"))
    with pytest.raises(SystemExit):  # (only with --aesthetic-text)
        main(["generate", "--prompt", "x", "-o", str(tmp_path / "x.png"), "--aesthetic", str(blue_file),
              "--aesthetic-text-negative"])
