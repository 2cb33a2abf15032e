"""TFDS builders (ArrayRecord, no TensorFlow) for CUHK-PEDES, ICFG-PEDES, RSTPReid and synthetic data.

Record layout: one record per image, splits 'train', 'test', 'val' (a split with no entries, e.g.
ICFG-PEDES' val, is not written), records in annotation-file order (`disable_shuffling=True`):

  image        tfds Image: the original encoded JPEG/PNG bytes (unchanged unless `max_side` is set)
  image_id     int32  position of the image within its split (IRRA's train `image_id`)
  pid          int32  identity after the reference's id rule (CUHK train: id - 1, else raw id)
  raw_id       int32  `id` as written in the annotation file
  entry_index  int32  position of the entry in the annotation file
  file_path    text   image path relative to <DATASET>/imgs/, as written in the file
  captions     Sequence(text)  the entry's non-empty captions, in file order

`info.metadata` holds, per split, `caption_counts` (captions per record, in record order),
`num_images`, `num_captions`, `num_identities`, plus `num_classes` (train identities),
`dropped_empty_captions`, `num_skipped` and `image_max_side`.

Every referenced image is checked (exists, fully decodes with PIL, convertible to RGB) before any
record is written. Bad inputs fail the build with a `BadInputsError` listing the first problems,
unless `skip_bad=True`, in which case the affected entries are left out and listed in
`builder.report`. Empty captions are dropped and counted.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import os
import pathlib
import shutil
from typing import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from PIL import ImageFile

from tipr_jax.data import annotations
from tipr_jax.data import synthetic

DATASET_VERSION = '1.0.0'
MAX_LISTED_PROBLEMS = 20


class BadInputsError(ValueError):
  """Some referenced images are missing or undecodable (or the annotation is unusable)."""

  def __init__(self, message: str, problems: Sequence['Problem']):
    super().__init__(message)
    self.problems = list(problems)


@dataclasses.dataclass(frozen=True)
class Problem:
  entry_index: int
  split: str
  file: str      # absolute image path (the annotation file for a malformed entry)
  reason: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def check_image(path: pathlib.Path) -> str | None:
  """Returns None if `path` exists and fully decodes to an RGB-convertible image, else the reason."""
  if not path.is_file():
    return 'file not found'
  if ImageFile.LOAD_TRUNCATED_IMAGES:
    raise RuntimeError('PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set: truncated images would pass')
  try:
    with Image.open(path) as img:
      img.load()  # full decode: raises on truncated data
      if img.width < 1 or img.height < 1:
        return f'empty image ({img.width}x{img.height})'
      img.convert('RGB')
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
    return f'cannot decode: {type(e).__name__}: {e}'
  return None


def check_images(entries: Sequence[annotations.Entry], image_dir: pathlib.Path, *,
                 num_threads: int = 4, progress: bool = True) -> list[Problem]:
  """Checks every entry's image (in parallel threads); returns the problems in entry order."""
  paths = [image_dir / e.image_path for e in entries]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    results = pool.map(check_image, paths, chunksize=64)
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      results = tqdm.tqdm(results, total=len(paths), desc='checking images', unit='img')
    reasons = list(results)
  return [Problem(e.index, e.split, str(p), r)
          for e, p, r in zip(entries, paths, reasons) if r is not None]


def format_problems(problems: Sequence[Problem], source) -> str:
  shown = problems[:MAX_LISTED_PROBLEMS]
  lines = [f'{len(problems)} bad input(s) referenced by {source}'
           + (f' (first {len(shown)}):' if len(problems) > len(shown) else ':')]
  lines += [f'  entry {p.entry_index} ({p.split}) {p.file}: {p.reason}' for p in shown]
  lines.append('Nothing was written. Fix the inputs, or re-run with --skip_bad to leave these '
               'entries out (they are then listed in prepare_report.json).')
  return '\n'.join(lines)


