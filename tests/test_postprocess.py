"""3-D largest-component filter, test-time flips and their choice on val."""
import jax
import numpy as np

from brainseg import postprocess
from brainseg import train
from configs import tiny


def test_largest_component_is_found_in_3d_in_slice_order():
  # Patient A: rows stored out of slice order. A blob of 1 pixel on each of
  # slices 1-3 (3 voxels, connected across slices) beats a 2-pixel blob on slice 1.
  masks = np.zeros((4, 8, 8), bool)
  ids = np.array(['A', 'A', 'A', 'B'])
  numbers = np.array([3, 1, 2, 1])
  for row in range(3):
    masks[row, 5, 5] = True
  masks[1, 0, 0:2] = True  # Slice 1: the small far-away blob.
  masks[3, 0, 0:2] = True  # Patient B: its only blob is kept, whatever A holds.
  out = postprocess.largest_component_3d(masks, ids, numbers)
  assert out[:3, 5, 5].all() and not out[1, 0].any()
  assert out[3, 0, 0:2].all() and out.sum() == 5


def test_a_blob_is_not_joined_across_an_empty_neighbour_slice():
  masks = np.zeros((3, 4, 4), bool)
  masks[0, 0, 0] = masks[2, 0, 0] = True  # Slices 1 and 3; slice 2 empty: two components.
  masks[2, 1, 0] = True
  out = postprocess.largest_component_3d(masks, np.array(['A'] * 3), np.array([1, 2, 3]))
  assert out.sum() == 2 and not out[0].any()


def test_a_blob_is_not_joined_across_a_missing_slice_number():
  masks = np.zeros((2, 4, 4), bool)
  masks[0, 0, 0] = True  # Slice 1.
  masks[1, 0, 0] = masks[1, 1, 0] = True  # Slice 3; there is no slice 2 at all.
  out = postprocess.largest_component_3d(masks, np.array(['A'] * 2), np.array([1, 3]))
  assert out.sum() == 2 and not out[0].any() and out[1, 0:2, 0].all()


def test_choose_on_val_keeps_a_setting_only_when_it_scores_higher():
  truth = np.zeros((2, 8, 8), bool)
  truth[:, 2:5, 2:5] = True
  probs = truth.astype(np.float32)
  noisy = probs.copy()
  noisy[0, 7, 7] = 1.0  # A stray pixel far from the lesion: the component filter removes it.
  ids, numbers = np.array(['A', 'A']), np.array([1, 2])
  choice, table = postprocess.choose_on_val(lambda tta: probs, truth, ids, numbers)
  assert choice == {'tta_flips': False, 'largest_component': False}  # All tie: simplest.
  assert len(table) == 4
  choice, _ = postprocess.choose_on_val(lambda tta: noisy, truth, ids, numbers)
  assert choice == {'tta_flips': False, 'largest_component': True}


def test_flip_averaged_probabilities_are_mirror_symmetric():
  config = tiny.get_config()
  model = train.create_model(config)
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), images)
  probs = lambda x: np.asarray(train.predict_probs(variables, x, (32, 32), model.apply, True))
  np.testing.assert_allclose(probs(images[:, :, ::-1])[:, :, ::-1], probs(images), atol=1e-6)
  plain = np.asarray(train.predict_probs(variables, images, (32, 32), model.apply))
  assert not np.allclose(plain, probs(images))
