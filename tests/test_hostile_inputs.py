"""Issue 17: hostile and broken inputs — no hang, no traceback, no silent NaN/inf, nothing left behind.

Bounded for CI (about a minute): hypothesis runs few examples per property, every command-line case
runs in a forked child that is killed after a time limit (a hang in C code cannot stall the suite),
and one subprocess is sent SIGTERM/SIGINT in the middle of a merge. The command-line cases come from
:mod:`hostile_files`, which ``benchmarks/fuzz_cli.py`` also runs, exhaustively, as separate processes.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import hostile_files as H
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdadapt.errors import (
    EXIT_CODES,
    DiskSpaceError,
    InputError,
    MergeError,
    NonFiniteError,
    OutputExistsError,
    ResourceError,
    SdadaptError,
    UnsafeFileError,
    WeightFileError,
    exit_code_table,
)

ROOT = Path(__file__).resolve().parents[1]
FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="per-case time limits use fork")
CASE_SECONDS = 60.0  # a hang is "over a minute"; healthy cases take well under a second
DOCUMENTED = (SdadaptError,)  # every refusal is an sdadapt exception
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(autouse=True)
def _time_limit():
    """Every test here under a hard limit: SIGALRM interrupts a Python-level hang (the command-line
    cases additionally run in forked children that are killed, which also stops a hang in C code)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(number, frame):
        raise TimeoutError("over the time limit: a hang")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(240)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------ the command line
@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    return root, H.build_inputs(root / "in")


@pytest.fixture(scope="module")
def cases(hostile_root):
    root, paths = hostile_root
    return {case.name: case for case in H.cli_cases(root, paths)}, root


@pytest.fixture(scope="module")
def paths(hostile_root):
    return hostile_root[1]


#: one representative of every kind of hostile input and every command class (the benchmark runs all)
CLI_SAMPLE = [
    "inspect hdr_gap", "merge hdr_overlap", "merge-lora hdr_duplicate-names", "extract-lora hdr_huge-shape",
    "resize-lora hdr_float-shape", "merge hdr_1e30-elements", "inspect hdr_100MiB-header", "inspect hdr_nested-header",
    "merge hdr_nested-metadata-object", "inspect hdr_non-utf8-metadata", "merge hdr_trailing-bytes",
    "inspect evil_raw-protocol-4", "merge evil_zip", "merge-lora evil_eval", "combine evil_nested",
    "inspect zip bomb", "merge zip bomb", "inspect bomb0", "merge-lora bomb1", "resize-lora bomb2",
    "merge-lora badpattern", "merge-lora deepmeta", "inspect peft_bomb", "inspect peft_deep",
    "merge --discard (.*.*.*)*#", "merge --discard '('", "merge --recipe bomb-discard", "merge --recipe deep-steps",
    "merge --recipe nested-json", "merge --recipe alpha-string", "merge --recipe components-number",
    "merge --alpha nan", "merge --alpha 1e6", "merge-lora --scale inf", "merge-lora alpha 1e38 fp16",
    "merge-lora NaN base", "merge-lora NaN base allowed", "merge NaN base", "extract-lora NaN base",
    "resize-lora bad rank tensors", "combine --scale 1e6", "merge --device cuda:99", "extract-lora --device bogus",
    "inspect dev-zero", "merge folder", "merge unrelated", "merge empty", "merge wide second",
    "inspect escape metadata", "merge-lora escape keys", "merge output is input", "merge missing out folder", "merge out folder is a file",
    "merge ok", "merge-lora ok",
    "merge-lora int8down", "convert scalardown comfy", "cut-dylora scalardown", "merge-lora down3d",
    "convert alphavector diffusers", "merge-lora intdora", "resize-lora sparselora", "merge-lora sparselora",
    "convert fp8 embedding", "convert boolemb", "convert emptyemb", "cut-dylora output is input",
    "resize-lora name too long",
]


@pytest.fixture(scope="module")
def sample_runs(cases):
    """Each :data:`CLI_SAMPLE` case run once in a forked child and judged right after it ran (its inputs
    hashed before): ``{name: (outcome, problems)}``, read by the two tests below (one run per case)."""
    import sdadapt.cli  # noqa: F401 - imported once here, not again in each forked child

    table, root = cases
    marker = root / "in" / "PWNED"
    runs = {}
    for name in CLI_SAMPLE:
        case = table[name]
        before = {path: H.sha256(path) for path in case.inputs}
        outcome = H.run_forked(case.argv, timeout=CASE_SECONDS)
        runs[name] = (outcome, H.judge(case, outcome, before, marker))
    return runs


