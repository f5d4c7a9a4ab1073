"""File-format leftovers: compiled-model layer names in old files, A1111's partial-word embedding matches,
peft folders for transformers-5 text encoders (docs/formats.md, docs/textual-inversion.md)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from embedding_models import tokenizer_snapshot
from tiny_models import run_unet, tiny_clip, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs

import sdadapt
from sdadapt.formats import load_lora, save_kohya, save_peft
from sdadapt.formats.detect import describe_file
from sdadapt.formats.diffusers import _config_for, _peft_keys
from sdadapt.formats.layers import canonical_state, resolve_layers, split_key, strip_compiled_segments
from sdadapt.targets import TEXT_ENCODER, UNET_KOHYA

# ------------------------------------------------------------------ 1. `_orig_mod` names of compiled models


def _trained(model, targets, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA state of ``model`` (live names) with a different alpha per layer (the patterns matter)."""
    handle = sdadapt.inject(model, targets, sdadapt.LoRAConfig(rank=4, alpha=2))
    g = torch.Generator().manual_seed(seed)
    state = {}
    layers: dict[str, int] = {}
    for key, value in handle.state_dict().items():
        i = layers.setdefault(split_key(key)[0], len(layers))
        state[key] = torch.tensor(float(1 + i % 3)) if key.endswith(".alpha") else torch.randn(value.shape, generator=g) * 0.1
    handle.remove()
    return state


def _wrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The names a torch.compile'd model gave the same layers before sdadapt unwrapped it."""
    return {f"_orig_mod.{key}": value for key, value in state.items()}


def _old_kohya(prefixes: dict[str, str], components: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """What the old ``to_kohya`` wrote for ``_orig_mod.``-named states: the path unchanged (neither the
    transformers-5 ``text_model.`` rule nor SDXL's LDM renaming matched it), dots to underscores."""
    out = {}
    for component, state in components.items():
        for key, value in _wrapped(state).items():
            layer, suffix = split_key(key)
            out[f"{prefixes[component]}_{layer.replace('.', '_')}.{suffix}"] = value.float() if suffix == "alpha" else value
    return out


@pytest.fixture(scope="module")
def sd1_lora():
    unet, clip = tiny_unet_sd1(), tiny_clip()
    return unet, clip, {"unet": _trained(unet, UNET_KOHYA, 1), "text_encoder": _trained(clip, TEXT_ENCODER, 2)}


def _same_components(got, want) -> None:
    assert sorted(got) == sorted(want)
    for component in want:
        assert sorted(got[component]) == sorted(want[component]), component
        for key, value in want[component].items():
            assert torch.equal(got[component][key], value), key


def test_strip_compiled_segments_drops_whole_segments_only():
    assert strip_compiled_segments("_orig_mod.down_blocks.0.to_q") == "down_blocks.0.to_q"
    assert strip_compiled_segments("down_blocks._orig_mod.0") == "down_blocks.0"
    assert strip_compiled_segments("my_orig_mod.x") == "my_orig_mod.x"
    assert strip_compiled_segments("a._orig_mod_b.c") == "a._orig_mod_b.c"


def test_old_kohya_file_of_a_compiled_sd1_model_loads_as_the_clean_file(sd1_lora, tmp_path):
    """Old sdadapt wrote ``lora_unet__orig_mod_down_blocks_...`` / ``lora_te__orig_mod_encoder_layers_...``;
    underscore_to_path made ``.orig.mod.`` of them and nothing loaded: now every reader gives the clean names."""
    unet, clip, components = sd1_lora
    clean = tmp_path / "clean.safetensors"
    save_kohya(clean, components)
    old = tmp_path / "old.safetensors"
    save_file(_old_kohya({"unet": "lora_unet", "text_encoder": "lora_te"}, components), old,
              metadata=_metadata(clean))
    assert any(k.startswith("lora_unet__orig_mod_down_blocks_") for k in load_file(old))
    _same_components(load_lora(old)[0], load_lora(clean)[0])

    # inspect: the same layers, ranks, alphas and components as the clean file
    keep = ("kind", "modules", "components", "ranks", "alphas", "family", "algorithms", "tensors")
    got, want = describe_file(old), describe_file(clean)
    assert {k: got.get(k) for k in keep} == {k: want.get(k) for k in keep}

    # convert writes the clean names: the kohya rewrite of the old file is the clean file, tensor for tensor
    from sdadapt.loratools.convert import convert_lora

    rewritten = tmp_path / "rewritten.safetensors"
    convert_lora(old, rewritten, to="kohya", dtype=torch.float32)
    want_tensors, got_tensors = load_file(clean), load_file(rewritten)
    assert sorted(got_tensors) == sorted(want_tensors)
    assert all(torch.equal(got_tensors[k], v) for k, v in want_tensors.items())
    for to, out in (("diffusers", tmp_path / "a.safetensors"), ("peft", tmp_path / "peft")):
        convert_lora(old, out, to=to, component="unet" if to == "peft" else None)
    assert not any("orig" in k for k in load_file(tmp_path / "a.safetensors"))


def _metadata(path) -> dict[str, str]:
    from sdadapt.formats.files import read_safetensors_header

    return dict(read_safetensors_header(path)[1])


def test_old_sdxl_kohya_file_names_diffusers_paths_and_loads(tmp_path):
    """SDXL: the old writer's LDM renaming did not match ``_orig_mod.down_blocks...``, so the file held diffusers
    paths behind ``lora_unet__orig_mod_``; read, they are the clean SDXL file's layers."""
    unet = tiny_unet_sdxl()
    components = {"unet": _trained(unet, UNET_KOHYA, 3)}
    clean = tmp_path / "clean.safetensors"
    save_kohya(clean, components, base_model="sdxl")
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(clean))
    old = tmp_path / "old.safetensors"
    save_file(_old_kohya({"unet": "lora_unet"}, components), old, metadata=_metadata(clean))
    _same_components(load_lora(old)[0], load_lora(clean)[0])


