"""`python -m sdadapt invert` end to end on the toy model: files, PSNR line, edit, refusal to overwrite."""

from __future__ import annotations

import re

from sdadapt.cli import main
from sdadapt.images import write_png
from sdadapt.inversion import load_inversion
from sdadapt.toy.shapes import Scene, caption, render


def test_invert_command_writes_reconstruction_inversion_and_edit(tmp_path, capsys):
    scene = Scene("circle", "red", "large", "left", "gray")
    source = write_png(tmp_path / "in.png", render(scene))
    out = tmp_path / "out.png"
    argv = ["invert", str(source), "--prompt", caption(scene), "--method", "negative-prompt", "--steps", "4",
            "--edit-prompt", "a large blue circle", "-o", str(out), "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    psnr = float(re.search(r"PSNR ([0-9.]+) dB", printed).group(1))
    assert psnr > 10.0
    assert out.is_file() and (tmp_path / "out-edit.png").is_file()
    inversion = load_inversion(tmp_path / "out.safetensors")
    assert inversion.method == "negative-prompt"
    assert main(argv) != 0, "an existing output is refused without --overwrite"
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_inspect_prints_embedding_and_hypernetwork_fields(tmp_path, capsys):
    import torch

    import sdadapt

    sdadapt.save_embedding(tmp_path / "sks.pt", sdadapt.Embedding(name="sks", vectors={"text_encoder": torch.randn(3, 32)}),
                           format="a1111")
    assert main(["inspect", str(tmp_path / "sks.pt")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^kind:\s+embedding$", out, re.M) and re.search(r"^vectors:\s+3$", out, re.M)
    assert re.search(r"^dims:\s+text_encoder: 32$", out, re.M)
    hn = sdadapt.Hypernetwork([32, 64])
    sdadapt.save_hypernetwork(tmp_path / "hn.pt", hn)
    assert main(["inspect", str(tmp_path / "hn.pt")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^kind:\s+hypernetwork$", out, re.M)
    assert re.search(r"^widths:.*32.*64", out, re.M) and re.search(r"^layer_structure:", out, re.M)
