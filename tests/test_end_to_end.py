"""The commands as users run them: train, preempt, resume, evaluate (subprocesses)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

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
  assert len([f for f in os.listdir(out) if f.startswith('overlay_')]) == 1


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
  # The resumed run draws the same batches and numbers: identical losses.
  assert _losses(workdir) == _losses(uninterrupted)


def test_different_config_in_a_used_workdir_is_refused(trained, tmp_path):
  root, workdir = trained
  result = subprocess.run(_train_command(root, workdir, '--config.learning_rate=0.5'),
                          cwd=conftest.REPO, env=conftest.subprocess_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'learning_rate: 0.001 -> 0.5' in result.stderr
