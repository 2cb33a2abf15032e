"""IRRA plus a shared part-query decoder: the model of the part-level method (seed 003, spec §D).

Keeps every IRRA parameter name (base_model, classifier, cross_attn, cross_modal_transformer,
ln_pre_t, ln_pre_i, ln_post, mlm_head) so IRRA checkpoints and the optimizer's name rules apply
unchanged, and adds one submodule:

  part_decoder/{part_queries, ln_q, ln_image, ln_text, cross_attn, decoder, ln_post,
                weight_fc1, weight_fc2}        (tipr_jax.models.part_decoder.PartDecoder)

The decoder reads the projected tower tokens ([B, 1+N, D] image tokens, [B, L, D] text tokens with
padding masked) and returns N_q part embeddings per modality, aligned by the shared queries.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tipr_jax.models.irra import IRRA
from tipr_jax.models.part_decoder import PartDecoder, text_padding_mask

Array = jax.Array


class IRRAParts(IRRA):
  """IRRA with a `part_decoder`.

  num_queries: N_q parts; part_layers / part_heads: the decoder's shared transformer (heads 0 means
  embed_dim // 64, as IRRA's cross-former); predict_weights: build the text-predicted part-weight
  head; image_cls: feed the image [CLS] token to the decoder too (the spec's 193 tokens) or only
  the patches.
  """
  num_queries: int = 8
  part_layers: int = 2
  part_heads: int = 0
  predict_weights: bool = True
  image_cls: bool = True

  def setup(self):
    super().setup()
    d = self.clip.embed_dim
    heads = self.part_heads or max(d // 64, 1)
    self.part_decoder = PartDecoder(width=d, num_queries=self.num_queries, heads=heads,
                                    layers=self.part_layers, dtype=self.clip.dtype,
                                    predict_weights=self.predict_weights)

  def _decoder_image_tokens(self, image_tokens: Array) -> Array:
    return image_tokens if self.image_cls else image_tokens[:, 1:]

  def image_parts(self, image_tokens: Array) -> Array:
    """Projected image tokens [B, 1+N, D] -> part embeddings [B, N_q, D] float32."""
    return self.part_decoder.encode_image(self._decoder_image_tokens(image_tokens))

  def text_parts(self, text_tokens: Array, token_ids: Array) -> Array:
    """Projected text tokens [B, L, D], their ids [B, L] (id 0 = padding, masked) -> [B, N_q, D]."""
    return self.part_decoder.encode_text(text_tokens, text_padding_mask(token_ids))

  def part_weights(self, text_global: Array) -> Array:
    """Text-predicted part weights from the global text feature [B, D] -> [B, N_q] (softmax)."""
    return self.part_decoder.part_weights(text_global)

  def __call__(self, images: Array, token_ids: Array) -> dict[str, Array]:
    """Touches every submodule (used for init)."""
    img = self.image_tokens(images)
    txt = self.text_tokens(token_ids)
    x = self.cross_former(txt, img)
    out = dict(image_logits=self.classify(img[:, 0]), mlm_scores=self.mlm_scores(x[:, :1]),
               image_parts=self.image_parts(img), text_parts=self.text_parts(txt, token_ids))
    if self.predict_weights:
      out["part_weights"] = self.part_weights(img[:, 0].astype(jnp.float32))
    return out
