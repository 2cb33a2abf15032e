"""The IRRA baseline: SDM + ID + MLM (irra-reference.md §3), optionally ITC / CMPM.

forward computes, per example: global image/text features, ID logits and the MLM token losses;
loss combines them over the whole batch with the weights in `config.losses`.

Two savings with identical results (jax-stack.md, last section):
- with `masked_caption_for_global` (the reference's published behaviour) the clean and masked
  captions are the same array, so the text tower runs once;
- the 512 -> vocab MLM projection runs only on the masked positions (at most
  `mlm_positions_cap` per caption), falling back to all positions when a caption has more.
"""
from __future__ import annotations

import jax.numpy as jnp

from tipr_jax.methods import irra_terms
from tipr_jax.methods.base import Method
from tipr_jax.methods.irra_terms import mlm_token_losses  # re-exported for other methods
from tipr_jax.models.clip import CLIPConfig
from tipr_jax.models.irra import IRRA


def build(config, *, clip_config: CLIPConfig, num_classes: int) -> Method:
  """IRRA as a `Method`."""
  model = IRRA(clip_config, num_classes=num_classes, cmt_depth=config.model.cmt_depth)
  weights = config.losses
  logit_scale = 1.0 / config.model.temperature
  use_mlm = weights.mlm > 0
  cap = int(config.mlm_positions_cap)
  h, w = clip_config.image_size

  def init(rng):
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    ids = jnp.zeros((1, clip_config.context_length), jnp.int32)
    return model.init(rng, images, ids)["params"]

  global_source = irra_terms.global_caption_source(config)
  sources = (global_source, irra_terms.MASKED) if use_mlm else (global_source,)

  def trunk(m: IRRA, batch):
    img = m.image_tokens(batch["images"])
    txt = irra_terms.text_passes(m, batch, sources)
    return irra_terms.irra_outputs(m, batch, img, txt, global_source, weights.id > 0, use_mlm)

  def forward(params, batch, rng):
    del rng  # IRRA draws no randomness in the model; masking happens in the input pipeline.
    out, cross = model.apply({"params": params}, batch, method=trunk)
    return irra_terms.add_mlm_outputs(model, params, out, cross, batch, cap)

  def loss(out, batch, step):
    del step
    return irra_terms.irra_loss_terms(out, batch["pids"], weights, logit_scale)

  def encode_image(params, images):
    return model.apply({"params": params}, images, method=IRRA.encode_image)

  def encode_text(params, ids):
    return model.apply({"params": params}, ids, method=IRRA.encode_text)

  return Method(name="irra", model=model, init=init, forward=forward, loss=loss,
                encode_image=encode_image, encode_text=encode_text)
