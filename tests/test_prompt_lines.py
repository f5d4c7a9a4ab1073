"""``generate --prompts-file``: A1111's "Prompts from file or textbox" script (``scripts/prompts_from_file.py``),
and the models it keeps loaded between lines (``sdadapt.jobs.loaded_models``)."""

from __future__ import annotations

import shlex

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sdadapt
from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.jobs.generate_prompt_lines import (
    PROMPT_LINE_OPTIONS,
    line_settings,
    parse_prompt_line,
    prompt_lines,
    read_prompts_file,
    run_prompt_lines,
)
from sdadapt.jobs.loaded_models import LoadedModels, system_copy


def _a1111_cmdargs(line):
    """A1111 1.10's ``cmdargs`` transcribed (its ``assert``s as ValueError; ``sampler_name`` kept as written)."""
    def boolean(tag):
        return True if (tag == "true") else False  # noqa: SIM210 - A1111's line

    tags = {key: (boolean if read is not int and read is not float and read is not str else read)
            for key, read in PROMPT_LINE_OPTIONS.items()}
    args = shlex.split(line)
    pos = 0
    res = {}
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            raise ValueError(arg)
        if not pos + 1 < len(args):
            raise ValueError(arg)
        tag = arg[2:]
        if tag == "prompt" or tag == "negative_prompt":
            pos += 1
            prompt = args[pos]
            pos += 1
            while pos < len(args) and not args[pos].startswith("--"):
                prompt += " "
                prompt += args[pos]
                pos += 1
            res[tag] = prompt
            continue
        func = tags.get(tag, None)
        if not func:
            raise ValueError(arg)
        val = args[pos + 1]
        res[tag] = func(val)
        pos += 2
    return res


_WORDS = st.sampled_from(["--prompt", "--negative_prompt", "--steps", "--seed", "--cfg_scale", "--tiling",
                          "--width", "--n_iter", "--styles", "--bogus", "--", "a", "cat", "'a cat'", '"on, a mat"',
                          "12", "-3", "7.5", "true", "True", "x--y", "'open"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=9))
def test_a_line_reads_as_a1111s_cmdargs_reads_it_or_fails_where_it_fails(words):
    line = " ".join(words)
    try:
        expected = _a1111_cmdargs(line)
    except ValueError:
        with pytest.raises(ValueError):
            parse_prompt_line(line)
        return
    assert parse_prompt_line(line) == expected


def test_a_prompt_takes_the_words_up_to_the_next_option_and_booleans_are_a1111s():
    assert parse_prompt_line('--prompt "a cat" on a mat --steps 20 --negative_prompt ugly, blurry --tiling True') \
        == {"prompt": "a cat on a mat", "steps": 20, "negative_prompt": "ugly, blurry", "tiling": False}
    assert parse_prompt_line("--tiling true --cfg_scale 7") == {"tiling": True, "cfg_scale": 7.0}
    with pytest.raises(ValueError, match="unknown commandline option: --enable_hr"):
        parse_prompt_line("--enable_hr true")
    with pytest.raises(ValueError, match="missing argument"):
        parse_prompt_line("--steps")


def test_the_lines_of_a_file_empty_ones_dropped_and_a_line_not_read_is_its_prompt(tmp_path):
    said = []
    text = "  a red circle  \n\n\t\n--steps 3 --prompt a cube\na cat -- odd\n--steps x\n"
    lines = prompt_lines(text, log=said.append)
    assert [(line.number, dict(line.options)) for line in lines] == [
        (1, {"prompt": "a red circle"}), (4, {"steps": 3, "prompt": "a cube"}), (5, {"prompt": "a cat -- odd"}),
        (6, {"prompt": "--steps x"})]
    assert len(said) == 2 and said[0].startswith("warning: line 5: not read as options")
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffune pomme\n--steps x\n".encode())
    said.clear()
    assert read_prompts_file(path, log=said.append)[0].options == {"prompt": "une pomme"}
    assert said[0].startswith(f"warning: {path}:2: not read as options")
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(InputError, match=r"not UTF-8 text \(byte 3 is 0xe9\)"):
        read_prompts_file(path)
    path.write_text("\n  \n")
    with pytest.raises(InputError, match="no prompts in it"):
        read_prompts_file(path)
    with pytest.raises(InputError, match="no such file"):
        read_prompts_file(tmp_path / "nowhere.txt")


