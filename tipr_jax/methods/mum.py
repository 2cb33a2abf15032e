"""MUM / UMSA: multi-modal uncertainty modeling + semantic alignment (seed 001; spec
seed-methods.md §B).

Only the abstract is public; this is the spec's [RECONSTRUCTION] as documented in
docs/methods_probabilistic.md §3:

  L = w_sdm SDM + w_id ID + w_mlm MLM          (IRRA, deterministic features; methods/irra.py)
    + w_circle L_circle(augmented features)    (bi-directional cross-modal circle loss)
    + w_gmr L_gmr                              (global masked-token semantic recovery)

- Uncertainty augmentation: per modality, f~ = f + eps * sqrt(sg(lambda_b Var_batch +
  lambda_id Var_id(i))) (identity variance 0 for an identity seen once in the batch). The variances
  couple the examples of the batch, so the augmentation lives in `loss` (which sees the whole global
  batch, also under gradient accumulation); the noise eps is drawn per example in `forward` from the
  example's key (`example_keys`) and passed on as an output.
- Circle loss (margin m, scale gamma, self-paced weights detached) on the augmented features, per
  augmentation sample, averaged.
- Global recovery: the masked caption after the cross-modal transformer (the MLM branch's output),
  pooled at its EOT position, recovers the unmasked caption's global feature (stop-gradient):
  1 - cos (default) or InfoNCE over the batch. With `masked_caption_for_global` (the reference's
  aliasing: SDM/ID read the masked caption) the target needs a forward-only pass of the clean
  caption; otherwise it is the clean global text feature itself.
- Model: IRRA's, unchanged (no new parameters). Inference: IRRA's cosine of the global features.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tipr_jax.losses import probabilistic as prob
from tipr_jax.methods import irra
from tipr_jax.methods.base import Method, example_keys
from tipr_jax.models.clip import CLIPConfig, eot_pool
from tipr_jax.models.irra import IRRA

Array = jax.Array
RECOVERY = ("cosine", "infonce")


def augment(feats: Array, eps: Array, pids: Array, lambda_batch: float, lambda_id: float,
            unbiased: bool = True) -> Array:
  """MUM feature augmentation with given noise: feats [B,D], eps [B,S,D] -> [S,B,D].

  f~^s_i = f_i + eps^s_i * sqrt(sg(lambda_b Var_batch + lambda_id Var_id(i))); the variances come
  from `losses.probabilistic.batch_and_identity_variance` (over the whole batch).
  """
  var_b, var_id = prob.batch_and_identity_variance(feats, pids, unbiased)
  sigma = jax.lax.stop_gradient(jnp.sqrt(lambda_batch * var_b[None, :] + lambda_id * var_id))
  return feats[None] + jnp.swapaxes(eps, 0, 1) * sigma[None]


def build(config, *, clip_config: CLIPConfig, num_classes: int) -> Method:
  """MUM as a `Method` (config.mum: see configs/methods/mum.py)."""
  mcfg, w = config.mum, config.losses
  if mcfg.recovery not in RECOVERY:
    raise ValueError(f"config.mum.recovery must be one of {RECOVERY}, got {mcfg.recovery!r}")
  if w.gmr > 0 and w.mlm <= 0:
    raise ValueError("config.losses.gmr > 0 needs the masked caption's cross-modal pass: set "
                     "config.losses.mlm > 0 too")
  num_aug = int(mcfg.num_aug_samples)
  if num_aug < 1:
    raise ValueError(f"config.mum.num_aug_samples must be >= 1, got {num_aug}")
  base = irra.build(config, clip_config=clip_config, num_classes=num_classes)  # SDM, ID, MLM
  model: IRRA = base.model
  use_mlm = w.mlm > 0
  use_gmr = w.gmr > 0
  use_circle = w.circle > 0
  masked_global = bool(config.masked_caption_for_global) and use_mlm
  cap = int(config.mlm_positions_cap)
  d = clip_config.embed_dim
  logit_scale = 1.0 / config.model.temperature

  def trunk(m: IRRA, batch):
    gids = batch["mlm_ids"] if masked_global else batch["caption_ids"]
    img = m.image_tokens(batch["images"])
    txt = m.text_tokens(gids)
    out = dict(image_feats=img[:, 0].astype(jnp.float32),
               text_feats=eot_pool(txt, gids).astype(jnp.float32))
    if w.id > 0:
      out["image_logits"] = m.classify(out["image_feats"])
      out["text_logits"] = m.classify(out["text_feats"])
    cross = None
    if use_mlm:
      mtxt = txt if masked_global else m.text_tokens(batch["mlm_ids"])
      cross = m.cross_former(mtxt, img)
    if use_gmr:
      out["gmr_recovered"] = eot_pool(cross, batch["mlm_ids"]).astype(jnp.float32)
      target = (eot_pool(m.text_tokens(batch["caption_ids"]), batch["caption_ids"])
                if masked_global else out["text_feats"])
      out["gmr_target"] = jax.lax.stop_gradient(target.astype(jnp.float32))
    return out, cross

  def forward(params, batch, rng):
    out, cross = model.apply({"params": params}, batch, method=trunk)
    if use_mlm:
      tok = irra.mlm_token_losses(model, params, cross, batch["mlm_labels"], cap)
      out.update({f"mlm_{k}": v for k, v in tok.items()})
    if use_circle:
      keys = example_keys(rng, batch)
      draw = lambda i: jax.vmap(
          lambda key: jax.random.normal(jax.random.fold_in(key, i), (num_aug, d)))(keys)
      out["aug_eps_image"], out["aug_eps_text"] = draw(0), draw(1)   # [B,S,D] each
    return out

  def loss(out, batch, step):
    total, metrics = base.loss(out, batch, step)
    pids = batch["pids"]
    if use_circle:
      aug = lambda f, eps: augment(f, eps, pids, float(mcfg.lambda_batch), float(mcfg.lambda_id),
                                   bool(mcfg.unbiased))
      v = aug(out["image_feats"], out["aug_eps_image"])
      t = aug(out["text_feats"], out["aug_eps_text"])
      circle = jax.vmap(lambda ts, vs: prob.circle_loss_cross_modal(
          ts, vs, pids, float(mcfg.circle_margin), float(mcfg.circle_gamma)))(t, v)
      metrics["circle_loss"] = jnp.mean(circle)
      total = total + w.circle * metrics["circle_loss"]
    if use_gmr:
      if mcfg.recovery == "cosine":
        gmr = prob.global_recovery_loss(out["gmr_recovered"], out["gmr_target"])
      else:
        gmr = prob.global_recovery_infonce_loss(out["gmr_recovered"], out["gmr_target"],
                                                logit_scale)
      metrics["gmr_loss"] = gmr
      total = total + w.gmr * gmr
    return total, metrics

  return Method(name="mum", model=model, init=base.init, forward=forward, loss=loss,
                encode_image=base.encode_image, encode_text=base.encode_text)
