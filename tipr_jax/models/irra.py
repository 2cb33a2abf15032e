"""IRRA (Jiang & Ye, CVPR 2023): CLIP dual encoder + implicit relation reasoning heads.

Spec: irra-reference.md §2.3 (cross-modal transformer and MLM head) and §2.4 (ID classifier).
Parameter names mirror the reference's module names so that the optimizer's name rules
(§7: "cross", "bias", "classifier", "mlm_head") select the same groups:

  base_model/{visual,text}          CLIP towers
  cross_attn                        one cross-attention layer, text queries over image tokens
  cross_modal_transformer           `cmt_depth` residual blocks (no mask)
  ln_pre_t, ln_pre_i, ln_post       LayerNorms around them
  mlm_head/{dense,ln,fc}            Linear -> QuickGELU -> LayerNorm -> Linear(vocab)
  classifier                        Linear(embed, num_classes), shared by both modalities
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tipr_jax.models.clip import CLIPConfig, DualEncoder
from tipr_jax.models.layers import (BlockInit, LayerNorm, MultiHeadAttention, Transformer,
                                    compute_dtype, quick_gelu, torch_linear_bias_init)

Array = jax.Array


class MLMHead(nn.Module):
  """dense(D->D) -> QuickGELU -> LayerNorm -> fc(D->vocab); spec §2.3 init."""
  width: int
  vocab_size: int
  layers: int  # depth of the cross-modal transformer (sets proj_std)
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dt = compute_dtype(self.dtype)
    d = self.width
    fc_std = (2 * d) ** -0.5
    proj_std = d ** -0.5 * (2 * self.layers) ** -0.5
    x = nn.Dense(d, dtype=dt, param_dtype=jnp.float32, name="dense",
                 kernel_init=nn.initializers.normal(fc_std),
                 bias_init=torch_linear_bias_init(d))(x)
    x = LayerNorm(name="ln")(quick_gelu(x))
    return nn.Dense(self.vocab_size, dtype=dt, param_dtype=jnp.float32, name="fc",
                    kernel_init=nn.initializers.normal(proj_std),
                    bias_init=torch_linear_bias_init(d))(x)


class IRRA(nn.Module):
  """The IRRA model. Heads are used by `tipr_jax.methods.irra`; see its forward."""
  clip: CLIPConfig
  num_classes: int
  cmt_depth: int = 4

  def setup(self):
    d = self.clip.embed_dim
    heads = max(d // 64, 1)
    dt = self.clip.dtype
    self.base_model = DualEncoder(self.clip)
    self.classifier = nn.Dense(self.num_classes, param_dtype=jnp.float32,
                               kernel_init=nn.initializers.normal(0.001),
                               bias_init=nn.initializers.zeros)
    proj_std = d ** -0.5 * (2 * self.cmt_depth) ** -0.5
    self.cross_attn = MultiHeadAttention(d, heads, dt, attn_std=d ** -0.5, out_std=proj_std)
    self.cross_modal_transformer = Transformer(d, self.cmt_depth, heads, dt, block_init=BlockInit())
    self.ln_pre_t = LayerNorm()
    self.ln_pre_i = LayerNorm()
    self.ln_post = LayerNorm()
    self.mlm_head = MLMHead(d, self.clip.vocab_size, self.cmt_depth, dt)

  def image_tokens(self, images: Array) -> Array:
    return self.base_model.image_tokens(images)

  def text_tokens(self, token_ids: Array) -> Array:
    return self.base_model.text_tokens(token_ids)

  def encode_image(self, images: Array) -> Array:
    return self.base_model.encode_image(images)

  def encode_text(self, token_ids: Array) -> Array:
    return self.base_model.encode_text(token_ids)

  def classify(self, feats: Array) -> Array:
    """Shared ID classifier on un-normalized features: [B,D] -> [B,num_classes] float32."""
    return self.classifier(feats.astype(jnp.float32))

  def cross_former(self, text_tokens: Array, image_tokens: Array) -> Array:
    """§2.3: cross-attention (no residual) -> transformer (no mask) -> ln_post. [B,L,D]."""
    kv = self.ln_pre_i(image_tokens)
    x = self.cross_attn(self.ln_pre_t(text_tokens), kv)
    x = self.cross_modal_transformer(x)
    return self.ln_post(x)

  def mlm_scores(self, x: Array) -> Array:
    """MLM head on cross-modal features: [..., D] -> [..., vocab] float32."""
    return self.mlm_head(x).astype(jnp.float32)

  def __call__(self, images: Array, token_ids: Array) -> dict[str, Array]:
    """Touches every submodule (used for init): token features, logits and MLM scores."""
    img = self.image_tokens(images)
    txt = self.text_tokens(token_ids)
    x = self.cross_former(txt, img)
    return dict(image_logits=self.classify(img[:, 0]), mlm_scores=self.mlm_scores(x[:, :1]))
