"""Losses of the two probabilistic seed methods (pure, vectorized jnp).

UCFA (seed 000, spec seed-methods.md §A; reconstructed from the abstract and the
OMRE code of the same group): distribution contrast, point contrast, hinge
triplet, variance regularizers, reconstruction losses, fused inference score.
MUM / UMSA (seed 001, spec §B, reconstruction): batch + identity uncertainty
feature augmentation, bi-directional cross-modal circle loss, global masked-token
semantic recovery.

Conventions: features are [B,D] (or [K,B,D] for K samples); similarity matrices
are [rows=anchors, cols=candidates]; image-to-text matrices have image rows.
Diagonals are computed as sum(x*y) or with an iota mask, never jnp.diag, so the
functions also run on batch-sharded arrays. All reductions are in the input
float dtype (float32 inputs are expected; bfloat16 features are upcast).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

_TINY = 1e-12  # floor of squared norms: guards a zero vector, inert otherwise.


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _float(x: Array) -> Array:
  """Upcasts half-precision features to float32 (float64 stays float64)."""
  x = jnp.asarray(x)
  if x.dtype in (jnp.bfloat16, jnp.float16) or not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x


def _replicated(x: Array) -> Array:
  """All-gathers x if it is sharded under an Explicit-axes mesh, else returns it.

  Used on the right-hand (column) operand of every cross-batch product, so the
  [B,B] results stay row-sharded like the batch.
  """
  spec = jax.typeof(x).sharding.spec
  if any(axis is not None for axis in spec):
    return jax.sharding.reshard(x, P())
  return x


def l2_normalize(x: Array) -> Array:
  """x / ||x||_2 along the last axis."""
  x = _float(x)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), _TINY))


def cosine_matrix(a: Array, b: Array) -> Array:
  """cos(a_i, b_j): [Na,D], [Nb,D] -> [Na,Nb]."""
  return l2_normalize(a) @ _replicated(l2_normalize(b)).T


def identity_mask(pids_a: Array, pids_b: Array | None = None) -> Array:
  """Boolean [Na,Nb], True where pid_a == pid_b."""
  pids_b = pids_a if pids_b is None else pids_b
  return jnp.asarray(pids_a)[:, None] == _replicated(jnp.asarray(pids_b))[None, :]


def _eye(n: int, m: int | None = None) -> Array:
  """Boolean identity [n,m] built from iotas (no jnp.diag)."""
  m = n if m is None else m
  return (jax.lax.broadcasted_iota(jnp.int32, (n, m), 0)
          == jax.lax.broadcasted_iota(jnp.int32, (n, m), 1))


def _check_square(name: str, sim: Array) -> None:
  if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
    raise ValueError(f"{name} must be a square [B,B] similarity matrix, got {sim.shape}")


def masked_logsumexp(x: Array, mask: Array,
                     axis: int | tuple[int, ...] = -1) -> tuple[Array, Array]:
  """log sum_{mask} exp(x) over `axis` (int or tuple), stable, NaN-free when empty.

  Returns (lse, nonempty). Where no entry is selected the returned lse is 0
  (a safe placeholder) and `nonempty` is False; callers must mask it out. The
  gradient with respect to unselected or empty entries is exactly 0.
  """
  nonempty = jnp.any(mask, axis=axis, keepdims=True)
  xm = jnp.where(mask, x, -jnp.inf)
  mx = jnp.max(xm, axis=axis, keepdims=True)
  mx = jax.lax.stop_gradient(jnp.where(nonempty, mx, 0.0))
  s = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, x - mx, 0.0)), 0.0), axis=axis,
              keepdims=True)
  s = jnp.where(nonempty, s, 1.0)
  lse = jnp.log(s) + mx
  return jnp.squeeze(lse, axis), jnp.squeeze(nonempty, axis)


# ----------------------------------------------------------------------------
# SDM over a given similarity matrix (used by UCFA's distribution/point contrast)
# ----------------------------------------------------------------------------


def _sdm_direction(logits: Array, log_q: Array, axis: int | tuple[int, ...]) -> Array:
  """mean over the other axes of KL(softmax_axis(logits) || q): softmax over `axis`."""
  logp = jax.nn.log_softmax(logits, axis=axis)
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - log_q), axis=axis))


def sdm_from_similarity(sim_i2t: Array, sim_t2i: Array | None, pids: Array,
                        logit_scale: float | Array = 50.0,
                        epsilon: float = 1e-8) -> Array:
  """IRRA's SDM on given similarity matrices (irra-reference.md §3): scalar.

    q_ij = 1[pid_i == pid_j] / sum_k 1[pid_i == pid_k]
    L = mean_i KL(softmax_j(s * sim_i2t[i]) || q_i + eps)
      + mean_i KL(softmax_j(s * sim_t2i[i]) || q_i + eps)
  sim_i2t, sim_t2i: [B,B] (rows = anchors); sim_t2i=None means sim_i2t.T.
  pids: [B] identities shared by rows and columns (paired batch). With cosine
  similarities this equals IRRA's `sdm(image_feats, text_feats, pids)`.
  """
  sim_i2t = _float(sim_i2t)
  _check_square("sim_i2t", sim_i2t)
  pids = jnp.asarray(pids)
  if pids.ndim != 1 or pids.shape[0] != sim_i2t.shape[0]:
    raise ValueError(f"pids must be [{sim_i2t.shape[0]}] for a {sim_i2t.shape} similarity, "
                     f"got {pids.shape}")
  labels = identity_mask(pids).astype(sim_i2t.dtype)
  # q is symmetric (q_ij != 0 only when pid_i == pid_j, and then both rows have the same count).
  log_q = jnp.log(labels / jnp.sum(labels, axis=1, keepdims=True) + epsilon)
  i2t = _sdm_direction(logit_scale * sim_i2t, log_q, axis=1)
  if sim_t2i is None:  # rows of sim_i2t.T == columns of sim_i2t: no transpose of sharded data
    return i2t + _sdm_direction(logit_scale * sim_i2t, log_q, axis=0)
  sim_t2i = _float(sim_t2i)
  _check_square("sim_t2i", sim_t2i)
  return i2t + _sdm_direction(logit_scale * sim_t2i, log_q, axis=1)


# ----------------------------------------------------------------------------
# UCFA (§A): distribution similarities and contrast
# ----------------------------------------------------------------------------


def expected_cosine_similarity(mu_a: Array, samples_a: Array, mu_b: Array,
                               samples_b: Array) -> Array:
  """OMRE's mean/sample ("boma") similarity, an estimate of E[cos]: [Ba,Bb].

    S_ij = 1/2 [ (1/K) sum_k cos(mu_a_i, b^k_j) + (1/K) sum_k cos(a^k_i, mu_b_j) ]
  mu_a [Ba,D], samples_a [Ka,Ba,D], mu_b [Bb,D], samples_b [Kb,Bb,D].
  S(b, a) == S(a, b).T, so the t2i matrix is the transpose of the i2t one.
  """
  if samples_a.ndim != 3 or samples_b.ndim != 3:
    raise ValueError(f"samples must be [K,B,D], got {samples_a.shape} and {samples_b.shape}")
  mean_nb = _replicated(jnp.mean(l2_normalize(samples_b), axis=0))  # (1/K) sum_k b^k_j/|b^k_j|
  mean_na = jnp.mean(l2_normalize(samples_a), axis=0)
  return 0.5 * (l2_normalize(mu_a) @ mean_nb.T + mean_na @ _replicated(l2_normalize(mu_b)).T)


def wasserstein2_similarity(mu_a: Array, log_sigma_a: Array, mu_b: Array,
                            log_sigma_b: Array, normalize: bool = True) -> Array:
  """Negative squared 2-Wasserstein distance of diagonal Gaussians: [Ba,Bb].

    -W2^2(N_a,i, N_b,j) = -( ||mu_a_i - mu_b_j||^2 + ||sigma_a_i - sigma_b_j||^2 )
  with sigma = exp(log_sigma) the std. With normalize=True both mu and sigma of
  each distribution are divided by ||mu|| (the distribution of z/||mu||, so the
  scale matches cosine retrieval); then at sigma = 0 the value is 2 cos - 2 and
  SDM with logit scale s/2 on it equals SDM with scale s on cosines.
  """
  mu_a, mu_b = _float(mu_a), _float(mu_b)
  sig_a, sig_b = jnp.exp(_float(log_sigma_a)), jnp.exp(_float(log_sigma_b))
  if normalize:
    inv_a = jax.lax.rsqrt(jnp.maximum(jnp.sum(mu_a * mu_a, -1, keepdims=True), _TINY))
    inv_b = jax.lax.rsqrt(jnp.maximum(jnp.sum(mu_b * mu_b, -1, keepdims=True), _TINY))
    mu_a, sig_a, mu_b, sig_b = mu_a * inv_a, sig_a * inv_a, mu_b * inv_b, sig_b * inv_b
  mu_b, sig_b = _replicated(mu_b), _replicated(sig_b)

  def sqdist(x, y):
    d = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * (x @ y.T))
    return jnp.maximum(d, 0.0)

  return -(sqdist(mu_a, mu_b) + sqdist(sig_a, sig_b))


def distribution_contrast_loss(sim_i2t: Array, sim_t2i: Array | None, pids: Array,
                               logit_scale: float | Array = 50.0,
                               epsilon: float = 1e-8) -> Array:
  """UCFA distribution contrast (DCL) in SDM form over a distribution similarity.

  sim_i2t: [B,B] from `expected_cosine_similarity(mu_v, z_v, mu_t, z_t)` (OMRE
  "boma", the default) or `wasserstein2_similarity` (then use logit_scale/2 for a
  cosine-equivalent temperature). sim_t2i=None means sim_i2t.T (exact for both).
  """
  return sdm_from_similarity(sim_i2t, sim_t2i, pids, logit_scale, epsilon)


def _supcon_from_logits(logits: Array, pos: Array, not_self: Array,
                        axes: tuple[int, ...]) -> Array:
  """SupCon given logits and masks; softmax/positives over `axes` (the candidates)."""
  lse, _ = masked_logsumexp(logits, not_self, axis=axes)
  lse = jnp.expand_dims(lse, axes)
  n_pos = jnp.sum(pos, axis=axes)
  per_anchor = -jnp.sum(jnp.where(pos, logits - lse, 0.0), axis=axes) / jnp.maximum(n_pos, 1)
  has = n_pos > 0
  return jnp.sum(jnp.where(has, per_anchor, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def supervised_contrastive_loss(feats: Array, pids: Array,
                                logit_scale: float | Array = 50.0) -> Array:
  """SupCon (Khosla et al. 2020) over one set of vectors: scalar.

  feats [N,D] (cosine logits * logit_scale), pids [N]. For anchor a, positives
  P(a) = {p != a : pid_p == pid_a}; the softmax runs over all x != a:
    L_a = -1/|P(a)| sum_{p in P(a)} log( exp(s_ap) / sum_{x != a} exp(s_ax) )
  Mean over anchors with |P(a)| > 0 (0 if there is none).
  """
  n = feats.shape[0]
  not_self = ~_eye(n)
  pos = identity_mask(pids) & not_self
  return _supcon_from_logits(logit_scale * cosine_matrix(feats, feats), pos, not_self, (1,))


def point_contrast_loss(image_samples: Array, text_samples: Array, pids: Array,
                        logit_scale: float | Array = 50.0, intra_weight: float = 1.0,
                        epsilon: float = 1e-8,
                        intra_logit_scale: float | Array | None = None) -> Array:
  """UCFA point contrast (PCL; spec §A reconstruction): scalar.

  image_samples, text_samples: [K,B,D] (K reparameterized samples of the global
  distributions); pids [B]. Each of the K*B points of a modality carries its
  instance's identity.
    inter = SDM over the (K*B) x (K*B) image-text point cosine matrix
    intra = (SupCon(image points) + SupCon(text points)) / 2, positives = same
            identity (the other samples of the same instance included), self excluded
    L = inter + intra_weight * intra
  The (K*B)^2 matrices are kept as [K,B,K,B] (no reshape across the batch axis,
  so a batch-sharded input stays sharded); this equals the flattened k-major
  form. intra_logit_scale defaults to logit_scale.
  """
  if image_samples.ndim != 3 or image_samples.shape != text_samples.shape:
    raise ValueError("image_samples and text_samples must both be [K,B,D], got "
                     f"{image_samples.shape} and {text_samples.shape}")
  k, b, _ = image_samples.shape
  pids = jnp.asarray(pids)
  if pids.shape != (b,):
    raise ValueError(f"pids must be [{b}] for samples {image_samples.shape}, got {pids.shape}")
  n_i, n_t = l2_normalize(image_samples), l2_normalize(text_samples)
  same = identity_mask(pids)[None, :, None, :]                      # [1,B,1,B]
  # inter: rows (k, i) image points, columns (l, j) text points.
  sim = jnp.einsum("kid,ljd->kilj", n_i, _replicated(n_t))
  labels = same.astype(sim.dtype)
  log_q = jnp.log(labels / (k * jnp.sum(labels, axis=3, keepdims=True)) + epsilon)
  inter = (_sdm_direction(logit_scale * sim, log_q, axis=(2, 3))    # image anchors
           + _sdm_direction(logit_scale * sim, log_q, axis=(0, 1)))  # text anchors (columns)
  # intra: SupCon within each modality over the K*B points.
  s_intra = logit_scale if intra_logit_scale is None else intra_logit_scale
  not_self = ~(_eye(k)[:, None, :, None] & _eye(b)[None, :, None, :])
  pos = same & not_self

  def supcon(x):
    logits = s_intra * jnp.einsum("kid,ljd->kilj", x, _replicated(x))
    return _supcon_from_logits(logits, pos, not_self, (2, 3))

  return inter + intra_weight * 0.5 * (supcon(n_i) + supcon(n_t))


def _hnm_direction(sim: Array, margin: float, neg: Array, cap: bool, axis: int) -> Array:
  """Anchors along `axis`'s complement: axis=1 -> rows are anchors, 0 -> columns."""
  pos = jnp.sum(jnp.where(_eye(*sim.shape), sim, 0.0), axis=axis, keepdims=True)
  v = margin + sim - pos
  v = jnp.clip(v, 0.0, margin) if cap else jnp.maximum(v, 0.0)
  v = jnp.where(neg, v, 0.0)
  count = jnp.sum(v > 0)
  return jnp.sum(v) / jnp.maximum(count, 1)


