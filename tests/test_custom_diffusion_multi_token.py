"""Custom Diffusion with several modifier tokens in one run, as diffusers' ``train_custom_diffusion.py``
(huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951, examples/custom_diffusion/train_custom_diffusion.py):
``--modifier_token "<new1>+<new2>"`` / ``--initializer_token "ktn+pll"`` split at ``+`` (:843-844), one row per token
(:847-874), every row and the K/V weights in one AdamW (:1005-1013), one token file per token (``save_new_embed``,
:311-324)."""

from __future__ import annotations

import json

import pytest
import torch

from sdadapt.cli import main
from sdadapt.custom_diffusion import cross_attention_layers
from sdadapt.formats.custom_diffusion import load_custom_diffusion, token_files
from sdadapt.images import write_png
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.custom_diffusion import modifier_tokens, prepare_custom_diffusion
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.step import StepConfig

TOKENS = ("<new1>", "<new2>")


def _data(n: int = 4):
    images, captions = concept_data("cross", n, seed=0)
    return images, [c.replace("cross", TOKENS[i % 2]) for i, c in enumerate(captions)]  # each token in the batch


def test_two_tokens_each_row_takes_one_adamw_step_at_its_rate_float64(tmp_path):
    system = build_toy(seed=1)
    unet0 = {k: v.clone() for k, v in system.unet.state_dict().items()}
    te0 = {k: v.clone() for k, v in system.text_encoder.state_dict().items()}
    flags = {n: p.requires_grad for n, p in system.named_parameters()}
    scale, lr, wd = 7.0, 1e-2, 0.01
    adaptation = METHODS["custom-diffusion"].adapt(system, seed=0, token="<new1>+<new2>", init_word="red+blue",
                                                   token_lr_scale=scale)
    assert adaptation.tokens == TOKENS and adaptation.lr_scales[:3] == [scale, scale, 1.0]
    rows, weight = adaptation.params[:2], adaptation.params[2]
    table = system.text_encoder.get_input_embeddings().weight
    ids = {w: system.tokenizer.token_id(w) for w in ("red", "blue")}
    # each row starts from its own init word's (diffusers: token_embeds[x] = token_embeds[y], :872-874)
    assert torch.equal(rows[0].detach()[0], table[ids["red"]].float())
    assert torch.equal(rows[1].detach()[0], table[ids["blue"]].float())
    before = [p.detach().double().clone() for p in (*rows, weight)]
    grads: dict[int, torch.Tensor] = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p, i=i: grads.__setitem__(i, p.grad.detach().double().clone()))
             for i, p in enumerate((*rows, weight))]
    images, captions = _data()
    fit(system, adaptation, images, captions, config=FitConfig(
        steps=1, batch_size=4, learning_rate=lr, warmup_steps=0, schedule="constant", weight_decay=wd,
        step=StepConfig(max_grad_norm=None)))
    for h in hooks:
        h.remove()
    # torch.optim.AdamW's first step (betas 0.9/0.999, eps 1e-8), transcribed in float64:
    # p <- p (1 - lr wd);  m = (1-b1) g, v = (1-b2) g^2;  p <- p - lr/(1-b1) m / (sqrt(v)/sqrt(1-b2) + eps)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for i, (p, p0, rate) in enumerate(zip((*rows, weight), before, (lr * scale, lr * scale, lr))):
        g = grads[i]
        assert g.abs().max() > 0, i  # both tokens' captions were in the batch: both rows have gradients
        m, v = (1 - b1) * g, (1 - b2) * g * g
        want = p0 * (1 - rate * wd) - rate / (1 - b1) * m / (v.sqrt() / (1 - b2) ** 0.5 + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=2e-6)
    # only the attn2 K/V weights and the two rows changed (the token table itself is untouched)
    changed = {k for k, v in system.unet.state_dict().items() if not torch.equal(unet0[k], v)}
    assert changed == {f"{n}.{p}" for n in cross_attention_layers(system.unet) for p in ("to_k.weight", "to_v.weight")}
    assert all(torch.equal(te0[k], v) for k, v in system.text_encoder.state_dict().items())
    # save -> load: both rows, in token order, and the same weights
    path = adaptation.save(tmp_path / "cd.safetensors")
    assert [p.name for p in token_files(path, 2)] == ["cd-token1.safetensors", "cd-token2.safetensors"]
    assert all(p.is_file() for p in token_files(path, 2)) and not token_files(path, 1)[0].exists()
    loaded = load_custom_diffusion(path)
    assert loaded.tokens == list(TOKENS) and set(loaded.prompts) == set(captions)
    for emb, row in zip(loaded.embeddings, rows):
        assert torch.equal(emb.vectors["text_encoder"], row.detach().cpu())
    state = adaptation.state_dict()
    assert loaded.weights.keys() == state.keys() and all(torch.equal(loaded.weights[k], state[k]) for k in state)
    adaptation.remove()
    assert all(torch.equal(unet0[k], v) for k, v in system.unet.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in system.named_parameters()}
    assert not system.tokenizer.added and all(not m._forward_hooks for m in system.unet.modules())


