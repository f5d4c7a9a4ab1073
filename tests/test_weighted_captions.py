"""kohya's ``--weighted_captions``: A1111 emphasis in training captions scales each token's text states.

kohya (library/strategy_base.py ``_get_weighted_input_ids``, library/strategy_sd.py /
strategy_sdxl.py ``encode_tokens_with_weights``): the caption is parsed into ``(text, weight)``
pieces (``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:w)`` ×w, nested brackets multiply, equal neighbours merged);
each piece is tokenized without ``<BOS>``/``<EOS>`` and its tokens take its weight; the ids are
``<BOS> tokens <EOS> <PAD>…`` (cut to ``L - 2`` tokens) with weight 1 at ``<BOS>``, ``<EOS>`` and the
padding; the encoder's (window-joined) hidden states are multiplied token by token by the weights
— SDXL each encoder's by its own weights, the pooled embedding untouched — and NOT renormalised
(the old ``get_weighted_text_embeddings`` rescaled to the previous mean; train_network.py no
longer uses it).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from embedding_models import tiny_tokenizer
from test_cli_train import _tiny_pipeline
from tiny_systems import tiny_diffusers_system
from train_inputs import captioned_pngs

from sdadapt.cli import main
from sdadapt.clip_tokenizer import CLIPTokenizer
from sdadapt.diffusers_system import DiffusersSystem
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.prompt_weights import parse_prompt_attention, weighted_token_ids
from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors

BOS, EOS = 512, 513  # the tiny byte-level vocabulary's specials


def test_the_emphasis_is_a1111s_as_kohya_documents_it():
    """kohya's own doctest examples of parse_prompt_attention."""
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_prompt_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    want = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
            (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]  # (the first "(" is never closed: ×1.1 to the end)
    assert [p for p, _ in got] == [p for p, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)
    assert parse_prompt_attention("") == [("", 1.0)]
    assert parse_prompt_attention("[a] b:2 (c:0.5)") == [("a", 1 / 1.1), (" b:2 ", 1.0), ("c", 0.5)]  # a bare ":" is text


def _reference_ids(tokenizer, prompt: str, length: int) -> tuple[list[int], list[float]]:
    """kohya's layout written out: each piece tokenized alone (transformers: ids[1:-1]), cut to L - 2."""
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(prompt):
        tokens = tokenizer(piece).input_ids[1:-1]
        ids += tokens
        weights += [weight] * len(tokens)
    ids, weights = ids[: length - 2], weights[: length - 2]
    pad = tokenizer.pad_token_id
    return [BOS, *ids, EOS] + [pad] * (length - 2 - len(ids)), [1.0, *weights] + [1.0] * (length - 1 - len(weights))


