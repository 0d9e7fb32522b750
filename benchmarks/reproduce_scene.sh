#!/usr/bin/env bash
# Reproduces the scene-classification tables (benchmarks/RESULTS.md, "Scene classification") on the embedded default:
# rs-tiny, the synthetic scene benchmark (see nbs/73_scene.protocol.ipynb), 16 shots, 4 validation images per class,
# every trainable method at its registry scene budget (--budget method; train/curve.png in every seed folder), and
# each seed reporting the validation-selected and the last-epoch model.
#   benchmarks/reproduce_scene.sh b2n        # base-to-novel on sentinel-autumn: Base / New / H, all methods + BiMoRS ablations + masked captions
#   benchmarks/reproduce_scene.sh dg         # domain generalisation: source aerial-rgb -> sentinel-like, sentinel-autumn
#   benchmarks/reproduce_scene.sh dg-unseen  # DG from a source with headroom: sentinel-like -> sentinel-autumn, aerial-autumn
#   benchmarks/reproduce_scene.sh fewshot    # few-shot on sentinel-autumn (22 classes)
#   benchmarks/reproduce_scene.sh cross      # cross-dataset: sentinel-autumn 22 classes -> 14 scenes under other class words
#   benchmarks/reproduce_scene.sh report     # tables + paired per-seed differences (95 % CI) against CoCoOp
# Seeds run outermost (every method of seed 1 before seed 2), so an interrupted lane still has paired seeds.
# CPU time on 2 cores (two lanes side by side, OMP_NUM_THREADS=1 each): 25-40 min a lane (per-image prompts cost a B x K text pass per step).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RS=".venv/bin/rs-lab train"
SEEDS=${SEEDS:-"1 2 3"}; OUT=${OUT:-runs}
COMMON="--out $OUT --exp scene --no-progress --budget method"
BASELINES="zeroshot linear-probe coop cocoop maple bimors"
ABLATIONS="bimors-no-caption bimors-no-metanet bimors-frozen-proj"
lane() {   # lane PROTOCOL "METHODS" [extra options]: every method per seed, then the masked-caption BiMoRS
  local proto=$1 methods=$2; shift 2
  for s in $SEEDS; do
    for m in $methods; do $RS $m --protocol $proto $COMMON --seeds $s "$@"; done
    $RS bimors --protocol $proto $COMMON --seeds $s --captioner synthetic-masked "$@"
  done
}
case "${1:-}" in
  b2n) lane b2n "$BASELINES $ABLATIONS" ;;
  dg) lane dg "$BASELINES" --param domain=aerial-rgb ;;
  dg-unseen) lane dg "$BASELINES" --param domain=sentinel-like ;;
  fewshot) lane fewshot "$BASELINES" ;;
  cross) lane cross "$BASELINES" ;;
  report)   # re-summarise every configuration over all seeds, then the tables (a seed that has not finished is trained now)
    for l in b2n dg dg-unseen fewshot cross; do
      proto=$l; extra=(); pattern="*"
      case $l in
        dg) extra=(--param domain=aerial-rgb); pattern="*domainaerial-rgb*" ;;
        dg-unseen) proto=dg; extra=(--param domain=sentinel-like); pattern="*domainsentinel-like*" ;;
      esac
      compgen -G "$OUT/scene/$proto/$pattern" > /dev/null || continue   # lanes that never ran are left out
      methods="$BASELINES"; [ $l = b2n ] && methods="$BASELINES $ABLATIONS"
      for m in $methods; do $RS $m --protocol $proto $COMMON --seeds $SEEDS "${extra[@]}"; done
      $RS bimors --protocol $proto $COMMON --seeds $SEEDS --captioner synthetic-masked "${extra[@]}"
    done
    .venv/bin/rs-lab results $OUT/scene --reference cocoop-rs-tiny-k16-mbudget ;;
  *) echo "usage: $0 b2n|dg|dg-unseen|fewshot|cross|report" >&2; exit 2 ;;
esac
