#!/usr/bin/env bash
# The GPU checks of cat-engine, in one call of under 8 minutes on one H200:
#
#   bench/gpu_suite.sh OUTDIR
#
# Steps, most important first (each is cut to the time left in the budget; what does not fit is
# listed as skipped, and a second call with CAT_SUITE_ONLY runs it):
#   install          the missing packages from the wheels in .whl/ (tools/wheelhouse.py)
#   env              versions, and the whole import chain
#   kernel_tests     tests/kernels and tests/engine/test_cuda_graphs.py on CUDA (paths, dispatch,
#                    autotuning, graphed steps against eager ones)
#   microbench       bench/lora_microbench.py --grid gpu: every LoRA path at M 1024/4096/16384
#   bench_sd15_b1    cat-engine bench, SD1.5 512 px, B=1, bf16, checkpointing, eager and CUDA graphs
#   make_sd15        tools/make_random_model.py: a random-initialised SD1.5 folder
#   train_peak_sd15  peak memory of cat-engine train on it (bf16, checkpointing, B=1)
#   profile_sd15     torch.profiler table of one engine CAT step
#   bench_sdxl_b1    cat-engine bench, SDXL 1024 px, B=1, bf16, checkpointing, eager and CUDA graphs
#   make_sdxl, train_peak_sdxl   the same for SDXL at 1024 px
#   bench_sd15_b4    cat-engine bench, SD1.5 512 px, B=4, checkpointing, eager and CUDA graphs
#   eval_throughput  the KPS sampler's images/s against the diffusers pipeline (SD1.5 folder)
#   compile          --compile default and reduce-overhead on CUDA, through the gradient check
#   nccl             the data-parallel recipe on nccl with one rank
#   resident         what the bench process keeps on the GPU, by owner
#   bench_sdxl_b4    cat-engine bench, SDXL 1024 px, B=4, checkpointing, eager and CUDA graphs (MFU)
# Everything lands under OUTDIR: one log per step, steps.tsv (step, exit code, seconds), the JSON
# lines of every measurement, the charts, the profiler table, cache/lora_paths.json (the LoRA path
# chosen per shape); the last lines printed are the step table and the summary against targets.
# A failing step does not stop the others.
#
# Environment: PYTHON (default python3), CAT_SITE (install target, default /tmp/cat-engine-site),
# CAT_WHEELS (default REPO/.whl), CAT_SUITE_BUDGET_S (default 470), CAT_SUITE_ONLY ("step ..."
# runs only those), CAT_SUITE_MODELS (where the random model folders go, default OUTDIR/models),
# CAT_SUITE_DRY=1 (rehearsal on a CPU machine: tiny presets on the CPU, kernel tests collected,
# the GPU-only checks' command lines parsed; nothing is measured).
set -uo pipefail

