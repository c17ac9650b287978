r"""Pictures of a run: overlays of predictions and the learning curve.

  python -m brainseg.visualize --workdir DIR --output OUT   # OUT/learning_curve.png
"""
import os
from typing import Any, Dict, Sequence

from absl import app
from absl import flags
import jax
import matplotlib
matplotlib.use('Agg')  # Files only; no display needed.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
import scipy.ndimage

from brainseg import data as data_lib
from brainseg import writers


def tumour_outline(mask: np.ndarray) -> np.ndarray:
  """The boundary pixels of a boolean mask."""
  return mask & ~scipy.ndimage.binary_erosion(mask)


def overlay_panel(path: str, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
                  title: str = '') -> None:
  """Saves image | ground truth | prediction side by side, as the seed showed them."""
  fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
  for ax, (name, mask, colour) in zip(axes, [('image', None, None),
                                             ('ground truth', truth, (0, 1, 0)),
                                             ('prediction', prediction, (1, 0, 0))]):
    shown = image.astype(np.float32) / 255.0
    if mask is not None:
      shown = shown.copy()
      shown[mask] = 0.5 * shown[mask] + 0.5 * np.array(colour)
    ax.imshow(shown)
    ax.set_title(name, fontsize=9)
    ax.axis('off')
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def save_overlays(output: str, arrays, pred_masks: np.ndarray, count: int,
                  patient_dice: Dict[str, float]) -> Sequence[str]:
  """Overlay PNGs: `count` tumour slices spread over the split, and the largest
  tumour slice of the best, median and worst patient by Dice.

  Args:
    pred_masks: (N, H, W) bool predictions at the masks' size, one per row of `arrays`.
  """
  rows = list(display_rows(arrays, count))
  ranked = sorted(patient_dice, key=patient_dice.get)
  named = {'worst': ranked[0], 'median': ranked[len(ranked) // 2], 'best': ranked[-1]}
  tumour_area = arrays.native_masks.sum(axis=(1, 2))
  for pid in named.values():
    rows.append(int(np.argmax(np.where(arrays.patient_ids == pid, tumour_area, -1))))
  labels = [''] * count + [f'{k}_' for k in named]
  paths = []
  for label, row in zip(labels, rows):
    pid, number = arrays.patient_ids[row], arrays.slice_numbers[row]
    path = os.path.join(output, f'overlay_{label}{pid}_{number}.png')
    title = f'{pid} slice {number}' + (f' ({label[:-1]} patient, volume Dice '
                                       f'{patient_dice[pid]:.3f})' if label else '')
    overlay_panel(path, data_lib.read_image(arrays.image_paths[row]), arrays.native_masks[row],
                  pred_masks[row], title=title)
    paths.append(path)
  return paths


def plot_per_patient_dice(per_patient_csv: str, output_path: str) -> None:
  """A bar chart of each patient's volume Dice, sorted, from per_patient.csv."""
  import csv  # pylint: disable=g-import-not-at-top
  with open(per_patient_csv) as f:
    rows = sorted(csv.DictReader(f), key=lambda r: float(r['dice']))
  fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4))
  dice = [float(r['dice']) for r in rows]
  ax.bar(range(len(rows)), dice, color='tab:blue')
  ax.axhline(np.mean(dice), color='tab:red', lw=1, label=f'mean {np.mean(dice):.3f}')
  ax.axhline(np.median(dice), color='tab:green', lw=1, ls='--',
             label=f'median {np.median(dice):.3f}')
  ax.set_xticks(range(len(rows)), [r['patient'].replace('TCGA_', '') for r in rows],
                rotation=70, fontsize=7)
  ax.set(ylabel='volume Dice', ylim=(0, 1), title='Dice per patient')
  ax.legend(loc='lower right')
  fig.tight_layout()
  fig.savefig(output_path, dpi=90)
  plt.close(fig)


