"""A1111's prompt syntax in ``generate``: conditionings switched per model call as A1111's CFGDenoiser
switches them, AND combined as its combine_denoised, <lora:...>/<hypernet:...> tags as --lora/--hypernetwork,
and prompts without the syntax sampled exactly as before."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from png_pixels import pixels as _pixels
import sdadapt
from sdadapt import samplers
from sdadapt.cli import main
from sdadapt.formats.files import write_safetensors
from sdadapt.prompt_guidance import plan_prompt
from sdadapt.prompt_schedule import composable_prompts, prompt_schedule, schedule_steps

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()


def _a1111_text_at(schedule, call):
    """reconstruct_cond_batch, transcribed: the first entry whose end_at_step >= the call count, else the first."""
    for end, text in schedule:
        if call <= end:
            return text
    return schedule[0][1]


def _recording_run(prompt, negative, *, sampler, steps, scale=5.0):
    """Sample with a stand-in model whose conditionings are numbers (10 + text index; negatives 100 +):
    returns (the plan, what each model call saw: [uncond, cond, ...] numbers, the call count)."""
    plan = plan_prompt(prompt, negative, steps=schedule_steps(sampler, steps))
    conds = [torch.full((1, 1), 10.0 + i) for i in range(len(plan.texts))]
    negatives = [torch.full((1, 1), 100.0 + i) for i in range(len(plan.negative_texts))]
    seen = []

    def model(x, t, cond):
        seen.append(cond[:, 0].tolist())
        return 0.1 * x + 0.01 * cond.view(-1, 1, 1, 1)

    guidance = plan.guidance(model, conds, negatives, scale)
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    samplers.sample_latents(guidance, x, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD, num_steps=steps)
    return plan, seen, guidance.calls


@pytest.mark.parametrize("sampler", ["euler", "ddim", "heun", "dpmpp_2s_a"])
def test_each_model_call_sees_a1111s_conditioning_for_its_count(sampler):
    prompt, negative, steps = "a [cat:dog:0.5] [red|blue] AND [tree::3]", "[ugly:blurry:2]", 6
    plan, seen, calls = _recording_run(prompt, negative, sampler=sampler, steps=steps)
    assert calls == len(seen) >= steps
    total = schedule_steps(sampler, steps)
    assert total == (12 if sampler in ("heun", "dpmpp_2s_a") else 6)
    parts = [text for text, _ in composable_prompts(prompt)]
    assert parts == ["a [cat:dog:0.5] [red|blue]", " [tree::3]"]
    positive = [prompt_schedule(part, total) for part in parts]
    negative_schedule = prompt_schedule(negative, total)
    for call, batch in enumerate(seen):
        expected = [100.0 + plan.negative_texts.index(_a1111_text_at(negative_schedule, call))]
        expected += [10.0 + plan.texts.index(_a1111_text_at(schedule, call)) for schedule in positive]
        assert batch == expected, call
    # every distinct text once: a cat/dog x red/blue, tree, "" (after step 3)
    assert sorted(plan.texts) == sorted(["a cat red", "a cat blue", "a dog red", "a dog blue", " tree", " "])


def test_and_combines_as_a1111_composable_diffusion_to_1e6():
    """A1111 combines the denoised latents x0 = x - σ·ε: u + Σ (c_i - u)·w_i·s; sdadapt the ε (the same affine
    map, its coefficients summing to 1). A float64 stand-in, so only the formula can differ."""
    plan = plan_prompt("a AND b:0.7 AND c:-0.4", "n", steps=4)
    assert [w for _, w in plan.parts] == [1.0, 0.7, -0.4]
    g = torch.Generator().manual_seed(3)
    conds = [torch.randn(1, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    uncond = torch.randn(1, 3, generator=g, dtype=torch.float64)

    def model(x, t, cond):  # nonlinear in x and the conditioning
        return torch.tanh(x * cond.sum(-1).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1) * 1e-3) + cond[:, :1, None, None] ** 2

    x, t, sigma, scale = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64), torch.tensor([500.0]), 2.5, 6.0
    out = plan.guidance(model, conds, [uncond], scale)(x, t)
    denoised = [x - sigma * model(x, t, c) for c in [uncond, *conds]]
    reference = denoised[0].clone()
    for d, w in zip(denoised[1:], (1.0, 0.7, -0.4)):
        reference += (d - denoised[0]) * (w * scale)
    assert torch.allclose(x - sigma * out, reference, atol=1e-6, rtol=0)
    assert not torch.allclose(x - sigma * plan_prompt("a AND b AND c", "n", steps=4).guidance(
        model, conds, [uncond], scale)(x, t), reference, atol=1e-3)  # (the weights matter)
    # one sub-prompt with a weight (no AND): A1111 weighs it too, u + (c - u)·w·s
    single = plan_prompt("a:0.7", "n", steps=4)
    assert single.parts[0][1] == 0.7 and not single.plain
    for s in (scale, 1.0):  # (at cfg 1 too: only weight 1 at cfg 1 is the conditional output alone)
        out = single.guidance(model, conds[:1], [uncond], s)(x, t)
        reference = denoised[0] + (denoised[1] - denoised[0]) * (0.7 * s)
        assert torch.allclose(x - sigma * out, reference, atol=1e-6, rtol=0)


def test_and_parts_of_other_lengths_are_padded_with_their_last_state():
    """reconstruct_multicond_batch: each call's sub-prompts padded to the longest by repeating the last token."""
    plan = plan_prompt("a AND b", "n", steps=2)
    short, long = torch.arange(6.0).view(1, 2, 3), torch.ones(1, 4, 3)
    seen = []
    plan.guidance(lambda x, t, c: seen.append(c) or x.expand(c.shape[0], -1), [short, long], [torch.zeros(1, 3, 3)],
                  2.0)(torch.zeros(1, 1), torch.tensor([1.0]))
    padded = torch.tensor([[[0.0, 1, 2], [3, 4, 5], [3, 4, 5], [3, 4, 5]]])
    assert [c.shape[1] for c in seen] == [3, 4, 4]  # (the negative's other length: one call each)
    assert torch.equal(seen[1], padded) and torch.equal(seen[2], long)


