"""kohya's "any optimizer" path (``get_optimizer`` in library/train_util.py): an ``optimizer_type`` it does not know
is a class, ``module.Class`` imported or a name without a dot taken from ``torch.optim``, built as
``Class(params, lr=lr, **optimizer_args)``. :func:`sdadapt.methods.optimizers.canonical_optimizer` decides which names
are such classes; this module finds the class.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import InputError

__all__ = ["imported_optimizer_class"]


def imported_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of an optimiser :func:`sdadapt.methods.optimizers.canonical_optimizer` left as written — kohya's
    ``get_optimizer`` for an ``optimizer_type`` it does not know (library/train_util.py): ``module.Class`` imported, a
    name without a dot from ``torch.optim``. kohya builds it as ``Class(params, lr=lr, **optimizer_args)``; so does
    :func:`sdadapt.methods.optimizers.make_optimizer`.

    Raises:
        InputError: the module is not installed, has no such name, or the name is not a ``torch.optim.Optimizer``
            class.
    """
    module_name, _, class_name = name.rpartition(".")
    module_name = module_name or "torch.optim"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"optimizer {name!r}: cannot import {module_name} ({exc}); install the package that has it "
                         "(kohya imports the same module)") from None
    found = getattr(module, class_name, None)
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        what = "has no" if found is None else "has no optimizer class"
        raise InputError(f"optimizer {name!r}: {module_name} {what} {class_name!r} (a torch.optim.Optimizer subclass, "
                         "built as Class(params, lr=..., **optimizer_args))")
    return found