def test_a_caption_with_one_token_trains_only_that_tokens_row():
    system = build_toy(seed=1)
    adaptation = prepare_custom_diffusion(system, token=list(TOKENS))
    rows0 = [p.detach().clone() for p in adaptation.params[:2]]
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, [c.replace("cross", "<new2>") for c in captions],
        config=FitConfig(steps=1, batch_size=2, learning_rate=1e-2, weight_decay=0.0, warmup_steps=0, schedule="constant"))
    assert torch.equal(adaptation.params[0], rows0[0]) and not torch.equal(adaptation.params[1], rows0[1])
    adaptation.remove()


def _trained(token, tmp_path, name):
    system = build_toy(seed=1)
    adaptation = METHODS["custom-diffusion"].adapt(system, seed=3, token=token, init_word=None)
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, [c.replace("cross", "<new1>") for c in captions],
        config=FitConfig(steps=2, batch_size=2, learning_rate=1e-2))
    path = adaptation.save(tmp_path / f"{name}.safetensors")
    params = [p.detach().clone() for p in adaptation.params]
    adaptation.remove()
    return params, path


def test_one_token_as_a_string_a_1_tuple_or_a_list_trains_bit_identically(tmp_path):
    runs = [_trained(token, tmp_path, f"r{i}") for i, token in enumerate(("<new1>", ("<new1>",), ["<new1>"]))]
    (first, path), *others = runs
    for params, other in others:
        assert len(params) == len(first) and all(torch.equal(a, b) for a, b in zip(first, params))
        assert other.read_bytes() == path.read_bytes()
        assert token_files(other)[0].read_bytes() == token_files(path)[0].read_bytes()  # one token: <stem>-token
    assert load_custom_diffusion(path).tokens == ["<new1>"]


@pytest.mark.parametrize(("token", "init_word", "match"), [
    ("<new1>+<new2>", "red+blue+green", "3 init words"),
    (("<new1>", "<new2>", "<new3>"), ("red", "blue"), "2 init words"),
    ("<new1>+<new1>", None, "given twice"),
    ("<new1>+<NEW1>", None, "given twice"),
    ("<new1>+", None, "empty modifier token"),
    ("+<new2>", None, "empty modifier token"),
    ("<new1> + <new2>", None, "spaces around"),
    ("", None, "empty modifier token"),
    ((), None, "no modifier token"),
    ("<new1>+<new2>", "red+", "empty init word"),
])
def test_bad_tokens_and_init_words_are_refused_naming_the_fix(token, init_word, match):
    with pytest.raises(ValueError, match=match):
        modifier_tokens(token, init_word)
    system = build_toy(seed=1)
    with pytest.raises(ValueError, match=match):
        prepare_custom_diffusion(system, token=token, init_word=init_word)
    assert not system.tokenizer.added  # nothing left injected


def test_modifier_tokens_split_and_pair_init_words():
    assert modifier_tokens("<new1>") == (("<new1>",), (None,))
    assert modifier_tokens("<new1>+<new2>", "red") == (TOKENS, ("red", "red"))
    assert modifier_tokens(["<new1>", "<new2>"], "red+blue") == (TOKENS, ("red", "blue"))
    assert modifier_tokens(TOKENS, [None, "blue"]) == (TOKENS, (None, "blue"))
    with pytest.raises(TypeError, match="sequence of strings"):
        modifier_tokens(["<new1>", 2])


def test_a_failing_second_token_takes_the_first_one_out_again(monkeypatch):
    import sdadapt.methods.custom_diffusion as cd

    real, calls = cd.prepare_textual_inversion, []

    def second_fails(system, **kwargs):
        calls.append(kwargs["token"])
        if len(calls) == 2:
            raise ValueError("the second token cannot be injected")
        return real(system, **kwargs)

    monkeypatch.setattr(cd, "prepare_textual_inversion", second_fails)
    system = build_toy(seed=1)
    flags = {n: p.requires_grad for n, p in system.named_parameters()}
    with pytest.raises(ValueError, match="second token"):
        prepare_custom_diffusion(system, token="<new1>+<new2>")
    assert calls == list(TOKENS)
    assert not system.tokenizer.added and flags == {n: p.requires_grad for n, p in system.named_parameters()}


