"""Prompts longer than 75 tokens, kohya's ``--max_token_length`` (sdadapt.text_chunks, DiffusersSystem).

kohya sd-scripts (library/strategy_base.py ``TokenizeStrategy._get_input_ids``, strategy_sd.py and
strategy_sdxl.py ``encode_tokens``, 2026-02):

* the caption is tokenized to ``max_length = max_token_length + 2`` (padding, truncation), then
  ``for i in range(1, max_length - 77 + 2, 75)`` a chunk ``ids[0], ids[i:i+75], ids[-1]``;
  when ``pad_token_id != eos_token_id`` (v2 / SDXL's second tokenizer): "if chunk[-2] is neither
  <EOS> nor <PAD>, chunk[-1] = <EOS>" and "if chunk[1] == <PAD>, chunk[1] = <EOS>";
* the (b, n, 77) chunks are encoded as (b*n, 77) (clip skip on each), reshaped to (b, n*77, D),
  and joined as ``[h[:, 0]] + [h[:, i:i+75] for i in range(1, n*77, 77)] + [h[:, -1]]``;
  the v2 branch's copy of the next <PAD> state compares an id with the EOS *string* and never
  fires; SDXL's pooled output is ``pool2[::n]`` (each caption's first chunk);
* ``ss_max_token_length`` is ``str(args.max_token_length)``: "None" for the default 75.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.text_chunks import (
    MAX_TOKEN_LENGTHS,
    chunk_count,
    chunk_token_ids,
    long_prompt_length,
    merge_chunk_states,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from tiny_systems import tiny_diffusers_system
from transformers_versions import float64_clip

BOS, EOS, BANG = 512, 513, 0  # the tiny tokenizer's <|startoftext|>, <|endoftext|> and "!"


# ------------------------------------------------------------------------------ naive kohya references
def kohya_chunks(ids: list[int], *, window: int, eos: int, pad: int) -> list[list[int]]:
    """kohya's _get_input_ids loop, written out on Python lists (it runs only for ids longer than a window)."""
    if len(ids) == window:
        return [ids]
    chunks = []
    for i in range(1, len(ids) - window + 2, window - 2):
        chunk = [ids[0], *ids[i : i + window - 2], ids[-1]]
        if pad != eos:
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return chunks


def kohya_merge(states: torch.Tensor, *, batch: int) -> torch.Tensor:
    """kohya's encode_tokens join of (b*n, C, D) chunk states, on float64."""
    window = states.shape[1]
    h = states.reshape(batch, -1, states.shape[-1])  # (b, n*C, D)
    parts = [h[:, 0:1]]
    for i in range(1, h.shape[1], window):
        parts.append(h[:, i : i + window - 2])
    parts.append(h[:, -1:])
    return torch.cat(parts, dim=1)


def padded(tokens: list[int], *, length: int, eos: int, pad: int) -> list[int]:
    """What a CLIP tokenizer makes with padding="max_length", truncation=True, max_length=length."""
    ids = [BOS, *tokens[: length - 2], eos]
    return ids + [pad] * (length - len(ids))


# ------------------------------------------------------------------------------ pure functions
@settings(max_examples=100, deadline=None)
@given(data=st.data(), windows=st.sampled_from([1, 2, 3]), window=st.sampled_from([3, 5, 77]),
       pad_is_eos=st.booleans(), batch=st.integers(1, 3))
def test_chunk_token_ids_is_kohyas_loop(data, windows, window, pad_is_eos, batch):
    pad = EOS if pad_is_eos else BANG
    length = windows * (window - 2) + 2
    rows = []
    for _ in range(batch):
        # 0..225 caption tokens (longer ones are truncated), "!" (the SD2 pad id) among the words too
        count = data.draw(st.integers(0, min(225, length + 3)))
        tokens = data.draw(st.lists(st.sampled_from([BANG, 5, 6, 7, 300]), min_size=count, max_size=count))
        rows.append(padded(tokens, length=length, eos=EOS, pad=pad))
    ids = torch.tensor(rows)
    got = chunk_token_ids(ids, window=window, eos_id=EOS, pad_id=pad)
    want = torch.tensor([kohya_chunks(r, window=window, eos=EOS, pad=pad) for r in rows])
    assert got.shape == (batch, windows, window)
    assert torch.equal(got, want)
    if windows == 1:
        assert torch.equal(got[:, 0], ids)  # one window: the ids as a plain tokenizer makes them