def hnm_loss(sim: Array, margin: float = 0.2, pids: Array | None = None,
             cap: bool = True) -> Array:
  """OMRE's bidirectional hinge triplet ("hnm") on a [B,B] similarity: scalar.

  Positives are the diagonal; every off-diagonal entry is a negative (OMRE), or,
  when pids is given, only entries of a different identity. Per direction (rows
  of sim, then rows of sim.T):
    sum_{neg} clamp(margin + S_neg - S_pos, 0, margin) / #(active triplets)
  (0 when none is active); the two directions are summed. cap=True is OMRE's
  clamp at `margin` (a violating negative, S_neg >= S_pos, is saturated and
  gets no gradient); cap=False is the plain hinge max(0, .).
  OMRE default margin 0.2 ("RSTP-0.3 ICFG-0.4 CUHK-1.0" in its comment).
  """
  sim = _float(sim)
  _check_square("sim", sim)
  neg = ~_eye(sim.shape[0])
  if pids is not None:
    neg = neg & ~identity_mask(pids)
  # neg is symmetric, so the sim.T direction is the column direction of sim.
  return _hnm_direction(sim, margin, neg, cap, 1) + _hnm_direction(sim, margin, neg, cap, 0)


def fused_similarity(mu_q: Array, mu_g: Array, samples_q: Array, samples_g: Array,
                     weight: float = 0.1, prob_as_sum: bool = True) -> Array:
  """OMRE inference score: (1 - w) cos(mu_q, mu_g) + w S_prob, [Q,G].

  mu_q [Q,D] (text queries), mu_g [G,D] (gallery images), samples [K,Q,D] /
  [K,G,D]. S_prob = sum_k cos(mu_q_i, g^k_j) + sum_k cos(q^k_i, mu_g_j) as in
  OMRE's evaluator (prob_as_sum=True; = 2K * expected cosine) or the expected
  cosine itself (prob_as_sum=False).
  """
  s_prob = expected_cosine_similarity(mu_q, samples_q, mu_g, samples_g)
  if prob_as_sum:
    s_prob = s_prob * (samples_q.shape[0] + samples_g.shape[0])
  return (1.0 - weight) * cosine_matrix(mu_q, mu_g) + weight * s_prob


