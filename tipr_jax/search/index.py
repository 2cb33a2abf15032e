"""A gallery embedding index: build it from a folder or a prepared dataset, write it atomically, load it.

An index is a directory:
  embeddings.npy  float16 [G, D]  L2-normalized image embeddings, gallery order
  names.txt       the G file names, one per line (UTF-8)
  identities.json the G identities (ints or strings), when known
  meta.json       format, model fingerprint, checkpoint, training config, source, skipped files
  queries.json    (prepared datasets only) the split's captions and their identities, so that a
                  query equal to one of them knows its identity

It is written to a temporary directory next to the destination and renamed into place, so a
failed or interrupted run never leaves a partial index (an existing index is replaced only when the
new one is complete; a destination that is not an index is never overwritten).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from tipr_jax.data import builders, pipeline, transforms
from tipr_jax.eval import evaluate as evaluate_lib

FORMAT = "tipr_jax.search.index/1"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff",
                              ".ppm", ".pgm"})
IDENTITY_MODES = ("none", "dir")  # folder galleries: no identities, or the parent directory's name


class IndexMismatchError(ValueError):
  """The index was written by a different model or checkpoint than the one given."""


# ----------------------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class PreparedSplit:
  data_dir: str
  dataset: str
  split: str


def find_prepared(path: str, split: str = "test") -> PreparedSplit | None:
  """The prepared dataset at `path` (its data_dir, <data_dir>/<dataset> or the version dir), or None."""
  p = pathlib.Path(path).resolve()
  version = builders.DATASET_VERSION
  found = []
  if (p / "dataset_info.json").is_file():
    found.append((p.parent.parent, p.parent.name))
  elif (p / version / "dataset_info.json").is_file():
    found.append((p.parent, p.name))
  elif p.is_dir():
    found = [(p, name) for name in sorted(builders.BUILDERS)
             if (p / name / version / "dataset_info.json").is_file()]
  if not found:
    return None
  if len(found) > 1:
    raise ValueError(f"{path} holds several prepared datasets ({', '.join(n for _, n in found)}); "
                     f"pass one of {', '.join(str(d / n) for d, n in found)}")
  data_dir, name = found[0]
  if name not in builders.BUILDERS:
    raise ValueError(f"{path}: {name!r} is not a known dataset ({sorted(builders.BUILDERS)})")
  return PreparedSplit(data_dir=str(data_dir), dataset=name, split=split)


def list_images(folder: str) -> list[str]:
  """Image files under `folder` (recursive, hidden entries skipped): sorted relative POSIX paths."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise FileNotFoundError(f"gallery folder {folder} does not exist or is not a directory")
  names = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    for f in filenames:
      if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
        names.append(pathlib.Path(dirpath, f).relative_to(root).as_posix())
  return sorted(names)


def _load(root: str, name: str, size: tuple[int, int]) -> np.ndarray | str:
  """The test-transformed image, or the reason it cannot be read."""
  try:
    with Image.open(os.path.join(root, name)) as img:
      img.load()
      rgb = img.convert("RGB")
    return transforms.test_transform(rgb, size)
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure skips the file)
    return f"{type(e).__name__}: {e}"


