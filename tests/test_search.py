"""tipr_jax.search: exact chunked top-k, the index, queries against a smoke checkpoint, the CLI, the picture."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from tipr_jax.data import pipeline, transforms
from tipr_jax.eval import rank_of_first_hit, retrieval_metrics
from tipr_jax.search import grid, topk
from tipr_jax.search import index as index_lib
from tipr_jax.search import model as model_lib
from tipr_jax.search import query as query_lib
from tipr_jax.search.__main__ import main as cli_main, read_queries_file

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ top-k (no model)


def _reference_topk(q, g16, k):
  """Stable descending sort of the float64 scores of the float16 rows: (scores, indices) [Q, k]."""
  s = np.asarray(q, np.float64) @ g16.astype(np.float64).T
  idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(s, idx, axis=1), idx


@pytest.mark.parametrize("g_size,budget", [(3, 1 << 20), (37, 1 << 20), (5000, 1 << 20),
                                           (5000, 64 << 20), (70001, 2 << 20)])
def test_topk_equals_a_full_stable_sort(g_size, budget):
  rng = np.random.default_rng(g_size)
  g = rng.standard_normal((g_size, 48)).astype(np.float16)
  q = rng.standard_normal((13, 48)).astype(np.float32)
  gallery = topk.make_gallery(g)
  assert gallery.array.dtype == np.float16 and len(gallery.array.sharding.device_set) == 8
  k = 10
  scores, idx = topk.top_k(q, gallery, k, memory_budget_bytes=budget)
  ref_s, ref_i = _reference_topk(q, g, min(k, g_size))
  assert scores.dtype == np.float32 and idx.shape == (13, min(k, g_size))
  np.testing.assert_array_equal(idx, ref_i)
  np.testing.assert_allclose(scores, ref_s, rtol=0, atol=2e-5)


def test_topk_ties_go_to_the_lower_gallery_index():
  rng = np.random.default_rng(0)
  base = rng.standard_normal((4, 16)).astype(np.float16)
  g = np.concatenate([base[rng.integers(0, 4, 3000)], base]).astype(np.float16)  # many exact ties
  q = rng.standard_normal((5, 16)).astype(np.float32)
  scores, idx = topk.top_k(q, topk.make_gallery(g), 25, memory_budget_bytes=1 << 20)
  _, ref = _reference_topk(q, g, 25)
  np.testing.assert_array_equal(idx, ref)
  for row, srow in zip(idx, scores):  # within equal scores, increasing index
    for a in range(len(row) - 1):
      if srow[a] == srow[a + 1]:
        assert row[a] < row[a + 1]


@pytest.mark.parametrize("queries,budget", [(1, 1 << 20), (64, 1 << 20), (300, 4 << 20),
                                            (256, 64 << 20)])
def test_topk_working_memory_stays_within_the_budget(queries, budget):
  g_size, d, k = 200_000, 64, 10
  gallery = topk.make_gallery(np.zeros((g_size, d), np.float16))
  qb, c = topk.plan(queries, gallery, budget, k)
  search = topk._searcher(gallery.mesh, gallery.rows_per_device, c, k)  # pylint: disable=protected-access
  compiled = search.lower(jax.ShapeDtypeStruct((qb, d), np.float32), gallery.array,
                          np.int32(g_size)).compile()
  temp_per_device = compiled.memory_analysis().temp_size_in_bytes
  assert 8 * temp_per_device <= budget


def test_topk_bad_input():
  gallery = topk.make_gallery(np.ones((10, 8), np.float16))
  with pytest.raises(ValueError, match=r"queries must be \[Q, 8\]"):
    topk.top_k(np.ones((2, 7)), gallery, 3)
  with pytest.raises(ValueError, match="k must be a positive int"):
    topk.top_k(np.ones((2, 8)), gallery, 0)
  with pytest.raises(ValueError, match="query 1 has non-finite"):
    topk.top_k(np.array([[1.0] * 8, [np.nan] * 8]), gallery, 3)
  with pytest.raises(ValueError, match="too small"):
    topk.top_k(np.ones((2, 8)), gallery, 3, memory_budget_bytes=1000)
  with pytest.raises(ValueError, match="non-empty"):
    topk.make_gallery(np.zeros((0, 8), np.float16))
  s, i = topk.top_k(np.ones((1, 8)), gallery, 50)  # k > G: the whole gallery
  assert i.shape == (1, 10) and sorted(i[0].tolist()) == list(range(10))


# ------------------------------------------------------------------------------ index files


def _meta(**kw):
  return dict({"format": index_lib.FORMAT, "fingerprint": "f" * 64, "checkpoint": "/ckpt",
               "source": {"kind": "folder", "root": "/nowhere"}, "skipped": []}, **kw)


def test_write_index_is_atomic_and_never_overwrites_other_files(tmp_path, monkeypatch):
  out = tmp_path / "idx"
  emb = np.eye(3, 4, dtype=np.float32)
  index_lib.write_index(str(out), emb, ["a.jpg", "b.jpg", "c.jpg"], [1, 2, 1], _meta())
  idx = index_lib.load_index(str(out))
  assert idx.names == ["a.jpg", "b.jpg", "c.jpg"] and idx.identities == [1, 2, 1]
  assert idx.embeddings().dtype == np.float16
  np.testing.assert_array_equal(idx.embeddings(), emb.astype(np.float16))

  def failing_save(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(index_lib.np, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    index_lib.write_index(str(out), emb[:2], ["x.jpg", "y.jpg"], None, _meta())
  monkeypatch.undo()
  assert index_lib.load_index(str(out)).names == ["a.jpg", "b.jpg", "c.jpg"]  # old index intact
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left behind

  index_lib.write_index(str(out), emb[:2], ["x.jpg", "y.jpg"], None, _meta())  # replaces
  assert index_lib.load_index(str(out)).names == ["x.jpg", "y.jpg"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]

  other = tmp_path / "photos"
  other.mkdir()
  (other / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not a search index"):
    index_lib.write_index(str(other), emb, ["a", "b", "c"], None, _meta())
  assert (other / "keep.txt").read_text() == "mine"


def test_load_index_rejects_what_is_not_a_consistent_index(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a search index"):
    index_lib.load_index(str(tmp_path))
  out = tmp_path / "idx"
  index_lib.write_index(str(out), np.ones((2, 4)), ["a", "b"], None, _meta())
  meta = json.loads((out / "meta.json").read_text())
  (out / "meta.json").write_text(json.dumps(dict(meta, count=3)))
  with pytest.raises(ValueError, match="embeddings.npy"):
    index_lib.load_index(str(out))


def test_queries_file(tmp_path):
  f = tmp_path / "q.txt"
  f.write_text("# demo queries\n\na man in a red jacket\n17\ta woman with a white bag\n")
  assert read_queries_file(str(f)) == (["a man in a red jacket", "a woman with a white bag"],
                                       [None, "17"])
  f.write_text("3\t   \n")
  with pytest.raises(ValueError, match="line 1: empty query"):
    read_queries_file(str(f))
  f.write_text("\n# nothing\n")
  with pytest.raises(ValueError, match="holds no query"):
    read_queries_file(str(f))
  with pytest.raises(FileNotFoundError):
    read_queries_file(str(tmp_path / "missing.txt"))


def test_grid_outlines_hits_green_and_misses_red(tmp_path):
  colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
  images = [Image.new("RGB", (20, 50), c) for c in colours]
  matches = [query_lib.Match(rank=r + 1, index=i, file=f"{i}.png", score=0.5 - 0.1 * r,
                             identity=i, hit=hit)
             for r, (i, hit) in enumerate([(2, True), (0, False), (1, None)])]
  res = query_lib.QueryResult(query="a person in blue", identity=2, identity_source="given",
                              relevant=1, matches=matches)
  pic = grid.draw_grid([res], lambda i: images[i], str(tmp_path / "g.png"), thumb=(40, 100))
  assert Image.open(tmp_path / "g.png").size == pic.size
  cell = 40 + 2 * grid.BORDER
  top = None
  for y in range(pic.height):  # first row of the first image cell's border
    if pic.getpixel((grid.MARGIN + 1, y)) == grid.HIT:
      top = y
      break
  assert top is not None
  for col, (want_border, want_inside) in enumerate([(grid.HIT, colours[2]),
                                                    (grid.MISS, colours[0]),
                                                    (grid.UNKNOWN, colours[1])]):
    x0 = grid.MARGIN + col * (cell + grid.GAP)
    assert pic.getpixel((x0 + 1, top + 1)) == want_border
    assert pic.getpixel((x0 + cell // 2, top + grid.BORDER + 50)) == want_inside  # rank order
  with pytest.raises(ValueError, match="no results"):
    grid.draw_grid([], lambda i: images[i])


def test_grid_text_fits_with_few_results_and_missing_images_are_reported(tmp_path):
  long_query = "a person in blue " * 12
  matches = [query_lib.Match(rank=1, index=0, file="gone/0.png", score=0.5, identity=7, hit=False)]
  res = query_lib.QueryResult(query=long_query, identity=3, identity_source="caption",
                              relevant=2, matches=matches, truncated=True)

  def image(i):
    raise FileNotFoundError(f"no image {i}")

  with pytest.warns(UserWarning, match=r"1 result image\(s\) could not be read.*gone/0.png"):
    pic = grid.draw_grid([res], image, str(tmp_path / "g.png"), thumb=(40, 100))
  assert pic.width >= grid.MIN_WIDTH
  # Every header line fits: nothing is drawn in the right margin above the images.
  cell_top = next(y for y in range(pic.height) if pic.getpixel((grid.MARGIN + 1, y)) == grid.MISS)
  for y in range(cell_top):
    for x in range(pic.width - grid.MARGIN + 2, pic.width):
      assert pic.getpixel((x, y)) == (255, 255, 255), (x, y)


def test_fingerprint_follows_every_parameter_and_the_model_config():
  import jax.numpy as jnp
  from ml_collections import config_dict
  cfg = config_dict.ConfigDict({"method": "irra", "model": {"embed_dim": 8}})
  params = {"b": {"w": jnp.ones((2, 3), jnp.bfloat16)}, "a": jnp.float32(2.0)}
  fp = model_lib.fingerprint(params, cfg)
  assert fp == model_lib.fingerprint({"a": jnp.float32(2.0), "b": {"w": jnp.ones((2, 3),
                                                                           jnp.bfloat16)}}, cfg)
  w = np.ones((2, 3), np.float32)
  w[1, 2] = np.nextafter(np.float32(1), np.float32(2))  # one bit
  others = [{"b": {"w": jnp.asarray(w)}, "a": jnp.float32(2.0)},
            {"b": {"w": jnp.ones((3, 2), jnp.bfloat16)}, "a": jnp.float32(2.0)},
            {"b": {"v": jnp.ones((2, 3), jnp.bfloat16)}, "a": jnp.float32(2.0)}]
  fps = {fp} | {model_lib.fingerprint(p, cfg) for p in others}
  fps.add(model_lib.fingerprint(params, config_dict.ConfigDict({"method": "irra",
                                                                "model": {"embed_dim": 9}})))
  assert len(fps) == 5


# ------------------------------------------------------------------------------ smoke checkpoint


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # one device: no collectives to wait for on a loaded machine
  return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  """A smoke training run on 48 synthetic identities: (workdir, prepared data_dir, raw images)."""
  root = tmp_path_factory.mktemp("search_smoke")
  cmd = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT}/configs/synthetic.py:smoke",
         f"--workdir={root}/w", f"--config.data.manual_dir={root}/raw",
         f"--config.data.data_dir={root}/tfds", "--config.data.synthetic.identities=48",
         "--config.train.batch_size=32"]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  (data_dir,) = list((root / "tfds").iterdir())
  (raw,) = list((root / "raw").iterdir())
  return root / "w", data_dir, raw / "CUHK-PEDES" / "imgs"


@pytest.fixture(scope="module")
def model(smoke):
  return model_lib.load_model(str(smoke[0]))


@pytest.fixture(scope="module")
def test_split(smoke, model):
  return pipeline.make_eval_data(data_dir=smoke[1], dataset="synthetic", tokenizer=model.tokenizer,
                                 split="test", batch_size=16, image_size=model.image_size)


@pytest.fixture(scope="module")
def built_index(smoke, model, tmp_path_factory):
  out = tmp_path_factory.mktemp("idx") / "test_split"
  report = index_lib.build_index(model, str(smoke[1]), str(out), batch_size=8, progress=False)
  assert report.count > 0 and report.skipped == []
  return index_lib.load_index(str(out))


def _encode_one(model, img) -> np.ndarray:
  """One image (PIL or uint8 array), test-transformed and encoded alone: float32 [D]."""
  img = Image.fromarray(img) if isinstance(img, np.ndarray) else img
  x = transforms.test_transform(img.convert("RGB"), model.image_size)
  batch = np.zeros((8, *x.shape), x.dtype)
  batch[0] = x
  return model.encode_images(batch)[0]


def test_index_holds_each_gallery_image_embedding(model, test_split, built_index):
  idx = built_index
  assert idx.names == test_split.gallery_paths
  assert idx.identities == test_split.gallery_pids.tolist()
  assert idx.fingerprint == model.fingerprint and idx.meta["source"]["kind"] == "prepared"
  emb = idx.embeddings()
  assert emb.dtype == np.float16 and emb.shape[0] == test_split.num_gallery
  for i in range(test_split.num_gallery):  # image by image, independently of the batching
    want = _encode_one(model, test_split.gallery_image(i))
    np.testing.assert_allclose(emb[i].astype(np.float32), want, atol=2e-3, rtol=2e-3)
  np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)


@pytest.mark.filterwarnings("ignore::tipr_jax.search.model.QueryTruncatedWarning")
def test_query_ranks_where_retrieval_metrics_says(model, test_split, built_index):
  """Acceptance: each test caption finds its identity's images at the rank the metrics compute."""
  idx = built_index
  g = idx.size
  k = min(5, g - 1)
  searcher = query_lib.Searcher(idx, model, memory_budget_bytes=1 << 20)
  captions = test_split.query_captions
  results = searcher.search(captions, k=k)
  q = model.encode_queries(captions)
  sim = q.astype(np.float64) @ idx.embeddings().astype(np.float64).T  # full [Q, G], independent
  first = rank_of_first_hit(sim, test_split.query_pids, test_split.gallery_pids)
  metrics = retrieval_metrics(sim, test_split.query_pids, test_split.gallery_pids)
  order = np.argsort(-sim, axis=1, kind="stable")
  found = []
  for qi, r in enumerate(results):
    pid = int(test_split.query_pids[qi])
    assert r.identity == pid and r.identity_source == "caption"
    assert r.relevant == int(np.sum(test_split.gallery_pids == pid))
    assert [m.index for m in r.matches] == order[qi, :k].tolist()
    np.testing.assert_allclose([m.score for m in r.matches], sim[qi, order[qi, :k]], atol=1e-5)
    assert [m.hit for m in r.matches] == [bool(test_split.gallery_pids[m.index] == pid)
                                          for m in r.matches]
    assert [m.file for m in r.matches] == [idx.names[m.index] for m in r.matches]
    hit_ranks = [m.rank for m in r.matches if m.hit]
    found.append(hit_ranks[0] if hit_ranks else None)
    assert found[-1] == (first[qi] if first[qi] <= k else None)
  for kk in (1, 5):
    if kk <= k:
      assert metrics[f"R{kk}"] == pytest.approx(
          100.0 * np.mean([f is not None and f <= kk for f in found]))