# ----------------------------------------------------------------------------
# variance regularizers
# ----------------------------------------------------------------------------


def entropy_margin_reg(log_sigma: Array, margin: float = 300.0,
                       exact_std_entropy: bool = False) -> Array:
  """Entropy-margin regularizer against variance collapse: scalar.

  log_sigma [..., D]; the mean over all leading axes (every token) of
    max(0, margin - H),  H = D/2 (log 2pi + 1) + c * sum_d log_sigma_d.
  c = 1/2 is the spec's / OMRE's formula (§A "reg"). Note: that is the entropy
  of N(mu, diag(exp(log_sigma))), i.e. it treats log_sigma as a LOG-VARIANCE,
  while the sampling uses std = exp(log_sigma); the true entropy under the std
  parameterization has c = 1 (exact_std_entropy=True). With c = 1/2 and D = 512
  the margin 300 is met once mean(log_sigma) >= -1.666; with c = 1, >= -0.833.
  OMRE total: 0.1 * (reg(image log_sigma) + reg(text log_sigma)).
  """
  log_sigma = _float(log_sigma)
  d = log_sigma.shape[-1]
  c = 1.0 if exact_std_entropy else 0.5
  h = d / 2.0 * (math.log(2.0 * math.pi) + 1.0) + c * jnp.sum(log_sigma, axis=-1)
  return jnp.mean(jnp.maximum(margin - h, 0.0))


