"""Tests of tipr_jax.losses.probabilistic against float64 numpy loop re-derivations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tipr_jax.losses import irra
from tipr_jax.losses import probabilistic as pl


_STATIC = dict(wasserstein2_similarity=("normalize",), hnm_loss=("cap",),
               fused_similarity=("prob_as_sum",), entropy_margin_reg=("exact_std_entropy",),
               reconstruction_mlm_loss=("ignore_index",),
               batch_and_identity_variance=("unbiased",),
               uncertainty_augment=("num_samples", "unbiased"))


class _Jitted:
  """pl's functions under jax.jit (eager op-by-op dispatch is slow on this machine)."""

  def __getattr__(self, name):
    f = jax.jit(getattr(pl, name), static_argnames=_STATIC.get(name, ()))
    setattr(self, name, f)
    return f


jpl = _Jitted()


def jgrad(f, **kw):
  return jax.jit(jax.grad(f, **kw))


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


# ----------------------------------------------------------------------------
# numpy float64 references (loops, textbook formulas)
# ----------------------------------------------------------------------------


def np_cos(a, b):
  return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def np_sdm(sim_i2t, sim_t2i, pids, scale=50.0, eps=1e-8):
  b = len(pids)
  total = 0.0
  for sim in (sim_i2t, sim_t2i):
    acc = 0.0
    for i in range(b):
      logits = scale * np.asarray(sim[i], np.float64)
      m = logits.max()
      logp = logits - (m + math.log(np.exp(logits - m).sum()))
      n_same = sum(pids[i] == pids[k] for k in range(b))
      for j in range(b):
        q = (1.0 if pids[i] == pids[j] else 0.0) / n_same
        acc += math.exp(logp[j]) * (logp[j] - math.log(q + eps))
    total += acc / b
  return total


def np_expected_cos(mu_a, sa, mu_b, sb):
  ka, ba = sa.shape[:2]
  kb, bb = sb.shape[:2]
  out = np.zeros((ba, bb))
  for i in range(ba):
    for j in range(bb):
      m2s = sum(np_cos(mu_a[i], sb[k, j]) for k in range(kb)) / kb
      s2m = sum(np_cos(sa[k, i], mu_b[j]) for k in range(ka)) / ka
      out[i, j] = 0.5 * (m2s + s2m)
  return out


def np_w2(mu_a, ls_a, mu_b, ls_b, normalize):
  out = np.zeros((len(mu_a), len(mu_b)))
  for i in range(len(mu_a)):
    for j in range(len(mu_b)):
      ma, sa, mb, sb = mu_a[i], np.exp(ls_a[i]), mu_b[j], np.exp(ls_b[j])
      if normalize:
        na, nb = np.linalg.norm(ma), np.linalg.norm(mb)
        ma, sa, mb, sb = ma / na, sa / na, mb / nb, sb / nb
      out[i, j] = -(np.sum((ma - mb) ** 2) + np.sum((sa - sb) ** 2))
  return out


def np_supcon(x, pids, scale):
  n = len(x)
  losses = []
  for a in range(n):
    positives = [p for p in range(n) if p != a and pids[p] == pids[a]]
    if not positives:
      continue
    denom = sum(math.exp(scale * np_cos(x[a], x[j])) for j in range(n) if j != a)
    la = 0.0
    for p in positives:
      la -= math.log(math.exp(scale * np_cos(x[a], x[p])) / denom)
    losses.append(la / len(positives))
  return float(np.mean(losses)) if losses else 0.0


def np_point_contrast(zi, zt, pids, scale, intra_weight):
  k, b, d = zi.shape
  pts_i = [zi[kk, i] for kk in range(k) for i in range(b)]
  pts_t = [zt[kk, i] for kk in range(k) for i in range(b)]
  tp = [pids[i] for kk in range(k) for i in range(b)]
  n = k * b
  sim = np.array([[np_cos(pts_i[r], pts_t[c]) for c in range(n)] for r in range(n)])
  inter = np_sdm(sim, sim.T, tp, scale)
  intra = 0.5 * (np_supcon(pts_i, tp, scale) + np_supcon(pts_t, tp, scale))
  return inter + intra_weight * intra


