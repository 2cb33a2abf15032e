"""Pieces of IRRA's forward and loss shared by the methods built on it (FMFA, part-level).

- `caption_sources` / `text_passes`: which caption (the MLM-masked `mlm_ids` or the clean
  `caption_ids`) each consumer reads, and one text-tower pass per distinct caption. The reference's
  published runs alias the two (irra-reference.md §4); `config.masked_caption_for_global` keeps
  that.
- `irra_outputs`: per-example global features, ID logits and MLM token losses (as methods/irra.py).
- `irra_loss_terms`: the batch losses SDM (or a replacement such as A-SDM), ITC, CMPM, ID, MLM.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from tipr_jax import losses
from tipr_jax.methods.base import per_example_token_ce
from tipr_jax.models.clip import eot_pool
from tipr_jax.models.irra import IRRA

Array = jax.Array

MASKED, CLEAN = "masked", "clean"


def caption_ids(batch: dict, source: str) -> Array:
  """Token ids [B, L] of `source`: 'masked' (mlm_ids) or 'clean' (caption_ids)."""
  if source == MASKED:
    return batch["mlm_ids"]
  if source == CLEAN:
    return batch["caption_ids"]
  raise ValueError(f"caption source must be {MASKED!r} or {CLEAN!r}, got {source!r}")


def global_caption_source(config) -> str:
  """The caption SDM/ID read: masked when MLM is on and `masked_caption_for_global` (reference)."""
  masked = bool(config.masked_caption_for_global) and config.losses.mlm > 0
  return MASKED if masked else CLEAN


def text_passes(m: IRRA, batch: dict, sources: Iterable[str]) -> dict[str, Array]:
  """Projected text tokens [B, L, D] per caption source, one tower pass per distinct source."""
  return {s: m.text_tokens(caption_ids(batch, s)) for s in dict.fromkeys(sources)}


def irra_outputs(m: IRRA, batch: dict, img: Array, txt: dict[str, Array], global_source: str,
                 use_id: bool, use_mlm: bool) -> tuple[dict[str, Array], Array | None]:
  """Per-example IRRA outputs inside `model.apply`: (out, cross-former features or None).

  img [B, 1+N, D] image tokens; txt from `text_passes` (must hold `global_source`, and 'masked'
  when use_mlm). out: image_feats, text_feats [B, D] float32 and, with use_id, the ID logits.
  """
  gids = caption_ids(batch, global_source)
  out = dict(image_feats=img[:, 0].astype(jnp.float32),
             text_feats=eot_pool(txt[global_source], gids).astype(jnp.float32))
  if use_id:
    out["image_logits"] = m.classify(out["image_feats"])
    out["text_logits"] = m.classify(out["text_feats"])
  cross = m.cross_former(txt[MASKED], img) if use_mlm else None
  return out, cross


def mlm_token_losses(model: IRRA, params, x: Array, labels: Array,
                     cap: int) -> dict[str, jax.Array]:
  """Per-example MLM CE over masked positions: x [B,L,D], labels [B,L] -> {nll,count,correct} [B].

  Gathers the (at most `cap`) masked positions of each caption before the vocabulary projection;
  if any caption has more than `cap` masked tokens the whole batch takes the full projection.
  """
  def head(feats):
    return model.apply({"params": params}, feats, method=IRRA.mlm_scores)

  def full(x, labels):
    return per_example_token_ce(head(x), labels)

  if cap <= 0 or cap >= labels.shape[1]:
    return full(x, labels)

  def capped(x, labels):
    order = jnp.argsort((labels == 0).astype(jnp.int32), axis=1, stable=True)[:, :cap]
    xs = jnp.take_along_axis(x, order[..., None], axis=1)
    ls = jnp.take_along_axis(labels, order, axis=1)
    return per_example_token_ce(head(xs), ls)

  overflow = jnp.any(jnp.sum(labels != 0, axis=1) > cap)
  return jax.lax.cond(overflow, full, capped, x, labels)


def add_mlm_outputs(model: IRRA, params, out: dict, cross: Array | None, batch: dict,
                    cap: int) -> dict:
  """Adds mlm_nll / mlm_count / mlm_correct [B] (capped masked-position head, as IRRA)."""
  if cross is not None:
    tok = mlm_token_losses(model, params, cross, batch["mlm_labels"], cap)
    out.update({f"mlm_{k}": v for k, v in tok.items()})
  return out


def irra_loss_terms(out: dict, pids: Array, weights, logit_scale: float,
                    sdm_fn: Callable[[Array, Array, Array], Array] | None = None,
                    sdm_name: str = "sdm_loss") -> tuple[Array, dict]:
  """(weighted sum, metrics) of the global IRRA losses over the whole batch.

  `sdm_fn(image_feats, text_feats, pids)` replaces SDM (weight `weights.sdm`) when given.
  """
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  if weights.sdm > 0:
    fn = sdm_fn or (lambda i, t, p: losses.sdm(i, t, p, logit_scale=logit_scale))
    metrics[sdm_name] = fn(out["image_feats"], out["text_feats"], pids)
    total += weights.sdm * metrics[sdm_name]
  if weights.itc > 0:
    metrics["itc_loss"] = losses.itc(out["image_feats"], out["text_feats"], logit_scale)
    total += weights.itc * metrics["itc_loss"]
  if weights.cmpm > 0:
    metrics["cmpm_loss"] = losses.cmpm(out["image_feats"], out["text_feats"], pids)
    total += weights.cmpm * metrics["cmpm_loss"]
  if weights.id > 0:
    metrics["id_loss"] = losses.id_loss(out["image_logits"], out["text_logits"], pids)
    total += weights.id * metrics["id_loss"]
  if weights.mlm > 0:
    count = jnp.maximum(jnp.sum(out["mlm_count"]), 1.0)
    metrics["mlm_loss"] = jnp.sum(out["mlm_nll"]) / count
    metrics["mlm_acc"] = jnp.sum(out["mlm_correct"]) / count
    total += weights.mlm * metrics["mlm_loss"]
  return total, metrics
