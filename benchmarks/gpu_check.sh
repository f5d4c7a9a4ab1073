#!/usr/bin/env bash
# One prepared GPU check for the training step (issue 16): CUDA tests + the SD1.5 benchmark rows.
#
# On a fresh GPU machine whose Python has torch, transformers and peft but not diffusers, from the
# repository root, with the wheels of `benchmarks/gpu_check.sh --download` in .whl/ (git-ignored):
#
#     bash benchmarks/gpu_check.sh                   # writes $OUT (default benchmarks/results/gpu_check)
#
# Through the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=580).
# `bash benchmarks/gpu_check.sh --goals`: only issue 16's goal rows and the CUDA tests of their paths
# (~8-9 minutes: a re-check after changes, when a session has little device time left); `--compiled`: the
# compiled+captured LoRA rows at batch 8 alone (regional first, then the whole UNet), with 420 s for
# inductor's cold compiles.
# Everything is bounded by per-step `timeout`s and a budget (GPU_CHECK_BUDGET seconds, default 530):
# optional rows are skipped, and say so, when too little time is left. Files written (at most 8):
#   gpu_check.log   every command's output, the pytest results included
#   summary.md      environment + every benchmark table + torch.profiler top ops and device-busy
#                   fraction of each profiled variant (where the time goes when a goal is missed)
#   lora.json, full.json, lora_more.json, compiled.json   the benchmark results (benchmarks/train_step.py
#                   JSON, rewritten after every row: a step cut by its limit keeps the rows it finished)
#   attention.json   SDPA backend timings (benchmarks/attention.py)
#
# GPU_CHECK_DRY=1 runs the same steps on a CPU with the tiny config, 2 steps per row, batch 2 for 8,
# one profiled step and the "eager" compile backend (a few minutes on 2 cores; limits doubled): the
# end-to-end rehearsal (tests/test_gpu_rehearsal.py checks the lists and command lines in seconds).
# `bash benchmarks/gpu_check.sh --download` (here, with network) fetches the wheels into .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

GOALS=0 COMPILED=0
if [[ "${1:-}" == "--goals" ]]; then  # issue 16's goal rows and the tests of their paths only: a short re-check
    GOALS=1
elif [[ "${1:-}" == "--compiled" ]]; then  # the compiled LoRA row alone, with the time a cold compile takes
    COMPILED=1
elif [[ "${1:-}" == "--download" ]]; then
    # pure-python wheels the GPU image lacks (diffusers and its one missing dependency)
    python3 -m pip download --no-deps --only-binary=:all: -d .whl "diffusers==0.42.1" "importlib_metadata==10.2.0"
    exit $?
fi

DRY=${GPU_CHECK_DRY:-0}
OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
# the dry run's CPU rows take about as long as the GPU's, on 2 cores other work may share: each
# step's limit and the budget doubled there
SCALE=$([[ "$DRY" == 1 ]] && echo 2 || echo 1)
BUDGET=${GPU_CHECK_BUDGET:-$((530 * SCALE))}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.md
: >"$LOG"
export PYTHONUNBUFFERED=1
export SDADAPT_INSTAFAIL=1  # (tests/conftest.py: each failure's traceback at once, also when a step is cut)

log() { echo "[gpu_check +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET - SECONDS)); }
# step NAME SECONDS CMD...: run CMD under `timeout SECONDS` (cut to the budget left), output to the log
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local remaining
    remaining=$(left)
    if ((remaining < 30)); then
        log "SKIP $name: only ${remaining}s of the budget left"
        return 0
    fi
    ((limit > remaining)) && limit=$remaining
    log "START $name (timeout ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    if ((rc == 0)); then log "OK $name"; else log "FAIL $name (exit $rc$( ((rc == 124)) && echo ', timed out'))"; fi
    return 0
}

