r"""Evaluates a checkpoint (or an ensemble) on one split: metrics.json, per_patient.csv.

  python -m brainseg.evaluate --workdir DIR --split test --output OUT
  python -m brainseg.evaluate --workdir results/reference --split test --output /tmp/eval
  python -m brainseg.evaluate --workdir cv/fold_0,cv/fold_1 --split test --output OUT \
      --data_root OTHER_ROOT --split_file OTHER_SPLIT.json

DIR is a training workdir (its best-on-val checkpoint is used) or a `best/`
folder; --step names another saved step. Several comma-separated DIRs are an
ensemble: their probabilities, at the masks' native size, are averaged, so
members may see the slices at different sizes, channels or normalizations. The data root and split come from
the (first) checkpoint's config unless --data_root / --split_file say otherwise.
A split (or the val part used to choose post-processing) that shares a patient
with any member's training patients is refused: the cross-validation folds
together trained on every patient of their root, so score their ensemble on
other patients.

--postprocess=val (the default) tries test-time flips and the 3-D largest
component on the val split, keeps each only if val's per-patient Dice rises,
and records the choice and the table in metrics.json. Metric semantics are in
brainseg/metrics.py and the README.
"""
import os
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from brainseg import checkpointing
from brainseg import cli
from brainseg import data as data_lib
from brainseg import metrics as metrics_lib
from brainseg import parallel
from brainseg import postprocess as postprocess_lib
from brainseg import train
from brainseg import visualize
from brainseg import writers

FLAGS = flags.FLAGS

FORCED = {'none': {'tta_flips': False, 'largest_component': False},
          'tta': {'tta_flips': True, 'largest_component': False},
          'lcc': {'tta_flips': False, 'largest_component': True},
          'tta+lcc': {'tta_flips': True, 'largest_component': True}}


# What a member sees: members that differ in these still ensemble (each model reads
# the slices its own way; their probabilities meet at the masks' native size).
INPUT_FIELDS = ('image_size', 'channels', 'normalization')


def _load_models(workdirs: Sequence[str], step: Optional[int],
                 config: Optional[ml_collections.ConfigDict], data_root: Optional[str],
                 split_file: Optional[str]):
  """Loads every member: [(variables, step, config it runs under)], and their saved configs.

  The data root and split are the first member's (or the flags'); each member keeps
  its own model and input fields unless `config` is given for all of them.
  """
  loaded = [checkpointing.load_model(w, step) for w in workdirs]
  # Deep copies: the saved configs stay as saved (the leakage check reads them).
  base = ml_collections.ConfigDict((config or loaded[0][1]).to_dict())
  with base.unlocked():
    if data_root is not None:
      base.data.root = data_root
    if split_file is not None:
      base.data.split_file = split_file
  members = []
  for workdir, (variables, saved, saved_step) in zip(workdirs, loaded):
    member = ml_collections.ConfigDict(base.to_dict())  # A copy.
    if config is None:
      member.model = saved.model
      for field in INPUT_FIELDS:
        member.data[field] = saved.data[field]
    else:
      for field in ('channels', 'normalization'):
        if saved.data[field] != config.data[field]:
          raise ValueError(f'{workdir} was trained with data.{field}={saved.data[field]!r}, '
                           f'the --config has {config.data[field]!r}')
    train.check_variables_match(variables, member, f'{workdir} step {saved_step}')
    members.append((variables, saved_step, member))
  return members, [saved for _, saved, _ in loaded]


def check_not_trained_on(workdirs: Sequence[str], member_configs, patients: Sequence[str],
                         scored: Dict[str, Sequence[str]]) -> None:
  """Raises ValueError if a scored part holds a patient some member trained on.

  Each member's training patients are those recorded with its model (or, for older
  runs, those of its saved split and of the model it was fine-tuned from), over the
  patients of the root being evaluated. A member whose patients cannot be told is
  refused too.
  """
  for workdir, saved in zip(workdirs, member_configs):
    trained = train.training_patients(workdir, patients, saved)
    for part, ids in scored.items():
      leaked = sorted(trained & set(ids))
      if leaked:
        raise ValueError(f'{workdir} was trained on {len(leaked)} patient(s) of the {part} '
                         f'split being scored (e.g. {leaked[:3]}); score a model only on '
                         'patients it did not train on (see --data_root / --split_file)')


