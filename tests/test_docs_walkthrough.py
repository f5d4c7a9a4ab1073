"""A new user's walk through README.md and docs/: every command line they show parses with today's CLI.

The docs show ~180 ``python -m sdadapt ...`` lines (README's command list, indented and fenced shell
blocks, inline `python -m sdadapt ...` spans). Most cannot run here (real SD checkpoints, GPUs), but each
must still be accepted by the parser of the command it names: an option renamed or removed, a choice
dropped (a sampler label, a ``--to`` format, a merge mode), or a value the option no longer takes is a
broken example for whoever copies it. Synopsis notation is read as a reader reads it: ``[--opt X]``
is the option given, ``a|b`` the first choice, ``...`` "more of the same"; upper-case placeholders
(``METHOD``, ``NAME``) make a line a synopsis that is not checked. A command's *required* arguments may
be left out (the docs show partial commands in prose); everything given must be right.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from sdadapt.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_START = re.compile(r"(?:python -m sdadapt|sdadapt|torchrun [^#]*?-m sdadapt)\s")
_PLACEHOLDERS = {"METHOD", "NAME", "r"}


def documented_commands(text: str) -> list[tuple[int, str]]:
    """``(line, command)`` for each sdadapt command line of a markdown page: lines in fenced blocks or
    indented code that start with ``python -m sdadapt`` / ``sdadapt`` / ``torchrun ... -m sdadapt``
    (a ``$ `` prompt allowed; ``\\`` continuations joined), and inline `python -m sdadapt ...` spans."""
    found = [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"`(python -m sdadapt [^`]+)`", text)]
    lines = text.splitlines()
    fenced = False
    i = 0
    while i < len(lines):
        raw = lines[i]
        line = raw.strip()
        if line.startswith("```"):
            fenced = not fenced
        else:
            line = line.removeprefix("$ ")
            if _START.match(line + " ") and (fenced or raw.startswith("    ")):
                start = i
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                found.append((start + 1, line))
        i += 1
    return found


def as_argv(command: str) -> list[str] | None:
    """The argv after ``sdadapt`` of a documented command, synopsis notation resolved; ``None`` for a
    synopsis with a placeholder the parser cannot take (``train METHOD``, ``--sampler NAME``)."""
    tokens = shlex.split(command, comments=True)
    tokens = tokens[tokens.index("sdadapt") + 1:]
    argv: list[str] = []
    skip_next = False
    for token in tokens:
        if skip_next:  # "[--json | --json-lines]": the first alternative
            skip_next = False
            continue
        if token == "|":
            skip_next = True
            continue
        bare = token.strip("[]")
        if bare in _PLACEHOLDERS:
            return None
        if bare == "...":
            if argv and argv[-1].startswith("-"):
                argv.append("x")  # '--prompt "..."': some value
            continue
        if token.startswith("[-") and token.endswith("]") and token.count("[") == 1:
            token = token[1:-1]  # [--flag]
        if token.startswith("[") and "]" not in token:
            token = token[1:]  # [--opt VALUE]
        if token.endswith("]") and "[" not in token:
            token = token[:-1]
        if "|" in token and token.strip("|") and not any(c in token for c in "[< "):
            token = token.split("|")[0]  # kohya|diffusers|peft -> kohya (not prompts, not "|||")
        if token:
            argv.append(token)
    return argv


def parse_error(parser, argv: list[str]) -> str | None:
    """The parser's error for ``argv`` (``None`` when it parses, or lacks only required arguments)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code not in (0, None) and "arguments are required" not in err.getvalue():
                return err.getvalue().strip()
    return None


def test_every_documented_command_line_parses():
    parser = build_parser()
    checked, broken = 0, []
    for page in PAGES:
        for line, command in documented_commands(page.read_text()):
            argv = as_argv(command)
            if argv is None:
                continue
            checked += 1
            error = parse_error(parser, argv)
            if error:
                broken.append(f"{page.relative_to(ROOT)}:{line}: {command}\n    {error}")
    assert not broken, "documented commands the CLI refuses:\n" + "\n".join(broken)
    assert checked > 150, checked  # (183 in December 2026) the extraction still finds the docs' commands


