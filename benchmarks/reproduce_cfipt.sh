#!/usr/bin/env bash
# Reproduces the CF-IPT tables of the closing note (issue 5): two lanes that can run side by side on two cores.
#   benchmarks/reproduce_cfipt.sh real        # Houston2013 real pixel set (p = 1), needs ../shared/data
#   benchmarks/reproduce_cfipt.sh synthetic   # synthetic houston-like (p = 11), embedded default, offline
#   benchmarks/reproduce_cfipt.sh ablations   # CF-IPT ablations on the synthetic scene
# Results: runs/cfipt/<dataset>/<config>/{summary.json, seed*/metrics.json}. CPU budget: epochs and the
# test-pixel cap are set for a 2-core machine; raise EPOCHS / MAX_TEST on a GPU (--device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RS=".venv/bin/rs-lab train"
EPOCHS=${EPOCHS:-10}; SEEDS=${SEEDS:-"0 1 2"}; OUT=${OUT:-runs}; MAX_TEST=${MAX_TEST:-2000}
COMMON="--shots 40 --val-per-class 10 --out $OUT --exp cfipt --no-progress"
REAL="--data houston2013-pixelset --root ../shared/data/houston2013 --patch-size 1"
SYN="--data synthetic-houston-like --param size=96x256 --param seed=0 --pool all --patch-size 11 --max-test-pixels $MAX_TEST"
case "${1:-}" in
  real)
    for m in svm rf; do $RS $m $REAL $COMMON --seeds $SEEDS; done
    for m in linear-probe coop cfipt; do $RS $m $REAL $COMMON --seeds $SEEDS --epochs $EPOCHS --backbone rs-tiny; done ;;
  synthetic)
    for m in svm rf; do $RS $m $SYN $COMMON --seeds $SEEDS; done
    $RS zeroshot $SYN $COMMON --seeds $SEEDS --backbone rs-tiny
    for m in linear-probe coop cfipt; do $RS $m $SYN $COMMON --seeds $SEEDS --epochs $EPOCHS --backbone rs-tiny; done ;;
  ablations)
    for m in cfipt-bilinear cfipt-concat cfipt-ones cfipt-vision-only cfipt-no-interaction cfipt-transformer maple; do
      $RS $m $SYN $COMMON --seeds ${ABL_SEEDS:-$SEEDS} --epochs $EPOCHS --backbone rs-tiny; done ;;
  *) echo "usage: $0 real|synthetic|ablations" >&2; exit 2 ;;
esac
