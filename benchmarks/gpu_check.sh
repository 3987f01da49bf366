#!/usr/bin/env bash
# The GPU check: on a bare GPU machine holding a copy of the repo, in under 8 minutes, safe to rerun.
#
#   bash benchmarks/gpu_check.sh            # results to $OUT if set, else benchmarks/results/
#
# 1. installs what is missing (pip, ordinary index; skipped quietly without internet),
# 2. builds the package and its C++/CUDA extension for this GPU's arch only
#    (pip install --no-deps --no-build-isolation -e .; on failure PREFIX_KERNELS_BUILD_EXT=0, logged),
# 3. runs the `gpu` tests (pytest -m gpu -x),
# 4. runs the GPU microbenchmark subset (benchmarks/microbench.py: 3 shapes, bf16, fwd/bwd/fwd+bwd, every
#    backend and baseline; flex last, on the Llama-like layer, with the time left) and the end-to-end GPU subset (benchmarks/e2e.py),
# each stage under `timeout`, within one overall budget (BUDGET_S, default 460 s). A stage that fails or runs
# out of time is logged and the next one still runs. Files written to $OUT (at most 8):
#   gpu_check.log, gpu_check.json (stage statuses, versions), microbench.csv, microbench_cuda.md,
#   e2e.csv, e2e_generate.csv, e2e_cuda.md, pytest_gpu.txt
# SKIP_BUILD=1 skips step 2 (a rerun on a machine where the build is done).
# Without $OUT the CSVs are appended to benchmarks/results/ (then `python benchmarks/plot.py` and commit).
set -u
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-460}
PY=${PYTHON:-$(command -v python || command -v python3)}
FINAL=${OUT:-benchmarks/results}
mkdir -p "$FINAL"
WORK=$(mktemp -d /tmp/pk_gpu_check.XXXXXX)
LOG="$FINAL/gpu_check.log"
: > "$LOG"
declare -A STATUS

log() { echo "[gpu_check $((SECONDS - START))s] $*" | tee -a "$LOG"; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
# stage NAME CAP_S RESERVE_S CMD...: runs CMD under timeout min(CAP_S, time left - RESERVE_S)
stage() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local t=$(( $(left) - reserve )); (( t > cap )) && t=$cap
  if (( t < 15 )); then log "SKIP $name: no time left"; STATUS[$name]="skipped (no time)"; return 1; fi
  log "START $name (limit ${t}s): $*"
  timeout -s INT -k 10 "$t" "$@" >>"$LOG" 2>&1
  local rc=$?
  if (( rc == 0 )); then STATUS[$name]="ok"; elif (( rc == 124 || rc == 130 || rc == 137 )); then
    STATUS[$name]="timeout after ${t}s (rc $rc)"; else STATUS[$name]="failed (rc $rc)"; fi
  log "END $name: ${STATUS[$name]}"
  return $rc
}

log "repo $(pwd), commit $(git rev-parse --short HEAD 2>/dev/null || echo none), out $FINAL, work $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1 || log "nvidia-smi unavailable"

# 1. what is missing (torch must be there; no internet -> logged and carried on)
MISSING=$($PY - <<'EOF'
import importlib.util
need = {"triton": "triton", "transformers": "transformers", "peft": "peft", "pytest": "pytest",
        "safetensors": "safetensors", "numpy": "numpy", "hypothesis": "hypothesis", "tqdm": "tqdm",
        "ninja": "ninja"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n "$MISSING" ]]; then
  stage install-missing 40 400 $PY -m pip install -q --disable-pip-version-check $MISSING \
    || log "could not install: $MISSING (no internet?); carrying on without them"
fi

# 2. build: only this GPU's arch (halves nvcc time); fall back to the pure-Python package
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>>"$LOG" || echo "9.0")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
[[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]] && export CUDA_HOME=/usr/local/cuda
if [[ "${SKIP_BUILD:-0}" == "1" ]]; then
  log "SKIP_BUILD=1: using the installed package as it is"; STATUS[build]="skipped (SKIP_BUILD=1)"
