r"""Throughput benchmark: train step, eval step, input pipeline, end to end.

  python -m brainseg.bench [--cases seed256,small128,cpu_config] [--compare-torch]
                           [--json results/bench.json] [--steps 10]

Each timing is the median over `--steps` repetitions after warm-up, with the
spread (min, max). Achieved GFLOP/s come from XLA's cost analysis of the
compiled step, summed over the mesh's devices; the peak is a matmul measured in
the same run on one device, times the number of chips (on the CPU backend all
devices share the same cores, so the peak counts once), so `peak_fraction`
compares like with like. `--compare-torch` runs the
PyTorch peer (../shared/bench/torch_reference.py: the seed's network) in the same
run with the same batch, size, channels and threads, and prints the ratio.
"""
import argparse
import dataclasses
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from brainseg import cli
from brainseg import data
from brainseg import input_pipeline
from brainseg import parallel
from brainseg import train

TORCH_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               '..', 'shared', 'bench', 'torch_reference.py')


@dataclasses.dataclass
class Case:
  name: str
  size: Optional[int]  # The slices' side; None: the config module's data.image_size.
  channels: str  # 'gray' (1 channel) or 'mri' (3)
  batch: int
  config_module: Optional[str] = None  # Take the rest of the recipe from this config.
  dtype: str = 'float32'  # The model's compute dtype (params stay float32).


EVAL_BATCH = 32  # The eval forward pass's batch, for every case.
CASES = {
    'seed256': Case('seed256', 256, 'gray', 16),
    'small128': Case('small128', 128, 'mri', 16),
    'cpu_config': Case('cpu_config', None, 'mri', 16, 'configs.cpu'),
}


def timed(fn: Callable[[], object], steps: int, warmup: int = 2) -> Dict[str, float]:
  """Median, min and max seconds of `fn()` (which must block until done)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {'median': statistics.median(times), 'min': min(times), 'max': max(times)}


def matmul_peak_gflops(n: int = 2048, steps: int = 10, dtype: str = 'float32') -> float:
  """Matmul GFLOP/s on the default device in `dtype`: the peak the steps are held to."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  t = timed(lambda: f(a).block_until_ready(), steps)
  return 2 * n ** 3 / t['median'] / 1e9


def _flops(compiled) -> float:
  """FLOPs of one call over all devices: XLA's cost analysis of the
  partitioned program counts one device's share of the batch."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # Older JAX returns one dict per device program.
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0)) * jax.device_count()


def _peak_chips() -> int:
  """How many times the one-device matmul peak the mesh can reach: CPU devices
  share one machine's cores (the peak matmul already uses them all); GPUs and
  TPUs each bring their own."""
  return jax.process_count() if jax.default_backend() == 'cpu' else jax.device_count()


def _peak_memory_mb(compiled) -> float:
  """XLA's own account of the compiled step's live memory on one device:
  arguments, outputs and temporaries (activations kept for the backward pass),
  less donated buffers.

  Computed from the parts because on the CPU backend (jaxlib 0.10.2)
  `peak_memory_in_bytes` covers the arguments only (e.g. 28 MB against 672 MB of
  temporaries for the 128x128x3 train step).
  """
  stats = compiled.memory_analysis()
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
           + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  return max(total, getattr(stats, 'peak_memory_in_bytes', 0) or 0) / 2 ** 20


def _max_rss_mb() -> float:
  """The largest resident set this process has had so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(case: Case) -> ml_collections.ConfigDict:
  config = importlib.import_module(case.config_module or 'configs.default').get_config()
  config.data.image_size = case.size or config.data.image_size
  config.data.channels = case.channels
  config.batch_size = case.batch
  config.model.dtype = case.dtype
  return config


def _input_size(case: Case, mode: str) -> int:
  """The side of what the network sees: a crop when training a crop_size config."""
  return train.input_shape(_config(case), training=mode != 'eval')[0]


def _record(case: Case, mode: str, impl: str, batch: int, t: Dict[str, float], **extra):
  return {'case': case.name, 'mode': mode, 'impl': impl, 'batch': batch,
          'size': _input_size(case, mode), 'channels': input_pipeline.CHANNELS[case.channels],
          'dtype': case.dtype,
          'images_per_sec': batch / t['median'], 'sec_per_step': t['median'],
          'sec_min': t['min'], 'sec_max': t['max'], **extra}


