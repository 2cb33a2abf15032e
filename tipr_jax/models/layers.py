"""Transformer building blocks shared by the CLIP towers and the IRRA heads.

Parameters are always float32; `dtype` is the compute dtype ('float32' or
'bfloat16'). Layouts follow PyTorch's CLIP so that weights map one to one:
attention keeps one packed input projection `in_proj_kernel` [D, 3D] (the
transpose of torch's `in_proj_weight`, order q, k, v) and `in_proj_bias` [3D].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[..., Array]


def compute_dtype(dtype: str | Any) -> jnp.dtype:
  """Maps 'float32' / 'bfloat16' (or a numpy dtype) to a jnp dtype."""
  d = jnp.dtype(dtype)
  if d not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f"compute dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  return d


def quick_gelu(x: Array) -> Array:
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def torch_linear_bias_init(fan_in: int) -> Initializer:
  """torch.nn.Linear's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@dataclasses.dataclass(frozen=True)
class BlockInit:
  """Kernel init stds per role of a residual block (None: CLIP's formula).

  OpenAI CLIP `initialize_parameters` (and IRRA's cross-modal transformer,
  spec §2.3) use, for a transformer of width d and L layers:
    attn (packed q/k/v in-proj) = d**-0.5
    out  (attention out-proj)   = d**-0.5 * (2L)**-0.5
    fc   (mlp c_fc)             = (2d)**-0.5
    proj (mlp c_proj)           = d**-0.5 * (2L)**-0.5
  Attention biases start at 0; the MLP biases keep torch.nn.Linear's default
  U(+-1/sqrt(fan_in)) when `torch_mlp_bias` (else 0).
  """
  attn: float | None = None
  out: float | None = None
  fc: float | None = None
  proj: float | None = None
  torch_mlp_bias: bool = True

  def resolve(self, width: int, layers: int) -> "BlockInit":
    """Fills the None stds with CLIP's formula for (width, layers)."""
    scale = width ** -0.5
    proj_std = scale * (2 * layers) ** -0.5
    return BlockInit(
        attn=scale if self.attn is None else self.attn,
        out=proj_std if self.out is None else self.out,
        fc=(2 * width) ** -0.5 if self.fc is None else self.fc,
        proj=proj_std if self.proj is None else self.proj,
        torch_mlp_bias=self.torch_mlp_bias)


