"""Shared test set-up: the repo on sys.path, and synthetic kaggle_3m trees in temp dirs."""
import os
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The folder holding kaggle_3m/ and seed_split.json; BRAINSEG_TEST_DATA points elsewhere.
SHARED_DATA = os.environ.get('BRAINSEG_TEST_DATA', os.path.join(REPO, '..', 'shared', 'data'))
REAL_ROOT = os.path.join(SHARED_DATA, 'kaggle_3m')
# One XLA compilation cache for every CLI subprocess of a test session: they
# compile the same tiny-model steps, and compiling dominates their run time.
COMPILATION_CACHE = tempfile.mkdtemp(prefix='brainseg-test-xla-cache-')

from tests import synthetic  # pylint: disable=wrong-import-position


@pytest.fixture
def tiny_root(tmp_path):
  """Six synthetic patients of 6 slices, 32x32, WebP images and deflate masks."""
  return synthetic.make_root(str(tmp_path / 'kaggle_3m'), num_patients=6, num_slices=6,
                             size=32, compression='webp')


def subprocess_env():
  """Environment for CLI subprocesses: the repo importable, on the CPU."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_COMPILATION_CACHE_DIR'] = COMPILATION_CACHE
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return env
