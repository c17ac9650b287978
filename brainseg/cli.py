"""What every brainseg command does before it starts: XLA defaults, quiet logs,
and joining the other processes of a multi-process run."""
import logging as std_logging
import os
from typing import Sequence

from absl import logging

from brainseg import data
from brainseg import distributed

# XNNPACK kernels for convolutions on XLA's CPU backend: training steps of the
# seed network at 128x128x3, batch 16, went from 9.1 to 10.3 images/s on the
# project's 2-core AVX2 machine (one run, both settings back to back). No effect
# on GPU or TPU. `python -m brainseg.bench` measures it again.
DEFAULT_XLA_FLAGS = ('--xla_cpu_use_xnnpack=true',)
CPU_DEVICES_FLAG = '--xla_force_host_platform_device_count'
# Largest default count of CPU devices: with the default global batch of 16,
# every device keeps at least 2 slices.
MAX_DEFAULT_CPU_DEVICES = 8


def _usable_cores() -> int:
  """Cores this process may use: its CPU affinity, less any cgroup (v2) CPU quota."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  try:
    with open('/sys/fs/cgroup/cpu.max') as f:
      quota, period = f.read().split()[:2]
    if quota != 'max':
      cores = min(cores, max(int(quota) // int(period), 1))
  except (OSError, ValueError):
    pass  # No cgroup v2 quota to honour.
  return max(cores or 1, 1)


def default_cpu_devices(batch_sizes: Sequence[int] = ()) -> int:
  """How many devices XLA's CPU backend should expose: one per usable core, rounded
  down to a power of two, at most 8, and halved until it divides every batch size.

  XLA's CPU backend keeps only ~1.6 of 2 cores busy inside one device's step;
  with one device per core the mesh splits each batch across the cores (data
  parallel), which on the project's 2-core machine trained the seed's 256x256
  step 1.39x and the 128x128x3 step 1.12x faster (results/PERFORMANCE.md, sixth
  session). GPU and TPU runs are unaffected: this only sizes the CPU backend.
  """
  cores = min(_usable_cores(), MAX_DEFAULT_CPU_DEVICES)
  devices = 1 << (cores.bit_length() - 1)
  while devices > 1 and any(b % devices for b in batch_sizes if b > 0):
    devices //= 2
  return devices


def set_default_xla_flags(batch_sizes: Sequence[int] = ()) -> None:
  """Adds brainseg's default XLA flags unless XLA_FLAGS already sets them, and
  `default_cpu_devices(batch_sizes)` CPU devices unless XLA_FLAGS or
  JAX_NUM_CPU_DEVICES says how many, or the run has several processes (each keeps
  one CPU device, so their meshes agree whatever cores each host has).

  Must run before JAX starts its backend (the first computation).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in DEFAULT_XLA_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  if (CPU_DEVICES_FLAG not in flags and 'JAX_NUM_CPU_DEVICES' not in os.environ
      and not distributed.is_multi_process()):
    flags = f'{flags} {CPU_DEVICES_FLAG}={default_cpu_devices(batch_sizes)}'.strip()
  os.environ['XLA_FLAGS'] = flags


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's and grain's INFO chatter (one line per file written)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(f'{os.sep}{lib}{os.sep}' in record.pathname for lib in ('orbax', 'grain'))
    return record.levelno >= std_logging.WARNING or not noisy


def run_main(main_fn, argv) -> None:
  """Runs a command's body; bad data or settings end it with one clear line, exit 1."""
  try:
    main_fn(argv)
  except (data.DataError, FileNotFoundError, ValueError) as e:
    logging.error('%s: %s', type(e).__name__, e)
    raise SystemExit(f'error: {e}') from None


def setup(batch_sizes: Sequence[int] = ()) -> None:
  """Call first thing in a command's main(), with the batch sizes it will shard."""
  set_default_xla_flags(batch_sizes)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize_if_needed()
