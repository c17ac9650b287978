"""Cross-validation folds, and the cv command run as users run it."""
import collections
import json
import subprocess
import sys

import pytest

from brainseg import cv
from brainseg import data
from brainseg import evaluate
from tests import conftest


def _patients(n_per_site):
  return [f'TCGA_{site}_{i:04d}_20000101' for site, n in n_per_site.items() for i in range(n)]


def test_folds_partition_patients_and_spread_every_institution():
  patients = _patients({'CS': 23, 'DU': 50, 'FG': 17, 'HT': 12, 'EZ': 8})
  folds = cv.make_folds(patients, 5, seed=0, val_every=8)
  tests = [p for f in folds for p in f['test']]
  assert sorted(tests) == sorted(patients)  # Each patient is tested exactly once.
  for f in folds:
    assert not set(f['train']) & set(f['val']) and not set(f['train']) & set(f['test'])
    assert not set(f['val']) & set(f['test'])
    assert len(f['train']) + len(f['val']) + len(f['test']) == len(patients)
    assert len(f['test']) in (22, 23)
  for site, n in {'CS': 23, 'DU': 50, 'FG': 17, 'HT': 12, 'EZ': 8}.items():
    per_fold = [collections.Counter(data.institution(p) for p in f['test'])[site] for f in folds]
    assert max(per_fold) - min(per_fold) <= 1, (site, per_fold)
  assert cv.make_folds(patients, 5, seed=0, val_every=8) == folds
  assert cv.make_folds(patients, 5, seed=1, val_every=8) != folds


def test_too_many_folds_is_refused():
  with pytest.raises(ValueError, match='--folds must be between 2'):
    cv.make_folds(_patients({'CS': 3}), 5, seed=0, val_every=8)


def _cv(root, workdir, *flags):
  return subprocess.run(
      [sys.executable, '-m', 'brainseg.cv', '--config', 'configs/tiny.py', '--workdir',
       str(workdir), f'--config.data.root={root}', '--folds', '3', '--val_every', '2', *flags],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True, text=True,
      timeout=600)


def test_cv_command_runs_every_fold_resumes_and_summarizes(tiny_root, tmp_path):
  workdir = tmp_path / 'cv'
  first = _cv(tiny_root, workdir, '--only', '0')
  assert first.returncode == 0, first.stderr[-3000:]
  assert (workdir / 'fold_0' / 'test' / 'metrics.json').exists()
  assert not (workdir / 'fold_1').exists()
  summary_copy = tmp_path / 'results' / 'summary.json'
  rest = _cv(tiny_root, workdir, '--summary', str(summary_copy))
  assert rest.returncode == 0, rest.stderr[-3000:]
  assert 'fold 0: done' in rest.stderr  # Not trained again.
  summary = json.load(open(summary_copy))
  assert summary == json.load(open(workdir / 'summary.json'))
  assert (tmp_path / 'results' / 'summary.md').read_text() == (workdir / 'summary.md').read_text()
  assert [f['fold'] for f in summary['folds']] == [0, 1, 2]
  assert summary['num_patients'] == 6 and summary['folds_done'] == '3 of 3'
  means = [f['per_patient_dice_mean'] for f in summary['folds']]
  assert summary['fold_mean_of_per_patient_dice'] == pytest.approx(sum(means) / 3)
  table = (workdir / 'summary.md').read_text()
  assert all(f'| {k} | 2 | {means[k]:.4f} |' in table for k in range(3))
  split = json.load(open(workdir / 'fold_2' / 'split.json'))
  assert len(split['test']) == 2 and len(split['val']) == 2
  changed = _cv(tiny_root, workdir, '--fold_seed', '1')
  assert changed.returncode != 0 and 'was made with other fold_seed' in changed.stderr
  other_recipe = _cv(tiny_root, workdir, '--config.learning_rate=0.5')
  assert other_recipe.returncode != 0
  assert 'was made with other recipe (config: learning_rate)' in other_recipe.stderr
  unknown_fold = _cv(tiny_root, workdir, '--only', '7')
  assert unknown_fold.returncode != 0 and 'folds are numbered 0 to 2' in unknown_fold.stderr
  # The fold models as an ensemble, scored on a split whose test part fold 1 trained on.
  fold_1 = json.load(open(workdir / 'fold_1' / 'split.json'))
  leaky = tmp_path / 'leaky_split.json'
  leaky.write_text(json.dumps({'train': sorted(fold_1['val']), 'val': sorted(fold_1['test']),
                               'test': sorted(fold_1['train'])}))
  leaked = subprocess.run(
      [sys.executable, '-m', 'brainseg.evaluate', '--workdir',
       f'{workdir / "fold_0"},{workdir / "fold_1"}', '--split', 'test', '--split_file',
       str(leaky), '--postprocess', 'none', '--output', str(tmp_path / 'ensemble')],
      cwd=conftest.REPO, env=conftest.subprocess_env(), capture_output=True, text=True,
      timeout=600)
  assert leaked.returncode != 0, leaked.stderr[-3000:]
  assert 'was trained on' in leaked.stderr and 'of the test split' in leaked.stderr
  assert not (tmp_path / 'ensemble').exists()


def test_scoring_a_model_on_patients_it_trained_on_is_refused():
  patients = [f'TCGA_CS_{i:04d}_20000101' for i in range(20)]
  member = {'data': {'split_file': '', 'split_fractions': [0.5, 0.25, 0.25], 'split_seed': 0}}
  parts = data.make_split(patients, '', (0.5, 0.25, 0.25), 0)
  evaluate.check_not_trained_on(['m'], [member], patients, {'test': parts['test']})
  with pytest.raises(ValueError, match=r'm was trained on 2 patient\(s\) of the test split'):
    evaluate.check_not_trained_on(['m'], [member], patients,
                                  {'test': parts['test'] + parts['train'][:2]})
  # A model that records no patients, whose split file is not where it was: refused too.
  member['data']['split_file'] = '/nonexistent/split.json'
  with pytest.raises(ValueError, match='cannot tell which patients m trained on'):
    evaluate.check_not_trained_on(['m'], [member], patients, {'test': parts['test']})