# ------------------------------------------------------------------------------------- install
if [[ "$DRY" != 1 ]]; then
    if ! python3 -c "import diffusers" 2>/dev/null; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            log "installing $(ls .whl | tr '\n' ' ')"
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site .whl/*.whl >>"$LOG" 2>&1 \
                || log "FAIL wheel install"
            export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
        else
            log "FAIL: diffusers is missing and .whl/ has no wheels (run: bash benchmarks/gpu_check.sh --download, then carry .whl)"
        fi
    fi
fi
export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}  # (sdadapt from this tree, as in the dry run: no install)

{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)$([[ "$DRY" == 1 ]] && echo ' (GPU_CHECK_DRY=1: tiny config on CPU)')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
    python3 -c "import torch, diffusers, transformers, peft, sdadapt; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'sdadapt from', sdadapt.__file__)" 2>&1
    echo "git $(git rev-parse --short HEAD 2>/dev/null) $(git status --short 2>/dev/null | wc -l) changed files"
    echo '```'
} >"$SUMMARY"
cat "$SUMMARY" >>"$LOG"

# ------------------------------------------------------------------------------------ CUDA tests
# the capture and step tests first (the benchmark rows below depend on them); the optimiser and
# input-path CUDA tests after the goal benchmarks, so a slow test run cannot cut the measurements
CORE_TESTS=(tests/test_fit_cuda_graph.py tests/test_captured_accumulation.py tests/test_optim_capturable.py
    tests/test_lean_finetune.py tests/test_shared_input_lora.py tests/test_attention_backends.py tests/test_weight_casts.py
    tests/test_fused_lora.py tests/test_norm_precision.py tests/test_train.py)  # (test_train.py last: its last test makes a capture fail on purpose)
MORE_TESTS=(tests/test_train_options.py tests/test_optim.py tests/test_host_syncs.py tests/test_optim_split.py
    tests/test_compile_graphs.py tests/test_max_norm.py tests/test_capture_new_inputs.py tests/test_lion.py tests/test_prodigy.py
    tests/test_adafactor_capturable.py tests/test_schedule_free.py tests/test_dadapt.py tests/test_fp8_base.py tests/test_compile_inductor.py
    tests/test_a1111_noise.py tests/test_optim_flat.py tests/test_memory_watch.py)
[[ "$GOALS" == 1 || "$COMPILED" == 1 ]] || step "cuda tests (capture, step)" 100 python3 -m pytest -q -rs -o addopts=-ra -p no:cacheprovider -k cuda "${CORE_TESTS[@]}"

# ------------------------------------------------------------------------------------ benchmarks
# the dry run: the same rows and code paths, lighter (batch 2 for 8, one profiled step: a busy 2-core
# CPU took 195 s to over 400 s for the LoRA rows at batch 8 with 3 profiled steps)
if [[ "$DRY" == 1 ]]; then
    BENCH=(python3 benchmarks/train_step.py --config tiny --device cpu --steps 2 --warmup 1 --compile-backend eager)
    LARGE=2 LORA_PROFILE=1 FULL_PROFILE=1
else
    BENCH=(python3 benchmarks/train_step.py --config sd15 --steps 10 --warmup 3)
    LARGE=8 LORA_PROFILE=1 FULL_PROFILE=1
fi
bench() {  # bench NAME SECONDS ARGS...: one benchmark run, JSON to $OUT/NAME.json, table appended to the summary
    local name=$1 limit=$2
    shift 2
    step "bench $name" "$limit" "${BENCH[@]}" --out "$OUT/$name.json" --markdown "$OUT/$name.md" "$@"
    if [[ -f "$OUT/$name.md" ]]; then  # (also the rows a cut run finished: the files are rewritten after each)
        { echo; echo "## $name: $*"; echo; cat "$OUT/$name.md"; } >>"$SUMMARY"
        rm -f "$OUT/$name.md"
    else
        { echo; echo "## $name: $* — no result (see gpu_check.log)"; } >>"$SUMMARY"
    fi
}
if [[ "$GOALS" == 1 ]]; then
    # --goals (~8-9 minutes on an H200, the diffusers install included; GPU_CHECK_BUDGET=520), most needed first —
    # the sum of the step limits is above the budget, so what the budget cuts is the end: the LoRA goal candidates against peft's
    # UNet step (a row ~25 s; each with and without the fused LoRA layers), the full fine-tune goal rows, the CUDA
    # tests of the paths they take, then the rows that say what moved the numbers (the captured step as the
    # second session ran it, NCHW without per-call attention, q/k/v batching)
    bench goals_lora 300 --modes lora --batch 1 $LARGE --variants peft-unet sdadapt-captured-halfnorms \
        sdadapt-captured-fused-halfnorms sdadapt-captured-nchw-percall-halfnorms \
        sdadapt-captured-nchw-percall-fused-halfnorms --profile $LORA_PROFILE
    bench goals_full 130 --modes full --batch 1 --variants reference sdadapt-lean-captured sdadapt-fast-captured \
        sdadapt-fast-captured-halfnorms sdadapt-lean-captured-halfnorms --profile $FULL_PROFILE
    step "cuda tests (goal paths)" 80 python3 -m pytest -q -rs -o addopts=-ra -p no:cacheprovider -k cuda tests/test_fused_lora.py \
        tests/test_weight_casts.py \
        tests/test_norm_precision.py tests/test_max_norm.py tests/test_fp8_base.py tests/test_lean_finetune.py tests/test_fit_cuda_graph.py \
        tests/test_train.py  # (last: its last test makes a capture fail on purpose)
    bench goals_more 180 --modes lora --batch 1 $LARGE --variants sdadapt-captured sdadapt-captured-nchw \
        sdadapt-captured-nchw-halfnorms sdadapt-captured-qkv-halfnorms --no-flops
    log "done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    cat "$SUMMARY"
    exit 0
fi
if [[ "$COMPILED" == 1 ]]; then
    # --compiled (~6-8 minutes on an H200): the UNet compiled by inductor inside the CUDA graph at batch 8,
    # the batch-8 goal's path, beside the captured eager step: block by block first (regional: blocks of one
    # shape share a graph, a shorter cold compile), then whole; each compile from a cold cache (the whole
    # script's 170 s did not cover the whole UNet's on the second H200 run), so this step has most of the budget
    bench compiled_only 420 --modes lora --batch $LARGE --variants peft-unet sdadapt-captured-nchw sdadapt-regional-captured \
        sdadapt-compiled-captured --no-flops
    log "done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    cat "$SUMMARY"
    exit 0
fi
# the first H200 run (2026-12-04): SD1.5 model build + 3 warm-up + 10 timed + 1 profiled step took ~25 s
# per LoRA row (the 12 LoRA rows at --profile 3 ran past 200 s) and ~20 s per full fine-tune row; the
# goal rows first, each bench's files rewritten after every row.
# LoRA r16 on attention, the goal rows: UNet-only peft step on cached latents against the sdadapt CUDA graph
# (the eager sdadapt step runs with the other LoRA rows below); then the compiled rows, the batch-8 goal path
bench lora 210 --modes lora --batch 1 $LARGE --variants peft-unet sdadapt-captured sdadapt-captured-halfnorms --profile $LORA_PROFILE
# torch.compile of the injected UNet, alone and inside the CUDA graph (compiles fwd+bwd: the path to the
# batch-8 goal the first run had no time for; the second compile mostly hits inductor's cache)
bench compiled 170 --modes lora --batch $LARGE --variants sdadapt-regional-captured sdadapt-compiled sdadapt-compiled-captured --no-flops
# full fine-tune at batch 1: fp32 recipe, lean (int8 foreach), lean-fused (int8 in backward), fast (bf16),
# lean and fast captured whole in a CUDA graph (sdadapt AdamW capturable=True), small (lean captured, every
# block recomputed)
bench full 170 --modes full --batch 1 --variants reference sdadapt-lean sdadapt-lean-fused sdadapt-fast \
    sdadapt-lean-captured sdadapt-fast-captured sdadapt-small-captured sdadapt-fast-captured-halfnorms \
    sdadapt-lean-captured-halfnorms --profile $FULL_PROFILE
step "cuda tests (optimisers, inputs, fp8)" 120 python3 -m pytest -q -rs -o addopts=-ra -p no:cacheprovider -k cuda "${MORE_TESTS[@]}"
# the other LoRA rows: the whole diffusers-example recipe (VAE + text encoder every step); the captured
# step without channels_last and with the q/k/v down-projections batched (batch_shared_input_adapters)
bench lora_more 220 --modes lora --batch 1 $LARGE --variants reference sdadapt sdadapt-halfnorms sdadapt-captured-nchw \
    sdadapt-captured-nchw-halfnorms sdadapt-captured-qkv sdadapt-captured-qkv-halfnorms \
    sdadapt-captured-nchw-percall-halfnorms sdadapt-fused-halfnorms sdadapt-captured-fused-halfnorms \
    sdadapt-captured-nchw-fused-halfnorms sdadapt-captured-nchw-percall-fused-halfnorms --no-flops
# which SDPA kernel is fastest for the SD1.5 UNet's attention (per call and whole fwd+bwd): ~40 s
if [[ "$DRY" == 1 ]]; then ATTN=(--config tiny --batch 1 --repeats 2); else ATTN=(--config sd15 --batch 1 8); fi
step "bench attention" 60 python3 benchmarks/attention.py "${ATTN[@]}" --out "$OUT/attention.json" --markdown "$OUT/attention.md"
if [[ -f "$OUT/attention.md" ]]; then { echo; echo "## attention (SDPA backends)"; echo; cat "$OUT/attention.md"; } >>"$SUMMARY"; rm -f "$OUT/attention.md"; fi

log "done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$SUMMARY"
