"""Retrieval metrics: hand-computed cases with ties, and parity with a full stable-argsort rank()."""
import jax.numpy as jnp
import numpy as np
import pytest

from tipr_jax.eval import rank_of_first_hit
from tipr_jax.eval import retrieval_metrics
from tipr_jax.eval import retrieval_metrics_from_features


def reference_rank(sim, q_pids, g_pids, max_rank=10):
  """The reference's rank() (spec §8) with a *stable* descending argsort, in float64 numpy."""
  sim = np.asarray(sim)
  idx = np.argsort(-sim, axis=1, kind="stable")
  matches = g_pids[idx] == q_pids[:, None]
  cmc = np.minimum(matches[:, :max_rank].cumsum(1), 1)
  num_rel = matches.sum(1)
  cum = matches.cumsum(1)
  ap = ((cum / np.arange(1, sim.shape[1] + 1)) * matches).sum(1) / num_rel
  last = sim.shape[1] - np.argmax(matches[:, ::-1], axis=1)  # 1-based rank of the last positive
  inp = num_rel / last
  # With fewer than k gallery items the reference would fail to index cmc[k - 1]; R@k = R@G then.
  out = {f"R{k}": cmc[:, min(k, sim.shape[1]) - 1].mean() * 100 for k in (1, 5, 10) if k <= max_rank}
  out.update(mAP=ap.mean() * 100, mINP=inp.mean() * 100)
  return out, np.argmax(matches, axis=1) + 1


def assert_metrics(got, expected, tol=1e-10):
  assert set(got) == set(expected), (got, expected)
  for k, v in expected.items():
    assert isinstance(got[k], float)
    assert abs(got[k] - v) <= tol, (k, got[k], v)


# Hand case A: 4 text queries, 6 gallery images, several positives per query and exact ties.
GALLERY_PIDS_A = np.array([1, 2, 1, 3, 1, 2])
QUERY_PIDS_A = np.array([1, 2, 3, 1])
SIM_A = np.array([
    # q0 (pid 1): order g3 .95, g0 .9*, g1 .8, g4 .5*, g5 .3, g2 .1* -> positive ranks 2, 4, 6:
    #   AP = (1/2 + 2/4 + 3/6) / 3 = 1/2, INP = 3/6, first hit 2.
    [0.9, 0.8, 0.1, 0.95, 0.5, 0.3],
    # q1 (pid 2): g4 .9, then the tie at .7 in gallery order g0, g1*, g2, g5*, then g3 -> ranks 3, 5:
    #   AP = (1/3 + 2/5) / 2 = 11/30, INP = 2/5, first hit 3.
    [0.7, 0.7, 0.7, 0.2, 0.9, 0.7],
    # q2 (pid 3): g3* ties with g4 (.4) and comes first (lower index) -> rank 1: AP = INP = 1.
    [0.1, 0.2, 0.3, 0.4, 0.4, 0.0],
    # q3 (pid 1): g1 .6, g3 .6, g0 .5*, g2 .2*, g4 .2*, g5 .1 -> ranks 3, 4, 5:
    #   AP = (1/3 + 2/4 + 3/5) / 3 = 43/90, INP = 3/5, first hit 3.
    [0.5, 0.6, 0.2, 0.6, 0.2, 0.1],
], np.float32)
EXPECTED_A = {
    "R1": 100 * 1 / 4,  # only q2 hits at rank 1
    "R5": 100.0, "R10": 100.0,  # first hits 2, 3, 1, 3
    "mAP": 100 * (1 / 2 + 11 / 30 + 1 + 43 / 90) / 4,  # = 100 * 211/360
    "mINP": 100 * (1 / 2 + 2 / 5 + 1 + 3 / 5) / 4,  # = 62.5
}


def test_hand_case_with_ties():
  assert_metrics(retrieval_metrics(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A), EXPECTED_A)
  np.testing.assert_array_equal(rank_of_first_hit(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A), [2, 3, 1, 3])
  # The independent full-sort implementation agrees with the hand-written numbers.
  assert_metrics(reference_rank(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A)[0], EXPECTED_A)


