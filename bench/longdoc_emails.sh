#!/bin/bash
# Every long-input option on the e-mail set, one after another: train, evaluate, and the table so far.
#   bash bench/longdoc_emails.sh WORKSPACE RESULTS.txt      (alone on the machine: about an hour on 2 cores;
#   the chunked variants read 4 windows of every message and take 15-17 minutes each)
# (recipes/emails-data must exist: python bench/longdoc_emails.py prepare ...). The first variant is also
# evaluated against base zero-shot and TF-IDF + LR; the others against those same predictions.
set -u
ws=${1:?workspace}; out=${2:?results file}
cd "$(dirname "$0")/.." && export PYTHONPATH=$PWD/src
py=${PYTHON:-python}
variant() {
  local tag=$1 systems=$2; shift 2
  local t0=$(date +%s)
  $py -m tuneloop.cli train recipes/emails-long.yaml --workspace "$ws" --no-progress --set name=emails-$tag "$@" 2>&1 \
    | grep -v -i "torchao\|pytree\|register_constant"
  local run=$(ls -td "$ws"/runs/emails-$tag-* | head -1) t1=$(date +%s)
  $py -m tuneloop.cli eval "$run" --workspace "$ws" --no-progress --systems "$systems" 2>&1 \
    | grep -v -i "torchao\|pytree\|register_constant"
  echo "== $tag: train+load ${t1}-${t0}=$((t1 - t0)) s, eval $(( $(date +%s) - t1 )) s, sets: $*" | tee -a "$out"
  $py bench/longdoc_emails.py summarize "$ws" > "$out.table" && cat "$out.table"
}
echo "== $(date -u) bf16 peak: $($py -c 'import sys; sys.path.insert(0, "bench"); from train_throughput import matmul_peak; print(matmul_peak())')" | tee -a "$out"
variant trunc-end base,tuned,tfidf_logreg
variant clean-email tuned --set data.clean=email
variant chunk-mean tuned --set data.long_inputs=chunk
variant trunc-middle tuned --set data.truncate=middle
variant longer-512 tuned --set train.max_length=512
variant chunk-clean tuned --set data.long_inputs=chunk --set data.clean=email
