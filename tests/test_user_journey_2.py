"""What an A1111/ComfyUI/kohya user met in the commands other than ``train`` (brief G): each test
fails on the behaviour found before its fix."""

from __future__ import annotations

import pytest
import torch

from png_pixels import pixels as _pixels
from sdadapt.cli import main


# ------------------------------------------------------------------ A1111 emphasis in generate prompts
def _emphasis_reference(system, prompt: str, time_ids=None):
    """A1111's "Original" emphasis written out in float64: the unweighted states times each token's
    weight, rescaled to the unweighted mean (per prompt; SDXL per encoder)."""
    weighted = system.tokenize_weighted([prompt])
    if system.is_sdxl:
        plain = system.condition({"ids": weighted["ids"], "time_ids": time_ids})
        width = system.text_encoder.config.hidden_size
        parts = []
        for row, part in enumerate((plain["context"][..., :width], plain["context"][..., width:])):
            states = part.double() * weighted["weights"][:, row].double().unsqueeze(-1)
            parts.append(states * (part.double().mean() / states.mean()))
        return {**plain, "context": torch.cat(parts, dim=-1).float()}
    plain = system.condition(weighted["ids"]).double()  # (1, L, D)
    states = plain * weighted["weights"].double().unsqueeze(-1)
    return (states * (plain.mean() / states.mean())).float()


@pytest.mark.parametrize("sdxl", [False, True])
def test_generate_reads_a1111_prompt_weights_as_a1111(tmp_path, sdxl):
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path, max_token_length=75, sdxl=sdxl)
    with torch.no_grad():  # (a random CLIP's states have mean ~0: the rescale would divide noise by noise)
        for encoder in (system.text_encoder, getattr(system, "text_encoder_2", None)):
            if encoder is not None:
                encoder.get_input_embeddings().weight += 0.5
                next(m for n, m in encoder.named_modules() if n.endswith("final_layer_norm")).bias += 0.5
    options = {"seed": 3, "steps": 2, "guidance": 5.0, "negative": "blue"}
    prompt = "a (red:1.8) circle, [[green]]"
    size = float(system.image_size)
    time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]]) if sdxl else None
    reference = system.sample([prompt], cond=_emphasis_reference(system, prompt, time_ids), **options)
    # before: the brackets and "1.8" were tokenized as text and the weights ignored
    assert torch.allclose(system.sample([prompt], **options), reference, atol=1e-5)
    plain = system.sample(["a red circle, green"], **options)
    assert (reference - plain).abs().max() > 1e-3  # (the weights change the picture)
    # weight 1 is the plain prompt bit for bit, on both branches; a weighted negative is read too
    assert torch.equal(system.sample(["a (red:1) circle, green"], **{**options, "negative": "(blue:1)"}), plain)
    assert not torch.equal(system.sample(["a red circle, green"], **{**options, "negative": "(blue:1.6)"}), plain)


