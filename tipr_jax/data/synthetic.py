"""Procedural synthetic pedestrian dataset in the real CUHK-PEDES / ICFG-PEDES / RSTPReid layouts.

Every identity is a fixed combination of attribute slots (gender, build, hair,
upper garment type/colour/pattern, lower garment, shoes, bag, headwear,
accessory).  About a third of the identities are "siblings" of an earlier
identity of the same split that differ in exactly one slot, so retrieval needs
fine-grained attributes.  Each identity has several images (views, poses,
scale/crop, background clutter, occlusion, lighting) and each image has captions
in different annotator styles that only mention visible attributes.

Output (``generate``): ``out_dir/<root>/`` with the real annotation file and
``imgs/`` tree, plus ``synthetic_attributes.json`` (true attributes per image),
``attribute_words.txt``, ``bpe_vocab.txt.gz`` and ``synthetic_manifest.json``.
The output is a pure function of the arguments (byte-identical for any number
of workers) and appears atomically (built in a hidden temp dir, then renamed).

CLI:
  python -m tipr_jax.data.synthetic --out=DIR --identities=N --seed=S --layout=cuhk|icfg|rstp \
      [--images_per_identity=4] [--image_size=384,128] [--workers=2]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tipr_jax.data import synthetic_captions as captions_lib
from tipr_jax.data import synthetic_render as render_lib

GENERATOR_VERSION = 1
MANIFEST = "synthetic_manifest.json"
ATTRIBUTES_FILE = "synthetic_attributes.json"
ATTRIBUTE_WORDS_FILE = "attribute_words.txt"
BPE_FILE = "bpe_vocab.txt.gz"

# ---------------------------------------------------------------------------------------------
# Layouts of the real datasets.


@dataclasses.dataclass(frozen=True)
class Layout:
  """On-disk format of one real dataset."""
  name: str
  root: str                      # dataset folder under the data root
  annotation: str                # annotation JSON file name inside root
  path_key: str                  # key of the image path (relative to root/imgs/)
  keys: tuple[str, ...]          # key order of one annotation entry
  splits: tuple[str, ...]
  split_fractions: tuple[float, ...]   # fraction of identities per non-train split
  captions_per_image: int
  id_base: int                   # id of the first training identity
  tokens_lowercase: bool


LAYOUTS: dict[str, Layout] = {
    "cuhk": Layout("cuhk", "CUHK-PEDES", "reid_raw.json", "file_path",
                   ("split", "captions", "file_path", "processed_tokens", "id"),
                   ("train", "val", "test"), (0.1, 0.1), 2, 1, True),
    "icfg": Layout("icfg", "ICFG-PEDES", "ICFG-PEDES.json", "file_path",
                   ("split", "captions", "file_path", "processed_tokens", "id"),
                   ("train", "test"), (0.2,), 1, 0, False),
    "rstp": Layout("rstp", "RSTPReid", "data_captions.json", "img_path",
                   ("id", "img_path", "captions", "split"),
                   ("train", "val", "test"), (0.1, 0.1), 2, 0, True),
}

# ---------------------------------------------------------------------------------------------
# Attribute schema.

COLOUR_NAMES = tuple(render_lib.COLOURS)
_GARMENT_COLOUR_P = dict(black=0.17, white=0.13, grey=0.1, red=0.07, blue=0.1, green=0.06,
                         yellow=0.04, pink=0.05, purple=0.04, orange=0.04, brown=0.08, beige=0.12)
_SHOE_COLOUR_P = dict(black=0.34, white=0.28, brown=0.14, grey=0.1, red=0.05, blue=0.05,
                      beige=0.04)
_JEANS_COLOURS = ("blue", "black", "grey", "white")

SLOTS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("gender", ("male", "female")),
    ("build", ("slim", "average", "heavy")),
    ("hair_length", ("short", "medium", "long")),
    ("hair_colour", ("black", "brown", "blonde", "grey")),
    ("upper_type", ("t-shirt", "shirt", "sweater", "jacket", "coat", "dress")),
    ("upper_colour", COLOUR_NAMES),
    ("upper_pattern", ("plain", "stripes", "checks", "logo")),
    ("pattern_colour", COLOUR_NAMES + (None,)),
    ("lower_type", ("trousers", "jeans", "shorts", "skirt", "none")),
    ("lower_colour", COLOUR_NAMES + (None,)),
    ("shoe_type", ("sneakers", "boots", "leather shoes")),
    ("shoe_colour", tuple(_SHOE_COLOUR_P)),
    ("bag", ("none", "backpack", "shoulder bag", "handbag")),
    ("bag_colour", COLOUR_NAMES + (None,)),
    ("headwear", ("none", "cap", "hat")),
    ("headwear_colour", COLOUR_NAMES + (None,)),
    ("accessory", ("none", "glasses", "umbrella", "scarf")),
    ("accessory_colour", COLOUR_NAMES + (None,)),
)
SLOT_NAMES = tuple(n for n, _ in SLOTS)
_PATTERNS_FOR = {"t-shirt": ("plain", "stripes", "checks", "logo"),
                 "shirt": ("plain", "stripes", "checks"), "sweater": ("plain", "stripes", "logo"),
                 "jacket": ("plain", "checks", "logo"), "coat": ("plain", "checks"),
                 "dress": ("plain", "stripes", "checks")}


def _choice(rng: np.random.Generator, p: dict[Any, float]) -> Any:
  keys = list(p)
  w = np.array([p[k] for k in keys], dtype=np.float64)
  return keys[int(rng.choice(len(keys), p=w / w.sum()))]


def _lum(name: str) -> float:
  c = render_lib.COLOURS[name]
  return 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]


def is_valid(a: dict[str, Any]) -> bool:
  """Whether an attribute dict is self-consistent (dependent slots match their parents)."""
  female = a["gender"] == "female"
  if (a["upper_type"] == "dress") != (a["lower_type"] == "none"):
    return False
  if (a["lower_type"] == "none") != (a["lower_colour"] is None):
    return False
  if a["upper_type"] == "dress" or a["lower_type"] == "skirt":
    if not female:
      return False
  if a["upper_type"] == "coat" and a["lower_type"] in ("shorts", "skirt"):
    return False                      # the coat would hide them
  if a["upper_pattern"] not in _PATTERNS_FOR[a["upper_type"]]:
    return False
  striped = a["upper_pattern"] in ("stripes", "checks")
  if striped != (a["pattern_colour"] is not None):
    return False
  if striped and a["pattern_colour"] == a["upper_colour"]:
    return False
  if a["lower_type"] == "jeans" and a["lower_colour"] not in _JEANS_COLOURS:
    return False
  if (a["bag"] == "none") != (a["bag_colour"] is None):
    return False
  if (a["headwear"] == "none") != (a["headwear_colour"] is None):
    return False
  if (a["accessory"] in ("none", "glasses")) != (a["accessory_colour"] is None):
    return False
  return True


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
  """Samples one identity's attribute values (a dict over SLOT_NAMES)."""
  g = _choice(rng, {"male": 0.5, "female": 0.5})
  f = g == "female"
  a: dict[str, Any] = {"gender": g}
  a["build"] = _choice(rng, {"slim": 0.3, "average": 0.5, "heavy": 0.2})
  a["hair_length"] = _choice(rng, {"short": 0.15, "medium": 0.35, "long": 0.5} if f else
                             {"short": 0.78, "medium": 0.17, "long": 0.05})
  a["hair_colour"] = _choice(rng, {"black": 0.5, "brown": 0.3, "blonde": 0.12, "grey": 0.08})
  a["upper_type"] = _choice(rng, {"t-shirt": 0.25, "shirt": 0.15, "sweater": 0.12, "jacket": 0.15,
                                  "coat": 0.13, "dress": 0.2} if f else
                            {"t-shirt": 0.3, "shirt": 0.2, "sweater": 0.15, "jacket": 0.2,
                             "coat": 0.15})
  a["upper_colour"] = _choice(rng, _GARMENT_COLOUR_P)
  pats = _PATTERNS_FOR[a["upper_type"]]
  a["upper_pattern"] = _choice(rng, {p: {"plain": 0.55, "stripes": 0.16, "checks": 0.12,
                                         "logo": 0.17}[p] for p in pats})
  if a["upper_pattern"] in ("stripes", "checks"):
    if rng.random() < 0.6:
      a["pattern_colour"] = "white" if _lum(a["upper_colour"]) < 110 else "black"
      if a["pattern_colour"] == a["upper_colour"]:
        a["pattern_colour"] = "grey"
    else:
      a["pattern_colour"] = _choice(rng, {c: 1.0 for c in COLOUR_NAMES if c != a["upper_colour"]})
  else:
    a["pattern_colour"] = None
  if a["upper_type"] == "dress":
    a["lower_type"], a["lower_colour"] = "none", None
  else:
    p_lower = ({"trousers": 0.3, "jeans": 0.3, "shorts": 0.15, "skirt": 0.25} if f else
               {"trousers": 0.45, "jeans": 0.35, "shorts": 0.2})
    if a["upper_type"] == "coat":
      p_lower = {k: v for k, v in p_lower.items() if k not in ("shorts", "skirt")}
    a["lower_type"] = _choice(rng, p_lower)
    if a["lower_type"] == "jeans":
      a["lower_colour"] = _choice(rng, {"blue": 0.6, "black": 0.25, "grey": 0.1, "white": 0.05})
    else:
      a["lower_colour"] = _choice(rng, _GARMENT_COLOUR_P)
  a["shoe_type"] = _choice(rng, {"sneakers": 0.5, "boots": 0.2, "leather shoes": 0.3})
  a["shoe_colour"] = _choice(rng, _SHOE_COLOUR_P)
  a["bag"] = _choice(rng, {"none": 0.33, "backpack": 0.3, "shoulder bag": 0.2,
                           "handbag": 0.17 if f else 0.05})
  a["bag_colour"] = None if a["bag"] == "none" else _choice(rng, _GARMENT_COLOUR_P)
  a["headwear"] = _choice(rng, {"none": 0.7, "cap": 0.2, "hat": 0.1})
  a["headwear_colour"] = None if a["headwear"] == "none" else _choice(rng, _GARMENT_COLOUR_P)
  a["accessory"] = _choice(rng, {"none": 0.6, "glasses": 0.2, "umbrella": 0.08, "scarf": 0.12})
  a["accessory_colour"] = (_choice(rng, _GARMENT_COLOUR_P)
                           if a["accessory"] in ("umbrella", "scarf") else None)
  out = {k: a[k] for k in SLOT_NAMES}
  assert is_valid(out), out
  return out


