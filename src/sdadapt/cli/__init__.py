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
import sys
from collections.abc import Iterable, Sequence

from .option_rules import CheckedParser

__all__ = ["main", "build_parser"]


class _OneLineErrors(CheckedParser):
    """argparse with one-line usage errors (``error: PROG: message (see PROG --help)``, exit 2), like
    every other error of the command line, and the commands' :func:`~.option_rules.only_with` rules
    (an option given without the one it needs); sub-command parsers inherit it."""

    def error(self, message: str):  # type: ignore[override]
        from .options import safe_text

        self.exit(2, f"error: {safe_text(self.prog)}: {safe_text(' '.join(message.split()))} "
                     f"(see {safe_text(self.prog)} --help)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, but an unknown option is reported by the command it was given to, with the
        closest option of that command (``--netwrok-alpha`` -> ``did you mean --network-alpha?``)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = _chosen_command(self, namespace)
            known = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
            hints = []
            for extra in extras:
                flag = extra.split("=", 1)[0]
                close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75) if flag.startswith("--") else []
                if close:
                    hints.append(f"{flag}: did you mean {close[0]}?")
            command.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))
        return namespace


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
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sdadapt`` parser with every command (each module's ``register``)."""
    return _parser(dict.fromkeys(_COMMAND_MODULES.values()))


def _parser(modules: Iterable[str]) -> argparse.ArgumentParser:
    """The ``python -m sdadapt`` parser with the commands of ``modules`` (names of this package's modules)."""
    import importlib

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in modules:
        importlib.import_module(f".{module}", __name__).register(sub)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for one command line: only its command's, when its first word names one."""
    module = _COMMAND_MODULES.get(argv[0]) if argv else None
    return build_parser() if module is None else _parser([module])


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
            close_progress()  # the message starts its own line, not the end of a half-drawn bar
            return _report(exc)
        finally:
            close_progress()


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
