#!/usr/bin/env bash
# Train on one host with all its GPUs: jit shards each batch over every GPU.
#   launch/gpu_node.sh [CONFIG] [WORKDIR] [--config.x=y ...]
# First install JAX with CUDA:  pip install -r requirements.txt 'jax[cuda12]==0.10.2'
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/gpu.py}
workdir=${2:-/tmp/brainseg/gpu}
shift $(( $# < 2 ? $# : 2 ))
exec python3 -m brainseg.main --config "$config" --workdir "$workdir" "$@"
