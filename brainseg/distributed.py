"""Multi-process start-up: `jax.distributed.initialize` only when a run asks for it.

A run is multi-process when the environment names a coordinator
(BRAINSEG_COORDINATOR, BRAINSEG_NUM_PROCESSES, BRAINSEG_PROCESS_ID), when
SLURM started several tasks, or on a Cloud TPU VM slice (JAX finds the slice
itself). With none of these it stays one process and needs no cluster.
"""
import os

from absl import logging
import jax


def initialize_if_needed() -> None:
  """Joins the job's processes together, if there is more than one."""
  env = os.environ
  if 'BRAINSEG_COORDINATOR' in env:
    jax.distributed.initialize(coordinator_address=env['BRAINSEG_COORDINATOR'],
                               num_processes=int(env['BRAINSEG_NUM_PROCESSES']),
                               process_id=int(env['BRAINSEG_PROCESS_ID']))
  elif int(env.get('SLURM_NTASKS', '1')) > 1 or env.get('TPU_WORKER_HOSTNAMES', '').count(','):
    jax.distributed.initialize()  # SLURM and Cloud TPU are detected automatically.
  else:
    return
  logging.info('Process %d of %d joined', jax.process_index(), jax.process_count())
