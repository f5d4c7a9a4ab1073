"""OneTrainer's LoRA and embedding files (Nerogar/OneTrainer@23df3832, its savers' key forms, written here from
the savers' naming: ``modules/modelSaver/mixin/LoRASaverMixin.py``, ``modules/util/convert/convert_lora_util.py``,
``StableDiffusion(XL)LoRASaver`` / ``EmbeddingSaver``): each loads as the same layers and deltas as its kohya twin,
bundled embeddings included; output embeddings are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdadapt.adapters.base import LayerGeometry
from sdadapt.adapters.registry import file_layer_delta
from sdadapt.errors import WeightFileError
from sdadapt.formats import describe_file, load_embedding, load_lora
from sdadapt.formats.bundled_embeddings import bundled_embeddings

G = torch.Generator().manual_seed(0)
# (LDM UNet name, kohya name, weight shape): SD1's first attention's proj_in (a 1x1 conv) and to_q
LAYERS = [("input_blocks.1.1.proj_in", "lora_unet_down_blocks_0_attentions_0_proj_in", (320, 320, 1, 1)),
          ("input_blocks.1.1.transformer_blocks.0.attn1.to_q",
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (320, 320))]
TE = ("text_model.encoder.layers.0.self_attn.q_proj", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", (768, 768))


def _factors(shape, rank=4):
    down = torch.randn(rank, shape[1], *shape[2:], generator=G) * 0.1
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=G) * 0.1
    return down, up


@pytest.fixture(scope="module")
def lora():
    return {name: (*_factors(shape), torch.tensor(2.0)) for _, name, shape in [*LAYERS, TE]}


def _kohya(lora):
    return {f"{k}.{t}": v for k, (down, up, alpha) in lora.items()
            for t, v in (("lora_down.weight", down), ("lora_up.weight", up), ("alpha", alpha))}


def _deltas(path):
    components, _ = load_lora(path)
    out = {}
    for component, state in components.items():
        layers: dict[str, dict] = {}
        for key, value in state.items():
            for tensor in ("lora_down.weight", "lora_up.weight", "alpha"):
                if key.endswith("." + tensor):
                    layers.setdefault(key[:-len(tensor) - 1], {})[tensor] = value
        for layer, tensors in layers.items():
            shape = tensors["lora_up.weight"].shape[:1] + tensors["lora_down.weight"].shape[1:]
            out[(component, layer)] = file_layer_delta(tensors, LayerGeometry.from_weight_shape(tuple(shape)),
                                                       dtype=torch.float64)[0]
    return out


@pytest.mark.parametrize("form", ["COMFY", "ORIGINAL"])
def test_onetrainers_comfy_and_original_loras_load_as_their_kohya_twin(tmp_path, lora, form):
    """COMFY: ``diffusion_model.<LDM>`` / ``text_encoders.clip_l.transformer.text_model.*`` with peft's
    ``lora_A`` / ``lora_B``; ORIGINAL: the UNet alone, bare LDM names (``input_blocks.…``) — it was called a
    checkpoint. Both are ComfyUI's key form, which ComfyUI's loader takes with either factor name."""
    kohya = tmp_path / "kohya.safetensors"
    save_file(_kohya(lora), str(kohya))
    state = {}
    for ldm, name, _ in LAYERS + ([(f"text_encoders.clip_l.transformer.{TE[0]}", TE[1], TE[2])] if form == "COMFY" else []):
        down, up, alpha = lora[name]
        key = (f"diffusion_model.{ldm}" if form == "COMFY" and not ldm.startswith("text_") else ldm)
        state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": alpha})
    path = tmp_path / f"{form}.safetensors"
    save_file(state, str(path))
    assert describe_file(path)["kind"] == "comfy-lora"
    want, got = _deltas(kohya), _deltas(path)
    if form == "ORIGINAL":
        want = {k: v for k, v in want.items() if k[0] == "unet"}
    assert set(got) == set(want)
    for key, delta in want.items():
        assert torch.equal(got[key], delta), key


def test_bundled_embeddings_are_set_aside_and_read_as_embeddings(tmp_path, lora):
    sd1 = torch.randn(2, 768, generator=G)
    l, g = torch.randn(3, 768, generator=G), torch.randn(3, 1280, generator=G)
    path = tmp_path / "bundle.safetensors"
    save_file({**_kohya(lora), "bundle_emb.<ot>.clip_l": sd1, "bundle_emb.xl.clip_l": l, "bundle_emb.xl.clip_g": g,
               "bundle_emb.a1.string_to_param.*": sd1[:1].clone()}, str(path))
    plain = tmp_path / "plain.safetensors"
    save_file(_kohya(lora), str(plain))
    assert describe_file(path)["kind"] == "kohya-lora" and describe_file(path)["bundled_embeddings"] == ["<ot>", "a1", "xl"]
    got, want = load_lora(path)[0], load_lora(plain)[0]
    assert {c: set(s) for c, s in got.items()} == {c: set(s) for c, s in want.items()}
    embeddings = {e.name: e for e in bundled_embeddings(path)}
    assert torch.equal(embeddings["<ot>"].vectors["text_encoder"], sd1)
    assert torch.equal(embeddings["xl"].vectors["clip_l"], l) and torch.equal(embeddings["xl"].vectors["clip_g"], g)
    assert torch.equal(embeddings["a1"].vectors["text_encoder"], sd1[:1])
    assert bundled_embeddings(plain) == []


def test_a_conv_loha_in_onetrainers_4d_factors_is_the_flattened_loha(tmp_path):
    """OneTrainer keeps a conv layer's LoHa factors as convolutions, ``hada_w*_a`` (out, r, 1, 1) and ``hada_w*_b``
    (r, in, kh, kw) — a 1x1 conv after a kxk one, the same ΔW as LyCORIS' flattened ``(out, r)`` / ``(r, in·kh·kw)``."""
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w = {k: torch.randn(*s, generator=G) * 0.3 for k, s in (("hada_w1_a", (8, 2, 1, 1)), ("hada_w1_b", (2, 4, 3, 3)),
                                                              ("hada_w2_a", (8, 2, 1, 1)), ("hada_w2_b", (2, 4, 3, 3)))}
    save_file({**{f"{name}.{k}": v for k, v in w.items()}, f"{name}.alpha": torch.tensor(1.0)},
              str(tmp_path / "ot.safetensors"))
    state = load_lora(tmp_path / "ot.safetensors")[0]["unet"]
    tensors = {k.rsplit(".", 1)[1]: v for k, v in state.items()}
    delta, _ = file_layer_delta(tensors, LayerGeometry.from_weight_shape((8, 4, 3, 3)), dtype=torch.float64)
    flat = {k: v.double().flatten(1) for k, v in w.items()}
    want = ((flat["hada_w1_a"] @ flat["hada_w1_b"]) * (flat["hada_w2_a"] @ flat["hada_w2_b"]) * (1.0 / 2)).reshape(8, 4, 3, 3)
    torch.testing.assert_close(delta, want)


