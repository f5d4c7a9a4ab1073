"""Extra optimiser arguments (kohya's ``--optimizer_args KEY=VALUE ...``), parsed and checked.

kohya reads each ``KEY=VALUE`` with ``ast.literal_eval`` (``betas=0.9,0.99`` is the tuple
``(0.9, 0.99)``, ``relative_step=False`` a bool, ``beta1=None`` None) and passes them to the
optimiser's constructor. sdadapt does the same for its optimisers, with each one accepting the
keys below — the ones its constructor takes that are the user's to choose (the learning rate,
``capturable``, ``foreach`` and the state dtype are set by the loop) — and checks the values by
building the optimiser on a one-element probe before any model is loaded.

======================  ====================================================================
optimiser               keys
======================  ====================================================================
``adamw``               ``betas``, ``eps``, ``weight_decay``
``adamw8bit``           ``betas``, ``eps``, ``weight_decay``, ``block_size``, ``min_8bit_size``,
                        ``stochastic_rounding``
``adamw-bf16``          ``betas``, ``eps``, ``weight_decay``, ``stochastic_rounding``
``adafactor``           ``eps`` (two numbers), ``clip_threshold``, ``decay_rate``, ``beta1``,
                        ``weight_decay``, ``scale_parameter``, ``relative_step``, ``warmup_init``,
                        ``factor_conv_as_matrix``, ``stochastic_rounding``
``lion``, ``lion-bf16`` ``betas``, ``weight_decay``, ``stochastic_rounding`` (``lion-bf16``:
                        ``min_8bit_size`` too)
``sgd-nesterov``        ``momentum`` (kohya's default 0.9 when left out), ``dampening`` (0 only:
                        Nesterov needs it), ``weight_decay``
``prodigy``             ``betas``, ``beta3``, ``eps``, ``weight_decay``, ``decouple``,
                        ``use_bias_correction``, ``safeguard_warmup``, ``d0``, ``d_coef``,
                        ``growth_rate``, ``fsdp_in_use`` (False only), ``slice_p``,
                        ``stochastic_rounding`` (prodigyopt 1.1.2's arguments)
``dadapt-adam``         ``betas``, ``eps``, ``weight_decay``, ``log_every`` (ignored), ``decouple``,
                        ``use_bias_correction``, ``d0``, ``growth_rate``, ``fsdp_in_use`` (False
                        only), ``stochastic_rounding`` (dadaptation 3.2's ``DAdaptAdam`` arguments)
``dadapt-lion``         ``betas``, ``weight_decay``, ``log_every`` (ignored), ``d0``,
                        ``fsdp_in_use`` (False only), ``stochastic_rounding``
``dadapt-adam-preprint`` ``betas``, ``eps``, ``weight_decay``, ``log_every`` (ignored), ``decouple``,
                        ``d0``, ``growth_rate``, ``fsdp_in_use`` (False only), ``stochastic_rounding``
``adamw-schedulefree``  ``betas``, ``eps``, ``weight_decay``, ``warmup_steps``, ``r``,
                        ``weight_lr_power``, ``stochastic_rounding`` (schedulefree 1.4.1's
                        ``AdamWScheduleFree`` arguments)
``sgd-schedulefree``    ``momentum``, ``weight_decay``, ``warmup_steps``, ``r``, ``weight_lr_power``,
                        ``stochastic_rounding`` (schedulefree 1.4.1's ``SGDScheduleFree``)
======================  ====================================================================

The arguments are kept as a tuple of ``(key, value)`` pairs in the order given (values made
hashable: sequences become tuples), so a frozen config can hold them.

kohya trains Adafactor with ``transformers.optimization.Adafactor`` after its ``get_optimizer``
fills in ``relative_step=True`` when the arguments leave it out (and turns it back on when
``warmup_init=True`` comes with ``relative_step=False``): :func:`kohya_optimizer_args` gives those
arguments (what kohya's ``ss_optimizer`` shows), :func:`kohya_constructor_args` adds transformers'
defaults where sdadapt's :class:`~sdadapt.training.optim.Adafactor` has others
(:data:`TRANSFORMERS_ADAFACTOR_DEFAULTS`), so ``python -m sdadapt train`` builds the optimiser
kohya trains with. The other optimisers' arguments pass through unchanged.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import torch

__all__ = [
    "OPTIMIZER_ARG_KEYS",
    "SGD_NESTEROV_MOMENTUM",
    "TRANSFORMERS_ADAFACTOR_DEFAULTS",
    "OptimizerArgs",
    "check_optimizer_args",
    "format_optimizer_args",
    "kohya_constructor_args",
    "kohya_optimizer_args",
    "optimizer_kwargs",
    "parse_optimizer_args",
]

#: ``((key, value), ...)`` in the order given
OptimizerArgs = tuple[tuple[str, Any], ...]

_ADAMW = ("betas", "eps", "weight_decay")
#: the keys each optimiser (its canonical name, :data:`sdadapt.methods.fit.OPTIMIZERS`) accepts
OPTIMIZER_ARG_KEYS: dict[str, tuple[str, ...]] = {
    "adamw": _ADAMW,
    "adamw8bit": (*_ADAMW, "block_size", "min_8bit_size", "stochastic_rounding"),
    "adamw-bf16": (*_ADAMW, "stochastic_rounding"),
    "adafactor": ("eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter", "relative_step",
                  "warmup_init", "factor_conv_as_matrix", "stochastic_rounding"),
    "lion": ("betas", "weight_decay", "stochastic_rounding"),
    "lion-bf16": ("betas", "weight_decay", "min_8bit_size", "stochastic_rounding"),
    "sgd-nesterov": ("momentum", "dampening", "weight_decay"),
    "prodigy": ("betas", "beta3", "eps", "weight_decay", "decouple", "use_bias_correction", "safeguard_warmup", "d0",
                "d_coef", "growth_rate", "fsdp_in_use", "slice_p", "stochastic_rounding"),
    "dadapt-adam": ("betas", "eps", "weight_decay", "log_every", "decouple", "use_bias_correction", "d0", "growth_rate",
                    "fsdp_in_use", "stochastic_rounding"),
    "dadapt-lion": ("betas", "weight_decay", "log_every", "d0", "fsdp_in_use", "stochastic_rounding"),
    "dadapt-adam-preprint": ("betas", "eps", "weight_decay", "log_every", "decouple", "d0", "growth_rate", "fsdp_in_use",
                             "stochastic_rounding"),
    "adamw-schedulefree": ("betas", "eps", "weight_decay", "warmup_steps", "r", "weight_lr_power", "stochastic_rounding"),
    "sgd-schedulefree": ("momentum", "weight_decay", "warmup_steps", "r", "weight_lr_power", "stochastic_rounding"),
}
#: the momentum kohya's ``get_optimizer`` gives ``SGDNesterov`` when ``--optimizer_args`` leave it out
SGD_NESTEROV_MOMENTUM = 0.9
#: ``transformers.optimization.Adafactor``'s defaults (the optimiser kohya builds) where sdadapt's
#: ``Adafactor`` has its own: ``scale_parameter`` (sdadapt: False) and the factoring of ``≥3``-D
#: weights (transformers factors the last two dims; sdadapt's default views ``(O, I, k, k)`` as
#: ``(O, I·k·k)``). ``weight_decay`` 0, ``eps``, ``clip_threshold``, ``decay_rate``, ``beta1`` and
#: ``warmup_init`` are the same in both.
TRANSFORMERS_ADAFACTOR_DEFAULTS: OptimizerArgs = (("scale_parameter", True), ("factor_conv_as_matrix", False))
_BOOLS = ("stochastic_rounding", "scale_parameter", "relative_step", "warmup_init", "factor_conv_as_matrix",
          "decouple", "use_bias_correction", "safeguard_warmup", "fsdp_in_use")
_NUMBERS = ("weight_decay", "clip_threshold", "decay_rate", "momentum", "dampening", "d0", "d_coef", "growth_rate",
            "r", "weight_lr_power")
#: arguments that are whole numbers (kept as ints by :func:`optimizer_kwargs`)
_WHOLE_NUMBERS = ("block_size", "min_8bit_size", "slice_p", "log_every", "warmup_steps")


def parse_optimizer_args(items: Iterable[str], *, where: str = "--optimizer-args") -> OptimizerArgs:
    """``["weight_decay=0.1", "betas=0.9,0.99"]`` -> ``(("weight_decay", 0.1), ("betas", (0.9, 0.99)))``.

    Each value is read as kohya reads it (``ast.literal_eval``: numbers, ``True``/``False``,
    ``None``, comma-separated values as a tuple); the keys are not checked here
    (:func:`check_optimizer_args` does, against the optimiser).

    Raises:
        ValueError: an item without ``=``, an empty key, a key given twice, or a value that is not a
            Python literal — naming ``where`` and the item.
    """
    if isinstance(items, str):
        items = items.split()
    pairs: list[tuple[str, Any]] = []
    for item in items:
        key, equals, text = str(item).partition("=")
        key = key.strip()
        if not equals or not key:
            raise ValueError(f"{where}: {item!r} is not KEY=VALUE (e.g. weight_decay=0.1 betas=0.9,0.99)")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"{where}: {item!r}: the value {text.strip()!r} is not a number, True/False, None or a "
                             "comma-separated tuple of them (kohya reads it with ast.literal_eval)") from None
        if key in (k for k, _ in pairs):
            raise ValueError(f"{where}: {key} is given twice")
        pairs.append((key, _hashable(value)))
    return tuple(pairs)


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_type(optimizer: str, key: str, value: Any) -> str | None:
    """What is wrong with ``value`` for ``key`` (``None``: its type is right)."""
    if key in _BOOLS:
        return None if isinstance(value, bool) else "True or False"
    if key in _NUMBERS:
        return None if _is_number(value) else "a number"
    if key == "betas":
        return None if isinstance(value, tuple) and len(value) == 2 and all(map(_is_number, value)) else \
            "two numbers, e.g. betas=0.9,0.999"
    if key == "eps":
        if optimizer == "adafactor":
            return None if isinstance(value, tuple) and len(value) == 2 and all(map(_is_number, value)) else \
                "two numbers (ε₁ for the second moments, ε₂ for scale_parameter), e.g. eps=1e-30,1e-3"
        return None if _is_number(value) else "a number, e.g. eps=1e-6"
    if key in ("beta1", "beta3"):
        return None if value is None or _is_number(value) else "None or a number in [0, 1)"
    if key in _WHOLE_NUMBERS:
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            f"a whole number, e.g. {key}={256 if key == 'block_size' else 11}"
    return None


def optimizer_kwargs(args: OptimizerArgs | Mapping[str, Any]) -> dict[str, Any]:
    """The constructor keywords of ``args`` (numbers as floats, sequences as tuples)."""
    items = args.items() if isinstance(args, Mapping) else args
    return {key: (tuple(float(v) for v in value) if isinstance(value, tuple) else
                  float(value) if _is_number(value) and key not in _WHOLE_NUMBERS else value) for key, value in items}


def check_optimizer_args(optimizer: str, args: OptimizerArgs | Mapping[str, Any] | Iterable[tuple[str, Any]],
                         *, where: str = "optimizer_args", weight_decay: float | None = None) -> OptimizerArgs:
    """``args`` for the optimiser ``optimizer`` (a canonical name of :data:`OPTIMIZER_ARG_KEYS`, or an imported class
    as kohya's ``optimizer_type`` names one: ``module.Class`` / a ``torch.optim`` name, whose keys are its own),
    checked: known keys, values of the right type, and values the constructor accepts (it is built
    once on a one-element probe tensor; an imported class with ``weight_decay`` too, when the run gives one outside
    ``args``, as :func:`sdadapt.methods.optimizers.make_optimizer` passes it).

    Returns:
        the arguments as ``((key, value), ...)`` (order kept, sequences as tuples).

    Raises:
        ValueError: an unknown key (the message lists the keys this optimiser takes), a value of the
            wrong type, or one the optimiser refuses (its own message), each naming ``where``.
    """
    imported = None
    if optimizer not in OPTIMIZER_ARG_KEYS:
        if "." not in optimizer and not isinstance(getattr(torch.optim, optimizer, None), type):
            raise ValueError(f"{where}: unknown optimizer {optimizer!r}; one of {', '.join(OPTIMIZER_ARG_KEYS)}, a "
                             "torch.optim class or an installed module.Class")
        from .imported_classes import imported_optimizer_class

        imported = imported_optimizer_class(optimizer)  # (kohya's any-optimizer path: its arguments are its own)
    items = args.items() if isinstance(args, Mapping) else args
    pairs: list[tuple[str, Any]] = []
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{where}: expected (key, value) pairs or a mapping, got {item!r}")
        pairs.append((item[0], _hashable(item[1])))
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{where}: a key is given twice in {keys}")
    if imported is not None:  # (built once on a probe, with or without arguments: what its constructor refuses)
        kwargs = {**({} if weight_decay is None else {"weight_decay": weight_decay}), **dict(pairs)}  # (ints kept)
        try:
            imported([torch.zeros(1, requires_grad=True)], lr=1e-3, **kwargs)
        except Exception as exc:  # (whatever its constructor raises: the class is someone else's)
            shown = ",".join(f"{k}={v}" for k, v in kwargs.items())
            raise ValueError(f"{where}: {optimizer}({shown}) refuses to build: {exc}") from None
        return tuple(pairs)
    allowed = OPTIMIZER_ARG_KEYS[optimizer]
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise ValueError(f"{where}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not an argument of "
                         f"the {optimizer} optimizer; it takes {', '.join(allowed)}")
    for key, value in pairs:
        wrong = _check_type(optimizer, key, value)
        if wrong is not None:
            raise ValueError(f"{where}: {key}={value!r}: {key} of {optimizer} must be {wrong}")
    if pairs:
        _probe(optimizer, optimizer_kwargs(tuple(pairs)), where)
    return tuple(pairs)


def _probe(optimizer: str, kwargs: dict[str, Any], where: str) -> None:
    """Build ``optimizer`` with ``kwargs`` over a one-element tensor: its own range checks run."""
    from .optim import Adafactor, AdamW

    probe = [torch.zeros(1, requires_grad=True)]
    try:
        if optimizer == "adamw":
            torch.optim.AdamW(probe, lr=1e-3, **kwargs)
            AdamW(probe, lr=1e-3, **kwargs)  # (--full-bf16 trains with sdadapt's AdamW)
        elif optimizer == "adafactor":
            Adafactor(probe, lr=None if kwargs.get("relative_step") else 1e-3, **kwargs)
        elif optimizer in ("lion", "lion-bf16"):
            from .lion import Lion

            Lion(probe, lr=1e-4, **kwargs)
        elif optimizer == "prodigy":
            from .prodigy import Prodigy

            Prodigy(probe, lr=1.0, **kwargs)
        elif optimizer in ("dadapt-adam", "dadapt-lion", "dadapt-adam-preprint"):
            from .dadapt import DAdaptAdam, DAdaptAdamPreprint, DAdaptLion

            {"dadapt-adam": DAdaptAdam, "dadapt-lion": DAdaptLion,
             "dadapt-adam-preprint": DAdaptAdamPreprint}[optimizer](probe, lr=1.0, **kwargs)
        elif optimizer in ("adamw-schedulefree", "sgd-schedulefree"):
            from .schedule_free import AdamWScheduleFree, SGDScheduleFree

            (AdamWScheduleFree if optimizer == "adamw-schedulefree" else SGDScheduleFree)(probe, lr=1e-3, **kwargs)
        elif optimizer == "sgd-nesterov":
            torch.optim.SGD(probe, lr=1e-3, nesterov=True, **{"momentum": SGD_NESTEROV_MOMENTUM, **kwargs})
        else:
            AdamW(probe, lr=1e-3, state_dtype="int8" if optimizer == "adamw8bit" else torch.bfloat16, **kwargs)
    except (ValueError, TypeError) as exc:
        shown = ",".join(f"{k}={v}" for k, v in kwargs.items())
        raise ValueError(f"{where}: the {optimizer} optimizer refuses {shown}: {exc}") from None


def format_optimizer_args(args: OptimizerArgs) -> str:
    """``"k=v,k=v"`` as kohya writes them into ``ss_optimizer`` (``name(k=v,...)``; a tuple as ``(0.9, 0.99)``)."""
    return ",".join(f"{key}={value}" for key, value in args)


def kohya_optimizer_args(optimizer: str, args: OptimizerArgs) -> OptimizerArgs:
    """The arguments kohya's ``get_optimizer`` builds ``optimizer`` with from the user's ``args``.

    For ``adafactor``: ``relative_step=True`` appended when ``args`` leave it out (kohya's default),
    and made ``True`` when ``warmup_init=True`` comes with ``relative_step=False`` (kohya's
    correction: the warm-up belongs to the relative step); the other keys as given, in their order.
    For ``sgd-nesterov``: ``momentum=0.9`` appended when ``args`` leave it out (kohya's
    :data:`SGD_NESTEROV_MOMENTUM`; torch's SGD refuses Nesterov without momentum).
    Other optimisers: ``args`` unchanged. kohya writes these into ``ss_optimizer``.

    Args:
        optimizer: a canonical name of :data:`OPTIMIZER_ARG_KEYS`.
        args: ``((key, value), ...)`` as :func:`check_optimizer_args` returns them.

    Example:
        >>> kohya_optimizer_args("adafactor", (("scale_parameter", False),))
        (('scale_parameter', False), ('relative_step', True))
    """
    pairs = dict(args)
    if optimizer == "adafactor" and ("relative_step" not in pairs  # kohya's default
                                     or (not pairs["relative_step"] and pairs.get("warmup_init", False))):
        pairs["relative_step"] = True  # (appended when missing, as kohya's dict)
    if optimizer == "sgd-nesterov" and "momentum" not in pairs:
        pairs["momentum"] = SGD_NESTEROV_MOMENTUM
    return tuple(pairs.items())


def kohya_constructor_args(optimizer: str, args: OptimizerArgs) -> OptimizerArgs:
    """:func:`kohya_optimizer_args` plus, for ``adafactor``, :data:`TRANSFORMERS_ADAFACTOR_DEFAULTS`
    where ``args`` leave them out: the keywords for sdadapt's optimiser that train as kohya's
    ``transformers.optimization.Adafactor`` does (given keys always win).

    Example:
        >>> dict(kohya_constructor_args("adafactor", ()))
        {'scale_parameter': True, 'factor_conv_as_matrix': False, 'relative_step': True}
    """
    kohya = kohya_optimizer_args(optimizer, args)
    if optimizer != "adafactor":
        return kohya
    given = {key for key, _ in kohya}
    return (*((key, value) for key, value in TRANSFORMERS_ADAFACTOR_DEFAULTS if key not in given), *kohya)
