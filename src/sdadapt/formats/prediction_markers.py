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

ComfyUI's EDM v-prediction markers (``edm_vpred.sigma_max`` / ``edm_vpred.sigma_min``: CosXL's formulation) name
a model sdadapt does not sample (its EDM support is Playground v2.5's): such a file is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from .files import WeightFileError

__all__ = ["EDM_V_KEYS", "V_PRED_KEY", "ZTSNR_KEY", "marker_tensors", "markers_said", "read_markers"]

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


def read_markers(state: Mapping[str, Tensor], *, source: object) -> tuple[frozenset[str], dict[str, Tensor]]:
    """``(markers, state without them)``: which of :data:`V_PRED_KEY` / :data:`ZTSNR_KEY` an LDM ``state`` holds (any
    shape and dtype: only the key counts, as for ComfyUI and A1111), and the state for the key map.

    Raises:
        WeightFileError: ComfyUI's EDM v-prediction keys (:data:`EDM_V_KEYS`), naming ``source``.
    """
    edm_v = [key for key in EDM_V_KEYS if key in state]
    if edm_v:
        sigma_max, sigma_min = (state.get(key) for key in EDM_V_KEYS)
        top = float(sigma_max.reshape(-1)[0]) if sigma_max is not None and sigma_max.numel() else None
        low = float(sigma_min.reshape(-1)[0]) if sigma_min is not None and sigma_min.numel() else None
        value = f", σ_max {top:g}" if top is not None else ""
        # (ComfyUI's CheckpointSave writes these markers for every EDM model, its Playground class being one of its
        # v-prediction ones, and no edm_mean / edm_std: Playground's σ range 0.002-80 says which model it was)
        playground = ("; σ 0.002-80 is Playground v2.5's range: a Playground model saved by ComfyUI loses its latent "
                      "statistics, so put back edm_mean / edm_std (ComfyUI's latent_formats.SDXL_Playground_2_5) and "
                      "remove the two markers to read it here" if top is not None and low is not None
                      and abs(top - 80.0) < 1e-3 and abs(low - 0.002) < 1e-7 else "")
        raise WeightFileError(f"{source}: {' / '.join(edm_v)}: an EDM v-prediction model (CosXL's formulation{value}); "
                              "sdadapt samples EDM models in Playground v2.5's formulation only (edm_mean / edm_std), "
                              f"so this file is not read: use ComfyUI for it{playground}")
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
