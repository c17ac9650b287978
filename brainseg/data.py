"""Finding, reading and splitting a kaggle_3m-style LGG data root.

A root holds one folder per patient; each folder holds slices
`<patient>_<n>.tif` and their masks `<patient>_<n>_mask.tif`. The Kaggle
archive's own layout (`lgg-mri-segmentation/kaggle_3m/...`, with a second copy
of the folder, `data.csv` and a README) is accepted: every patient is loaded
once, from the first copy found in sorted path order.

Everything that can be wrong with the files is reported here, naming the file,
before any training starts: `scan` checks names, pairing and sizes from the
TIFF headers; `read_image`/`read_mask` check the pixels when they are decoded.
"""
import concurrent.futures
import dataclasses
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tifffile

_SLICE_RE = re.compile(r'^(?P<patient>.+)_(?P<number>\d+)(?P<mask>_mask)?\.tiff?$',
                       re.IGNORECASE)
SPLITS = ('train', 'val', 'test')


class DataError(ValueError):
  """A problem with the data on disk; the message names the file or patient."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """One image/mask pair of one patient."""
  patient: str
  number: int
  image_path: str
  mask_path: str


@dataclasses.dataclass(frozen=True)
class Patient:
  """A patient's slices, ordered by slice number."""
  patient_id: str
  slices: Tuple[Slice, ...]

  @property
  def institution(self) -> str:
    return institution(self.patient_id)


def institution(patient_id: str) -> str:
  """The second field of a TCGA id (`TCGA_CS_4941_...` -> `CS`)."""
  parts = patient_id.split('_')
  return parts[1] if len(parts) > 2 else 'unknown'


def _patient_folders(root: str) -> Dict[str, str]:
  """Maps patient id -> folder for every folder below root that holds slices."""
  folders, visited = {}, set()
  # Links are followed (a root may be built from linked patient folders); each
  # real folder is visited once, so link loops end.
  for dirpath, dirnames, filenames in sorted(os.walk(root, followlinks=True)):
    real = os.path.realpath(dirpath)
    if real in visited:
      continue
    visited.add(real)
    name = os.path.basename(dirpath)
    if any(_is_slice_of(f, name) for f in filenames) and name not in folders:
      folders[name] = dirpath  # A duplicated copy of the tree is skipped.
  return folders


def _is_slice_of(filename: str, patient: str) -> bool:
  match = _SLICE_RE.match(filename)
  return bool(match) and match['patient'] == patient


@dataclasses.dataclass(frozen=True)
class TiffInfo:
  """What a TIFF's header says about its first image."""
  shape: Tuple[int, ...]
  dtype: str
  compression: str
  pages: int


def tiff_info(path: str) -> TiffInfo:
  """Reads a TIFF's header; DataError (naming the file) if it is not a TIFF."""
  try:
    with tifffile.TiffFile(path) as tif:
      page = tif.pages.first
      return TiffInfo(tuple(tif.series[0].shape), str(tif.series[0].dtype),
                      page.compression.name, len(tif.pages))
  except Exception as e:  # tifffile raises several types for broken files.
    raise DataError(f'{path}: not a readable TIFF ({type(e).__name__}: {e})') from e


def _spatial_shape(info: TiffInfo, path: str) -> Tuple[int, int]:
  """(H, W) of an image or mask stored as HxW, HxWxC or CxHxW (planar)."""
  shape = info.shape
  if info.pages > 1:
    raise DataError(f'{path}: multi-page TIFF ({info.pages} pages); a slice is one image')
  if len(shape) == 2:
    return shape
  if len(shape) == 3 and shape[-1] in (1, 3, 4):
    return shape[:2]
  if len(shape) == 3 and shape[0] in (1, 3, 4):
    return shape[1:]
  raise DataError(f'{path}: unsupported TIFF shape {shape}; expected HxW, HxWxC or CxHxW '
                  'with 1, 3 or 4 channels')


def _check_pair(image_path: str, mask_path: str) -> None:
  image_hw = _spatial_shape(tiff_info(image_path), image_path)
  mask_hw = _spatial_shape(tiff_info(mask_path), mask_path)
  if image_hw != mask_hw:
    raise DataError(f'{mask_path}: mask is {mask_hw[0]}x{mask_hw[1]} but its image '
                    f'{os.path.basename(image_path)} is {image_hw[0]}x{image_hw[1]}')


