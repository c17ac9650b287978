#!/usr/bin/env bash
# A/B of the CPU device count: the train and eval steps on 1 XLA CPU device vs 2
# (the batch split over the 2 cores), interleaved, two rounds, on idle cores.
# Usage (from the repository root): results/bench/cpu_devices/run.sh OUT_DIR
# The recorded runs (2026-12-04 21:49-21:57) were made at commit 0a75d3d, where an
# empty XLA_FLAGS meant 1 device; since then 1 must be asked for, as below.
set -u
OUT=${1:?usage: run.sh OUT_DIR}
mkdir -p "$OUT"
for round in 1 2; do
  for devices in 1 2; do
    name=$([ $devices = 1 ] && echo one || echo two)_r$round
    /usr/bin/time -v env XLA_FLAGS="--xla_force_host_platform_device_count=$devices" \
      python3 -m brainseg.bench --cases small128,seed256 --steps 7 --data-root '' \
      --json "$OUT/$name.json" > "$OUT/$name.log" 2> "$OUT/$name.time"
  done
done
