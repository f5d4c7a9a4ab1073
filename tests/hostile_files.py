"""Hostile and broken inputs for the hardening tests (issue 17) and ``benchmarks/fuzz_cli.py``.

Each builder writes files into a folder and returns paths; :func:`cli_cases` turns them into
command lines with what a correct run must look like. Nothing here needs diffusers/transformers:
the checkpoints are tiny hand-made SD1 LDM files whose layers ``merge-lora``/``extract-lora`` find.

The pickle "attacks" only ever call :func:`os.system` with a command that creates a marker file,
so a test can tell whether anything ran.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder.layers.0."
#: LDM key -> kohya LoRA layer of the tiny checkpoint
LAYERS = {
    U + "input_blocks.1.1.proj_in.weight": ("lora_unet_down_blocks_0_attentions_0_proj_in", (8, 8, 1, 1)),
    U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (8, 8)),
    U + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight": (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", (8, 8)),
    TE + "self_attn.q_proj.weight": ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (16, 16)),
    TE + "mlp.fc1.weight": ("lora_te_text_model_encoder_layers_0_mlp_fc1", (32, 16)),
}
DIFFUSERS_LAYER = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
#: a regular expression that makes a backtracking engine take exponential time on a ~30-character name
REGEX_BOMBS = ("(.*.*.*)*#", "(a|a)*$b", "(x+x+)+y", "((.*)*)*[#]", "(.*a){20}", "(\\w+\\s?)*$!")
INVALID_PATTERNS = ("(", "[a-", "*x", "a{2,1}", "(?P<1>x)", "\\")


def checkpoint(seed: int, *, dtype: torch.dtype = torch.float32, wide: bool = False) -> dict[str, torch.Tensor]:
    """A tiny SD1 LDM checkpoint: five LoRA-able layers, a conv, a bias, position ids."""
    g = torch.Generator().manual_seed(seed)
    out = {key: (torch.randn(shape, generator=g) * 0.1).to(dtype) for key, (_, shape) in LAYERS.items()}
    out[U + "input_blocks.1.0.conv1.weight"] = (torch.randn(8, 8, 3, 3, generator=g) * 0.1).to(dtype)
    out[U + "input_blocks.0.0.weight"] = (torch.randn(8, 9 if wide else 4, 3, 3, generator=g) * 0.1).to(dtype)
    out[U + "input_blocks.0.0.bias"] = torch.zeros(8, dtype=dtype)
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(8).reshape(1, 8)
    return out


def kohya_lora(seed: int, *, alpha: float = 2.0, rank: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A kohya LoRA for :func:`checkpoint` (every layer)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in LAYERS.values():
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        down = torch.randn(rank, *shape[1:], generator=g) * 0.1
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        out[f"{name}.lora_down.weight"] = down.to(dtype)
        out[f"{name}.lora_up.weight"] = up.to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    from safetensors.torch import save

    buffer.write(save(tensors, metadata=metadata))
    return buffer.getvalue()


def raw_safetensors(header: object, data: bytes = b"", *, header_bytes: bytes | None = None, length: int | None = None) -> bytes:
    """A file with an arbitrary (possibly hostile) header and data section."""
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


# --------------------------------------------------------------------------------- pickles
class _System:
    """Pickles as ``os.system(command)`` (posix.system): the classic attack."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


def marker_command(marker: Path) -> str:
    return f"touch {marker}"


def evil_pickles(folder: Path, marker: Path) -> dict[str, Path]:
    """Pickle files that would run ``touch MARKER`` (or eval) if fully unpickled, in every encoding."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"w": torch.ones(2), "x": _System(marker_command(marker))}
    files = {}
    for protocol in (2, 4, 5):
        path = folder / f"raw_p{protocol}.pt"
        path.write_bytes(pickle.dumps({"x": _System(marker_command(marker))}, protocol=protocol))
        files[f"raw-protocol-{protocol}"] = path
    files["zip"] = folder / "zip_system.ckpt"
    torch.save(payload, files["zip"])
    files["eval"] = folder / "eval.pt"
    torch.save({"x": _Eval(f"__import__('os').system('{marker_command(marker)}')")}, files["eval"])
    files["nested"] = folder / "nested.bin"
    torch.save({"state_dict": {"a": {"b": [1, _System(marker_command(marker))]}}}, files["nested"])
    files["safetensors-name"] = folder / "looks_safe.safetensors"
    torch.save(payload, files["safetensors-name"])
    return files


def zip_bomb(path: Path, *, expanded: int = 160 << 20) -> Path:
    """A ``torch.save``-shaped archive whose deflated storage expands to ``expanded`` bytes."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(path, "w") as out:
        for info in original.infolist():
            data = original.read(info)
            if info.filename.endswith("data/0"):
                out.writestr(info.filename, b"\0" * expanded, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            else:
                out.writestr(info.filename, data)
    return path


def diffusers_folder_with_evil_bin(root: Path, marker: Path) -> Path:
    """A diffusers pipeline folder layout whose UNet weights are a code-running ``.bin``."""
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / part).mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "unet" / "config.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps({"x": _System(marker_command(marker))}, protocol=4))
    return root


