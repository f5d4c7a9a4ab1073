"""kohya's caption code, transcribed for the tests (never imported by sdadapt).

From kohya sd-scripts 48d368fa (library/train_util.py ``BaseDataset.process_caption``,
``FineTuningDataset.__init__``), with kohya's module-level ``random`` passed in as ``rng``.
"""

from __future__ import annotations

import math
import random
import re

__all__ = ["finetuning_caption", "process_caption"]


def process_caption(caption: str, rng: random.Random, *, replacements: dict | None = None, prefix: str = "",
                    suffix: str = "", dropout: float = 0.0, every_n: int = 0, epoch: int = 1, wildcard: bool = False,
                    shuffle: bool = False, keep_tokens: int = 0, keep_separator: str = "", tag_dropout: float = 0.0,
                    warmup_step: int = 0, warmup_min: int = 1, step: int = 0, secondary: str = "",
                    separator: str = ",") -> str:
    """``BaseDataset.process_caption`` (48d368fa), ``random`` -> ``rng``; ``epoch`` is kohya's
    ``current_epoch`` (counted from 1), ``warmup_step`` already a step count (kohya's ``< 1`` rewrite left out);
    ``replacements``: train_textual_inversion.py's ``add_replacement`` table (``""``: the templates)."""
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    is_drop_out = dropout > 0 and rng.random() < dropout
    is_drop_out = is_drop_out or every_n > 0 and epoch % every_n == 0
    if is_drop_out:
        caption = ""
    else:
        if wildcard:
            if "\n" in caption:
                caption = rng.choice(caption.split("\n"))
            replacer1, replacer2 = "⦅", "⦆"
            while replacer1 in caption or replacer2 in caption:
                replacer1 += "⦅"
                replacer2 += "⦆"
            caption = caption.replace("{{", replacer1).replace("}}", replacer2)
            caption = re.sub(r"\{([^}]+)\}", lambda m: rng.choice(m.group(1).split("|")), caption)
            caption = caption.replace(replacer1, "{").replace(replacer2, "}")
        else:
            caption = caption.split("\n")[0]
        if shuffle or warmup_step > 0 or tag_dropout > 0:
            fixed_tokens, flex_tokens, fixed_suffix_tokens = [], [], []
            if keep_separator and keep_separator in caption:
                fixed_part, flex_part = caption.split(keep_separator, 1)
                if keep_separator in flex_part:
                    flex_part, fixed_suffix_part = flex_part.split(keep_separator, 1)
                    fixed_suffix_tokens = [t.strip() for t in fixed_suffix_part.split(separator) if t.strip()]
                fixed_tokens = [t.strip() for t in fixed_part.split(separator) if t.strip()]
                flex_tokens = [t.strip() for t in flex_part.split(separator) if t.strip()]
            else:
                tokens = [t.strip() for t in caption.strip().split(separator)]
                flex_tokens = tokens[:]
                if keep_tokens > 0:
                    fixed_tokens = flex_tokens[:keep_tokens]
                    flex_tokens = tokens[keep_tokens:]
            if warmup_step and step < warmup_step:
                tokens_len = math.floor(step * ((len(flex_tokens) - warmup_min) / warmup_step)) + warmup_min
                flex_tokens = flex_tokens[:tokens_len]
            if shuffle:
                rng.shuffle(flex_tokens)
            if tag_dropout > 0:
                flex_tokens = [t for t in flex_tokens if rng.random() >= tag_dropout]
            caption = ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)
        if secondary:
            caption = caption.replace(secondary, separator)
        for str_from, str_to in (replacements or {}).items():
            if str_from == "":
                caption = rng.choice(str_to) if type(str_to) == list else str_to
            else:
                caption = caption.replace(str_from, str_to)
    return caption


def finetuning_caption(caption: str | None, tags: str | None, *, separator: str, wildcard: bool) -> str:
    """``FineTuningDataset.__init__``'s caption of one metadata entry (48d368fa)."""
    if caption is None:
        caption = ""
    if wildcard:
        if tags is not None:
            tags = tags.replace("\n", separator)
            caption = "\n".join([f"{line}{separator}{tags}" for line in caption.split("\n") if line.strip() != ""])
    elif tags is not None and len(tags) > 0:
        if len(caption) > 0:
            caption = caption + separator
        caption = caption + tags
    return caption
