"""What every command sets before JAX starts: XLA flags and the CPU device count."""
import os
import subprocess
import sys

import pytest

from brainseg import cli
from tests import conftest


@pytest.mark.parametrize('cores, devices', [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8)])
def test_one_cpu_device_per_core_in_powers_of_two(monkeypatch, cores, devices):
  monkeypatch.setattr(cli, '_usable_cores', lambda: cores)
  assert cli.default_cpu_devices() == devices


def test_the_default_device_count_divides_every_batch(monkeypatch):
  monkeypatch.setattr(cli, '_usable_cores', lambda: 16)
  assert cli.default_cpu_devices((16, 32)) == 8
  assert cli.default_cpu_devices((4, 4)) == 4  # configs/tiny.py
  assert cli.default_cpu_devices((6, 32)) == 2
  assert cli.default_cpu_devices((3,)) == 1


def test_each_process_of_a_multi_process_run_keeps_one_cpu_device(monkeypatch):
  monkeypatch.setattr(cli, '_usable_cores', lambda: 4)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('BRAINSEG_COORDINATOR', 'localhost:1234')
  cli.set_default_xla_flags((16,))
  assert 'device_count' not in os.environ['XLA_FLAGS']


def test_default_flags_add_the_device_count_and_keep_the_users(monkeypatch):
  monkeypatch.setattr(cli, '_usable_cores', lambda: 4)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_use_xnnpack=false')
  cli.set_default_xla_flags()
  flags = os.environ['XLA_FLAGS'].split()
  assert flags == ['--xla_cpu_use_xnnpack=false', '--xla_force_host_platform_device_count=4']

  # The user's own choice, by XLA flag or by JAX's setting, is left alone.
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
  cli.set_default_xla_flags()
  assert os.environ['XLA_FLAGS'].count('device_count') == 1
  assert '--xla_force_host_platform_device_count=1' in os.environ['XLA_FLAGS']
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  cli.set_default_xla_flags()
  assert 'device_count' not in os.environ['XLA_FLAGS']


def _device_count_in_a_fresh_process(**env_overrides) -> int:
  env = conftest.subprocess_env()
  env.pop('XLA_FLAGS', None)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env.update(env_overrides)
  code = ('from brainseg import cli; cli.set_default_xla_flags(); import jax; '
          'print(jax.device_count())')
  result = subprocess.run([sys.executable, '-c', code], cwd=conftest.REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
  return int(result.stdout.split()[-1])


def test_a_command_gets_the_default_cpu_devices_unless_the_user_chose():
  assert _device_count_in_a_fresh_process() == cli.default_cpu_devices()
  assert _device_count_in_a_fresh_process(JAX_NUM_CPU_DEVICES='3') == 3
  assert _device_count_in_a_fresh_process(
      XLA_FLAGS='--xla_force_host_platform_device_count=1') == 1