def _scan_patient(patient_id: str, folder: str, check_sizes: bool,
                  problems: List[str]) -> Optional[Patient]:
  """A folder's slices; what is wrong goes to `problems` (one line per file)."""
  images, masks = {}, {}
  for filename in os.listdir(folder):
    match = _SLICE_RE.match(filename)
    if not match or match['patient'] != patient_id:
      continue  # data.csv, README, .DS_Store and other strays are ignored.
    target = masks if match['mask'] else images
    target[int(match['number'])] = os.path.join(folder, filename)
  for number in sorted(set(masks) - set(images)):
    problems.append(f'{masks[number]}: mask without an image '
                    f'(expected {patient_id}_{number}.tif beside it)')
  slices = []
  for number in sorted(images):
    if number not in masks:
      problems.append(f'{images[number]}: image without a mask '
                      f'(expected {patient_id}_{number}_mask.tif beside it)')
      continue
    if check_sizes:
      try:
        _check_pair(images[number], masks[number])
      except DataError as e:
        problems.append(str(e))
        continue
    slices.append(Slice(patient_id, number, images[number], masks[number]))
  if not slices:
    problems.append(f'{folder}: patient folder holds no usable slices')
    return None
  return Patient(patient_id, tuple(slices))


def slice_number_gaps(patient: Patient) -> List[int]:
  """Slice numbers missing between 1 and the patient's last slice."""
  numbers = {s.number for s in patient.slices}
  return [n for n in range(1, max(numbers) + 1) if n not in numbers]


def scan_with_problems(root: str, check_sizes: bool = True
                       ) -> Tuple[Dict[str, Patient], List[str]]:
  """Like `scan`, but returns the usable patients and every problem instead of raising.

  Raises:
    DataError: only if the root is missing or holds no patient folders at all.
  """
  if not os.path.isdir(root):
    raise DataError(f'data root {root!r} is not a folder (point --config.data.root, or '
                    '--data_root for evaluate, at the kaggle_3m folder; see README, Data)')
  folders = _patient_folders(root)
  if not folders:
    raise DataError(f'data root {root!r} holds no patient folders with '
                    '<patient>_<n>.tif slices')
  problems = []
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # Header reads wait on disk.
    found = pool.map(lambda pid: _scan_patient(pid, folders[pid], check_sizes, problems),
                     sorted(folders))
    patients = {p.patient_id: p for p in found if p is not None}
  return patients, sorted(problems)


def scan(root: str, check_sizes: bool = True) -> Dict[str, Patient]:
  """Discovers and pairs every patient's slices below `root`.

  Args:
    root: a kaggle_3m folder, or a folder above it (the Kaggle archive).
    check_sizes: read each TIFF header to check it opens, holds one image, and
      that image and mask sizes agree.

  Returns:
    patient id -> Patient, sorted by id; slices ordered by their number.

  Raises:
    DataError: listing every file or folder at fault.
  """
  patients, problems = scan_with_problems(root, check_sizes)
  if problems:
    shown = '\n  '.join(problems[:20])
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise DataError(f'data root {root}: {len(problems)} problem(s):\n  {shown}{more}')
  return patients


# ---------------------------------------------------------------------------
# Reading pixels.
# ---------------------------------------------------------------------------


def _read_tiff(path: str) -> np.ndarray:
  try:
    return tifffile.imread(path)
  except Exception as e:
    raise DataError(f'{path}: cannot decode TIFF ({type(e).__name__}: {e})') from e


def _to_hwc(array: np.ndarray, path: str) -> np.ndarray:
  if array.ndim == 2:
    return array[..., None]
  if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
    return array
  if array.ndim == 3 and array.shape[0] in (1, 3, 4):
    return np.moveaxis(array, 0, -1)  # Planar-separate storage.
  raise DataError(f'{path}: unsupported TIFF shape {array.shape}')