elif ! stage build 200 230 $PY -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .; then
  log "extension build failed or timed out: installing with PREFIX_KERNELS_BUILD_EXT=0 (triton + reference only)"
  STATUS[build]="${STATUS[build]}; fell back to PREFIX_KERNELS_BUILD_EXT=0"
  PREFIX_KERNELS_BUILD_EXT=0 stage build-noext 60 200 $PY -m pip install -q --disable-pip-version-check \
    --no-deps --no-build-isolation -e .
fi
$PY -c "import prefix_kernels as p, torch; print('backends on cuda:', p.available_backends(torch.device('cuda')))" \
  >>"$LOG" 2>&1 || log "prefix_kernels does not import"

# 3. the gpu tests (collection errors, e.g. a missing test dependency, do not stop the gpu tests)
stage pytest-gpu 120 170 $PY -m pytest -m gpu -x -q -p no:cacheprovider --continue-on-collection-errors \
  --junit-xml="$WORK/pytest_gpu.xml"
grep -E "passed|failed|error|skipped" "$LOG" | tail -3 > "$WORK/pytest_gpu.txt" || true

# 4. benchmarks: microbench subset (CSV rows are appended case by case, so a timeout keeps what was measured),
#    then the end-to-end subset
#    flex (torch.compile per shape and mode, slow to warm up) runs last, on the Llama-like layer, with what is left.
stage microbench 120 70 $PY benchmarks/microbench.py --device cuda --reps 10 --out "$WORK" \
  --baselines sdpa-expand sdpa-concat flash-attn
stage e2e 120 5 $PY benchmarks/e2e.py --device cuda --steps 3 --out "$WORK"
if [[ -f "$WORK/microbench_cuda.md" ]]; then cp "$WORK/microbench_cuda.md" "$WORK/microbench_cuda_main.md"; fi
stage microbench-flex 90 0 $PY benchmarks/microbench.py --device cuda --reps 10 --out "$WORK" --only llama \
  --baselines flex --tag _flex

# results
$PY - "$WORK" "$LOG" <<EOF >"$WORK/gpu_check.json" 2>>"$LOG"
import json, sys, importlib.metadata as md
status = {$(for k in "${!STATUS[@]}"; do printf '"%s": "%s", ' "$k" "${STATUS[$k]//\"/}"; done)}
vers = {}
for p in ("torch", "triton", "transformers", "peft", "flash-attn", "prefix-kernels"):
    try:
        vers[p] = md.version(p)
    except md.PackageNotFoundError:
        pass
try:
    import torch
    gpu = torch.cuda.get_device_name()
except Exception as e:
    gpu = repr(e)
json.dump({"status": status, "versions": vers, "gpu": gpu, "seconds": $((SECONDS - START))}, sys.stdout, indent=1)
EOF
# one markdown for both microbench runs
if [[ -f "$WORK/microbench_cuda_flex.md" ]]; then
  { cat "$WORK/microbench_cuda_main.md" 2>/dev/null; echo; cat "$WORK/microbench_cuda_flex.md"; } > "$WORK/microbench_cuda.md"
  $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from common import append_csv, read_csv; \
append_csv(sys.argv[2], read_csv(sys.argv[1]))" "$WORK/microbench_flex.csv" "$WORK/microbench.csv" 2>>"$LOG"
fi
for f in microbench.csv microbench_cuda.md e2e.csv e2e_generate.csv e2e_cuda.md gpu_check.json pytest_gpu.txt; do
  [[ -f "$WORK/$f" ]] || continue
  if [[ "$FINAL" == "benchmarks/results" && "$f" == *.csv ]]; then
    $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from common import append_csv, read_csv; \
append_csv(sys.argv[2], read_csv(sys.argv[1]))" "$WORK/$f" "$FINAL/$f"  # merge into the committed CSV
  else
    cp "$WORK/$f" "$FINAL/$f"
  fi
done
log "done in $((SECONDS - START)) s: $(for k in "${!STATUS[@]}"; do printf '%s=%s; ' "$k" "${STATUS[$k]}"; done)"
