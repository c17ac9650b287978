r"""Runs a trained model on new scans and writes masks, overlays, GIFs and areas.

  python -m brainseg.predict --checkpoint results/reference --input PATH --output DIR

PATH is one TIFF slice, a patient folder (`<patient>_<n>.tif`, masks optional), or a
kaggle_3m-style root of patient folders. For each slice it writes a mask TIFF
(uint8 0/255, the input's size) and an overlay PNG (predicted outline in red, the
ground truth's in green when a mask exists); for each patient an animated GIF
through the slices and a CSV of tumour area per slice. Slices of any size are
resized for the model and the masks resized back.
"""
import csv
import dataclasses
import os
import re
import sys
from typing import Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tifffile

from brainseg import checkpointing
from brainseg import cli
from brainseg import data
from brainseg import input_pipeline
from brainseg import train
from brainseg import visualize

_NUMBERED = re.compile(r'^(?P<stem>.+)_(?P<number>\d+)\.tiff?$', re.IGNORECASE)
_MASK = re.compile(r'_mask\.tiff?$', re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class InputSlice:
  patient: str
  name: str  # The file name without extension.
  image_path: str
  mask_path: Optional[str]


def _slice_files(folder: str) -> List[str]:
  names = [f for f in os.listdir(folder)
           if f.lower().endswith(('.tif', '.tiff')) and not _MASK.search(f)]
  number = lambda f: int(_NUMBERED.match(f)['number']) if _NUMBERED.match(f) else -1
  return sorted(names, key=lambda f: (number(f), f))  # Numerically, as the data set orders them.


def _input_slice(patient: str, folder: str, filename: str) -> InputSlice:
  stem = os.path.splitext(filename)[0]
  mask = os.path.join(folder, f'{stem}_mask.tif')
  return InputSlice(patient, stem, os.path.join(folder, filename),
                    mask if os.path.exists(mask) else None)


def find_inputs(path: str) -> Dict[str, List[InputSlice]]:
  """patient -> its slices in order, for a slice file, a patient folder or a root."""
  if os.path.isfile(path):
    folder, filename = os.path.split(os.path.abspath(path))
    return {os.path.basename(folder): [_input_slice(os.path.basename(folder), folder, filename)]}
  if not os.path.isdir(path):
    raise data.DataError(f'--input {path}: no such file or folder')
  if _slice_files(path):
    patient = os.path.basename(os.path.abspath(path))
    return {patient: [_input_slice(patient, path, f) for f in _slice_files(path)]}
  patients = {}
  for dirpath, _, _ in sorted(os.walk(path, followlinks=True)):
    files = _slice_files(dirpath)
    name = os.path.basename(dirpath)
    if files and name not in patients:
      patients[name] = [_input_slice(name, dirpath, f) for f in files]
  if not patients:
    raise data.DataError(f'--input {path}: holds no .tif slices')
  return patients


def model_inputs(images: List[np.ndarray], config: ml_collections.ConfigDict) -> np.ndarray:
  """One patient's uint8 slices -> the model's normalised input batch.

  Slices of one size go through exactly the training preprocessing (normalise the
  volume, then resize); slices of mixed sizes are first brought to the model's size.
  """
  size = config.data.image_size
  if len({img.shape for img in images}) > 1:
    images = [np.stack([np.asarray(Image.fromarray(img[..., c]).resize((size, size),
                                                                        Image.BILINEAR))
                        for c in range(3)], axis=-1) for img in images]
  volume = np.stack(images)
  if config.data.channels == 'gray':
    volume = input_pipeline.to_grayscale(volume)
  volume = input_pipeline.normalize_volume(volume, config.data.normalization)
  return input_pipeline.resize_slices(volume, size)


def resize_probs(probs: np.ndarray, shape) -> np.ndarray:
  """A probability map back to a slice's own size (bilinear)."""
  if probs.shape == tuple(shape):
    return probs
  return np.asarray(Image.fromarray(probs.astype(np.float32), mode='F').resize(
      (shape[1], shape[0]), Image.BILINEAR))


class Predictor:
  """Batched inference compiled once: fixed batch shape, padding dropped."""

  def __init__(self, variables, config: ml_collections.ConfigDict, batch_size: int = 16):
    self.config, self.batch_size = config, batch_size
    model = train.create_model(config)
    size = config.data.image_size
    self._fn = jax.jit(lambda v, x: train.predict_probs(v, x, (size, size), model.apply))
    self._variables = variables

  def __call__(self, inputs: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, len(inputs), self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      padded = np.zeros((self.batch_size, *inputs.shape[1:]), np.float32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._fn(self._variables, padded))[:len(chunk)])
    return np.concatenate(out)

  def compiled_versions(self) -> int:
    return self._fn._cache_size()  # pylint: disable=protected-access


def _overlay(image: np.ndarray, predicted: np.ndarray, truth: Optional[np.ndarray]) -> np.ndarray:
  """RGB uint8 slice with the predicted outline in red and the truth's in green."""
  shown = image.copy()
  if truth is not None:
    shown[visualize.tumour_outline(truth)] = (0, 255, 0)
  shown[visualize.tumour_outline(predicted)] = (255, 0, 0)
  return shown


def _progress(done: int, total: int) -> None:
  width = 30
  filled = width * done // max(total, 1)
  sys.stderr.write(f'\r[{"#" * filled}{"." * (width - filled)}] {done}/{total} slices')
  if done == total:
    sys.stderr.write('\n')
  sys.stderr.flush()


def predict_patient(predictor: Predictor, patient: str, slices: List[InputSlice],
                    output: str, threshold: float = 0.5) -> List[dict]:
  """Writes one patient's masks, overlays, GIF and area CSV; returns the CSV rows."""
  images = [data.read_image(s.image_path) for s in slices]
  probs = predictor(model_inputs(images, predictor.config))
  folder = os.path.join(output, patient)
  os.makedirs(folder, exist_ok=True)
  rows, frames = [], []
  for s, image, prob in zip(slices, images, probs):
    predicted = resize_probs(prob, image.shape[:2]) > threshold
    truth = data.read_mask(s.mask_path) if s.mask_path else None
    tifffile.imwrite(os.path.join(folder, f'{s.name}_pred_mask.tif'),
                     predicted.astype(np.uint8) * 255, compression='deflate')
    overlay = _overlay(image, predicted, truth)
    Image.fromarray(overlay).save(os.path.join(folder, f'{s.name}_overlay.png'))
    frames.append(Image.fromarray(overlay))
    row = {'slice': s.name, 'height': image.shape[0], 'width': image.shape[1],
           'tumour_pixels': int(predicted.sum()),
           'tumour_fraction': round(float(predicted.mean()), 6)}
    if truth is not None:
      row['true_pixels'] = int(truth.sum())
    rows.append(row)
  frames[0].save(os.path.join(folder, f'{patient}.gif'), save_all=True,
                 append_images=frames[1:], duration=120, loop=0)
  fields = ['slice', 'height', 'width', 'tumour_pixels', 'tumour_fraction']
  fields += ['true_pixels'] if any('true_pixels' in r for r in rows) else []
  with open(os.path.join(folder, f'{patient}_areas.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  return rows


def predict(checkpoint: str, input_path: str, output: str, batch_size: int = 16,
            threshold: float = 0.5) -> Dict[str, List[dict]]:
  """Predicts every slice under `input_path`; returns patient -> per-slice rows."""
  variables, config, step = checkpointing.load_model(checkpoint)
  inputs = find_inputs(input_path)
  total = sum(len(s) for s in inputs.values())
  logging.info('Model of step %d from %s; %d slice(s) of %d patient(s)', step, checkpoint,
               total, len(inputs))
  sizes = {data.tiff_info(s.image_path).shape[:2] for ss in inputs.values() for s in ss}
  size = config.data.image_size
  if any(tuple(hw) != (size, size) for hw in sizes):
    print(f'Input slices of size {sorted(sizes)} are resized to {size}x{size} for the model; '
          'predicted masks are resized back to each slice\'s own size.', file=sys.stderr)
  predictor = Predictor(variables, config, batch_size)
  results, done = {}, 0
  for patient, slices in inputs.items():
    results[patient] = predict_patient(predictor, patient, slices, output, threshold)
    done += len(slices)
    _progress(done, total)
  return results


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.setup()
  results = predict(FLAGS.checkpoint, FLAGS.input, FLAGS.output, FLAGS.batch_size,
                    FLAGS.threshold)
  found = sum(1 for rows in results.values() for r in rows if r['tumour_pixels'])
  print(f'Wrote {sum(len(r) for r in results.values())} slice(s) of {len(results)} '
        f'patient(s) to {FLAGS.output}; tumour found in {found} slice(s).')


if __name__ == '__main__':
  flags.DEFINE_string('checkpoint', None, 'A workdir, or a best-checkpoint folder.')
  flags.DEFINE_string('input', None, 'A TIFF slice, a patient folder or a data root.')
  flags.DEFINE_string('output', None, 'Folder for masks, overlays, GIFs and CSVs.')
  flags.DEFINE_integer('batch_size', 16, 'Slices per model call.')
  flags.DEFINE_float('threshold', 0.5, 'Probability above which a pixel is tumour.')
  flags.mark_flags_as_required(['checkpoint', 'input', 'output'])
  app.run(lambda argv: cli.run_main(main, argv))