# ----------------------------------------------------------------------------- header mutations
def header_mutations(good: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Named safetensors files that break one rule of the format each."""
    f32 = {k: v.float().contiguous() for k, v in good.items() if v.is_floating_point()}
    raw = safetensors_bytes(f32, {"k": "v"})
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    names = [k for k in header if k != "__metadata__"]
    first, second = names[0], names[1]

    def variant(change) -> bytes:
        h = json.loads(json.dumps(header))
        change(h)
        return raw_safetensors(h, data)

    out: dict[str, bytes] = {}
    cut = header[second]["data_offsets"][0]

    def shifted(by: int) -> bytes:  # the second tensor and every later one moved by ``by`` bytes
        h = json.loads(json.dumps(header))
        for name in names:
            if h[name]["data_offsets"][0] >= cut:
                h[name]["data_offsets"] = [h[name]["data_offsets"][0] + by, h[name]["data_offsets"][1] + by]
        body = data[:cut] + b"\0" * by + data[cut:] if by > 0 else data[: cut + by] + data[cut:]
        return raw_safetensors(h, body)

    out["gap"] = shifted(4)
    out["overlap"] = shifted(-4)
    out["float-shape"] = variant(lambda h: h[first].__setitem__("shape", [float(d) for d in h[first]["shape"]]))
    out["bool-shape"] = variant(lambda h: h[first].__setitem__("shape", [True] * len(h[first]["shape"])))
    out["negative-shape"] = variant(lambda h: h[first].__setitem__("shape", [-1] + h[first]["shape"][1:]))
    out["string-shape"] = variant(lambda h: h[first].__setitem__("shape", "big"))
    out["unknown-dtype"] = variant(lambda h: h[first].__setitem__("dtype", "F128"))
    out["huge-shape"] = raw_safetensors({"w": {"dtype": "F32", "shape": [60000, 60000], "data_offsets": [0, 16]}}, b"\0" * 16)
    out["1e30-elements"] = raw_safetensors({"w": {"dtype": "F32", "shape": [10**15, 10**15], "data_offsets": [0, 16]}},
                                           b"\0" * 16)
    out["trailing-bytes"] = raw + b"\0" * 24
    out["truncated"] = raw[:-7]
    out["header-longer-than-file"] = struct.pack("<Q", len(raw) * 4) + raw[8:]
    out["100MiB-header"] = struct.pack("<Q", 100 * 2**20 + 1) + b"{" + b" " * 64
    text = raw[8 : 8 + n].decode()
    out["non-utf8-metadata"] = raw_safetensors(None, data, header_bytes=text.replace('"v"', '"\xff\xfe"').encode("latin1"))
    plain = {k: v for k, v in header.items() if k != "__metadata__"}
    body = json.dumps(plain)
    dup = body[:-1] + "," + body[1:]  # every tensor entry twice
    out["duplicate-names"] = raw_safetensors(None, data, header_bytes=dup.encode())
    out["metadata-not-strings"] = variant(lambda h: h.__setitem__("__metadata__", {"k": 1}))
    out["nested-header"] = raw_safetensors(None, b"", header_bytes=b"[" * 200_000 + b"]" * 200_000)
    out["nested-metadata-object"] = raw_safetensors(None, b"", header_bytes=b'{"__metadata__":' + b'{"a":' * 50_000 + b"1"
                                                    + b"}" * 50_001)
    out["header-is-a-list"] = raw_safetensors([1, 2, 3])
    out["offsets-past-end"] = variant(lambda h: h[names[-1]]["data_offsets"].__setitem__(1, len(data) + 1000))
    out["empty-header"] = raw_safetensors({})
    out["nul-bytes"] = raw_safetensors(None, b"", header_bytes=b"{\0\0\0}")
    return out


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# ------------------------------------------------------------------------------------ CLI cases
@dataclass
class Case:
    """One command line and what a correct run looks like.

    Attributes:
        argv: ``python -m sdadapt`` arguments.
        codes: acceptable exit codes (0 only when the run may succeed).
        inputs: files that must be byte-identical afterwards.
        out: the output file (must be finite and complete if it exists).
        allow_nonfinite: the run passes ``--allow-nonfinite`` (NaN from the inputs may be written).
    """

    name: str
    argv: list[str]
    codes: tuple[int, ...]
    inputs: list[Path] = field(default_factory=list)
    out: Path | None = None
    allow_nonfinite: bool = False


def build_inputs(root: Path) -> dict[str, Path]:
    """Every file the cases use, written under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}

    def put(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        path = root / name
        save_file(tensors, str(path), metadata=metadata)
        p[name.split(".")[0]] = path
        return path

    put("base.safetensors", checkpoint(0), {"format": "pt"})
    put("tuned.safetensors", {k: (v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v)
                              for k, v in checkpoint(0).items()}, {"format": "pt"})
    put("other.safetensors", checkpoint(1), {"format": "pt"})
    put("base16.safetensors", checkpoint(0, dtype=torch.float16), {"format": "pt"})
    nan_base = checkpoint(0)
    nan_base[U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"][0, 0] = float("nan")
    put("nanbase.safetensors", nan_base, {"format": "pt"})
    put("wide.safetensors", checkpoint(2, wide=True), {"format": "pt"})
    put("unrelated.safetensors", {"foo.weight": torch.ones(3, 3), "bar.bias": torch.zeros(3)})
    put("empty.safetensors", {})
    put("lora.safetensors", kohya_lora(0))
    put("lora2.safetensors", kohya_lora(1))
    put("bigalpha.safetensors", kohya_lora(2, alpha=1e38))
    bad_rank = kohya_lora(3)
    bad_rank["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.randn(8, 5)
    put("badrank.safetensors", bad_rank)
    nan_lora = kohya_lora(4)
    nan_lora["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"][0, 0] = float("inf")
    put("nanlora.safetensors", nan_lora)
    escape = {"lora_unet_down_blocks_0_attentions_0_proj_in\x1b]0;pwned\x07.lora_down.weight": torch.zeros(2, 8, 1, 1),
              "lora_unet_down_blocks_0_attentions_0_proj_in\x1b]0;pwned\x07.lora_up.weight": torch.zeros(8, 2, 1, 1)}
    put("escapekeys.safetensors", escape)
    put("escapemeta.safetensors", kohya_lora(5), {"title": "\x1b[2J\x1b]52;c;cHduZWQ=\x07owned", "bell": "\x07" * 5})
    # LoRA tensors no adapter is built from (one layer changed), and embeddings of vectors no embedding has
    first = next(iter(LAYERS.values()))[0]
    for name, key, value in (("int8down", "lora_down.weight", lambda v: v.to(torch.int8)),
                             ("scalardown", "lora_down.weight", lambda v: torch.tensor(1.0)),
                             ("down3d", "lora_down.weight", lambda v: v.reshape(*v.shape[:2], -1, 1)[..., 0, :]),
                             ("alphavector", "alpha", lambda v: torch.tensor([2.0, 3.0])),
                             ("intdora", "dora_scale", lambda v: torch.ones(v.shape[0] if v is not None else 8, 1,
                                                                             dtype=torch.int64))):
        state = kohya_lora(7)
        state[f"{first}.{key}"] = value(state.get(f"{first}.{key}"))
        put(f"{name}.safetensors", state)
    sparse = kohya_lora(7)
    sparse[f"{first}.lora_down.weight"] = sparse[f"{first}.lora_down.weight"].to_sparse()
    torch.save(sparse, root / "sparselora.pt")
    p["sparselora"] = root / "sparselora.pt"
    put("fp8emb.safetensors", {"emb_params": torch.randn(2, 16).to(torch.float8_e4m3fn)})
    put("boolemb.safetensors", {"emb_params": torch.ones(2, 16, dtype=torch.bool)})
    put("emptyemb.safetensors", {"emb_params": torch.ones(0, 16)})
    g = torch.Generator().manual_seed(6)
    diffusers_state = {f"{DIFFUSERS_LAYER}.lora_A.weight": torch.randn(2, 8, generator=g),
                       f"{DIFFUSERS_LAYER}.lora_B.weight": torch.randn(8, 2, generator=g)}
    for i, bomb in enumerate(REGEX_BOMBS[:3]):
        config = {"unet.r": 2, "unet.lora_alpha": 2, "unet.alpha_pattern": {bomb: 4},
                  "unet.rank_pattern": {bomb: 4}}
        put(f"bomb{i}.safetensors", diffusers_state, {"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    put("badpattern.safetensors", diffusers_state,
        {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.alpha_pattern": {"(": 3}})})
    put("deepmeta.safetensors", diffusers_state, {"format": "pt", "lora_adapter_metadata": nested_json(100_000)})
    put("nonnumeric.safetensors", diffusers_state,
        {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": "lots"})})
    peft = root / "peft_bomb"
    peft.mkdir(exist_ok=True)
    save_file({f"base_model.model.{DIFFUSERS_LAYER[5:]}.lora_A.weight": torch.randn(2, 8),
               f"base_model.model.{DIFFUSERS_LAYER[5:]}.lora_B.weight": torch.randn(8, 2)},
              str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                          "alpha_pattern": {REGEX_BOMBS[0]: 1}}))
    p["peft_bomb"] = peft
    peft_deep = root / "peft_deep"
    peft_deep.mkdir(exist_ok=True)
    (peft_deep / "adapter_model.safetensors").write_bytes((peft / "adapter_model.safetensors").read_bytes())
    (peft_deep / "adapter_config.json").write_text(nested_json(100_000))
    p["peft_deep"] = peft_deep
    for name, blob in header_mutations(checkpoint(0)).items():
        path = root / f"hdr_{name}.safetensors"
        path.write_bytes(blob)
        p[f"hdr_{name}"] = path
    marker = root / "PWNED"
    p["marker"] = marker
    for name, path in evil_pickles(root / "evil", marker).items():
        p[f"evil_{name}"] = path
    p["zipbomb"] = zip_bomb(root / "bomb.ckpt")
    p["evil_folder"] = diffusers_folder_with_evil_bin(root / "evil_pipeline", marker)
    torch.save({"state_dict": checkpoint(0)}, root / "legacy.ckpt")
    p["legacy"] = root / "legacy.ckpt"
    return p


def recipes(root: Path, p: dict[str, Path]) -> dict[str, Path]:
    """Hostile merge recipes (JSON files) naming the inputs of :func:`build_inputs`."""
    step = {"operator": "weighted-sum", "inputs": [{"path": str(p["base"])}, {"path": str(p["other"])}], "alpha": 0.5}

    def recipe(body: object) -> dict:
        return {"format": "sdadapt-merge-recipe", "version": 1, "step": body}

    out: dict[str, object] = {
        "bomb-discard": recipe({**step, "policy": {"discard": REGEX_BOMBS[0]}}),
        "invalid-discard": recipe({**step, "policy": {"discard": "("}}),
        "alpha-string": recipe({**step, "alpha": "half"}),
        "alpha-nan": recipe({**step, "alpha": float("nan")}),
        "alpha-huge": recipe({**step, "alpha": 1e6}),
        "inputs-string": recipe({**step, "inputs": "abc"}),
        "input-number": recipe({**step, "inputs": [{"path": 5}, {"path": str(p["other"])}]}),
        "components-number": recipe({**step, "policy": {"components": 5}}),
        "weights-nan": recipe({"operator": "task-arithmetic", "inputs": step["inputs"], "weights": ["x"]}),
        "version-string": {"format": "sdadapt-merge-recipe", "version": "one", "step": step},
        "unknown-operator": recipe({**step, "operator": "explode"}),
        "missing-step": {"format": "sdadapt-merge-recipe", "version": 1},
        "seed-negative": recipe({"operator": "dare", "inputs": step["inputs"], "seed": -5}),
        "sha-bad": recipe({**step, "inputs": [{"path": str(p["base"]), "sha256": 12}, {"path": str(p["other"])}]}),
    }
    deep: dict = dict(step)
    for _ in range(60):
        deep = {"operator": "weighted-sum", "inputs": [{"step": deep}, {"path": str(p["other"])}], "alpha": 0.5}
    out["deep-steps"] = recipe(deep)
    files: dict[str, Path] = {}
    for name, body in out.items():
        path = root / f"recipe_{name}.json"
        path.write_text(json.dumps(body, allow_nan=True))
        files[name] = path
    nested = root / "recipe_nested-json.json"
    nested.write_text('{"format": "sdadapt-merge-recipe", "version": 1, "step": ' + nested_json(200_000) + "}")
    files["nested-json"] = nested
    return files


ERROR_CODES = (2, 3, 4, 5, 6, 7, 8, 9, 10)


def cli_cases(root: Path, p: dict[str, Path] | None = None) -> list[Case]:
    """The command lines the fuzz suite and ``benchmarks/fuzz_cli.py`` run (inputs under ``root/in``,
    built unless ``p`` — :func:`build_inputs` of ``root / "in"`` — is given)."""
    p = p if p is not None else build_inputs(root / "in")
    r = recipes(root / "in", p)
    out_dir = root / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    counter = iter(range(10**6))

    def add(name: str, argv: list, codes: tuple[int, ...], inputs: list[Path], *, out: bool = True, allow: bool = False) -> None:
        target = out_dir / f"o{next(counter)}.safetensors"
        full = [str(a) for a in argv] + (["-o", str(target)] if out else [])
        cases.append(Case(name, full, codes, [i for i in inputs if i.is_file()], target if out else None, allow))

    # every reader on every broken header
    for key in sorted(k for k in p if k.startswith("hdr_")):
        valid = key == "hdr_empty-header"  # a file of no tensors is a valid safetensors file
        add(f"inspect {key}", ["inspect", p[key]], (0,) if valid else ERROR_CODES, [p[key]], out=False)
        add(f"merge {key}", ["merge", "weighted-sum", p["base"], p[key], "--alpha", "0.5", "-q"], ERROR_CODES,
            [p["base"], p[key]])
        add(f"merge-lora {key}", ["merge-lora", p["base"], p[key], "-q"], ERROR_CODES, [p["base"], p[key]])
        add(f"extract-lora {key}", ["extract-lora", p[key], p["tuned"], "-q"], ERROR_CODES, [p[key], p["tuned"]])
        add(f"resize-lora {key}", ["resize-lora", p[key], "--rank", "1", "-q"], ERROR_CODES, [p[key]])
    # pickles that would run code: refused by every command, nothing runs
    for key in sorted(k for k in p if k.startswith("evil_") and k != "evil_folder"):
        add(f"inspect {key}", ["inspect", p[key]], (4,), [p[key]], out=False)
        add(f"merge {key}", ["merge", "weighted-sum", p["base"], p[key], "--alpha", "0.5", "-q"], (4,), [p[key]])
        add(f"merge-lora {key}", ["merge-lora", p["base"], p[key], "-q"], (4,), [p[key]])
        add(f"combine {key}", ["combine-loras", p["lora"], p[key], "-q"], (4,), [p[key]])
    add("inspect zip bomb", ["inspect", p["zipbomb"]], (0,) + ERROR_CODES, [p["zipbomb"]], out=False)  # header only
    add("merge zip bomb", ["merge", "weighted-sum", p["legacy"], p["zipbomb"], "--alpha", "0.5", "-q"], ERROR_CODES,
        [p["zipbomb"]])
    # regex bombs and invalid patterns from files and from the user
    for key in ("bomb0", "bomb1", "bomb2", "badpattern", "deepmeta", "nonnumeric"):
        add(f"inspect {key}", ["inspect", p[key]], (0,) + ERROR_CODES, [p[key]], out=False)
        add(f"merge-lora {key}", ["merge-lora", p["base"], p[key], "-q", "--skip-unmatched"], (0,) + ERROR_CODES,
            [p[key]])
        add(f"resize-lora {key}", ["resize-lora", p[key], "--rank", "1", "-q"], (0,) + ERROR_CODES, [p[key]])
    for key in ("peft_bomb", "peft_deep"):
        add(f"inspect {key}", ["inspect", p[key]], (0,) + ERROR_CODES, [], out=False)
    for pattern in REGEX_BOMBS:
        add(f"merge --discard {pattern}", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5",
                                           "--discard", pattern, "-q"], (0, 2), [p["base"], p["other"]])
    for pattern in INVALID_PATTERNS:
        add(f"merge --discard {pattern!r}", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5",
                                             "--discard", pattern, "-q"], (2,), [p["base"]])
    for name, path in sorted(r.items()):
        add(f"merge --recipe {name}", ["merge", "--recipe", path, "-q"], (0,) + ERROR_CODES, [path, p["base"]])
    # non-finite arguments and results
    for alpha in ("nan", "inf", "-inf", "1e6", "1e38"):
        add(f"merge --alpha {alpha}", ["merge", "weighted-sum", p["base"], p["other"], f"--alpha={alpha}", "-q"], (2,),
            [p["base"]])
        add(f"merge-lora --scale {alpha}", ["merge-lora", p["base"], p["lora"], f"--scale={alpha}", "-q"], (2,),
            [p["lora"]])
    add("merge-lora --scale 100 fp16", ["merge-lora", p["base16"], p["lora"], "--scale", "100", "--dtype", "fp16", "-q"],
        (0, 5), [p["lora"]])
    add("merge-lora alpha 1e38", ["merge-lora", p["base"], p["bigalpha"], "-q"], (0, 5), [p["bigalpha"]])
    add("merge-lora alpha 1e38 fp16", ["merge-lora", p["base"], p["bigalpha"], "--dtype", "fp16", "-q"], (5,),
        [p["bigalpha"]])
    add("merge-lora NaN base", ["merge-lora", p["nanbase"], p["lora"], "-q"], (5,), [p["nanbase"]])
    add("merge-lora NaN base allowed", ["merge-lora", p["nanbase"], p["lora"], "-q", "--allow-nonfinite"], (0,),
        [p["nanbase"]], allow=True)
    add("merge-lora NaN lora", ["merge-lora", p["base"], p["nanlora"], "-q"], (3,), [p["nanlora"]])
    add("merge NaN base", ["merge", "weighted-sum", p["nanbase"], p["other"], "--alpha", "0.5", "-q"], (5,),
        [p["nanbase"]])
    add("merge NaN base allowed", ["merge", "weighted-sum", p["nanbase"], p["other"], "--alpha", "0.5", "-q",
                                   "--allow-nonfinite"], (0,), [p["nanbase"]], allow=True)
    add("merge add-difference 100 fp16", ["merge", "add-difference", p["base"], p["other"], p["tuned"], "--alpha", "100",
                                          "--dtype", "fp16", "-q"], (0, 5), [p["base"]])
    add("extract-lora NaN base", ["extract-lora", p["nanbase"], p["tuned"], "-q"], (3, 5), [p["nanbase"]])
    add("extract-lora --alpha nan", ["extract-lora", p["base"], p["tuned"], "--alpha", "nan", "-q"], (2,), [p["base"]])
    add("extract-lora --rank 0", ["extract-lora", p["base"], p["tuned"], "--rank", "0", "-q"], (2,), [p["base"]])
    add("extract-lora --min-diff inf", ["extract-lora", p["base"], p["tuned"], "--min-diff", "inf", "-q"], (2,), [p["base"]])
    add("extract-lora --clamp nan", ["extract-lora", p["base"], p["tuned"], "--clamp-quantile", "nan", "-q"], (2,),
        [p["base"]])
    add("resize-lora bad rank tensors", ["resize-lora", p["badrank"], "--rank", "1", "-q"], (3,), [p["badrank"]])
    add("resize-lora --dynamic-param nan", ["resize-lora", p["lora"], "--dynamic-method", "sv_fro", "--dynamic-param",
                                            "nan", "-q"], (2,), [p["lora"]])
    add("combine --scale 1e6", ["combine-loras", p["lora"], p["lora2"], "--scale=1e6", "-q"], (2,), [p["lora"]])
    add("combine bigalpha", ["combine-loras", p["lora"], p["bigalpha"], "-q"], (0, 5), [p["bigalpha"]])
    # malformed LoRA tensors: a file error (3) from every command that builds adapters or deltas from them
    for key in ("int8down", "scalardown", "down3d", "alphavector", "intdora", "sparselora"):
        add(f"merge-lora {key}", ["merge-lora", p["base"], p[key], "-q"], (3,), [p[key]])
        add(f"convert {key} diffusers", ["convert", p[key], "--to", "diffusers", "-q"], (3,), [p[key]])
        add(f"convert {key} comfy", ["convert", p[key], "--to", "comfy", "-q"], (3,), [p[key]])
        add(f"cut-dylora {key}", ["cut-dylora", p[key], "--rank", "1", "-q"], (2, 3), [p[key]])
        add(f"resize-lora {key}", ["resize-lora", p[key], "--rank", "1", "-q"], (3,), [p[key]])
    add("convert fp8 embedding", ["convert", p["fp8emb"], "--to", "diffusers", "-q"], (0,), [p["fp8emb"]])
    for key in ("boolemb", "emptyemb"):
        add(f"convert {key}", ["convert", p[key], "--to", "a1111", "-q", "-o", root / "out" / f"{key}.pt"], (3,),
            [p[key]], out=False)
    add("cut-dylora output is input", ["cut-dylora", p["lora2"], "--rank", "1", "-q", "-o", p["lora2"], "--overwrite"],
        (2,), [p["lora2"]], out=False)
    add("resize-lora name too long", ["resize-lora", p["lora"], "--rank", "1", "-q", "-o",
                                      root / "out" / ("n" * 300 + ".safetensors")], (7,), [p["lora"]], out=False)
    # devices
    for device in ("cuda", "bogus", "cuda:99", "meta"):
        add(f"merge --device {device}", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5", "--device",
                                         device, "-q"], (0, 2) if device == "cuda" and torch.cuda.is_available() else (2,),
            [p["base"]])
        add(f"extract-lora --device {device}", ["extract-lora", p["base"], p["tuned"], "--device", device, "-q"],
            (0, 2) if device == "cuda" and torch.cuda.is_available() else (2,), [p["base"]])
    # files that are not files, unrelated and empty inputs, wrong models
    for name, path in (("folder", root / "in" / "evil"), ("dev-zero", Path("/dev/zero")), ("missing", root / "nope.safetensors")):
        add(f"inspect {name}", ["inspect", path], (3,), [], out=False)
        add(f"merge {name}", ["merge", "weighted-sum", p["base"], path, "--alpha", "0.5", "-q"], (3,), [p["base"]])
        add(f"merge-lora {name}", ["merge-lora", path, p["lora"], "-q"], (3,), [p["lora"]])
    add("merge unrelated", ["merge", "weighted-sum", p["base"], p["unrelated"], "--alpha", "0.5", "-q"], (6,),
        [p["base"], p["unrelated"]])
    add("merge empty", ["merge", "weighted-sum", p["empty"], p["base"], "--alpha", "0.5", "-q"], (6,), [p["empty"]])
    add("merge wide second", ["merge", "weighted-sum", p["base"], p["wide"], "--alpha", "0.5", "-q"], (6,), [p["wide"]])
    add("merge-lora on unrelated", ["merge-lora", p["unrelated"], p["lora"], "-q"], (3,), [p["unrelated"]])
    add("extract-lora wide", ["extract-lora", p["base"], p["wide"], "-q"], (0, 3), [p["wide"]])
    # terminal escapes in what gets printed
    add("inspect escape metadata", ["inspect", p["escapemeta"]], (0,), [p["escapemeta"]], out=False)
    add("merge-lora escape keys", ["merge-lora", p["base"], p["escapekeys"], "-q"], ERROR_CODES, [p["escapekeys"]])
    add("merge-lora escape keys skip", ["merge-lora", p["base"], p["escapekeys"], "-q", "--skip-unmatched"],
        (0,) + ERROR_CODES, [p["escapekeys"]])
    # outputs: same as input, existing, missing folder, read-only folder
    add("merge output is input", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5", "-q", "-o", p["other"],
                                  "--overwrite"], (2,), [p["base"], p["other"]], out=False)
    add("merge out folder is a file", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5", "-q", "-o",
                                       Path(p["other"]) / "x.safetensors"], (7,), [p["base"]], out=False)
    add("merge missing out folder", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5", "-q", "-o",
                                     root / "nowhere" / "x.safetensors"], (0,), [p["base"]], out=False)  # (made)
    readonly = root / "readonly"
    readonly.mkdir(exist_ok=True)
    add("merge read-only folder", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5", "-q", "-o",
                                   readonly / "x.safetensors"], (0, 7), [p["base"]], out=False)
    # the sound runs, as a control
    add("merge ok", ["merge", "weighted-sum", p["base"], p["other"], "--alpha", "0.5", "-q"], (0,), [p["base"], p["other"]])
    add("merge-lora ok", ["merge-lora", p["base"], p["lora"], "-q"], (0,), [p["base"], p["lora"]])
    add("extract-lora ok", ["extract-lora", p["base"], p["tuned"], "--rank", "2", "-q"], (0,), [p["base"], p["tuned"]])
    add("inspect legacy", ["inspect", p["legacy"]], (0,), [p["legacy"]], out=False)
    return cases


