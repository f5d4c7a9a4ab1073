"""``merge-lora`` on an SD1.5-size UNet: the bake as it was (each layer's adapter built twice) vs as it is.

One process, one random fp16 checkpoint with the real SD1.5 UNet's keys and shapes (``tests/merge_layouts.py``'s
``sd1-unet`` layout: tiny text encoder and VAE) and rank-16 LoRA, LoHa and LoKr files in kohya's key layout
(``lora_unet_...``, fp16, alpha 8) on every Linear / Conv2d of the UNet's attention blocks, resnets and
down/up-samplers (LyCORIS' default preset; 3x3 convs at rank 16 too). No download: every value is random.

For each file the bake runs twice, alternating which goes first:

* ``reference``: the path before this change, transcribed below (:class:`ReferenceBake`): every layer checked
  by building its adapter on the meta device, built again from the file tensors for each ``get`` (and once more
  for a bias delta), the checkpoint tensor copied twice (``.to(float32).clone()``), NaN/inf checked with
  ``isfinite(t).all()``;
* ``sdadapt``: :func:`sdadapt.loratools.bake.merge_loras_into_checkpoint` as it is: one build per layer
  (the check's), one copy, ``checks.has_nonfinite``'s one-reduction NaN/inf check (the reference runs with the
  old ``isfinite(t).all()`` patched in, in ``cast_checked`` too).

Both write the baked file (the same writer); the outputs are compared tensor by tensor (``torch.equal``: the
change must not move a bit). The table gives wall and CPU seconds (best of ``--repeats``) and the ratio.

    OMP_NUM_THREADS=2 python benchmarks/merge_lora_bake.py [--families lora loha lokr] [--repeats 1] [--work DIR]

Writes ``benchmarks/results/merge_lora_bake.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared synthetic layouts
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench import environment, write_result  # noqa: E402

from sdadapt.adapters import LoHaConfig, LoKrConfig, LoRAConfig  # noqa: E402
from sdadapt.adapters.base import LayerGeometry  # noqa: E402
from sdadapt.adapters.registry import adapter_from_file_tensors, build_adapter, file_layer_delta  # noqa: E402
from sdadapt import checks  # noqa: E402
from merge_lora_head import head_cast_checked as cast_checked  # noqa: E402  (8eb03ad's: the reference's passes)
from sdadapt.checks import check_result, has_nonfinite  # noqa: E402
from sdadapt.loratools import bake  # noqa: E402
from sdadapt.merge.engine import write_source  # noqa: E402

CONFIGS = {
    "lora": LoRAConfig(rank=16, alpha=8.0),
    "loha": LoHaConfig(rank=16, alpha=8.0),
    "lokr": LoKrConfig(rank=16, alpha=8.0, factor=8),
}


# ----------------------------------------------------------------------------------- inputs
def make_checkpoint(path: Path, keep=None) -> Path:
    """SD1.5's UNet keys and shapes (LDM names), fp16 values uniform in ±0.05 (one tensor in memory at a time);
    ``keep(key)``: only the keys it accepts (a smaller checkpoint)."""
    from merge_layouts import layout

    from sdadapt.merge.writer import write_streaming

    if path.exists():
        return path
    shapes = layout("sd1-unet")
    plan = {k: (torch.float16, tuple(s)) for k, s in shapes.items() if keep is None or keep(k)}
    g = torch.Generator().manual_seed(1)

    def tensors():
        for key, (dtype, shape) in plan.items():
            yield key, torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05, generator=g)

    return write_streaming(path, plan, tensors(), overwrite=True)


def make_lora(path: Path, family: str, keep=None) -> Path:
    """A rank-16 file of ``family`` on the UNet's attention, resnet and sampler layers (kohya names, fp16);
    ``keep(name)``: only the (diffusers) layer names it accepts."""
    from merge_layouts import SD15_UNET, diffusers_shapes

    from sdadapt.formats import save_kohya

    if path.exists():
        return path
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, shape in diffusers_shapes(SD15_UNET).items():
        name = key[len("unet."):-len(".weight")]
        if not key.endswith(".weight") or len(shape) not in (2, 4) or not any(
                part in name for part in (".attentions.", ".resnets.", "samplers.")) or (keep is not None and not keep(name)):
            continue
        module = build_adapter(CONFIGS[family], LayerGeometry.from_weight_shape(shape), device="meta")
        for suffix, value in module.file_tensors().items():
            state[f"{name}.{suffix}"] = (torch.tensor(8.0) if suffix == "alpha" else
                                         torch.empty(value.shape).normal_(0.0, 0.02, generator=g).half())
    save_kohya(path, {"unet": state}, base_model="sd1")
    return path


# ------------------------------------------------------------------- the path before (reference)
class ReferenceBake(bake.BakedCheckpoint):
    """:class:`~sdadapt.loratools.bake.BakedCheckpoint` with the per-layer work it did before: the check builds
    the adapter on the meta device, each ``get`` builds it again from the file tensors (kept beside the plan)."""

    def _check_layer(self, tensors, slot, name):
        self.__dict__.setdefault("_files", {})
        from sdadapt.loratools.output import same_layer_shape, slot_shape

        want = slot_shape(self._shapes[slot.key], slot)
        try:
            implied = bake.weight_shape_of_file_tensors(tensors, name=name)
        except ValueError as exc:
            return str(exc)
        if implied is not None and not same_layer_shape(implied, want):
            return f"{name}: delta {implied} vs {slot.key} {want}"
        bias_key = bake._bias_key(slot.key)
        geometry = LayerGeometry.from_weight_shape(tuple(implied if implied is not None else want),
                                                   has_bias=bias_key in self._shapes)
        meta = {k: v if v.dim() == 0 else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
        try:
            module = adapter_from_file_tensors(geometry, meta, name=name)
            has_bias_delta = module.bias_delta() is not None
        except ValueError as exc:
            return f"{exc!s} (checkpoint tensor {slot.key} {want})"
        self._files[id(module)] = (dict(tensors), geometry, slot.key)
        if not has_bias_delta:
            return module, None
        if bias_key not in self._shapes:
            return f"{name}: has a bias delta but the checkpoint has no {bias_key}"
        return module, bias_key

    def get(self, key):
        value = self._source.get(key)
        entries, bias_entries = self._plan.get(key, []), self._bias_plan.get(key, [])
        if not entries and not bias_entries:
            if not self.allow_nonfinite and has_nonfinite(value):
                check_result(value, key=key, inputs=[value], what=f"{self.path.name}'s tensor")
            return cast_checked(value, self._dtypes[key], key=key, hint="write float32 (--dtype fp32)")
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        merged = value.to(compute).clone()
        for entry in entries:
            tensors, geometry, _ = self._files[id(entry.module)]
            target = merged if entry.rows is None else merged[entry.rows]
            delta, _ = file_layer_delta(dict(tensors), geometry, base_weight=target if entry.uses_base else None,
                                        scale=entry.scale, dtype=compute, name=entry.name)
            target.add_(delta.reshape(target.shape))
        for entry in bias_entries:
            tensors, geometry, weight_key = self._files[id(entry.module)]
            weight = None
            if entry.uses_base:
                weight = self._source.get(weight_key)
                weight = weight if entry.rows is None else weight[entry.rows]
            _, bias = file_layer_delta(dict(tensors), geometry, base_weight=weight, scale=entry.scale, dtype=compute,
                                       name=entry.name)
            target = merged if entry.rows is None else merged[entry.rows]
            target.add_(bias.reshape(target.shape))
        self.report.merged[key] = len(entries) + len(bias_entries)
        if has_nonfinite(merged):
            check_result(merged, key=key, inputs=[value], allow_nonfinite=self.allow_nonfinite, what="the merged weight")
        return cast_checked(merged, self._dtypes[key], key=key, hint="write float32 (--dtype fp32) or lower --scale")


def isfinite_all_has_nonfinite(tensor: torch.Tensor) -> bool:
    """``checks.has_nonfinite`` as it was: a full-size ``isfinite`` then ``.all()``."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return False
    return not bool(torch.isfinite(tensor).all())


