"""Segmentation metrics, at the masks' native resolution, with stated semantics.

The device computes, per slice, the pixel counts of the thresholded prediction
(`slice_counts`); everything else is sums of those counts on the host, so no
metric is ever a mean of per-batch means.

Semantics (predictions are sigmoid > 0.5):
- per slice (the seed's): Dice, precision and recall of each slice, averaged
  over slices. A slice whose mask and prediction are both empty scores 1 on
  each. Otherwise an empty denominator scores 0: precision of an empty
  prediction on a tumour slice, recall (and Dice) of any prediction on an
  empty slice.
- per patient: Dice of each patient's stacked volume (the sums of its slices'
  counts), then the mean and median over patients.
- global: Dice over all pixels of the split.
"""
import csv
from typing import Dict

import jax.numpy as jnp
import numpy as np


def slice_counts(probs: jnp.ndarray, masks: jnp.ndarray, threshold: float = 0.5):
  """Per-slice (intersection, predicted, true) pixel counts.

  Args:
    probs: (N, H, W) probabilities at the masks' resolution.
    masks: (N, H, W) bool ground truth.

  Returns:
    three (N,) int32 arrays.
  """
  pred = probs > threshold
  sum_hw = lambda x: jnp.sum(x, axis=(1, 2), dtype=jnp.int32)
  return sum_hw(pred & masks), sum_hw(pred), sum_hw(masks)


def _ratio(num: np.ndarray, den: np.ndarray, both_empty: np.ndarray) -> np.ndarray:
  """num/den where den > 0; 1 where `both_empty`; else 0."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
  return np.where(both_empty, 1.0, out)


def dice_precision_recall(intersection, predicted, true) -> Dict[str, np.ndarray]:
  """Elementwise Dice, precision and recall from counts (semantics: module doc)."""
  intersection, predicted, true = map(np.asarray, (intersection, predicted, true))
  both_empty = (predicted == 0) & (true == 0)
  return {
      'dice': _ratio(2 * intersection, predicted + true, both_empty),
      'precision': _ratio(intersection, predicted, both_empty),
      'recall': _ratio(intersection, true, both_empty),
  }


def per_patient_counts(patient_ids, intersection, predicted, true) -> Dict[str, np.ndarray]:
  """Sums each patient's slice counts; returns sorted ids and their totals."""
  ids, inverse = np.unique(np.asarray(patient_ids), return_inverse=True)
  total = lambda x: np.bincount(inverse, weights=np.asarray(x, np.float64), minlength=len(ids))
  return {
      'patient': ids,
      'num_slices': np.bincount(inverse, minlength=len(ids)),
      'tumour_slices': np.bincount(inverse, weights=np.asarray(true) > 0,
                                   minlength=len(ids)).astype(int),
      'intersection': total(intersection),
      'predicted': total(predicted),
      'true': total(true),
  }


def per_patient_scores(patient_ids, intersection, predicted, true) -> Dict[str, np.ndarray]:
  """Per-patient totals (per_patient_counts) plus each volume's Dice, precision, recall."""
  patients = per_patient_counts(patient_ids, intersection, predicted, true)
  patients.update(dice_precision_recall(patients['intersection'], patients['predicted'],
                                        patients['true']))
  return patients


def summarize(patient_ids, intersection, predicted, true) -> Dict[str, dict]:
  """All split-level metrics from per-slice counts.

  Returns:
    {'per_slice': {...}, 'per_patient': {...}, 'global': {...}, 'num_slices',
     'num_patients'}: plain floats and ints, ready for JSON.
  """
  per_slice = dice_precision_recall(intersection, predicted, true)
  per_patient = per_patient_scores(patient_ids, intersection, predicted, true)
  total = dice_precision_recall(np.sum(intersection), np.sum(predicted), np.sum(true))
  return {
      'per_slice': {k: float(np.mean(v)) for k, v in per_slice.items()},
      'per_patient': {
          'dice_mean': float(np.mean(per_patient['dice'])),
          'dice_median': float(np.median(per_patient['dice'])),
          'dice_min': float(np.min(per_patient['dice'])),
          'precision_mean': float(np.mean(per_patient['precision'])),
          'recall_mean': float(np.mean(per_patient['recall'])),
      },
      'global': {k: float(v) for k, v in total.items()},
      'num_slices': int(len(np.asarray(true))),
      'num_patients': int(len(per_patient['patient'])),
  }


def write_per_patient_csv(path: str, patient_ids, intersection, predicted, true) -> None:
  """One row per patient: slice counts, pixel totals and volume Dice/precision/recall."""
  patients = per_patient_scores(patient_ids, intersection, predicted, true)
  slice_dice = dice_precision_recall(intersection, predicted, true)['dice']
  ids = np.asarray(patient_ids)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['patient', 'num_slices', 'tumour_slices', 'true_pixels',
                     'predicted_pixels', 'dice', 'precision', 'recall', 'mean_slice_dice'])
    for i, pid in enumerate(patients['patient']):
      writer.writerow([pid, patients['num_slices'][i], patients['tumour_slices'][i],
                       int(patients['true'][i]), int(patients['predicted'][i]),
                       f'{patients["dice"][i]:.6f}', f'{patients["precision"][i]:.6f}',
                       f'{patients["recall"][i]:.6f}', f'{slice_dice[ids == pid].mean():.6f}'])