def mutate_one(a: dict[str, Any], rng: np.random.Generator, tries: int = 200) -> dict[str, Any]:
  """A valid attribute dict that differs from ``a`` in exactly one slot."""
  for _ in range(tries):
    slot, values = SLOTS[int(rng.integers(0, len(SLOTS)))]
    if a[slot] is None:
      continue
    options = [v for v in values if v != a[slot] and v is not None]
    if not options:
      continue
    b = dict(a)
    b[slot] = options[int(rng.integers(0, len(options)))]
    if is_valid(b):
      return b
  raise RuntimeError(f"could not mutate one slot of {a}")


def sample_hidden(rng: np.random.Generator, attrs: dict[str, Any]) -> dict[str, Any]:
  """Identity-level factors that are drawn but never named in captions (skin, shades, ...)."""
  return {
      "skin": render_lib.SKIN_TONES[int(rng.integers(0, len(render_lib.SKIN_TONES)))],
      "height": float(rng.uniform(0.92, 1.0)),
      "width": float(rng.uniform(0.95, 1.05)),
      "shade": {k: float(rng.uniform(0.82, 1.12))
                for k in ("upper", "lower", "shoes", "bag", "headwear", "accessory")},
      "hair_shade": float(rng.uniform(0.85, 1.15)),
      "hair_part": int(rng.integers(-1, 2)),
      "pattern_period": float(rng.uniform(0.028, 0.05)),
      "logo_shape": int(rng.integers(0, 4)),
      "logo_colour": (None if rng.random() < 0.6 else
                      render_lib.COLOURS[COLOUR_NAMES[int(rng.integers(0, len(COLOUR_NAMES)))]]),
      "bag_hand": "right" if rng.random() < 0.6 else "left",
      "glasses_colour": tuple(int(c) for c in rng.integers(10, 90, 3)),
      "dress_sleeves": bool(rng.random() < 0.5),
  }


