"""What every LoRA-family file's tensors must be before an adapter is built from them: one check at
:func:`sdadapt.formats.load_lora`, so that each command and function that reads one (apply, ``merge-lora``,
``convert``, ``cut-dylora``, ``resize-lora`` ...) refuses a malformed file alike, naming it, the layer and the fix.

* dense (strided) tensors: a sparse one (possible in a legacy ``.pt``) is no format's;
* the built-in families' factors and deltas (:data:`FACTOR_KEYS`) floating point (float32/16, bfloat16, float8)
  and at least 1-D: an integer or bool factor, or a 0-dim one, is a damaged or hand-made file;
* the per-layer scalars — ``alpha`` (kohya, LyCORIS), LyCORIS (IA)³'s ``on_input`` — one number each: integer
  ``alpha`` is read as its value (some writers store it so), a vector is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..adapters.registry import file_keys
from ..errors import WeightFileError
from .layers import split_key

__all__ = ["FACTOR_KEYS", "SCALAR_KEYS", "check_lora_tensors"]

#: the file keys that hold one number per layer (a 0-dim or one-element tensor, of any numeric dtype): ``alpha``,
#: LyCORIS (IA)³'s ``on_input``, sdadapt's (IA)³ ``scales_bias`` flag
SCALAR_KEYS = frozenset({"alpha", "on_input", "scales_bias"})
#: the built-in families' factor and delta keys (the registry's file keys when sdadapt is imported, less the scalars):
#: floating point, at least 1-D (a family registered later keeps its own rules for its own keys)
FACTOR_KEYS = frozenset(file_keys()) - SCALAR_KEYS


def check_lora_tensors(components: Mapping[str, Mapping[str, Tensor]], *, source: object) -> None:
    """Refuse tensors no adapter can be built from (module docstring), naming ``source``, the component and key.

    Args:
        components: ``{component: {"<layer>.<file key>": tensor}}``, as :func:`~sdadapt.formats.load_lora` returns.
        source: the file (or folder) the tensors came from, for the message.

    Raises:
        WeightFileError: a sparse tensor, a non-floating or 0-dim factor, or a per-layer scalar of several values.
    """
    for component, state in components.items():
        for key, tensor in state.items():
            where = f"{source}: {component + ' ' if component else ''}{key}"
            if tensor.layout != torch.strided:
                raise WeightFileError(f"{where} is a {tensor.layout} tensor; LoRA files hold dense tensors: re-save it "
                                      "from the tool that made it")
            suffix = split_key(key)[1]
            if suffix in SCALAR_KEYS:
                if tensor.numel() != 1:
                    raise WeightFileError(f"{where} is {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')};"
                                          f" {suffix} is one number per layer: the file is damaged or was made for "
                                          "another program")
                continue
            if suffix not in FACTOR_KEYS:
                continue
            if not tensor.is_floating_point():
                raise WeightFileError(f"{where} is {str(tensor.dtype).removeprefix('torch.')}; LoRA factors and deltas "
                                      "are floating point (float32, float16, bfloat16, float8): the file is damaged "
                                      "or was made for another program")
            if tensor.dim() == 0:
                raise WeightFileError(f"{where} is a single number (0-dim); a LoRA factor or delta is at least 1-D: "
                                      "the file is damaged or was made for another program")
