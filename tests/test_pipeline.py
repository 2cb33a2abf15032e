"""Grain pipelines: epochs, determinism, state restore (also via Orbax), process slices, masking
statistics, worker processes, and exact coverage of the evaluation data."""
import collections

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

import pedes_fixtures as fx
from tipr_jax.data import annotations as A
from tipr_jax.data import masking
from tipr_jax.data import pipeline as P
from tipr_jax.data import prepare
from tipr_jax.data import tokenizer as tokenizer_lib
from tipr_jax.data import transforms

SIZE = (64, 32)
ATTRIBUTES = frozenset('black white red blue green yellow shirt jacket pants shorts shoes'.split())


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('pipe')
  # 8 train ids x 2 images x 2 captions = 32 train captions; test 3 ids x 2 images; val 1 id.
  items = fx.entries(train_ids=8, eval_ids=3, val_ids=1, imgs_per_id=2, caps_per_img=2, seed=1)
  items[7]['captions'].append(fx.caption(np.random.default_rng(9), 40))  # a 3rd, long caption
  raw = fx.write(tmp / 'raw', A.CUHK_PEDES, items)
  prepare.prepare('cuhk_pedes', data_dir=tmp / 'tfds', manual_dir=raw, progress=False)
  vocab = tokenizer_lib.build_bpe_vocab([c for it in items for c in it['captions']], 60,
                                        tmp / 'bpe.txt.gz')
  tok = tokenizer_lib.Tokenizer.from_pretrained(vocab)
  train_caps = [(k, c) for k, it in enumerate(i for i in items if i['split'] == 'train')
                for c in it['captions']]
  return dict(data_dir=tmp / 'tfds', items=items, tok=tok, train_caps=train_caps)


def _iter(data, **kw):
  args = dict(data_dir=data['data_dir'], dataset='cuhk_pedes', tokenizer=data['tok'],
              global_batch_size=8, seed=0, image_size=SIZE)
  args.update(kw)
  return P.make_train_iterator(**args)


