#!/usr/bin/env bash
# The GPU check: on a bare GPU machine holding a copy of the repo, in under 8 minutes, safe to rerun.
#
#   bash benchmarks/gpu_check.sh            # results to $OUT if set, else benchmarks/results/
#
# Stages (each under `timeout`, within one overall budget BUDGET_S, default 460 s; a stage that fails or runs
# out of time is logged and the next one still runs; caps in seconds):
#  1. install-missing (40): pip, ordinary index; skipped quietly without internet,
#  2. build (200): the package and its C++/CUDA extension for this GPU's arch only
#     (pip install --no-deps --no-build-isolation -e .; on failure PREFIX_KERNELS_BUILD_EXT=0, logged),
#  3. the `gpu` tests (collected once, at most 60 s) in three stages, each leaving 170 s for stages 4-5, none with -x (a failure in one never hides another), in parallel with
#     pytest-xdist (-n 8, PYTEST_WORKERS) when it is importable, else serially; node ids from one --collect-only:
#     pytest-triton (110): every gpu test of the triton backend (test_triton_backend.py, test_triton_tma.py on
#       sm_90, the triton params of test_backends.py / test_numerics.py / test_determinism.py, the bf16 smoke
#       matrix test_gpu_smoke.py),
#     pytest-cuda (50): the CUDA fallback backend's (test_cuda_backend.py, the cuda params),
#     pytest-rest (50): the other gpu tests (reference on CUDA tensors, models);
#     the long LARGE sweep (test_backends.py::test_matches_reference_large_gpu) is left out: the smoke
#     matrix of test_gpu_smoke.py replaces it,
#  4. microbench-verdict (150): benchmarks/microbench.py --verdict (Llama-8B layer at L 2048, 4096, 8192 and at
#     P 0, the NLU shape, a decode step (B 64, L 1, S 8192); bf16, fwd and fwd+bwd; every backend, PEFT's real
#     path `sdpa-peft`, SDPA on concatenated K/V with each SDPA kernel, the triton backend with its opt-in
#     fused and atomic backwards `triton:fused-bwd`, `triton:atomic-bwd` (fwd+bwd only) and its opt-in TMA
#     forward `triton:tma-fwd` (sm_90); every row with its error against fp32, WRONG rows untimed),
#  5. verdict (20): benchmarks/verdict.py on that run's CSV -> verdict.txt (PASS / FAIL / NOT MEASURED, and INFO
#     lines without a target),
#  6. e2e (what is left, at most 90): the end-to-end GPU subset (benchmarks/e2e.py).
# Expected: ~4-5 min with SKIP_BUILD=1, at most BUDGET_S (~7.7 min) with a fresh build. Files to $OUT (8):
#   gpu_check.log, gpu_check.json (stage statuses, versions), pytest_gpu.txt (each pytest stage's summary and
#   its FAILED/ERROR lines), microbench.csv, microbench_cuda.md, verdict.txt, e2e.csv, e2e_cuda.md
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

# 3. the gpu tests: triton first, then the CUDA fallback, then the rest; never -x; xdist when importable
XDIST=()
if $PY -c "import xdist" >/dev/null 2>&1; then XDIST=(-n "${PYTEST_WORKERS:-8}"); else log "pytest-xdist missing: serial"; fi
PYTEST=($PY -m pytest -q -rfE -p no:cacheprovider --continue-on-collection-errors)
timeout 60 $PY -m pytest -m gpu --collect-only -q -p no:cacheprovider --continue-on-collection-errors 2>>"$LOG" \
  | grep '::' > "$WORK/gpu_ids.txt" || true
$PY - "$WORK" <<'PYEOF' >>"$LOG" 2>&1
import re, sys
work = sys.argv[1]
ids = [line.strip() for line in open(f"{work}/gpu_ids.txt") if "::" in line]
groups = {"triton": [], "cuda": [], "rest": []}
for node in ids:
    if "test_matches_reference_large_gpu" in node:
        continue  # the long LARGE sweep: test_gpu_smoke.py's matrix replaces it here
    if "triton" in node:
        groups["triton"].append(node)
    elif "test_cuda_backend" in node or re.search(r"cuda-cuda|\[cuda-|\[cuda\]", node):
        groups["cuda"].append(node)
    else:
        groups["rest"].append(node)
for name, nodes in groups.items():
    with open(f"{work}/gpu_{name}.txt", "w") as f:
        f.write("".join(n + "\n" for n in nodes))
    print(f"gpu tests, {name}: {len(nodes)}")
PYEOF
: > "$WORK/pytest_gpu.txt"
# each test stage leaves 170 s for the verdict benchmark and verdict (with a fresh build, cuda/rest may get none)
for group in triton:110 cuda:50 rest:50; do
  IFS=: read -r name cap <<<"$group"
  if [[ ! -s "$WORK/gpu_$name.txt" ]]; then
    log "no gpu tests for $name"; echo "pytest-$name: no tests collected" >> "$WORK/pytest_gpu.txt"; continue
  fi
  mapfile -t IDS < "$WORK/gpu_$name.txt"
  before=$(wc -l < "$LOG")
  stage "pytest-$name" "$cap" 170 "${PYTEST[@]}" "${XDIST[@]}" "${IDS[@]}"
  { echo "pytest-$name (${#IDS[@]} tests): ${STATUS[pytest-$name]}"
    tail -n +"$((before + 1))" "$LOG" | grep -E "^(FAILED|ERROR) |(passed|failed|error|skipped).* in [0-9.]+s" || true
  } >> "$WORK/pytest_gpu.txt"
done

# 4. the verdict benchmark (CSV rows are appended case by case: a timeout keeps what was measured), 5. verdict
rm -f "$WORK/microbench.csv"
stage microbench-verdict 150 25 $PY benchmarks/microbench.py --device cuda --verdict --reps 10 --out "$WORK"
stage verdict 20 0 $PY benchmarks/verdict.py "$WORK/microbench.csv" --all --out "$WORK/verdict.txt"
if [[ -f "$WORK/verdict.txt" ]]; then cat "$WORK/verdict.txt" >> "$LOG"; fi

# 6. end to end, with what is left
stage e2e 90 5 $PY benchmarks/e2e.py --device cuda --steps 3 --out "$WORK"

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
for f in microbench.csv microbench_cuda.md verdict.txt e2e.csv e2e_cuda.md gpu_check.json pytest_gpu.txt; do
  [[ -f "$WORK/$f" ]] || continue
  if [[ "$FINAL" == "benchmarks/results" && "$f" == *.csv ]]; then
    $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from common import append_csv, read_csv; \
append_csv(sys.argv[2], read_csv(sys.argv[1]))" "$WORK/$f" "$FINAL/$f"  # merge into the committed CSV
  else
    cp "$WORK/$f" "$FINAL/$f"
  fi
done
log "done in $((SECONDS - START)) s: $(for k in "${!STATUS[@]}"; do printf '%s=%s; ' "$k" "${STATUS[$k]}"; done)"