def np_hnm(sim, margin, pids=None, cap=True):
  total = 0.0
  for s in (sim, sim.T):
    b = s.shape[0]
    vals = []
    for i in range(b):
      for j in range(b):
        if i == j or (pids is not None and pids[i] == pids[j]):
          continue
        v = margin + s[i, j] - s[i, i]
        v = min(max(v, 0.0), margin) if cap else max(v, 0.0)
        vals.append(v)
    active = [v for v in vals if v > 0]
    total += sum(active) / len(active) if active else 0.0
  return total


def np_circle_direction(s, pids, m, gamma, alphas=None):
  """One direction; alphas = (alpha_p, alpha_n) matrices to freeze, else computed."""
  b = s.shape[0]
  out = 0.0
  for i in range(b):
    ln, lp = [], []
    for j in range(s.shape[1]):
      if pids[i] == pids[j]:
        ap = max(1 + m - s[i, j], 0.0) if alphas is None else alphas[0][i, j]
        lp.append(-gamma * ap * (s[i, j] - (1 - m)))
      else:
        an = max(s[i, j] + m, 0.0) if alphas is None else alphas[1][i, j]
        ln.append(gamma * an * (s[i, j] - m))
    if not ln or not lp:
      continue
    z = np.logaddexp.reduce(ln) + np.logaddexp.reduce(lp)
    out += np.logaddexp(0.0, z)
  return out / b


def np_circle(t, v, pids, m=0.25, gamma=64.0, alphas=None):
  s = np.array([[np_cos(t[i], v[j]) for j in range(len(v))] for i in range(len(t))])
  if alphas is None:
    return np_circle_direction(s, pids, m, gamma) + np_circle_direction(s.T, pids, m, gamma)
  return (np_circle_direction(s, pids, m, gamma, alphas[0])
          + np_circle_direction(s.T, pids, m, gamma, alphas[1]))


def circle_alphas(t, v, m):
  s = np.array([[np_cos(t[i], v[j]) for j in range(len(v))] for i in range(len(t))])
  a = lambda s: (np.maximum(1 + m - s, 0.0), np.maximum(s + m, 0.0))  # noqa: E731
  return a(s), a(s.T)


def fd_grad(f, x, h=1e-6):
  """Central finite differences of scalar f at numpy array x."""
  g = np.zeros_like(x)
  it = np.nditer(x, flags=["multi_index"])
  for _ in it:
    idx = it.multi_index
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


PIDS = np.array([3, 7, 3, 1, 7, 9])


def rand(*shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape)


# ----------------------------------------------------------------------------
# SDM over similarity matrices
# ----------------------------------------------------------------------------


def test_sdm_from_similarity_matches_loops(x64):
  s1, s2 = 0.5 * rand(6, 6, seed=1), 0.5 * rand(6, 6, seed=2)
  got = jpl.sdm_from_similarity(jnp.asarray(s1), jnp.asarray(s2), jnp.asarray(PIDS), 50.0)
  np.testing.assert_allclose(float(got), np_sdm(s1, s2, PIDS, 50.0), rtol=1e-10)
  got_t = jpl.sdm_from_similarity(jnp.asarray(s1), None, jnp.asarray(PIDS), 20.0)
  np.testing.assert_allclose(float(got_t), np_sdm(s1, s1.T, PIDS, 20.0), rtol=1e-10)


def test_sdm_from_similarity_equals_irra_sdm_on_cosines(x64):
  img, txt = rand(6, 8, seed=3), rand(6, 8, seed=4)
  cos = jpl.cosine_matrix(jnp.asarray(img), jnp.asarray(txt))
  mine = jpl.sdm_from_similarity(cos, None, jnp.asarray(PIDS), 50.0)
  ref = irra.sdm(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(PIDS), logit_scale=50.0)
  np.testing.assert_allclose(float(mine), float(ref), rtol=1e-6)


