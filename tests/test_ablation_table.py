"""The ablation table: read back from each variant's val metrics and wall time."""
import json
import subprocess
import sys

from tests import conftest


def _variant(out, name, slice_dice, patient_dice, seconds):
  folder = out / name
  folder.mkdir(parents=True)
  (folder / 'metrics.json').write_text(json.dumps({
      'per_slice': {'dice': slice_dice}, 'per_patient': {'dice_mean': patient_dice},
      'global': {'dice': 0.5}, 'checkpoint_step': 400}))
  (folder / 'train_seconds').write_text(str(seconds))


def test_table_gives_each_variants_change_from_full(tmp_path):
  _variant(tmp_path, 'full', 0.80, 0.70, 600)
  _variant(tmp_path, 'no_dice_loss', 0.75, 0.72, 540)
  done = subprocess.run([sys.executable, '-m', 'brainseg.ablation_table', str(tmp_path),
                         'no_dice_loss', 'full'], cwd=conftest.REPO, capture_output=True,
                        text=True, check=True)
  rows = json.loads((tmp_path / 'ablation.json').read_text())
  assert [r['variant'] for r in rows] == ['full', 'no_dice_loss']  # full first.
  assert rows[1]['train_minutes'] == 9.0
  line = next(l for l in (tmp_path / 'ablation.md').read_text().splitlines()
              if l.startswith('| no_dice_loss'))
  assert '-0.0500' in line and '+0.0200' in line
  assert 'no_dice_loss' in done.stdout


def test_a_variant_without_metrics_is_named(tmp_path):
  _variant(tmp_path, 'full', 0.80, 0.70, 600)
  done = subprocess.run([sys.executable, '-m', 'brainseg.ablation_table', str(tmp_path),
                         'full', 'no_augmentation'], cwd=conftest.REPO, capture_output=True,
                        text=True)
  assert done.returncode != 0 and 'no_augmentation' in done.stderr
