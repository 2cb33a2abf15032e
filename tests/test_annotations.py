"""Annotation readers: the reference's id / split / sample rules and clear errors on bad files."""
import json

import pytest

import pedes_fixtures as fx
from tipr_jax.data import annotations as A


def _write(tmp_path, layout, items):
  d = tmp_path / layout.name
  d.mkdir(parents=True, exist_ok=True)
  (d / layout.annotation_file).write_text(json.dumps(items))
  return tmp_path


def test_cuhk_ids_splits_and_samples(tmp_path):
  items = [
      {'id': 1, 'split': 'train', 'file_path': 'CUHK01/a.png', 'captions': ['c0', 'c1'],
       'processed_tokens': [['c0'], ['c1']]},
      {'id': 2, 'split': 'train', 'file_path': 'CUHK01/b.png', 'captions': ['c2'],
       'processed_tokens': [['c2']]},
      {'id': 1, 'split': 'train', 'file_path': 'CUHK01/c.png', 'captions': ['c3', 'c4', 'c5'],
       'processed_tokens': [['c3'], ['c4'], ['c5']]},
      {'id': 11004, 'split': 'test', 'file_path': 'test_query/p1.jpg', 'captions': ['q0', 'q1'],
       'processed_tokens': []},
      {'id': 11005, 'split': 'val', 'file_path': 'val/v.jpg', 'captions': ['v0'],
       'processed_tokens': []},
      {'id': 11006, 'split': 'validation', 'file_path': 'val/w.jpg', 'captions': ['v1', 'v2'],
       'processed_tokens': []},
      {'id': 11004, 'split': 'test', 'file_path': 'test_query/p2.jpg', 'captions': ['q2'],
       'processed_tokens': []},
  ]
  ann = A.read_annotations(A.CUHK_PEDES, _write(tmp_path, A.CUHK_PEDES, items))
  # CUHK train pid = id - 1; test/val keep the raw id; an odd split name goes to val.
  assert [e.pid for e in ann.split('train')] == [0, 1, 0]
  assert [e.pid for e in ann.split('test')] == [11004, 11004]
  assert [e.pid for e in ann.split('val')] == [11005, 11006]
  assert [e.index for e in ann.split('val')] == [4, 5]
  tr = A.train_set(ann.split('train'))
  assert tr.num_classes == 2 and tr.num_images == 3
  assert [(s.pid, s.image_id, s.image_path, s.caption) for s in tr.samples] == [
      (0, 0, 'CUHK01/a.png', 'c0'), (0, 0, 'CUHK01/a.png', 'c1'), (1, 1, 'CUHK01/b.png', 'c2'),
      (0, 2, 'CUHK01/c.png', 'c3'), (0, 2, 'CUHK01/c.png', 'c4'), (0, 2, 'CUHK01/c.png', 'c5')]
  te = A.eval_set(ann.split('test'))
  assert te.image_paths == ['test_query/p1.jpg', 'test_query/p2.jpg']
  assert te.image_pids == [11004, 11004]
  assert te.captions == ['q0', 'q1', 'q2'] and te.caption_pids == [11004] * 3
  va = A.eval_set(ann.split('val'))
  assert va.captions == ['v0', 'v1', 'v2'] and va.caption_pids == [11005, 11006, 11006]


def test_icfg_single_caption_raw_ids(tmp_path):
  items = fx.entries(train_ids=3, eval_ids=2, imgs_per_id=2, caps_per_img=1,
                     layout=A.ICFG_PEDES)
  ann = A.read_annotations(A.ICFG_PEDES, _write(tmp_path, A.ICFG_PEDES, items))
  tr = A.train_set(ann.split('train'))
  assert [s.pid for s in tr.samples] == [0, 0, 1, 1, 2, 2]  # raw ids, no shift
  assert [s.image_id for s in tr.samples] == [0, 1, 2, 3, 4, 5]
  assert tr.num_classes == 3
  assert [e.pid for e in ann.split('test')] == [3, 3, 4, 4]
  assert ann.split('val') == []


def test_rstp_img_path_field_and_dataset_dir(tmp_path):
  items = fx.entries(train_ids=2, eval_ids=1, val_ids=1, imgs_per_id=1, caps_per_img=2,
                     layout=A.RSTPREID)
  root = _write(tmp_path, A.RSTPREID, items)
  ann = A.read_annotations(A.RSTPREID, root)
  assert [e.image_path for e in ann.entries] == [i['img_path'] for i in items]
  assert [e.pid for e in ann.split('train')] == [0, 1]
  # The dataset directory itself is accepted as the root too.
  ann2 = A.read_annotations(A.RSTPREID, root / 'RSTPReid')
  assert ann2.entries == ann.entries
  assert A.RSTPREID.image_dir(root) == root / 'RSTPReid' / 'imgs'


def test_train_pids_must_be_contiguous(tmp_path):
  items = [{'id': 1, 'split': 'train', 'file_path': 'a.jpg', 'captions': ['x']},
           {'id': 3, 'split': 'train', 'file_path': 'b.jpg', 'captions': ['y']}]
  with pytest.raises(ValueError, match=r'reid_raw.json.*exactly 0..N-1.*id - 1.*first gap at 1'):
    A.read_annotations(A.CUHK_PEDES, _write(tmp_path, A.CUHK_PEDES, items))
  # 1-based ids in a dataset whose train ids are raw (ICFG) fail too.
  items = [{'id': 1, 'split': 'train', 'file_path': 'a.jpg', 'captions': ['x']}]
  with pytest.raises(ValueError, match=r'ICFG-PEDES.json.*exactly 0..N-1.*pid = id\)'):
    A.read_annotations(A.ICFG_PEDES, _write(tmp_path, A.ICFG_PEDES, items))


