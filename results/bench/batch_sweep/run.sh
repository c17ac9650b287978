#!/bin/bash
# The batch-size sweep of results/PERFORMANCE.md ("Fourth session"): the train step
# and the PyTorch peer at batch 8, 16 and 32, one benchmark run per batch size.
#   results/bench/batch_sweep/run.sh [OUTPUT_DIR]   (default: this folder)
set -e
cd "$(dirname "$0")/../../.."
out=${1:-results/bench/batch_sweep}
mkdir -p "$out"
for b in 8 16 32; do
  python3 -m brainseg.bench --cases seed256,small128 --compare-torch --data-root "" \
      --batch $b --steps 8 --json "$out/batch$b.json" > "$out/batch$b.log" 2>&1
done
