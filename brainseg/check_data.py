r"""Validates a data root and prints what is in it and everything wrong with it.

  python -m brainseg.check_data ../shared/data/kaggle_3m [--split_file F]

Reads every TIFF (headers and pixels). Prints patients, slices, tumour slices,
image sizes, dtypes and encodings, then each problem with its file. Exits 1 if
any problem was found, so it can gate a pipeline. Training runs the same checks
(data.scan, then decoding in input_pipeline.load_arrays) before its first step.
"""
import collections
import concurrent.futures
import sys
from typing import Dict, List, Optional

from absl import app
from absl import flags

from brainseg import data



def _inspect_slice(s: data.Slice):
  """(image info, image dtype read, tumour?, problems) of one slice."""
  problems = []
  info, tumour = None, None
  try:
    info = data.tiff_info(s.image_path)
    data.read_image(s.image_path)
  except data.DataError as e:
    problems.append(str(e))
  try:
    tumour = bool(data.read_mask(s.mask_path).any())
  except data.DataError as e:
    problems.append(str(e))
  return info, tumour, problems


def check_root(root: str, split_file: Optional[str] = None, threads: int = 4) -> Dict:
  """Everything check_data prints, as a dict: summary counts and problems."""
  patients, problems = data.scan_with_problems(root)
  slices = [s for p in patients.values() for s in p.slices]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    inspected = list(pool.map(_inspect_slice, slices))
  warnings = []
  for patient in patients.values():
    gaps = data.slice_number_gaps(patient)
    if gaps:
      warnings.append(f'patient {patient.patient_id}: slice numbers missing: {gaps[:10]}')
  sizes, dtypes, encodings = (collections.Counter() for _ in range(3))
  for info, _, slice_problems in inspected:
    problems.extend(slice_problems)
    if info is not None:
      sizes['x'.join(map(str, info.shape))] += 1
      dtypes[info.dtype] += 1
      encodings[info.compression] += 1
  split_sizes = {}
  if split_file:
    try:
      split = data.load_split_file(split_file, list(patients))
      split_sizes = {part: (len(ids), sum(len(patients[p].slices) for p in ids))
                     for part, ids in split.items()}
    except data.DataError as e:
      problems.append(str(e))
  return {
      'root': root,
      'patients': len(patients),
      'slices': len(slices),
      'tumour_slices': sum(1 for _, tumour, _ in inspected if tumour),
      'institutions': dict(collections.Counter(p.institution for p in patients.values())),
      'image_shapes': dict(sizes),
      'image_dtypes': dict(dtypes),
      'image_encodings': dict(encodings),
      'split': split_sizes,
      'problems': sorted(set(problems)),
      'warnings': warnings,
  }


def format_report(report: Dict) -> List[str]:
  lines = [f"{report['root']}: {report['patients']} patients, {report['slices']} slices, "
           f"{report['tumour_slices']} with tumour"]
  for key in ('institutions', 'image_shapes', 'image_dtypes', 'image_encodings'):
    lines.append(f"  {key.replace('_', ' ')}: "
                 + ', '.join(f'{k} {v}' for k, v in sorted(report[key].items())))
  if report['split']:
    lines.append('  split: ' + ', '.join(f'{part} {n} patients / {s} slices'
                                         for part, (n, s) in report['split'].items()))
  for warning in report['warnings']:
    lines.append(f'WARNING {warning}')
  for problem in report['problems']:
    lines.append(f'PROBLEM {problem}')
  lines.append(f"{len(report['problems'])} problem(s), {len(report['warnings'])} warning(s)")
  return lines


def main(argv):
  if len(argv) != 2:
    raise app.UsageError('usage: python -m brainseg.check_data ROOT [--split_file F]')
  try:
    report = check_root(argv[1], flags.FLAGS.split_file, flags.FLAGS.threads)
  except data.DataError as e:
    print(f'PROBLEM {e}')
    sys.exit(1)
  print('\n'.join(format_report(report)))
  sys.exit(1 if report['problems'] else 0)


if __name__ == '__main__':
  # Defined here, not at import, so other commands can import check_root.
  flags.DEFINE_string('split_file', None, 'Also check a split JSON against the root.')
  flags.DEFINE_integer('threads', 4, 'Decoding threads.')
  app.run(main)