def _to_uint8(array: np.ndarray, path: str) -> np.ndarray:
  """Scales any integer or float image to uint8 0-255.

  Wider integers are scaled by the image's own maximum: MRI often stores 12-bit
  values in 16-bit words, and scaling by 65535 would crush them to a few levels.
  Floats in 0-1 are scaled by 255; floats above 1 are taken as 0-255.
  """
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if np.issubdtype(array.dtype, np.integer):
    if array.min() < 0:
      raise DataError(f'{path}: image holds negative values ({array.dtype})')
    top = max(int(array.max()), 1)
    return (array.astype(np.float64) / top * 255).round().astype(np.uint8)
  if np.issubdtype(array.dtype, np.floating):
    if not np.isfinite(array).all():
      raise DataError(f'{path}: image holds NaN or Inf values')
    high = 1.0 if array.max() <= 1.0 else 255.0  # Floats come as 0-1 or 0-255.
    return (np.clip(array / high, 0, 1) * 255).round().astype(np.uint8)
  raise DataError(f'{path}: unsupported pixel type {array.dtype}')


def read_image(path: str) -> np.ndarray:
  """Reads a slice as HxWx3 uint8 (pre-contrast, FLAIR, post-contrast).

  Grayscale images are repeated into three channels; an alpha channel is dropped.
  """
  image = _to_uint8(_to_hwc(_read_tiff(path), path), path)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def read_mask(path: str) -> np.ndarray:
  """Reads a mask as HxW bool; 0/1, 0/255, bool and RGB masks are all accepted."""
  mask = _to_hwc(_read_tiff(path), path)[..., :3]  # An alpha channel is not tumour.
  return np.ascontiguousarray(mask.max(axis=-1) > 0)


# ---------------------------------------------------------------------------
# Patient-level splits.
# ---------------------------------------------------------------------------


def load_split_file(path: str, patients: Sequence[str]) -> Dict[str, List[str]]:
  """Reads a split JSON ({"train": [ids], "val": [ids], "test": [ids]}).

  Raises:
    DataError: if the file is unreadable, a part is missing, a patient is unknown
      or a patient is in two parts.
  """
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f'split file {path}: cannot read it ({e}); name another with '
                    'data.split_file (--split_file for check_data and evaluate), or '
                    '"" for a seeded random split') from e
  if not isinstance(raw, dict):
    raise DataError(f'split file {path}: must hold a JSON object with "train", "val" and '
                    '"test" lists')
  split = {}
  for part in SPLITS:
    if not isinstance(raw.get(part), list):
      raise DataError(f'split file {path}: needs a list of patient ids under "{part}"')
    split[part] = [str(p) for p in raw[part]]
  check_split(split, patients, source=f'split file {path}')
  return split


def check_split(split: Dict[str, List[str]], patients: Sequence[str], source: str) -> None:
  """Raises DataError if a split names unknown patients or shares one between parts."""
  known = set(patients)
  seen = {}
  for part in SPLITS:
    unknown = sorted(set(split[part]) - known)
    if unknown:
      raise DataError(f'{source}: {part} names {len(unknown)} patient(s) not in the data '
                      f'root: {", ".join(unknown[:5])}')
    for pid in split[part]:
      if pid in seen and seen[pid] != part:
        raise DataError(f'{source}: patient {pid} is in both {seen[pid]} and {part}')
      seen[pid] = part


def random_split(patients: Sequence[str], fractions: Sequence[float],
                 seed: int) -> Dict[str, List[str]]:
  """A seeded random split by patient into train/val/test with the given fractions."""
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
    raise DataError(f'split fractions must be three non-negative numbers summing to 1, '
                    f'got {tuple(fractions)}')
  order = np.random.default_rng(seed).permutation(sorted(patients))
  n_val = int(round(fractions[1] * len(order)))
  n_test = int(round(fractions[2] * len(order)))
  n_train = len(order) - n_val - n_test
  parts = np.split(order, [n_train, n_train + n_val])
  return {part: sorted(str(p) for p in ids) for part, ids in zip(SPLITS, parts)}


def make_split(patients: Sequence[str], split_file: Optional[str],
               fractions: Sequence[float], seed: int) -> Dict[str, List[str]]:
  """The split a config asks for: from `split_file` if given, else random."""
  if split_file:
    return load_split_file(split_file, patients)
  return random_split(patients, fractions, seed)
