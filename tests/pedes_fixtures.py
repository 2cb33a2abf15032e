"""Tiny datasets in the real annotation formats, written by the data tests."""
from __future__ import annotations

import io
import json
import pathlib

import numpy as np
from PIL import Image

from tipr_jax.data import annotations

WORDS = ('man woman person wearing black white red blue green yellow shirt jacket pants shorts '
         'shoes bag backpack hair long short carrying walking a the and with in has is').split()


def image_bytes(seed: int, size=(64, 32), fmt: str = 'JPEG') -> bytes:
  """A small image (h, w) with seed-dependent content, encoded as JPEG or PNG."""
  rng = np.random.default_rng(seed)
  h, w = size
  base = rng.integers(0, 256, 3)
  arr = (base[None, None, :] + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, fmt)
  return buf.getvalue()


def caption(rng: np.random.Generator, n_words: int = 12) -> str:
  return ' '.join(rng.choice(WORDS, n_words)) + '.'


def entries(*, train_ids: int, eval_ids: int = 0, val_ids: int = 0, imgs_per_id: int = 2,
            caps_per_img: int = 2, layout: annotations.Layout = annotations.CUHK_PEDES,
            seed: int = 0, val_split_name: str = 'val') -> list[dict]:
  """Entries in the real JSON format of `layout` (ids follow each dataset's convention:
  CUHK 1-based train ids, ICFG/RSTP 0-based; test/val ids continue after the train ids)."""
  rng = np.random.default_rng(seed)
  out = []
  first = 1 if layout.train_pid_offset == -1 else 0
  groups = [('train', train_ids), ('test', eval_ids), (val_split_name, val_ids)]
  next_id = first
  for split, n in groups:
    for _ in range(n):
      for k in range(imgs_per_id):
        caps = [caption(rng) for _ in range(caps_per_img)]
        path = f'{split}/{next_id:04d}_{k}.jpg'
        item = {'id': next_id, 'split': split, 'captions': caps}
        item[layout.path_field] = path
        if layout is annotations.CUHK_PEDES:
          item['processed_tokens'] = [c.rstrip('.').split() for c in caps]
        out.append(item)
      next_id += 1
  return out


def write(root: pathlib.Path, layout: annotations.Layout, items: list, *,
          image_size=(64, 32), skip_images=(), raw_json: str | None = None) -> pathlib.Path:
  """Writes root/<DATASET>/<annotation json> and the images; returns root."""
  d = pathlib.Path(root) / layout.name
  (d / 'imgs').mkdir(parents=True, exist_ok=True)
  (d / layout.annotation_file).write_text(raw_json if raw_json is not None else json.dumps(items))
  for i, item in enumerate(items):
    if not isinstance(item, dict) or not isinstance(item.get(layout.path_field), str):
      continue
    rel = item[layout.path_field]
    if rel in skip_images:
      continue
    p = d / 'imgs' / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = 'PNG' if rel.endswith('.png') else 'JPEG'
    p.write_bytes(image_bytes(i, image_size, fmt))
  return pathlib.Path(root)
