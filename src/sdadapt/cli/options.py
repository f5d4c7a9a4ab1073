"""The options every command shares, added the same way everywhere, and the one progress bar.

* :func:`add_output_options` — ``-o/--out``, ``--overwrite``, ``-q/--quiet`` and
  ``--dtype {keep,fp32,fp16,bf16}`` (the output dtype; ``keep`` = the command's natural dtype) in
  an "output" group; every command that writes a file calls it.
* :class:`BooleanFlag` — every ``--flag/--no-flag`` (argparse's, with one help text on every Python).
* :func:`numbers` — the argparse type of every comma-separated list of numbers (``--weights``,
  ``--scale``, ``--block-weights``, ...); :class:`ExtendNumbers` lets an ``nargs="+"`` option take
  ``1 0.5`` as well as ``1,0.5``.
* :class:`ProgressBar` — ``bar(done, total, info=None)`` on stderr: tqdm when installed, else a
  one-line bar with the count, the rate and the ETA. ``info`` is a float (shown as the loss) or a
  string (the item just finished). Library code only calls such a callback; it never prints.

Nothing heavy is imported here (``python -m sdadapt --help`` stays fast); torch only inside
:func:`torch_dtype`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from ..held_signals import put_back, swap_in

__all__ = [
    "BooleanFlag",
    "tqdm_number",
    "width_height",
    "quiet_library_bars",
    "DTYPE_CHOICES",
    "OUTPUT_OPTIONS",
    "add_output_options",
    "add_clip_stats_option",
    "add_image_save_options",
    "numbers",
    "positive_int",
    "ExtendNumbers",
    "torch_dtype",
    "dtype_name",
    "ProgressBar",
    "progress_bar",
    "close_progress",
    "safe_text",
    "error_line",
    "translate_error",
    "escaping_streams",
    "terminate_as_interrupt",
]

#: the ``--dtype`` choices, in the order ``--help`` shows them
DTYPE_CHOICES: tuple[str, ...] = ("keep", "fp32", "fp16", "bf16")
#: the option strings :func:`add_output_options` adds
OUTPUT_OPTIONS: tuple[str, ...] = ("-o", "--out", "--overwrite", "-q", "--quiet", "--dtype")
_TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def add_output_options(
    parser: argparse.ArgumentParser,
    *,
    out_help: str = "output .safetensors file (written atomically)",
    required: bool = True,
    default: str | None = None,
    dtype_help: str = "each tensor's own dtype",
    dest_prefix: str = "",
) -> argparse._ArgumentGroup:
    """Add ``-o/--out``, ``--overwrite``, ``-q/--quiet`` and ``--dtype`` to ``parser`` (an "output" group).

    Args:
        out_help: what OUT is.
        required: whether ``-o`` must be given (``default`` is used otherwise).
        dtype_help: what ``--dtype keep`` (the default) means for this command.
        dest_prefix: prefix of the attribute names (for a parser whose sub-commands add the same
            options, so the two levels do not overwrite each other).

    Returns:
        The group, for command-specific output options.
    """
    group = parser.add_argument_group("output")
    group.add_argument("-o", "--out", dest=f"{dest_prefix}out", metavar="OUT", required=required, default=default,
                       help=out_help)
    group.add_argument("--overwrite", dest=f"{dest_prefix}overwrite", action="store_true",
                       help="replace OUT if it exists (default: refuse)")
    group.add_argument("-q", "--quiet", dest=f"{dest_prefix}quiet", action="store_true",
                       help="no progress bar or progress messages on stderr (results still print)")
    group.add_argument("--dtype", dest=f"{dest_prefix}dtype", choices=DTYPE_CHOICES, default="keep",
                       help=f"dtype of the written float tensors (default keep: {dtype_help})")
    return group


def _quality(text: str) -> int:
    """``--jpeg-quality``'s value: a whole number from 1 to 100 (A1111's slider)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"a whole number from 1 to 100 (A1111's slider), got {text!r}")
    return value


def add_image_save_options(group: argparse._ArgumentGroup, *, folder: str) -> None:
    """Add ``--jpeg-quality``, ``--webp-lossless`` and ``--image-format`` (A1111's image-saving settings; ``folder``:
    when OUT is a folder, for ``--image-format``'s help) to an output ``group``."""
    group.add_argument("--jpeg-quality", type=_quality, default=80, metavar="Q",
                       help="quality of a JPEG or WebP OUT (1-100, default 80: A1111's 'Quality for saved jpeg')")
    group.add_argument("--webp-lossless", action="store_true",
                       help="write a WebP OUT lossless (A1111's 'Use lossless compression for webp images')")
    group.add_argument("--image-format", choices=("png", "jpg", "webp", "avif"), default="png",
                       help=f"the format of the images written into an OUT folder ({folder}; default png); a file "
                       "OUT's is its suffix: .png, .jpg / .jpeg, .webp or .avif, the infotext in the EXIF of the "
                       "others as A1111 writes it")


