"""A first-time A1111 / kohya user's audit of the command line (brief U): each test fails on the behaviour found
before its fix (or is a strict xfail naming the bigger fix still to make)."""

from __future__ import annotations

import json

import pytest
import torch
from train_inputs import captioned_pngs

from png_pixels import pixels as _pixels
from sdadapt.cli import main


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD1 single-file checkpoint (random weights), made once for the tests that share it."""
    from tiny_checkpoints import tiny_sd1_file

    return tiny_sd1_file(tmp_path_factory.mktemp("sd1") / "sd1.safetensors")


def _images(folder):
    return captioned_pngs(folder, [(32, 32)] * 2, caption=["a photo 0", "a photo 1"])


# ------------------------------------------------------------------ kohya's --save_state on the command line
def test_save_state_given_on_the_command_line_saves_the_state_after_the_last_step(tmp_path, capsys):
    """kohya's train_network.py saves the state at the end with ``args.save_state or args.save_state_on_train_end``;
    ``--save-state`` without periodic saves wrote no state at all (the TOML key already did as kohya)."""
    images = _images(tmp_path / "imgs")
    out = tmp_path / "a.safetensors"
    # (--no-prior: sampling class images for each run was most of this test's time; the state saving is the same)
    assert main(["train", "lora", "--images", str(images), "--steps", "1", "--save-state", "--no-prior", "-q",
                 "-o", str(out)]) == 0
    assert json.loads((tmp_path / "a-state" / "run.json").read_text())["step"] == 1
    assert main(["train", "lora", "--images", str(images), "--resume", str(tmp_path / "a-state"), "--steps", "2",
                 "--no-prior", "-q", "-o", str(tmp_path / "b.safetensors")]) == 0, capsys.readouterr().err
    assert "(resumed at step 1)" in capsys.readouterr().out
    # --no-save-state-on-train-end still wins
    assert main(["train", "lora", "--images", str(images), "--steps", "1", "--save-state", "--no-save-state-on-train-end",
                 "--no-prior", "-q", "-o", str(tmp_path / "d.safetensors")]) == 0
    assert not (tmp_path / "d-state").exists()


# ------------------------------------------------------------------ an embedding whose file name is a vocabulary piece
def test_an_embedding_named_like_a_vocabulary_token_is_used_as_a1111_does(tmp_path, capsys, sd1):
    """``ti.safetensors`` was refused ("does not fit this model ... the tokenizer already has the token(s) ['ti']"): the
    widths agreed, the name was the problem. A1111 matches the name's token ids in the prompt."""
    import sdadapt

    sdadapt.save_embedding(tmp_path / "ti.safetensors", sdadapt.Embedding("ti", {"text_encoder": torch.randn(1, 64)}))
    code = main(["generate", "--model", str(sd1), "--embedding", str(tmp_path / "ti.safetensors"), "--prompt", "ti",
                 "--width", "32", "--height", "32", "--steps", "1", "-q", "-o", str(tmp_path / "a.png")])
    assert code == 0, capsys.readouterr().err