def test_empty_and_too_long_queries(model, built_index):
  for bad in ("", "   \n"):
    with pytest.raises(ValueError, match="query 2 is empty"):
      model.encode_queries(["a man", bad])
  tok = model.tokenizer
  text = " ".join(["a tall woman in a long red coat carrying a black backpack"] * 8)
  with pytest.warns(model_lib.QueryTruncatedWarning, match="query 1 has .* truncated"):
    ids = model.tokenize([text])
  n = model.context_length
  np.testing.assert_array_equal(ids[0], tok.pad(tok.encode(text)[:n - 2]))
  assert ids[0, -1] == tok.eot_id
  with pytest.warns(model_lib.QueryTruncatedWarning):
    res = query_lib.Searcher(built_index, model).search([text, "a man"], k=3)
  assert res[0].truncated and not res[1].truncated


def test_an_index_from_another_checkpoint_is_refused(smoke, model, built_index, capsys):
  workdir = smoke[0]
  best = model.checkpoint
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  other = next(str(workdir / "checkpoints" / str(s) / "state") for s in steps
               if not best.endswith(f"/{s}/params"))
  other_model = model_lib.load_model(other)
  assert other_model.fingerprint != model.fingerprint
  with pytest.raises(index_lib.IndexMismatchError) as err:
    query_lib.Searcher(built_index, other_model)
  assert model.fingerprint[:16] in str(err.value) and other_model.fingerprint[:16] in str(err.value)
  rc = cli_main(["query", f"--index={built_index.path}", f"--checkpoint={other}", "a man"])
  err_text = capsys.readouterr().err
  assert rc == 1 and model.fingerprint[:16] in err_text and other_model.fingerprint[:16] in err_text