def _clip_stats_path(text: str) -> str:
    """argparse type of ``--clip-stats``: a path that exists (a typo is said at the parse, naming the option, not
    after the model's load as the file's bare name)."""
    from pathlib import Path

    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder (karlo's ViT-L-14_stats.th, or an unCLIP "
                                         "folder's image_normalizer file or folder)")
    return text


def add_clip_stats_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, use: str,
                          model_dest: str | None = None) -> None:
    """Add ``--clip-stats FILE`` (``args.clip_stats``): an SD 2.1 unCLIP-L model's CLIP-embedding mean/std, the one
    definition ``generate``, ``convert`` and ``clip-invert`` share. ``use``: what the command needs it for (the end
    of the help). ``model_dest``: the attribute holding ``--model``; given, the option is refused at the parse for
    the toys (:func:`~sdadapt.cli.option_rules.only_with`; ``parser`` must then be the command's parser, not a
    group), which have no image-embedding normaliser. A path that does not exist is refused at the parse; the file is
    read (and a wrong one refused, naming it) by :func:`sdadapt.formats.unclip.read_clip_stats` when the model
    loads; a model that is not unCLIP refuses it there (``--clip-stats is for SD 2.1 unCLIP ...``)."""
    parser.add_argument("--clip-stats", default=None, metavar="FILE", type=_clip_stats_path,
                        help="SD 2.1 unCLIP-L: karlo's ViT-L-14_stats.th, the CLIP-embedding mean/std its LDM config "
                        "reads from clip_stats_path and no checkpoint holds (diffusers' clip_stats_path; unCLIP-H's "
                        f"is identity); {use}")
    if model_dest is not None:
        from .option_rules import only_with

        only_with(parser, ["--clip-stats"], needs="an SD unCLIP --model PATH",
                  when=lambda args: getattr(args, model_dest) not in ("toy", "toy-image"),
                  message="{option} is an SD 2.1 unCLIP-L model's CLIP-embedding mean/std; the toys have no image "
                  "normaliser: leave {option} out")


def width_height(text: str) -> tuple[int, int]:
    """argparse type: ``WIDTHxHEIGHT`` in pixels -> ``(width, height)``, both >= 1."""
    width, _, height = text.lower().partition("x")
    try:
        w, h = int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 512x768, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"width and height must be > 0, got {text!r}")
    return w, h


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (steps, counts, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave it out for the default)")
    return value


def numbers(text: str) -> tuple[float, ...]:
    """argparse type for comma-separated numbers: ``"0,1, 0.5"`` -> ``(0.0, 1.0, 0.5)``.

    Refuses an empty list, empty items (``"1,,2"``, ``"1,"``), words and non-finite values with
    an ``ArgumentTypeError`` that names the bad item (argparse prints it after the option name).
    """
    example = "e.g. 0.5,1,1 (write --option=-1,2 when the first value is negative)"
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, {example}; got an empty string")
    values = []
    for position, item in enumerate(text.split(","), start=1):
        item = item.strip()
        if not item:
            raise argparse.ArgumentTypeError(f"empty item {position} in {text!r}; expected comma-separated numbers, {example}")
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number (in {text!r}); expected comma-separated "
                                             f"numbers, {example}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{item!r} is not a finite number (in {text!r})")
        values.append(value)
    return tuple(values)


class BooleanFlag(argparse.BooleanOptionalAction):
    """``--flag`` / ``--no-flag`` with the help as written, on every Python: 3.10's ``BooleanOptionalAction``
    appends `` (default: %(default)s)`` to it (``(default: <unset>)`` for ``train``'s options, whose default is
    a marker), 3.11 and later do not."""

    _APPENDED = " (default: %(default)s)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.help, str) and self.help.endswith(self._APPENDED) and sys.version_info < (3, 11):
            self.help = self.help[: -len(self._APPENDED)]


