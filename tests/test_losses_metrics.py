"""Losses and metrics against values worked out by hand, empty masks included."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from brainseg import losses
from brainseg import metrics


def test_bce_by_hand():
  logits = jnp.array([0.0, 2.0, -1.0])
  targets = jnp.array([1.0, 0.0, 0.0])
  expected = np.mean([np.log(2), np.log(1 + np.e ** 2), np.log(1 + np.e ** -1)])
  np.testing.assert_allclose(losses.bce(logits, targets), expected, rtol=1e-6)


def test_soft_dice_by_hand():
  logits = jnp.array([0.0, 0.0])  # probabilities 0.5, 0.5
  targets = jnp.array([1.0, 0.0])
  # 1 - (2 * 0.5 + 1) / (1.0 + 1 + 1)
  np.testing.assert_allclose(losses.soft_dice(logits, targets), 1 - 2 / 3, rtol=1e-6)


def test_losses_on_an_all_empty_batch_are_finite_and_near_zero_when_confident():
  targets = jnp.zeros((2, 8, 8, 1))
  confident = jnp.full((2, 8, 8, 1), -20.0)
  for name in losses.LOSSES:
    value, grad = jax.value_and_grad(
        lambda l, n=name: losses.segmentation_loss(n, l, targets))(confident)
    assert np.isfinite(value) and value < 1e-6
    assert np.all(np.isfinite(grad))
  unsure = jnp.zeros((2, 8, 8, 1))
  assert losses.segmentation_loss('bce_dice', unsure, targets) > 0.5


def test_unknown_loss_is_named():
  with pytest.raises(ValueError, match="config loss must be one of"):
    losses.segmentation_loss('focal', jnp.zeros(2), jnp.zeros(2))


def test_slice_counts_threshold_at_half():
  probs = jnp.array([[[0.9, 0.5], [0.51, 0.1]]])
  masks = jnp.array([[[True, True], [False, False]]])
  inter, pred, true = metrics.slice_counts(probs, masks)
  assert (int(inter[0]), int(pred[0]), int(true[0])) == (1, 2, 2)


def test_per_slice_semantics_by_hand():
  # Slice 0: perfect empty. 1: false positive on an empty mask. 2: missed tumour.
  # 3: I=3, P=4, T=6 -> Dice 6/10, precision 3/4, recall 1/2.
  inter, pred, true = [0, 0, 0, 3], [0, 5, 0, 4], [0, 0, 7, 6]
  s = metrics.dice_precision_recall(inter, pred, true)
  np.testing.assert_allclose(s['dice'], [1, 0, 0, 0.6])
  np.testing.assert_allclose(s['precision'], [1, 0, 0, 0.75])
  np.testing.assert_allclose(s['recall'], [1, 0, 0, 0.5])


def test_summary_per_slice_per_patient_and_global():
  patients = ['B', 'A', 'A', 'B']
  inter, pred, true = [0, 0, 0, 3], [0, 5, 0, 4], [0, 0, 7, 6]
  out = metrics.summarize(patients, inter, pred, true)
  np.testing.assert_allclose(out['per_slice']['dice'], (1 + 0 + 0 + 0.6) / 4)
  np.testing.assert_allclose(out['per_slice']['precision'], (1 + 0 + 0 + 0.75) / 4)
  # A: I=0, P=5, T=7 -> 0. B: I=3, P=4, T=6 -> 0.6.
  np.testing.assert_allclose(out['per_patient']['dice_mean'], 0.3)
  np.testing.assert_allclose(out['per_patient']['dice_median'], 0.3)
  # All pixels: I=3, P=9, T=13.
  np.testing.assert_allclose(out['global']['dice'], 6 / 22)
  np.testing.assert_allclose(out['global']['recall'], 3 / 13)
  assert out['num_slices'] == 4 and out['num_patients'] == 2


def test_per_patient_csv(tmp_path):
  path = tmp_path / 'p.csv'
  metrics.write_per_patient_csv(str(path), ['B', 'A', 'A', 'B'], [0, 0, 0, 3], [0, 5, 0, 4],
                                [0, 0, 7, 6])
  rows = list(csv.DictReader(open(path)))
  assert [r['patient'] for r in rows] == ['A', 'B']
  assert rows[1]['tumour_slices'] == '1' and float(rows[1]['dice']) == pytest.approx(0.6)
  assert float(rows[1]['mean_slice_dice']) == pytest.approx(0.8)