def test_one_text_of_weight_one_is_plain_guidance():
    assert plan_prompt("a cat, (red:1.2)", "ugly", steps=5).plain
    assert plan_prompt("a [cat:cat:2]", "", steps=5).plain  # (both entries the same text)
    assert not plan_prompt("a cat:0.5", "", steps=5).plain
    assert not plan_prompt("a cat", "[x|y]", steps=5).plain


# ---- the tiny Stable Diffusion pipeline ---------------------------------------------------------------------

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline
    from test_generate_hypernetwork import _random_hypernetwork

    root = tmp_path_factory.mktemp("syntax")
    pipe = _tiny_pipeline(root / "pipe")
    from tiny_lora import tiny_lora_state

    state = tiny_lora_state(0)
    (root / "loras" / "sub").mkdir(parents=True)
    write_safetensors(root / "loras" / "sub" / "ink.safetensors", state, {})
    write_safetensors(root / "loras" / "renamed_v2.safetensors", state, {"ss_output_name": "inkwash"})
    (root / "hn").mkdir()
    sdadapt.save_hypernetwork(root / "hn" / "style.pt", _random_hypernetwork([32, 64], seed=0))
    return pipe, root


@pytest.fixture(scope="module")
def system(sd):
    from sdadapt.jobs.models import load_system

    return load_system(str(sd[0]), device="cpu")


def _image(system, prompt, negative="", *, plan=True, sampler="euler", steps=3):
    from sdadapt.sampling import generate

    built = plan_prompt(prompt, negative, steps=schedule_steps(sampler, steps)) if plan else None
    return generate(system, [prompt], negative=negative, seed=1, steps=steps, sampler=sampler, height=32, width=32,
                    plan=built)


