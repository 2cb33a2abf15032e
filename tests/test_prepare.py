"""TFDS/ArrayRecord builders and the prepare CLI: record layout, file order, bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import pedes_fixtures as fx
from tipr_jax.data import annotations as A
from tipr_jax.data import builders
from tipr_jax.data import pipeline
from tipr_jax.data import prepare
from tipr_jax.data import transforms

ROOT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(data_dir, name, split):
  src = pipeline.data_source(data_dir=data_dir, dataset=name, split=split)
  return [src[i] for i in range(len(src))]


def _assert_nothing_built(data_dir, name):
  assert not data_dir.exists() or sorted(os.listdir(data_dir)) == []
  with pytest.raises(FileNotFoundError, match='prepare the dataset first'):
    pipeline.data_source(data_dir=data_dir, dataset=name, split='train')


def test_cuhk_records_in_file_order(tmp_path):
  items = fx.entries(train_ids=3, eval_ids=2, val_ids=1, imgs_per_id=2, caps_per_img=2)
  items[1]['file_path'] = items[1]['file_path'].replace('.jpg', '.png')  # mixed formats
  items[2]['captions'].append('   ')  # an empty caption is dropped and counted
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items)
  out = prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  assert out == tmp_path / 'tfds' / 'cuhk_pedes' / builders.DATASET_VERSION
  assert sorted(os.listdir(tmp_path / 'tfds')) == ['cuhk_pedes']  # no temp dir left
  for split, first in (('train', 0), ('test', 6), ('val', 10)):
    recs = _records(tmp_path / 'tfds', 'cuhk_pedes', split)
    want = [it for it in items if it['split'] == split]
    assert [int(r['entry_index']) for r in recs] == list(range(first, first + len(want)))
    assert [int(r['image_id']) for r in recs] == list(range(len(want)))
    shift = -1 if split == 'train' else 0
    assert [int(r['pid']) for r in recs] == [it['id'] + shift for it in want]
    assert [int(r['raw_id']) for r in recs] == [it['id'] for it in want]
    assert [r['file_path'].decode() for r in recs] == [it['file_path'] for it in want]
    assert [[c.decode() for c in r['captions']] for r in recs] == [
        [c for c in it['captions'] if c.strip()] for it in want]
    for r, it in zip(recs, want):  # original bytes are kept
      src = raw / 'CUHK-PEDES' / 'imgs' / it['file_path']
      assert r['image'] == src.read_bytes()
  info = pipeline.dataset_info(data_dir=tmp_path / 'tfds', dataset='cuhk_pedes')
  assert info.num_classes == 3 and info.num_train_captions == 12
  assert info.splits['test'].num_identities == 2
  np.testing.assert_array_equal(info.caption_counts['train'], [2] * 6)
  report = json.loads((out / prepare.REPORT_NAME).read_text())
  assert report['dropped_empty_captions'] == {'train': 1, 'test': 0, 'val': 0}
  assert report['num_skipped'] == 0 and report['skipped'] == []


def test_icfg_without_val_and_rstp(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=2, caps_per_img=1, layout=A.ICFG_PEDES)
  raw = fx.write(tmp_path / 'raw', A.ICFG_PEDES, items)
  prepare.prepare('icfg_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  info = pipeline.dataset_info(data_dir=tmp_path / 'tfds', dataset='icfg_pedes')
  assert sorted(info.splits) == ['test', 'train'] and info.num_train_captions == 4
  items = fx.entries(train_ids=2, eval_ids=1, val_ids=1, imgs_per_id=1, caps_per_img=2,
                     layout=A.RSTPREID)
  raw = fx.write(tmp_path / 'raw', A.RSTPREID, items)
  prepare.prepare('rstpreid', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  recs = _records(tmp_path / 'tfds', 'rstpreid', 'val')
  assert [r['file_path'].decode() for r in recs] == [items[3]['img_path']]
  assert int(recs[0]['pid']) == items[3]['id']


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def test_bad_images_fail_and_leave_nothing(tmp_path):
  items = fx.entries(train_ids=3, eval_ids=1, imgs_per_id=2, caps_per_img=2)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items, skip_images={items[1]['file_path']})
  _truncate(raw / 'CUHK-PEDES' / 'imgs' / items[4]['file_path'])
  data_dir = tmp_path / 'tfds'
  with pytest.raises(builders.BadInputsError) as e:
    prepare.prepare('cuhk_pedes', data_dir=data_dir, manual_dir=raw, progress=False)
  msg = str(e.value)
  assert msg.startswith('2 bad input(s) referenced by')
  assert f"entry 1 (train) {raw / 'CUHK-PEDES' / 'imgs' / items[1]['file_path']}: file not found" in msg
  assert f"entry 4 (train) {raw / 'CUHK-PEDES' / 'imgs' / items[4]['file_path']}: cannot decode: OSError" in msg
  assert [p.entry_index for p in e.value.problems] == [1, 4]
  _assert_nothing_built(data_dir, 'cuhk_pedes')


def test_skip_bad_writes_report(tmp_path):
  items = fx.entries(train_ids=3, eval_ids=1, imgs_per_id=2, caps_per_img=2)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items, skip_images={items[7]['file_path']})
  _truncate(raw / 'CUHK-PEDES' / 'imgs' / items[2]['file_path'])
  out = prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, skip_bad=True,
                        progress=False)
  report = json.loads((out / prepare.REPORT_NAME).read_text())
  assert report['num_skipped'] == 2
  assert [(s['entry_index'], s['split']) for s in report['skipped']] == [(2, 'train'), (7, 'test')]
  assert report['skipped'][1]['reason'] == 'file not found'
  assert report['skipped'][0]['file'].endswith(items[2]['file_path'])
  train = _records(tmp_path / 'tfds', 'cuhk_pedes', 'train')
  assert [int(r['entry_index']) for r in train] == [0, 1, 3, 4, 5]
  assert [int(r['image_id']) for r in train] == [0, 1, 2, 3, 4]
  test = _records(tmp_path / 'tfds', 'cuhk_pedes', 'test')
  assert [int(r['entry_index']) for r in test] == [6]
  info = pipeline.dataset_info(data_dir=tmp_path / 'tfds', dataset='cuhk_pedes')
  assert info.num_classes == 3 and info.num_train_captions == 10


@pytest.mark.parametrize('mutate, pattern', [
    (lambda it: it[3].pop('id'), r"entry 3: missing field 'id'"),
    (lambda it: it[0].update(captions=7), r"entry 0: field 'captions': expected a list"),
    (None, r'invalid JSON at line 1'),
])
def test_bad_annotations_fail_and_leave_nothing(tmp_path, mutate, pattern):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=2, caps_per_img=1)
  raw_json = None
  if mutate is None:
    raw_json = json.dumps(items)[:-30]
  else:
    mutate(items)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items, raw_json=raw_json)
  with pytest.raises(ValueError, match=pattern) as e:
    prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  assert 'reid_raw.json' in str(e.value)
  _assert_nothing_built(tmp_path / 'tfds', 'cuhk_pedes')


def test_existing_output_needs_overwrite(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=1, caps_per_img=1)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items)
  prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  with pytest.raises(FileExistsError, match='--overwrite'):
    prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  items[0]['captions'] = ['changed caption']
  fx.write(tmp_path / 'raw', A.CUHK_PEDES, items)
  prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, overwrite=True,
                  progress=False)
  assert _records(tmp_path / 'tfds', 'cuhk_pedes', 'train')[0]['captions'] == [b'changed caption']


def test_max_side_reencodes_optionally(tmp_path):
  items = fx.entries(train_ids=2, imgs_per_id=1, caps_per_img=1)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items, image_size=(120, 40))
  prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, max_side=60,
                  progress=False)
  img = transforms.decode(_records(tmp_path / 'tfds', 'cuhk_pedes', 'train')[0]['image'])
  assert img.size == (20, 60)


def test_synthetic_builder_uses_a_generated_dir(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=2, caps_per_img=2)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items)
  prepare.prepare('synthetic', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  assert len(_records(tmp_path / 'tfds', 'synthetic', 'test')) == 2
  # Readable through plain TFDS as well (images decoded by TFDS with PIL, no TensorFlow).
  ds = tfds.data_source('synthetic', split='train', data_dir=os.fspath(tmp_path / 'tfds'),
                        download=False)
  assert ds[0]['image'].shape == (64, 32, 3)


def test_cli_progress_and_failure(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=1, caps_per_img=1)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items, skip_images={items[2]['file_path']})
  cmd = [sys.executable, '-m', 'tipr_jax.data.prepare', '--dataset=cuhk_pedes',
         f'--manual_dir={raw}', f'--data_dir={tmp_path / "tfds"}']
  res = subprocess.run(cmd, cwd=ROOT_DIR, capture_output=True, text=True, timeout=120)
  assert res.returncode != 0
  assert '1 bad input(s)' in res.stderr and 'file not found' in res.stderr
  assert 'checking images' in res.stderr  # tqdm progress bar
  res = subprocess.run(cmd + ['--skip_bad'], cwd=ROOT_DIR, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert '"num_skipped": 1' in res.stdout
  assert (tmp_path / 'tfds' / 'cuhk_pedes' / builders.DATASET_VERSION /
          prepare.REPORT_NAME).is_file()


def test_synthetic_builder_generates_without_manual_dir(tmp_path):
  prepare.prepare('synthetic', data_dir=tmp_path / 'tfds', manual_dir=None,
                  synthetic_identities=12, progress=False)
  info = pipeline.dataset_info(data_dir=tmp_path / 'tfds', dataset='synthetic')
  assert info.num_classes == info.splits['train'].num_identities > 0
  assert sorted(os.listdir(tmp_path / 'tfds')) == ['synthetic']
  with pytest.raises(ValueError, match='--manual_dir is required for cuhk_pedes'):
    prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=None)


def test_skip_bad_leaves_out_malformed_entries_and_reports_them(tmp_path):
  items = fx.entries(train_ids=3, eval_ids=1, imgs_per_id=2, caps_per_img=2)
  items[6]['captions'] = 'not a list'   # a test entry
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items, skip_images={items[2]['file_path']})
  with pytest.raises(ValueError, match=r"entry 6: field 'captions'"):
    prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  _assert_nothing_built(tmp_path / 'tfds', 'cuhk_pedes')
  out = prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, skip_bad=True,
                        progress=False)
  report = json.loads((out / prepare.REPORT_NAME).read_text())
  assert report['num_entries'] == len(items) and report['num_skipped'] == 2
  assert [(s['entry_index'], s['split']) for s in report['skipped']] == [(2, 'train'), (6, 'test')]
  assert report['skipped'][0]['reason'] == 'file not found'
  assert report['skipped'][1]['file'] == str(raw / 'CUHK-PEDES' / 'reid_raw.json')
  assert "field 'captions': expected a list of strings" in report['skipped'][1]['reason']
  assert [int(r['entry_index']) for r in _records(tmp_path / 'tfds', 'cuhk_pedes', 'test')] == [7]


def test_synthetic_keeps_the_generator_files_beside_the_records(tmp_path):
  out = prepare.prepare('synthetic', data_dir=tmp_path / 'tfds', manual_dir=None,
                        synthetic_identities=12, progress=False)
  for name in builders.Synthetic.SIDE_FILES:
    assert (out / name).stat().st_size > 0, name
  report = json.loads((out / prepare.REPORT_NAME).read_text())
  assert sorted(report['side_files']) == sorted(builders.Synthetic.SIDE_FILES)
  words = (out / 'attribute_words.txt').read_text().split()
  assert 'backpack' in words or len(words) > 10


def test_synthetic_refuses_a_manual_dir_without_the_cuhk_layout(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=1, caps_per_img=1, layout=A.ICFG_PEDES)
  raw = fx.write(tmp_path / 'raw', A.ICFG_PEDES, items)
  with pytest.raises(FileNotFoundError, match=r'CUHK-PEDES/reid_raw.json not found.*icfg_pedes'):
    prepare.prepare('synthetic', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  assert not (tmp_path / 'tfds').exists() or os.listdir(tmp_path / 'tfds') == []


def test_a_killed_builds_temporary_dir_is_cleaned_up(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, imgs_per_id=1, caps_per_img=1)
  raw = fx.write(tmp_path / 'raw', A.CUHK_PEDES, items)
  stale = tmp_path / 'tfds' / '.prepare-cuhk_pedes-abc123' / 'data'
  stale.mkdir(parents=True)
  other = tmp_path / 'tfds' / '.prepare-rstpreid-xyz'
  other.mkdir()
  prepare.prepare('cuhk_pedes', data_dir=tmp_path / 'tfds', manual_dir=raw, progress=False)
  assert sorted(os.listdir(tmp_path / 'tfds')) == ['.prepare-rstpreid-xyz', 'cuhk_pedes']
