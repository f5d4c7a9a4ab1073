"""supermerger's block-weight presets and list lengths, per-block ``--lam``, and A1111's ``sd_merge_models``.

References, transcribed here (float64 where they compute):

* hako-mikan/sd-webui-supermerger @ 0b1c4915a6ede98ce3528b4f097361842a641d1d: ``scripts/mbwpresets_master.txt``
  (the built-in presets), ``scripts/mergers/mergers.py`` (``wpreseter``: a weights text without a comma
  is a preset name; ``smerge``: the lengths 26/20/61/110 and how a 110-value list picks a key's alpha;
  ``blockfromkey``, ``BLOCKIDXLL``, ``BLOCKIDXLLL``).
* AUTOMATIC1111/stable-diffusion-webui @ 8faafb60804f40506eb3166e71d4d33bdc4e5c58 ``modules/extras.py``
  ``run_modelmerger`` (``add_model_metadata``: ``name`` = ``checkpoint_info.name``, ancestry folded in
  with ``dict.update``) and ``modules/sd_models.py`` (``CheckpointInfo.name``: the file name, with its
  extension, for a file outside the webui's model folder).
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdadapt.cli import main
from sdadapt.cli.merge import PresetName, per_block_fields
from sdadapt.errors import InputError
from sdadapt.merge.blocks import block_alpha_fn, parse_block_weights
from sdadapt.merge.engine import merge_file
from sdadapt.merge.presets import SUPERMERGER_PRESETS, parse_presets, read_presets, resolve_preset
from sdadapt.merge.recipe import MergeStep
from sdadapt.merge.sdxl_layers import SDXL_LAYERS, sdxl_layer
from test_merge_engine import mini, save

U = "model.diffusion_model."

# ---------------------------------------------------------------- supermerger, transcribed

#: sha256 of scripts/mbwpresets_master.txt @ 0b1c491 as stored (CRLF line ends; supermerger reads it in text mode)
MASTER_SHA256 = "cba841e41de88655cc21a2e2528a64350df380e03d3db872e11b0b1fa35a5935"

BLOCKIDXLL = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00", "OUT01",
              "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "VAE"]
BLOCKIDXLLL = ["CLIPL", "CLIPG", "IN0", "IN00", "IN10", "IN20", "IN30", "IN40", "IN41", "IN410", "IN411", "IN50", "IN51",
               "IN510", "IN511", "IN60", "IN70", "IN71", "IN710", "IN711", "IN712", "IN713", "IN714", "IN715", "IN716",
               "IN717", "IN718", "IN719", "IN80", "IN81", "IN810", "IN811", "IN812", "IN813", "IN814", "IN815", "IN816",
               "IN817", "IN818", "IN819", "MID00", "MID10", "MID100", "MID101", "MID102", "MID103", "MID104", "MID105",
               "MID106", "MID107", "MID108", "MID109", "MID20", "OUT00", "OUT01", "OUT010", "OUT011", "OUT012", "OUT013",
               "OUT014", "OUT015", "OUT016", "OUT017", "OUT018", "OUT019", "OUT10", "OUT11", "OUT110", "OUT111", "OUT112",
               "OUT113", "OUT114", "OUT115", "OUT116", "OUT117", "OUT118", "OUT119", "OUT20", "OUT21", "OUT210", "OUT211",
               "OUT212", "OUT213", "OUT214", "OUT215", "OUT216", "OUT217", "OUT218", "OUT219", "OUT22", "OUT30", "OUT31",
               "OUT310", "OUT311", "OUT40", "OUT41", "OUT410", "OUT411", "OUT50", "OUT51", "OUT510", "OUT511", "OUT52",
               "OUT60", "OUT70", "OUT80", "OUT9", "TIME", "LABEL", "VAE"]


def sm_wpreseter(w: str, presets: str) -> str:
    """supermerger's wpreseter."""
    if "," not in w and w != "":
        wdict = {}
        for line in presets.splitlines():
            if ":" in line:
                wdict[line.split(":", 1)[0].strip()] = line.split(":", 1)[1]
            if "\t" in line:
                wdict[line.split("\t", 1)[0].strip()] = line.split("\t", 1)[1]
        if w.strip() in wdict:
            w = wdict[w.strip()]
    return w