def test_two_embeddings_of_one_name_are_named_as_such_not_as_a_misfit(tmp_path, capsys, sd1):
    """The second said "does not fit this model: ... this model needs an embedding of width 64" (widths equal)."""
    import sdadapt

    (tmp_path / "other").mkdir()
    for path in (tmp_path / "ti.safetensors", tmp_path / "other" / "ti.safetensors"):
        sdadapt.save_embedding(path, sdadapt.Embedding("ti", {"text_encoder": torch.randn(1, 64)}))
    assert main(["generate", "--model", str(sd1), "--embedding", str(tmp_path / "ti.safetensors"), "--embedding",
                 str(tmp_path / "other" / "ti.safetensors"), "--prompt", "ti", "--steps", "1", "-q",
                 "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"--embedding {tmp_path / 'other' / 'ti.safetensors'}: another embedding named 'ti' is loaded already" in err
    assert "does not fit" not in err


@pytest.mark.parametrize("count", [1, 3])
def test_a_vocabulary_word_embedding_puts_its_vectors_where_a1111_does(sd1, count):
    """A1111 (textual_inversion.py, EmbeddingDatabase.find_embedding_at_position; sd_hijack_clip.tokenize_line)
    replaces each run of the name's token ids in the tokenized prompt by the embedding's vectors. A transcription of
    that on the token ids is compared with the encoder input sdadapt builds, row for row."""
    import sdadapt
    from sdadapt.jobs.models import load_system

    system = load_system(str(sd1))
    tokenizer, encoder = system.tokenizer, system.text_encoder
    table = encoder.get_input_embeddings()
    vectors = torch.randn(count, table.weight.shape[1], generator=torch.Generator().manual_seed(count))
    # (no word whose BPE pieces end in the name's token, "tomcat" -> tom + cat</w>: both match that piece, compared in
    # tests/test_format_leftovers.py on a tiny vocabulary that splits it so)
    prompt = "a Cat, cats and a cat-cat (cat:1.1) concatenate cat2"

    def ids_of(text):
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    # A1111's rule on the plain tokenizer: the name's ids, each occurrence replaced by the vectors
    name_ids, ids = ids_of("cat"), ids_of(prompt)
    expected, i = [], 0
    while i < len(ids):
        if ids[i : i + len(name_ids)] == name_ids:
            expected.extend(vectors)
            i += len(name_ids)
        else:
            expected.append(table.weight[ids[i]].detach())
            i += 1
    assert sum(any(torch.equal(v, w) for w in vectors) for v in expected) == 5 * count  # (5 cats)

    handle = sdadapt.inject_embedding(encoder, tokenizer, sdadapt.Embedding("cat", {"text_encoder": vectors}))
    try:
        got = table(torch.tensor(ids_of(handle.expand(prompt)))).detach()
        assert got.shape == (len(expected), vectors.shape[1])
        torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=0)
        assert handle.expand(handle.expand(prompt)) == handle.expand(prompt)  # (idempotent, as diffusers' rule)
    finally:
        handle.remove()
    assert ids_of(prompt) == ids  # (the tokenizer as it was)


# ------------------------------------------------------------------ merge-lora of a whole LoRA of another model
def test_merge_lora_of_another_models_lora_gives_the_advice_within_the_printed_line(tmp_path, capsys):
    """An SDXL LoRA (every layer too wide) baked into an SD1 file: the one error line (2000 characters at most) listed
    ten long layer names first and was cut before the advice (which model the checkpoint is)."""
    from tiny_checkpoints import tiny_sd1_file

    from sdadapt.formats import save_kohya

    base = tiny_sd1_file(tmp_path / "sd1.safetensors")
    block = "mid_block.attentions.0.transformer_blocks.0"
    layers = [f"{block}.{name}" for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                                             "attn2.to_out.0", "ff.net.2")] + ["mid_block.attentions.0.proj_in",
                                                                               "mid_block.attentions.0.proj_out"]
    layers += [layer.replace("mid_block", "down_blocks.0") for layer in layers] + [
        layer.replace("mid_block", "up_blocks.1") for layer in layers]  # (27 layers, SDXL's widths: 128)
    unet = {}
    for layer in layers:
        unet |= {f"{layer}.lora_down.weight": torch.zeros(4, 128), f"{layer}.lora_up.weight": torch.zeros(128, 4),
                 f"{layer}.alpha": torch.tensor(4.0)}
    save_kohya(tmp_path / "xl.safetensors", {"unet": unet}, base_model="sdxl")
    out = tmp_path / "m.safetensors"
    assert main(["merge-lora", str(base), str(tmp_path / "xl.safetensors"), "-q", "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert "sd1.safetensors looks like an SD1 checkpoint" in err and "do not fit the shapes" in err, err
    assert "... and " in err and not err.rstrip().endswith("…") and not out.exists()


# ------------------------------------------------------------------ a text file given for weights
@pytest.mark.parametrize("content", ["step,epoch,loss,lr\n1,1,0.1056,0.003\n", "a photo of sks, smiling\n",
                                     "pretrained_model_name_or_path = \"sd15.safetensors\"\n", "café " * 200])
def test_a_text_file_given_for_weights_is_named_a_text_file(tmp_path, capsys, content):
    """``inspect OUT-log.csv`` (or a caption, a TOML) said "not a safetensors file, or a corrupt one (its first 8 bytes
    give a 8030029377140257907-byte header ...)"."""
    path = tmp_path / "lora-log.csv"
    path.write_text(content, encoding="utf-8")
    for argv in (["inspect", str(path)], ["merge-lora", str(path), str(path), "-o", str(tmp_path / "o.safetensors")]):
        assert main(argv) == 3, argv
        err = capsys.readouterr().err
        assert f"{path}: a text file (a training log, captions, prompts or a config?), not weights" in err, err


def test_weights_and_pickles_are_never_taken_for_text(tmp_path):
    from hostile_files import kohya_lora

    from sdadapt.formats.files import write_safetensors
    from sdadapt.formats.foreign_files import foreign_content

    write_safetensors(tmp_path / "a.safetensors", kohya_lora(0), {"ss_note": "text " * 100})
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    torch.save({"a": torch.ones(2)}, tmp_path / "new.pt")
    for name in ("a.safetensors", "old.pt", "new.pt"):
        assert foreign_content(tmp_path / name) is None, name


# ------------------------------------------------------------------ a --model that is not there
@pytest.mark.parametrize("command", [["train", "lora", "--images", "IMAGES", "--steps", "1"], ["generate", "--prompt", "a"]])
def test_a_missing_model_is_a_missing_input_file(tmp_path, capsys, command):
    """``--model nope.safetensors`` exited 2 (a bad argument) where every other missing input exits 3 (WeightFileError:
    "an input file that cannot be used (missing, corrupt, wrong kind)", the exit codes in ``--help``)."""
    images = str(_images(tmp_path / "imgs"))
    argv = [images if a == "IMAGES" else a for a in command]
    model = tmp_path / "nope.safetensors"
    out = tmp_path / ("out.png" if command[0] == "generate" else "out.safetensors")
    assert main([*argv, "--model", str(model), "-q", "-o", str(out)]) == 3
    assert f"{model}: no such file or folder; --model takes 'toy'" in capsys.readouterr().err


# ------------------------------------------------------------------ a LoRA or a model given as --embedding
def test_a_lora_or_model_given_as_an_embedding_says_which_option_takes_it(tmp_path, capsys):
    """``--hypernetwork LORA`` said "use it with --lora"; ``--embedding LORA`` only listed five LoRA key names."""
    from hostile_files import kohya_lora
    from tiny_checkpoints import tiny_sd1_file

    from sdadapt.formats.files import write_safetensors

    lora = write_safetensors(tmp_path / "style.safetensors", kohya_lora(0), {})
    model = tiny_sd1_file(tmp_path / "sd15.safetensors")
    for path, words in ((lora, "(it is a kohya-lora file: use it with --lora FILE:SCALE)"),
                        (model, "(it is a model: use it as --model)")):
        assert main(["generate", "--prompt", "a", "--embedding", str(path), "-q", "-o", str(tmp_path / "a.png")]) == 3
        assert f"{path}: not a textual-inversion embedding {words}" in capsys.readouterr().err


# ------------------------------------------------------------------ the trigger word of a trained embedding
def test_textual_inversion_says_the_prompt_word_is_the_file_name(tmp_path, capsys):
    """Trained with ``--token '<sks>'``, the file is used by its name (A1111's rule, ``load_embedding``): ``generate``
    with ``<sks>`` in the prompt silently used no embedding. The run now says which word to write."""
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 2, caption="a photo of <sks>")
    out = tmp_path / "my-concept.safetensors"
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--init-word", "red",
                 "--steps", "1", "-q", "-o", str(out)]) == 0
    assert f"use:  generate --embedding {out} with 'my-concept' in the prompt" in capsys.readouterr().out


