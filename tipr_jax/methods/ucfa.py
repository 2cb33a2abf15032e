"""UCFA: uncertainty-aware coarse-to-fine alignment (seed 000; spec seed-methods.md §A).

Only the abstract is public; this is the spec's [RECONSTRUCTION] (from the OMRE code of the same
group), as documented in docs/methods_probabilistic.md:

  L = w_dcl DCL + w_pcl PCL + w_uamlr UAMLR + w_reg (reg_image + reg_text)
      (+ w_hnm hnm + w_id ID + w_sdm SDM on the means; off by default)

- Distributions (models/ucfa.py): every token of both modalities gets N(mu, diag(sigma^2)); the
  global distributions are the image [CLS] token and the text EOT token.
- K reparameterized samples per example, drawn in `forward` from the example's own key
  (`example_keys`), so they do not depend on the device count or the micro-batching.
- DCL: SDM with identity soft labels over a distribution similarity: the expected cosine estimated
  from mean-to-sample similarities (OMRE "boma", default) or the negative 2-Wasserstein distance
  (`config.ucfa.similarity='wasserstein'`, logit scale halved: equal to the cosine SDM at sigma 0).
- PCL: SDM over the (B K) x (B K) image-text sample points + intra-modal SupCon (same identity).
- UAMLR: the masked caption (attribute words masked by the data pipeline, config.data.masking=
  'attribute') attends through IRRA's cross-modal transformer to each of the K sampled image token
  sequences (jax.vmap over K, shared params); the masked words are predicted with the MLM head on
  the gathered masked positions (CE averaged over K), or (`reconstruction='feature'`, OMRE's crsr)
  the unmasked caption's token features are regressed (cosine).
- Variance regularizer on all tokens: entropy margin (spec: margin 300 at D = 512, weight 0.1) or
  KL to N(0, I).
- Inference (`config.ucfa.inference`): 'mean' = cosine of the means (IRRA's evaluator), or 'fused' =
  (1 - w) cos(mu_t, mu_v) + w S_prob (OMRE). The fused score is bilinear in per-item vectors, so the
  encoders return `fused_embedding`s whose cosine is the fused score divided by a constant: the
  engine's evaluator (and anything else that ranks by cosine) needs no change.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tipr_jax import losses
from tipr_jax.losses import probabilistic as prob
from tipr_jax.methods.base import Method, example_keys
from tipr_jax.methods.irra import mlm_token_losses
from tipr_jax.models.clip import CLIPConfig, eot_pool
from tipr_jax.models.gaussian import DEFAULT_LOG_SIGMA_INIT
from tipr_jax.models.ucfa import UCFA, entropy_floor_log_sigma, tie_logsigma_to_towers

Array = jax.Array

SIMILARITIES = ("expected_cosine", "wasserstein")
RECONSTRUCTIONS = ("mlm", "feature")
REGULARIZERS = ("entropy", "kl")
INFERENCES = ("mean", "fused")
REFERENCE_DIM = 512  # the embedding width the spec's entropy margin (300) is given for
# log_sigma init above the entropy floor. Exactly at the floor, max(0, margin - H) sits on its kink
# and float rounding decides whether its gradient is on: runs that differ only in summation order
# (device count, micro-batches) would then take different steps.
FLOOR_OFFSET = 0.1


def _choice(value: str, known: tuple[str, ...], key: str) -> str:
  if value not in known:
    raise ValueError(f"{key} must be one of {known}, got {value!r}")
  return value


def entropy_margin(config, embed_dim: int) -> float:
  """The entropy margin for this width: config.ucfa.entropy_margin (given for D = 512), scaled by
  D / 512 when `entropy_margin_scale_with_dim` (same per-dimension sigma floor at every width)."""
  u = config.ucfa
  m = float(u.entropy_margin)
  return m * embed_dim / REFERENCE_DIM if u.entropy_margin_scale_with_dim else m


def fused_embedding(mu: Array, samples: Array, weight: float, coef: float, side: str) -> Array:
  """Per-item vectors whose dot product is the fused inference score (OMRE's evaluator).

  mu [N,D], samples [K,N,D]. With n = mu/|mu| and m = mean_k z^k/|z^k|:
    query (text):     [sqrt(1-w) n, sqrt(c) n, sqrt(c) m, pad, 0]
    gallery (image):  [sqrt(1-w) n, sqrt(c) m, sqrt(c) n, 0, pad]
  query . gallery = (1-w) cos(mu_q, mu_g) + c (n_q . m_g + m_q . n_g)
                  = `losses.probabilistic.fused_similarity` with c = w K (prob_as_sum; Kq = Kg = K)
                    or c = w / 2 (prob_as_sum=False).
  `pad` fills every vector to the norm sqrt(1 - w + 2c) (|m| <= 1), so after L2 normalization
  their cosine is the fused score divided by that constant: the ranking is the fused ranking.
  -> [N, 3D + 2] float32.
  """
  n = prob.l2_normalize(mu)
  m = jnp.mean(prob.l2_normalize(samples), axis=0)
  a, b = math.sqrt(1.0 - weight), math.sqrt(coef)
  if side == "query":
    body = [a * n, b * n, b * m]
  elif side == "gallery":
    body = [a * n, b * m, b * n]
  else:
    raise ValueError(f"side must be 'query' or 'gallery', got {side!r}")
  body = jnp.concatenate(body, axis=-1)
  total = 1.0 - weight + 2.0 * coef
  pad = jnp.sqrt(jnp.maximum(total - jnp.sum(body * body, axis=-1, keepdims=True), 0.0))
  zero = jnp.zeros_like(pad)
  tail = [pad, zero] if side == "query" else [zero, pad]
  return jnp.concatenate([body] + tail, axis=-1)


def build(config, *, clip_config: CLIPConfig, num_classes: int) -> Method:
  """UCFA as a `Method` (config.ucfa: see configs/methods/ucfa.py)."""
  u, w = config.ucfa, config.losses
  for key in ("mlm", "itc", "cmpm"):
    if w.get(key, 0.0) > 0:
      raise ValueError(f"config.losses.{key}={w[key]}: not a UCFA loss (UCFA's masked-word "
                       f"prediction is config.losses.uamlr); set it to 0")
  k = int(u.num_samples)
  if k < 1:
    raise ValueError(f"config.ucfa.num_samples must be >= 1, got {k}")
  similarity = _choice(u.similarity, SIMILARITIES, "config.ucfa.similarity")
  recon = _choice(u.reconstruction, RECONSTRUCTIONS, "config.ucfa.reconstruction")
  reg_kind = _choice(u.variance_reg, REGULARIZERS, "config.ucfa.variance_reg")
  inference = _choice(u.inference, INFERENCES, "config.ucfa.inference")
  d = clip_config.embed_dim
  margin = entropy_margin(config, d)
  exact = bool(u.exact_std_entropy)
  if u.log_sigma_init is not None:
    ls_init = float(u.log_sigma_init)
  elif reg_kind == "entropy":  # just above the regularizer's floor: inactive at init, and not
    ls_init = entropy_floor_log_sigma(margin, d, exact) + FLOOR_OFFSET  # at its kink
  else:
    ls_init = DEFAULT_LOG_SIGMA_INIT
  model = UCFA(clip_config, num_classes=num_classes, cmt_depth=config.model.cmt_depth,
               head=u.head, log_sigma_init=ls_init, omre_mlp_input=bool(u.omre_mlp_input),
               mlp_hidden_dim=int(u.mlp_hidden_dim))
  logit_scale = 1.0 / config.model.temperature
  use_recon = w.uamlr > 0
  use_id = w.id > 0
  masked_global = bool(config.masked_caption_for_global) and use_recon
  cap = int(config.mlm_positions_cap)
  h, wd = clip_config.image_size
  k_eval = int(u.eval_num_samples) or k
  weight = float(u.fusion_weight)
  coef = weight * k_eval if u.fusion_prob_as_sum else weight / 2.0

  def init(rng):
    images = jnp.zeros((1, h, wd, 3), jnp.float32)
    ids = jnp.zeros((1, clip_config.context_length), jnp.int32)
    return tie_logsigma_to_towers(model.init(rng, images, ids)["params"])

  def trunk(m: UCFA, batch):
    gids = batch["mlm_ids"] if masked_global else batch["caption_ids"]
    mu_v, ls_v = m.image_distribution(batch["images"])
    mu_t, ls_t = m.text_distribution(gids)
    mtxt = target = None
    if use_recon:
      mtxt = mu_t if masked_global else m.text_tokens(batch["mlm_ids"])
      if recon == "feature":  # the unmasked caption's tokens (forward only: no gradient)
        target = jax.lax.stop_gradient(
            m.text_tokens(batch["caption_ids"]) if masked_global else mu_t)
    return mu_v, ls_v, mu_t, ls_t, mtxt, target

  def per_example_reg(mu, log_sigma):
    if reg_kind == "entropy":
      return jax.vmap(lambda ls: prob.entropy_margin_reg(ls, margin, exact))(log_sigma)
    return jax.vmap(prob.kl_to_standard_normal)(mu.astype(jnp.float32), log_sigma)

  def forward(params, batch, rng):
    gids = batch["mlm_ids"] if masked_global else batch["caption_ids"]
    mu_v, ls_v, mu_t, ls_t, mtxt, target = model.apply({"params": params}, batch, method=trunk)
    keys = example_keys(rng, batch)
    n_tok = mu_v.shape[1] if use_recon else 1  # image tokens to sample (all for UAMLR, else CLS)
    eps_v = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 0), (k, n_tok, d)))(keys)
    eps_t = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, 1), (k, d)))(keys)
    z_tok = (mu_v[:, None, :n_tok].astype(jnp.float32)
             + jnp.exp(ls_v[:, None, :n_tok]) * eps_v)                      # [B,K,n,D]
    t_mu = eot_pool(mu_t, gids).astype(jnp.float32)
    t_ls = eot_pool(ls_t, gids)
    out = dict(image_mu=mu_v[:, 0].astype(jnp.float32), image_log_sigma=ls_v[:, 0],
               image_samples=z_tok[:, :, 0],                                  # [B,K,D]
               text_mu=t_mu, text_log_sigma=t_ls,
               text_samples=t_mu[:, None] + jnp.exp(t_ls)[:, None] * eps_t,  # [B,K,D]
               reg_image=per_example_reg(mu_v, ls_v), reg_text=per_example_reg(mu_t, ls_t))
    if use_id:
      classify = lambda f: model.apply({"params": params}, f, method=UCFA.classify)
      out["image_logits"] = classify(out["image_mu"])
      out["text_logits"] = classify(t_mu)
    if use_recon:
      cross = lambda z: model.apply({"params": params}, mtxt, z.astype(mu_v.dtype),
                                    method=UCFA.cross_former)
      x = jax.vmap(cross, in_axes=1, out_axes=1)(z_tok)                      # [B,K,L,D]
      b, _, length, _ = x.shape
      labels = batch["mlm_labels"]
      if recon == "mlm":  # one capped head call over the K*L positions of each example
        tok = mlm_token_losses(model, params, x.reshape(b, k * length, -1),
                               jnp.tile(labels, (1, k)), cap * k)
        out.update({f"uamlr_{name}": v for name, v in tok.items()})
      else:
        cos = jnp.sum(prob.l2_normalize(x) * prob.l2_normalize(target)[:, None], axis=-1)
        mask = (labels > 0)[:, None, :].astype(jnp.float32)                  # [B,1,L]
        out["uamlr_cos"] = jnp.sum(cos * mask, axis=(1, 2))
        out["uamlr_count"] = k * jnp.sum(mask, axis=(1, 2))
    return out

  def loss(out, batch, step):
    del step
    pids = batch["pids"]
    zv = jnp.swapaxes(out["image_samples"], 0, 1)                            # [K,B,D]
    zt = jnp.swapaxes(out["text_samples"], 0, 1)
    if similarity == "expected_cosine":
      sim, scale = prob.expected_cosine_similarity(out["image_mu"], zv, out["text_mu"], zt), 1.0
    else:
      sim = prob.wasserstein2_similarity(out["image_mu"], out["image_log_sigma"],
                                         out["text_mu"], out["text_log_sigma"])
      scale = 0.5  # -W2^2 = 2 cos - 2 at sigma 0: half the logit scale gives the cosine SDM
    metrics = dict(
        sigma_image=jnp.mean(jnp.exp(out["image_log_sigma"])),
        sigma_text=jnp.mean(jnp.exp(out["text_log_sigma"])))
    total = jnp.zeros((), jnp.float32)

    def add(name, weight_, value):
      nonlocal total
      metrics[name] = value
      total = total + weight_ * value

    if w.dcl > 0:
      add("dcl_loss", w.dcl, prob.distribution_contrast_loss(sim, None, pids,
                                                              logit_scale * scale))
    if w.pcl > 0:
      add("pcl_loss", w.pcl, prob.point_contrast_loss(zv, zt, pids, logit_scale,
                                                       float(u.intra_weight)))
    if w.hnm > 0:
      add("hnm_loss", w.hnm, prob.hnm_loss(sim * scale, float(u.hnm_margin)))
    if w.reg > 0:
      add("reg_loss", w.reg, jnp.mean(out["reg_image"]) + jnp.mean(out["reg_text"]))
    if w.sdm > 0:
      add("sdm_loss", w.sdm, losses.sdm(out["image_mu"], out["text_mu"], pids,
                                        logit_scale=logit_scale))
    if use_id:
      add("id_loss", w.id, losses.id_loss(out["image_logits"], out["text_logits"], pids))
    if use_recon and recon == "mlm":
      count = jnp.maximum(jnp.sum(out["uamlr_count"]), 1.0)
      metrics["uamlr_acc"] = jnp.sum(out["uamlr_correct"]) / count
      add("uamlr_loss", w.uamlr, jnp.sum(out["uamlr_nll"]) / count)
    elif use_recon:
      count = jnp.maximum(jnp.sum(out["uamlr_count"]), 1.0)
      add("uamlr_loss", w.uamlr, 1.0 - jnp.sum(out["uamlr_cos"]) / count)
    return total, metrics

  def eval_eps(index: int) -> Array:
    """Fixed noise [K_eval, D] shared by every item of a modality (common random numbers)."""
    return jax.random.normal(jax.random.fold_in(jax.random.key(int(u.eval_seed)), index),
                             (k_eval, 1, d))

  def encode_image(params, images):
    if inference == "mean":
      return model.apply({"params": params}, images, method=UCFA.encode_image)
    mu, ls = model.apply({"params": params}, images, method=UCFA.image_distribution)
    mu, ls = mu[:, 0].astype(jnp.float32), ls[:, 0]
    return fused_embedding(mu, mu[None] + jnp.exp(ls)[None] * eval_eps(0), weight, coef, "gallery")

  def encode_text(params, ids):
    if inference == "mean":
      return model.apply({"params": params}, ids, method=UCFA.encode_text)
    mu, ls = model.apply({"params": params}, ids, method=UCFA.text_distribution)
    mu, ls = eot_pool(mu, ids).astype(jnp.float32), eot_pool(ls, ids)
    return fused_embedding(mu, mu[None] + jnp.exp(ls)[None] * eval_eps(1), weight, coef, "query")

  return Method(name="ucfa", model=model, init=init, forward=forward, loss=loss,
                encode_image=encode_image, encode_text=encode_text,
                after_pretrained=tie_logsigma_to_towers)
