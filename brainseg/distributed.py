"""Multi-process start-up: `jax.distributed.initialize` only when a run asks for it.

A run is multi-process when the environment names a coordinator
(BRAINSEG_COORDINATOR, BRAINSEG_NUM_PROCESSES, BRAINSEG_PROCESS_ID), when
SLURM started several tasks, or on a Cloud TPU VM slice (JAX finds the slice
itself). With none of these it stays one process and needs no cluster.
"""
import os

from absl import logging
import jax


def _auto_detected() -> bool:
  """SLURM with several tasks, or a multi-host Cloud TPU slice."""
  env = os.environ
  return int(env.get('SLURM_NTASKS', '1')) > 1 or bool(env.get('TPU_WORKER_HOSTNAMES', '').count(','))


def is_multi_process() -> bool:
  """Whether this run will join other processes (readable before JAX starts)."""
  return 'BRAINSEG_COORDINATOR' in os.environ or _auto_detected()


def initialize_if_needed() -> None:
  """Joins the job's processes together, if there is more than one."""
  env = os.environ
  if 'BRAINSEG_COORDINATOR' in env:
    jax.distributed.initialize(coordinator_address=env['BRAINSEG_COORDINATOR'],
                               num_processes=int(env['BRAINSEG_NUM_PROCESSES']),
                               process_id=int(env['BRAINSEG_PROCESS_ID']))
  elif _auto_detected():
    jax.distributed.initialize()  # SLURM and Cloud TPU are detected automatically.
  else:
    return
  logging.info('Process %d of %d joined', jax.process_index(), jax.process_count())
