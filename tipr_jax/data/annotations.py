"""Annotation readers for CUHK-PEDES, ICFG-PEDES and RSTPReid.

The rules are those of the IRRA reference (`datasets/{cuhkpedes,icfgpedes,rstpreid}.py`):

* Each annotation file is a JSON list of objects with the fields `id` (int), `split` (str),
  `captions` (list of str) and an image-path field (`file_path` for CUHK-PEDES and ICFG-PEDES,
  `img_path` for RSTPReid), relative to `<DATASET>/imgs/`. Other fields (e.g. CUHK-PEDES'
  `processed_tokens`) are ignored.
* `split == 'train'` -> train, `'test'` -> test, any other value -> val.
* Identity: CUHK-PEDES train pid = id - 1 (its ids are 1-based); every other case keeps the raw id.
  Train pids must then be exactly 0..N-1.
* Train: one sample per (image, caption), `image_id` = running index of the image within the train
  split. Test/val: gallery = images in file order, queries = captions in file order.

Malformed input raises one `ValueError` naming the file, the entry index, the field and what was
expected.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Sequence

SPLITS = ('train', 'test', 'val')
MAX_LISTED_ENTRIES = 20  # malformed entries shown in full in one error message


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a dataset's annotation file and images live under the dataset root."""
  name: str             # directory under the root, e.g. 'CUHK-PEDES'
  annotation_file: str  # JSON file inside that directory
  path_field: str       # name of the image-path field of each entry
  train_pid_offset: int  # added to the raw id for the train split (CUHK: -1)

  def dataset_dir(self, root: str | pathlib.Path) -> pathlib.Path:
    """The dataset directory: `root/<name>`, or `root` itself if it already is that directory."""
    root = pathlib.Path(root)
    if (root / self.name / self.annotation_file).exists() or not (root / self.annotation_file).exists():
      return root / self.name
    return root

  def annotation_path(self, root: str | pathlib.Path) -> pathlib.Path:
    return self.dataset_dir(root) / self.annotation_file

  def image_dir(self, root: str | pathlib.Path) -> pathlib.Path:
    return self.dataset_dir(root) / 'imgs'