# (prompts within the tiny tokenizer's 10-token window: a longer one is laid out in A1111's chunks)
@pytest.mark.parametrize("prompt", ["a photo", "a (photo:1.3) [cat]"])
def test_a_prompt_without_the_syntax_goes_through_the_job_exactly_as_before(sd, system, tmp_path, capsys, prompt):
    """The job reads such a prompt as a plain plan and samples the old way: the same PNG as generate() without a plan."""
    from sdadapt.images import write_png

    assert main(["generate", "--model", str(sd[0]), "--prompt", prompt, "--negative", "ugly", "--seed", "1",
                 "--steps", "3", "--sampler", "euler", "--width", "32", "--height", "32", "-o",
                 str(tmp_path / "cli.png")]) == 0
    assert "prompt schedule" not in capsys.readouterr().err
    from sdadapt.sampling import generate

    image = generate(system, [prompt], negative="ugly", seed=1, steps=3, sampler="euler", height=32, width=32)[0]
    write_png(tmp_path / "python.png", image)
    assert _pixels(tmp_path / "cli.png") == _pixels(tmp_path / "python.png")


def test_a_schedule_encodes_each_text_once_and_mixes_both_images(system):
    calls = []
    hook = system.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        mixed = _image(system, "a [cat:dog:0.5] AND sky:0.5", "[ugly|bad]", steps=4)
    finally:
        hook.remove()
    # one text-encoder call per schedule, its texts one batch (A1111's get_learned_conditioning): [a cat, a dog], sky;
    # [ugly, bad]
    assert len(calls) == 2 + 1
    cat, dog = _image(system, "a cat", plan=False, steps=4), _image(system, "a dog", plan=False, steps=4)
    assert not torch.equal(mixed, cat) and not torch.equal(mixed, dog)
    # a schedule that never switches ([cat:dog:10] over 4 steps) is the plain image bit for bit
    assert torch.equal(_image(system, "a [cat:dog:10]", steps=4), _image(system, "a cat", plan=False, steps=4))


def test_a_scheduled_text_keeps_its_emphasis(system, monkeypatch):
    """[(cat:1.5):dog:1] uses "(cat:1.5)" for calls 0 and 1: the same first step as the emphasised prompt."""
    run_sampler = samplers.sample_latents

    def steps_of(prompt, plan):
        seen = []

        def spy(*args, **kwargs):
            return run_sampler(*args, **kwargs, callback=lambda i, t, x: seen.append(x.clone()))

        monkeypatch.setattr(samplers, "sample_latents", spy)
        _image(system, prompt, plan=plan, steps=3)
        return seen

    scheduled, plain = steps_of("a [(cat:1.5):dog:1]", True), steps_of("a [cat:dog:1]", True)
    assert not torch.equal(scheduled[0], plain[0]) and torch.equal(scheduled[-1], plain[-1]) is False


def test_a_schedules_texts_are_one_batch_as_a1111_encodes_them(sd):
    """A1111 encodes one prompt's schedule texts in one call (prompt_parser.get_learned_conditioning): the "Original"
    emphasis mean (sd_emphasis.EmphasisOriginal: ``z.mean()``) is the batch's, so "(cat:1.5)" rescales "a dog" too,
    and every text is padded to the batch's chunk count."""
    from sdadapt.jobs.models import load_system
    from sdadapt.prompt_guidance import plan_prompt

    system = load_system(str(sd[0]), device="cpu")
    with torch.no_grad():  # (the tiny encoder's final LayerNorm gives states of mean ~1e-9, the rescale then rounding noise)
        next(m for n, m in system.text_encoder.named_modules() if n.endswith("final_layer_norm")).bias.add_(0.5)

    plan = plan_prompt("a [(cat:1.5):dog:0.5]", "", steps=4)
    conds, _ = system.plan_conditions(plan)
    weighted = system.tokenize_weighted(list(plan.texts), a1111=True)
    with torch.no_grad():
        z = system.condition(weighted["ids"]).double()  # (2, 77, D): the batch's plain states
    original_mean = z.mean()
    z = z * weighted["weights"].double().unsqueeze(-1)
    z = z * (original_mean / z.mean())
    for k, cond in enumerate(conds):
        torch.testing.assert_close(cond.double(), z[k:k + 1], rtol=0, atol=1e-5)
    with torch.no_grad():  # (alone, "a dog" would be its plain states: the batch rescaled it)
        alone = system.condition(system.tokenize(["a dog"]))
    assert float((conds[plan.texts.index("a dog")] - alone).abs().max()) > 1e-4


def _cli(sd, out, prompt, *extra):
    return main(["generate", "--model", str(sd[0]), "--prompt", prompt, "--seed", "1", "--steps", "2",
                 "--width", "32", "--height", "32", "-q", "-o", str(out), *extra])


