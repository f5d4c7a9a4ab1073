"""merge-lora's bake as it was at 8eb03ad, transcribed: what ``tests/test_merge_lora_memory.py`` and
``benchmarks/merge_lora_memory.py`` compare the bake with (bit for bit, and memory).

At 8eb03ad ``BakedCheckpoint.get`` moved each layer's module to float32 **in place** (so an fp16 file's
modules held twice its size by the end of the bake), checked NaN/inf with ``has_nonfinite`` and then
``cast_checked`` read the tensor twice more (its own ``has_nonfinite`` and an ``aminmax``), and
``lora_delta_weight`` allocated the product and then a scaled copy; ``load_lora`` held the whole file it had
read to tell the file's kind while its loader read the file again.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from sdadapt import checks
from sdadapt.adapters import lora as lora_module
from sdadapt.adapters.registry import adapter_layer_delta
from sdadapt.adapters.tucker import rebuild_tucker
from sdadapt.checks import check_result
from sdadapt.errors import NonFiniteError
from sdadapt.formats import load_lora
from sdadapt.formats.files import read_weights
from sdadapt.loratools import output
from sdadapt.loratools.bake import BakedCheckpoint

__all__ = ["HeadBake", "head_cast_checked", "head_load_lora", "head_lora_delta_weight", "head_patched"]


def head_lora_delta_weight(up, down, scale=1.0, *, mid=None):
    """src/sdadapt/adapters/lora.py at 8eb03ad: the product, then a scaled copy."""
    out_features, rank = up.shape[0], up.shape[1]
    if mid is not None:
        w_out = up.reshape(out_features, rank).transpose(0, 1)
        return rebuild_tucker(mid, w_out, down.reshape(rank, -1)) * scale
    delta = up.reshape(out_features, rank) @ down.reshape(rank, -1)
    return (delta * scale).reshape(out_features, *down.shape[1:])


def head_cast_checked(value, dtype, *, key, hint=""):
    """src/sdadapt/checks.py at 8eb03ad: its own NaN/inf pass, then ``aminmax`` of the finite values (``checks.has_nonfinite``
    looked up at each call: ``benchmarks/merge_lora_bake.py`` swaps in the older ``isfinite`` one)."""
    if dtype is None or dtype == value.dtype:
        return value
    if dtype.is_floating_point and value.is_floating_point() and value.numel():
        limit = torch.finfo(dtype).max
        if torch.finfo(value.dtype).max > limit:
            finite = value[torch.isfinite(value)] if checks.has_nonfinite(value) else value
            if finite.numel():
                low, high = torch.aminmax(finite)
                peak = max(-float(low), float(high))
                if peak > limit:
                    raise NonFiniteError(f"tensor {key!r}: max |value| {peak:.4g} overflows {dtype}")
    return value.to(dtype)


_WIDTH = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


class HeadBake(BakedCheckpoint):
    """``BakedCheckpoint.get`` at 8eb03ad: each module moved to the compute dtype in place (a deep copy
    only for a narrower one), ``has_nonfinite`` then ``cast_checked`` with its own passes."""

    def _check_layer(self, tensors, slot, name):
        checked = super()._check_layer(tensors, slot, name)
        if not isinstance(checked, str):  # HEAD's _Entry.built_in: the widest float dtype at build
            dtypes = [t.dtype for t in (*checked[0].parameters(), *checked[0].buffers()) if t.is_floating_point()]
            self.__dict__.setdefault("built_in", {})[id(checked[0])] = max(
                dtypes, key=lambda d: _WIDTH.get(d, 64), default=torch.float32)
        return checked

    def _module_in(self, entry, dtype):
        if _WIDTH.get(dtype, 64) >= _WIDTH.get(self.built_in[id(entry.module)], 64):
            return entry.module
        return copy.deepcopy(entry.module)

    def get(self, key):
        value = self._source.get(key)
        entries, bias_entries = self._plan.get(key, []), self._bias_plan.get(key, [])
        if not entries and not bias_entries:
            if not self.allow_nonfinite and checks.has_nonfinite(value):
                check_result(value, key=key, inputs=[value], what="base")
            return head_cast_checked(value, self._dtypes[key], key=key)
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        merged = value.to(compute, copy=True)
        for entry in entries:
            target = merged if entry.rows is None else merged[entry.rows]
            delta, _ = adapter_layer_delta(
                self._module_in(entry, compute), base_weight=target if entry.uses_base else None, scale=entry.scale,
                dtype=compute, name=entry.name,
            )
            target.add_(delta.reshape(target.shape))
        for entry in bias_entries:
            _, bias = adapter_layer_delta(self._module_in(entry, compute), scale=entry.scale, dtype=compute,
                                          name=entry.name, weight=False)
            target = merged if entry.rows is None else merged[entry.rows]
            target.add_(bias.reshape(target.shape))
        if checks.has_nonfinite(merged):
            check_result(merged, key=key, inputs=[value], allow_nonfinite=self.allow_nonfinite, what="merged")
        return head_cast_checked(merged, self._dtypes[key], key=key)


def head_load_lora(path, *, layers_per_block=2):
    """``formats.load_lora`` at 8eb03ad: the whole file read to tell its kind, and still held while the loader
    reads it again (two copies of the file in memory at once)."""
    state, _ = read_weights(path)
    try:
        return load_lora(path, layers_per_block=layers_per_block)
    finally:
        del state


@contextlib.contextmanager
def head_patched():
    """8eb03ad's ``lora_delta_weight`` (``LoRAModule.delta_weight`` calls it by its module name: the product, then
    a scaled copy) and ``load_lora`` (merge-lora's ``load_components`` calls it by name) while the block runs."""
    today = lora_module.lora_delta_weight, output.load_lora
    lora_module.lora_delta_weight, output.load_lora = head_lora_delta_weight, head_load_lora
    try:
        yield
    finally:
        lora_module.lora_delta_weight, output.load_lora = today
