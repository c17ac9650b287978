"""From scanned patients to batches: a decoded cache in RAM and grain pipelines.

Every slice of a split is decoded once (`load_arrays`), normalised and resized
to the model's input size, and kept in memory as float32: the whole LGG set
takes about 3.1 GB at 256x256x3, 0.8 GB at 128x128x3. Masks are kept twice: resized
(soft, in [0, 1]) as the training target, and at native resolution for metrics.

The training chain follows the grain tutorial: source -> seeded shuffle ->
repeat -> augment (`random_map`, its rng drawn from the seed and the element
index) -> shard by process -> batch (drop remainder) -> threaded prefetch. Element i
of the chain is a pure function of (seed, i), so the iterator state is just
the next index and a resumed run sees exactly the batches it would have seen.
"""
import concurrent.futures
import dataclasses
import math
from typing import Dict, Iterator, Sequence

import grain
import ml_collections
import numpy as np
import scipy.ndimage
from PIL import Image

from brainseg import data as data_lib

CHANNELS = {'gray': 1, 'mri': 3}
NORMALIZATIONS = ('scale', 'volume')


@dataclasses.dataclass
class SliceArrays:
  """All slices of one split, decoded; row i of every field is slice i."""
  images: np.ndarray        # (N, S, S, C) float32, normalised, at the model's size S.
  masks: np.ndarray         # (N, S, S, 1) float32 in [0, 1], resized masks.
  native_masks: np.ndarray  # (N, H, W) bool, masks at their stored resolution.
  patient_ids: np.ndarray   # (N,) str.
  slice_numbers: np.ndarray  # (N,) int.
  image_paths: np.ndarray   # (N,) str, for showing the slice as stored.

  def __len__(self) -> int:
    return len(self.images)

  @property
  def has_tumour(self) -> np.ndarray:
    return self.native_masks.any(axis=(1, 2))


def to_grayscale(images: np.ndarray) -> np.ndarray:
  """RGB uint8 (..., 3) -> (..., 1) exactly as PIL's 'L' conversion (ITU-R 601 luma)."""
  gray = [np.asarray(Image.fromarray(rgb).convert('L')) for rgb in images.reshape(-1, *images.shape[-3:])]
  return np.stack(gray).reshape(*images.shape[:-1], 1)


def normalize_volume(volume: np.ndarray, method: str) -> np.ndarray:
  """Scales a patient's uint8 volume (D, H, W, C) to float32.

  'scale' divides by 255 as the seed did. 'volume' z-scores each channel over the
  volume's non-zero (brain) voxels, which evens out scanner and protocol
  differences between institutions.
  """
  x = volume.astype(np.float32)
  if method == 'scale':
    return x / 255.0
  if method != 'volume':
    raise ValueError(f'config data.normalization must be one of {NORMALIZATIONS}, got {method!r}')
  for c in range(x.shape[-1]):
    channel = x[..., c]
    brain = channel[channel > 0]
    if brain.size < 2:
      brain = channel.ravel()
    channel -= brain.mean()
    channel /= max(float(brain.std()), 1e-6)
  return x


def resize_slices(x: np.ndarray, size: int) -> np.ndarray:
  """Resizes (N, H, W, C) float32 to (N, size, size, C), bilinear with antialiasing."""
  if x.shape[1:3] == (size, size):
    return x
  out = np.empty((x.shape[0], size, size, x.shape[3]), np.float32)
  for i in range(x.shape[0]):
    for c in range(x.shape[3]):
      out[i, :, :, c] = np.asarray(
          Image.fromarray(x[i, :, :, c], mode='F').resize((size, size), Image.BILINEAR))
  return out


def _load_patient(patient: data_lib.Patient, image_size: int, channels: str,
                  normalization: str):
  images = [data_lib.read_image(s.image_path) for s in patient.slices]
  masks = [data_lib.read_mask(s.mask_path) for s in patient.slices]
  for s, image, mask in zip(patient.slices, images, masks):
    # scan() compares headers; this catches what only decoding reveals.
    if image.shape[:2] != mask.shape or image.shape != images[0].shape:
      raise data_lib.DataError(
          f'{s.image_path}: image {image.shape[:2]} and mask {mask.shape} must match each '
          f'other and the first slice of patient {patient.patient_id} {images[0].shape[:2]}')
  images, masks = np.stack(images), np.stack(masks)
  if channels == 'gray':
    images = to_grayscale(images)
  images = resize_slices(normalize_volume(images, normalization), image_size)
  soft_masks = resize_slices(masks[..., None].astype(np.float32), image_size)
  return images, np.clip(soft_masks, 0.0, 1.0), masks


