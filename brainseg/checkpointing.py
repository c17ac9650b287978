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
from typing import Any, Dict, Optional, Tuple

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
# Settings that may change between a run and its resumption without changing
# what is trained: where the data lives, how fast it is read, how often to log.
RESUME_SAFE_FIELDS = ('allow_config_change', 'data.root', 'data.num_threads',
                      'data.prefetch', 'log_every_steps')


def train_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def best_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'best')


def _flat(tree: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


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
      old = _flat(json.load(f))
    flat_new = _flat(new)
    changed = sorted(k for k in set(old) | set(flat_new)
                     if old.get(k) != flat_new.get(k) and k not in RESUME_SAFE_FIELDS)
    if changed:
      details = '; '.join(f'{k}: {old.get(k)!r} -> {flat_new.get(k)!r}' for k in changed[:8])
      raise ValueError(
          f'workdir {workdir} holds checkpoints of a run with another config ({details}). '
          'Use a new --workdir, or pass --config.allow_config_change=True to resume anyway.')
  if jax.process_index() == 0:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


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

  def update(self, step: int, model: Any, value: float,
             config: ml_collections.ConfigDict) -> bool:
    """Saves `model` (params and batch_stats) if `value` beats the best so far.

    Returns:
      whether it saved.
    """
    if value <= self.value:
      return False
    self.value = value
    meta = {'step': step, 'val_dice': value, 'config': json.loads(config.to_json_best_effort())}
    self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave(meta)))
    return True

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def find_model_checkpoint(path: str, step: Optional[int] = None) -> Tuple[str, int]:
  """(best-checkpoint folder, step) for a workdir or a `best/` folder.

  Raises:
    FileNotFoundError: if no best checkpoint (or not the named step) is there.
  """
  for directory in (best_dir(path), os.path.abspath(path)):
    if os.path.isdir(directory):
      steps = ocp.utils.checkpoint_steps(directory)
      if steps:
        if step is None:
          return directory, max(steps)
        if step in steps:
          return directory, step
        raise FileNotFoundError(f'{directory} has no checkpoint of step {step} '
                                f'(it has {sorted(steps)})')
  raise FileNotFoundError(f'no best-on-val checkpoint under {path} (looked in '
                          f'{best_dir(path)} and {path})')


def load_model(path: str, step: Optional[int] = None):
  """Loads a best checkpoint: (variables, config, step).

  Args:
    path: a workdir, or a `best/` folder (such as results/reference/best).
    step: a named step; the latest best if None.
  """
  directory, step = find_model_checkpoint(path, step)
  manager = _best_manager(directory, read_only=True)
  restored = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
  manager.close()
  config = ml_collections.ConfigDict(restored['meta']['config'])
  return restored['model'], config, step