def test_old_diffusers_and_peft_files_with_wrapper_names_load_with_their_alphas(sd1_lora, tmp_path):
    """diffusers/peft files of a compiled model: ``unet._orig_mod.…`` keys and ``_orig_mod.…`` alpha patterns
    (what the old ``to_diffusers``/``to_peft`` wrote, through the same helpers). The per-layer alphas are read
    through the file's own pattern names, then the names are cleaned."""
    _, _, components = sd1_lora
    state, config = {}, {}
    for component, comp_state in components.items():
        wrapped = _wrapped(comp_state)
        state.update(_peft_keys(wrapped, f"{component}."))
        config.update({f"{component}.{k}": v for k, v in _config_for(wrapped).items()})
    assert any("_orig_mod." in k for k in config["unet.alpha_pattern"])
    old = tmp_path / "old.safetensors"
    save_file(state, old, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    want = {c: canonical_state(c, s) for c, s in components.items()}
    _same_components(load_lora(old)[0], want)

    folder = tmp_path / "peft"
    folder.mkdir()
    wrapped = _wrapped(components["unet"])
    save_file(_peft_keys(wrapped, "base_model.model."), folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **_config_for(wrapped)}))
    _same_components(load_lora(folder)[0], {"model": components["unet"]})


def test_apply_lora_places_wrapper_named_layers_on_the_model(sd1_lora):
    """A state kept with the old names (``handle.state_dict()`` of a compiled model, saved with torch.save)
    applies to the plain and to a compiled model, with the clean state's output."""
    unet, _, components = sd1_lora
    state = components["unet"]
    wrapped = _wrapped(state)
    assert resolve_layers(unet, sorted({split_key(k)[0] for k in wrapped})) == {
        f"_orig_mod.{layer}": layer for layer in {split_key(k)[0] for k in state}}
    inputs = unet_inputs(unet)
    with torch.no_grad():
        applied = sdadapt.apply_lora(unet, state)
        want = run_unet(unet, inputs)
        applied.undo()
        base = run_unet(unet, inputs)
        applied = sdadapt.apply_lora(unet, wrapped)
        got = run_unet(unet, inputs)
        applied.undo()
    assert not torch.equal(want, base)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------ 3. peft folders for SDXL's two text encoders