def display_rows(arrays, count: int = 4) -> np.ndarray:
  """A fixed choice of `count` tumour slices spread over a split, for TensorBoard."""
  tumour_rows = np.flatnonzero(arrays.has_tumour)
  if not len(tumour_rows):
    tumour_rows = np.arange(len(arrays))
  return tumour_rows[np.linspace(0, len(tumour_rows) - 1, min(count, len(tumour_rows))).astype(int)]


def _to_unit(x: np.ndarray) -> np.ndarray:
  low, high = np.percentile(x, 1), np.percentile(x, 99)
  return np.clip((x - low) / max(high - low, 1e-6), 0, 1)


def forward_with_attention(apply_fn):
  """A jitted `(variables, images) -> (logits, {'intermediates': attention maps})`."""
  return jax.jit(lambda v, x: apply_fn(v, x, train=False, mutable=['intermediates']))


def tensorboard_images(forward, variables: Dict[str, Any], images: np.ndarray,
                       masks: np.ndarray) -> Dict[str, np.ndarray]:
  """Overlays and attention-gate maps of a few slices, at the model's input size.

  Args:
    forward: from `forward_with_attention`.
    images: (N, S, S, C) model inputs; masks: (N, S, S, 1) resized ground truth.

  Returns:
    {'overlays': (N, S, S, 3) float in [0, 1] with the truth outlined in green and
     the prediction in red, 'attention_<level>': (N, S, S, 1) gate maps}.
  """
  logits, state = forward(variables, images)
  predicted = np.asarray(logits)[..., 0] > 0
  # The FLAIR channel (the middle one) of 3-channel input shows the lesion best.
  base = _to_unit(np.asarray(images)[..., images.shape[-1] // 2])
  overlays = np.repeat(base[..., None], 3, axis=-1)
  for i in range(len(images)):
    overlays[i][tumour_outline(masks[i, ..., 0] > 0.5)] = (0, 1, 0)
    overlays[i][tumour_outline(predicted[i])] = (1, 0, 0)
  out = {'overlays': overlays}
  size = images.shape[1]
  for name, (attention,) in sorted(state['intermediates'].items()):
    attention = np.asarray(attention)
    repeat = size // attention.shape[1]
    out[name] = attention.repeat(repeat, axis=1).repeat(repeat, axis=2)
  return out


def plot_learning_curve(metrics_path: str, output_path: str) -> None:
  """Training loss and validation Dice against step, from a metrics.jsonl file."""
  records = writers.read_jsonl(metrics_path)
  train = [(r['step'], r['loss']) for r in records if 'loss' in r]
  val = [(r['step'], r['val/per_slice/dice'], r['val/per_patient/dice_mean'])
         for r in records if 'val/per_slice/dice' in r]
  fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 3.8))
  if train:
    steps, loss = zip(*train)
    ax_loss.plot(steps, loss, lw=1)
  ax_loss.set(xlabel='step', ylabel='training loss', title='loss', yscale='log')
  if val:
    steps, per_slice, per_patient = zip(*val)
    ax_dice.plot(steps, per_slice, marker='.', label='per-slice Dice')
    ax_dice.plot(steps, per_patient, marker='.', label='per-patient Dice')
    ax_dice.legend()
  ax_dice.set(xlabel='step', ylabel='validation Dice', title='validation', ylim=(0, 1))
  for ax in (ax_loss, ax_dice):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(output_path, dpi=90)
  plt.close(fig)


def main(argv):
  del argv
  flags_ = flags.FLAGS
  os.makedirs(flags_.output, exist_ok=True)
  plot_learning_curve(os.path.join(flags_.workdir, writers.METRICS_FILE),
                      os.path.join(flags_.output, 'learning_curve.png'))


if __name__ == '__main__':
  # Defined here, not at import, so that evaluate.py can import this module.
  flags.DEFINE_string('workdir', None, 'A training workdir holding metrics.jsonl.')
  flags.DEFINE_string('output', None, 'Folder for learning_curve.png.')
  flags.mark_flags_as_required(['workdir', 'output'])
  app.run(main)