def kl_to_standard_normal(mu: Array, log_sigma: Array) -> Array:
  """KL(N(mu, diag(sigma^2)) || N(0, I)) with sigma = exp(log_sigma): scalar.

  0.5 sum_d (mu^2 + sigma^2 - 1 - 2 log sigma), summed over D, mean over the
  leading axes. (OMRE's unused `kl_divergence` treats log_sigma as log-variance.)
  """
  mu, log_sigma = _float(mu), _float(log_sigma)
  kl = 0.5 * jnp.sum(mu * mu + jnp.exp(2.0 * log_sigma) - 1.0 - 2.0 * log_sigma, axis=-1)
  return jnp.mean(kl)


# ----------------------------------------------------------------------------
# reconstruction (UCFA attribute-masking language reconstruction, OMRE crsr)
# ----------------------------------------------------------------------------


def reconstruction_mlm_loss(scores: Array, labels: Array, ignore_index: int = 0) -> Array:
  """Mean over K of IRRA's MLM CE (token mean, ignore label 0): scalar.

  scores [K, *S, V] (e.g. [K,B,L,V], or [K,N,V] after gathering the masked
  positions), labels [*S] int shared by the K samples. Equals the CE averaged
  over all K * (#labels != ignore_index) tokens; 0 if no label is valid.
  """
  labels = jnp.asarray(labels)
  if scores.shape[1:-1] != labels.shape:
    raise ValueError(f"scores must be [K,*labels.shape,V]; got scores {scores.shape}, "
                     f"labels {labels.shape}")
  logp = jax.nn.log_softmax(_float(scores), axis=-1)
  idx = jnp.broadcast_to(labels, scores.shape[:-1])[..., None].astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, idx, axis=-1)[..., 0]
  valid = jnp.broadcast_to(labels != ignore_index, nll.shape)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def feature_reconstruction_loss(recovered: Array, target: Array, mask: Array) -> Array:
  """OMRE's crsr: mean over K of 1 - mean_{masked} cos(recovered, sg(target)).

  recovered [K, *S, D] (the cross-encoder output for each image sample k),
  target [*S, D] (the unmasked caption's token features; gradient stopped),
  mask [*S] bool/int (masked positions, e.g. mlm_labels > 0). 0 if no position
  is masked.
  """
  mask = jnp.asarray(mask) > 0
  if recovered.shape[1:] != target.shape or target.shape[:-1] != mask.shape:
    raise ValueError(f"need recovered [K,*S,D], target [*S,D], mask [*S]; got "
                     f"{recovered.shape}, {target.shape}, {mask.shape}")
  t = l2_normalize(jax.lax.stop_gradient(target))
  cos = jnp.sum(l2_normalize(recovered) * t, axis=-1)  # [K,*S]
  m = jnp.broadcast_to(mask, cos.shape)
  return 1.0 - jnp.sum(jnp.where(m, cos, 0.0)) / jnp.maximum(jnp.sum(m), 1)


