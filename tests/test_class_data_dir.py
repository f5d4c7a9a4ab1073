"""``train ... --class-data-dir DIR``: DreamBooth's class images kept in a folder (diffusers' ``--class_data_dir``).

The reference: huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951,
examples/dreambooth/train_dreambooth.py:858-904 (count the folder's images, make the missing
``num_class_images - cur_class_images``, save each as ``{index + cur_class_images}-{sha1}.jpg``) and :647-655 (train on
the first ``num_class_images``). sdadapt writes PNGs and rounds the in-memory class images to the same 8-bit pixels,
so a run with the folder — empty, half full or full — trains bit for bit as one without it
(:mod:`sdadapt.training.class_folder`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.images import read_image, read_image_channels, read_png_text, to_uint8, write_png
from sdadapt.training.class_folder import PROMPT_KEY, as_saved, class_image_files, fill_class_folder, read_class_folder

_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"]


@pytest.fixture
def few_steps(monkeypatch):
    """The runs' class images drawn with 3 sampling steps instead of 25 (with and without the folder alike)."""
    from sdadapt.methods import class_images

    monkeypatch.setitem(class_images.__wrapped__.__kwdefaults__, "steps", 3)


@pytest.fixture(scope="module")
def toy():
    from sdadapt.toy import load_toy

    return load_toy()


class _Counting:
    """The toy's sampler, recording each call's (seed, prompts); ``fail_at``: the call that raises (an interrupted run)."""

    def __init__(self, toy, *, fail_at: int | None = None):
        self.toy, self.calls, self.fail_at = toy, [], fail_at

    def sample(self, prompts, *, seed=0, steps=25):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt("stopped while making class images (the test)")
        self.calls.append((seed, list(prompts)))
        return self.toy.sample(prompts, seed=seed, steps=steps)


