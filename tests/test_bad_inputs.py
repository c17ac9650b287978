"""Odd and broken inputs: each is read correctly or refused with a clear message."""
import importlib
import json
import os

import numpy as np
import pytest
import tifffile

from brainseg import check_data
from brainseg import checkpointing
from brainseg import cv
from brainseg import data
from brainseg import input_pipeline
from brainseg import train
from configs import tiny
from tests import synthetic

RGB = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _write(tmp_path, name, array, **kwargs):
  path = str(tmp_path / name)
  tifffile.imwrite(path, array, **kwargs)
  return path


def test_rgba_image_drops_alpha(tmp_path):
  rgba = np.concatenate([RGB, np.full((16, 16, 1), 255, np.uint8)], axis=-1)
  np.testing.assert_array_equal(data.read_image(_write(tmp_path, 'a.tif', rgba)), RGB)


def test_grayscale_image_is_repeated_into_three_channels(tmp_path):
  gray = RGB[..., 0]
  image = data.read_image(_write(tmp_path, 'g.tif', gray))
  assert image.shape == (16, 16, 3) and (image == gray[..., None]).all()


def test_planar_separate_rgb(tmp_path):
  path = _write(tmp_path, 'p.tif', np.moveaxis(RGB, -1, 0), planarconfig='separate',
                photometric='rgb')
  np.testing.assert_array_equal(data.read_image(path), RGB)


@pytest.mark.parametrize('compression', ['lzw', 'deflate', None])
def test_lossless_encodings_read_identically(tmp_path, compression):
  path = _write(tmp_path, 'c.tif', RGB, compression=compression)
  np.testing.assert_array_equal(data.read_image(path), RGB)


