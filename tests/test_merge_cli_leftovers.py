"""Merge / inspect / convert leftovers: per-block ``--alpha`` (supermerger's MBW list, the same path as
``--beta`` and the recipe's ``block_weights``), ``inspect --json-lines``, one ``convert`` per OUT (lock),
and hints for A1111's ``config_source`` / ``bake_in_vae`` recipe fields.

References: supermerger ``scripts/mergers/mergers.py`` @ 0b1c491 (``smerge``: the weights text is
``BASE,IN00,...`` — 26 values SD1, 20 SDXL — and ``base_alpha`` is its first value).
"""

from __future__ import annotations

import json
import os
import shlex

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdadapt.cli import main
from sdadapt.cli.merge import per_block_fields
from sdadapt.errors import InputError
from sdadapt.jobs.output_lock import OutputLockedError, lock_path, output_lock
from sdadapt.merge.engine import merge_file
from sdadapt.merge.recipe import MergeStep, step_from_dict
from test_merge_engine import mini, save

U = "model.diffusion_model."
#: a per-block list with a different value in every block (BASE first), so a key in the wrong block shows
ALPHAS = [round(0.02 + 0.035 * i, 4) for i in range(26)]
BETAS = [round(0.3 - 0.01 * i, 4) for i in range(26)]


def _text(values) -> str:
    return ",".join(str(v) for v in values)


@pytest.fixture(scope="module")
def abc(tmp_path_factory):
    folder = tmp_path_factory.mktemp("leftovers")
    return [save(folder, f"{n}.safetensors", mini(i, dtype=torch.float32)) for i, n in enumerate("abc")]


