"""``generate --prompts-file FILE``: A1111's "Prompts from file or textbox" script (``scripts/prompts_from_file.py``)
— one run of generate per line of a text file, each line a prompt or A1111's ``--key value`` options for it.

A line without ``--`` is a prompt. A line with ``--`` is read as A1111's ``cmdargs`` reads it: shell words, each
``--key`` one of :data:`PROMPT_LINE_OPTIONS` and its value; ``--prompt`` and ``--negative_prompt`` take every word up
to the next ``--``. A line that does not read so (an unknown key, a value that is no number, an open quote) is, as
in A1111, the prompt itself — said as a warning. The line's prompt goes before the ``--prompt`` given (``insert``
``"end"``: after it), as the script's "Insert prompts at the" does; so does its negative prompt.

The model is loaded once (:class:`~sdadapt.jobs.loaded_models.LoadedModels`); each line runs on its own copy, so a
line's LoRA tags, embeddings and hypernetworks never reach the next line.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..prompt_styles import PromptStyle

__all__ = [
    "PROMPT_LINE_OPTIONS",
    "PromptLine",
    "line_settings",
    "parse_prompt_line",
    "prompt_lines",
    "read_prompts_file",
    "run_prompt_lines",
]


def _a1111_boolean(text: str) -> bool:
    return text == "true"  # (A1111's process_boolean_tag: "true" alone, case and all)


#: A1111's ``prompt_tags``: each option a line may give and how its value reads
PROMPT_LINE_OPTIONS: dict[str, Callable[[str], object]] = {
    "sd_model": str, "outpath_samples": str, "outpath_grids": str, "prompt_for_display": str, "prompt": str,
    "negative_prompt": str, "styles": str, "seed": int, "subseed_strength": float, "subseed": int,
    "seed_resize_from_h": int, "seed_resize_from_w": int, "sampler_index": int, "sampler_name": str,
    "batch_size": int, "n_iter": int, "steps": int, "cfg_scale": float, "width": int, "height": int,
    "restore_faces": _a1111_boolean, "tiling": _a1111_boolean, "do_not_save_samples": _a1111_boolean,
    "do_not_save_grid": _a1111_boolean,
}

#: the options that change nothing here: A1111's grids (the script turns them off), its UI's prompt text
_NO_EFFECT = ("outpath_grids", "do_not_save_grid", "prompt_for_display")


@dataclasses.dataclass(frozen=True)
class PromptLine:
    """One line of a prompts file: its ``number`` in the file (1-based), its ``text`` (stripped) and ``options``
    (:func:`parse_prompt_line`'s; ``{"prompt": text}`` for a plain prompt)."""

    number: int
    text: str
    options: Mapping[str, object]


def parse_prompt_line(line: str) -> dict[str, object]:
    """A1111's ``cmdargs``: ``line``'s ``--key value`` pairs as ``{key: value}`` (each value read by
    :data:`PROMPT_LINE_OPTIONS`); ``--prompt`` / ``--negative_prompt`` take the words up to the next one starting
    with ``--``, joined by spaces.

    ``'--prompt "a cat" on a mat --steps 20'`` -> ``{"prompt": "a cat on a mat", "steps": 20}``.

    Raises:
        ValueError: a word that is no ``--key`` where one is due, a key without a value, an unknown key, a value
            its key cannot read, or a line shell quoting cannot split (an open quote).
    """
    words = shlex.split(line)
    found: dict[str, object] = {}
    at = 0
    while at < len(words):
        word = words[at]
        if not word.startswith("--"):
            raise ValueError(f"must start with \"--\": {word}")
        if at + 1 >= len(words):
            raise ValueError(f"missing argument for command line option {word}")
        key = word[2:]
        if key in ("prompt", "negative_prompt"):
            text = words[at + 1]
            at += 2
            while at < len(words) and not words[at].startswith("--"):
                text += " " + words[at]
                at += 1
            found[key] = text
            continue
        read = PROMPT_LINE_OPTIONS.get(key)
        if read is None:
            raise ValueError(f"unknown commandline option: {word}")
        found[key] = read(words[at + 1])
        at += 2
    return found


def prompt_lines(text: str, *, source: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> list[PromptLine]:
    """The lines of a prompts file's ``text`` as A1111's script reads them: stripped, the empty ones left out; a
    line with ``--`` parsed by :func:`parse_prompt_line`, or — when that fails, as in A1111 — the whole line as the
    prompt (``log`` hears a warning why, naming ``SOURCE:N``, or ``line N`` without a ``source``)."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        options: dict[str, object] = {"prompt": line}
        if "--" in line:
            try:
                options = parse_prompt_line(line)
            except ValueError as exc:
                if log is not None:
                    where = f"line {number}" if source is None else f"{source}:{number}"
                    log(f"warning: {where}: not read as options ({exc}); the whole line is its prompt, as in A1111")
        lines.append(PromptLine(number, line, options))
    return lines


def read_prompts_file(path: str | os.PathLike, *, log: Callable[[str], None] | None = None) -> list[PromptLine]:
    """:func:`prompt_lines` of the UTF-8 text file ``path`` (a byte-order mark left out; ``"-"``: standard input,
    A1111's text box).

    Raises:
        InputError: no such file, a file that is no UTF-8 text (the byte named), or one without a line to run.
    """
    import sys

    from ..errors import InputError

    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"--prompts-file {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"--prompts-file {path}: a folder; give a text file of prompts, one per line") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"--prompts-file {path}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); save "
                         "it as UTF-8") from None
    lines = prompt_lines(text, source=path, log=log)
    if not lines:
        raise InputError(f"--prompts-file {path}: no prompts in it (every line is empty)")
    return lines


def _joined(line_text: str, given: str, insert: str) -> str:
    """The script's joining of a line's prompt and the one given: both non-empty, by a space (the line's first for
    ``insert`` ``"start"``); else the line's, ``""`` included (its ``setattr(copy_p, k, v)``: a line's
    ``--prompt ""`` runs with an empty prompt)."""
    if not line_text or not given:
        return line_text
    return f"{line_text} {given}" if insert == "start" else f"{given} {line_text}"


def line_settings(options: Mapping[str, object], given: Mapping[str, object], *, insert: str = "start",
                  style_table: Mapping[str, PromptStyle] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, object]:
    """The :func:`~sdadapt.jobs.generate.run_generate` arguments a line's ``options`` change, over the run's
    ``given`` ones (its ``prompt``, ``negative``, ``count``, ``seed_resize_from``, ``model``, ``out``).

    As A1111's script sets them on its copy of the run: ``prompt`` / ``negative_prompt`` joined to the given ones
    (:func:`_joined`), ``cfg_scale`` the guidance, ``sampler_name`` A1111's label, ``batch_size`` × ``n_iter`` the
    image count (the given ``count`` being ``n_iter``), ``seed_resize_from_h`` / ``_w`` the given size's parts,
    ``outpath_samples`` the folder of the line's images, ``sd_model`` the model
    (:func:`~sdadapt.jobs.models.checkpoint_by_name`);
    ``styles`` the saved styles of ``style_table`` it names (comma-separated; in place of the run's — A1111 sets
    the attribute to the line's text, which it then reads letter by letter, so there the line's styles never
    work); ``sampler_index`` does nothing (A1111 1.x ignores it: said), nor do ``outpath_grids``,
    ``do_not_save_grid`` and ``prompt_for_display`` (no grids here).

    Raises:
        ValueError: what sdadapt does not do — ``restore_faces true``, ``do_not_save_samples true`` — an unknown
            sampler or style, a count or size below 1.
    """
    from ..prompt_styles import find_styles
    from ..sampler_tables import sampler_schedule_from_label
    from .models import checkpoint_by_name

    settings: dict[str, object] = {}
    for key, value in options.items():
        if key in ("prompt", "negative_prompt"):
            settings["prompt" if key == "prompt" else "negative"] = _joined(
                str(value), str(given.get("prompt" if key == "prompt" else "negative") or ""), insert)
        elif key in ("seed", "subseed", "subseed_strength", "steps", "width", "height", "tiling"):
            settings[key] = value
        elif key == "cfg_scale":
            settings["guidance"] = value
        elif key == "sampler_name":
            try:
                sampler_schedule_from_label(str(value))
            except ValueError as exc:
                raise ValueError(f"--sampler_name {value}: {exc}") from None
            settings["sampler"] = value
        elif key == "sd_model":
            settings["model"] = checkpoint_by_name(str(value), beside=str(given.get("model", "toy")),
                                                   option="--sd_model")
        elif key == "outpath_samples":
            settings["out"] = str(Path(str(value)) / Path(str(given["out"])).name)
        elif key in ("restore_faces", "do_not_save_samples") and value:
            what = "face restoration (GFPGAN / CodeFormer) is not in sdadapt" if key == "restore_faces" else \
                "the line's images would be made and not written"
            raise ValueError(f"--{key} true: {what}; leave it out (or false)")
        elif key == "styles":  # (names, comma-separated, in place of the run's --style ones)
            if style_table is None:
                raise ValueError("--styles: give the styles file its names are in (--styles-file styles.csv)")
            settings["styles"] = find_styles([name.strip() for name in str(value).split(",") if name.strip()],
                                             style_table)
        elif key == "sampler_index" and log is not None:
            log("warning: --sampler_index does nothing (A1111 1.x ignores it too); use --sampler_name")
    noise_shaped = [key for key in ("subseed", "subseed_strength", "seed_resize_from_h", "seed_resize_from_w")
                    if key in options]
    if noise_shaped and given.get("noise") is None:
        raise ValueError(f"--{noise_shaped[0]} shapes A1111's noise, which this run draws only with --noise a1111 (or "
                         "a1111-cpu): add it to the command line, or leave the option out")
    for key in ("steps", "width", "height", "batch_size", "n_iter"):
        if key in options and int(options[key]) < 1:  # type: ignore[call-overload]
            raise ValueError(f"--{key} {options[key]}: must be 1 or more")
    if "batch_size" in options or "n_iter" in options:
        settings["count"] = int(options.get("batch_size", 1)) * int(options.get("n_iter", given.get("count", 1)))
    if "seed_resize_from_h" in options or "seed_resize_from_w" in options:  # (A1111: used when both are > 0)
        height, width = given.get("seed_resize_from") or (0, 0)  # type: ignore[misc]
        height = options.get("seed_resize_from_h", height)
        width = options.get("seed_resize_from_w", width)
        settings["seed_resize_from"] = (height, width) if height > 0 and width > 0 else None  # type: ignore[operator]
    return settings


def run_prompt_lines(lines: Sequence[PromptLine], *, iterate_seed: bool = False, same_seed: bool = False,
                     insert: str = "start", source: str = "--prompts-file",
                     style_table: Mapping[str, PromptStyle] | None = None,
                     progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = None,
                     **given: object) -> dict:
    """Run :func:`~sdadapt.jobs.generate.run_generate` once per line, ``given`` (its arguments: ``prompt``,
    ``out``, ``seed``, ...) changed by each line's options (:func:`line_settings`), as A1111's script runs
    ``process_images`` on a copy of its run per line.

    Line ``k`` (0-based among the lines) writes ``OUT-kk.png`` (``OUT-kk-ii.png`` for several images) beside
    ``out`` (or in its ``--outpath_samples`` folder). Seeds as the script's: a line's ``--seed`` is its own;
    ``iterate_seed`` ("Iterate seed every line") moves the seed by the given ``count`` after each line;
    ``same_seed`` ("Use same random seed for all lines") draws a seed ``-1`` once for all lines (as ``iterate_seed``
    does); otherwise a ``-1`` is drawn per line. The model (and refiner) is loaded once
    (:class:`~sdadapt.jobs.loaded_models.LoadedModels`). Every line is read and checked, and every output
    checked for an existing file, before the model loads.

    Returns:
        ``{"files": [...], "lines": [each line's run_generate result, with "line": its number]}``.

    Raises:
        ValueError: an option a line gives that is not done here (:func:`line_settings`), ``insert`` not
            ``"start"`` / ``"end"``, ``given`` with another of A1111's scripts (SD upscale, Loopback, Poor man's
            outpainting) or a folder of init images; errors of a line's run name its line (``source:N``).
        FileExistsError: an output exists and ``overwrite`` is false.
    """
    from ..images import numbered
    from .generate_runs import check_outputs_free, check_script_alone, run_named
    from .generate_seed import RANDOM_SEED, fixed_seed
    from .loaded_models import LoadedModels

    if insert not in ("start", "end"):
        raise ValueError(f"insert must be 'start' or 'end' (A1111's 'Insert prompts at the'), got {insert!r}")
    check_script_alone(source, given)
    if not lines:
        raise ValueError(f"{source}: no prompts to run")
    say = log if log is not None else (lambda _line: None)
    jobs = []
    for index, line in enumerate(lines):  # (all read and checked before the model loads)
        try:
            settings = line_settings(line.options, given, insert=insert, style_table=style_table,
                                     log=lambda text, n=line.number: say(
                                         text.replace("warning: ", f"warning: {source}:{n}: ", 1)))
        except ValueError as exc:
            raise ValueError(f"{source}:{line.number}: {exc}") from None
        out = Path(str(settings.pop("out", given["out"])))
        settings["out"] = str(numbered(out, index))
        jobs.append((line, settings))
    writes: dict[Path, int] = {}  # (every file each line writes, and the line)
    for line, settings in jobs:
        count = int(settings.get("count", given.get("count", 1)))  # type: ignore[call-overload]
        first = Path(str(settings["out"]))
        for file in [first] if count == 1 else [numbered(first, i) for i in range(count)]:
            writes[file] = line.number
    check_outputs_free(writes, overwrite=bool(given.get("overwrite")),
                       why=lambda file: f"line {writes[file]} of {source}")
    seed = int(given.get("seed", 0))  # type: ignore[call-overload]
    if (iterate_seed or same_seed) and seed == RANDOM_SEED:  # (the script draws it once for every line)
        seed = fixed_seed(seed)
        say(f"--seed -1: drew {seed} for every line (pass --seed {seed} to make the same images again)")
    loaded = LoadedModels()
    written: list[str] = []
    results = []
    for done, (line, settings) in enumerate(jobs):
        say(f"{source}:{line.number}: {line.text}")
        result = run_named(f"{source}:{line.number}", {**given, "seed": seed, **settings}, loaded=loaded, log=log)
        written += result["files"]
        results.append({**result, "line": line.number})
        if iterate_seed:  # (A1111: p.seed += p.batch_size * p.n_iter, the run's, not the line's)
            seed += int(given.get("count", 1))  # type: ignore[call-overload]
        if progress is not None:
            progress(done + 1, len(jobs), Path(str(settings["out"])).name)
    return {"files": written, "lines": results}