# ------------------------------------------------------------------ merge -o MODEL.ckpt
def test_merge_refuses_a_ckpt_name_for_its_safetensors_output(tmp_path, capsys):
    """``merge ... -o merged.ckpt`` wrote safetensors bytes under a .ckpt name, which A1111 (``read_state_dict``) and
    ComfyUI (``load_torch_file``) then open with torch.load, by the suffix, and fail on; merge-lora, resize-lora,
    extract-lora and convert already refused it."""
    from hostile_files import checkpoint

    from sdadapt.formats.files import write_safetensors

    a = write_safetensors(tmp_path / "a.safetensors", checkpoint(0), {"format": "pt"})
    b = write_safetensors(tmp_path / "b.safetensors", checkpoint(1), {"format": "pt"})
    for name in ("merged.ckpt", "merged"):
        assert main(["merge", "weighted-sum", str(a), str(b), "--alpha", "0.5", "-q", "-o", str(tmp_path / name)]) == 7
        assert "sdadapt writes .safetensors files only; name the output *.safetensors" in capsys.readouterr().err
        assert not (tmp_path / name).exists()


# ------------------------------------------------------------------ a dataset TOML given as --config
def test_a_kohya_dataset_toml_given_as_the_config_says_to_pass_it_as_dataset_config(tmp_path, capsys):
    """It said "unknown option 'datasets'; did you mean dataset_repeats?"."""
    images = _images(tmp_path / "imgs")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 32\n\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{images.as_posix()}"\n  num_repeats = 2\n')
    assert main(["train", "lora", "--config", str(toml), "-q", "-o", str(tmp_path / "a.safetensors")]) == 2
    assert f"pass it as --dataset-config {toml}" in capsys.readouterr().err
    assert main(["train", "lora", "--dataset-config", str(toml), "--steps", "1", "-q", "-o",
                 str(tmp_path / "a.safetensors")]) == 0  # (the advice works)