def _names(folder: Path) -> list[str]:
    return [p.name for p in class_image_files(folder)]


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_as_saved_is_bit_for_bit_the_png_read_back(tmp_path_factory, h, w, n, seed):
    """The in-memory class images are rounded exactly as writing a PNG and reading it back rounds them (values
    outside [-1, 1] and exact half steps included), and stay within half an 8-bit step of the drawn ones."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, h, w, generator=g) * 2.4 - 1.2
    images[..., 0, 0] = (torch.randint(0, 255, (n, 3), generator=g) + 0.5) / 127.5 - 1  # (k + ½)/255 steps: ties
    folder = tmp_path_factory.mktemp("png")
    back = torch.stack([read_image(write_png(folder / f"{i}.png", image)) for i, image in enumerate(images)])
    saved = as_saved(images)
    assert saved.dtype == back.dtype == torch.float32 and saved.shape == images.shape
    assert torch.equal(saved, back)
    assert (saved - images.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6


def test_png_text_round_trips_through_ours_and_pil(tmp_path):
    prompt = "a photo of a 狗, ünïcode\nand a second line"
    path = write_png(tmp_path / "a.png", torch.zeros(3, 4, 5), text={PROMPT_KEY: prompt, "other": "x"})
    assert read_png_text(path) == {PROMPT_KEY: prompt, "other": "x"}
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(path) as im:
        assert im.text == {PROMPT_KEY: prompt, "other": "x"}
        saved = tmp_path / "pil.png"
        im.save(saved, pnginfo=_pnginfo({"k": "Latin-1 tEXt é"}))
    assert read_png_text(saved) == {"k": "Latin-1 tEXt é"}
    assert read_png_text(write_png(tmp_path / "plain.png", torch.zeros(3, 2, 2))) == {}
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8not a png")
    assert read_png_text(tmp_path / "x.jpg") == {}
    with pytest.raises(ValueError, match="keyword"):
        write_png(tmp_path / "b.png", torch.zeros(3, 2, 2), text={"": "x"})


def _pnginfo(text: dict[str, str]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def test_a_folder_is_filled_topped_up_and_resumed_with_the_images_an_empty_one_gets(toy, tmp_path):
    """Five prompts in chunks of 2: an empty folder gets image i of class_images (names diffusers' {i}-{sha1}, the
    prompt in the file); a folder of 3 gets images 3 and 4 of the same five (the chunk holding image 3 made whole,
    image 2 made again and dropped: each image written is the one the in-memory path makes there); a fill stopped in
    its second chunk keeps the first and the next run ends with the empty folder's files; a full folder makes none."""
    from sdadapt.methods import class_images

    want, _ = class_images(toy, _PROMPTS, seed=7, steps=2, batch=2)
    fresh = _Counting(toy)
    assert fill_class_folder(fresh, tmp_path / "fresh", _PROMPTS, seed=7, steps=2, batch=2) == 5
    names = _names(tmp_path / "fresh")
    assert [n.split("-")[0] for n in names] == ["0", "1", "2", "3", "4"]
    assert fresh.calls == [(7, _PROMPTS[:2]), (9, _PROMPTS[2:4]), (11, _PROMPTS[4:])]
    for i, name in enumerate(names):
        pixels = read_image_channels(tmp_path / "fresh" / name)[..., :3]
        assert np.array_equal(pixels, to_uint8(want[i]))
        assert name == f"{i}-{hashlib.sha1(pixels.tobytes()).hexdigest()}.png"
        assert read_png_text(tmp_path / "fresh" / name) == {PROMPT_KEY: _PROMPTS[i]}
    # half full: 3 there (a run with 3: its image 2 came from a chunk of 1), topped up to 5 — images 3 and 4 the
    # empty folder's, the others kept
    assert fill_class_folder(_Counting(toy), tmp_path / "half", _PROMPTS[:3], seed=7, steps=2, batch=2) == 3
    short = _names(tmp_path / "half")
    assert short[:2] == names[:2]
    top = _Counting(toy)
    seen = []
    assert fill_class_folder(top, tmp_path / "half", _PROMPTS, seed=7, steps=2, batch=2,
                             progress=lambda done, total, info: seen.append((done, total))) == 2
    assert top.calls == [(9, _PROMPTS[2:4]), (11, _PROMPTS[4:])] and seen == [(2, 3), (3, 3)]
    assert _names(tmp_path / "half") == [*short, *names[3:]]
    # stopped in its second chunk: the first chunk's files are there (no temporary files); the next run goes on
    with pytest.raises(KeyboardInterrupt):
        fill_class_folder(_Counting(toy, fail_at=1), tmp_path / "stopped", _PROMPTS, seed=7, steps=2, batch=2)
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == names[:2]
    again = _Counting(toy)
    assert fill_class_folder(again, tmp_path / "stopped", _PROMPTS, seed=7, steps=2, batch=2) == 3
    assert again.calls[0] == (9, _PROMPTS[2:4]) and _names(tmp_path / "stopped") == names
    # full (or fuller): nothing made, the system not even asked
    assert fill_class_folder(None, tmp_path / "fresh", _PROMPTS[:4], seed=7, steps=2, batch=2) == 0
    with pytest.raises(InputError, match="is a file"):
        fill_class_folder(None, tmp_path / "fresh" / names[0], _PROMPTS, seed=7)
    # a removed image (the folder's others kept): made again under its own index, not written over image 4
    gap = tmp_path / "gap"
    gap.mkdir()
    for name in names:
        (gap / name).write_bytes((tmp_path / "fresh" / name).read_bytes())
    (gap / names[1]).unlink()
    assert fill_class_folder(_Counting(toy), gap, _PROMPTS, seed=7, steps=2, batch=2) == 1
    assert _names(gap) == names


