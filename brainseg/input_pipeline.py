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
  """Random flips, rotation, scaling and intensity jitter of one training slice."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.flip_lr = config.flip_lr
    self.flip_ud = config.flip_ud
    self.rotate_deg = config.rotate_deg
    self.scale = config.scale
    self.intensity = config.intensity

  def random_map(self, element: Dict[str, np.ndarray], rng: np.random.Generator):
    image, mask = element['image'], element['mask']
    if self.flip_lr and rng.random() < 0.5:
      image, mask = image[:, ::-1], mask[:, ::-1]
    if self.flip_ud and rng.random() < 0.5:
      image, mask = image[::-1], mask[::-1]
    if self.rotate_deg or self.scale:
      angle = np.deg2rad(rng.uniform(-self.rotate_deg, self.rotate_deg))
      zoom = rng.uniform(1 - self.scale, 1 + self.scale)
      image, mask = self._affine(image, angle, zoom), self._affine(mask, angle, zoom)
    if self.intensity:
      gain = 1 + rng.uniform(-self.intensity, self.intensity, size=image.shape[-1])
      shift = rng.uniform(-self.intensity, self.intensity, size=image.shape[-1])
      image = image * gain.astype(np.float32) + shift.astype(np.float32)
    return {'image': np.ascontiguousarray(image, np.float32),
            'mask': np.ascontiguousarray(np.clip(mask, 0, 1), np.float32)}

  @staticmethod
  def _affine(x: np.ndarray, angle: float, zoom: float) -> np.ndarray:
    """Rotates by `angle` and scales by `zoom` about the centre (H, W, C)."""
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    matrix = np.array([[cos, -sin, 0], [sin, cos, 0], [0, 0, 1]])
    centre = (np.array(x.shape) - 1) / 2
    offset = centre - matrix @ centre
    return scipy.ndimage.affine_transform(x, matrix, offset, order=1, mode='nearest')


def crop_window(crop_size: int, image_size: int, augment: ml_collections.ConfigDict) -> int:
  """Side of the square cut before augmentation, so a crop_size square still fits after.

  Rotating by up to rotate_deg and zooming out to 1 - scale needs a source square of
  crop_size * (|cos| + |sin|) / (1 - scale); augmenting that window, then cutting its
  centre, leaves no smeared border in the crop.
  """
  if not augment.enabled:
    return crop_size
  angle = np.deg2rad(augment.rotate_deg)
  needed = crop_size * (abs(np.cos(angle)) + abs(np.sin(angle))) / (1 - augment.scale)
  return min(image_size, int(math.ceil(needed)))


class TumourCrop(grain.transforms.RandomMap):
  """Cuts a random `size` square; on a tumour slice, one that holds some tumour.

  Training on crops of full-resolution slices keeps the compute of a small input
  while the model sees lesions at their native scale. On a tumour slice a tumour
  pixel is drawn first and the square is placed uniformly among those that hold it,
  so tumour slices stay tumour slices (the oversampling means what it says).
  """

  def __init__(self, size: int):
    self.size = size

  def random_map(self, element: Dict[str, np.ndarray], rng: np.random.Generator):
    image, mask = element['image'], element['mask']
    height, width = image.shape[:2]
    tumour = np.argwhere(mask[..., 0] > 0.5)
    corner = []
    for axis, extent in enumerate((height, width)):
      last = extent - self.size
      if len(tumour):
        centre = tumour[rng.integers(len(tumour))][axis]
        low, high = max(0, centre - self.size + 1), min(last, centre)
      else:
        low, high = 0, last
      corner.append(int(rng.integers(low, high + 1)))
    (top, left), size = corner, self.size
    return {'image': image[top:top + size, left:left + size],
            'mask': mask[top:top + size, left:left + size]}


def centre_crop(element: Dict[str, np.ndarray], size: int) -> Dict[str, np.ndarray]:
  """The central size x size square of every (H, W, C) field."""
  def cut(x):
    top, left = (x.shape[0] - size) // 2, (x.shape[1] - size) // 2
    return np.ascontiguousarray(x[top:top + size, left:left + size])
  return {key: cut(value) for key, value in element.items()}


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
  # Random steps come before the process slice, so each element's rng comes from
  # its global index and hosts do not repeat each other's crops or augmentations.
  # All steps are lazy.
  crop = config.data.crop_size
  if crop:
    window = crop_window(crop, config.data.image_size, config.augment)
    dataset = dataset.random_map(TumourCrop(window))
  if config.augment.enabled:
    dataset = dataset.random_map(Augment(config.augment))
  if crop and window > crop:
    dataset = dataset.map(lambda element: centre_crop(element, crop))
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