def train_case(root: Path, p: dict[str, Path]) -> Case:
    """``train lora --model FOLDER`` on a pipeline folder whose ``.bin`` would run code (needs images)."""
    from sdadapt.images import write_png

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_png(images / f"img{i}.png", torch.zeros(3, 32, 32))
        (images / f"img{i}.txt").write_text(f"a photo {i}")
    return Case("train evil .bin", ["train", "lora", "--model", str(p["evil_folder"]), "--images", str(images),
                                    "--steps", "1", "-o", str(root / "out" / "t.safetensors")], (4,), [])


# ------------------------------------------------------------------------------- running, judging
@dataclass
class Outcome:
    """What one run did: exit code (None: killed after the time limit), output, seconds."""

    code: int | None
    stdout: str
    stderr: str
    seconds: float


def run_forked(argv: list[str], *, timeout: float) -> Outcome:
    """Run ``sdadapt.cli.main(argv)`` in a forked child (its own stdout/stderr), killed after ``timeout``
    seconds — a hang in C code (a backtracking regex) cannot stall the caller."""
    import select
    import signal
    import time

    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 70
        try:
            os.close(read_fd)
            import contextlib

            out, err = io.StringIO(), io.StringIO()
            from sdadapt.cli import main

            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 2
                except BaseException:  # noqa: BLE001 - a traceback is exactly what the suite looks for
                    import traceback

                    err.write(traceback.format_exc())
                    code = 99
            payload = json.dumps({"code": code, "stdout": out.getvalue()[-20000:], "stderr": err.getvalue()[-20000:]})
            with os.fdopen(write_fd, "w") as handle:
                handle.write(payload)
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = started + timeout
    killed = False
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        ready, _, _ = select.select([read_fd], [], [], left)
        if ready:
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    seconds = time.perf_counter() - started
    if killed:
        return Outcome(None, "", "", seconds)
    try:
        data = json.loads(b"".join(chunks).decode() or "{}")
    except ValueError:
        data = {}
    return Outcome(data.get("code", 98), data.get("stdout", ""), data.get("stderr", ""), seconds)


