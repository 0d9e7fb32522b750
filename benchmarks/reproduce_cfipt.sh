#!/usr/bin/env bash
# Reproduces the CF-IPT tables (benchmarks/RESULTS.md): lanes that can run side by side on two cores.
# Every trainable method runs its registry budget in optimiser steps (--budget method; see rs_prompt_lab.methods),
# leaves train/curve.png in each seed folder, and the synthetic lanes use a spatially honest split (--guard window:
# no test pixel inside a training/validation window). Set BUDGET="--epochs 10" for the first wave's budget.
#   benchmarks/reproduce_cfipt.sh real        # Houston2013 real pixel set (p = 1), needs ../shared/data
#   benchmarks/reproduce_cfipt.sh synthetic   # synthetic houston-like (p = 11), embedded default, offline
#   benchmarks/reproduce_cfipt.sh ablations   # CF-IPT ablations on the synthetic scene (5 seeds)
#   benchmarks/reproduce_cfipt.sh report      # the tables with paired differences against CF-IPT
# Results: runs/cfipt/<dataset>/<config>/{summary.json, seed*/metrics.json}. CPU budget: epochs and the
# test-pixel cap are set for a 2-core machine; raise MAX_TEST on a GPU (--device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RS=".venv/bin/rs-lab train"
BUDGET=${BUDGET:-"--budget method"}; SEEDS=${SEEDS:-"0 1 2"}; ABL_SEEDS=${ABL_SEEDS:-"0 1 2 3 4"}; OUT=${OUT:-runs}; MAX_TEST=${MAX_TEST:-2000}
GUARD=${GUARD:-"--guard window"}
COMMON="--shots 40 --val-per-class 10 --out $OUT --exp cfipt --no-progress"
REAL="--data houston2013-pixelset --root ../shared/data/houston2013 --patch-size 1"
SYN="--data synthetic-houston-like --param size=96x256 --param seed=0 --pool all --patch-size 11 --max-test-pixels $MAX_TEST $GUARD"
case "${1:-}" in
  real)
    for m in svm rf; do $RS $m $REAL $COMMON --seeds $SEEDS; done
    for m in linear-probe linear-probe-full coop maple cfipt; do $RS $m $REAL $COMMON --seeds $SEEDS $BUDGET --backbone rs-tiny; done ;;
  synthetic)
    for m in svm rf; do $RS $m $SYN $COMMON --seeds $SEEDS; done
    $RS zeroshot $SYN $COMMON --seeds $SEEDS --backbone rs-tiny
    for m in linear-probe coop maple cfipt; do $RS $m $SYN $COMMON --seeds $SEEDS $BUDGET --backbone rs-tiny; done ;;
  ablations)   # the full model runs the same 5 seeds, so every ablation is paired with it seed by seed
    for m in cfipt cfipt-bilinear cfipt-concat cfipt-ones cfipt-vision-only cfipt-no-interaction cfipt-transformer maple; do
      $RS $m $SYN $COMMON --seeds $ABL_SEEDS $BUDGET --backbone rs-tiny; done ;;
  report)   # tables + paired per-seed differences (95 % CI) against CF-IPT, per dataset
    .venv/bin/rs-lab results $OUT/cfipt --reference cfipt-rs-tiny-k40-p1-mbudget
    .venv/bin/rs-lab results $OUT/cfipt --reference cfipt-rs-tiny-k40-p11-mbudget-poolall-guardwindow ;;
  *) echo "usage: $0 real|synthetic|ablations|report" >&2; exit 2 ;;
esac
