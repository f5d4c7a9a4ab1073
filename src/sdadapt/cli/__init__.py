"""``python -m sdadapt``: the jobs a person runs from a shell, one module per command group.

* :mod:`.inspect` — ``inspect``;
* :mod:`.train` — ``demo``, ``train``;
* :mod:`.generate` — ``generate``;
* :mod:`.aesthetic` — ``aesthetic-embedding``;
* :mod:`.invert` — ``invert``;
* :mod:`.clip_invert` — ``clip-invert``;
* :mod:`.loratools` — ``extract-lora``, ``resize-lora``, ``merge-lora``, ``combine-loras``, ``cut-dylora``;
* :mod:`.convert` — ``convert`` (LoRA-family files and embeddings between file formats);
* :mod:`.merge` — ``merge`` and one sub-command per merge operator;
* :mod:`.custom_diffusion` — ``merge-custom-diffusion``;
* :mod:`.options` — the options they all share (``-o/--out``, ``--overwrite``, ``-q/--quiet``,
  ``--dtype``, comma-separated numbers) and the progress bar.
* :mod:`.option_rules` — options that apply only with another (``only_with``), refused alone.

Here: the parser and :func:`main`, which maps every error to one ``error: ...`` line and the exit code
of its class (:mod:`sdadapt.errors`; the table is in ``--help`` and ``docs/security.md``).
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Iterable, Sequence

from .option_rules import CheckedParser

__all__ = ["main", "build_parser"]


class _OneLineErrors(CheckedParser):
    """argparse with one-line usage errors (``error: PROG: message (see PROG --help)``, exit 2), like
    every other error of the command line, and the commands' :func:`~.option_rules.only_with` rules
    (an option given without the one it needs); sub-command parsers inherit it. No abbreviations
    (``allow_abbrev=False``): a unique prefix such as ``--min-d`` or ``--overw`` is refused with the options it begins,
    never silently read as ``--min-diff`` or ``--overwrite`` (argparse refused only ambiguous ones, so a prefix's
    meaning changed, or it broke, when an option with the same prefix was added). kohya's scripts keep argparse's default, abbreviations on (sd-scripts train_network.py:1733,
    ``argparse.ArgumentParser()``)."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        self._arg_strings = list(sys.argv[1:] if args is None else args)  # (for error's abbreviation hints)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        from .options import safe_text

        message = " ".join(message.split())
        if message.startswith("the following arguments are required"):  # (argparse checks them before extras:
            known = _visible_options(self)
            given = [arg.split("=", 1)[0] for arg in getattr(self, "_arg_strings", ()) if arg.startswith("--")]
            hints = [hint for flag in given if flag not in self._option_string_actions  # (an abbreviation of one is
                     for hint in [_kohya_tool_hint(self.prog.split()[-1], flag)  # named too, and kohya's script
                                  or _abbreviation_hint(flag, known)] if hint]  # flags; a whole option is not one)
            message += f" ({'; '.join(hints)})" if hints else ""
        message = _with_closest_choice(message)
        self.exit(2, f"error: {safe_text(self.prog)}: {safe_text(message)} (see {safe_text(self.prog)} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, but an unknown option is reported by the command it was given to, with the
        closest option of that command (``--netwrok-alpha`` -> ``did you mean --network-alpha?``)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = _chosen_command(self, namespace)
            known = _visible_options(command)
            hints = []
            for extra in extras:
                flag = extra.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
                abbreviation = _abbreviation_hint(flag, known)
                name = command.prog.split()[-1]
                kohya = _kohya_hint(flag, known) if name == "train" else _kohya_tool_hint(name, flag)
                if kohya:
                    hints.append(kohya)
                elif abbreviation:
                    hints.append(abbreviation)
                elif close:
                    hints.append(f"{flag}: did you mean {close[0]}?")
            command.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return namespace


def _with_closest_choice(message: str) -> str:
    """argparse's ``invalid choice: 'X' (choose from ...)`` with the closest choice named first (``did you mean
    'weighted-sum'?``): case and ``_`` / ``-`` aside (``LoRA``, ``weighted_sum``), else by spelling (``insepct``)."""
    found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if found is None:
        return message
    given = found.group(1)  # (Python >= 3.12.8 lists the choices unquoted)
    choices = re.findall(r"'([^']*)'", found.group(2)) or [c.strip() for c in found.group(2).split(",")]

    def plain(text: str) -> str:
        return text.lower().replace("_", "-")

    same = [choice for choice in choices if plain(choice) == plain(given)]
    close = same or difflib.get_close_matches(plain(given), choices, n=1, cutoff=0.7)
    if not close:
        return message
    return message.replace(f"invalid choice: '{given}'", f"invalid choice: '{given}', did you mean '{close[0]}'?", 1)


def _visible_options(parser: argparse.ArgumentParser) -> list[str]:
    """``parser``'s ``--`` options that its ``--help`` shows (the hidden ones only catch other tools' flags)."""
    return [flag for action in parser._actions if action.help != argparse.SUPPRESS
            for flag in action.option_strings if flag.startswith("--")]


#: kohya sd-scripts flags whose counterpart here is another kind of option (``--config`` reads them so: cli/train.py
#: read_config)
_KOHYA_FLAGS = {
    "network_train_unet_only": "--no-text-encoder", "network_train_text_encoder_only": "--no-unet",
    "use_8bit_adam": "--optimizer AdamW8bit", "use_lion_optimizer": "--optimizer Lion",
    "use_object_template": "--templates object --templates-replace-captions",
    "use_style_template": "--templates style --templates-replace-captions",
    "learning_rate_te1": "--text-encoder-lr", "learning_rate_te2": "--text-encoder-2-lr",
}


_FIRST, _SECOND = "the first positional argument", "the second positional argument"
#: the flags of kohya's LoRA scripts (networks/extract_lora_from_models.py, resize_lora.py, merge_lora.py,
#: svd_merge_lora.py) -> the command's own, per command
_KOHYA_TOOL_FLAGS: dict[str, dict[str, str]] = {
    "extract-lora": {"dim": "--rank", "conv_dim": "--conv-rank", "save_to": "-o", "save_precision": "--dtype",
                     "model_org": f"{_FIRST} (the base model)", "model_tuned": f"{_SECOND} (the tuned model)",
                     "load_precision": "nothing (each model is read in its own dtype)", "sdxl": "--base-model sdxl",
                     "v2": "--base-model sd2"},
    "resize-lora": {"new_rank": "--rank", "new_conv_rank": "--conv-rank", "save_to": "-o",
                    "save_precision": "--dtype", "model": "the positional argument (the LoRA)"},
    "merge-lora": {"sd_model": f"{_FIRST} (the checkpoint)", "models": "the positional arguments after the checkpoint",
                   "ratios": "--scale", "save_to": "-o", "save_precision": "--dtype",
                   "precision": "nothing (the merge runs in float32)"},
    "combine-loras": {"models": "the positional arguments", "ratios": "--scale", "save_to": "-o",
                      "save_precision": "--dtype", "new_rank": "--rank", "new_conv_rank": "--conv-rank"},
}


def _kohya_tool_hint(command: str, flag: str) -> str | None:
    """What ``command`` calls the flag of kohya's script for the same job (``extract-lora --dim`` -> ``--rank``),
    else ``None``."""
    table = _KOHYA_TOOL_FLAGS.get(command, {})
    name = flag[2:] if flag.startswith("--") else ""
    return f"{flag}: kohya's script's option; here {table[name]}" if name in table else None


def _kohya_hint(flag: str, known: list[str]) -> str | None:
    """What ``train`` calls kohya sd-scripts' command-line ``flag`` (``--output_dir`` -> ``-o DIR/NAME.safetensors``,
    ``--network_module`` -> the method), from the tables its ``--config`` reads kohya's keys by
    (docs/train.md "kohya sd-scripts flags"); ``None`` for a flag that is none of kohya's there."""
    from .train import _REFUSED_WHEN_ON, KOHYA_IGNORED, KOHYA_KEYS

    name = flag[2:].replace("-", "_") if flag.startswith("--") else ""
    if "--" + name.replace("_", "-") in known:  # (kohya's name with dashes is an option: "did you mean" says so)
        return None
    if name in ("output_dir", "output_name"):
        return f"{flag}: kohya's --output_dir and --output_name are one option here: -o DIR/NAME.safetensors"
    if name in _KOHYA_FLAGS:
        return f"{flag}: kohya's option; here {_KOHYA_FLAGS[name]}"
    if name in _REFUSED_WHEN_ON:
        return f"{flag}: kohya's option is not taken here ({_REFUSED_WHEN_ON[name]})"
    if name in KOHYA_IGNORED:
        why = f" ({KOHYA_IGNORED[name]})" if KOHYA_IGNORED[name] else ""
        return f"{flag}: kohya's option has no counterpart here{why}; leave it out"
    ours = "--" + KOHYA_KEYS.get(name, "").replace("_", "-")
    if name in KOHYA_KEYS and ours in known and ours != flag:
        return f"{flag}: kohya's name; here {ours}"
    return None


def _abbreviation_hint(flag: str, known: list[str]) -> str | None:
    """The hint for ``flag`` when it begins longer options of ``known`` (``allow_abbrev=False``), else ``None``."""
    longer = [option for option in known if option.startswith(flag) and option != flag] if flag.startswith("--") else []
    if not longer or len(flag) <= 2:
        return None
    return (f"{flag}: options are not abbreviated; did you mean {' or '.join(longer[:3])}"
            f"{' or ...' if len(longer) > 3 else ''}?")


def _chosen_command(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)command parser that ``namespace`` was parsed by: ``train`` for ``python -m sdadapt train``,
    ``ties`` for ``merge ties``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            child = action.choices.get(getattr(namespace, action.dest or "", None) or "")
            if child is not None:
                return _chosen_command(child, namespace)
    return parser


#: the module that registers each command, in ``--help``'s order: :func:`main` builds only the parser of the command
#: its command line names (the ``merge`` operators' 26 parsers alone took ~30 ms); every one when it names none
_COMMAND_MODULES = {
    "inspect": "inspect",
    "demo": "train", "train": "train",
    "generate": "generate",
    "aesthetic-embedding": "aesthetic",
    "invert": "invert",
    "clip-invert": "clip_invert",
    "extract-lora": "loratools", "resize-lora": "loratools", "merge-lora": "loratools", "combine-loras": "loratools",
    "cut-dylora": "loratools",
    "convert": "convert",
    "merge": "merge",
    "merge-custom-diffusion": "custom_diffusion",
    "upscale": "upscale",
}


#: each command's line in ``python -m sdadapt --help``, for the parser :func:`main` builds when its command line names
#: no command (``--help``, ``--version``, a misspelt command): the command names and these lines only, without
#: importing the command modules (``train``'s methods, ``generate``'s samplers and ``merge``'s operators import torch,
#: ~2 s). Each module's ``register`` passes the same text (tests/test_cli_startup.py checks that they agree).
_COMMAND_HELP = {
    "inspect": "say what weights files are (kohya/diffusers/peft LoRA, LyCORIS, embedding, hypernetwork, checkpoint), "
               "or an image's A1111 generation parameters",
    "demo": "teach the built-in toy model a concept it has never seen and show before/after scores and pictures",
    "train": "train a method on your own images (toy, diffusers folder, SD1/SD2/SDXL single file; kohya-like options)",
    "generate": "make images from a prompt on the toy model or a Stable Diffusion model, with LoRAs and embeddings",
    "aesthetic-embedding": "make an aesthetic-gradient embedding (mean CLIP image embedding) from a folder of images",
    "invert": "invert a real image (null-text / negative-prompt / DDIM inversion) to reconstruct or edit it",
    "clip-invert": "learn image-embedding vectors of a concept from a few images (SD 2.1 unCLIP, image variation, "
                   "toy-image)",
    "extract-lora": "extract a LoRA from a base and a fine-tuned checkpoint (SVD of the difference)",
    "resize-lora": "resize a LoRA (or LoHa/LoKr/full/DoRA file) to a LoRA of a smaller or per-layer dynamic rank",
    "merge-lora": "bake one or more adapter files (LoRA, LoCon, LoHa, LoKr, Tucker, full, DoRA) into a checkpoint",
    "combine-loras": "combine several adapter files (any family) into one LoRA (exact concatenation, or SVD to a rank)",
    "cut-dylora": "cut a DyLoRA file to a lower rank (kohya's extract_lora_from_dylora.py)",
    "convert": "convert a LoRA-family file (kohya/LyCORIS, diffusers, peft), an embedding or a whole SD checkpoint "
               "(LDM single file <-> diffusers folder) to another format",
    "merge": "merge checkpoints (weighted sum, add difference, TIES, DARE, SLERP, block weights, recipes)",
    "merge-custom-diffusion": "merge single-concept Custom Diffusion results into one (the paper's closed-form K/V "
                              "merge)",
    "upscale": "upscale images as A1111's Extras tab does (Lanczos, Nearest or an ESRGAN model file: R-ESRGAN 4x+, "
               "...), and crop, flip and split them for training as its preprocessing steps do",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sdadapt`` parser with every command (each module's ``register``)."""
    return _parser(dict.fromkeys(_COMMAND_MODULES.values()))


def _summary_parser() -> argparse.ArgumentParser:
    """The ``python -m sdadapt`` parser for a command line that names no command: every command by name and
    :data:`_COMMAND_HELP` line, none of their options (nothing of torch imported). Its ``--help`` is
    :func:`build_parser`'s, its errors (``invalid choice: 'trian'``) the same."""
    parser, sub = _top_parser()
    for command in _COMMAND_MODULES:
        sub.add_parser(command, help=_COMMAND_HELP[command], add_help=False)
    return parser


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``python -m sdadapt`` parser without its commands, and its (empty) sub-parsers action."""
    from .. import __version__
    from ..errors import exit_code_table

    parser = _OneLineErrors(
        prog="python -m sdadapt",
        description="sdadapt: adapt Stable-Diffusion-style models (LoRA family, embeddings, merges). Every command "
        "that writes a file takes -o/--out, --overwrite, -q/--quiet and --dtype {keep,fp32,fp16,bf16}.",
        epilog="exit codes (errors print one line: error: ...; see docs/security.md):\n" + exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdadapt {__version__}")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND")


def _parser(modules: Iterable[str]) -> argparse.ArgumentParser:
    """The ``python -m sdadapt`` parser with the commands of ``modules`` (names of this package's modules)."""
    import importlib

    parser, sub = _top_parser()
    for module in modules:
        importlib.import_module(f".{module}", __name__).register(sub)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for one command line: only its command's, when its first word names one; else the commands'
    names and help lines (:func:`_summary_parser`: ``--help`` without importing torch)."""
    module = _COMMAND_MODULES.get(argv[0]) if argv else None
    return _summary_parser() if module is None else _parser([module])


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error a user can cause ends as one ``error: ...`` line on stderr (control
    characters escaped) and the exit code of its class (:data:`sdadapt.errors.EXIT_CODES`; the
    table is in ``--help``): no traceback, nothing half-written left behind. SIGTERM is handled like
    Ctrl-C (the partial output is removed): exit 143, resp. 130. An unexpected exception — a bug —
    is one line too (exit 1); ``SDADAPT_TRACEBACK=1`` shows its traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser_for(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0
    from .options import close_progress, escaping_streams, quiet_library_bars, terminate_as_interrupt

    with escaping_streams(), terminate_as_interrupt(), quiet_library_bars(bool(getattr(args, "quiet", False))):
        try:
            code = int(args.run(args))
            flush = getattr(sys.stdout, "flush", None)  # (None: no stdout, e.g. pythonw)
            if flush is not None:  # a block-buffered report still waiting for a reader that is gone (`| true`) fails
                flush()  # here, handled below, not in the interpreter's last flush (exit 120, "Exception ignored")
            return code
        except BaseException as exc:  # noqa: BLE001 - every exit goes through one message and one code
            if isinstance(exc, SystemExit):
                raise
            if isinstance(exc, BrokenPipeError) and _stdout_broken():  # (`inspect FILE | head`: the reader has
                return _stdout_closed()  # what it wanted: Python's documented handling of SIGPIPE; another pipe's
                # failure, e.g. a worker's, is reported as any error)
            _close_progress(close_progress)  # the message starts its own line, not the end of a half-drawn bar
            return _report(exc)
        finally:
            _close_progress(close_progress)


def _close_progress(close: Callable[[], None]) -> None:
    """Close the progress bar; a signal arriving meanwhile is dropped: the work has ended (its outputs are whole, or
    its error is being reported) and a traceback would only say the opposite."""
    try:
        close()
    except KeyboardInterrupt:
        pass


def _stdout_broken() -> bool:
    """Whether standard output's pipe is the one that broke (a write to it failed, or its pending bytes cannot be
    flushed)."""
    if getattr(sys.stdout, "broken", False):
        return True
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _stdout_closed() -> int:
    """Standard output's reader closed it: no message (as ``cat``, ``git``), stdout pointed at the null device so
    the interpreter's last flush raises nothing; :data:`~sdadapt.errors.BROKEN_PIPE_CODE`."""
    import os

    from ..errors import BROKEN_PIPE_CODE

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # (a stdout without a file descriptor: nothing to flush there)
        pass
    return BROKEN_PIPE_CODE


def _report(exc: BaseException) -> int:
    """Print ``error: <one line>`` for ``exc`` and return its exit code."""
    import os
    import traceback

    from ..errors import INTERNAL_ERROR_CODE, exit_code_for
    from .options import error_line, translate_error

    exc = translate_error(exc)
    code = exit_code_for(exc)
    message = error_line(exc)
    if code == INTERNAL_ERROR_CODE:
        if os.environ.get("SDADAPT_TRACEBACK"):
            traceback.print_exception(exc, file=sys.stderr)
        message = (f"internal error ({type(exc).__name__}: {message}); this is a bug in sdadapt — please report it "
                   "(set SDADAPT_TRACEBACK=1 to see where)")
    print(f"error: {message}", file=sys.stderr)
    return code