@pytest.mark.parametrize("sdxl", [False, True])
def test_emphasis_rescales_each_prompt_of_a_batch_and_a_long_prompt_as_a_whole(tmp_path, sdxl):
    """The rescale as kohya's lpw_stable_diffusion.get_weighted_text_embeddings writes it, in float64:
    ``previous_mean = states.mean(axis=[-2, -1])`` per prompt (not over the batch), ``states *= weights``,
    ``states *= previous_mean / current_mean`` — over the whole joined prompt of a 150-token model (A1111
    also takes it per prompt; a prompt of <= 75 tokens is one chunk there). SDXL: per encoder (A1111)."""
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path, max_token_length=150, sdxl=sdxl)
    with torch.no_grad():  # (a random CLIP's states have mean ~0: the rescale would divide noise by noise)
        for encoder in (system.text_encoder, getattr(system, "text_encoder_2", None)):
            if encoder is not None:
                encoder.get_input_embeddings().weight += 0.5
                next(m for n, m in encoder.named_modules() if n.endswith("final_layer_norm")).bias += 0.5
    long = "a (red:1.8) circle, " + ", ".join(["[green] square"] * 12)  # > 75 tokens: two windows
    prompts = [long, "(blue:0.4) ring"]
    weighted = system.tokenize_weighted(prompts)
    assert weighted["ids"].shape[-1] == 152 and (weighted["ids"][0, ..., 77:] != weighted["ids"][0, ..., -1:]).any()
    with torch.no_grad():
        plain = system.condition(weighted["ids"] if not sdxl else {"ids": weighted["ids"]})
        got = system._prompt_condition(prompts, None)
    states = plain["context"] if sdxl else plain  # (2, 152, D)
    width = system.text_encoder.config.hidden_size
    parts = [(states[..., :width], weighted["weights"][:, 0]), (states[..., width:], weighted["weights"][:, 1])] \
        if sdxl else [(states, weighted["weights"])]
    want = []
    for part, weights in parts:
        part = part.double()
        previous_mean = part.mean(dim=(-2, -1))  # (B,)
        part = part * weights.double().unsqueeze(-1)
        current_mean = part.mean(dim=(-2, -1))
        want.append(part * (previous_mean / current_mean)[:, None, None])
    want = torch.cat(want, dim=-1)
    got_states = got["context"] if sdxl else got
    assert torch.allclose(got_states.double(), want, rtol=1e-6, atol=1e-6)
    # each prompt alone gives its row of the batch (a mean over the batch would mix them)
    with torch.no_grad():
        alone = system._prompt_condition(prompts[1:], None)
    assert torch.allclose((alone["context"] if sdxl else alone), got_states[1:], rtol=1e-6, atol=1e-6)
    if sdxl:
        assert torch.equal(got["text_embeds"], plain["text_embeds"])  # (the pooled output is not weighted)
    # a prompt without brackets: the conditioning of before, bit for bit, on both branches
    with torch.no_grad():
        before = system.condition(system.tokenize(["a red circle"]) if not sdxl else {"ids": system.tokenize(["a red circle"])})
        now = system._prompt_condition(["a red circle"], None)
        assert torch.equal(now["context"] if sdxl else now, before["context"] if sdxl else before)
        before_neg = system.condition(system.tokenize(["blue"]) if not sdxl else {"ids": system.tokenize(["blue"])})
        now_neg = system._uncond("blue", now, 1, None)
        assert torch.equal(now_neg["context"] if sdxl else now_neg, before_neg["context"] if sdxl else before_neg)


def test_generate_on_the_toy_reads_emphasis_as_the_plain_words_and_says_so(tmp_path, capsys):
    weighted, plain = tmp_path / "w.png", tmp_path / "p.png"
    steps = ["--steps", "2"]  # (the prompt conditions every step: two show a difference as well as 25)
    assert main(["generate", "--prompt", "a (red:1.3) circle", "--negative", "[blue]", *steps, "-o", str(weighted)]) == 0
    err = capsys.readouterr().err
    assert "reads no prompt weights; 'a (red:1.3) circle' is read as 'a red circle'" in err
    assert "does not know" not in err  # before: "the toy model does not know (red:1.3) (it reads them as <unk>)"
    assert main(["generate", "--prompt", "a red circle", "--negative", "blue", *steps, "-o", str(plain)]) == 0
    assert "prompt weights" not in capsys.readouterr().err
    assert _pixels(weighted) == _pixels(plain)


# ------------------------------------------------------------------ a Custom Diffusion result from the shell
def test_generate_uses_a_custom_diffusion_file_and_its_token(tmp_path, capsys):
    from sdadapt import Embedding, apply_custom_diffusion
    from sdadapt.custom_diffusion import (
        save_custom_diffusion,
        unet_custom_diffusion_state,
    )
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    system = load_system("toy")
    torch.manual_seed(0)
    state = {k: v + 0.3 * torch.randn_like(v) for k, v in unet_custom_diffusion_state(system.unet).items()}
    token = Embedding("sks", {"text_encoder": 2 * torch.randn(1, system.text_encoder.get_input_embeddings().weight.shape[1])})
    file = save_custom_diffusion(tmp_path / "cd.safetensors", state, embeddings=[token])[0]
    base = generate(system, ["a sks ring"], seed=4, steps=2)
    handle = apply_custom_diffusion(system.unet, file, scale=0.7, text_encoder=system.text_encoder,
                                    tokenizer=system.tokenizer)
    want = generate(system, ["a sks ring"], seed=4, steps=2)
    handle.remove()
    assert (want - base).abs().max() > 0.05
    out = tmp_path / "g.png"
    argv = ["generate", "--prompt", "a sks ring", "--seed", "4", "--steps", "2", "-o", str(out), "--overwrite"]
    # before: no way from the shell (--lora said "apply it with apply_custom_diffusion", a Python function)
    assert main([*argv, "--custom-diffusion", f"{file}:0.7"]) == 0
    assert f"custom diffusion {file} at 0.7 (" in capsys.readouterr().err
    from sdadapt.images import write_png

    assert _pixels(out) == _pixels(write_png(tmp_path / "want.png", want[0]))
    assert main(["generate", "--prompt", "a", "--lora", str(file), "-o", str(tmp_path / "x.png")]) == 3
    assert "use it with `generate --custom-diffusion FILE[:SCALE]`" in capsys.readouterr().err


