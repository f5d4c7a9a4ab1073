"""The marker tensors a single-file checkpoint carries to say how its model predicts and on which schedule.

Two top-level keys outside every component's naming, each an empty float32 tensor (``torch.tensor([])``):

* ``v_pred`` — a v-prediction model. ComfyUI writes it for every v-prediction model it saves
  (``BaseModel.state_dict_for_saving``, ``comfy_extras/nodes_model_merging.py``'s ``save_checkpoint``) and reads it
  for SDXL (``supported_models.SDXL.model_type``: ``"v_pred" in state_dict`` -> ``ModelType.V_PREDICTION``); A1111
  picks its SDXL v-prediction config by it (``sd_models_config.guess_model_config_from_state_dict``). NoobAI-XL
  V-Pred and the models merged from it carry it.
* ``ztsnr`` — trained on the zero-terminal-SNR schedule (Lin et al. 2023). A1111 sets ``model.ztsnr`` from it
  (``sd_models.load_model_weights``) and then rescales ᾱ as its "Zero Terminal SNR" noise schedule does
  (``rescale_zero_terminal_snr_abar``); ComfyUI reads it beside ``v_pred`` (``sampling_settings["zsnr"]``).

sdadapt reads both in any SD1/SD2/SDXL file (``v_pred`` wins over a ModelSpec prediction type that says otherwise,
as those tools read the key alone) and writes them where those tools read them: ``v_pred`` for a v-prediction SDXL
model, and ``ztsnr`` (with ``v_pred`` for a v model) for a zero-terminal-SNR model of any architecture. A
diffusers folder says the same in its scheduler config: ``prediction_type: "v_prediction"``,
``rescale_betas_zero_snr: true``.

ComfyUI's EDM v-prediction markers (``edm_vpred.sigma_max`` / ``edm_vpred.sigma_min``, 0-dim float32: CosXL's
formulation, ComfyUI's ``ModelType.V_PREDICTION_EDM``) give the model's σ range (:func:`edm_v_range`); its σ_data is
1 and it predicts v (:func:`sdadapt.formats.edm.edm_v_scheduler`). sdadapt reads them (``supported_models.SDXL``'s
rule: they win over ``v_pred``) and writes them for such a model, as ComfyUI's ``CheckpointSave`` does.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from .files import WeightFileError

__all__ = ["EDM_V_KEYS", "V_PRED_KEY", "ZTSNR_KEY", "edm_v_range", "edm_v_tensors", "marker_tensors", "markers_said",
           "read_markers"]

#: a v-prediction model
V_PRED_KEY = "v_pred"
#: a model trained on the zero-terminal-SNR schedule
ZTSNR_KEY = "ztsnr"
#: ComfyUI's EDM v-prediction model (CosXL): its σ range
EDM_V_KEYS = ("edm_vpred.sigma_max", "edm_vpred.sigma_min")
_WORDS = {V_PRED_KEY: "v-prediction", ZTSNR_KEY: "zero terminal SNR"}


def markers_said(keys: Collection[str]) -> str:
    """What the markers among ``keys`` say, for reports: ``"v-prediction, zero terminal SNR: v_pred / ztsnr"``
    (``""`` without any)."""
    found = [key for key in (V_PRED_KEY, ZTSNR_KEY) if key in keys]
    if not found:
        return ""
    return f"{', '.join(_WORDS[key] for key in found)}: {' / '.join(found)}"


def edm_v_range(state: Mapping[str, Tensor], *, source: object) -> tuple[float, float] | None:
    """``(σ_min, σ_max)`` of an EDM v-prediction model (CosXL) from its :data:`EDM_V_KEYS`, as ComfyUI reads them
    (``supported_models.SDXL.model_type``: σ_max from its key, σ_min from its own or 0.002); ``None`` without
    ``edm_vpred.sigma_max`` (a σ_min alone tells ComfyUI nothing either).

    Raises:
        WeightFileError: a value that is not one finite positive number, σ_min ≥ σ_max, or Playground v2.5's range
            0.002-80 with no latent statistics — what ComfyUI's ``CheckpointSave`` writes of a Playground model (its
            EDM class is one of its v-prediction ones), which is no v-prediction model (``source`` named).
    """
    if EDM_V_KEYS[0] not in state:
        return None
    values = []
    for key, default in zip(EDM_V_KEYS, (None, 0.002)):
        tensor = state.get(key)
        if tensor is None:
            values.append(default)
            continue
        if tensor.numel() != 1 or not math.isfinite(float(tensor.reshape(-1)[0])):
            raise WeightFileError(f"{source}: {key} must hold one finite number (ComfyUI's EDM v-prediction σ "
                                  f"range), got shape {tuple(tensor.shape)}")
        values.append(float(tensor.reshape(-1)[0]))
    top, low = values
    if not 0 < low < top:
        raise WeightFileError(f"{source}: edm_vpred.sigma_min {low:g} / edm_vpred.sigma_max {top:g}: the σ range "
                              "must be 0 < σ_min < σ_max")
    if abs(top - 80.0) < 1e-3 and abs(low - 0.002) < 1e-7 and not any(k in state for k in ("edm_mean", "edm_std")):
        raise WeightFileError(f"{source}: {' / '.join(k for k in EDM_V_KEYS if k in state)} at σ 0.002-80, Playground "
                              "v2.5's range: a Playground model saved by ComfyUI (which writes these markers for it and "
                              "loses its latent statistics), not an EDM v-prediction model; put back edm_mean / edm_std "
                              "(ComfyUI's latent_formats.SDXL_Playground_2_5) and remove the two markers to read it here")
    return low, top


def edm_v_tensors(sigma_min: float, sigma_max: float) -> dict[str, Tensor]:
    """The :data:`EDM_V_KEYS` tensors ComfyUI's ``CheckpointSave`` writes for an EDM v-prediction model (0-dim
    float32: ``torch.tensor(model_sampling.sigma_max).float()``)."""
    return {EDM_V_KEYS[0]: torch.tensor(float(sigma_max), dtype=torch.float32),
            EDM_V_KEYS[1]: torch.tensor(float(sigma_min), dtype=torch.float32)}


def read_markers(state: Mapping[str, Tensor], *, source: object) -> tuple[frozenset[str], dict[str, Tensor]]:
    """``(markers, state without them)``: which of :data:`V_PRED_KEY` / :data:`ZTSNR_KEY` an LDM ``state`` holds (any
    shape and dtype: only the key counts, as for ComfyUI and A1111), and the state for the key map (without ComfyUI's
    EDM v-prediction keys either: :func:`edm_v_range` reads them).
    """
    state = {k: v for k, v in state.items() if k not in EDM_V_KEYS}
    markers = frozenset(key for key in (V_PRED_KEY, ZTSNR_KEY) if key in state)
    if not markers:
        return markers, dict(state)
    return markers, {k: v for k, v in state.items() if k not in markers}


def marker_tensors(*, architecture: str, v_prediction: bool, zero_terminal_snr: bool) -> dict[str, Tensor]:
    """The marker tensors an LDM file of a model gets (module docstring): ``v_pred`` for a v-prediction SDXL model
    or a zero-terminal-SNR v model, ``ztsnr`` for a zero-terminal-SNR model; each ``torch.tensor([])`` (float32,
    shape (0,)), as ComfyUI writes them."""
    markers: dict[str, Tensor] = {}
    if v_prediction and (architecture == "sdxl" or zero_terminal_snr):
        markers[V_PRED_KEY] = torch.tensor([])
    if zero_terminal_snr:
        markers[ZTSNR_KEY] = torch.tensor([])
    return markers