def load_arrays(patients: Sequence[data_lib.Patient], image_size: int, channels: str,
                normalization: str, num_threads: int = 4) -> SliceArrays:
  """Decodes, normalises and resizes every slice of `patients` into RAM.

  Raises:
    DataError: naming the file that cannot be decoded, or the patient whose
      slices are not all of one size.
  """
  if channels not in CHANNELS:
    raise ValueError(f'config data.channels must be one of {sorted(CHANNELS)}, got {channels!r}')
  if not patients:
    raise data_lib.DataError('no patients to load: the split is empty')
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    loaded = list(pool.map(lambda p: _load_patient(p, image_size, channels, normalization),
                           patients))
  native_shapes = {m.shape[1:] for _, _, m in loaded}
  if len(native_shapes) > 1:
    sizes = {p.patient_id: m.shape[1:] for p, (_, _, m) in zip(patients, loaded)}
    raise data_lib.DataError(f'slices of one split must share one size; found {sizes}')
  return SliceArrays(
      images=np.concatenate([i for i, _, _ in loaded]),
      masks=np.concatenate([m for _, m, _ in loaded]),
      native_masks=np.concatenate([m for _, _, m in loaded]),
      patient_ids=np.array([s.patient for p in patients for s in p.slices]),
      slice_numbers=np.array([s.number for p in patients for s in p.slices]),
      image_paths=np.array([s.image_path for p in patients for s in p.slices]))


# ---------------------------------------------------------------------------
# Training pipeline.
# ---------------------------------------------------------------------------


def oversampled_indices(has_tumour: np.ndarray, tumour_fraction: float) -> np.ndarray:
  """Slice indices for one epoch, tumour slices repeated toward `tumour_fraction`.

  Every slice appears at least once; each tumour slice appears k times, k the
  whole number that brings the share of tumour slices nearest the target
  (0 keeps the natural share).
  """
  tumour = np.flatnonzero(has_tumour)
  empty = np.flatnonzero(~has_tumour)
  repeats = 1
  if tumour_fraction > 0 and len(tumour) and len(empty):
    if not 0 < tumour_fraction < 1:
      raise ValueError(f'config data.tumour_fraction must be in [0, 1), got {tumour_fraction}')
    wanted = tumour_fraction / (1 - tumour_fraction) * len(empty) / len(tumour)
    repeats = max(1, int(round(wanted)))
  return np.sort(np.concatenate([empty] + [tumour] * repeats))


class Augment(grain.transforms.RandomMap):
  """Random flips, rotation, scaling and intensity jitter of one training slice,
  and, when `crop_size` > 0, a random crop of the result.

  The crop is cut from the augmented slice by the same resampling that rotates and
  scales it (one `affine_transform` with a crop-sized output), so it costs what a
  crop-sized slice costs and nothing outside the slice is smeared into it. On a
  tumour slice one tumour pixel is drawn and the crop is placed uniformly among the
  squares that hold where it lands (among the tumour pixels the rotation and zoom
  keep on the slice), so a tumour slice stays a tumour slice and the oversampling
  means what it says. (That holds for zooms above 0.71, augment.scale < 0.29: the
  crop pixel nearest the landing point then always takes a share of the tumour pixel.)
  """

  def __init__(self, config: ml_collections.ConfigDict, crop_size: int = 0):
    enabled = config.get('enabled', True)
    self.flip_lr = enabled and config.flip_lr
    self.flip_ud = enabled and config.flip_ud
    self.rotate_deg = config.rotate_deg if enabled else 0.0
    self.scale = config.scale if enabled else 0.0
    self.intensity = config.intensity if enabled else 0.0
    self.crop_size = crop_size

  def random_map(self, element: Dict[str, np.ndarray], rng: np.random.Generator):
    image, mask = element['image'], element['mask']
    if self.flip_lr and rng.random() < 0.5:
      image, mask = image[:, ::-1], mask[:, ::-1]
    if self.flip_ud and rng.random() < 0.5:
      image, mask = image[::-1], mask[::-1]
    warp = self._warp_matrix(rng)
    size = image.shape[0]
    corner = (self._crop_corner(mask, warp, rng) if self.crop_size
              else np.zeros(2, int))
    out = self.crop_size or size
    if warp is not None:
      image = self._resample(image, warp, corner, out)
      mask = self._resample(mask, warp, corner, out)
    else:
      (top, left) = corner
      image, mask = image[top:top + out, left:left + out], mask[top:top + out, left:left + out]
    if self.intensity:
      gain = 1 + rng.uniform(-self.intensity, self.intensity, size=image.shape[-1])
      shift = rng.uniform(-self.intensity, self.intensity, size=image.shape[-1])
      image = image * gain.astype(np.float32) + shift.astype(np.float32)
    return {'image': np.ascontiguousarray(image, np.float32),
            'mask': np.ascontiguousarray(np.clip(mask, 0, 1), np.float32)}

  def _warp_matrix(self, rng: np.random.Generator):
    """The 2x2 map from output to input coordinates about the centre; None for identity."""
    if not (self.rotate_deg or self.scale):
      return None
    angle = np.deg2rad(rng.uniform(-self.rotate_deg, self.rotate_deg))
    zoom = rng.uniform(1 - self.scale, 1 + self.scale)
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    return np.array([[cos, -sin], [sin, cos]])

  def _crop_corner(self, mask: np.ndarray, warp, rng: np.random.Generator) -> np.ndarray:
    """Top-left corner, in the augmented slice, of a crop holding tumour if there is any."""
    size = mask.shape[0]
    last = size - self.crop_size
    tumour = np.argwhere(mask[..., 0] > 0).astype(float)
    if not len(tumour):
      return rng.integers(0, last + 1, size=2)
    if warp is not None:  # Where the augmentation moves each tumour pixel.
      centre = (size - 1) / 2
      tumour = np.linalg.solve(warp, (tumour - centre).T).T + centre
    tumour = np.round(tumour).astype(int)
    on_slice = ((tumour >= 0) & (tumour < size)).all(axis=1)
    tumour = tumour[on_slice] if on_slice.any() else np.clip(tumour, 0, size - 1)
    pixel = tumour[rng.integers(len(tumour))]
    low = np.maximum(0, pixel - self.crop_size + 1)
    high = np.minimum(last, pixel)
    return np.array([rng.integers(lo, hi + 1) for lo, hi in zip(low, high)])

  @staticmethod
  def _resample(x: np.ndarray, warp: np.ndarray, corner: np.ndarray, out: int) -> np.ndarray:
    """The out x out square at `corner` of x (H, W, C) rotated and scaled about its centre.

    Output pixel u of the whole warped slice reads input warp @ (u - c) + c; the crop's
    pixel v is the slice's pixel v + corner.
    """
    centre = (x.shape[0] - 1) / 2
    matrix = np.eye(3)
    matrix[:2, :2] = warp
    offset = np.zeros(3)
    offset[:2] = warp @ (corner - centre) + centre
    return scipy.ndimage.affine_transform(x, matrix, offset, output_shape=(out, out, x.shape[2]),
                                          order=1, mode='nearest')