def test_uint16_and_float_images_are_scaled_to_uint8(tmp_path):
  u16 = (RGB.astype(np.uint16) * 257)  # 255 -> 65535
  np.testing.assert_array_equal(data.read_image(_write(tmp_path, 'u.tif', u16)), RGB)
  twelve_bit = (RGB.astype(np.int64) * 4095 // RGB.max()).astype(np.uint16)  # 12 of 16 bits
  read = data.read_image(_write(tmp_path, 'u12.tif', twelve_bit))
  assert read.max() == 255 and len(np.unique(read)) > 200
  unit = RGB.astype(np.float32) / 255
  np.testing.assert_array_equal(
      data.read_image(_write(tmp_path, 'f.tif', unit, photometric='rgb')), RGB)
  bad = unit.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(data.DataError, match=r'f2\.tif: image holds NaN'):
    data.read_image(_write(tmp_path, 'f2.tif', bad, photometric='rgb'))


@pytest.mark.parametrize('mask', [
    np.array([[0, 1], [1, 0]], np.uint8),
    np.array([[0, 255], [255, 0]], np.uint8),
    np.array([[False, True], [True, False]]),
    np.stack([np.array([[0, 255], [255, 0]], np.uint8)] * 3, axis=-1),  # RGB
    np.dstack([np.array([[0, 255], [255, 0]], np.uint8)] * 3 + [np.full((2, 2), 255, np.uint8)]),
])
def test_mask_encodings(tmp_path, mask):
  read = data.read_mask(_write(tmp_path, 'm.tif', mask))
  np.testing.assert_array_equal(read, [[False, True], [True, False]])


def test_multi_page_tiff_is_refused(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=2)
  pid = synthetic.patient_id(0)
  path = os.path.join(root, pid, f'{pid}_1.tif')
  with tifffile.TiffWriter(path) as tif:
    for _ in range(5):
      tif.write(RGB[..., 0].repeat(2, 0).repeat(2, 1))
  with pytest.raises(data.DataError, match=r'_1\.tif: multi-page TIFF \(5 pages\)'):
    data.scan(root)


def test_every_problem_is_listed_at_once(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=2, num_slices=3)
  a, b = synthetic.patient_id(0), synthetic.patient_id(1)
  os.remove(os.path.join(root, a, f'{a}_1_mask.tif'))
  os.remove(os.path.join(root, b, f'{b}_2.tif'))
  with pytest.raises(data.DataError, match='2 problem') as error:
    data.scan(root)
  assert f'{a}_1.tif: image without a mask' in str(error.value)
  assert f'{b}_2_mask.tif: mask without an image' in str(error.value)


def test_empty_patient_folder_and_slice_gaps(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=4)
  os.makedirs(os.path.join(root, 'TCGA_XX_9999_20000101'))  # No slices: not a patient.
  pid = synthetic.patient_id(0)
  for suffix in ('', '_mask'):
    os.remove(os.path.join(root, pid, f'{pid}_3{suffix}.tif'))
  patients = data.scan(root)
  assert list(patients) == [pid]
  assert [s.number for s in patients[pid].slices] == [1, 2, 4]  # Gaps are allowed...
  report = check_data.check_root(root)
  assert report['warnings'] == [f'patient {pid}: slice numbers missing: [3]']  # ...and reported.
  assert report['problems'] == [] and report['slices'] == 3


def test_check_data_summarises_and_lists_problems(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=3, num_slices=3,
                             compression='webp')
  report = check_data.check_root(root)
  assert (report['patients'], report['slices'], report['tumour_slices']) == (3, 9, 3)
  assert report['image_encodings'] == {'WEBP': 9} and report['image_dtypes'] == {'uint8': 9}
  pid = synthetic.patient_id(1)
  bad = os.path.join(root, pid, f'{pid}_2.tif')
  with open(bad, 'r+b') as f:
    f.truncate(os.path.getsize(bad) - 30)
  split = tmp_path / 'split.json'
  split.write_text(json.dumps({'train': ['nobody'], 'val': [], 'test': []}))
  report = check_data.check_root(root, str(split))
  assert len(report['problems']) == 2
  assert any(p.startswith(bad) for p in report['problems'])
  assert any('nobody' in p for p in report['problems'])
  assert 'PROBLEM' in '\n'.join(check_data.format_report(report))


def test_empty_split_is_refused(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=2, num_slices=2)
  split = tmp_path / 'split.json'
  split.write_text(json.dumps({'train': [synthetic.patient_id(0)], 'val': [],
                               'test': [synthetic.patient_id(1)]}))
  config = tiny.get_config()
  config.data.root, config.data.split_file = root, str(split)
  with pytest.raises(data.DataError, match='the val split holds no patients'):
    train.load_splits(config)


def test_batch_larger_than_the_split_still_fills_batches(tiny_root):
  arrays = input_pipeline.load_arrays(list(data.scan(tiny_root).values())[:1], 32, 'mri',
                                      'volume')
  batch = next(iter(input_pipeline.train_dataset(arrays, tiny.get_config(), 16)))
  assert batch['image'].shape == (16, 32, 32, 3)  # 6 slices, repeated across epochs.
  batches = list(input_pipeline.eval_batches(arrays, 16))
  assert len(batches) == 1 and batches[0]['valid'].sum() == 6


def test_bad_settings_are_named_before_reading_data():
  config = tiny.get_config()
  config.data.channels = 'rgb'
  with pytest.raises(ValueError, match="config data.channels must be one of"):
    train.validate_config(config)
  config = tiny.get_config()
  config.data.image_size = 30
  with pytest.raises(ValueError, match='data.image_size=30 must be divisible by'):
    train.validate_config(config)
  config = tiny.get_config()
  config.data.crop_size = 64
  with pytest.raises(ValueError, match='data.crop_size=64 must be 0 .* at most data.image_size=32'):
    train.validate_config(config)
  config.data.crop_size = 10
  with pytest.raises(ValueError, match='data.crop_size=10 must be divisible by'):
    train.validate_config(config)


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(ValueError, match=r'workdir .*a_file/run is not writable'):
    train.prepare_workdir(str(blocker / 'run'))


def _saved_before_crop_size_existed(config) -> dict:
  saved = json.loads(config.to_json_best_effort())
  del saved['data']['crop_size']
  return saved


def test_resume_counts_fields_added_since_at_their_defaults(tmp_path):
  config = tiny.get_config()
  os.makedirs(tmp_path / 'checkpoints' / '1')
  (tmp_path / 'config.json').write_text(json.dumps(_saved_before_crop_size_existed(config)))
  checkpointing.check_workdir_config(str(tmp_path), config)  # crop_size 0: what the run used.
  (tmp_path / 'config.json').write_text(json.dumps(_saved_before_crop_size_existed(config)))
  config.data.crop_size = 16
  with pytest.raises(ValueError, match=r'another config \(data.crop_size: 0 -> 16\)'):
    checkpointing.check_workdir_config(str(tmp_path), config)


def test_cv_folds_count_fields_added_since_at_their_defaults(tmp_path):
  config = tiny.get_config()
  patients = [f'TCGA_CS_{i:04d}_20000101' for i in range(10)]
  cv.load_or_make_folds(str(tmp_path), patients, 2, 0, 4, config)
  folds = json.loads((tmp_path / 'folds.json').read_text())
  del folds['settings']['recipe']['data.crop_size']
  (tmp_path / 'folds.json').write_text(json.dumps(folds))
  assert cv.load_or_make_folds(str(tmp_path), patients, 2, 0, 4, config) == folds['splits']
  config.data.crop_size = 16
  with pytest.raises(ValueError, match=r'other recipe \(config: data.crop_size\)'):
    cv.load_or_make_folds(str(tmp_path), patients, 2, 0, 4, config)


@pytest.mark.parametrize('name', sorted(
    f[:-3] for f in os.listdir(os.path.dirname(tiny.__file__))
    if f.endswith('.py') and not f.startswith('_')))
def test_every_shipped_config_is_valid(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  train.resolve_batch_size(config)
  train.validate_config(config)
