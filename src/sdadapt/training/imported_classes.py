"""The classes a kohya config names by their path, imported as kohya imports them.

- kohya's "any optimizer" path (``get_optimizer`` in library/train_util.py): an ``optimizer_type`` it does not know
  is a class, ``module.Class`` imported or a name without a dot taken from ``torch.optim``, built as
  ``Class(params, lr=lr, **optimizer_args)``. :func:`sdadapt.methods.optimizers.canonical_optimizer` decides which
  names are such classes; :func:`imported_optimizer_class` finds the class.
- kohya's ``--lr_scheduler_type module.Class`` (``get_scheduler_fix``): :func:`imported_schedule_class` finds it,
  :class:`sdadapt.training.imported_lr_schedule.ImportedSchedule` runs it.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import InputError

__all__ = ["imported_optimizer_class", "imported_schedule_class"]


def _import(name: str, *, default_module: str, role: str) -> tuple[str, str, object]:
    """``module.Class`` (or a bare name of ``default_module``) -> ``(module name, name, the object or None)``."""
    module_name, _, class_name = name.rpartition(".")
    module_name = module_name or default_module
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{role} {name!r}: cannot import {module_name} ({exc}); install the package that has it "
                         "(kohya imports the same module)") from None
    return module_name, class_name, getattr(module, class_name, None)


def imported_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of an optimiser :func:`sdadapt.methods.optimizers.canonical_optimizer` left as written — kohya's
    ``get_optimizer`` for an ``optimizer_type`` it does not know (library/train_util.py): ``module.Class`` imported, a
    name without a dot from ``torch.optim``. kohya builds it as ``Class(params, lr=lr, **optimizer_args)``; so does
    :func:`sdadapt.methods.optimizers.make_optimizer`.

    Raises:
        InputError: the module is not installed, has no such name, or the name is not a ``torch.optim.Optimizer``
            class.
    """
    module_name, class_name, found = _import(name, default_module="torch.optim", role="optimizer")
    if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
        what = "has no" if found is None else "has no optimizer class"
        raise InputError(f"optimizer {name!r}: {module_name} {what} {class_name!r} (a torch.optim.Optimizer subclass, "
                         "built as Class(params, lr=..., **optimizer_args))")
    return found


def imported_schedule_class(name: str) -> type:
    """The class (or function) kohya's ``--lr_scheduler_type module.Class`` names (``get_scheduler_fix`` in
    library/train_util.py): the module imported, the name taken from it. kohya builds it as
    ``Class(optimizer, **lr_scheduler_args)`` and steps what it returns after every optimiser step; so does
    :class:`sdadapt.training.imported_lr_schedule.ImportedSchedule`, on an optimiser of its own.

    Raises:
        InputError: the module is not installed, has no such name, or the name is not callable.
    """
    module_name, class_name, found = _import(name, default_module="torch.optim.lr_scheduler",
                                             role="lr_scheduler_type")
    if not callable(found):
        what = "has no" if found is None else "has nothing callable named"
        raise InputError(f"lr_scheduler_type {name!r}: {module_name} {what} {class_name!r} (a scheduler class, built "
                         "as Class(optimizer, **lr_scheduler_args))")
    return found  # type: ignore[return-value]
