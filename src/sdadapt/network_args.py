"""kohya's and LyCORIS' ``network_args`` (``["conv_dim=4", "algo=loha", "down_lr_weight=sine"]``) as sdadapt's
method options, torch-free: read by ``python -m sdadapt train`` (``--network-args``, a kohya config's
``network_args``) while it parses, and by :mod:`sdadapt.kohya_network` (kohya's ``--network_module``).
"""

from __future__ import annotations

import difflib

__all__ = ["KOHYA_NETWORK_DEFAULTS", "LYCORIS_ALGOS", "LYCORIS_IGNORED", "NETWORK_ARG_NAMES", "check_lycoris_args", "drop_lycoris_ignored",
           "kohya_conv_alpha", "parse_network_args"]

#: kohya's LoRA-family network defaults (networks/lora.py create_network), by sdadapt's method option name:
#: (value, kohya's name)
KOHYA_NETWORK_DEFAULTS: dict[str, tuple[float, str]] = {"rank": (4, "network_dim"), "alpha": (1.0, "network_alpha")}


def kohya_conv_alpha(method: str, alpha: float) -> float:
    """``conv_alpha`` when ``conv_dim`` is given without it: networks/lora.py's 1 for ``lora`` / ``locon``, the
    network ``alpha`` for LyCORIS' algos (its ``create_network``)."""
    return 1.0 if method in ("lora", "locon") else float(alpha)


#: network_args spellings -> sdadapt method option names (kohya's conv_dim, LyCORIS' old use_cp, LyCORIS' preset)
NETWORK_ARG_NAMES = {"conv_dim": "conv_rank", "use_cp": "use_tucker", "preset": "targets"}
#: LyCORIS network_args that must agree with the method trained (they choose the network in kohya)
_LYCORIS_METHOD_ARGS = ("algo", "dora_wd")
#: LyCORIS algo -> the sdadapt methods it may name
LYCORIS_ALGOS = {"lora": ("lora", "locon"), "locon": ("locon",), "loha": ("loha",), "lokr": ("lokr",),
                  "ia3": ("ia3",), "diag-oft": ("diag-oft",), "boft": ("boft",), "glora": ("glora",)}


def parse_network_args(items: list, *, method_options: set[str], source: str = "--network-args") -> dict[str, str]:
    """kohya ``network_args`` (``["conv_dim=4", "down_lr_weight=sine+0.5", ...]``) -> ``{method option: text}``.

    ``conv_dim`` is ``conv_rank``, ``use_cp`` is ``use_tucker`` and LyCORIS' ``preset`` is ``targets``
    (:mod:`sdadapt.methods.lycoris_presets`) here; ``algo`` and ``dora_wd``
    (LyCORIS) are kept under their names for :func:`_check_lycoris_args`; any other key must be a
    method option. Values stay text (each option's type converts them later).

    Raises:
        InputError: an item without ``=`` or an unknown key (naming the known ones).
    """
    from .errors import InputError

    out: dict[str, str] = {}
    for item in items:  # an algo sdadapt does not train first: it says more than the args it brings (dylora's block_size)
        arg, _, setting = str(item).partition("=")
        algo = setting.strip().lower()
        if arg.strip() == "algo" and algo not in LYCORIS_ALGOS:
            raise InputError(f"{source} {item!r}: sdadapt trains the LyCORIS algos {', '.join(LYCORIS_ALGOS)} (train "
                             f"lora/locon/loha/lokr/ia3/diag-oft/boft/glora) and DoRA (train dora); not {algo}"
                             + (" (kohya's own DyLoRA, networks.dylora, is `train dylora` with network_args unit=N, "
                                "LyCORIS' block_size)" if algo == "dylora" else ""))
    for item in items:
        arg, equals, setting = str(item).partition("=")
        arg = arg.strip()
        if not equals or not arg:
            raise InputError(f"{source} {item!r}: write KEY=VALUE, e.g. conv_dim=4")
        if arg == "rank_dropout_scale":  # (LyCORIS' kohya create_network never reads it: its modules keep False,
            continue  # whatever the args say, so the rank dropout trains unscaled either way, as here)
        if arg in _LYCORIS_OFF_ARGS:  # (the kohya_ss GUI writes them all, off)
            if setting.strip().lower() in ("false", "0", "", "none"):
                continue
            if arg not in method_options:  # (train_norm is a method option of the LoRA family)
                raise InputError(f"{source} {item!r}: {_LYCORIS_OFF_ARGS[arg]}; leave it off")
        name = NETWORK_ARG_NAMES.get(arg, arg)
        if name not in method_options and name not in _LYCORIS_METHOD_ARGS:
            from .methods.lora_blocks import BLOCK_ARGS

            known = sorted({*NETWORK_ARG_NAMES, *_KNOWN_NETWORK_ARGS, *BLOCK_ARGS})
            close = difflib.get_close_matches(arg, known, n=1)
            raise InputError(f"{source} {item!r}: unknown network arg {arg!r}" + (f" (did you mean {close[0]}?)" if close else "")
                             + f"; sdadapt reads {', '.join(known)}, and algo / dora_wd naming the method trained")
        out[name] = setting.strip()
    return out


