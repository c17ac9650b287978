"""Synthetic kaggle_3m-style trees: random brains with a bright blob of 'tumour'."""
import os
from typing import Optional

import numpy as np
import tifffile

INSTITUTIONS = ('CS', 'DU', 'HT', 'FG', 'EZ')


def patient_id(i: int) -> str:
  return f'TCGA_{INSTITUTIONS[i % len(INSTITUTIONS)]}_{1000 + i}_2000010{i % 10}'


def make_slice(rng: np.random.Generator, size: int, tumour: bool):
  """An RGB uint8 image (a bright disc in noise when `tumour`) and its bool mask."""
  yy, xx = np.mgrid[:size, :size]
  brain = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.4 * size) ** 2
  image = np.where(brain[..., None], rng.integers(40, 120, (size, size, 3)), 0)
  mask = np.zeros((size, size), bool)
  if tumour:
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 8) ** 2
    image[mask] = 230
  return image.astype(np.uint8), mask


def write_tiff(path: str, array: np.ndarray, compression: Optional[str]) -> None:
  kwargs = {}
  if compression == 'webp':
    kwargs = {'compression': 'webp', 'compressionargs': {'level': 101}}  # lossless
  elif compression:
    kwargs = {'compression': compression}
  tifffile.imwrite(path, array, **kwargs)


def make_root(root: str, num_patients: int = 4, num_slices: int = 5, size: int = 32,
              compression: Optional[str] = None, mask_max: int = 255, seed: int = 0) -> str:
  """Writes a kaggle_3m tree; each patient's middle slices hold tumour.

  Args:
    compression: None (uncompressed, as Kaggle ships it), 'webp' (images; masks
      then use deflate, as ../shared does), 'deflate' or 'lzw'.
    mask_max: the value of tumour pixels in masks (255 or 1).
  """
  rng = np.random.default_rng(seed)
  mask_compression = 'deflate' if compression == 'webp' else compression
  for p in range(num_patients):
    pid = patient_id(p)
    folder = os.path.join(root, pid)
    os.makedirs(folder, exist_ok=True)
    for n in range(1, num_slices + 1):
      tumour = num_slices // 3 < n <= num_slices - num_slices // 3
      image, mask = make_slice(rng, size, tumour)
      write_tiff(os.path.join(folder, f'{pid}_{n}.tif'), image, compression)
      write_tiff(os.path.join(folder, f'{pid}_{n}_mask.tif'),
                 mask.astype(np.uint8) * mask_max, mask_compression)
  return root