def _shrink(data: bytes, max_side: int) -> bytes:
  """Re-encodes the image so that its longer side is at most `max_side` (JPEG q=95)."""
  with Image.open(io.BytesIO(data)) as img:
    if max(img.size) <= max_side:
      return data
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    out = io.BytesIO()
    img.convert('RGB').resize(size, Image.BILINEAR).save(out, 'JPEG', quality=95)
    return out.getvalue()


def _instructions(layout: annotations.Layout) -> str:
  return (f'Place the dataset so that <manual_dir>/{layout.name}/{layout.annotation_file} exists '
          f'and its images are under <manual_dir>/{layout.name}/imgs/ (see docs/data.md).')


class _PedesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared builder: subclasses set LAYOUT."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: 'One record per image; original image bytes; file order kept.'}
  LAYOUT: annotations.Layout

  # TFDS derives this from the package via importlib_resources (not a dependency here); it is
  # only used to look for a checksums file next to the code, which these manual builders lack.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)

  def __init__(self, *, skip_bad: bool = False, check_threads: int = 4,
               max_side: int | None = None, progress: bool = True, **kwargs):
    self._skip_bad = skip_bad
    self._check_threads = check_threads
    self._max_side = max_side
    self._progress = progress
    self.report: dict = {}
    self.source_root: pathlib.Path | None = None  # the layout root read (set while building)
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{self.LAYOUT.name} text-to-image person retrieval, one record per image.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'image_id': np.int32,
            'pid': np.int32,
            'raw_id': np.int32,
            'entry_index': np.int32,
            'file_path': tfds.features.Text(),
            'captions': tfds.features.Sequence(tfds.features.Text()),
        }),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _source_root(self, dl_manager) -> pathlib.Path:
    return pathlib.Path(dl_manager.manual_dir)

  def _split_generators(self, dl_manager):
    root = self._source_root(dl_manager)
    self.source_root = root
    ann = annotations.read_annotations(self.LAYOUT, root, skip_bad=self._skip_bad)
    image_dir = self.LAYOUT.image_dir(root)
    num_classes = len({e.pid for e in ann.entries if e.split == 'train'})
    problems = check_images(ann.entries, image_dir, num_threads=self._check_threads,
                            progress=self._progress)
    if problems and not self._skip_bad:
      raise BadInputsError(format_problems(problems, ann.path), problems)
    bad = {p.entry_index for p in problems}
    problems = sorted(problems + [Problem(m.index, m.split, str(ann.path), m.reason)
                                  for m in ann.malformed], key=lambda p: p.entry_index)
    kept = [e for e in ann.entries if e.index not in bad]
    kept, dropped_total = annotations.drop_empty_captions(kept)
    by_split = {s: [e for e in kept if e.split == s] for s in annotations.SPLITS}
    dropped = {s: sum(len(e.captions) for e in ann.entries if e.split == s and e.index not in bad)
               - sum(len(e.captions) for e in by_split[s]) for s in annotations.SPLITS}
    assert sum(dropped.values()) == dropped_total
    meta = self.info.metadata
    meta['num_classes'] = num_classes
    meta['source'] = {'dataset': self.LAYOUT.name, 'annotation_file': str(ann.path),
                      'image_dir': str(image_dir)}
    meta['dropped_empty_captions'] = dropped
    meta['num_skipped'] = len(problems)
    meta['image_max_side'] = self._max_side
    meta['splits'] = {}
    for s, entries in by_split.items():
      if entries:
        meta['splits'][s] = {
            'num_images': len(entries),
            'num_captions': sum(len(e.captions) for e in entries),
            'num_identities': len({e.pid for e in entries}),
            'caption_counts': [len(e.captions) for e in entries],
        }
    self.report = {
        'dataset': self.name, 'annotation_file': str(ann.path), 'image_dir': str(image_dir),
        'num_entries': len(ann.entries) + len(ann.malformed), 'num_skipped': len(problems),
        'skipped': [p.as_dict() for p in problems],
        'dropped_empty_captions': dropped,
        'splits': {s: {k: v for k, v in m.items() if k != 'caption_counts'}
                   for s, m in meta['splits'].items()},
        'num_classes': num_classes,
    }
    return {s: self._generate_examples(entries, image_dir)
            for s, entries in by_split.items() if entries}

  def _generate_examples(self, entries: Sequence[annotations.Entry],
                         image_dir: pathlib.Path) -> Iterator[tuple[int, dict]]:
    for image_id, e in enumerate(entries):
      data = (image_dir / e.image_path).read_bytes()
      if self._max_side:
        data = _shrink(data, self._max_side)
      yield image_id, {
          'image': data,
          'image_id': image_id,
          'pid': e.pid,
          'raw_id': e.raw_id,
          'entry_index': e.index,
          'file_path': e.image_path,
          'captions': list(e.captions),
      }