def test_folder_gallery_skips_unreadable_images(smoke, model, tmp_path):
  src = sorted(p for p in smoke[2].rglob("*") if p.suffix in (".png", ".jpg"))[:10]
  folder = tmp_path / "gallery"
  for n, p in enumerate(src):
    dest = folder / f"person{n % 3}" / f"{n:02d}{p.suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(p, dest)
  (folder / "person0" / "03b_text.jpg").write_text("not an image")
  (folder / "person1" / "04b_empty.png").write_bytes(b"")
  (folder / "person2" / "05b_cut.png").write_bytes(src[0].read_bytes()[:60])
  (folder / "notes.txt").write_text("ignored: not an image extension")
  out = tmp_path / "idx"
  report = index_lib.build_index(model, str(folder), str(out), identity="dir", batch_size=8,
                                 progress=False)
  bad = ["person0/03b_text.jpg", "person1/04b_empty.png", "person2/05b_cut.png"]
  assert sorted(s["file"] for s in report.skipped) == bad
  assert report.count == len(src)
  idx = index_lib.load_index(str(out))
  assert sorted(s["file"] for s in idx.meta["skipped"]) == bad
  assert idx.names == sorted(idx.names) and not set(bad) & set(idx.names)
  assert idx.identities == [n.split("/")[0] for n in idx.names]
  emb = idx.embeddings()
  for i, name in enumerate(idx.names):  # rows stay aligned with names across skips and batches
    want = _encode_one(model, Image.open(folder / name))
    np.testing.assert_allclose(emb[i].astype(np.float32), want, atol=2e-3, rtol=2e-3)

  rc = cli_main(["index", f"--checkpoint={smoke[0]}", f"--images={folder}",
                 f"--out={tmp_path / 'cli_idx'}", "--no_progress"])
  assert rc == 0
  for name in bad:
    assert (folder / name).exists()
  only_bad = tmp_path / "bad"
  only_bad.mkdir()
  (only_bad / "x.jpg").write_text("no")
  with pytest.raises(ValueError, match="no readable image"):
    index_lib.build_index(model, str(only_bad), str(tmp_path / "idx3"), progress=False)
  assert not (tmp_path / "idx3").exists()


