"""The commands as users run them: train, preempt, resume, evaluate (subprocesses)."""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from brainseg import checkpointing
from brainseg import evaluate
from brainseg import writers
from tests import conftest


def _train_command(root, workdir, *overrides):
  return [sys.executable, '-m', 'brainseg.main', '--config', 'configs/tiny.py',
          '--workdir', str(workdir), f'--config.data.root={root}', *overrides]


def _run(command, **kwargs):
  result = subprocess.run(command, cwd=conftest.REPO, env=conftest.subprocess_env(),
                          capture_output=True, text=True, timeout=300, **kwargs)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _tensorboard_scalars(workdir):
  events = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  scalars = {}
  for tag in events.Tags()['tensors']:
    values = {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in events.Tensors(tag)}
    if all(v.ndim == 0 for v in values.values()):  # Skips hparams and text summaries.
      scalars[tag] = {step: float(v) for step, v in values.items()}
  return scalars


def _final_state(workdir):
  """The latest train-state checkpoint of a workdir, as numpy arrays by path."""
  import jax
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_handlers={'state': ocp.StandardCheckpointHandler()})
  # The CLI may have run on more devices than this process has.
  state = checkpointing.restore_on_one_device(manager, manager.latest_step(), 'state')
  manager.close()
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(state)}


def _assert_same_state(workdir_a, workdir_b):
  a, b = _final_state(workdir_a), _final_state(workdir_b)
  assert a.keys() == b.keys()
  assert any('opt_state' in k for k in a) and any('batch_stats' in k for k in a)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _losses(workdir):
  return {r['step']: r['loss'] for r in writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if 'loss' in r}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """Two real train steps of configs/tiny.py on a synthetic tree."""
  from tests import synthetic
  tmp = tmp_path_factory.mktemp('e2e')
  root = synthetic.make_root(str(tmp / 'kaggle_3m'), num_patients=6, num_slices=6,
                             compression='webp')
  workdir = tmp / 'run'
  _run(_train_command(root, workdir))
  return root, workdir


def test_train_writes_checkpoints_metrics_and_tensorboard(trained):
  _, workdir = trained
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['1', '2']
  assert os.listdir(workdir / 'best') == ['2']
  records = writers.read_jsonl(str(workdir / 'metrics.jsonl'))
  assert [r['step'] for r in records] == [1, 2]
  assert all(np.isfinite(r['loss']) for r in records)
  assert 0 <= records[-1]['val/per_slice/dice'] <= 1
  scalars = _tensorboard_scalars(workdir)
  assert set(scalars['loss']) == {1, 2}
  assert scalars['loss'][2] == pytest.approx(records[1]['loss'], rel=1e-6)
  assert 2 in scalars['val/per_slice/dice']
  events = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  tags = events.Tags()['tensors']
  assert {'val/overlays', 'val/attention_0', 'val/attention_1'} <= set(tags)
  overlay = tensor_util.make_ndarray(events.Tensors('val/overlays')[0].tensor_proto)
  assert overlay[0] == b'32' and overlay[1] == b'32'  # Encoded images: width, height, PNGs.
  config = json.load(open(workdir / 'config.json'))
  assert config['model']['features'] == [4, 8, 16]


