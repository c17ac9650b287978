"""Runs brainseg pieces in a process of its own, for tests that need several
(fake) devices or several processes. Not a test file itself.

  python tests/parallel_worker.py equivalence ROOT OUT.npz   (needs 8 fake devices)
  python tests/parallel_worker.py train ROOT WORKDIR [--config.x=y ...]
"""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from brainseg import data  # pylint: disable=wrong-import-position
from brainseg import distributed
from brainseg import input_pipeline
from brainseg import parallel
from brainseg import train
from configs import tiny


def flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def equivalence(root: str, out: str) -> None:
  """Five steps on a mesh of 8 devices and on 1 device, from the same batches."""
  config = tiny.get_config()
  # Adam's first steps are sign-like (m / sqrt(v)): for a near-zero gradient, float
  # rounding that differs between 1 and 8 devices flips a whole +-lr update. SGD keeps
  # updates proportional to gradients, so the comparison tests the sharding alone.
  config.optimizer, config.learning_rate = 'sgd', 0.05
  config.batch_size = 8
  arrays = input_pipeline.load_arrays(list(data.scan(root).values()), 32, 'mri', 'volume')
  batches = [b for _, b in zip(range(5), input_pipeline.train_dataset(arrays, config, 8))]
  results = {}
  for name, devices in (('eight', jax.devices()), ('one', jax.devices()[:1])):
    mesh = parallel.create_mesh(devices)
    state = jax.device_put(train.create_train_state(config, jax.random.PRNGKey(0), 5),
                           parallel.replicated(mesh))
    step = train.compile_train_step(config, mesh)
    for batch in batches:
      state, metrics, _ = step(state, parallel.to_global(batch, mesh), jax.random.PRNGKey(1))
      results.setdefault(f'{name}/loss', []).append(float(metrics.compute()['loss']))
    assert step._cache_size() == 1  # pylint: disable=protected-access
    for key, value in flat({'params': state.params, 'batch_stats': state.batch_stats}).items():
      results[f'{name}/{key}'] = value
  np.savez(out, **results)


def train_run(root: str, workdir: str, overrides) -> None:
  """train_and_evaluate as `brainseg.main` would run it, then this process's params."""
  distributed.initialize_if_needed()
  config = tiny.get_config()
  config.data.root = root
  for override in overrides:  # --config.a.b=value
    key, value = override[len('--config.'):].split('=')
    target = config
    for part in key.split('.')[:-1]:
      target = target[part]
    leaf = key.split('.')[-1]
    target[leaf] = type(target[leaf])(value)
  state = train.train_and_evaluate(config, workdir)
  np.savez(os.path.join(workdir, f'params_{jax.process_index()}.npz'),
           **flat({'params': state.params, 'batch_stats': state.batch_stats}))


if __name__ == '__main__':
  if sys.argv[1] == 'equivalence':
    equivalence(sys.argv[2], sys.argv[3])
  else:
    train_run(sys.argv[2], sys.argv[3], sys.argv[4:])
