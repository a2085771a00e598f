#!/usr/bin/env bash
# The GPU checks of cat-engine in one call, under 8 minutes: install what is missing from the
# wheels in .whl/, kernel tests on CUDA, the LoRA microbenchmark, and the bench for SD1.5 at
# 512 px and SDXL at 1024 px (batch 1, bf16, without and with gradient checkpointing).
#
#   bench/gpu_suite.sh OUTDIR
#
# Everything lands under OUTDIR: one log per step, steps.tsv (step, exit code, seconds),
# bench.jsonl and the charts; a short table is printed last. A failing step does not stop the
# others. See bench/README.md for preparing .whl/.
#
# Environment: PYTHON (default python3), CAT_SITE (install target, default /tmp/cat-engine-site),
# CAT_WHEELS (default REPO/.whl), CAT_SUITE_BUDGET_S (default 470: steps are cut to fit),
# CAT_SUITE_DRY=1 (rehearsal on a CPU machine: tiny preset, kernel tests collected, not run).
set -uo pipefail

OUT_ARG=${1:?usage: bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT_ARG" && OUT=$(cd "$OUT_ARG" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SITE=${CAT_SITE:-/tmp/cat-engine-site}
WHEELS=${CAT_WHEELS:-$REPO/.whl}
BUDGET=${CAT_SUITE_BUDGET_S:-470}
DRY=${CAT_SUITE_DRY:-0}
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

# step NAME TIMEOUT_S COMMAND...: run in OUTDIR (so no checkout folder shadows the installed
# package), log to OUTDIR/NAME.log, cut to the time left in the budget.
step() {
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped, ${left}s left of the ${BUDGET}s budget"
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
from cat_engine.bench.harness import run_bench  # the whole import chain the bench needs
'

# 2. Kernel tests on CUDA (the tests pick CUDA when it is there).
PYTEST=("$PY" -m pytest "$REPO/tests/kernels" -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml"
        --import-mode=importlib)
if [[ $DRY == 1 ]]; then
    step kernel_tests 60 "${PYTEST[@]}" --collect-only
else
    step kernel_tests "${CAT_SUITE_KERNEL_LIMIT:-120}" "${PYTEST[@]}"
fi

# 3. The LoRA microbenchmark (bench/lora_microbench.py), when this checkout has it.
if [[ -f "$REPO/bench/lora_microbench.py" ]]; then
    if [[ $DRY == 1 ]]; then
        step lora_microbench 30 "$PY" -c "import cat_engine.bench.lora_microbench"
    else
        # CAT_SUITE_MICROBENCH_ARGS: e.g. --quick, when the device time is short.
        step lora_microbench "${CAT_SUITE_MICROBENCH_LIMIT:-50}" "$PY" -m cat_engine.bench.lora_microbench \
            --out "$OUT/lora_microbench.jsonl" ${CAT_SUITE_MICROBENCH_ARGS:-}
    fi
else
    echo "== lora_microbench: not in this checkout"
fi

# 4. The bench: SD1.5 at 512 px and SDXL at 1024 px, batch 1, bf16, checkpointing off and on.
# Limits in seconds, checkpointing off then on; the second run of a model reuses the first's FLOP
# counts (counting SDXL on the meta device takes tens of seconds of CPU).
export CAT_ENGINE_CACHE=${CAT_ENGINE_CACHE:-$OUT/cache}
if [[ $DRY == 1 ]]; then
    RUNS=("tiny 64 40 40" "tiny-xl 64 40 40")
    BENCH_ARGS=(--device cpu --precision fp32 --steps 1 --warmup 0)
else
    RUNS=("sd15 512 60 45" "sdxl 1024 110 80")
    # CAT_SUITE_RUNS overrides: "preset px limit_off limit_on;..." (a limit of 0 skips that run).
    if [[ -n "${CAT_SUITE_RUNS:-}" ]]; then IFS=';' read -r -a RUNS <<< "$CAT_SUITE_RUNS"; fi
    BENCH_ARGS=(--device cuda --precision bf16 --steps 5 --warmup 2)
fi
for run in "${RUNS[@]}"; do
    read -r preset px limit_off limit_on <<< "$run"
    if ((limit_off > 0)); then
        step "bench_${preset}_${px}_ckpt_off" "$limit_off" "$PY" -m cat_engine bench --preset "$preset" \
            --resolution "$px" --batch 1 "${BENCH_ARGS[@]}" --results-dir "$OUT"
    fi
    if ((limit_on > 0)); then
        step "bench_${preset}_${px}_ckpt_on" "$limit_on" "$PY" -m cat_engine bench --preset "$preset" \
            --resolution "$px" --batch 1 "${BENCH_ARGS[@]}" --checkpointing --results-dir "$OUT"
    fi
done

# 5. Last: what ran, and the bench's numbers.
echo
echo "== steps (exit code, seconds); logs in $OUT"
column -t -s $'\t' "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
if [[ -f "$OUT/bench.jsonl" ]]; then
    echo
    "$PY" -m cat_engine.bench.report "$OUT/bench.jsonl"
fi
echo "total ${SECONDS}s"
