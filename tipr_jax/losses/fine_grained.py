"""Fine-grained alignment losses: FMFA's A-SDM and EFA, and the part-level losses.

Pure, vectorized jnp functions (no parameters). Conventions:
  * A paired batch: text i and image i form the positive pair; `pids` [B] are
    identity labels shared by the pair.
  * Similarity matrices are TEXT-major: `[B_t, B_i]` (rows = texts); the
    image-to-text matrix is the transpose.
  * Inputs of any float dtype are computed in at least float32 (float64 stays
    float64 under `jax.enable_x64`).
  * Diagonals are taken as `sum(m * eye)` and gathers use `take_along_axis`, so
    the functions also run under an Explicit-axes mesh (spec jax-stack.md).

See docs/methods_fine_grained.md for the formulas, the code-vs-paper switches
and the reconstruction choices.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

# EFA margins (text->joint, image->joint). The FMFA code hard-codes (0.1, 0.9)
# for every dataset; the paper's Table 1 lists per-dataset margins.
EFA_CODE_MARGINS: tuple[float, float] = (0.1, 0.9)
_EFA_PAPER_MARGINS = {
    "cuhk-pedes": (0.1, 0.1),
    "icfg-pedes": (0.2, 1.0),
    "rstpreid": (0.2, 0.8),
}


def efa_paper_margins(dataset: str) -> tuple[float, float]:
  """(T->E, V->E) margins of FMFA's paper Table 1 for 'CUHK-PEDES' | 'ICFG-PEDES' | 'RSTPReid'."""
  key = dataset.strip().lower()
  if key not in _EFA_PAPER_MARGINS:
    raise ValueError(f"efa_paper_margins: unknown dataset {dataset!r}; expected one of "
                     "'CUHK-PEDES', 'ICFG-PEDES', 'RSTPReid'")
  return _EFA_PAPER_MARGINS[key]


# --------------------------------------------------------------------------- helpers


def _as_float(x: Array) -> Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """x / max(||x||_2, eps) along `axis` (torch F.normalize); finite gradient at x = 0."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps * eps, x.dtype)))


def _diag(m: Array) -> Array:
  """Diagonal of a square [B, B(, ...)] array as sum(m * eye) (sharding friendly)."""
  eye = jnp.eye(m.shape[0], m.shape[1], dtype=m.dtype)
  if m.ndim == 3:
    eye = eye[:, :, None]
  return jnp.sum(m * eye, axis=1)


def _check_pids(pids: Array, b: int, where: str) -> Array:
  pids = jnp.asarray(pids)
  if pids.shape != (b,):
    raise ValueError(f"{where}: pids must have shape ({b},), got {pids.shape}")
  return pids


def _label_distribution(pids: Array, dtype) -> Array:
  """q_ij = 1[pid_i == pid_j] / #{k: pid_k == pid_i}, [B, B]."""
  same = (pids[:, None] == pids[None, :]).astype(dtype)
  return same / jnp.sum(same, axis=1, keepdims=True)