def _clip_config(width: int):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTextConfig(hidden_size=width, intermediate_size=width + 5, num_attention_heads=4,
                                       num_hidden_layers=2, vocab_size=99, bos_token_id=0, eos_token_id=2,
                                       pad_token_id=1, projection_dim=16)


@pytest.fixture(scope="module")
def sdxl_encoders(tmp_path_factory):
    """A tiny SDXL's encoders of different widths (CLIPTextModel 32 wide, CLIPTextModelWithProjection 16 wide:
    a folder for one fits only that one) and their LoRA as an SDXL kohya file."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    encoders = {"text_encoder": transformers.CLIPTextModel(_clip_config(32)).eval(),
                "text_encoder_2": transformers.CLIPTextModelWithProjection(_clip_config(16)).eval()}
    components = {name: _trained(model, TEXT_ENCODER, 4 + i) for i, (name, model) in enumerate(encoders.items())}
    path = tmp_path_factory.mktemp("sdxl") / "te.safetensors"
    save_kohya(path, components, base_model="sdxl")
    return encoders, path


def _encode(model) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 17, 40, 2, 1]])
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.last_hidden_state


def _peft_output(model, folder) -> tuple[torch.Tensor, int]:
    """``PeftModel.from_pretrained``'s output on a copy of ``model`` and how many layers it adapted."""
    import copy

    peft = pytest.importorskip("peft")
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    adapted = sum(1 for _, module in wrapped.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer))
    return _encode(wrapped), adapted


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
def test_peft_folders_of_canonical_text_encoder_states_load_into_transformers5_encoders(sdxl_encoders, tmp_path,
                                                                                        component):
    """``load_lora`` gives ``text_model.`` names for both SDXL encoders; transformers 5's CLIPTextModel has no
    ``text_model`` module (CLIPTextModelWithProjection has), so a folder written with the names as given (neither
    ``model=`` nor ``component=``, the default) makes peft refuse the first encoder ("Target modules ... not found")
    and fits the second. Written with ``model=``, with ``component=`` and by ``convert --to peft --component``, peft
    adapts every layer of either and gives sdadapt's output."""
    import copy

    from sdadapt.loratools.convert import convert_lora

    encoders, kohya_file = sdxl_encoders
    model = encoders[component]
    state = load_lora(kohya_file)[0][component]
    assert all(key.startswith("text_model.") for key in state)
    layers = len({split_key(k)[0] for k in state})
    save_peft(tmp_path / "given", state)  # (neither model= nor component=: the names as given, `text_model.`)
    assert all(k.startswith("base_model.model.text_model.") for k in load_file(tmp_path / "given" / "adapter_model.safetensors"))

    ours = copy.deepcopy(model)
    applied = sdadapt.apply_lora(ours, state)
    want = _encode(ours)
    applied.undo()
    assert not torch.allclose(want, _encode(model))
    save_peft(tmp_path / "model", state, model=model)
    save_peft(tmp_path / "compiled", state, model=torch.compile(model, backend="eager"))
    assert load_file(tmp_path / "compiled" / "adapter_model.safetensors").keys() == load_file(
        tmp_path / "model" / "adapter_model.safetensors").keys()
    save_peft(tmp_path / "component", state, component=component)
    convert_lora(kohya_file, tmp_path / "converted", to="peft", component=component)
    from transformers_versions import TRANSFORMERS_5

    if component == "text_encoder" and TRANSFORMERS_5:  # (its CLIPTextModel has no text_model: the docs' reason for component=)
        with pytest.raises(ValueError, match="Target modules"):
            _peft_output(model, tmp_path / "given")
    for folder in ("model", "component", "converted") + (("given",) if component == "text_encoder_2" else ()):
        keys = load_file(tmp_path / folder / "adapter_model.safetensors")
        live = {name for name, _ in model.named_modules()}
        assert {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys} <= live, folder
        got, adapted = _peft_output(model, tmp_path / folder)
        assert adapted == layers, folder
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=folder)