def test_a_lines_settings_over_the_runs():
    given_ = {"prompt": "on grass", "negative": "", "count": 3, "out": "o/x.png", "model": "toy",
              "seed_resize_from": (64, 48), "noise": "a1111"}
    assert line_settings({"prompt": "a cat", "negative_prompt": "ugly"}, given_) == {"prompt": "a cat on grass",
                                                                                     "negative": "ugly"}
    assert line_settings({"prompt": "a cat"}, given_, insert="end") == {"prompt": "on grass a cat"}
    assert line_settings({"prompt": "a cat"}, {**given_, "prompt": ""}) == {"prompt": "a cat"}
    # a line's empty prompt is set as it is (prompts_from_file.py: setattr(copy_p, k, v), joined only when both are
    # non-empty): the run's "on grass" was kept before
    assert line_settings({"prompt": "", "negative_prompt": ""}, {**given_, "negative": "ugly"}) == {
        "prompt": "", "negative": ""}
    # (A1111: batch_size x n_iter images, the run's n_iter where the line gives none)
    assert line_settings({"batch_size": 2}, given_) == {"count": 6}
    assert line_settings({"n_iter": 2}, given_) == {"count": 2}
    assert line_settings({"seed_resize_from_w": 96}, given_) == {"seed_resize_from": (64, 96)}
    assert line_settings({"seed_resize_from_h": 0}, given_) == {"seed_resize_from": None}
    assert line_settings({"cfg_scale": 4.5, "sampler_name": "DPM++ 2M Karras", "steps": 9, "tiling": True,
                          "outpath_samples": "elsewhere", "do_not_save_grid": True, "prompt_for_display": "x"},
                         given_) == {"guidance": 4.5, "sampler": "DPM++ 2M Karras", "steps": 9, "tiling": True,
                                     "out": "elsewhere/x.png"}
    said = []
    assert line_settings({"sampler_index": 3}, given_, log=said.append) == {} and "does nothing" in said[0]
    for options, message in (({"restore_faces": True}, "face restoration"), ({"styles": "x"}, "styles.csv"),
                             ({"do_not_save_samples": True}, "not written"), ({"sampler_name": "bogus"}, "bogus"),
                             ({"steps": 0}, "1 or more")):
        with pytest.raises(ValueError, match=message):
            line_settings(options, given_)
    assert line_settings({"restore_faces": False, "do_not_save_samples": False}, given_) == {}
    with pytest.raises(ValueError, match="--noise a1111"):
        line_settings({"subseed_strength": 0.5}, {**given_, "noise": None})


def test_a_lines_checkpoint_is_found_as_a1111_finds_it(tmp_path):
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    for name in ("base.safetensors", "sub/anime_v2.safetensors", "anime_v2_pruned.ckpt", "notes.txt"):
        (folder / name).write_bytes(b"")
    model = str(folder / "base.safetensors")
    found = {name: line_settings({"sd_model": name}, {"model": model, "out": "x.png"})["model"]
             for name in ("sub/anime_v2.safetensors", "anime_v2", "anime", "anime_v2 [1a2b3c4d5e]", "pruned")}
    assert found == {"sub/anime_v2.safetensors": str(folder / "sub/anime_v2.safetensors"),
                     "anime_v2": str(folder / "sub/anime_v2.safetensors"),  # (the stem)
                     "anime": str(folder / "anime_v2_pruned.ckpt"),  # (the shortest path containing it)
                     "anime_v2 [1a2b3c4d5e]": str(folder / "sub/anime_v2.safetensors"),
                     "pruned": str(folder / "anime_v2_pruned.ckpt")}
    with pytest.raises(ValueError, match="Unknown checkpoint"):
        line_settings({"sd_model": "notes"}, {"model": model, "out": "x.png"})


def test_a_copy_of_a_system_is_equal_and_shares_nothing():
    from sdadapt.jobs.models import load_system

    system = load_system("toy")
    copied = system_copy(system, "cpu")
    before = {key: value.clone() for key, value in system.state_dict().items()}
    assert copied.state_dict().keys() == before.keys()
    assert all(torch.equal(copied.state_dict()[key], value) for key, value in before.items())
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(system.state_dict()[key], value) for key, value in before.items())
    assert copied.tokenizer is not system.tokenizer
    kept = LoadedModels()
    first, second = kept.load("toy"), kept.load("toy")
    assert first is not second
    with torch.no_grad():
        next(first.parameters()).mul_(0.0)
    third = kept.load("toy")
    assert all(torch.equal(third.state_dict()[key], value) for key, value in before.items())


def test_at_most_keep_models_are_kept_the_one_used_longest_ago_dropped(monkeypatch):
    from sdadapt.jobs import loaded_models

    loads = []
    real = loaded_models.load_system
    monkeypatch.setattr(loaded_models, "load_system", lambda model, **k: loads.append(model) or real("toy", **k))
    kept = LoadedModels(keep=2)
    for model in ("a", "b", "a", "c", "a", "b"):  # (c drops b, used longest ago; b comes back by a load)
        kept.load(model)
    assert loads == ["a", "b", "c", "b"]
    with pytest.raises(ValueError, match="keep must be 1 or more"):
        LoadedModels(keep=0)