# ----------------------------------------------------------------------------
# MUM / UMSA (§B)
# ----------------------------------------------------------------------------


def batch_and_identity_variance(feats: Array, pids: Array,
                                unbiased: bool = True) -> tuple[Array, Array]:
  """Per-dimension feature variances: (batch [D], identity [B,D]).

  batch: Var_i f_i over the batch. identity[i]: Var_j f_j over {j: pid_j = pid_i}
  (0 for an identity seen once). unbiased=True divides by n - 1 (torch.var's
  default, as in DSU), else by n. Computed with matmuls on batch-centred
  features (no [B,B,D] tensor, shard friendly). No stop-gradient here.
  """
  f = _float(feats)
  b = f.shape[0]
  mean = jnp.mean(f, axis=0)
  fc = f - mean
  ddof = 1 if unbiased else 0
  var_b = jnp.sum(fc * fc, axis=0) / max(b - ddof, 1)
  m = identity_mask(pids).astype(f.dtype)
  n = jnp.sum(m, axis=1, keepdims=True)
  fc_all = _replicated(fc)
  s1 = m @ fc_all
  s2 = m @ (fc_all * fc_all)
  ss = jnp.maximum(s2 - s1 * s1 / n, 0.0)  # sum_j (f_j - mean_id)^2
  var_id = jnp.where(n > 1, ss / jnp.maximum(n - ddof, 1), 0.0)
  return var_b, var_id