class CuhkPedes(_PedesBuilder):
  """CUHK-PEDES: <manual_dir>/CUHK-PEDES/reid_raw.json + imgs/."""
  LAYOUT = annotations.CUHK_PEDES
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(annotations.CUHK_PEDES)


class IcfgPedes(_PedesBuilder):
  """ICFG-PEDES: <manual_dir>/ICFG-PEDES/ICFG-PEDES.json + imgs/."""
  LAYOUT = annotations.ICFG_PEDES
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(annotations.ICFG_PEDES)


class Rstpreid(_PedesBuilder):
  """RSTPReid: <manual_dir>/RSTPReid/data_captions.json + imgs/."""
  LAYOUT = annotations.RSTPREID
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(annotations.RSTPREID)


class Synthetic(_PedesBuilder):
  """Synthetic data in the CUHK-PEDES layout.

  Uses <manual_dir> if given (it must hold a CUHK-PEDES layout: `prepare` checks), otherwise
  generates one with `tipr_jax.data.synthetic.generate(..., identities, seed, layout='cuhk')` in
  the download dir. `copy_side_files` then keeps the generator's vocabulary, attribute words,
  per-image attributes and manifest beside the records.
  """
  SIDE_FILES = (synthetic.MANIFEST, synthetic.ATTRIBUTES_FILE, synthetic.ATTRIBUTE_WORDS_FILE,
                synthetic.BPE_FILE)
  LAYOUT = annotations.CUHK_PEDES
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(annotations.CUHK_PEDES)

  def __init__(self, *, identities: int = 64, seed: int = 0, **kwargs):
    self._identities = identities
    self._seed = seed
    super().__init__(**kwargs)

  def _source_root(self, dl_manager) -> pathlib.Path:
    try:
      root = pathlib.Path(dl_manager.manual_dir)
      if self.LAYOUT.annotation_path(root).is_file():
        return root
    except AssertionError:  # no or empty manual dir: generate
      pass
    out = pathlib.Path(dl_manager.download_dir) / f'synthetic_{self._identities}_{self._seed}'
    path = pathlib.Path(synthetic.generate(os.fspath(out), identities=self._identities,
                                           seed=self._seed, layout='cuhk'))
    for cand in (path, path.parent, out):
      if self.LAYOUT.annotation_path(cand).is_file():
        return cand
    raise FileNotFoundError(f'synthetic.generate wrote no {self.LAYOUT.annotation_file} under {out}')

  def copy_side_files(self, dest: pathlib.Path) -> list[str]:
    """Copies the generator's side files found beside the annotation into `dest`; their names."""
    src = self.LAYOUT.annotation_path(self.source_root).parent
    copied = []
    for name in self.SIDE_FILES:
      if (src / name).is_file():
        shutil.copyfile(src / name, dest / name)
        copied.append(name)
    return copied


BUILDERS: dict[str, type[_PedesBuilder]] = {
    'cuhk_pedes': CuhkPedes,
    'icfg_pedes': IcfgPedes,
    'rstpreid': Rstpreid,
    'synthetic': Synthetic,
}