def _merge(capsys, tmp_path, name, *argv) -> tuple[int, str, str]:
    out = tmp_path / name
    code = main(["merge", *[str(a) for a in argv], "-o", str(out), "-q"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _recipe_step(path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return json.loads(handle.metadata()["sdadapt_merge_recipe"])["step"]


# ------------------------------------------------------------------ 1. per-block --alpha


def test_per_block_alpha_on_weighted_sum_is_block_weighted_bit_for_bit(abc, tmp_path, capsys):
    # the two spellings of one MBW merge: the operator's --alpha list and block-weighted --weights
    assert _merge(capsys, tmp_path, "op.safetensors", "weighted-sum", *abc[:2], "--alpha", _text(ALPHAS))[0] == 0
    assert _merge(capsys, tmp_path, "bw.safetensors", "block-weighted", *abc[:2], "--weights", _text(ALPHAS))[0] == 0
    op, bw = load_file(tmp_path / "op.safetensors"), load_file(tmp_path / "bw.safetensors")
    assert op.keys() == bw.keys()
    assert all(torch.equal(op[k], bw[k]) for k in op)
    step = _recipe_step(tmp_path / "op.safetensors")
    assert step["block_weights"] == ALPHAS and step["alpha"] == ALPHAS[0]  # BASE stays alpha: supermerger's base_alpha
    with safe_open(str(tmp_path / "op.safetensors"), "pt") as handle:
        a1111 = json.loads(handle.metadata()["sd_merge_recipe"])
    # as supermerger's smerge records it: base_alpha = first value, weights_alpha = the 25 others
    assert a1111["base_alpha"] == ALPHAS[0] and a1111["weights_alpha"] == ALPHAS[1:] and a1111["mbw"] is True


def test_per_block_alpha_and_beta_on_triple_sum_match_a_float64_transcription(abc, tmp_path, capsys):
    code, _, err = _merge(capsys, tmp_path, "t.safetensors", "triple-sum", *abc, "--alpha", _text(ALPHAS),
                          "--beta", _text(BETAS), "--dtype", "fp32")
    assert code == 0, err
    out = load_file(tmp_path / "t.safetensors")
    inputs = [load_file(p) for p in abc]
    # supermerger Triple sum per key: (1 - a - b)·A + a·B + b·C with a, b the key's block values
    # (BASE first: IN00 is index 1 — time_embed counts as IN00 —, IN04 5, M00 13, OUT11 25 — out.2 too —,
    # text encoder and VAE BASE)
    cases = {U + "input_blocks.0.0.weight": 1, U + "time_embed.0.weight": 1, U + "input_blocks.4.1.proj_in.weight": 5,
             U + "middle_block.1.proj_out.weight": 13, U + "output_blocks.11.1.proj_out.weight": 25,
             U + "out.2.weight": 25, "first_stage_model.decoder.conv_in.weight": 0,
             "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": 0}
    for key, index in cases.items():
        a, b = ALPHAS[index], BETAS[index]
        want = (1 - a - b) * inputs[0][key].double() + a * inputs[1][key].double() + b * inputs[2][key].double()
        assert torch.allclose(out[key].double(), want, atol=1e-6, rtol=0), key
    step = _recipe_step(tmp_path / "t.safetensors")
    assert step["block_weights"] == ALPHAS and step["block_beta"] == BETAS
    assert step["alpha"] == ALPHAS[0] and step["options"]["beta"] == BETAS[0]


def test_per_block_alpha_on_the_command_line_equals_the_recipe_field(abc, tmp_path, capsys):
    # cosine-a (a two-pass operator): --alpha W,... and a recipe's "block_weights" are one code path
    alphas = [0.1 * (i % 5) for i in range(26)]
    assert _merge(capsys, tmp_path, "cli.safetensors", "cosine-a", *abc[:2], "--alpha", _text(alphas))[0] == 0
    step = step_from_dict({"operator": "cosine-a", "inputs": [{"path": abc[0]}, {"path": abc[1]}],
                           "block_weights": alphas})
    merge_file(step, tmp_path / "recipe.safetensors", save_recipe=False)
    cli, recipe = load_file(tmp_path / "cli.safetensors"), load_file(tmp_path / "recipe.safetensors")
    assert cli.keys() == recipe.keys() and all(torch.equal(cli[k], recipe[k]) for k in cli)


@pytest.mark.parametrize("name, field", [("alpha", "block_weights"), ("beta", "block_beta")])
def test_alpha_and_beta_lists_take_one_path(name, field):
    values = {name: tuple(ALPHAS), "other": 1.0}
    assert per_block_fields(values) == {field: tuple(ALPHAS)}
    assert values == {name: ALPHAS[0], "other": 1.0}
    plain = {name: 0.25}
    assert per_block_fields(plain) == {} and plain == {name: 0.25}  # one number stays one number


@pytest.mark.parametrize("count, says", [(25, "put BASE's alpha first"), (2, "got 2 values")])
def test_a_wrong_count_is_refused_before_anything_is_read(abc, tmp_path, capsys, count, says):
    code, _, err = _merge(capsys, tmp_path, "x.safetensors", "weighted-sum", *abc[:2], "--alpha", _text([0.5] * count))
    assert code == 2 and says in err and "26 values for SD1/SD2" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_an_sdxl_count_on_sd1_names_the_setting(abc, tmp_path, capsys):
    code, _, err = _merge(capsys, tmp_path, "x.safetensors", "weighted-sum", *abc[:2], "--alpha", _text([0.5] * 20))
    assert code != 0 and "per-block --alpha" in err and "20 block weights do not fit sd1" in err
    assert "base_alpha" not in err  # (the operator commands take BASE first; --base-alpha is block-weighted's)
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(InputError, match=r"block_beta \(per-block --beta\)"):
        merge_file(MergeStep("triple-sum", tuple(abc), alpha=0.1, options={"beta": 0.1}, block_beta=(0.1,) * 20),
                   tmp_path / "y.safetensors")


# ------------------------------------------------------------------ 2. inspect --json-lines


def test_json_lines_is_one_object_per_file_whatever_the_count(abc, tmp_path, capsys):
    missing = str(tmp_path / "missing.safetensors")
    assert main(["inspect", "--json", abc[0], abc[1]]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert main(["inspect", "--json-lines", abc[0], abc[1]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == listed  # the --json list, one object a line
    # one file: the same shape (a glob matching one file does not change it)
    assert main(["inspect", "--json-lines", abc[0]]) == 0
    assert capsys.readouterr().out.splitlines() == lines[:1]
    # an unreadable file has its line too (and its error on stderr); the exit code is the worst
    code = main(["inspect", "--json-lines", missing, abc[1]])
    captured = capsys.readouterr()
    objects = [json.loads(line) for line in captured.out.splitlines()]
    assert code != 0 and len(objects) == 2 and objects[1] == listed[1]
    assert objects[0]["file"] == missing and objects[0]["exit_code"] == code and "error: " in captured.err


def test_json_and_json_lines_are_exclusive(abc, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["inspect", "--json", "--json-lines", abc[0]])
    assert stop.value.code == 2 and "not allowed with" in capsys.readouterr().err


# ------------------------------------------------------------------ 3. one convert per OUT


def _lora(path):
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8, generator=g),
               f"{name}.lora_up.weight": torch.randn(8, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)},
              str(path), metadata={"ss_base_model_version": "sd_v1"})
    return path


def test_a_second_convert_to_a_locked_out_stops_naming_the_first(tmp_path, capsys):
    source, out = _lora(tmp_path / "in.safetensors"), tmp_path / "out.safetensors"
    argv = ["convert", str(source), "--to", "diffusers", "-o", str(out)]
    with output_lock(out, command="test run") as lock:
        assert lock.exists() and f"pid {os.getpid()}" in lock.read_text()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 7 and f"test run (pid {os.getpid()}" in err and "is writing it now" in err
        assert "if no such run is going on" in err and f"delete {lock}" in err
        assert not out.exists()
    assert not lock.exists()  # released with the block
    assert main(argv) == 0  # ... and then the same command runs
    capsys.readouterr()
    assert out.exists() and not lock_path(out).exists()  # the run's own lock is gone too


def test_a_lock_file_nobody_holds_is_taken_over(tmp_path):
    out = tmp_path / "out.safetensors"
    lock_path(out).write_text("python -m sdadapt convert (pid 999999999, started long ago)\n")  # a killed run's
    with output_lock(out, command="next"):
        with pytest.raises(OutputLockedError, match=r"next \(pid"):
            with output_lock(tmp_path / "." / "out.safetensors", command="third"):  # another spelling, one lock
                pass
    assert not lock_path(out).exists()


def test_without_flock_the_lock_file_is_made_exclusively(tmp_path, monkeypatch):
    # (Windows has no fcntl: the file is created with O_EXCL; a leftover of a dead pid is taken over)
    import sys

    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl -> ImportError
    out = tmp_path / "out.safetensors"
    lock_path(out).write_text("python -m sdadapt convert (pid 999999999, started long ago)\n")
    with output_lock(out, command="first"):
        with pytest.raises(OutputLockedError, match=r"first \(pid"):
            with output_lock(out, command="second"):
                pass
    assert not lock_path(out).exists()


def test_a_lock_for_a_folder_that_does_not_exist_yet_makes_it_and_sits_beside_out(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with output_lock(out, command="first") as held:
        assert held == tmp_path.resolve() / "new" / "deeper" / ".out.sdadapt-lock" == lock_path(out) and held.exists()
    assert not held.exists() and (tmp_path / "new" / "deeper").is_dir()


# ------------------------------------------------------------------ 4. A1111's config_source / bake_in_vae


@pytest.mark.parametrize("field, flag", [("bake_in_vae", "--vae"), ("config_source", "--prediction-type")])
def test_a1111_config_and_vae_fields_name_a_command_that_parses(field, flag):
    with pytest.raises(InputError) as refused:
        step_from_dict({"operator": "weighted-sum", "inputs": [{"path": "a"}, {"path": "b"}], "alpha": 0.3,
                        field: "x"})
    message = str(refused.value)
    assert f"({field}: " in message
    command = message.split("python -m sdadapt ", 1)[1].split(";", 1)[0].split(" (", 1)[0]
    argv = shlex.split(command)
    assert argv[0] == "convert" and flag in argv
    from sdadapt.cli import build_parser

    args = build_parser().parse_args(argv)  # the hinted command is a real one
    assert args.to == "ldm"


# ------------------------------------------------------------------ 5. what the merged file says it is


def test_a_merge_keeps_the_first_inputs_model_fields_and_reports_a_contradiction(tmp_path, capsys):
    # an SD2 768-v merge written without modelspec.prediction_type loads as epsilon (SingleFile.prediction_type)
    configs = json.dumps({"unet": {"sample_size": 96}})
    a = save(tmp_path, "a.safetensors", mini(0), {"modelspec.prediction_type": "v", "sdadapt.configs": configs,
                                                  "modelspec.architecture": "stable-diffusion-v2-768-v",
                                                  "modelspec.predict_key": "v",  # (ComfyUI's spelling: kept too)
                                                  "modelspec.title": "a", "ss_training_comment": "x"})
    b = save(tmp_path, "b.safetensors", mini(1))
    code, out, _ = _merge(capsys, tmp_path, "m.safetensors", "weighted-sum", a, b, "--alpha", "0.5", "--no-recipe")
    assert code == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta == {"format": "pt", "modelspec.prediction_type": "v", "sdadapt.configs": configs,
                    "modelspec.architecture": "stable-diffusion-v2-768-v",
                    "modelspec.predict_key": "v"}  # not A's title nor its training notes
    assert "modelspec.prediction_type: kept a.safetensors's v; other inputs say b.safetensors: none" in out
    # inputs that agree: nothing to report
    code, out, _ = _merge(capsys, tmp_path, "n.safetensors", "weighted-sum", a, a, "--alpha", "0.5", "--no-recipe")
    assert code == 0 and "prediction_type" not in out


def test_an_out_before_the_operator_name_is_explained(abc, tmp_path, capsys):
    # argparse gives "-o" before the operator to the replay's options: say so, naming where it goes
    code = main(["merge", "-o", str(tmp_path / "x.safetensors"), "weighted-sum", *abc[:2], "--alpha", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "-o before the operator name apply to --recipe only; put them after it" in err, err
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ review R5 (added by the reviewer)


def _sdxl(seed: int) -> dict[str, torch.Tensor]:
    """A tiny SDXL-shaped LDM checkpoint (the keys the SD1/SD2/SDXL detection and the 20-block map read)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).float() * 0.1  # noqa: E731
    return {
        U + "time_embed.0.weight": r(8, 8),
        U + "label_emb.0.0.weight": r(8, 8),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "out.2.weight": r(4, 8, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": r(8, 8),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": r(24, 8),
        "first_stage_model.decoder.conv_in.weight": r(8, 4, 3, 3),
    }


def test_per_block_alpha_on_sdxl_add_difference_follows_supermerger_20_block_map(tmp_path, capsys):
    # supermerger mergers.py @0b1c491 blockfromkey (XL branch): label_emb / time_embed -> IN00, input_blocks.N ->
    # IN0N, middle -> M00, output_blocks.N -> OUT0N, out. -> OUT08, conditioner.* / first_stage_model -> BASE;
    # "Add": A + a·(B - C); 19 block values recorded with a 0 appended (len 19 -> + [0])
    files = [save(tmp_path, f"x{i}.safetensors", _sdxl(i)) for i in range(3)]
    alphas = [round(0.05 + 0.04 * i, 4) for i in range(20)]
    index = {"BASE": 0, **{f"IN0{i}": 1 + i for i in range(9)}, "M00": 10, **{f"OUT0{i}": 11 + i for i in range(9)}}
    blocks = {U + "time_embed.0.weight": "IN00", U + "label_emb.0.0.weight": "IN00",
              U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": "IN04",
              U + "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight": "IN08",
              U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": "M00",
              U + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight": "OUT00",
              U + "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": "OUT03", U + "out.2.weight": "OUT08",
              "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": "BASE",
              "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": "BASE",
              "first_stage_model.decoder.conv_in.weight": "BASE"}
    code, _, err = _merge(capsys, tmp_path, "xl.safetensors", "add-difference", *files, "--alpha", _text(alphas),
                          "--dtype", "fp32")
    assert code == 0, err
    out, (a, b, c) = load_file(tmp_path / "xl.safetensors"), [load_file(f) for f in files]
    for key, block in blocks.items():
        w = alphas[index[block]]
        want = a[key].double() + w * (b[key].double() - c[key].double())
        assert torch.allclose(out[key].double(), want, atol=1e-6, rtol=0), (key, block)
    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as handle:
        a1111 = json.loads(handle.metadata()["sd_merge_recipe"])
    assert a1111["base_alpha"] == alphas[0] and a1111["weights_alpha"] == alphas[1:] + [0]


def test_every_model_field_is_kept_and_configs_spelled_differently_are_no_contradiction(tmp_path, capsys):
    fields = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v2-768-v",
              "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion",
              "modelspec.prediction_type": "v", "modelspec.resolution": "768x768",
              "sdadapt.configs": json.dumps({"unet": {"sample_size": 96}})}
    a = save(tmp_path, "a.safetensors", mini(0), {**fields, "modelspec.title": "a"})
    b = save(tmp_path, "b.safetensors", mini(1), {**fields, "sdadapt.configs": json.dumps({"unet": {"sample_size": 96}},
                                                                                          indent=1)})
    code, out, _ = _merge(capsys, tmp_path, "m.safetensors", "weighted-sum", a, b, "--alpha", "0.5", "--no-recipe")
    assert code == 0
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", **fields}
    assert "other inputs say" not in out  # the configs' JSON spelling differs, what they say does not


def _flock_lock_after_the_file_was_replaced(monkeypatch):
    """fcntl.flock that first does what a run ending between our open and our flock does: unlink the lock file."""
    import fcntl

    real, calls = fcntl.flock, []

    def flock(fd, operation):
        if not calls and operation & fcntl.LOCK_EX:
            calls.append(fd)
            os.unlink(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    return calls


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_a_lock_taken_on_a_file_its_holder_just_removed_is_taken_again_on_the_current_file(tmp_path, monkeypatch):
    # the removed file is locked by nobody else: a run that kept it would hold a lock no other run sees
    out = tmp_path / "out.safetensors"
    lock_path(out).write_text("python -m sdadapt convert (pid 999999999, ending)\n")
    calls = _flock_lock_after_the_file_was_replaced(monkeypatch)
    with output_lock(out, command="first"):
        assert calls and lock_path(out).exists()
        with pytest.raises(OutputLockedError, match=r"first \(pid"):
            with output_lock(out, command="second"):
                pass


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_an_output_through_a_linked_folder_has_the_same_lock(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with output_lock(real / "out.safetensors", command="first"):
        with pytest.raises(OutputLockedError, match=r"first \(pid"):
            with output_lock(tmp_path / "link" / "out.safetensors", command="second"):
                pass


def test_without_flock_a_lock_naming_a_live_process_is_respected(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fcntl", None)
    out = tmp_path / "out.safetensors"
    lock_path(out).write_text(f"python -m sdadapt convert (pid {os.getppid()}, started now)\n")  # alive, not us
    with pytest.raises(OutputLockedError, match=rf"pid {os.getppid()}"):
        with output_lock(out, command="second"):
            pass
    assert lock_path(out).exists()  # the live run's lock stays


def test_a_second_run_after_the_first_made_outs_folder_is_still_refused(tmp_path):
    out = tmp_path / "new" / "out.safetensors"
    with output_lock(out, command="first"):
        (tmp_path / "new").mkdir(exist_ok=True)  # what the first run's make_output_folder does before its first write
        with pytest.raises(OutputLockedError):
            with output_lock(out, command="second"):
                pass


def test_a_filesystem_without_locks_is_not_reported_as_another_run(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "out.safetensors"
    try:
        with output_lock(out, command="only run"):
            pass  # (falling back to the O_EXCL lock is one fix)
    except OutputLockedError:
        pytest.fail("no other run exists")
    except OSError as exc:  # a clear refusal is the other: it must name locking, not another process
        assert "is writing it now" not in str(exc) and "lock" in str(exc)
    assert not lock_path(out).exists()


def test_a_missing_out_is_not_blamed_on_an_out_before_the_operator(abc, tmp_path, capsys):
    code = main(["merge", "weighted-sum", *abc[:2], "--alpha", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "merge weighted-sum needs -o OUT" in err and "before the operator" not in err, err


def test_a_first_input_without_a_prediction_type_takes_the_one_every_other_input_gives():
    from sdadapt.merge.model_metadata import inherited_metadata

    v = {"modelspec.prediction_type": "v"}
    fields, notes = inherited_metadata([("A", {}), ("B", v), ("C", v)])
    assert fields == v and len(notes) == 1 and "A has none" in notes[0]
    fields, notes = inherited_metadata([("A", {}), ("B", v), ("C", {})])  # (the others disagree: nothing taken)
    assert fields == {} and "kept A's none" in notes[0]
    fields, _ = inherited_metadata([("A", {"modelspec.prediction_type": "epsilon"}), ("B", v)])
    assert fields == {"modelspec.prediction_type": "epsilon"}


def test_a_merge_of_toy_models_is_a_toy_model_generate_reads(tmp_path):
    """Two toy files merged keep the toy's format and config (its loader reads them): the merge was written as a
    plain checkpoint ("format: pt") that `generate --model` refused, neither toy nor SD."""
    from safetensors.torch import load_file

    from sdadapt.toy import build_toy
    from sdadapt.toy.system import save_toy

    save_toy(build_toy(seed=1), tmp_path / "a.safetensors")
    save_toy(build_toy(seed=2), tmp_path / "b.safetensors")
    assert main(["merge", "weighted-sum", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--alpha",
                 "0.5", "-q", "-o", str(tmp_path / "m.safetensors")]) == 0
    a, b, m = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "abm")
    key = next(k for k in m if k.startswith("unet.") and m[k].is_floating_point() and not torch.equal(a[k], b[k]))
    assert torch.allclose(m[key].float(), (a[key].float() + b[key].float()) / 2, atol=1e-3)
    assert main(["generate", "--model", str(tmp_path / "m.safetensors"), "--prompt", "a red circle", "--steps", "1",
                 "-q", "-o", str(tmp_path / "g.png")]) == 0
