r"""Tabulates an ablation: each variant's val Dice, its change from `full`, and wall time.

  python -m brainseg.ablation_table OUT full no_dice_loss ...

OUT/<variant>/ holds the variant's val metrics.json (from brainseg.evaluate) and
train_seconds (see launch/ablation_cpu.sh). Writes OUT/ablation.md and
OUT/ablation.json.
"""
import json
import os
import sys
from typing import Dict, List


def read_variant(out: str, name: str) -> Dict[str, float]:
  """One variant's val scores and training wall time."""
  with open(os.path.join(out, name, 'metrics.json')) as f:
    metrics = json.load(f)
  with open(os.path.join(out, name, 'train_seconds')) as f:
    seconds = int(f.read())
  return {'variant': name,
          'val_per_slice_dice': metrics['per_slice']['dice'],
          'val_per_patient_dice_mean': metrics['per_patient']['dice_mean'],
          'val_global_dice': metrics['global']['dice'],
          'checkpoint_step': metrics['checkpoint_step'],
          'train_minutes': round(seconds / 60, 1)}


def table(rows: List[Dict[str, float]]) -> str:
  """Markdown, with each score's change from the `full` row."""
  full = next((r for r in rows if r['variant'] == 'full'), None)
  lines = ['| variant | val per-slice Dice | Δ | val per-patient Dice | Δ | best step | '
           'train wall (min) |', '|---|---|---|---|---|---|---|']
  for r in rows:
    delta = lambda key: '' if full is None else f'{r[key] - full[key]:+.4f}'  # pylint: disable=cell-var-from-loop
    lines.append(f"| {r['variant']} | {r['val_per_slice_dice']:.4f} | "
                 f"{delta('val_per_slice_dice')} | {r['val_per_patient_dice_mean']:.4f} | "
                 f"{delta('val_per_patient_dice_mean')} | {r['checkpoint_step']} | "
                 f"{r['train_minutes']} |")
  return '\n'.join(lines) + '\n'


def main(argv: List[str]) -> None:
  if len(argv) < 3:
    sys.exit(f'usage: python -m brainseg.ablation_table OUT VARIANT...\n{__doc__}')
  out, names = argv[1], argv[2:]
  names = sorted(names, key=lambda n: (n != 'full', n))
  missing = [n for n in names if not os.path.exists(os.path.join(out, n, 'metrics.json'))]
  if missing:
    sys.exit(f'error: no val metrics.json under {out} for {", ".join(missing)}')
  rows = [read_variant(out, n) for n in names]
  with open(os.path.join(out, 'ablation.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  with open(os.path.join(out, 'ablation.md'), 'w') as f:
    f.write(table(rows))
  print(table(rows))


if __name__ == '__main__':
  main(sys.argv)