@FORK
def test_every_hostile_command_line_ends_in_one_documented_line(cases, sample_runs):
    _, root = cases
    marker = root / "in" / "PWNED"
    failures = {name: problems for name, (_, problems) in sample_runs.items() if problems}
    assert not failures, json.dumps(failures, indent=1)[:6000]
    assert not marker.exists(), "a pickle payload ran"


@FORK
def test_messages_say_what_happened(sample_runs):
    def err(name: str) -> str:
        return sample_runs[name][0].stderr.strip().splitlines()[-1]

    assert "tries to run code" in err("inspect evil_raw-protocol-4") and "posix.system" in err("merge evil_zip")
    assert "gap" in err("inspect hdr_gap") and "overlap" in err("merge hdr_overlap")
    assert "repeats the name" in err("merge-lora hdr_duplicate-names")
    assert "needs 14400000000 bytes" in err("extract-lora hdr_huge-shape")
    assert "100000000-byte limit" in err("inspect hdr_100MiB-header")
    assert "not valid UTF-8" in err("inspect hdr_non-utf8-metadata")
    assert "character device" in err("inspect dev-zero") and "is a folder" in err("merge folder")
    assert "share no weights" in err("merge unrelated")
    assert "wide.safetensors" in err("merge wide second")  # names which file is the wider model
    # (which sentence depends on the torch build: a CPU wheel, or a CUDA build on a machine without a GPU)
    device = err("merge --device cuda:99")
    assert "CPU-only build" in device or ("CUDA build, but no GPU is visible" in device and "--device cpu" in device)
    assert "invalid pattern '('" in err("merge --discard '('")
    assert "recipe_alpha-string.json" in err("merge --recipe alpha-string")  # names the file
    assert "nested too deeply" in err("merge --recipe nested-json")
    assert "overflows float16 (max 65504)" in err("merge-lora alpha 1e38 fp16")
    assert "--allow-nonfinite" in err("merge NaN base")
    # malformed LoRA tensors and embeddings: the file, the layer's key and what is wrong
    assert "int8down.safetensors: unet " in err("merge-lora int8down") and "lora_down.weight is int8" in err(
        "merge-lora int8down")
    assert "is a single number (0-dim)" in err("convert scalardown comfy") and "scalardown" in err("cut-dylora scalardown")
    assert "alpha is (2,) float32; alpha is one number per layer" in err("convert alphavector diffusers")
    assert "dora_scale is int64" in err("merge-lora intdora")
    assert "sparselora.pt: " in err("merge-lora sparselora") and "sparse_coo tensor" in err("resize-lora sparselora")
    assert "boolemb.safetensors: " in err("convert boolemb") and "got bool" in err("convert boolemb")
    assert "emptyemb.safetensors: " in err("convert emptyemb") and "(0, 16)" in err("convert emptyemb")
    assert "is also an input" in err("cut-dylora output is input")
    assert "File name too long" in err("resize-lora name too long")
    shown = sample_runs["inspect escape metadata"][0].stdout
    assert "\x1b" not in shown and "\x07" not in shown and "\\x1b[2J" in shown


@FORK
def test_a_malicious_bin_in_a_diffusers_folder_is_refused_before_loading(cases):
    from sdadapt.formats.pickles import check_folder_pickles

    _, root = cases
    folder = root / "in" / "evil_pipeline"
    with pytest.raises(UnsafeFileError, match="tries to run code.*posix.system"):
        check_folder_pickles(folder)
    pytest.importorskip("diffusers")
    from sdadapt.diffusers_system import DiffusersSystem

    with pytest.raises(UnsafeFileError) as info:
        DiffusersSystem.from_folder(folder)
    assert "weights_only" in str(info.value) and "False" not in str(info.value)
    assert not (root / "in" / "PWNED").exists()