def _key(a: dict[str, Any]) -> tuple:
  return tuple(a[k] for k in SLOT_NAMES)


def sample_identities(n: int, split_of: Sequence[str], seed: int,
                      sibling_fraction: float = 0.3) -> list[dict[str, Any]]:
  """Samples ``n`` distinct identities; ~``sibling_fraction`` are one-slot siblings.

  Siblings are derived from an earlier identity of the same split.  The second
  identity of every split with >= 2 identities is always a sibling of the first,
  so every split contains at least one one-attribute pair.
  """
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0xA77]))
  out: list[dict[str, Any]] = []
  seen: set[tuple] = set()
  by_split: dict[str, list[int]] = {}
  for i in range(n):
    split = split_of[i]
    prev = by_split.setdefault(split, [])
    for _ in range(1000):
      parent = None
      if prev and (len(prev) == 1 or rng.random() < sibling_fraction):
        parent = prev[0] if len(prev) == 1 else prev[int(rng.integers(0, len(prev)))]
        attrs = mutate_one(out[parent]["attributes"], rng)
      else:
        attrs = sample_attributes(rng)
      if _key(attrs) not in seen:
        break
    else:
      raise RuntimeError("could not sample a new distinct identity")
    seen.add(_key(attrs))
    out.append({"attributes": attrs, "hidden": sample_hidden(rng, attrs), "parent": parent})
    prev.append(i)
  return out