def test_chunk_token_ids_full_window_ends_in_eos_and_empty_window_starts_with_it():
    ids = torch.tensor([padded([7, 7, 7], length=8, eos=EOS, pad=BANG)])  # 2 windows of 3 prompt slots, C = 5
    assert chunk_token_ids(ids, window=5, eos_id=EOS, pad_id=BANG).tolist() == [[[BOS, 7, 7, 7, EOS], [BOS, EOS, BANG, BANG, BANG]]]
    ids = torch.tensor([padded([7, 7, 7], length=8, eos=EOS, pad=EOS)])  # SD1: pad = <EOS>
    assert chunk_token_ids(ids, window=5, eos_id=EOS, pad_id=EOS).tolist() == [[[BOS, 7, 7, 7, EOS], [BOS, EOS, EOS, EOS, EOS]]]


@settings(max_examples=60, deadline=None)
@given(windows=st.integers(1, 3), window=st.sampled_from([3, 6, 77]), batch=st.integers(1, 3), width=st.integers(1, 4),
       grouped=st.booleans())
def test_merge_chunk_states_is_kohyas_join(windows, window, batch, width, grouped):
    states = torch.randn(batch * windows, window, width, dtype=torch.float64)
    want = kohya_merge(states, batch=batch)
    given_states = states.reshape(batch, windows, window, width) if grouped else states
    got = merge_chunk_states(given_states, chunks=windows)
    assert got.shape == (batch, windows * (window - 2) + 2, width)
    assert torch.equal(got, want)
    if windows == 1:
        assert torch.equal(got, states)


def test_lengths_and_refusals():
    assert [chunk_count(n) for n in MAX_TOKEN_LENGTHS] == [1, 2, 3]
    assert [long_prompt_length(n) for n in MAX_TOKEN_LENGTHS] == [77, 152, 227]
    for bad in (None, 0, 76, 100, 300, True, "150"):
        with pytest.raises(ValueError, match="75, 150 or 225"):
            chunk_count(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="do not split into 77-token encoder windows"):
        chunk_token_ids(torch.zeros(1, 100, dtype=torch.long), window=77, eos_id=EOS, pad_id=EOS)
    with pytest.raises(ValueError, match="not 2 windows per prompt"):
        merge_chunk_states(torch.zeros(3, 77, 4), chunks=2)


# ------------------------------------------------------------------------------ a tiny SD system, 77-token windows
_system = functools.partial(tiny_diffusers_system, max_token_length=150)


def _caption(words: int) -> str:
    """``words`` two-letter words: 2 byte tokens each (the tiny tokenizer has no merges)."""
    return " ".join("ab" for _ in range(words))


def _encode(system, encoder, ids: torch.Tensor) -> torch.Tensor:
    """One (1, 77) window through ``encoder`` the way the system reads it (clip skip, final norm)."""
    out = encoder(ids, output_hidden_states=True)
    if system.is_sdxl:
        return out.hidden_states[-2]
    if system.clip_skip > 1:
        return getattr(encoder, "text_model", encoder).final_layer_norm(out.hidden_states[-system.clip_skip])
    return out.last_hidden_state