def test_sdm_rejects_bad_shapes():
  with pytest.raises(ValueError, match="square"):
    jpl.sdm_from_similarity(jnp.zeros((3, 4)), None, jnp.arange(3))
  with pytest.raises(ValueError, match="pids"):
    jpl.sdm_from_similarity(jnp.zeros((3, 3)), None, jnp.arange(4))


# ----------------------------------------------------------------------------
# UCFA similarities and contrast
# ----------------------------------------------------------------------------


def test_expected_cosine_matches_loops_and_is_transpose_symmetric(x64):
  mu_a, mu_b = rand(4, 5, seed=5), rand(3, 5, seed=6)
  sa, sb = rand(3, 4, 5, seed=7), rand(2, 3, 5, seed=8)
  got = jpl.expected_cosine_similarity(*map(jnp.asarray, (mu_a, sa, mu_b, sb)))
  np.testing.assert_allclose(np.asarray(got), np_expected_cos(mu_a, sa, mu_b, sb), rtol=1e-12)
  back = jpl.expected_cosine_similarity(*map(jnp.asarray, (mu_b, sb, mu_a, sa)))
  np.testing.assert_allclose(np.asarray(back), np.asarray(got).T, rtol=1e-12)


def test_expected_cosine_reduces_to_cosine_of_means_as_sigma_vanishes(x64):
  mu_a, mu_b = rand(4, 6, seed=9), rand(4, 6, seed=10)
  key = jax.random.PRNGKey(0)
  ka, kb = jax.random.split(key)
  tiny = 1e-9
  sa = mu_a[None] + tiny * np.asarray(jax.random.normal(ka, (3, 4, 6), jnp.float64))
  sb = mu_b[None] + tiny * np.asarray(jax.random.normal(kb, (3, 4, 6), jnp.float64))
  got = jpl.expected_cosine_similarity(*map(jnp.asarray, (mu_a, sa, mu_b, sb)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(jpl.cosine_matrix(mu_a, mu_b)),
                             atol=1e-8)


def test_wasserstein_matches_loops(x64):
  mu_a, mu_b = rand(4, 5, seed=11), rand(3, 5, seed=12)
  la, lb = 0.3 * rand(4, 5, seed=13) - 1, 0.3 * rand(3, 5, seed=14) - 1
  for normalize in (True, False):
    got = jpl.wasserstein2_similarity(*map(jnp.asarray, (mu_a, la, mu_b, lb)), normalize=normalize)
    np.testing.assert_allclose(np.asarray(got), np_w2(mu_a, la, mu_b, lb, normalize),
                               rtol=1e-10, atol=1e-12)


def test_wasserstein_sdm_equals_cosine_sdm_when_sigma_vanishes(x64):
  mu_v, mu_t = rand(6, 8, seed=15), rand(6, 8, seed=16)
  ls = jnp.full((6, 8), -40.0)
  w = jpl.wasserstein2_similarity(jnp.asarray(mu_v), ls, jnp.asarray(mu_t), ls)
  cos = jpl.cosine_matrix(mu_v, mu_t)
  np.testing.assert_allclose(np.asarray(w), np.asarray(2 * cos - 2), atol=1e-12)
  a = jpl.distribution_contrast_loss(w, None, jnp.asarray(PIDS), 25.0)
  b = jpl.distribution_contrast_loss(cos, None, jnp.asarray(PIDS), 50.0)
  np.testing.assert_allclose(float(a), float(b), rtol=1e-10)


def test_distribution_contrast_gradient_matches_finite_differences(x64):
  mu_v, mu_t = rand(6, 4, seed=17), rand(6, 4, seed=18)
  zv, zt = rand(2, 6, 4, seed=19), rand(2, 6, 4, seed=20)
  scale = 5.0  # moderate scale keeps the finite differences well conditioned

  def ref(x):
    s = np_expected_cos(x, zv, mu_t, zt)
    return np_sdm(s, s.T, PIDS, scale)

  def f(x):
    s = jpl.expected_cosine_similarity(x, jnp.asarray(zv), jnp.asarray(mu_t), jnp.asarray(zt))
    return jpl.distribution_contrast_loss(s, None, jnp.asarray(PIDS), scale)

  np.testing.assert_allclose(float(f(jnp.asarray(mu_v))), ref(mu_v), rtol=1e-10)
  g = jgrad(f)(jnp.asarray(mu_v))
  np.testing.assert_allclose(np.asarray(g), fd_grad(ref, mu_v), rtol=1e-6, atol=1e-8)


def test_supervised_contrastive_matches_loops_with_singletons(x64):
  x = rand(6, 5, seed=21)
  pids = np.array([0, 1, 0, 2, 3, 1])  # ids 2 and 3 are singletons: no positive
  got = jpl.supervised_contrastive_loss(jnp.asarray(x), jnp.asarray(pids), 3.0)
  np.testing.assert_allclose(float(got), np_supcon(list(x), pids, 3.0), rtol=1e-10)
  none = jpl.supervised_contrastive_loss(jnp.asarray(x), jnp.arange(6), 3.0)
  assert float(none) == 0.0
  assert np.all(np.isfinite(np.asarray(jgrad(
      lambda y: jpl.supervised_contrastive_loss(y, jnp.arange(6), 3.0))(jnp.asarray(x)))))


def test_point_contrast_matches_loops(x64):
  zi, zt = rand(3, 6, 4, seed=22), rand(3, 6, 4, seed=23)
  for w in (0.0, 1.0, 0.5):
    got = jpl.point_contrast_loss(jnp.asarray(zi), jnp.asarray(zt), jnp.asarray(PIDS), 10.0,
                                 intra_weight=w)
    np.testing.assert_allclose(float(got), np_point_contrast(zi, zt, PIDS, 10.0, w),
                               rtol=1e-10)


def test_point_contrast_gradient_matches_finite_differences(x64):
  zi, zt = rand(2, 4, 3, seed=24), rand(2, 4, 3, seed=25)
  pids = np.array([0, 1, 0, 2])
  f = lambda x: jpl.point_contrast_loss(x, jnp.asarray(zt), jnp.asarray(pids), 4.0)  # noqa: E731
  ref = lambda x: np_point_contrast(x, zt, pids, 4.0, 1.0)  # noqa: E731
  g = jgrad(f)(jnp.asarray(zi))
  np.testing.assert_allclose(np.asarray(g), fd_grad(ref, zi), rtol=1e-6, atol=1e-8)


def test_point_contrast_with_vanishing_sigma_is_sdm_on_repeated_means(x64):
  mu_v, mu_t = rand(6, 8, seed=26), rand(6, 8, seed=27)
  k = 3
  ls = jnp.full((6, 8), -40.0)
  kv, kt = jax.random.split(jax.random.PRNGKey(1))
  sample = lambda mu, key: mu[None] + jnp.exp(ls)[None] * jax.random.normal(  # noqa: E731
      key, (k, 6, 8), jnp.float64)
  zi, zt = sample(jnp.asarray(mu_v), kv), sample(jnp.asarray(mu_t), kt)
  got = jpl.point_contrast_loss(zi, zt, jnp.asarray(PIDS), 50.0, intra_weight=0.0)
  rep_v, rep_t = np.tile(mu_v, (k, 1)), np.tile(mu_t, (k, 1))
  sim = np.array([[np_cos(a, b) for b in rep_t] for a in rep_v])
  np.testing.assert_allclose(float(got), np_sdm(sim, sim.T, np.tile(PIDS, k), 50.0), rtol=1e-8)


def test_point_contrast_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match=r"\[K,B,D\]"):
    jpl.point_contrast_loss(jnp.zeros((3, 4, 5)), jnp.zeros((2, 4, 5)), jnp.arange(4))