def one_attribute_siblings(attrs_by_id: dict[int, dict[str, Any]]) -> list[tuple[int, int, str]]:
  """All pairs (id_a, id_b, slot) of identities whose attributes differ in exactly one slot."""
  ids = sorted(attrs_by_id)
  keys = {i: _key(attrs_by_id[i]) for i in ids}
  out = []
  for x, i in enumerate(ids):
    for j in ids[x + 1:]:
      diff = [k for k, (p, q) in enumerate(zip(keys[i], keys[j])) if p != q]
      if len(diff) == 1:
        out.append((i, j, SLOT_NAMES[diff[0]]))
  return out


# ---------------------------------------------------------------------------------------------
# Splits, ids and file names.


def split_sizes(n: int, layout: Layout) -> dict[str, int]:
  """Identities per split (train gets the rest); raises if ``n`` is too small."""
  others = {s: max(1, int(round(n * f))) for s, f in zip(layout.splits[1:], layout.split_fractions)}
  n_train = n - sum(others.values())
  if n_train < 1:
    raise ValueError(f"identities={n} is too small for layout {layout.name!r}: need at least "
                     f"{sum(others.values()) + 1} to fill splits {layout.splits}")
  return {"train": n_train, **others}


def _image_names(layout: Layout, n_ids: int, split_of: Sequence[str], ids: Sequence[int],
                 k_images: int, seed: int) -> list[list[str]]:
  """Real-dataset-style relative image paths for every (identity, image)."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF11E]))
  names: list[list[str]] = []
  if layout.name == "cuhk":
    counters = {"CUHK01": int(rng.integers(1, 50)), "CUHK03": int(rng.integers(1, 50)),
                "Market": int(rng.integers(1, 50)), "query": int(rng.integers(1, 500))}
    serial = int(rng.integers(1000, 5000))
    for i in range(n_ids):
      src = _choice(rng, {"CUHK01": 0.12, "CUHK03": 0.33, "Market": 0.3, "query": 0.25})
      pid = counters[src]
      counters[src] += 1 + int(rng.integers(0, 3))
      row = []
      for k in range(k_images):
        if src == "CUHK01":
          row.append(f"CUHK01/{pid:04d}{k + 1:03d}.png")
        elif src == "CUHK03":
          row.append(f"CUHK03/{pid}_{k + 1}.jpg")
        elif src == "Market":
          cam, seq = int(rng.integers(1, 7)), int(rng.integers(1, 7))
          frame = int(rng.integers(0, 200)) * 100 + k
          row.append(f"Market/{pid:04d}_c{cam}s{seq}_{frame:06d}_{int(rng.integers(1, 4)):02d}.jpg")
        else:
          folder = "train_query" if split_of[i] == "train" else "test_query"
          serial += 1 + int(rng.integers(0, 3))
          row.append(f"{folder}/p{pid}_s{serial}.jpg")
      names.append(row)
  elif layout.name == "icfg":
    # ICFG keeps MSMT17's storage folders (train/test), which are NOT the ICFG split.
    counters = {"train": 0, "test": 0}
    for i in range(n_ids):
      folder = "train" if rng.random() < 0.4 else "test"
      mpid = counters[folder]
      counters[folder] += 1
      row = []
      for k in range(k_images):
        date = ("0113", "0114", "0302", "0303")[int(rng.integers(0, 4))]
        tod = ("morning", "noon", "afternoon")[int(rng.integers(0, 3))]
        row.append(f"{folder}/{mpid:04d}/{mpid:04d}_{k:03d}_{int(rng.integers(1, 16)):02d}_"
                   f"{date}{tod}_{int(rng.integers(0, 2000)):04d}_{int(rng.integers(0, 4))}.jpg")
      names.append(row)
  else:
    for i in range(n_ids):
      cams = rng.permutation(15)[:k_images] + 1 if k_images <= 15 else rng.integers(1, 16, k_images)
      frames = np.sort(rng.choice(9000, size=k_images, replace=False)) + 1
      names.append([f"{ids[i]:04d}_c{int(c)}_{int(fr):04d}.jpg" for c, fr in zip(cams, frames)])
  flat = [p for row in names for p in row]
  if len(set(flat)) != len(flat):
    raise AssertionError("internal error: duplicate synthetic image paths")
  return names


def _views(seed: int, index: int, k: int) -> list[str]:
  rng = np.random.default_rng(np.random.SeedSequence([seed, 3, index]))
  base = list(rng.permutation(render_lib.VIEWS))
  while len(base) < k:
    base.append(render_lib.VIEWS[int(rng.integers(0, 4))])
  return [str(v) for v in base[:k]]


# ---------------------------------------------------------------------------------------------
# Rendering (worker side).


@dataclasses.dataclass(frozen=True)
class _Task:
  seed: int
  index: int
  attrs: dict[str, Any]
  hidden: dict[str, Any]
  paths: tuple[str, ...]
  image_size: tuple[int, int]
  n_captions: int
  tokens_lowercase: bool
  img_dir: str


def _render_identity(task: _Task) -> list[dict[str, Any]]:
  """Renders and writes all images of one identity; returns per-image metadata."""
  out = []
  views = _views(task.seed, task.index, len(task.paths))
  for k, rel in enumerate(task.paths):
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, 1, task.index, k]))
    scene = render_lib.sample_scene(rng, views[k], task.attrs)
    img = render_lib.render_image(task.attrs, task.hidden, scene, rng, task.image_size)
    vis = render_lib.visibility(task.attrs, task.hidden, scene)
    crng = np.random.default_rng(np.random.SeedSequence([task.seed, 2, task.index, k]))
    caps, said = captions_lib.make_captions(task.attrs, task.hidden, vis, scene.view, crng,
                                            task.n_captions)
    buf = io.BytesIO()
    if rel.endswith(".png"):
      img.save(buf, format="PNG", compress_level=1)     # zlib level 6 costs 5x the render
    else:
      img.save(buf, format="JPEG", quality=int(rng.integers(78, 96)))
    path = os.path.join(task.img_dir, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(buf.getvalue())
    out.append({
        "path": rel, "captions": caps,
        "tokens": [captions_lib.processed_tokens(c, task.tokens_lowercase) for c in caps],
        "view": scene.view, "visible": vis, "mentioned": said, "occluder": scene.occluder,
        "feet_cropped": bool(scene.foot_y > 1.012),
    })
  return out


# ---------------------------------------------------------------------------------------------
# Dataset assembly.


def _manifest(layout: Layout, identities: int, seed: int, images_per_identity: int,
              image_size: tuple[int, int], bpe_merges: int) -> dict[str, Any]:
  return {"generator": "tipr_jax.data.synthetic", "version": GENERATOR_VERSION,
          "layout": layout.name, "identities": identities, "seed": seed,
          "images_per_identity": images_per_identity, "image_size": list(image_size),
          "bpe_merges": bpe_merges}


def _dump_json(obj: Any, path: Path) -> None:
  path.write_bytes(json.dumps(obj).encode("utf-8"))


def _build(tmp_root: Path, layout: Layout, identities: int, seed: int, images_per_identity: int,
           image_size: tuple[int, int], workers: int, bpe_merges: int) -> dict[str, Any]:
  """Writes the whole dataset into ``tmp_root`` (which becomes ``<root>``)."""
  sizes = split_sizes(identities, layout)
  split_of = [s for s in layout.splits for _ in range(sizes[s])]
  ids = [layout.id_base + i for i in range(identities)]
  people = sample_identities(identities, split_of, seed)
  paths = _image_names(layout, identities, split_of, ids, images_per_identity, seed)
  img_dir = tmp_root / "imgs"
  img_dir.mkdir(parents=True)
  tasks = [_Task(seed, i, people[i]["attributes"], people[i]["hidden"], tuple(paths[i]),
                 tuple(image_size), layout.captions_per_image, layout.tokens_lowercase,
                 str(img_dir)) for i in range(identities)]
  if workers <= 1:
    results = [_render_identity(t) for t in tasks]
  else:
    ctx = multiprocessing.get_context("spawn")   # fork is unsafe once JAX threads exist
    with ctx.Pool(workers) as pool:
      results = list(pool.imap(_render_identity, tasks, chunksize=4))
  entries, attr_file = [], {}
  for i, recs in enumerate(results):
    for r in recs:
      e = {"split": split_of[i], "captions": r["captions"], layout.path_key: r["path"],
           "processed_tokens": r["tokens"], "id": ids[i]}
      entries.append({k: e[k] for k in layout.keys})
      attr_file[r["path"]] = {
          "id": ids[i], "split": split_of[i], "view": r["view"],
          "attributes": people[i]["attributes"], "visible": r["visible"],
          "mentioned": r["mentioned"],
          "occluder": r["occluder"], "feet_cropped": r["feet_cropped"],
          "sibling_of": None if people[i]["parent"] is None else ids[people[i]["parent"]],
      }
  _dump_json(entries, tmp_root / layout.annotation)
  _dump_json(attr_file, tmp_root / ATTRIBUTES_FILE)
  words = captions_lib.attribute_vocabulary()
  (tmp_root / ATTRIBUTE_WORDS_FILE).write_text(
      "# Words that name attribute values in the synthetic captions (one per line).\n"
      + "\n".join(words) + "\n", encoding="utf-8")
  if bpe_merges > 0:
    train_caps = [c for e in entries if e["split"] == "train" for c in e["captions"]]
    _build_vocab(train_caps, bpe_merges, tmp_root / BPE_FILE)
  stats = {}
  for s in layout.splits:
    es = [e for e in entries if e["split"] == s]
    stats[s] = {"identities": sizes[s], "images": len(es),
                "captions": sum(len(e["captions"]) for e in es)}
  manifest = _manifest(layout, identities, seed, images_per_identity, image_size, bpe_merges)
  manifest["splits"] = stats
  _dump_json(manifest, tmp_root / MANIFEST)
  return manifest


def _build_vocab(captions: list[str], merges: int, out_path: Path) -> None:
  from tipr_jax.data.tokenizer import build_bpe_vocab   # pylint: disable=import-outside-toplevel
  build_bpe_vocab(captions, merges, out_path)


def _default_workers() -> int:
  return max(1, min(2, os.cpu_count() or 1))


def generate(out_dir: str | os.PathLike, *, identities: int, seed: int, layout: str = "cuhk",
             images_per_identity: int = 4, image_size: Sequence[int] = (384, 128),
             workers: int | None = None, bpe_merges: int = 1500,
             overwrite: bool = False) -> Path:
  """Generates (or reuses) a synthetic dataset; returns the dataset root (e.g. DIR/CUHK-PEDES).

  Reuses an existing root whose manifest matches the arguments.  An existing root
  made with other arguments is replaced only if ``overwrite``; a root without a
  synthetic manifest (e.g. the real dataset) is never touched.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
  lay = LAYOUTS[layout]
  if images_per_identity < 1:
    raise ValueError(f"images_per_identity must be >= 1, got {images_per_identity}")
  size = tuple(int(x) for x in image_size)
  if len(size) != 2 or min(size) < 16:
    raise ValueError(f"image_size must be (height, width) >= 16, got {image_size}")
  split_sizes(identities, lay)
  out = Path(out_dir)
  root = out / lay.root
  want = _manifest(lay, identities, seed, images_per_identity, size, bpe_merges)
  if root.exists():
    man_path = root / MANIFEST
    if not man_path.is_file():
      raise FileExistsError(f"{root} exists and has no {MANIFEST}: not a synthetic dataset, "
                            "refusing to overwrite it")
    have = json.loads(man_path.read_text())
    if {k: have.get(k) for k in want} == want:
      return root
    if not overwrite:
      raise FileExistsError(f"{root} holds a synthetic dataset made with other arguments "
                            f"({ {k: have.get(k) for k in want} }); delete it or pass overwrite=True")
  out.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{lay.root}.partial-", dir=out))
  try:
    _build(tmp, lay, identities, seed, images_per_identity, size,
           _default_workers() if workers is None else workers, bpe_merges)
    os.chmod(tmp, 0o755)
    if root.exists():
      trash = Path(tempfile.mkdtemp(prefix=f".{lay.root}.old-", dir=out))
      os.replace(root, trash / "old")
      os.replace(tmp, root)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


