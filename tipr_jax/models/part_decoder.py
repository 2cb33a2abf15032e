"""Shared part-query decoder for part-level cross-modal correspondence (seed 003).

Reconstruction (spec seed-methods.md §D, from the abstract and the PLOT code's
unused `shared_decoding` leftover): N_q learnable part queries Q, shared by both
modalities, decode each modality's token sequence X_m into N_q part embeddings

    D_m(Q, X_m) = ln_post( decoder( cross_attn( ln_q(Q), ln_m(X_m) ) ) )    [B, N_q, D]

with modality-specific input LayerNorms (ln_image, ln_text) and everything else
shared (queries, ln_q, cross_attn, decoder, ln_post), so that the k-th image part
and the k-th text part are decoded by the same function and stay aligned. As in
IRRA's cross_former and PLOT's leftover there is no residual around the
cross-attention. Text padding (token id 0) is masked out of the keys.

Optional text-predicted part weights (PLOT's `text_slot_classifier`):
softmax(fc2(relu(fc1(t_global)))) with D -> 64 -> N_q, init std 0.001, bias 0.

Submodule names (for optimizer rules): part_queries, ln_q, ln_image, ln_text,
cross_attn, decoder, ln_post, weight_fc1, weight_fc2. All are new (randomly
initialised) parameters.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tipr_jax.models.layers import LayerNorm, MultiHeadAttention, Transformer, compute_dtype

Array = jax.Array

SOT_ID = 49406
EOT_ID = 49407


def text_padding_mask(text_ids: Array, exclude_special: bool = False) -> Array:
  """Boolean key mask [B, L] from token ids: True for real tokens (id != 0).

  exclude_special also drops SOT (49406) and EOT (49407), as PLOT's slot
  attention does for text.
  """
  ids = jnp.asarray(text_ids)
  mask = ids != 0
  if exclude_special:
    mask = mask & (ids != SOT_ID) & (ids != EOT_ID)
  return mask


class PartDecoder(nn.Module):
  """Shared part-query decoder: tokens [B, L, D] -> part embeddings [B, N_q, D] (float32).

  width: token width D (the joint embedding dim, 512 for CLIP ViT-B/16);
  num_queries: N_q parts; layers/heads: the shared transformer over the queries;
  predict_weights: build the text-predicted part-weight head.
  """
  width: int = 512
  num_queries: int = 8
  heads: int = 8
  layers: int = 2
  dtype: Any = "float32"
  predict_weights: bool = True
  weight_hidden: int = 64

  def setup(self):
    d = self.width
    dt = compute_dtype(self.dtype)
    self.part_queries = self.param("part_queries", nn.initializers.orthogonal(),
                                   (self.num_queries, d), jnp.float32)
    self.ln_q = LayerNorm()
    self.ln_image = LayerNorm()
    self.ln_text = LayerNorm()
    proj_std = d ** -0.5 * (2 * max(self.layers, 1)) ** -0.5
    self.cross_attn = MultiHeadAttention(d, self.heads, dt, attn_std=d ** -0.5, out_std=proj_std)
    self.decoder = Transformer(d, self.layers, self.heads, dt)
    self.ln_post = LayerNorm()
    if self.predict_weights:
      init = dict(kernel_init=nn.initializers.normal(0.001), bias_init=nn.initializers.zeros,
                  param_dtype=jnp.float32)
      self.weight_fc1 = nn.Dense(self.weight_hidden, **init)
      self.weight_fc2 = nn.Dense(self.num_queries, **init)

  def _decode(self, kv: Array, mask: Array | None) -> Array:
    """Shared path on already-normalised keys/values kv [B, L, D] -> [B, N_q, D]."""
    b = kv.shape[0]
    q = self.ln_q(jnp.broadcast_to(self.part_queries, (b,) + self.part_queries.shape))
    attn_mask = None if mask is None else jnp.asarray(mask, bool)[:, None, None, :]
    x = self.cross_attn(q.astype(kv.dtype), kv, attn_mask)
    x = self.decoder(x)
    return self.ln_post(x).astype(jnp.float32)

  def _check(self, tokens: Array, mask: Array | None, name: str) -> None:
    if tokens.ndim != 3 or tokens.shape[-1] != self.width:
      raise ValueError(f"PartDecoder.{name}: tokens must be [B, L, {self.width}], got {tokens.shape}")
    if mask is not None and jnp.shape(mask) != tokens.shape[:2]:
      raise ValueError(f"PartDecoder.{name}: mask must have shape {tokens.shape[:2]}, got "
                       f"{jnp.shape(mask)}")

  def encode_image(self, image_tokens: Array, image_mask: Array | None = None) -> Array:
    """Image tokens [B, Lv, D] (e.g. all 193 projected ViT tokens) -> parts [B, N_q, D]."""
    self._check(image_tokens, image_mask, "encode_image")
    return self._decode(self.ln_image(image_tokens), image_mask)

  def encode_text(self, text_tokens: Array, text_mask: Array) -> Array:
    """Text tokens [B, L, D] with key mask [B, L] (True = real token) -> parts [B, N_q, D]."""
    self._check(text_tokens, text_mask, "encode_text")
    return self._decode(self.ln_text(text_tokens), text_mask)

  def part_weights(self, text_global: Array) -> Array:
    """Text-predicted part weights from the global text feature [B, D] -> [B, N_q] (softmax)."""
    if not self.predict_weights:
      raise ValueError("PartDecoder.part_weights: built with predict_weights=False")
    h = nn.relu(self.weight_fc1(text_global.astype(jnp.float32)))
    return jax.nn.softmax(self.weight_fc2(h), axis=-1)

  def __call__(self, image_tokens: Array, text_tokens: Array, text_mask: Array,
               text_global: Array | None = None) -> dict[str, Array]:
    """Both modalities (this also creates every parameter at init).

    Returns image_parts, text_parts [B, N_q, D] and, with predict_weights,
    part_weights [B, N_q] from text_global [B, D] (then required).
    """
    out = dict(image_parts=self.encode_image(image_tokens),
               text_parts=self.encode_text(text_tokens, text_mask))
    if self.predict_weights:
      if text_global is None:
        raise ValueError("PartDecoder: text_global [B, D] is required when predict_weights=True")
      out["part_weights"] = self.part_weights(text_global)
    return out
