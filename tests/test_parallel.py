"""Data parallelism: 8 fake devices, two real processes, checkpoints across meshes."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import conftest
from tests import synthetic

WORKER = os.path.join(conftest.REPO, 'tests', 'parallel_worker.py')


def _env(devices=1, **extra):
  env = conftest.subprocess_env()
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(extra)
  return env


def _run(command, env):
  result = subprocess.run(command, cwd=conftest.REPO, env=env, capture_output=True,
                          text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return synthetic.make_root(str(tmp_path_factory.mktemp('par') / 'kaggle_3m'),
                             num_patients=6, num_slices=6)


def test_eight_devices_match_one_device(root, tmp_path):
  out = tmp_path / 'eq.npz'
  _run([sys.executable, WORKER, 'equivalence', root, str(out)], _env(devices=8))
  results = np.load(out)
  np.testing.assert_allclose(results['eight/loss'], results['one/loss'], rtol=1e-5)
  keys = [k[len('eight/'):] for k in results if k.startswith('eight/') and k != 'eight/loss']
  assert any('batch_stats' in k for k in keys) and any('params' in k for k in keys)
  for key in keys:
    np.testing.assert_allclose(results[f'eight/{key}'], results[f'one/{key}'], rtol=1e-5,
                               atol=1e-6, err_msg=key)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_like_one(root, tmp_path):
  overrides = ['--config.num_train_steps=3', '--config.eval_every_steps=3',
               '--config.optimizer=sgd', '--config.learning_rate=0.05']  # See parallel_worker.
  workdir = tmp_path / 'two'
  port = _free_port()
  processes = [
      subprocess.Popen([sys.executable, WORKER, 'train', root, str(workdir), *overrides],
                       cwd=conftest.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       text=True,
                       env=_env(BRAINSEG_COORDINATOR=f'localhost:{port}',
                                BRAINSEG_NUM_PROCESSES='2', BRAINSEG_PROCESS_ID=str(i)))
      for i in range(2)]
  for p in processes:
    _, stderr = p.communicate(timeout=400)
    assert p.returncode == 0, stderr[-3000:]
  single = tmp_path / 'one'
  _run([sys.executable, WORKER, 'train', root, str(single), *overrides], _env())
  p0, p1 = np.load(workdir / 'params_0.npz'), np.load(workdir / 'params_1.npz')
  one = np.load(single / 'params_0.npz')
  for key in one:
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    np.testing.assert_allclose(p0[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert os.listdir(workdir / 'best') == ['3']


def test_checkpoint_of_eight_devices_evaluates_the_same_on_one_and_two(root, tmp_path):
  workdir = tmp_path / 'run8'
  _run([sys.executable, '-m', 'brainseg.main', '--config', 'configs/tiny.py',
        '--workdir', str(workdir), f'--config.data.root={root}', '--config.batch_size=8',
        '--config.eval_batch_size=8'], _env(devices=8))
  metrics = []
  for devices in (1, 2):
    out = tmp_path / f'eval{devices}'
    _run([sys.executable, '-m', 'brainseg.evaluate', '--workdir', str(workdir),
          '--split', 'test', '--output', str(out)], _env(devices=devices))
    metrics.append(json.load(open(out / 'metrics.json')))
  assert metrics[0] == metrics[1]