def _folder_batches(root: str, names: Sequence[str], size: tuple[int, int], batch: int,
                    kept: list[str], skipped: list[dict], progress: Callable[[int], None],
                    threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Batches {images [batch,H,W,3], valid [batch]} of the readable images, in `names` order.

  Appends each encoded name to `kept` and each unreadable one ({file, reason}) to `skipped`.
  Images of the next window are decoded while the current batch is encoded.
  """
  buf: list[np.ndarray] = []

  def emit(n: int) -> dict[str, np.ndarray]:
    images = np.zeros((batch, *size, 3), np.uint8)
    images[:n] = np.stack(buf[:n])
    del buf[:n]
    return {"images": images, "valid": np.arange(batch) < n}

  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    windows = [names[lo:lo + batch] for lo in range(0, len(names), batch)]
    pending = [pool.submit(_load, root, n, size) for n in windows[0]] if windows else []
    for w, window in enumerate(windows):
      current = pending
      pending = ([pool.submit(_load, root, n, size) for n in windows[w + 1]]
                 if w + 1 < len(windows) else [])
      for name, fut in zip(window, current):
        res = fut.result()
        if isinstance(res, str):
          skipped.append({"file": name, "reason": res})
        else:
          kept.append(name)
          buf.append(res)
      progress(len(window))
      while len(buf) >= batch:
        yield emit(batch)
  if buf:
    yield emit(len(buf))


# ---------------------------------------------------------------------------------------- building


@dataclasses.dataclass
class BuildReport:
  path: str
  count: int
  skipped: list[dict]   # {file, reason} of the images that could not be read
  seconds: float


def _progress_bar(total: int, enabled: bool):
  if not enabled:
    return None
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, desc="indexing", unit="img", file=sys.stderr)


def build_index(model, images: str, out: str, *, split: str = "test", identity: str = "none",
                batch_size: int | None = None, progress: bool = True) -> BuildReport:
  """Embeds a gallery with `model` (search.model.Model) and writes the index to `out`.

  images: a folder of person images (recursive; unreadable files are skipped and listed) or a
  prepared dataset (its `split`, 'test' or 'val'). identity: for folders, 'none' or 'dir' (the
  image's parent directory names the person). batch_size: global batch (default: the config's
  eval_batch_size), rounded up to a multiple of the device count.
  """
  start = time.perf_counter()
  if identity not in IDENTITY_MODES:
    raise ValueError(f"identity={identity!r}; expected one of {IDENTITY_MODES}")
  n_dev = model.mesh.devices.size
  batch = int(batch_size or model.config.data.eval_batch_size)
  if batch < 1:
    raise ValueError(f"batch_size must be positive, got {batch}")
  batch = -(-batch // n_dev) * n_dev
  encoder = model._enc_img  # pylint: disable=protected-access
  prepared = find_prepared(images, split)
  queries = None
  skipped: list[dict] = []
  if prepared is not None:
    data = pipeline.make_eval_data(data_dir=prepared.data_dir, dataset=prepared.dataset,
                                   tokenizer=model.tokenizer, split=split, batch_size=batch,
                                   image_size=model.image_size)
    bar = _progress_bar(data.num_gallery, progress)
    feats, _ = evaluate_lib.encode_all(encoder, model.params,
                                       _counted(data.gallery_batches(), bar), "images", model.mesh)
    names = list(data.gallery_paths)
    identities: list | None = [int(p) for p in data.gallery_pids]
    queries = {"captions": list(data.query_captions),
               "identities": [int(p) for p in data.query_pids]}
    source = {"kind": "prepared", "data_dir": prepared.data_dir, "dataset": prepared.dataset,
              "split": split}
  else:
    root = os.path.abspath(images)
    all_names = list_images(root)
    if not all_names:
      raise FileNotFoundError(f"gallery folder {images} holds no images "
                              f"({', '.join(sorted(IMAGE_EXTENSIONS))}) and is not a prepared dataset")
    skipped += [{"file": n, "reason": "the file name contains a line break"}
                for n in all_names if "\n" in n]
    all_names = [n for n in all_names if "\n" not in n]
    bar = _progress_bar(len(all_names), progress)
    names = []
    feats, _ = evaluate_lib.encode_all(
        encoder, model.params,
        _folder_batches(root, all_names, model.image_size, batch, names, skipped,
                        bar.update if bar else (lambda n: None)), "images", model.mesh)
    identities = ([pathlib.PurePosixPath(n).parent.name or None for n in names]
                  if identity == "dir" else None)
    source = {"kind": "folder", "root": root, "identity": identity}
  if bar is not None:
    bar.close()
  if len(names) == 0:
    raise ValueError(f"no readable image in {images} ({len(skipped)} unreadable)")
  meta = {
      "format": FORMAT,
      "fingerprint": model.fingerprint,
      "checkpoint": model.checkpoint,
      "workdir": model.workdir,
      "config": model.config.to_dict(),
      "count": len(names),
      "embed_dim": int(feats.shape[1]),
      "source": source,
      "skipped": skipped,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  write_index(out, feats, names, identities, meta, queries)
  return BuildReport(path=os.path.abspath(out), count=len(names), skipped=skipped,
                     seconds=time.perf_counter() - start)


def _counted(batches, bar):
  for b in batches:
    if bar is not None:
      bar.update(int(np.sum(b["valid"])))
    yield b


def write_index(out: str, embeddings: np.ndarray, names: Sequence[str],
                identities: Sequence | None, meta: dict, queries: dict | None = None) -> str:
  """Writes an index directory atomically (temp dir + rename); returns its absolute path.

  embeddings are stored as float16. An existing index at `out` is replaced; any other existing
  path raises FileExistsError. Names may not contain line breaks.
  """
  out = os.path.abspath(out)
  emb = np.asarray(embeddings)
  if emb.ndim != 2 or emb.shape[0] != len(names):
    raise ValueError(f"embeddings shape {emb.shape} does not match {len(names)} names")
  if identities is not None and len(identities) != len(names):
    raise ValueError(f"{len(identities)} identities for {len(names)} names")
  bad = next((n for n in names if "\n" in n), None)
  if bad is not None:
    raise ValueError(f"file name {bad!r} contains a line break")
  if os.path.exists(out) and not os.path.isfile(os.path.join(out, "meta.json")):
    raise FileExistsError(f"{out} exists and is not a search index; choose another --out")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    np.save(os.path.join(tmp, "embeddings.npy"),
            emb if emb.dtype == np.float16 else emb.astype(np.float16))
    with open(os.path.join(tmp, "names.txt"), "w", encoding="utf-8", newline="\n") as f:
      f.writelines(f"{n}\n" for n in names)
    if identities is not None:
      _write_json(os.path.join(tmp, "identities.json"), list(identities))
    if queries is not None:
      _write_json(os.path.join(tmp, "queries.json"), queries)
    _write_json(os.path.join(tmp, "meta.json"), dict(meta, count=len(names),
                                                     embed_dim=int(emb.shape[1])))
    old = None
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
      os.rename(out, os.path.join(old, "index"))
    os.rename(tmp, out)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f)
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------- loading


class Names(Sequence[str]):
  """File names kept as one UTF-8 blob plus line offsets: compact for millions of names."""

  def __init__(self, blob: bytes):
    self._blob = blob
    ends = np.flatnonzero(np.frombuffer(blob, np.uint8) == ord("\n"))
    self._starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
    self._ends = ends

  def __len__(self) -> int:
    return len(self._ends)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    i = int(i)
    if i < 0:
      i += len(self)
    if not 0 <= i < len(self):
      raise IndexError(f"name index {i} out of range for {len(self)} names")
    return self._blob[self._starts[i]:self._ends[i]].decode("utf-8")

  def __eq__(self, other) -> bool:
    if isinstance(other, (Names, list, tuple)):
      return len(self) == len(other) and all(a == b for a, b in zip(self, other))
    return NotImplemented

  def __repr__(self) -> str:
    return f"Names({len(self)} names)"


class NpyRows:
  """Rows of a 2-D .npy file read on demand with plain file reads (no memory map)."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        raise ValueError(f"{path}: unsupported .npy version {version}")
      self.offset = f.tell()
    if fortran or len(shape) != 2:
      raise ValueError(f"{path}: expected a C-ordered 2-D array, got shape {shape}")
    self.shape = tuple(int(x) for x in shape)
    self.dtype = np.dtype(dtype)
    self.ndim = 2

  def read_rows(self, start: int, out: np.ndarray) -> None:
    """Fills `out` [n, D] (C-contiguous, this dtype) with rows start..start+n."""
    if out.dtype != self.dtype or not out.flags.c_contiguous or out.shape[1:] != self.shape[1:]:
      raise ValueError(f"out must be C-contiguous {self.dtype} [n, {self.shape[1]}]")
    if start < 0 or start + out.shape[0] > self.shape[0]:
      raise ValueError(f"rows {start}..{start + out.shape[0]} outside {self.shape[0]}")
    row = self.shape[1] * self.dtype.itemsize
    view = memoryview(out).cast("B")
    with open(self.path, "rb") as f:
      f.seek(self.offset + start * row)
      got = 0
      while got < len(view):
        n = f.readinto(view[got:])
        if not n:
          raise ValueError(f"{self.path} ends before row {start + got // row}")
        got += n


@dataclasses.dataclass
class Index:
  """A loaded index. `rows()` reads the float16 matrix on demand; `embeddings()` memory-maps it."""
  path: str
  names: Names
  identities: list | None
  meta: dict
  queries: dict | None
  _source: Any = None
  _caption_ids: dict | None = None

  @property
  def fingerprint(self) -> str:
    return self.meta["fingerprint"]

  @property
  def size(self) -> int:
    return len(self.names)

  def embeddings(self) -> np.ndarray:
    """float16 [G, D], memory-mapped."""
    return np.load(os.path.join(self.path, "embeddings.npy"), mmap_mode="r")

  def rows(self) -> NpyRows:
    """The float16 [G, D] matrix as a row reader (for topk.make_gallery)."""
    return NpyRows(os.path.join(self.path, "embeddings.npy"))

  def image(self, i: int) -> Image.Image:
    """The original gallery image i (RGB); raises OSError/FileNotFoundError if it is gone."""
    src = self.meta["source"]
    if src["kind"] == "folder":
      with Image.open(os.path.join(src["root"], self.names[i])) as img:
        return img.convert("RGB")
    if self._source is None:
      self._source = pipeline.data_source(data_dir=src["data_dir"], dataset=src["dataset"],
                                          split=src["split"])
    return transforms.decode(self._source[int(i)]["image"])

  def identity_of_caption(self, text: str):
    """The identity of a dataset caption equal to `text` (case and spacing ignored), else None."""
    if not self.queries:
      return None
    if self._caption_ids is None:
      self._caption_ids = {_norm(c): p for c, p in zip(self.queries["captions"],
                                                       self.queries["identities"])}
    return self._caption_ids.get(_norm(text))


def _norm(text: str) -> str:
  return " ".join(text.lower().split())


def _read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def load_index(path: str) -> Index:
  """Reads an index directory written by `write_index`, checking that its files agree."""
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{path} is not a search index (no meta.json); build one with "
                            f"`python -m tipr_jax.search index`")
  meta = _read_json(meta_path)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
  emb_path = os.path.join(path, "embeddings.npy")
  rows = NpyRows(emb_path)
  if rows.dtype != np.float16 or rows.shape != (meta["count"], meta["embed_dim"]):
    raise ValueError(f"{emb_path}: {rows.dtype} {rows.shape}, expected float16 "
                     f"({meta['count']}, {meta['embed_dim']}) as meta.json says")
  with open(os.path.join(path, "names.txt"), "rb") as f:
    names = Names(f.read())
  if len(names) != rows.shape[0]:
    raise ValueError(f"{path}/names.txt lists {len(names)} names for {rows.shape[0]} embeddings")
  identities = None
  if os.path.isfile(os.path.join(path, "identities.json")):
    identities = _read_json(os.path.join(path, "identities.json"))
    if len(identities) != rows.shape[0]:
      raise ValueError(f"{path}/identities.json has {len(identities)} entries for "
                       f"{rows.shape[0]} embeddings")
  qpath = os.path.join(path, "queries.json")
  queries = _read_json(qpath) if os.path.isfile(qpath) else None
  return Index(path=os.path.abspath(path), names=names, identities=identities, meta=meta,
               queries=queries)


def check_model(index: Index, model) -> None:
  """Raises IndexMismatchError unless `model` is the model and checkpoint that wrote `index`."""
  if model.fingerprint != index.fingerprint:
    raise IndexMismatchError(
        f"index {index.path} was written by the model with fingerprint {index.fingerprint[:16]} "
        f"(checkpoint {index.meta.get('checkpoint')}), but the given model has fingerprint "
        f"{model.fingerprint[:16]} (checkpoint {model.checkpoint}). Query with the checkpoint that "
        f"wrote the index, or rebuild the index with `python -m tipr_jax.search index "
        f"--checkpoint={model.checkpoint} ...`")