def test_hand_case_image_to_text():
  # i2t: each gallery image ranks the 4 texts (columns of SIM_A; text pids 1, 2, 3, 1).
  # g0 (pid 1) [.9 .7 .1 .5]: q0* q1 q3* q2 -> ranks 1, 3: AP (1 + 2/3)/2 = 5/6, INP 2/3.
  # g1 (pid 2) [.8 .7 .2 .6]: q0 q1* -> rank 2: AP 1/2, INP 1/2.
  # g2 (pid 1) [.1 .7 .3 .2]: q1 q2 q3* q0* -> ranks 3, 4: AP (1/3 + 2/4)/2 = 5/12, INP 1/2.
  # g3 (pid 3) [.95 .2 .4 .6]: q0 q3 q2* -> rank 3: AP 1/3, INP 1/3.
  # g4 (pid 1) [.5 .9 .4 .2]: q1 q0* q2 q3* -> ranks 2, 4: AP (1/2 + 2/4)/2 = 1/2, INP 1/2.
  # g5 (pid 2) [.3 .7 0 .1]: q1* -> rank 1: AP 1, INP 1.
  expected = {
      "R1": 100 * 2 / 6, "R5": 100.0, "R10": 100.0,
      "mAP": 100 * (5 / 6 + 1 / 2 + 5 / 12 + 1 / 3 + 1 / 2 + 1) / 6,  # = 100 * 43/72
      "mINP": 100 * (2 / 3 + 1 / 2 + 1 / 2 + 1 / 3 + 1 / 2 + 1) / 6,  # = 100 * 7/12
  }
  assert_metrics(retrieval_metrics(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A, direction="i2t"), expected)
  np.testing.assert_array_equal(
      rank_of_first_hit(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A, direction="i2t"), [1, 2, 3, 3, 2, 1])


def test_hand_case_deep_hit_and_max_rank():
  # One query (pid 7); its only positive is 7th of 8 by similarity: R1 = R5 = 0, R10 = 100,
  # AP = 1/7, INP = 1/7.
  sim = np.arange(8, 0, -1, dtype=np.float32)[None] / 10
  got = retrieval_metrics(sim, np.array([7]), np.arange(1, 9))
  assert_metrics(got, {"R1": 0.0, "R5": 0.0, "R10": 100.0, "mAP": 100 / 7, "mINP": 100 / 7})
  got = retrieval_metrics(sim, np.array([7]), np.arange(1, 9), max_rank=5)
  assert_metrics(got, {"R1": 0.0, "R5": 0.0, "mAP": 100 / 7, "mINP": 100 / 7})


def _random_case(seed, q, g, ids, ties):
  rng = np.random.default_rng(seed)
  g_pids = rng.integers(0, ids, g)
  # Every query has a positive image and every image a positive text (needed for i2t).
  q_pids = rng.permutation(np.concatenate([np.unique(g_pids), rng.choice(g_pids, q - ids)]))
  if ties:  # few distinct values: many exact ties, also between positives and negatives
    sim = (rng.integers(-3, 4, (q, g)) / 4).astype(np.float32)
  else:
    sim = rng.standard_normal((q, g)).astype(np.float32)
  return sim, q_pids, g_pids


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True), (3, False)])
def test_random_cases_match_stable_argsort_reference(seed, ties):
  sim, q_pids, g_pids = _random_case(seed, 67, 301, 23, ties)
  expected, first = reference_rank(sim, q_pids, g_pids)
  full = retrieval_metrics(sim, q_pids, g_pids, chunk_size=1000)
  assert_metrics(full, expected)
  for chunk in (1, 5, 32):  # chunking gives identical numbers
    assert retrieval_metrics(sim, q_pids, g_pids, chunk_size=chunk) == full
  np.testing.assert_array_equal(rank_of_first_hit(sim, q_pids, g_pids, chunk_size=7), first)
  # Image-to-text is the reference's rank(similarity.T, gallery_pids, query_pids).
  expected_i2t, first_i2t = reference_rank(sim.T, g_pids, q_pids)
  i2t = retrieval_metrics(sim, q_pids, g_pids, direction="i2t", chunk_size=50)
  assert_metrics(i2t, expected_i2t)
  assert retrieval_metrics(sim, q_pids, g_pids, direction="i2t", chunk_size=3) == i2t
  np.testing.assert_array_equal(rank_of_first_hit(sim, q_pids, g_pids, direction="i2t"), first_i2t)
  # A jax array input gives the same result.
  assert retrieval_metrics(jnp.asarray(sim), q_pids, g_pids, chunk_size=9) == full