#: LyCORIS network_args read only at their off value (kohya_ss writes them all): why each cannot be on
_LYCORIS_OFF_ARGS = {
    "use_scalar": "LyCORIS' trained scalar per module is not there",
    "bypass_mode": "LyCORIS' bypass mode (for quantised base layers) is not there; it trains the same ΔW unquantised",
    "train_norm": "LyCORIS' norm modules train beside lora, locon, loha, lokr, dora and glora",
}
#: the network_args keys sdadapt reads besides the block-wise ones (lora_blocks.BLOCK_ARGS), named in errors
_KNOWN_NETWORK_ARGS = ("conv_alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker", "init", "preset", "factor",
                       "decompose_both", "train_on_input", "constraint", "rescaled", "loraplus_lr_ratio",
                       "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


#: LoKr's network_args and their off spellings (dropped for the other methods)
_LOKR_ARGS = {"factor": ("-1",), "decompose_both": ("false", "0", "", "none")}


def check_lycoris_args(method: str, chosen: dict) -> None:
    """LyCORIS' ``algo`` / ``dora_wd`` network_args must describe ``method``; then they are dropped."""
    from .errors import InputError

    algo = chosen.pop("algo", None)
    dora = chosen.pop("dora_wd", None)
    if method != "lokr":  # the kohya_ss GUI writes LoKr's factor=-1 and decompose_both=false whatever the algo
        for name, off in _LOKR_ARGS.items():
            if name in chosen and str(chosen[name]).strip().lower() in off:
                del chosen[name]
    elif "factor" in chosen:  # (before the model loads)
        try:
            factor = int(str(chosen["factor"]).strip())
        except ValueError:
            factor = 0
        if factor == 0 or factor < -1:
            raise InputError(f"network_args factor={chosen['factor']}: LoKr's factor must be -1 (the most square "
                             "split, LyCORIS' default) or a positive int")
    targets = chosen.get("targets")
    if isinstance(targets, str):  # a LyCORIS preset name is checked before the model loads
        from .methods.lora import UNET_PRESETS
        from .methods.lycoris_presets import lycoris_preset

        if targets not in UNET_PRESETS:
            lycoris_preset(targets)
    if str(chosen.get("train_norm", "")).strip().lower() in ("true", "1", "yes", "on"):
        from .methods.train_norm import norm_targets

        norm_targets(targets if isinstance(targets, str) else None)  # (targets without norms: before the model loads)
    if algo is not None:
        algo = str(algo).strip().lower()  # (LyCORIS reads it case-insensitively: algo=LoCon)
        allowed = LYCORIS_ALGOS.get(algo)
        if allowed is None:
            raise InputError(f"network_args algo={algo}: sdadapt trains the LyCORIS algos "
                             f"{', '.join(LYCORIS_ALGOS)} (train lora/locon/loha/lokr/ia3/diag-oft/boft) and DoRA (train dora); "
                             f"not {algo}")
        if method not in allowed and not (method == "dora" and algo in ("lora", "locon") and dora is not None):
            raise InputError(f"network_args algo={algo} names another network than {method}: train it with "
                             f"`python -m sdadapt train {allowed[-1]}` (or leave algo out)")
    if dora is not None:
        wants = str(dora).strip().lower() in ("true", "1", "yes")
        if wants != (method == "dora"):
            raise InputError(f"network_args dora_wd={dora} with {method}: DoRA is its own method here — "
                             + ("`python -m sdadapt train dora`" if wants else "leave dora_wd out"))


#: the options a kohya config / network_args carry for every LyCORIS algo (the kohya_ss GUI writes ``network_dim`` /
#: ``network_alpha``, ``conv_dim`` ... whatever the algo) that a method's LyCORIS modules take and ignore, and why
LYCORIS_IGNORED: dict[str, tuple[tuple[str, ...], str]] = {
    "ia3": (("rank", "alpha", "conv_rank", "conv_alpha", "use_tucker", "dropout", "rank_dropout"),
            ("(IA)³ trains one vector per layer (no rank, alpha, Tucker core or dropout of hidden units), as LyCORIS' "
             "IA3Module ignores them")),
    **dict.fromkeys(("diag-oft", "boft"), (
        ("alpha", "conv_alpha", "use_tucker", "dropout", "rank_dropout"),
        ("OFT rotates blocks (network_dim is the block size; its alpha is network_args constraint=...); LyCORIS' OFT "
         "modules ignore them too (all but Diag-OFT's rank_dropout, which sdadapt's OFT does not have)"))),
}


def drop_lycoris_ignored(method: str, chosen: dict, *, keep: set[str], notes: list[str]) -> None:
    """``train ia3`` / ``diag-oft`` / ``boft`` from a kohya config: drop the options of
    :data:`LYCORIS_IGNORED` that the method's LyCORIS modules ignore (OFT's ``alpha`` is the
    ``constraint``), with a note. Those given as flags (``keep``) stay, and are refused as options of
    other methods. Other methods: nothing."""
    if method not in LYCORIS_IGNORED:
        return
    ignored, reason = LYCORIS_IGNORED[method]
    dropped = [name for name in ignored if name in chosen and name not in keep]
    for name in dropped:
        del chosen[name]
    if dropped:
        notes.append(f"ignored {', '.join(dropped)} for {method}: {reason}")
