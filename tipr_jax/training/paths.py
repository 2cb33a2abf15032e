"""Workdir paths that work the same for a local directory and a bucket (gs://, s3://).

Orbax, TFDS and Grain reach buckets through `etils.epath`; the engine's own files (config.json,
results.json, metrics.jsonl, the curves picture) go through it too, so `--workdir=gs://b/run`
works wherever `--workdir=runs/run` does (on Cloud TPU, install `gcsfs` for epath's gs://).
"""
from __future__ import annotations

import os
import tempfile

from etils import epath


def is_uri(path: str | os.PathLike) -> bool:
  """True for a `scheme://...` location (a bucket), False for a local path."""
  return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: a local path made absolute (Orbax wants absolute paths), a URI
  kept as it is."""
  s = os.fspath(path)
  return epath.Path(s) if is_uri(s) else epath.Path(s).resolve()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` so that a reader never sees half a file: a local file is written beside the
  target and renamed over it; an object in a bucket is replaced whole by one upload."""
  target = resolve(path)
  if is_uri(target):
    target.write_text(text)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(target.parent), prefix=f".{target.name}.")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, os.fspath(target))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
