"""CLIP dual encoder (ViT image tower + causal text tower) in Flax Linen.

Follows OpenAI CLIP as adapted by IRRA (spec irra-reference.md §2.1): the
image tower supports non-square inputs and an overlapping patch stride, and
both towers apply the final LayerNorm and projection to ALL tokens.
Images are NHWC float32, already normalized. Params are float32; `dtype` in
the config is the compute dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tipr_jax.models.layers import LayerNorm, Transformer, compute_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Shapes of a CLIP dual encoder. image_size is (H, W)."""
  embed_dim: int
  image_size: tuple[int, int]
  patch_size: int
  stride_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
    if len(self.image_size) != 2:
      raise ValueError(f"image_size must be (H, W), got {self.image_size}")
    compute_dtype(self.dtype)
    h, w = self.image_size
    if h < self.patch_size or w < self.patch_size:
      raise ValueError(f"image_size {self.image_size} smaller than patch_size {self.patch_size}")

  @property
  def grid_size(self) -> tuple[int, int]:
    """(gh, gw) = ((H - p) // s + 1, (W - p) // s + 1)."""
    h, w = self.image_size
    p, s = self.patch_size, self.stride_size
    return (h - p) // s + 1, (w - p) // s + 1

  @property
  def num_image_tokens(self) -> int:
    gh, gw = self.grid_size
    return 1 + gh * gw

  @classmethod
  def vit_b16(cls, image_size: tuple[int, int] = (384, 128), **overrides) -> "CLIPConfig":
    """OpenAI CLIP ViT-B/16 shapes (IRRA's backbone)."""
    kw = dict(embed_dim=512, image_size=image_size, patch_size=16, stride_size=16,
              vision_width=768, vision_layers=12, vision_heads=12, context_length=77,
              vocab_size=49408, text_width=512, text_layers=12, text_heads=8,
              dtype="float32")
    kw.update(overrides)
    return cls(**kw)

  @classmethod
  def tiny(cls, **overrides) -> "CLIPConfig":
    """A few-thousand-parameter config for tests."""
    kw = dict(embed_dim=32, image_size=(32, 16), patch_size=8, stride_size=8,
              vision_width=64, vision_layers=2, vision_heads=4, context_length=16,
              vocab_size=1000, text_width=32, text_layers=2, text_heads=2,
              dtype="float32")
    kw.update(overrides)
    return cls(**kw)

  def replace(self, **overrides) -> "CLIPConfig":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["image_size"] = list(self.image_size)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    missing = {f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING} - set(d)
    if unknown or missing:
      raise ValueError(f"CLIPConfig dict: unknown keys {sorted(unknown)}, "
                       f"missing keys {sorted(missing)}")
    return cls(**d)


