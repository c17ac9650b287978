"""Smoke tests on the real LGG slices in ../shared/data, skipped where it is absent."""
import json
import os

import numpy as np
import pytest

from brainseg import data
from brainseg import input_pipeline
from brainseg import train
from configs import tiny
from tests import conftest

pytestmark = pytest.mark.skipif(not os.path.isdir(conftest.REAL_ROOT),
                                reason='real data not at ../shared/data/kaggle_3m')
SPLIT_FILE = os.path.join(conftest.SHARED_DATA, 'seed_split.json')


def _small_real_root(tmp_path, count):
  """A root of links to the first `count` real patients (nothing is copied)."""
  root = tmp_path / 'kaggle_3m'
  root.mkdir()
  for pid in sorted(os.listdir(conftest.REAL_ROOT))[:count]:
    os.symlink(os.path.join(os.path.abspath(conftest.REAL_ROOT), pid), root / pid)
  return str(root)


def test_seed_split_matches_the_real_root():
  patients = data.scan(conftest.REAL_ROOT, check_sizes=False)
  assert len(patients) == 110
  split = data.load_split_file(SPLIT_FILE, list(patients))
  counts = {part: sum(len(patients[p].slices) for p in split[part]) for part in data.SPLITS}
  assert counts == json.load(open(SPLIT_FILE))['slices'] == {'train': 3329, 'val': 247,
                                                              'test': 353}


def test_real_slices_decode(tmp_path):
  patients = data.scan(_small_real_root(tmp_path, 2))
  patient = next(iter(patients.values()))
  numbers = [s.number for s in patient.slices]
  assert numbers == list(range(1, len(numbers) + 1))
  arrays = input_pipeline.load_arrays([patient], 64, 'gray', 'scale')
  assert arrays.images.shape == (len(numbers), 64, 64, 1)
  assert arrays.native_masks.shape[1:] == (256, 256) and arrays.has_tumour.any()
  image = data.read_image(patient.slices[0].image_path)
  assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and image.max() > 0


def test_two_train_steps_on_real_slices(tmp_path):
  config = tiny.get_config()
  config.data.root = _small_real_root(tmp_path, 4)
  state = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert int(state.step) == 2
  assert os.listdir(tmp_path / 'run' / 'best') == ['2']


REFERENCE = os.path.join(conftest.REPO, 'results', 'reference')


@pytest.mark.skipif(not os.path.isdir(os.path.join(REFERENCE, 'best')),
                    reason='no reference checkpoint in results/reference')
def test_bfloat16_compute_keeps_the_reference_dice_and_trains_finitely(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from brainseg import checkpointing, metrics, parallel  # pylint: disable=g-import-not-at-top
  variables, config, _ = checkpointing.load_model(REFERENCE)
  patients = data.scan(conftest.REAL_ROOT, check_sizes=False)
  test_ids = data.load_split_file(SPLIT_FILE, list(patients))['test'][:3]
  arrays = input_pipeline.load_arrays([patients[p] for p in test_ids], config.data.image_size,
                                      config.data.channels, config.data.normalization)
  mesh = parallel.create_mesh()
  dice = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    jit_eval = train.compile_eval_step(train.create_model(config), mesh)
    counts = train.evaluate_counts(jit_eval, variables, arrays, 16, mesh)
    dice[dtype] = metrics.summarize(arrays.patient_ids, **counts)['per_slice']['dice']
  assert abs(dice['bfloat16'] - dice['float32']) < 0.02, dice

  # 20 bf16 training steps from the reference weights: the loss stays finite.
  state = train.create_train_state(config, jax.random.PRNGKey(0), 20).replace(
      params=variables['params'], batch_stats=variables['batch_stats'])
  state = jax.device_put(state, parallel.replicated(mesh))
  step = train.compile_train_step(config, mesh)
  batches = iter(input_pipeline.train_dataset(arrays, config, 8))
  for _ in range(20):
    state, step_metrics, finite = step(state, parallel.to_global(next(batches), mesh),
                                       jax.random.PRNGKey(0))
    assert bool(finite) and np.isfinite(float(step_metrics.compute()['loss']))


@pytest.mark.skipif(not os.path.isdir(os.path.join(REFERENCE, 'best')),
                    reason='no reference checkpoint in results/reference')
def test_the_reference_is_refused_on_its_training_patients_wherever_the_split_file_is():
  from brainseg import checkpointing, evaluate  # pylint: disable=g-import-not-at-top
  trained_on = checkpointing.load_trained_on(REFERENCE)
  assert trained_on == sorted(json.load(open(SPLIT_FILE))['train'])
  # Its saved split path is relative; from another directory it would not resolve.
  saved = checkpointing.load_saved_config(REFERENCE)
  saved.data.split_file = '/elsewhere/seed_split.json'
  with pytest.raises(ValueError, match='was trained on 1 patient'):
    evaluate.check_not_trained_on([REFERENCE], [saved], sorted(data.scan(conftest.REAL_ROOT)),
                                  {'test': trained_on[:1]})