# ------------------------------------------------------------------ A1111's seed -1
def test_seed_minus_one_draws_a_random_seed_as_a1111(tmp_path, capsys):
    """``--seed -1`` was the seed -1 (the same image every run); A1111's ``get_fixed_seed`` draws
    ``random.randrange(4294967294)``. The drawn seed is printed and makes the same image again."""
    from PIL import Image

    pictures, seeds = [], []
    for name in ("a.png", "b.png"):
        assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--seed", "-1", "-q", "-o",
                     str(tmp_path / name)]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"wrote {tmp_path / name} (--seed ") and line.endswith(")"), line
        seeds.append(int(line.rpartition("--seed ")[2][:-1]))
        pictures.append(Image.open(tmp_path / name).tobytes())
    assert pictures[0] != pictures[1] and seeds[0] != seeds[1]
    assert all(0 <= seed < 4294967294 for seed in seeds)
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--seed", str(seeds[1]), "-q", "-o",
                 str(tmp_path / "again.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'again.png'}"  # (a seed given: not repeated)
    assert Image.open(tmp_path / "again.png").tobytes() == pictures[1]


def test_only_minus_one_is_drawn_as_a1111s_get_fixed_seed():
    """A1111: ``p.subseed = get_fixed_seed(p.subseed)``; only -1 is drawn (-2 is a seed), in [0, 4294967294)."""
    from sdadapt.jobs.generate_seed import fixed_seed

    assert fixed_seed(-1, draw=lambda n: n - 1) == 4294967293 and fixed_seed(-1, draw=lambda n: 0) == 0
    assert [fixed_seed(s) for s in (None, 0, -2, 7, 2**40)] == [None, 0, -2, 7, 2**40]
    assert len({fixed_seed(-1) for _ in range(20)}) > 1


def test_subseed_minus_one_is_drawn_and_printed(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "1", "--noise", "a1111", "--seed", "5",
                 "--subseed", "-1", "--subseed-strength", "0.5", "--count", "2", "-q", "-o", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    subseed = int(lines[0].rpartition("--subseed ")[2][:-1])
    assert lines == [f"wrote {tmp_path / 'v-00.png'} (--seed 5 --subseed {subseed})",
                     f"wrote {tmp_path / 'v-01.png'} (--seed 5 --subseed {subseed + 1})"]  # (A1111's all_seeds)


# ------------------------------------------------------------------ convert --to peft --component: the layers counted
def test_convert_to_peft_of_one_component_counts_the_written_layers_only(tmp_path, capsys):
    """``wrote xl_peft: peft from kohya-lora, 132 layers (unet 132; lora 156)``: the family count was the input's."""
    from sdadapt.formats import save_kohya

    def lora(width):
        return {"lora_down.weight": torch.randn(2, width), "lora_up.weight": torch.randn(width, 2), "alpha": torch.tensor(2.0)}

    unet = {f"mid_block.attentions.0.transformer_blocks.0.attn1.{n}.{k}": v
            for n in ("to_q", "to_k", "to_v") for k, v in lora(32).items()}
    text = {f"text_model.encoder.layers.0.self_attn.q_proj.{k}": v for k, v in lora(32).items()}
    save_kohya(tmp_path / "two.safetensors", {"unet": unet, "text_encoder": text}, base_model="sd1")
    assert main(["convert", str(tmp_path / "two.safetensors"), "--to", "peft", "--component", "unet", "-q",
                 "-o", str(tmp_path / "unet_peft")]) == 0, capsys.readouterr().err
    assert "3 layers (unet 3; lora 3)" in capsys.readouterr().out


# ------------------------------------------------------------------ resize-lora of a DoRA file without --base
def test_resize_of_a_dora_file_without_the_base_names_the_layer_once(tmp_path, capsys):
    """``layer text_encoder:...fc1: text_encoder:...fc1: a DoRA layer's delta ...``: the layer was named twice."""
    from sdadapt.formats import save_kohya

    layer = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    dora = {f"{layer}.lora_down.weight": torch.randn(2, 32), f"{layer}.lora_up.weight": torch.randn(32, 2),
            f"{layer}.alpha": torch.tensor(2.0), f"{layer}.dora_scale": torch.rand(1, 32) + 0.5}
    save_kohya(tmp_path / "dora.safetensors", {"unet": dora}, base_model="sd1")
    assert main(["resize-lora", str(tmp_path / "dora.safetensors"), "--rank", "1", "-q", "-o",
                 str(tmp_path / "r.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"layer unet:{layer}: a DoRA layer's delta W' - W depends on the base weight" in err, err


# ------------------------------------------------------------------ inspect FILE | head
def test_a_closed_standard_output_ends_the_command_quietly(tmp_path, capsys, monkeypatch):
    """``inspect FILE | head -2`` printed "error: [Errno 32] Broken pipe" and exited 3 (an unusable input file)."""
    import sys

    from hostile_files import kohya_lora

    from sdadapt.errors import BROKEN_PIPE_CODE, exit_code_table
    from sdadapt.formats.files import write_safetensors

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):
            raise OSError("no file descriptor in this test")  # (the real one stays pytest's)

    path = write_safetensors(tmp_path / "a.safetensors", kohya_lora(0), {})
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(path)]) == BROKEN_PIPE_CODE == 141
    assert capsys.readouterr().err == ""
    assert "141  the reader of the output closed it" in exit_code_table()


def test_a_broken_pipe_elsewhere_is_reported_as_an_error(tmp_path, capsys, monkeypatch):
    """Only standard output's own broken pipe ends quietly: a BrokenPipeError from another pipe (a worker's) while
    stdout still works is an error with its message and a non-zero code other than 141."""
    import sdadapt.formats as formats
    from sdadapt.errors import BROKEN_PIPE_CODE

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe (a worker)")

    monkeypatch.setattr(formats, "describe_file", broken)  # (inspect's reader, imported at call time)
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"x")
    code = main(["inspect", str(path)])
    err = capsys.readouterr().err
    assert code not in (0, BROKEN_PIPE_CODE), (code, err)


# ------------------------------------------------------------------ generate options without the pass they shape
@pytest.mark.parametrize(("extra", "words"), [
    (["--denoising-strength", "0.75"], "--denoising-strength is img2img's strength and only applies with --init-image"),
    (["--resize-mode", "crop"], "--resize-mode only applies with --init-image IMAGE"),
    (["--hires-denoising", "0.5"], "--hires-denoising shapes the hires fix's second pass, which runs only with "
                                   "--hires-scale F or --hires-width/--hires-height"),
    (["--hires-steps", "10"], "--hires-steps shapes the hires fix's second pass"),
    (["--hires-upscaler", "pixel-lanczos"], "--hires-upscaler shapes the hires fix's second pass"),
    (["--img2img-fix-steps"], "--img2img-fix-steps only applies with --init-image IMAGE or --hires-scale F"),
])
def test_generate_options_without_the_pass_they_shape_are_refused(tmp_path, capsys, extra, words):
    """They ran and were silently ignored (A1111's txt2img has no denoising strength unless hires); a value equal to
    the default counts as given."""
    out = tmp_path / "a.png"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "a", "--steps", "1", *extra, "-q", "-o", str(out)])
    assert exit_.value.code == 2 and words in capsys.readouterr().err and not out.exists()