def _torch_default_uniform(key, shape, dtype=jnp.float32):
  """torch's default conv/linear weight init: U(+-1/sqrt(fan_in)), fan_in = prod(shape[:-1])."""
  fan_in = 1
  for s in shape[:-1]:
    fan_in *= s
  bound = fan_in ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _batch_axis(x: Array) -> Any:
  """Mesh axis that dim 0 of x is sharded over under an Explicit mesh, else None."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec[0] if spec else None


def batch_reshape(x: Array, shape: tuple[int, ...]) -> Array:
  """x.reshape(shape) for a reshape that keeps dim 0 (the batch) and its sharding.

  Under an Explicit-axes mesh JAX needs the output sharding of such a reshape.
  """
  axis = _batch_axis(x)
  if axis is not None:
    return jnp.reshape(x, shape, out_sharding=P(axis, *([None] * (len(shape) - 1))))
  return jnp.reshape(x, shape)


class Embedding(nn.Module):
  """Token embedding table [vocab, width] (param 'embedding'); ids [B,L] -> [B,L,width]."""
  vocab_size: int
  width: int
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, ids: Array) -> Array:
    table = self.param("embedding", nn.initializers.normal(0.02),
                       (self.vocab_size, self.width), jnp.float32)
    table = table.astype(compute_dtype(self.dtype))
    axis = _batch_axis(ids)
    if axis is not None:  # gather from a replicated table into a batch-sharded result
      return table.at[ids].get(out_sharding=P(axis, None, None))
    return jnp.take(table, ids, axis=0)


def patch_embed(images: Array, kernel: Array, stride: int, force_conv: bool = False) -> Array:
  """Conv patch embedding without bias: [B,H,W,C], kernel [p,p,C,D] -> [B, gh*gw, D].

  With stride == p (non-overlapping) it is a reshape and one matmul (faster on
  CPU than XLA's convolution); otherwise, or with force_conv, a VALID conv.
  """
  b, h, w, cin = images.shape
  p, d = kernel.shape[0], kernel.shape[-1]
  gh, gw = (h - p) // stride + 1, (w - p) // stride + 1
  if stride == p and not force_conv:
    x = batch_reshape(images[:, :gh * p, :gw * p], (b, gh, p, gw, p, cin))
    x = batch_reshape(x.transpose(0, 1, 3, 2, 4, 5), (b, gh * gw, p * p * cin))
    return x @ kernel.reshape(p * p * cin, d)
  x = jax.lax.conv_general_dilated(images, kernel, window_strides=(stride, stride),
                                   padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return batch_reshape(x, (b, gh * gw, d))


class VisionTransformer(nn.Module):
  """images [B,H,W,3] -> tokens [B, 1+gh*gw, embed_dim] (ln_post + proj on all tokens).

  return_hidden=True also returns the input of the last residual block, [B,1+gh*gw,width]
  (for heads that duplicate the last block, e.g. models/gaussian.py).
  """
  config: CLIPConfig

  @nn.compact
  def __call__(self, images: Array, return_hidden: bool = False) -> Array | tuple[Array, Array]:
    c = self.config
    dt = compute_dtype(c.dtype)
    p, s, d = c.patch_size, c.stride_size, c.vision_width
    gh, gw = c.grid_size
    if images.ndim != 4 or tuple(images.shape[1:3]) != c.image_size:
      raise ValueError(f"images must be [B,{c.image_size[0]},{c.image_size[1]},C], "
                       f"got {images.shape}")
    cin = images.shape[-1]
    kernel = self.param("conv1", _torch_default_uniform, (p, p, cin, d), jnp.float32)
    x = patch_embed(images.astype(dt), kernel.astype(dt), s)
    scale = d ** -0.5
    cls_emb = self.param("class_embedding", nn.initializers.normal(scale), (d,), jnp.float32)
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (1 + gh * gw, d), jnp.float32)
    cls_tok = jnp.zeros_like(x[:, :1]) + cls_emb.astype(dt)  # keeps x's batch sharding
    x = jnp.concatenate([cls_tok, x], axis=1) + pos.astype(dt)
    x = LayerNorm(name="ln_pre")(x)
    x, hidden = Transformer(d, c.vision_layers, c.vision_heads, c.dtype, name="transformer")(
        x, return_hidden_before_last=True)
    x = LayerNorm(name="ln_post")(x)
    proj = self.param("proj", nn.initializers.normal(scale), (d, c.embed_dim), jnp.float32)
    x = x @ proj.astype(dt)
    return (x, hidden) if return_hidden else x


def causal_mask(length: int) -> Array:
  """Boolean [L, L], True where query i may attend key j (j <= i)."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))


class TextTransformer(nn.Module):
  """token_ids [B,L] (L <= context_length) -> tokens [B,L,embed_dim], causal attention.

  return_hidden=True also returns the input of the last residual block, [B,L,width].
  """
  config: CLIPConfig

  @nn.compact
  def __call__(self, token_ids: Array, return_hidden: bool = False) -> Array | tuple[Array, Array]:
    c = self.config
    dt = compute_dtype(c.dtype)
    d = c.text_width
    if token_ids.ndim != 2 or token_ids.shape[1] > c.context_length:
      raise ValueError(f"token_ids must be [B, L<={c.context_length}], got {token_ids.shape}")
    length = token_ids.shape[1]
    emb = Embedding(c.vocab_size, d, c.dtype, name="token_embedding")
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (c.context_length, d), jnp.float32)
    x = emb(token_ids) + pos[:length].astype(dt)
    x, hidden = Transformer(d, c.text_layers, c.text_heads, c.dtype, name="transformer")(
        x, causal_mask(length), return_hidden_before_last=True)
    x = LayerNorm(name="ln_final")(x)
    proj = self.param("text_projection", nn.initializers.normal(d ** -0.5),
                      (d, c.embed_dim), jnp.float32)
    x = x @ proj.astype(dt)
    return (x, hidden) if return_hidden else x


def eot_pool(text_tokens: Array, token_ids: Array) -> Array:
  """Feature at the end-of-text position (argmax of ids): [B,L,D], [B,L] -> [B,D].

  Uses take_along_axis so it also works with batch-sharded arrays under an
  Explicit-axes mesh.
  """
  idx = jnp.argmax(token_ids, axis=-1)[:, None, None]
  return jnp.take_along_axis(text_tokens, idx, axis=1)[:, 0]


class DualEncoder(nn.Module):
  """CLIP image and text towers; params {'visual': ..., 'text': ...}."""
  config: CLIPConfig

  def setup(self):
    self.visual = VisionTransformer(self.config)
    self.text = TextTransformer(self.config)

  def image_tokens(self, images: Array) -> Array:
    """[B,H,W,3] -> [B,1+gh*gw,embed_dim] in the compute dtype."""
    return self.visual(images)

  def text_tokens(self, token_ids: Array) -> Array:
    """[B,L] -> [B,L,embed_dim] in the compute dtype."""
    return self.text(token_ids)

  def image_tokens_and_hidden(self, images: Array) -> tuple[Array, Array]:
    """(tokens [B,1+gh*gw,embed_dim], input of the last vision block [B,1+gh*gw,vision_width])."""
    return self.visual(images, return_hidden=True)

  def text_tokens_and_hidden(self, token_ids: Array) -> tuple[Array, Array]:
    """(tokens [B,L,embed_dim], input of the last text block [B,L,text_width]); causal."""
    return self.text(token_ids, return_hidden=True)

  def encode_image(self, images: Array) -> Array:
    """CLS feature after ln_post + proj, float32 [B,embed_dim]."""
    return self.visual(images)[:, 0].astype(jnp.float32)

  def encode_text(self, token_ids: Array) -> Array:
    """EOT feature after ln_final + text_projection, float32 [B,embed_dim]."""
    return eot_pool(self.text(token_ids), token_ids).astype(jnp.float32)

  def __call__(self, images: Array, token_ids: Array) -> dict[str, Array]:
    img = self.visual(images)
    txt = self.text(token_ids)
    return dict(image_tokens=img, text_tokens=txt,
                image_feats=img[:, 0].astype(jnp.float32),
                text_feats=eot_pool(txt, token_ids).astype(jnp.float32))
