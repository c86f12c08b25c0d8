#!/usr/bin/env bash
# The first command of a session lent a GPU machine: CUDA-only tests, CPU vs CUDA pruning, the packed
# checkpoint on the CUDA backends, GEMM and model benchmarks; ends with one markdown table for
# eval/RESULTS.md and exits non-zero on any failure. What each step checks, and why: scripts/gpu_check.py.
#
#   scripts/gpu_check.sh [--out DIR]             on the GPU machine (through the device tool; under 8 minutes)
#   scripts/gpu_check.sh --dry-run [--out DIR]   the same logic on CPU at tiny sizes (CI runs this)
#
# Needs no network and no ../shared: the models are built from configs with random weights. Python:
# $PYTHON if set, else the checkout's .venv (not carried to the device machine), else python3 (there:
# the image's, with CUDA torch, transformers and triton). llmprune runs from this checkout (PYTHONPATH),
# uninstalled. Packages missing there travel as wheels in .whl/ (README, Development), installed first.
# Results: the log and the summary under $OUT (the folder the device tool brings back) or --out DIR.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

DRY_RUN=0
OUT_DIR="${OUT:-}"
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1; ARGS+=("$1") ;;
        --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
        --out=*) OUT_DIR="${1#--out=}" ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: error: unknown argument $1 (takes --dry-run and --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${PYTHON:-}" ]; then
    :
elif [ -x "$REPO/.venv/bin/python" ]; then
    PYTHON="$REPO/.venv/bin/python"
else
    PYTHON=python3
fi

if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
    SITE="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/.whl/*.whl || { echo "gpu_check: error: installing the wheels in .whl/ failed" >&2; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
[ "$DRY_RUN" = 1 ] && export TRITON_INTERPRET=1

[ -n "$OUT_DIR" ] || OUT_DIR="$(mktemp -d /tmp/gpu-check-out.XXXXXX)"
mkdir -p "$OUT_DIR" || exit 2
# A hard limit under the 8 minutes a check may take: SIGINT first (the script then reports the steps that
# did not run), SIGKILL 20 s later.
LIMIT_S="${GPU_CHECK_LIMIT_S:-450}"
timeout -s INT -k 20 "$LIMIT_S" "$PYTHON" "$REPO/scripts/gpu_check.py" --out "$OUT_DIR" ${ARGS[@]+"${ARGS[@]}"} 2>&1 \
    | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] || [ "$status" = 137 ] && echo "gpu_check: stopped at the ${LIMIT_S} s limit" >&2
exit "$status"