def test_onetrainers_embeddings(tmp_path):
    vectors = torch.randn(2, 768, generator=G)
    save_file({"emp_params": vectors}, str(tmp_path / "ot.safetensors"))
    embedding = load_embedding(tmp_path / "ot.safetensors")
    assert torch.equal(embedding.vectors["text_encoder"], vectors) and "token" not in embedding.metadata
    assert describe_file(tmp_path / "ot.safetensors")["kind"] == "embedding"
    for keys in ({"emp_params": torch.zeros(2, 768), "emp_params_out": vectors},
                 {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280), "clip_l_out": vectors,
                  "clip_g_out": torch.randn(2, 1280, generator=G)}):
        save_file(keys, str(tmp_path / "out.safetensors"))
        assert describe_file(tmp_path / "out.safetensors")["kind"] == "embedding"
        with pytest.raises(WeightFileError, match="OneTrainer output embedding.*replace the text encoder's"):
            load_embedding(tmp_path / "out.safetensors")


def test_generate_loads_a_loras_bundled_embedding_as_a1111(tmp_path):
    """``generate --lora FILE`` loads the embeddings FILE bundles (A1111's networks.py does), unless an embedding of
    that name is loaded already (``--embedding``: A1111 keeps the one it has)."""
    from sdadapt.jobs.generate import run_generate
    from sdadapt.toy import load_toy

    proj = load_toy(None).unet.down_blocks[0].attentions[0].proj_in
    shape = tuple(proj.weight.shape)
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down, up = torch.randn(2, *shape[1:], generator=G), torch.zeros(shape[0], 2, *shape[2:])
    path = tmp_path / "style.safetensors"
    save_file({f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up, f"{layer}.alpha": torch.tensor(2.0),
               "bundle_emb.mytok.clip_l": torch.randn(2, 64, generator=G)}, str(path))
    common = {"model": "toy", "prompt": "a mytok circle", "steps": 2, "seed": 1, "overwrite": True}
    report = run_generate(out=str(tmp_path / "a.png"), loras=[str(path)], **common)
    assert report["embeddings"] == ["mytok"]
    save_file({"emb_params": torch.randn(1, 64, generator=G)}, str(tmp_path / "mytok.safetensors"))
    report = run_generate(out=str(tmp_path / "b.png"), loras=[str(path)], embeddings=[str(tmp_path / "mytok.safetensors")],
                          **common)
    assert report["embeddings"] == ["mytok"]  # (the file given: the bundled one of that name left out)


def test_a_file_of_one_bundled_embedding_loads_as_that_embedding(tmp_path):
    """A standalone file of one ``bundle_emb.<name>.*`` group (ComfyUI's ``load_embed`` and SD.Next read it as an
    embedding) loads with ``load_embedding`` as that group (it was refused as "2 tensors" while ``load_lora`` said it is
    an embedding); several groups name ``bundled_embeddings``."""
    g = torch.Generator().manual_seed(0)
    sd1, l, big = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)
    save_file({"bundle_emb.sks.clip_l": sd1}, str(tmp_path / "one.safetensors"))
    one = load_embedding(tmp_path / "one.safetensors")
    assert one.name == "one" and torch.equal(next(iter(one.vectors.values())), sd1)
    save_file({"bundle_emb.sks.clip_l": l, "bundle_emb.sks.clip_g": big}, str(tmp_path / "xl.safetensors"))
    xl = load_embedding(tmp_path / "xl.safetensors")
    assert torch.equal(xl.vectors["clip_l"], l) and torch.equal(xl.vectors["clip_g"], big)
    assert [torch.equal(e.vectors["clip_g"], big) for e in bundled_embeddings(tmp_path / "xl.safetensors")] == [True]
    save_file({"bundle_emb.a.clip_l": sd1, "bundle_emb.b.clip_l": l}, str(tmp_path / "two.safetensors"))
    with pytest.raises(WeightFileError, match="2 bundled embeddings .*bundled_embeddings"):
        load_embedding(tmp_path / "two.safetensors")