def test_lora_tags_apply_what_lora_applies(sd, tmp_path):
    root = sd[1]
    ink = root / "loras" / "sub" / "ink.safetensors"
    assert _cli(sd, tmp_path / "flag.png", "a cat", "--lora", f"{ink}:0.7") == 0
    assert _cli(sd, tmp_path / "tag.png", "a cat <lora:ink:0.7>", "--lora-dir", str(root / "loras")) == 0
    assert _cli(sd, tmp_path / "lyco.png", "a <lyco:ink:te=0.7:unet=0.7>cat", "--lora-dir", str(root / "loras")) == 0
    assert _cli(sd, tmp_path / "alias.png", "a cat <lora:inkwash:0.7>", "--lora-dir", str(root / "loras")) == 0
    assert _cli(sd, tmp_path / "plain.png", "a cat") == 0
    flag = _pixels(tmp_path / "flag.png")
    assert _pixels(tmp_path / "tag.png") == flag == _pixels(tmp_path / "lyco.png")
    assert _pixels(tmp_path / "alias.png") == flag  # (found by its ss_output_name, as A1111's alias)
    assert flag != _pixels(tmp_path / "plain.png")


def test_separate_text_encoder_and_unet_multipliers(sd, system):
    import copy

    from sdadapt.jobs.generate import _apply_lora_file

    ink = sd[1] / "loras" / "sub" / "ink.safetensors"
    loaded = system  # (the module's tiny SD, loaded once; each case applies the file to a fresh copy of it)
    te_key = "encoder.layers.0.self_attn.q_proj.weight"  # (without transformers 4's "text_model.")
    unet_key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    weights = {}
    for name, scale, unet_scale in (("both", 0.7, 0.2), ("te", 0.7, None), ("unet", 0.2, None)):
        system = copy.deepcopy(loaded)
        report = _apply_lora_file(system, ink, scale, unet_scale=unet_scale, option="<lora:ink:0.7:0.2>")
        assert report["layers"] == 2
        te_state = {k.removeprefix("text_model."): v for k, v in system.text_encoder.state_dict().items()}
        weights[name] = (te_state[te_key], system.unet.state_dict()[unet_key])
    assert torch.equal(weights["both"][0], weights["te"][0]) and torch.equal(weights["both"][1], weights["unet"][1])
    assert not torch.equal(weights["both"][1], weights["te"][1])


def test_hypernet_tags_apply_what_hypernetwork_applies(sd, tmp_path):
    root = sd[1]
    assert _cli(sd, tmp_path / "flag.png", "a cat", "--hypernetwork", f"{root / 'hn' / 'style.pt'}:0.5") == 0
    assert _cli(sd, tmp_path / "tag.png", "<hypernet:style:0.5>a cat", "--hypernetwork-dir", str(root / "hn")) == 0
    assert _pixels(tmp_path / "tag.png") == _pixels(tmp_path / "flag.png")


def test_tag_refusals_name_the_tag_and_the_fix(sd, tmp_path, capsys):
    root = sd[1]
    capsys.readouterr()
    assert _cli(sd, tmp_path / "a.png", "a <lora:ink:0.5>") != 0
    assert "--lora-dir" in capsys.readouterr().err
    assert _cli(sd, tmp_path / "b.png", "a <lora:inky:0.5>", "--lora-dir", str(root / "loras")) != 0
    assert "'inky'" in (err := capsys.readouterr().err) and "ink" in err


# ---- BREAK: A1111's chunks, emphasised and mean-restored per chunk --------------------------------------------