def test_hnm_matches_loops(x64):
  sim = 0.3 * rand(6, 6, seed=28)
  sim[np.arange(6), np.arange(6)] += 0.25
  for cap in (True, False):
    for pids in (None, PIDS):
      got = jpl.hnm_loss(jnp.asarray(sim), 0.2, None if pids is None else jnp.asarray(pids),
                        cap=cap)
      np.testing.assert_allclose(float(got), np_hnm(sim, 0.2, pids, cap), rtol=1e-12)
  easy = np.eye(4)  # positives 1, negatives 0: no active triplet at margin 0.2
  assert float(jpl.hnm_loss(jnp.asarray(easy), 0.2)) == 0.0


def test_fused_similarity_matches_loops(x64):
  mq, mg = rand(4, 5, seed=29), rand(3, 5, seed=30)
  sq, sg = rand(3, 4, 5, seed=31), rand(3, 3, 5, seed=32)
  cos = np.array([[np_cos(a, b) for b in mg] for a in mq])
  summed = np.array([[sum(np_cos(mq[i], sg[k, j]) + np_cos(sq[k, i], mg[j]) for k in range(3))
                      for j in range(3)] for i in range(4)])
  got = jpl.fused_similarity(*map(jnp.asarray, (mq, mg, sq, sg)), weight=0.1)
  np.testing.assert_allclose(np.asarray(got), 0.9 * cos + 0.1 * summed, rtol=1e-12)
  got_mean = jpl.fused_similarity(*map(jnp.asarray, (mq, mg, sq, sg)), weight=0.3,
                                 prob_as_sum=False)
  np.testing.assert_allclose(np.asarray(got_mean), 0.7 * cos + 0.3 * summed / 6, rtol=1e-12)