def test_generate_options_with_their_pass_still_run(tmp_path):
    init = tmp_path / "init.png"
    assert main(["generate", "--prompt", "a", "--steps", "1", "-q", "-o", str(init)]) == 0
    assert main(["generate", "--prompt", "a", "--steps", "2", "--init-image", str(init), "--denoising-strength", "0.5",
                 "--resize-mode", "crop", "--img2img-fix-steps", "-q", "-o", str(tmp_path / "b.png")]) == 0


# ------------------------------------------------------------------ --steps beyond the model's timesteps
@pytest.mark.parametrize("extra", [["--steps", "1000000"], ["--steps", "1", "--hires-scale", "1.5", "--hires-steps", "1001"]])
def test_too_many_steps_name_the_option_and_the_limit(tmp_path, capsys, extra):
    """It said "num_inference_steps must be in [1, 1000], got 1000000" (no option named)."""
    assert main(["generate", "--prompt", "a", *extra, "-q", "-o", str(tmp_path / "a.png")]) == 2
    option, value = extra[-2:]
    assert f"{option} {value}: at most 1000, the model's training timesteps" in capsys.readouterr().err


def test_generate_to_a_gif_name_is_a_refused_output(tmp_path, capsys):
    """It exited 3 (an unusable input file); merge's -o X.ckpt exits 7 (an output that cannot be written)."""
    assert main(["generate", "--prompt", "a", "--steps", "1", "-q", "-o", str(tmp_path / "x.gif")]) == 7
    assert "written as PNG, JPEG, WebP or AVIF; name it *.png, *.jpg, *.webp or *.avif" in capsys.readouterr().err