def train_dataset(arrays: SliceArrays, config: ml_collections.ConfigDict,
                  local_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """The endless, shuffled, augmented training batches of this process."""
  indices = oversampled_indices(arrays.has_tumour, config.data.tumour_fraction)
  dataset = (grain.MapDataset.source(indices)
             .seed(config.seed)
             .shuffle()
             .repeat(None))
  dataset = dataset.map(lambda i: {'image': arrays.images[i], 'mask': arrays.masks[i]})
  if config.augment.enabled or config.data.crop_size:
    # Before the process slice, so each element's rng comes from its global index
    # and hosts do not repeat each other's augmentations. Both steps are lazy.
    dataset = dataset.random_map(Augment(config.augment, config.data.crop_size))
  dataset = dataset[process_index::process_count]
  dataset = dataset.batch(local_batch_size, drop_remainder=True)
  return dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=config.data.num_threads, prefetch_buffer_size=config.data.prefetch))


def epoch_length(arrays: SliceArrays, tumour_fraction: float) -> int:
  """Slices in one training epoch (with tumour slices oversampled)."""
  return len(oversampled_indices(arrays.has_tumour, tumour_fraction))


# ---------------------------------------------------------------------------
# Evaluation batches: every slice exactly once, padded to a fixed batch shape.
# ---------------------------------------------------------------------------


def eval_batches(arrays: SliceArrays, local_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Dict[str, np.ndarray]]:
  """Fixed-shape batches over this process's share of the slices.

  Each batch holds `image`, `native_mask`, `index` (the slice's row, -1 for
  padding) and `valid`. Every process yields the same number of batches, so
  collective eval steps stay in step across hosts.
  """
  mine = np.arange(process_index, len(arrays), process_count)
  per_process = math.ceil(len(arrays) / process_count)
  num_batches = max(1, math.ceil(per_process / local_batch_size))
  dataset = grain.MapDataset.source(mine).map(
      lambda i: {'image': arrays.images[i], 'native_mask': arrays.native_masks[i], 'index': i})
  for b in range(num_batches):
    rows = [dataset[j] for j in range(b * local_batch_size,
                                      min((b + 1) * local_batch_size, len(mine)))]
    yield _pad_batch(rows, local_batch_size, arrays)


def _pad_batch(rows, batch_size: int, arrays: SliceArrays) -> Dict[str, np.ndarray]:
  pad = batch_size - len(rows)
  image_shape, mask_shape = arrays.images.shape[1:], arrays.native_masks.shape[1:]
  return {
      'image': np.stack([r['image'] for r in rows] + [np.zeros(image_shape, np.float32)] * pad),
      'native_mask': np.stack([r['native_mask'] for r in rows] + [np.zeros(mask_shape, bool)] * pad),
      'index': np.array([r['index'] for r in rows] + [-1] * pad, np.int32),
      'valid': np.array([True] * len(rows) + [False] * pad),
  }