# ----------------------------------------------------------------------------
# regularizers
# ----------------------------------------------------------------------------


def test_entropy_margin_reg_matches_formula(x64):
  ls = 0.5 * rand(2, 3, 512, seed=33) - 1.5
  for exact, c in ((False, 0.5), (True, 1.0)):
    h = [256 * (math.log(2 * math.pi) + 1) + c * ls[i, j].sum() for i in range(2) for j in range(3)]
    want = np.mean([max(0.0, 300.0 - v) for v in h])
    got = jpl.entropy_margin_reg(jnp.asarray(ls), 300.0, exact_std_entropy=exact)
    np.testing.assert_allclose(float(got), want, rtol=1e-12)
  # The spec's formula is met from mean log_sigma = (300 - 256 (log 2pi + 1)) / 256 = -1.6658.
  thr = (300 - 256 * (math.log(2 * math.pi) + 1)) / 256
  assert float(jpl.entropy_margin_reg(jnp.full((512,), thr + 1e-6))) == 0.0
  assert float(jpl.entropy_margin_reg(jnp.full((512,), thr - 1e-3))) > 0.0


def test_kl_to_standard_normal_matches_torch(x64):
  mu, ls = rand(3, 7, seed=34), 0.4 * rand(3, 7, seed=35)
  ref = torch.distributions.kl_divergence(
      torch.distributions.Normal(torch.tensor(mu), torch.tensor(np.exp(ls))),
      torch.distributions.Normal(torch.zeros(3, 7, dtype=torch.float64),
                                 torch.ones(3, 7, dtype=torch.float64))).sum(-1).mean()
  got = jpl.kl_to_standard_normal(jnp.asarray(mu), jnp.asarray(ls))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-12)
  assert float(jpl.kl_to_standard_normal(jnp.zeros((2, 4)), jnp.zeros((2, 4)))) == 0.0


# ----------------------------------------------------------------------------
# reconstruction losses
# ----------------------------------------------------------------------------


