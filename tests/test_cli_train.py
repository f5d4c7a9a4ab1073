"""`python -m sdadapt train` on a tiny random diffusers pipeline folder, and its errors."""

from __future__ import annotations

import json

import pytest
import torch
from embedding_models import tiny_tokenizer

import sdadapt
from sdadapt.cli import main
from sdadapt.images import write_png

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _tiny_pipeline(root, *, prediction_type: str = "v_prediction"):
    """A Stable-Diffusion-layout folder with random tiny models (no hub access), its scheduler
    predicting ``prediction_type``."""
    torch.manual_seed(0)
    diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16,
    ).save_pretrained(root / "unet")
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    ).save_pretrained(root / "vae")
    vocab = tiny_tokenizer(root / "tokenizer").get_vocab()  # byte-level CLIP tokenizer, built offline
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=12, eos_token_id=vocab["<|endoftext|>"], bos_token_id=vocab["<|startoftext|>"],
    )).save_pretrained(root / "text_encoder")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type=prediction_type).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """The tiny pipeline folder, built once for the module: the tests only read it (train writes its
    outputs beside ``-o``, never into ``--model``)."""
    return _tiny_pipeline(tmp_path_factory.mktemp("cli_train") / "pipe")


def _images(folder, n=3, size=32, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_png(folder / f"img{i}.png", torch.rand(3, size, size, generator=g) * 2 - 1)
        if captions:
            (folder / f"img{i}.txt").write_text(f"a photo {i}")
    return folder


def _unet_outputs_with(root, unet_state):
    """``(before, after, handle)``: the UNet of the tiny pipeline folder ``root`` on one random input
    (1,4,16,16) before and after ``sdadapt.load_adapter`` of ``unet_state`` (a trained file's UNet part)."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 12, 32)
    with torch.no_grad():
        before = unet(x, torch.tensor([10]), ctx).sample
        handle = sdadapt.load_adapter(unet, unet_state)
        after = unet(x, torch.tensor([10]), ctx).sample
    return before, after, handle


def test_train_lora_on_a_diffusers_folder_writes_a_loadable_kohya_file(pipe, tmp_path, capsys):
    root = pipe
    images = _images(tmp_path / "imgs")
    out = tmp_path / "out.safetensors"
    code = main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "3", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "wrote" in captured.out
    # a LoRA without --class-prompt on a user's model trains without prior preservation
    assert "class images" not in captured.out
    state, metadata = sdadapt.load_lora(out)
    assert set(state) == {"unet", "text_encoder"} and metadata["ss_network_module"] == "networks.lora"
    # the trained LoRA applies to the same diffusers UNet and changes its output
    before, after, handle = _unet_outputs_with(root, state["unet"])
    assert len(handle) > 0 and not torch.allclose(before, after)


def test_diffusers_system_follows_the_scheduler_config(pipe):
    from sdadapt.diffusers_system import DiffusersSystem

    system = DiffusersSystem.from_folder(pipe)
    ref = diffusers.DDPMScheduler.from_pretrained(pipe / "scheduler")
    assert system.prediction_type == "v_prediction" and system.image_size == 32
    torch.testing.assert_close(system.alphas_cumprod, ref.alphas_cumprod, atol=1e-5, rtol=1e-4)
    latents = system.encode_images(torch.zeros(1, 3, 32, 32))
    assert latents.shape == (1, 4, 16, 16)


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (lambda p: (p / "empty").mkdir(), ["--images", "{p}/empty", "--model", "{pipe}"], "no images"),
        (lambda p: _images(p / "nocap", captions=False), ["--images", "{p}/nocap", "--model", "{pipe}"], "no caption file"),
        (lambda p: (_images(p / "bad"), (p / "bad" / "zz.png").write_bytes(b"garbage")), ["--images", "{p}/bad", "--model", "{pipe}"], "zz.png"),
        (lambda p: (_images(p / "ok"), (p / "notamodel").mkdir()), ["--images", "{p}/ok", "--model", "{p}/notamodel"], "not a diffusers Stable Diffusion folder"),
    ],
)
def test_train_errors_are_one_clear_line(pipe, tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    capsys.readouterr()
    argv = ["train", "lora", "--steps", "1", *[a.format(p=tmp_path, pipe=pipe) for a in args]]
    # (an unusable --model is an input file that cannot be used: exit 3, as every other one; bad images: 2)
    assert main(argv) == (3 if "notamodel" in argv[-1] else 2)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' own loading bars)
    assert last.startswith("error:") and message in last


def test_dreambooth_on_a_diffusers_folder_needs_and_uses_a_class_prompt(pipe, tmp_path, capsys):
    root = pipe
    images = _images(tmp_path / "imgs", n=2)
    argv = ["train", "dreambooth", "--images", str(images), "--model", str(root), "--steps", "2"]
    assert main(argv) == 2
    assert "--class-prompt" in capsys.readouterr().err.strip().splitlines()[-1]
    out = tmp_path / "db.safetensors"
    code = main([*argv, "--class-prompt", "a photo", "--class-images", "3", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "+ 3 class images" in capsys.readouterr().out and out.is_file()
    # (a LoRA without --class-prompt on a user's model trains without prior preservation: asserted by
    # test_train_lora_on_a_diffusers_folder_writes_a_loadable_kohya_file, which runs that training)


def test_train_output_options_overwrite_dtype_quiet(pipe, tmp_path, capsys):
    from safetensors.torch import load_file

    root = pipe
    images = _images(tmp_path / "imgs", n=2)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    argv = ["train", "lora", "--images", str(images), "--model", str(root), "--steps", "1", "-o", str(out)]
    capsys.readouterr()
    assert main(argv) == 8  # refused before any training (OutputExistsError): no bar drawn, the file untouched
    err = capsys.readouterr().err
    assert "--overwrite" in err.strip().splitlines()[-1] and "step/s" not in err and out.read_bytes() == b"precious"
    assert main([*argv, "--overwrite", "--dtype", "fp16", "-q"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "step/s" not in captured.err and "ETA" not in captured.err
    tensors = load_file(str(out))
    matrices = {k: v for k, v in tensors.items() if v.dim() > 0}
    assert matrices and all(v.dtype == torch.float16 for v in matrices.values())
    assert all(v.dtype == torch.float32 for k, v in tensors.items() if k.endswith(".alpha"))  # alphas stay float32
    state, _ = sdadapt.load_lora(out)  # still a loadable kohya file
    assert set(state) == {"unet", "text_encoder"}


def test_dreamartist_negative_file_is_an_output_the_overwrite_check_protects(tmp_path, capsys):
    images = _images(tmp_path / "imgs", n=2, size=32)
    out = tmp_path / "style.pt"
    negative = tmp_path / "style-neg.pt"
    negative.write_bytes(b"precious")  # only the companion exists: still refused before any work
    argv = ["train", "dreamartist", "--images", str(images), "--model", "toy", "--token", "sks", "--steps", "1", "-o", str(out)]
    assert main(argv) == 8
    err = capsys.readouterr().err
    assert "style-neg.pt" in err and "--overwrite" in err and negative.read_bytes() == b"precious" and not out.exists()


def test_dreamartist_takes_the_extensions_cfg_field_and_continues_a_pair(tmp_path, capsys):
    """``--cfg-scale 1.5-3.5:cos`` (the extension's field) trains as --cfg-scale 1.5 --cfg-high 3.5 --cfg-schedule cos;
    ``--init-weights style.pt`` continues the pair written before (style.pt + style-neg.pt)."""
    images = _images(tmp_path / "imgs", n=2, size=32)
    first, second = tmp_path / "style.pt", tmp_path / "more.pt"
    base = ["train", "dreamartist", "--images", str(images), "--model", "toy", "--token", "sks", "--steps", "1",
            "--vectors", "2", "--negative-vectors", "3"]
    assert main([*base, "--cfg-scale", "1.5-3.5:cos", "-o", str(first)]) == 0
    assert main([*base, "--cfg-scale", "1.5-3.5:cos", "--init-weights", str(first), "-o", str(second)]) == 0
    capsys.readouterr()
    start, start_neg = (sdadapt.load_embedding(p) for p in (first, tmp_path / "style-neg.pt"))
    moved, moved_neg = (sdadapt.load_embedding(p) for p in (second, tmp_path / "more-neg.pt"))
    assert next(iter(moved.vectors.values())).shape == (2, 64) and next(iter(moved_neg.vectors.values())).shape[0] == 3
    # one step from the saved vectors (lr 5e-3 default-ish scale), not from a fresh start: close to them
    for a, b in ((start, moved), (start_neg, moved_neg)):
        (x,), (y,) = a.vectors.values(), b.vectors.values()
        assert 0 < float((x - y).abs().max()) < 0.1
    assert main([*base, "--cfg-scale", "1-3:sine", "-o", str(tmp_path / "bad.pt")]) == 2
    assert "unknown schedule 'sine'" in capsys.readouterr().err


def test_the_help_names_each_methods_default_step_count():
    """``train --help`` says each method's default ``--steps`` (it said 600 for all; dreambooth trains 1000, the
    embedding methods 400)."""
    from sdadapt.cli.train import STEP_DEFAULTS_HELP
    from sdadapt.methods import METHODS

    usual, *others = STEP_DEFAULTS_HELP.split("; ")
    said = {name.strip(): int(steps) for part in others for names, steps in [part.rsplit(" ", 1)]
            for name in names.split(",")}
    for name, method in METHODS.items():
        assert method.steps == said.get(name, int(usual)), name


def test_errors_name_the_option_not_the_librarys_keyword(tmp_path, capsys):
    """The command line says ``pass --overwrite``; the library's ``(overwrite=True)`` twin is for Python callers."""
    from sdadapt.cli.options import error_line
    from sdadapt.errors import OutputExistsError

    images = _images(tmp_path / "imgs", n=2, size=32)
    out = tmp_path / "style.safetensors"
    out.write_bytes(b"keep")
    assert main(["train", "lora", "--images", str(images), "--model", "toy", "--steps", "1", "-o", str(out)]) == 8
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err, err
    assert error_line(OutputExistsError("x: pass --skip-unmatched (skip_unmatched=True) to merge")) == \
        "x: pass --skip-unmatched to merge"
    assert str(OutputExistsError("x (overwrite=True)")) == "x (overwrite=True)"  # (the exception keeps it)