# ---------------------------------------------------------------------------------------------
# Difficulty statistics.


def caption_ambiguity(root: str | os.PathLike, split: str = "test") -> dict[str, float]:
  """How well a perfect attribute reader could retrieve identities from the captions of a split.

  For every caption, counts the identities of the split whose attributes agree with every slot
  value the caption states (``mentioned`` in the attributes file).  An oracle that ranks those
  identities first, in random order, has identity-level R@k = E[min(1, k / n)] when the true
  identity is consistent (0 when an annotator slip excludes it).  ``upper_colour_r1`` is the same
  bound for a reader that only uses the upper-garment colour (a trivial baseline).
  """
  root = Path(root)
  recs = json.loads((root / ATTRIBUTES_FILE).read_text())
  ident = {r["id"]: r["attributes"] for r in recs.values() if r["split"] == split}
  if not ident:
    raise ValueError(f"{root}: split {split!r} has no images")
  ids = sorted(ident)
  ns, r1, r5, r10, base = [], [], [], [], []
  for r in recs.values():
    if r["split"] != split:
      continue
    for said in r["mentioned"]:
      ok = [i for i in ids if all(ident[i].get(k) == v for k, v in said.items())]
      n = max(1, len(ok))
      hit = r["id"] in ok
      ns.append(len(ok))
      r1.append(hit / n)
      r5.append(hit * min(1.0, 5 / n))
      r10.append(hit * min(1.0, 10 / n))
      col = said.get("upper_colour")
      nb = sum(ident[i]["upper_colour"] == col for i in ids) if col else len(ids)
      base.append(float(ident[r["id"]]["upper_colour"] == col or col is None) / max(1, nb))
  return {"identities": len(ids), "captions": len(ns),
          "mean_consistent_identities": float(np.mean(ns)),
          "unique_fraction": float(np.mean([n == 1 for n in ns])),
          "oracle_r1": float(np.mean(r1)), "oracle_r5": float(np.mean(r5)),
          "oracle_r10": float(np.mean(r10)), "upper_colour_r1": float(np.mean(base))}


