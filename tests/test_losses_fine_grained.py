"""Tests for tipr_jax.losses.fine_grained against float64 numpy re-derivations.

The references below are written with explicit loops from the FMFA code
(objectives.compute_sdm use_weight=True, build_finetune 'efa' branch,
compute_infonce_loss_cosine / compute_minmax_info_loss), the FMFA paper
formulas, and the documented part-loss reconstruction; a torch float64
re-derivation of the EFA tensor ops checks the axes and autograd gradients.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tipr_jax.losses import fine_grained as fg

EPS = 1e-8


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


# --------------------------------------------------------------------------- numpy references


def np_unit(x):
  return x / max(np.sqrt(np.sum(x * x)), 1e-12)


def np_softmax(v):
  e = np.exp(v - np.max(v))
  return e / e.sum()


def np_sdm_row(logits_row, a, pids):
  p = np_softmax(logits_row)
  n_same = sum(1 for c in range(len(pids)) if pids[c] == pids[a])
  tot = 0.0
  for c in range(len(pids)):
    q = (1.0 if pids[c] == pids[a] else 0.0) / n_same
    tot += p[c] * (np.log(p[c]) - np.log(q + EPS))
  return tot


def np_cos_matrix(rows, cols):
  out = np.zeros((len(rows), len(cols)))
  for i in range(len(rows)):
    for j in range(len(cols)):
      out[i, j] = np_unit(rows[i]) @ np_unit(cols[j])
  return out


def np_sdm(img, txt, pids, scale=50.0):
  cos_t2i = np_cos_matrix(txt, img)
  loss = 0.0
  for cos in (cos_t2i.T, cos_t2i):
    loss += np.mean([np_sdm_row(scale * cos[a], a, pids) for a in range(len(pids))])
  return loss


def np_asdm(img, txt, pids, mode, alpha=10.0, scale=50.0):
  cos_t2i = np_cos_matrix(txt, img)
  loss = 0.0
  for cos in (cos_t2i.T, cos_t2i):  # i2t (image rows), then t2i (text rows)
    terms = []
    for a in range(len(pids)):
      logits = scale * cos[a]
      kl = np_sdm_row(logits, a, pids)
      if mode == "code":
        top = int(np.argmax(logits))
        first_pos = [c for c in range(len(pids)) if pids[c] == pids[a]][0]
        diff = cos[a, top] - cos[a, first_pos] if top != first_pos else 0.0
        w = diff * 0.1 + 1.0
      else:
        p = np_softmax(logits)
        w = alpha * (np.max(p) - p[a]) + 1.0
      terms.append(w * kl)
    loss += np.mean(terms)
  return loss


def np_aggregate(text, patches):
  b_, l_, d_ = text.shape
  n_ = patches.shape[1]
  agg = np.zeros((b_, l_, d_))
  for b in range(b_):
    for l in range(l_):
      s = np.array([text[b, l] @ patches[b, n] for n in range(n_)])
      lo, hi = s.min(), s.max()
      normed = (s - lo) / (hi - lo) if hi - lo > 1e-12 else np.ones(n_)
      kept = np.array([x if x > 1.0 / n_ else 0.0 for x in normed])
      tot = kept.sum()
      w = kept / (tot if tot > 0 else 1.0)
      for n in range(n_):
        agg[b, l] += w[n] * patches[b, n]
  return agg


def np_hard(x, c, x_valid, c_valid, temp=1.0):
  b_ = x.shape[0]
  sims = np.zeros((b_, b_))
  for a in range(b_):
    for b in range(b_):
      vals = []
      for i in range(x.shape[1]):
        if not x_valid[a][i]:
          continue
        best = -np.inf
        for j in range(c.shape[1]):
          if c_valid[b][j]:
            best = max(best, np_unit(x[a, i]) @ np_unit(c[b, j]))
        vals.append(best / temp)
      vals = np.array(vals)
      sims[a, b] = vals.max() + np.log(np.sum(np.exp(vals - vals.max())))
  return sims


def np_cost(sims, margin, row_norm=True, grouping="code"):
  s = sims.copy()
  b_ = s.shape[0]
  if row_norm:
    for a in range(b_):
      s[a] = s[a] / max(np.sqrt(np.sum(s[a] ** 2)), 1e-12)
  img_ret = np.zeros((b_, b_))   # anchor = row a (x sample): s[a,b] - s[a,a] + m
  txt_ret = np.zeros((b_, b_))   # anchor = column b (joint sample): s[a,b] - s[b,b] + m
  for a in range(b_):
    for b in range(b_):
      if a != b:
        img_ret[a, b] = s[a, b] - s[a, a] + margin
        txt_ret[a, b] = s[a, b] - s[b, b] + margin
  cost_s = [np.log(sum(np.exp(txt_ret[a, b]) for a in range(b_))) for b in range(b_)]
  if grouping == "code":   # the code sums img_ret over dim 0 as well
    cost_im = [np.log(sum(np.exp(img_ret[a, b]) for a in range(b_))) for b in range(b_)]
  else:
    cost_im = [np.log(sum(np.exp(img_ret[a, b]) for b in range(b_))) for a in range(b_)]
  return np.mean(cost_s) + np.mean(cost_im)


def np_efa(text, patches, ids=None, m_t=0.1, m_v=0.9, mask_padding=False, row_norm=True,
           grouping="code"):
  agg = np_aggregate(text, patches)
  b_, l_, _ = text.shape
  t_valid = (ids != 0) if mask_padding else np.ones((b_, l_), bool)
  v_valid = np.ones(patches.shape[:2], bool)
  s_t = np_hard(text, agg, t_valid, t_valid)
  s_v = np_hard(patches, agg, v_valid, t_valid)
  return np_cost(s_t, m_t, row_norm, grouping) + np_cost(s_v, m_v, row_norm, grouping)


def np_commonality(s, pids, commonality, scope, temp):
  b_, _, k_ = s.shape
  if scope == "batch":
    c = np.zeros(k_)
    for k in range(k_):
      vals = [s[a, n, k] for a in range(b_) for n in range(b_) if pids[a] != pids[n]]
      c[k] = np.mean(vals) if vals else 0.0
    if commonality == "softmax":
      c = np_softmax(c / temp)
    return np.tile(c, (b_, 1))
  c = np.zeros((b_, k_))
  for a in range(b_):
    for k in range(k_):
      vals = [s[a, n, k] for n in range(b_) if pids[a] != pids[n]]
      c[a, k] = np.mean(vals) if vals else 0.0
    if commonality == "softmax":
      c[a] = np_softmax(c[a] / temp)
  return c


def np_cmr(ps, pids, base=0.2, floor=0.05, commonality="mean", scope="batch", temp=1.0,
           negatives="hardest_semi_hard", fallback="skip", frozen=None, ps_i2t=None):
  dirs = [ps, ps.transpose(1, 0, 2) if ps_i2t is None else ps_i2t]
  total, count = 0.0, 0
  for di, s in enumerate(dirs):
    c = frozen[di] if frozen is not None else np_commonality(s, pids, commonality, scope, temp)
    b_, _, k_ = s.shape
    for a in range(b_):
      for k in range(k_):
        m = max(base * (1 - c[a, k]), floor)
        pos = s[a, a, k]
        viols = [s[a, n, k] - pos + m for n in range(b_) if pids[n] != pids[a]]
        semi = [v for v in viols if 0 < v < m]
        if semi:
          if negatives == "hardest_semi_hard":
            total += max(semi)
            count += 1
          else:
            total += sum(semi)
            count += len(semi)
        elif fallback == "hardest" and viols and max(viols) > 0:
          total += max(viols)
          count += 1
  return total / max(count, 1)


def central_fd(f, x, h=1e-6):
  g = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    xp, xm = x.copy(), x.copy()
    xp[idx] += h
    xm[idx] -= h
    g[idx] = (f(xp) - f(xm)) / (2 * h)
  return g


# --------------------------------------------------------------------------- A-SDM


def _pair_feats(rng, b, d, noise):
  base = rng.normal(size=(b, d))
  return base + noise * rng.normal(size=(b, d)), base + noise * rng.normal(size=(b, d))


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_adaptive_sdm_matches_numpy_reference(mode):
  rng = np.random.default_rng(0)
  pids = np.array([3, 1, 3, 2, 1, 5])
  img, txt = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))  # random: many rows misranked
  got = fg.adaptive_sdm(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(pids), mode=mode)
  want = np_asdm(img, txt, pids, mode)
  np.testing.assert_allclose(float(got), want, rtol=1e-10)
  # the weights matter on this input (else the test could not tell A-SDM from SDM)
  assert abs(want - np_sdm(img, txt, pids)) > 1e-3


def test_adaptive_sdm_paper_alpha_changes_value():
  rng = np.random.default_rng(1)
  pids = np.arange(5)
  img, txt = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  for alpha in (1.0, 10.0):
    got = fg.adaptive_sdm(img, txt, pids, mode="paper", alpha=alpha)
    np.testing.assert_allclose(float(got), np_asdm(img, txt, pids, "paper", alpha), rtol=1e-10)


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_adaptive_sdm_gradient_vs_finite_differences(mode):
  rng = np.random.default_rng(2)
  pids = np.array([0, 1, 0, 2])
  img, txt = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
  gi, gt = jax.jit(jax.grad(lambda i, t: fg.adaptive_sdm(i, t, pids, mode=mode),
                            argnums=(0, 1)))(jnp.asarray(img), jnp.asarray(txt))
  fd_i = central_fd(lambda i: np_asdm(i, txt, pids, mode), img)
  fd_t = central_fd(lambda t: np_asdm(img, t, pids, mode), txt)
  np.testing.assert_allclose(np.asarray(gi), fd_i, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gt), fd_t, rtol=1e-5, atol=1e-7)
  # the weight is not detached: the detached variant has a different gradient
  gi_sg = jax.jit(jax.grad(lambda i: fg.adaptive_sdm(i, txt, pids, mode=mode,
                                                     stop_weight_gradient=True)))(jnp.asarray(img))
  assert np.max(np.abs(np.asarray(gi_sg) - fd_i)) > 1e-4


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_adaptive_sdm_equals_sdm_when_positives_ranked_first(mode):
  rng = np.random.default_rng(3)
  pids = np.arange(8)
  img, txt = _pair_feats(rng, 8, 16, 0.05)
  assert (np.argmax(np_cos_matrix(txt, img), 1) == np.arange(8)).all()
  assert (np.argmax(np_cos_matrix(img, txt), 1) == np.arange(8)).all()
  # logit scale 5 keeps the loss well away from 0 so that rtol is meaningful
  got = fg.adaptive_sdm(img, txt, pids, logit_scale=5.0, mode=mode)
  assert float(got) > 0.1
  np.testing.assert_allclose(float(got), np_sdm(img, txt, pids, scale=5.0), rtol=1e-12)
  np.testing.assert_allclose(
      float(got), float(fg.sdm_from_similarity(np_cos_matrix(txt, img), pids, 5.0)), rtol=1e-12)
  g = jax.jit(jax.grad(lambda i: fg.adaptive_sdm(i, txt, pids, 5.0, mode=mode)))(jnp.asarray(img))
  g0 = jax.jit(jax.grad(lambda i: fg.sdm_from_similarity(
      fg.l2_normalize(jnp.asarray(txt)) @ fg.l2_normalize(i).T, pids, 5.0)))(jnp.asarray(img))
  if mode == "code":  # code weights are exactly 1 with zero gradient when ranked first
    np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-10, atol=1e-14)


def test_adaptive_sdm_shared_identity_ranked_first():
  # pids [0, 0, 1, 1]: the code's reference column of rows 0,1 is column 0 (first same-ID
  # column); paper mode uses the diagonal. Build each mode's "ranked first" case.
  rng = np.random.default_rng(4)
  pids = np.array([0, 0, 1, 1])
  proto = rng.normal(size=(4, 8)) * 3
  # code: every row's top column is its identity's first column (0 or 2)
  img = np.stack([proto[0], proto[0] * 0.9 + 0.3 * proto[1], proto[2], proto[2] * 0.9 + 0.3 * proto[3]])
  txt = np.stack([proto[0], proto[0], proto[2], proto[2]])
  assert (np.argmax(np_cos_matrix(txt, img), 1) == [0, 0, 2, 2]).all()
  assert (np.argmax(np_cos_matrix(img, txt), 1) == [0, 0, 2, 2]).all()
  np.testing.assert_allclose(float(fg.adaptive_sdm(img, txt, pids, mode="code")),
                             np_sdm(img, txt, pids), rtol=1e-12)
  # ...whereas paper mode up-weights rows 1 and 3 (diagonal not ranked first)
  assert float(fg.adaptive_sdm(img, txt, pids, mode="paper")) > np_sdm(img, txt, pids) + 1e-3
  # code quirk: top-ranked column is a positive other than the first -> weight > 1
  img2, txt2 = img[[1, 0, 3, 2]], txt
  np.testing.assert_allclose(float(fg.adaptive_sdm(img2, txt2, pids, mode="code")),
                             np_asdm(img2, txt2, pids, "code"), rtol=1e-12)


def test_adaptive_sdm_bad_input():
  with pytest.raises(ValueError, match="mode"):
    fg.adaptive_sdm(np.ones((2, 3)), np.ones((2, 3)), np.arange(2), mode="other")
  with pytest.raises(ValueError, match="same shape"):
    fg.adaptive_sdm(np.ones((2, 3)), np.ones((3, 3)), np.arange(2))
  with pytest.raises(ValueError, match="pids"):
    fg.adaptive_sdm(np.ones((2, 3)), np.ones((2, 3)), np.arange(3))


# --------------------------------------------------------------------------- EFA


def _efa_inputs(seed, b=3, l=5, n=6, d=4, pad=2):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(b, l, d))
  patches = rng.normal(size=(b, n, d))
  ids = np.tile(np.r_[49406, np.arange(1, l - pad - 1) + 100, 49407, np.zeros(pad)], (b, 1))
  ids[1, l - pad - 1:] = [5, 49407] + [0] * (pad - 1)  # a longer caption in row 1
  return text, patches, ids.astype(np.int64)


def test_efa_aggregate_matches_numpy():
  text, patches, _ = _efa_inputs(0)
  np.testing.assert_allclose(np.asarray(fg.efa_aggregate(text, patches)),
                             np_aggregate(text, patches), rtol=1e-11, atol=1e-12)


def test_hard_match_similarity_matches_numpy_with_masks():
  text, patches, ids = _efa_inputs(1)
  agg = np_aggregate(text, patches)
  mask = ids != 0
  for xm, cm in ((None, None), (mask, mask), (None, mask)):
    got = fg.hard_match_similarity(text, agg, xm, cm, lse_temperature=0.5)
    xv = np.ones(mask.shape, bool) if xm is None else xm
    cv = np.ones(mask.shape, bool) if cm is None else cm
    np.testing.assert_allclose(np.asarray(got), np_hard(text, agg, xv, cv, temp=0.5), rtol=1e-11)


@pytest.mark.parametrize("row_norm,grouping,mask_padding",
                         [(True, "code", False), (False, "code", False), (True, "anchor", False),
                          (True, "code", True), (False, "anchor", True)])
def test_efa_loss_matches_numpy(row_norm, grouping, mask_padding):
  text, patches, ids = _efa_inputs(2)
  for m_t, m_v in (fg.EFA_CODE_MARGINS, fg.efa_paper_margins("ICFG-PEDES")):
    got = fg.efa_loss(text, patches, ids, margin_text=m_t, margin_image=m_v,
                      mask_padding=mask_padding, row_normalize=row_norm, grouping=grouping)
    want = np_efa(text, patches, ids, m_t, m_v, mask_padding, row_norm, grouping)
    np.testing.assert_allclose(float(got), want, rtol=1e-11)


def test_efa_options_change_the_value():
  # each switch is observable (so the parity tests above can fail)
  text, patches, ids = _efa_inputs(3)
  ref = float(fg.efa_loss(text, patches, ids))
  assert abs(ref - float(fg.efa_loss(text, patches, ids, mask_padding=True))) > 1e-6
  assert abs(ref - float(fg.efa_loss(text, patches, ids, row_normalize=False))) > 1e-6
  assert abs(float(fg.efa_loss(text, patches, ids, row_normalize=False))
             - float(fg.efa_loss(text, patches, ids, row_normalize=False, grouping="anchor"))) > 1e-6


def test_efa_gradient_vs_finite_differences():
  # masked variant, chunked, without row normalisation (the unmasked, row-normalised
  # code path is checked against torch autograd below)
  text, patches, ids = _efa_inputs(4, b=3, l=4, n=5, d=3, pad=1)
  f = jax.jit(jax.grad(lambda t, v: fg.efa_loss(t, v, ids, mask_padding=True, row_normalize=False,
                                                chunk_size=2), argnums=(0, 1)))
  gt, gv = f(jnp.asarray(text), jnp.asarray(patches))
  fd_t = central_fd(lambda t: np_efa(t, patches, ids, mask_padding=True, row_norm=False), text)
  fd_v = central_fd(lambda v: np_efa(text, v, ids, mask_padding=True, row_norm=False), patches)
  np.testing.assert_allclose(np.asarray(gt), fd_t, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(np.asarray(gv), fd_v, rtol=1e-5, atol=1e-8)
  assert np.all(np.asarray(gt)[ids == 0] == 0)  # masked padding positions get no gradient
  assert np.any(np.asarray(gt)[ids != 0] != 0)


def _torch_efa_code(text, image_tokens, margin_t=0.1, margin_v=0.9):
  """float64 torch re-derivation of the FMFA code's tensor ops (CLS at image index 0)."""
  patches = image_tokens[:, 1:, :]
  s = text @ patches.transpose(1, 2)
  lo = s.min(dim=2, keepdim=True)[0]
  hi = s.max(dim=2, keepdim=True)[0]
  s = (s - lo) / (hi - lo)
  s = torch.where(s > 1.0 / s.size(2), s, torch.zeros_like(s))
  s = s / s.sum(dim=2, keepdim=True)
  agg = s @ patches

  def one(x, c, margin):
    xn = torch.nn.functional.normalize(x, dim=-1)[:, None]
    cn = torch.nn.functional.normalize(c, dim=-1)[None]
    sim = (xn @ cn.transpose(-2, -1)).max(dim=-1)[0]            # [B, B, Lx]
    sims = torch.nn.functional.normalize(torch.logsumexp(sim, dim=-1), dim=-1)
    d = sims.diag()
    eye = torch.eye(sims.size(0)) > 0.5
    a = sims - d.expand_as(sims).t() + margin
    a = a.masked_fill(eye, 0.0)
    c_ = sims - d.expand_as(sims) + margin
    c_ = c_.masked_fill(eye, 0.0)
    ma = a.max(dim=0, keepdim=True)[0]
    mc = c_.max(dim=0, keepdim=True)[0]
    cost_a = torch.log(torch.exp(a - ma).sum(dim=0)) + ma
    cost_c = torch.log(torch.exp(c_ - mc).sum(dim=0)) + mc
    return cost_c.mean() + cost_a.mean()

  return one(text, agg, margin_t) + one(patches, agg, margin_v)


