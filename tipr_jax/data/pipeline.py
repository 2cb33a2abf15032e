"""Grain input pipelines over the prepared ArrayRecord datasets (see builders.py for the layout).

Training: one sample per caption; the caption indices are shuffled by `seed` (a different order
every epoch), each epoch is cut to whole global batches, and every process takes its own
`global_batch_size // process_count` rows of each global batch. Augmentation and masking use
Grain's per-example rng, which depends on the seed and the sample's global position only, so the
stream is deterministic and independent of the number of workers and processes. The returned
iterator is a `grain.DatasetIterator`: `get_state()/set_state()` and
`grain.checkpoint.CheckpointSave/CheckpointRestore` (Orbax) restore it exactly.

Evaluation: gallery images and query captions in file order; `batch_size` is the global batch,
each process gets `batch_size // process_count` rows, the last batch is padded (`valid=False`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tipr_jax.data import builders
from tipr_jax.data import masking as masking_lib
from tipr_jax.data import transforms

Batch = dict[str, np.ndarray]
MASKING_MODES = ('mlm', 'attribute', 'none')


# ----------------------------------------------------------------------------- dataset access


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  num_images: int
  num_captions: int
  num_identities: int


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Counts of a prepared dataset (from its TFDS metadata)."""
  name: str
  num_classes: int                  # train identities: pids are 0..num_classes-1
  splits: dict[str, SplitInfo]
  caption_counts: dict[str, np.ndarray]  # captions per record, record order

  @property
  def num_train_captions(self) -> int:
    return self.splits['train'].num_captions

  @property
  def num_train_images(self) -> int:
    return self.splits['train'].num_images


def _check_prepared(data_dir, dataset: str) -> None:
  if dataset not in builders.BUILDERS:
    raise ValueError(f'unknown dataset {dataset!r}; expected one of {sorted(builders.BUILDERS)}')
  info = epath.Path(data_dir) / dataset / builders.DATASET_VERSION / 'dataset_info.json'
  if not info.is_file():
    raise FileNotFoundError(
        f'{info} not found: prepare the dataset first with `python -m tipr_jax.data.prepare '
        f'--dataset={dataset} --manual_dir=... --data_dir={data_dir}`')


def dataset_info(*, data_dir: str | os.PathLike, dataset: str) -> DatasetInfo:
  """Reads the counts written by the builder."""
  _check_prepared(data_dir, dataset)
  builder = builders.BUILDERS[dataset](data_dir=os.fspath(data_dir))
  meta = builder.info.metadata
  if not meta or 'splits' not in meta:
    raise ValueError(f'{builder.data_dir}: metadata.json lacks the split counts written by '
                     'tipr_jax.data.builders; rebuild the dataset with tipr_jax.data.prepare')
  splits = {s: SplitInfo(m['num_images'], m['num_captions'], m['num_identities'])
            for s, m in meta['splits'].items()}
  counts = {s: np.asarray(m['caption_counts'], np.int64) for s, m in meta['splits'].items()}
  return DatasetInfo(name=dataset, num_classes=int(meta['num_classes']), splits=splits,
                     caption_counts=counts)


def steps_per_epoch(*, data_dir: str | os.PathLike, dataset: str, global_batch_size: int) -> int:
  """Full global batches per epoch (the remainder of each epoch's shuffle is dropped)."""
  return dataset_info(data_dir=data_dir, dataset=dataset).num_train_captions // global_batch_size


def data_source(*, data_dir: str | os.PathLike, dataset: str, split: str):
  """Random-access source of records; `image` stays encoded bytes (decoded by transforms.py)."""
  _check_prepared(data_dir, dataset)
  return tfds.data_source(dataset, split=split, data_dir=os.fspath(data_dir), download=False,
                          decoders={'image': tfds.decode.SkipDecoding()})


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- masking


