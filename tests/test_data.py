"""Discovery, pairing, ordering, reading and splitting of kaggle_3m trees."""
import json
import os
import shutil

import numpy as np
import pytest
import tifffile

from brainseg import data
from brainseg import input_pipeline
from tests import synthetic


@pytest.mark.parametrize('compression', [None, 'webp', 'deflate', 'lzw'])
def test_scan_pairs_and_reads_every_encoding(tmp_path, compression):
  root = synthetic.make_root(str(tmp_path / 'kaggle_3m'), num_patients=2, num_slices=3,
                             compression=compression)
  patients = data.scan(root)
  assert list(patients) == [synthetic.patient_id(0), synthetic.patient_id(1)]
  for patient in patients.values():
    for s in patient.slices:
      assert s.mask_path == s.image_path[:-len('.tif')] + '_mask.tif'
      image, mask = data.read_image(s.image_path), data.read_mask(s.mask_path)
      assert image.shape == (32, 32, 3) and image.dtype == np.uint8
      assert mask.shape == (32, 32) and mask.dtype == bool
  # The middle slice has tumour, the first does not.
  first = patients[synthetic.patient_id(0)]
  assert not data.read_mask(first.slices[0].mask_path).any()
  assert data.read_mask(first.slices[1].mask_path).any()


def test_lossless_webp_round_trips(tmp_path):
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  path = str(tmp_path / 'x.tif')
  synthetic.write_tiff(path, image, 'webp')
  np.testing.assert_array_equal(data.read_image(path), image)


def test_slices_are_ordered_numerically(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=12)
  numbers = [s.number for s in data.scan(root)[synthetic.patient_id(0)].slices]
  assert numbers == list(range(1, 13))  # Text order would put 10 after 1.


@pytest.mark.parametrize('mask_max', [1, 255])
def test_masks_as_zero_one_or_zero_255(tmp_path, mask_max):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=3,
                             mask_max=mask_max)
  s = data.scan(root)[synthetic.patient_id(0)].slices[1]
  assert set(np.unique(tifffile.imread(s.mask_path))) == {0, mask_max}
  np.testing.assert_array_equal(data.read_mask(s.mask_path), tifffile.imread(s.mask_path) > 0)


def test_kaggle_archive_layout_loads_each_patient_once(tmp_path):
  archive = tmp_path / 'lgg-mri-segmentation'
  synthetic.make_root(str(archive / 'kaggle_3m'), num_patients=3, num_slices=2)
  # The Kaggle archive ships a second copy of the folder, a CSV and a README.
  shutil.copytree(archive / 'kaggle_3m', archive / 'lgg-mri-segmentation' / 'kaggle_3m')
  (archive / 'kaggle_3m' / 'data.csv').write_text('Patient,RNASeqCluster\n')
  (archive / 'kaggle_3m' / 'README.md').write_text('readme')
  (archive / 'kaggle_3m' / synthetic.patient_id(0) / '.DS_Store').write_bytes(b'\0\1')
  patients = data.scan(str(archive))
  assert len(patients) == 3
  assert all(len(p.slices) == 2 for p in patients.values())
  assert all(str(archive / 'kaggle_3m') in p.slices[0].image_path for p in patients.values())


def test_grayscale_matches_pil_luma():
  rgb = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  gray = input_pipeline.to_grayscale(rgb)
  r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
  # ITU-R 601-2 luma in PIL's fixed-point arithmetic.
  expected = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16
  np.testing.assert_array_equal(gray[..., 0], expected)


# ----- Splits -----


def test_random_split_is_seeded_and_disjoint():
  ids = [f'TCGA_DU_{i}_2000' for i in range(20)]
  a = data.random_split(ids, (0.6, 0.2, 0.2), seed=3)
  assert a == data.random_split(ids, (0.6, 0.2, 0.2), seed=3)
  assert a != data.random_split(ids, (0.6, 0.2, 0.2), seed=4)
  assert [len(a[p]) for p in data.SPLITS] == [12, 4, 4]
  assert sorted(sum(a.values(), [])) == sorted(ids)


def test_split_file_is_read_and_checked(tmp_path):
  ids = ['A_1_x', 'B_2_x', 'C_3_x']
  path = tmp_path / 'split.json'
  path.write_text(json.dumps({'train': ['A_1_x'], 'val': ['B_2_x'], 'test': ['C_3_x']}))
  assert data.load_split_file(str(path), ids)['val'] == ['B_2_x']
  path.write_text(json.dumps({'train': ['A_1_x', 'Z_9_x'], 'val': [], 'test': []}))
  with pytest.raises(data.DataError, match=r'split\.json.*Z_9_x'):
    data.load_split_file(str(path), ids)
  path.write_text(json.dumps({'train': ['A_1_x'], 'val': ['A_1_x'], 'test': []}))
  with pytest.raises(data.DataError, match='A_1_x is in both train and val'):
    data.load_split_file(str(path), ids)


# ----- Bad input: each error names the file, patient or setting -----


def test_empty_root(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(data.DataError, match='holds no patient folders'):
    data.scan(str(tmp_path / 'empty'))
  with pytest.raises(data.DataError, match='is not a folder'):
    data.scan(str(tmp_path / 'missing'))


def test_missing_mask(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=3)
  os.remove(os.path.join(root, synthetic.patient_id(0), f'{synthetic.patient_id(0)}_2_mask.tif'))
  with pytest.raises(data.DataError, match=r'_2\.tif: image without a mask'):
    data.scan(root)


def test_mask_without_image(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=3)
  os.remove(os.path.join(root, synthetic.patient_id(0), f'{synthetic.patient_id(0)}_3.tif'))
  with pytest.raises(data.DataError, match=r'_3_mask\.tif: mask without an image'):
    data.scan(root)


def test_text_file_named_tif(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=2)
  bad = os.path.join(root, synthetic.patient_id(0), f'{synthetic.patient_id(0)}_1.tif')
  with open(bad, 'w') as f:
    f.write('not a tiff')
  with pytest.raises(data.DataError, match=r'_1\.tif: not a readable TIFF'):
    data.scan(root)


def test_truncated_tiff_is_caught_when_decoded(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=2,
                             compression='webp')
  bad = os.path.join(root, synthetic.patient_id(0), f'{synthetic.patient_id(0)}_2.tif')
  size = os.path.getsize(bad)
  with open(bad, 'r+b') as f:
    f.truncate(size - 40)
  patients = data.scan(root)  # The header may survive a cut; the pixels do not.
  with pytest.raises(data.DataError, match=r'_2\.tif'):
    input_pipeline.load_arrays(list(patients.values()), 32, 'mri', 'scale')


def test_image_and_mask_size_mismatch(tmp_path):
  root = synthetic.make_root(str(tmp_path / 'r'), num_patients=1, num_slices=2)
  pid = synthetic.patient_id(0)
  tifffile.imwrite(os.path.join(root, pid, f'{pid}_1_mask.tif'), np.zeros((16, 16), np.uint8))
  with pytest.raises(data.DataError, match=r'_1_mask\.tif: mask is 16x16 but its image .* is 32x32'):
    data.scan(root)