def test_reconstruction_mlm_loss_matches_torch_ce(x64):
  k, b, l, v = 3, 2, 5, 11
  scores = rand(k, b, l, v, seed=36)
  labels = np.array([[0, 4, 0, 10, 0], [2, 0, 0, 0, 7]])
  ce = torch.nn.CrossEntropyLoss(ignore_index=0)
  want = np.mean([float(ce(torch.tensor(scores[i].reshape(-1, v)),
                           torch.tensor(labels.reshape(-1)))) for i in range(k)])
  got = jpl.reconstruction_mlm_loss(jnp.asarray(scores), jnp.asarray(labels))
  np.testing.assert_allclose(float(got), want, rtol=1e-12)
  flat = jpl.reconstruction_mlm_loss(jnp.asarray(scores.reshape(k, b * l, v)),
                                    jnp.asarray(labels.reshape(-1)))
  np.testing.assert_allclose(float(flat), want, rtol=1e-12)
  assert float(jpl.reconstruction_mlm_loss(jnp.asarray(scores), jnp.zeros((b, l), int))) == 0.0
  with pytest.raises(ValueError, match="scores must be"):
    jpl.reconstruction_mlm_loss(jnp.asarray(scores), jnp.asarray(labels[:, :4]))


def test_feature_reconstruction_loss_matches_loops_and_stops_target_gradient(x64):
  k, b, l, d = 2, 3, 4, 5
  rec, tgt = rand(k, b, l, d, seed=37), rand(b, l, d, seed=38)
  mask = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1]])
  want = np.mean([1 - np.mean([np_cos(rec[kk, i, j], tgt[i, j]) for i in range(b)
                               for j in range(l) if mask[i, j]]) for kk in range(k)])
  got = jpl.feature_reconstruction_loss(jnp.asarray(rec), jnp.asarray(tgt), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), want, rtol=1e-12)
  g_t = jgrad(jpl.feature_reconstruction_loss, argnums=1)(
      jnp.asarray(rec), jnp.asarray(tgt), jnp.asarray(mask))
  assert np.all(np.asarray(g_t) == 0.0)
  g_r = jgrad(jpl.feature_reconstruction_loss)(jnp.asarray(rec), jnp.asarray(tgt),
                                                 jnp.asarray(mask))
  assert np.all(np.asarray(g_r)[:, mask == 0] == 0.0) and np.any(np.asarray(g_r) != 0)


# ----------------------------------------------------------------------------
# MUM
# ----------------------------------------------------------------------------


def test_batch_and_identity_variance_match_numpy(x64):
  f = rand(6, 4, seed=39) + 3.0  # offset: checks there is no cancellation problem
  for unbiased in (True, False):
    ddof = 1 if unbiased else 0
    vb, vid = jpl.batch_and_identity_variance(jnp.asarray(f), jnp.asarray(PIDS), unbiased)
    np.testing.assert_allclose(np.asarray(vb), np.var(f, axis=0, ddof=ddof), rtol=1e-12)
    for i in range(6):
      group = f[PIDS == PIDS[i]]
      want = np.zeros(4) if len(group) == 1 else np.var(group, axis=0, ddof=ddof)
      np.testing.assert_allclose(np.asarray(vid[i]), want, rtol=1e-10, atol=1e-14)
  # pids 1 and 9 are singletons: identity variance exactly 0.
  assert np.all(np.asarray(vid)[[3, 5]] == 0.0)