def train_step_setup(case: Case):
  """The jitted train step of `case`, a fresh state, a random global batch, and
  the step compiled for them (for XLA's cost and memory analyses)."""
  config = _config(case)
  mesh = parallel.create_mesh()
  rng = np.random.default_rng(0)
  shape = train.input_shape(config, training=True)
  batch = {'image': rng.normal(size=(case.batch, *shape)).astype(np.float32),
           'mask': (rng.random((case.batch, *shape[:2], 1)) > 0.9).astype(np.float32)}
  batch = parallel.to_global(batch, mesh)
  state = jax.device_put(train.create_train_state(config, jax.random.PRNGKey(0), 100),
                         parallel.replicated(mesh))
  step = train.compile_train_step(config, mesh)
  return step, state, batch, step.lower(state, batch, jax.random.PRNGKey(0)).compile()


def bench_steps(case: Case, steps: int, peak: float):
  """Train step (batch = case.batch) and eval step (batch 32) on random data.

  Returns:
    (records, (step function, state holder)) for reuse by the end-to-end case.
  """
  config = _config(case)
  mesh = parallel.create_mesh()
  step, state, batch, compiled = train_step_setup(case)
  flops = _flops(compiled)
  holder = {'state': state}

  def run_train():
    holder['state'], metrics, _ = step(holder['state'], batch, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)

  t = timed(run_train, steps)
  records = [_record(case, 'train', 'brainseg', case.batch, t,
                     gflops_per_sec=flops / t['median'] / 1e9,
                     peak_fraction=flops / t['median'] / 1e9 / peak,
                     xla_peak_memory_mb=_peak_memory_mb(compiled) * jax.local_device_count(),
                     xla_peak_memory_mb_per_device=_peak_memory_mb(compiled),
                     process_max_rss_mb=_max_rss_mb())]
  model = train.create_model(config)
  shape, rng = train.input_shape(config), np.random.default_rng(1)
  eval_images = parallel.to_global(
      {'image': rng.normal(size=(EVAL_BATCH, *shape)).astype(np.float32)}, mesh)['image']
  variables = train.model_variables(holder['state'])
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  eval_flops = _flops(forward.lower(variables, eval_images).compile())
  t = timed(lambda: forward(variables, eval_images).block_until_ready(), steps)
  records.append(_record(case, 'eval', 'brainseg', EVAL_BATCH, t,
                         gflops_per_sec=eval_flops / t['median'] / 1e9,
                         peak_fraction=eval_flops / t['median'] / 1e9 / peak))
  return records, (step, holder)


def bench_pipeline(case: Case, data_root: str, steps: int, patients: int,
                   step, holder) -> List[dict]:
  """The grain loader alone, and loader + the (compiled) train step, on real TIFFs."""
  config = _config(case)
  scanned = data.scan(data_root)
  chosen = [scanned[p] for p in sorted(scanned)[:patients]]
  start = time.perf_counter()
  arrays = input_pipeline.load_arrays(chosen, config.data.image_size, config.data.channels,
                                      config.data.normalization, config.data.num_threads)
  cache_seconds = time.perf_counter() - start
  iterator = iter(input_pipeline.train_dataset(arrays, config, case.batch))
  t = timed(lambda: next(iterator), steps * 5, warmup=5)
  records = [_record(case, 'loader', 'brainseg', case.batch, t, cache_seconds=cache_seconds,
                     cached_slices=len(arrays), augment=bool(config.augment.enabled))]
  mesh = parallel.create_mesh()

  def run_end_to_end():
    holder['state'], metrics, _ = step(holder['state'],
                                       parallel.to_global(next(iterator), mesh),
                                       jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)

  t = timed(run_end_to_end, steps)
  records.append(_record(case, 'end_to_end', 'brainseg', case.batch, t))
  return records


def bench_torch(case: Case, mode: str, steps: int) -> Optional[dict]:
  """The PyTorch peer, same network, batch, size, channels and threads."""
  batch = case.batch if mode == 'train' else EVAL_BATCH
  command = [sys.executable, TORCH_REFERENCE, '--mode', mode, '--batch', str(batch),
             '--size', str(_input_size(case, mode)),
             '--cin', str(input_pipeline.CHANNELS[case.channels]),
             '--steps', str(steps), '--threads', str(os.cpu_count())]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    print(f'torch peer failed: {result.stderr[-500:]}', file=sys.stderr)
    return None
  out = json.loads(result.stdout.strip().splitlines()[-1])
  return {'case': case.name, 'mode': mode, 'impl': 'torch', 'batch': batch,
          'size': _input_size(case, mode),
          'channels': out['cin'], 'images_per_sec': out['images_per_sec'],
          'sec_per_step': out['sec_per_step'], 'threads': out['threads']}