# ------------------------------------------------------------------ small wording
def test_network_dim_zero_names_the_option(tmp_path, capsys):
    """It said "network ranks must be >= 1, got rank 0"."""
    assert main(["train", "lora", "--images", str(_images(tmp_path / "imgs")), "--network-dim", "0", "--steps", "1",
                 "-q", "-o", str(tmp_path / "a.safetensors")]) == 2
    assert "--network-dim (kohya's network_dim; the rank) must be >= 1, got 0" in capsys.readouterr().err


def test_combining_one_file_says_one_file(tmp_path, capsys):
    from hostile_files import kohya_lora

    from sdadapt.formats.files import write_safetensors

    lora = write_safetensors(tmp_path / "a.safetensors", kohya_lora(0), {})
    assert main(["combine-loras", str(lora), "--scale", "0.5", "-o", str(tmp_path / "c.safetensors")]) == 0
    assert "combined 1 file (" in capsys.readouterr().out


def test_a_non_lora_kind_takes_its_article(tmp_path):
    from sdadapt.errors import WeightFileError
    from sdadapt.formats import load_lora
    from sdadapt.formats.files import write_safetensors

    write_safetensors(tmp_path / "e.safetensors", {"emb_params": torch.zeros(2, 8)})
    with pytest.raises(WeightFileError, match="this is an embedding file, not a LoRA"):
        load_lora(tmp_path / "e.safetensors")