class _Masker:
  """Caption -> (caption_ids, mlm_ids, mlm_labels), int32 [L] each."""

  def __init__(self, tokenizer, mode: str, prob: float, attribute_words):
    if mode not in MASKING_MODES:
      raise ValueError(f'masking={mode!r}; expected one of {MASKING_MODES}')
    self.tokenizer = tokenizer
    self.mode = mode
    self.prob = prob
    self.attribute_words = None
    if mode == 'attribute':
      if attribute_words is None:
        raise ValueError("masking='attribute' needs attribute_words (a file path or a word set)")
      if isinstance(attribute_words, (str, os.PathLike)):
        attribute_words = masking_lib.load_attribute_words(attribute_words)
      self.attribute_words = frozenset(attribute_words)

  def __call__(self, caption: str, rng: np.random.Generator):
    tok = self.tokenizer
    if self.mode == 'attribute':
      ids, word_ids, is_attr = masking_lib.encode_for_attribute_masking(tok, caption,
                                                                    self.attribute_words)
      mlm_ids, labels = masking_lib.attribute_mask(ids, word_ids, is_attr, rng, mask_id=tok.mask_id,
                                               prob=self.prob)
    else:
      ids = tok([caption])[0]
      if self.mode == 'none':
        ids = np.asarray(ids, np.int32)
        return ids, ids.copy(), np.zeros_like(ids)
      # Random replacement ids are drawn from 1..mask_id-1 (IRRA).
      mlm_ids, labels = masking_lib.mlm_mask(ids, rng, mask_id=tok.mask_id, prob=self.prob)
    return (np.asarray(ids, np.int32), np.asarray(mlm_ids, np.int32),
            np.asarray(labels, np.int32))


# ----------------------------------------------------------------------------- training


class _FetchCaption(grain.transforms.Map):
  """Caption index -> the record's encoded image, the caption and the ids."""

  def __init__(self, source, caption_counts: np.ndarray):
    self._source = source
    self._starts = np.concatenate([[0], np.cumsum(caption_counts)]).astype(np.int64)

  def map(self, k):
    r = int(np.searchsorted(self._starts, k, side='right')) - 1
    rec = self._source[r]
    return {'image': rec['image'], 'caption': _text(rec['captions'][int(k) - int(self._starts[r])]),
            'pid': np.int32(rec['pid']), 'image_id': np.int32(rec['image_id'])}


class _TrainTransform(grain.transforms.RandomMap):
  """Decode + augment the image, tokenize + mask the caption, with the example's rng."""

  def __init__(self, masker: _Masker, image_size: tuple[int, int], augment: bool):
    self._masker = masker
    self._size = tuple(image_size)
    self._augment = augment

  def random_map(self, element, rng: np.random.Generator):
    # Separate streams, so the masks do not depend on how many draws augmentation took.
    image_seed, text_seed = rng.integers(0, 2**63, size=2)
    image, box = transforms.train_transform(element['image'], np.random.default_rng(image_seed),
                                            self._size, augment=self._augment)
    ids, mlm_ids, labels = self._masker(element['caption'], np.random.default_rng(text_seed))
    return {'images': image, 'erase_boxes': box, 'caption_ids': ids, 'mlm_ids': mlm_ids, 'mlm_labels': labels,
            'pids': element['pid'], 'image_ids': element['image_id']}


def _derive_seeds(seed: int, n: int) -> list[int]:
  return [int(s) for s in np.random.SeedSequence(seed).generate_state(n)]


