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