def test_the_folder_is_read_in_index_order_with_its_prompts_and_one_size(tmp_path):
    folder = tmp_path / "reg"
    g = torch.Generator().manual_seed(0)
    pictures = {}
    for name, prompt in [("10-b.png", "a dog"), ("9-a.png", "a dog"), ("2-c.png", None), ("own.png", None),
                         ("1x.png", "a dog")]:
        pictures[name] = torch.rand(3, 6, 4, generator=g) * 2 - 1
        write_png(folder / name, pictures[name], text={PROMPT_KEY: prompt} if prompt else None)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".10-b.png.123-abcdef.tmp").write_bytes(b"a killed writer's temporary file")
    order = ["2-c.png", "9-a.png", "10-b.png", "1x.png", "own.png"]  # (10 after 9; unindexed ones by name, last)
    assert _names(folder) == order
    images, captions = read_class_folder(folder, count=4, class_prompt="a dog", size=(6, 4))
    assert captions == ["a dog"] * 4
    assert torch.equal(images, torch.stack([read_image(folder / n) for n in order[:4]]))
    with pytest.raises(InputError, match=r"holds 5 class image\(s\), 6 wanted"):
        read_class_folder(folder, count=6, class_prompt="a dog")
    with pytest.raises(InputError, match=r"9-a.png was made for the class prompt 'a dog', not 'a cat'"):
        read_class_folder(folder, count=2, class_prompt="a cat")
    with pytest.raises(InputError, match=r"2-c.png records no prompt .* give --class-prompt"):
        read_class_folder(folder, count=1, class_prompt=None)
    with pytest.raises(InputError, match=r"2-c.png is 4x6 \(width x height\), the class images here are 8x8"):
        read_class_folder(folder, count=1, class_prompt="a dog", size=(8, 8))
    write_png(folder / "11-d.png", torch.zeros(3, 5, 4), text={PROMPT_KEY: "a dog"})
    with pytest.raises(InputError, match=r"11-d.png is 4x5 .* here are 4x6"):  # (no size given: all as the first)
        read_class_folder(folder, count=4, class_prompt="a dog")