def _a1111_tokenize_line(tokenizer, line, *, backtrack=20, embeddings=()):
    """sd_hijack_clip.tokenize_line transcribed: [(tokens, multipliers)] per chunk. ``embeddings``: token-id runs
    that stand for one textual-inversion embedding of that many vectors (A1111 finds them with
    ``find_embedding_at_position``; here they keep their ids where A1111 writes 0 placeholders)."""
    from sdadapt.clip_tokenizer import special_token_ids
    from sdadapt.prompt_weights import _piece_ids, parse_prompt_attention

    start, end, pad = special_token_ids(tokenizer)
    chunk_length = tokenizer.model_max_length - 2
    comma_token = _piece_ids(tokenizer, ",")[0]
    parsed = parse_prompt_attention(line, breaks=True)
    chunks, chunk, last_comma = [], {"t": [], "m": []}, -1

    def next_chunk():
        nonlocal chunk, last_comma
        to_add = chunk_length - len(chunk["t"])
        if to_add > 0:
            chunk["t"] += [end] * to_add
            chunk["m"] += [1.0] * to_add
        tokens = [start] + chunk["t"] + [end]
        if end != pad:  # process_tokens
            first = tokens.index(end)
            tokens[first + 1:] = [pad] * (len(tokens) - first - 1)
        chunks.append((tokens, [1.0] + chunk["m"] + [1.0]))
        last_comma, chunk = -1, {"t": [], "m": []}

    for text, weight in parsed:
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        tokens, position = _piece_ids(tokenizer, text), 0
        while position < len(tokens):
            token = tokens[position]
            found = next((run for run in embeddings if tuple(tokens[position:position + len(run)]) == run), None)
            if token == comma_token:
                last_comma = len(chunk["t"])
            elif backtrack and len(chunk["t"]) == chunk_length and last_comma != -1 \
                    and len(chunk["t"]) - last_comma <= backtrack:
                at = last_comma + 1
                reloc_t, reloc_m = chunk["t"][at:], chunk["m"][at:]
                chunk["t"], chunk["m"] = chunk["t"][:at], chunk["m"][:at]
                next_chunk()
                chunk["t"], chunk["m"] = reloc_t, reloc_m
            if len(chunk["t"]) == chunk_length:
                next_chunk()
            if found is None:
                chunk["t"].append(token)
                chunk["m"].append(weight)
                position += 1
                continue
            if len(chunk["t"]) + len(found) > chunk_length:
                next_chunk()
            chunk["t"] += list(found)
            chunk["m"] += [weight] * len(found)
            position += len(found)
    if chunk["t"] or not chunks:
        next_chunk()
    return chunks


_WORDS = ["a", "cat", ",", " ", "BREAK", "(", ")", "[", "]", ":1.3)", "photo", "of", "sky,", "x y z"]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=24), st.sampled_from([0, 2, 3, 4, 20]))
def test_break_chunks_are_a1111s(system, words, backtrack):
    from sdadapt.prompt_chunks import prompt_chunks

    line = " ".join(words)
    ids, weights = prompt_chunks(system.tokenizer, line, comma_backtrack=backtrack)
    expected = _a1111_tokenize_line(system.tokenizer, line, backtrack=backtrack)
    assert ids.tolist() == [tokens for tokens, _ in expected]
    assert torch.allclose(weights, torch.tensor([m for _, m in expected]), atol=0, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([*_WORDS, "emb", "(emb:1.2)", "duo"]), max_size=24), st.sampled_from([0, 3, 20]))
def test_a_multi_vector_embedding_that_does_not_fit_starts_the_next_chunk_as_in_a1111(sd, words, backtrack):
    """A 4-vector and a 2-vector embedding (their expanded tokens added as inject_embedding adds them) move whole
    to the next chunk when they do not fit, as A1111's tokenize_line moves them."""
    from sdadapt.embeddings.tokens import expand_prompt, token_strings
    from sdadapt.prompt_chunks import prompt_chunks

    tokenizer = _tokenizer_with_embeddings(str(sd[0] / "tokenizer"))
    line = expand_prompt(expand_prompt(" ".join(words), "emb", 4), "duo", 2)
    runs = [tuple(tokenizer.convert_tokens_to_ids(token_strings(name, k))) for name, k in (("emb", 4), ("duo", 2))]
    ids, weights = prompt_chunks(tokenizer, line, comma_backtrack=backtrack)
    expected = _a1111_tokenize_line(tokenizer, line, backtrack=backtrack, embeddings=runs)
    assert ids.tolist() == [tokens for tokens, _ in expected]
    assert torch.allclose(weights, torch.tensor([m for _, m in expected]), atol=0, rtol=1e-6)


@functools.lru_cache(maxsize=1)
def _tokenizer_with_embeddings(folder):
    from transformers import AutoTokenizer

    from sdadapt.embeddings.tokens import token_strings

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([*token_strings("emb", 4), *token_strings("duo", 2)])
    return tokenizer