def bake_with(cls, base: Path, lora: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one bake of ``lora`` into ``base`` written to ``out`` (check, plan, compute, write).
    The reference runs with ``checks.has_nonfinite`` as it was (``cast_checked`` calls it too)."""
    global has_nonfinite
    out.unlink(missing_ok=True)
    today = checks.has_nonfinite
    if cls is ReferenceBake:
        checks.has_nonfinite = has_nonfinite = isfinite_all_has_nonfinite
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        with cls(base, [lora], strengths=0.8) as baked:
            write_source(out, baked, overwrite=True)
        return time.perf_counter() - wall, time.process_time() - cpu
    finally:
        checks.has_nonfinite = has_nonfinite = today


def same_files(a: Path, b: Path) -> bool:
    """Every tensor of ``a`` and ``b`` equal (dtype, shape, bits), read one at a time."""
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if list(fa.keys()) != list(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=1, help="bakes per path and file; the best time is reported")
    parser.add_argument("--work", default=None, help="folder for the inputs and outputs (default: a temporary one, removed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merge_lora_bake.json"))
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="merge-lora-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        start = time.perf_counter()
        base = make_checkpoint(work / "sd15-unet.safetensors")
        print(f"checkpoint {base.stat().st_size / 2**30:.2f} GiB fp16 ({time.perf_counter() - start:.0f} s to make); "
              f"threads {torch.get_num_threads()}")
        print(f"{'file':6} {'layers':>6} {'MiB':>6} {'reference s':>12} {'sdadapt s':>10} {'ratio':>6} "
              f"{'ref CPU s':>10} {'CPU s':>7} {'equal':>6}")
        for family in args.families:
            lora = make_lora(work / f"{family}.safetensors", family)
            times: dict[str, list[tuple[float, float]]] = {"reference": [], "sdadapt": []}
            paths = {"reference": (ReferenceBake, work / "ref.safetensors"),
                     "sdadapt": (bake.BakedCheckpoint, work / "new.safetensors")}
            for repeat in range(max(1, args.repeats)):
                for name in (("reference", "sdadapt") if repeat % 2 == 0 else ("sdadapt", "reference")):
                    times[name].append(bake_with(paths[name][0], base, lora, paths[name][1]))
            equal = same_files(paths["reference"][1], paths["sdadapt"][1])
            with bake.BakedCheckpoint(base, [lora]) as baked:
                layers = sum(len(v) for v in baked._plan.values())
            ref, new = min(times["reference"]), min(times["sdadapt"])
            row = {"family": family, "layers": layers, "file_mib": lora.stat().st_size / 2**20,
                   "reference_s": ref[0], "sdadapt_s": new[0], "ratio": ref[0] / new[0],
                   "reference_cpu_s": ref[1], "sdadapt_cpu_s": new[1], "bit_identical": equal,
                   "times": {k: v for k, v in times.items()}}
            rows.append(row)
            print(f"{family:6} {layers:>6} {row['file_mib']:>6.1f} {ref[0]:>12.2f} {new[0]:>10.2f} {row['ratio']:>6.2f} "
                  f"{ref[1]:>10.2f} {new[1]:>7.2f} {str(equal):>6}")
            if not equal:
                raise SystemExit(f"{family}: the two bakes differ; the change must be bit-identical")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result = {"checkpoint": "SD1.5 UNet shapes (sd1-unet layout), fp16, random", "strength": 0.8, **environment(), "repeats": max(1, args.repeats),
              "rows": rows}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