def sm_blockfromkey_xl(key: str):
    """supermerger's blockfromkey, SDXL branch."""
    if not ("weight" in key or "bias" in key):
        return "Not Merge", "Not Merge"
    if "label_emb" in key:
        return "LABEL", "IN00"
    if "time_embed" in key:
        return "TIME", "IN00"
    if "conditioner.embedders.0." in key:
        return "CLIPL", "BASE"
    if "conditioner.embedders.1." in key:
        return "CLIPG", "BASE"
    if "first_stage_model" in key:
        return "VAE", "BASE"
    if "model.diffusion_model" in key:
        if "model.diffusion_model.out." in key:
            return "OUT9", "OUT08"
        block = re.findall(r"input|mid|output", key)
        block = block[0].upper().replace("PUT", "") if block else ""
        nums = re.sub(r"\D", "", key)[:1 if "MID" in block else 2] + ("0" if "MID" in block else "")
        add = re.findall(r"transformer_blocks\.(\d+)\.", key)[0] if "transformer" in key else ""
        return block + nums + add, (block + "0" + nums[0] if "MID" not in block else "M00")
    return "Not Merge", "Not Merge"


def sm_alpha_110(key: str, weights_text: str):
    """The alpha smerge gives ``key`` of an SDXL model from a 110-value weights text (None: not merged)."""
    first, rest = weights_text.split(",", 1)
    base_alpha, weights_a = float(first), [float(w) for w in rest.split(",")]
    assert len(weights_a) == 109
    block, blocks26 = sm_blockfromkey_xl(key)
    if blocks26 not in BLOCKIDXLL:
        return None
    weight_index, weight_index_xl = BLOCKIDXLL.index(blocks26), BLOCKIDXLLL.index(block)
    current = base_alpha
    if weight_index > 0:
        current = weights_a[weight_index - 1]
        current = weights_a[weight_index_xl - 1]  # (len(weights_a) == 109)
    if weight_index == 0 and weight_index_xl == 1:
        current = weights_a[weight_index_xl - 1]
    return current


def sm_weighttoxl(weights_a: list[float]) -> list[float]:
    """supermerger's weighttoxl on the 25 values after BASE (then the 19 + [0] are indexed by BLOCKIDXLL)."""
    return weights_a[:9] + weights_a[12:22] + [0]


# ---------------------------------------------------------------- 1. presets


def test_the_built_in_presets_are_supermergers_master_file():
    assert hashlib.sha256(SUPERMERGER_PRESETS.replace("\n", "\r\n").encode()).hexdigest() == MASTER_SHA256
    assert resolve_preset("WRAP08") == (0, 1, 1, 1, 1, *[0] * 17, 1, 1, 1, 1)
    assert resolve_preset(" ALL_B ") == (1.0,) * 26  # (the name is stripped, as wpreseter does)
    grad_v = resolve_preset("GRAD_V")
    assert grad_v[:3] == (0, 1, 0.9166666667) and grad_v[13] == 0 and grad_v[-1] == 1.0


@pytest.mark.parametrize("text", [
    SUPERMERGER_PRESETS,
    "A:1,2\nB\t3,4\nA: 5,6 \n",                     # a later line wins; values as written
    "X:Y\t0.5,0.5\nX\t0.1\n  Z  :0.3\n",           # a line with both: two names, the tab's set last
    "K\t1:2\nno separator here\n",
    "A\t:0.5\n",                                   # (review) both names "A": the tab's value (":0.5") is set last
])
def test_preset_lookup_is_wpreseters(text):
    table = parse_presets(text)
    names = {line.split(":", 1)[0].strip() for line in text.splitlines() if ":" in line}
    names |= {line.split("\t", 1)[0].strip() for line in text.splitlines() if "\t" in line}
    assert set(table) == names
    for name in names:
        expected = sm_wpreseter(name, text)
        try:
            got = resolve_preset(name, presets=table)
        except InputError:  # supermerger then fails on float(): not numbers
            with pytest.raises(ValueError):
                [float(v) for v in expected.split(",")]
            continue
        assert got == tuple(float(v) for v in expected.split(","))