def test_the_extraction_catches_a_renamed_option_and_reads_synopses():
    """The checker itself: a wrong option, a wrong choice and a wrong value are caught; synopsis notation is not."""
    parser = build_parser()
    page = """
    python -m sdadapt resize-lora LORA --rank 4 -o OUT
```bash
python -m sdadapt generate --model toy --prompt "a [cat|fox] <lora:x:0.5>" \\
    --sampler "DPM++ 2M Karras" -o out.png
$ python -m sdadapt convert LORA --to kohya|diffusers|peft -o OUT   # a comment
```
Prose: `python -m sdadapt inspect FILE [FILE ...] [--json | --json-lines]` and sdadapt keeps it.
"""
    commands = documented_commands(page)
    assert [line for line, _ in commands] == [8, 2, 4, 6]  # inline spans first, then code lines (a continuation keeps its first line)
    for _, command in commands:
        assert parse_error(parser, as_argv(command)) is None, command
    assert as_argv("python -m sdadapt train METHOD --images DIR") is None
    for wrong in ("python -m sdadapt resize-lora L --rnak 4 -o O",  # a renamed option
                  "python -m sdadapt convert L --to kohy -o O",  # a dropped choice
                  'python -m sdadapt generate --sampler "DPM++ 9M" --prompt x -o o.png',  # an unknown sampler
                  "python -m sdadapt resize-lora L --rank four -o O"):  # a value it does not take
        assert parse_error(parser, as_argv(wrong)), wrong


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_readme_and_index_python_examples_run_on_tiny_diffusers_models(page, tmp_path, monkeypatch):
    """README's example (inject, train, save as kohya, merge, remove) and index.md's targets block, on a tiny
    random diffusers UNet and CLIP text encoder; the kohya file the README writes reads back with the same
    deltas, and ``remove()`` leaves the UNet's weights bit for bit as they were."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import sdadapt

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                num_hidden_layers=2, vocab_size=1000, bos_token_id=0,
                                                eos_token_id=2, pad_token_id=1, projection_dim=32))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    text = (ROOT / page).read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    namespace = {"unet": unet, "text_encoder": text_encoder}
    exec(compile(block, page, "exec"), namespace)  # noqa: S102 - the docs example
    if page == "README.md":
        components, _ = sdadapt.load_lora("my_lora.safetensors")
        # kohya's file: unet + text encoder LoRAs at the README's ranks and alphas
        assert set(components) == {"unet", "text_encoder"}
        unet_state = components["unet"]
        ranks = {v.shape[0] for k, v in unet_state.items() if k.endswith("lora_down.weight")}
        alphas = {float(v) for k, v in unet_state.items() if k.endswith(".alpha")}
        assert ranks == {16} and alphas == {8.0}
        assert {v.shape[0] for k, v in components["text_encoder"].items() if k.endswith("lora_down.weight")} == {8}
        after = unet.state_dict()
        assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
        # "exactly what it was before inject": no adapter child and no hook left on any layer
        assert not [name for name, _ in unet.named_modules() if name.endswith("sdadapt")]
        assert not [name for name, m in unet.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    else:
        layers = namespace["layers"]
        names = [name for name, _ in layers]
        assert names and all(".attentions." in n and not n.startswith("up_blocks.") for n in names)
        assert all(isinstance(m, torch.nn.Linear) and ".attn" in n for n, m in layers)
        assert {n.rsplit(".", 1)[-1] for n in names} == {"to_q", "to_k", "to_v", "0"}


def test_train_page_from_python_example_trains_the_lora_it_says(tmp_path, monkeypatch):
    """docs/train.md "From Python": ``run_train("lora", TrainOptions(...))`` on the page's tiny SD1 file and
    captioned folder (built as its make.py builds them), shortened to 2 steps: it writes a kohya LoRA of the
    ``method_options`` rank on both the UNet and the text encoder, and says so in its result."""
    pytest.importorskip("diffusers")
    import sys

    import torch
    from docs_pages import code_blocks

    import sdadapt
    from sdadapt.images import write_png

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(Path(__file__).parent), *sys.path])
    from tiny_checkpoints import tiny_sd1_file

    tiny_sd1_file(Path("sd1-tiny.safetensors"))
    folder = Path("data/10_sks toy")
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in {"wide": (48, 80), "square": (64, 64)}.items():
        write_png(folder / f"{name}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (folder / f"{name}.txt").write_text(f"sks toy, {name}, studio photo")
    block = next(b for b in code_blocks("train.md") if "run_train(" in b)
    assert "steps=20" in block
    namespace: dict = {}
    exec(compile(block.replace("steps=20", "steps=2"), "docs/train.md", "exec"), namespace)  # noqa: S102 - the docs example
    result = namespace["result"]
    assert result["method"] == "lora" and result["steps"] == 2 and len(result["losses"]) == 2
    assert Path(result["file"]).resolve() == (tmp_path / "out" / "x.safetensors").resolve()
    components, metadata = sdadapt.load_lora(result["file"])
    assert set(components) == {"unet", "text_encoder"}
    ranks = {v.shape[0] for state in components.values() for k, v in state.items() if k.endswith("lora_down.weight")}
    assert ranks == {8} and metadata["ss_network_dim"] == "8" and metadata["ss_steps"] == "2"


@pytest.mark.parametrize(("method", "extra", "name", "companion"), [
    ("custom-diffusion", ["--token", "<new1>", "--no-prior"], "cd.safetensors", "cd-token.safetensors"),
    ("dreamartist", ["--token", "sks"], "style.pt", "style-neg.pt"),
])
def test_train_names_every_file_it_writes(method, extra, name, companion, tmp_path, capsys):
    """A Custom Diffusion run writes its modifier token beside the weights (diffusers' ``<new1>.bin``), a
    DreamArtist run its negative embedding (A1111's ``<name>-neg.pt``): ``train`` says so, one ``wrote`` line
    per file on disk, so a user copying the result to another tool takes both."""
    import torch

    from sdadapt.cli import main
    from sdadapt.images import write_png

    images = tmp_path / "imgs"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_png(images / f"img{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
    out = tmp_path / name
    argv = ["train", method, "--images", str(images), "--model", "toy", *extra, "--steps", "1", "-q", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    wrote = sorted(Path(line.split()[1]).name for line in stdout.splitlines() if line.startswith("wrote "))
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.suffix == out.suffix)
    assert wrote == on_disk == sorted([name, companion]), stdout


def test_extract_lora_says_which_min_diff_keeps_a_text_encoder_it_left_out(tmp_path, monkeypatch):
    """extract-lora leaves out a text encoder whose largest |difference| is at most ``min_diff`` (kohya's
    ``extract_lora_from_models.py``: "Text encoder is same. Extract U-Net only."). A user who trained it on
    purpose (the walkthrough's tiny LoRA moved it 0.0014) is told the threshold that keeps it, and that
    threshold does keep it."""
    import re
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    from sdadapt.formats import load_lora
    from sdadapt.loratools.extract import extract_lora

    monkeypatch.setattr(sys, "path", [str(Path(__file__).parent), *sys.path])
    from tiny_checkpoints import tiny_sd1_file

    base = tiny_sd1_file(tmp_path / "base.safetensors")
    state = load_file(str(base))
    g = torch.Generator().manual_seed(0)
    te_keys = [k for k in state if k.startswith("cond_stage_model.") and "q_proj.weight" in k]
    unet_key = next(k for k in state if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_q.weight"))
    tuned = dict(state)
    tuned[unet_key] = state[unet_key] + 0.1 * torch.randn(state[unet_key].shape, generator=g)
    for key in te_keys:  # a small move: 0.002 at most
        tuned[key] = state[key] + (0.002 * torch.rand(state[key].shape, generator=g))
    largest = max(float((tuned[k] - state[k]).abs().max()) for k in te_keys)
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    report = extract_lora(base, tmp_path / "tuned.safetensors", tmp_path / "a.safetensors", rank=2)
    reasons = {reason for reason in report.skipped.values() if reason.startswith("text encoder unchanged")}
    assert len(reasons) == 1, report.skipped
    suggested = float(re.search(r"--min-diff ([0-9.e+-]+) keeps it", reasons.pop()).group(1))
    assert suggested < largest <= 0.01 and suggested > 0.9 * largest
    extract_lora(base, tmp_path / "tuned.safetensors", tmp_path / "b.safetensors", rank=2, min_diff=suggested)
    components, _ = load_lora(tmp_path / "b.safetensors")
    assert "text_encoder" in components and len(components["text_encoder"]) == 3 * len(te_keys)