def test_evaluate_in_a_fresh_process(trained, tmp_path):
  _, workdir = trained
  out = tmp_path / 'eval'
  result = _run([sys.executable, '-m', 'brainseg.evaluate', '--workdir', str(workdir),
                 '--split', 'test', '--output', str(out), '--overlays', '1'])
  assert 'per-slice Dice' in result.stdout
  m = json.load(open(out / 'metrics.json'))
  for key in ('dice', 'precision', 'recall'):
    assert 0 <= m['per_slice'][key] <= 1
  assert {'dice_mean', 'dice_median'} <= set(m['per_patient'])
  assert 0 <= m['global']['dice'] <= 1
  assert (m['split'], m['num_patients'], m['num_slices'], m['checkpoint_step']) == ('test', 2, 12, 2)
  rows = list(csv.DictReader(open(out / 'per_patient.csv')))
  assert len(rows) == 2 and sum(int(r['num_slices']) for r in rows) == 12
  overlays = [f for f in os.listdir(out) if f.startswith('overlay_')]
  assert len(overlays) == 4  # One spread slice; best, median and worst patient.
  assert {f.split('_')[1] for f in overlays} >= {'best', 'median', 'worst'}
  assert os.path.exists(out / 'per_patient_dice.png')
  # Post-processing was chosen on val from the four settings, and recorded.
  assert m['postprocess_chosen_on'] == 'val' and len(m['postprocess_val_table']) == 4
  assert set(m['postprocess']) == {'tta_flips', 'largest_component'}
  assert 0 <= m['per_slice']['iou'] <= m['per_slice']['dice'] or m['per_slice']['iou'] == 1
  assert m['per_patient']['dice_ci95'][0] <= m['per_patient']['dice_mean']
  assert {'per_slice_mean', 'scored_slices'} <= set(m['hd95'])
  assert {'tumour_slice_found_rate', 'false_positive_slices'} <= set(m['detection'])
  assert {'iou', 'hd95_mean', 'tumour_slices_found'} <= set(rows[0])


def test_an_ensemble_of_one_model_twice_scores_as_the_model(trained, tmp_path):
  _, workdir = trained
  single = evaluate.evaluate(str(workdir), 'val', str(tmp_path / 'one'), postprocess='tta')
  twice = evaluate.evaluate([str(workdir)] * 2, 'val', str(tmp_path / 'two'), postprocess='tta')
  assert twice['per_slice'] == single['per_slice']
  assert twice['per_patient'] == single['per_patient']
  assert len(twice['checkpoints']) == 2 and twice['postprocess']['tta_flips']


def test_an_ensemble_of_models_at_different_sizes_averages_native_probabilities(trained,
                                                                                 tmp_path):
  from brainseg import data, metrics, parallel, postprocess, train
  root, workdir = trained
  small = tmp_path / 'small'
  _run(_train_command(root, small, '--config.data.image_size=16'))
  result = evaluate.evaluate([str(workdir), str(small)], 'val', str(tmp_path / 'ens'),
                             postprocess='none')
  assert [c['image_size'] for c in result['checkpoints']] == [32, 16]
  # The same average, built by hand from each member at its own size.
  mesh = parallel.create_mesh()
  member_probs = []
  for path in (workdir, small):
    variables, config, _ = evaluate.checkpointing.load_model(str(path))
    _, arrays = train.load_splits(config, parts=('val',), patients=data.scan(str(root)))
    member_probs.append(train.split_probs(train.create_model(config), variables, arrays['val'],
                                          4, mesh))
  assert member_probs[0].shape == member_probs[1].shape == arrays['val'].native_masks.shape
  masks = np.mean(member_probs, axis=0) > 0.5
  expected = metrics.summarize(arrays['val'].patient_ids,
                               **postprocess.mask_counts(masks, arrays['val'].native_masks))
  assert result['per_slice'] == expected['per_slice']
  assert not np.array_equal(member_probs[0], member_probs[1])


