"""The model and state arguments of the public entry points, checked once with the fix in the message.

* :func:`as_module` — ``inject``, ``load_adapter``, ``apply_lora``, ``select``, ``inject_hypernetwork``
  take an ``nn.Module``. A ``torch.compile``'d module is unwrapped to the module it compiles
  (``_orig_mod``): the adapters' hooks sit on the same sub-modules, and layer names stay the model's own
  (``down_blocks.0...``, not ``_orig_mod.down_blocks.0...``, which no file could be loaded back with).
  Dynamo does not guard on forward hooks by default (``skip_nnmodule_hook_guards``), so a graph compiled
  before the hooks changed would run on without them: :func:`is_compiled` tells the injectors to call
  ``torch.compiler.reset()`` when they add hooks through a compiled module and when its handle removes them.
  Anything else that is not a module — typically a diffusers pipeline — is a ``TypeError`` naming
  the component to pass (``pipe.unet``, ``pipe.text_encoder``).
* :func:`check_layer_state` — ``load_adapter``/``apply_lora`` take one model's flat state
  ``{"<layer>.<tensor>": tensor}``; the ``{component: state}`` dict of :func:`sdadapt.load_lora`
  is refused naming the component keys to pick from.
* :func:`check_components` — the writers (``save_kohya``, ``save_lora``, ``save_diffusers``) take
  ``{component: state}``; a flat state or an ``AdapterHandle`` is refused showing the dict to pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

__all__ = ["as_module", "check_components", "check_layer_state", "is_compiled", "reset_compiled_graphs"]

_COMPONENT_ATTRIBUTES = ("unet", "transformer", "text_encoder", "text_encoder_2")


def is_compiled(model: object) -> bool:
    """Whether ``model`` is a ``torch.compile``'d module (an ``OptimizedModule`` around ``_orig_mod``)."""
    if not isinstance(model, nn.Module) or not isinstance(model._modules.get("_orig_mod"), nn.Module):
        return False
    from torch._dynamo.eval_frame import OptimizedModule  # (torch._dynamo imported only then)

    return isinstance(model, OptimizedModule)


def reset_compiled_graphs() -> None:
    """``torch.compiler.reset()``: Dynamo does not guard on forward hooks (``skip_nnmodule_hook_guards``), so
    graphs compiled before hooks were added or removed would run on as they were; they recompile at the next call."""
    import torch

    torch.compiler.reset()


def as_module(model: object, *, caller: str, one_model: bool = True) -> nn.Module:
    """``model`` as the ``nn.Module`` to adapt: a ``torch.compile``'d module's original module, else ``model``.

    Args:
        model: the argument a user passed.
        caller: the public function's name, for the message.
        one_model: refuse a module that holds a whole system (a ``unet`` child beside a text encoder,
            e.g. sdadapt's toy or diffusers systems): adapter layer names would start with ``unet.``,
            which no file's component spelling has, so the saved file would load nowhere.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (a pipeline: the message names its components),
            or (``one_model``) holds several models.
        ValueError: ``model`` is a peft ``PeftModel`` or holds peft's adapter layers (diffusers' ``add_adapter`` /
            ``load_lora_weights``): sdadapt adapts plain ``nn.Linear`` / ``nn.Conv2d`` layers and would skip the
            wrapped ones silently, or name peft's wrappers in the files it writes.
    """
    if isinstance(model, nn.Module):
        if is_compiled(model):
            model = model._orig_mod
        _refuse_peft(model, caller)
        parts = [name for name in _COMPONENT_ATTRIBUTES if isinstance(model._modules.get(name), nn.Module)]
        if one_model and "unet" in parts and len(parts) > 1:
            raise TypeError(
                f"{caller} takes one model, but this {type(model).__name__} holds {len(parts)} ({', '.join(parts)}): "
                f"pass one of them, e.g. {caller}(system.unet, ...) and {caller}(system.text_encoder, ...)"
            )
        return model
    parts = [f"pipe.{name}" for name in _COMPONENT_ATTRIBUTES if isinstance(getattr(model, name, None), nn.Module)]
    hint = (
        f"; it looks like a pipeline: pass one of its models, e.g. {', '.join(parts)}"
        if parts
        else " (for a diffusers pipeline pass pipe.unet or pipe.text_encoder)"
    )
    raise TypeError(f"{caller} takes a torch nn.Module (a UNet or a text encoder), got {type(model).__name__}{hint}")


