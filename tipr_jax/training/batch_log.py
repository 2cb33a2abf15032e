"""Debug record of the rows each process feeds to training and evaluation (multi-host checks).

Off unless the environment variable TIPR_DEBUG_BATCH_LOG names a directory; then every process
appends one JSON line per batch to DIR/process_<i>.jsonl:

  {"kind": "train", "step": s, "image_ids": [...], "pids": [...], "rows": [crc32, ...]}
      the local rows of global training batch `s` (1-based: the batch that produces step s);
      `rows` hashes each row's image, caption_ids, mlm_ids and mlm_labels bytes, so two runs
      that fed the same examples in the same order record the same values.
  {"kind": "eval:<key>", "index": [...], "valid": [...]}
      the file positions (-1 = padding) of the local rows of one evaluation batch.

tests/test_multihost.py compares these records across processes and against a one-process run.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Mapping

import jax
import numpy as np

ENV = "TIPR_DEBUG_BATCH_LOG"
_ROW_KEYS = ("images", "caption_ids", "mlm_ids", "mlm_labels")


def _write(record: dict) -> None:
  directory = os.environ.get(ENV)
  if not directory:
    return
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, f"process_{jax.process_index()}.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps(dict(record, process=jax.process_index())) + "\n")


def row_hashes(batch: Mapping[str, np.ndarray]) -> list[int]:
  """crc32 of each row's bytes over the keys in _ROW_KEYS that `batch` has: [b] ints."""
  keys = [k for k in _ROW_KEYS if k in batch]
  n = len(np.asarray(batch[keys[0]])) if keys else 0
  out = []
  for i in range(n):
    crc = 0
    for k in keys:
      crc = zlib.crc32(np.ascontiguousarray(np.asarray(batch[k])[i]).tobytes(), crc)
    out.append(crc)
  return out


def record_train(step: int, batch: Mapping[str, np.ndarray]) -> None:
  """Logs this process's rows of the global batch that produces training step `step`."""
  if not os.environ.get(ENV):
    return
  _write({"kind": "train", "step": int(step),
          "image_ids": np.asarray(batch["image_ids"]).tolist(),
          "pids": np.asarray(batch["pids"]).tolist(), "rows": row_hashes(batch)})


def record_eval(key: str, batch: Mapping[str, np.ndarray]) -> None:
  """Logs the file positions of this process's rows of one evaluation batch."""
  if not os.environ.get(ENV):
    return
  _write({"kind": f"eval:{key}", "index": np.asarray(batch["index"]).tolist(),
          "valid": np.asarray(batch["valid"]).astype(bool).tolist()})
