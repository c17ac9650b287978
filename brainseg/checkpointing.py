"""Orbax checkpoints of a run's workdir.

    workdir/config.json        the run's config; a resumed run must match it
    workdir/checkpoints/<step> latest train state + grain iterator (for resuming)
    workdir/best/<step>        params + BatchNorm statistics of the best-on-val
                               step, with its config (for evaluation and export)

Saves are asynchronous and atomic: orbax writes to a temporary folder and
renames it when complete, so a run killed mid-save leaves the previous
checkpoint as the latest one.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from flax import traverse_util
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from brainseg import writers

CONFIG_FILE = 'config.json'
# Every patient a run's model has learned from, over all its starts and resumes.
TRAINED_ON_FILE = 'trained_on.json'
# Settings that may change between a run and its resumption without changing
# what is trained: where the data lives, how fast it is read, how often to log.
RESUME_SAFE_FIELDS = ('allow_config_change', 'data.root', 'data.num_threads',
                      'data.prefetch', 'log_every_steps')


def train_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def best_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'best')


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a workdir's checkpoints under a different config; saves the config.

  Raises:
    ValueError: naming the settings that differ, unless config.allow_config_change.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  has_checkpoints = any(os.path.isdir(d) and os.listdir(d)
                        for d in (train_dir(workdir), best_dir(workdir)))
  if has_checkpoints and os.path.exists(path) and not config.get('allow_config_change'):
    with open(path) as f:
      # A field added to brainseg since the run started counts at its default,
      # which is what the run used.
      old = json.loads(with_current_defaults(json.load(f)).to_json_best_effort())
    old = traverse_util.flatten_dict(old, sep='.')
    flat_new = traverse_util.flatten_dict(new, sep='.')
    changed = sorted(k for k in set(old) & set(flat_new)
                     if old[k] != flat_new[k] and k not in RESUME_SAFE_FIELDS)
    if changed:
      details = '; '.join(f'{k}: {old.get(k)!r} -> {flat_new.get(k)!r}' for k in changed[:8])
      raise ValueError(
          f'workdir {workdir} holds checkpoints of a run with another config ({details}). '
          'Use a new --workdir, or pass --config.allow_config_change=True to resume anyway.')
  if jax.process_index() == 0:
    writers.write_json_atomically(path, new, sort_keys=True)


def train_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Manager of the periodic checkpoints: train state + grain iterator state."""
  return ocp.CheckpointManager(
      train_dir(workdir),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.checkpoints_to_keep),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def restore_latest(manager: ocp.CheckpointManager, state: Any, data_iterator) -> Any:
  """Restores the latest state (and the iterator, in place); `state` if none exists."""
  step = manager.latest_step()
  if step is None:
    return state
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(state)),
      data=grain.checkpoint.CheckpointRestore(data_iterator)))
  return restored['state']


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator,
         force: bool = False) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)