# ------------------------------------------------------------------ generate --lora PEFT_FOLDER
def test_a_peft_adapter_folder_is_taken_by_lora_as_its_kohya_twin(tmp_path, capsys, sd1):
    """``--lora FOLDER`` said "no such file" while ``inspect FOLDER`` suggested ``generate --lora``: the folder (and its
    adapter_model.safetensors) now gives the image of the same LoRA as a kohya file, on the component its layers fit
    (the UNet or the text encoder, found by layer names and input widths)."""
    from sdadapt.formats import load_lora, save_kohya
    from sdadapt.formats import peft_component
    from sdadapt.jobs.models import load_system

    model = sd1
    system = load_system(str(model))
    generator = torch.Generator().manual_seed(0)

    def lora(module, names):
        state = {}
        for name in names:
            layer = module.get_submodule(name)
            state |= {f"{name}.lora_down.weight": torch.randn(2, layer.in_features, generator=generator),
                      f"{name}.lora_up.weight": torch.randn(layer.out_features, 2, generator=generator),
                      f"{name}.alpha": torch.tensor(2.0)}
        return state

    unet = lora(system.unet, [f"{b}.attentions.0.transformer_blocks.0.attn2.{p}" for b in ("down_blocks.0", "mid_block")
                              for p in ("to_q", "to_k", "to_v")])
    from transformers_versions import CLIP_TEXT_MODEL

    text = lora(system.text_encoder, [f"{CLIP_TEXT_MODEL}encoder.layers.0.self_attn.q_proj", f"{CLIP_TEXT_MODEL}encoder.layers.0.mlp.fc1"])
    for component, state in (("unet", unet), ("text_encoder", text)):
        save_kohya(tmp_path / f"{component}.safetensors", {component: state}, base_model="sd1")
        assert main(["convert", str(tmp_path / f"{component}.safetensors"), "--to", "peft", "--component", component,
                     "-q", "-o", str(tmp_path / f"{component}_peft")]) == 0
        peft_state = load_lora(tmp_path / f"{component}_peft")[0]["model"]
        assert peft_component(system, peft_state, source="--lora X") == component
    assert main(["inspect", str(tmp_path / "unet_peft")]) == 0  # (what inspect says to do works)
    assert "use:        generate --lora FOLDER:SCALE; convert --to kohya --component" in capsys.readouterr().out
    images = []
    for lora_spec in (tmp_path / "unet.safetensors", tmp_path / "unet_peft"):
        out = tmp_path / f"{lora_spec.name}.png"
        assert main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "2", "--seed", "3",
                     "--width", "32", "--height", "32",  # (default: 128x128, 16x the pixels)
                     "--lora", f"{lora_spec}:0.7", "-o", str(out)]) == 0
        assert f"applied {lora_spec} at 0.7 (6 layers)" in capsys.readouterr().err
        images.append(_pixels(out))  # (the image: the PNG's infotext names the LoRA file)
    assert images[0] == images[1]


def test_a_peft_adapter_of_another_model_says_how_to_name_its_component(tmp_path, capsys):
    from sdadapt.formats import save_peft

    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    save_peft(tmp_path / "wide", {f"{layer}.lora_down.weight": torch.zeros(2, 999),
                                  f"{layer}.lora_up.weight": torch.zeros(999, 2), f"{layer}.alpha": torch.tensor(2.0)})
    assert main(["generate", "--prompt", "a", "--steps", "1", "--lora", str(tmp_path / "wide"), "-q",
                 "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"--lora {tmp_path / 'wide'}: a peft adapter whose layers fit none of this model's unet" in err, err
    assert "convert FOLDER --to kohya --component unet|text_encoder|text_encoder_2" in err


# ------------------------------------------------------------------ an SDXL embedding on an SD1 model
def test_an_sdxl_embedding_on_an_sd1_model_gets_command_line_advice(tmp_path, capsys, sd1):
    """It said "... pass {'clip_l': pipe.text_encoder, 'clip_g': pipe.text_encoder_2}" (Python advice)."""
    import sdadapt

    path = tmp_path / "xlthing.safetensors"
    sdadapt.save_embedding(path, sdadapt.Embedding("xlthing", {"clip_l": torch.randn(1, 64), "clip_g": torch.randn(1, 128)}))
    assert main(["generate", "--model", str(sd1), "--embedding", str(path), "--prompt", "xlthing", "--steps", "1", "-q",
                 "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert f"--embedding {path}: an SDXL embedding (it holds clip_l (1, 64), clip_g (1, 128)) and this model has one " \
           "text encoder, which needs an embedding of width 64: use an embedding made for this model, or an SDXL " \
           "checkpoint as --model" in err, err
    assert "pipe." not in err
