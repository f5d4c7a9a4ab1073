"""What a field of another merger's recipe is called in an sdadapt recipe step.

supermerger's ``sd_merge_recipe`` (``scripts/mergers/mergers.py``, its ``merge_recipe`` dict:
``weights_alpha``, ``weights_beta``, ``model_a/b/c``, ``base_alpha/beta``, ``mode``, ``mbw``,
``elemental_merge``, ``calcmode``, ``Include``/``Exclude``) and A1111's (``interp_method``,
``multiplier``, ``primary_model_hash``, ``save_as_half``, ``discard_weights``, ``config_source``,
``bake_in_vae``, ...) are what people
copy into a recipe; :func:`sdadapt.merge.recipe.step_from_dict` refuses unknown fields, and with
these hints its message says what to write instead.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["foreign_field_hint", "foreign_recipe_hint"]

_OPERATOR_NAMES = ('"operator": supermerger mode "Weight sum" -> "weighted-sum", "Add difference" -> "add-difference", '
                   '"Triple sum" -> "triple-sum", "sum Twice" -> "sum-twice"; with a calcmode the calcmode decides')
_CALCMODES = ('"operator": calcmode "normal" -> the mode\'s operator, cosineA -> "cosine-a", cosineB -> "cosine-b", '
              'trainDifference -> "train-difference", smoothAdd -> "smooth-add", extract -> "extract", tensor -> '
              '"tensor", tensor2 -> "tensor2", self -> "self", "plus random" -> "plus-random"')
_BLOCKS = "a list of 26 (SD1/SD2, BASE first) or 20 (SDXL) numbers, not a comma string"
_INPUTS = '"inputs": [{"path": A}, {"path": B}, {"path": C}] (files, in that order; a "sha256" next to a path is checked)'

#: lower-cased foreign field -> what an sdadapt step has instead
_FIELDS: dict[str, str] = {
    "calcmode": _CALCMODES,
    "mode": _OPERATOR_NAMES,
    "interp_method": '"operator" (A1111 "Weighted sum" -> "weighted-sum", "Add difference" -> "add-difference")',
    "weights_alpha": f'"block_weights": {_BLOCKS}',
    "weights_alpha_orig": f'"block_weights": {_BLOCKS}',
    "weights_beta": f'"block_beta": {_BLOCKS}',
    "weights_beta_orig": f'"block_beta": {_BLOCKS}',
    "mbw": f'"block_weights" ({_BLOCKS}); leave it out for one alpha',
    "base_beta": '"options": {"beta": ...} (BASE of "block_beta" when that is set)',
    "beta": '"options": {"beta": ...}',
    "multiplier": '"alpha" (the weight of B)',
    "model_a": _INPUTS,
    "model_b": _INPUTS,
    "model_c": _INPUTS,
    "primary_model_hash": _INPUTS,
    "secondary_model_hash": _INPUTS,
    "tertiary_model_hash": _INPUTS,
    "elemental_merge": '"elemental" (the same rules text)',
    "include": '"policy": {"include": "BLOCKS:ELEMENTS, ..."}',
    "exclude": '"policy": {"exclude": "BLOCKS:ELEMENTS, ..."}',
    "discard_weights": '"policy": {"discard": REGEX}',
    "save_as_half": '"dtype": "fp16"',
    "fine": '"adjust": [8 numbers]',
    "custom_name": "nothing: the output file is -o OUT",
    "bake_in_vae": ('nothing in a step: bake the VAE into the merged file afterwards with python -m sdadapt convert '
                    'MERGED.safetensors --to ldm --vae VAE -o OUT.safetensors (a VAE file or folder), or keep the first '
                    'input\'s VAE unmerged: "policy": {"components": ["unet", "text_encoder", "text_encoder_2"]}'),
    "config_source": ("nothing: sdadapt reads SD1/SD2/SDXL from the tensors, not from a .yaml; for an SD2 768-v merge "
                      "pass --prediction-type v_prediction to generate/train, or write it into the file with python -m "
                      "sdadapt convert MERGED.safetensors --to ldm --prediction-type v_prediction -o OUT.safetensors; "
                      "A1111 wants a .yaml named like OUT beside it: copy the input's"),
    "type": 'nothing: an sdadapt recipe is {"format": "sdadapt-merge-recipe", "step": {...}}',
}


def foreign_field_hint(name: str, *, operator_options: Collection[str] = ()) -> str | None:
    """What an sdadapt step calls another merger's recipe field ``name``, or ``None`` if unknown.

    ``operator_options``: the option names of the step's operator (a field named like one goes in
    ``"options"``).
    """
    if name in operator_options:
        return f'"options": {{"{name}": ...}} (an option of the operator)'
    if name.lower() in ("beta", "base_beta", "weights_beta", "weights_beta_orig") and operator_options \
            and "beta" not in operator_options:
        return ('nothing: this operator takes no beta (the operators with one — triple-sum, sum-twice, extract, '
                'tensor, tensor2, sd-meh\'s — take it as their option beta, per block as "block_beta")')
    return _FIELDS.get(name.lower())


def foreign_recipe_hint(data: Mapping[str, Any]) -> str:
    """Why a JSON document without the sdadapt format tag is not replayable, when it is another
    merger's recipe (``""`` otherwise)."""
    kind = data.get("type")
    if kind == "sd-webui-supermerger" or kind == "webui":
        who = "supermerger's" if kind == "sd-webui-supermerger" else "AUTOMATIC1111's"
        return (f"; it is {who} sd_merge_recipe, which records input hashes, not files, so it cannot be replayed — "
                'write a step instead: {"format": "sdadapt-merge-recipe", "step": {"operator": "weighted-sum", '
                '"inputs": [{"path": A}, {"path": B}], "alpha": 0.5}} (docs/merge.md, Files and recipes)')
    return ""
