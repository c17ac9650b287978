r"""Patient-grouped k-fold cross-validation, one fold after another, resumable.

  python -m brainseg.cv --config configs/cpu.py --workdir /tmp/brainseg/cv \
      [--folds 5] [--fold_seed 0] [--summary results/cv/summary.json]  # + summary.md

All patients of the data root are dealt into k folds, stratified by
institution (the second field of the patient id) and seeded. Fold k is the
test part of run k; its val part (for model selection) is one in
`--val_every` of the other patients, also spread over institutions; the rest
train. Each run is an ordinary training workdir (WORKDIR/fold_k, with its
split.json) evaluated on its test part like `brainseg.evaluate`. Running the
command again resumes the unfinished fold and skips finished ones; a SIGTERM
saves and stops like `brainseg.main`. The summary gives each fold's
per-patient Dice, their mean, median and spread, and the pooled per-patient
Dice over all patients with a bootstrap interval.
"""
import csv
import json
import os
import signal
from typing import Any, Dict, List

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import ml_collections
from ml_collections import config_flags
import numpy as np

from brainseg import checkpointing
from brainseg import cli
from brainseg import data as data_lib
from brainseg import evaluate
from brainseg import metrics as metrics_lib
from brainseg import parallel
from brainseg import train
from brainseg import writers

FLAGS = flags.FLAGS


def _stratified_order(patients: List[str], rng: np.random.Generator) -> List[str]:
  """Patients shuffled within each institution, institutions one after another."""
  by_site: Dict[str, List[str]] = {}
  for pid in sorted(patients):
    by_site.setdefault(data_lib.institution(pid), []).append(pid)
  return [pid for site in sorted(by_site) for pid in rng.permutation(by_site[site])]


def make_folds(patients: List[str], num_folds: int, seed: int,
               val_every: int) -> List[Dict[str, List[str]]]:
  """k train/val/test splits: test parts partition `patients`, stratified by institution.

  Dealing the institution-ordered patients round-robin gives every fold the
  same share (within one patient) of every institution.
  """
  if not 2 <= num_folds <= len(patients):
    raise ValueError(f'--folds must be between 2 and the number of patients '
                     f'({len(patients)}), got {num_folds}')
  rng = np.random.default_rng(seed)
  order = _stratified_order(patients, rng)
  fold_of = {pid: i % num_folds for i, pid in enumerate(order)}
  folds = []
  for k in range(num_folds):
    rest = [pid for pid in order if fold_of[pid] != k]  # Still institution-ordered.
    val = rest[::val_every]
    folds.append({'train': sorted(set(rest) - set(val)), 'val': sorted(val),
                  'test': sorted(pid for pid in order if fold_of[pid] == k)})
  return folds