@pytest.mark.parametrize('mutate, pattern', [
    (lambda it: it[1].pop('captions'), r"entry 1: missing field 'captions'"),
    (lambda it: it[2].pop('file_path'), r"entry 2: missing field 'file_path'"),
    (lambda it: it[0].update(id=1.5), r"entry 0: field 'id': expected an integer, got float"),
    (lambda it: it[0].update(id=True), r"entry 0: field 'id': expected an integer, got bool"),
    (lambda it: it[1].update(captions='a string'),
     r"entry 1: field 'captions': expected a list of strings, got str"),
    (lambda it: it[1].update(captions=['ok', 3]),
     r"entry 1: field 'captions\[1\]': expected a string, got int"),
    (lambda it: it[2].update(split=None), r"entry 2: field 'split': expected a string"),
    (lambda it: it[0].update(file_path=''), r"entry 0: field 'file_path': expected a non-empty"),
    (lambda it: it.__setitem__(1, ['not', 'a', 'dict']), r'entry 1: expected a JSON object'),
])
def test_malformed_entries(tmp_path, mutate, pattern):
  items = fx.entries(train_ids=3, imgs_per_id=1, caps_per_img=2)
  mutate(items)
  root = _write(tmp_path, A.CUHK_PEDES, items)
  with pytest.raises(ValueError, match=pattern) as e:
    A.read_annotations(A.CUHK_PEDES, root)
  assert str(root / 'CUHK-PEDES' / 'reid_raw.json') in str(e.value)


def test_string_ids_are_parsed(tmp_path):
  items = [{'id': '0', 'split': 'train', 'img_path': 'a.jpg', 'captions': ['x']},
           {'id': ' 7 ', 'split': 'test', 'img_path': 'b.jpg', 'captions': ['y']}]
  ann = A.read_annotations(A.RSTPREID, _write(tmp_path, A.RSTPREID, items))
  assert [e.pid for e in ann.entries] == [0, 7]
  items[0]['id'] = 'seven'
  with pytest.raises(ValueError, match=r"entry 0: field 'id': expected an integer, got str"):
    A.read_annotations(A.RSTPREID, _write(tmp_path, A.RSTPREID, items))


def test_invalid_json_and_missing_file(tmp_path):
  d = tmp_path / 'CUHK-PEDES'
  d.mkdir()
  (d / 'reid_raw.json').write_text('[{"id": 1, "split": "train",\n "captions": [}]')
  with pytest.raises(ValueError, match=r'reid_raw.json: invalid JSON at line 2 column'):
    A.read_annotations(A.CUHK_PEDES, tmp_path)
  (d / 'reid_raw.json').write_text('{"id": 1}')
  with pytest.raises(ValueError, match=r'reid_raw.json: expected a JSON list of objects'):
    A.read_annotations(A.CUHK_PEDES, tmp_path)
  with pytest.raises(FileNotFoundError, match=r'ICFG-PEDES.json: annotation file not found'):
    A.read_annotations(A.ICFG_PEDES, tmp_path)


def test_drop_empty_captions():
  entries = [A.Entry(0, 'train', 1, 0, 'a.jpg', ('x', '  ', '')),
             A.Entry(1, 'test', 5, 5, 'b.jpg', ('y',))]
  kept, dropped = A.drop_empty_captions(entries)
  assert dropped == 2
  assert kept[0].captions == ('x',) and kept[1] is entries[1]


def test_every_malformed_entry_is_reported_at_once(tmp_path):
  items = fx.entries(train_ids=3, eval_ids=1, imgs_per_id=2, caps_per_img=1)
  items[1].pop('captions')
  items[4]['id'] = 'x'
  items[6]['split'] = 3
  root = _write(tmp_path, A.CUHK_PEDES, items)
  with pytest.raises(ValueError) as e:
    A.read_annotations(A.CUHK_PEDES, root)
  msg = str(e.value)
  assert msg.startswith(f"{root / 'CUHK-PEDES' / 'reid_raw.json'}: 3 malformed entries:")
  assert "entry 1: missing field 'captions'" in msg
  assert "entry 4: field 'id': expected an integer, got str" in msg
  assert "entry 6: field 'split': expected a string" in msg
  assert '--skip_bad' in msg
  # skip_bad: the good entries, and the bad ones with their split (or 'unknown') and reason.
  ann = A.read_annotations(A.CUHK_PEDES, root, skip_bad=True)
  assert [e.index for e in ann.entries] == [0, 2, 3, 5, 7]
  assert [(m.index, m.split) for m in ann.malformed] == [(1, 'train'), (4, 'train'), (6, 'unknown')]
  assert "missing field 'captions'" in ann.malformed[0].reason


def test_many_malformed_entries_list_the_first_twenty_and_the_count(tmp_path):
  items = fx.entries(train_ids=30, imgs_per_id=1, caps_per_img=1)
  for it in items[:25]:
    it['captions'] = 'one string'
  root = _write(tmp_path, A.CUHK_PEDES, items)
  with pytest.raises(ValueError, match=r'25 malformed entries \(first 20\):') as e:
    A.read_annotations(A.CUHK_PEDES, root)
  assert 'entry 19:' in str(e.value) and 'entry 20:' not in str(e.value)