@pytest.mark.parametrize("length", [12, 77])
def test_weighted_ids_are_kohyas_layout_for_both_tokenizers(tmp_path, length):
    hf = tiny_tokenizer(tmp_path / "tok", max_length=length)
    ours = CLIPTokenizer.from_folder(tmp_path / "tok")
    prompts = ["a (red:1.5) cat", "[dim] (((bright)))", "plain", "(" + "long " * 40 + ")", ""]
    for tokenizer in (hf, ours):
        ids, weights = weighted_token_ids(tokenizer, prompts, length)
        assert ids.shape == weights.shape == (len(prompts), length) and ids.dtype == torch.long
        for row, prompt in enumerate(prompts):
            want_ids, want_weights = _reference_ids(hf, prompt, length)
            assert ids[row].tolist() == want_ids
            assert weights[row].tolist() == pytest.approx(want_weights, rel=1e-6)
    plain = hf(["plain", ""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(weighted_token_ids(hf, ["plain", ""], length)[0], plain)  # no brackets: the plain ids


_system = functools.partial(tiny_diffusers_system, max_token_length=75)


PROMPTS = ["a (red:1.5) cat, [blue] sky", "plain words here", "((x)) " + "ab " * 50]


@pytest.mark.parametrize("sdxl, max_token_length", [(False, 75), (False, 150), (True, 150)])
def test_the_text_states_are_the_plain_states_times_the_weights(tmp_path, sdxl, max_token_length):
    system = _system(tmp_path, sdxl=sdxl, max_token_length=max_token_length)
    weighted = system.tokenize_weighted(PROMPTS)
    with torch.no_grad():
        got = system.condition(weighted)
        plain = system.condition(weighted["ids"])  # the same ids without the weights
    weights = weighted["weights"].double()
    if not sdxl:
        assert torch.allclose(got.double(), plain.double() * weights[..., None], rtol=1e-6, atol=0)
        assert torch.equal(got[1], plain[1])  # no brackets: weights of 1, bit for bit the plain states
        assert not torch.allclose(got[0], plain[0])
        return
    width = system.text_encoder.config.hidden_size
    want = torch.cat([plain["context"][..., :width].double() * weights[:, 0, :, None],
                      plain["context"][..., width:].double() * weights[:, 1, :, None]], dim=-1)
    assert torch.allclose(got["context"].double(), want, rtol=1e-6, atol=0)
    assert torch.equal(got["text_embeds"], plain["text_embeds"])  # the pooled embedding is not weighted
    assert torch.equal(weighted["ids"][1], system.tokenize(PROMPTS[1:2])[0])


def _kohya_window_weights(flat: list[float], window: int = 77) -> torch.Tensor:
    """kohya's ``_get_input_ids(weighted=True)`` for ``max_length > model_max_length``: the flat weights
    of ``<BOS> tokens <EOS> <PAD>…`` cut into (n, window) rows, ``rows[b, 1:window-1] =
    weights[i : i + window - 2]`` for ``i`` in ``range(1, L - window + 2, window - 2)``, 1 elsewhere."""
    inner = window - 2
    rows = torch.ones((len(flat) - 2) // inner, window, dtype=torch.float64)
    for i in range(1, len(flat) - window + 2, inner):
        rows[i // inner, 1:window - 1] = torch.tensor(flat[i:i + inner], dtype=torch.float64)
    return rows


def _kohya_weighted_states(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """kohya's ``encode_tokens_with_weights`` on joined states (B, n·75 + 2, D) and window weights
    (B, n, 77): only each window's 75 token positions are scaled; the first <BOS> and last <EOS> never."""
    states = states.clone()
    for i in range(rows.shape[1]):
        states[:, i * 75 + 1:i * 75 + 76] *= rows[:, i, 1:-1, None]
    return states


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd1", "sdxl"])
def test_long_weighted_prompts_are_kohyas_per_window_weighting(tmp_path, sdxl):
    """150-token captions: the weights of kohya's own flat layout (tokenized here with the transformers
    tokenizer) cut into its per-window rows and applied its way, in float64, give sdadapt's states."""
    system = _system(tmp_path, sdxl=sdxl, max_token_length=150)
    prompts = ["(" + "ab " * 30 + ":1.4) " + "[cd] " * 20 + "ef", "x " * 40 + "((tail words))"]
    weighted = system.tokenize_weighted(prompts)
    with torch.no_grad():
        got = system.condition(weighted)
        plain = system.condition(weighted["ids"])
    tokenizers = [system.tokenizer, system.tokenizer_2] if sdxl else [system.tokenizer]
    parts = []
    for k, tokenizer in enumerate(tokenizers):
        width = system.text_encoder.config.hidden_size
        states = plain["context"][..., :width] if k == 0 and sdxl else plain["context"][..., width:] if sdxl else plain
        rows = torch.stack([_kohya_window_weights(_reference_ids(tokenizer, p, 152)[1]) for p in prompts])
        assert rows.shape == (2, 2, 77) and {1.4, 1.21} <= {round(w, 6) for w in rows.flatten().tolist()}
        assert (rows[:, 1, 1:-1] != 1).any()  # the emphasis reaches the second window
        parts.append(_kohya_weighted_states(states.double(), rows))
    want = torch.cat(parts, dim=-1) if sdxl else parts[0]
    assert torch.allclose((got["context"] if sdxl else got).double(), want, rtol=1e-6, atol=0)


def test_a_weight_that_is_no_number_names_the_caption():
    with pytest.raises(ValueError, match=r"caption 'a \(b:1\.2\.3\)': the emphasis weight '1\.2\.3' is not a number"):
        parse_prompt_attention("a (b:1.2.3)")


def test_fit_conditions_the_dataset_batches_on_the_weighted_states(tmp_path, monkeypatch):
    system = _system(tmp_path)
    seen: list[dict] = []
    real = DiffusersSystem.condition

    def condition(self, ids):
        seen.append(ids)
        return real(self, ids)

    monkeypatch.setattr(DiffusersSystem, "condition", condition)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dataset = Dataset(records_from_tensors(pixels, ["a (red:1.3) cat", "[dim] dog"]))
    encode_buckets(dataset, system.encode_images, images=pixels)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    fit(system, adaptation, dataset, config=FitConfig(steps=2, batch_size=2, learning_rate=1e-3, warmup_steps=0,
                                                      weighted_captions=True))
    weighted = [ids for ids in seen if isinstance(ids, dict) and "weights" in ids]
    assert len(weighted) == 2
    assert {round(w, 4) for w in weighted[0]["weights"].flatten().tolist()} == {1.0, 1.3, round(1 / 1.1, 4)}
    with pytest.raises(ValueError, match="pass a sdadapt.training.data.Dataset"):
        fit(system, adaptation, pixels, ["a"] * 2, config=FitConfig(steps=1, batch_size=2, weighted_captions=True))
    with pytest.raises(ValueError, match="kohya refuses the pair too"):
        FitConfig(weighted_captions=True, cache_text_encoder_outputs=True)


def test_weighted_captions_add_no_host_sync_to_the_steps(tmp_path):
    from sdadapt.training.host_syncs import HostSyncs

    system = _system(tmp_path)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    adaptation = METHODS["lora"].adapt(system, seed=1)
    per_step: list[list] = []
    with HostSyncs() as syncs:
        dataset = Dataset(records_from_tensors(pixels, ["a (red:1.3) cat", "[dim] dog"]))
        encode_buckets(dataset, system.encode_images, images=pixels)
        fit(system, adaptation, dataset, config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0,
                                                          weighted_captions=True),
            on_step=lambda progress: (per_step.append(list(syncs.events)), syncs.events.clear()))
    for events in per_step[1:]:
        assert [(e.kind, e.op) for e in events] == [("read", "tolist")], "\n".join(map(str, events))


def test_train_weighted_captions_from_a_kohya_config(tmp_path, monkeypatch, capsys):
    root = _tiny_pipeline(tmp_path / "pipe", prediction_type="epsilon")
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 2, caption=[f"a (photo:1.2) {i}" for i in range(2)])
    weights: list[torch.Tensor] = []
    real = DiffusersSystem.condition

    def condition(self, ids):
        if isinstance(ids, dict) and "weights" in ids:
            weights.append(ids["weights"])
        return real(self, ids)

    monkeypatch.setattr(DiffusersSystem, "condition", condition)
    config = tmp_path / "k.toml"
    config.write_text("weighted_captions = true\n")
    out = tmp_path / "w.safetensors"
    assert main(["train", "lora", "--model", str(root), "--images", str(images), "--config", str(config), "--steps", "2",
                 "--batch-size", "2", "--no-prior", "--save-every-n-steps", "1", "-o", str(out), "-q"]) == 0
    assert len(weights) == 2 and all(1.2 in [round(w, 4) for w in t.flatten().tolist()] for t in weights)
    assert json.loads((tmp_path / "w-state" / "run.json").read_text())["captions"]["weighted_captions"] is True
    assert main(["train", "lora", "--model", str(root), "--images", str(images), "--steps", "2", "--batch-size", "2",
                 "--no-prior", "-o", str(tmp_path / "r.safetensors"), "--resume", str(tmp_path / "w-state")]) == 2
    assert "weighted_captions True (now False)" in capsys.readouterr().err


def test_trigger_word_methods_refuse_weighted_captions(red_circles, tmp_path, capsys):
    assert main(["train", "textual-inversion", "--images", str(red_circles), "--token", "<x>", "--weighted-captions",
                 "--model", str(tmp_path / "no-such-model"), "--steps", "1", "-o", str(tmp_path / "t.safetensors")]) == 2
    assert "textual-inversion encodes its captions itself" in capsys.readouterr().err
