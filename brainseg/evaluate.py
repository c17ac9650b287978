r"""Evaluates a checkpoint on one split and writes metrics.json and per_patient.csv.

  python -m brainseg.evaluate --workdir DIR --split test --output OUT
  python -m brainseg.evaluate --workdir results/reference --split test --output /tmp/eval

DIR is a training workdir (its best-on-val checkpoint is used) or a `best/`
folder; --step names another saved step. The data root and split come from the
checkpoint's config unless --data_root / --split_file say otherwise. Metric
semantics are in brainseg/metrics.py and the README.
"""
import json
import os
from typing import Any, Dict, Optional

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from brainseg import checkpointing
from brainseg import cli
from brainseg import metrics as metrics_lib
from brainseg import parallel
from brainseg import train
from brainseg import visualize

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'A training workdir, or a best-checkpoint folder.')
flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate; default: the best on val.')
flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'Which part of the split.')
flags.DEFINE_string('output', None, 'Folder for metrics.json and per_patient.csv.')
flags.DEFINE_string('data_root', None, "Override the checkpoint config's data.root.")
flags.DEFINE_string('split_file', None, "Override the checkpoint config's data.split_file.")
flags.DEFINE_integer('overlays', 0, 'Also save this many overlay PNGs (image | truth | '
                     'prediction) of tumour slices, spread over the split.')
config_flags.DEFINE_config_file(
    'config', None, 'Evaluate under this config instead of the one saved with the '
    'checkpoint (it must describe the same model).', lock_config=False)
flags.mark_flags_as_required(['workdir', 'output'])


def check_variables_match(variables: Dict[str, Any], config: ml_collections.ConfigDict,
                          source: str) -> None:
  """Raises ValueError if the checkpoint's arrays do not fit the config's model."""
  model = train.create_model(config)
  expected = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *train.input_shape(config)))))
  shapes = lambda tree: {jax.tree_util.keystr(k): tuple(v.shape)
                         for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = shapes(variables), shapes(expected)
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:4]
    raise ValueError(f'checkpoint {source} does not fit the config (model.features='
                     f'{tuple(config.model.features)}, data.channels={config.data.channels!r}); '
                     f'first differences (name, shape): {diff}')


def evaluate(workdir: str, split: str, output: str, step: Optional[int] = None,
             data_root: Optional[str] = None, split_file: Optional[str] = None,
             num_overlays: int = 0,
             config: Optional[ml_collections.ConfigDict] = None) -> Dict[str, Any]:
  """Runs a checkpoint over a split; writes and returns the metrics.

  Args:
    config: evaluate under this config rather than the checkpoint's own.
  """
  variables, saved_config, step = checkpointing.load_model(workdir, step)
  config = ml_collections.ConfigDict(config or saved_config)
  with config.unlocked():
    if data_root is not None:
      config.data.root = data_root
    if split_file is not None:
      config.data.split_file = split_file
  check_variables_match(variables, config, f'{workdir} step {step}')
  _, arrays = train.load_splits(config, parts=(split,))
  arrays = arrays[split]
  mesh = parallel.create_mesh()
  host_variables = variables
  variables = jax.device_put(variables, parallel.replicated(mesh))
  jit_eval = train.compile_eval_step(train.create_model(config), mesh)
  # Any batch size works: rounded up to fill every device, padding is dropped.
  eval_batch = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()
  counts = train.evaluate_counts(jit_eval, variables, arrays, eval_batch, mesh)
  results = metrics_lib.summarize(arrays.patient_ids, **counts)
  results.update(split=split, checkpoint_step=int(step),
                 checkpoint=os.path.abspath(workdir), data_root=config.data.root,
                 image_size=config.data.image_size, channels=config.data.channels)
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, 'metrics.json'), 'w') as f:
      json.dump(results, f, indent=2)
    per_patient_csv = os.path.join(output, 'per_patient.csv')
    metrics_lib.write_per_patient_csv(per_patient_csv, arrays.patient_ids, **counts)
    visualize.plot_per_patient_dice(per_patient_csv, os.path.join(output, 'per_patient_dice.png'))
    if num_overlays:
      patients = metrics_lib.per_patient_scores(arrays.patient_ids, **counts)
      visualize.save_overlays(output, host_variables, config, arrays, num_overlays,
                              dict(zip(patients['patient'], patients['dice'])))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup()
  results = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.output, FLAGS.step, FLAGS.data_root,
                     FLAGS.split_file, FLAGS.overlays, FLAGS.config)
  s, p = results['per_slice'], results['per_patient']
  print(f"{FLAGS.split} ({results['num_patients']} patients, {results['num_slices']} slices), "
        f"step {results['checkpoint_step']}: per-slice Dice {s['dice']:.4f} precision "
        f"{s['precision']:.4f} recall {s['recall']:.4f}; per-patient Dice mean "
        f"{p['dice_mean']:.4f} median {p['dice_median']:.4f}; global Dice "
        f"{results['global']['dice']:.4f}. Wrote {FLAGS.output}/metrics.json")


if __name__ == '__main__':
  app.run(lambda argv: cli.run_main(main, argv))
