"""The decoded cache and the grain pipelines: sampling, determinism, eval coverage."""
import ml_collections
import numpy as np
import pytest

from brainseg import data
from brainseg import input_pipeline
from configs import tiny


def _arrays(root, size=32, channels='mri', normalization='volume'):
  return input_pipeline.load_arrays(list(data.scan(root).values()), size, channels,
                                    normalization)


def test_load_arrays_shapes_and_masks(tiny_root):
  arrays = _arrays(tiny_root, size=16, channels='gray')
  assert arrays.images.shape == (36, 16, 16, 1) and arrays.images.dtype == np.float32
  assert arrays.masks.shape == (36, 16, 16, 1)
  assert 0 <= arrays.masks.min() and arrays.masks.max() <= 1
  assert arrays.native_masks.shape == (36, 32, 32) and arrays.native_masks.dtype == bool
  assert arrays.has_tumour.sum() == 6 * 2
  assert list(arrays.slice_numbers[:6]) == [1, 2, 3, 4, 5, 6]


def test_volume_normalisation_zero_mean_unit_std_over_brain():
  rng = np.random.default_rng(0)
  volume = np.zeros((3, 8, 8, 3), np.uint8)
  volume[:, 2:6, 2:6] = rng.integers(10, 200, (3, 4, 4, 3))
  x = input_pipeline.normalize_volume(volume, 'volume')
  brain = x[:, 2:6, 2:6]
  np.testing.assert_allclose(brain.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(brain.std(axis=(0, 1, 2)), 1, atol=1e-5)
  np.testing.assert_allclose(input_pipeline.normalize_volume(volume, 'scale'), volume / 255.0)


def test_oversampling_reaches_the_wanted_share():
  has_tumour = np.array([True] * 10 + [False] * 30)
  indices = input_pipeline.oversampled_indices(has_tumour, 0.5)
  assert sorted(set(indices)) == list(range(40))  # Every slice at least once.
  assert np.mean(has_tumour[indices]) == pytest.approx(0.5)
  assert len(input_pipeline.oversampled_indices(has_tumour, 0.0)) == 40


def _config(**augment):
  config = tiny.get_config()
  config.augment.update(augment)
  return config


def test_train_batches_are_seeded_and_resumable(tiny_root):
  arrays = _arrays(tiny_root)
  config = _config()
  first = [b['image'] for _, b in zip(range(5), input_pipeline.train_dataset(arrays, config, 4))]
  again = iter(input_pipeline.train_dataset(arrays, config, 4))
  np.testing.assert_array_equal(next(again)['image'], first[0])
  np.testing.assert_array_equal(next(again)['image'], first[1])
  state = again.get_state()
  resumed = iter(input_pipeline.train_dataset(arrays, config, 4))
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['image'], first[2])
  config.seed = 1
  other = next(iter(input_pipeline.train_dataset(arrays, config, 4)))['image']
  assert not np.array_equal(other, first[0])


def test_processes_get_disjoint_shares(tiny_root):
  arrays = _arrays(tiny_root)
  config = _config(enabled=False)
  config.data.tumour_fraction = 0.0
  find = lambda image: int(np.argmin(np.abs(arrays.images - image).sum(axis=(1, 2, 3))))
  seen = []
  for process in range(2):
    dataset = input_pipeline.train_dataset(arrays, config, 2, process, 2)
    seen.append({find(img) for b in zip(range(9), dataset) for img in b[1]['image']})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(36))  # One epoch over both processes.


def test_augmentation_keeps_shapes_and_mask_range():
  rng = np.random.default_rng(0)
  element = {'image': rng.normal(size=(16, 16, 3)).astype(np.float32),
             'mask': (rng.random((16, 16, 1)) > 0.7).astype(np.float32)}
  config = ml_collections.ConfigDict(dict(flip_lr=True, flip_ud=True, rotate_deg=15.0,
                                          scale=0.2, intensity=0.2))
  out = input_pipeline.Augment(config).random_map(element, rng)
  assert out['image'].shape == (16, 16, 3) and out['mask'].shape == (16, 16, 1)
  assert out['mask'].min() >= 0 and out['mask'].max() <= 1
  assert not np.array_equal(out['image'], element['image'])