def evaluate(workdirs, split: str, output: str, step: Optional[int] = None,
             data_root: Optional[str] = None, split_file: Optional[str] = None,
             num_overlays: int = 0, config: Optional[ml_collections.ConfigDict] = None,
             postprocess: str = 'val') -> Dict[str, Any]:
  """Runs one checkpoint, or the mean of several, over a split; writes and returns metrics.

  Args:
    workdirs: one path or a list (an ensemble).
    config: evaluate under this config rather than the checkpoint's own.
    postprocess: 'val' (choose on the val split) or a key of FORCED.
  """
  workdirs = [workdirs] if isinstance(workdirs, str) else list(workdirs)
  members, member_configs = _load_models(workdirs, step, config, data_root, split_file)
  config = members[0][2]
  parts = tuple(dict.fromkeys([split] + (['val'] if postprocess == 'val' else [])))
  patients = data_lib.scan(config.data.root)
  inputs = {}  # The split's slices, loaded once per way a member reads them.
  for _, _, member in members:
    key = tuple(member.data[f] for f in INPUT_FIELDS)
    if key not in inputs:
      split_ids, inputs[key] = train.load_splits(member, parts=parts, patients=patients)
  # Members' splits are rebuilt over every patient of the root, as in training.
  check_not_trained_on(workdirs, member_configs, sorted(patients),
                       {part: split_ids[part] for part in parts})
  mesh = parallel.create_mesh()
  runners = [(train.create_model(member), jax.device_put(v, parallel.replicated(mesh)),
              inputs[tuple(member.data[f] for f in INPUT_FIELDS)]) for v, _, member in members]
  arrays = inputs[tuple(config.data[f] for f in INPUT_FIELDS)]
  # Any batch size works: rounded up to fill every device, padding is dropped.
  eval_batch = -(-config.eval_batch_size // jax.device_count()) * jax.device_count()
  cache = {}

  def probs(part: str, tta_flips: bool) -> np.ndarray:
    if (part, tta_flips) not in cache:
      cache[part, tta_flips] = np.mean([
          train.split_probs(model, v, member_arrays[part], eval_batch, mesh, tta_flips)
          for model, v, member_arrays in runners], axis=0)
    return cache[part, tta_flips]

  table: List[dict] = []
  if postprocess == 'val':
    if split == 'val':
      logging.warning('Post-processing is chosen on val and val is the split scored, so '
                      'the score is optimistic; pass --postprocess none (or a fixed choice) '
                      'to score val honestly.')
    val = arrays['val']
    choice, table = postprocess_lib.choose_on_val(
        lambda tta: probs('val', tta), val.native_masks, val.patient_ids, val.slice_numbers)
  else:
    choice = FORCED[postprocess]
  target = arrays[split]
  masks = postprocess_lib.to_masks(probs(split, choice['tta_flips']), target.patient_ids,
                                   target.slice_numbers, choice['largest_component'])
  counts = postprocess_lib.mask_counts(masks, target.native_masks)
  hd95 = metrics_lib.slice_hd95(masks, target.native_masks)
  results = metrics_lib.summarize(target.patient_ids, **counts, hd95_per_slice=hd95)
  results.update(split=split, checkpoint_step=int(members[0][1]),
                 checkpoints=[{'path': os.path.abspath(w), 'step': int(s),
                               **{f: m.data[f] for f in INPUT_FIELDS}}
                              for w, (_, s, m) in zip(workdirs, members)],
                 postprocess=choice, postprocess_chosen_on='val' if table else 'flag',
                 postprocess_val_table=table, data_root=config.data.root,
                 image_size=config.data.image_size, channels=config.data.channels)
  if jax.process_index() == 0:
    os.makedirs(output, exist_ok=True)
    per_patient_csv = os.path.join(output, 'per_patient.csv')
    metrics_lib.write_per_patient_csv(per_patient_csv, target.patient_ids, **counts,
                                      hd95_per_slice=hd95)
    visualize.plot_per_patient_dice(per_patient_csv, os.path.join(output, 'per_patient_dice.png'))
    if num_overlays:
      patients = metrics_lib.per_patient_scores(target.patient_ids, **counts)
      visualize.save_overlays(output, target, masks, num_overlays,
                              dict(zip(patients['patient'], patients['dice'])))
    # Written last and atomically: its presence means the evaluation is complete
    # (brainseg.cv counts a fold as done by it).
    writers.write_json_atomically(os.path.join(output, 'metrics.json'), results)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup()
  results = evaluate(FLAGS.workdir, FLAGS.split, FLAGS.output, FLAGS.step, FLAGS.data_root,
                     FLAGS.split_file, FLAGS.overlays, FLAGS.config, FLAGS.postprocess)
  s, p = results['per_slice'], results['per_patient']
  print(f"{FLAGS.split} ({results['num_patients']} patients, {results['num_slices']} slices), "
        f"step {results['checkpoint_step']}, post-processing {results['postprocess']} "
        f"(chosen by {results['postprocess_chosen_on']}): per-slice Dice {s['dice']:.4f} "
        f"precision {s['precision']:.4f} recall {s['recall']:.4f}; per-patient Dice mean "
        f"{p['dice_mean']:.4f} (95% CI {p['dice_ci95'][0]:.3f}-{p['dice_ci95'][1]:.3f}) "
        f"median {p['dice_median']:.4f}; HD95 {results['hd95']['per_slice_mean']:.2f} px; "
        f"global Dice {results['global']['dice']:.4f}. Wrote {FLAGS.output}/metrics.json")


def define_flags() -> None:
  """The command's flags (defined only when run as a command, so that other
  modules can import this one)."""
  flags.DEFINE_list('workdir', None, 'A training workdir or best-checkpoint folder; several '
                    '(comma-separated) are averaged as an ensemble.')
  flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate; default: the best on val.')
  flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'Which part of the split.')
  flags.DEFINE_string('output', None, 'Folder for metrics.json and per_patient.csv.')
  flags.DEFINE_string('data_root', None, "Override the checkpoint config's data.root.")
  flags.DEFINE_string('split_file', None, "Override the checkpoint config's data.split_file.")
  flags.DEFINE_enum('postprocess', 'val', ['val', 'none', 'tta', 'lcc', 'tta+lcc'],
                    'val: choose test-time flips / 3-D largest component on the val split; '
                    'or force a setting.')
  flags.DEFINE_integer('overlays', 0, 'Also save this many overlay PNGs (image | truth | '
                       'prediction) of tumour slices, spread over the split.')
  config_flags.DEFINE_config_file(
      'config', None, 'Evaluate under this config instead of the one saved with the '
      'checkpoint (it must describe the same model).', lock_config=False)
  flags.mark_flags_as_required(['workdir', 'output'])


if __name__ == '__main__':
  define_flags()
  app.run(lambda argv: cli.run_main(main, argv))