def _png_bytes(path):
    return path.read_bytes()


def test_every_line_makes_the_image_its_own_run_makes_on_the_toy(tmp_path):
    base = ["generate", "--model", "toy", "--steps", "3", "--seed", "5", "-q"]
    (tmp_path / "p.txt").write_text('a red circle\n--prompt a blue square --steps 2 --seed 9 --n_iter 2\n'
                                    '--cfg_scale 3 --sampler_name "Euler a" --tiling true\n')
    assert main([*base, "--prompt", "on the left", "--prompts-file", str(tmp_path / "p.txt"),
                 "-o", str(tmp_path / "o.png")]) == 0
    alone = [("a red circle on the left", []), ("a blue square on the left", ["--steps", "2", "--seed", "9",
                                                                               "--count", "2"]),
             ("on the left", ["--guidance", "3", "--sampler", "Euler a", "--tiling"])]
    for k, (prompt, extra) in enumerate(alone):
        assert main([*base, "--prompt", prompt, *extra, "-o", str(tmp_path / f"alone{k}.png")]) == 0
    assert _png_bytes(tmp_path / "o-00.png") == _png_bytes(tmp_path / "alone0.png")
    assert _png_bytes(tmp_path / "o-01-00.png") == _png_bytes(tmp_path / "alone1-00.png")
    assert _png_bytes(tmp_path / "o-01-01.png") == _png_bytes(tmp_path / "alone1-01.png")
    assert _png_bytes(tmp_path / "o-02.png") == _png_bytes(tmp_path / "alone2.png")


def _seeds(paths):
    import re

    from PIL import Image

    return [int(re.search(r"Seed: (\d+)", Image.open(path).info["parameters"]).group(1)) for path in paths]