def _instances(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        write_png(folder / f"img{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
        (folder / f"img{i}.txt").write_text("a red circle")
    return folder


def _same_file(a: Path, b: Path) -> bool:
    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_dreambooth_with_a_class_folder_trains_as_without_it_and_the_next_run_makes_none(tmp_path, monkeypatch, capsys,
                                                                                           few_steps):
    """`train dreambooth --class-prompt`: the first run fills the folder, the second makes nothing, a run without the
    folder and a run whose folder lost two images (topped up) train bit for bit the same weights."""
    from sdadapt.toy.system import ToySystem

    made: list[int] = []
    real_sample = ToySystem.sample

    def counting(self, prompts, **kwargs):  # (the runs sample only their class images)
        made.append(len(prompts))
        return real_sample(self, prompts, **kwargs)

    monkeypatch.setattr(ToySystem, "sample", counting)
    images, reg = _instances(tmp_path / "imgs"), tmp_path / "reg"
    args = ["train", "dreambooth", "--model", "toy", "--images", str(images), "--steps", "1", "--class-images", "3",
            "--class-prompt", "a red circle", "--seed", "5", "--learning-rate", "1e-3"]
    assert main([*args, "--class-data-dir", str(reg), "-o", str(tmp_path / "a.safetensors")]) == 0
    assert "3 class image(s) generated into it (0 there, 3 wanted)" in capsys.readouterr().err and sum(made) == 3
    names = _names(reg)
    assert [n.split("-")[0] for n in names] == ["0", "1", "2"]
    made.clear()
    assert main([*args, "--class-data-dir", str(reg), "-o", str(tmp_path / "b.safetensors")]) == 0
    assert "3 class image(s) read, none generated" in capsys.readouterr().err and made == []
    assert _same_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert main([*args, "-o", str(tmp_path / "c.safetensors")]) == 0  # in memory
    assert _same_file(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    for name in names[1:]:
        (reg / name).unlink()
    made.clear()
    assert main([*args, "--class-data-dir", str(reg), "-o", str(tmp_path / "d.safetensors")]) == 0
    assert "2 class image(s) generated into it (1 there, 3 wanted)" in capsys.readouterr().err
    assert _names(reg) == names and _same_file(tmp_path / "a.safetensors", tmp_path / "d.safetensors")
    # another class prompt on this folder: refused, naming the file and both prompts
    assert main([*args, "--class-prompt", "a blue square", "--class-data-dir", str(reg),  # (the last --class-prompt wins)
                 "-o", str(tmp_path / "e.safetensors")]) == 2
    assert f"{names[0]} was made for the class prompt 'a red circle', not 'a blue square'" in capsys.readouterr().err


def test_lora_with_the_toys_own_class_prompts_records_them_and_resumes(tmp_path, capsys, few_steps):
    """A LoRA on the toy without --class-prompt: each class image records its own drawn prompt (the caption it
    trains on), the run equals the in-memory one; resumed from its state it reads the folder and ends the same;
    resuming without the folder, or with another, is refused."""
    images, reg = _instances(tmp_path / "imgs"), tmp_path / "reg"
    args = ["train", "lora", "--model", "toy", "--images", str(images), "--steps", "2", "--class-images", "3",
            "--seed", "2", "--network-dim", "2", "--batch-size", "1"]
    assert main([*args, "--class-data-dir", str(reg), "--save-every-n-steps", "1", "-o", str(tmp_path / "a.safetensors")]) == 0
    capsys.readouterr()
    from sdadapt.toy.system import ToySystem

    assert [read_png_text(reg / n)[PROMPT_KEY] for n in _names(reg)] == ToySystem.class_prompts(3, seed=2)
    assert main([*args, "-o", str(tmp_path / "b.safetensors")]) == 0
    assert _same_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    state = tmp_path / "a-state"
    record = json.loads((state / "run.json").read_text())
    assert record["prior"]["class_data_dir"] == str(reg.resolve())
    assert main([*args, "--class-data-dir", str(reg), "--resume", str(state), "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "none generated" in capsys.readouterr().err
    assert _same_file(tmp_path / "a.safetensors", tmp_path / "c.safetensors")
    for extra in ([], ["--class-data-dir", str(tmp_path / "other")]):
        assert main([*args, *extra, "--resume", str(state), "-o", str(tmp_path / "d.safetensors")]) == 2
        assert "class_data_dir" in capsys.readouterr().err


@pytest.mark.parametrize("extra, match", [
    (["--reg-data-dir", "{p}/imgs"], "--reg-data-dir .* gives your own .* give one of the two"),
    (["--no-prior"], "cannot go with --no-prior"),
    (["--class-data-dir", "{p}/imgs/img0.png"], "is a file; give a folder"),
])
def test_refused_combinations(tmp_path, capsys, extra, match):
    import re

    _instances(tmp_path / "imgs")
    folder = ["--class-data-dir", str(tmp_path / "reg")] if "--class-data-dir" not in extra else []
    argv = ["train", "lora", "--model", "toy", "--images", str(tmp_path / "imgs"), "--steps", "1", *folder,
            *[e.format(p=tmp_path) for e in extra], "-o", str(tmp_path / "x.safetensors")]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err.strip().splitlines()[-1])
    assert not (tmp_path / "reg").exists()


def test_a_user_model_needs_a_class_prompt_with_a_class_folder():
    from sdadapt.jobs import prior_images
    from sdadapt.methods import METHODS

    class NotToy:  # a system without class prompts of its own
        pass

    with pytest.raises(ValueError, match="--class-prompt"):
        prior_images(NotToy(), METHODS["lora"], count=2, class_data_dir="anywhere")


def test_a_diffusers_model_makes_them_at_the_training_resolution_and_refuses_another(tmp_path, capsys, few_steps):
    """A tiny Stable Diffusion folder (its sampler takes height / width): the class images are made at the run's
    resolution, the run equals the in-memory one, and a run at another resolution on the same folder is refused
    (naming the file and both sizes) before training."""
    pytest.importorskip("diffusers")
    from test_cli_train import _images, _tiny_pipeline

    pipe = _tiny_pipeline(tmp_path / "pipe")
    images, reg = _images(tmp_path / "imgs", n=2, size=24), tmp_path / "reg"
    args = ["train", "lora", "--model", str(pipe), "--images", str(images), "--steps", "1", "--class-prompt", "a photo",
            "--class-images", "2", "--network-dim", "2", "--resolution", "24", "--no-enable-bucket", "-q"]
    assert main([*args, "--class-data-dir", str(reg), "-o", str(tmp_path / "a.safetensors")]) == 0
    names = _names(reg)
    assert len(names) == 2 and all(read_image_channels(reg / n).shape == (24, 24, 4) for n in names)
    assert main([*args, "-o", str(tmp_path / "b.safetensors")]) == 0
    assert _same_file(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    capsys.readouterr()
    assert main([*args[:-4], "--resolution", "32", "--class-data-dir", str(reg), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert f"{names[0]} is 24x24 (width x height), the class images here are 32x32" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()
