"""LyCORIS preset files (``network_args = ["preset=my_preset.toml"]``): the layers they select, as LyCORIS' kohya network.

LyCORIS' kohya network (``lycoris.kohya.create_network``, lycoris-lora 4.1) reads a preset that is
not one of its built-in names as a TOML file (``lycoris.utils.preset.read_preset``: ``toml.load``,
checked against ``config_sdk.VALID_PRESET_KEYS``) and sets, for each key the file gives, the class
attribute ``LycorisNetworkKohya.apply_preset`` names; a key the file leaves out keeps LyCORIS'
default (the ``full`` preset's lists). It then walks each model's ``named_modules()``:

- a module whose **class** is in ``unet_target_module`` / ``text_encoder_target_module`` (and whose
  name matches no ``*_target_name``) has every ``nn.Linear`` / ``nn.Conv2d`` inside it adapted,
  itself included;
- a module whose **name** is in ``*_target_name`` (exactly, or matched by a pattern: ``re.match`` —
  anchored at the start only — or ``fnmatch`` with ``use_fnmatch = true``) is adapted itself when it
  is a ``nn.Linear`` / ``nn.Conv2d``;
- ``exclude_name`` (names or patterns, the same matching) leaves a module out (its children are
  still walked);
- kxk convolutions (LyCORIS tests the kernel's first side) only with ``enable_conv`` (default
  true); 1x1 ones always; a layer reached twice stops LyCORIS with "duplicated lora name".

sdadapt reads the same keys with the same defaults and matching (file patterns run in linear time:
:mod:`sdadapt.patterns`) and refuses what it cannot honour, naming the key and the file:
``module_algo_map`` / ``name_algo_map`` entries (per-module algorithms or options: sdadapt trains
one family at one rank per network), and ``target_module`` / ``target_name`` / ``lora_prefix``
(read by LyCORIS' own wrapper, ignored by the kohya network kohya runs). Two choices differ
from LyCORIS 4.1 on purpose, as for the built-in presets: the default UNet classes are LyCORIS
3.x's (4.1 added ``TimestepEmbedding``, which repeats ``time_embedding.linear_1/2`` on SD UNets
and stops its own ``full`` with "duplicated lora name"), and the class name ``CrossAttention``
(kohya's UNet) also matches diffusers' ``Attention`` (the same layer in the UNet sdadapt loads).
Names are the loaded model's module paths (diffusers names for sdadapt's SD1/SDXL systems).
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import InputError
from ..patterns import compile_pattern
from ..training.dataset_config import toml_reader

__all__ = ["PRESET_FILE_KEYS", "LycorisPresetFile", "preset_file_sha256", "read_lycoris_preset_file"]

#: the keys LyCORIS accepts in a preset file (``lycoris.config_sdk.VALID_PRESET_KEYS``)
PRESET_FILE_KEYS = ("enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "lora_prefix",
                    "use_fnmatch", "unet_target_module", "unet_target_name", "text_encoder_target_module",
                    "text_encoder_target_name", "exclude_name")

#: keys LyCORIS' kohya network does not read (``LycorisNetworkKohya.apply_preset`` skips them)
_WRAPPER_ONLY = {
    "target_module": "unet_target_module / text_encoder_target_module",
    "target_name": "unet_target_name / text_encoder_target_name",
    "lora_prefix": None,
}

# LycorisNetworkKohya's class defaults (LyCORIS 3.x's UNet classes: see the module docstring)
_UNET_MODULES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
_UNET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
_TEXT_MODULES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

#: class names a module also answers to: kohya's UNet calls diffusers' ``Attention`` ``CrossAttention``
_CLASS_ALIASES = {"Attention": ("CrossAttention",)}

#: largest preset file read (bytes): a preset is a few lists of names
_MAX_BYTES = 1 << 20


def preset_file_sha256(path: str | Path) -> str:
    """The sha256 of the preset file's bytes (``run.json`` records it; a resume refuses a changed file)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class LycorisPresetFile:
    """One preset file's selection rules (the file's values, LyCORIS' defaults for the keys it leaves out)."""

    path: Path
    sha256: str
    enable_conv: bool
    unet_modules: tuple[str, ...]
    unet_names: tuple[str, ...]
    text_modules: tuple[str, ...]
    text_names: tuple[str, ...]
    exclude: tuple[str, ...]
    use_fnmatch: bool

    def select(self, root: nn.Module, *, text_encoder: bool) -> list[tuple[str, nn.Module]]:
        """The ``(name, layer)`` pairs LyCORIS adapts in ``root`` (a UNet, or a text encoder with
        ``text_encoder``), in ``named_modules()`` order.

        Raises:
            InputError: a layer is reached twice (LyCORIS stops with "duplicated lora name").
        """
        modules = set(self.text_modules if text_encoder else self.unet_modules)
        names = self.text_names if text_encoder else self.unet_names
        matches_name = _Matcher(names, fnmatch_style=self.use_fnmatch, what=f"{self.path}: "
                                f"{'text_encoder' if text_encoder else 'unet'}_target_name")
        excluded = _Matcher(self.exclude, fnmatch_style=self.use_fnmatch, what=f"{self.path}: exclude_name")
        chosen: dict[str, nn.Module] = {}
        reached: dict[str, int] = {}
        for name, module in root.named_modules():
            if name and excluded(name):
                continue
            by_class = bool(modules & _class_names(module))
            if by_class and not matches_name(name):
                for inner, layer in module.named_modules():  # (the class's layers, itself included)
                    full = ".".join(part for part in (name, inner) if part)
                    if not (full and excluded(full)) and self._adaptable(layer):
                        chosen.setdefault(full, layer)
                        reached[full] = reached.get(full, 0) + 1  # (one LyCORIS module per name per walk)
            elif matches_name(name) and self._adaptable(module):
                chosen.setdefault(name, module)
                reached[name] = reached.get(name, 0) + 1
        twice = sorted(n for n, count in reached.items() if count > 1)
        if twice:
            raise InputError(f"LyCORIS preset file {self.path} selects {twice[0]} twice (a class it lists holds "
                             f"another it lists, or a named layer inside a listed class; {len(twice)} layers): "
                             "LyCORIS stops with 'duplicated lora name'; list only one of them")
        return [(n, m) for n, m in root.named_modules() if n in chosen]

    def _adaptable(self, module: nn.Module) -> bool:
        if isinstance(module, nn.Linear):
            return True
        if isinstance(module, nn.Conv2d):
            return module.kernel_size[0] == 1 or self.enable_conv  # (LyCORIS reads the kernel's first side)
        return False