@pytest.mark.filterwarnings("ignore::tipr_jax.search.model.QueryTruncatedWarning")
def test_cli_query_json_text_and_picture(smoke, built_index, test_split, tmp_path, capsys):
  caption = test_split.query_captions[0]
  qfile = tmp_path / "queries.txt"
  qfile.write_text(f"# from the test split\n{caption}\n"
                   f"{test_split.query_pids[-1]}\t{test_split.query_captions[-1]}\n")
  png = tmp_path / "grid.png"
  rc = cli_main(["query", f"--index={built_index.path}", "a person in a green shirt",
                 f"--queries_file={qfile}", "--top_k=3", "--json", f"--out={png}"])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  out = json.loads(captured.out)
  assert [q["query"] for q in out["queries"]] == ["a person in a green shirt", caption,
                                                  test_split.query_captions[-1]]
  assert out["queries"][0]["identity"] is None
  assert out["queries"][1]["identity"] == int(test_split.query_pids[0])
  # A given identity ("ID<TAB>" text) takes the index's type: the same int as a caption's.
  assert out["queries"][2]["identity"] == int(test_split.query_pids[-1])
  assert out["queries"][2]["identity_source"] == "given"
  for q in out["queries"]:
    assert [m["rank"] for m in q["results"]] == [1, 2, 3]
    assert all(a["score"] >= b["score"] for a, b in zip(q["results"], q["results"][1:]))
  assert Image.open(png).size[0] > 3 * 96
  rc = cli_main(["query", f"--index={built_index.path}", caption, "--top_k=2"])
  text = capsys.readouterr().out
  assert rc == 0 and text.startswith("query 1: ") and len(text.strip().splitlines()) == 3
  assert cli_main(["query", f"--index={built_index.path}", ""]) == 1
  assert "query 1 is empty" in capsys.readouterr().err
  # A reader that leaves early (`| head`) ends the command quietly, without a traceback.
  proc = subprocess.Popen([sys.executable, "-m", "tipr_jax.search", "query",
                           f"--index={built_index.path}", caption, "--top_k=5"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
  proc.stdout.close()  # gone before the results are written (the model takes seconds to load)
  err = proc.stderr.read().decode()
  assert proc.wait(timeout=300) == 141 and "Traceback" not in err, err
  with pytest.raises(SystemExit) as exit_info:
    cli_main(["query", f"--index={built_index.path}", "a", "b", "--identity=3"])
  assert exit_info.value.code == 2