def test_break_starts_a_chunk_padded_as_a1111(system):
    from sdadapt.clip_tokenizer import special_token_ids
    from sdadapt.prompt_chunks import prompt_chunks
    from sdadapt.prompt_weights import _piece_ids

    bos, eos, _ = special_token_ids(system.tokenizer)
    cat, dog = _piece_ids(system.tokenizer, "cat"), _piece_ids(system.tokenizer, "dog")
    ids, weights = prompt_chunks(system.tokenizer, "cat BREAK (dog:1.5) BREAK")
    width = system.tokenizer.model_max_length
    assert ids.tolist() == [[bos, *cat] + [eos] * (width - 1 - len(cat)), [bos, *dog] + [eos] * (width - 1 - len(dog))]
    assert weights[1, 1:1 + len(dog)].tolist() == [1.5] * len(dog) and weights[0].tolist() == [1.0] * width
    assert prompt_chunks(system.tokenizer, "")[0].tolist() == [[bos] + [eos] * (width - 1)]


@pytest.mark.parametrize("backtrack", [2, 3])
def test_the_comma_rule_at_its_reach(system, backtrack):
    """A full chunk (C - 2 = 10 tokens here) whose comma is 3 tokens back: moved with a reach of 3, not of 2."""
    from sdadapt.prompt_chunks import prompt_chunks

    line = "a a a a a a a , a a cat"
    ids, _ = prompt_chunks(system.tokenizer, line, comma_backtrack=backtrack)
    assert ids.tolist() == [t for t, _ in _a1111_tokenize_line(system.tokenizer, line, backtrack=backtrack)]
    from sdadapt.clip_tokenizer import special_token_ids
    from sdadapt.prompt_weights import _piece_ids

    (comma_id,), eos = _piece_ids(system.tokenizer, ","), special_token_ids(system.tokenizer)[1]
    first = ids[0].tolist()
    assert (first[first.index(comma_id) + 1] == eos) == (backtrack == 3)  # (cut after the comma, padded)


def test_break_conditioning_is_a1111s_per_chunk_emphasis(sd):
    """Chunks encoded alone, states × weights, each chunk rescaled to its own unweighted mean (float64
    reference), joined (1, n·C, D)."""
    from sdadapt.jobs.models import load_system
    from sdadapt.prompt_chunks import prompt_chunks

    system = load_system(str(sd[0]), device="cpu")
    with torch.no_grad():  # (the random final norm has no bias: every state's mean would be ~0, the rescale ill-posed)
        encoder = getattr(system.text_encoder, "text_model", system.text_encoder)  # (transformers 4 / 5)
        encoder.final_layer_norm.bias.copy_(torch.linspace(0.2, 1.0, 32))

    prompt = "a (photo:1.4) of a cat, sky BREAK [dog] , x y z (sky:0.7)"
    cond = system._prompt_condition([prompt], None, breaks=True)
    ids, weights = prompt_chunks(system.tokenizer, prompt)
    window = system.tokenizer.model_max_length
    assert ids.shape[0] >= 3 and cond.shape == (1, ids.shape[0] * window, 32)
    for j in range(ids.shape[0]):
        plain = system.text_encoder(ids[j:j + 1]).last_hidden_state.double()  # (1, C, D)
        weighted = plain * weights[j].double()[None, :, None]
        reference = weighted * (plain.mean() / weighted.mean())
        assert torch.allclose(cond[:, j * window:(j + 1) * window].double(), reference, atol=1e-5, rtol=1e-5), j
    # a prompt without BREAK that fits one window keeps the one-window layout
    assert system._prompt_condition(["a (photo:1.4) cat"], None, breaks=True).shape == (1, window, 32)
    # without breaks= (kohya's sample prompts in training) BREAK is a word: the one window, as before
    word = system._prompt_condition([prompt], None)
    assert word.shape == (1, window, 32)
    weighted = system.tokenize_weighted([prompt])
    assert torch.equal(word, system._emphasised(weighted["ids"], weighted["weights"], None))