# ------------------------------------------------------------------ 2. A1111's matching of a vocabulary-word embedding

#: a tiny CLIP BPE where ``tomcat`` -> ``tom`` + ``cat</w>``, ``bobcat`` -> ``b o b cat</w>``, ``cats`` -> ``cat s</w>``
_MERGES = [("c", "a"), ("ca", "t</w>"), ("ca", "t"), ("t", "o"), ("to", "m"), ("to", "m</w>")]


@pytest.fixture(scope="module")
def tomcat_tokenizer():
    from sdadapt.clip_tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer(_MERGES, max_length=77).to_transformers()
    assert tokenizer.convert_ids_to_tokens(tokenizer("tomcat", add_special_tokens=False).input_ids) == ["tom", "cat</w>"]
    return tokenizer


def _a1111_rows(tokenizer, table: torch.nn.Embedding, prompt: str, name: str, vectors: torch.Tensor):
    """A1111's encoder input for ``prompt`` with the embedding ``name`` loaded: a transcription of
    ``modules/sd_hijack_clip.py`` ``tokenize_line`` (emphasis on, comma backtrack off, no BREAK) with
    ``modules/textual_inversion/textual_inversion.py`` ``EmbeddingDatabase.find_embedding_at_position`` and
    ``modules/sd_hijack.py`` ``EmbeddingsWithFixes`` (vectors written at ``offset + 1``).

    Returns ``(rows (n, 77, D) float64, multipliers (n, 77))``."""
    from sdadapt.prompt_weights import parse_prompt_attention

    def tokenize(text):  # (A1111's FrozenCLIPEmbedder.tokenize: no BOS/EOS, no truncation)
        return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)

    name_ids = tokenize(name)
    start, end, length = tokenizer.bos_token_id, tokenizer.eos_token_id, 75
    chunks, chunk = [], {"tokens": [], "multipliers": [], "fixes": []}

    def next_chunk():
        nonlocal chunk
        fill = length - len(chunk["tokens"])
        chunk["tokens"] = [start, *chunk["tokens"], *[end] * fill, end]
        chunk["multipliers"] = [1.0, *chunk["multipliers"], *[1.0] * fill, 1.0]
        chunks.append(chunk)
        chunk = {"tokens": [], "multipliers": [], "fixes": []}

    for text, weight in parse_prompt_attention(prompt):
        tokens, position = tokenize(text), 0
        while position < len(tokens):
            if len(chunk["tokens"]) == length:
                next_chunk()
            if tokens[position : position + len(name_ids)] != name_ids:
                chunk["tokens"].append(tokens[position])
                chunk["multipliers"].append(weight)
                position += 1
                continue
            if len(chunk["tokens"]) + len(vectors) > length:
                next_chunk()
            chunk["fixes"].append(len(chunk["tokens"]))
            chunk["tokens"] += [0] * len(vectors)
            chunk["multipliers"] += [weight] * len(vectors)
            position += len(name_ids)
    if chunk["tokens"] or not chunks:
        next_chunk()
    rows = table.weight.detach().double()[torch.tensor([c["tokens"] for c in chunks])]
    for row, c in zip(rows, chunks):
        for offset in c["fixes"]:
            emb_len = min(row.shape[0] - offset - 1, len(vectors))
            row[offset + 1 : offset + 1 + emb_len] = vectors[:emb_len].double()
    return rows, torch.tensor([c["multipliers"] for c in chunks])


