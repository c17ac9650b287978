r"""Where a train step's time goes: a profile of the compiled step, op by op.

  python -m brainseg.op_profile [--case small128] [--steps 3] [--top 30] [--trace_dir DIR]

Runs the benchmark case's train step under `jax.profiler`, then adds up the
time of every XLA operation (each fusion, convolution, copy...) over the traced
steps and prints the most expensive ones with the model layer they come from
(`FWD`/`BWD` for the forward and backward pass). The trace stays in
`--trace_dir` for TensorBoard's profile plugin or ui.perfetto.dev.
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile
from typing import Dict, List, Tuple

import jax

from brainseg import bench
from brainseg import cli

_OP_NAME = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name="([^"]+)"', re.M)


def op_sources(hlo_text: str) -> Dict[str, Tuple[str, str]]:
  """{instruction name: (result shape, readable source op)} from optimised HLO text."""
  sources = {}
  for name, shape, op_name in _OP_NAME.findall(hlo_text):
    op_name = re.sub(r'^jit\([^)]*\)/', '', op_name)
    op_name = op_name.replace('transpose(jvp(AttentionUNet))', 'BWD').replace(
        'jvp(AttentionUNet)', 'FWD')
    sources[name] = (shape.split('{')[0], op_name)
  return sources


def op_times(trace_dir: str, steps: int) -> Dict[str, float]:
  """Milliseconds per step of each traced event, from the Perfetto trace JSON."""
  path = sorted(glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  totals = collections.Counter()
  for event in events:
    if event.get('ph') == 'X':
      totals[event['name']] += event['dur'] / 1e3 / steps
  return totals


def profile(case: bench.Case, steps: int, trace_dir: str) -> List[dict]:
  """Rows (ms per step, share, instruction, shape, source op), most expensive first."""
  step, state, batch, compiled = bench.train_step_setup(case)
  rng = jax.random.PRNGKey(0)
  for _ in range(2):  # Warm-up outside the trace.
    state, metrics, _ = step(state, batch, rng)
  jax.block_until_ready(metrics)
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics, _ = step(state, batch, rng)
    jax.block_until_ready(metrics)
  sources = op_sources(compiled.as_text())
  times = op_times(trace_dir, steps)
  ops = {name: ms for name, ms in times.items() if name in sources}
  total = sum(ops.values())
  return [{'ms': ms, 'share': ms / total, 'op': name, 'shape': sources[name][0],
           'source': sources[name][1]}
          for name, ms in sorted(ops.items(), key=lambda item: -item[1])]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--case', default='small128', choices=list(bench.CASES))
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=3, help='traced steps after 2 warm-up')
  parser.add_argument('--top', type=int, default=30, help='rows to print')
  parser.add_argument('--trace_dir', default='', help='keep the trace here (default: a temp dir)')
  args = parser.parse_args(argv)
  case = dataclasses.replace(bench.CASES[args.case], dtype=args.dtype)
  cli.set_default_xla_flags((case.batch,))
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix='brainseg-profile-')
  rows = profile(case, args.steps, trace_dir)
  kinds = collections.Counter()
  for row in rows:
    kinds[re.sub(r'\.\d+$', '', row['op'])] += row['ms']
  total = sum(kinds.values())
  print(f'{case.name} {case.dtype}: {total:.1f} ms of XLA ops per step, summed over '
        f'{jax.device_count()} device(s); trace in {trace_dir}')
  print('by kind: ' + ', '.join(f'{k} {100 * ms / total:.0f}%' for k, ms in kinds.most_common(6)))
  for row in rows[:args.top]:
    print(f'{row["ms"]:8.2f} ms {100 * row["share"]:5.1f}%  {row["shape"]:<24} {row["source"]}')


if __name__ == '__main__':
  main()