def test_unknown_and_random_presets_are_refused_naming_the_choices():
    with pytest.raises(InputError, match=r"invalid float value: 'GRAD_X'.*GRAD_V, GRAD_A"):
        resolve_preset("GRAD_X", option="--alpha")
    with pytest.raises(InputError, match="random preset"):
        resolve_preset("ALL_R")
    with pytest.raises(InputError, match="random entries"):
        resolve_preset("MINE", presets=parse_presets("MINE\tR,0,0"))


# ---------------------------------------------------------------- command line: presets, lengths, --lam


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("presets")
    return [save(folder, f"{n}.safetensors", mini(i, dtype=torch.float32)) for i, n in enumerate("abc")]


def _run(tmp_path, *argv) -> int:
    return main(["merge", *[str(a) for a in argv], "-q"])


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["merge", *[str(a) for a in argv]])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_a_preset_name_is_its_list_and_replays(files, tmp_path, capsys):
    # triple-sum: --alpha GRAD_V --beta FLAT_25 == the lists typed out, byte for byte; the replay too
    lists = [",".join(repr(v) for v in resolve_preset(n)) for n in ("GRAD_V", "FLAT_25")]
    assert _run(tmp_path, "triple-sum", *files, "--alpha", "GRAD_V", "--beta", "FLAT_25",
                "-o", tmp_path / "named.safetensors") == 0
    assert _run(tmp_path, "triple-sum", *files, "--alpha", lists[0], "--beta", lists[1],
                "-o", tmp_path / "typed.safetensors") == 0
    assert _sha(tmp_path / "named.safetensors") == _sha(tmp_path / "typed.safetensors")
    assert _run(tmp_path, "--recipe", tmp_path / "named.safetensors", "-o", tmp_path / "again.safetensors") == 0
    assert _sha(tmp_path / "again.safetensors") == _sha(tmp_path / "named.safetensors")
    # the values are what supermerger's smerge uses: BASE alpha first, the block of each key after
    out, a, b, c = (load_file(p) for p in (tmp_path / "named.safetensors", *files))
    alpha, beta = resolve_preset("GRAD_V"), resolve_preset("FLAT_25")
    for key, block in ((U + "input_blocks.4.1.proj_in.weight", 5), (U + "middle_block.1.proj_out.weight", 13),
                       (U + "output_blocks.11.1.proj_out.weight", 25)):
        want = (1 - alpha[block] - beta[block]) * a[key].double() + alpha[block] * b[key].double() + beta[block] * c[key].double()
        torch.testing.assert_close(out[key].double(), want, rtol=0, atol=1e-6)


def test_a_users_presets_file_replaces_the_built_in_list(files, tmp_path, capsys):
    mine = [round(0.04 * i, 2) for i in range(26)]
    (tmp_path / "mbwpresets.txt").write_text("preset_name\tpreset_weights\nMINE\t" + ",".join(map(str, mine)) + "\n")
    assert _run(tmp_path, "weighted-sum", *files[:2], "--alpha", "MINE", "--presets", tmp_path / "mbwpresets.txt",
                "-o", tmp_path / "mine.safetensors") == 0
    assert _run(tmp_path, "weighted-sum", *files[:2], "--alpha", ",".join(map(str, mine)),
                "-o", tmp_path / "typed.safetensors") == 0
    assert _sha(tmp_path / "mine.safetensors") == _sha(tmp_path / "typed.safetensors")
    capsys.readouterr()
    err = _error(capsys, ["weighted-sum", *files[:2], "--alpha", "GRAD_V", "--presets", tmp_path / "mbwpresets.txt",
                          "-o", tmp_path / "x.safetensors"])
    assert "'GRAD_V'" in err and "the presets file: MINE" in err and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("count, says", [(61, "supermerger's Flux list"), (25, "put BASE's alpha first"),
                                         (27, "got 27 values")])