CUHK_PEDES = Layout('CUHK-PEDES', 'reid_raw.json', 'file_path', train_pid_offset=-1)
# The ICFG-PEDES README names the file ICFG_PEDES.json; the reference code reads ICFG-PEDES.json.
ICFG_PEDES = Layout('ICFG-PEDES', 'ICFG-PEDES.json', 'file_path', train_pid_offset=0)
RSTPREID = Layout('RSTPReid', 'data_captions.json', 'img_path', train_pid_offset=0)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One annotated image."""
  index: int                # position in the JSON list
  split: str                # 'train' | 'test' | 'val' (normalised)
  raw_id: int               # `id` as written in the file
  pid: int                  # identity after the split's id rule
  image_path: str           # relative to `<DATASET>/imgs/`, as written in the file
  captions: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TrainSample:
  pid: int
  image_id: int
  image_path: str
  caption: str


@dataclasses.dataclass(frozen=True)
class TrainSet:
  samples: list[TrainSample]  # one per caption, file order
  num_images: int
  num_classes: int            # number of train identities (pids are 0..num_classes-1)


@dataclasses.dataclass(frozen=True)
class EvalSet:
  image_paths: list[str]      # gallery, file order
  image_pids: list[int]
  captions: list[str]         # queries, file order
  caption_pids: list[int]


@dataclasses.dataclass(frozen=True)
class MalformedEntry:
  """An annotation entry that fails validation: its index, split (or 'unknown') and the error."""
  index: int
  split: str
  reason: str      # the full message, naming the file, the entry and the field


@dataclasses.dataclass(frozen=True)
class Annotations:
  layout: Layout
  path: pathlib.Path          # the annotation file
  entries: list[Entry]
  malformed: list[MalformedEntry] = dataclasses.field(default_factory=list)  # left out (skip_bad)

  def split(self, name: str) -> list[Entry]:
    if name not in SPLITS:
      raise ValueError(f'unknown split {name!r}; expected one of {SPLITS}')
    return [e for e in self.entries if e.split == name]


def normalise_split(value: str) -> str:
  """Reference rule: 'train' -> train, 'test' -> test, anything else -> val."""
  return value if value in ('train', 'test') else 'val'


def _field_error(path, index, field, expected, value) -> ValueError:
  shown = repr(value)
  if len(shown) > 80:
    shown = shown[:77] + '...'
  return ValueError(f'{path}: entry {index}: field {field!r}: expected {expected}, '
                    f'got {type(value).__name__} {shown}')


def _parse_id(path, index, value) -> int:
  # The reference applies int(); the published files store JSON integers. Accept integers and
  # decimal-digit strings (int() of those is exact); reject bools, floats and anything else.
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise _field_error(path, index, 'id', 'an integer', value)
  if isinstance(value, str):
    text = value.strip()
    if not (text.isascii() and text.lstrip('-').isdigit()):
      raise _field_error(path, index, 'id', 'an integer', value)
    return int(text)
  return value


def _parse_entry(item: object, i: int, layout: Layout, path) -> Entry:
  """One annotation object -> Entry (id rule applied); ValueError naming the entry and field."""
  if not isinstance(item, dict):
    raise ValueError(f'{path}: entry {i}: expected a JSON object, got {type(item).__name__}')
  for field in ('id', 'split', layout.path_field, 'captions'):
    if field not in item:
      raise ValueError(f'{path}: entry {i}: missing field {field!r} (expected the fields '
                       f"'id', 'split', {layout.path_field!r}, 'captions')")
  raw_id = _parse_id(path, i, item['id'])
  split = item['split']
  if not isinstance(split, str):
    raise _field_error(path, i, 'split', 'a string', split)
  image_path = item[layout.path_field]
  if not isinstance(image_path, str) or not image_path:
    raise _field_error(path, i, layout.path_field, 'a non-empty string (image path)', image_path)
  captions = item['captions']
  if not isinstance(captions, list):
    raise _field_error(path, i, 'captions', 'a list of strings', captions)
  for j, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise _field_error(path, i, f'captions[{j}]', 'a string', caption)
  split = normalise_split(split)
  pid = raw_id + layout.train_pid_offset if split == 'train' else raw_id
  return Entry(index=i, split=split, raw_id=raw_id, pid=pid, image_path=image_path,
               captions=tuple(captions))


def _entry_split(item: object) -> str:
  """The split of a (possibly malformed) entry for reports: train/test/val, or 'unknown'."""
  split = item.get('split') if isinstance(item, dict) else None
  return normalise_split(split) if isinstance(split, str) else 'unknown'


def parse_entries(raw: object, layout: Layout, path: str | pathlib.Path, *,
                  skip_bad: bool = False) -> tuple[list[Entry], list[MalformedEntry]]:
  """Validates a decoded annotation list and applies the id rules. `path` is used in messages.

  Every entry is checked. Malformed ones make one ValueError that lists the first
  MAX_LISTED_ENTRIES and the count, unless `skip_bad`: then they are left out and returned as
  the second element (empty otherwise).
  """
  if not isinstance(raw, list):
    raise ValueError(f'{path}: expected a JSON list of objects at the top level, '
                     f'got {type(raw).__name__}')
  entries, bad = [], []
  for i, item in enumerate(raw):
    try:
      entries.append(_parse_entry(item, i, layout, path))
    except ValueError as e:
      bad.append(MalformedEntry(i, _entry_split(item), str(e)))
  if bad and not skip_bad:
    raise ValueError(format_malformed(bad, path))
  return entries, bad


def format_malformed(bad: Sequence[MalformedEntry], path) -> str:
  """One message for all malformed entries: the first few in full, then the count."""
  if len(bad) == 1:
    return (f'{bad[0].reason}\n(1 malformed entry; `tipr_jax.data.prepare --skip_bad` leaves '
            'malformed entries out and lists them in prepare_report.json)')
  shown = bad[:MAX_LISTED_ENTRIES]
  head = f'{path}: {len(bad)} malformed entries' + (
      f' (first {len(shown)}):' if len(bad) > len(shown) else ':')
  return '\n'.join([head] + [f'  {b.reason}' for b in shown] + [
      '`tipr_jax.data.prepare --skip_bad` leaves malformed entries out and lists them in '
      'prepare_report.json.'])


def read_annotations(layout: Layout, root: str | pathlib.Path, *,
                     skip_bad: bool = False) -> Annotations:
  """Reads and validates `root/<DATASET>/<annotation file>` (malformed entries: `parse_entries`)."""
  path = layout.annotation_path(root)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: annotation file not found; expected the layout '
                            f'<root>/{layout.name}/{layout.annotation_file} with images under '
                            f'<root>/{layout.name}/imgs/')
  try:
    raw = json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}') from None
  except UnicodeDecodeError as e:
    raise ValueError(f'{path}: not UTF-8 text ({e})') from None
  entries, malformed = parse_entries(raw, layout, path, skip_bad=skip_bad)
  check_train_pids([e.pid for e in entries if e.split == 'train'], source=path, layout=layout)
  return Annotations(layout=layout, path=path, entries=entries, malformed=malformed)


def check_train_pids(pids: Sequence[int], *, source, layout: Layout) -> int:
  """Checks the train pids are exactly 0..N-1 and returns N (the number of classes)."""
  distinct = sorted(set(pids))
  n = len(distinct)
  if distinct and (distinct[0] != 0 or distinct[-1] != n - 1):
    missing = next((k for k, p in enumerate(distinct) if k != p), None)
    rule = 'id - 1' if layout.train_pid_offset == -1 else 'id'
    raise ValueError(
        f'{source}: train identities must be exactly 0..N-1 after the id rule (pid = {rule}); '
        f'got {n} distinct pids from {distinct[0]} to {distinct[-1]}'
        + (f', first gap at {missing}' if missing is not None else ''))
  return n


def train_set(entries: Sequence[Entry]) -> TrainSet:
  """One sample per caption of the train entries, `image_id` counting train images in order."""
  samples = []
  pids = set()
  for image_id, entry in enumerate(entries):
    pids.add(entry.pid)
    for caption in entry.captions:
      samples.append(TrainSample(entry.pid, image_id, entry.image_path, caption))
  return TrainSet(samples=samples, num_images=len(entries), num_classes=len(pids))


def eval_set(entries: Sequence[Entry]) -> EvalSet:
  """Gallery (every image) and queries (every caption), both in file order."""
  image_paths, image_pids, captions, caption_pids = [], [], [], []
  for entry in entries:
    image_paths.append(entry.image_path)
    image_pids.append(entry.pid)
    for caption in entry.captions:
      captions.append(caption)
      caption_pids.append(entry.pid)
  return EvalSet(image_paths, image_pids, captions, caption_pids)


def drop_empty_captions(entries: Sequence[Entry]) -> tuple[list[Entry], int]:
  """Removes captions that are empty or whitespace only; returns the entries and the count."""
  out, dropped = [], 0
  for entry in entries:
    kept = tuple(c for c in entry.captions if c.strip())
    dropped += len(entry.captions) - len(kept)
    out.append(dataclasses.replace(entry, captions=kept) if len(kept) != len(entry.captions)
               else entry)
  return out, dropped