def _local_batch(global_batch_size: int, process_count: int, process_index: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  return global_batch_size // process_count


def train_dataset(*, data_dir, dataset: str, tokenizer, global_batch_size: int, seed: int,
                  image_size=(384, 128), augment: bool = True, masking: str = 'mlm',
                  mask_prob: float = 0.15, attribute_words=None, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
  """The training pipeline as a MapDataset of this process's batches (see module docstring)."""
  local = _local_batch(global_batch_size, process_count, process_index)
  info = dataset_info(data_dir=data_dir, dataset=dataset)
  if 'train' not in info.splits:
    raise ValueError(f'{dataset} in {data_dir} has no train split')
  n = info.num_train_captions
  steps = n // global_batch_size
  if steps == 0:
    raise ValueError(f'{dataset}: {n} train captions is less than one global batch '
                     f'({global_batch_size})')
  masker = _Masker(tokenizer, masking, mask_prob, attribute_words)
  shuffle_seed, map_seed = _derive_seeds(seed, 2)
  source = data_source(data_dir=data_dir, dataset=dataset, split='train')
  ds = grain.MapDataset.range(n).shuffle(seed=shuffle_seed)
  ds = ds[:steps * global_batch_size].repeat(num_epochs)  # reshuffled every epoch
  ds = ds.map(_FetchCaption(source, info.caption_counts['train']))
  ds = ds.random_map(_TrainTransform(masker, image_size, augment), seed=map_seed)
  ds = ds.batch(local, drop_remainder=True)
  return ds[process_index::process_count]  # rows [p*b, (p+1)*b) of every global batch


def make_train_iterator(*, data_dir, dataset: str, tokenizer, global_batch_size: int, seed: int,
                        image_size: tuple[int, int] = (384, 128), augment: bool = True,
                        masking: str = 'mlm', mask_prob: float = 0.15, attribute_words=None,
                        num_workers: int = 0, process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, read_threads: int = 2,
                        prefetch_batches: int = 2) -> grain.DatasetIterator:
  """Iterator of this process's training batches (dicts of numpy arrays, b = global // count):

  images uint8 [b,H,W,3] (resized, flipped, padded and cropped; the train step normalizes them
  on the device, tipr_jax.data.device_images), erase_boxes int32 [b,4] (each image's random-
  erasing box, top/left/height/width, zeros for none), caption_ids int32 [b,L] (unmasked), mlm_ids int32 [b,L],
  mlm_labels int32 [b,L] (0 = not masked), pids int32 [b], image_ids int32 [b].
  Ends after `num_epochs` epochs (None = never). With num_workers > 0 the batches are built in
  worker processes (Grain mp_prefetch); call `flags.FLAGS.mark_as_parsed()` outside absl.app.
  """
  ds = train_dataset(data_dir=data_dir, dataset=dataset, tokenizer=tokenizer,
                     global_batch_size=global_batch_size, seed=seed, image_size=image_size,
                     augment=augment, masking=masking, mask_prob=mask_prob,
                     attribute_words=attribute_words, process_index=process_index,
                     process_count=process_count, num_epochs=num_epochs)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=prefetch_batches))
  if num_workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=1))
  return iter(it_ds)


# ----------------------------------------------------------------------------- evaluation


class _GalleryItem(grain.transforms.Map):
  """Global gallery position -> test-transformed image (zeros and valid=False past the end)."""

  def __init__(self, source, num: int, image_size: tuple[int, int]):
    self._source = source
    self._num = num
    self._size = tuple(image_size)

  def map(self, pos):
    pos = int(pos)
    if pos >= self._num:
      return {'images': np.zeros((*self._size, 3), np.uint8), 'pids': np.int32(-1),
              'valid': np.bool_(False), 'index': np.int32(-1)}
    rec = self._source[pos]
    return {'images': transforms.test_transform(rec['image'], self._size),
            'pids': np.int32(rec['pid']), 'valid': np.bool_(True), 'index': np.int32(pos)}


