"""The ``custom-diffusion`` method: what trains, what it writes, ``train custom-diffusion`` on the toy and a diffusers folder."""

from __future__ import annotations

import pytest
import torch

import sdadapt
from sdadapt.cli import main
from sdadapt.custom_diffusion import cross_attention_layers
from sdadapt.formats.custom_diffusion import (
    load_custom_diffusion,
    split_file_key,
    token_files,
)
from sdadapt.images import write_png
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from docs_pages import run_block


def _changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


@pytest.mark.parametrize("train_q_out", [False, True])
def test_only_cross_attention_weights_and_the_token_row_train(tmp_path, train_q_out):
    system = build_toy(seed=1)
    unet0 = {k: v.clone() for k, v in system.unet.state_dict().items()}
    te0 = {k: v.clone() for k, v in system.text_encoder.state_dict().items()}
    flags = {n: p.requires_grad for n, p in system.named_parameters()}
    adaptation = METHODS["custom-diffusion"].adapt(system, seed=0, token="cross", train_q_out=train_q_out)
    row0 = adaptation.params[0].detach().clone()
    images, captions = concept_data("cross", 4, seed=0)
    fit(system, adaptation, images, captions, config=FitConfig(steps=2, batch_size=2, learning_rate=1e-2))
    params = ("to_k.weight", "to_v.weight") + (("to_q.weight", "to_out.0.weight", "to_out.0.bias") if train_q_out else ())
    expected = {f"{name}.{p}" for name in cross_attention_layers(system.unet) for p in params}
    assert _changed(unet0, system.unet) == expected
    assert not _changed(te0, system.text_encoder)  # the row lives in the injected table, not the encoder's weights
    assert not torch.equal(adaptation.params[0], row0)
    path = adaptation.save(tmp_path / "cd.safetensors")
    loaded = load_custom_diffusion(path)
    assert {f"{split_file_key(k)[0]}.{split_file_key(k)[1]}" for k in loaded.weights} == expected
    assert loaded.tokens == ["cross"] and set(loaded.prompts) <= set(captions) and loaded.prompts
    trained = {k: v.clone() for k, v in system.unet.state_dict().items()}
    adaptation.remove()
    assert not _changed(unet0, system.unet) and not _changed(te0, system.text_encoder)
    assert flags == {n: p.requires_grad for n, p in system.named_parameters()}
    assert all(not m._forward_hooks for m in system.unet.modules())
    assert "cross" not in system.tokenizer.added
    # the file gives the trained model back (weights and the token)
    handle = sdadapt.apply_custom_diffusion(system.unet, path, text_encoder=system.text_encoder, tokenizer=system.tokenizer)
    assert all(torch.equal(trained[k], v) for k, v in system.unet.state_dict().items())
    torch.testing.assert_close(handle.modifier_embeddings()[0].vectors["text_encoder"], adaptation.params[0].detach().cpu())
    handle.remove()
    assert not _changed(unet0, system.unet)


def _images(folder, token, n=3, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_png(folder / f"img{i}.png", torch.rand(3, size, size, generator=g) * 2 - 1)
        (folder / f"img{i}.txt").write_text(f"a {token} circle {i}")
    return folder


def test_train_command_on_the_toy_writes_the_file_and_its_token(tmp_path, capsys):
    images = _images(tmp_path / "imgs", "<new1>")
    out = tmp_path / "out.safetensors"
    (token_file,) = token_files(out)
    token_file.write_text("in the way")
    # (--no-prior: sampling class images for each of the four runs was most of this test's time, and the token
    # files, the refusals and the two file forms do not depend on them)
    args = ["train", "custom-diffusion", "--images", str(images), "--token", "<new1>", "--model", "toy", "--steps", "3",
            "--no-prior", "-o", str(out)]
    assert main(args) == 8  # the companion token file exists: refused before training
    assert not out.exists()
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    loaded = load_custom_diffusion(out)
    assert loaded.tokens == ["<new1>"] and all("<new1>" in p for p in loaded.prompts)
    assert main(["train", "custom-diffusion", "--images", str(images), "--model", "toy", "-o", str(tmp_path / "x.safetensors")]) == 2
    pickle_out = tmp_path / "pickled.bin"  # diffusers' pickle form: pickled.bin + pickled-token.bin
    assert main([*args[:-1], str(pickle_out), "--steps", "1"]) == 0, capsys.readouterr().err
    assert token_files(pickle_out)[0].is_file() and load_custom_diffusion(pickle_out).tokens == ["<new1>"]
    # an earlier two-token save left numbered token files: refused without --overwrite, removed with it
    stale_out = tmp_path / "stale.bin"
    stale = [tmp_path / "stale-token1.bin", tmp_path / "stale-token2.bin"]
    for path in stale:
        path.write_text("an earlier save's token")
    neighbour = tmp_path / "stale-token01.bin"  # not this save's naming: never touched
    neighbour.write_text("keep")
    stale_args = [*args[:-1], str(stale_out), "--steps", "1"]
    assert main(stale_args) == 8 and "stale-token1.bin" in capsys.readouterr().err
    assert all(p.exists() for p in stale) and not stale_out.exists()
    assert main([*stale_args, "--overwrite"]) == 0, capsys.readouterr().err
    assert not any(p.exists() for p in stale) and neighbour.read_text() == "keep"
    assert load_custom_diffusion(stale_out).tokens == ["<new1>"]


def test_train_command_on_a_diffusers_folder_loads_in_diffusers(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from test_cli_train import _tiny_pipeline

    root = _tiny_pipeline(tmp_path / "pipe")
    images = _images(tmp_path / "imgs", "<new1>")
    out = tmp_path / "cd" / "pytorch_custom_diffusion_weights.safetensors"
    out.parent.mkdir()
    # (one class image: sampling the default two per training image was most of this test's time; the prior
    # path still runs on the diffusers folder, and what is checked, diffusers reading the file as sdadapt
    # does, holds for any number)
    code = main(["train", "custom-diffusion", "--images", str(images), "--token", "<new1>", "--init-word", "circle",
                 "--model", str(root), "--steps", "2", "--class-prompt", "a circle", "--class-images", "1",
                 "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    (token_file,) = token_files(out)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=diffusers.DDPMScheduler.from_pretrained(root / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([7]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx).sample
    # diffusers' loader, through the pipeline (on a bare UNet it silently sets nothing in 0.42)
    pipe.unet.load_attn_procs(out.parent, weight_name=out.name, _pipeline=pipe)
    pipe.load_textual_inversion(str(token_file))
    with torch.no_grad():
        theirs = pipe.unet(x, t, ctx).sample
    ours_unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    handle = sdadapt.apply_custom_diffusion(ours_unet, out)
    with torch.no_grad():
        ours = ours_unet(x, t, ctx).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 0
    loaded = load_custom_diffusion(out)
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id],
                               loaded.embeddings[0].vectors["text_encoder"][0])
    handle.remove()


def test_docs_page_example_runs_and_the_file_is_the_trained_model():
    namespace = run_block("custom-diffusion.md")
    assert torch.equal(namespace["again"], namespace["trained"])
    fresh, original = namespace["fresh"], namespace["system"]
    assert all(torch.equal(a, b) for a, b in zip(fresh.unet.state_dict().values(), original.unet.state_dict().values()))
