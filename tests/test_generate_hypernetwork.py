"""`python -m sdadapt generate --hypernetwork FILE[:STRENGTH]`: the same image as the Python path
(load_hypernetwork + inject_hypernetwork + generate), strength 0 = no hypernetwork, and the refusals."""

from __future__ import annotations

import pytest
import torch

from png_pixels import pixels as _pixels
import sdadapt
from sdadapt.cli import main
from sdadapt.formats.files import write_safetensors
from sdadapt.images import write_png

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

PROMPT = "a photo"  # (within the tiny tokenizer's 10-token window: a longer prompt is laid out in A1111's chunks)


def _random_hypernetwork(widths, *, seed: int, name: str = "style") -> sdadapt.Hypernetwork:
    """relu + LayerNorm "1, 2, 1" on ``widths`` with weights far from A1111's near-zero init."""
    config = sdadapt.HypernetworkConfig(layer_structure=(1, 2, 1), activation="relu", layer_norm=True)
    hn = sdadapt.Hypernetwork(list(widths), config, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return hn


def _run(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD folder (context widths 32: attn1 + attn2, 64: the mid block's attn1) and a
    hypernetwork for it written by sdadapt's writer, as .pt and .safetensors."""
    from test_cli_train import _tiny_pipeline

    root = tmp_path_factory.mktemp("hn")
    pipe = _tiny_pipeline(root / "pipe")
    hn = _random_hypernetwork([32, 64], seed=0)
    sdadapt.save_hypernetwork(root / "style.pt", hn)
    sdadapt.save_hypernetwork(root / "style.safetensors", hn)
    return pipe, root


def _base(pipe, out) -> list[str]:
    return ["generate", "--model", str(pipe), "--prompt", PROMPT, "--seed", "1", "--steps", "2", "--width", "32",
            "--height", "32", "-q", "-o", str(out)]


def test_cli_image_equals_the_python_path_and_strength_zero_is_the_plain_image(sd, tmp_path, capsys):
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    pipe, root = sd
    assert main(_base(pipe, tmp_path / "plain.png")) == 0
    assert main([*_base(pipe, tmp_path / "cli.png"), "--hypernetwork", f"{root / 'style.pt'}:0.7"]) == 0
    assert main([*_base(pipe, tmp_path / "twin.png"), "--hypernetwork", f"{root / 'style.safetensors'}:0.7"]) == 0
    assert main([*_base(pipe, tmp_path / "zero.png"), "--hypernetwork", f"{root / 'style.pt'}:0"]) == 0

    # the Python path: the same model, the file loaded and injected at 0.7, the same generate call
    system = load_system(str(pipe), device="cpu")
    handle = sdadapt.inject_hypernetwork(system.unet, sdadapt.load_hypernetwork(root / "style.pt"), strength=0.7)
    assert len(handle.layers) > 0 and handle.unused_widths == ()
    image = generate(system, [PROMPT], seed=1, steps=2, height=32, width=32)[0]
    write_png(tmp_path / "python.png", image)

    plain = _pixels(tmp_path / "plain.png")
    assert _pixels(tmp_path / "cli.png") == _pixels(tmp_path / "python.png")
    assert _pixels(tmp_path / "twin.png") == _pixels(tmp_path / "cli.png")
    assert _pixels(tmp_path / "cli.png") != plain  # the hypernetwork changes the image
    assert _pixels(tmp_path / "zero.png") == plain


def test_several_chain_in_order_like_the_python_path(sd, tmp_path):
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    pipe, root = sd
    sdadapt.save_hypernetwork(tmp_path / "second.pt", _random_hypernetwork([32], seed=1, name="second"))
    result = run_generate(model=str(pipe), prompt=PROMPT, seed=1, steps=2, width=32, height=32, out=tmp_path / "cli.png",
                          hypernetworks=[f"{root / 'style.pt'}:0.5", str(tmp_path / "second.pt")])
    assert [(h["strength"], h["unused_widths"]) for h in result["hypernetworks"]] == [(0.5, []), (1.0, [])]
    system = load_system(str(pipe), device="cpu")
    sdadapt.inject_hypernetwork(system.unet, sdadapt.load_hypernetwork(root / "style.pt"), strength=0.5, name="a")
    sdadapt.inject_hypernetwork(system.unet, sdadapt.load_hypernetwork(tmp_path / "second.pt"), name="b")
    write_png(tmp_path / "python.png", generate(system, [PROMPT], seed=1, steps=2, height=32, width=32)[0])
    assert _pixels(tmp_path / "cli.png") == _pixels(tmp_path / "python.png")


def test_refusals_are_one_line_errors_naming_the_problem(sd, tmp_path, capsys):
    pipe, root = sd
    toy = ["generate", "--prompt", "a purple circle", "--steps", "2", "-q", "-o", str(tmp_path / "x.png")]
    lora = tmp_path / "lora.safetensors"  # a kohya LoRA, not a hypernetwork
    write_safetensors(lora, {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, {})
    sdadapt.save_hypernetwork(tmp_path / "sd1.pt", _random_hypernetwork([768, 32], seed=2))  # an "SD1" file: 768 + 32
    sdadapt.save_hypernetwork(tmp_path / "sd2.pt", _random_hypernetwork([1024], seed=3))
    cases = [
        (toy + ["--hypernetwork", str(lora)], ("kohya-lora", "--lora FILE:SCALE", str(lora))),
        (toy + ["--hypernetwork", f"{root / 'style.pt'}:0,7"], ("'0,7' is not a number", "style.pt:0.8")),
        (toy + ["--hypernetwork", str(tmp_path / "nope.pt")], ("no such file", "nope.pt")),
        # the toy's text context is 64; the file's text pair is 768 (its 32 pair alone would hook attn1 layers)
        (toy + ["--hypernetwork", str(tmp_path / "sd1.pt")], ("768 (SD1)", "text context is 64", "sd1.pt")),
        (_base(pipe, tmp_path / "x.png") + ["--hypernetwork", str(tmp_path / "sd2.pt")],
         ("1024 (SD2)", "text context is 32", "sd2.pt")),
    ]
    codes = []
    for argv, words in cases:
        code, err = _run(argv, capsys)
        err = err.rsplit("\r", 1)[-1].split("\n", 1)[-1] if not err.startswith("error: ") else err  # (a loader's bar)
        assert code in (2, 3) and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert all(w in err for w in words), (words, err)
        codes.append(code)
    assert codes == [3, 2, 3, 2, 2]  # a wrong file: WeightFileError/FileNotFoundError; a misfit: ValueError
    assert not (tmp_path / "x.png").exists()


def test_docs_shell_example_parses_and_its_generate_line_runs(tmp_path, monkeypatch, capsys):
    import shlex

    from docs_pages import code_blocks

    from sdadapt.cli import build_parser

    block = code_blocks("hypernetworks.md", "bash")[0]
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines() if line.strip()]
    assert [argv[:4] for argv in commands] == [["python", "-m", "sdadapt", "train"], ["python", "-m", "sdadapt", "generate"]]
    train = build_parser().parse_args(commands[0][3:])
    assert train.images == "purple-images/" and str(train.out) == "purple.pt"
    monkeypatch.chdir(tmp_path)
    sdadapt.save_hypernetwork(tmp_path / "purple.pt", _random_hypernetwork([32, 64], seed=4, name="purple"))  # toy widths
    assert main([*commands[1][3:], "--steps", "3", "-q"]) == 0, capsys.readouterr().err
    assert (tmp_path / "circle.png").is_file()


