"""supermerger's named block-weight presets (MBW ``weights presets``), resolved as supermerger does.

Torch-free (no :mod:`sdadapt.merge` import), so ``python -m sdadapt merge`` resolves a preset name, reads
``--presets FILE`` and refuses an unknown name without torch; :mod:`sdadapt.merge.presets` re-exports it.

The built-in list is supermerger's ``scripts/mbwpresets_master.txt`` (hako-mikan/sd-webui-supermerger
@ 0b1c491): one preset a line, ``NAME<TAB>26 values`` (BASE, IN00..IN11, M00, OUT00..OUT11). supermerger
reads a user's ``scripts/mbwpresets.txt`` *instead* when it exists (first run copies the master list
there); :func:`read_presets` reads such a file (``--presets FILE`` on the command line) and it replaces the
built-in list the same way.

A weights text without a comma is a preset name (supermerger's ``wpreseter``, ``scripts/mergers/
mergers.py``): each line ``NAME:VALUES`` or ``NAME<TAB>VALUES`` (a line with both gives two entries:
before the first ``:``, and before the first tab, which wins for its name), names and the looked-up
text stripped of surrounding spaces, a later line of the same name replacing an earlier one. A preset's
values are a block list like any other (26 values, reduced on SDXL as supermerger does; see
:func:`sdadapt.merge.blocks.parse_block_weights`). supermerger's random presets (``ALL_R``, ``ALL_U``,
``ALL_X``: ``R``/``U``/``X`` entries drawn from its seeded random settings) are refused: sdadapt has no
such settings.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from .errors import InputError

__all__ = ["SUPERMERGER_PRESETS", "parse_presets", "read_presets", "resolve_preset", "preset_names"]

#: supermerger's mbwpresets_master.txt @ 0b1c491, line by line (the header line included, as the file has it)
SUPERMERGER_PRESETS: str = "".join(line + "\n" for line in (
    'preset_name\tpreset_weights',
    'GRAD_V\t0,1,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,0.25,0.1666666667,0.0833333333,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0',
    'GRAD_A\t0,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,0.25,0.1666666667,0.0833333333,0',
    'FLAT_25\t0,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25',
    'FLAT_75\t0,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75',
    'WRAP08\t0,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1',
    'WRAP12\t0,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1',
    'WRAP14\t0,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1',
    'WRAP16\t0,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1',
    'MID12_50\t0,0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0',
    'OUT07\t0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1',
    'OUT12\t0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1',
    'OUT12_5\t0,0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1',
    'RING08_SOFT\t0,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0',
    'RING08_5\t0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0',
    'RING10_5\t0,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0',
    'RING10_3\t0,0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0',
    'SMOOTHSTEP\t0,0,0.00506365740740741,0.0196759259259259,0.04296875,0.0740740740740741,0.112123842592593,0.15625,0.205584490740741,0.259259259259259,0.31640625,0.376157407407407,0.437644675925926,0.5,0.562355324074074,0.623842592592592,0.68359375,0.740740740740741,0.794415509259259,0.84375,0.887876157407408,0.925925925925926,0.95703125,0.980324074074074,0.994936342592593,1',
    'REVERSE-SMOOTHSTEP\t0,1,0.994936342592593,0.980324074074074,0.95703125,0.925925925925926,0.887876157407407,0.84375,0.794415509259259,0.740740740740741,0.68359375,0.623842592592593,0.562355324074074,0.5,0.437644675925926,0.376157407407408,0.31640625,0.259259259259259,0.205584490740741,0.15625,0.112123842592592,0.0740740740740742,0.0429687499999996,0.0196759259259258,0.00506365740740744,0',
    'SMOOTHSTEP*2\t0,0,0.0101273148148148,0.0393518518518519,0.0859375,0.148148148148148,0.224247685185185,0.3125,0.411168981481482,0.518518518518519,0.6328125,0.752314814814815,0.875289351851852,1.,0.875289351851852,0.752314814814815,0.6328125,0.518518518518519,0.411168981481481,0.3125,0.224247685185184,0.148148148148148,0.0859375,0.0393518518518512,0.0101273148148153,0',
    'R_SMOOTHSTEP*2\t0,1,0.989872685185185,0.960648148148148,0.9140625,0.851851851851852,0.775752314814815,0.6875,0.588831018518519,0.481481481481481,0.3671875,0.247685185185185,0.124710648148148,0.,0.124710648148148,0.247685185185185,0.3671875,0.481481481481481,0.588831018518519,0.6875,0.775752314814816,0.851851851851852,0.9140625,0.960648148148149,0.989872685185185,1',
    'SMOOTHSTEP*3\t0,0,0.0151909722222222,0.0590277777777778,0.12890625,0.222222222222222,0.336371527777778,0.46875,0.616753472222222,0.777777777777778,0.94921875,0.871527777777778,0.687065972222222,0.5,0.312934027777778,0.128472222222222,0.0507812500000004,0.222222222222222,0.383246527777778,0.53125,0.663628472222223,0.777777777777778,0.87109375,0.940972222222222,0.984809027777777,1',
    'R_SMOOTHSTEP*3\t0,1,0.984809027777778,0.940972222222222,0.87109375,0.777777777777778,0.663628472222222,0.53125,0.383246527777778,0.222222222222222,0.05078125,0.128472222222222,0.312934027777778,0.5,0.687065972222222,0.871527777777778,0.94921875,0.777777777777778,0.616753472222222,0.46875,0.336371527777777,0.222222222222222,0.12890625,0.0590277777777777,0.0151909722222232,0',
    'SMOOTHSTEP*4\t0,0,0.0202546296296296,0.0787037037037037,0.171875,0.296296296296296,0.44849537037037,0.625,0.822337962962963,0.962962962962963,0.734375,0.49537037037037,0.249421296296296,0.,0.249421296296296,0.495370370370371,0.734375000000001,0.962962962962963,0.822337962962962,0.625,0.448495370370369,0.296296296296297,0.171875,0.0787037037037024,0.0202546296296307,0',
    'R_SMOOTHSTEP*4\t0,1,0.97974537037037,0.921296296296296,0.828125,0.703703703703704,0.55150462962963,0.375,0.177662037037037,0.0370370370370372,0.265625,0.50462962962963,0.750578703703704,1.,0.750578703703704,0.504629629629629,0.265624999999999,0.0370370370370372,0.177662037037038,0.375,0.551504629629631,0.703703703703703,0.828125,0.921296296296298,0.979745370370369,1',
    'SMOOTHSTEP/2\t0,0,0.0196759259259259,0.0740740740740741,0.15625,0.259259259259259,0.376157407407407,0.5,0.623842592592593,0.740740740740741,0.84375,0.925925925925926,0.980324074074074,1.,0.980324074074074,0.925925925925926,0.84375,0.740740740740741,0.623842592592593,0.5,0.376157407407407,0.259259259259259,0.15625,0.0740740740740741,0.0196759259259259,0',
    'R_SMOOTHSTEP/2\t0,1,0.980324074074074,0.925925925925926,0.84375,0.740740740740741,0.623842592592593,0.5,0.376157407407407,0.259259259259259,0.15625,0.0740740740740742,0.0196759259259256,0.,0.0196759259259256,0.0740740740740742,0.15625,0.259259259259259,0.376157407407407,0.5,0.623842592592593,0.740740740740741,0.84375,0.925925925925926,0.980324074074074,1',
    'SMOOTHSTEP/3\t0,0,0.04296875,0.15625,0.31640625,0.5,0.68359375,0.84375,0.95703125,1.,0.95703125,0.84375,0.68359375,0.5,0.31640625,0.15625,0.04296875,0.,0.04296875,0.15625,0.31640625,0.5,0.68359375,0.84375,0.95703125,1',
    'R_SMOOTHSTEP/3\t0,1,0.95703125,0.84375,0.68359375,0.5,0.31640625,0.15625,0.04296875,0.,0.04296875,0.15625,0.31640625,0.5,0.68359375,0.84375,0.95703125,1.,0.95703125,0.84375,0.68359375,0.5,0.31640625,0.15625,0.04296875,0',
    'SMOOTHSTEP/4\t0,0,0.0740740740740741,0.259259259259259,0.5,0.740740740740741,0.925925925925926,1.,0.925925925925926,0.740740740740741,0.5,0.259259259259259,0.0740740740740741,0.,0.0740740740740741,0.259259259259259,0.5,0.740740740740741,0.925925925925926,1.,0.925925925925926,0.740740740740741,0.5,0.259259259259259,0.0740740740740741,0',
    'R_SMOOTHSTEP/4\t0,1,0.925925925925926,0.740740740740741,0.5,0.259259259259259,0.0740740740740742,0.,0.0740740740740742,0.259259259259259,0.5,0.740740740740741,0.925925925925926,1.,0.925925925925926,0.740740740740741,0.5,0.259259259259259,0.0740740740740742,0.,0.0740740740740742,0.259259259259259,0.5,0.740740740740741,0.925925925925926,1',
    'COSINE\t0,1,0.995722430686905,0.982962913144534,0.961939766255643,0.933012701892219,0.896676670145617,0.853553390593274,0.80438071450436,0.75,0.691341716182545,0.62940952255126,0.565263096110026,0.5,0.434736903889974,0.37059047744874,0.308658283817455,0.25,0.195619285495639,0.146446609406726,0.103323329854382,0.0669872981077805,0.0380602337443566,0.0170370868554658,0.00427756931309475,0',
    'REVERSE_COSINE\t0,0,0.00427756931309475,0.0170370868554659,0.0380602337443566,0.0669872981077808,0.103323329854383,0.146446609406726,0.19561928549564,0.25,0.308658283817455,0.37059047744874,0.434736903889974,0.5,0.565263096110026,0.62940952255126,0.691341716182545,0.75,0.804380714504361,0.853553390593274,0.896676670145618,0.933012701892219,0.961939766255643,0.982962913144534,0.995722430686905,1',
    'TRUE_CUBIC_HERMITE\t0,0,0.199031876929012,0.325761959876543,0.424641927083333,0.498456790123457,0.549991560570988,0.58203125,0.597360869984568,0.598765432098765,0.589029947916667,0.570939429012346,0.547278886959876,0.520833333333333,0.49438777970679,0.470727237654321,0.45263671875,0.442901234567901,0.444305796682099,0.459635416666667,0.491675106095678,0.543209876543211,0.617024739583333,0.715904706790124,0.842634789737655,1',
    'TRUE_REVERSE_CUBIC_HERMITE\t0,1,0.800968123070988,0.674238040123457,0.575358072916667,0.501543209876543,0.450008439429012,0.41796875,0.402639130015432,0.401234567901235,0.410970052083333,0.429060570987654,0.452721113040124,0.479166666666667,0.50561222029321,0.529272762345679,0.54736328125,0.557098765432099,0.555694203317901,0.540364583333333,0.508324893904322,0.456790123456789,0.382975260416667,0.284095293209876,0.157365210262345,0',
    'FAKE_CUBIC_HERMITE\t0,0,0.157576195987654,0.28491512345679,0.384765625,0.459876543209877,0.512996720679012,0.546875,0.564260223765432,0.567901234567901,0.560546875,0.544945987654321,0.523847415123457,0.5,0.476152584876543,0.455054012345679,0.439453125,0.432098765432099,0.435739776234568,0.453125,0.487003279320987,0.540123456790124,0.615234375,0.71508487654321,0.842423804012347,1',
    'FAKE_REVERSE_CUBIC_HERMITE\t0,1,0.842423804012346,0.71508487654321,0.615234375,0.540123456790123,0.487003279320988,0.453125,0.435739776234568,0.432098765432099,0.439453125,0.455054012345679,0.476152584876543,0.5,0.523847415123457,0.544945987654321,0.560546875,0.567901234567901,0.564260223765432,0.546875,0.512996720679013,0.459876543209876,0.384765625,0.28491512345679,0.157576195987653,0',
    'ALL_A\t0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0',
    'ALL_B\t1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1',
))

#: supermerger's random presets (``ADDRAND`` in scripts/supermerger.py, appended to every list)
_RANDOM = {"ALL_R": "R", "ALL_U": "U", "ALL_X": "X"}

#: the largest presets file read (supermerger's lists are a few kB)
_MAX_PRESETS_BYTES = 1 << 20


def parse_presets(text: str) -> dict[str, str]:
    """``{name: values text}`` of a presets text, as supermerger's ``wpreseter`` builds it.

    Lines with ``:`` give ``name = before the first ':'``; lines with a tab ``name = before the first
    tab`` (set after, so it wins for that name); names are stripped, values kept as written.
    """
    presets: dict[str, str] = {}
    for line in text.splitlines():
        if ":" in line:
            name, _, values = line.partition(":")
            presets[name.strip()] = values
        if "\t" in line:
            name, _, values = line.partition("\t")
            presets[name.strip()] = values
    return presets


def _numbers(values: str) -> tuple[float, ...] | None:
    """The preset's comma-separated numbers, or ``None`` when an item is not a finite number."""
    out = []
    for item in values.split(","):
        try:
            value = float(item)
        except ValueError:
            return None
        if not math.isfinite(value):
            return None
        out.append(value)
    return tuple(out)