def test_tie_rule_is_by_gallery_index_not_reversed():
  """A positive tied with a negative ranks ahead of it only if its gallery index is lower."""
  sim = np.array([[0.5, 0.5]], np.float32)
  assert rank_of_first_hit(sim, np.array([1]), np.array([1, 2]))[0] == 1
  assert rank_of_first_hit(sim, np.array([2]), np.array([1, 2]))[0] == 2
  # float64 input is ranked as float32 (like the reference's float32 evaluation).
  sim64 = np.array([[0.1 + 1e-12, 0.1]])
  assert rank_of_first_hit(sim64, np.array([2]), np.array([1, 2]))[0] == 2


def _power_of_two_features(seed, n, d, scale):
  """Rows with four entries of +-1 (norm exactly 2), times random powers of two: exact arithmetic."""
  rng = np.random.default_rng(seed)
  x = np.zeros((n, d), np.float32)
  for i in range(n):
    x[i, rng.choice(d, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
  if scale:
    x *= 2.0 ** rng.integers(-3, 4, (n, 1))
  return x


def test_features_path_equals_similarity_path():
  rng = np.random.default_rng(5)
  qf = _power_of_two_features(6, 53, 8, scale=True)
  gf = _power_of_two_features(7, 97, 8, scale=True)
  g_pids = rng.integers(0, 9, 97)
  q_pids = rng.choice(g_pids, 53)
  # Without normalisation the dot products are small exact integers (times powers of two): ties galore.
  sim = qf @ gf.T
  for direction in ("t2i", "i2t"):
    expected = retrieval_metrics(sim, q_pids, g_pids, direction=direction)
    assert_metrics(reference_rank(sim if direction == "t2i" else sim.T,
                                  *((q_pids, g_pids) if direction == "t2i" else (g_pids, q_pids)))[0],
                   expected)
    for chunk in (None, 4, 1000):
      got = retrieval_metrics_from_features(qf, gf, q_pids, g_pids, chunk_size=chunk, normalize=False,
                                            direction=direction)
      assert got == expected, (direction, chunk)
  # With normalisation every row becomes +-1/2 entries (norm 2 divides exactly).
  sim_n = (qf / np.linalg.norm(qf, axis=1, keepdims=True)) @ (gf / np.linalg.norm(gf, axis=1, keepdims=True)).T
  got = retrieval_metrics_from_features(jnp.asarray(qf), jnp.asarray(gf), q_pids, g_pids, chunk_size=8)
  assert got == retrieval_metrics(sim_n, q_pids, g_pids)
  assert got != retrieval_metrics_from_features(qf, gf, q_pids, g_pids, normalize=False)


def test_sharded_jax_inputs():
  """Arrays sharded over the test's 8 CPU devices (e.g. an encoder's output) are accepted."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  sharded = NamedSharding(mesh, P("data"))
  sim, q_pids, g_pids = _random_case(10, 64, 96, 12, ties=True)
  expected = retrieval_metrics(sim, q_pids, g_pids)
  assert retrieval_metrics(jax.device_put(sim, sharded), q_pids, g_pids) == expected
  qf = _power_of_two_features(11, 64, 8, scale=False)
  gf = _power_of_two_features(12, 96, 8, scale=False)
  expected = retrieval_metrics_from_features(qf, gf, q_pids, g_pids)
  got = retrieval_metrics_from_features(jax.device_put(qf, sharded), jax.device_put(gf, sharded), q_pids,
                                        g_pids)
  assert got == expected


def test_features_path_random_float_features():
  rng = np.random.default_rng(8)
  qf = rng.standard_normal((40, 16)).astype(np.float32)
  gf = rng.standard_normal((70, 16)).astype(np.float32)
  g_pids = rng.integers(0, 10, 70)
  q_pids = rng.choice(g_pids, 40)
  qn = qf.astype(np.float64) / np.linalg.norm(qf, axis=1, keepdims=True)
  gn = gf.astype(np.float64) / np.linalg.norm(gf, axis=1, keepdims=True)
  expected, _ = reference_rank(qn @ gn.T, q_pids, g_pids)
  assert_metrics(retrieval_metrics_from_features(qf, gf, q_pids, g_pids, chunk_size=16), expected)


def test_query_without_positive_raises_with_index():
  q_pids = np.array([1, 2, 5, 3])
  with pytest.raises(ValueError, match=r"query 2 \(pid 5\)"):
    retrieval_metrics(SIM_A, q_pids, GALLERY_PIDS_A)
  with pytest.raises(ValueError, match="query 2"):
    retrieval_metrics_from_features(np.ones((4, 3)), np.ones((6, 3)), q_pids, GALLERY_PIDS_A)
  # i2t: gallery image 3 (pid 3) has no caption of pid 3 among texts [1, 2, 1, 1].
  with pytest.raises(ValueError, match=r"query 3 \(pid 3\)"):
    retrieval_metrics(SIM_A, np.array([1, 2, 1, 1]), GALLERY_PIDS_A, direction="i2t")


def test_bad_inputs_raise():
  sim = SIM_A.copy()
  sim[1, 2] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    retrieval_metrics(sim, QUERY_PIDS_A, GALLERY_PIDS_A)
  with pytest.raises(ValueError, match="direction"):
    retrieval_metrics(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A, direction="x2y")
  with pytest.raises(ValueError, match="query_pids has 3 entries"):
    retrieval_metrics(SIM_A, QUERY_PIDS_A[:3], GALLERY_PIDS_A)
  with pytest.raises(ValueError, match="2-D"):
    retrieval_metrics(SIM_A[0], QUERY_PIDS_A, GALLERY_PIDS_A)
  with pytest.raises(ValueError, match="chunk_size"):
    retrieval_metrics(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A, chunk_size=0)
  with pytest.raises(ValueError, match="max_rank"):
    retrieval_metrics(SIM_A, QUERY_PIDS_A, GALLERY_PIDS_A, max_rank=0)
  with pytest.raises(ValueError, match=r"\[Q, D\] and \[G, D\]"):
    retrieval_metrics_from_features(np.ones((4, 3)), np.ones((6, 2)), QUERY_PIDS_A, GALLERY_PIDS_A)


def test_larger_case_with_identity_structure():
  """CUHK-like structure (several images per id, 2 captions per image) at a few thousand entries."""
  rng = np.random.default_rng(9)
  g_pids = rng.integers(0, 300, 900)
  q_pids = np.repeat(g_pids, 2)
  centers = rng.standard_normal((300, 32))
  gf = centers[g_pids] + rng.standard_normal((900, 32))
  qf = centers[q_pids] + rng.standard_normal((1800, 32))
  sim = (qf @ gf.T).astype(np.float32)
  expected, first = reference_rank(sim, q_pids, g_pids)
  got = retrieval_metrics(sim, q_pids, g_pids, chunk_size=256)
  assert_metrics(got, expected)
  assert 10 < got["R1"] < 95  # a non-degenerate case
  np.testing.assert_array_equal(rank_of_first_hit(sim, q_pids, g_pids), first)
