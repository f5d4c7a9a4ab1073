"""What differs between transformers 4 and 5 where tests spell it out (the interop extra allows both)."""

import pytest

transformers = pytest.importorskip("transformers")

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

#: a ``CLIPTextModel``'s module path to its encoder layers: transformers 5 has no ``text_model`` level in it
CLIP_TEXT_MODEL = "" if TRANSFORMERS_5 else "text_model."

#: transformers 4's CLIP builds its causal mask with ``torch.full(..., finfo(dtype).min)`` in the default dtype, so a
#: float64 text encoder fails ("value cannot be converted to type float without overflow"); tests of a float64 CLIP
#: reference run on transformers 5
float64_clip = pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4's CLIP cannot run in float64")


def lycoris_te_name(name: str) -> str:
    """A kohya text-encoder layer name (``lora_te_text_model_encoder_…``) as LyCORIS spells it here: from the live
    module path, which on transformers 5's ``CLIPTextModel`` lacks ``text_model``."""
    return name.replace("lora_te_text_model_encoder_", "lora_te_encoder_") if TRANSFORMERS_5 else name
