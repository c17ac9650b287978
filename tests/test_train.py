"""The train and eval steps in-process: padding never reaches a metric, one compile."""
import jax
import numpy as np

from brainseg import data
from brainseg import input_pipeline
from brainseg import metrics
from brainseg import parallel
from brainseg import train
from configs import tiny


def test_eval_counts_match_direct_prediction_with_padding(tiny_root):
  config = tiny.get_config()
  arrays = input_pipeline.load_arrays(list(data.scan(tiny_root).values()), 32, 'mri', 'volume')
  state = train.create_train_state(config, jax.random.PRNGKey(0), 10)
  variables = train.model_variables(state)
  mesh = parallel.create_mesh()
  jit_eval = train.compile_eval_step(train.create_model(config), mesh)
  counts = train.evaluate_counts(jit_eval, variables, arrays, 5, mesh)  # 36 = 7 * 5 + 1
  assert jit_eval._cache_size() == 1  # pylint: disable=protected-access  (padded last batch)
  probs = train.predict_probs(variables, arrays.images, (32, 32), state.apply_fn)
  expected = metrics.slice_counts(probs, arrays.native_masks)
  for name, want in zip(('intersection', 'predicted', 'true'), expected):
    np.testing.assert_array_equal(counts[name], np.asarray(want), err_msg=name)
  assert counts['true'].sum() == arrays.native_masks.sum()


def test_train_step_compiles_once_and_learns(tiny_root):
  config = tiny.get_config()
  config.augment.enabled = False
  arrays = input_pipeline.load_arrays(list(data.scan(tiny_root).values()), 32, 'mri', 'volume')
  mesh = parallel.create_mesh()
  state = jax.device_put(train.create_train_state(config, jax.random.PRNGKey(0), 40),
                         parallel.replicated(mesh))
  step = train.compile_train_step(config, mesh)
  batches = iter(input_pipeline.train_dataset(arrays, config, 4))
  losses = []
  for _ in range(40):
    state, step_metrics, finite = step(state, parallel.to_global(next(batches), mesh),
                                       jax.random.PRNGKey(1))
    assert bool(finite)
    losses.append(float(step_metrics.compute()['loss']))
  assert step._cache_size() == 1  # pylint: disable=protected-access
  assert int(state.step) == 40
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
