#!/usr/bin/env bash
# Reproduces results/reference: train configs/cpu.py on the seed split, evaluate the
# best-on-val checkpoint on the test split, plot, and copy the small artefacts into
# results/reference, replacing the committed ones.
#   launch/reference_cpu.sh [WORKDIR] [--config.x=y ...]
set -euo pipefail
cd "$(dirname "$0")/.."
workdir=${1:-/tmp/brainseg/cpu_reference}
shift $(( $# < 1 ? $# : 1 ))
out=results/reference
start=$(date +%s)
python3 -m brainseg.main --config configs/cpu.py --workdir "$workdir" "$@"
echo "training wall time: $(( $(date +%s) - start )) s"
rm -f "$out"/overlay_*.png  # The overlays name their patients; drop the last run's.
python3 -m brainseg.evaluate --workdir "$workdir" --split test --output "$out" --overlays 6
python3 -m brainseg.evaluate --workdir "$workdir" --split val --postprocess none --output "$out/val"
python3 -m brainseg.visualize --workdir "$workdir" --output "$out"
rm -rf "$out/best" && cp -r "$workdir/best" "$out/best"
cp "$workdir/metrics.jsonl" "$workdir/config.json" "$out/"