def test_other_lengths_are_refused_naming_the_forms(files, tmp_path, capsys, count, says):
    code = _run(tmp_path, "weighted-sum", *files[:2], "--alpha", ",".join(["0.5"] * count), "-o", tmp_path / "x.safetensors")
    err = capsys.readouterr().err
    assert code == 2 and says in err and "26 values for SD1/SD2" in err and "110" in err and "preset name" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_110_values_on_an_sd1_model_are_refused(files, tmp_path, capsys):
    code = _run(tmp_path, "weighted-sum", *files[:2], "--alpha", ",".join(["0.5"] * 110), "-o", tmp_path / "x.safetensors")
    assert code == 2 and "110 values (one per layer) are for SDXL only" in capsys.readouterr().err


LAMS = [round(0.1 + 0.05 * (i % 7), 2) for i in range(26)]


@pytest.mark.parametrize("lam", [",".join(map(str, LAMS)), "RING10_3"])
def test_per_block_lam_on_the_command_line_is_the_recipe_field(files, tmp_path, capsys, lam):
    values = LAMS if "," in lam else list(resolve_preset(lam))
    assert _run(tmp_path, "ties", *files, "--lam", lam, "--density", "0.5", "-o", tmp_path / "cli.safetensors") == 0
    step = MergeStep("ties", tuple(files), options={"density": 0.5, "normalize": True}, block_weights=tuple(values))
    merge_file(step, tmp_path / "recipe.safetensors")
    assert _sha(tmp_path / "cli.safetensors") == _sha(tmp_path / "recipe.safetensors")
    assert _run(tmp_path, "--recipe", tmp_path / "cli.safetensors", "-o", tmp_path / "again.safetensors") == 0
    assert _sha(tmp_path / "again.safetensors") == _sha(tmp_path / "cli.safetensors")


def test_a_uniform_lam_list_is_that_lam(files, tmp_path):
    # the list is the per-block lam itself (not lam times it): all 0.7 == --lam 0.7, bit for bit
    assert _run(tmp_path, "ties", *files, "--lam", ",".join(["0.7"] * 26), "-o", tmp_path / "list.safetensors",
                "--no-recipe") == 0
    assert _run(tmp_path, "ties", *files, "--lam", "0.7", "-o", tmp_path / "one.safetensors", "--no-recipe") == 0
    one, listed = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "list.safetensors")
    assert one.keys() == listed.keys() and all(torch.equal(one[k], listed[k]) for k in one)


def test_per_block_fields_resolves_names_and_keeps_lam_out_of_the_options():
    values = {"lam": PresetName("WRAP08"), "density": 0.2}
    assert per_block_fields(values) == {"block_weights": resolve_preset("WRAP08")} and values == {"density": 0.2}


@pytest.mark.parametrize("operator, flag, says", [
    ("ties", "--alpha", "ties has no alpha; its strength is --lam"),
    ("dare", "--beta", "dare has no beta; its strength is --lam"),
    ("model-stock", "--alpha", "model-stock has no strength setting"),
])
def test_alpha_on_an_operator_without_one_gets_a_hint(files, tmp_path, capsys, operator, flag, says):
    err = _error(capsys, [operator, *files, flag, "0.5", "-o", tmp_path / "x.safetensors"])
    assert says in err and "unrecognized" not in err


# ---------------------------------------------------------------- 110 values: one per SDXL layer


def test_the_layer_names_are_supermergers():
    assert list(SDXL_LAYERS) == BLOCKIDXLLL


@pytest.fixture(scope="module")
def sdxl_keys():
    from merge_layouts import layout

    return layout("sdxl-unet"), layout("sdxl-unet", "diffusers")