# ---------------------------------------------------------------------------------------------
# Sample sheet.


def _layout_of(root: Path) -> Layout:
  for lay in LAYOUTS.values():
    if (root / lay.annotation).is_file():
      return lay
  raise FileNotFoundError(f"{root} has none of " +
                          ", ".join(l.annotation for l in LAYOUTS.values()))


def render_sample_sheet(root: str | os.PathLike, out_png: str | os.PathLike, *,
                        ids: Sequence[int] | None = None, images: int = 4,
                        split: str = "test", colors: int | None = 256) -> Path:
  """Draws sample images with their captions printed below them (PNG, ``colors``-colour palette).

  Default: two rows for a one-attribute sibling pair of ``split`` (``images`` images each)
  and one row with the first image of ``images`` other identities.  With ``ids``: one row
  per given identity.
  """
  root = Path(root)
  lay = _layout_of(root)
  entries = json.loads((root / lay.annotation).read_text())
  attrs = json.loads((root / ATTRIBUTES_FILE).read_text())
  by_id: dict[int, list[dict]] = {}
  for e in entries:
    by_id.setdefault(int(e["id"]), []).append(e)

  def summary(pid: int) -> str:
    a = attrs[by_id[pid][0][lay.path_key]]["attributes"]
    return (f"id {pid}: {a['gender']}, {a['upper_colour']} {a['upper_type']} ({a['upper_pattern']})"
            f", {a['lower_colour'] or ''} {a['lower_type']}, bag={a['bag']}")

  rows: list[tuple[str, list[dict]]] = []
  if ids is None:
    pool = {i: attrs[es[0][lay.path_key]]["attributes"] for i, es in by_id.items()
            if es[0]["split"] == split}
    sib = one_attribute_siblings(pool)
    if not sib:
      raise ValueError(f"no one-attribute sibling pair in split {split!r} of {root}")
    a, b, slot = sib[0]
    for pid in (a, b):
      rows.append((f"{summary(pid)}   [sibling pair, differs only in {slot} = {pool[pid][slot]}]",
                   by_id[pid][:images]))
    others = [i for i in sorted(pool) if i not in (a, b)]
    step = max(1, len(others) // images)
    rows.append(("one image each of other identities", [by_id[i][0] for i in
                                                         others[::step][:images]]))
  else:
    rows = [(summary(pid), by_id[pid][:images]) for pid in ids]
  font = ImageFont.load_default(size=12)
  bold = ImageFont.load_default(size=14)
  col_w, img_h, img_w, head_h, line_h = 250, 384, 128, 26, 14

  def lines_of(e: dict) -> list[tuple[int, str]]:
    meta = attrs[e[lay.path_key]]
    out = [(-1, f"id {e['id']}  view={meta['view']}  occluder={meta['occluder']}")]
    for ci, cap in enumerate(e["captions"]):
      out += [(ci, line) for line in textwrap.wrap(f"{ci + 1}. {cap}", 36)]
    return out

  text_h = [max(len(lines_of(e)) for e in es) * line_h + 24 for _, es in rows]
  sheet = Image.new("RGB", (col_w * images + 20, sum(head_h + img_h + t for t in text_h) + 10),
                    (255, 255, 255))
  dr = ImageDraw.Draw(sheet)
  y0 = 6
  for (title, es), th in zip(rows, text_h):
    dr.text((10, y0), title, fill=(0, 0, 0), font=bold)
    for c, e in enumerate(es):
      x0 = 10 + c * col_w
      with Image.open(root / "imgs" / e[lay.path_key]) as im:
        img = im.convert("RGB").resize((img_w, img_h))
      sheet.paste(img, (x0 + (col_w - img_w) // 2 - 10, y0 + head_h))
      ty = y0 + head_h + img_h + 4
      for ci, line in lines_of(e):
        colour = (90, 90, 90) if ci < 0 else (0, 0, 120) if ci == 0 else (120, 0, 0)
        dr.text((x0, ty), line, fill=colour, font=font)
        ty += line_h + (4 if ci < 0 else 0)
    y0 += head_h + img_h + th
  out_png = Path(out_png)
  out_png.parent.mkdir(parents=True, exist_ok=True)
  if colors:
    sheet = sheet.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
  sheet.save(out_png, optimize=True)
  return out_png


# ---------------------------------------------------------------------------------------------
# CLI.


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m tipr_jax.data.synthetic",
                              description="Generate a synthetic text-to-image person retrieval "
                              "dataset in a real dataset's on-disk layout.")
  p.add_argument("--out", required=True, help="data root; the dataset goes to OUT/<dataset>")
  p.add_argument("--identities", type=int, required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--layout", choices=sorted(LAYOUTS), default="cuhk")
  p.add_argument("--images_per_identity", type=int, default=4)
  p.add_argument("--image_size", default="384,128", help="H,W")
  p.add_argument("--workers", type=int, default=None)
  p.add_argument("--bpe_merges", type=int, default=1500)
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--sample_sheet", default=None, help="also write a sample sheet PNG here")
  p.add_argument("--stats", action="store_true", help="print caption ambiguity statistics")
  args = p.parse_args(argv)
  try:
    size = tuple(int(x) for x in args.image_size.split(","))
  except ValueError:
    p.error(f"--image_size must be H,W, got {args.image_size!r}")
  t0 = time.time()
  root = generate(args.out, identities=args.identities, seed=args.seed, layout=args.layout,
                  images_per_identity=args.images_per_identity, image_size=size,
                  workers=args.workers, bpe_merges=args.bpe_merges, overwrite=args.overwrite)
  man = json.loads((root / MANIFEST).read_text())
  n_img = sum(s["images"] for s in man["splits"].values())
  print(f"{root}: {n_img} images, splits {man['splits']} in {time.time() - t0:.1f}s")
  if args.sample_sheet:
    print(render_sample_sheet(root, args.sample_sheet))
  if args.stats:
    for split in LAYOUTS[args.layout].splits[1:]:
      print(split, json.dumps({k: round(v, 4) for k, v in caption_ambiguity(root, split).items()}))
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO)
  sys.exit(main())
