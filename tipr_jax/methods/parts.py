"""Part-level cross-modal correspondence (seed 003; spec seed-methods.md §D, reconstruction).

IRRA (SDM + ID + MLM on the global features) plus a shared part-query decoder
(tipr_jax.models.parts.IRRAParts) whose N_q part embeddings per modality are trained with

    gate(step) * ( w_part * part_SDM(sum_k w_k s_k) + w_cmr * L_CMR(s_k) )

where s_k [B_t, B_i] are the per-part cosines over the whole batch, w_k the text-predicted part
weights (or 1/K) and L_CMR the commonality-based margin ranking loss (tipr_jax.losses.fine_grained).
gate = 1 from epoch `parts.start_epoch` on (PLOT's start_metric, 15): a traced 0/1 multiplier
computed from the step counter, so one compiled step serves the whole run.

forward returns per example the IRRA outputs plus image_parts / text_parts [B, N_q, D] and
part_weights [B, N_q]; the batch-coupled part losses live in `loss` (exact under sharding and
gradient accumulation).

Inference (`parts.inference`): 'global' is IRRA's cosine of the global features. 'combined' is the
coarse-to-fine similarity S = cos(t, v) + part_scale * sum_k w_k(t) cos(t_k, v_k), computed by the
engine's unchanged Evaluator: encode_text returns [t^, part_scale * w_1 t^_1, ...,
part_scale * w_K t^_K] and encode_image [v^, v^_1, ..., v^_K] (each piece L2-normalised;
[B, (1+K) D]), whose dot product is S. The Evaluator then L2-normalises each row: a query row is
scaled by a positive constant (its ranking is unchanged) and every gallery row has norm sqrt(1+K),
so the rankings and every metric are those of S.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tipr_jax.losses import fine_grained as fg
from tipr_jax.methods import irra_terms
from tipr_jax.methods.base import Method
from tipr_jax.models.clip import CLIPConfig, eot_pool
from tipr_jax.models.parts import IRRAParts

Array = jax.Array


def _check_choice(value, choices, key: str):
  if value not in choices:
    raise ValueError(f"config.{key}: expected one of {choices}, got {value!r}")
  return value


def part_gate(step: Array, start_step: int) -> Array:
  """1.0 from global step `start_step` on, else 0.0 (float32 scalar, traced)."""
  return (jnp.asarray(step) >= start_step).astype(jnp.float32)


def combined_features(global_feats: Array, parts: Array, weights: Array | None = None,
                      part_scale: float = 1.0) -> Array:
  """[g^, part_scale * w_1 p^_1, ..., part_scale * w_K p^_K]: [B, D], [B, K, D] -> [B, (1+K) D].

  The dot product of a text row (with its weights) and an image row (weights None -> 1, scale 1)
  is fg.combined_similarity(cos_global, part cosines, weights, part_scale).
  """
  g = fg.l2_normalize(global_feats.astype(jnp.float32))
  p = fg.l2_normalize(parts.astype(jnp.float32))
  if weights is not None:
    p = p * (part_scale * weights.astype(jnp.float32))[..., None]
  return jnp.concatenate([g, p.reshape(p.shape[0], -1)], axis=-1)


def build(config, *, clip_config: CLIPConfig, num_classes: int,
          steps_per_epoch: int | None = None) -> Method:
  """The part-level method as a `Method` (config.parts holds its switches).

  steps_per_epoch: converts `parts.start_epoch` into the step the part losses start at
  (needed when start_epoch > 0).
  """
  pc = config.parts
  weights = config.losses
  train_weights = _check_choice(pc.train_weights, ("predicted", "uniform"), "parts.train_weights")
  inference = _check_choice(pc.inference, ("combined", "global"), "parts.inference")
  inf_weights = _check_choice(pc.inference_weights, ("predicted", "uniform"),
                              "parts.inference_weights")
  part_loss_kind = _check_choice(pc.part_loss, ("sdm", "infonce"), "parts.part_loss")
  predict = train_weights == "predicted" or (inference == "combined" and inf_weights == "predicted")
  model = IRRAParts(clip_config, num_classes=num_classes, cmt_depth=config.model.cmt_depth,
                    num_queries=int(pc.num_queries), part_layers=int(pc.layers),
                    part_heads=int(pc.heads), predict_weights=predict,
                    image_cls=bool(pc.image_cls))
  logit_scale = 1.0 / config.model.temperature
  use_mlm, use_id = weights.mlm > 0, weights.id > 0
  cap = int(config.mlm_positions_cap)
  h, w = clip_config.image_size
  global_src = irra_terms.global_caption_source(config)
  sources = [global_src] + ([irra_terms.MASKED] if use_mlm else [])
  start_epoch = int(pc.start_epoch)
  if start_epoch > 0 and not steps_per_epoch:
    raise ValueError(f"config.parts.start_epoch={start_epoch} needs steps_per_epoch > 0 at build "
                     f"time (build_method(..., steps_per_epoch=...)), got {steps_per_epoch}")
  start_step = start_epoch * (steps_per_epoch or 0)

  def init(rng):
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    ids = jnp.zeros((1, clip_config.context_length), jnp.int32)
    return model.init(rng, images, ids)["params"]

  def trunk(m: IRRAParts, batch):
    img = m.image_tokens(batch["images"])
    txt = irra_terms.text_passes(m, batch, sources)
    out, cross = irra_terms.irra_outputs(m, batch, img, txt, global_src, use_id, use_mlm)
    out["image_parts"] = m.image_parts(img)
    out["text_parts"] = m.text_parts(txt[global_src], irra_terms.caption_ids(batch, global_src))
    if predict:
      out["part_weights"] = m.part_weights(out["text_feats"])
    return out, cross

  def forward(params, batch, rng):
    del rng  # no randomness in the model
    out, cross = model.apply({"params": params}, batch, method=trunk)
    return irra_terms.add_mlm_outputs(model, params, out, cross, batch, cap)

  cmr = functools.partial(
      fg.commonality_margin_ranking_loss, base_margin=float(pc.cmr_base_margin),
      floor=float(pc.cmr_floor), commonality=pc.cmr_commonality, scope=pc.cmr_scope,
      commonality_temperature=float(pc.cmr_temperature), negatives=pc.cmr_negatives,
      fallback=pc.cmr_fallback)

  def loss(out, batch, step):
    pids = batch["pids"]
    total, metrics = irra_terms.irra_loss_terms(out, pids, weights, logit_scale)
    ps = fg.part_similarity(out["image_parts"], out["text_parts"])          # [B_t, B_i, K]
    pw = out["part_weights"] if train_weights == "predicted" else None
    gate = part_gate(step, start_step)
    metrics["part_gate"] = gate
    if weights.part > 0:
      if part_loss_kind == "sdm":
        metrics["part_loss"] = fg.part_sdm(ps, pids, pw, logit_scale=logit_scale,
                                           reduce=pc.part_sdm_reduce)
      else:
        metrics["part_loss"] = fg.part_infonce(ps, pw, logit_scale=logit_scale)
      total += gate * weights.part * metrics["part_loss"]
    if weights.cmr > 0:
      metrics["cmr_loss"] = cmr(ps, pids)
      total += gate * weights.cmr * metrics["cmr_loss"]
    return total, metrics

  def image_side(m: IRRAParts, images):
    img = m.image_tokens(images)
    if inference == "global":
      return img[:, 0].astype(jnp.float32)
    return combined_features(img[:, 0], m.image_parts(img))

  def text_side(m: IRRAParts, ids):
    txt = m.text_tokens(ids)
    g = eot_pool(txt, ids).astype(jnp.float32)
    if inference == "global":
      return g
    parts = m.text_parts(txt, ids)
    k = parts.shape[1]
    pw = (m.part_weights(g) if inf_weights == "predicted"
          else jnp.full(parts.shape[:2], 1.0 / k, jnp.float32))
    return combined_features(g, parts, pw, float(pc.part_scale))

  def encode_image(params, images):
    return model.apply({"params": params}, images, method=image_side)

  def encode_text(params, ids):
    return model.apply({"params": params}, ids, method=text_side)

  return Method(name="parts", model=model, init=init, forward=forward, loss=loss,
                encode_image=encode_image, encode_text=encode_text)