def _keys(batch):
  """Identity of each row: (image_id, caption token bytes)."""
  return [(int(i), c.tobytes()) for i, c in zip(batch['image_ids'], batch['caption_ids'])]


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_batch_layout(data):
  b = next(_iter(data))
  assert b['images'].shape == (8, *SIZE, 3) and b['images'].dtype == np.uint8
  assert b['erase_boxes'].shape == (8, 4) and b['erase_boxes'].dtype == np.int32
  top, left, h, w = b['erase_boxes'].T
  assert ((top >= 0) & (left >= 0) & (top + h <= SIZE[0]) & (left + w <= SIZE[1])).all()
  for k in ('caption_ids', 'mlm_ids', 'mlm_labels'):
    assert b[k].shape == (8, data['tok'].context_length) and b[k].dtype == np.int32
  assert b['pids'].dtype == np.int32 and b['image_ids'].dtype == np.int32
  # The fixture's train image k has CUHK id k // 2 + 1, so pid = k // 2.
  np.testing.assert_array_equal(b['pids'], b['image_ids'] // 2)
  by_image = collections.defaultdict(set)
  for k, c in data['train_caps']:
    by_image[k].add(data['tok']([c])[0].tobytes())
  for image_id, ids in _keys(b):
    assert ids in by_image[image_id]


def test_epochs_are_reshuffled_permutations(data):
  all_keys = sorted((k, data['tok']([c])[0].tobytes()) for k, c in data['train_caps'])
  n = len(all_keys)  # 33
  assert P.steps_per_epoch(data_dir=data['data_dir'], dataset='cuhk_pedes',
                           global_batch_size=8) == n // 8
  batches = list(_iter(data, num_epochs=2))
  assert len(batches) == 2 * (n // 8)
  epochs = [sum((_keys(b) for b in batches[e * 4:(e + 1) * 4]), []) for e in range(2)]
  for ep in epochs:
    assert len(set(ep)) == 32 and set(ep) <= set(all_keys)  # no repeats; remainder dropped
  assert epochs[0] != epochs[1]
  other = sum((_keys(next(it)) for it in [_iter(data, seed=1)] for _ in range(4)), [])
  assert other != epochs[0]


def test_deterministic_and_restorable(data, tmp_path):
  it = _iter(data)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]  # crosses the epoch boundary (4 steps per epoch)
  again = _iter(data)
  again.set_state(state)
  for w in want:
    _equal(next(again), w)
  fresh = _iter(data)
  _equal(next(fresh), next(_iter(data)))

  # Orbax, through grain.checkpoint.CheckpointSave / CheckpointRestore.
  it = _iter(data)
  for _ in range(5):
    next(it)
  mngr = ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  want = next(it)
  restored = _iter(data)
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  _equal(next(restored), want)
  mngr.close()


def test_two_processes_read_the_halves_of_each_global_batch(data):
  whole = _iter(data)
  parts = [_iter(data, process_index=p, process_count=2) for p in range(2)]
  for _ in range(5):
    g = next(whole)
    halves = [next(p) for p in parts]
    assert halves[0]['images'].shape[0] == 4
    assert not set(_keys(halves[0])) & set(_keys(halves[1]))
    for k in g:  # exactly rows [0:4] and [4:8], augmentation and masks included
      np.testing.assert_array_equal(np.concatenate([halves[0][k], halves[1][k]]), g[k])
  with pytest.raises(ValueError, match='multiple of process_count'):
    _iter(data, global_batch_size=7, process_count=2)


def test_mlm_masking_statistics(data):
  tok = data['tok']
  batches = list(_iter(data, num_epochs=6, augment=False))
  ids = np.concatenate([b['caption_ids'] for b in batches])
  mlm = np.concatenate([b['mlm_ids'] for b in batches])
  lab = np.concatenate([b['mlm_labels'] for b in batches])
  cand = (ids > 0) & (ids < tok.mask_id)
  sel = lab != 0
  assert not (sel & ~cand).any()  # SOT / EOT / padding never selected
  np.testing.assert_array_equal(lab[sel], ids[sel])
  np.testing.assert_array_equal(mlm[~sel], ids[~sel])
  assert sel.any(axis=1).all()  # every caption has a target (IRRA's fallback)
  rate = sel.sum() / cand.sum()
  assert 0.12 < rate < 0.21, rate
  masked = (mlm[sel] == tok.mask_id).mean()
  kept = (mlm[sel] == ids[sel]).mean()
  assert 0.72 < masked < 0.88 and 0.04 < kept < 0.17, (masked, kept)
  # The images do not influence the masks: augmentation on gives the same tokens.
  aug = list(_iter(data, num_epochs=1))
  for a, b in zip(aug, batches):
    np.testing.assert_array_equal(a['mlm_ids'], b['mlm_ids'])


def test_attribute_and_no_masking(data):
  tok = data['tok']
  none = next(_iter(data, masking='none'))
  np.testing.assert_array_equal(none['mlm_ids'], none['caption_ids'])
  assert not none['mlm_labels'].any()
  by_ids = {tok([c])[0].tobytes(): c for _, c in data['train_caps']}
  n_sel = 0
  for b in list(_iter(data, masking='attribute', attribute_words=ATTRIBUTES, num_epochs=2)):
    for ids, lab in zip(b['caption_ids'], b['mlm_labels']):
      _, word_ids, words = masking.encode_with_words(tok, by_ids[ids.tobytes()])
      for pos in np.flatnonzero(lab):
        assert words[word_ids[pos]] in ATTRIBUTES
        n_sel += 1
  assert n_sel > 0
  with pytest.raises(ValueError, match='attribute_words'):
    _iter(data, masking='attribute')


def test_worker_processes_give_the_same_stream(data):
  flags.FLAGS.mark_as_parsed()
  ref = _iter(data)
  want = [next(ref) for _ in range(4)]
  it = _iter(data, num_workers=2)
  try:
    for w in want[:2]:
      _equal(next(it), w)
    state = it.get_state()
    for w in want[2:]:
      _equal(next(it), w)
    it.set_state(state)  # rewinds the workers
    _equal(next(it), want[2])
  finally:
    it.close()


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_everything_once(data, process_count):
  tok = data['tok']
  test_items = [it for it in data['items'] if it['split'] == 'test']
  parts = [P.make_eval_data(data_dir=data['data_dir'], dataset='cuhk_pedes', tokenizer=tok,
                            split='test', batch_size=4, image_size=SIZE, process_index=p,
                            process_count=process_count) for p in range(process_count)]
  ev = parts[0]
  np.testing.assert_array_equal(ev.gallery_pids, [it['id'] for it in test_items])
  assert ev.gallery_paths == [it['file_path'] for it in test_items]
  assert ev.query_captions == [c for it in test_items for c in it['captions']]
  np.testing.assert_array_equal(ev.query_pids,
                                [it['id'] for it in test_items for _ in it['captions']])
  assert ev.num_gallery == 6 and ev.num_queries == 12 and ev.num_gallery_batches == 2
  seen_g, seen_q = [], []
  for part in parts:
    gb = list(part.gallery_batches())
    qb = list(part.query_batches())
    assert len(gb) == part.num_gallery_batches and len(qb) == part.num_query_batches
    for b in gb:
      assert b['images'].shape == (4 // process_count, *SIZE, 3)
      assert not b['images'][~b['valid']].any()
      for img, pid, idx in zip(b['images'][b['valid']], b['pids'][b['valid']],
                               b['index'][b['valid']]):
        assert pid == ev.gallery_pids[idx]
        raw = data['data_dir'].parent / 'raw' / 'CUHK-PEDES' / 'imgs' / ev.gallery_paths[idx]
        np.testing.assert_array_equal(img, transforms.test_transform(raw.read_bytes(), SIZE))
        seen_g.append(int(idx))
    for b in qb:
      v = b['valid']
      np.testing.assert_array_equal(b['caption_ids'][v],
                                    tok([ev.query_captions[i] for i in b['index'][v]]))
      np.testing.assert_array_equal(b['pids'][v], ev.query_pids[b['index'][v]])
      assert not b['caption_ids'][~v].any()
      seen_q += b['index'][v].tolist()
  assert sorted(seen_g) == list(range(6))
  assert sorted(seen_q) == list(range(12))
  np.testing.assert_array_equal(ev.gallery_image(0).shape, (64, 32, 3))


def test_eval_errors(data):
  with pytest.raises(ValueError, match="expected 'test' or 'val'"):
    P.make_eval_data(data_dir=data['data_dir'], dataset='cuhk_pedes', tokenizer=data['tok'],
                     split='train', batch_size=4)
  with pytest.raises(FileNotFoundError, match='prepare the dataset first'):
    P.make_eval_data(data_dir=data['data_dir'], dataset='rstpreid', tokenizer=data['tok'],
                     batch_size=4)