def _concept(folder, n=2, size=16, seed=0):
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        write_png(folder / f"img{i}.png", torch.rand(3, size, size, generator=g) * 2 - 1)
    return folder


def test_train_cli_two_concepts_plus_syntax_resume_and_generate(tmp_path, capsys):
    images = tmp_path / "data"
    _concept(images / "1_<new1> circle", seed=0)  # kohya folders: the name is the caption of images without one
    _concept(images / "1_<new2> square", seed=1)
    out = tmp_path / "cd.safetensors"
    common = ["train", "custom-diffusion", "--images", str(images), "--token", "<new1>+<new2>", "--init-word", "red+blue",
              "--model", "toy", "--resolution", "16", "--batch-size", "2", "--no-prior", "--seed", "1"]
    assert main([*common, "--steps", "2", "--save-every-n-steps", "1", "-o", str(out)]) == 0, \
        capsys.readouterr().err
    assert "2 modifier tokens trained jointly; images whose caption names each: <new1>: 2, <new2>: 2" in capsys.readouterr().err
    loaded = load_custom_diffusion(out)
    assert loaded.tokens == list(TOKENS) and set(loaded.prompts) == {"<new1> circle", "<new2> square"}
    assert all(p.is_file() for p in token_files(out, 2))
    # run.json records the tokens as given: --resume continues the same run and ends where it did
    state = tmp_path / "cd-state"
    record = json.loads((state / "run.json").read_text())
    assert record["method_options"]["token"] == "<new1>+<new2>" and record["method_options"]["init_word"] == "red+blue"
    again = tmp_path / "again.safetensors"
    assert main([*common, "--steps", "2", "--resume", str(state), "-o", str(again), "-q"]) == 0, capsys.readouterr().err
    resumed = load_custom_diffusion(again)
    assert all(torch.equal(resumed.weights[k], v) for k, v in loaded.weights.items())
    for a, b in zip(resumed.embeddings, loaded.embeddings):
        assert a.name == b.name and torch.equal(a.vectors["text_encoder"], b.vectors["text_encoder"])
    # generation with both tokens loads them
    png = tmp_path / "g.png"
    assert main(["generate", "--model", "toy", "--prompt", "a <new1> and a <new2>", "--steps", "2", "--seed", "1",
                 "--custom-diffusion", str(out), "-o", str(png)]) == 0, capsys.readouterr().err
    assert png.is_file() and "tokens '<new1>', '<new2>')" in capsys.readouterr().err


def test_train_cli_refuses_what_cannot_say_which_concept(tmp_path, capsys):
    images = tmp_path / "data"
    _concept(images / "1_<new1> circle")
    base = ["train", "custom-diffusion", "--model", "toy", "--resolution", "16", "--steps", "1", "--no-prior",
            "-o", str(tmp_path / "x.safetensors")]
    bad = [(["--images", str(images), "--token", "<new1>+<new2>", "--init-word", "red+blue+green"], "3 init words"),
           (["--images", str(images), "--token", "<new1>+<new1>"], "given twice"),
           (["--images", str(images), "--token", "<new1>+"], "empty modifier token"),
           (["--images", str(images), "--token", "<new1>+<new2>", "--caption-template", "{token}, {caption}"],
            "--caption-template: with several modifier tokens")]
    for args, match in bad:
        assert main([*base, *args]) == 2, args
        assert match in capsys.readouterr().err, args
    plain = _concept(tmp_path / "plain")  # no captions: a template cannot say which concept
    assert main([*base, "--images", str(plain), "--token", "<new1>+<new2>"]) == 2
    assert "image(s) without a caption" in capsys.readouterr().err
    for i in range(2):
        (plain / f"img{i}.txt").write_text("a red circle")
    assert main([*base, "--images", str(plain), "--token", "<new1>+<new2>"]) == 2
    assert "mention none of the modifier tokens <new1>+<new2>" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_new_words_as_tokens_are_not_reported_as_unknown_to_the_toy_tokenizer(tmp_path, capsys):
    images = tmp_path / "data"
    _concept(images / "1_zorp circle")
    _concept(images / "1_blick square", seed=1)
    assert main(["train", "custom-diffusion", "--images", str(images), "--token", "zorp+blick", "--model", "toy",
                 "--resolution", "16", "--steps", "1", "--no-prior", "-o", str(tmp_path / "z.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "zorp: 2, blick: 2" in err and "does not know" not in err
    assert load_custom_diffusion(tmp_path / "z.safetensors").tokens == ["zorp", "blick"]