_PROMPTS = [
    "a Cat, cats and a cat-cat (cat:1.1) concatenate cat2",
    "a tomcat, (tomcat:1.2) and [bobcat] on a catalog, tom cat",
    "(tom)(cat), ((tomcat)), tomcats",
    " ".join(["x"] * 73) + " tomcat and bobcat",  # a 3-vector embedding that does not fit starts the next chunk
]


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("prompt", _PROMPTS, ids=["words", "pieces", "merged-weights", "chunk-edge"])
def test_a_vocabulary_word_embedding_matches_the_last_bpe_piece_of_longer_words_as_a1111(tomcat_tokenizer, prompt,
                                                                                         count):
    """``cat.pt`` in A1111 is every ``cat</w>`` token of the tokenized prompt: the word, and the last piece of ``tomcat``
    / ``bobcat`` where the vocabulary splits them so (not ``cats`` = ``cat s</w>``, not ``catalog``); sdadapt replaced
    whole words only. The encoder input rows and the emphasis weights of sdadapt's A1111 chunks
    (``prompt_chunks(tokenizer, handle.expand(prompt))``) equal the transcription's, row for row."""
    from sdadapt.prompt_chunks import prompt_chunks

    torch.manual_seed(0)
    table = torch.nn.Embedding(len(tomcat_tokenizer) + 8, 16)
    vectors = torch.randn(count, 16, generator=torch.Generator().manual_seed(count))
    want_rows, want_weights = _a1111_rows(tomcat_tokenizer, table, prompt, "cat", vectors)
    handle = sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("cat", {"text_encoder": vectors}))
    try:
        expanded = handle.expand(prompt)
        assert handle.expand(expanded) == expanded
        ids, weights = prompt_chunks(tomcat_tokenizer, expanded)
        with torch.no_grad():
            got = table(ids).double()
    finally:
        handle.remove()
    matched = sum(torch.equal(row, vectors[0].double()) for chunk in want_rows for row in chunk)
    assert matched == {0: 5, 1: 4, 2: 2, 3: 2}[_PROMPTS.index(prompt)]
    assert got.shape == want_rows.shape
    torch.testing.assert_close(got, want_rows, rtol=0, atol=0)
    torch.testing.assert_close(weights, want_weights.float(), rtol=0, atol=0)
    assert list(tomcat_tokenizer("tomcat").input_ids)[1:-1] == tomcat_tokenizer.convert_tokens_to_ids(["tom", "cat</w>"])


def test_a_second_embedding_on_the_same_vocabulary_token_is_refused(tomcat_tokenizer):
    table = torch.nn.Embedding(len(tomcat_tokenizer) + 8, 16)
    first = sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("cat", {"text_encoder": torch.zeros(1, 16)}))
    try:
        with pytest.raises(sdadapt.embeddings.tokens.TriggerTakenError,
                           match="embedding 'Cat': the tokenizer's token 'cat' is held by the embedding 'cat'"):
            sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("Cat", {"text_encoder": torch.ones(2, 16)}))
    finally:
        first.remove()
    again = sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("Cat", {"text_encoder": torch.ones(2, 16)}))
    again.remove()


# ------------------------------------------------------------------ review R4: further checks


def test_resolve_layers_places_a_compiled_custom_models_underscore_names():
    """kohya underscores of a custom (non-SD) model saved through torch.compile: ``lora_unet__orig_mod_my_block_to_q``
    reads as ``_orig_mod.my.block.to_q``; only the underscore comparison of the path *without* ``_orig_mod`` finds
    ``my_block.to_q`` (the fallback must try the bare spelling too)."""
    from sdadapt.formats.layers import underscore_to_path

    model = torch.nn.Module()
    model.my_block = torch.nn.Module()
    model.my_block.to_q = torch.nn.Linear(4, 4)
    path = underscore_to_path("_orig_mod_my_block_to_q")
    assert path.startswith("_orig_mod.")
    assert resolve_layers(model, [path]) == {path: "my_block.to_q"}