def test_sigterm_saves_and_the_same_command_resumes_exactly(trained, tmp_path):
  root, _ = trained
  steps = ['--config.num_train_steps=12', '--config.eval_every_steps=6',
           '--config.checkpoint_every_steps=1']
  uninterrupted = tmp_path / 'whole'
  _run(_train_command(root, uninterrupted, *steps))

  workdir = tmp_path / 'preempted'
  command = _train_command(root, workdir, *steps)
  process = subprocess.Popen(command, cwd=conftest.REPO, env=conftest.subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (os.path.isdir(workdir / 'checkpoints') and
             any(d.isdigit() and int(d) >= 3 for d in os.listdir(workdir / 'checkpoints'))):
    assert time.time() < deadline and process.poll() is None
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM received' in stderr
  stopped_at = max(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())
  assert 3 <= stopped_at < 12

  result = _run(command)
  assert f'Resumed from step {stopped_at}' in result.stderr
  # The resumed run draws the same batches and numbers: identical losses, and
  # bit-identical params, BatchNorm statistics and optimizer state.
  assert _losses(workdir) == _losses(uninterrupted)
  _assert_same_state(workdir, uninterrupted)

  # Killed (-9) in the middle of an async save: the half-written checkpoint is
  # never picked up, and the same command still ends in the same state.
  killed = tmp_path / 'killed'
  command = _train_command(root, killed, *steps)
  process = subprocess.Popen(command, cwd=conftest.REPO, env=conftest.subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (os.path.isdir(killed / 'checkpoints') and
             any('tmp' in d and not d.startswith('1') for d in os.listdir(killed / 'checkpoints'))):
    assert time.time() < deadline and process.poll() is None, 'no save was caught in flight'
    time.sleep(0.002)
  process.kill()
  process.wait()
  result = _run(command)
  assert 'Resumed from step' in result.stderr
  _assert_same_state(killed, uninterrupted)


def test_different_config_in_a_used_workdir_is_refused(trained, tmp_path):
  root, workdir = trained
  result = subprocess.run(_train_command(root, workdir, '--config.learning_rate=0.5'),
                          cwd=conftest.REPO, env=conftest.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'learning_rate: 0.001 -> 0.5' in result.stderr


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(trained, tmp_path):
  root, _ = trained
  workdir = tmp_path / 'nan'
  # An absurd learning rate overflows the activations within a few steps.
  result = subprocess.run(
      _train_command(root, workdir, '--config.learning_rate=1e35',
                     '--config.num_train_steps=8', '--config.eval_every_steps=8'),
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0
  match = re.search(r'non-finite loss or gradients at step (\d+)', result.stderr)
  assert match, result.stderr[-2000:]
  bad_step = int(match.group(1))
  state = _final_state(workdir)
  assert max(int(d) for d in os.listdir(workdir / 'checkpoints')) == bad_step - 1
  assert all(np.isfinite(v).all() for v in state.values())

  skipping = tmp_path / 'skip'
  result = _run(_train_command(root, skipping, '--config.learning_rate=1e35',
                               '--config.num_train_steps=8', '--config.eval_every_steps=8',
                               '--config.skip_nonfinite_steps=True'))
  assert f'step {bad_step}: non-finite loss or gradients; update skipped' in result.stderr
  records = writers.read_jsonl(str(skipping / 'metrics.jsonl'))
  assert records[-1]['step'] == 8 and records[-1]['skipped_steps'] >= 1
  assert all(np.isfinite(v).all() for v in _final_state(skipping).values())
  # The count is part of the train state: a resumed run goes on from it.
  skipped_before = records[-1]['skipped_steps']
  resumed = _run(_train_command(root, skipping, '--config.learning_rate=1e35',
                                '--config.num_train_steps=12', '--config.eval_every_steps=8',
                                '--config.skip_nonfinite_steps=True',
                                '--config.allow_config_change=True'))
  skipped_after_resume = resumed.stderr.count('non-finite loss or gradients; update skipped')
  records = writers.read_jsonl(str(skipping / 'metrics.jsonl'))
  assert records[-1]['step'] == 12
  assert records[-1]['skipped_steps'] == skipped_before + skipped_after_resume


def test_evaluating_under_a_config_of_another_model_is_refused(trained, tmp_path):
  _, workdir = trained
  result = subprocess.run(
      [sys.executable, '-m', 'brainseg.evaluate', '--workdir', str(workdir), '--split', 'val',
       '--output', str(tmp_path / 'e'), '--config', 'configs/tiny.py',
       '--config.model.features=8,16,32'],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0
  assert 'does not fit the config (model.features=(8, 16, 32)' in result.stderr


def test_predict_writes_masks_overlays_gifs_and_areas(trained, tmp_path):
  root, workdir = trained
  pid = synthetic_patient(root)
  # A root of one patient folder (linked) and one slice of another size, without a mask.
  inputs = tmp_path / 'inputs'
  (inputs / 'other').mkdir(parents=True)
  os.symlink(os.path.join(root, pid), inputs / pid)
  import tifffile  # pylint: disable=g-import-not-at-top
  tifffile.imwrite(inputs / 'other' / 'scan_1.tif', np.full((48, 40, 3), 90, np.uint8))
  out = tmp_path / 'pred'
  result = _run([sys.executable, '-m', 'brainseg.predict', '--checkpoint', str(workdir),
                 '--input', str(inputs), '--output', str(out)])
  assert 'Wrote 7 slice(s) of 2 patient(s)' in result.stdout
  assert 'resized to 32x32 for the model' in result.stderr
  folder = out / pid
  masks = sorted(f for f in os.listdir(folder) if f.endswith('_pred_mask.tif'))
  assert len(masks) == 6
  mask = tifffile.imread(folder / masks[0])
  assert mask.shape == (32, 32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
  assert len([f for f in os.listdir(folder) if f.endswith('_overlay.png')]) == 6
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(folder / f'{pid}.gif').n_frames == 6
  rows = list(csv.DictReader(open(folder / f'{pid}_areas.csv')))
  assert [r['slice'] for r in rows] == [f'{pid}_{n}' for n in range(1, 7)]
  assert 'true_pixels' in rows[0]
  assert tifffile.imread(out / 'other' / 'scan_1_pred_mask.tif').shape == (48, 40)


def synthetic_patient(root):
  return sorted(os.listdir(root))[0]


def test_predictor_compiles_once(trained):
  root, workdir = trained
  from brainseg import checkpointing, predict  # pylint: disable=g-import-not-at-top
  variables, config, _ = checkpointing.load_model(str(workdir))
  predictor = predict.Predictor(variables, config, batch_size=4)
  for count in (4, 3, 9):  # Full, partial and several batches.
    assert predictor(np.zeros((count, 32, 32, 3), np.float32)).shape == (count, 32, 32)
  assert predictor.compiled_versions() == 1


def test_exported_model_matches_the_checkpoint_in_a_fresh_process(trained, tmp_path):
  _, workdir = trained
  path = tmp_path / 'new_folder' / 'model.zip'  # export makes the folder.
  _run([sys.executable, '-m', 'brainseg.export', '--checkpoint', str(workdir),
        '--output', str(path), '--platforms', 'cpu'])
  images = np.random.default_rng(0).normal(size=(5, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / 'images.npy', images)
  # Only JAX in the fresh process: no brainseg import.
  code = ('import json, sys, zipfile, jax, numpy as np\n'
          f'z = zipfile.ZipFile({str(path)!r})\n'
          'model = jax.export.deserialize(bytearray(z.read("model.jaxexport")))\n'
          f'np.save({str(tmp_path / "out.npy")!r}, '
          f'np.asarray(model.call(np.load({str(tmp_path / "images.npy")!r}))))\n'
          'assert "brainseg" not in sys.modules\n')
  _run([sys.executable, '-c', code])
  from brainseg import checkpointing, predict  # pylint: disable=g-import-not-at-top
  variables, config, _ = checkpointing.load_model(str(workdir))
  direct = predict.Predictor(variables, config, batch_size=5)(images)
  np.testing.assert_allclose(np.load(tmp_path / 'out.npy'), direct, atol=1e-6)


def test_init_from_starts_from_the_runs_best_model(trained, tmp_path):
  import jax
  from brainseg import checkpointing
  root, workdir = trained
  tuned = tmp_path / 'tuned'
  # A learning rate of 0 keeps the params where init_from put them.
  result = _run(_train_command(root, tuned, f'--config.init_from={workdir}',
                               '--config.learning_rate=0', '--config.num_train_steps=1'))
  assert f'Starting from the model in {workdir} (step 2)' in result.stderr
  source, _, _ = checkpointing.load_model(str(workdir))
  state = _final_state(tuned)
  for path, value in jax.tree_util.tree_leaves_with_path(source['params']):
    np.testing.assert_array_equal(state["['params']" + jax.tree_util.keystr(path)], value)
  assert json.load(open(tuned / 'config.json'))['init_from'] == str(workdir)


def test_init_from_a_missing_or_different_model_is_refused_by_name(trained, tmp_path):
  from brainseg import train
  from configs import tiny
  _, workdir = trained
  config = tiny.get_config()
  for wrong in (tmp_path / 'nowhere', workdir / 'checkpoints'):
    config.init_from = str(wrong)
    with pytest.raises(ValueError, match=f'config init_from=.*{wrong.name}.*found no'):
      train.load_init_variables(config)
  config.init_from = str(workdir)
  config.model.features = (4, 8, 32)
  with pytest.raises(ValueError, match='does not fit the config'):
    train.load_init_variables(config)
  config = tiny.get_config()
  config.init_from = str(workdir)
  config.data.channels = 'gray'
  with pytest.raises(ValueError, match="data.channels='mri'"):
    train.load_init_variables(config)


def test_init_from_a_model_that_trained_on_this_runs_val_or_test_is_refused(trained):
  from brainseg import data, train
  from configs import tiny
  root, workdir = trained
  patients = sorted(data.scan(str(root)))
  config = tiny.get_config()
  config.init_from = str(workdir)
  train.check_init_from_unseen(config, patients)  # The same split: nothing leaks.
  config.data.split_seed = 1  # Another random split: some of its val/test patients leak.
  with pytest.raises(ValueError, match='was trained on .* patient'):
    train.check_init_from_unseen(config, patients)


def test_a_fine_tune_resumes_without_its_start_model(trained, tmp_path):
  import shutil
  root, workdir = trained
  source = tmp_path / 'source'
  shutil.copytree(workdir, source)
  command = _train_command(root, tmp_path / 'tuned', f'--config.init_from={source}',
                           '--config.num_train_steps=1')
  _run(command)
  shutil.rmtree(source)
  result = _run(command)  # Its own checkpoint is all a resume needs.
  assert 'already complete' in result.stderr and 'Starting from' not in result.stderr


def test_evaluate_refuses_a_member_the_config_would_feed_other_inputs(trained, tmp_path):
  from configs import tiny
  root, workdir = trained
  config = tiny.get_config()
  config.data.root = str(root)
  config.data.normalization = 'scale'
  with pytest.raises(ValueError, match="data.normalization='volume', the --config has 'scale'"):
    evaluate.evaluate(str(workdir), 'val', str(tmp_path / 'eval'), config=config)


def test_a_split_file_override_does_not_hide_what_the_model_trained_on(trained, tmp_path):
  from brainseg import checkpointing, data, train
  root, workdir = trained
  patients = sorted(data.scan(str(root)))
  learned = sorted(train.training_patients(str(workdir), patients))
  # The run recorded them with its best model: the same patients as its train split.
  assert checkpointing.load_trained_on(str(workdir)) == learned == sorted(
      train.load_splits(checkpointing.load_saved_config(str(workdir)), parts=(),
                        patients=data.scan(str(root)))[0]['train'])
  others = [p for p in patients if p not in learned]
  split_file = tmp_path / 'leaky.json'
  split_file.write_text(json.dumps({'train': others[:1], 'val': others[1:], 'test': learned}))
  with pytest.raises(ValueError, match='was trained on .* of the test split'):
    evaluate.evaluate(str(workdir), 'test', str(tmp_path / 'eval'), split_file=str(split_file),
                      postprocess='none')


def test_a_fine_tune_stopped_before_its_first_best_keeps_its_start_models_patients(
    trained, tmp_path):
  import shutil
  root, workdir = trained
  source = tmp_path / 'source'
  shutil.copytree(workdir, source)
  learned = set(checkpointing.load_trained_on(str(source)))
  tuned = tmp_path / 'tuned'
  _run(_train_command(root, tuned, f'--config.init_from={source}',
                      '--config.num_train_steps=1'))
  shutil.rmtree(tuned / 'best')  # As if stopped before its first evaluation.
  shutil.rmtree(source)
  # Its record already holds the start model's patients, and it outlives the start model.
  assert learned <= set(checkpointing.load_trained_on(str(tuned)))