def _sdm_rows(logits: Array, q: Array, epsilon: float) -> Array:
  """Per-row KL(softmax(logits) || q + eps): sum_j p_ij (log p_ij - log(q_ij + eps)), [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jnp.exp(logp) * (logp - jnp.log(q + epsilon)), axis=-1)


def sdm_from_similarity(sim_t2i: Array, pids: Array, logit_scale: float = 50.0,
                        epsilon: float = 1e-8) -> Array:
  """IRRA's SDM on a precomputed text-major similarity matrix [B, B] -> scalar.

  L = mean_i KL_i(i2t) + mean_i KL_i(t2i) with logits = logit_scale * sim.
  """
  sim_t2i = _as_float(sim_t2i)
  b = sim_t2i.shape[0]
  if sim_t2i.ndim != 2 or sim_t2i.shape[1] != b:
    raise ValueError(f"sdm_from_similarity: sim_t2i must be square [B, B], got {sim_t2i.shape}")
  q = _label_distribution(_check_pids(pids, b, "sdm_from_similarity"), sim_t2i.dtype)
  return (jnp.mean(_sdm_rows(logit_scale * sim_t2i.T, q, epsilon))
          + jnp.mean(_sdm_rows(logit_scale * sim_t2i, q, epsilon)))


# --------------------------------------------------------------------------- A-SDM


def _asdm_code_weights(cos: Array, logits: Array, same: Array, scale: float) -> Array:
  """FMFA code weights for anchor rows: 1 + scale * (cos[top] - cos[first positive]) if top != first positive."""
  top = jnp.argmax(logits, axis=1)[:, None]                 # first maximal column
  first_pos = jnp.argmax(same, axis=1)[:, None]             # = argmax_j q_ij (first same-ID column)
  diff = (jnp.take_along_axis(cos, top, axis=1)
          - jnp.take_along_axis(cos, first_pos, axis=1))[:, 0]
  diff = jnp.where(top[:, 0] != first_pos[:, 0], diff, jnp.zeros_like(diff))
  return scale * diff + 1.0


def _asdm_paper_weights(logits: Array, alpha: float) -> Array:
  """Paper weights for anchor rows: alpha * (max_k p_ik - p_ii) + 1 with p = softmax(logits)."""
  p = jax.nn.softmax(logits, axis=-1)
  return alpha * (jnp.max(p, axis=1) - _diag(p)) + 1.0


def adaptive_sdm(image_feats: Array, text_feats: Array, pids: Array, logit_scale: float = 50.0,
                 epsilon: float = 1e-8, mode: Literal["code", "paper"] = "code",
                 alpha: float = 10.0, code_scale: float = 0.1,
                 stop_weight_gradient: bool = False) -> Array:
  """FMFA's Adaptive SDM, image_feats/text_feats [B, D] global features -> scalar.

  L = mean_i w^{i2t}_i KL_i(i2t) + mean_i w^{t2i}_i KL_i(t2i), where KL_i is
  IRRA's per-row SDM term and the weight of each anchor row is computed on
  that direction's own matrix (image rows for i2t, text rows for t2i):
    mode='code':  w_i = code_scale * (cos(i, argmax_j logits_ij) - cos(i, f_i)) + 1
                  if argmax_j logits_ij != f_i else 1, where f_i = argmax_j q_ij is
                  the FIRST same-identity column (FMFA objectives.compute_sdm,
                  use_weight=True; code_scale 0.1 is hard-coded there).
    mode='paper': w_i = alpha * (max_k p_ik - p_ii) + 1, p = softmax(logits)
                  (paper Sec. 3.2; alpha 10, 1 for RSTPReid).
  The weights are not detached (as in the code) unless `stop_weight_gradient`.
  With every anchor's positive ranked first, w = 1 and this equals SDM.
  """
  image_feats, text_feats = _as_float(image_feats), _as_float(text_feats)
  if image_feats.ndim != 2 or image_feats.shape != text_feats.shape:
    raise ValueError("adaptive_sdm: image_feats and text_feats must both be [B, D] of the same "
                     f"shape, got {image_feats.shape} and {text_feats.shape}")
  if mode not in ("code", "paper"):
    raise ValueError(f"adaptive_sdm: mode must be 'code' or 'paper', got {mode!r}")
  b = image_feats.shape[0]
  pids = _check_pids(pids, b, "adaptive_sdm")
  dtype = jnp.promote_types(image_feats.dtype, text_feats.dtype)
  cos_t2i = l2_normalize(text_feats.astype(dtype)) @ l2_normalize(image_feats.astype(dtype)).T
  cos_i2t = cos_t2i.T
  logits_t2i, logits_i2t = logit_scale * cos_t2i, logit_scale * cos_i2t
  same = pids[:, None] == pids[None, :]
  q = _label_distribution(pids, dtype)
  kl_i2t = _sdm_rows(logits_i2t, q, epsilon)
  kl_t2i = _sdm_rows(logits_t2i, q, epsilon)
  if mode == "code":
    w_i2t = _asdm_code_weights(cos_i2t, logits_i2t, same, code_scale)
    w_t2i = _asdm_code_weights(cos_t2i, logits_t2i, same, code_scale)
  else:
    w_i2t = _asdm_paper_weights(logits_i2t, alpha)
    w_t2i = _asdm_paper_weights(logits_t2i, alpha)
  if stop_weight_gradient:
    w_i2t, w_t2i = jax.lax.stop_gradient(w_i2t), jax.lax.stop_gradient(w_t2i)
  return jnp.mean(w_i2t * kl_i2t) + jnp.mean(w_t2i * kl_t2i)


# --------------------------------------------------------------------------- EFA


def efa_aggregate(text_feats: Array, patch_feats: Array, threshold: float | None = None,
                  range_eps: float = 1e-12) -> Array:
  """Language-grouped visual embeddings agg_v [B, L, D] from text [B, L, D] and patches [B, N, D].

  Per pair b and token l: s_ln = <t_bl, v_bn> (raw inner product), min-max
  normalised over the N patches, entries <= threshold (default 1/N; the code
  keeps `> 1/N`) set to 0, row renormalised to sum 1; agg_bl = sum_n w_ln v_bn.
  Guards (the code has none): a row with max - min <= range_eps (constant row)
  gets normalised value 1 everywhere (uniform weights, agg = mean patch); a zero
  row sum divides by 1. Values and gradients stay finite.
  """
  t, v = _as_float(text_feats), _as_float(patch_feats)
  if t.ndim != 3 or v.ndim != 3 or t.shape[0] != v.shape[0] or t.shape[2] != v.shape[2]:
    raise ValueError("efa_aggregate: expected text_feats [B, L, D] and patch_feats [B, N, D], got "
                     f"{t.shape} and {v.shape}")
  dtype = jnp.promote_types(t.dtype, v.dtype)
  t, v = t.astype(dtype), v.astype(dtype)
  n = v.shape[1]
  thr = 1.0 / n if threshold is None else threshold
  s = jnp.einsum("bld,bnd->bln", t, v)
  mn = jnp.min(s, axis=-1, keepdims=True)
  mx = jnp.max(s, axis=-1, keepdims=True)
  rng = mx - mn
  ok = rng > range_eps
  normed = jnp.where(ok, (s - mn) / jnp.where(ok, rng, jnp.ones_like(rng)), jnp.ones_like(s))
  sparse = jnp.where(normed > thr, normed, jnp.zeros_like(normed))
  row = jnp.sum(sparse, axis=-1, keepdims=True)
  w = sparse / jnp.where(row > 0, row, jnp.ones_like(row))
  return jnp.einsum("bln,bnd->bld", w, v)


def _hard_match_block(xn: Array, x_mask: Array | None, cn: Array, c_mask: Array | None,
                      lse_temperature: float) -> Array:
  """Rows block: xn [b, Lx, D] vs all cn [B, Lc, D] -> [b, B] (max over Lc, LSE over Lx)."""
  sim = jnp.einsum("axd,bcd->abxc", xn, cn)                      # [b, B, Lx, Lc]
  if c_mask is not None:  # cosines are >= -1, so -4 never wins the max (stays finite / T)
    sim = jnp.where(c_mask[None, :, None, :], sim, jnp.asarray(-4.0, sim.dtype))
  m = jnp.max(sim, axis=-1) / lse_temperature                    # [b, B, Lx]
  if x_mask is not None:
    m = jnp.where(x_mask[:, None, :], m, jnp.finfo(m.dtype).min)
  return jax.nn.logsumexp(m, axis=-1)


def hard_match_similarity(x: Array, c: Array, x_mask: Array | None = None,
                          c_mask: Array | None = None, lse_temperature: float = 1.0,
                          chunk_size: int | None = None) -> Array:
  """EFA hard-coding similarity between every x_a [Lx, D] and every c_b [Lc, D] -> [B, B].

  sims[a, b] = logsumexp_x( max_c cos(x_ax, c_bc) / lse_temperature ), rows = x
  samples, columns = c samples (FMFA compute_infonce_loss_cosine: max over the
  LAST axis = the joint-embedding tokens, logsumexp over the x tokens; the code
  does not multiply back by the temperature). Masks are boolean [B, L] (True =
  token used); masked x tokens leave the logsumexp, masked c tokens the max.
  chunk_size: None computes the [B, B, Lx, Lc] cosine tensor whole; an int maps
  over blocks of `chunk_size` x rows with lax.map under jax.checkpoint, so only
  a [chunk_size, B, Lx, Lc] block is live in the forward and the backward.
  """
  x, c = _as_float(x), _as_float(c)
  if x.ndim != 3 or c.ndim != 3 or x.shape[0] != c.shape[0] or x.shape[2] != c.shape[2]:
    raise ValueError(f"hard_match_similarity: expected x [B, Lx, D] and c [B, Lc, D], got "
                     f"{x.shape} and {c.shape}")
  for name, mask, ref in (("x_mask", x_mask, x), ("c_mask", c_mask, c)):
    if mask is not None and jnp.shape(mask) != ref.shape[:2]:
      raise ValueError(f"hard_match_similarity: {name} must have shape {ref.shape[:2]}, got "
                       f"{jnp.shape(mask)}")
  dtype = jnp.promote_types(x.dtype, c.dtype)
  xn, cn = l2_normalize(x.astype(dtype)), l2_normalize(c.astype(dtype))
  x_mask = None if x_mask is None else jnp.asarray(x_mask, bool)
  c_mask = None if c_mask is None else jnp.asarray(c_mask, bool)
  b = x.shape[0]
  if chunk_size is None or chunk_size >= b:
    return _hard_match_block(xn, x_mask, cn, c_mask, lse_temperature)
  if chunk_size < 1:
    raise ValueError(f"hard_match_similarity: chunk_size must be >= 1 or None, got {chunk_size}")
  nblocks = math.ceil(b / chunk_size)
  pad = nblocks * chunk_size - b
  xp = jnp.pad(xn, ((0, pad), (0, 0), (0, 0))).reshape(nblocks, chunk_size, *xn.shape[1:])
  mp = jnp.ones(x.shape[:2], bool) if x_mask is None else x_mask
  mp = jnp.pad(mp, ((0, pad), (0, 0)), constant_values=True).reshape(nblocks, chunk_size, -1)

  @jax.checkpoint
  def block(args):
    xb, mb = args
    return _hard_match_block(xb, mb if x_mask is not None else None, cn, c_mask, lse_temperature)

  out = jax.lax.map(block, (xp, mp))                              # [nblocks, chunk, B]
  return out.reshape(nblocks * chunk_size, b)[:b]


def efa_margin_cost(sims: Array, margin: float, temperature: float = 1.0,
                    row_normalize: bool = True,
                    grouping: Literal["code", "anchor"] = "code") -> Array:
  """FMFA's EFA margin cost on a [B, B] matrix (rows = x samples, columns = joint c) -> scalar.

  With d = diag(s) and the diagonal of each term matrix set to 0 (it adds exp(0)=1
  inside every sum, so each cost is >= 0):
    X-anchored terms  A_ab = s_ab - d_a + margin  (the code's `img_ret`)
    C-anchored terms  C_ab = s_ab - d_b + margin  (the code's `txt_ret`)
    cost = mean_b LSE_a(C_ab / T) + mean LSE(A / T)
  grouping='code' sums A over axis 0 (per column b, mixing anchors; this is the
  axis the FMFA code uses), grouping='anchor' sums A over axis 1 (per anchor a,
  the per-anchor reading of the paper). C is summed over axis 0 in both.
  row_normalize: the code's undocumented F.normalize(sims, dim=-1) first.
  """
  s = _as_float(sims)
  if s.ndim != 2 or s.shape[0] != s.shape[1]:
    raise ValueError(f"efa_margin_cost: sims must be square [B, B], got {s.shape}")
  if grouping not in ("code", "anchor"):
    raise ValueError(f"efa_margin_cost: grouping must be 'code' or 'anchor', got {grouping!r}")
  if row_normalize:
    s = l2_normalize(s, axis=-1)
  d = _diag(s)
  eye = jnp.eye(s.shape[0], dtype=bool)
  zero = jnp.zeros_like(s)
  a_terms = jnp.where(eye, zero, s - d[:, None] + margin) / temperature
  c_terms = jnp.where(eye, zero, s - d[None, :] + margin) / temperature
  cost_c = jax.nn.logsumexp(c_terms, axis=0)
  cost_a = jax.nn.logsumexp(a_terms, axis=0 if grouping == "code" else 1)
  return jnp.mean(cost_c) + jnp.mean(cost_a)


def efa_loss(text_feats: Array, patch_feats: Array, text_ids: Array | None = None, *,
             margin_text: float = EFA_CODE_MARGINS[0], margin_image: float = EFA_CODE_MARGINS[1],
             mask_padding: bool = False, row_normalize: bool = True,
             grouping: Literal["code", "anchor"] = "code", lse_temperature: float = 1.0,
             cost_temperature: float = 1.0, threshold: float | None = None,
             chunk_size: int | None = 16, range_eps: float = 1e-12) -> Array:
  """FMFA's Explicit Fine-grained Alignment loss -> scalar.

  text_feats [B, L, D]: projected text token features (all L=77 positions);
  patch_feats [B, N, D]: projected image tokens WITHOUT the [CLS] (image_feats[:, 1:]);
  text_ids [B, L]: token ids, needed only with mask_padding (padding id 0).
  L = cost(hard(T, E), margin_text) + cost(hard(V, E), margin_image), E = efa_aggregate(T, V).
  Defaults = the FMFA code (margins 0.1/0.9, all 77 text positions, row-normalised
  sims, code axes); paper Table 1 margins via efa_paper_margins(dataset).
  mask_padding drops padding positions both as text tokens and as joint tokens.
  """
  agg = efa_aggregate(text_feats, patch_feats, threshold=threshold, range_eps=range_eps)
  tmask = None
  if mask_padding:
    if text_ids is None:
      raise ValueError("efa_loss: mask_padding=True needs text_ids [B, L]")
    if jnp.shape(text_ids) != jnp.shape(text_feats)[:2]:
      raise ValueError(f"efa_loss: text_ids must have shape {jnp.shape(text_feats)[:2]}, got "
                       f"{jnp.shape(text_ids)}")
    tmask = jnp.asarray(text_ids) != 0
  s_text = hard_match_similarity(text_feats, agg, tmask, tmask, lse_temperature, chunk_size)
  s_image = hard_match_similarity(patch_feats, agg, None, tmask, lse_temperature, chunk_size)
  kw = dict(temperature=cost_temperature, row_normalize=row_normalize, grouping=grouping)
  return efa_margin_cost(s_text, margin_text, **kw) + efa_margin_cost(s_image, margin_image, **kw)


# --------------------------------------------------------------------------- part level


def part_similarity(image_parts: Array, text_parts: Array) -> Array:
  """Per-part cosine, image_parts [B_i, K, D], text_parts [B_t, K, D] -> [B_t, B_i, K] (text rows)."""
  image_parts, text_parts = _as_float(image_parts), _as_float(text_parts)
  if (image_parts.ndim != 3 or text_parts.ndim != 3
      or image_parts.shape[1:] != text_parts.shape[1:]):
    raise ValueError("part_similarity: expected image_parts [B_i, K, D] and text_parts "
                     f"[B_t, K, D], got {image_parts.shape} and {text_parts.shape}")
  return jnp.einsum("tkd,ikd->tik", l2_normalize(text_parts), l2_normalize(image_parts))


def _part_weights(part_sims: Array, weights: Array | None) -> Array:
  """Weights broadcastable to part_sims [B_t, B_i, K]: None -> 1/K, [K] or [B_t, K] (per text)."""
  k = part_sims.shape[-1]
  if weights is None:
    return jnp.full((k,), 1.0 / k, part_sims.dtype)
  w = _as_float(weights)
  if w.shape == (k,):
    return w
  if w.shape == (part_sims.shape[0], k):
    return w[:, None, :]
  raise ValueError(f"part weights must have shape ({k},) or ({part_sims.shape[0]}, {k}), "
                   f"got {w.shape}")


def combined_similarity(global_sim: Array, part_sims: Array, weights: Array | None = None,
                        part_scale: float = 1.0) -> Array:
  """Coarse+fine similarity S = global_sim + part_scale * sum_k w_k s_k, [B_t, B_i].

  weights: None -> uniform 1/K (the part term is then the mean part cosine);
  [K] shared, or [B_t, K] per text query (e.g. PartDecoder's text-predicted weights).
  """
  part_sims = _as_float(part_sims)
  if part_sims.ndim != 3 or jnp.shape(global_sim) != part_sims.shape[:2]:
    raise ValueError(f"combined_similarity: global_sim {jnp.shape(global_sim)} must equal "
                     f"part_sims[..., 0] shape {part_sims.shape[:2]}")
  w = _part_weights(part_sims, weights)
  return _as_float(global_sim) + part_scale * jnp.sum(part_sims * w, axis=-1)


def part_sdm(part_sims: Array, pids: Array, weights: Array | None = None,
             logit_scale: float = 50.0, epsilon: float = 1e-8,
             reduce: Literal["mean", "sum"] = "mean") -> Array:
  """Part-level SDM on the aggregated part similarity (spec §D) -> scalar.

  S = sum_k w_k s_k with w = 1/K (reduce='mean', the cosine scale the logit
  scale expects) or w = 1 (reduce='sum', the literal sum_k s_k); explicit
  weights [K] / [B_t, K] override reduce.
  """
  part_sims = _as_float(part_sims)
  if reduce not in ("mean", "sum"):
    raise ValueError(f"part_sdm: reduce must be 'mean' or 'sum', got {reduce!r}")
  if weights is None and reduce == "sum":
    weights = jnp.ones((part_sims.shape[-1],), part_sims.dtype)
  s = jnp.sum(part_sims * _part_weights(part_sims, weights), axis=-1)
  return sdm_from_similarity(s, pids, logit_scale, epsilon)


def part_infonce(part_sims: Array, weights: Array | None = None,
                 logit_scale: float = 50.0) -> Array:
  """Part-level InfoNCE (CLIP/ITC form, diagonal positives) on sum_k w_k s_k -> scalar.

  (CE(t2i, diag) + CE(i2t, diag)) / 2 with logits = logit_scale * S; w defaults to 1/K.
  """
  part_sims = _as_float(part_sims)
  b = part_sims.shape[0]
  if part_sims.ndim != 3 or part_sims.shape[1] != b:
    raise ValueError(f"part_infonce: part_sims must be [B, B, K], got {part_sims.shape}")
  logits = logit_scale * jnp.sum(part_sims * _part_weights(part_sims, weights), axis=-1)
  ce_t2i = -jnp.mean(_diag(jax.nn.log_softmax(logits, axis=1)))
  ce_i2t = -jnp.mean(_diag(jax.nn.log_softmax(logits.T, axis=1)))
  return 0.5 * (ce_t2i + ce_i2t)


def part_commonality(part_sims: Array, pids: Array,
                     commonality: Literal["mean", "softmax"] = "mean",
                     scope: Literal["batch", "anchor"] = "batch",
                     temperature: float = 1.0) -> Array:
  """Commonality of each part from different-identity pairs (detached).

  part_sims [A, C, K] (rows = anchors, positives on the diagonal).
  scope='batch':  c_k = mean over pairs with pid_a != pid_c of s_k(a, c) -> [K]
  scope='anchor': c_ak = mean over c with pid_c != pid_a of s_k(a, c)   -> [A, K]
  commonality='softmax': softmax over parts of (c / temperature) instead.
  No different-identity pair: c = 0. Returned under stop_gradient.
  """
  s = jax.lax.stop_gradient(_as_float(part_sims))
  if s.ndim != 3 or s.shape[0] != s.shape[1]:
    raise ValueError(f"part_commonality: part_sims must be [B, B, K], got {s.shape}")
  if commonality not in ("mean", "softmax") or scope not in ("batch", "anchor"):
    raise ValueError(f"part_commonality: commonality must be 'mean'|'softmax' and scope "
                     f"'batch'|'anchor', got {commonality!r}, {scope!r}")
  pids = _check_pids(pids, s.shape[0], "part_commonality")
  neg = (pids[:, None] != pids[None, :]).astype(s.dtype)[:, :, None]
  axes = (0, 1) if scope == "batch" else (1,)
  count = jnp.sum(neg * jnp.ones_like(s), axis=axes)
  c = jnp.sum(s * neg, axis=axes) / jnp.maximum(count, 1.0)
  if commonality == "softmax":
    c = jax.nn.softmax(c / temperature, axis=-1)
  return c


def commonality_margins(part_sims: Array, pids: Array, base_margin: float = 0.2,
                        floor: float = 0.05, commonality: Literal["mean", "softmax"] = "mean",
                        scope: Literal["batch", "anchor"] = "batch",
                        temperature: float = 1.0) -> Array:
  """Per-part margins m = max(base_margin * (1 - c), floor), [A, K] for part_sims [A, C, K] (detached)."""
  c = part_commonality(part_sims, pids, commonality, scope, temperature)
  m = jnp.maximum(base_margin * (1.0 - c), floor)
  return jnp.broadcast_to(m, (part_sims.shape[0], part_sims.shape[-1]))


def _cmr_direction(s: Array, neg: Array, margin: Array, negatives: str, fallback: str
                   ) -> tuple[Array, Array]:
  """Hinge sum and triplet count for anchors on rows of s [A, C, K]; margin [A, K]."""
  pos = _diag(s)                                                   # [A, K]
  viol = s - pos[:, None, :] + margin[:, None, :]                  # [A, C, K]
  negm = neg[:, :, None]
  semi = negm & (viol > 0) & (viol < margin[:, None, :])
  very_neg = jnp.finfo(s.dtype).min
  zero = jnp.zeros_like(viol)
  if negatives == "all_semi_hard":
    total = jnp.sum(jnp.where(semi, viol, zero))
    count = jnp.sum(semi)
    has_semi = jnp.any(semi, axis=1)                               # [A, K]
  else:  # hardest_semi_hard
    has_semi = jnp.any(semi, axis=1)
    best = jnp.max(jnp.where(semi, viol, very_neg), axis=1)        # [A, K]
    total = jnp.sum(jnp.where(has_semi, best, jnp.zeros_like(best)))
    count = jnp.sum(has_semi)
  if fallback == "hardest":
    hardest = jnp.max(jnp.where(negm, viol, very_neg), axis=1)     # [A, K]
    use = (~has_semi) & (hardest > 0)
    total = total + jnp.sum(jnp.where(use, hardest, jnp.zeros_like(hardest)))
    count = count + jnp.sum(use)
  return total, count


def commonality_margin_ranking_loss(
    part_sims: Array, pids: Array, base_margin: float = 0.2, floor: float = 0.05,
    part_sims_i2t: Array | None = None,
    commonality: Literal["mean", "softmax"] = "mean",
    scope: Literal["batch", "anchor"] = "batch", commonality_temperature: float = 1.0,
    negatives: Literal["hardest_semi_hard", "all_semi_hard"] = "hardest_semi_hard",
    fallback: Literal["skip", "hardest"] = "skip") -> Array:
  """Commonality-based margin ranking loss (reconstruction of seed 003's L_CMR) -> scalar.

  part_sims [B_t, B_i, K] text-major per-part cosines (text anchors on rows);
  image anchors use part_sims_i2t [B_i, B_t, K] if given, else the transpose.
  Per part k: margin m_k = max(base_margin * (1 - c_k), floor) with c_k from
  part_commonality (detached; per direction when scope='anchor'). For anchor a
  with positive p = a (the pair) and negatives n (pid_n != pid_a):
    v = s_k(a, n) - s_k(a, a) + m_k, semi-hard when 0 < v < m_k
  negatives='hardest_semi_hard': one triplet per (a, k): the semi-hard n with the
    largest v; 'all_semi_hard': every semi-hard n.
  fallback='skip': (a, k) without a semi-hard negative adds nothing (PLOT's rule);
    'hardest': it adds the hardest negative's hinge [v]_+ when > 0.
  Loss = sum of hinges over both directions / number of active triplets (0 if none).
  """
  s_t = _as_float(part_sims)
  b = s_t.shape[0]
  if s_t.ndim != 3 or s_t.shape[1] != b:
    raise ValueError(f"commonality_margin_ranking_loss: part_sims must be [B, B, K], got {s_t.shape}")
  s_i = jnp.swapaxes(s_t, 0, 1) if part_sims_i2t is None else _as_float(part_sims_i2t)
  if s_i.shape != s_t.shape:
    raise ValueError(f"commonality_margin_ranking_loss: part_sims_i2t must be {s_t.shape}, got "
                     f"{s_i.shape}")
  if negatives not in ("hardest_semi_hard", "all_semi_hard") or fallback not in ("skip", "hardest"):
    raise ValueError("commonality_margin_ranking_loss: negatives must be 'hardest_semi_hard'|"
                     f"'all_semi_hard' and fallback 'skip'|'hardest', got {negatives!r}, {fallback!r}")
  pids = _check_pids(pids, b, "commonality_margin_ranking_loss")
  neg = pids[:, None] != pids[None, :]
  total = jnp.zeros((), s_t.dtype)
  count = jnp.zeros((), jnp.int32)
  for s in (s_t, s_i):
    m = commonality_margins(s, pids, base_margin, floor, commonality, scope,
                            commonality_temperature)
    t, n = _cmr_direction(s, neg, m, negatives, fallback)
    total, count = total + t, count + n
  return total / jnp.maximum(count, 1).astype(total.dtype)