def test_break_reaches_generate_but_not_the_training_samples(sd, system, tmp_path):
    """The job keeps a plan for a BREAK prompt (A1111's chunks); kohya's sample prompts (generate() without a
    plan, as train's samples call it) read BREAK as a word, as kohya's sample images do."""
    from sdadapt.images import write_png
    from sdadapt.sampling import generate

    prompt = "a cat BREAK a dog"
    assert main(["generate", "--model", str(sd[0]), "--prompt", prompt, "--seed", "1", "--steps", "2",
                 "--sampler", "euler", "--width", "32", "--height", "32", "-q", "-o", str(tmp_path / "cli.png")]) == 0
    chunked = _image(system, prompt, steps=2)
    word = generate(system, [prompt], seed=1, steps=2, sampler="euler", height=32, width=32)
    assert not torch.equal(chunked, word)
    write_png(tmp_path / "chunked.png", chunked[0])
    assert _pixels(tmp_path / "cli.png") == _pixels(tmp_path / "chunked.png")


def test_a_long_prompt_is_laid_out_in_a1111s_chunks_unless_a_kohya_length_is_set(sd, system, tmp_path):
    """A prompt over one window (no BREAK): the job lays it out as A1111 does (chunks cut at a comma, every token
    kept; each chunk encoded alone), the same PNG as its plan through generate(); ``--max-token-length 150`` keeps
    kohya's joined windows, and the system without breaks= (kohya's sample prompts) its one truncated window."""
    from sdadapt.images import write_png
    from sdadapt.prompt_chunks import needs_chunks, prompt_chunks

    window = system.tokenizer.model_max_length
    prompt = ", ".join(f"cat dog sky{i % 3}" if i % 2 else "a photo" for i in range(window))  # (several windows)
    ids, weights = prompt_chunks(system.tokenizer, prompt)
    assert ids.shape[0] >= 2 and needs_chunks(system.tokenizer, prompt)
    assert not needs_chunks(system.tokenizer, "a (photo:1.4) cat")  # (9 of the tiny tokenizer's 10 tokens)
    with torch.no_grad():
        cond = system._prompt_condition([prompt], None, breaks=True)
        assert cond.shape == (1, ids.shape[0] * window, 32)
        for j in range(ids.shape[0]):  # (no emphasis: each chunk's states are the encoder's on its ids)
            plain = system.text_encoder(ids[j:j + 1]).last_hidden_state
            assert torch.allclose(cond[:, j * window:(j + 1) * window], plain, atol=1e-6), j
        assert system._prompt_condition([prompt], None).shape == (1, window, 32)  # (kohya: one window, cut)
    base = ["generate", "--model", str(sd[0]), "--prompt", prompt, "--seed", "1", "--steps", "2", "--sampler",
            "euler", "--width", "32", "--height", "32", "-q"]
    assert main([*base, "-o", str(tmp_path / "a1111.png")]) == 0
    write_png(tmp_path / "planned.png", _image(system, prompt, steps=2)[0])
    assert _pixels(tmp_path / "a1111.png") == _pixels(tmp_path / "planned.png")
    assert main([*base, "--max-token-length", "150", "-o", str(tmp_path / "kohya.png")]) == 0
    assert _pixels(tmp_path / "kohya.png") != _pixels(tmp_path / "a1111.png")


def test_break_prompts_sample_and_and_parts_of_other_lengths_are_padded(system):
    image = _image(system, "a cat BREAK sky AND dog:0.5", "ugly BREAK bad BREAK worse", steps=2)
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.parametrize(("sampler", "factor"), [("heun", 2), ("DPM++ SDE", 2), ("euler_a", 1)])
def test_the_job_builds_the_schedule_for_a1111s_step_count(tmp_path, monkeypatch, sampler, factor):
    """generate --steps 3 with a second-order sampler: the prompt schedule is built for 6 steps (A1111's total_steps)."""
    import sdadapt.prompt_guidance as guidance
    from sdadapt.jobs.generate import run_generate

    built = []

    class Planned(Exception):
        pass

    def spy(*args, **kwargs):  # (records the steps the job plans for, then stops it: the sampling is not under test)
        built.append(kwargs["steps"])
        raise Planned

    monkeypatch.setattr(guidance, "plan_prompt", spy)
    with pytest.raises(Planned):
        run_generate(prompt="a [red:blue:0.5] shape", out=tmp_path / "s.png", steps=3, sampler=sampler)
    assert built == [3 * factor]