def test_removing_a_one_token_embedding_restores_tokenizers_and_tables_exactly(tomcat_tokenizer):
    """The own-id path adds only the aliases of vectors 2..k and hooks the tables: after ``remove()`` both
    tokenizers (an SDXL-like pair) serialize as before, the tables have no hooks and their bits and state_dict keys
    are unchanged, and the token's own row is the base row again."""
    from sdadapt.clip_tokenizer import CLIPTokenizer

    second = CLIPTokenizer(_MERGES, max_length=77).to_transformers()
    tables = {"clip_l": torch.nn.Embedding(len(tomcat_tokenizer) + 8, 8), "clip_g": torch.nn.Embedding(len(second) + 8, 12)}
    before = {k: {n: v.clone() for n, v in t.state_dict().items()} for k, t in tables.items()}
    serialized = [tokenizer_snapshot(t) for t in (tomcat_tokenizer, second)]
    cat = tomcat_tokenizer.convert_tokens_to_ids("cat</w>")
    ids = torch.tensor([[cat, cat]])
    with torch.no_grad():
        base = {k: t(ids).clone() for k, t in tables.items()}
    for count in (1, 3):
        vectors = {"clip_l": torch.randn(count, 8), "clip_g": torch.randn(count, 12)}
        handle = sdadapt.inject_embedding(tables, {"clip_l": tomcat_tokenizer, "clip_g": second},
                                          sdadapt.Embedding("cat", vectors))
        assert handle.token_ids["clip_l"][0] == cat and handle.token_ids["clip_g"][0] == cat
        with torch.no_grad():
            for key, table in tables.items():
                assert torch.equal(table(ids)[0, 0], vectors[key][0])
        handle.remove()
        assert [tokenizer_snapshot(t) for t in (tomcat_tokenizer, second)] == serialized, count
        for key, table in tables.items():
            assert not table._forward_hooks and not table._forward_pre_hooks
            state = table.state_dict()
            assert state.keys() == before[key].keys()
            assert all(torch.equal(state[n], v) for n, v in before[key].items())
            with torch.no_grad():
                assert torch.equal(table(ids), base[key])


def test_a_multi_vector_vocabulary_word_embedding_keeps_prompt_editing(tomcat_tokenizer):
    """A1111 schedules first, then tokenizes each scheduled text and matches the embedding there; sdadapt's generate
    expands the whole prompt before scheduling, so the alias must not break the schedule syntax."""
    from sdadapt.prompt_schedule import prompt_schedule

    assert prompt_schedule("[cat:dog:0.5]", 10) == [(5, "cat"), (10, "dog")]
    table = torch.nn.Embedding(len(tomcat_tokenizer) + 8, 16)
    handle = sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("cat", {"text_encoder": torch.randn(2, 16)}))
    try:
        scheduled = prompt_schedule(handle.expand("[cat:dog:0.5]"), 10)
        alternating = prompt_schedule(handle.expand("[cat|dog]"), 4)
    finally:
        handle.remove()
    assert [step for step, _ in scheduled] == [5, 10] and scheduled[1][1] == "dog"
    assert [text.strip() for _, text in alternating][1] == "dog"


def test_an_added_token_name_expands_in_any_case_once_and_keeps_the_prompt_syntax(tomcat_tokenizer):
    """``TomCat`` (k=3; two vocabulary tokens, so one added token) written ``tomcat`` / ``TOMCAT``: its two further
    tokens follow each occurrence exactly once (the old text rule matched the exact case only), an already expanded
    prompt is left as is, and emphasis / prompt editing around it still parse."""
    from sdadapt.prompt_schedule import prompt_schedule

    table = torch.nn.Embedding(len(tomcat_tokenizer) + 8, 16)
    handle = sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("TomCat", {"text_encoder": torch.randn(3, 16)}))
    try:
        expanded = handle.expand("a tomcat, [TOMCAT:dog:0.5] (TomCat:1.2)")
        again = handle.expand(expanded)
        ids = tomcat_tokenizer(expanded, add_special_tokens=False).input_ids
        want = handle.token_ids["text_encoder"]
    finally:
        handle.remove()
    # (transformers 4's slow tokenizer matches an added token in its exact case only: expand spells the name so)
    spelled = (lambda text: text) if tomcat_tokenizer.is_fast else (lambda text: text.replace("tomcat", "TomCat").replace("TOMCAT", "TomCat"))
    assert expanded == spelled("a tomcat TomCat_1 TomCat_2 , [TOMCAT TomCat_1 TomCat_2 :dog:0.5] (TomCat TomCat_1 TomCat_2 :1.2)")
    assert again == expanded
    assert [ids[i : i + 3] for i, t in enumerate(ids) if t == want[0]] == [want] * 3
    assert [text for _, text in prompt_schedule(expanded, 10)][1].startswith(spelled("a tomcat TomCat_1 TomCat_2 , dog"))