def test_seeds_iterate_by_the_runs_count_or_are_drawn_once_for_all_lines(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n--seed 100 --prompt a ring\na cross\n")
    base = ["generate", "--model", "toy", "--steps", "1", "--prompts-file", str(tmp_path / "p.txt")]
    assert main([*base, "--seed", "40", "--count", "2", "--prompts-file-iterate-seed", "-q",
                 "-o", str(tmp_path / "it.png")]) == 0
    files = [tmp_path / f"it-{k:02d}-{i:02d}.png" for k in range(4) for i in range(2)]
    assert _seeds(files) == [40, 41, 42, 43, 100, 101, 46, 47]  # (the run's seed moves past the line's own too)
    assert main([*base, "--seed", "-1", "--prompts-file-same-seed", "-o", str(tmp_path / "same.png")]) == 0
    drawn = _seeds([tmp_path / f"same-{k:02d}.png" for k in (0, 1, 3)])
    assert len(set(drawn)) == 1 and f"drew {drawn[0]} for every line" in capsys.readouterr().err
    assert main([*base, "--seed", "7", "-q", "-o", str(tmp_path / "fixed.png")]) == 0
    assert _seeds([tmp_path / f"fixed-{k:02d}.png" for k in range(4)]) == [7, 7, 100, 7]


def test_a_bad_line_or_an_existing_output_stops_the_run_before_anything_is_written(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n\n--prompt a ring --restore_faces true\n")
    base = ["generate", "--model", "toy", "--steps", "1", "--prompts-file", str(prompts), "-o", str(tmp_path / "o.png")]
    assert main(base) == 2
    assert f"{prompts}:3: --restore_faces true: face restoration" in capsys.readouterr().err
    assert not list(tmp_path.glob("o*.png"))
    prompts.write_text("a red circle\na ring\n")
    (tmp_path / "o-01.png").write_bytes(b"mine")
    assert main(base) == 8
    assert "o-01.png: already exists (line 2" in capsys.readouterr().err
    assert not (tmp_path / "o-00.png").exists() and (tmp_path / "o-01.png").read_bytes() == b"mine"
    with pytest.raises(SystemExit) as exited:  # (a usage error: argparse's exit 2)
        main(["generate", "--prompt", "x", "--prompts-file-insert", "end", "-o", str(tmp_path / "x.png")])
    assert exited.value.code == 2 and "only applies with --prompts-file FILE" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not with --loopback"):
        run_prompt_lines(prompt_lines("a"), prompt="", out=str(tmp_path / "x.png"), loopback=2)
    with pytest.raises(ValueError, match="'start' or 'end'"):
        run_prompt_lines(prompt_lines("a"), prompt="", out=str(tmp_path / "x.png"), insert="middle")


def test_an_error_in_a_lines_run_names_the_line(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\n--prompt a ring --width 33\n")
    assert main(["generate", "--model", "toy", "--steps", "1", "--prompts-file", str(tmp_path / "p.txt"), "-q",
                 "-o", str(tmp_path / "o.png")]) != 0
    assert f"{tmp_path / 'p.txt'}:2: " in capsys.readouterr().err


pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from test_sdxl_refiner_handoff_reference import pair, pair_files  # noqa: F401 - the tiny SDXL pair's fixtures


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline
    from test_generate_hypernetwork import _random_hypernetwork

    from sdadapt.formats.files import write_safetensors

    root = tmp_path_factory.mktemp("lines")
    pipe = _tiny_pipeline(root / "pipe")
    from tiny_lora import tiny_lora_state

    (root / "loras").mkdir()
    write_safetensors(root / "loras" / "ink.safetensors", tiny_lora_state(0), {})
    (root / "hn").mkdir()
    sdadapt.save_hypernetwork(root / "hn" / "style.pt", _random_hypernetwork([32, 64], seed=0))
    (root / "emb").mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    sdadapt.save_embedding(root / "emb" / "mystyle.safetensors",
                           sdadapt.Embedding("mystyle", {"text_encoder": vectors}))
    return pipe, root


def test_a_lines_loras_embeddings_and_hypernetworks_never_reach_the_next_line(sd, tmp_path):
    """Each line runs on a copy of the model as loaded: the lines after one with a LoRA tag, an embedding and a
    hypernetwork make the images their own runs make (and that line the image its own run makes)."""
    pipe, root = sd
    base = ["generate", "--model", str(pipe), "--seed", "1", "--steps", "2", "--sampler", "euler", "--width", "32",
            "--height", "32", "--lora-dir", str(root / "loras"), "--hypernetwork-dir", str(root / "hn"),
            "--embeddings-dir", str(root / "emb"), "-q"]
    lines = ["a mystyle cat", "a mystyle cat <lora:ink:0.8> <hypernet:style:0.5>", "a mystyle cat", "a dog"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    assert main([*base, "--prompt", "", "--prompts-file", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o.png")]) == 0
    for k, prompt in enumerate(lines):
        assert main([*base, "--prompt", prompt, "-o", str(tmp_path / f"alone{k}.png")]) == 0
        assert _png_bytes(tmp_path / f"o-{k:02d}.png") == _png_bytes(tmp_path / f"alone{k}.png"), k
    assert _png_bytes(tmp_path / "o-01.png") != _png_bytes(tmp_path / "o-00.png")  # (the tags did change line 2)


def test_the_model_is_loaded_once_for_all_lines(sd, tmp_path, monkeypatch):
    from sdadapt.jobs import loaded_models

    loads = []
    real = loaded_models.load_system
    monkeypatch.setattr(loaded_models, "load_system", lambda *a, **k: loads.append(a) or real(*a, **k))
    (tmp_path / "p.txt").write_text("a cat\na dog\n--prompt a bird --steps 1\n")
    assert main(["generate", "--model", str(sd[0]), "--steps", "2", "--sampler", "euler", "--width", "32", "--height",
                 "32", "--prompt", "", "--prompts-file", str(tmp_path / "p.txt"), "-q",
                 "-o", str(tmp_path / "o.png")]) == 0
    assert len(loads) == 1 and len(list(tmp_path.glob("o-*.png"))) == 3


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("prompts.md", "prompt_lines(")


def test_an_sdxl_base_and_its_refiner_are_kept_and_every_line_is_its_own_run(tmp_path, monkeypatch,
                                                                             pair_files):  # noqa: F811 - fixture
    """SDXL (two text encoders, the refiner's aesthetic conditioning): both models loaded once, each line on copies
    of both, the image its own run makes."""
    from sdadapt.jobs import loaded_models

    base_file, refiner_file = pair_files

    loads = []
    real = loaded_models.load_system
    monkeypatch.setattr(loaded_models, "load_system", lambda model, **k: loads.append(model) or real(model, **k))
    base = ["generate", "--model", str(base_file), "--refiner", str(refiner_file), "--refiner-switch-at", "0.5",
            "--steps", "2", "--sampler", "euler", "--width", "16", "--height", "16", "--seed", "3", "--device", "cpu",
            "-q"]
    (tmp_path / "p.txt").write_text("a photo\n--prompt a red photo --seed 5\n")
    assert main([*base, "--prompt", "", "--prompts-file", str(tmp_path / "p.txt"), "-o", str(tmp_path / "o.png")]) == 0
    assert sorted(loads) == sorted([str(base_file), str(refiner_file)])
    for k, extra in enumerate([["--prompt", "a photo"], ["--prompt", "a red photo", "--seed", "5"]]):
        assert main([*base, *extra, "-o", str(tmp_path / f"own{k}.png")]) == 0
        assert (tmp_path / f"o-{k:02d}.png").read_bytes() == (tmp_path / f"own{k}.png").read_bytes(), k
