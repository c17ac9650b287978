"""Where a run's numbers go: TensorBoard (clu's writer) and `metrics.jsonl`.

clu's TensorBoard writer needs TensorFlow, which takes seconds to import; it is
imported here, when a run starts, so `import brainseg` stays light.
`metrics.jsonl` gets one JSON object per logged step, holding every scalar
written at that step (train loss, learning rate, val metrics, timings).
"""
import contextlib
import json
import os
from typing import Any, Dict, Mapping

from flax import traverse_util
import numpy as np

METRICS_FILE = 'metrics.jsonl'


class MetricLogger:
  """A clu MetricWriter-like sink: TensorBoard events plus a JSON-lines file.

  Only process 0 writes; on other processes every call does nothing.
  """

  def __init__(self, workdir: str, process_index: int = 0, resume_step: int = 0):
    """Opens the writers; `resume_step` drops jsonl records a killed run wrote after
    its last checkpoint, since the resumed run logs those steps again."""
    self._active = process_index == 0
    self._pending_step, self._pending = None, {}
    if not self._active:
      return
    from clu import metric_writers  # Lazy: pulls in TensorFlow.
    self._tensorboard = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(path):
      kept = [r for r in read_jsonl(path) if r['step'] <= resume_step]
      with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
    self._jsonl = open(path, 'a')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self._active:
      return
    self._tensorboard.write_scalars(step, scalars)
    if step != self._pending_step:
      self._write_pending()
      self._pending_step = step
    self._pending.update({k: float(np.asarray(v)) for k, v in scalars.items()})

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    if self._active:
      self._tensorboard.write_images(step, images)

  def write_hparams(self, hparams: Dict[str, Any]) -> None:
    if self._active:
      self._tensorboard.write_hparams(_flatten_hparams(hparams))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._active:
      self._tensorboard.write_texts(step, texts)

  def _write_pending(self) -> None:
    if self._pending_step is not None and self._pending:
      self._jsonl.write(json.dumps({'step': self._pending_step, **self._pending}) + '\n')
      self._jsonl.flush()
    self._pending = {}

  def flush(self) -> None:
    if self._active:
      self._write_pending()
      self._tensorboard.flush()

  def close(self) -> None:
    if self._active:
      self.flush()
      self._tensorboard.close()
      self._jsonl.close()
      self._active = False


def _flatten_hparams(tree: Dict[str, Any]) -> Dict[str, Any]:
  """Nested config dict -> {'data.root': ...}, lists as strings (TensorBoard's HParams)."""
  return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
          for key, value in traverse_util.flatten_dict(tree, sep='.').items()}


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path to write; renamed to `path` only once the block ends
  without error, so `path` is never half-written (an earlier file stays whole)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  yield path + '.tmp'
  os.replace(path + '.tmp', path)


def write_json_atomically(path: str, value: Any, sort_keys: bool = False) -> None:
  """Writes `value` as JSON through `atomic_path`."""
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=sort_keys)


def read_jsonl(path: str):
  """The records of a metrics.jsonl file, in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