def test_uncertainty_augment_statistics_and_identity_limit(x64):
  f = rand(6, 4, seed=40)
  key = jax.random.PRNGKey(2)
  same = jpl.uncertainty_augment(jnp.asarray(f), jnp.asarray(PIDS), key, 0.0, 0.0, num_samples=2)
  assert same.shape == (2, 6, 4)
  np.testing.assert_array_equal(np.asarray(same), np.broadcast_to(f, (2, 6, 4)))
  n = 20000
  aug = np.asarray(jpl.uncertainty_augment(jnp.asarray(f), jnp.asarray(PIDS), key, 0.7, 1.3,
                                          num_samples=n))
  vb, vid = jpl.batch_and_identity_variance(jnp.asarray(f), jnp.asarray(PIDS))
  sigma2 = 0.7 * np.asarray(vb)[None] + 1.3 * np.asarray(vid)
  se_mean = np.sqrt(sigma2 / n)
  assert np.all(np.abs(aug.mean(0) - f) < 5 * se_mean)
  # Sample variance of a normal: relative standard error sqrt(2/n) ~ 1%.
  np.testing.assert_allclose(aug.var(0), sigma2, rtol=0.06)


def test_uncertainty_augment_gradient_is_identity(x64):
  f = rand(6, 4, seed=41)
  w = rand(3, 6, 4, seed=42)
  key = jax.random.PRNGKey(3)
  g = jgrad(lambda x: jnp.sum(jnp.asarray(w) * jpl.uncertainty_augment(
      x, jnp.asarray(PIDS), key, num_samples=3)))(jnp.asarray(f))
  np.testing.assert_allclose(np.asarray(g), w.sum(0), rtol=1e-12)


def test_circle_loss_matches_loops(x64):
  t, v = rand(6, 5, seed=43), rand(6, 5, seed=44)
  for m, gamma in ((0.25, 64.0), (0.4, 8.0)):
    got = jpl.circle_loss_cross_modal(jnp.asarray(t), jnp.asarray(v), jnp.asarray(PIDS), m, gamma)
    np.testing.assert_allclose(float(got), np_circle(t, v, PIDS, m, gamma), rtol=1e-10)


def test_circle_loss_is_symmetric_under_modality_swap(x64):
  t, v = rand(6, 5, seed=45), rand(6, 5, seed=46)
  a = jpl.circle_loss_cross_modal(jnp.asarray(t), jnp.asarray(v), jnp.asarray(PIDS))
  b = jpl.circle_loss_cross_modal(jnp.asarray(v), jnp.asarray(t), jnp.asarray(PIDS))
  np.testing.assert_allclose(float(a), float(b), rtol=1e-12)


def test_circle_loss_gradient_matches_finite_differences_with_frozen_weights(x64):
  t, v = rand(4, 3, seed=47), rand(4, 3, seed=48)
  pids = np.array([0, 1, 0, 2])
  m, gamma = 0.25, 4.0
  alphas = circle_alphas(t, v, m)  # the self-paced weights are detached in the loss
  g = jgrad(jpl.circle_loss_cross_modal)(jnp.asarray(t), jnp.asarray(v), jnp.asarray(pids),
                                           m, gamma)
  want = fd_grad(lambda x: np_circle(x, v, pids, m, gamma, alphas), t)
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-6, atol=1e-9)


def test_circle_loss_rows_without_negatives_are_zero_and_gradients_finite():
  t, v = jnp.asarray(rand(4, 3, seed=49), jnp.float32), jnp.asarray(rand(4, 3, seed=50),
                                                                      jnp.float32)
  same = jnp.zeros(4, jnp.int32)
  assert float(jpl.circle_loss_cross_modal(t, v, same)) == 0.0
  g = jgrad(jpl.circle_loss_cross_modal)(t, v, same)
  assert np.all(np.asarray(g) == 0.0)
  pids = jnp.asarray([0, 0, 0, 1])  # three anchors share one negative; id 1 is a singleton
  val = jpl.circle_loss_cross_modal(t, v, pids)
  g = jgrad(jpl.circle_loss_cross_modal)(t, v, pids)
  assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
  # float32 with the default gamma 64 and near-aligned inputs: still finite, no overflow.
  big = jpl.circle_loss_cross_modal(t, -t, jnp.arange(4))
  assert np.isfinite(float(big)) and float(big) > 0