@dataclasses.dataclass
class EvalData:
  """Evaluation split: ordered ids/paths/captions and per-process padded batches.

  Batches (dicts of numpy arrays, b = batch_size // process_count rows):
    gallery: images uint8 [b,H,W,3] (resized; normalized on the device), pids int32 [b],
             valid bool [b], index int32 [b]
    query:   caption_ids int32 [b,L], pids int32 [b], valid bool [b], index int32 [b]
  `index` is the item's position in file order (-1 for padding). Global batch s holds positions
  [s*batch_size, (s+1)*batch_size); process p has rows [p*b, (p+1)*b) of it.
  """
  gallery_pids: np.ndarray       # int32 [G], file order
  query_pids: np.ndarray         # int32 [Q], file order
  gallery_paths: list[str]       # relative to <DATASET>/imgs/
  query_captions: list[str]
  query_image_index: np.ndarray  # int32 [Q]: gallery position of the image each caption describes
  batch_size: int
  local_batch_size: int
  num_gallery_batches: int
  num_query_batches: int
  _gallery: Callable[[], Iterator[Batch]]
  _query_ids: np.ndarray
  _positions: Callable[[int, int], np.ndarray]
  _source: Any

  @property
  def num_gallery(self) -> int:
    return len(self.gallery_pids)

  @property
  def num_queries(self) -> int:
    return len(self.query_pids)

  def gallery_batches(self) -> Iterator[Batch]:
    return self._gallery()

  def query_batches(self) -> Iterator[Batch]:
    q = self.num_queries
    for s in range(self.num_query_batches):
      pos = self._positions(s, q)
      valid = pos < q
      safe = np.where(valid, pos, 0)
      ids = self._query_ids[safe] * valid[:, None]
      yield {'caption_ids': ids.astype(np.int32),
             'pids': np.where(valid, self.query_pids[safe], -1).astype(np.int32),
             'valid': valid, 'index': np.where(valid, pos, -1).astype(np.int32)}

  def gallery_image(self, i: int) -> np.ndarray:
    """The original gallery image i (file order) as uint8 [h, w, 3], e.g. for pictures."""
    return np.asarray(transforms.decode(self._source[int(i)]['image']))


def make_eval_data(*, data_dir, dataset: str, tokenizer, split: str = 'test', batch_size: int,
                   image_size: tuple[int, int] = (384, 128), process_index: int = 0,
                   process_count: int = 1, read_threads: int = 2) -> EvalData:
  """Gallery and query batches of `split` ('test' or 'val') for this process (see EvalData)."""
  if split not in ('test', 'val'):
    raise ValueError(f"split={split!r}; expected 'test' or 'val'")
  local = _local_batch(batch_size, process_count, process_index)
  info = dataset_info(data_dir=data_dir, dataset=dataset)
  if split not in info.splits:
    raise ValueError(f'{dataset} in {data_dir} has no {split!r} split '
                     f'(it has {sorted(info.splits)})')
  source = data_source(data_dir=data_dir, dataset=dataset, split=split)
  g = len(source)
  gallery_pids = np.empty(g, np.int32)
  paths, captions, query_pids, query_image = [], [], [], []
  for i in range(g):
    rec = source[i]
    gallery_pids[i] = rec['pid']
    paths.append(_text(rec['file_path']))
    for c in rec['captions']:
      captions.append(_text(c))
      query_pids.append(int(rec['pid']))
      query_image.append(i)
  query_ids = (np.asarray(tokenizer(captions), np.int32) if captions
               else np.zeros((0, getattr(tokenizer, 'context_length', 77)), np.int32))

  def positions(s: int, num: int) -> np.ndarray:
    del num
    return s * batch_size + process_index * local + np.arange(local)

  num_g_batches = -(-g // batch_size)
  num_q_batches = -(-len(captions) // batch_size)
  gallery_ds = (grain.MapDataset.range(num_g_batches * batch_size)
                .map(_GalleryItem(source, g, image_size))
                .batch(local)[process_index::process_count])

  def gallery() -> Iterator[Batch]:
    return iter(gallery_ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                             prefetch_buffer_size=2)))

  return EvalData(gallery_pids=gallery_pids, query_pids=np.asarray(query_pids, np.int32),
                  gallery_paths=paths, query_captions=captions,
                  query_image_index=np.asarray(query_image, np.int32), batch_size=batch_size,
                  local_batch_size=local, num_gallery_batches=num_g_batches,
                  num_query_batches=num_q_batches, _gallery=gallery, _query_ids=query_ids,
                  _positions=positions, _source=source)