def _best_manager(directory: str, read_only: bool = False) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(max_to_keep=1, read_only=read_only,
                                                      create=not read_only),
      item_handlers={'model': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


class BestCheckpoint:
  """Keeps the model of the best validation score seen, with its config."""

  def __init__(self, workdir: str):
    self._manager = _best_manager(best_dir(workdir))
    self.value = -1.0
    step = self._manager.latest_step()
    if step is not None:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta']
      self.value = float(meta['val_dice'])

  def update(self, step: int, model: Any, value: float, config: ml_collections.ConfigDict,
             trained_on: Sequence[str]) -> bool:
    """Saves `model` (params and batch_stats) if `value` beats the best so far,
    with the config and every patient the model learned from (`trained_on`), so
    that evaluate can refuse those patients wherever the data and split files are.

    Returns:
      whether it saved.
    """
    if value <= self.value:
      return False
    meta = {'step': step, 'val_dice': value, 'config': json.loads(config.to_json_best_effort()),
            'trained_on': sorted(trained_on)}
    saved = self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta)))
    if saved:
      self.value = value
    return saved

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def restore_on_one_device(manager: ocp.CheckpointManager, step: int, item: str) -> Any:
  """Restores one item onto this process's first device, whatever mesh saved it.

  Restoring into the saved shardings fails on a machine with other devices (a
  checkpoint of an 8-GPU run evaluated on a laptop); the caller places the arrays.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  tree = manager.item_metadata(step)[item].tree
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree)
  return manager.restore(step, args=ocp.args.Composite(
      **{item: ocp.args.StandardRestore(abstract)}))[item]


def _steps(directory: str):
  return ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []


def with_current_defaults(saved: Dict[str, Any]) -> ml_collections.ConfigDict:
  """A saved config, with fields added to configs/default.py since then at their defaults."""
  try:
    from configs import default  # pylint: disable=g-import-not-at-top
  except ImportError:  # brainseg used outside its repository: take the config as saved.
    return ml_collections.ConfigDict(saved)
  merged = traverse_util.flatten_dict(default.get_config().to_dict())
  merged.update(traverse_util.flatten_dict(saved))
  return ml_collections.ConfigDict(traverse_util.unflatten_dict(merged))


def latest_train_step(workdir: str) -> Optional[int]:
  """The newest periodic train-state checkpoint of a workdir; None if it has none."""
  steps = _steps(train_dir(workdir))
  return max(steps) if steps else None


def _best_folder(path: str) -> str:
  """The `best/` folder of a workdir, or `path` itself if it is one (its steps hold 'meta')."""
  if os.path.isdir(best_dir(path)):
    return best_dir(path)
  path = os.path.abspath(path)
  return path if any(os.path.isdir(os.path.join(path, str(s), 'meta'))
                     for s in _steps(path)) else best_dir(path)


def _best_meta(path: str) -> Optional[Dict[str, Any]]:
  """The meta (step, val Dice, config, training patients) saved with the best-on-val
  model of a workdir or `best/` folder; None if there is none."""
  best = _best_folder(path)
  steps = _steps(best)
  if not steps:
    return None
  manager = _best_manager(best, read_only=True)
  meta = manager.restore(max(steps), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  manager.close()
  return meta


def load_saved_config(path: str) -> ml_collections.ConfigDict:
  """The config saved with a workdir's (or `best/` folder's) best-on-val model, without its arrays.

  Raises:
    FileNotFoundError: if there is no best-on-val checkpoint.
  """
  meta = _best_meta(path)
  if meta is None:
    raise FileNotFoundError(f'found no best-on-val checkpoint under {path}')
  return with_current_defaults(meta['config'])


def record_trained_on(workdir: str, patients: Sequence[str]) -> List[str]:
  """Adds `patients` to the workdir's record of training patients and returns it
  all: a run resumed on another split (allow_config_change) keeps the first
  split's patients, and a fine-tune keeps its start model's once that is gone."""
  recorded = set(load_trained_on(workdir) or ()) | set(patients)
  if jax.process_index() == 0:
    writers.write_json_atomically(os.path.join(workdir, TRAINED_ON_FILE), sorted(recorded))
  return sorted(recorded)


def _read_trained_on_file(workdir: str) -> Optional[List[str]]:
  path = os.path.join(workdir, TRAINED_ON_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_trained_on(path: str) -> Optional[List[str]]:
  """The patients the model under `path` (a workdir or `best/` folder) learned
  from, as its run recorded them (the best model's meta and the workdir's record);
  None if neither exists (runs from before brainseg recorded them)."""
  meta = _best_meta(path)
  lists = [(meta or {}).get('trained_on'), _read_trained_on_file(path)]
  lists = [set(x) for x in lists if x is not None]
  return sorted(set().union(*lists)) if lists else None


def load_model(path: str, step: Optional[int] = None):
  """Loads a model for inference: (variables, config, step).

  Args:
    path: a training workdir, or a `best/` folder (such as results/reference/best).
    step: None for the best-on-val checkpoint; otherwise that step, from the best
      checkpoint or from the workdir's periodic train-state checkpoints.

  Raises:
    FileNotFoundError: naming where it looked.
  """
  best = _best_folder(path)
  best_steps = _steps(best)
  if step is None and best_steps:
    step = max(best_steps)
  if step in best_steps:
    manager = _best_manager(best, read_only=True)
    model = restore_on_one_device(manager, step, 'model')
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    manager.close()
    return model, with_current_defaults(meta['config']), step
  if step is not None and step in _steps(train_dir(path)):
    manager = ocp.CheckpointManager(train_dir(path), options=ocp.CheckpointManagerOptions(
        read_only=True), item_handlers={'state': ocp.StandardCheckpointHandler()})
    state = restore_on_one_device(manager, step, 'state')
    manager.close()
    with open(os.path.join(path, CONFIG_FILE)) as f:
      config = with_current_defaults(json.load(f))
    return {'params': state['params'], 'batch_stats': state['batch_stats']}, config, step
  wanted = 'best-on-val checkpoint' if step is None else f'checkpoint of step {step}'
  raise FileNotFoundError(
      f'found no {wanted} under {path} (best steps: {sorted(best_steps)}, periodic steps: '
      f'{sorted(_steps(train_dir(path)))})')
