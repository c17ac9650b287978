#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: copy the code to every worker, install, and run the
# same command on all of them (JAX finds the other hosts of the slice by itself).
#   launch/tpu_vm.sh TPU_NAME ZONE [CONFIG] [WORKDIR] [--config.x=y ...]
# WORKDIR must be a folder every worker sees (Filestore/NFS, or a bucket mounted with
# gcsfuse): checkpoints are written by all hosts together. The data root must be
# readable on every worker:  --config.data.root=/mnt/data/kaggle_3m
set -euo pipefail
name=${1:?TPU name}
zone=${2:?zone}
config=${3:-configs/tpu.py}
workdir=${4:?give a workdir on a file system every worker sees}
shift $(( $# < 4 ? $# : 4 ))
cd "$(dirname "$0")/.."
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "mkdir -p brainseg-src"
gcloud compute tpus tpu-vm scp --recurse --zone "$zone" --worker=all \
  brainseg configs requirements.txt "$name":brainseg-src/
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  cd brainseg-src && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' &&
  python3 -m brainseg.main --config $config --workdir $workdir $*"