def uncertainty_augment(feats: Array, pids: Array, rng: Array, lambda_batch: float = 1.0,
                        lambda_id: float = 1.0, num_samples: int = 1,
                        unbiased: bool = True) -> Array:
  """MUM feature augmentation (spec §B): [num_samples, B, D].

    Sigma_i = lambda_batch Var_batch + lambda_id Var_id(i)   (stop-gradient)
    f~_i^s = f_i + eps^s_i * sqrt(Sigma_i),  eps ~ N(0, I) from `rng`
  Gradients reach f only through the identity path (d f~ / d f = I).
  """
  f = _float(feats)
  var_b, var_id = batch_and_identity_variance(f, pids, unbiased)
  sigma = jax.lax.stop_gradient(jnp.sqrt(lambda_batch * var_b[None, :] + lambda_id * var_id))
  eps = jax.random.normal(rng, (num_samples,) + f.shape, f.dtype)
  return f[None] + eps * sigma[None]


def circle_loss_cross_modal(text_feats: Array, image_feats: Array, pids: Array,
                            margin: float = 0.25, gamma: float = 64.0) -> Array:
  """Bi-directional cross-modal circle loss (Sun et al. 2020; spec §B): scalar.

  s = cos(text_i, image_j) [B,B]; per text anchor (row) with positives P (same
  pid) and negatives N:
    alpha_p = [1 + m - s_p]_+, alpha_n = [s_n + m]_+   (stop-gradient)
    L = softplus( lse_N(gamma alpha_n (s_n - m)) + lse_P(-gamma alpha_p (s_p - (1 - m))) )
  and the same with image anchors on s.T; result = mean_rows(L_t2i) + mean_rows(L_i2t).
  A row with no negative (or no positive) has an empty logsumexp = -inf, so its
  loss is exactly 0 (it still counts in the mean over B).
  """
  s = cosine_matrix(text_feats, image_feats)
  pos = identity_mask(pids)

  neg = ~pos
  a_p = jax.lax.stop_gradient(jnp.maximum(1.0 + margin - s, 0.0))
  a_n = jax.lax.stop_gradient(jnp.maximum(s + margin, 0.0))
  z_n = gamma * a_n * (s - margin)
  z_p = -gamma * a_p * (s - (1.0 - margin))

  def direction(axis: int) -> Array:  # axis=1: text anchors (rows); 0: image anchors (columns)
    lse_n, has_n = masked_logsumexp(z_n, neg, axis=axis)
    lse_p, has_p = masked_logsumexp(z_p, pos, axis=axis)
    ok = has_n & has_p
    return jnp.mean(jnp.where(ok, jax.nn.softplus(jnp.where(ok, lse_n + lse_p, 0.0)), 0.0))

  # pos is symmetric, so the image-anchor direction is the column direction of s.
  return direction(1) + direction(0)


def global_recovery_loss(recovered: Array, target: Array) -> Array:
  """MUM global masked-token recovery: mean_i 1 - cos(recovered_i, sg(target_i)).

  recovered [B,D]: cross-encoder output at the EOT position of the masked
  caption; target [B,D]: the unmasked caption's global feature (no gradient).
  """
  t = l2_normalize(jax.lax.stop_gradient(target))
  return jnp.mean(1.0 - jnp.sum(l2_normalize(recovered) * t, axis=-1))


def global_recovery_infonce_loss(recovered: Array, target: Array,
                                 logit_scale: float | Array = 50.0) -> Array:
  """InfoNCE alternative: CE_i(softmax_j(s cos(r_i, sg(t_j))), label i), mean over i."""
  t = l2_normalize(jax.lax.stop_gradient(target))
  r = l2_normalize(recovered)
  logits = logit_scale * (r @ _replicated(t).T)
  pos = logit_scale * jnp.sum(r * t, axis=-1)
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)