class ExtendNumbers(argparse.Action):
    """``nargs="+"`` with ``type=numbers``: ``--scale 1 0.5``, ``--scale 1,0.5`` -> ``(1.0, 0.5)``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, tuple(v for group in values for v in group))


def torch_dtype(name: str | None):
    """``--dtype`` -> ``torch.dtype``; ``"keep"``/``None`` -> ``None`` (the command's natural dtype)."""
    if name in (None, "keep"):
        return None
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def dtype_name(name: str | None) -> str | None:
    """``--dtype`` -> the recipe's dtype name (``"fp16"`` ...); ``"keep"``/``None`` -> ``None``."""
    return None if name in (None, "keep") else name


# ------------------------------------------------------------------------------------------- progress

_OPEN: list[ProgressBar] = []  # bars that have drawn but not finished (closed by close_progress)


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBar:
    """``bar(done, total, info=None)`` on stderr, created lazily at the first call.

    tqdm draws it when installed (``use_tqdm=None``); else one line, redrawn at most every
    ``min_interval`` seconds (and always at the first and the last unit)::

        merge weighted-sum [#########.....................]  30/100  12.5 tensor/s  ETA 0:06

    ``info``: a float is shown as tqdm's ``set_postfix`` shows it, ``loss=0.123`` (:func:`tqdm_number`;
    ``info_name`` in place of ``loss``: the train bar's ``avr_loss``, kohya's ``set_postfix(avr_loss=...)``,
    sd-scripts@48d368fa train_network.py:1514-1516), a string (the item just done) after the ETA.

    Args:
        label: what runs (the bar's title).
        unit: what is counted (``"step"``, ``"tensor"``, ``"layer"``).
        stream: where to draw (default ``sys.stderr``, looked up at each call).
        use_tqdm: ``None`` = tqdm when importable, ``False`` = always the built-in bar.
        clock: seconds (``time.perf_counter``); tests pass a fake one.
    """

    width = 30

    def __init__(self, label: str, *, unit: str = "it", stream: TextIO | None = None, use_tqdm: bool | None = None,
                 min_interval: float = 0.1, clock: Callable[[], float] = time.perf_counter, info_name: str = "loss") -> None:
        self.label = label
        self.info_name = info_name
        self.unit = unit
        self._stream = stream
        self._use_tqdm = use_tqdm
        self.min_interval = min_interval
        self._clock = clock
        self._start: float | None = None
        self._last_draw = -math.inf
        self._tqdm: Any = None
        self._line_open = False
        self._last_len = 0

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def __call__(self, done: int, total: int, info: float | str | None = None) -> None:
        if self._start is None:
            self._begin(total)
        if self._tqdm is not None:
            self._tqdm_update(done, total, info)
            return
        now = self._clock()
        if done < total and done > 1 and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self._draw(done, total, info, now)

    def _begin(self, total: int) -> None:
        self._start = self._clock()
        if self._use_tqdm is not False:
            try:
                from tqdm import tqdm  # optional
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(desc=self.label, total=total, unit=self.unit, file=self.stream, dynamic_ncols=True)
        _OPEN.append(self)

    def _tqdm_update(self, done: int, total: int, info: float | str | None) -> None:
        bar = self._tqdm
        if bar.total != total:
            bar.total = total
        if isinstance(info, (int, float)) and not isinstance(info, bool):
            bar.set_postfix({self.info_name: info}, refresh=False)  # (tqdm's format_num: tqdm_number)
        elif isinstance(info, str):
            bar.set_postfix_str(_shorten(info), refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            self.close()

    def _draw(self, done: int, total: int, info: float | str | None, now: float) -> None:
        elapsed = max(now - (self._start or now), 0.0)
        filled = int(self.width * min(done, total) / total) if total > 0 else self.width
        count = f"{done:>{len(str(total))}}/{total}"
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            rate_text = f"{rate:.3g} {self.unit}/s"
            eta_text = f"ETA {_clock_text(max(total - done, 0) / rate)}"
        else:
            rate_text, eta_text = f"? {self.unit}/s", "ETA ?"
        parts = [f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}]", count, rate_text, eta_text]
        if isinstance(info, (int, float)) and not isinstance(info, bool):
            parts.append(f"{self.info_name}={tqdm_number(info)}")  # (as tqdm's set_postfix shows it)
        elif isinstance(info, str) and info:
            parts.append(_shorten(info))
        line = "  ".join(parts)
        stream = self.stream
        finished = done >= total
        if finished:
            line += f"  in {_clock_text(elapsed)}"
        stream.write("\r" + line.ljust(self._last_len))  # blanks what a longer previous line left
        self._last_len = len(line)
        if finished:
            stream.write("\n")
            self._line_open = False
            self._forget()
        else:
            self._line_open = True
        stream.flush()

    def close(self) -> None:
        """End the bar's line (a job that stopped early leaves no half-drawn line behind)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
            self._use_tqdm = False  # a later call draws the built-in bar rather than reopening tqdm
        elif self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
        self._forget()

    def _forget(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)


def _shorten(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def tqdm_number(value: float) -> str:
    """``value`` as tqdm shows a number in a bar's postfix (tqdm/std.py ``tqdm.format_num``, which
    ``set_postfix`` applies to every number): ``f"{value:.3g}"`` with the exponent's leading zero dropped
    (``1e-05`` -> ``1e-5``), or ``str(value)`` when that is not longer (``0.5``, ``12``)::

        tqdm_number(0.123456) == "0.123"; tqdm_number(1.5e-05) == "1.5e-5"; tqdm_number(0.5) == "0.5"
    """
    short = f"{value:.3g}".replace("e+0", "e+").replace("e-0", "e-")
    text = str(value)
    return short if len(short) < len(text) else text


def progress_bar(args: argparse.Namespace, label: str, *, unit: str = "it", info_name: str = "loss") -> ProgressBar | None:
    """The bar for a command run with ``args`` (``None`` with ``-q``); ``info_name``: what its number is."""
    return None if getattr(args, "quiet", False) else ProgressBar(label, unit=unit, info_name=info_name)


def close_progress() -> None:
    """Close every bar still drawing (called before an error message, so it starts a line)."""
    for bar in list(_OPEN):
        bar.close()



# ------------------------------------------------------------------------------ terminal safety
#: C0 controls but newline/tab, DEL, C1 controls, and the Unicode bidi/line-separator controls that
#: can make printed text lie (ESC sequences clear the screen, set the window title, write the clipboard)
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_ALL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\x07``, ``\\u202e`` ...),
    so text from a file (metadata, key names) cannot drive the terminal. ``keep_newlines`` leaves
    ``\\n`` and ``\\t`` as they are (multi-line reports); otherwise they are escaped too."""
    return (_CONTROL_KEEP_LINES if keep_newlines else _CONTROL_ALL).sub(_escape, str(text))


