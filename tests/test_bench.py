"""The benchmark command runs and reports what it promises, on a tiny case."""
import json

from brainseg import bench
from brainseg import op_profile
from configs import tiny


def _tiny_with_crops(get_config=tiny.get_config):
  config = get_config()
  config.data.crop_size = 16
  return config


def test_bench_runs_on_a_tiny_case(tmp_path, monkeypatch, tiny_root):
  # A config that trains on crops: train, loader and end-to-end see 16x16, eval 32x32.
  monkeypatch.setattr(tiny, 'get_config', _tiny_with_crops)
  monkeypatch.setitem(bench.CASES, 'tiny', bench.Case('tiny', None, 'mri', 4, 'configs.tiny'))
  out = tmp_path / 'bench.json'
  bench.main(['--cases', 'tiny', '--steps', '2', '--data-root', tiny_root, '--patients', '2',
              '--batch', '2', '--json', str(out)])
  result = json.load(open(out))
  assert result['matmul_peak_gflops'] > 0
  modes = {r['mode']: r for r in result['records']}
  assert set(modes) == {'train', 'eval', 'loader', 'end_to_end'}
  for record in result['records']:
    assert {'case', 'mode', 'impl', 'images_per_sec'} <= set(record)
    assert record['images_per_sec'] > 0 and record['impl'] == 'brainseg'
  assert modes['train']['batch'] == modes['loader']['batch'] == 2  # --batch overrides the case's 4.
  for mode in ('train', 'eval'):
    assert modes[mode]['gflops_per_sec'] > 0 and 0 < modes[mode]['peak_fraction']
  assert 'end_to_end' in bench.format_table(result['records'])
  assert modes['train']['xla_peak_memory_mb'] > 0 and modes['train']['process_max_rss_mb'] > 0
  assert {mode: r['size'] for mode, r in modes.items()} == {
      'train': 16, 'eval': 32, 'loader': 16, 'end_to_end': 16}


def test_op_profile_attributes_step_time_to_model_layers(tmp_path, monkeypatch):
  monkeypatch.setitem(bench.CASES, 'tiny', bench.Case('tiny', 32, 'mri', 4, 'configs.tiny'))
  rows = op_profile.profile(bench.CASES['tiny'], 2, str(tmp_path / 'trace'))
  assert rows and abs(sum(r['share'] for r in rows) - 1) < 1e-6
  assert rows == sorted(rows, key=lambda r: -r['ms'])
  sources = ' '.join(r['source'] for r in rows)
  assert 'FWD/encoder_0/Conv_0' in sources and 'BWD/' in sources