def test_every_sdxl_key_gets_the_alpha_smerge_gives_it(sdxl_keys):
    ldm, diffusers = sdxl_keys
    values = [round(0.001 * (i + 1), 3) for i in range(110)]  # a different value per layer
    text = ",".join(map(str, values))
    alpha = block_alpha_fn(parse_block_weights(values, architecture="sdxl"), architecture="sdxl", naming="ldm")
    merged = 0
    for key in ldm:
        want = sm_alpha_110(key, text)
        got, block = alpha(key)
        if want is None:  # smerge leaves keys without weight/bias in their name alone (a policy of its own)
            assert "weight" not in key and "bias" not in key, key
            continue
        assert got == want, key
        merged += 1
    assert merged > 1700
    # diffusers names get the layer of their LDM name
    from sdadapt.formats.model_keys import key_plan

    plan, _ = key_plan(diffusers, to="ldm", architecture="sdxl")
    pairs = [(source.keys[0], key) for key, source in plan.items() if len(source.keys) == 1]
    assert len(pairs) > 1700
    assert all(sdxl_layer(d, naming="diffusers") == sdxl_layer(k, naming="ldm") for d, k in pairs)


def test_26_values_on_sdxl_are_weighttoxl():
    values = [round(0.01 * i, 2) for i in range(26)]
    reduced = parse_block_weights(values, architecture="sdxl")
    assert [reduced[n] for n in BLOCKIDXLL[1:-1]] == sm_weighttoxl(values[1:])[:19] and reduced["BASE"] == values[0]