def test_augmentation_moves_image_and_mask_together():
  rng = np.random.default_rng(3)
  mask = np.zeros((24, 24, 1), np.float32)
  mask[5:12, 8:20] = 1
  element = {'image': np.repeat(mask, 3, axis=-1), 'mask': mask}
  config = ml_collections.ConfigDict(dict(flip_lr=True, flip_ud=True, rotate_deg=20.0,
                                          scale=0.2, intensity=0.0))
  augment = input_pipeline.Augment(config)
  for _ in range(5):
    out = augment.random_map(element, rng)
    for c in range(3):
      np.testing.assert_allclose(out['image'][..., c], out['mask'][..., 0], atol=1e-6)


def _augment_config(**changes):
  config = ml_collections.ConfigDict(dict(enabled=True, flip_lr=True, flip_ud=True,
                                          rotate_deg=20.0, scale=0.1, intensity=0.0))
  config.update(changes)
  return config


def test_crop_is_the_square_of_the_augmented_slice():
  rng = np.random.default_rng(0)
  element = {'image': rng.normal(size=(48, 48, 2)).astype(np.float32),
             'mask': np.zeros((48, 48, 1), np.float32)}
  for seed in range(5):
    whole = input_pipeline.Augment(_augment_config()).random_map(
        element, np.random.default_rng(seed))['image']
    crop = input_pipeline.Augment(_augment_config(), crop_size=16).random_map(
        element, np.random.default_rng(seed))['image']
    assert crop.shape == (16, 16, 2)
    matches = [(t, l) for t in range(33) for l in range(33)
               if np.allclose(whole[t:t + 16, l:l + 16], crop, atol=1e-5)]
    assert len(matches) == 1


@pytest.mark.parametrize('augment', [_augment_config(), _augment_config(enabled=False)])
def test_crop_of_a_tumour_slice_holds_tumour(augment):
  rng = np.random.default_rng(1)
  mask = np.zeros((64, 64, 1), np.float32)
  mask[14:16, 14:17] = 1  # Two lesions far apart: the crop must hold one of them whole
  mask[47:50, 45:47] = 1  # in both axes, not a row of one and a column of the other.
  mask[61:64, 0:2] = 1  # At the border: rotation can move it off the slice.
  element = {'image': np.repeat(mask, 3, axis=-1), 'mask': mask}
  crop = input_pipeline.Augment(augment, crop_size=16)
  corners = set()
  for _ in range(400):
    out = crop.random_map(element, rng)
    assert out['mask'].shape == (16, 16, 1) and out['mask'].max() > 0
    np.testing.assert_allclose(out['image'][..., 0], out['mask'][..., 0], atol=1e-6)
    corners.add(tuple(np.argwhere(out['mask'][..., 0] > 0)[0]))
  assert len(corners) > 20  # The lesion lands anywhere in the crop, not always one place.


def test_crop_of_an_empty_slice_reaches_every_border():
  rng = np.random.default_rng(2)
  image = np.arange(32 * 32, dtype=np.float32).reshape(32, 32, 1)
  element = {'image': image, 'mask': np.zeros((32, 32, 1), np.float32)}
  crop = input_pipeline.Augment(_augment_config(enabled=False), crop_size=8)
  tops, lefts = zip(*[divmod(int(crop.random_map(element, rng)['image'][0, 0, 0]), 32)
                      for _ in range(400)])
  assert set(tops) == set(lefts) == set(range(25))


def test_train_batches_are_crops_when_crop_size_is_set(tiny_root):
  arrays = _arrays(tiny_root)
  config = _config()
  config.data.crop_size = 16
  batches = [b for _, b in zip(range(4), input_pipeline.train_dataset(arrays, config, 4))]
  assert {b['image'].shape for b in batches} == {(4, 16, 16, 3)}
  assert {b['mask'].shape for b in batches} == {(4, 16, 16, 1)}
  again = next(iter(input_pipeline.train_dataset(arrays, config, 4)))
  np.testing.assert_array_equal(again['image'], batches[0]['image'])


@pytest.mark.parametrize('processes', [1, 3])
def test_eval_visits_every_slice_once(tiny_root, processes):
  arrays = _arrays(tiny_root)
  counts = np.zeros(len(arrays), int)
  num_batches = set()
  for p in range(processes):
    batches = list(input_pipeline.eval_batches(arrays, 5, p, processes))
    num_batches.add(len(batches))
    for b in batches:
      assert b['image'].shape == (5, 32, 32, 3) and b['native_mask'].shape == (5, 32, 32)
      rows = b['index'][b['valid']]
      np.testing.assert_array_equal(b['native_mask'][b['valid']], arrays.native_masks[rows])
      np.add.at(counts, rows, 1)
      assert (b['index'][~b['valid']] == -1).all()
  assert (counts == 1).all()
  assert len(num_batches) == 1  # Processes stay in step.