def test_argparse_errors_are_one_line(capsys):
    from sdadapt.cli import main

    with pytest.raises(SystemExit) as info:
        main(["merge", "weighted-sum", "A", "B", "--alpha", "x", "-o", "o.safetensors"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "--alpha" in err


def test_exit_codes_are_distinct_and_documented(capsys):
    from sdadapt.cli import main

    codes = list(EXIT_CODES.values())
    assert len(set(codes)) == len(codes) and 0 not in codes and 1 not in codes
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    security = (ROOT / "docs" / "security.md").read_text()
    for cls, code in EXIT_CODES.items():
        assert f"{code:<4} {cls.__name__}" in exit_code_table() and f"{code:<4} {cls.__name__}" in help_text
        assert f"| {code} | `{cls.__name__}`" in security
    assert "143" in help_text and "| 143 |" in security


# ------------------------------------------------------------------- the one header validator
def _good_file(tmp_path: Path) -> tuple[bytes, dict, bytes]:
    raw = H.safetensors_bytes({k: v for k, v in H.checkpoint(0).items() if v.is_floating_point()}, {"k": "v"})
    (n,) = struct.unpack("<Q", raw[:8])
    return raw, json.loads(raw[8 : 8 + n]), raw[8 + n :]


_EDITS = st.sampled_from(["begin+", "begin-", "end+", "end-", "shape-float", "shape-neg", "shape-bool", "shape-big",
                          "dtype", "drop", "dup", "meta-int", "meta-nested", "extra-field", "swap-dtype"])


@FAST
@given(edits=st.lists(st.tuples(_EDITS, st.integers(0, 10), st.integers(1, 9)), min_size=1, max_size=3),
       trailing=st.integers(-8, 8))
def test_every_reader_applies_the_same_rules_as_safetensors(tmp_path_factory, edits, trailing):
    from safetensors import safe_open

    from sdadapt.formats.files import read_safetensors, read_safetensors_header
    from sdadapt.merge.sources import open_source

    tmp = tmp_path_factory.mktemp("hdr")
    raw, header, data = _good_file(tmp)
    names = [k for k in header if k != "__metadata__"]
    extra = ""
    for edit, index, amount in edits:
        entry = header.get(names[index % len(names)])
        if entry is None:
            continue
        if edit == "begin+":
            entry["data_offsets"][0] += amount
        elif edit == "begin-":
            entry["data_offsets"][0] -= amount
        elif edit == "end+":
            entry["data_offsets"][1] += amount
        elif edit == "end-":
            entry["data_offsets"][1] -= amount
        elif edit == "shape-float":
            entry["shape"] = [float(d) for d in entry["shape"]]
        elif edit == "shape-neg":
            entry["shape"] = [-d for d in entry["shape"]]
        elif edit == "shape-bool":
            entry["shape"] = [True for _ in entry["shape"]]
        elif edit == "shape-big":
            entry["shape"] = [60000 * amount, 60000]
        elif edit == "dtype":
            entry["dtype"] = "F" + str(amount * 100)
        elif edit == "swap-dtype":
            entry["dtype"] = "F16" if entry["dtype"] == "F32" else "F32"
        elif edit == "drop":
            del header[names[index % len(names)]]
        elif edit == "dup":
            extra = json.dumps({names[index % len(names)]: entry})[1:-1]
        elif edit == "meta-int":
            header["__metadata__"] = {"k": amount}
        elif edit == "meta-nested":
            header["__metadata__"] = {"k": {"a": [amount]}}
        elif edit == "extra-field":
            entry["extra"] = [[[amount]]]
    text = json.dumps(header)
    if extra:
        text = text[:-1] + ", " + extra + "}"
    body = data + b"\0" * max(trailing, 0) if trailing >= 0 else data[:trailing]
    path = tmp / "mutated.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + body)
    outcomes = []
    for read in (read_safetensors_header, read_safetensors, lambda p: open_source(p).close()):
        try:
            read(path)
            outcomes.append("ok")
        except WeightFileError as exc:
            assert str(path) in str(exc)
            outcomes.append("refused")
    assert len(set(outcomes)) == 1, outcomes  # one validator: every reader agrees
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                handle.get_tensor(key)
        library = "ok"
    except Exception:  # noqa: BLE001 - the reference implementation's verdict
        library = "refused"
    if outcomes[0] == "ok":
        assert library == "ok"  # never more lenient than the format's own library
    elif library == "ok":  # stricter only where the issue asks: repeated names, extra fields are fine
        assert extra, "refused a file the safetensors library reads"


@FAST
@given(position=st.integers(0, 400), value=st.integers(0, 255), cut=st.integers(0, 64))
def test_corrupted_bytes_give_a_documented_error_or_the_same_tensors(tmp_path_factory, position, value, cut):
    from safetensors.torch import load_file

    from sdadapt.formats import describe_file, read_weights

    tmp = tmp_path_factory.mktemp("flip")
    raw, _, _ = _good_file(tmp)
    blob = bytearray(raw)
    blob[position % len(blob)] = value
    blob = bytes(blob[: len(blob) - cut])
    for name in ("x.safetensors", "x.ckpt"):
        path = tmp / name
        path.write_bytes(blob)
        for read in (read_weights, describe_file):
            try:
                got = read(path)
            except DOCUMENTED:
                continue
            if read is read_weights:
                want = load_file(str(path))
                assert set(got[0]) == set(want) and all(torch.equal(got[0][k], want[k]) for k in want)


@FAST
@given(data=st.binary(min_size=0, max_size=300), prefix=st.sampled_from([b"", b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04"]))
def test_random_pickles_never_run_and_never_crash(tmp_path_factory, data, prefix):
    from sdadapt.formats import describe_file, read_weights

    tmp = tmp_path_factory.mktemp("pkl")
    path = tmp / "random.ckpt"
    path.write_bytes(prefix + data)
    for read in (read_weights, describe_file):
        try:
            read(path)
        except DOCUMENTED:
            pass


def test_pickle_attacks_are_unsafe_in_every_encoding_and_never_run(tmp_path):
    from sdadapt.formats import describe_file, read_weights
    from sdadapt.formats.pickles import scan_pickle_file

    marker = tmp_path / "PWNED"
    for name, path in H.evil_pickles(tmp_path / "evil", marker).items():
        for read in (read_weights, describe_file, scan_pickle_file):
            with pytest.raises(UnsafeFileError, match="tries to run code") as info:
                read(path)
            assert "weights_only=False" not in str(info.value) and str(path) in str(info.value), name
    assert not marker.exists()


def test_zip_bomb_is_refused_unread_and_inspect_reads_only_the_header(tmp_path):
    import tracemalloc

    from sdadapt.formats import describe_file, read_weights

    bomb = H.zip_bomb(tmp_path / "bomb.ckpt", expanded=256 << 20)
    assert bomb.stat().st_size < 2 << 20
    tracemalloc.start()
    with pytest.raises((WeightFileError, ResourceError), match="zip bomb|memory"):
        read_weights(bomb)
    summary = describe_file(bomb)  # header-level: names, shapes, dtypes
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary["tensors"] == 1 and peak < 32 << 20


def test_a_header_of_100k_tensors_is_validated_quickly(tmp_path):
    from sdadapt.formats.files import read_safetensors_header

    header, offset = {}, 0
    for i in range(100_000):
        header[f"lora_unet_block_{i}.alpha"] = {"dtype": "F32", "shape": [], "data_offsets": [offset, offset + 4]}
        offset += 4
    path = tmp_path / "many.safetensors"
    path.write_bytes(H.raw_safetensors(header, b"\0" * offset))
    started = time.process_time()  # this process's CPU time: a busy machine does not stretch it as it does wall time
    got, _ = read_safetensors_header(path)
    # a quadratic check over 100k names would take hours; the linear one ~1 CPU-second
    assert len(got) == 100_000 and time.process_time() - started < 20


def test_a_huge_sparse_file_is_a_resource_error_before_any_allocation(tmp_path):
    from sdadapt.formats import describe_file, load_lora
    from sdadapt.formats.pickles import available_memory

    available = available_memory()
    if available is None:
        pytest.skip("no /proc/meminfo: the memory check has nothing to compare with")
    count = max(available // 4 * 2, 1 << 30)  # twice the available memory, in float32 elements
    raw = H.raw_safetensors({"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [1, count],
                                                               "data_offsets": [0, count * 4]}})
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as handle:
        handle.write(raw)
        try:
            handle.truncate(len(raw) + count * 4)  # a hole: no disk used
        except OSError:
            pytest.skip("this file system cannot hold the sparse file")
    with pytest.raises(ResourceError, match="sparse.safetensors: reading it whole needs"):
        load_lora(path)
    assert describe_file(path)["tensors"] == 1  # header only


# ----------------------------------------------------------------------------- bounded JSON
@pytest.mark.parametrize("depth", [65, 2_000, 200_000])
def test_deep_json_is_an_error_naming_the_file_not_a_recursion_error(tmp_path, depth):
    from sdadapt.formats.diffusers import from_diffusers
    from sdadapt.formats.header import load_json
    from sdadapt.merge.recipe import load_recipe

    text = H.nested_json(depth)
    with pytest.raises(WeightFileError, match="f.json.*nested too deeply"):
        load_json(text, source="f.json")
    recipe = tmp_path / "r.json"
    recipe.write_text('{"format": "sdadapt-merge-recipe", "version": 1, "step": ' + text + "}")
    with pytest.raises(WeightFileError, match="r.json"):
        load_recipe(recipe)
    state = {f"{H.DIFFUSERS_LAYER}.lora_A.weight": torch.ones(2, 8), f"{H.DIFFUSERS_LAYER}.lora_B.weight": torch.ones(8, 2)}
    with pytest.raises(WeightFileError, match="x.safetensors"):
        from_diffusers(state, {"lora_adapter_metadata": text}, source="x.safetensors")


# -------------------------------------------------------------------------------- patterns
_ATOMS = st.sampled_from(["a", "b", ".", "\\.", "[ab]", "[^a]", "\\w", "x"])


@st.composite
def _patterns(draw, depth: int = 0) -> str:
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if depth < 2 and draw(st.booleans()):
            inner = draw(_patterns(depth + 1))
            atom = f"({inner}|{draw(_patterns(depth + 1))})" if draw(st.booleans()) else f"(?:{inner})"
        else:
            atom = draw(_ATOMS)
        parts.append(atom + draw(st.sampled_from(["", "", "*", "+", "?", "{1,2}", "*?"])))
    return ("^" if draw(st.booleans()) else "") + "".join(parts) + ("$" if draw(st.booleans()) else "")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(pattern=_patterns(), text=st.text(alphabet="ab.x_", max_size=12))
def test_safe_patterns_agree_with_python_re(pattern, text):
    from sdadapt.patterns import SafePattern

    compiled = SafePattern(pattern)
    assert compiled.search(text) == bool(re.search(pattern, text)), (pattern, text)
    assert compiled.fullmatch(text) == bool(re.fullmatch(pattern, text)), (pattern, text)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(key=st.sampled_from(["to_q", "attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                            "transformer_blocks.0.attn1", "a.to_q", ".*to_q", "attn[12].to_.", "to_(q|k)",
                            "down_blocks\\.0\\..*"]),
       name=st.sampled_from(["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "to_q", "xto_q",
                             "down_blocks.0.attentions.0.transformer_blocks.0.attn1", "a.to_q", "attn2.to_k"]))
def test_peft_pattern_lookup_is_peft_get_pattern_key(key, name):
    peft_other = pytest.importorskip("peft.utils.other")
    from sdadapt.patterns import peft_pattern_key

    theirs = peft_other.get_pattern_key([key], name)
    assert (peft_pattern_key([key], name) == key) == (theirs == key)


@pytest.mark.parametrize("bomb", H.REGEX_BOMBS)
def test_regex_bombs_run_in_linear_time(bomb):
    from sdadapt.patterns import PatternError, SafePattern, peft_pattern_value

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" * 40
    started = time.perf_counter()
    try:
        compiled = SafePattern(bomb)
        compiled.search(name)
        compiled.fullmatch(name)
        peft_pattern_value({bomb: 4}, name, 1)
    except PatternError:
        pass
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("pattern", H.INVALID_PATTERNS + ("(?=x)", "(a)\\1", "a*+"))
def test_invalid_or_unsupported_patterns_are_input_errors(pattern):
    from sdadapt.merge.recipe import KeyPolicy

    with pytest.raises(InputError, match="discard"):
        KeyPolicy(discard=pattern)


# ------------------------------------------------------------------------ numbers and results
@FAST
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e6, -1e6, 1e38, 100.0])))
def test_numeric_arguments_are_finite_and_in_range(value):
    from sdadapt.loratools.output import per_file
    from sdadapt.merge.operators import check_options
    from sdadapt.merge.recipe import MergeStep

    sensible = math.isfinite(value) and abs(value) <= 100
    for call in (lambda: check_options("weighted-sum", {}, alpha=value),
                 lambda: per_file([value], 1, "strength"),
                 lambda: MergeStep("task-arithmetic", ("a", "b"), weights=(value,)),
                 lambda: check_options("ties", {"density": value})):
        try:
            call()
        except InputError as exc:
            assert not sensible or "density" in str(exc), exc
        else:
            assert sensible


def test_nonfinite_results_are_refused_naming_the_key_and_fp16_overflow_before_the_cast(tmp_path, paths):
    from sdadapt.loratools.bake import merge_loras_into_checkpoint
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep
    with pytest.raises(NonFiniteError, match="attn1.to_q.*--allow-nonfinite"):
        merge_file(MergeStep("weighted-sum", (str(paths["nanbase"]), str(paths["other"])), alpha=0.5),
                   tmp_path / "m.safetensors")
    merge_file(MergeStep("weighted-sum", (str(paths["nanbase"]), str(paths["other"])), alpha=0.5),
               tmp_path / "m.safetensors", allow_nonfinite=True)
    assert H.nonfinite_keys(tmp_path / "m.safetensors")  # passed through, as asked
    with pytest.raises(NonFiniteError, match="max \\|value\\| .* overflows float16"):
        merge_loras_into_checkpoint(paths["base"], [paths["bigalpha"]], tmp_path / "b.safetensors",
                                    dtype=torch.float16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_extract_on_a_broken_base_and_resize_of_mismatched_ranks_are_file_errors(tmp_path, paths):
    from sdadapt.loratools.extract import extract_lora
    from sdadapt.loratools.resize import resize_lora
    with pytest.raises(WeightFileError, match="nanbase.safetensors.*NaN"):
        extract_lora(paths["nanbase"], paths["tuned"], tmp_path / "x.safetensors", device="cpu")
    with pytest.raises(WeightFileError, match="badrank.safetensors: layer .*attn1.to_q.*do not fit"):
        resize_lora(paths["badrank"], tmp_path / "r.safetensors", rank=1)


# ------------------------------------------------------------------------------ outputs and work
def test_merge_checks_the_plan_and_disk_space_before_hashing(tmp_path, monkeypatch, paths):
    from sdadapt.merge import engine
    from sdadapt.merge.recipe import MergeStep
    hashed = []
    monkeypatch.setattr(engine, "sha256_of", lambda p: hashed.append(p) or "0" * 64)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(DiskSpaceError, match="1000 bytes are free"):
        engine.merge_file(MergeStep("weighted-sum", (str(paths["base"]), str(paths["other"])), alpha=0.5),
                          tmp_path / "o.safetensors")
    with pytest.raises(MergeError, match="share no weights"):
        engine.merge_file(MergeStep("weighted-sum", (str(paths["base"]), str(paths["unrelated"])), alpha=0.5),
                          tmp_path / "o.safetensors")
    assert hashed == []


def test_an_output_that_appears_mid_merge_is_not_replaced(tmp_path, paths):
    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep
    out = tmp_path / "o.safetensors"

    def sneak_in(done: int, total: int) -> None:
        if done == 1:
            out.write_bytes(b"someone else's file")

    with pytest.raises(OutputExistsError, match="appeared while"):
        merge_file(MergeStep("weighted-sum", (str(paths["base"]), str(paths["other"])), alpha=0.5), out,
                   progress=sneak_in)
    assert out.read_bytes() == b"someone else's file" and H.leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_of_a_normal_file(tmp_path, mask):
    from sdadapt.formats.files import write_safetensors

    old = os.umask(mask)
    try:
        write_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o666 & ~mask


def test_stale_temporaries_of_a_killed_run_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    from sdadapt.formats.files import write_safetensors

    out = tmp_path / "o.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".o.safetensors.{dead.pid}-abc123xy.tmp"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".o.safetensors.{os.getpid()}-livefile.tmp"
    live.write_bytes(b"y")
    with open(live, "rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # a concurrent writer holds its lock
        write_safetensors(out, {"w": torch.ones(2)}, overwrite=False)
        assert not stale.exists() and live.exists()
    live.unlink()
    assert H.leftovers(tmp_path) == []


def _big_inputs(folder: Path, count: int = 48, side: int = 384) -> list[str]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        state = {f"{H.U}input_blocks.{i}.1.proj_in.weight": torch.randn(side, side, generator=g) for i in range(count)}
        paths.append(str(folder / f"m{seed}.safetensors"))
        save_file(state, paths[-1])
    return paths


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_merge_removes_the_partial_output_and_exits_with_one_line(tmp_path, sig, code):
    a, b = _big_inputs(tmp_path / "in")
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # the slow operator and a 1-thread torch keep the merge running for a few seconds after the temp file appears
    proc = subprocess.Popen([sys.executable, "-m", "sdadapt", "merge", "slerp", a, b, "--alpha", "0.3", "-o", str(out),
                             "--no-recipe", "--compute-dtype", "fp64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**env, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not H.leftovers(out.parent):
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip(f"the merge finished before the signal could be sent (exit {proc.returncode})")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: interrupted") and "Traceback" not in stderr, stderr
    assert H.leftovers(out.parent) == [] and not out.exists()