def recipe(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The config's settings that shape a fold's model, flattened: all but where the
  data lives, how fast it loads, and the split file (each fold sets its own)."""
  flat = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  ignored = set(checkpointing.RESUME_SAFE_FIELDS) | {'data.split_file'}
  return {k: v for k, v in sorted(flat.items()) if k not in ignored}


def load_or_make_folds(workdir: str, patients: List[str], num_folds: int, seed: int,
                       val_every: int, config: ml_collections.ConfigDict
                       ) -> List[Dict[str, List[str]]]:
  """The folds of WORKDIR/folds.json; made (and written) on the first run.

  The recipe is saved with them, so that every fold of a summary is trained alike.

  Raises:
    ValueError: if the workdir's folds were made with other settings, data or config.
  """
  path = os.path.join(workdir, 'folds.json')
  settings = {'folds': num_folds, 'fold_seed': seed, 'val_every': val_every,
              'patients': sorted(patients), 'recipe': recipe(config)}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if 'recipe' in saved['settings']:  # Fields added to brainseg since count at their defaults.
      saved['settings']['recipe'] = recipe(checkpointing.with_current_defaults(
          traverse_util.unflatten_dict(saved['settings']['recipe'], sep='.')))
    changed = [k for k in settings if saved['settings'].get(k) != settings[k]]
    if changed:
      old = saved['settings'].get('recipe', {})
      fields = sorted(k for k in set(old) | set(settings['recipe'])
                      if old.get(k) != settings['recipe'].get(k))
      detail = f' (config: {", ".join(fields[:8])})' if 'recipe' in changed else ''
      raise ValueError(f'{path} was made with other {", ".join(changed)}{detail}; use a new '
                       f'--workdir or the same settings')
    return saved['splits']
  splits = make_folds(patients, num_folds, seed, val_every)
  writers.write_json_atomically(path, {'settings': settings, 'splits': splits})
  return splits


def summarize_folds(fold_metrics: List[dict], per_patient_dice: List[float]) -> dict:
  """Per-fold and across-fold per-patient Dice, and the pooled per-patient Dice."""
  means = np.array([m['per_patient']['dice_mean'] for m in fold_metrics])
  low, high = metrics_lib.bootstrap_ci(per_patient_dice)
  return {
      'folds': [{'fold': m.get('fold', i), 'num_patients': m['num_patients'],
                 'per_patient_dice_mean': m['per_patient']['dice_mean'],
                 'per_patient_dice_median': m['per_patient']['dice_median'],
                 'per_slice_dice': m['per_slice']['dice'], 'postprocess': m['postprocess']}
                for i, m in enumerate(fold_metrics)],
      'fold_mean_of_per_patient_dice': float(means.mean()),
      'fold_median_of_per_patient_dice': float(np.median(means)),
      'fold_std_of_per_patient_dice': float(means.std(ddof=1)) if len(means) > 1 else 0.0,
      'fold_min_max': [float(means.min()), float(means.max())],
      'pooled_per_patient_dice_mean': float(np.mean(per_patient_dice)),
      'pooled_per_patient_dice_ci95': [low, high],
      'num_patients': len(per_patient_dice),
  }


def run_cv(config: ml_collections.ConfigDict, workdir: str, num_folds: int, seed: int,
           val_every: int, only=None) -> dict:
  """Trains and tests every (or the `only`) fold not yet done; returns the summary
  (None if stopped by SIGTERM before every fold was done)."""
  patients = sorted(data_lib.scan(config.data.root))
  splits = load_or_make_folds(workdir, patients, num_folds, seed, val_every, config)
  if only is not None and not set(only) <= set(range(len(splits))):
    raise ValueError(f'--only {sorted(only)}: folds are numbered 0 to {len(splits) - 1}')
  stopped = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
  try:
    for k, split in enumerate(splits):
      if only is not None and k not in only:
        continue
      if parallel.any_process(bool(stopped)):
        logging.warning('SIGTERM: stopping before fold %d; run the same command to resume.', k)
        return None
      fold_dir = os.path.join(workdir, f'fold_{k}')
      test_metrics = os.path.join(fold_dir, 'test', 'metrics.json')
      if os.path.exists(test_metrics):
        logging.info('fold %d: done (%s)', k, test_metrics)
        continue
      split_file = os.path.join(fold_dir, 'split.json')
      writers.write_json_atomically(split_file, split)
      fold_config = ml_collections.ConfigDict(config.to_dict())
      fold_config.data.split_file = split_file
      logging.info('fold %d of %d: %d train, %d val, %d test patients', k, num_folds,
                   len(split['train']), len(split['val']), len(split['test']))
      train.train_and_evaluate(fold_config, fold_dir, stop_requested=lambda: bool(stopped))
      if parallel.any_process(bool(stopped)):
        logging.warning('SIGTERM: fold %d saved; run the same command to resume.', k)
        return None
      evaluate.evaluate(fold_dir, 'test', os.path.dirname(test_metrics))
  finally:
    signal.signal(signal.SIGTERM, previous)
  return write_summary(workdir, len(splits))


def summary_table(summary: dict) -> str:
  """The summary as a Markdown table, one row per fold, then the spread over folds."""
  lines = ['| fold | test patients | per-patient Dice mean | median | per-slice Dice | '
           'post-processing (chosen on val) |', '|---|---|---|---|---|---|']
  for f in summary['folds']:
    post = [name for name, on in f['postprocess'].items() if on] or ['none']
    lines.append(f"| {f['fold']} | {f['num_patients']} | {f['per_patient_dice_mean']:.4f} | "
                 f"{f['per_patient_dice_median']:.4f} | {f['per_slice_dice']:.4f} | "
                 f"{', '.join(post)} |")
  low, high = summary['pooled_per_patient_dice_ci95']
  lines += ['', f"Over {summary['folds_done']} folds: mean per-patient Dice "
            f"{summary['fold_mean_of_per_patient_dice']:.4f}, median "
            f"{summary['fold_median_of_per_patient_dice']:.4f}, standard deviation "
            f"{summary['fold_std_of_per_patient_dice']:.4f}, range "
            f"{summary['fold_min_max'][0]:.4f}-{summary['fold_min_max'][1]:.4f}. Pooled over "
            f"{summary['num_patients']} patients: {summary['pooled_per_patient_dice_mean']:.4f} "
            f"(95% bootstrap CI {low:.4f}-{high:.4f})."]
  return '\n'.join(lines) + '\n'


def write_summary(workdir: str, num_folds: int) -> dict:
  """WORKDIR/summary.json (and summary.md) from the finished folds' test metrics
  and per_patient.csv."""
  fold_metrics, dice = [], []
  for k in range(num_folds):
    test_dir = os.path.join(workdir, f'fold_{k}', 'test')
    if not os.path.exists(os.path.join(test_dir, 'metrics.json')):
      continue
    with open(os.path.join(test_dir, 'metrics.json')) as f:
      fold_metrics.append({**json.load(f), 'fold': k})
    with open(os.path.join(test_dir, 'per_patient.csv')) as f:
      dice += [float(row['dice']) for row in csv.DictReader(f)]
  if not fold_metrics:
    raise ValueError(f'no fold of {workdir} has been tested yet: nothing to summarise')
  summary = summarize_folds(fold_metrics, dice)
  summary['folds_done'] = f'{len(fold_metrics)} of {num_folds}'
  write_summary_files(os.path.join(workdir, 'summary.json'), summary)
  return summary


def write_summary_files(json_path: str, summary: dict) -> None:
  """The summary as JSON at `json_path`, and as a Markdown table beside it (.md)."""
  writers.write_json_atomically(json_path, summary)
  with open(os.path.splitext(json_path)[0] + '.md', 'w') as f:
    f.write(summary_table(summary))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup(train.sharded_batch_sizes(FLAGS.config))
  only = None if FLAGS.only is None else [int(k) for k in FLAGS.only]
  summary = run_cv(FLAGS.config, FLAGS.workdir, FLAGS.folds, FLAGS.fold_seed, FLAGS.val_every,
                   only)
  if summary is None:
    return
  if FLAGS.summary:
    write_summary_files(FLAGS.summary, summary)
  for row in summary['folds']:
    print(f"fold {row['fold']}: {row['num_patients']} test patients, per-patient Dice "
          f"{row['per_patient_dice_mean']:.4f} (median {row['per_patient_dice_median']:.4f})")
  print(f"{summary['folds_done']} folds: mean per-patient Dice "
        f"{summary['fold_mean_of_per_patient_dice']:.4f} ± "
        f"{summary['fold_std_of_per_patient_dice']:.4f} over folds; pooled over "
        f"{summary['num_patients']} patients {summary['pooled_per_patient_dice_mean']:.4f} "
        f"(95% CI {summary['pooled_per_patient_dice_ci95'][0]:.3f}-"
        f"{summary['pooled_per_patient_dice_ci95'][1]:.3f}). Wrote {FLAGS.workdir}/summary.json")


def define_flags() -> None:
  """The command's flags (defined only when run as a command, so that other
  modules can import this one)."""
  flags.DEFINE_string('workdir', None, 'Folder for folds.json, the fold runs and summary.json.')
  flags.DEFINE_integer('folds', 5, 'Number of folds.')
  flags.DEFINE_integer('fold_seed', 0, 'Seed of the patient-to-fold assignment.')
  flags.DEFINE_integer('val_every', 8, 'One in this many non-test patients is val.')
  flags.DEFINE_list('only', None, 'Run only these folds (e.g. 0,1); default all.')
  flags.DEFINE_string('summary', None, 'Also copy summary.json here (e.g. results/cv/summary.json), '
                      'and summary.md beside it.')
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  define_flags()
  app.run(lambda argv: cli.run_main(main, argv))
