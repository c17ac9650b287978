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
  np.testing.assert_allclose(s['iou'], [1, 0, 0, 3 / 7])


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
  # Tumour slices 2 and 3: only 3 overlaps. Patients A and B have tumour; B is found.
  # Empty slices 0 and 1: slice 1 is a false positive.
  assert out['detection'] == {
      'tumour_slices': 2, 'tumour_slices_found': 1, 'tumour_slice_found_rate': 0.5,
      'tumour_patients': 2, 'tumour_patients_found': 1, 'tumour_patient_found_rate': 0.5,
      'false_positive_slices': 1, 'false_positive_slice_rate': 0.5}
  low, high = out['per_patient']['dice_ci95']
  assert 0 <= low <= 0.3 <= high <= 0.6


def test_per_patient_csv(tmp_path):
  path = tmp_path / 'p.csv'
  metrics.write_per_patient_csv(str(path), ['B', 'A', 'A', 'B'], [0, 0, 0, 3], [0, 5, 0, 4],
                                [0, 0, 7, 6])
  rows = list(csv.DictReader(open(path)))
  assert [r['patient'] for r in rows] == ['A', 'B']
  assert rows[1]['tumour_slices'] == '1' and float(rows[1]['dice']) == pytest.approx(0.6)
  assert float(rows[1]['mean_slice_dice']) == pytest.approx(0.8)
  assert rows[1]['tumour_slices_found'] == '1' and rows[0]['false_positive_slices'] == '1'
  assert float(rows[1]['iou']) == pytest.approx(3 / 7)


def test_hd95_by_hand():
  true = np.zeros((16, 16), bool)
  pred = np.zeros((16, 16), bool)
  true[0, 0] = True
  assert np.isnan(metrics.hd95(pred, true)) and np.isnan(metrics.hd95(true, pred))
  pred[3, 4] = True  # 3-4-5 triangle: every distance is 5.
  assert metrics.hd95(pred, true) == pytest.approx(5.0)
  assert metrics.hd95(true, true) == 0.0
  # Two 6x6 squares, one shifted 2 pixels: contours are 20 pixels each; the
  # distances are 0 (shared rows/columns) up to 2, so HD95 is at most 2.
  a = np.zeros((16, 16), bool)
  a[4:10, 4:10] = True
  b = np.roll(a, 2, axis=1)
  assert 0 < metrics.hd95(a, b) <= 2.0


def test_contour_is_medpys_four_connected_border():
  mask = np.ones((5, 5), bool)
  mask[0, 0] = False  # (1, 1) touches the background only diagonally: not contour.
  contour = metrics._contour(mask)  # pylint: disable=protected-access
  assert not contour[1, 1] and contour[0, 1] and contour[1, 0] and contour[4, 4]
  assert contour.sum() == 15  # The 16 border pixels of a 5x5 square, less the missing one.


def test_summary_hd95_skips_slices_with_an_empty_mask():
  hd = np.array([np.nan, 4.0, 2.0, np.nan])
  out = metrics.summarize(['A', 'A', 'B', 'B'], [0, 1, 1, 0], [0, 1, 1, 3], [0, 1, 1, 0],
                          hd95_per_slice=hd)
  assert out['hd95'] == {'per_slice_mean': 3.0, 'per_slice_median': 3.0,
                         'per_patient_mean': 3.0, 'scored_slices': 2, 'scored_patients': 2}


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
  values = np.random.default_rng(1).random(30)
  low, high = metrics.bootstrap_ci(values)
  assert low < values.mean() < high
  assert metrics.bootstrap_ci(values) == (low, high)
  assert metrics.bootstrap_ci([0.7] * 5) == pytest.approx((0.7, 0.7))