def test_efa_matches_torch_rederivation_value_and_grad():
  rng = np.random.default_rng(5)
  text = rng.normal(size=(5, 7, 6))
  image = rng.normal(size=(5, 1 + 9, 6))
  tt = torch.tensor(text, requires_grad=True)
  ti = torch.tensor(image, requires_grad=True)
  want = _torch_efa_code(tt, ti)
  want.backward()
  f = lambda t, im: fg.efa_loss(t, im[:, 1:], chunk_size=2)
  got, (gt, gi) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(text),
                                                                   jnp.asarray(image))
  np.testing.assert_allclose(float(got), want.item(), rtol=1e-12)
  np.testing.assert_allclose(np.asarray(gt), tt.grad.numpy(), rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(np.asarray(gi), ti.grad.numpy(), rtol=1e-8, atol=1e-12)
  assert np.all(np.asarray(gi)[:, 0] == 0)  # [CLS] unused


def _degenerate(case):
  text, patches, ids = _efa_inputs(6)
  if case == "zero_text":
    text = np.zeros_like(text)
  elif case == "zero_all":
    text, patches = np.zeros_like(text), np.zeros_like(patches)
  elif case == "constant_patches":
    patches = np.broadcast_to(patches[:, :1], patches.shape).copy()  # max == min in every row
  else:
    text[0, 2] = 0.0
    patches[1] = 0.0
  return text, patches, ids


def test_efa_degenerate_inputs_are_finite():
  cases = ["zero_text", "zero_all", "constant_patches", "zero_row"]
  for mask_padding in (False, True):
    vg = jax.jit(jax.value_and_grad(
        lambda t, v, i: fg.efa_loss(t, v, i, mask_padding=mask_padding, chunk_size=2),
        argnums=(0, 1)))
    for case in cases:
      text, patches, ids = _degenerate(case)
      val, (gt, gv) = vg(jnp.asarray(text), jnp.asarray(patches), jnp.asarray(ids))
      assert np.isfinite(float(val)), case
      assert np.all(np.isfinite(np.asarray(gt))) and np.all(np.isfinite(np.asarray(gv))), case
  text, patches, _ = _degenerate("constant_patches")
  agg = np.asarray(fg.efa_aggregate(text, patches))  # guard: uniform weights -> mean patch
  np.testing.assert_allclose(agg, np.broadcast_to(patches.mean(1, keepdims=True), agg.shape),
                             rtol=1e-12)
  # without the guard (the code's formula) this input divides 0 by 0
  s = np.einsum("bld,bnd->bln", text, patches)
  assert np.all(s.max(-1) - s.min(-1) < 1e-12)


def test_efa_chunked_equals_unchunked():
  # chunking only changes hard_match_similarity: compare its values and VJPs
  text, patches, ids = _efa_inputs(7, b=7, l=6, n=8, d=5)
  agg = fg.efa_aggregate(text, patches)
  mask = jnp.asarray(ids != 0)
  cot = jnp.asarray(np.random.default_rng(0).normal(size=(7, 7)))

  @jax.jit
  def all_chunkings(x, c):
    outs = []
    for cs in (None, 1, 3, 7):  # 3 needs padding of the last block
      val, vjp = jax.vjp(lambda x, c: fg.hard_match_similarity(x, c, mask, mask, 1.0, cs), x, c)
      outs.append((val, vjp(cot)))
    return outs

  outs = all_chunkings(jnp.asarray(text), agg)
  (ref, (gx_ref, gc_ref)) = outs[0]
  for val, (gx, gc) in outs[1:]:
    np.testing.assert_allclose(np.asarray(val), np.asarray(ref), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(np.asarray(gc), np.asarray(gc_ref), rtol=1e-11, atol=1e-14)


def test_efa_chunked_float32_full_length_jit():
  # one realistic-length check in float32 under jit: L=77, N=192, small batch and width
  with jax.enable_x64(False):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    text = jax.random.normal(k1, (6, 77, 32))
    patches = jax.random.normal(k2, (6, 192, 32))
    f = jax.jit(lambda t, v, cs: fg.efa_loss(t, v, chunk_size=cs), static_argnums=2)
    np.testing.assert_allclose(float(f(text, patches, 4)), float(f(text, patches, None)),
                               rtol=1e-6)


def test_efa_bad_input():
  text, patches, ids = _efa_inputs(8)
  with pytest.raises(ValueError, match="text_ids"):
    fg.efa_loss(text, patches, mask_padding=True)
  with pytest.raises(ValueError, match="patch_feats"):
    fg.efa_loss(text, patches[:, :, :2])
  with pytest.raises(ValueError, match="chunk_size"):
    fg.hard_match_similarity(text, text, chunk_size=0)
  with pytest.raises(ValueError, match="RSTPReid"):
    fg.efa_paper_margins("market1501")
  assert fg.efa_paper_margins("RSTPReid") == (0.2, 0.8)
  assert fg.efa_paper_margins("CUHK-PEDES") == (0.1, 0.1)


# --------------------------------------------------------------------------- part level


def _part_sims(seed, b=5, k=3, pids=None):
  rng = np.random.default_rng(seed)
  s = rng.uniform(-0.3, 0.6, size=(b, b, k))
  for a in range(b):
    s[a, a] += rng.uniform(0.0, 0.3, size=k)
  return s


def test_part_similarity_and_combined_match_numpy():
  rng = np.random.default_rng(10)
  ip, tp = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
  want = np.zeros((4, 4, 3))
  for t in range(4):
    for i in range(4):
      for k in range(3):
        want[t, i, k] = np_unit(tp[t, k]) @ np_unit(ip[i, k])
  got = np.asarray(fg.part_similarity(ip, tp))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  g = rng.normal(size=(4, 4))
  w = rng.dirichlet(np.ones(3), size=4)
  comb = np.asarray(fg.combined_similarity(g, got, w))
  for t in range(4):
    for i in range(4):
      np.testing.assert_allclose(comb[t, i], g[t, i] + sum(w[t, k] * want[t, i, k] for k in range(3)),
                                 rtol=1e-12)
  np.testing.assert_allclose(np.asarray(fg.combined_similarity(g, got)), g + want.mean(-1), rtol=1e-12)
  with pytest.raises(ValueError, match="weights"):
    fg.combined_similarity(g, got, np.ones((4, 4)))


def test_part_sdm_and_infonce_match_numpy():
  ps = _part_sims(11)
  pids = np.array([0, 1, 0, 2, 3])
  rng = np.random.default_rng(12)
  w = rng.dirichlet(np.ones(3), size=5)
  for weights, agg in ((None, ps.mean(-1)), (w, np.einsum("tik,tk->ti", ps, w))):
    want = sum(np.mean([np_sdm_row(50.0 * m[a], a, pids) for a in range(5)]) for m in (agg.T, agg))
    np.testing.assert_allclose(float(fg.part_sdm(ps, pids, weights)), want, rtol=1e-11)
    ce = 0.0
    for m in (agg, agg.T):
      ce += np.mean([-np.log(np_softmax(50.0 * m[a])[a]) for a in range(5)]) / 2
    np.testing.assert_allclose(float(fg.part_infonce(ps, weights)), ce, rtol=1e-11)
  want_sum = sum(np.mean([np_sdm_row(10.0 * m[a], a, pids) for a in range(5)])
                 for m in (ps.sum(-1).T, ps.sum(-1)))
  np.testing.assert_allclose(float(fg.part_sdm(ps, pids, logit_scale=10.0, reduce="sum")), want_sum,
                             rtol=1e-11)


OPTION_GRID = list(itertools.product(["mean", "softmax"], ["batch", "anchor"],
                                     ["hardest_semi_hard", "all_semi_hard"], ["skip", "hardest"]))


@pytest.mark.parametrize("commonality,scope,negatives,fallback", OPTION_GRID)
def test_commonality_loss_matches_numpy(commonality, scope, negatives, fallback):
  pids = np.array([0, 1, 0, 2, 3, 4])
  ps = _part_sims(13, b=6, k=4)
  kw = dict(base_margin=0.3, floor=0.05, commonality=commonality, scope=scope,
            commonality_temperature=0.5, negatives=negatives, fallback=fallback)
  got = fg.commonality_margin_ranking_loss(ps, pids, **kw)
  want = np_cmr(ps, pids, 0.3, 0.05, commonality, scope, 0.5, negatives, fallback)
  assert want > 0
  np.testing.assert_allclose(float(got), want, rtol=1e-12)


def test_commonality_loss_separate_i2t_matrix():
  pids = np.array([0, 1, 2, 3])
  ps, ps2 = _part_sims(14, b=4), _part_sims(15, b=4)
  got = fg.commonality_margin_ranking_loss(ps, pids, part_sims_i2t=ps2, fallback="hardest")
  np.testing.assert_allclose(float(got), np_cmr(ps, pids, fallback="hardest", ps_i2t=ps2), rtol=1e-12)


def test_commonality_margin_shrinks_for_common_part_and_respects_floor():
  pids = np.array([0, 1, 2, 3])
  ps = np.full((4, 4, 3), 0.1)
  ps[..., 0] = 0.8   # part 0: every different-ID pair looks alike (common, e.g. "black pants")
  ps[..., 1] = 0.1   # part 1: mildly shared
  ps[..., 2] = -0.5  # part 2: discriminative
  for a in range(4):
    ps[a, a] = 0.9
  m = np.asarray(fg.commonality_margins(ps, pids, base_margin=0.2, floor=0.05))
  np.testing.assert_allclose(m[0], [0.05, 0.2 * 0.9, 0.2 * 1.5], rtol=1e-12)  # 0.2*0.2=0.04 -> floor
  assert m[0, 0] < m[0, 1] < m[0, 2]
  c = np.asarray(fg.part_commonality(ps, pids))
  np.testing.assert_allclose(c, [0.8, 0.1, -0.5], rtol=1e-12)
  cs = np.asarray(fg.part_commonality(ps, pids, commonality="softmax"))
  assert cs[0] > cs[1] > cs[2] and abs(cs.sum() - 1) < 1e-12
  assert np.all(np.asarray(fg.commonality_margins(ps, pids, floor=0.12)) >= 0.12)


def test_commonality_loss_both_directions():
  # one semi-hard triplet that exists only for the text anchor, then only for the image anchor
  pids = np.array([0, 1, 2])
  base = np.full((3, 3, 1), -0.5)
  for a in range(3):
    base[a, a] = 0.5
  m = float(fg.commonality_margins(base, pids, base_margin=0.2)[0, 0])
  ps = base.copy()
  ps[0, 1, 0] = 0.5 - m / 2     # text 0 vs image 1: v = m/2, semi-hard
  text_only = fg.commonality_margin_ranking_loss(ps, pids, base_margin=0.2)
  # commonality moves slightly when an entry changes: recompute the margin for the expectation
  m2 = float(fg.commonality_margins(ps, pids, base_margin=0.2)[0, 0])
  np.testing.assert_allclose(float(text_only), ps[0, 1, 0] - 0.5 + m2, rtol=1e-12)
  ps_t = ps.transpose(1, 0, 2)  # now image 0 vs text 1 (image anchor) holds the triplet
  image_only = fg.commonality_margin_ranking_loss(ps_t, pids, base_margin=0.2)
  np.testing.assert_allclose(float(image_only), float(text_only), rtol=1e-12)
  # the two directions are different triplets: rows of one are columns of the other
  both = ps.copy()
  both[1, 0, 0] = 0.5 - m / 4
  np.testing.assert_allclose(float(fg.commonality_margin_ranking_loss(both, pids, base_margin=0.2)),
                             np_cmr(both, pids), rtol=1e-12)
  assert float(fg.commonality_margin_ranking_loss(base, pids)) == 0.0  # all easy: no triplet


def test_commonality_loss_gradient_detached_commonality():
  pids = np.array([0, 1, 0, 2, 3])
  ps = _part_sims(16, b=5, k=2)
  kw = dict(commonality="mean", scope="anchor", negatives="all_semi_hard", fallback="hardest")
  g = np.asarray(jax.jit(jax.grad(lambda s: fg.commonality_margin_ranking_loss(s, pids, **kw)))(
      jnp.asarray(ps)))
  frozen = [np_commonality(ps, pids, "mean", "anchor", 1.0),
            np_commonality(ps.transpose(1, 0, 2), pids, "mean", "anchor", 1.0)]
  fd = central_fd(lambda s: np_cmr(s, pids, frozen=frozen, scope="anchor",
                                   negatives="all_semi_hard", fallback="hardest"), ps)
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
  fd_live = central_fd(lambda s: np_cmr(s, pids, scope="anchor", negatives="all_semi_hard",
                                        fallback="hardest"), ps)
  assert np.max(np.abs(fd_live - fd)) > 1e-4  # commonality does move with s: detaching matters


def test_commonality_loss_bad_input():
  ps = _part_sims(17)
  with pytest.raises(ValueError, match="negatives"):
    fg.commonality_margin_ranking_loss(ps, np.arange(5), negatives="random")
  with pytest.raises(ValueError, match="pids"):
    fg.commonality_margin_ranking_loss(ps, np.arange(4))
  with pytest.raises(ValueError, match=r"\[B, B, K\]"):
    fg.commonality_margin_ranking_loss(ps[:, :3], np.arange(5))
