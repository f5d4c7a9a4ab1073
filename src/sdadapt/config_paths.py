"""A path as a config file writes it (a kohya training TOML, a dataset TOML), read on this machine.

The kohya_ss GUI on Windows writes ``C:/Users/me/img`` (or ``C:\\Users\\me\\img``, ``\\\\server\\share\\img``); read on
Linux or macOS such a value is a relative path, so kohya would make a folder literally named ``C:\\Users\\me\\out``
under the current folder (``os.makedirs``) or report an empty image folder. A ``~/out`` is no path to kohya either
(sd-scripts expands no ``~``): it makes a folder named ``~`` — one a later ``rm -rf ~`` would take the home folder
for. :func:`config_path` refuses the first, naming the key and the file, and reads ``~`` as the home folder.
"""

from __future__ import annotations

import os
import re

__all__ = ["config_path"]

_WINDOWS = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


def config_path(value: str, *, where: str) -> str:
    """``value``, a path a config file gives at ``where`` (``"--config run.toml: output_dir"``), as this machine
    reads it: ``~`` / ``~/...`` expanded to the home folder; anything else as it is (a relative path is read from
    the current folder, as kohya reads it).

    Raises:
        ValueError: a Windows path (``C:/...``, ``C:\\...``, ``\\\\server\\...``) where this machine has none, naming
            ``where``.
    """
    if os.name != "nt" and _WINDOWS.match(value):
        raise ValueError(f"{where} = {value!r}: a Windows path (the kohya_ss GUI on Windows writes them), which this "
                         "machine would read as a folder of that name under the current one; give the path on this "
                         "machine (e.g. /home/me/... or a path relative to the current folder)")
    if value == "~" or value.startswith(("~/", "~" + os.sep)):
        return os.path.expanduser(value)
    return value
