"""FMFA (spec seed-methods.md §C): IRRA with A-SDM in place of SDM, plus EFA. Inference as IRRA.

    loss = A-SDM(global feats) + EFA(text tokens, image patches) + ID + MLM   (config.losses)

forward returns per example the IRRA outputs plus the tokens EFA needs: `efa_text` [B, L, D] (the
projected text tokens at all L positions) and `efa_patches` [B, N, D] (projected image tokens
without [CLS]); everything batch-coupled (A-SDM's B x B matrix, EFA's [B, B, Lx, Lc] matching in
chunks) is in `loss`, so sharding and gradient accumulation are exact.

Which caption each term reads (docs/methods_fine_grained.md §6): the FMFA code is an IRRA fork
with the same aliased masking (`datasets/bases.py` masks `caption_tokens` in place), so its
`caption_ids` ARE the masked ids and A-SDM, ID and EFA all read the masked caption. That is the
default here (`masked_caption_for_global=True`, `fmfa.efa_caption='global'`), one text pass.
`masked_caption_for_global=False` gives every global term the clean caption (two passes, as for
IRRA); `fmfa.efa_caption='clean'` gives EFA the clean caption whatever the global terms read.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp

from tipr_jax.losses import fine_grained as fg
from tipr_jax.methods import irra_terms
from tipr_jax.methods.base import Method
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.models.irra import IRRA

ASDM_MODES = ("code", "paper", "off")
EFA_CAPTIONS = ("global", "clean", "masked")


def _check_choice(value, choices, key: str):
  if value not in choices:
    raise ValueError(f"config.{key}: expected one of {choices}, got {value!r}")
  return value


def build(config, *, clip_config: CLIPConfig, num_classes: int) -> Method:
  """FMFA as a `Method` (config.fmfa holds the A-SDM / EFA switches)."""
  f = config.fmfa
  model = IRRA(clip_config, num_classes=num_classes, cmt_depth=config.model.cmt_depth)
  weights = config.losses
  logit_scale = 1.0 / config.model.temperature
  use_mlm, use_id, use_efa = weights.mlm > 0, weights.id > 0, weights.efa > 0
  cap = int(config.mlm_positions_cap)
  h, w = clip_config.image_size
  asdm_mode = _check_choice(f.asdm_mode, ASDM_MODES, "fmfa.asdm_mode")
  efa_caption = _check_choice(f.efa_caption, EFA_CAPTIONS, "fmfa.efa_caption")
  _check_choice(f.efa_grouping, ("code", "anchor"), "fmfa.efa_grouping")
  if efa_caption == "masked" and not use_mlm:
    raise ValueError("config.fmfa.efa_caption='masked' needs MLM masking (config.losses.mlm > 0)")
  global_src = irra_terms.global_caption_source(config)
  efa_src = global_src if efa_caption == "global" else efa_caption
  sources = [global_src] + ([efa_src] if use_efa else []) + ([irra_terms.MASKED] if use_mlm else [])
  chunk = int(f.efa_chunk_size) or None

  def init(rng):
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    ids = jnp.zeros((1, clip_config.context_length), jnp.int32)
    return model.init(rng, images, ids)["params"]

  def trunk(m: IRRA, batch):
    img = m.image_tokens(batch["images"])
    txt = irra_terms.text_passes(m, batch, sources)
    out, cross = irra_terms.irra_outputs(m, batch, img, txt, global_src, use_id, use_mlm)
    if use_efa:
      out["efa_text"] = txt[efa_src].astype(jnp.float32)
      out["efa_patches"] = img[:, 1:].astype(jnp.float32)
    return out, cross

  def forward(params, batch, rng):
    del rng  # no randomness in the model; masking happens in the input pipeline
    out, cross = model.apply({"params": params}, batch, method=trunk)
    return irra_terms.add_mlm_outputs(model, params, out, cross, batch, cap)

  if asdm_mode == "off":
    sdm_fn = None  # IRRA's SDM (the ablation row "SDM + EFA")
  else:
    sdm_fn = functools.partial(fg.adaptive_sdm, logit_scale=logit_scale, mode=asdm_mode,
                               alpha=float(f.asdm_alpha), code_scale=float(f.asdm_code_scale),
                               stop_weight_gradient=bool(f.asdm_stop_weight_gradient))
  efa = functools.partial(
      fg.efa_loss, margin_text=float(f.efa_margin_text), margin_image=float(f.efa_margin_image),
      mask_padding=bool(f.efa_mask_padding), row_normalize=bool(f.efa_row_normalize),
      grouping=f.efa_grouping, lse_temperature=float(f.efa_lse_temperature),
      cost_temperature=float(f.efa_cost_temperature), chunk_size=chunk)

  def loss(out, batch, step):
    del step
    total, metrics = irra_terms.irra_loss_terms(
        out, batch["pids"], weights, logit_scale, sdm_fn,
        sdm_name="sdm_loss" if sdm_fn is None else "asdm_loss")
    if use_efa:
      ids = irra_terms.caption_ids(batch, efa_src) if f.efa_mask_padding else None
      metrics["efa_loss"] = efa(out["efa_text"], out["efa_patches"], ids)
      total += weights.efa * metrics["efa_loss"]
    return total, metrics

  def encode_image(params, images):
    return model.apply({"params": params}, images, method=IRRA.encode_image)

  def encode_text(params, ids):
    return model.apply({"params": params}, ids, method=IRRA.encode_text)

  return Method(name="fmfa", model=model, init=init, forward=forward, loss=loss,
                encode_image=encode_image, encode_text=encode_text)
