"""Post-processing of predicted masks, and the choice of it on val.

Two switches, each kept only when val says so (`choose_on_val`):
- test-time flips (`tta_flips`): average the probabilities of each slice and of
  its left-right mirror (done on the device, in train.predict_probs);
- the largest connected component in 3-D (`largest_component`): per patient,
  the slices stacked in slice order, keep only the biggest 26-connected blob,
  because a glioma is one lesion and small far-away blobs are false positives.
"""
from typing import Callable, Dict, List, Tuple

import numpy as np
import scipy.ndimage

from brainseg import metrics as metrics_lib

# The four settings tried on val, simplest first: ties keep the simpler one.
OPTIONS: List[Dict[str, bool]] = [
    {'tta_flips': False, 'largest_component': False},
    {'tta_flips': False, 'largest_component': True},
    {'tta_flips': True, 'largest_component': False},
    {'tta_flips': True, 'largest_component': True},
]


def largest_component_3d(masks: np.ndarray, patient_ids: np.ndarray,
                         slice_numbers: np.ndarray) -> np.ndarray:
  """Keeps, per patient, only the largest 26-connected component of its volume.

  Args:
    masks: (N, H, W) bool, rows in any order.
    patient_ids, slice_numbers: (N,) which volume and which slice each row is
      (slice numbers unique within a patient; gaps in them are kept as gaps).
  """
  out = np.zeros_like(masks)
  structure = np.ones((3, 3, 3), bool)
  for pid in np.unique(patient_ids):
    rows = np.flatnonzero(patient_ids == pid)
    # Each slice at its own depth, so that a missing slice number leaves an
    # empty layer between its neighbours instead of joining them.
    depth = slice_numbers[rows] - slice_numbers[rows].min()
    volume = np.zeros((depth.max() + 1, *masks.shape[1:]), bool)
    volume[depth] = masks[rows]
    labels, count = scipy.ndimage.label(volume, structure)
    if count:
      sizes = np.bincount(labels.ravel())[1:]
      out[rows] = (labels == 1 + int(np.argmax(sizes)))[depth]
  return out


def to_masks(probs: np.ndarray, patient_ids: np.ndarray, slice_numbers: np.ndarray,
             largest_component: bool) -> np.ndarray:
  """Thresholds probabilities at 0.5, then applies the 3-D component filter if asked."""
  masks = probs > 0.5
  return largest_component_3d(masks, patient_ids, slice_numbers) if largest_component else masks


def mask_counts(pred: np.ndarray, true: np.ndarray) -> Dict[str, np.ndarray]:
  """Per-slice (intersection, predicted, true) pixel counts of two (N, H, W) bool stacks."""
  total = lambda x: x.sum(axis=(1, 2), dtype=np.int64)
  return {'intersection': total(pred & true), 'predicted': total(pred), 'true': total(true)}


def choose_on_val(probs_for: Callable[[bool], np.ndarray], native_masks: np.ndarray,
                  patient_ids: np.ndarray,
                  slice_numbers: np.ndarray) -> Tuple[Dict[str, bool], List[dict]]:
  """Scores each of OPTIONS on val; returns the best and the table behind it.

  The criterion is val's per-patient mean Dice; a setting is chosen over a
  simpler one only if it scores strictly higher.

  Args:
    probs_for: tta_flips -> (N, H, W) val probabilities.
  """
  probs = {tta: probs_for(tta) for tta in (False, True)}
  table = []
  for option in OPTIONS:
    masks = to_masks(probs[option['tta_flips']], patient_ids, slice_numbers,
                     option['largest_component'])
    scores = metrics_lib.summarize(patient_ids, **mask_counts(masks, native_masks))
    table.append({**option, 'val_per_patient_dice': scores['per_patient']['dice_mean'],
                  'val_per_slice_dice': scores['per_slice']['dice']})
  best = max(table, key=lambda row: row['val_per_patient_dice'])  # First of equals wins.
  return {k: best[k] for k in ('tta_flips', 'largest_component')}, table