OUT_ARG=${1:?usage: bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT_ARG" && OUT=$(cd "$OUT_ARG" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SITE=${CAT_SITE:-/tmp/cat-engine-site}
WHEELS=${CAT_WHEELS:-$REPO/.whl}
BUDGET=${CAT_SUITE_BUDGET_S:-470}
DRY=${CAT_SUITE_DRY:-0}
ONLY=${CAT_SUITE_ONLY:-}
MODELS=${CAT_SUITE_MODELS:-$OUT/models}
export CAT_ENGINE_CACHE=${CAT_ENGINE_CACHE:-$OUT/cache}
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

# step NAME TIMEOUT_S COMMAND...: run in OUTDIR (so no checkout folder shadows the installed
# package), log to OUTDIR/NAME.log, cut to the time left in the budget; skipped when CAT_SUITE_ONLY
# does not name it.
step() {
    local name=$1 limit=$2; shift 2
    if [[ -n "$ONLY" && " $ONLY " != *" $name "* ]]; then
        return
    fi
    local left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped, ${left}s left of the ${BUDGET}s budget (CAT_SUITE_ONLY=\"$name\" runs it)"
        printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS rc
    (cd "$OUT" && timeout --kill-after=10 "$limit" "$@") > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 25 "$OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUT/steps.tsv"
}

# 1. Packages: the missing ones from the wheels, then cat_engine itself as links into this
# checkout (its sub-packages are the top-level folders, docs/design.md §3; no build step needed).
mkdir -p "$SITE/cat_engine"
ln -sfn "$REPO/cat_engine/__init__.py" "$SITE/cat_engine/__init__.py"
ln -sfn "$REPO/cat_engine/__main__.py" "$SITE/cat_engine/__main__.py"
ln -sfn "$REPO/cat_engine/cli.py" "$SITE/cat_engine/cli.py"
for sub in kernels engine cat bench; do ln -sfn "$REPO/$sub" "$SITE/cat_engine/$sub"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${CAT_ENGINE_GIT_COMMIT:-}" && -f "$WHEELS/COMMIT" ]]; then
    export CAT_ENGINE_GIT_COMMIT=$(cat "$WHEELS/COMMIT")
fi
if [[ -d "$WHEELS" ]]; then
    step install 90 "$PY" "$REPO/tools/wheelhouse.py" "$WHEELS" --target "$SITE"
else
    echo "== install: no wheel folder $WHEELS; using what is installed"
fi
step env 60 "$PY" -c '
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for name in ("triton", "diffusers", "peft", "transformers", "pynvml", "matplotlib", "pytest", "cat_engine"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as exc:
        print(name, "NOT IMPORTABLE:", type(exc).__name__, exc)
import cat_engine.bench.harness, cat_engine.bench.gpu_checks, cat_engine.cli  # the whole import chain
'

# 2. Correctness on CUDA: both LoRA paths against the float64 oracle, the dispatch, autotuning,
# and graphed training steps against eager ones.
PYTEST=("$PY" -m pytest "$REPO/tests/kernels" "$REPO/tests/engine/test_cuda_graphs.py" -q -p no:cacheprovider
        --rootdir "$REPO" -c "$REPO/pyproject.toml" --import-mode=importlib)
if [[ $DRY == 1 ]]; then
    step kernel_tests 90 "${PYTEST[@]}" --collect-only
else
    step kernel_tests 150 "${PYTEST[@]}"
fi

# 3. The LoRA linear, every path, on the diffusion shapes.
if [[ $DRY == 1 ]]; then
    step microbench 120 "$PY" -m cat_engine.bench.lora_microbench --grid quick --reps 5 \
        --out "$OUT/lora_microbench.jsonl"
else
    step microbench 100 "$PY" -m cat_engine.bench.lora_microbench --grid gpu --out "$OUT/lora_microbench.jsonl"
fi

# 4. The bench, the training process's peak, the profile: SD1.5 first, then SDXL.
if [[ $DRY == 1 ]]; then
    BENCH=("$PY" -m cat_engine bench --device cpu --precision fp32 --steps 1 --warmup 0 --checkpointing
           --results-dir "$OUT")
    SD15=(--preset tiny --resolution 64) SDXL=(--preset tiny-xl --resolution 64) GRAPHS=()
else
    BENCH=("$PY" -m cat_engine bench --device cuda --precision bf16 --steps 5 --warmup 2 --checkpointing
           --results-dir "$OUT")
    SD15=(--preset sd15 --resolution 512) SDXL=(--preset sdxl --resolution 1024) GRAPHS=(--cuda-graphs)
fi
GPU_CHECKS=("$PY" -m cat_engine.bench.gpu_checks)
# make_model NAME FAMILY: a random-initialised model folder (only its command line in a dry run)
make_model() {
    if [[ $DRY == 1 ]]; then
        step "make_$1" 30 "$PY" "$REPO/tools/make_random_model.py" --help
    else
        step "make_$1" 150 "$PY" "$REPO/tools/make_random_model.py" "$2" "$MODELS/$1"
    fi
}
# gpu_check NAME LIMIT ARGS...: a check of bench/gpu_checks.py (only parsed in a dry run)
gpu_check() {
    local name=$1 limit=$2; shift 2
    if [[ $DRY == 1 ]]; then
        step "$name" 30 "${GPU_CHECKS[@]}" "$1" --help
    else
        step "$name" "$limit" "${GPU_CHECKS[@]}" "$@"
    fi
}

step bench_sd15_b1 120 "${BENCH[@]}" "${SD15[@]}" --batch 1 "${GRAPHS[@]}"
make_model sd15 sd15
gpu_check train_peak_sd15 120 train-peak --base "$MODELS/sd15" --resolution 512 --out "$OUT/train_peak.jsonl"
gpu_check profile_sd15 90 profile --preset sd15 --resolution 512 --out "$OUT"
step bench_sdxl_b1 170 "${BENCH[@]}" "${SDXL[@]}" --batch 1 "${GRAPHS[@]}"
make_model sdxl sdxl
gpu_check train_peak_sdxl 180 train-peak --base "$MODELS/sdxl" --resolution 1024 --out "$OUT/train_peak.jsonl"
step bench_sd15_b4 120 "${BENCH[@]}" "${SD15[@]}" --batch 4 "${GRAPHS[@]}"

# 5. The checks still owed from before.
if [[ $DRY == 1 ]]; then
    step eval_throughput 120 "$PY" -m cat_engine.bench.eval_throughput --prompts 1 --seeds 1 --steps 2 \
        --repeats 1 --json "$OUT/eval_throughput.json"
else
    step eval_throughput 120 "$PY" -m cat_engine.bench.eval_throughput --base "$MODELS/sd15" --device cuda \
        --resolution 256 --prompts 2 --seeds 4 --steps 10 --repeats 2 --threads 16 --json "$OUT/eval_throughput.json"
fi
gpu_check compile 200 compile --preset small --modes default,reduce-overhead --out "$OUT/compile.jsonl"
gpu_check nccl 90 nccl --out "$OUT/nccl.jsonl"
gpu_check resident 90 resident --preset sd15 --resolution 512 --checkpointing --out "$OUT/resident.jsonl"
# The MFU target is at SDXL 1024 px, B=4, with CUDA graphs: last, as the longest run.
step bench_sdxl_b4 240 "${BENCH[@]}" "${SDXL[@]}" --batch 4 "${GRAPHS[@]}"

# 6. Last: what ran, and the figures against the targets.
echo
echo "== steps (exit code, seconds); logs in $OUT"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
echo
(cd "$OUT" && "${GPU_CHECKS[@]}" summary "$OUT")
echo "total ${SECONDS}s"
