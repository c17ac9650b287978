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
IoU follows the same rules as Dice.
- HD95 (pixels at the masks' 256x256 size): per slice, the 95th percentile of
  the distances from each contour pixel of the prediction to the truth's
  contour and back (pooled, as MedPy's hd95). Only slices where both masks are
  non-empty have one; a slice with exactly one empty mask is a missed tumour
  or a false-positive slice (see detection), never a distance. Per patient:
  the mean over its scored slices; the split: the mean over scored slices and
  over patients with at least one.
- detection: a tumour slice (or patient) is found when the prediction overlaps
  its mask; a false-positive slice predicts tumour on an empty mask.
- dice_ci95: a 95% percentile bootstrap interval of the per-patient mean Dice,
  patients resampled with replacement (2000 draws, seed 0).
"""
import csv
from typing import Dict, Optional

import jax.numpy as jnp
import numpy as np
import scipy.ndimage


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
  """Elementwise Dice, IoU, precision and recall from counts (semantics: module doc)."""
  intersection, predicted, true = map(np.asarray, (intersection, predicted, true))
  both_empty = (predicted == 0) & (true == 0)
  return {
      'dice': _ratio(2 * intersection, predicted + true, both_empty),
      'iou': _ratio(intersection, predicted + true - intersection, both_empty),
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


def _contour(mask: np.ndarray) -> np.ndarray:
  """The mask's pixels with a background pixel above, below, left or right.

  The cross-shaped erosion is MedPy's (connectivity 1), so HD95 matches its `hd95`.
  """
  cross = scipy.ndimage.generate_binary_structure(2, 1)
  return mask & ~scipy.ndimage.binary_erosion(mask, cross, border_value=0)


def hd95(pred: np.ndarray, true: np.ndarray) -> float:
  """HD95 in pixels between two 2-D boolean masks; NaN unless both are non-empty."""
  if not pred.any() or not true.any():
    return float('nan')
  pred_contour, true_contour = _contour(pred), _contour(true)
  # Distance of every pixel to the nearest contour pixel of the other mask.
  to_true = scipy.ndimage.distance_transform_edt(~true_contour)
  to_pred = scipy.ndimage.distance_transform_edt(~pred_contour)
  distances = np.concatenate([to_true[pred_contour], to_pred[true_contour]])
  return float(np.percentile(distances, 95))


def slice_hd95(pred_masks: np.ndarray, true_masks: np.ndarray) -> np.ndarray:
  """(N,) HD95 of each slice of two (N, H, W) boolean stacks (NaN where undefined)."""
  return np.array([hd95(p, t) for p, t in zip(pred_masks, true_masks)], np.float64)


def bootstrap_ci(values, num_draws: int = 2000, seed: int = 0):
  """95% percentile bootstrap interval of the mean of `values`."""
  values = np.asarray(values, np.float64)
  draws = np.random.default_rng(seed).integers(0, len(values), (num_draws, len(values)))
  means = values[draws].mean(axis=1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def detection(patient_ids, intersection, predicted, true) -> Dict[str, float]:
  """Tumour slices and patients found, and false-positive slices (module doc)."""
  intersection, predicted, true = map(np.asarray, (intersection, predicted, true))
  tumour, empty = true > 0, true == 0
  patients = per_patient_counts(patient_ids, intersection, predicted, true)
  tumour_patients = patients['true'] > 0
  found_patients = tumour_patients & (patients['intersection'] > 0)
  share = lambda part, whole: float(part.sum() / whole.sum()) if whole.any() else float('nan')
  return {
      'tumour_slices': int(tumour.sum()),
      'tumour_slices_found': int((tumour & (intersection > 0)).sum()),
      'tumour_slice_found_rate': share(tumour & (intersection > 0), tumour),
      'tumour_patients': int(tumour_patients.sum()),
      'tumour_patients_found': int(found_patients.sum()),
      'tumour_patient_found_rate': share(found_patients, tumour_patients),
      'false_positive_slices': int((empty & (predicted > 0)).sum()),
      'false_positive_slice_rate': share(empty & (predicted > 0), empty),
  }


def _patient_hd95(patient_ids, hd95_per_slice) -> Dict[str, float]:
  """Each patient's mean HD95 over its scored slices (patients with none are left out)."""
  ids, hd = np.asarray(patient_ids), np.asarray(hd95_per_slice)
  return {pid: float(np.nanmean(hd[ids == pid])) for pid in np.unique(ids)
          if np.isfinite(hd[ids == pid]).any()}


def summarize(patient_ids, intersection, predicted, true,
              hd95_per_slice: Optional[np.ndarray] = None) -> Dict[str, dict]:
  """All split-level metrics from per-slice counts (and per-slice HD95 when given).

  Returns:
    {'per_slice', 'per_patient', 'global', 'detection', ['hd95'], 'num_slices',
     'num_patients'}: plain floats and ints, ready for JSON.
  """
  per_slice = dice_precision_recall(intersection, predicted, true)
  per_patient = per_patient_scores(patient_ids, intersection, predicted, true)
  total = dice_precision_recall(np.sum(intersection), np.sum(predicted), np.sum(true))
  low, high = bootstrap_ci(per_patient['dice'])
  out = {
      'per_slice': {k: float(np.mean(v)) for k, v in per_slice.items()},
      'per_patient': {
          'dice_mean': float(np.mean(per_patient['dice'])),
          'dice_ci95': [low, high],
          'dice_median': float(np.median(per_patient['dice'])),
          'dice_min': float(np.min(per_patient['dice'])),
          'iou_mean': float(np.mean(per_patient['iou'])),
          'precision_mean': float(np.mean(per_patient['precision'])),
          'recall_mean': float(np.mean(per_patient['recall'])),
      },
      'global': {k: float(v) for k, v in total.items()},
      'detection': detection(patient_ids, intersection, predicted, true),
      'num_slices': int(len(np.asarray(true))),
      'num_patients': int(len(per_patient['patient'])),
  }
  if hd95_per_slice is not None:
    scored = np.asarray(hd95_per_slice)[np.isfinite(hd95_per_slice)]
    patients = list(_patient_hd95(patient_ids, hd95_per_slice).values())
    nan_mean = lambda x: float(np.mean(x)) if len(x) else float('nan')
    out['hd95'] = {'per_slice_mean': nan_mean(scored),
                   'per_slice_median': float(np.median(scored)) if len(scored) else float('nan'),
                   'per_patient_mean': nan_mean(patients),
                   'scored_slices': int(len(scored)), 'scored_patients': len(patients)}
  return out


def write_per_patient_csv(path: str, patient_ids, intersection, predicted, true,
                          hd95_per_slice: Optional[np.ndarray] = None) -> None:
  """One row per patient: counts, pixel totals, volume scores, detection and HD95."""
  patients = per_patient_scores(patient_ids, intersection, predicted, true)
  slice_dice = dice_precision_recall(intersection, predicted, true)['dice']
  patient_hd95 = (_patient_hd95(patient_ids, hd95_per_slice)
                  if hd95_per_slice is not None else {})
  ids, true, predicted = np.asarray(patient_ids), np.asarray(true), np.asarray(predicted)
  found = (true > 0) & (np.asarray(intersection) > 0)
  false_positive = (true == 0) & (predicted > 0)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['patient', 'num_slices', 'tumour_slices', 'tumour_slices_found',
                     'false_positive_slices', 'true_pixels', 'predicted_pixels', 'dice', 'iou',
                     'precision', 'recall', 'mean_slice_dice', 'hd95_mean'])
    for i, pid in enumerate(patients['patient']):
      rows = ids == pid
      hd = patient_hd95.get(pid)
      writer.writerow([pid, patients['num_slices'][i], patients['tumour_slices'][i],
                       int(found[rows].sum()), int(false_positive[rows].sum()),
                       int(patients['true'][i]), int(patients['predicted'][i]),
                       f'{patients["dice"][i]:.6f}', f'{patients["iou"][i]:.6f}',
                       f'{patients["precision"][i]:.6f}', f'{patients["recall"][i]:.6f}',
                       f'{slice_dice[rows].mean():.6f}', '' if hd is None else f'{hd:.3f}'])
