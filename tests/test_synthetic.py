"""Tests for the synthetic pedestrian dataset (tipr_jax.data.synthetic*)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tipr_jax.data import annotations
from tipr_jax.data import synthetic
from tipr_jax.data import synthetic_captions as caps_lib
from tipr_jax.data.tokenizer import Tokenizer, build_bpe_vocab

SMALL = dict(identities=20, images_per_identity=2, image_size=(64, 32), bpe_merges=120)
READER_LAYOUT = {"cuhk": annotations.CUHK_PEDES, "icfg": annotations.ICFG_PEDES,
                 "rstp": annotations.RSTPREID}


def _tree_hashes(root: Path) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = Path(dirpath) / f
      out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
  return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
  """One small dataset per layout (single process)."""
  roots = {}
  for name in synthetic.LAYOUTS:
    out = tmp_path_factory.mktemp(f"syn_{name}")
    roots[name] = synthetic.generate(out, seed=3, layout=name, workers=1, **SMALL)
  return roots


def _load(root: Path, name: str) -> list[dict]:
  lay = synthetic.LAYOUTS[name]
  return json.loads((root / lay.annotation).read_text())


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp"])
def test_json_fields_types_and_key_order(generated, name):
  root = generated[name]
  lay = synthetic.LAYOUTS[name]
  assert root.name == {"cuhk": "CUHK-PEDES", "icfg": "ICFG-PEDES", "rstp": "RSTPReid"}[name]
  entries = _load(root, name)
  assert isinstance(entries, list) and len(entries) == 20 * 2
  raw_text = (root / lay.annotation).read_text()
  assert raw_text.startswith('[{"' + lay.keys[0] + '": ')   # json.dump default separators
  for e in entries:
    assert tuple(e) == lay.keys
    assert isinstance(e["id"], int) and not isinstance(e["id"], bool)
    assert e["split"] in lay.splits
    assert isinstance(e["captions"], list) and all(isinstance(c, str) for c in e["captions"])
    path = e[lay.path_key]
    assert isinstance(path, str) and not path.startswith("/")
    if "processed_tokens" in lay.keys:
      toks = e["processed_tokens"]
      assert len(toks) == len(e["captions"])
      for t, c in zip(toks, e["captions"]):
        assert t and all(isinstance(w, str) and re.fullmatch(r"[A-Za-z0-9'-]+", w) for w in t)
        assert " ".join(t) == " ".join(re.findall(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*",
                                                  c.lower() if lay.tokens_lowercase else c))
    if name == "cuhk":
      assert re.fullmatch(r"CUHK01/\d{7}\.png|CUHK03/\d+_\d+\.jpg|"
                          r"Market/\d{4}_c\d s\d_\d{6}_\d{2}\.jpg|"
                          r"(train|test)_query/p\d+_s\d+\.jpg".replace(" ", ""), path), path
      if "_query/" in path:
        assert path.startswith("train_query/") == (e["split"] == "train")
    elif name == "icfg":
      assert re.fullmatch(r"(train|test)/(\d{4})/\2_\d{3}_\d{2}_(0113|0114|0302|0303)"
                          r"(morning|noon|afternoon)_\d{4}_\d\.jpg", path), path
    else:
      m = re.fullmatch(r"(\d{4,})_c(\d{1,2})_\d{4}\.jpg", path)
      assert m and int(m.group(1)) == e["id"] and 1 <= int(m.group(2)) <= 15, path


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp"])
def test_ids_splits_and_real_reader(generated, name):
  root = generated[name]
  lay = synthetic.LAYOUTS[name]
  entries = _load(root, name)
  ids = {s: sorted({e["id"] for e in entries if e["split"] == s}) for s in lay.splits}
  assert set(e["split"] for e in entries) == set(lay.splits)
  first = 1 if name == "cuhk" else 0
  assert ids["train"] == list(range(first, first + len(ids["train"])))
  for s in lay.splits[1:]:
    assert min(ids[s]) > max(ids["train"])
  all_ids = [i for s in lay.splits for i in ids[s]]
  assert len(all_ids) == len(set(all_ids)) == 20           # identity-disjoint splits
  if name == "icfg":
    assert "val" not in ids
  # The project's reader of the real datasets accepts it (train pids 0..N-1 after the id rule).
  ann = annotations.read_annotations(READER_LAYOUT[name], root.parent)
  train = annotations.train_set(ann.split("train"))
  assert train.num_classes == len(ids["train"])
  assert sorted({s.pid for s in train.samples}) == list(range(len(ids["train"])))


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp"])
def test_captions_and_images(generated, name):
  root = generated[name]
  lay = synthetic.LAYOUTS[name]
  if name == "cuhk":     # CUHK01-style images are PNG like the real ones, the rest JPEG
    assert {e["file_path"].endswith(".png") for e in _load(root, name)} == {True, False}
  for e in _load(root, name):
    assert len(e["captions"]) == (1 if name == "icfg" else 2)
    assert all(len(c.split()) >= 3 for c in e["captions"])
    if name != "icfg":
      assert e["captions"][0] != e["captions"][1]
    with Image.open(root / "imgs" / e[lay.path_key]) as im:
      assert im.format == ("PNG" if e[lay.path_key].endswith(".png") else "JPEG")
      assert im.size == (32, 64)
      im.load()
      assert im.mode == "RGB"
      assert np.asarray(im).std() > 5          # not a blank image


def test_full_size_images_decode(tmp_path):
  root = synthetic.generate(tmp_path, identities=3, seed=1, layout="rstp", images_per_identity=1,
                            bpe_merges=0, workers=1)
  for e in _load(root, "rstp"):
    with Image.open(root / "imgs" / e["img_path"]) as im:
      assert im.size == (128, 384) and im.mode == "RGB"
  assert not (root / synthetic.BPE_FILE).exists()


def test_same_seed_byte_identical_across_worker_counts(generated, tmp_path):
  again = synthetic.generate(tmp_path / "a", seed=3, layout="cuhk", workers=2, **SMALL)
  ref = _tree_hashes(generated["cuhk"])
  assert len(ref) > 40
  assert _tree_hashes(again) == ref


def test_different_seed_differs(generated, tmp_path):
  other = synthetic.generate(tmp_path, seed=4, layout="cuhk", workers=1, **SMALL)
  a, b = _tree_hashes(generated["cuhk"]), _tree_hashes(other)
  assert a["reid_raw.json"] != b["reid_raw.json"]
  common = set(a) & set(b)
  assert sum(a[k] != b[k] for k in common if k.startswith("imgs/")) == sum(
      k.startswith("imgs/") for k in common)


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp"])
def test_one_attribute_siblings_exist(generated, name):
  root = generated[name]
  recs = json.loads((root / synthetic.ATTRIBUTES_FILE).read_text())
  by_id = {r["id"]: (r["split"], r["attributes"]) for r in recs.values()}
  for split in synthetic.LAYOUTS[name].splits:
    ids = [i for i, (s, _) in by_id.items() if s == split]
    pairs = [(i, j) for i in ids for j in ids if i < j and
             sum(by_id[i][1][k] != by_id[j][1][k] for k in by_id[i][1]) == 1]
    assert pairs, f"no one-attribute sibling pair in {split}"
  # Declared siblings really differ in exactly one slot; all identities are distinct.
  for r in recs.values():
    if r["sibling_of"] is not None:
      a, b = r["attributes"], by_id[r["sibling_of"]][1]
      assert sum(a[k] != b[k] for k in a) == 1
  keys = {tuple(sorted(a.items(), key=str)) for _, a in by_id.values()}
  assert len(keys) == len(by_id)


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp"])
def test_attribute_file_covers_every_image(generated, name):
  root = generated[name]
  lay = synthetic.LAYOUTS[name]
  recs = json.loads((root / synthetic.ATTRIBUTES_FILE).read_text())
  entries = _load(root, name)
  assert list(recs) == [e[lay.path_key] for e in entries]
  for e in entries:
    r = recs[e[lay.path_key]]
    assert r["id"] == e["id"] and r["split"] == e["split"]
    assert set(r["attributes"]) == set(synthetic.SLOT_NAMES)
    assert synthetic.is_valid(r["attributes"])
    assert r["view"] in ("front", "back", "left", "right")


def _colour_names(word: str) -> set[str]:
  return {c for c, forms in caps_lib.COLOUR_WORDS.items() if word in forms}


def test_captions_name_the_identity_attributes(generated):
  root = generated["cuhk"]
  recs = json.loads((root / synthetic.ATTRIBUTES_FILE).read_text())
  words = [w for w in (root / synthetic.ATTRIBUTE_WORDS_FILE).read_text().splitlines()
           if w and not w.startswith("#")]
  assert words == caps_lib.attribute_vocabulary()
  assert {"t-shirt", "tee", "trousers", "pants", "backpack", "red", "gray", "grey"} <= set(words)
  vocab = set(words)
  hair_map = {"black": {"black"}, "brown": {"brown"}, "blonde": set(), "grey": {"grey", "white"}}
  bad = total = 0
  for e in _load(root, "cuhk"):
    r = recs[e["file_path"]]
    a = r["attributes"]
    allowed = {a[k] for k in ("upper_colour", "pattern_colour", "lower_colour", "shoe_colour",
                              "bag_colour", "headwear_colour", "accessory_colour")}
    allowed |= hair_map[a["hair_colour"]]
    for cap, toks in zip(e["captions"], e["processed_tokens"]):
      total += 1
      assert vocab & set(toks), cap                      # names at least one attribute
      named = set().union(*[_colour_names(t) for t in toks]) if toks else set()
      bad += bool(named - allowed)                       # a colour the person does not have
      if r["view"] != "front":
        assert "logo" not in toks and "graphic" not in toks, cap
      if r["view"] == "back" and a["accessory"] == "glasses":
        assert not {"glasses", "eyeglasses", "spectacles"} & set(toks), cap
      if r["visible"]["shoes"] == 0:
        assert not set(toks) & {"sneakers", "trainers", "boots"}, cap
  assert bad <= 0.06 * total, (bad, total)               # only rare annotator slips


def test_mentioned_slots_match_text_attributes_and_visibility(generated):
  root = generated["cuhk"]
  recs = json.loads((root / synthetic.ATTRIBUTES_FILE).read_text())
  slips = total = 0
  for e in _load(root, "cuhk"):
    r = recs[e["file_path"]]
    a, vis = r["attributes"], r["visible"]
    assert len(r["mentioned"]) == len(e["captions"])
    for said, toks in zip(r["mentioned"], e["processed_tokens"]):
      total += 1
      assert set(said) <= set(synthetic.SLOT_NAMES)
      for slot, value in said.items():
        if value != a[slot]:
          assert slot.endswith("_colour") and caps_lib.CONFUSABLE[a[slot]] == value, (slot, value)
          slips += 1
        if slot.endswith("colour") and slot != "hair_colour":
          assert set(caps_lib.COLOUR_WORDS[value]) & set(toks), (slot, value, toks)
      group = {"upper_pattern": "pattern", "lower_type": "lower", "shoe_colour": "shoes",
               "bag": "bag", "accessory": "accessory", "headwear": "headwear"}
      for slot, g in group.items():
        if vis[g] == 0:
          assert slot not in said, (slot, r["view"], said)
      if "upper_pattern" in said and said["upper_pattern"] == "logo":
        assert r["view"] == "front"
  assert 0 <= slips <= 0.05 * total


def test_bpe_vocab_built_from_train_captions(generated, tmp_path):
  root = generated["cuhk"]
  train_caps = [c for e in _load(root, "cuhk") if e["split"] == "train" for c in e["captions"]]
  ref = build_bpe_vocab(train_caps, SMALL["bpe_merges"], tmp_path / "ref.txt.gz")
  assert (root / synthetic.BPE_FILE).read_bytes() == ref.read_bytes()
  tok = Tokenizer.from_pretrained(root / synthetic.BPE_FILE)
  ids = tok.encode(train_caps[0])
  assert ids and tok.decode(ids).replace(" ", "") == train_caps[0].lower().replace(" ", "")


def test_crash_leaves_no_dataset(tmp_path, monkeypatch):
  calls = []
  real = synthetic._render_identity

  def flaky(task):
    calls.append(task.index)
    if len(calls) == 3:
      raise RuntimeError("simulated crash")
    return real(task)

  monkeypatch.setattr(synthetic, "_render_identity", flaky)
  with pytest.raises(RuntimeError, match="simulated crash"):
    synthetic.generate(tmp_path, seed=0, layout="cuhk", workers=1, **SMALL)
  assert len(calls) == 3
  assert os.listdir(tmp_path) == []          # neither the root nor a partial temp dir


def test_reuse_overwrite_and_refusal(tmp_path):
  kw = dict(identities=4, images_per_identity=1, image_size=(32, 16), bpe_merges=10, workers=1)
  root = synthetic.generate(tmp_path, seed=0, layout="rstp", **kw)
  stamp = (root / "data_captions.json").stat().st_mtime_ns
  assert synthetic.generate(tmp_path, seed=0, layout="rstp", **kw) == root
  assert (root / "data_captions.json").stat().st_mtime_ns == stamp        # reused
  with pytest.raises(FileExistsError, match="other arguments"):
    synthetic.generate(tmp_path, seed=1, layout="rstp", **kw)
  root2 = synthetic.generate(tmp_path, seed=1, layout="rstp", overwrite=True, **kw)
  assert json.loads((root2 / synthetic.MANIFEST).read_text())["seed"] == 1
  assert sorted(os.listdir(tmp_path)) == ["RSTPReid"]
  real = tmp_path / "real"
  (real / "CUHK-PEDES").mkdir(parents=True)
  (real / "CUHK-PEDES" / "reid_raw.json").write_text("[]")
  with pytest.raises(FileExistsError, match="not a synthetic dataset"):
    synthetic.generate(real, seed=0, layout="cuhk", overwrite=True, **kw)
  assert (real / "CUHK-PEDES" / "reid_raw.json").read_text() == "[]"


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="layout"):
    synthetic.generate(tmp_path, identities=10, seed=0, layout="market")
  with pytest.raises(ValueError, match="too small"):
    synthetic.generate(tmp_path, identities=2, seed=0, layout="cuhk")
  with pytest.raises(ValueError, match="image_size"):
    synthetic.generate(tmp_path, identities=10, seed=0, image_size=(384,))
  with pytest.raises(ValueError, match="images_per_identity"):
    synthetic.generate(tmp_path, identities=10, seed=0, images_per_identity=0)
  assert os.listdir(tmp_path) == []


def test_mutate_one_changes_exactly_one_valid_slot():
  rng = np.random.default_rng(0)
  for _ in range(300):
    a = synthetic.sample_attributes(rng)
    assert synthetic.is_valid(a)
    b = synthetic.mutate_one(a, rng)
    assert synthetic.is_valid(b)
    assert sum(a[k] != b[k] for k in a) == 1
  bad = dict(a, upper_type="dress", lower_type="jeans")
  assert not synthetic.is_valid(bad)


def test_cli_and_sample_sheet(tmp_path, capsys):
  rc = synthetic.main([f"--out={tmp_path}", "--identities=20", "--seed=2", "--layout=icfg",
                       "--images_per_identity=2", "--image_size=64,32", "--workers=1",
                       "--bpe_merges=20", f"--sample_sheet={tmp_path / 'sheet.png'}"])
  assert rc == 0
  assert (tmp_path / "ICFG-PEDES" / "ICFG-PEDES.json").is_file()
  with Image.open(tmp_path / "sheet.png") as im:
    assert im.size[0] > 500 and im.size[1] > 500
  assert "ICFG-PEDES" in capsys.readouterr().out