# ------------------------------------------------------------------ inspect: every file says what it is and what takes it
def _inspect(capsys, path) -> dict:
    import json

    assert main(["inspect", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_names_an_aesthetic_embedding_and_generate_refuses_it_as_a_token(tmp_path, capsys):
    from sdadapt import save_aesthetic_embedding

    vector = torch.randn(1, 64)
    save_aesthetic_embedding(tmp_path / "style.safetensors", vector)
    torch.save(vector, tmp_path / "style.pt")  # the A1111 extension's file: a bare tensor
    for name in ("style.safetensors", "style.pt"):
        summary = _inspect(capsys, tmp_path / name)
        # before: kind "embedding" (a diffusers token '' / trigger 'style') that --embedding injected as a word
        assert summary["kind"] == "aesthetic-embedding" and summary["use"] == "generate --aesthetic FILE"
        assert summary["dims"] == {"image embedding": 64}
        assert main(["generate", "--prompt", "a style circle", "--embedding", str(tmp_path / name),
                     "-o", str(tmp_path / "x.png")]) == 3
        assert "use it with `generate --aesthetic FILE`" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_inspect_tells_a_ckpt_pickle_and_a_models_parts_apart(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline
    from tiny_checkpoints import tiny_sd1_file

    tiny_sd1_file(tmp_path / "m.ckpt", ckpt=True)  # {"state_dict": ...}, as the original SD releases
    summary = _inspect(capsys, tmp_path / "m.ckpt")
    assert summary["model"] == "Stable Diffusion 1.x (sd1)"  # before: no model line for a .ckpt
    assert summary["use"].startswith("--model FILE")
    pipe = _tiny_pipeline(tmp_path / "pipe")
    vae = _inspect(capsys, pipe / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae["kind"] == "checkpoint" and vae["model"] == "a VAE alone (AutoencoderKL)"  # before: "unknown"
    assert "generate --vae FILE" in vae["use"]
    unet = _inspect(capsys, pipe / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet["model"] == "a Stable Diffusion 1.x UNet alone (sd1)" and "--model needs" in unet["use"]
    text = _inspect(capsys, next((pipe / "text_encoder").glob("*.safetensors")))
    assert text["model"] == "a text encoder alone (CLIP)"
    assert main(["inspect", str(tmp_path / "m.ckpt")]) == 0
    assert "use:        --model FILE (generate, train, invert)" in capsys.readouterr().out


# ------------------------------------------------------------------ merge given a LoRA for a model
def test_merge_given_a_lora_says_to_bake_it_with_merge_lora(tmp_path, capsys):
    from hostile_files import checkpoint, kohya_lora

    from sdadapt.formats.files import write_safetensors

    model, lora = tmp_path / "model.safetensors", tmp_path / "style.safetensors"
    write_safetensors(model, checkpoint(0))
    write_safetensors(lora, kohya_lora(1))
    assert main(["merge", "weighted-sum", str(model), str(lora), "--alpha", "0.5", "-o", str(tmp_path / "o.safetensors")]) == 6
    err = capsys.readouterr().err
    # before: "...share no weights...; check the input files"
    assert "style.safetensors is a kohya-lora file, an adapter: bake it into a checkpoint with `python -m sdadapt " \
           "merge-lora CHECKPOINT style.safetensors -o OUT`, then merge that" in err
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------ one name for one thing; sizes that say what works
def test_invert_takes_cfg_as_generate_does(tmp_path, capsys):
    from train_inputs import captioned_pngs

    image = captioned_pngs(tmp_path / "imgs", [(32, 32)], caption=["a red circle"]) / "0.png"
    common = ["invert", str(image), "--prompt", "a red circle", "--method", "ddim", "--steps", "3", "-q"]
    assert main([*common, "--guidance", "3", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--cfg", "3", "-o", str(tmp_path / "b.png")]) == 0  # before: "unrecognized arguments: --cfg"
    assert _pixels(tmp_path / "a.png") == _pixels(tmp_path / "b.png")
    assert main([*common, "--cfg", "1", "-o", str(tmp_path / "c.png")]) == 0
    assert _pixels(tmp_path / "c.png") != _pixels(tmp_path / "a.png")


def test_a_size_the_model_cannot_make_names_the_nearest_it_can(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    system = tiny_diffusers_system(tmp_path, max_token_length=75)
    m = system.vae_factor  # (a generated side's multiple: the VAE's, as A1111's and diffusers' rule)
    with pytest.raises(ValueError, match=rf"image size {10 * m + 1}x{6 * m - 1}: both sides must be multiples of {m} "
                                         rf"\(the nearest: {10 * m}x{6 * m}\)"):
        system.sample(["a"], width=10 * m + 1, height=6 * m - 1, steps=1)


def test_demo_with_no_images_is_a_clear_error(tmp_path, capsys):
    # before: "internal error (RuntimeError: stack expects a non-empty TensorList); this is a bug in sdadapt"
    assert main(["demo", "--images", "0", "-q", "-o", str(tmp_path / "d")]) == 2
    assert "images (--images) must be between 1 and 10000, got 0" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ the usual download mistakes, named with their fix
_FOREIGN = {
    "page.safetensors": (b"<!DOCTYPE html>\n<html><head><title>model.safetensors</title></head><body>",
                         ("a web page (HTML), not weights: the download saved a page instead of the file; on Hugging "
                          "Face use the .../resolve/main/FILE link")),
    "lfs.ckpt": (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4265380512\n",
                 "a Git LFS pointer (a few lines of text), not the weights: run `git lfs install` and `git lfs pull`"),
    "picture.safetensors": (b"\x89PNG\r\n\x1a\n" + bytes(64), "a PNG image, not weights"),
    "model.gguf": (b"GGUF\x03\x00\x00\x00" + bytes(64), "a GGUF file (a quantised model for llama.cpp / ComfyUI-GGUF)"),
    "config.safetensors": (b'{\n  "_class_name": "UNet2DConditionModel"\n}', "a JSON text file (a config or index?)"),
}


@pytest.mark.parametrize("name", sorted(_FOREIGN))
def test_a_downloaded_page_or_lfs_pointer_is_named_with_the_fix(tmp_path, capsys, name):
    content, words = _FOREIGN[name]
    path = tmp_path / name
    path.write_bytes(content)
    # before: "not a safetensors file, or a corrupt one (its first 8 bytes give a 5789751444030890300-byte header ...)"
    # or "neither a safetensors file nor a torch.save archive (corrupt, or another format)"
    for argv in (["inspect", str(path)], ["merge-lora", str(path), str(path), "-o", str(tmp_path / "o.safetensors")],
                 ["generate", "--prompt", "a", "--lora", str(path), "-o", str(tmp_path / "o.png")]):
        assert main(argv) == 3, argv
        err = capsys.readouterr().err
        assert f"{path}: {words}" in err and err.count("\n") == 1, (argv, err)


def test_a_real_weights_file_is_never_taken_for_a_foreign_one(tmp_path):
    from hostile_files import kohya_lora

    from sdadapt.formats.files import (
        read_safetensors_header,
        read_weights,
        write_safetensors,
    )
    from sdadapt.formats.foreign_files import foreign_content

    for seed in range(4):
        path = write_safetensors(tmp_path / f"{seed}.safetensors", kohya_lora(seed), {"ss_note": "<html>"})
        assert foreign_content(path) is None
    for low_byte in b"{<[":  # a header whose length's first byte reads as "{", "<" or "[" is still safetensors
        header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
        header += b" " * (low_byte - len(header) % 256 if low_byte >= len(header) % 256 else 256 + low_byte - len(header) % 256)
        raw = len(header).to_bytes(8, "little") + header + bytes(4)
        assert raw[0] == low_byte
        (tmp_path / "odd.safetensors").write_bytes(raw)
        assert foreign_content(tmp_path / "odd.safetensors") is None
        for suffix in (".safetensors", ".ckpt"):  # (the readers: sniffed as safetensors, whatever the name)
            (tmp_path / f"odd{suffix}").write_bytes(raw)
            assert read_weights(tmp_path / f"odd{suffix}")[0]["a"].shape == (1,)
            assert read_safetensors_header(tmp_path / f"odd{suffix}")[0]["a"]["shape"] == [1]
    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "m.ckpt")
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)  # a bare pickle
    for name in ("m.ckpt", "old.pt"):
        assert foreign_content(tmp_path / name) is None
        assert len(read_weights(tmp_path / name)[0]) == 1


# ------------------------------------------------------------------ an SD1 file on an SDXL model
def test_an_sd1_lora_or_embedding_on_sdxl_says_which_model_each_is(tmp_path):
    pytest.importorskip("diffusers")
    from tiny_systems import tiny_diffusers_system

    import sdadapt
    from sdadapt.jobs.generate import _apply_lora_file, _inject_embedding_file

    sd1, sdxl = (tiny_diffusers_system(tmp_path / name, max_token_length=75, sdxl=name == "xl") for name in ("sd1", "xl"))
    handle = sdadapt.inject(sd1.unet, "unet-attention", sdadapt.LoRAConfig(rank=2))
    sdadapt.formats.save_kohya(tmp_path / "sd1.safetensors", {"unet": handle.state_dict()}, base_model="sd1")
    with pytest.raises(ValueError, match=r"--lora .*sd1.safetensors: does not fit this model's unet: the file says it "
                                         r"is for sd_v1, and this is SDXL \(.* \.\.\.\)$"):
        _apply_lora_file(sdxl, tmp_path / "sd1.safetensors", 1.0)
    sdadapt.save_embedding(tmp_path / "sks.safetensors", sdadapt.Embedding("sks", {"text_encoder": torch.randn(1, 32)}))
    # before: "1 text encoder(s) needed for keys ['text_encoder'], got 2" (no file, no fix)
    with pytest.raises(ValueError, match=r"--embedding .*sks.safetensors: does not fit this model: the file holds "
                                         r"text_encoder \(1, 32\), this model needs an SDXL embedding \(clip_l and clip_g"):
        _inject_embedding_file(sdxl, tmp_path / "sks.safetensors")
    assert _inject_embedding_file(sd1, tmp_path / "sks.safetensors").name == "sks"  # (it fits the SD1 model)


def test_extract_lora_from_sd1_and_sdxl_says_so_in_one_short_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from tiny_checkpoints import tiny_sd1_file, tiny_sdxl_file

    sd1, sdxl = tiny_sd1_file(tmp_path / "sd1.safetensors"), tiny_sdxl_file(tmp_path / "xl.safetensors")
    assert main(["extract-lora", str(sd1), str(sdxl), "-q", "-o", str(tmp_path / "x.safetensors")]) == 3
    err = capsys.readouterr().err
    # before: ten "model.diffusion_model...: shape (32, 4, 3, 3) vs (64, 4, 3, 3)" lines folded into one, then the hint
    assert f"{sd1} is an SD1 model and {sdxl} an SDXL one (" in err and "extract from a fine-tune of the same" in err
    assert len(err) < 400 and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("command", ["generate", "invert"])
def test_dtype_on_a_command_that_writes_no_weights_is_refused_not_ignored(tmp_path, capsys, command):
    from train_inputs import captioned_pngs

    image = captioned_pngs(tmp_path / "imgs", [(32, 32)], caption=["a red circle"]) / "0.png"
    argv = (["generate", "--prompt", "a red circle", "--steps", "2"] if command == "generate"
            else ["invert", str(image), "--prompt", "a red circle", "--method", "ddim", "--steps", "2"])
    # before: --dtype fp16 was accepted and did nothing (the images came from the float32 model)
    assert main([*argv, "--dtype", "fp16", "-q", "-o", str(tmp_path / "o.png")]) == 2
    assert f"--dtype fp16: {command}" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    assert main([*argv, "-q", "-o", str(tmp_path / "o.png")]) == 0


