"""A1111's "Hires checkpoint" (generate --hires-checkpoint): the hires pass on another model — the first pass the
first model's, a pixel upscaler decoding with the first model's VAE and encoding with the hires model's, the run's
networks on both — checked by an invariant (the same weights under another path make the same image, LoRAs,
hypernetworks and embeddings included: each must reach the hires model) and by the pass's inputs of a different
model; the field written, the refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)


@pytest.fixture(scope="module")
def other_sd(plain_sd, tmp_path_factory):  # noqa: F811
    """The tiny SD with its UNet and text encoder moved (another checkpoint of the same family)."""
    from sdadapt.jobs.models import load_system

    system = load_system(str(plain_sd))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in (system.unet, system.text_encoder):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return system.save_model(tmp_path_factory.mktemp("other") / "other_sd")


def _networks(model, folder):
    """A kohya LoRA (random factors on the UNet's attention), a hypernetwork for the tiny UNet's widths and an SD1
    embedding ``zorg``, as files."""
    import sdadapt
    from sdadapt.embeddings.embedding import Embedding
    from sdadapt.formats.embeddings import save_embedding
    from sdadapt.hypernetworks import context_widths
    from sdadapt.jobs.models import load_system

    system = load_system(str(model))
    handle = sdadapt.inject(system.unet, sdadapt.targets.UNET_KOHYA, sdadapt.LoRAConfig(rank=2, alpha=2))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in handle.state_dict().items():
            if "lora_up" in name:
                handle.state_dict()[name].copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = {key: value.clone() for key, value in handle.state_dict().items()}
    lora = folder / "style.safetensors"
    sdadapt.formats.save_kohya(lora, {"unet": state})
    config = sdadapt.HypernetworkConfig(layer_structure=(1, 2, 1), activation="relu", layer_norm=True)
    hn = sdadapt.Hypernetwork(sorted(set(context_widths(system.unet).values())), config, name="hn")
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    hypernetwork = sdadapt.save_hypernetwork(folder / "hn.safetensors", hn)
    width = system.text_encoder.get_input_embeddings().weight.shape[1]
    embedding = save_embedding(folder / "zorg.safetensors", Embedding("zorg", {"text_encoder": torch.randn(1, width,
                                                                                                      generator=g)}),
                               format="kohya")
    return lora, hypernetwork, embedding


RUN = {"prompt": "a zorg house", "steps": 3, "sampler": "euler", "seed": 2, "hires_scale": 1.5, "overwrite": True}


@pytest.mark.parametrize("upscaler", ["latent", "pixel-lanczos"])
def test_the_same_weights_as_hires_checkpoint_make_the_same_image(plain_sd, tmp_path, upscaler):  # noqa: F811
    """The model's own files under another path as the hires checkpoint: the image pixel for pixel the run without it —
    with a LoRA option, a hypernetwork and an embedding in the prompt, which must act on the hires model too (a hires
    pass without any of them makes another image: checked)."""
    from sdadapt.jobs.generate import run_generate

    lora, hypernetwork, embedding = _networks(plain_sd, tmp_path)
    same = tmp_path / "same_sd"
    shutil.copytree(plain_sd, same)
    common = dict(RUN, model=str(plain_sd), hires_upscaler=upscaler)
    full = {"loras": [f"{lora}:0.8"], "hypernetworks": [f"{hypernetwork}:0.6"], "embeddings": [str(embedding)]}
    plain = run_generate(out=str(tmp_path / "a.png"), **common, **full)
    held = run_generate(out=str(tmp_path / "b.png"), hires_checkpoint=str(same), **common, **full)
    assert np.array_equal(plain["pixels"][0], held["pixels"][0])
    assert held["hypernetworks"][0]["hires_checkpoint_layers"] == held["hypernetworks"][0]["layers"]
    for left_out in full:  # (each one matters to the image: the invariant can fail)
        less = run_generate(out=str(tmp_path / "c.png"), **common, **{k: v for k, v in full.items() if k != left_out})
        assert not np.array_equal(less["pixels"][0], plain["pixels"][0])
    assert "Hires checkpoint: same_sd, Hires upscale: 1.5" in held["infotexts"][0]


def test_another_model_runs_the_hires_pass_on_the_first_models_pixels(plain_sd, other_sd, tmp_path,  # noqa: F811
                                                                      monkeypatch):
    """A different hires checkpoint with the pixel upscaler: the first pass is the first model's (its latents those
    of the run without a hires checkpoint), the hires pass runs on the hires model from the first pass decoded by the
    first model's VAE, resized and encoded by the hires model's; the image is its decode."""
    from generate_recorder import record_generate

    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.generate_hires import lanczos_upscale_pixels
    from sdadapt.jobs.models import load_system

    systems = []
    calls = record_generate(monkeypatch)
    import sdadapt.sampling

    recorded = sdadapt.sampling.generate
    monkeypatch.setattr(sdadapt.sampling, "generate", lambda system, prompts, **kw: systems.append(system) or recorded(
        system, prompts, **kw))
    run_generate(out=str(tmp_path / "a.png"), model=str(plain_sd), hires_upscaler="pixel-lanczos", **RUN)
    first_alone = calls[0][1]
    calls.clear()
    systems.clear()
    result = run_generate(out=str(tmp_path / "b.png"), model=str(plain_sd), hires_upscaler="pixel-lanczos",
                          hires_checkpoint=str(other_sd), **RUN)
    assert len(calls) == 2 and systems[0] is not systems[1]
    assert torch.equal(calls[0][1], first_alone)  # (the first pass: the first model's)
    base, hires = load_system(str(plain_sd)), load_system(str(other_sd))
    pixels = lanczos_upscale_pixels(base.decode_latents(first_alone), (48, 48), upscaler="Lanczos")
    expected = hires.encode_images(pixels).float()
    assert torch.allclose(calls[1][0]["init_latents"], expected, atol=1e-5)
    image = hires.decode_latents(calls[1][1])[0]
    from sdadapt.images import to_uint8

    assert np.abs(to_uint8(image).astype(int) - result["pixels"][0].astype(int)).max() <= 0
    assert result["hires_checkpoint"] == str(other_sd)


def test_refusals(plain_sd, other_sd, tmp_path):  # noqa: F811
    from sdadapt.jobs.generate import run_generate

    common = dict(RUN, model=str(plain_sd), out=str(tmp_path / "o.png"))
    with pytest.raises(ValueError, match="add --hires-scale"):
        run_generate(**{**common, "hires_scale": None}, hires_checkpoint=str(other_sd))
    with pytest.raises(ValueError, match="no such file, nor one named so"):
        run_generate(**common, hires_checkpoint=str(tmp_path / "missing"))
    for option, value, flag in (("pag_scale", 2.0, "--pag-scale"),
                                ("token_merging_ratio", 0.3, "--token-merging-ratio"),
                                ("freeu", (1.1, 1.2, 0.9, 0.2), "--freeu")):
        with pytest.raises(ValueError, match=flag):
            run_generate(**common, hires_checkpoint=str(other_sd), **{option: value})
    from sdadapt.jobs.generate_hires_checkpoint import check_hires_pair
    from sdadapt.jobs.models import load_system

    base = load_system(str(plain_sd))
    other = load_system(str(other_sd))
    other.scaling_factor = 0.5  # (another latent space)
    with pytest.raises(ValueError, match="latent space"):
        check_hires_pair(base, other, upscaler="latent", hires_model="x")
    check_hires_pair(base, other, upscaler="pixel-lanczos", hires_model="x")  # (decoded and encoded: any space)
    toy = load_system("toy")
    with pytest.raises(ValueError, match="toy model"):
        check_hires_pair(base, toy, upscaler="pixel-lanczos", hires_model="toy")


def test_cli_option_and_infotext_reason(plain_sd, other_sd, tmp_path, capsys):  # noqa: F811
    from sdadapt.cli import main

    argv = ["generate", "--model", str(plain_sd), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
            "--seed", "1", "--quiet"]
    with pytest.raises(SystemExit):
        main([*argv, "--hires-checkpoint", str(other_sd), "--out", str(tmp_path / "x.png")])
    assert "--hires-checkpoint shapes the hires fix's second pass" in capsys.readouterr().err
    assert main([*argv, "--hires-scale", "1.5", "--hires-checkpoint", str(other_sd), "--out",
                 str(tmp_path / "a.png")]) == 0
    from sdadapt.images import read_png_text
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    text = read_png_text(tmp_path / "a.png")["parameters"]
    assert "Denoising strength: 0.7, RNG: CPU, Hires checkpoint: other_sd, Hires upscale: 1.5" in text
    _, not_taken = infotext_options(parse_infotext(text))
    assert "Hires checkpoint: other_sd — the run's model files: give them (--model, --vae, --refiner, " \
           "--hires-checkpoint)" in not_taken


def test_a1111_names_find_the_checkpoint_beside_the_model(plain_sd, tmp_path):  # noqa: F811
    """A1111 names a checkpoint "NAME [HASH]": --hires-checkpoint / --refiner take such a name for a file beside the
    model (A1111's lookup), and --infotext takes "Hires checkpoint" and "Refiner" so when there is one (else said)."""
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext
    from sdadapt.jobs.models import load_system

    folder = tmp_path / "models"
    folder.mkdir()
    model = load_system(str(plain_sd)).save_model(folder / "base.safetensors")
    load_system(str(plain_sd)).save_model(folder / "sub" / "real_v2.safetensors")
    result = run_generate(model=str(model), out=str(tmp_path / "a.png"), hires_checkpoint="real_v2 [0123456789]",
                          tokenizer=str(plain_sd / "tokenizer"),
                          **{**RUN, "steps": 2})
    assert result["hires_checkpoint"] == str(folder / "sub" / "real_v2.safetensors")
    assert "Hires checkpoint: real_v2 [" in result["infotexts"][0]
    text = ("a photo\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 32x32, Denoising strength: 0.7, "
            "Hires checkpoint: real_v2 [0123456789], Hires upscale: 1.5, Hires upscaler: Latent, "
            "Refiner: sub/real_v2.safetensors, Refiner switch at: 0.6")
    options, not_taken = infotext_options(parse_infotext(text), model=str(model))
    assert options["hires_checkpoint"] == options["refiner"] == str(folder / "sub" / "real_v2.safetensors")
    assert options["refiner_switch_at"] == 0.6
    assert not any(line.startswith(("Hires checkpoint", "Refiner")) for line in not_taken)
    options, not_taken = infotext_options(parse_infotext(text.replace("real_v2", "missing")), model=str(model))
    assert "hires_checkpoint" not in options and "refiner" not in options
    assert any(line.startswith("Hires checkpoint: missing [0123456789] — the run's model files") for line in not_taken)