def _refuse_peft(model: nn.Module, caller: str) -> None:
    """Refuse a model peft has wrapped (see :func:`as_module`), naming a wrapped layer and the way out."""
    if type(model).__module__.split(".")[0] == "peft":
        raise ValueError(f"{caller}: got a peft {type(model).__name__}; pass the plain model: merge its adapters "
                         "(model.merge_and_unload()) or take model.get_base_model() after model.unload()")
    wrapped = next(((name, module) for name, module in model.named_modules()
                    if type(module).__module__.split(".")[0] == "peft"), None)
    if wrapped is not None:
        name, module = wrapped
        cls = type(module)
        raise ValueError(f"{caller}: this {type(model).__name__} holds peft adapter layers (e.g. {name}: "
                         f"{cls.__module__}.{cls.__qualname__}), which sdadapt cannot adapt or name: merge them into "
                         "the weights first (diffusers: model.fuse_lora() then model.unload_lora(); peft: "
                         "merge_and_unload()) or remove them (model.unload_lora() / delete_adapters())")


def check_layer_state(state: object, *, caller: str) -> None:
    """Refuse what is not one model's flat adapter state, naming the fix.

    Raises:
        TypeError: ``state`` is not a mapping, is an ``AdapterHandle``, or is ``{component: state}``
            (``load_lora``'s first result): pass ``components["unet"]`` (or the component meant).
        ValueError: ``state`` holds a kohya / LyCORIS file's keys (``lora_unet_…``): read them with ``load_lora``.
    """
    if not isinstance(state, Mapping):
        what = type(state).__name__
        fix = "pass handle.state_dict()" if hasattr(state, "state_dict") else "pass a {'<layer>.<tensor>': tensor} dict"
        raise TypeError(f"{caller} takes one model's adapter state {{'<layer>.<tensor>': tensor}}, got {what}; {fix}")
    nested = sorted(str(key) for key, value in state.items() if isinstance(value, Mapping))
    if nested:
        raise TypeError(
            f"{caller} takes one model's adapter state {{'<layer>.<tensor>': tensor}}, but this holds component "
            f"dicts {nested} (what load_lora returns): pass one of them, e.g. components[{nested[0]!r}]"
        )
    keys = [key for key in state if isinstance(key, str)]
    if keys and all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")) for key in keys):
        raise ValueError(f"{caller}: these are a kohya / LyCORIS file's keys (e.g. {keys[0]!r}), not layer names: read "
                         "the file with sdadapt.load_lora(path) (or the state with sdadapt.formats.from_kohya(state)) "
                         "and pass its components['unet'] / components['text_encoder']")


def check_components(components: object, *, caller: str) -> None:
    """Refuse what is not ``{component: {"<layer>.<tensor>": tensor}}``, showing the dict to pass.

    Raises:
        TypeError: ``components`` is not a mapping of mappings (one model's flat state, a handle).
    """
    example = '{"unet": handle.state_dict()}'
    if not isinstance(components, Mapping):
        raise TypeError(f"{caller} takes {{component: state}}, e.g. {example}, got {type(components).__name__}")
    for component, state in components.items():
        if not isinstance(state, Mapping):
            what = type(state).__name__
            if isinstance(component, str) and "." in component:  # a flat state: "<layer>.<tensor>" keys
                raise TypeError(
                    f"{caller} takes {{component: state}}, but got one model's flat state (key {component!r}); "
                    f"wrap it: {example} (or 'text_encoder' / 'text_encoder_2' for a text encoder's)"
                )
            fix = f"{component!r}: handle.state_dict()" if hasattr(state, "state_dict") else "a {'<layer>.<tensor>': tensor} dict"
            raise TypeError(f"{caller}: component {component!r} got {what}, not a state; pass {fix}")