@float64_clip
@pytest.mark.parametrize("pad,clip_skip", [("eos", 1), ("eos", 2), ("!", 1)])
def test_a_150_token_caption_is_two_windows_joined_kohyas_way(tmp_path, pad, clip_skip):
    system = _system(tmp_path, pad=pad, clip_skip=clip_skip)
    system.text_encoder.double()
    pad_id = EOS if pad == "eos" else BANG
    long, short = _caption(75), _caption(40)  # 150 tokens (both windows full) and 80 (the second nearly empty)
    ids = system.tokenize([long, short])
    assert ids.shape == (2, 152) and ids[0, -1] == EOS and ids[1, 81] == EOS
    with torch.no_grad():
        got = system.condition(ids)
    assert got.shape == (2, 152, 32)
    words = system.tokenizer(long, add_special_tokens=False, verbose=False).input_ids
    assert len(words) == 150
    for row, caption in enumerate((long, short)):
        words = system.tokenizer(caption, add_special_tokens=False, verbose=False).input_ids
        first = [BOS, *words[:75], EOS]
        second = [BOS, *words[75:150], EOS]
        second += [pad_id] * (77 - len(second))
        with torch.no_grad():
            a = _encode(system, system.text_encoder, torch.tensor([first]))
            b = _encode(system, system.text_encoder, torch.tensor([second]))
        want = torch.cat([a[:, :76], b[:, 1:]], dim=1)  # <BOS>, 75 + 75 prompt states, the last state
        torch.testing.assert_close(got[row : row + 1], want, rtol=1e-12, atol=1e-12)


def test_75_is_the_plain_77_token_path_and_the_attribute_is_checked(tmp_path):
    system = _system(tmp_path, max_token_length=75)
    ids = system.tokenize([_caption(60)])
    assert ids.shape == (1, 77) and ids[0, -1] == EOS  # truncated to 75 tokens as before
    with torch.no_grad():
        torch.testing.assert_close(system.condition(ids), system.text_encoder(ids).last_hidden_state, rtol=0, atol=0)
    system.max_token_length = 225
    assert system.tokenize(["ab"]).shape == (1, 227)
    with pytest.raises(ValueError, match="75, 150 or 225"):
        system.max_token_length = 100


@float64_clip
def test_sdxl_joins_both_encoders_and_pools_the_first_window(tmp_path):
    system = _system(tmp_path, sdxl=True, max_token_length=225)
    system.double()
    captions = [_caption(100), _caption(3)]  # 200 tokens: 3 windows; 6 tokens: 2 empty windows
    ids = system.tokenize(captions)
    assert ids.shape == (2, 2, 227)
    with torch.no_grad():
        cond = system.condition(ids)
    assert cond["context"].shape == (2, 227, 32) and cond["text_embeds"].shape == (2, 32)
    for row in range(len(captions)):
        # the windows by kohya's loop (pinned above), encoded one at a time
        ones = kohya_chunks(ids[row, 0].tolist(), window=77, eos=EOS, pad=EOS)
        twos = kohya_chunks(ids[row, 1].tolist(), window=77, eos=EOS, pad=BANG)
        if row == 1:  # a short caption's empty windows: <BOS> <EOS> <PAD> ...
            assert twos[1][:3] == [BOS, EOS, BANG] and twos[2][:3] == [BOS, EOS, BANG]
        with torch.no_grad():
            parts_1 = torch.cat([_encode(system, system.text_encoder, torch.tensor([w])) for w in ones])
            outs = [system.text_encoder_2(torch.tensor([w]), output_hidden_states=True) for w in twos]
        parts_2 = torch.cat([o.hidden_states[-2] for o in outs])
        want = torch.cat([kohya_merge(parts_1, batch=1), kohya_merge(parts_2, batch=1)], dim=-1)
        torch.testing.assert_close(cond["context"][row : row + 1], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cond["text_embeds"][row : row + 1], outs[0].text_embeds, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the UNet takes the 227-long conditioning
        out = system.denoiser()(torch.zeros(2, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 500]), cond)
    assert out.shape == (2, 4, 8, 8)