_ADVICE = re.compile(r"[^.]*weights_only[`'\"]?\s*(?:set to|=)\s*[`'\"]?False[^.]*\.?", re.IGNORECASE)


def _unpickling_refusal(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that is torch/pickle refusing to unpickle (None: none is)."""
    import pickle

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, pickle.UnpicklingError) or "Weights only load failed" in str(current):
            return current
        current = current.__cause__ or current.__context__
    return None


#: a library message's keyword twin of a command-line option, "--overwrite (overwrite=True)"
_KEYWORD_TWIN = re.compile(r"(--[\w-]+) \(\w+=(?:True|False)\)")


def error_line(exc: BaseException, *, limit: int = 2000) -> str:
    """The one line ``python -m sdadapt`` prints for ``exc`` (without ``error: ``): whitespace
    collapsed, control characters escaped, at most ``limit`` characters, and never torch's advice to
    retry with ``weights_only=False``."""
    from ..errors import Interrupted, SdadaptError

    if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):
        text = "interrupted (Ctrl-C); the partial output (if any) was removed"
    elif isinstance(exc, MemoryError) and not isinstance(exc, SdadaptError):
        text = f"out of memory{(' (' + str(exc) + ')') if str(exc) else ''}; try smaller inputs or a machine with more memory"
    else:
        refusal = None if isinstance(exc, SdadaptError) else _unpickling_refusal(exc)
        if refusal is not None:
            where = re.search(r"['\"]([^'\"]+\.(?:bin|pt|pth|ckpt))['\"]", str(exc))
            text = (
                f"{where.group(1) + ': ' if where else ''}a pickle file was refused by torch.load(weights_only=True): "
                "it tries to run code or holds objects only full unpickling could rebuild. sdadapt never runs code "
                "from files; get the model as .safetensors from a trusted source"
            )
        else:
            text = str(exc) or type(exc).__name__
            if isinstance(exc, KeyError) and exc.args:
                text = f"missing key {exc.args[0]!r}"
    text = _ADVICE.sub("", text)
    text = _KEYWORD_TWIN.sub(r"\1", text)  # ("pass --overwrite (overwrite=True)": the library's twin is for callers)
    text = safe_text(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def translate_error(exc: BaseException) -> BaseException:
    """A third-party exception that has a documented meaning, as the :mod:`sdadapt.errors` class it
    is (so it gets that exit code): torch refusing to unpickle → :class:`UnsafeFileError`; a CUDA-less
    build or an unknown device string → :class:`InputError`; a ``RecursionError`` or a safetensors
    library error from a file → :class:`WeightFileError` (one while writing a file: :class:`OutputError`, a full
    disk :class:`DiskSpaceError`). Anything else comes back unchanged."""
    from ..errors import DiskSpaceError, InputError, OutputError, SdadaptError, UnsafeFileError, WeightFileError

    if isinstance(exc, (SdadaptError, KeyboardInterrupt, SystemExit)):
        return exc
    text = " ".join(str(exc).split())
    if _unpickling_refusal(exc) is not None:
        return UnsafeFileError(error_line(exc))
    if isinstance(exc, AssertionError) and "not compiled with CUDA" in text:
        return InputError("--device: this torch build has no CUDA; use --device cpu (or install a CUDA build of torch)")
    if isinstance(exc, RuntimeError) and ("device type at start of device string" in text or "Invalid device" in text):
        return InputError(f"--device: not a device this torch knows ({text[:160]}); use cpu, cuda or mps")
    if isinstance(exc, RecursionError):
        return WeightFileError("an input is nested too deeply to read (RecursionError); it is corrupt or hostile")
    if type(exc).__name__ == "SafetensorError" and "while serializing" in text.lower():  # (a write: a folder's weights)
        if "code: 28" in text or "StorageFull" in text:
            return DiskSpaceError(f"writing a safetensors file: the disk is full ({text[:200]}); free space and run again "
                                  "(nothing was left under the output's name)")
        return OutputError(f"writing a safetensors file failed ({text[:300]}); nothing was left under the output's name")
    if type(exc).__name__ == "SafetensorError":
        return WeightFileError(f"an unreadable safetensors file ({text[:300]}); download or copy it again")
    return exc


class _EscapingStream:
    """A text stream that escapes control characters (newlines, tabs and the progress bar's ``\\r`` pass)."""

    _PATTERN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False  # (a write met a closed pipe: the bytes are gone, so a later flush succeeds)

    def write(self, text: str) -> int:
        try:
            self._stream.write(self._PATTERN.sub(_escape, text))
        except BrokenPipeError:
            self.broken = True
            raise
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def escaping_streams() -> Iterator[None]:
    """While the block runs, ``sys.stdout``/``sys.stderr`` escape control characters (anything a
    command prints from a file — a key name, a metadata value — cannot drive the terminal)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, _EscapingStream):
        sys.stdout = _EscapingStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _EscapingStream):
        sys.stderr = _EscapingStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


_HUB_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"
#: the libraries' own switches of their bars, for a library imported before ``-q`` takes effect (its bars no
#: longer read the variable): (module, disable, enable, "are they on?")
_LIBRARY_BARS = (
    ("transformers.utils.logging", "disable_progress_bar", "enable_progress_bar", "is_progress_bar_enabled"),
    ("diffusers.utils.logging", "disable_progress_bar", "enable_progress_bar", "is_progress_bar_enabled"),
)


@contextlib.contextmanager
def quiet_library_bars(quiet: bool) -> Iterator[None]:
    """With ``quiet`` (``-q``), the command's run without diffusers' / transformers' own progress bars
    ("Loading weights", "Writing model shards"): ``HF_HUB_DISABLE_PROGRESS_BARS=1``, which both read
    when first imported, unless the user set it; and, for one already imported (a script or notebook that
    calls :func:`sdadapt.cli.main`), its own switch turned off. Both restored afterwards."""
    import os

    if not quiet or _HUB_BARS in os.environ:
        yield
        return
    os.environ[_HUB_BARS] = "1"
    turned_off = []
    for name, disable, enable, enabled in _LIBRARY_BARS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, enabled)():
            getattr(module, disable)()
            turned_off.append(getattr(module, enable))
    try:
        yield
    finally:
        os.environ.pop(_HUB_BARS, None)
        for enable in turned_off:
            enable()


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM, SIGHUP and SIGINT raise :class:`sdadapt.errors.Interrupted` —
    once: signals that arrive while the partial output is being removed are ignored — so every
    ``finally``/``except BaseException`` on the way up (the atomic writer's cleanup) runs. Only
    in the main thread (where Python delivers signals); elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from ..errors import Interrupted

    fired: list[int] = []

    def handler(number: int, frame: Any) -> None:
        if fired:
            return  # already unwinding: let the cleanup finish
        fired.append(number)
        raise Interrupted(number)

    saved: list[tuple[int, Any]] = []  # noted before each swap: a signal mid-setup still restores them
    try:
        swap_in(handler, saved)
        yield
    finally:
        put_back(saved)  # every one, even when a signal arrives as the first is put back
