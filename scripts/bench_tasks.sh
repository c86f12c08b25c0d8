#!/usr/bin/env bash
# Zero-shot benchmark (issue: evaluation harness): prune the SmolLM2 benchmark model with the protocol
# calibration (wikitext2, 64 x 512, seed 0), then run the eight local lm-eval tasks on the dense model and
# each pruned checkpoint (in memory, as loaded) with the protocol WikiText-2 perplexity (seqlen 2048, every
# 8th window), and put them side by side with `llmprune compare`.
#   usage: scripts/bench_tasks.sh [LIMIT] [RUNS_DIR]   (defaults: 100 documents per task, /tmp/llmprune-tasks)
set -euo pipefail
LIMIT=${1:-100}
RUNS=${2:-/tmp/llmprune-tasks}
SHARED=${LLMPRUNE_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
MODEL=${MODEL:-$SHARED/models/smollm2-135m-instruct-q4_1}
TASKS=hellaswag,piqa,arc_easy,arc_challenge,winogrande,boolq,openbookqa,lambada_openai
PY=${PYTHON:-python}
CONFIGS=("magnitude 2:4" "wanda unstructured" "sparsegpt unstructured" "wanda 2:4" "sparsegpt 2:4")
mkdir -p "$RUNS"
clock() { local start=$SECONDS; "$@"; echo "  ($(( SECONDS - start )) s: $*)" | cut -c1-160; }
for config in "${CONFIGS[@]}"; do
  read -r method pattern <<<"$config"
  name="$method-${pattern/:/}"
  [ -e "$RUNS/$name/llmprune.json" ] || clock $PY -m llmprune prune "$MODEL" --method "$method" --pattern "$pattern" \
      --nsamples 64 --seqlen 512 --device cpu --quiet --out "$RUNS/$name" --overwrite
done
EVAL=(--ppl wikitext2 --seqlen 2048 --window-stride 8 --tasks $TASKS --limit "$LIMIT" --device cpu --quiet)
clock $PY -m llmprune eval "$MODEL" "${EVAL[@]}" --json "$RUNS/dense.json"
results=("$RUNS/dense.json"); models=("$MODEL")
for config in "${CONFIGS[@]}"; do
  read -r method pattern <<<"$config"
  name="$method-${pattern/:/}"
  clock $PY -m llmprune eval "$RUNS/$name" "${EVAL[@]}" --json "$RUNS/$name.json"
  results+=("$RUNS/$name.json"); models+=("$RUNS/$name")
done
$PY -m llmprune compare "${models[@]}" --results "${results[@]}" --out "$RUNS/report"