def _rows_as_a1111(tokenizer, name: str, count: int, prompt: str, *, a1111: bool = False):
    """(sdadapt's encoder input and weights, the A1111 transcription's) for ``prompt`` with embedding ``name``
    (``a1111``: injected as ``generate`` injects it, ``inject_embedding(..., a1111=True)``)."""
    from sdadapt.prompt_chunks import prompt_chunks

    table = torch.nn.Embedding(len(tokenizer) + 8, 16)
    vectors = torch.randn(count, 16, generator=torch.Generator().manual_seed(count))
    want_rows, want_weights = _a1111_rows(tokenizer, table, prompt, name, vectors)
    handle = sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding(name, {"text_encoder": vectors}), a1111=a1111)
    try:
        expanded = handle.expand(prompt)
        assert handle.expand(expanded) == expanded  # (idempotent: a prompt expanded twice is the same)
        ids, weights = prompt_chunks(tokenizer, expanded)
        with torch.no_grad():
            got = table(ids).double()
    finally:
        handle.remove()
    return (got, weights), (want_rows, want_weights.float())


def _assert_same_rows(got, want) -> None:
    assert got[0].shape == want[0].shape
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@pytest.mark.parametrize("prompt", ["a (cat)(s) here", "a (ca)(t) here", "(c)(a)(t:1.1)s, [(cat)]"])
def test_emphasis_that_glues_a_longer_word_gets_no_embedding_as_in_a1111(tomcat_tokenizer, prompt):
    """generate's loader (``a1111=True``): A1111 tokenizes each merged emphasis piece, '(cat)(s)' is the piece 'cats'
    (no cat</w>: not the embedding), '(ca)(t)' the piece 'cat' (the whole embedding)."""
    _assert_same_rows(*_rows_as_a1111(tomcat_tokenizer, "cat", 2, prompt, a1111=True))


def test_a_multi_vector_embedding_name_matches_in_any_case_with_all_its_vectors(tomcat_tokenizer):
    """An added-token name (not one vocabulary token): the tokenizer matches ``tomcat`` for ``TomCat``
    (CLIP lowercases), A1111 too (the name's token ids); every one of the k vectors must follow."""
    _assert_same_rows(*_rows_as_a1111(tomcat_tokenizer, "TomCat", 3, "a tomcat, (TOMCAT:1.2)"))


@pytest.mark.parametrize("prompt", ["a tom - cat", "a tom-cats"])
def test_a_several_token_name_matches_by_token_ids_as_a1111(tomcat_tokenizer, prompt):
    """generate's loader (``a1111=True``): 'tom - cat' has the ids of 'tom-cat' (the embedding), 'tom-cats' has not."""
    _assert_same_rows(*_rows_as_a1111(tomcat_tokenizer, "tom-cat", 1, prompt, a1111=True))


