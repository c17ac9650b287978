#!/usr/bin/env bash
# Trains configs/cpu.py for 800 steps from scratch and scores it on the test split,
# printing the wall time of each part.   results/time_to_target/run.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
workdir=${1:-/tmp/brainseg/ttt800}
start=$(date +%s)
python3 -m brainseg.main --config configs/cpu.py --workdir "$workdir" --config.num_train_steps=800 --config.eval_every_steps=200 --config.checkpoint_every_steps=800
echo "train wall: $(( $(date +%s) - start )) s"
python3 -m brainseg.evaluate --workdir "$workdir" --split test --output "$workdir/test"
echo "total wall incl. test eval: $(( $(date +%s) - start )) s"