def format_table(records: List[dict]) -> str:
  lines = [f'{"case":<11} {"mode":<10} {"impl":<8} {"batch":>5} {"img/s":>8} '
           f'{"spread s/step":>15} {"GFLOP/s":>8} {"peak":>6} {"vs torch":>8} {"XLA MiB":>8}']
  torch = {(r['case'], r['mode']): r['images_per_sec'] for r in records if r['impl'] == 'torch'}
  for r in records:
    spread = f'{r["sec_min"]:.3f}-{r["sec_max"]:.3f}' if 'sec_min' in r else ''
    gflops = f'{r["gflops_per_sec"]:.1f}' if 'gflops_per_sec' in r else ''
    peak = f'{100 * r["peak_fraction"]:.0f}%' if 'peak_fraction' in r else ''
    ratio = torch.get((r['case'], r['mode']))
    ratio = f'{r["images_per_sec"] / ratio:.2f}x' if ratio and r['impl'] == 'brainseg' else ''
    memory = f'{r["xla_peak_memory_mb"]:.0f}' if 'xla_peak_memory_mb' in r else ''
    lines.append(f'{r["case"]:<11} {r["mode"]:<10} {r["impl"]:<8} {r["batch"]:>5} '
                 f'{r["images_per_sec"]:>8.2f} {spread:>15} {gflops:>8} {peak:>6} {ratio:>8} '
                 f'{memory:>8}')
  return '\n'.join(lines)


def run(cases: List[str], steps: int, compare_torch: bool, data_root: Optional[str],
        patients: int, dtype: str = 'float32', batch: int = 0) -> Dict:
  peak = matmul_peak_gflops(dtype=dtype) * _peak_chips()
  records = []
  if data_root and not os.path.isdir(data_root):
    print(f'No data at --data-root {data_root}: the loader and end-to-end cases are skipped.')
  for name in cases:
    case = dataclasses.replace(CASES[name], dtype=dtype, batch=batch or CASES[name].batch)
    step_records, (step, holder) = bench_steps(case, steps, peak)
    records += step_records
    if data_root and os.path.isdir(data_root):
      records += bench_pipeline(case, data_root, steps, patients, step, holder)
    if compare_torch:
      records += [r for r in (bench_torch(case, m, steps) for m in ('train', 'eval')) if r]
  return {'device': str(jax.devices()[0].device_kind), 'backend': jax.default_backend(),
          'device_count': jax.device_count(), 'cpu_count': os.cpu_count(),
          'matmul_peak_gflops': peak, 'dtype': dtype, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'jax': jax.__version__, 'records': records}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, of {list(CASES)}')
  parser.add_argument('--steps', type=int, default=10, help='timed repetitions after 2 warm-up')
  parser.add_argument('--compare-torch', action='store_true', help='also run the PyTorch peer')
  parser.add_argument('--data-root', default='../shared/data/kaggle_3m',
                      help='real TIFFs for the loader and end-to-end cases ("" to skip)')
  parser.add_argument('--patients', type=int, default=20, help='patients decoded for the loader')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help='compute dtype of the model and of the matmul peak')
  parser.add_argument('--batch', type=int, default=0,
                      help='train batch of every case, for the peer too (default 0: each case\'s own)')
  parser.add_argument('--json', help='also write the records to this file')
  args = parser.parse_args(argv)
  if args.batch < 0:
    parser.error(f'--batch must be 0 (each case\'s own) or positive, got {args.batch}')
  unknown = sorted(set(args.cases.split(',')) - set(CASES))
  if unknown:
    parser.error(f'unknown case(s) {unknown}; the cases are {list(CASES)}')
  batches = [args.batch or CASES[name].batch for name in args.cases.split(',')] + [EVAL_BATCH]
  cli.set_default_xla_flags(batches)
  uneven = [b for b in batches if b % jax.device_count()]
  if uneven:
    parser.error(f'batch {uneven[0]} does not split over the {jax.device_count()} devices: '
                 'choose --batch (and JAX_NUM_CPU_DEVICES on a CPU) so it divides evenly')
  result = run(args.cases.split(','), args.steps, args.compare_torch, args.data_root,
               args.patients, args.dtype, args.batch)
  print(f'{result["device_count"]} x {result["device"]} ({result["backend"]}), {args.dtype} '
        f'matmul peak {result["matmul_peak_gflops"]:.0f} GFLOP/s (the torch peer is always float32)')
  print(format_table(result['records']))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as out:
      json.dump(result, out, indent=2)


if __name__ == '__main__':
  main()
