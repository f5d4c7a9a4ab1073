"""Building LyCORIS adapters from a file, SDXL-sized: the cost of ``from_file_tensors`` per family.

One LyCORIS file's worth of modules on every Linear / Conv2d of the SDXL UNet (its shapes from
``UNET_CONFIGS["sdxl"]``, built on the meta device: no weights are allocated), rank 8 (conv rank 4).
For each family it times, in process CPU seconds (median of ``--repeats``):

* ``load``: ``adapter_from_file_tensors`` over every layer with real CPU tensors — what
  :func:`sdadapt.load_adapter` (and ``apply_lora``, ``--dim-from-weights``) runs per layer;
* ``meta``: the same on meta tensors of the file's shapes — the shape check ``merge-lora`` /
  ``resize-lora`` / ``combine-loras`` runs for every layer before any weight is read.

Modules built from a file skip the random init their factors would get for training
(``init_weights=False``). The reference columns (``load init``, ``meta init``) run the same calls with that init
forced back on (each module class's ``__init__`` wrapped to draw its random factors first, then overwritten by
the file, as before): both ways in one process.

    python benchmarks/lycoris_load.py [--families loha lokr glora lora] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from _bench import UNET_CONFIGS
from sdadapt.adapters import GLoRAConfig, LoHaConfig, LoKrConfig, LoRAConfig
from sdadapt.adapters.base import geometry_of
from sdadapt.adapters.registry import adapter_from_file_tensors, build_adapter

CONFIGS = {
    "loha": LoHaConfig(rank=8, conv_rank=4),
    "lokr": LoKrConfig(rank=8, conv_rank=4, factor=8),
    "glora": GLoRAConfig(rank=8, conv_rank=4),
    "lora": LoRAConfig(rank=8, conv_rank=4),
}


def sdxl_geometries():
    """{name: LayerGeometry} of every Linear / Conv2d of the SDXL UNet (built on the meta device)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl"])
    return {n: geometry_of(m, name=n) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def file_tensors(family: str, geometries) -> dict[str, dict[str, torch.Tensor]]:
    """One layer's file tensors per layer (a trained-looking file: every factor random)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, geometry in geometries.items():
        module = build_adapter(CONFIGS[family], geometry)
        tensors = module.file_tensors()
        out[name] = {k: torch.randn(v.shape, generator=g) if v.dim() else v.clone() for k, v in tensors.items()}
    return out


def _forced_init():
    """The module classes' ``__init__`` wrapped to run the training init even when built from a file."""
    from contextlib import ExitStack
    from unittest import mock

    from sdadapt.adapters.glora import GLoRAModule
    from sdadapt.adapters.loha import LoHaModule
    from sdadapt.adapters.lokr import LoKrModule
    from sdadapt.adapters.lora import LoRAModule

    stack = ExitStack()
    for cls in (GLoRAModule, LoHaModule, LoKrModule, LoRAModule):
        original = cls.__init__

        def init(self, *args, _original=original, **kwargs):
            kwargs["init_weights"] = True
            _original(self, *args, **kwargs)

        stack.enter_context(mock.patch.object(cls, "__init__", init))
    return stack


def _cpu_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    geometries = sdxl_geometries()
    rows = []
    print(f"SDXL UNet: {len(geometries)} Linear/Conv2d layers; CPU seconds, median of {args.repeats}")
    print(f"{'family':8} {'params (M)':>10} {'load init':>10} {'load s':>8} {'meta init':>10} {'meta s':>8}")
    for family in args.families:
        tensors = file_tensors(family, geometries)
        meta = {n: {k: v if v.dim() == 0 else torch.empty(v.shape, device="meta") for k, v in t.items()}
                for n, t in tensors.items()}
        params = sum(v.numel() for t in tensors.values() for v in t.values()) / 1e6
        def load_all(files):
            return lambda: [adapter_from_file_tensors(geometries[n], t, name=n) for n, t in files.items()]

        with _forced_init():
            load_ref = _cpu_seconds(load_all(tensors), args.repeats)
            check_ref = _cpu_seconds(load_all(meta), args.repeats)
        load = _cpu_seconds(load_all(tensors), args.repeats)
        check = _cpu_seconds(load_all(meta), args.repeats)
        rows.append({"family": family, "params_m": params, "load_init_s": load_ref, "load_s": load,
                     "meta_init_s": check_ref, "meta_s": check})
        print(f"{family:8} {params:10.1f} {load_ref:10.3f} {load:8.3f} {check_ref:10.3f} {check:8.3f}")
    results_file = Path(__file__).resolve().parent / "results" / "lycoris_load.json"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps({"torch": torch.__version__, "repeats": args.repeats, "cpu_seconds": rows},
                                       indent=2) + "\n")
    print(f"wrote {results_file}")


if __name__ == "__main__":
    main()