def _normal(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


class LayerNorm(nn.Module):
  """LayerNorm with eps 1e-5 computed in float32; output cast back to x.dtype."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


def _prepare_mask(mask: Array | None, dtype) -> Array | None:
  """Turns a boolean (True = attend) or additive mask into an additive float mask."""
  if mask is None:
    return None
  if mask.dtype == jnp.bool_:
    return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
  return mask.astype(jnp.float32)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention equivalent (batch first, no dropout).

  Call as `(q_in [B,Lq,D], kv_in [B,Lk,D] | None, mask=None) -> [B,Lq,D]`.
  `kv_in=None` (or `kv_in is q_in`) is self-attention with one fused q/k/v
  matmul; otherwise queries come from q_in and keys/values from kv_in
  (cross-attention). `mask` broadcasts to [B,H,Lq,Lk] ([Lq,Lk] works): boolean
  (True = attend) or additive float.
  """
  width: int
  heads: int
  dtype: Any = "float32"
  attn_std: float | None = None  # None: width**-0.5
  out_std: float | None = None   # None: width**-0.5

  @nn.compact
  def __call__(self, q_in: Array, kv_in: Array | None = None,
               mask: Array | None = None) -> Array:
    d, h = self.width, self.heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by heads {h}")
    dt = compute_dtype(self.dtype)
    attn_std = d ** -0.5 if self.attn_std is None else self.attn_std
    out_std = d ** -0.5 if self.out_std is None else self.out_std
    w = self.param("in_proj_kernel", _normal(attn_std), (d, 3 * d), jnp.float32)
    b = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,), jnp.float32)
    w, b = w.astype(dt), b.astype(dt)
    q_in = q_in.astype(dt)
    bsz, lq, _ = q_in.shape
    if kv_in is None or kv_in is q_in:
      qkv = (q_in @ w + b).reshape(bsz, lq, 3, h, d // h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      kv_in = kv_in.astype(dt)
      lk = kv_in.shape[1]
      q = (q_in @ w[:, :d] + b[:d]).reshape(bsz, lq, h, d // h)
      kv = (kv_in @ w[:, d:] + b[d:]).reshape(bsz, lk, 2, h, d // h)
      k, v = kv[:, :, 0], kv[:, :, 1]
    o = attention(q, k, v, _prepare_mask(mask, dt))
    o = o.reshape(bsz, lq, d)
    return nn.Dense(d, dtype=dt, param_dtype=jnp.float32, name="out_proj",
                    kernel_init=_normal(out_std),
                    bias_init=nn.initializers.zeros)(o)


def attention(q: Array, k: Array, v: Array, bias: Array | None) -> Array:
  """Scaled dot-product attention, q [B,Lq,H,Dh], k/v [B,Lk,H,Dh] -> [B,Lq,H,Dh].

  Heads are moved next to the batch first ([B,H,L,Dh]): XLA's CPU batched
  matmuls run ~1.5x faster in that layout than on [B,L,H,Dh] operands.
  Logits and softmax in float32; the probabilities are cast back to the
  compute dtype before the AV product.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", p, v).transpose(0, 2, 1, 3)


class MLP(nn.Module):
  """Dense(4d) -> QuickGELU -> Dense(d), named c_fc / c_proj as in CLIP."""
  width: int
  dtype: Any = "float32"
  fc_std: float = 0.02
  proj_std: float = 0.02
  torch_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dt = compute_dtype(self.dtype)
    d = self.width
    zeros = nn.initializers.zeros
    x = nn.Dense(4 * d, dtype=dt, param_dtype=jnp.float32, name="c_fc",
                 kernel_init=_normal(self.fc_std),
                 bias_init=torch_linear_bias_init(d) if self.torch_bias else zeros)(x)
    x = quick_gelu(x)
    return nn.Dense(d, dtype=dt, param_dtype=jnp.float32, name="c_proj",
                    kernel_init=_normal(self.proj_std),
                    bias_init=torch_linear_bias_init(4 * d) if self.torch_bias else zeros)(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1 x); x + mlp(ln_2 x). Self-attention over x."""
  width: int
  heads: int
  dtype: Any = "float32"
  block_init: BlockInit = BlockInit()
  layers: int = 1  # depth of the enclosing transformer, for CLIP's default stds

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    ini = self.block_init.resolve(self.width, self.layers)
    dt = compute_dtype(self.dtype)
    x = x.astype(dt)
    y = LayerNorm(name="ln_1")(x)
    x = x + MultiHeadAttention(self.width, self.heads, self.dtype, attn_std=ini.attn,
                               out_std=ini.out, name="attn")(y, y, mask)
    y = LayerNorm(name="ln_2")(x)
    x = x + MLP(self.width, self.dtype, fc_std=ini.fc, proj_std=ini.proj,
                torch_bias=ini.torch_mlp_bias, name="mlp")(y)
    return x


class Transformer(nn.Module):
  """`layers` ResidualAttentionBlocks (named resblocks_0..) on [B,L,D]."""
  width: int
  layers: int
  heads: int
  dtype: Any = "float32"
  block_init: BlockInit = BlockInit()

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None,
               return_hidden_before_last: bool = False) -> Array | tuple[Array, Array]:
    """[B,L,D] -> [B,L,D]; with return_hidden_before_last, (output, input of the last block)."""
    if return_hidden_before_last and self.layers < 1:
      raise ValueError("Transformer: return_hidden_before_last needs layers >= 1")
    hidden = x
    for i in range(self.layers):
      hidden = x
      x = ResidualAttentionBlock(self.width, self.heads, self.dtype,
                                 block_init=self.block_init,
                                 layers=self.layers, name=f"resblocks_{i}")(x, mask)
    return (x, hidden) if return_hidden_before_last else x