def _class_names(module: nn.Module) -> set[str]:
    names = {type(module).__name__}
    for cls in type(module).__mro__:  # (a subclass keeps its base's alias: kohya's CrossAttention spelling)
        names.update(_CLASS_ALIASES.get(cls.__name__, ()))
    return names


class _Matcher:
    """LyCORIS' ``name in names or any(match_fn(p, name))``: ``re.match`` (anchored at the start) or ``fnmatch``."""

    def __init__(self, patterns: Sequence[str], *, fnmatch_style: bool, what: str) -> None:
        self.exact = frozenset(patterns)
        self.fnmatch_style = fnmatch_style
        self.patterns = list(patterns) if fnmatch_style else [
            compile_pattern(f"(?:{p}).*", what=what) for p in patterns]

    def __call__(self, name: str) -> bool:
        if name in self.exact:
            return True
        if self.fnmatch_style:
            return any(fnmatch.fnmatch(name, p) for p in self.patterns)
        return any(p.fullmatch(name) for p in self.patterns)  # type: ignore[union-attr]


def _strings(path: Path, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"LyCORIS preset file {path}: {key} must be a list of strings, got {value!r}")
    return tuple(value)


def _algo_entries(path: Path, key: str, value: object) -> Iterator[str]:
    if not isinstance(value, dict):
        raise InputError(f"LyCORIS preset file {path}: {key} must be a table, got {value!r}")
    for entry, override in value.items():
        if override not in (None, {}):
            yield entry


def read_lycoris_preset_file(path: str | Path) -> LycorisPresetFile:
    """A LyCORIS preset file (TOML) read as LyCORIS' kohya network reads it.

    Raises:
        InputError: the file is missing, not TOML, too large, has a key LyCORIS does not know or
            sdadapt cannot honour (``module_algo_map`` / ``name_algo_map`` entries, ``target_module``,
            ``target_name``, ``lora_prefix``), or a value of the wrong type; the message names the file.
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"LyCORIS preset file {file}: no such file (preset= takes a built-in preset name or the "
                         "path of a LyCORIS preset TOML file)")
    data = file.read_bytes()
    if len(data) > _MAX_BYTES:
        raise InputError(f"LyCORIS preset file {file}: {len(data)} bytes, more than a preset holds "
                         f"({_MAX_BYTES} at most)")
    tomllib = toml_reader("LyCORIS preset files")
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"LyCORIS preset file {file}: not a TOML file ({exc}); LyCORIS reads presets as TOML "
                         "(lycoris.utils.preset.read_preset)") from None
    unknown = sorted(k for k in table if k not in PRESET_FILE_KEYS)
    if unknown:
        raise InputError(f"LyCORIS preset file {file}: unknown key(s) {', '.join(unknown)} (LyCORIS refuses them "
                         f"too); the keys are {', '.join(PRESET_FILE_KEYS)}")
    for key, instead in _WRAPPER_ONLY.items():
        if key in table:
            hint = f"; use {instead}" if instead else ""
            raise InputError(f"LyCORIS preset file {file}: {key} is read by LyCORIS' own wrapper, not by the kohya "
                             f"network kohya's train_network.py runs (it ignores it){hint}")
    for key in ("module_algo_map", "name_algo_map"):
        entries = list(_algo_entries(file, key, table.get(key, {})))
        if entries:
            raise InputError(f"LyCORIS preset file {file}: {key} sets another algorithm or options for "
                             f"{', '.join(entries[:3])}: sdadapt trains one family at one rank per network; remove "
                             f"the {key} entries (or train with LyCORIS)")
    flags = {}
    for key, default in (("enable_conv", True), ("use_fnmatch", False)):
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"LyCORIS preset file {file}: {key} must be true or false, got {value!r}")
        flags[key] = value
    lists = {key: _strings(file, key, table[key]) if key in table else default for key, default in (
        ("unet_target_module", _UNET_MODULES), ("unet_target_name", _UNET_NAMES),
        ("text_encoder_target_module", _TEXT_MODULES), ("text_encoder_target_name", ()), ("exclude_name", ()))}
    preset = LycorisPresetFile(
        path=file, sha256=hashlib.sha256(data).hexdigest(), enable_conv=flags["enable_conv"],
        unet_modules=lists["unet_target_module"], unet_names=lists["unet_target_name"],
        text_modules=lists["text_encoder_target_module"], text_names=lists["text_encoder_target_name"],
        exclude=lists["exclude_name"], use_fnmatch=flags["use_fnmatch"])
    if not preset.use_fnmatch:  # (a bad pattern is refused now, before the model loads)
        for key, names in (("unet_target_name", preset.unet_names), ("text_encoder_target_name", preset.text_names),
                           ("exclude_name", preset.exclude)):
            _Matcher(names, fnmatch_style=False, what=f"LyCORIS preset file {file}: {key}")
    return preset