def _tiny_sdxl(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = ["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
            "first_stage_model.decoder.conv_in.weight", U + "label_emb.0.0.weight", U + "time_embed.0.weight",
            U + "input_blocks.0.0.weight", U + "input_blocks.4.1.proj_in.weight",
            U + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
            U + "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
            U + "middle_block.1.transformer_blocks.3.attn2.to_k.weight", U + "middle_block.2.in_layers.2.weight",
            U + "output_blocks.2.2.conv.weight", U + "output_blocks.5.1.transformer_blocks.1.norm1.weight",
            U + "out.2.weight"]
    return {k: torch.randn(4, 4, generator=g) for k in keys}


def test_a_110_value_merge_of_an_sdxl_model_matches_smerge(tmp_path):
    a, b = (save(tmp_path, f"{n}.safetensors", _tiny_sdxl(i)) for i, n in enumerate("ab"))
    values = [round(0.005 * i + 0.1, 3) for i in range(110)]
    values[-1] = 0.9  # the VAE slot: smerge never reads it (the VAE takes the first value)
    assert main(["merge", "weighted-sum", a, b, "--alpha", ",".join(map(str, values)), "-o",
                 str(tmp_path / "o.safetensors"), "-q"]) == 0
    out, ta, tb = load_file(tmp_path / "o.safetensors"), load_file(a), load_file(b)
    text = ",".join(map(str, values))
    for key in ta:
        w = sm_alpha_110(key, text)
        torch.testing.assert_close(out[key].double(), (1 - w) * ta[key].double() + w * tb[key].double(),
                                   rtol=0, atol=1e-6)
    assert main(["merge", "--recipe", str(tmp_path / "o.safetensors"), "-o", str(tmp_path / "r.safetensors"), "-q"]) == 0
    assert _sha(tmp_path / "r.safetensors") == _sha(tmp_path / "o.safetensors")


def test_elemental_rules_with_110_per_layer_values_are_refused(tmp_path, capsys):
    """(review RM) supermerger matches elemental rules against its layer names when 110 values are given
    (IN410, ...), sdadapt's rules name blocks: the mix is refused, naming both ways out, and nothing is written."""
    a, b = (save(tmp_path, f"{n}.safetensors", _tiny_sdxl(i)) for i, n in enumerate("ab"))
    code = main(["merge", "weighted-sum", a, b, "--alpha", ",".join(["0.5"] * 110), "--elemental", "IN04:attn1:0.2",
                 "-o", str(tmp_path / "o.safetensors"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "110 per-layer values" in err and "give 20 values, or leave --elemental out" in err
    assert not (tmp_path / "o.safetensors").exists()
    assert main(["merge", "weighted-sum", a, b, "--alpha", ",".join(["0.5"] * 20), "--elemental", "IN04:attn1:0.2",
                 "-o", str(tmp_path / "o.safetensors"), "-q"]) == 0


# ---------------------------------------------------------------- 3. A1111's sd_merge_models


def a1111_sd_merge_models(inputs):
    """run_modelmerger's add_model_metadata over (name, sha256, legacy hash, parsed metadata) in input order."""
    models = {}
    for name, sha, legacy, metadata in inputs:
        models[sha] = {"name": name, "legacy_hash": legacy, "sd_merge_recipe": metadata.get("sd_merge_recipe", None)}
        models.update(metadata.get("sd_merge_models", {}))
    return models


def test_sd_merge_models_is_a1111s_for_a_merge_of_merges(tmp_path):
    from sdadapt.merge.sources import legacy_hash, sha256_of

    a, b = (save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("ab"))
    merge_file(MergeStep("weighted-sum", (a, b), alpha=0.5), tmp_path / "ab.safetensors")
    # a second merge whose ancestry records "a" differently: A1111 keeps the last record of a hash
    ab_meta = dict(safe_open(str(tmp_path / "ab.safetensors"), "pt").metadata())
    ancestry = json.loads(ab_meta["sd_merge_models"])
    ancestry[sha256_of(a)]["name"] = "renamed-a.ckpt"
    ab_meta["sd_merge_models"] = json.dumps(ancestry)
    ab2 = save(tmp_path, "ab2.safetensors", load_file(tmp_path / "ab.safetensors"), metadata=ab_meta)
    merge_file(MergeStep("add-difference", (a, ab2, b), alpha=0.5), tmp_path / "out.safetensors")
    got = json.loads(safe_open(str(tmp_path / "out.safetensors"), "pt").metadata()["sd_merge_models"])

    def parsed(path):  # read_metadata_from_safetensors: values starting with "{" parsed as JSON
        meta = safe_open(str(path), "pt").metadata() or {}
        return {k: json.loads(v) if v[:1] == "{" else v for k, v in meta.items()}

    want = a1111_sd_merge_models([(p.rsplit("/", 1)[-1], sha256_of(p), legacy_hash(p), parsed(p)) for p in (a, ab2, b)])
    assert got == want and list(got) == list(want)
    assert got[sha256_of(a)]["name"] == "renamed-a.ckpt" and got[sha256_of(b)]["name"] == "b.safetensors"


# ---------------------------------------------------------------- review additions


def test_a_preset_of_non_finite_numbers_is_refused():
    # supermerger would merge with inf; sdadapt refuses non-finite strengths everywhere else (numbers())
    for bad in ("inf", "nan", "-inf"):
        with pytest.raises(InputError, match="not comma-separated numbers"):
            resolve_preset("X", presets=parse_presets("X\t" + ",".join([bad] + ["0"] * 25)))


def test_per_layer_weights_need_every_sdxl_layer():
    table = dict(zip(SDXL_LAYERS, [0.5] * len(SDXL_LAYERS)))
    with pytest.raises(ValueError, match="SDXL's 110 layers"):
        block_alpha_fn(table, architecture="sd1", naming="ldm")
    del table["LABEL"]
    with pytest.raises(ValueError, match="SDXL's 110 layers"):
        block_alpha_fn(table, architecture="sdxl", naming="ldm")


def test_a_110_value_merge_records_smerges_base_alpha_and_list(tmp_path):
    # smerge: weights_a.split(',', 1) -> base_alpha = the first value, weights_alpha = the 109 after it
    a, b, c = (save(tmp_path, f"{n}.safetensors", _tiny_sdxl(i)) for i, n in enumerate("abc"))
    alphas = [round(0.002 * i + 0.05, 3) for i in range(110)]
    betas = [round(0.4 - 0.003 * i, 3) for i in range(110)]
    assert main(["merge", "triple-sum", a, b, c, "--alpha", ",".join(map(str, alphas)), "--beta",
                 ",".join(map(str, betas)), "-o", str(tmp_path / "o.safetensors"), "-q"]) == 0
    recipe = json.loads(safe_open(str(tmp_path / "o.safetensors"), "pt").metadata()["sd_merge_recipe"])
    first, rest = ",".join(map(str, alphas)).split(",", 1)
    assert recipe["base_alpha"] == float(first) and recipe["weights_alpha"] == [float(w) for w in rest.split(",")]
    first, rest = ",".join(map(str, betas)).split(",", 1)
    assert recipe["base_beta"] == float(first) and recipe["weights_beta"] == [float(w) for w in rest.split(",")]
    # beta per layer the way alpha is (docs/merge.md; smerge's own 110-value beta path writes alpha: not copied)
    out, ta, tb, tc = (load_file(p) for p in (tmp_path / "o.safetensors", a, b, c))
    for key in ta:
        wa, wb = sm_alpha_110(key, ",".join(map(str, alphas))), sm_alpha_110(key, ",".join(map(str, betas)))
        want = (1 - wa - wb) * ta[key].double() + wa * tb[key].double() + wb * tc[key].double()
        torch.testing.assert_close(out[key].double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("value", ['"just text"', "[1, 2]", "{not json"])
def test_input_metadata_not_starting_with_a_brace_or_not_json_stays_text(value):
    # read_metadata_from_safetensors: only values starting with "{" are parsed, and failures stay the text
    from sdadapt.merge.recipe import a1111_metadata

    step = MergeStep("weighted-sum", ("/x/a.safetensors", "/x/b.ckpt"), alpha=0.5)
    meta = a1111_metadata(step, hashes={"/x/a.safetensors": "aa", "/x/b.ckpt": "bb"}, legacy_hashes={},
                          input_metadata={"/x/a.safetensors": {"sd_merge_recipe": value, "sd_merge_models": value}})
    models = json.loads(meta["sd_merge_models"])
    assert models == {"aa": {"name": "a.safetensors", "legacy_hash": None, "sd_merge_recipe": value},
                      "bb": {"name": "b.ckpt", "legacy_hash": None, "sd_merge_recipe": None}}


def test_a_lam_list_the_model_refuses_names_lam(files, tmp_path, capsys):
    code = _run(tmp_path, "ties", *files, "--lam", ",".join(["0.5"] * 20), "-o", tmp_path / "x.safetensors")
    err = capsys.readouterr().err
    assert code == 2 and "20 block weights do not fit sd1" in err and "--lam" in err


def test_a_presets_file_with_a_bom_reads_its_first_name(tmp_path):
    from sdadapt.merge.presets import read_presets

    (tmp_path / "mbwpresets.txt").write_bytes("\ufeffMINE\t".encode() + b",".join([b"0.5"] * 26) + b"\r\n")
    assert resolve_preset("MINE", presets=read_presets(tmp_path / "mbwpresets.txt")) == (0.5,) * 26


def test_a_presets_file_is_read_whenever_given_and_its_random_names_stay_supermergers(files, tmp_path, capsys):
    """(review RM) a mistyped --presets path is an error even with numeric values; supermerger appends its random
    presets after every list, so ALL_R in a user's file is still the random one (refused); block-weighted's
    --weights takes numbers only, so --presets there is an error naming where preset names go."""
    with pytest.raises(SystemExit) as stop:  # (a usage error, before anything is opened)
        _run(tmp_path, "weighted-sum", *files[:2], "--alpha", "0.5", "--presets", tmp_path / "missing.txt",
             "-o", tmp_path / "x.safetensors")
    assert stop.value.code == 2 and "missing.txt" in capsys.readouterr().err
    (tmp_path / "mine.txt").write_text("ALL_R\t" + ",".join(["0.5"] * 26) + "\n")
    with pytest.raises(InputError, match="random preset"):
        resolve_preset("ALL_R", presets=read_presets(tmp_path / "mine.txt"))
    with pytest.raises(SystemExit) as stop:
        _run(tmp_path, "block-weighted", *files[:2], "--weights", ",".join(["0.5"] * 26), "--presets",
             tmp_path / "mine.txt", "-o", tmp_path / "y.safetensors")
    assert stop.value.code == 2 and "--alpha NAME --presets FILE" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