def preset_names(presets: Mapping[str, str]) -> list[str]:
    """The names whose values are all numbers (what a merge can use), in file order."""
    return [name for name, values in presets.items() if name and _numbers(values) is not None]


def read_presets(path: str | os.PathLike[str]) -> dict[str, str]:
    """A presets file (supermerger's ``mbwpresets.txt`` format) -> :func:`parse_presets` of it.

    Raises:
        InputError: the file is missing, not a file, larger than 1 MiB or not UTF-8 text.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read(_MAX_PRESETS_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{name}: cannot read the presets file ({exc.strerror or exc}); give a text file of "
                         "NAME<TAB>values lines, as supermerger's scripts/mbwpresets.txt") from None
    if len(data) > _MAX_PRESETS_BYTES:
        raise InputError(f"{name}: a presets file over 1 MiB is not a presets list; give supermerger's "
                         "mbwpresets.txt format (NAME<TAB>values lines)")
    try:
        return parse_presets(data.decode("utf-8-sig"))  # (a BOM, as Windows Notepad saves, is not a name)
    except UnicodeDecodeError:
        raise InputError(f"{name}: the presets file is not UTF-8 text") from None


def resolve_preset(name: str, *, presets: Mapping[str, str] | None = None, option: str = "weights") -> tuple[float, ...]:
    """The values of preset ``name`` (stripped) in ``presets`` (default: supermerger's built-in list).

    Returns:
        the preset's numbers as written (26 for the built-in ones; the count is checked where the
        list is used, :func:`sdadapt.merge.blocks.parse_block_weights`).

    Raises:
        InputError: an unknown name (the message lists the names there are), a random preset, or a
            preset whose values are not numbers; ``option`` names the setting in the message.
    """
    table = parse_presets(SUPERMERGER_PRESETS) if presets is None else presets
    key = name.strip()
    source = "supermerger's built-in presets" if presets is None else "the presets file"
    if key in _RANDOM or key not in table:  # (supermerger appends its random ones after every list, a user's too)
        if key in _RANDOM:
            raise InputError(f"{option}: {key} is supermerger's random preset ({_RANDOM[key]} entries drawn from its "
                             "seeded random settings), which sdadapt does not have; give the values")
        known = preset_names(table)
        raise InputError(f"{option}: invalid float value: {key!r} (not a number, comma-separated numbers or a preset "
                         f"name in {source}: {', '.join(known) if known else 'none'})")
    values = _numbers(table[key])
    if values is None:
        random = any(item.strip() in ("R", "U", "X") for item in table[key].split(","))
        raise InputError(f"{option}: preset {key!r} in {source} "
                         + ("holds supermerger's random entries (R/U/X), which sdadapt does not have; give numbers"
                            if random else f"is not comma-separated numbers: {table[key][:80]!r}"))
    return values