def test_the_toy_reads_schedules_through_the_system_protocol(tmp_path):
    from sdadapt.jobs.generate import run_generate

    logs = []
    # (4 steps: [red:blue:0.5] switches after the second; [red:blue:9] never does. Not 2: the toy's DDIM returns x̂0 of
    # its last step, at t = 1 with 2 steps, where ᾱ ≈ 1 leaves a switch there below one 8-bit level)
    run_generate(prompt="a [red:blue:0.5] shape", out=tmp_path / "s.png", steps=4, log=logs.append)
    run_generate(prompt="a red shape", out=tmp_path / "r.png", steps=4)
    run_generate(prompt="a [red:blue:9] (shape)", out=tmp_path / "same.png", steps=4, log=logs.append)
    assert logs[0] == "prompt schedule: 2 texts, 1 AND part, 1 negative text"
    assert _pixels(tmp_path / "s.png") != _pixels(tmp_path / "r.png")
    assert _pixels(tmp_path / "same.png") == _pixels(tmp_path / "r.png")  # (never switches: plain)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system

    return load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("xl") / "xl.safetensors")), device="cpu")


def test_sdxl_break_chunks_are_the_chunks_alone_with_the_first_chunks_pooled_output(sdxl):
    system = sdxl
    with torch.no_grad():
        both = system._prompt_condition(["a cat BREAK a dog"], None, breaks=True)
        cat, dog = system._prompt_condition(["a cat"], None), system._prompt_condition(["a dog"], None)
    window = system.tokenizer.model_max_length
    assert both["context"].shape[1] == 2 * window
    assert torch.equal(both["context"][:, :window], cat["context"])
    assert torch.equal(both["context"][:, window:], dog["context"])
    assert torch.equal(both["text_embeds"], cat["text_embeds"]) and torch.equal(both["time_ids"], cat["time_ids"])


def test_sdxl_zeros_an_empty_negative_only_when_its_whole_schedule_is_empty(sdxl, monkeypatch):
    """A1111 zeros SDXL's negative when every text of its batch is '' (the schedule's texts are one batch):
    "" alone is zeros, "" beside "ugly" in [|ugly] is the encoded empty prompt."""
    system = sdxl
    seen = []

    def spy(model, x, *args, **kwargs):
        seen.append(model)
        return x

    monkeypatch.setattr(samplers, "sample_latents", spy)
    for negative in ("", "[|ugly]"):
        plan = plan_prompt("a cat AND a dog", negative, steps=2)
        system.sample(["a cat"], steps=2, sampler="euler", plan=plan, height=system.size_multiple,
                      width=system.size_multiple)
    alone, scheduled = seen[0].negative_conds, seen[1].negative_conds
    assert len(alone) == 1 and not alone[0]["context"].any() and not alone[0]["text_embeds"].any()
    assert seen[1].plan.negative_texts == ("", "ugly") and scheduled[0]["context"].abs().sum() > 0
    with torch.no_grad():
        empty = system._prompt_condition([""], scheduled[0]["time_ids"])
    assert torch.equal(scheduled[0]["context"], empty["context"])




def test_an_empty_sdxl_negative_is_the_zeroed_empty_prompt_so_padding_can_pad_it(tmp_path):
    """A1111 / Forge zero the encoded "" (one 77-token window, sdxl.py get_learned_conditioning), which "Pad
    prompt/negative prompt" then pads with ""'s states up to a long prompt's length; sdadapt zeroed it at the
    prompt's length, so there was nothing to pad."""
    from tiny_systems import tiny_diffusers_system

    from sdadapt.prompt_guidance import plan_prompt

    xl = tiny_diffusers_system(tmp_path / "xl", max_token_length=75, sdxl=True)
    plan = plan_prompt(" ".join(["cube"] * 40), "", steps=4)  # (several 77-token windows)
    conds, negatives = xl.plan_conditions(plan)
    assert conds[0]["context"].shape[1] > 77 and conds[0]["context"].shape[1] % 77 == 0
    assert negatives[0]["context"].shape[1] == 77 and not negatives[0]["context"].any()
    assert not negatives[0]["text_embeds"].any() and torch.equal(negatives[0]["time_ids"], conds[0]["time_ids"])