def nonfinite_keys(path: Path) -> list[str]:
    """Float tensors of a written file that hold NaN/inf (the file read with safetensors itself)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v.float()).all())]


def leftovers(folder: Path) -> list[str]:
    """Temporary files of ours (``.NAME.*.tmp``) in ``folder``."""
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")) if folder.is_dir() else []


def judge(case: Case, outcome: Outcome, before: dict[Path, str], marker: Path | None = None) -> dict[str, str]:
    """Every way the run went wrong, by kind: ``hang``, ``traceback``, ``not-one-line``, ``escape``,
    ``advice``, ``code``, ``nonfinite``, ``leftover``, ``input-changed``, ``code-ran``, ``internal``."""
    problems: dict[str, str] = {}
    if outcome.code is None:
        return {"hang": f"over the time limit ({outcome.seconds:.0f} s)"}
    err = outcome.stderr
    if "Traceback (most recent call last)" in err or outcome.code in (98, 99):
        problems["traceback"] = err[-600:]
    if outcome.code == 1:
        problems["internal"] = err[-300:]
    if outcome.code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        if not lines or not lines[-1].startswith("error: ") or sum(line.startswith("error: ") for line in lines) != 1:
            problems["not-one-line"] = err[-300:]
    if any(c in outcome.stdout + err for c in ("\x1b", "\x07", "\x9b")):
        problems["escape"] = repr((outcome.stdout + err)[:200])
    low = (outcome.stdout + err).lower()
    if "weights_only=false" in low.replace(" ", "") or "weights_only` set to `false" in low:
        problems["advice"] = err[-300:]
    if outcome.code not in case.codes:
        problems["code"] = f"exit {outcome.code}, expected one of {case.codes}: {err.strip()[-300:]}"
    if case.out is not None:
        if case.out.exists():
            if outcome.code != 0:
                problems["leftover"] = f"{case.out} written by a failed run"
            elif not case.allow_nonfinite:
                try:
                    bad = nonfinite_keys(case.out)
                except Exception as exc:  # noqa: BLE001
                    bad = [f"unreadable output: {exc}"]
                if bad:
                    problems["nonfinite"] = f"{case.out.name}: {bad[:3]}"
        # this run's temporaries only (runs in parallel share the folder)
        stray = [n for n in leftovers(case.out.parent) if n.startswith(f".{case.out.name}.")]
        if stray:
            problems["leftover"] = f"temporary files left: {stray[:3]}"
    for path, digest in before.items():
        if sha256(path) != digest:
            problems["input-changed"] = str(path)
    if marker is not None and marker.exists():
        problems["code-ran"] = "a pickle payload ran"
    return problems
