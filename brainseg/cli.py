"""What every brainseg command does before it starts: XLA defaults, quiet logs,
and joining the other processes of a multi-process run."""
import logging as std_logging
import os

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


def default_cpu_devices() -> int:
  """How many devices XLA's CPU backend should expose: one per usable core,
  rounded down to a power of two (so power-of-two batches split evenly).

  XLA's CPU backend keeps only ~1.6 of 2 cores busy inside one device's step;
  with one device per core the mesh splits each batch across the cores (data
  parallel), which on the project's 2-core machine trained the seed's 256x256
  step 1.39x and the 128x128x3 step 1.12x faster (results/PERFORMANCE.md, fifth
  session). GPU and TPU runs are unaffected: this only sizes the CPU backend.
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  cores = min(max(cores or 1, 1), MAX_DEFAULT_CPU_DEVICES)
  return 1 << (cores.bit_length() - 1)


def set_default_xla_flags() -> None:
  """Adds brainseg's default XLA flags unless XLA_FLAGS already sets them, and
  one CPU device per core unless XLA_FLAGS or JAX_NUM_CPU_DEVICES says how many.

  Must run before JAX starts its backend (the first computation).
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in DEFAULT_XLA_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  if CPU_DEVICES_FLAG not in flags and 'JAX_NUM_CPU_DEVICES' not in os.environ:
    flags = f'{flags} {CPU_DEVICES_FLAG}={default_cpu_devices()}'.strip()
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


def setup() -> None:
  """Call first thing in a command's main()."""
  set_default_xla_flags()
  logging.get_absl_handler().addFilter(_QuietLibraries())
  distributed.initialize_if_needed()