def test_gradient_reaches_a_clip_lora_and_an_embedding_from_the_second_window(tmp_path):
    import sdadapt
    from sdadapt.embeddings import Embedding, inject_embedding

    system = _system(tmp_path)
    handle = sdadapt.inject(system.text_encoder, "text-encoder", sdadapt.LoRAConfig(rank=2))
    with torch.no_grad():  # a non-zero up so the down projections get gradient too
        for p in handle.parameters():
            p.normal_(0, 0.1)
    rows = inject_embedding(system.text_encoder, system.tokenizer,
                            Embedding("<s>", {"text_encoder": torch.randn(1, 32)}), trainable=True)
    caption = rows.expand(_caption(50) + " <s> " + _caption(10))  # <s> is prompt token 101: the second window
    ids = system.tokenize([caption])
    assert (ids[0, 1:76] >= 514).sum() == 0 and (ids[0, 76:151] >= 514).sum() == 1
    params = [*handle.parameters(), *rows.parameters()]
    # loss on the second window's positions only, through the system ...
    loss = system.condition(ids)[:, 76:151].pow(2).sum()
    got = torch.autograd.grad(loss, params)
    # ... equals the loss on that window encoded alone
    window = chunk_token_ids(ids, window=77, eos_id=EOS, pad_id=EOS)[:, 1]
    want = torch.autograd.grad(system.text_encoder(window).last_hidden_state[:, 1:76].pow(2).sum(), params)
    assert all(g.abs().sum() > 0 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    rows.remove()
    handle.remove()


# ------------------------------------------------------------------------------ train / generate
def test_option_flag_toml_key_and_refusals(tmp_path):
    from train_inputs import read_train_toml

    from sdadapt.cli import build_parser
    from sdadapt.jobs import TrainOptions

    options, _, notes = read_train_toml(tmp_path / "train.toml", "[training_arguments]\nmax_token_length = 225\n")
    assert options == {"max_token_length": 225} and not notes
    assert TrainOptions(images=str(tmp_path), model="x.safetensors", **options).max_token_length == 225
    assert TrainOptions(images=str(tmp_path)).max_token_length == 75
    for bad in (100, 0, True):
        with pytest.raises(ValueError, match="--max-token-length must be 75, 150 or 225"):
            TrainOptions(images=str(tmp_path), model="x.safetensors", max_token_length=bad)
    with pytest.raises(ValueError, match="toy's text encoder"):
        TrainOptions(images=str(tmp_path), max_token_length=150)
    parser = build_parser()
    args = parser.parse_args(["train", "lora", "--images", "x", "--max-token-length", "150"])
    assert args.max_token_length == 150
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "lora", "--images", "x", "--max-token-length", "100"])
    assert parser.parse_args(["generate", "--prompt", "a", "-o", "a.png"]).max_token_length == 75


