"""``inspect`` names every adapter family as the tool that wrote it does (one tiny file per family).

References: kohya sd-scripts ``networks/oft.py`` (``OFT_PREFIX_UNET = "oft_unet"``, ``oft_blocks``
``(num_blocks, block_size, block_size)``, ``alpha`` buffer: constraint ``alpha · out_dim``) and
``networks/lora.py``; LyCORIS' algo names (``lora``/``locon``, ``loha``, ``lokr``, ``full``,
``ia3``, ``glora``, ``norm``, ``diag-oft``, ``boft``, DoRA's ``dora_scale``); peft's ``IA3Config``
(``ia3_l``).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sdadapt.formats.detect import FILE_KINDS, describe_file

L = "lora_unet_down_blocks_0_attentions_0_proj_in"
NORM = "lora_unet_down_blocks_0_attentions_0_norm"
OFT = "oft_unet_down_blocks_0_attentions_0_proj_in"
LYCORIS = {"ss_network_module": "lycoris.kohya"}


def _r(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


# name: (tensors, metadata, kind, family, algorithms, ranks, alphas) — in 8, out 8, rank 4
CASES = {
    "lora": ({f"{L}.lora_down.weight": _r(4, 8), f"{L}.lora_up.weight": _r(8, 4), f"{L}.alpha": torch.tensor(2.0)},
             {"ss_network_module": "networks.lora"}, "kohya-lora", "lora", {"lora": 1}, {"4": 1}, {"2": 1}),
    "locon": ({f"{L}.lora_down.weight": _r(4, 8, 3, 3), f"{L}.lora_up.weight": _r(8, 4, 1, 1), f"{L}.alpha": torch.tensor(2.0)},
              {"ss_network_module": "networks.lora"}, "kohya-lora", "lora", {"locon": 1}, {"4": 1}, {"2": 1}),
    "loha": ({f"{L}.hada_w1_a": _r(8, 4), f"{L}.hada_w1_b": _r(4, 8), f"{L}.hada_w2_a": _r(8, 4),
              f"{L}.hada_w2_b": _r(4, 8), f"{L}.alpha": torch.tensor(2.0)}, LYCORIS, "lycoris", "loha", {"loha": 1},
             {"4": 1}, {"2": 1}),
    "full": ({f"{L}.diff": _r(8, 8), f"{L}.diff_b": _r(8)}, LYCORIS, "lycoris", "full", {"full": 1},
             {"none (full weight deltas)": 1}, {"none (full weight deltas)": 1}),
    "ia3": ({f"{L}.weight": _r(8), f"{L}.on_input": torch.tensor(False)}, LYCORIS, "lycoris", "ia3", {"ia3": 1},
            {"none (IA3 vectors)": 1}, {"none (IA3 vectors)": 1}),
    "glora": ({f"{L}.a1.weight": _r(8, 4), f"{L}.a2.weight": _r(4, 8), f"{L}.b1.weight": _r(8, 4),
               f"{L}.b2.weight": _r(4, 8), f"{L}.alpha": torch.tensor(2.0)}, LYCORIS, "lycoris", "glora", {"glora": 1},
              {"4": 1}, {"2": 1}),
    "norm": ({f"{NORM}.w_norm": _r(8), f"{NORM}.b_norm": _r(8)}, LYCORIS, "lycoris", "norm", {"norm": 1},
             {"none (norm weight/bias offsets)": 1}, {"none (norm weight/bias offsets)": 1}),
    "diag-oft": ({f"{L}.oft_blocks": _r(2, 4, 4), f"{L}.alpha": torch.tensor(0.0)}, LYCORIS, "lycoris", "diag-oft",
                 {"diag-oft": 1}, {"none (OFT rotations: diag-oft blocks of 4)": 1}, {"no constraint (OFT)": 1}),
    "boft": ({f"{L}.oft_blocks": _r(2, 2, 4, 4), f"{L}.alpha": torch.tensor(0.0)}, LYCORIS, "lycoris", "boft",
             {"boft": 1}, {"none (OFT rotations: boft blocks of 4)": 1}, {"no constraint (OFT)": 1}),
    "dora": ({f"{L}.lora_down.weight": _r(4, 8), f"{L}.lora_up.weight": _r(8, 4), f"{L}.alpha": torch.tensor(2.0),
              f"{L}.dora_scale": _r(1, 8)}, LYCORIS, "lycoris", "lora+dora", {"dora": 1}, {"4": 1}, {"2": 1}),
    "kohya-oft": ({f"{OFT}.oft_blocks": _r(2, 4, 4), f"{OFT}.alpha": torch.tensor(1e-3)},
                  {"ss_network_module": "networks.oft"}, "kohya-oft", "kohya-oft", {"kohya-oft": 1},
                  {"none (OFT rotations: diag-oft blocks of 4)": 1}, {"constraint 0.001 (OFT)": 1}),
    "kohya-oft-no-metadata": ({f"{OFT}.oft_blocks": _r(2, 4, 4), f"{OFT}.alpha": torch.tensor(1e-3)}, {},
                              "kohya-oft", "kohya-oft", {"kohya-oft": 1},
                              {"none (OFT rotations: diag-oft blocks of 4)": 1}, {"constraint 0.001 (OFT)": 1}),
    "peft-ia3": ({"base_model.model.down.ia3_l": _r(8, 1)}, {}, "peft-ia3", "ia3", {"ia3": 1},
                 {"none (IA3 vectors)": 1}, {"none (IA3 vectors)": 1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_names_each_family(tmp_path, name):
    tensors, metadata, kind, family, algorithms, ranks, alphas = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    summary = describe_file(path)
    assert kind in FILE_KINDS
    got = {k: summary.get(k) for k in ("kind", "family", "algorithms", "ranks", "alphas")}
    assert got == {"kind": kind, "family": family, "algorithms": algorithms, "ranks": ranks, "alphas": alphas}
    assert "use" in summary and "--lora" in summary["use"]


def test_kohya_oft_loads_through_the_kohya_reader(tmp_path):
    # generate --lora takes what inspect calls kohya-oft (formats.load_lora dispatches on the kind)
    from sdadapt.formats import load_lora

    tensors, metadata = CASES["kohya-oft"][:2]
    path = tmp_path / "oft.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    components, _ = load_lora(path)
    (state,) = components.values()
    (key,) = [k for k in state if k.endswith("oft_blocks")]
    assert torch.equal(state[key], tensors[f"{OFT}.oft_blocks"])