def test_global_recovery_losses_match_loops(x64):
  r, t = rand(5, 4, seed=51), rand(5, 4, seed=52)
  want = np.mean([1 - np_cos(r[i], t[i]) for i in range(5)])
  got = jpl.global_recovery_loss(jnp.asarray(r), jnp.asarray(t))
  np.testing.assert_allclose(float(got), want, rtol=1e-12)
  assert np.all(np.asarray(jgrad(jpl.global_recovery_loss, argnums=1)(
      jnp.asarray(r), jnp.asarray(t))) == 0.0)
  scale = 7.0
  ce = []
  for i in range(5):
    logits = np.array([scale * np_cos(r[i], t[j]) for j in range(5)])
    ce.append(np.logaddexp.reduce(logits) - logits[i])
  got = jpl.global_recovery_infonce_loss(jnp.asarray(r), jnp.asarray(t), scale)
  np.testing.assert_allclose(float(got), np.mean(ce), rtol=1e-12)


# ----------------------------------------------------------------------------
# compilation and sharding
# ----------------------------------------------------------------------------


def _all_losses(mu_v, mu_t, zv, zt, ls_v, pids, key, labels, scores):
  s = pl.expected_cosine_similarity(mu_v, zv, mu_t, zt)
  w = pl.wasserstein2_similarity(mu_v, ls_v, mu_t, ls_v)
  aug = pl.uncertainty_augment(mu_t, pids, key, num_samples=2)
  return dict(
      dcl=pl.distribution_contrast_loss(s, None, pids),
      dcl_w=pl.distribution_contrast_loss(w, None, pids, 25.0),
      pcl=pl.point_contrast_loss(zv, zt, pids),
      hnm=pl.hnm_loss(s),
      reg=pl.entropy_margin_reg(ls_v),
      kl=pl.kl_to_standard_normal(mu_v, ls_v),
      mlm=pl.reconstruction_mlm_loss(scores, labels),
      circle=pl.circle_loss_cross_modal(aug[0], mu_v, pids),
      rec=pl.global_recovery_loss(mu_v, mu_t),
      nce=pl.global_recovery_infonce_loss(mu_v, mu_t),
      fused=jnp.sum(pl.fused_similarity(mu_t, mu_v, zt, zv)),
  )


def _inputs(b=16, d=8, k=3, v=13):
  r = np.random.default_rng(53)
  f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
  pids = jnp.asarray(r.integers(0, 6, size=b), jnp.int32)
  labels = jnp.asarray(r.integers(0, v, size=(b, 4)) * (r.random((b, 4)) < 0.5), jnp.int32)
  return (f(b, d), f(b, d), f(k, b, d), f(k, b, d), 0.1 * f(b, d) - 1, pids,
          jax.random.PRNGKey(4), labels, f(k, b, 4, v))


def _values_and_grads(*args):
  """All loss values, and the gradient of their sum w.r.t. the float inputs."""
  def total(*fl):
    losses = _all_losses(*fl, *args[5:])
    return sum(losses.values()), losses
  (_, losses), grads = jax.value_and_grad(total, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      *args[:5])
  return losses, grads


def _shardings(mesh):
  row, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  kb = NamedSharding(mesh, P(None, "data"))
  return [row, row, kb, kb, row, row, rep, row, kb]


@pytest.fixture(scope="module")
def single_device_reference():
  args = _inputs()
  return args, jax.jit(_values_and_grads)(*args)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_losses_and_grads_jit_on_batch_sharded_inputs_match_single_device(
    single_device_reference, axis_type):
  args, (ref, ref_g) = single_device_reference
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    sharded = [jax.device_put(a, s) for a, s in zip(args, _shardings(mesh))]
    out, out_g = jax.jit(_values_and_grads)(*sharded)
  for name in ref:
    assert np.isfinite(float(ref[name])), name
    np.testing.assert_allclose(float(out[name]), float(ref[name]), rtol=2e-5, err_msg=name)
  for a, b in zip(out_g, ref_g):
    assert np.all(np.isfinite(np.asarray(b))) and np.any(np.asarray(b) != 0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