def test_train_with_long_captions_records_it_and_generate_reads_long_prompts(tmp_path, capsys, monkeypatch):
    import sdadapt
    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem

    seen = []  # the id lengths the run conditions on (training steps and samples)
    condition = DiffusersSystem.condition

    def recording(self, ids):
        seen.append(int((ids["ids"] if isinstance(ids, dict) else ids).shape[-1]))
        return condition(self, ids)

    monkeypatch.setattr(DiffusersSystem, "condition", recording)
    from sdadapt.images import write_png
    from sdadapt.jobs import run_generate

    root = tmp_path / "pipe"
    system = _system(tmp_path, pad="!")
    system.save_model(root)
    images = tmp_path / "imgs"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_png(images / f"i{i}.png", torch.rand(3, 16, 16, generator=g) * 2 - 1)
        (images / f"i{i}.txt").write_text(_caption(60 + i))  # 120+ tokens
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(_caption(70) + " --s 2\n")
    out = tmp_path / "long.safetensors"
    code = main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "2", "--batch-size", "2",
                 "--resolution", "16", "--max-token-length", "150", "--sample-prompts", str(prompts), "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    _, metadata = sdadapt.load_lora(out)
    assert metadata["ss_max_token_length"] == "150"
    assert seen and set(seen) == {152}  # every step and the sample (cond and uncond) read 2 windows
    seen.clear()
    assert len(list((tmp_path / "long-samples").glob("*.png"))) == 1
    code = main(["train", "lora", "--images", str(images), "--model", str(root), "--steps", "1", "--batch-size", "2",
                 "--resolution", "16", "-q", "-o", str(tmp_path / "short.safetensors")])
    assert code == 0
    assert sdadapt.load_lora(tmp_path / "short.safetensors")[1]["ss_max_token_length"] == "None"  # kohya's unset
    assert set(seen) == {77}
    seen.clear()
    result = run_generate(prompt=_caption(100), out=tmp_path / "g.png", model=str(root), steps=2, width=16, height=16,
                          max_token_length=225, device="cpu")
    assert len(result["files"]) == 1 and set(seen) == {227}
    with pytest.raises(ValueError, match="toy's text encoder"):
        run_generate(prompt="a red circle", out=tmp_path / "t.png", model="toy", max_token_length=150, device="cpu")
    with pytest.raises(ValueError, match="one 75-token CLIP window"):
        run_generate(prompt="a", out=tmp_path / "a.png", model=str(root), max_token_length=150,
                     aesthetic=str(tmp_path / "none.pt"), device="cpu")
    json.dumps(metadata)  # strings only


def _one_layer_text_encoder():
    """The tiny SD1 system's text encoder (width 32, 77 positions, the tiny tokenizer's vocabulary) with one
    encoder layer instead of two: every op kind the trace meets, half the layers to trace."""
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=77, eos_token_id=513, bos_token_id=512, projection_dim=32,
    )
    return transformers.CLIPTextModel(config).eval().requires_grad_(False)


def test_long_prompt_conditioning_compiles_to_one_graph(tmp_path):
    """The window split and join are plain tensor ops: ``fullgraph=True`` (a break raises), the
    real autograd graph (``aot_eager``), outputs and LoRA gradients as eager. (A one-layer text
    encoder: what is traced is the windows' split and join around it.)"""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    import sdadapt

    system = _system(tmp_path, pad="!")
    system.text_encoder = _one_layer_text_encoder()
    handle = sdadapt.inject(system.text_encoder, "text-encoder", sdadapt.LoRAConfig(rank=2))
    with torch.no_grad():
        for p in handle.parameters():
            p.normal_(0, 0.1)
    ids = system.tokenize([_caption(70), _caption(5)])
    params = list(handle.parameters())
    eager = system.condition(ids)
    want = torch.autograd.grad(eager.pow(2).mean(), params)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    try:
        compiled = torch.compile(system.condition, backend=counter, fullgraph=True)
        got = compiled(ids)
        grads = torch.autograd.grad(got.pow(2).mean(), params)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    handle.remove()


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_sdadapts_own_clip_tokenizer_makes_the_same_long_ids_and_windows(tmp_path, pad):
    """sdadapt's pure-Python CLIPTokenizer (``max_length=``) and transformers' agree on 227-long
    ids, and a system holding either conditions the same."""
    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import DiffusersSystem

    system = _system(tmp_path, pad=pad, max_token_length=225)  # a transformers tokenizer
    ours = CLIPTokenizer.from_folder(tmp_path / "tok", pad=pad)
    prompts = [_caption(100), "ab, cd!", ""]
    want = system.tokenize(prompts)
    assert want.shape == (3, 227) and torch.equal(ours(prompts, max_length=227), want)
    assert torch.equal(ours(prompts), system.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                                       return_tensors="pt").input_ids)  # the default: one window
    other = DiffusersSystem(system.unet, system.vae, system.text_encoder, ours, {"prediction_type": "epsilon"},
                            max_token_length=225)
    assert torch.equal(other.tokenize(prompts), want)
    with torch.no_grad():
        torch.testing.assert_close(other.condition(want), system.condition(want), rtol=0, atol=0)