def test_save_peft_of_a_live_clip_text_model_with_projection_state_still_loads_in_peft(sdxl_encoders, tmp_path):
    encoders, _ = sdxl_encoders
    model = encoders["text_encoder_2"]
    handle = sdadapt.inject(model, TEXT_ENCODER, sdadapt.LoRAConfig(rank=2, alpha=1))
    g = torch.Generator().manual_seed(7)
    state = {k: v if k.endswith(".alpha") else torch.randn(v.shape, generator=g) * 0.1
             for k, v in handle.state_dict().items()}
    handle.remove()
    assert all(k.startswith("text_model.") for k in state)
    save_peft(tmp_path / "live", state)  # (the names are the model's own: written as given before)
    _, adapted = _peft_output(model, tmp_path / "live")
    assert adapted == len({split_key(k)[0] for k in state})


def test_a_name_that_is_another_embeddings_added_token_is_refused_not_put_on_that_id(tomcat_tokenizer):
    """``tom-cat`` is several vocabulary tokens, so it is added as one token; loaded again, it tokenizes as that ONE
    (added) token: that is not a vocabulary token of its own, and the second load must be refused (else both sit on
    one id and the last silently wins)."""
    table = torch.nn.Embedding(len(tomcat_tokenizer) + 8, 16)
    first = sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("tom-cat", {"text_encoder": torch.zeros(1, 16)}))
    try:
        with pytest.raises(sdadapt.embeddings.tokens.TriggerTakenError):
            sdadapt.inject_embedding(table, tomcat_tokenizer, sdadapt.Embedding("tom-cat", {"text_encoder": torch.ones(1, 16)}))
    finally:
        first.remove()


def test_convert_of_a_transformers5_peft_folder_to_peft_for_its_component_round_trips(sdxl_encoders, tmp_path):
    """A peft folder of a transformers-5 CLIPTextModel (``encoder.layers…``, no ``text_model.``) rewritten as peft for
    ``--component text_encoder`` (fp16): the same layer names, and the read-back check compares the canonical
    states of both sides (the file's names lack ``text_model.``, the read-back has it)."""
    from sdadapt.loratools.convert import convert_lora

    encoders, kohya_file = sdxl_encoders
    model = encoders["text_encoder"]
    state = load_lora(kohya_file)[0]["text_encoder"]
    save_peft(tmp_path / "src", state, model=model)
    source_keys = sorted(load_file(tmp_path / "src" / "adapter_model.safetensors"))
    from transformers_versions import TRANSFORMERS_5

    assert all(("text_model" in k) != TRANSFORMERS_5 for k in source_keys)  # (transformers 4: the model's text_model.)
    report = convert_lora(tmp_path / "src", tmp_path / "out", to="peft", component="text_encoder", dtype=torch.float16)
    assert sorted(load_file(tmp_path / "out" / "adapter_model.safetensors")) == source_keys
    assert report.layers == {"text_encoder": len({split_key(k)[0] for k in state})}
    assert report.families == {"lora": len({split_key(k)[0] for k in state})} and 0 < report.max_delta < 1e-2


def test_save_peft_without_model_drops_wrapper_segments_of_a_unet_state(sd1_lora, tmp_path):
    """The old way (no model, no component) on a UNet state kept from a compiled model: the folder holds the clean
    names, key for key the folder of the clean state."""
    _, _, components = sd1_lora
    save_peft(tmp_path / "clean", components["unet"])
    save_peft(tmp_path / "wrapped", _wrapped(components["unet"]))
    clean, wrapped = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("clean", "wrapped"))
    assert sorted(wrapped) == sorted(clean)
    assert all(torch.equal(wrapped[k], v) for k, v in clean.items())
    configs = [json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("clean", "wrapped")]
    assert configs[0] == configs[1]


def test_save_peft_refuses_two_keys_that_become_one_name(sd1_lora, tmp_path):
    """A state holding a layer under its clean and its ``_orig_mod.`` name: both would be written as one peft key
    (the last silently winning); refused, naming it, and nothing is written."""
    _, _, components = sd1_lora
    state = components["unet"]
    mixed = {**state, **{k: v + 1 for k, v in _wrapped(state).items()}}
    with pytest.raises(ValueError, match="both name"):
        save_peft(tmp_path / "mixed", mixed)
    assert not (tmp_path / "mixed").exists()
